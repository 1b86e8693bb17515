"""Never a silent wrong result (issue 15): torch models one change away from
a torchvision constructor's. Each is either computed exactly by the core
(forward() and verify_torch equal torch under the project's tolerance rule)
or refused up front with VerifyError naming the module; and no call, refused
or not, changes the user's model."""

import collections
import functools
import math

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models import resnet as tv
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.feature_extraction import create_feature_extractor
from torchvision.ops.misc import FrozenBatchNorm2d

import resnet_verify as rv
from reference import hooks, models


def seeded(model, seed=0):
    """Draws every weight and running statistic of `model` (with the
    fixtures' integer draws) away from torch's defaults, so that a dropped
    bias, eps or statistic shows, and puts it in eval mode."""
    generator = torch.Generator().manual_seed(seed)

    def draw(tensor, low, high):
        if tensor is not None:
            tensor.copy_(models.draw_uniform(generator, tensor.shape, low, high))

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                fan_out = module.out_channels * module.kernel_size[0] * module.kernel_size[1]
                bound = math.sqrt(6.0 / fan_out)  # kaiming's std, drawn uniform
                draw(module.weight, -bound, bound)
                draw(module.bias, -0.1, 0.1)
            elif isinstance(module, (nn.BatchNorm2d, FrozenBatchNorm2d)):
                draw(getattr(module, "weight", None), 0.5, 1.5)
                draw(getattr(module, "bias", None), -0.25, 0.25)
                draw(module.running_mean, -0.25, 0.25)
                draw(module.running_var, 0.5, 2.0)
            elif isinstance(module, nn.Linear):
                bound = 1.0 / math.sqrt(module.in_features)
                draw(module.weight, -bound, bound)
                draw(module.bias, -bound, bound)
    return model.eval()


def resnet18(**kwargs):
    """A width-8 resnet18 (torchvision's modules and names), 10 classes."""
    model, _ = models.build("resnet18", width=8, num_classes=10, **kwargs)
    return model


def resnet50(**kwargs):
    model, _ = models.build("resnet50", width=8, num_classes=10, **kwargs)
    return model


def small(block=tv.Bottleneck, layers=(1, 1, 1, 1), **kwargs):
    """torchvision's ResNet constructor itself, at full width, one block a stage."""
    return tv.ResNet(block, list(layers), num_classes=10, **kwargs)


def changed(make, change):
    model = make()
    change(model)
    return model


class ReLUWithItsOwnForward(nn.ReLU):
    def forward(self, x):
        return torch.clamp(x, 0.0, 1.0)


class BlockWithoutResidual(tv.BasicBlock):
    def forward(self, x):
        return self.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))))


class CalledDifferently(tv.ResNet):
    """Its own __call__: what calling it returns is not its forward's."""

    def __call__(self, x):
        return torch.softmax(super().__call__(x), dim=1)


class Linear(nn.Linear):
    """Another class with torch's name (as torch.ao's quantized Linear): the
    refusal must tell the two apart."""


def blocks_swapped(model):
    model.layer1 = nn.Sequential(collections.OrderedDict([("1", model.layer1[1]), ("0", model.layer1[0])]))


def bias_moved_in_state_dict(model):
    def hook(module, state_dict, prefix, local_metadata):
        state_dict[prefix + "fc.bias"] = state_dict[prefix + "fc.bias"] + 1.0
    model.register_state_dict_post_hook(hook)


def scale_output(module, inputs, output):
    return output * 2


def with_hook(model):
    model.layer2[0].bn1.register_forward_hook(scale_output)


