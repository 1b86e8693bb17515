"""torchvision ResNets, full size or width-reduced, with seeded weights whose
BatchNorm running statistics are calibrated on seeded inputs."""

import collections
import linecache
import math

import torch
from torch import nn
from torchvision.models import resnet as tv
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.ops.misc import FrozenBatchNorm2d

# Every torchvision ResNet constructor: block, blocks per stage, groups, width per group.
MODELS = {
    "resnet18": (tv.BasicBlock, [2, 2, 2, 2], 1, 64),
    "resnet34": (tv.BasicBlock, [3, 4, 6, 3], 1, 64),
    "resnet50": (tv.Bottleneck, [3, 4, 6, 3], 1, 64),
    "resnet101": (tv.Bottleneck, [3, 4, 23, 3], 1, 64),
    "resnet152": (tv.Bottleneck, [3, 8, 36, 3], 1, 64),
    "resnext50_32x4d": (tv.Bottleneck, [3, 4, 6, 3], 32, 4),
    "resnext101_32x8d": (tv.Bottleneck, [3, 4, 23, 3], 32, 8),
    "resnext101_64x4d": (tv.Bottleneck, [3, 4, 23, 3], 64, 4),
    "wide_resnet50_2": (tv.Bottleneck, [3, 4, 6, 3], 1, 128),
    "wide_resnet101_2": (tv.Bottleneck, [3, 4, 23, 3], 1, 128),
}

FULL_WIDTH = 64


def build(name, width=FULL_WIDTH, num_classes=1000, groups=None, width_per_group=None,
          replace_stride_with_dilation=None):
    """Builds torchvision's own ResNet class. A width below 64 rebuilds the
    stem, the four layers and fc with `width` channels where torchvision has
    64 (and 2x, 4x, 8x that after), keeping module names, block classes and
    topology. `groups` and `width_per_group` override the constructor's, so
    that a width-reduced ResNeXt still has channels in every group;
    `replace_stride_with_dilation` is the constructor's own."""
    if name not in MODELS:
        raise SystemExit(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}")
    block, layers, default_groups, default_width_per_group = MODELS[name]
    groups = default_groups if groups is None else groups
    width_per_group = default_width_per_group if width_per_group is None else width_per_group
    dilate = list(replace_stride_with_dilation or [False, False, False])
    try:
        model = tv.ResNet(block, layers, num_classes=num_classes, groups=groups, width_per_group=width_per_group,
                          replace_stride_with_dilation=dilate)
    except (NotImplementedError, ValueError) as refused:
        # The options that differ from the model's own: those to blame.
        options = {"groups": (groups, default_groups),
                   "width_per_group": (width_per_group, default_width_per_group),
                   "replace_stride_with_dilation": (dilate, [False, False, False])}
        given = ", ".join(f"{key}={value}" for key, (value, default) in options.items() if value != default)
        raise SystemExit(f"{name}{' with ' + given if given else ''}: torchvision refuses it: {refused}") from None
    if block is tv.Bottleneck and int(width * (width_per_group / 64.0)) * groups == 0:
        raise SystemExit(f"{name} with width {width}, groups {groups}, width_per_group {width_per_group}: layer1's "
                         f"3x3 convs would have no channels (torchvision's int(planes * width_per_group / 64) * groups "
                         f"= int({width} * {width_per_group} / 64) * {groups} = 0)")
    if width != FULL_WIDTH:
        # Re-run the part of ResNet.__init__ that hard-codes 64 channels.
        # Assigning existing attributes keeps torchvision's module order.
        model.inplanes = width
        model.dilation = 1
        model.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        model.bn1 = nn.BatchNorm2d(width)
        model.layer1 = model._make_layer(block, width, layers[0])
        model.layer2 = model._make_layer(block, width * 2, layers[1], stride=2, dilate=dilate[0])
        model.layer3 = model._make_layer(block, width * 4, layers[2], stride=2, dilate=dilate[1])
        model.layer4 = model._make_layer(block, width * 8, layers[3], stride=2, dilate=dilate[2])
        model.fc = nn.Linear(width * 8 * block.expansion, num_classes)
    return model, describe(model)


def freeze_batch_norms(model):
    """Every BatchNorm2d replaced by torchvision's FrozenBatchNorm2d with the
    same eps, weights and running statistics, as detection backbones have
    them (norm_layer=FrozenBatchNorm2d); module order and names are kept."""
    for path, module in list(model.named_modules()):
        if type(module) is nn.BatchNorm2d:
            frozen = FrozenBatchNorm2d(module.num_features, eps=module.eps)
            for name in ("weight", "bias", "running_mean", "running_var"):
                getattr(frozen, name).copy_(getattr(module, name).detach())
            parent, _, child = path.rpartition(".")
            setattr(model.get_submodule(parent), child, frozen)
    return model


