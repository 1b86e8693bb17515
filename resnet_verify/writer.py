"""Writing an engine's stage outputs as a candidate dump, for
`verify compare REF_DIR CAND_DIR` (docs/dump-format.md):

    import resnet_verify as rv
    with rv.CandidateWriter("out/my-engine", reference="out/resnet50") as writer:
        writer.stage("conv1", conv1_output)          # float32, NCHW, the reference's shape
        writer.stage("layer1.0.relu#1", block_output)

Each stage is checked as it is written, against the reference's manifest:
its name, its shape (or that shape's NHWC permutation with layout="NHWC")
and its dtype. Stages not written are listed by `verify compare` as not
compared."""

import difflib
import json
import shutil
from pathlib import Path

import numpy as np

from reference.manifest import build_manifest

LAYOUTS = ("NCHW", "NHWC")
# What a candidate directory holds: a writer replaces a directory with nothing else.
CANDIDATE_FILES = ("manifest.json", "stages")


def _manifest(directory):
    path = Path(directory) / "manifest.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file; the reference is a dump directory "
                         "(python -m reference.dump --out DIR)") from None


def _nchw(shape, layout):
    """A stage's stored shape in NCHW order."""
    return [shape[0], shape[3], shape[1], shape[2]] if layout == "NHWC" and len(shape) == 4 else list(shape)


def stage_names(reference):
    """The reference dump's stage names, in execution order
    (`layer1.0.relu#2` for a module's third call): the names to write."""
    return [stage["name"] for stage in _manifest(reference)["stages"]]


class CandidateWriter:
    """Writes a candidate dump into `out_dir`: `.stage(name, array)` for each
    stage the engine computes, then `.close()` (or use it as a context
    manager), which writes the manifest. `reference` is the reference dump
    the candidate will be compared with: names, module types and shapes
    come from it. `layout`: "NCHW" (torch's), or "NHWC" for arrays stored
    channels-last (4-D stages only; the logits stay `[N, classes]`)."""

    def __init__(self, out_dir, reference, layout="NCHW"):
        self.layout = str(layout).upper()
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout {layout!r}: NCHW or NHWC")
        self.reference = Path(reference)
        manifest = _manifest(reference)
        self._expected = {stage["name"]: dict(stage, shape=_nchw(stage["shape"], manifest["layout"]))
                          for stage in manifest["stages"]}
        self.out_dir = Path(out_dir)
        # Only a candidate written before (a manifest and its stages) is
        # replaced: never a reference (it has weights/), never anything else.
        if self.out_dir.exists():
            held = sorted(path.name for path in self.out_dir.iterdir())
            other = [name for name in held if name not in CANDIDATE_FILES]
            if other or (held and "manifest.json" not in held):
                raise ValueError(f"{self.out_dir}: holds {', '.join((other or held)[:3])}, so it is not a candidate "
                                 "written before; refusing to overwrite it")
            shutil.rmtree(self.out_dir / "stages", ignore_errors=True)
            (self.out_dir / "manifest.json").unlink(missing_ok=True)
        (self.out_dir / "stages").mkdir(parents=True)
        self._stages = []
        self._closed = False

    def stage(self, name, array):
        """Writes `array` as the candidate's output of stage `name`."""
        if self._closed:
            raise ValueError(f"stage {name!r}: the writer for {self.out_dir} is closed")
        expected = self._expected.get(name)
        if expected is None:
            # The name as written first (CONV1 for conv1), then look-alikes.
            same_letters = [known for known in self._expected if known.lower() == name.lower()]
            near = same_letters or difflib.get_close_matches(name, list(self._expected), n=3)
            hint = f"; did you mean {', '.join(near)}?" if near else ""
            raise ValueError(f"stage {name!r}: the reference {self.reference} has no stage of that name{hint} "
                             "(resnet_verify.stage_names(reference) lists them)")
        if any(stage["name"] == name for stage in self._stages):
            raise ValueError(f"stage {name!r}: written already")
        if hasattr(array, "detach"):  # a torch tensor
            array = array.detach().cpu()
            if not array.dtype.is_floating_point or array.dtype.itemsize != 4:  # numpy has no bfloat16
                raise TypeError(f"stage {name!r}: {array.dtype} tensor; the format stores float32 "
                                "(convert with .float())")
            array = array.numpy()
        array = np.asarray(array)
        if array.dtype != np.float32:
            raise TypeError(f"stage {name!r}: {array.dtype} array; the format stores float32 "
                            "(convert with .astype(np.float32))")
        shape = list(expected["shape"])
        if self.layout == "NHWC" and len(shape) == 4:
            shape = [shape[0], shape[2], shape[3], shape[1]]
        if list(array.shape) != shape:
            raise ValueError(f"stage {name!r}: shape {list(array.shape)}, where the reference's is "
                             f"{expected['shape']} (NCHW){f', {shape} stored NHWC' if shape != expected['shape'] else ''}")
        file = f"stages/{len(self._stages):03d}_{name.replace('#', '@')}.npy"
        np.save(self.out_dir / file, np.ascontiguousarray(array), allow_pickle=False)
        self._stages.append({"name": name, "module_type": expected["module_type"], "shape": shape, "file": file})

    def close(self):
        """Writes the manifest; returns the candidate's directory."""
        if not self._closed:
            manifest = build_manifest(producer={"tool": "resnet_verify.CandidateWriter"}, mode="eval",
                                      layout=self.layout, stages=self._stages)
            (self.out_dir / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
            self._closed = True
        return self.out_dir

    def __enter__(self):
        return self

    def __exit__(self, error_type, error, traceback):
        if error_type is None:
            self.close()
        return False
