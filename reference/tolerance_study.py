"""What `--tol auto` passes and fails, side by side with the fixed default.

For each model (seeded weights, the cat, full width) a reference is dumped
with --floor, then compared with correct float32 implementations that round
differently: the core, PyTorch on its other kernel sets
(ATEN_CPU_CAPABILITY=default and =avx2 dumps) and ONNX Runtime (BatchNorm
kept: every stage is a graph output, so nothing is fused away). Then with
PyTorch itself in bfloat16 and float16 (the same weights, cast), correct
and with each bug class of docs/tolerance.md injected, cumulative (the
whole network with the bug) and isolated (each module the bug touches run
alone on the reference's input).

For each comparison: the stages that fail under the default and under
auto, and the largest multiple of the floor any stage needs (the figure
`--tol-multiple` would have to reach; auto passes up to 5).

    scripts/measure-tolerance [--models resnet18,resnet50] [--precision-models resnet18] [--size 224]
"""

import argparse
import copy
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
VERIFY = ROOT / "target" / "release" / "verify"
PYTHON = sys.executable
# verify's default --tol-multiple (AutoTolerance::DEFAULT_MULTIPLE).
MULTIPLE = 5.0


def verify(*arguments):
    """The JSON report of `verify ARGUMENTS`."""
    result = subprocess.run([str(VERIFY), *map(str, arguments), "--format", "json"], capture_output=True, text=True)
    if result.returncode == 2:
        raise SystemExit(f"verify {' '.join(map(str, arguments))}: {result.stderr}")
    return json.loads(result.stdout)


def judged(*arguments, dtype=None):
    """(stages failing under the default, compared, failing under auto,
    largest multiple of the floor needed, the stage needing it)."""
    default = verify(*arguments)
    # With multiple 0 every stage that differs at all fails and says the
    # multiple it needs, exactly.
    exact = verify(*arguments, "--tol", "auto", "--tol-multiple", "0", *(["--cand-dtype", dtype] if dtype else []))
    needs = [(stage["cumulative"].get("multiple_needed") or 0.0, stage["name"])
             for stage in exact["stages"] if stage.get("cumulative")]
    worst = max(needs, default=(0.0, "-"))
    auto_fail = sum(multiple > MULTIPLE for multiple, _ in needs)
    first_auto = next((name for multiple, name in needs if multiple > MULTIPLE), "-")
    return {"default_fail": default["summary"]["fail"], "compared": default["summary"]["compared"],
            "auto_fail": auto_fail, "worst_multiple": worst[0], "worst_at": worst[1], "first_auto_fail": first_auto}


def dump(model_name, out, size, *extra, env=None):
    subprocess.run([PYTHON, "-m", "reference.dump", "--model", model_name, "--size", str(size), "--image", "cat",
                    "--out", str(out), *extra], check=True, cwd=ROOT, env=env, capture_output=True)


def reference_model(reference):
    """The reference's torch model and input, rebuilt as the dumper built them."""
    from . import dump as dumper
    manifest = json.loads((reference / "manifest.json").read_text())
    command = manifest["producer"]["command"].split()[3:]
    args = dumper.parse_args([*command, "--out", str(reference)])
    model, _, _, x, _ = dumper.build(args)
    return model.eval(), x


def write_candidate(reference, out, outputs):
    """A candidate dump of `outputs` (stage name -> tensor), widened to float32."""
    from resnet_verify import CandidateWriter
    with CandidateWriter(out, reference) as writer:
        for name, output in outputs.items():
            writer.stage(name, output.detach().float().numpy())


def torch_stages(model, x):
    from . import hooks
    recorded, _ = hooks.stages(model, x)
    return {stage["name"]: stage["output"] for stage in recorded}


