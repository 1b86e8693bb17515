"""A failing stage, handed over: written by `verify repro`.

    pytest test_repro.py

test_the_reference_is_what_torch_computes recomputes the stage from the
stored inputs and weights with torch.nn.functional and checks the stored
reference output against it: the case is a faithful copy of PyTorch.
test_the_candidate_matches_the_reference judges the stored candidate output
with the rule verify used, and fails as verify did. case.json says what the
stage is; README.md says what failed.
"""

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
CASE = json.loads((HERE / "case.json").read_text())


def array(file):
    return torch.from_numpy(np.load(HERE / file)).double()


def recompute():
    """The stage as torch computes it, in float64, from the stored inputs."""
    inputs = [array(file) for file in CASE["inputs"]]
    weights = {name: array(file) for name, file in CASE["weights"].items()}
    params, kind = CASE["params"], CASE["module_type"]
    x = inputs[0]
    if kind == "Conv2d":
        return F.conv2d(x, weights["weight"], weights.get("bias"), params["stride"], params["padding"],
                        params["dilation"], params["groups"])
    if kind in ("BatchNorm2d", "FrozenBatchNorm2d"):
        return F.batch_norm(x, weights["running_mean"], weights["running_var"], weights["weight"], weights["bias"],
                            training=False, eps=params["eps"])
    if kind == "ReLU":
        # A block's last ReLU adds the identity first: relu(branch + identity).
        return F.relu(x + inputs[1]) if len(inputs) == 2 else F.relu(x)
    if kind == "MaxPool2d":
        return F.max_pool2d(x, params["kernel_size"], params["stride"], params["padding"], params["dilation"],
                            ceil_mode=params["ceil_mode"])
    if kind == "AdaptiveAvgPool2d":
        return F.adaptive_avg_pool2d(x, params["output_size"])
    if kind == "Linear":
        return F.linear(torch.flatten(x, 1), weights["weight"], weights.get("bias"))
    if kind in ("Identity", "Dropout"):
        return x
    raise NotImplementedError(f"module type {kind}")


def judge(candidate, reference, equal_nan):
    """verify's rule, element by element: |cand - ref| <= atol + rtol * |ref|
    where both are finite; a NaN or an infinity matches only the same value
    (a NaN only under equal_nan), and counts as an infinite error otherwise.
    Returns the elements out of tolerance and the largest error."""
    rule = CASE["tolerance"]
    finite = torch.isfinite(candidate) & torch.isfinite(reference)
    same = (candidate == reference) | (equal_nan & candidate.isnan() & reference.isnan())
    error = torch.where(finite, (candidate - reference).abs(), torch.where(same, 0.0, float("inf")))
    failing = torch.where(finite, ~(error <= rule["atol"] + rule["rtol"] * reference.abs()), ~same)
    return int(failing.sum()), float(error.max()) if error.numel() else 0.0


def figure(value):
    """A figure of case.json, where a non-finite one is written null."""
    return "inf" if value is None else f"{value:.3e}"


def test_the_reference_is_what_torch_computes():
    reference = array(CASE["reference"])
    recomputed = recompute().reshape(reference.shape)
    # The stored output is torch's float32 result: within float32 rounding
    # of the exact one, which the run's own tolerance covers (a NaN where
    # torch computes one too).
    mismatched, worst = judge(recomputed, reference, equal_nan=True)
    assert mismatched == 0, (f"the stored reference output is not what torch computes from the stored inputs: "
                             f"{mismatched} elements differ, max abs error {worst:.3e}")


def test_the_candidate_matches_the_reference():
    reference, candidate = array(CASE["reference"]), array(CASE["candidate"])
    assert candidate.shape == reference.shape, f"shape {list(candidate.shape)}, reference {list(reference.shape)}"
    mismatched, worst = judge(candidate, reference, CASE["tolerance"].get("equal_nan", False))
    assert mismatched == 0, (f"{CASE['stage']}: {mismatched} of {reference.numel()} elements out of tolerance, "
                             f"max abs error {worst:.3e} (verify: {CASE['verdict']['mismatched']} of "
                             f"{CASE['verdict']['elements']}, max abs error "
                             f"{figure(CASE['verdict']['max_abs_error'])})")
