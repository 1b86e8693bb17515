"""resnet_verify: the Rust ResNet core and its stage-by-stage comparison with
PyTorch, in-process.

    import torch, torchvision, resnet_verify
    model = torchvision.models.resnet50().eval()
    x = torch.randn(1, 3, 224, 224)
    report = resnet_verify.verify_torch(model, x, print_report=True)
    assert report.passed

Reports are the CLI's JSON report (a dict) with `.text` (the text report)
and `.passed`; errors raise VerifyError with the CLI's messages, and
TrainModeError for a reference dumped in train mode (the CLI's message)
or a live torch model with any module in train mode (naming them).
"""

import json
import os

import numpy as np

from . import _native
from ._native import TrainModeError, VerifyError
from .writer import CandidateWriter, stage_names

__all__ = ["forward", "compare", "verify", "verify_torch", "repro", "Report", "VerifyError", "TrainModeError",
           "CandidateWriter", "stage_names"]


class Report(dict):
    """The CLI's JSON report, as a dict, with the text report in `.text`."""

    def __init__(self, json_text, text):
        super().__init__(json.loads(json_text))
        self.text = text

    @property
    def passed(self):
        return self["summary"]["verdict"] == "succ"

    def failures(self):
        return [stage["name"] for stage in self["stages"] if stage["verdict"] == "fail"]

    def __repr__(self):
        s = self["summary"]
        return (f"<Report {self['model']}: {s['compared']} stages, {s['succ']} succ, {s['fail']} fail, "
                f"first failure {s['first_failure']}>")


def _float32(array, what="array"):
    """A float32 numpy view of `array` (a torch tensor or anything array-like),
    copied only when its dtype or memory order requires it. The core and the
    comparison are float32: a value float32 cannot hold is refused
    (VerifyError naming `what`), not changed into another that would compare
    as equal: an imaginary part, a finite value beyond float32's range (it
    would be inf), a nonzero one below it (0), an integer it does not hold
    exactly. (Wider floats within range are rounded, as torch's .float().)"""
    if hasattr(array, "detach"):
        array = array.detach().cpu()
        if array.is_complex():
            raise VerifyError(f"{what}: complex values ({array.dtype}): float32 holds real values only")
        # numpy has no bfloat16: a narrower float is widened (exactly) first.
        if array.is_floating_point() and array.element_size() < 4:
            array = array.float()
        array = array.numpy()
    array = np.asarray(array)
    if array.dtype == np.float32:
        return np.ascontiguousarray(array)
    kind = array.dtype.kind
    if kind == "c":
        raise VerifyError(f"{what}: complex values ({array.dtype}): float32 holds real values only")
    if kind not in "fiub":
        raise VerifyError(f"{what}: {array.dtype} values are not numbers")
    with np.errstate(over="ignore"):  # found below, and said better
        narrowed = np.ascontiguousarray(array, dtype=np.float32)
    if kind == "f" and array.dtype.itemsize > 4:
        problems = [(np.isfinite(array) & np.isinf(narrowed), "beyond float32's range: in float32 it would be inf"),
                    ((array != 0) & (narrowed == 0), "nonzero but below float32's smallest: in float32 it would be 0")]
    elif kind in "iu" and array.dtype.itemsize >= 4:
        wide = array.astype(np.float64)
        problems = [((np.abs(wide) > 2.0 ** 53) | (narrowed.astype(np.float64) != wide),
                     "an integer float32 does not hold exactly")]
    else:
        problems = []
    for wrong, why in problems:
        if wrong.any():
            index = tuple(int(i) for i in np.argwhere(wrong)[0])
            raise VerifyError(f"{what}: {int(wrong.sum())} {array.dtype} value(s) float32 cannot hold, e.g. "
                              f"{array[index].item()!r} at {index}: {why}. The comparison is in float32, as the CLI's")
    return narrowed


def _train_mode_modules(model):
    """`model`'s modules in training mode, as (path, module); "" is the model."""
    named_modules = getattr(model, "named_modules", None)
    return ([(path, module) for path, module in named_modules() if getattr(module, "training", False)]
            if named_modules else [])