# (name, model maker, the module named in the refusal, what the message says)
REFUSED = [
    ("stem relu -> ReLU6", lambda: changed(resnet18, lambda m: setattr(m, "relu", nn.ReLU6())),
     "relu", "ReLU6, where the core builds ReLU"),
    ("conv bias=True", lambda: changed(resnet18, lambda m: setattr(
        m.layer1[0], "conv1", nn.Conv2d(8, 8, 3, 1, 1, bias=True))),
     "layer1.0.conv1", "bias=True"),
    ("padding_mode='reflect'", lambda: changed(resnet18, lambda m: setattr(
        m, "conv1", nn.Conv2d(3, 8, 7, 2, 3, bias=False, padding_mode="reflect"))),
     "conv1", "padding_mode='reflect'"),
    ("a conv with its own dilation", lambda: changed(resnet18, lambda m: setattr(
        m.layer2[1], "conv2", nn.Conv2d(16, 16, 3, 1, padding=2, dilation=2, bias=False))),
     "layer2.1.conv2", "dilation=(2, 2)"),
    ("AvgPool2d in place of the max pool", lambda: changed(resnet18, lambda m: setattr(
        m, "maxpool", nn.AvgPool2d(3, 2, 1))),
     "maxpool", "AvgPool2d, where the core builds MaxPool2d"),
    ("ceil_mode=True", lambda: changed(resnet18, lambda m: setattr(m.maxpool, "ceil_mode", True)),
     "maxpool", "ceil_mode=True"),
    ("AdaptiveMaxPool2d", lambda: changed(resnet18, lambda m: setattr(m, "avgpool", nn.AdaptiveMaxPool2d(1))),
     "avgpool", "AdaptiveMaxPool2d, where the core builds AdaptiveAvgPool2d"),
    ("LeakyReLU inside a block", lambda: changed(resnet18, lambda m: setattr(m.layer3[1], "relu", nn.LeakyReLU(0.1))),
     "layer3.1.relu", "LeakyReLU"),
    # And more of the same kind.
    ("BatchNorm affine=False", lambda: changed(resnet18, lambda m: setattr(
        m.layer1[0], "bn1", nn.BatchNorm2d(8, affine=False))),
     "layer1.0.bn1", "affine=False"),
    ("BatchNorm track_running_stats=False", lambda: changed(resnet18, lambda m: setattr(
        m.layer2[0], "bn2", nn.BatchNorm2d(16, track_running_stats=False))),
     "layer2.0.bn2", "track_running_stats=False"),
    ("fc bias=False", lambda: changed(resnet18, lambda m: setattr(m, "fc", nn.Linear(64, 10, bias=False))),
     "fc", "bias=False"),
    ("max pool kernel 2, padding 0", lambda: changed(resnet18, lambda m: setattr(m, "maxpool", nn.MaxPool2d(2, 2))),
     "maxpool", "kernel_size=(2, 2)"),
    ("average pool to 2x2", lambda: changed(resnet18, lambda m: setattr(m, "avgpool", nn.AdaptiveAvgPool2d(2))),
     "avgpool", "output_size=(2, 2)"),
    ("grouped conv in a BasicBlock", lambda: changed(resnet18, lambda m: setattr(
        m.layer1[1], "conv2", nn.Conv2d(8, 8, 3, 1, 1, groups=2, bias=False))),
     "layer1.1.conv2", "groups=2"),
    ("stem conv stride 1", lambda: changed(resnet18, lambda m: setattr(m.conv1, "stride", (1, 1))),
     "conv1", "stride=(1, 1)"),
    ("a downsample where the core has none", lambda: changed(resnet18, lambda m: setattr(
        m.layer1[1], "downsample", nn.Sequential(nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8)))),
     "layer1.1.downsample", "layer1.1.downsample: Sequential, which the core does not build"),
    ("BatchNorm replaced by Identity", lambda: changed(resnet18, lambda m: setattr(m.layer2[1], "bn1", nn.Identity())),
     "layer2.1.bn1", "Identity, where the core builds BatchNorm2d"),
    ("SiLU in the stem", lambda: changed(resnet50, lambda m: setattr(m, "relu", nn.SiLU())),
     "relu", "SiLU"),
    ("a ReLU subclass with its own forward", lambda: changed(resnet18, lambda m: setattr(
        m.layer1[0], "relu", ReLUWithItsOwnForward())),
     "layer1.0.relu", "ReLUWithItsOwnForward"),
    ("a block subclass without the residual", lambda: changed(resnet18, lambda m: setattr(
        m.layer4, "1", BlockWithoutResidual(64, 64))),
     "layer4.1", "BlockWithoutResidual, where the core builds BasicBlock"),
    ("a forward hook that changes an output", lambda: changed(resnet18, with_hook),
     "layer2.0.bn1", "forward hooks"),
    ("a forward replaced on the instance", lambda: changed(resnet18, lambda m: setattr(
        m.layer1[0].bn2, "forward", lambda x: x)),
     "layer1.0.bn2", "its forward is replaced on the instance"),
    ("a ResNet subclass with its own __call__", lambda: changed(
        resnet18, lambda m: setattr(m, "__class__", CalledDifferently)),
     "the model", "CalledDifferently overrides ResNet.__call__"),
    ("a conv's _conv_forward replaced on the instance", lambda: changed(
        resnet18, lambda m: setattr(m.layer1[0].conv1, "_conv_forward", lambda x, weight, bias: x)),
     "layer1.0.conv1", "its _conv_forward is replaced on the instance"),
    ("a model compiled in place", lambda: changed(resnet18, lambda m: m.compile()),
     "the model", "it is compiled in place (module.compile())"),
    ("a Linear of another class with torch's name", lambda: changed(
        resnet18, lambda m: setattr(m, "fc", Linear(64, 10))),
     "fc", "test_modified_models.Linear, where the core builds torch.nn.modules.linear.Linear"),
    ("a layer whose blocks run in another order", lambda: changed(resnet18, blocks_swapped),
     "layer1", "runs its children in the order 1, 0, where the core runs 0, 1"),
    ("a state_dict hook that changes a weight", lambda: changed(resnet18, bias_moved_in_state_dict),
     "the model", "state_dict hooks"),
    ("float64 weights", lambda: changed(resnet18, lambda m: m.double()),
     "conv1.weight", "torch.float64"),
    ("an extra module", lambda: changed(resnet18, lambda m: setattr(m, "dropout", nn.Dropout(0.2))),
     "dropout", "Dropout, which the core does not build"),
    # Next to what is built: dilation, FrozenBatchNorm2d, heads, backbones.
    ("a dilated layer with one conv dilated otherwise", lambda: changed(
        lambda: resnet50(replace_stride_with_dilation=[False, True, True]),
        lambda m: setattr(m.layer4[1].conv2, "dilation", (2, 2))),
     "layer4.1.conv2", "dilation=(2, 2) (the core builds dilation=(4, 4))"),
    ("a dilated conv that did not give up its stride", lambda: changed(
        lambda: resnet50(replace_stride_with_dilation=[False, False, True]),
        lambda m: setattr(m.layer4[1].conv2, "stride", (2, 2))),
     "layer4.1.conv2", "stride=(2, 2)"),
    ("one FrozenBatchNorm2d among BatchNorm2d", lambda: changed(resnet18, lambda m: setattr(
        m.layer2[0], "bn1", FrozenBatchNorm2d(16))),
     "layer2.0.bn1", "FrozenBatchNorm2d, where the core builds BatchNorm2d"),
    ("one BatchNorm2d among FrozenBatchNorm2d", lambda: changed(
        lambda: small(norm_layer=FrozenBatchNorm2d), lambda m: setattr(m.layer1[0], "bn2", nn.BatchNorm2d(64))),
     "layer1.0.bn2", "BatchNorm2d, where the core builds FrozenBatchNorm2d"),
    ("fc as Sequential(Linear, ReLU, Linear)", lambda: changed(resnet18, lambda m: setattr(
        m, "fc", nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)))),
     "fc", "Sequential, where the core builds Linear"),
    ("fc as Sequential(AlphaDropout, Linear)", lambda: changed(resnet18, lambda m: setattr(
        m, "fc", nn.Sequential(nn.AlphaDropout(0.5), nn.Linear(64, 10)))),
     "fc", "Sequential, where the core builds Linear"),
    ("avgpool replaced by Identity", lambda: changed(resnet18, lambda m: setattr(m, "avgpool", nn.Identity())),
     "avgpool", "Identity, where the core builds AdaptiveAvgPool2d"),
    ("a traced graph with a node of its own", lambda: with_graph_node(
        lambda: traced(resnet18(), "layer4"), "add_3", torch.sub),
     "the model", "a traced graph that differs from a stock ResNet's at node 33: call_function"),
    ("a traced backbone with a conv of its own", lambda: changed(lambda: traced(resnet18(), "layer2"), lambda m: setattr(
        m.layer2.get_submodule("0"), "conv1", nn.Conv2d(8, 16, 3, 2, 1, bias=True))),
     "layer2.0.conv1", "bias=True"),
    ("a traced backbone with a forward hook on itself", lambda: changed(
        lambda: traced(resnet18(), "layer4"), lambda m: m.register_forward_hook(lambda *_: {"layer4": 0})),
     "the model", "forward hooks"),
    ("a traced backbone with its forward replaced", lambda: changed(
        lambda: traced(resnet18(), "layer4"), lambda m: setattr(m, "forward", lambda x: {"layer4": x})),
     "the model", "its forward is replaced on the instance"),
    ("a backbone whose children run in another order", lambda: backbone(
        changed(resnet18, reorder_relu_before_bn1), "layer2"),
     "the model", "an IntermediateLayerGetter that runs conv1, relu, bn1, maxpool, layer1, layer2"),
    ("a traced backbone whose class forward is replaced", lambda: changed(
        lambda: traced(resnet18(), "layer4"), replace_class_forward),
     "the model", "its forward is not the code of its graph"),
    ("a ResNet with its _forward_impl replaced", lambda: changed(
        resnet18, lambda m: setattr(m, "_forward_impl", lambda x: x)),
     "the model", "its _forward_impl is replaced on the instance"),
    ("a backbone whose widths no width_per_group gives", lambda: backbone(
        changed(resnet50, widen_one_block), "layer4"),
     "layer1.0.conv2", "3x3 convs whose widths no width_per_group gives"),
    ("a backbone with a stem conv of its own", lambda: changed(
        lambda: backbone(resnet18(), "layer3"), lambda m: setattr(m, "conv1", nn.Conv2d(3, 8, 3, 2, 1, bias=False))),
     "conv1", "kernel_size=(3, 3)"),
]


