"""Many real images and odd sizes: the dumper's --images and --size HxW, the
per-image report (classes, worst item, --item, JUnit), and the hints for
the padding and pooling mistakes that only some sizes show."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import ROOT, run_dump, run_verify as verify, verify_report as report
from reference import preprocess, tolerance_study
from reference.manifest import build_manifest

SMALL = ("--model", "resnet50", "--width", "8", "--threads", "1")




def write_candidate(reference, out, outputs):
    """A candidate dump as another engine would write it, shapes as they come
    (the writers refuse a shape the reference does not have)."""
    (out / "stages").mkdir(parents=True)
    manifest = json.loads((reference / "manifest.json").read_text())
    types = {stage["name"]: stage["module_type"] for stage in manifest["stages"]}
    entries = []
    for number, (name, output) in enumerate(outputs.items()):
        array = output.detach().float().numpy()
        file = f"stages/{number:03d}.npy"
        np.save(out / file, array)
        entries.append({"name": name, "module_type": types[name], "shape": list(array.shape), "file": file})
    (out / "manifest.json").write_text(json.dumps(build_manifest(mode="eval", stages=entries)))
    return out


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """A batch of scikit-image's photographs through a width-reduced ResNet50."""
    out = tmp_path_factory.mktemp("photos") / "dump"
    run_dump(out, *SMALL, "--size", 64, "--images", "samples")
    return out


def test_the_dumper_takes_a_batch_of_photos_and_odd_sizes(photos, tmp_path):
    manifest = json.loads((photos / "manifest.json").read_text())
    assert len(preprocess.SAMPLES) >= 8
    assert manifest["input"]["images"] == list(preprocess.SAMPLES)
    assert manifest["input"]["source"] == "images" and manifest["input"]["batch"] == len(preprocess.SAMPLES)
    assert manifest["stages"][0]["shape"] == [len(preprocess.SAMPLES), 3, 64, 64]
    # Every photo is its own item: no two are the same.
    x = np.load(photos / manifest["stages"][0]["file"])
    assert len({item.tobytes() for item in x}) == len(x)
    # HxW: height first; a square HxW is N.
    wide = run_dump(tmp_path / "wide", *SMALL, "--size", "45x71")
    assert wide["stages"][0]["shape"] == [1, 3, 45, 71] and wide["input"]["size"] == [45, 71]
    assert run_dump(tmp_path / "square", *SMALL, "--size", "33x33")["input"]["size"] == 33
    # A directory of images, in name order.
    folder = tmp_path / "images"
    folder.mkdir()
    from PIL import Image
    for name in ("b.png", "a.jpg"):
        Image.fromarray(preprocess.sample("coffee")).save(folder / name)
    (folder / "notes.txt").write_text("not an image")
    listed = run_dump(tmp_path / "folder", *SMALL, "--size", 33, "--images", folder)
    assert [path.split("/")[-1] for path in listed["input"]["images"]] == ["a.jpg", "b.png"]
    for bad, message in ([("--size", "0x3"), "HxW"], [("--images", tmp_path / "none"), "no such file"],
                         [("--images", "samples", "--batch", "2"), "leave out --image and --batch"]):
        result = subprocess.run([sys.executable, "-m", "reference.dump", "--out", str(tmp_path / "bad"), *SMALL,
                                 *map(str, bad)], cwd=ROOT, capture_output=True, text=True)
        assert result.returncode == 2 and message in result.stderr, result.stderr


