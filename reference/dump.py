"""Dumps every stage of a torchvision ResNet, as PyTorch computes it.

    python -m reference.dump --model resnet50 --out DIR [--image cat] [--size 224]

Writes DIR/manifest.json, DIR/stages/*.npy (the output of every module call,
NCHW float32, in execution order) and DIR/weights/*.npy (the state_dict, in
torch's own layouts). docs/dump-format.md describes the format.
"""

import argparse
import json
import platform
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
import torchvision
from torch import nn

from . import models, preprocess
from . import hooks
from .manifest import build_manifest, class_names, noise_floor


def seed_value(text):
    """A seed torch takes: a whole number from 0 to 2^63 - 1."""
    value = int(text)
    if not 0 <= value < 2 ** 63:
        raise argparse.ArgumentTypeError(f"{text}: a seed is a whole number from 0 to 2^63 - 1")
    return value


def positive(text):
    """An argument that must be a whole number of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="python -m reference.dump",
        description="Dump the output of every module of a torchvision ResNet, for `verify`.",
    )
    parser.add_argument("--model", required=True, choices=sorted(models.MODELS), help="torchvision constructor name")
    parser.add_argument("--out", required=True, type=Path, help="dump directory (replaced if it holds a dump)")
    parser.add_argument("--weights", type=Path, help="a torchvision state_dict (.pth) you already have: torchvision's classifier, or one saved with --head's head (fc.1.* for dropout_linear, no fc for identity and none); default: seeded random weights with calibrated BatchNorm statistics")
    parser.add_argument("--seed", type=seed_value, default=0, help="seed for weights, calibration and random input (default 0)")
    parser.add_argument("--image", default="cat", help="'cat' (scikit-image's chelsea), 'random', or an image path (default cat)")
    parser.add_argument("--images", nargs="+", metavar="IMAGE",
                        help="a batch of real images, one item each: files, a directory (its image files), or "
                             "'samples' (scikit-image's %d photographs, shipped with it); replaces --image and --batch"
                             % len(preprocess.SAMPLES))
    parser.add_argument("--size", type=input_size, default=224, metavar="N|HxW",
                        help="input size: N (square) or HxW, e.g. 225 or 240x320; odd sizes show padding and "
                             "pooling mistakes that 224 hides (default 224)")
    parser.add_argument("--batch", type=int, default=1, help="batch size (default 1)")
    parser.add_argument("--width", type=positive, default=models.FULL_WIDTH, help="stem channels; below 64 gives a width-reduced model with torchvision's names and topology (default 64)")
    parser.add_argument("--groups", type=positive, help="override the constructor's groups (for width-reduced ResNeXt)")
    parser.add_argument("--width-per-group", type=positive, help="override the constructor's width per group")
    parser.add_argument("--num-classes", type=int, default=1000, help="classes of fc for seeded weights (default 1000)")
    parser.add_argument("--replace-stride-with-dilation", type=dilation_flags, metavar="F,T,T",
                        help="torchvision's constructor option, one flag per layer after the first: "
                             "F,T,T or F,F,T gives the dilated backbones of DeepLabV3 and FCN (Bottleneck models only)")
    parser.add_argument("--norm-layer", choices=["BatchNorm2d", "FrozenBatchNorm2d"], default="BatchNorm2d",
                        help="FrozenBatchNorm2d: every BatchNorm frozen as in torchvision's detection backbones "
                             "(same weights and statistics) (default BatchNorm2d)")
    parser.add_argument("--head", choices=models.HEADS, default="linear",
                        help="linear: torchvision's fc; dropout_linear: fc = Sequential(Dropout(0.5), fc), the usual "
                             "fine-tuning head; identity: fc = Identity; none: the backbone alone, as "
                             "IntermediateLayerGetter cuts it (default linear)")
    parser.add_argument("--train-mode", action="store_true", help="keep the model in train mode (reproduces a reference dumped without model.eval(); for testing the harness)")
    parser.add_argument("--threads", type=positive, help="torch threads; 1 makes the bytes independent of the machine's core count")
    parser.add_argument("--precision", choices=["float32", "float64"], default="float32",
                        help="float64 runs the same float32 weights and input in double precision and stores float64 stages: the exact computation, for accuracy measurements (default float32)")
    parser.add_argument("--floor", action="store_true",
                        help="also run the same weights and input in float64 and record, per stage, how far the "
                             "float32 output is from it (the stage's noise floor, for `verify --tol auto`)")
    args = parser.parse_args(argv)
    if args.images and (args.image != "cat" or args.batch != 1):
        parser.error("--images gives the batch itself: leave out --image and --batch")
    if args.images:
        try:
            args.images = preprocess.image_sources(args.images)
        except SystemExit as refused:
            parser.error(str(refused))
    if args.floor and args.train_mode:
        parser.error("--floor measures an eval-mode reference; in train mode the float64 pass would draw its own "
                     "dropout and its own batch statistics")
    if args.floor and args.precision == "float64":
        parser.error("--floor measures a float32 dump against float64; it does not apply to --precision float64")
    for name in ("batch", "width", "num_classes"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def input_size(text):
    """`224` -> 224, `240x320` -> (240, 320) (height x width); a square HxW is N."""
    parts = text.lower().split("x")
    try:
        values = [int(part) for part in parts]
    except ValueError:
        values = []
    if len(values) not in (1, 2) or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: a size such as 224, or HxW such as 240x320 (each at least 1)")
    return values[0] if len(values) == 1 or values[0] == values[1] else tuple(values)


def dilation_flags(text):
    """`F,T,T` (or false/true, 0/1) as three booleans."""
    words = {"f": False, "false": False, "0": False, "t": True, "true": True, "1": True}
    flags = [words.get(word.strip().lower()) for word in text.split(",")]
    if len(flags) != 3 or None in flags:
        raise argparse.ArgumentTypeError(f"{text!r}: three flags, one per layer after the first, such as F,T,T")
    return flags


def module_params(module):
    """The hyperparameters a re-implementation of the module needs."""
    if isinstance(module, nn.Conv2d):
        return {
            "in_channels": module.in_channels, "out_channels": module.out_channels,
            "kernel_size": list(module.kernel_size), "stride": list(module.stride),
            "padding": list(module.padding), "dilation": list(module.dilation),
            "groups": module.groups, "bias": module.bias is not None,
        }
    if isinstance(module, nn.BatchNorm2d):
        return {
            "num_features": module.num_features, "eps": module.eps, "momentum": module.momentum,
            "affine": module.affine, "track_running_stats": module.track_running_stats,
        }
    if isinstance(module, models.FrozenBatchNorm2d):
        return {"num_features": module.weight.shape[0], "eps": module.eps}
    if isinstance(module, nn.Dropout):
        return {"p": module.p, "inplace": module.inplace}
    if isinstance(module, nn.MaxPool2d):
        return {
            "kernel_size": module.kernel_size, "stride": module.stride, "padding": module.padding,
            "dilation": module.dilation, "ceil_mode": module.ceil_mode,
        }
    if isinstance(module, nn.AdaptiveAvgPool2d):
        size = module.output_size
        return {"output_size": list(size) if isinstance(size, tuple) else [size, size]}
    if isinstance(module, nn.Linear):
        return {"in_features": module.in_features, "out_features": module.out_features, "bias": module.bias is not None}
    if isinstance(module, nn.ReLU):
        return {"inplace": module.inplace}
    return {}


def save(path, array):
    """Stores float32 (float64 stays float64: the exact reference)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    dtype = np.float64 if array.dtype == np.float64 else np.float32
    np.save(path, np.ascontiguousarray(array, dtype=dtype), allow_pickle=False)