def uniform_eps(eps):
    return functools.partial(nn.BatchNorm2d, eps=eps)


def backbone(model, *layers):
    """The backbone that segmentation and detection code cuts: the modules up
    to the last of `layers`, returning each (torchvision's IntermediateLayerGetter)."""
    return IntermediateLayerGetter(model, return_layers={layer: layer for layer in layers})


def traced(model, *layers):
    """The same backbone traced (torchvision's create_feature_extractor)."""
    return create_feature_extractor(model.eval(), {layer: layer for layer in layers})


def with_graph_node(make, name, target):
    """A traced backbone with one node's function replaced."""
    def change(model):
        node = next(node for node in model.graph.nodes if node.name == name)
        node.target = target
        model.recompile()
    return changed(make, change)


def reorder_relu_before_bn1(model):
    """The same modules, `relu` added before `bn1` (an IntermediateLayerGetter
    runs them in that order)."""
    children = dict(model._modules)
    model._modules.clear()
    for name, module in children.items():
        if name == "bn1":
            model._modules["relu"] = children["relu"]
        if name != "relu":
            model._modules[name] = module


def replace_class_forward(model):
    """A traced model's own class made to run other code than its graph's."""
    graph_forward = type(model).forward
    type(model).forward = lambda self, x: {key: value * 2 for key, value in graph_forward(self, x).items()}