def test_a_batch_of_photos_is_reported_image_by_image(photos, tmp_path):
    result = verify(photos)
    assert result.returncode == 0, result.stdout
    count = len(preprocess.SAMPLES)
    for index, name in enumerate(preprocess.SAMPLES):
        assert f"  item {index} {name}: top-1 agree " in result.stdout
    assert f"images: {count}, top-1 agree {count}/{count}, top-5 sets agree {count}/{count}, worst item " \
        in result.stdout
    data = report(photos)
    assert [item["image"] for item in data["items"]] == list(preprocess.SAMPLES)
    assert data["summary"]["items"]["top1_agree"] == count
    conv = next(stage for stage in data["stages"] if stage["name"] == "layer1.0.conv2")
    assert len(conv["max_abs_error_by_item"]) == count
    assert conv["worst_item"] == int(np.argmax(conv["max_abs_error_by_item"]))
    junit = verify(photos, "--format", "junit").stdout
    assert junit.count('classname="images"') == count
    assert 'name="item 2 (coffee): classes"' in junit
    # --item: that image alone, in the reference's coordinates.
    one = report(photos, "--item", 2)
    assert one["item"] == 2 and [item["index"] for item in one["items"]] == [2]
    assert one["items"][0]["image"] == "coffee"
    assert "images: 1, top-1 agree 1/1" in verify(photos, "--item", 2).stdout
    junit_count = verify(photos, "--format", "junit").stdout
    stages = report(photos)["summary"]["compared"]
    assert f'tests="{stages + count}"' in junit_count and junit_count.count("<testcase ") == stages + count
    out_of_range = verify(photos, "--item", count)
    assert out_of_range.returncode == 2 and f"--item {count}: the reference's batch has {count}" in out_of_range.stderr


def test_a_class_flipped_on_one_image_is_that_images_disagreement_while_stages_pass(photos, tmp_path):
    manifest = json.loads((photos / "manifest.json").read_text())
    outputs = {stage["name"]: torch.from_numpy(np.load(photos / stage["file"])) for stage in manifest["stages"]}
    logits = outputs["fc"].clone()
    # The image whose two best classes are closest: raise the second just
    # past the first.
    best = torch.topk(logits, 2, dim=1)
    item = int(torch.argmin(best.values[:, 0] - best.values[:, 1]))
    second = int(best.indices[item, 1])
    logits[item, second] = best.values[item, 0] + 1e-3
    outputs["fc"] = logits
    candidate = write_candidate(photos, tmp_path / "flipped", outputs)
    gap = float(best.values[item, 0] - best.values[item, 1]) + 1e-3
    atol = 2 * gap  # within tolerance: the stages pass, the class flips
    result = report("compare", photos, candidate, "--atol", atol)
    assert result["summary"]["verdict"] == "succ"
    flipped = [entry for entry in result["items"] if entry["top1_agree"] is False]
    assert [entry["index"] for entry in flipped] == [item]
    assert flipped[0]["candidate_top5"][0]["index"] == second
    count = len(preprocess.SAMPLES)
    assert result["summary"]["items"]["top1_agree"] == count - 1
    text = verify("compare", photos, candidate, "--atol", atol).stdout
    # The flipped image alone: its logits still pass, its class differs.
    alone = report("compare", photos, candidate, "--atol", atol, "--item", item)
    assert alone["summary"]["verdict"] == "succ" and alone["items"][0]["top1_agree"] is False
    assert f"item {item} {preprocess.SAMPLES[item]}: top-1 DIFFERS" in text
    assert f"top-1 agree {count - 1}/{count}" in text


def test_one_item_keeps_the_batchs_coordinates_and_verdict(photos, tmp_path):
    manifest = json.loads((photos / "manifest.json").read_text())
    outputs = {stage["name"]: torch.from_numpy(np.load(photos / stage["file"])) for stage in manifest["stages"]}
    conv = outputs["layer1.0.conv2"].clone()
    conv[4, 3, 5, 6] += 1.0  # one element of image 4
    outputs["layer1.0.conv2"] = conv
    candidate = write_candidate(photos, tmp_path / "one", outputs)
    whole = report("compare", photos, candidate)
    stage = next(s for s in whole["stages"] if s["name"] == "layer1.0.conv2")
    assert stage["worst_item"] == 4 and stage["cumulative"]["worst"]["index"] == [4, 3, 5, 6]
    assert "by item: worst 4" in verify("compare", photos, candidate).stdout
    for item, verdict in ((4, "fail"), (5, "succ")):
        alone = report("compare", photos, candidate, "--item", item)
        stage = next(s for s in alone["stages"] if s["name"] == "layer1.0.conv2")
        assert stage["verdict"] == verdict
        if verdict == "fail":
            assert stage["cumulative"]["worst"]["index"] == [4, 3, 5, 6]
    # Every item alone gets the verdict the whole batch gives it.
    same = shutil.copytree(photos, tmp_path / "same")
    for item in range(len(preprocess.SAMPLES)):
        alone = report("compare", photos, same, "--item", item)
        assert alone["summary"]["verdict"] == "succ"


