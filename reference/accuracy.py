"""How close the core and PyTorch float32 each come to the exact result.

Dumps one model twice with the same float32 weights and input: once as
PyTorch computes it in float32, once in float64 (the exact reference). Then
`verify compare` measures PyTorch float32 against float64 and `verify`
measures the core against float64, stage by stage, as max|err| / max|ref|.
The core's requirement: at every stage, no worse than 2x PyTorch's own
float32 figure.

    scripts/measure-accuracy [--model resnet50] [--size 224]
"""

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VERIFY = ROOT / "target" / "release" / "verify"
# Below this, an error is float32 rounding of the result itself.
FLOOR = 2.0 ** -24


def report(*arguments):
    """Stage name -> (relative error, verdict)."""
    result = subprocess.run([str(VERIFY), *map(str, arguments), "--format", "json"], capture_output=True, text=True)
    if result.returncode == 2:
        raise SystemExit(result.stderr)
    stages = json.loads(result.stdout)["stages"]
    return {stage["name"]: (stage["cumulative"]["relative_error"], stage["verdict"]) for stage in stages}


def fused_logits_error(dump_dir):
    """max|err|/max|ref| of the fused inference path's logits (BatchNorm
    folded into the convs, ReLU and residual in the GEMM epilogue), which
    verify does not run, against the float64 logits."""
    import numpy as np
    logits = Path(dump_dir) / "fused-logits.npy"
    subprocess.run([str(ROOT / "target" / "release" / "resnet-bench"), str(dump_dir), "--logits", str(logits)],
                   input="", text=True, check=True, capture_output=True)
    manifest = json.loads((Path(dump_dir) / "manifest.json").read_text())
    fc = next(stage for stage in manifest["stages"] if stage["name"] == "fc")
    exact = np.load(Path(dump_dir) / fc["file"]).astype(np.float64)
    fused = np.load(logits).astype(np.float64)
    return float(np.abs(fused - exact).max() / max(np.abs(exact).max(), FLOOR))


def main(argv=None):
    parser = argparse.ArgumentParser(prog="scripts/measure-accuracy", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--limit", type=float, default=2.0, help="allowed ratio core / torch (default 2)")
    args = parser.parse_args(argv)

    from . import dump
    work = Path(tempfile.mkdtemp(prefix="accuracy-"))
    try:
        common = ["--model", args.model, "--size", str(args.size), "--image", "cat"]
        dump.main([*common, "--out", str(work / "float32")])
        dump.main([*common, "--out", str(work / "float64"), "--precision", "float64"])
        torch_verdicts = report("compare", work / "float64", work / "float32")
        # torch.testing.assert_close's float32 defaults, on PyTorch's own float32 result.
        testing_defaults = report("compare", work / "float64", work / "float32", "--rtol", "1.3e-6", "--atol", "1e-5")
        core_verdicts = report(work / "float64")
        fused_error = fused_logits_error(work / "float64")
    finally:
        shutil.rmtree(work)

    torch_error = {name: error for name, (error, _) in torch_verdicts.items()}
    core_error = {name: error for name, (error, _) in core_verdicts.items()}
    rows = []
    for name, torch_relative in torch_error.items():
        if name not in core_error:  # the input, which the core does not compute
            continue
        core_relative = core_error[name]
        rows.append((core_relative / max(torch_relative, FLOOR), name, core_relative, torch_relative))
    worst = max(rows)
    over = [row for row in rows if row[0] > args.limit]
    print(f"{args.model} {args.size}x{args.size}: max|err|/max|ref| against float64, {len(rows)} stages")
    print(f"{'stage':<26} {'core':>10} {'torch fp32':>11} {'ratio':>7}")
    for row in sorted(rows, reverse=True)[:10]:
        print(f"{row[1]:<26} {row[2]:>10.2e} {row[3]:>11.2e} {row[0]:>7.2f}")
    for name in ("layer4", "fc"):
        print(f"{name:<26} {core_error[name]:>10.2e} {torch_error[name]:>11.2e} {core_error[name] / max(torch_error[name], FLOOR):>7.2f}")
    fused_ratio = fused_error / max(torch_error["fc"], FLOOR)
    print(f"{'fc (fused path)':<26} {fused_error:>10.2e} {torch_error['fc']:>11.2e} {fused_ratio:>7.2f}")
    if fused_ratio > args.limit:
        over.append((fused_ratio, "fc (fused path)", fused_error, torch_error["fc"]))
    print(f"largest core error {max(core_error.values()):.2e}, largest torch fp32 error {max(torch_error.values()):.2e}; "
          f"worst ratio {worst[0]:.2f} at {worst[1]}; {len(over)} stage(s) over {args.limit}x")
    failing_defaults = sum(verdict == "fail" for _, verdict in testing_defaults.values())
    print(f"PyTorch float32 against float64 under torch.testing's float32 defaults (rtol 1.3e-6, atol 1e-5): "
          f"{failing_defaults} of {len(testing_defaults)} stages fail; under verify's default: "
          f"{sum(v == 'fail' for _, v in torch_verdicts.values())} fail. The core against float64 under verify's default: "
          f"{sum(v == 'fail' for _, v in core_verdicts.values())} fail")
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main())
