"""Forward hooks that record every module call of a torch model, and the
stage names the dump format gives them. Shared by the dump script and the
Python bindings' verify_torch, so that both name stages the same way."""

import torch


def call_names(calls):
    """Stage names for module calls given as (module path, call index):
    a module called once keeps its path; one called several times gets
    `path#k` for its k-th call (from 0), for every call."""
    counts = {}
    for path, _ in calls:
        counts[path] = counts.get(path, 0) + 1
    return [path if counts[path] == 1 else f"{path}#{index}" for path, index in calls]


def parents(path):
    """(block, layer) that contain module `path`, e.g. layer1.0.conv1 -> (layer1.0, layer1)."""
    parts = path.split(".")
    layer = parts[0] if parts[0].startswith("layer") and len(parts) > 1 else None
    block = ".".join(parts[:2]) if layer and len(parts) > 2 else None
    return block, layer


def capture(model, x):
    """Runs the model once and returns [(path, call index, module, output copy)]
    in execution order (forward hooks fire when a module's forward returns,
    so a container follows its children)."""
    calls = []
    counts = {}

    def hook(path):
        def record(module, inputs, output):
            index = counts.get(path, 0)
            counts[path] = index + 1
            # torchvision's ReLUs are in place, and Bottleneck adds the identity
            # into bn3's output in place: copy now, or the stored tensor changes.
            calls.append((path, index, module, output.detach().clone()))
        return record

    handles = [module.register_forward_hook(hook(path)) for path, module in model.named_modules() if path]
    try:
        with torch.no_grad():
            logits = model(x)
    finally:
        for handle in handles:
            handle.remove()
    return calls, logits


def stages(model, x):
    """Runs the model once; returns its stages in execution order, each a dict
    with the manifest's `name`, `module_type`, `module_path`, `call_index`,
    `block`, `layer` and `shape`, plus the torch `module` and its `output`,
    and the logits. The first stage is the input."""
    calls, logits = capture(model, x)
    result = [{
        "name": "input", "module_type": "Input", "module_path": "", "call_index": 0,
        "block": None, "layer": None, "shape": list(x.shape), "module": None, "output": x,
    }]
    for (path, index, module, output), name in zip(calls, call_names([(c[0], c[1]) for c in calls])):
        block, layer = parents(path)
        result.append({
            "name": name, "module_type": type(module).__name__, "module_path": path, "call_index": index,
            "block": block if block != path else None, "layer": layer if layer != path else None,
            "shape": list(output.shape), "module": module, "output": output,
        })
    return result, logits


def float64_stages(model, x):
    """Stage name -> output of a float64 copy of `model` (in the modes its
    modules are in) on `x`: the exact computation a stage's noise floor is
    measured against. The model is not changed."""
    import copy

    recorded, _ = stages(copy.deepcopy(model).double(), x.double())
    return {stage["name"]: stage["output"] for stage in recorded}