def test_verify_torch_reports_a_batch_item_by_item(photos):
    import resnet_verify

    model, x = tolerance_study.reference_model(photos)
    live = resnet_verify.verify_torch(model, x)
    assert live.passed and len(live["items"]) == len(preprocess.SAMPLES)
    assert all(item["top1_agree"] for item in live["items"])
    assert "images: " in live.text


class SamePadded(nn.Module):
    """A conv or max pool padded TensorFlow's way: the smaller half first."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, x):
        kernel, stride = self.module.kernel_size, self.module.stride
        kernel = kernel if isinstance(kernel, tuple) else (kernel, kernel)
        stride = stride if isinstance(stride, tuple) else (stride, stride)
        pads = []
        for size, k, s in zip(reversed(x.shape[2:]), reversed(kernel), reversed(stride)):
            total = max((-(-size // s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        if isinstance(self.module, nn.MaxPool2d):
            x = F.pad(x, pads, value=float("-inf"))
            return F.max_pool2d(x, kernel, stride)
        return F.conv2d(F.pad(x, pads), self.module.weight, self.module.bias, stride)


def candidate_with(reference, tmp_path, change):
    model, x = tolerance_study.reference_model(reference)
    change(model)
    outputs = tolerance_study.torch_stages(model, x)
    return write_candidate(reference, tmp_path / "candidate", outputs)


def hints_at(result, name):
    stage = next(stage for stage in result["stages"] if stage["name"] == name)
    return [hint["hypothesis"] for hint in stage["hints"]], [hint["message"] for hint in stage["hints"]]


@pytest.fixture(scope="module")
def size_67(tmp_path_factory):
    """67x67: conv1 gives 34x34, where max pooling's ceil_mode and SAME
    padding each differ from torch's."""
    out = tmp_path_factory.mktemp("odd") / "dump"
    run_dump(out, *SMALL, "--size", 67)
    return out


def test_odd_sizes_give_no_size_hint_to_a_candidate_that_fails_otherwise(size_67, tmp_path):
    # Correct at every size: nothing fails, no hint.
    correct = report("compare", size_67, candidate_with(size_67, tmp_path, lambda model: None))
    assert correct["summary"]["verdict"] == "succ"
    # Wrong at maxpool and conv1 for another reason (a scale): the size
    # hypotheses are tested there and say nothing.
    model, x = tolerance_study.reference_model(size_67)
    outputs = tolerance_study.torch_stages(model, x)
    outputs = {name: output * 1.01 if name in ("conv1", "maxpool") else output for name, output in outputs.items()}
    result = report("compare", size_67, write_candidate(size_67, tmp_path / "scaled", outputs))
    for stage in ("conv1", "maxpool"):
        hypotheses, _ = hints_at(result, stage)
        assert "same_padding" not in hypotheses and "output_size" not in hypotheses, hypotheses
    assert result["summary"]["first_failure"] == "conv1"
    # One image, asked for by --item: its worst stage is said.
    alone = report("compare", size_67, tmp_path / "scaled", "--item", 0)
    assert alone["summary"]["items"]["worst_item"] == 0 and alone["items"][0]["worst_stage"]


def test_max_pooling_with_ceil_mode_is_named_with_the_sizes(size_67, tmp_path):
    def ceil_mode(model):
        model.maxpool.ceil_mode = True
    result = report("compare", size_67, candidate_with(size_67, tmp_path, ceil_mode))
    assert result["summary"]["first_failure"] == "maxpool"
    hypotheses, messages = hints_at(result, "maxpool")
    assert hypotheses == ["output_size"]
    assert "the candidate's output is 18x18 where torch's is 17x17, from a 34x34 input: " \
           "max pooling with ceil_mode=True gives that size and the candidate's values" in messages[0]
    # The values were recomputed so, not the size alone.
    stage = next(stage for stage in result["stages"] if stage["name"] == "maxpool")
    assert stage["hints"][0]["relative_error"] is not None