def widen_one_block(model):
    """layer2.0's Bottleneck 20 wide, where width_per_group gives 16."""
    block = model.layer2[0]
    block.conv1 = nn.Conv2d(block.conv1.in_channels, 20, 1, bias=False)
    block.bn1 = nn.BatchNorm2d(20)
    block.conv2 = nn.Conv2d(20, 20, 3, 2, 1, bias=False)
    block.bn2 = nn.BatchNorm2d(20)
    block.conv3 = nn.Conv2d(20, block.conv3.out_channels, 1, bias=False)


def set_eps(*changes):
    def change(model):
        for path, eps in changes:
            model.get_submodule(path).eps = eps
    return change


# (name, model maker, input shape): computed exactly.
EXACT = [
    ("resnet18 (width 8)", resnet18, (1, 3, 32, 32)),
    ("resnet50 (width 8)", resnet50, (1, 3, 32, 32)),
    ("custom depths ResNet(Bottleneck, [2, 1, 1, 2])", lambda: small(layers=(2, 1, 1, 2)), (1, 3, 32, 32)),
    ("groups=8, width_per_group=16", lambda: small(groups=8, width_per_group=16), (1, 3, 32, 32)),
    ("BasicBlock, num_classes=10, [1, 2, 1, 1]", lambda: small(tv.BasicBlock, (1, 2, 1, 1)), (1, 3, 32, 32)),
    ("non-square input", resnet18, (1, 3, 48, 80)),
    ("a batch of 3", resnet50, (3, 3, 32, 32)),
    ("every BatchNorm with eps 1e-3", lambda: small(tv.BasicBlock, norm_layer=uniform_eps(1e-3)), (2, 3, 32, 32)),
    ("ReLU(inplace=False)", lambda: changed(resnet18, lambda m: setattr(m, "relu", nn.ReLU())), (1, 3, 32, 32)),
    ("a conv with padding='same'", lambda: changed(resnet18, lambda m: setattr(
        m.layer1[0], "conv2", nn.Conv2d(8, 8, 3, padding="same", bias=False))), (1, 3, 32, 32)),
    ("one input channel", lambda: changed(resnet18, lambda m: setattr(
        m, "conv1", nn.Conv2d(1, 8, 7, 2, 3, bias=False))), (2, 1, 40, 24)),
    # Dilated (segmentation), frozen (detection), fine-tuned and cut models.
    ("replace_stride_with_dilation=[False, True, True]",
     lambda: resnet50(replace_stride_with_dilation=[False, True, True]), (1, 3, 48, 40)),
    ("replace_stride_with_dilation=[False, False, True]",
     lambda: small(layers=(1, 1, 1, 3), replace_stride_with_dilation=[False, False, True]), (1, 3, 32, 32)),
    ("replace_stride_with_dilation=[True, True, True]",
     lambda: small(layers=(1, 2, 2, 2), groups=4, width_per_group=16, replace_stride_with_dilation=[True, True, True]),
     (1, 3, 24, 24)),
    ("norm_layer=FrozenBatchNorm2d", lambda: small(norm_layer=FrozenBatchNorm2d), (2, 3, 32, 32)),
    ("FrozenBatchNorm2d with eps 0", lambda: small(tv.BasicBlock, norm_layer=functools.partial(FrozenBatchNorm2d, eps=0.0)),
     (1, 3, 32, 32)),
    ("one BatchNorm with another eps", lambda: changed(resnet50, set_eps(("layer4.1.bn2", 1e-3))), (1, 3, 32, 32)),
    ("BatchNorms with three eps", lambda: changed(resnet18, set_eps(("bn1", 0.5), ("layer1.0.bn2", 1e-3),
                                                                      ("layer3.1.bn1", 0.5))), (1, 3, 32, 32)),
    ("fc as Sequential(Dropout, Linear)", lambda: changed(resnet18, lambda m: setattr(
        m, "fc", nn.Sequential(nn.Dropout(0.5), nn.Linear(64, 10)))), (2, 3, 32, 32)),
    ("fc as Identity", lambda: changed(resnet50, lambda m: setattr(m, "fc", nn.Identity())), (2, 3, 32, 32)),
    ("a backbone to layer4 (DeepLabV3's)", lambda: backbone(
        resnet50(replace_stride_with_dilation=[False, True, True]), "layer3", "layer4"), (1, 3, 40, 40)),
    ("a backbone to layer2", lambda: backbone(resnet18(), "layer1", "layer2"), (1, 3, 32, 32)),
    ("a frozen ResNeXt backbone (detection's)", lambda: backbone(
        small(groups=8, width_per_group=16, norm_layer=FrozenBatchNorm2d), "layer2", "layer4"), (1, 3, 64, 48)),
    ("a width-reduced ResNeXt backbone (width_per_group 12)", lambda: backbone(
        models.build("resnext50_32x4d", width=8, num_classes=10, groups=2, width_per_group=12)[0], "layer4"),
     (1, 3, 32, 32)),
    ("a traced backbone (create_feature_extractor)", lambda: traced(
        resnet50(replace_stride_with_dilation=[False, True, True]), "layer4"), (1, 3, 40, 40)),
    ("a traced backbone to layer3", lambda: traced(resnet18(), "layer1", "layer3"), (2, 3, 32, 32)),
    ("a traced frozen backbone", lambda: traced(small(norm_layer=FrozenBatchNorm2d), "layer2", "layer4"),
     (1, 3, 32, 32)),
]


