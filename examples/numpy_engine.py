"""An engine of its own: a torchvision ResNet's stem and first block in plain
NumPy, from a reference dump's weights and input, written as a candidate
with resnet_verify.CandidateWriter.

    python examples/numpy_engine.py REF_DIR OUT_DIR
    target/release/verify compare REF_DIR OUT_DIR

`verify compare` says succ for the stages written and lists the rest as
not compared."""

import json
import sys
from pathlib import Path

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

import resnet_verify as rv


def conv2d(x, weight, stride, padding, dilation=1, groups=1):
    """torch's conv2d (no bias): x NCHW, weight OIHW, computed in float64."""
    x = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    out_channels, group_channels, kh, kw = weight.shape
    windows = sliding_window_view(x, ((kh - 1) * dilation + 1, (kw - 1) * dilation + 1), axis=(2, 3))
    windows = windows[:, :, ::stride, ::stride, ::dilation, ::dilation]  # N C OH OW KH KW
    per_group = out_channels // groups
    outputs = [
        np.einsum("ncyxij,ocij->noyx", windows[:, g * group_channels:(g + 1) * group_channels],
                  weight[g * per_group:(g + 1) * per_group].astype(np.float64))
        for g in range(groups)
    ]
    return np.concatenate(outputs, axis=1).astype(np.float32)


def batch_norm(x, load, module, eps_of):
    """Eval mode: the running statistics, and the module's own eps."""
    eps = eps_of(module)
    mean, var, gamma, beta = (load(f"{module}.{part}").astype(np.float64).reshape(1, -1, 1, 1)
                              for part in ("running_mean", "running_var", "weight", "bias"))
    return ((x - mean) / np.sqrt(var + eps) * gamma + beta).astype(np.float32)


def relu(x):
    return np.maximum(x, 0)


def max_pool(x, kernel=3, stride=2, padding=1):
    x = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)), constant_values=-np.inf)
    return sliding_window_view(x, (kernel, kernel), axis=(2, 3))[:, :, ::stride, ::stride].max(axis=(4, 5))


def run(reference, out):
    reference = Path(reference)
    manifest = json.loads((reference / "manifest.json").read_text())
    architecture = manifest["architecture"]
    # A BatchNorm may have an eps of its own (`batch_norm_eps_overrides`).
    overrides = architecture.get("batch_norm_eps_overrides") or {}

    def eps_of(module):
        return overrides.get(module, architecture["batch_norm_eps"])

    files = {stage["name"]: stage["file"] for stage in manifest["stages"]}

    def load(name):
        return np.load(reference / "weights" / f"{name}.npy")

    x = np.load(reference / files["input"])
    with rv.CandidateWriter(out, reference=reference) as writer:
        def stage(name, value):
            writer.stage(name, value)
            return value

        # The stem.
        x = stage("conv1", conv2d(x, load("conv1.weight"), stride=2, padding=3))
        x = stage("bn1", batch_norm(x, load, "bn1", eps_of))
        x = stage("relu", relu(x))
        x = stage("maxpool", max_pool(x))

        # layer1.0: convs, each BatchNorm, the block's relu called after each
        # but the last, and relu(out + identity) to end it.
        block = "layer1.0"
        if architecture["block"] == "BasicBlock":
            convs = [("conv1", 1, 1), ("conv2", 1, 1)]  # (name, padding, groups)
        else:
            convs = [("conv1", 0, 1), ("conv2", 1, architecture["groups"]), ("conv3", 0, 1)]
        identity, out_x = x, x
        for number, (conv, padding, groups) in enumerate(convs, start=1):
            out_x = stage(f"{block}.{conv}", conv2d(out_x, load(f"{block}.{conv}.weight"), 1, padding, groups=groups))
            out_x = stage(f"{block}.bn{number}", batch_norm(out_x, load, f"{block}.bn{number}", eps_of))
            if number < len(convs):
                out_x = stage(f"{block}.relu#{number - 1}", relu(out_x))
        if f"{block}.downsample" in files:
            identity = stage(f"{block}.downsample.0", conv2d(identity, load(f"{block}.downsample.0.weight"), 1, 0))
            identity = stage(f"{block}.downsample.1", batch_norm(identity, load, f"{block}.downsample.1", eps_of))
            stage(f"{block}.downsample", identity)
        out_x = stage(f"{block}.relu#{len(convs) - 1}", relu(out_x + identity))
        stage(block, out_x)
    return Path(out)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    print(f"wrote {run(sys.argv[1], sys.argv[2])}")
