"""Times the core (through target/release/resnet-bench) against PyTorch and
ONNX Runtime on the same weights and input, alternating the engines."""

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from . import dump, models

ROOT = Path(__file__).resolve().parents[1]
# Between two timed runs, long enough for spinning worker threads to sleep.
PAUSE_S = 0.05


def multiply_adds(manifest):
    """Multiply-adds of one image: every conv and the fc."""
    total = 0
    for stage in manifest["stages"]:
        p = stage["params"]
        if stage["module_type"] == "Conv2d":
            _, _, height, width = stage["shape"]
            total += height * width * p["out_channels"] * (p["in_channels"] // p["groups"]) * p["kernel_size"][0] * p["kernel_size"][1]
        elif stage["module_type"] == "Linear":
            total += p["in_features"] * p["out_features"]
    return total


class Core:
    def __init__(self, dump_dir, threads, observed=False):
        self.process = subprocess.Popen(
            [str(ROOT / "target/release/resnet-bench"), str(dump_dir), "--threads", str(threads)]
            + (["--observed"] if observed else []),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        if self.process.stdout.readline().strip() != "ready":
            raise SystemExit("resnet-bench did not start")

    def run(self):
        self.process.stdin.write("run\n")
        self.process.stdin.flush()
        return float(self.process.stdout.readline())

    def close(self):
        self.process.stdin.close()
        self.process.wait()


def paired_ratios(numerators, denominators):
    """Each iteration's ratio of two engines' times."""
    return [a / b for a, b in zip(numerators, denominators)]


def timed(function):
    started = time.perf_counter()
    function()
    return (time.perf_counter() - started) * 1e3


def main(argv=None):
    parser = argparse.ArgumentParser(prog="scripts/bench-core", description=__doc__)
    parser.add_argument("--model", default="resnet50", choices=sorted(models.MODELS))
    parser.add_argument("--iterations", type=int, default=20, help="timed iterations per engine (default 20)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", default="1,2", help="thread counts, comma-separated (default 1,2)")
    parser.add_argument("--no-onnx", action="store_true", help="leave ONNX Runtime out")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="bench-core-"))
    torch.set_num_threads(2)
    model, architecture = models.seeded(args.model, 0, 224)
    x, description = dump.preprocess.make_input("cat", 224, 1, 0)
    manifest = dump.write(work / "dump", model, architecture, x, model_name=args.model,
                          weights_description={"source": "seeded", "seed": 0}, input_description=description)
    model.eval()
    flops = 2 * multiply_adds(manifest)

    onnx_path = None
    if not args.no_onnx:
        try:
            import onnxruntime
            torch.onnx.export(model, (x,), str(work / "model.onnx"), dynamo=False, opset_version=17)
            onnx_path = str(work / "model.onnx")
        except Exception as error:  # the exporter's dependencies vary by torch version
            print(f"ONNX Runtime left out: export failed: {error}", file=sys.stderr)

    print(f"{args.model}, batch 1, 224x224, fp32: {flops / 1e9:.2f} GFLOP per image; "
          f"{args.iterations} timed iterations per engine after {args.warmup} warm-up, engines alternating")
    print("core: the fused inference path; observed: stage by stage, as verify runs it")
    print(f"{'threads':>7} {'core ms':>9} {'observed':>9} {'torch ms':>9} {'ort ms':>9} {'core/torch':>11} {'core/ort':>9} {'core GFLOP/s':>13}")
    results = {}
    spreads = {}
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        core = Core(work / "dump", threads)
        observed = Core(work / "dump", threads, observed=True)
        engines = {"core": core.run, "observed": observed.run}
        with torch.no_grad():
            engines["torch"] = lambda: timed(lambda: model(x))
        if onnx_path:
            options = onnxruntime.SessionOptions()
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
            onnx_session = onnxruntime.InferenceSession(onnx_path, options, providers=["CPUExecutionProvider"])
            feed = {onnx_session.get_inputs()[0].name: x.numpy()}
            engines["ort"] = lambda: timed(lambda: onnx_session.run(None, feed))
        times = {name: [] for name in engines}
        with torch.no_grad():
            names = list(engines)
            for iteration in range(args.warmup + args.iterations):
                # Each engine goes first in turn, and each run starts after
                # a pause: PyTorch's OpenMP and ONNX Runtime's threads spin
                # for a while after a run, and would otherwise take the
                # cores from whichever engine comes next.
                order = names[iteration % len(names):] + names[:iteration % len(names)]
                for name in order:
                    time.sleep(PAUSE_S)
                    elapsed = engines[name]()
                    if iteration >= args.warmup:
                        times[name].append(elapsed)
        core.close()
        observed.close()
        median = {name: statistics.median(values) for name, values in times.items()}
        ort = median.get("ort", float("nan"))
        print(f"{threads:>7} {median['core']:>9.1f} {median['observed']:>9.1f} {median['torch']:>9.1f} {ort:>9.1f} "
              f"{median['core'] / median['torch']:>11.2f} {median['core'] / ort:>9.2f} {flops / median['core'] / 1e6:>13.1f}")
        results[threads] = median
        spreads[threads] = {other: paired_ratios(times["core"], times[other]) for other in ("torch", "ort") if other in times}
    shutil.rmtree(work)
    # The ratio within each iteration (the engines ran one after the other),
    # to tell a difference from this machine's noise: a middle half that
    # straddles 1.00 says the two engines are level here.
    # (Quartiles need two iterations at least.)
    for threads, ratios in spreads.items() if args.iterations >= 2 else ():
        parts = [f"core/{other} median {statistics.median(values):.2f}, middle half {low:.2f}-{high:.2f}"
                 for other, values in ratios.items()
                 for low, _, high in [statistics.quantiles(values, n=4, method="inclusive")]]
        print(f"{threads} thread{'s' if threads > 1 else ''}, iteration by iteration: " + "; ".join(parts))
    counts = sorted(results)
    if len(counts) > 1:
        # Each engine's speed-up from the fewest threads to the most, from
        # this run's medians.
        fewest, most = results[counts[0]], results[counts[-1]]
        speedups = ", ".join(f"{name} {fewest[name] / most[name]:.2f}x" for name in fewest)
        print(f"from {counts[0]} to {counts[-1]} threads: {speedups}")
    return results


if __name__ == "__main__":
    main()