def state(model):
    """Every parameter and buffer (running statistics, num_batches_tracked), copied."""
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def assert_unchanged(model, before):
    after = model.state_dict()
    assert list(after) == list(before)
    for name, tensor in before.items():
        assert after[name].dtype == tensor.dtype and torch.equal(after[name], tensor), f"{name} changed"


def test_a_torchvision_class_patched_in_place_is_refused_by_name(monkeypatch):
    """A forward set on torchvision's own class (every instance runs it):
    the instance's forward is its class's, so only where that came from
    tells."""
    model = seeded(resnet18())
    stock = tv.BasicBlock.forward
    monkeypatch.setattr(tv.BasicBlock, "forward", lambda self, x: stock(self, x) * 0.5)
    # And a method forward calls, on torch's own class.
    conv = nn.Conv2d._conv_forward
    monkeypatch.setattr(nn.Conv2d, "_conv_forward", lambda self, x, weight, bias: conv(self, x, weight, bias))
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    for call in (lambda: rv.forward(model, x), lambda: rv.verify_torch(model, x)):
        with pytest.raises(rv.VerifyError, match=r"layer1\.0, .*BasicBlock\.forward is .*<lambda>, "
                                                 r"not torch's or torchvision's own") as refused:
            call()
        assert "Conv2d._conv_forward is " in str(refused.value)


