"""torchvision ResNets, full size or width-reduced, with seeded weights whose
BatchNorm running statistics are calibrated on seeded inputs."""

import math

import torch
from torch import nn
from torchvision.models import resnet as tv

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


def build(name, width=FULL_WIDTH, num_classes=1000, groups=None, width_per_group=None):
    """Builds torchvision's own ResNet class. A width below 64 rebuilds the
    stem, the four layers and fc with `width` channels where torchvision has
    64 (and 2x, 4x, 8x that after), keeping module names, block classes and
    topology. `groups` and `width_per_group` override the constructor's, so
    that a width-reduced ResNeXt still has channels in every group."""
    if name not in MODELS:
        raise SystemExit(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}")
    block, layers, default_groups, default_width_per_group = MODELS[name]
    groups = default_groups if groups is None else groups
    width_per_group = default_width_per_group if width_per_group is None else width_per_group
    model = tv.ResNet(block, layers, num_classes=num_classes, groups=groups, width_per_group=width_per_group)
    if width != FULL_WIDTH:
        # Re-run the part of ResNet.__init__ that hard-codes 64 channels.
        # Assigning existing attributes keeps torchvision's module order.
        model.inplanes = width
        model.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        model.bn1 = nn.BatchNorm2d(width)
        model.layer1 = model._make_layer(block, width, layers[0])
        model.layer2 = model._make_layer(block, width * 2, layers[1], stride=2)
        model.layer3 = model._make_layer(block, width * 4, layers[2], stride=2)
        model.layer4 = model._make_layer(block, width * 8, layers[3], stride=2)
        model.fc = nn.Linear(width * 8 * block.expansion, num_classes)
    return model, describe(model)


def describe(model):
    """The manifest's `architecture` of a live torchvision ResNet, read off
    its modules (so that it also describes a model built elsewhere)."""
    if not isinstance(model, tv.ResNet):
        raise TypeError(f"{type(model).__name__} is not a torchvision ResNet (torchvision.models.resnet.ResNet)")
    layers = [getattr(model, f"layer{index}") for index in range(1, 5)]
    block = type(layers[0][0])
    if block not in (tv.BasicBlock, tv.Bottleneck):
        raise TypeError(f"blocks of type {block.__name__} are not supported (BasicBlock and Bottleneck are)")
    eps = {module.eps for module in model.modules() if isinstance(module, nn.BatchNorm2d)}
    if len(eps) != 1:
        raise ValueError(f"the BatchNorms have different eps {sorted(eps)}; the core takes one")
    last_norm = "bn3" if block is tv.Bottleneck else "bn2"
    return {
        "block": block.__name__,
        "layers": [len(layer) for layer in layers],
        "groups": model.groups,
        "width_per_group": model.base_width,
        "stem_channels": model.conv1.out_channels,
        "planes": [getattr(layer[0], last_norm).num_features // block.expansion for layer in layers],
        "num_classes": model.fc.out_features,
        "in_channels": model.conv1.in_channels,
        "batch_norm_eps": eps.pop(),
    }


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
            elif isinstance(module, nn.BatchNorm2d):
                module.weight.copy_(draw_uniform(generator, module.weight.shape, 0.5, 1.5))
                module.bias.copy_(draw_uniform(generator, module.bias.shape, -0.25, 0.25))
            elif isinstance(module, nn.Linear):
                bound = 1.0 / math.sqrt(module.in_features)
                module.weight.copy_(draw_uniform(generator, module.weight.shape, -bound, bound))
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
            model(draw_normal(generator, (batch_size, 3, size, size), 1.0).double())
    model.float()
    for module, momentum in saved_momenta.items():
        module.momentum = momentum
    model.eval()


def seeded(name, seed, size, width=FULL_WIDTH, num_classes=1000, groups=None, width_per_group=None,
           calibration_batches=2, calibration_batch_size=4):
    torch.manual_seed(seed)
    model, architecture = build(name, width, num_classes, groups, width_per_group)
    generator = torch.Generator().manual_seed(seed)
    initialize(model, generator)
    calibrate_batch_norm(model, generator, size, calibration_batches, calibration_batch_size)
    return model, architecture


def from_checkpoint(name, path, width=FULL_WIDTH, num_classes=1000, groups=None, width_per_group=None):
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state_dict, dict) and "state_dict" in state_dict:
        state_dict = state_dict["state_dict"]
    if "fc.weight" in state_dict:
        num_classes = state_dict["fc.weight"].shape[0]
    model, architecture = build(name, width, num_classes, groups, width_per_group)
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as error:
        raise SystemExit(f"{path}: not a {name} state_dict: {error}") from None
    model.eval()
    return model, architecture
