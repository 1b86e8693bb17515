"""The reference dumps: complete, valid against the documented schema,
reproducible, honest about train mode."""

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import numpy as np
import pytest

from conftest import ROOT, run_dump, run_verify
from reference import models

SCHEMA = json.loads((ROOT / "docs" / "dump-format.schema.json").read_text())


def checksums(directory):
    return {
        str(path.relative_to(directory)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(Path(directory).rglob("*")) if path.is_file()
    }


@pytest.mark.parametrize("model", sorted(models.MODELS))
def test_every_torchvision_resnet_dumps_a_valid_manifest(tmp_path, model):
    manifest = run_dump(tmp_path / model, "--model", model, "--size", 32, "--image", "random", "--threads", 2)
    jsonschema.validate(manifest, SCHEMA)
    assert manifest["model"]["name"] == model
    assert manifest["mode"] == "eval"
    names = [stage["name"] for stage in manifest["stages"]]
    assert len(names) == len(set(names))
    assert names[0] == "input" and names[-2:] == ["avgpool", "fc"]
    # Every listed file exists, with the listed shape and dtype.
    for entry in manifest["stages"] + manifest["weights"]:
        array = np.load(tmp_path / model / entry["file"], mmap_mode="r")
        assert list(array.shape) == entry["shape"], entry["name"]
        assert array.dtype == np.float32
    weight_names = {weight["name"] for weight in manifest["weights"]}
    assert "conv1.weight" in weight_names and "layer1.0.bn1.running_var" in weight_names
    assert not any(name.endswith("num_batches_tracked") for name in weight_names)
    # Conv weights are stored in torch's OIHW layout.
    conv1 = next(w for w in manifest["weights"] if w["name"] == "conv1.weight")
    assert conv1["shape"] == [64, 3, 7, 7]
    # The top-5 are the five largest of the first batch item's fc outputs,
    # best first, each named after its ImageNet class.
    assert len(manifest["classes"]) == 1000
    fc = np.load(tmp_path / model / manifest["stages"][-1]["file"])[0]
    top = manifest["top5"][0]
    indices, logits = [entry["index"] for entry in top], [entry["logit"] for entry in top]
    assert len(set(indices)) == 5
    assert logits == sorted(logits, reverse=True)
    assert logits == [float(fc[index]) for index in indices]
    assert [entry["name"] for entry in top] == [manifest["classes"][index] for index in indices]
    assert logits[-1] >= np.delete(fc, indices).max()


# (options, what the manifest's architecture says, the last stage names)
OPTIONS = [
    (["--model", "resnet50", "--replace-stride-with-dilation", "F,T,T"],
     {"replace_stride_with_dilation": [False, True, True]}, ["avgpool", "fc"]),
    (["--model", "resnet101", "--replace-stride-with-dilation", "false,false,true"],
     {"replace_stride_with_dilation": [False, False, True]}, ["avgpool", "fc"]),
    (["--model", "resnet50", "--norm-layer", "FrozenBatchNorm2d"],
     {"norm_layer": "FrozenBatchNorm2d"}, ["avgpool", "fc"]),
    (["--model", "resnet18", "--head", "dropout_linear"], {"head": "dropout_linear"}, ["fc.0", "fc.1", "fc"]),
    (["--model", "resnet18", "--head", "identity"], {"head": "identity", "num_classes": 0}, ["avgpool", "fc"]),
    (["--model", "resnext50_32x4d", "--groups", "4", "--width-per-group", "32", "--head", "none", "--norm-layer", "FrozenBatchNorm2d",
      "--replace-stride-with-dilation", "F,T,T"],
     {"head": "none", "norm_layer": "FrozenBatchNorm2d", "replace_stride_with_dilation": [False, True, True]},
     ["layer4.2", "layer4"]),
]


@pytest.mark.parametrize("options, architecture, last", OPTIONS, ids=[" ".join(case[0][1:]) for case in OPTIONS])
def test_constructor_options_dump_and_verify_all_succ(tmp_path, options, architecture, last):
    """The options users pass to torchvision's constructors, and the models
    they make of them, dumped and verified by the CLI at 64x64: dilated
    layers keep their map size, and every stage is succ."""
    out = tmp_path / "dump"
    manifest = run_dump(out, *options, "--width", 8, "--size", 64, "--image", "random", "--threads", 2)
    jsonschema.validate(manifest, SCHEMA)
    assert architecture.items() <= manifest["architecture"].items()
    names = [stage["name"] for stage in manifest["stages"]]
    assert names[-len(last):] == last
    assert ("top5" in manifest) == (manifest["architecture"].get("head", "linear") in ("linear", "dropout_linear"))
    shapes = {stage["name"]: stage["shape"] for stage in manifest["stages"]}
    dilated = manifest["architecture"].get("replace_stride_with_dilation", [False] * 3)
    assert shapes["layer4"][2:] == [{0: 2, 1: 4, 2: 8}[sum(dilated)]] * 2
    report = subprocess.run([str(ROOT / "target/release/verify"), str(out), "--format", "json"],
                            capture_output=True, text=True)
    assert report.returncode == 0, report.stdout[-2000:] + report.stderr
    summary = json.loads(report.stdout)["summary"]
    assert summary["compared"] == len(names) - 1 and summary["fail"] == 0


def test_bottleneck_relu_calls_are_named_and_blocks_follow_children(dump):
    manifest, _ = dump("r50", "--model", "resnet50", "--width", 8, "--size", 32)
    names = [stage["name"] for stage in manifest["stages"]]
    block = names[names.index("layer1.0.conv1"):names.index("layer1.0") + 1]
    assert block == [
        "layer1.0.conv1", "layer1.0.bn1", "layer1.0.relu#0", "layer1.0.conv2", "layer1.0.bn2", "layer1.0.relu#1",
        "layer1.0.conv3", "layer1.0.bn3", "layer1.0.downsample.0", "layer1.0.downsample.1", "layer1.0.downsample",
        "layer1.0.relu#2", "layer1.0",
    ]
    relu = manifest["stages"][names.index("layer1.0.relu#2")]
    assert (relu["module_path"], relu["call_index"], relu["block"], relu["layer"]) == ("layer1.0.relu", 2, "layer1.0", "layer1")
    conv2 = manifest["stages"][names.index("layer2.0.conv2")]["params"]
    assert (conv2["kernel_size"], conv2["stride"], conv2["padding"], conv2["groups"]) == ([3, 3], [2, 2], [1, 1], 1)
    assert len(names) == 183


def test_batch_norm_outputs_keep_their_negative_values(dump):
    """torchvision's ReLUs are in place: a hook that kept a reference to a
    BatchNorm output would see it overwritten with max(0, x)."""
    manifest, out = dump("r18", "--model", "resnet18", "--width", 8, "--size", 32)
    for stage in manifest["stages"]:
        if stage["module_type"] == "BatchNorm2d":
            assert (np.load(out / stage["file"]) < 0).any(), stage["name"]
    relus = [s for s in manifest["stages"] if s["module_type"] == "ReLU"]
    assert all((np.load(out / s["file"]) >= 0).all() for s in relus)


def test_bottleneck_bn3_is_copied_before_the_residual_add(dump):
    manifest, out = dump("r50", "--model", "resnet50", "--width", 8, "--size", 32)
    by_name = {stage["name"]: np.load(out / stage["file"]) for stage in manifest["stages"]}
    bn3, identity, relu = by_name["layer1.1.bn3"], by_name["layer1.0"], by_name["layer1.1.relu#2"]
    np.testing.assert_allclose(np.maximum(bn3 + identity, 0), relu, rtol=1e-6, atol=1e-6, equal_nan=False)
    assert (bn3 < 0).any()


def test_same_seed_same_bytes(tmp_path):
    arguments = ("--model", "resnext50_32x4d", "--width", 8, "--groups", 4, "--width-per-group", 32, "--size", 32)
    run_dump(tmp_path / "a", *arguments)
    run_dump(tmp_path / "b", *arguments)
    assert checksums(tmp_path / "a") == checksums(tmp_path / "b")
    run_dump(tmp_path / "c", *arguments, "--seed", 1)
    assert checksums(tmp_path / "a") != checksums(tmp_path / "c")


def test_train_mode_is_recorded_and_changes_the_outputs(dump):
    eval_manifest, eval_out = dump("eval", "--model", "resnet18", "--width", 8, "--size", 64)
    train_manifest, train_out = dump("train", "--model", "resnet18", "--width", 8, "--size", 64, "--train-mode")
    assert (eval_manifest["mode"], train_manifest["mode"]) == ("eval", "train")
    # Same weights (saved before the train-mode pass could update them) ...
    weights = [w["file"] for w in eval_manifest["weights"]]
    assert all((np.load(eval_out / f) == np.load(train_out / f)).all() for f in weights)
    # ... but the BatchNorm outputs differ, and in train mode they are batch-normalised.
    bn1 = next(s for s in train_manifest["stages"] if s["name"] == "bn1")
    train_bn1, eval_bn1 = np.load(train_out / bn1["file"]), np.load(eval_out / bn1["file"])
    assert np.abs(train_bn1 - eval_bn1).max() > 1e-2
    weight = np.load(train_out / "weights/bn1.weight.npy")
    bias = np.load(train_out / "weights/bn1.bias.npy")
    np.testing.assert_allclose(train_bn1.mean(axis=(0, 2, 3)), bias, atol=1e-4)
    np.testing.assert_allclose(train_bn1.std(axis=(0, 2, 3)), np.abs(weight), rtol=1e-3)


def test_preprocessing_is_torchvisions_imagenet_pipeline(dump):
    manifest, out = dump("cat", "--model", "resnet18", "--width", 8, "--size", 224, "--num-classes", 10)
    x = np.load(out / "stages/000_input.npy")
    assert x.shape == (1, 3, 224, 224)
    assert manifest["input"]["resize"] == 256 and manifest["input"]["mean"] == [0.485, 0.456, 0.406]
    from PIL import Image
    from skimage import data
    from torchvision import transforms
    expected = transforms.Compose([
        transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(),
        transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
    ])(Image.fromarray(data.chelsea()))
    np.testing.assert_array_equal(x[0], expected.numpy())


def test_checkpoint_weights_are_used_as_given(tmp_path):
    import torch
    model, _ = models.build("resnet18")
    torch.nn.init.constant_(model.fc.bias, 0.5)
    torch.save(model.state_dict(), tmp_path / "resnet18.pth")
    manifest = run_dump(tmp_path / "dump", "--model", "resnet18", "--weights", tmp_path / "resnet18.pth", "--size", 32)
    assert manifest["model"]["weights"]["source"] == "file"
    np.testing.assert_array_equal(np.load(tmp_path / "dump/weights/fc.bias.npy"), np.full(1000, 0.5, np.float32))
    wrong = subprocess.run([sys.executable, "-m", "reference.dump", "--model", "resnet50",
                            "--weights", str(tmp_path / "resnet18.pth"), "--out", str(tmp_path / "wrong")],
                           cwd=ROOT, capture_output=True, text=True)
    assert wrong.returncode != 0 and "not a resnet50 state_dict" in wrong.stderr


def test_checkpoints_saved_with_a_head_are_dumped_with_it(tmp_path):
    # A checkpoint of a fine-tuned model (fc = Sequential(Dropout, Linear):
    # fc.1.*) or of a feature extractor (no fc) was loaded into the stock
    # classifier before --head was put on, and refused for its keys.
    import torch
    from torch import nn
    model, _ = models.build("resnet18", width=8, num_classes=10)
    model.fc = nn.Sequential(nn.Dropout(0.5), model.fc)
    torch.nn.init.constant_(model.fc[1].bias, 0.5)
    torch.save(model.state_dict(), tmp_path / "fine-tuned.pth")
    manifest = run_dump(tmp_path / "fine-tuned", "--model", "resnet18", "--width", 8, "--size", 32,
                        "--weights", tmp_path / "fine-tuned.pth", "--head", "dropout_linear")
    assert manifest["architecture"]["head"] == "dropout_linear" and manifest["architecture"]["num_classes"] == 10
    np.testing.assert_array_equal(np.load(tmp_path / "fine-tuned/weights/fc.1.bias.npy"), np.full(10, 0.5, np.float32))
    model.fc = nn.Identity()
    torch.save(model.state_dict(), tmp_path / "features.pth")
    plain = subprocess.run([sys.executable, "-m", "reference.dump", "--model", "resnet18", "--width", "8",
                            "--weights", str(tmp_path / "fine-tuned.pth"), "--out", str(tmp_path / "plain")],
                           cwd=ROOT, capture_output=True, text=True)
    assert plain.returncode != 0 and "a fine-tuned fc.1.* takes --head dropout_linear" in plain.stderr
    for head in ("identity", "none"):
        manifest = run_dump(tmp_path / head, "--model", "resnet18", "--width", 8, "--size", 32,
                            "--weights", tmp_path / "features.pth", "--head", head)
        assert manifest["architecture"]["head"] == head
        assert run_verify(tmp_path / head).returncode == 0
    # torchvision's classifier with another head: the head is put on after.
    del model.fc
    model.fc = nn.Linear(64, 10)
    torch.save(model.state_dict(), tmp_path / "classifier.pth")
    manifest = run_dump(tmp_path / "cut", "--model", "resnet18", "--width", 8, "--size", 32,
                        "--weights", tmp_path / "classifier.pth", "--head", "none")
    assert manifest["architecture"]["head"] == "none"
    assert run_verify(tmp_path / "cut").returncode == 0


def test_refuses_to_overwrite_a_directory_that_is_not_a_dump(tmp_path):
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "thesis.tex").write_text("...")
    result = subprocess.run([sys.executable, "-m", "reference.dump", "--model", "resnet18", "--out", str(tmp_path / "precious")],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode != 0 and "not a dump" in result.stderr
    assert (tmp_path / "precious" / "thesis.tex").read_text() == "..."
    assert [p.name for p in (tmp_path / "precious").iterdir()] == ["thesis.tex"]


def test_a_model_that_computes_after_its_last_module_is_not_dumped(tmp_path):
    """What the model returns must be its last stage's value, or the stages
    describe another network than the one the model is."""
    import torch
    from torchvision.models import resnet as tv

    from reference import dump, preprocess

    class Doubled(tv.ResNet):
        def forward(self, x):
            return super().forward(x) * 2

    model, architecture = models.build("resnet18", width=8, num_classes=10)
    model.__class__ = Doubled
    x, description = preprocess.make_input("random", 32, 1, 0)
    with pytest.raises(models.Unsupported, match=r"returns something other than its last stage \(fc\)"):
        dump.write(tmp_path / "dump", model.eval(), architecture, x, model_name="resnet18",
                   weights_description={"source": "seeded"}, input_description=description)
    assert not (tmp_path / "dump").exists(), "no half-written dump is left"
    # A model whose output is NaN returns its last stage all the same.
    model.__class__ = tv.ResNet
    with torch.no_grad():
        model.fc.bias.fill_(float("nan"))
    dump.write(tmp_path / "nan", model.eval(), architecture, x, model_name="resnet18",
               weights_description={"source": "seeded"}, input_description=description)
    assert (tmp_path / "nan" / "manifest.json").exists()


def test_a_run_with_nan_is_dumped_as_json_that_verify_reads_and_said_where_it_started(tmp_path, capsys):
    # A checkpoint with a negative running_var: NaN from that BatchNorm on.
    # The manifest once held bare NaN logits in top5, which no JSON reader
    # takes ('malformed JSON' at a line and column, from verify).
    import torch

    from reference import dump, preprocess

    model, architecture = models.build("resnet18", width=8, num_classes=10)
    with torch.no_grad():
        model.layer1[0].bn1.running_var[:2] = -0.5
    x, description = preprocess.make_input("random", 32, 1, 0)
    dump.write(tmp_path / "nan", model.eval(), architecture, x, model_name="resnet18",
               weights_description={"source": "seeded"}, input_description=description)
    warning = capsys.readouterr().err
    assert "warning: stage `layer1.0.bn1` (BatchNorm2d) is the first with non-finite values: 128 NaN and 0 infinite" \
        in warning, warning
    manifest = json.loads((tmp_path / "nan" / "manifest.json").read_text(),
                          parse_constant=lambda name: pytest.fail(f"bare {name} in the manifest"))
    assert "top5" not in manifest
    assert run_verify(tmp_path / "nan", "--equal-nan").returncode == 0
    assert run_verify(tmp_path / "nan").returncode == 1, "NaN matches NaN only with --equal-nan"
    # The core is right: stages that differ only where both are NaN leave
    # nothing for a hypothesis, and every exact one once 'explained' them.
    for mode in ([], ["--isolate"]):
        report = json.loads(run_verify(tmp_path / "nan", *mode, "--format", "json").stdout)
        assert [stage["hints"] for stage in report["stages"] if stage["hints"]] == [], mode
    with pytest.raises(models.Unsupported, match=r"--floor: stage `layer1.0.bn1` \(BatchNorm2d\) is the first"):
        dump.write(tmp_path / "floor", model.eval(), architecture, x, model_name="resnet18",
                   weights_description={"source": "seeded"}, input_description=description, floor=True)
    assert not (tmp_path / "floor").exists()


@pytest.mark.parametrize("arguments, says", [
    (["--weights", "{tmp}/nowhere.pth"], "--weights {tmp}/nowhere.pth: No such file or directory"),
    (["--weights", "{tmp}"], "--weights {tmp}: Is a directory"),
    (["--weights", "{tmp}/notes.txt"], "--weights {tmp}/notes.txt: not a checkpoint that torch.load(weights_only=True) reads"),
    (["--width-per-group", "0"], "argument --width-per-group: must be at least 1, not 0"),
    (["--model", "resnext50_32x4d", "--width", "8", "--groups", "4", "--width-per-group", "4"],
     "layer1's 3x3 convs would have no channels"),
    (["--groups", "2"], "resnet18 with groups=2: torchvision refuses it: BasicBlock only supports groups=1"),
    # Once tracebacks: torch's seed overflow, set_num_threads, a BatchNorm
    # in train mode over a 1x1 map.
    (["--seed", "99999999999999999999"], "a seed is a whole number from 0 to 2^63 - 1"),
    (["--threads", "-1"], "argument --threads: must be at least 1, not -1"),
    (["--width", "8", "--size", "1", "--train-mode"],
     "torch could not run resnet18 on the input [1, 3, 1, 1] in train mode: Expected more than 1 value per channel"),
])
def test_bad_options_are_refused_in_a_sentence_not_a_traceback(tmp_path, arguments, says):
    """The option named, and what is wrong with it; exit status not 0."""
    (tmp_path / "notes.txt").write_text("not weights")
    arguments = [argument.format(tmp=tmp_path) for argument in arguments]
    if "--model" not in arguments:
        arguments = ["--model", "resnet18", *arguments]
    result = subprocess.run([sys.executable, "-m", "reference.dump", "--size", "32", "--out", str(tmp_path / "dump"),
                             *arguments], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode != 0
    assert says.format(tmp=tmp_path) in result.stderr, result.stderr
    assert "Traceback" not in result.stderr, result.stderr


def test_a_dump_torch_cannot_run_leaves_the_dump_there_alone(tmp_path):
    run_dump(tmp_path / "dump", "--model", "resnet18", "--width", 8, "--size", 1)
    before = sorted(path.name for path in (tmp_path / "dump").rglob("*"))
    with pytest.raises(SystemExit, match="torch could not run resnet18 on the input"):
        run_dump(tmp_path / "dump", "--model", "resnet18", "--width", 8, "--size", 1, "--train-mode")
    # Once deleted, and a weights-only directory left that blocked the next run.
    assert sorted(path.name for path in (tmp_path / "dump").rglob("*")) == before


def test_images_the_loader_would_clip_are_refused_and_a_file_wins_over_a_sample_name(tmp_path, monkeypatch):
    from PIL import Image
    gray = (np.arange(64 * 64).reshape(64, 64) % 251).astype(np.uint16)
    # PIL's convert("RGB") clips these: a white frame, a black one.
    Image.fromarray(gray * 257).save(tmp_path / "wide.png")
    Image.fromarray((gray / 255).astype(np.float32)).save(tmp_path / "float.tiff")
    for name, kind in (("wide.png", "a 16-bit image (PIL mode I;16)"), ("float.tiff", "a 32-bit float image")):
        with pytest.raises(SystemExit, match=rf"--image .*{name}: {re.escape(kind)}.*clipped to a white or black"):
            run_dump(tmp_path / f"{name}-dump", "--model", "resnet18", "--width", 8, "--size", 32, "--image", tmp_path / name)
    # A file named as a scikit-image sample is the file.
    Image.fromarray(np.full((40, 40, 3), 200, np.uint8)).save(tmp_path / "coins", format="PNG")
    monkeypatch.chdir(tmp_path)
    run_dump(tmp_path / "coins-dump", "--model", "resnet18", "--width", 8, "--size", 32, "--image", "coins")
    pixels = np.load(tmp_path / "coins-dump" / "stages" / "000_input.npy")
    assert np.allclose(pixels[0, 0], (200 / 255 - 0.485) / 0.229), "the file, not the sample"
    # An image over PIL's pixel limit is said, not a traceback.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(SystemExit, match=r"--image .*coins: cannot read the image: Image size \(1600 pixels\) exceeds"):
        run_dump(tmp_path / "bomb", "--model", "resnet18", "--width", 8, "--size", 32, "--image", tmp_path / "coins")


def test_a_refusal_after_the_run_is_a_sentence_not_a_traceback(tmp_path):
    # --floor on a checkpoint whose logits overflow: models.Unsupported was
    # raised out of main as a traceback.
    import torch
    model, _ = models.build("resnet18", width=8, num_classes=10)
    with torch.no_grad():
        model.fc.weight.fill_(3e38)
        model.fc.bias.fill_(3e38)
    torch.save(model.state_dict(), tmp_path / "huge.pth")
    result = subprocess.run([sys.executable, "-m", "reference.dump", "--model", "resnet18", "--width", "8",
                             "--size", "32", "--weights", str(tmp_path / "huge.pth"), "--floor",
                             "--out", str(tmp_path / "dump")], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    assert f"{tmp_path / 'dump'}: not dumped: --floor: stage `fc`" in result.stderr, result.stderr
    assert not (tmp_path / "dump").exists()