def test_every_case_is_one_change_from_torchvision():
    assert len(REFUSED) >= 12 and len({name for name, *_ in REFUSED + EXACT}) == len(REFUSED) + len(EXACT)


@pytest.mark.parametrize("name, make, module, why", REFUSED, ids=[case[0] for case in REFUSED])
def test_a_model_the_core_does_not_build_exactly_is_refused_by_name(name, make, module, why):
    model = seeded(make())
    x = torch.randn(1, model.conv1.in_channels, 32, 32, generator=torch.Generator().manual_seed(1))
    before = state(model)
    for call in (lambda: rv.forward(model, x), lambda: rv.verify_torch(model, x)):
        with pytest.raises(rv.VerifyError) as refused:
            call()
        assert type(refused.value) is rv.VerifyError
        message = str(refused.value)
        assert message.startswith("the core does not build this model exactly, so it is refused: "), message
        # The module is named where the message says what is wrong with it.
        assert f"{module}: " in message or f"{module}, " in message, message
        assert why in message, message
        assert_unchanged(model, before)


@pytest.mark.parametrize("name, make, shape", EXACT, ids=[case[0] for case in EXACT])
def test_a_model_the_core_builds_is_computed_exactly(name, make, shape):
    model = seeded(make())
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    before = state(model)
    with torch.no_grad():
        result = model(x)
    # A backbone returns its layers' outputs by name; a model its logits.
    expected = dict(result) if isinstance(result, dict) else {"fc": result}
    outputs = rv.forward(model, x)
    assert_unchanged(model, before)
    for name, tensor in expected.items():
        assert outputs[name].shape == tuple(tensor.shape), name
        assert rv.compare(tensor.numpy(), outputs[name])["verdict"] == "succ", name
    report = rv.verify_torch(model, x)
    assert_unchanged(model, before)
    assert report.passed, report.failures()
    # Every stage torch records but the input (a traced model records no
    # block or layer: it calls the modules inside them).
    recorded, _ = hooks.stages(model, x)
    assert report["summary"]["compared"] == len(recorded) - 1 > 0