def _refuse_train_mode(model):
    """TrainModeError naming every module of `model` in training mode, if
    any, and saying what train mode changes in those it names: the core
    computes the eval-mode network, and torch running a train-mode
    BatchNorm would also change its running statistics. (Not the message
    of a dump recorded in train mode: nothing was dumped here.)"""
    training = _train_mode_modules(model)
    if not training:
        return
    if training[0][0] == "" and len(training) == len(list(model.modules())):
        which = "every module of the torch model is in train mode"
    else:
        names = [path or "the model" for path, _ in training]
        which = (f"{len(names)} module{'s' if len(names) > 1 else ''} of the torch model "
                 f"{'are' if len(names) > 1 else 'is'} in train mode: " + ", ".join(names[:8])
                 + (f" and {len(names) - 8} more" if len(names) > 8 else ""))
    from torch import nn

    def any_of(kind):
        return any(isinstance(module, kind) for _, module in training)

    effects = []
    if any_of(nn.modules.batchnorm._BatchNorm):
        effects.append("a BatchNorm in train mode normalises with the statistics of the batch, not "
                       "running_mean/running_var, and updates them")
    if any_of(nn.modules.dropout._DropoutNd):
        effects.append("a Dropout in train mode zeroes values at random")
    effects = (" (" + "; ".join(effects) + ")") if effects else ""
    raise TrainModeError(
        f"THE TORCH MODEL IS IN TRAIN MODE: {which}. The core computes the network in eval mode{effects}, "
        "so a model is verified only with every module in eval mode; it was not run. Call model.eval() first.")


def _torch_weights(model):
    """The state_dict as float32 arrays and the architecture of a torch
    model. Refused, in this order: what is no torchvision ResNet at all
    (VerifyError), a model with a module in train mode (TrainModeError,
    naming them), one the core would not build exactly (VerifyError, naming
    each module)."""
    from reference.models import Unsupported, check_kind, describe

    try:
        check_kind(model)
        _refuse_train_mode(model)
        architecture = describe(model)
    except Unsupported as refused:
        raise VerifyError(str(refused)) from None
    weights = {name: _float32(tensor, name) for name, tensor in model.state_dict().items()
               if not name.endswith("num_batches_tracked")}
    return weights, architecture


def forward(weights_or_dump, x, upto=None, architecture=None):
    """Runs the core; returns every stage's output (NCHW numpy arrays; `fc`
    and the stages inside it `[N, C]`, as torch flattens them) by stage
    name, up to and including `upto`.

    `weights_or_dump`: a dump directory, a torchvision ResNet (with
    torchvision's head, a fine-tuning head or none: a backbone cut with
    IntermediateLayerGetter or create_feature_extractor; its state_dict and
    architecture are used), or a dict of state_dict arrays with
    `architecture` (the manifest's architecture dict). A torch model
    with any module in train mode is refused (TrainModeError), and one the
    core would not build exactly (VerifyError, naming the modules)."""
    x = _float32(x, "x")
    if isinstance(weights_or_dump, (str, os.PathLike)):
        return _native.forward_dump(os.fspath(weights_or_dump), x, upto)
    if hasattr(weights_or_dump, "state_dict"):
        weights, architecture = _torch_weights(weights_or_dump)
    else:
        if architecture is None:
            raise VerifyError("forward(weights, x): a dict of weights needs architecture=")
        weights = {name: _float32(array, name) for name, array in weights_or_dump.items()}
    try:
        # NaN and Infinity are not JSON: json.dumps would write them anyway,
        # and the reader would report a syntax error at a column.
        described = json.dumps(architecture, allow_nan=False)
    except (TypeError, ValueError) as error:
        raise VerifyError(f"architecture: {error} (every figure must be a finite number)") from None
    return _native.forward_arrays(described, weights, x, upto)


def compare(ref, cand, atol=None, rtol=None, equal_nan=False, tol=None, tol_multiple=None, cand_dtype=None,
            floor=None):
    """Compares two arrays of the same shape with the CLI's rule and metrics;
    returns a dict: verdict, max_abs_error, relative_error,
    cosine_similarity, mismatched, worst (index, reference, candidate), ...

    tol="auto" judges by the reference's noise floor, as `verify --tol
    auto` does: give `floor`, the same computation in float64 (an array)
    or a dump manifest stage's `floor` dict; `cand_dtype` ("float16",
    "bfloat16") scales it to a reduced-precision candidate."""
    floor_json = None
    if floor is not None and tol != "auto":
        raise VerifyError('compare(floor=...): the floor is used by tol="auto" only')
    if floor is not None:
        if not isinstance(floor, dict):
            from reference.manifest import noise_floor
            try:
                floor = noise_floor(_float32(ref, "ref"), floor)
            except ValueError as refused:
                raise VerifyError(str(refused)) from None
        floor_json = json.dumps(floor)
    return json.loads(_native.compare(_float32(ref, "ref"), _float32(cand, "cand"), atol, rtol, equal_nan, tol,
                                      tol_multiple, cand_dtype, floor_json))