def onnx_runtime_stages(model, x, work):
    """Every stage as ONNX Runtime computes it: the exported graph with each
    module's last node as an output (named by the exporter's scopes)."""
    import onnx
    import onnxruntime

    from . import hooks
    path = work / "model.onnx"
    torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=17,
                      training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False)
    graph = onnx.load(str(path))
    # Node "/layer1/layer1.0/relu_1/Relu": module layer1.0.relu, call 1; a
    # Sequential's child is scoped "downsample/downsample.0".
    calls, outputs = [], []
    for node in graph.graph.node:
        scopes = node.name.split("/")[1:-1]
        if not scopes or node.op_type in ("Constant", "Flatten", "Identity", "Add"):
            continue
        module, _, call = scopes[-1].rpartition("_")
        if not (module and call.isdigit()):
            module, call = scopes[-1], "0"
        parts, previous = [], None
        for scope in scopes[:-1] + [module]:
            parts.append(scope[len(previous) + 1:] if previous and scope.startswith(previous + ".") else scope)
            previous = scope
        calls.append((".".join(parts), int(call)))
        outputs.append(node.output[0])
    names = hooks.call_names(calls)
    for output in outputs:
        graph.graph.output.append(onnx.ValueInfoProto(name=output))
    session = onnxruntime.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    values = session.run(outputs, {session.get_inputs()[0].name: x.numpy()})
    result = {"input": x}
    result.update({name: torch.from_numpy(value) for name, value in zip(names, values)})
    return result


def with_containers(outputs, reference):
    """A block's or a layer's output is its last child's (and the input the
    input): filled in from the stages computed."""
    manifest = json.loads((reference / "manifest.json").read_text())
    filled = {}
    for stage in manifest["stages"]:
        name = stage["name"]
        if name in outputs:
            filled[name] = outputs[name]
        elif stage["module_type"] in ("Bottleneck", "BasicBlock", "Sequential") and filled:
            filled[name] = list(filled.values())[-1]
    return filled


# The bug classes of docs/tolerance.md, each a change to a copy of the model;
# `touched` picks the modules it changes (run alone for the isolated rows).
def wrong_weight_layout(model):
    """Conv weights OIHW, flattened, read back as OHWI."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            o, i, h, w = module.weight.shape
            module.weight.data = module.weight.data.flatten().reshape(o, h, w, i).permute(0, 3, 1, 2).contiguous()
    return [name for name, module in model.named_modules() if isinstance(module, nn.Conv2d)]


def eps_1e3(model):
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.eps = 1e-3
    return [name for name, module in model.named_modules() if isinstance(module, nn.BatchNorm2d)]


def batch_statistics(model):
    """BatchNorm in train mode: the batch's statistics, not the running ones."""
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.train()
    return [name for name, module in model.named_modules() if isinstance(module, nn.BatchNorm2d)]


def missing_relu(model):
    """layer2.0.relu's first call returns its input."""
    relu = model.get_submodule("layer2.0.relu")
    relu.inplace = False
    calls = []

    def skip(module, inputs, output):
        calls.append(1)
        return inputs[0].clone() if len(calls) == 1 else output
    relu.register_forward_hook(skip)
    return ["layer2.0.relu#0"]


BUGS = {"weights read OHWI": wrong_weight_layout, "BatchNorm eps 1e-3": eps_1e3,
        "BatchNorm batch statistics": batch_statistics, "missing ReLU (layer2.0.relu#0)": missing_relu}


def module_inputs(model, x):
    """Stage name -> the input of that module call, from a float32 run."""
    from . import hooks
    calls, counts = {}, {}
    order = []

    def pre(path):
        def record(module, inputs):
            index = counts.get(path, 0)
            counts[path] = index + 1
            order.append((path, index, inputs[0].detach().clone()))
        return record
    handles = [m.register_forward_pre_hook(pre(p)) for p, m in model.named_modules() if p]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    for (path, index, value), name in zip(order, hooks.call_names([(p, i) for p, i, _ in order])):
        calls[name] = value
    return calls


def isolated(reference, model, inputs, dtype, bug, floors):
    """How many of the modules the bug touches fail when each runs alone on
    the reference's input (`inputs`: module_inputs of the float32 model), in
    `dtype`, under auto; and the largest multiple."""
    import resnet_verify
    buggy = copy.deepcopy(model)
    touched = bug(buggy) if bug else [name for name, m in buggy.named_modules()
                                       if isinstance(m, (nn.Conv2d, nn.BatchNorm2d))]
    buggy = buggy.to(dtype)
    manifest = json.loads((reference / "manifest.json").read_text())
    files = {stage["name"]: stage["file"] for stage in manifest["stages"]}
    fails, worst = 0, 0.0
    for name in touched:
        module = buggy.get_submodule(name.split("#")[0])
        with torch.no_grad():
            if name.endswith("#0") and bug is missing_relu:
                output = inputs[name].clone()
            else:
                output = module(inputs[name].to(dtype))
        expected = np.load(reference / files[name])
        result = resnet_verify.compare(expected, output.float().numpy(), tol="auto", tol_multiple=0.0,
                                       cand_dtype=str(dtype).split(".")[-1], floor=floors[name])
        needed = result.get("multiple_needed") or 0.0
        fails += needed > MULTIPLE
        worst = max(worst, needed)
    return fails, len(touched), worst