def test_one_module_in_train_mode_is_refused_by_name_and_the_model_is_not_changed():
    model = seeded(resnet18())
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    model.layer4[1].bn2.train()
    before = state(model)
    for call in (lambda: rv.forward(model, x), lambda: rv.verify_torch(model, x)):
        with pytest.raises(rv.TrainModeError) as refused:
            call()
        message = str(refused.value)
        assert message.startswith("THE TORCH MODEL IS IN TRAIN MODE: 1 module of the torch model is in train mode: "
                                  "layer4.1.bn2. The core computes the network in eval mode (a BatchNorm in train "
                                  "mode normalises with the statistics of the batch"), message
        assert "Dropout" not in message and "dumped" not in message.lower(), message
        assert message.endswith("it was not run. Call model.eval() first."), message
        assert_unchanged(model, before)
    assert model.layer4[1].bn2.training and not model.training, "the model's modes are the user's"

    model.eval()
    model.layer1[0].relu.train()
    model.fc.train()
    with pytest.raises(rv.TrainModeError, match="2 modules of the torch model are in train mode: layer1.0.relu, fc") \
            as refused:
        rv.verify_torch(model, x)
    assert "statistics of the batch" not in str(refused.value), "neither module is a BatchNorm"
    model.train()
    with pytest.raises(rv.TrainModeError, match="IN TRAIN MODE: every module of the torch model is in train mode. ") \
            as refused:
        rv.forward(model, x)
    assert "statistics of the batch" in str(refused.value)
    assert_unchanged(model, before)


def test_a_frozen_batch_norm_model_in_train_mode_is_refused_without_blaming_batch_statistics():
    # FrozenBatchNorm2d always uses its buffers; the head's Dropout is what
    # train mode changes here, and the message says so.
    model = models.freeze_batch_norms(seeded(resnet18())).eval()
    model.fc = nn.Sequential(nn.Dropout(0.5), model.fc).eval()
    model.fc[0].train()
    model.bn1.train()
    with pytest.raises(rv.TrainModeError, match="2 modules of the torch model are in train mode: bn1, fc.0") as refused:
        rv.forward(model, torch.zeros(1, 3, 32, 32))
    message = str(refused.value)
    assert "statistics of the batch" not in message and "a Dropout in train mode zeroes values" in message, message


def test_a_train_mode_refusal_comes_before_an_unsupported_module():
    model = changed(resnet18, lambda m: setattr(m, "relu", nn.ReLU6())).train()
    with pytest.raises(rv.TrainModeError):
        rv.forward(model, torch.zeros(1, 3, 32, 32))


def test_what_is_not_a_torchvision_resnet_is_refused():
    with pytest.raises(rv.VerifyError, match="Sequential is not a torchvision ResNet"):
        rv.forward(nn.Sequential(nn.Conv2d(3, 8, 3)).eval(), torch.zeros(1, 3, 8, 8))
    with pytest.raises(rv.VerifyError, match="layer4: missing, where the core builds Sequential"):
        rv.forward(changed(resnet18, lambda m: delattr(m, "layer4")).eval(), torch.zeros(1, 3, 32, 32))


@pytest.mark.parametrize("change, message", [
    (lambda m: setattr(m, "layer1", nn.Sequential()), "layer1.0: missing, where the core builds BasicBlock or Bottleneck"),
    (lambda m: setattr(m, "layer1", nn.ModuleList(list(m.layer1))), "layer1: ModuleList, where the core builds Sequential"),
    (lambda m: setattr(m, "conv1", nn.Identity()), "refused: conv1: Identity, where the core builds Conv2d$"),
    (lambda m: delattr(m, "groups"), r"the model: no `groups` \(torchvision's ResNet records its constructor's there\)$"),
    (lambda m: setattr(m.layer2, "0", tv.Bottleneck(8, 4, 2, nn.Sequential(nn.Conv2d(8, 16, 1, 2, bias=False),
                                                                          nn.BatchNorm2d(16)))),
     "layer2.0: Bottleneck, where the core builds BasicBlock"),
    # An extra module is named once, not again with each of its children.
    (lambda m: setattr(m.layer1[1], "downsample", nn.Sequential(nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8))),
     "refused: layer1.1.downsample: Sequential, which the core does not build$"),
])
def test_a_model_whose_structure_differs_is_refused_by_name_and_nothing_else(change, message):
    model = changed(resnet18, change).eval()
    with pytest.raises(rv.VerifyError, match=message):
        rv.forward(model, torch.zeros(1, 3, 32, 32))