def verify(dump_dir, upto=None, isolate=False, atol=None, rtol=None, allow_train_reference=False, print_report=False,
           tol=None, tol_multiple=None):
    """`verify DUMP_DIR` in-process; returns the Report. tol="auto": each
    stage's tolerance from the dump's noise floor (a dump made with
    --floor), as `verify --tol auto`."""
    report = Report(*_native.verify(os.fspath(dump_dir), upto, isolate, atol, rtol, allow_train_reference,
                                    tol, tol_multiple, None))
    if print_report:
        print(report.text, end="")
    return report


def verify_torch(model, x, upto=None, isolate=False, atol=None, rtol=None, print_report=False, tol=None,
                 tol_multiple=None):
    """Verifies the core against a live torch model: hooks every module,
    runs the model once on `x` (NCHW), and compares each stage, without
    writing files. A model with any module in train mode is refused
    (TrainModeError, naming them) before it runs, since a train-mode pass
    would also change its running statistics; so is one the core would not
    build exactly (VerifyError, naming the modules). The model is not
    changed. tol="auto" also runs a float64 copy of the model to measure
    each stage's noise floor, and judges by it (`verify --tol auto`)."""
    import torch
    from reference import hooks
    from reference.manifest import build_manifest, class_names, noise_floor

    weights, architecture = _torch_weights(model)
    if torch.is_autocast_enabled("cpu"):
        raise VerifyError(f"torch.autocast is on for the CPU ({torch.get_autocast_dtype('cpu')}): the model would "
                          "run its convs and Linear in that dtype, where the core computes float32, and every stage "
                          "would fail for it; call verify_torch outside the autocast block")
    # The model runs on x as given: torch refuses another dtype for a
    # float32 model, and a silent x.float() would verify another call.
    if isinstance(x, torch.Tensor) and x.dtype != torch.float32:
        raise VerifyError(f"x: a {x.dtype} tensor, where the model's weights are float32 (torch itself refuses "
                          "it): call verify_torch(model, x.float())")
    x = torch.as_tensor(_float32(x, "x"))
    if x.ndim != 4:
        raise VerifyError(f"x must be NCHW (4-D), got shape {list(x.shape)}")
    try:
        stages, _ = hooks.stages(model, x)
    except (RuntimeError, ValueError) as error:  # torch's own refusal: channels, a map too small
        raise VerifyError(f"torch could not run the model on x of shape {list(x.shape)}: {error}") from None
    exact = hooks.float64_stages(model, x) if tol == "auto" else None
    arrays = {f"weights/{name}": array for name, array in weights.items()}
    entries = []
    for stage in stages:
        output = stage.pop("output")
        stage.pop("module")
        stage["file"] = f"stages/{stage['name']}"
        if exact is not None:
            stage["floor"] = noise_floor(output, exact[stage["name"]])
        arrays[stage["file"]] = _float32(output, stage["name"])
        entries.append(stage)
    manifest = build_manifest(
        model={"name": f"live {type(model).__name__} ({architecture['block']}, layers {architecture['layers']})"},
        architecture=architecture,
        mode="eval",
        stages=entries,
        weights=[{"name": name, "shape": list(array.shape), "file": f"weights/{name}"} for name, array in weights.items()],
        classes=class_names(architecture["num_classes"]),
    )
    report = Report(*_native.verify_arrays("<torch model>", json.dumps(manifest), arrays, upto, isolate, atol, rtol,
                                           tol, tol_multiple, None))
    if print_report:
        print(report.text, end="")
    return report


def repro(out, dump_dir=None, reference=None, candidate=None, stage=None, shrink=False, force=False, atol=None,
          rtol=None, tol=None, tol_multiple=None, cand_dtype=None):
    """`verify repro` in-process: writes the failing stage (the root
    failure, or `stage`) of the core on `dump_dir`, or of the `candidate`
    dump against `reference`, as a bundle in `out` (inputs, weights, both
    outputs, case.json, test_repro.py, README.md). Returns (the stage, the
    path written): the path is None when the stage passes (unless `force`),
    and the stage "" when every stage passes and none was named."""
    path = lambda value: None if value is None else os.fspath(value)
    name, written, _ = _native.repro(os.fspath(out), path(dump_dir), path(reference), path(candidate), stage, shrink,
                                     force, atol, rtol, tol, tol_multiple, cand_dtype)
    return name, (os.fspath(out) if written else None)