def row(label, figures):
    return (f"| {label} | {figures['default_fail']}/{figures['compared']} | {figures['auto_fail']}/{figures['compared']} "
            f"| {figures['worst_multiple']:.2f} ({figures['worst_at']}) |")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="scripts/measure-tolerance", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="resnet18,resnet50,resnet152,wide_resnet50_2,resnext50_32x4d",
                        help="the float32 engines' models (empty: none)")
    parser.add_argument("--precision-models", default="resnet18,resnet50")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--keep", type=Path, help="keep the references here (and reuse those found)")
    parser.add_argument("--output", type=Path, default=ROOT / "out" / "tolerance-study.md")
    args = parser.parse_args(argv)
    work = args.keep or Path(tempfile.mkdtemp(prefix="tolerance-"))
    work.mkdir(parents=True, exist_ok=True)
    lines = []

    def say(line):
        print(line, flush=True)
        lines.append(line)
    try:
        say(f"## float32 implementations ({args.size}x{args.size}, seeded weights, the cat)\n")
        say("| model, candidate | fail (default) | fail (auto) | largest multiple of the floor needed (stage) |")
        say("|---|---|---|---|")
        for name in filter(None, args.models.split(",")):
            reference = work / name / "reference"
            dump(name, reference, args.size, "--floor")
            say(row(f"{name}, the core", judged(reference)))
            for capability in ("default", "avx2"):
                other = work / name / capability
                dump(name, other, args.size, env={**os.environ, "ATEN_CPU_CAPABILITY": capability})
                say(row(f"{name}, PyTorch ATEN_CPU_CAPABILITY={capability}", judged("compare", reference, other)))
                shutil.rmtree(other)
            model, x = reference_model(reference)
            ort = work / name / "onnxruntime"
            write_candidate(reference, ort, with_containers(onnx_runtime_stages(model, x, work / name), reference))
            say(row(f"{name}, ONNX Runtime", judged("compare", reference, ort)))
            shutil.rmtree(ort)
            if name not in args.precision_models.split(","):
                shutil.rmtree(reference)

        say("\n## The bug classes, in float32 and in reduced precision (PyTorch, the same weights, cast)\n")
        say("| model, dtype, candidate | fail (default) | fail (auto, cumulative) | largest multiple (stage) "
            "| isolated: modules failing under auto | largest isolated multiple |")
        say("|---|---|---|---|---|---|")
        for name in filter(None, args.precision_models.split(",")):
            reference = work / name / "reference"
            if not (reference / "manifest.json").exists():
                dump(name, reference, args.size, "--floor")
            model, x = reference_model(reference)
            floors = {stage["name"]: stage["floor"]
                      for stage in json.loads((reference / "manifest.json").read_text())["stages"]}
            inputs = module_inputs(model, x)
            for dtype in (torch.float32, torch.bfloat16, torch.float16):
                dtype_name = str(dtype).split(".")[-1]
                for label, bug in [("correct", None), *BUGS.items()]:
                    candidate_model = copy.deepcopy(model)
                    if bug:
                        bug(candidate_model)
                    candidate_model = candidate_model.to(dtype)
                    outputs = torch_stages(candidate_model, x.to(dtype))
                    candidate = work / name / f"{dtype_name}"
                    write_candidate(reference, candidate, outputs)
                    figures = judged("compare", reference, candidate, dtype=dtype_name)
                    fails, touched, worst = isolated(reference, model, inputs, dtype, bug, floors)
                    say(f"| {name}, {dtype_name}, {label} | {figures['default_fail']}/{figures['compared']} "
                        f"| {figures['auto_fail']}/{figures['compared']} (first {figures['first_auto_fail']}) "
                        f"| {figures['worst_multiple']:.2f} ({figures['worst_at']}) | {fails}/{touched} | {worst:.2f} |")
                    shutil.rmtree(candidate)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