def top5(logits, categories):
    result = []
    for row in logits:
        scores, indices = torch.topk(row, k=min(5, row.numel()))
        result.append([
            {"index": int(i), "name": categories[int(i)] if categories else None, "logit": float(s)}
            for s, i in zip(scores, indices)
        ])
    return result


def first_non_finite(recorded):
    """Where the first NaN or infinity of a run appears, in words (None if
    nowhere): the stage, its module, and how many values of each."""
    for stage in recorded:
        output = stage["output"]
        nan, inf = int(output.isnan().sum()), int(output.isinf().sum())
        if nan or inf:
            return (f"stage `{stage['name']}` ({stage['module_type']}) is the first with non-finite values: "
                    f"{nan} NaN and {inf} infinite of {output.numel()}")
    return None


def check_out(out):
    """Refuses to delete anything that is not a dump (before any work is done)."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "manifest.json").exists())):
        raise SystemExit(f"--out {out}: exists and is not a dump; refusing to overwrite it")


def prepare_out(out):
    check_out(out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)


def build(args):
    """The model (weights loaded or seeded and calibrated), its architecture,
    how its weights were made, and the preprocessed input."""
    shape_options = dict(width=args.width, num_classes=args.num_classes, groups=args.groups,
                         width_per_group=args.width_per_group,
                         replace_stride_with_dilation=args.replace_stride_with_dilation)
    if args.weights:
        model, architecture = models.from_checkpoint(args.model, args.weights, head=args.head, **shape_options)
        weights_description = {"source": "file", "file": str(args.weights)}
    else:
        model, architecture = models.seeded(args.model, args.seed, args.size, **shape_options)
        weights_description = {
            "source": "seeded", "seed": args.seed,
            "init": "conv ~ N(0, 2/fan_out) (Irwin-Hall of 12), fc ~ U(+-1/sqrt(fan_in)), integer draws: same bits on any CPU",
            "batch_norm_affine": "weight ~ U[0.5, 1.5), bias ~ U[-0.25, 0.25)",
            "calibration": {"batches": 2, "batch_size": 4, "input": "standard normal (Irwin-Hall of 12)", "momentum": None},
        }
    if not args.weights:  # a checkpoint is loaded with its head on
        model = models.with_head(model, args.head)
    if args.norm_layer == "FrozenBatchNorm2d":
        model = models.freeze_batch_norms(model)
    if args.norm_layer != "BatchNorm2d" or args.head != "linear":
        architecture = models.describe(model.eval())
    x, input_description = preprocess.make_input(args.image, args.size, args.batch, args.seed, images=args.images)
    return model, architecture, weights_description, x, input_description


def write(out, model, architecture, x, *, model_name, weights_description, input_description, train_mode=False,
          precision="float32", command=None, floor=False):
    """Runs `model` on `x` once and writes the whole dump to `out`. Nothing
    is written (and a dump already in `out` is kept) until torch has run."""
    # The weights as the model holds them before the dump's own forward pass
    # (which, in train mode, would update the running statistics).
    weight_arrays = {name: tensor.float().numpy().copy() for name, tensor in model.state_dict().items()
                     if not name.endswith("num_batches_tracked")}
    try:
        # Before the float32 pass: in train mode it moves the running statistics.
        exact = hooks.float64_stages(model.train(train_mode), x) if floor else None
        if precision == "float64":
            # The same float32 weights and input, computed exactly (to float64).
            model, x = model.double(), x.double()
        model.train(train_mode)
        recorded, logits = hooks.stages(model, x)
    except (RuntimeError, ValueError) as error:  # torch's refusals: a map too small, memory
        raise SystemExit(f"torch could not run {model_name} on the input {list(x.shape)}"
                         f"{' in train mode' if train_mode else ''}: {error}") from None
    # What the model returns must be its last stage's value: a model that
    # computes anything after its last module (a __call__ or forward of its
    # own) is not the network the stages describe.
    last = recorded[-1]["output"]
    if isinstance(logits, torch.Tensor) and not (
            logits.shape == last.shape and bool(((logits == last) | (logits.isnan() & last.isnan())).all())):
        raise models.Unsupported(f"the model returns something other than its last stage "
                                 f"({recorded[-1]['name']}): it computes after its last module, "
                                 "which the core does not")
    non_finite = first_non_finite(recorded)
    if non_finite and floor:
        raise models.Unsupported(f"--floor: {non_finite}; a noise floor is measured on finite values")
    if non_finite:
        print(f"warning: {non_finite}: verify compares such values only with --equal-nan, "
              "and the manifest has no top5", file=sys.stderr)
    prepare_out(out)
    weights = []
    for name, array in weight_arrays.items():
        file = f"weights/{name}.npy"
        save(out / file, array)
        weights.append({"name": name, "shape": list(array.shape), "dtype": "float32", "file": file})
    stages = []
    for number, stage in enumerate(recorded):
        module, output = stage.pop("module"), stage.pop("output")
        stage["file"] = f"stages/{number:03d}_{stage['name'].replace('#', '@')}.npy"
        stage["params"] = module_params(module) if module is not None else {}
        if exact is not None:
            stage["floor"] = noise_floor(output, exact[stage["name"]])
        save(out / stage["file"], output.numpy())
        stages.append(stage)

    categories = class_names(architecture["num_classes"])
    manifest = build_manifest(
        producer={
            "tool": "reference.dump", "torch": torch.__version__, "torchvision": torchvision.__version__,
            "numpy": np.__version__, "python": platform.python_version(), "command": command,
        },
        model={"name": model_name, "weights": weights_description},
        architecture=architecture,
        mode="train" if train_mode else "eval",
        batch_norms=[
            {"module": path, "eps": m.eps, "momentum": getattr(m, "momentum", None)}
            for path, m in model.named_modules() if isinstance(m, (nn.BatchNorm2d, models.FrozenBatchNorm2d))
        ],
        input=input_description,
        dtype=precision,
        stages=stages,
        weights=weights,
        # A backbone returns its features, not logits; NaN logits have no order.
        **({"top5": top5(logits, categories)}
           if architecture.get("head", "linear") in ("linear", "dropout_linear") and not non_finite else {}),
        classes=categories,
    )
    # Strict JSON: a NaN written as a bare token is a manifest nothing reads.
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, allow_nan=False) + "\n")
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"dumped {model_name}: {len(stages)} stages, {len(weights)} weights, "
          f"{size / 1e6:.1f} MB, mode {manifest['mode']} -> {out}", file=sys.stderr)
    return manifest


def main(argv=None):
    args = parse_args(argv)
    check_out(args.out)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, architecture, weights_description, x, input_description = build(args)
    # The command without --out, so that the same dump made elsewhere has the same bytes.
    words = list(sys.argv[1:] if argv is None else argv)
    if "--out" in words:
        del words[words.index("--out"):words.index("--out") + 2]
    command = "python -m reference.dump " + " ".join(words)
    try:
        write(args.out, model, architecture, x, model_name=args.model, weights_description=weights_description,
              input_description=input_description, train_mode=args.train_mode, precision=args.precision,
              command=command, floor=args.floor)
    except models.Unsupported as refused:  # nothing written; a dump already there kept
        raise SystemExit(f"{args.out}: not dumped: {refused}") from None


if __name__ == "__main__":
    main()