# The heads `python -m reference.dump --head` can put on a model.
HEADS = ("linear", "dropout_linear", "identity", "none")


def with_head(model, head):
    """`model` with torchvision's `fc` kept (linear), moved behind a
    Dropout (the usual fine-tuning head), replaced by Identity, or the
    classifier cut off (IntermediateLayerGetter up to the last layer, as
    segmentation and detection code gets its backbone)."""
    if head == "dropout_linear":
        model.fc = nn.Sequential(nn.Dropout(0.5), model.fc)
    elif head == "identity":
        model.fc = nn.Identity()
    elif head == "none":
        model = IntermediateLayerGetter(model, return_layers={"layer4": "out"})
    elif head != "linear":
        raise ValueError(f"unknown head {head!r}; choose one of {', '.join(HEADS)}")
    return model


class Unsupported(ValueError):
    """A torch model that the core would not build exactly: the message names
    each module (by its path, as torch names it) and what differs.
    resnet_verify raises it as VerifyError."""


def _pair(value):
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


def _conv_padding(conv):
    """A Conv2d's padding as numbers; "valid" and (where it is one number
    per side) "same" as the numbers they stand for."""
    if conv.padding == "valid":
        return (0, 0)
    if conv.padding == "same":
        total = [d * (k - 1) for d, k in zip(_pair(conv.dilation), _pair(conv.kernel_size))]
        return tuple(t // 2 for t in total) if all(t % 2 == 0 for t in total) else "same"
    return _pair(conv.padding)


# What the core reads of each module type it builds: the attributes that
# change the result, as numbers comparable with the core's.
_ATTRIBUTES = {
    nn.Conv2d: lambda m: {
        "in_channels": m.in_channels, "out_channels": m.out_channels, "kernel_size": _pair(m.kernel_size),
        "stride": _pair(m.stride), "padding": _conv_padding(m), "dilation": _pair(m.dilation),
        "groups": m.groups, "bias": m.bias is not None, "padding_mode": m.padding_mode,
    },
    nn.BatchNorm2d: lambda m: {
        "num_features": m.num_features, "affine": m.affine,
        "track_running_stats": m.track_running_stats and m.running_mean is not None and m.running_var is not None,
    },
    # Affine, with fixed statistics, by construction.
    FrozenBatchNorm2d: lambda m: {"num_features": m.weight.shape[0]},
    # The identity in eval mode, whatever p.
    nn.Dropout: lambda m: {},
    nn.Identity: lambda m: {},
    nn.ReLU: lambda m: {},
    nn.MaxPool2d: lambda m: {
        "kernel_size": _pair(m.kernel_size), "stride": _pair(m.stride), "padding": _pair(m.padding),
        "dilation": _pair(m.dilation), "ceil_mode": m.ceil_mode, "return_indices": m.return_indices,
    },
    nn.AdaptiveAvgPool2d: lambda m: {"output_size": _pair(m.output_size)},
    nn.Linear: lambda m: {"in_features": m.in_features, "out_features": m.out_features, "bias": m.bias is not None},
    nn.Sequential: lambda m: {"length": len(m)},
    tv.BasicBlock: lambda m: {},
    tv.Bottleneck: lambda m: {},
    tv.ResNet: lambda m: {},
    IntermediateLayerGetter: lambda m: {},
    torch.fx.GraphModule: lambda m: {},
    nn.Module: lambda m: {},
}

def _core_modules(architecture, block, root, present):
    """(path, type, attributes) of every module the core builds for
    `architecture`, in the order crates/core/src/network/build.rs builds
    them (torchvision's own, dilation included); None in an attribute is a
    value that could not be read off the model (it is refused elsewhere),
    not compared; where the channels are unknown, a downsample is expected
    if `present` (the model's module paths) has one."""
    a = architecture
    norm_class = FrozenBatchNorm2d if a.get("norm_layer") == "FrozenBatchNorm2d" else nn.BatchNorm2d

    def conv(in_channels, out_channels, kernel, stride, padding, groups=1, dilation=1):
        return nn.Conv2d, {
            "in_channels": in_channels, "out_channels": out_channels, "kernel_size": (kernel, kernel),
            "stride": (stride, stride), "padding": (padding, padding), "dilation": (dilation, dilation),
            "groups": groups, "bias": False, "padding_mode": "zeros",
        }

    def norm(channels):
        if norm_class is FrozenBatchNorm2d:
            return norm_class, {"num_features": channels}
        return norm_class, {"num_features": channels, "affine": True, "track_running_stats": True}

    def times(x, y):
        return None if x is None or y is None else x * y

    relu = (nn.ReLU, {})
    yield "", root, {}
    yield ("conv1", *conv(a["in_channels"], a["stem_channels"], 7, 2, 3))
    yield ("bn1", *norm(a["stem_channels"]))
    yield ("relu", *relu)
    yield "maxpool", nn.MaxPool2d, {"kernel_size": (3, 3), "stride": (2, 2), "padding": (1, 1), "dilation": (1, 1),
                                    "ceil_mode": False, "return_indices": False}
    in_channels = a["stem_channels"]
    dilate = a.get("replace_stride_with_dilation") or [False] * (len(a["layers"]) - 1)
    dilation = 1
    for index, (blocks, planes) in enumerate(zip(a["layers"], a["planes"])):
        layer = f"layer{index + 1}"
        yield layer, nn.Sequential, {"length": blocks}
        # torchvision's _make_layer: a dilated layer gives up its stride for
        # dilation, which its first block does not have yet.
        stride = 2 if index > 0 else 1
        previous_dilation = dilation
        if index > 0 and dilate[index - 1]:
            dilation, stride = dilation * stride, 1
        for number in range(blocks):
            name = f"{layer}.{number}"
            block_stride, block_dilation = (stride, previous_dilation) if number == 0 else (1, dilation)
            yield name, block, {}
            if block is tv.Bottleneck:
                known = None not in (planes, a["width_per_group"], a["groups"])
                width = (planes * a["width_per_group"] // 64) * a["groups"] if known else None
                out_channels = times(planes, 4)
                yield (f"{name}.conv1", *conv(in_channels, width, 1, 1, 0))
                yield (f"{name}.bn1", *norm(width))
                yield (f"{name}.conv2", *conv(width, width, 3, block_stride, block_dilation, a["groups"],
                                              block_dilation))
                yield (f"{name}.bn2", *norm(width))
                yield (f"{name}.conv3", *conv(width, out_channels, 1, 1, 0))
                yield (f"{name}.bn3", *norm(out_channels))
                yield (f"{name}.relu", *relu)
            else:
                out_channels = planes
                yield (f"{name}.conv1", *conv(in_channels, planes, 3, block_stride, 1))
                yield (f"{name}.bn1", *norm(planes))
                yield (f"{name}.relu", *relu)
                yield (f"{name}.conv2", *conv(planes, planes, 3, 1, 1))
                yield (f"{name}.bn2", *norm(planes))
            if None in (in_channels, out_channels):
                downsample = f"{name}.downsample" in present
            else:
                downsample = block_stride != 1 or in_channels != out_channels
            if downsample:
                yield f"{name}.downsample", nn.Sequential, {"length": 2}
                yield (f"{name}.downsample.0", *conv(in_channels, out_channels, 1, block_stride, 0))
                yield (f"{name}.downsample.1", *norm(out_channels))
            in_channels = out_channels
    head = a.get("head", "linear")
    if head == "none":
        return
    yield "avgpool", nn.AdaptiveAvgPool2d, {"output_size": (1, 1)}
    linear = nn.Linear, {"in_features": in_channels, "out_features": a["num_classes"], "bias": True}
    if head == "dropout_linear":
        yield "fc", nn.Sequential, {"length": 2}
        yield "fc.0", nn.Dropout, {}
        yield ("fc.1", *linear)
    elif head == "identity":
        yield "fc", nn.Identity, {}
    else:
        yield ("fc", *linear)


def _overridden(module, cls):
    """Why `module` would not run `cls`'s own forward, or None. A traced
    GraphModule's class has a forward of its own, generated from its graph,
    which the graph check holds to a stock ResNet's instead."""
    # A function set on the instance runs instead of the class's method of
    # that name (model.forward = f, conv._conv_forward = f). (Other
    # callables it holds, as ResNet's _norm_layer, are not methods.)
    for name, value in vars(module).items():
        if callable(value) and callable(getattr(type(module), name, None)):
            return f"its {name} is replaced on the instance"
    if getattr(module, "_compiled_call_impl", None) is not None:
        return "it is compiled in place (module.compile()), which runs other kernels than its modules' own"
    if cls is torch.fx.GraphModule:
        # The forward that runs must be the one compiled from its graph.
        compiled = getattr(type(module).forward, "__code__", None)
        source = "".join(linecache.getlines(compiled.co_filename)) if compiled else ""
        if source.strip() != module.code.strip() or module.code != module.graph.python_code("self").src:
            return "its forward is not the code of its graph (replaced, or the graph edited without recompile())"
    else:
        for method in ("forward", "_forward_impl"):
            if getattr(type(module), method, None) is not getattr(cls, method, None):
                return f"{type(module).__name__} overrides {cls.__name__}.{method}"
        # Calling a module runs __call__ (nn.Module's, which runs forward and
        # the hooks); one of its own may compute anything around forward. (A
        # traced model's class gets a __call__ of its own from recompile(),
        # around the forward checked above.)
        for method in ("__call__", "_call_impl"):
            if getattr(type(module), method, None) is not getattr(cls, method, None):
                return f"{type(module).__name__} overrides {cls.__name__}.{method}, so calling it may not be its forward"
    # Every function of the class and its bases but nn.Module (which other
    # libraries patch for their own ends) must be torch's or torchvision's
    # own: Conv2d._conv_forward, BasicBlock.forward, ResNet._forward_impl;
    # of nn.Module's, those that call forward or read the weights. (A traced
    # model's classes are generated; its graph is checked instead.)
    classes = [] if cls is torch.fx.GraphModule else [c for c in type(module).__mro__ if c not in (nn.Module, object)]
    patched = [(c, name, value) for c in classes
               for name, value in vars(c).items() if callable(value) and not isinstance(value, type)]
    patched += [(nn.Module, name, getattr(nn.Module, name)) for name in _MODULE_METHODS]
    for owner, name, function in patched:
        if not _from_torch(function):
            return (f"{owner.__name__}.{name} is {getattr(function, '__module__', '?')}."
                    f"{getattr(function, '__qualname__', repr(function))}, "
                    "not torch's or torchvision's own (patched on the class)")
    if module._forward_hooks or module._forward_pre_hooks:
        return "it has forward hooks (or pre-hooks), which may change what it computes"
    if module._state_dict_hooks or module._state_dict_pre_hooks:
        return "it has state_dict hooks, which may change the weights read from it"
    return None


# nn.Module's methods that a call or the weights read go through.
_MODULE_METHODS = ("__call__", "_call_impl", "_wrapped_call_impl", "state_dict", "_save_to_state_dict",
                   "named_parameters", "named_buffers")


def _from_torch(function):
    """Whether `function` is defined in torch's or torchvision's own code,
    in a class body (not a lambda or a function made elsewhere and set on
    the class)."""
    package = (getattr(function, "__module__", None) or "").split(".")[0]
    qualname = getattr(function, "__qualname__", "")
    return package in ("torch", "torchvision") and "<" not in qualname


def describe(model):
    """The manifest's `architecture` of a live torchvision ResNet, read off
    its modules (so that it also describes a model built elsewhere): its
    dilation, its BatchNorm class and each BatchNorm's eps, and its head
    (torchvision's Linear, a fine-tuning Sequential(Dropout, Linear), an
    Identity, or none: an IntermediateLayerGetter backbone).

    The model is then checked module by module against what the core builds
    for that architecture (crates/core/src/network/build.rs): each module's
    type (exactly: a subclass may compute something else) and every
    attribute that changes its result. Anything else raises Unsupported
    naming every module that differs, so that no model is verified or run
    as a network it is not."""
    check_kind(model)
    traced = isinstance(model, torch.fx.GraphModule)
    backbone = traced or isinstance(model, IntermediateLayerGetter)
    problems = []  # (path, why)
    # Every path to each module: one module object called from two places
    # (a ReLU shared by every block) is one module to named_modules().
    paths = collections.defaultdict(list)
    for path, module in model.named_modules(remove_duplicate=False):
        paths[id(module)].append(path)
    modules = dict(model.named_modules(remove_duplicate=False))
    for shared in (found for found in paths.values() if len(found) > 1):
        problems.append((shared[0], f"the same {type(modules[shared[0]]).__name__} object as "
                                    f"{', '.join(shared[1:4])}{' and more' if len(shared) > 4 else ''}: "
                                    "stages are told apart by module, so each place needs a module of its own "
                                    "(copy.deepcopy)"))

    def read(path, attribute):
        module = modules.get(path)
        return getattr(module, attribute, None) if module is not None else None

    block = type(modules.get("layer1.0"))
    if traced and block is nn.Module:  # a plain holder of the block's modules
        block = tv.Bottleneck if "layer1.0.conv3" in modules else tv.BasicBlock
    if block not in (tv.BasicBlock, tv.Bottleneck):
        found = "missing" if "layer1.0" not in modules else block.__name__
        problems.append(("layer1.0", f"{found}, where the core builds BasicBlock or Bottleneck"))
        block = tv.Bottleneck if hasattr(modules.get("layer1.0"), "conv3") else tv.BasicBlock
    expansion = block.expansion
    # A ResNet has four layers; a backbone those up to the one it returns last.
    count = 4 if not backbone else max((n for n in range(1, 5) if f"layer{n}" in modules), default=1)
    layers = []
    planes = []
    for index in range(1, count + 1):
        layer = modules.get(f"layer{index}")
        layers.append(max(1, len(list(layer.children()))) if layer is not None else 1)
        channels = read(f"layer{index}.0.{'conv3' if block is tv.Bottleneck else 'conv2'}", "out_channels")
        planes.append(channels // expansion if isinstance(channels, int) else None)
    # Dilation shows as the stride a layer's first 3x3 conv gave up; the
    # module check below holds every conv to what torchvision builds then.
    dilate = [block is tv.Bottleneck and read(f"layer{index}.0.conv2", "stride") == (1, 1)
              for index in range(2, count + 1)]
    norm_class = FrozenBatchNorm2d if type(modules.get("bn1")) is FrozenBatchNorm2d else nn.BatchNorm2d
    norms = [(path, module) for path, module in modules.items() if type(module) is norm_class]
    eps_counts = collections.Counter(module.eps for _, module in norms)
    eps = eps_counts.most_common(1)[0][0] if eps_counts else None
    groups, width_per_group = _grouping(model, block, read, planes)
    if backbone and block is tv.Bottleneck and width_per_group is None:
        problems.append(("layer1.0.conv2", "3x3 convs whose widths no width_per_group gives "
                                           "(torchvision's int(planes * width_per_group / 64) * groups)"))
    if not backbone:
        for attribute in ("groups", "base_width"):
            if not isinstance(getattr(model, attribute, None), int):
                problems.append(("", f"no `{attribute}` (torchvision's ResNet records its constructor's there)"))
    fc = modules.get("fc")
    head, num_classes = "linear", read("fc", "out_features")
    if backbone:
        head, num_classes = "none", 0
    elif type(fc) is nn.Identity:
        head, num_classes = "identity", 0
    elif type(fc) is nn.Sequential and len(fc) == 2 and type(fc[0]) is nn.Dropout and type(fc[1]) is nn.Linear:
        head, num_classes = "dropout_linear", fc[1].out_features
    architecture = {
        "block": block.__name__,
        "layers": layers,
        "groups": groups,
        "width_per_group": width_per_group,
        "stem_channels": read("conv1", "out_channels"),
        "planes": planes,
        "num_classes": num_classes,
        "in_channels": read("conv1", "in_channels"),
        "batch_norm_eps": eps,
    }
    # Written only where they differ from torchvision's defaults, so that
    # the manifest of a stock model is what it always was.
    if any(dilate):
        architecture["replace_stride_with_dilation"] = dilate
    if norm_class is FrozenBatchNorm2d:
        architecture["norm_layer"] = norm_class.__name__
    overrides = {path: module.eps for path, module in norms if module.eps != eps}
    if overrides:
        architecture["batch_norm_eps_overrides"] = overrides
    if head != "linear":
        architecture["head"] = head

    if backbone and not traced:
        # IntermediateLayerGetter runs its children in the order they were added.
        order = [name for name, _ in model.named_children()]
        stock = [name for name in ("conv1", "bn1", "relu", "maxpool", *(f"layer{n}" for n in range(1, 5)))
                 if name in order]
        if order != stock[:len(order)]:
            problems.append(("", f"an IntermediateLayerGetter that runs {', '.join(order)}, where a ResNet runs "
                                 f"{', '.join(stock)}"))
    root = torch.fx.GraphModule if traced else IntermediateLayerGetter if backbone else tv.ResNet
    expected = list(_core_modules(architecture, block, root, set(modules)))
    if traced:
        # A traced model's containers are plain Modules that hold the
        # leaves; what they compute is the graph's, checked below.
        containers = (nn.Sequential, tv.BasicBlock, tv.Bottleneck)
        expected = [(path, nn.Module if cls in containers else cls, {} if cls in containers else attributes)
                    for path, cls, attributes in expected]
        problems.extend(_graph_problems(model, architecture, block))
    # A Sequential runs its children in the order they were added, whatever
    # their names; the core runs layer1.0 before layer1.1.
    for path, cls, _ in expected:
        module = modules.get(path)
        if cls is nn.Sequential and type(module) is nn.Sequential:
            order = list(module._modules)
            stock = [child.rsplit(".", 1)[-1] for child, _, _ in expected
                     if child.startswith(f"{path}.") and "." not in child[len(path) + 1:]]
            if sorted(order) == sorted(stock) and order != stock:
                problems.append((path, f"runs its children in the order {', '.join(order)}, "
                                       f"where the core runs {', '.join(stock)}"))
    refused = []  # paths refused whole (wrong type, missing, not built): their children are not looked at
    for path, cls, attributes in expected:
        if any(path.startswith(f"{parent}.") for parent in refused if parent):
            continue
        module = modules.get(path)
        if module is None:
            problems.append((path, f"missing, where the core builds {cls.__name__}"))
            refused.append(path)
            continue
        exact = isinstance(module, cls) if cls is root else type(module) is cls
        if not exact:
            found, built = type(module).__name__, cls.__name__
            if found == built:  # torch.ao's quantized Linear, say: the names alone say nothing
                found, built = (f"{kind.__module__}.{kind.__qualname__}" for kind in (type(module), cls))
            problems.append((path, f"{found}, where the core builds {built}"))
            refused.append(path)
            continue
        overridden = _overridden(module, cls)
        if overridden:
            problems.append((path, overridden))
        actual = _ATTRIBUTES[cls](module)
        differ = [key for key, value in attributes.items() if value is not None and actual[key] != value]
        if differ:
            problems.append((path, f"{type(module).__name__} with "
                                   + ", ".join(f"{key}={actual[key]!r}" for key in differ)
                                   + " (the core builds " + ", ".join(f"{key}={attributes[key]!r}" for key in differ)
                                   + ")"))
    built = {path for path, _, _ in expected}
    for path, module in modules.items():
        if path not in built and not any(path.startswith(f"{parent}.") for parent in refused if parent):
            problems.append((path, f"{type(module).__name__}, which the core does not build"))
            refused.append(path)
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if tensor.is_floating_point() and tensor.dtype != torch.float32:
            problems.append((name, f"{tensor.dtype}: the core computes in float32 (call model.float())"))
            break
    if torch.nn.modules.module._global_forward_hooks or torch.nn.modules.module._global_forward_pre_hooks:
        problems.append(("", "global forward hooks are registered, which may change what any module computes"))
    if problems:
        raise Unsupported(_refusal(problems))
    return architecture


def check_kind(model):
    """Raises Unsupported where `model` is no torchvision ResNet nor a
    backbone cut from one, before anything is asked of its modules (a graph
    that torch.export made cannot even be put in eval mode)."""
    traced = isinstance(model, torch.fx.GraphModule)
    if not (isinstance(model, (tv.ResNet, IntermediateLayerGetter)) or traced):
        raise Unsupported(f"{type(model).__name__} is not a torchvision ResNet (torchvision.models.resnet.ResNet), "
                          "nor a backbone cut from one (torchvision's IntermediateLayerGetter or "
                          "create_feature_extractor)")
    if traced and not _returns_module_outputs(model):
        raise Unsupported(_refusal([("", "a traced or exported graph (torch.fx, torch.export) that returns "
                                         "something other than module outputs by name, as no backbone cut by "
                                         "torchvision's create_feature_extractor does: its modules are not what "
                                         "it computes; verify the model before tracing or exporting it")]))


def _returns_module_outputs(model):
    """Whether a traced graph returns a dict of module calls' outputs, as
    create_feature_extractor's do."""
    output = next((node for node in model.graph.nodes if node.op == "output"), None)
    returned = output.args[0] if output is not None and output.args else None
    return isinstance(returned, dict) and all(
        isinstance(node, torch.fx.Node) and node.op == "call_module" for node in returned.values())


def _graph_problems(model, architecture, block):
    """What differs between a traced backbone's graph (torchvision's
    create_feature_extractor) and the graph torchvision traces from a stock
    ResNet of `architecture` with the same outputs: every node's operation,
    target and inputs, in order. Empty when they are the same, so that the
    modules (checked one by one) are wired as a ResNet wires them."""
    from torchvision.models.feature_extraction import create_feature_extractor

    returned = next(node for node in model.graph.nodes if node.op == "output").args[0]  # checked by check_kind

    def qualified_name(node):
        # The k-th call of module `a.b` is node `a_b_k`; torchvision names it `a.b_k`.
        return node.target + node.name[len(node.target.replace(".", "_")):]

    def signature(graph):
        return [(node.op, str(node.target), repr(node.args), repr(node.kwargs)) for node in graph.nodes]

    a = architecture
    layers = list(a["layers"]) + [1] * (4 - len(a["layers"]))
    dilate = a.get("replace_stride_with_dilation") or [False] * 3
    dilate = list(dilate) + [False] * (3 - len(dilate))
    norm_layer = FrozenBatchNorm2d if a.get("norm_layer") == "FrozenBatchNorm2d" else nn.BatchNorm2d
    try:
        with torch.device("meta"):
            stock = tv.ResNet(block, layers, groups=a["groups"] or 1, width_per_group=a["width_per_group"] or 64,
                              replace_stride_with_dilation=dilate, norm_layer=norm_layer).eval()
        stock_graph = create_feature_extractor(
            stock, {qualified_name(node): key for key, node in returned.items()}).graph
    except Exception as error:  # noqa: BLE001 - whatever torchvision refuses, the graph is not a stock one
        return [("", f"a traced graph torchvision would not trace from a stock ResNet ({error})")]
    ours, theirs = signature(model.graph), signature(stock_graph)
    for position, (node, stock_node) in enumerate(zip(ours, theirs)):
        if node != stock_node:
            return [("", f"a traced graph that differs from a stock ResNet's at node {position}: "
                         f"{node[0]} {node[1]}{node[2]}, where torchvision traces {stock_node[0]} "
                         f"{stock_node[1]}{stock_node[2]}")]
    if len(ours) != len(theirs):
        return [("", f"a traced graph of {len(ours)} nodes, where torchvision traces {len(theirs)}")]
    return []


def _grouping(model, block, read, planes):
    """(groups, width_per_group): a ResNet records its constructor's; a
    backbone cut from one does not, and they are read off its first
    Bottleneck's 3x3 conv (the module check holds every conv to them)."""
    if isinstance(model, tv.ResNet):
        return getattr(model, "groups", None), getattr(model, "base_width", None)
    if block is tv.BasicBlock:
        return 1, 64
    groups = read("layer1.0.conv2", "groups")
    widths = [(p, read(f"layer{index}.0.conv2", "out_channels")) for index, p in enumerate(planes, start=1)]
    if not isinstance(groups, int) or groups < 1 or not all(isinstance(v, int) for pair in widths for v in pair):
        return groups, None
    # torchvision's width is int(planes * width_per_group / 64) * groups,
    # which loses width_per_group where planes is small: take the first
    # value that gives every layer its width (any such builds the same).
    return groups, next((candidate for candidate in range(1, 4097)
                         if all((p * candidate // 64) * groups == width for p, width in widths)), None)


def _refusal(problems, shown=8):
    """One message for every problem, modules with the same problem together."""
    paths = collections.defaultdict(list)
    for path, why in problems:
        paths[why].append(path or "the model")
    lines = []
    for why, names in paths.items():
        named = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
        lines.append(f"{named}: {why}")
    more = f"; and {len(lines) - shown} more problems" if len(lines) > shown else ""
    return ("the core does not build this model exactly, so it is refused: "
            + "; ".join(lines[:shown]) + more)


# Seeded weights must be the same bits on every machine, so that a fixture
# regenerated elsewhere holds the same weights. torch's normal_ is not: it
# draws with a vectorised Box-Muller whose log/cos differ by CPU kernel
# (ATEN_CPU_CAPABILITY), and uniform_ may fuse its scale and shift. These
# draws use integers only and round once, in float64, to float32.
UNIT = 2**24


def draw_uniform(generator, shape, low, high):
    """U[low, high) on a grid of 2**24 steps."""
    steps = torch.randint(0, UNIT, shape, generator=generator, dtype=torch.int64)
    return (low + steps.double() * ((high - low) / UNIT)).float()


def draw_normal(generator, shape, std):
    """N(0, std**2), approximately: the Irwin-Hall sum of 12 uniform draws,
    centred (mean 0, variance 1, tails cut at 6 std), summed exactly as integers."""
    steps = torch.randint(0, UNIT, (12, *shape), generator=generator, dtype=torch.int64)
    return ((steps.sum(0) - 6 * UNIT).double() * (std / UNIT)).float()


def initialize(model, generator):
    """torchvision's initialisation, drawn so that it is the same everywhere:
    convs kaiming-normal (fan_out, ReLU gain), fc uniform in +-1/sqrt(fan_in).
    BatchNorm's weight and bias are drawn away from torchvision's 1 and 0,
    which would hide any bug that swaps or drops them."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                fan_out = module.out_channels * module.kernel_size[0] * module.kernel_size[1]
                module.weight.copy_(draw_normal(generator, module.weight.shape, math.sqrt(2.0 / fan_out)))
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, (nn.BatchNorm2d, FrozenBatchNorm2d)):
                if module.weight is not None:  # None where affine=False
                    module.weight.copy_(draw_uniform(generator, module.weight.shape, 0.5, 1.5))
                    module.bias.copy_(draw_uniform(generator, module.bias.shape, -0.25, 0.25))
            elif isinstance(module, nn.Linear):
                bound = 1.0 / math.sqrt(module.in_features)
                module.weight.copy_(draw_uniform(generator, module.weight.shape, -bound, bound))
                if module.bias is not None:
                    module.bias.copy_(draw_uniform(generator, module.bias.shape, -bound, bound))


def calibrate_batch_norm(model, generator, size, batches, batch_size):
    """Fills running_mean and running_var with the exact average over seeded
    inputs: train mode, momentum=None (cumulative average), no gradients.
    The inputs are the same everywhere. The passes run in float64 and the
    statistics are rounded once to float32, so that they agree across CPUs
    to the last bit or, rarely, one unit in it: in float32 they differ by up
    to 2% between CPU kernels, since a 1x1 map in a small batch leaves some
    channels a variance near zero that magnifies every rounding."""
    saved_momenta = {}
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.reset_running_stats()
            saved_momenta[module] = module.momentum
            module.momentum = None
    model.train()
    model.double()
    with torch.no_grad():
        for _ in range(batches):
            height, width = (size, size) if isinstance(size, int) else size
            model(draw_normal(generator, (batch_size, 3, height, width), 1.0).double())
    model.float()
    for module, momentum in saved_momenta.items():
        module.momentum = momentum
    model.eval()


def seeded(name, seed, size, width=FULL_WIDTH, num_classes=1000, groups=None, width_per_group=None,
           replace_stride_with_dilation=None, calibration_batches=2, calibration_batch_size=4):
    torch.manual_seed(seed)
    model, architecture = build(name, width, num_classes, groups, width_per_group, replace_stride_with_dilation)
    generator = torch.Generator().manual_seed(seed)
    initialize(model, generator)
    calibrate_batch_norm(model, generator, size, calibration_batches, calibration_batch_size)
    return model, architecture


def from_checkpoint(name, path, width=FULL_WIDTH, num_classes=1000, groups=None, width_per_group=None,
                    replace_stride_with_dilation=None, head="linear"):
    """A `name` model with the state_dict at `path`, in eval mode, with
    `head` (see with_head): a checkpoint of torchvision's classifier (fc.*)
    is loaded before the head is put on, one saved with the head (a
    fine-tuning fc.1.*, or no fc at all) after."""
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as error:  # missing, a directory, unreadable
        raise SystemExit(f"--weights {path}: {error.strerror or error}") from None
    except Exception as error:  # pickle's and torch's own errors: not a checkpoint
        raise SystemExit(f"--weights {path}: not a checkpoint that torch.load(weights_only=True) reads "
                         f"({type(error).__name__})") from None
    if isinstance(state_dict, dict) and "state_dict" in state_dict:
        state_dict = state_dict["state_dict"]
    if not isinstance(state_dict, dict):
        raise SystemExit(f"--weights {path}: holds a {type(state_dict).__name__}, not a state_dict")
    classifier = "fc.weight" in state_dict
    for key in ("fc.weight", "fc.1.weight"):
        if key in state_dict:
            num_classes = state_dict[key].shape[0]
    model, architecture = build(name, width, num_classes, groups, width_per_group, replace_stride_with_dilation)
    if not classifier:
        model = with_head(model, head)
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as error:
        with_what = f" with --head {head}" if head != "linear" else ""
        hint = ("; a checkpoint with no fc (a feature extractor's) takes --head identity or none"
                if head == "linear" and not any(key.startswith("fc.") for key in state_dict) else
                "; a fine-tuned fc.1.* takes --head dropout_linear"
                if head == "linear" and "fc.1.weight" in state_dict else "")
        raise SystemExit(f"{path}: not a {name} state_dict{with_what}: {error}{hint}") from None
    if classifier:
        model = with_head(model, head)
    model.eval()
    return model, architecture if head == "linear" else describe(model)