@pytest.mark.parametrize("name, dilation", [
    ("resnet50", [False, True, True]), ("resnet50", [False, False, True]),
    ("resnet101", [False, True, True]), ("resnet101", [False, False, True]),
])
def test_dilated_resnets_are_verified_at_224(name, dilation):
    """The segmentation backbones at the size they run at: every stage succ,
    and layer4 at the size dilation keeps (28x28 or 14x14, not 7x7)."""
    model = seeded(models.build(name, width=8, num_classes=10, replace_stride_with_dilation=dilation)[0])
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    report = rv.verify_torch(model, x)
    assert report.passed, report.failures()
    layer4 = next(stage for stage in report["stages"] if stage["name"] == "layer4")
    assert layer4["shape"][2:] == ([28, 28] if dilation[1] else [14, 14])


def test_a_weights_dict_with_weights_the_architecture_does_not_use_is_refused():
    # forward(dict, architecture=...) once built the stock network and
    # returned its numbers for a model whose conv had a bias (the dict's
    # extra key dropped in silence).
    model = seeded(resnet18())
    architecture = models.describe(model)
    weights = {name: tensor.numpy() for name, tensor in model.state_dict().items()}
    x = torch.zeros(1, 3, 32, 32)
    assert "fc" in rv.forward(weights, x, architecture=architecture)  # num_batches_tracked is no weight
    weights["layer1.0.conv1.bias"] = torch.full((8,), 0.5).numpy()
    weights["extra.weight"] = torch.ones(3).numpy()
    with pytest.raises(rv.VerifyError, match=r"^2 weight\(s\) that the architecture does not use: extra.weight, "
                                             r"layer1.0.conv1.bias\. The model they come from has parts"):
        rv.forward(weights, x, architecture=architecture)


def test_graphs_and_compiled_forms_are_refused_as_what_they_are():
    model = seeded(resnet18())
    x = torch.zeros(1, 3, 32, 32)
    # torch.export's module cannot be put in eval mode: it was once told to.
    exported = torch.export.export(model, (x,)).module()
    traced = torch.fx.symbolic_trace(model).eval()
    for graph in (exported, traced):
        with pytest.raises(rv.VerifyError) as refused:
            rv.forward(graph, x)
        message = str(refused.value)
        assert "a traced or exported graph (torch.fx, torch.export)" in message, message
        # Not also a list of the modules a backbone has no use for.
        assert "AdaptiveAvgPool2d" not in message, message
    # A frozen TorchScript module has no `training`: once an AttributeError.
    frozen = torch.jit.freeze(torch.jit.script(model))
    with pytest.raises(rv.VerifyError, match="RecursiveScriptModule is not a torchvision ResNet"):
        rv.verify_torch(frozen, x)


def test_one_module_object_in_two_places_is_refused_by_name():
    # A ReLU shared by the stem and every block: named_modules() lists it
    # once, and it was called 'missing' in the blocks.
    def share(model):
        for block in (*model.layer1, *model.layer2, *model.layer3, *model.layer4):
            block.relu = model.relu
    with pytest.raises(rv.VerifyError, match=r"relu: the same ReLU object as layer1\.0\.relu, layer1\.1\.relu, "
                                             r"layer2\.0\.relu and more: stages are told apart by module") as refused:
        rv.forward(changed(resnet18, share).eval(), torch.zeros(1, 3, 32, 32))
    assert "missing" not in str(refused.value)


def test_verify_torch_under_autocast_is_refused_not_failed():
    model = seeded(resnet18())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(rv.VerifyError, match=r"torch.autocast is on for the CPU \(torch.bfloat16\)"):
            rv.verify_torch(model, torch.zeros(1, 3, 32, 32))