def test_a_size_is_not_taken_for_its_cause(size_67, tmp_path):
    # A max pool of kernel 2 (padding 1) has ceil_mode's size; it was once
    # named ceil_mode, '(max rel err 0.0e0)', from the sizes alone.
    def kernel_2(model):
        model.maxpool.kernel_size = 2
    result = report("compare", size_67, candidate_with(size_67, tmp_path / "kernel", kernel_2))
    _, messages = hints_at(result, "maxpool")
    assert "a kernel of 2 (torch's: 3) gives that size and the candidate's values" in messages[0], messages
    # A bottleneck strided in its 1x1 conv1 (the original ResNet, v1): once
    # 'an off-by-one in the output size'. A conv's stride is named from
    # the sizes only, and said so.
    def v1(model):
        model.layer2[0].conv1.stride = (2, 2)
        model.layer2[0].conv2.stride = (1, 1)
    result = report("compare", size_67, candidate_with(size_67, tmp_path / "v1", v1))
    assert result["summary"]["first_failure"] == "layer2.0.conv1"
    stage = next(stage for stage in result["stages"] if stage["name"] == "layer2.0.conv1")
    message = stage["hints"][0]["message"]
    assert "a stride of 2 (torch's: 1) gives that size" in message and "(v1)" in message, message
    assert stage["hints"][0]["relative_error"] is None
    text = verify("compare", size_67, tmp_path / "v1" / "candidate").stdout
    assert "(the output size only; no values reproduced)" in text


def test_same_padding_in_a_max_pool_is_named(size_67, tmp_path):
    def same(model):
        model.maxpool = SamePadded(model.maxpool)
    result = report("compare", size_67, candidate_with(size_67, tmp_path, same))
    assert result["summary"]["first_failure"] == "maxpool"
    hypotheses, messages = hints_at(result, "maxpool")
    assert hypotheses == ["same_padding"]
    assert "TensorFlow-style SAME padding" in messages[0]


def test_same_padding_in_a_conv_is_named_where_the_size_shows_it(tmp_path):
    reference = tmp_path / "dump"
    # 66x66: conv1's input is even, so SAME pads 2 on top and 3 below.
    run_dump(reference, *SMALL, "--size", 66)

    def same(model):
        model.conv1 = SamePadded(model.conv1)
    result = report("compare", reference, candidate_with(reference, tmp_path, same))
    assert result["summary"]["first_failure"] == "conv1"
    hypotheses, _ = hints_at(result, "conv1")
    assert hypotheses == ["same_padding"]


def test_an_output_size_no_convention_gives_is_an_off_by_one(size_67, tmp_path):
    model, x = tolerance_study.reference_model(size_67)
    outputs = tolerance_study.torch_stages(model, x)
    outputs = {name: (output[:, :, :-1, :] if name == "maxpool" else output) for name, output in outputs.items()}
    result = report("compare", size_67, write_candidate(size_67, tmp_path / "cut", outputs))
    hypotheses, messages = hints_at(result, "maxpool")
    assert hypotheses == ["output_size"]
    assert "16x17" in messages[0] and "no usual convention, padding or stride gives" in messages[0]
    assert "torch's 17x17" in messages[0] and "TensorFlow-style SAME padding 17x17" in messages[0]


class Summed(nn.Module):
    """The head's pool as a sum over the map, not a mean."""

    def forward(self, x):
        return x.sum((2, 3), keepdim=True)


class PooledDownsample(nn.Module):
    """ResNet-D's downsample conv (timm's resnet50d): the input average-pooled
    2x2, then the 1x1 conv at stride 1, where torchvision strides it."""

    def __init__(self, conv):
        super().__init__()
        self.conv = conv

    def forward(self, x):
        x = F.avg_pool2d(x, 2, 2, ceil_mode=True, count_include_pad=False)
        return F.conv2d(x, self.conv.weight, None, 1)


def test_pools_of_another_kind_are_named(size_67, tmp_path):
    cases = [
        ("maxpool", lambda model: setattr(model, "maxpool", nn.AvgPool2d(3, 2, 1)),
         "the candidate matches an average pool (kernel 3, stride 2, padding 1) where torch takes the max"),
        ("maxpool", lambda model: setattr(model, "maxpool", nn.AvgPool2d(3, 2, 1, count_include_pad=False)),
         "an average pool (kernel 3, stride 2, padding 1, count_include_pad=False)"),
        ("avgpool", lambda model: setattr(model, "avgpool", nn.AdaptiveMaxPool2d(1)),
         "the candidate matches a max over the map where torch averages it"),
        ("avgpool", lambda model: setattr(model, "avgpool", Summed()),
         "a sum over the 3x3 map where torch averages it: divide by 9"),
        ("layer2.0.downsample.0",
         lambda model: model.layer2[0].downsample.__setitem__(0, PooledDownsample(model.layer2[0].downsample[0])),
         "this 1x1 conv at stride 1 on its input average-pooled 2x2 (ResNet-D's downsample"),
    ]
    for number, (stage, change, says) in enumerate(cases):
        result = report("compare", size_67, candidate_with(size_67, tmp_path / str(number), change))
        assert result["summary"]["first_failure"] == stage, (says, result["summary"])
        hypotheses, messages = hints_at(result, stage)
        assert hypotheses == ["other_pooling"] and says in messages[0], (hypotheses, messages)


def test_a_hard_coded_average_pool_of_7_is_named_where_the_map_is_larger(tmp_path):
    # 256x256: layer4's map is 8x8, and AvgPool2d(7) averages its top-left
    # 7x7 (torchvision's ResNets pooled so before AdaptiveAvgPool2d).
    reference = tmp_path / "dump"
    run_dump(reference, *SMALL, "--size", 256)
    result = report("compare", reference,
                    candidate_with(reference, tmp_path, lambda model: setattr(model, "avgpool", nn.AvgPool2d(7))))
    hypotheses, messages = hints_at(result, "avgpool")
    assert hypotheses == ["other_pooling"], messages
    assert "AvgPool2d(7): the mean of the map's top-left 7x7 only, where torch averages all of its 8x8" in messages[0]


def test_each_mistake_of_an_engine_is_named_where_it_is_made(size_67, tmp_path):
    # An engine's stage is also held to its own stored inputs: two mistakes
    # far apart were one root and 160 'carried' (the second never named),
    # and a mistake next to a stage stored wrong was 'carried' from it.
    def two(model):
        with torch.no_grad():
            model.layer1[1].conv2.weight.mul_(1.05)
            model.layer3[0].conv1.weight.mul_(1.2)
    result = report("compare", size_67, candidate_with(size_67, tmp_path / "two", two))
    assert result["summary"]["root"] == "layer1.1.conv2"
    assert result["summary"]["introduced_at"] == ["layer3.0.conv1"], result["summary"]["introduced_at"]
    text = verify("compare", size_67, tmp_path / "two" / "candidate").stdout
    assert "origin: introduces error (its output is not this stage computed on the candidate's own inputs)" in text

    model, x = tolerance_study.reference_model(size_67)
    norm = model.layer2[1].bn2
    with torch.no_grad():
        weight = norm.weight.clone()
        norm.weight.copy_(norm.bias)
        norm.bias.copy_(weight)
    outputs = tolerance_study.torch_stages(model, x)
    outputs["layer2.1.conv2"] = outputs["layer2.1.conv2"] * 1.1  # computed right, stored wrong
    result = report("compare", size_67, write_candidate(size_67, tmp_path / "slip", outputs))
    assert result["summary"]["root"] == "layer2.1.conv2"
    assert result["summary"]["introduced_at"] == ["layer2.1.bn2"]
    hypotheses, _ = hints_at(result, "layer2.1.bn2")
    assert hypotheses == ["batch_norm_affine"]


def test_a_root_computed_right_from_its_own_inputs_says_its_error_grew_upstream(tmp_path):
    # eps left out of one BatchNorm passes the default rtol there; the error
    # grows and fails a correct stage further on, which was the root with
    # nothing to say.
    reference = tmp_path / "dump"
    run_dump(reference, *SMALL, "--size", 96)

    def without_eps(model):
        model.layer2[0].bn2.eps = 0.0
    result = report("compare", reference, candidate_with(reference, tmp_path, without_eps))
    root = result["summary"]["root"]
    assert root is not None and root != "layer2.0.bn2" and result["summary"]["introduced_at"] == []
    stage = next(stage for stage in result["stages"] if stage["name"] == root)
    assert any(note.startswith("computed right from the candidate's own inputs (which pass): its error grew "
                               "upstream, under tolerance there") for note in stage["notes"]), stage["notes"]
