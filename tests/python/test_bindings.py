"""The Python bindings (resnet_verify), built by scripts/test with maturin:
the same core, comparison and reports as the CLI, in-process."""

import json
import shutil
import subprocess

import numpy as np
import pytest
import torch
import torchvision

import resnet_verify as rv
from conftest import ROOT
from reference import models

FIXTURES = ROOT / "fixtures"


def test_verify_torch_on_a_live_resnet18():
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    report = rv.verify_torch(model, torch.randn(1, 3, 64, 64))
    assert report.passed, report.failures()
    assert report["summary"]["compared"] == 75
    assert report["reference_check"]["manifest_mode"] == "eval"
    assert "summary succ: 75 stages compared" in report.text
    # The bindings name stages as the dumps do.
    assert [s["name"] for s in report["stages"]][:7] == ["conv1", "bn1", "relu", "maxpool", "layer1.0.conv1", "layer1.0.bn1", "layer1.0.relu#0"]


def test_verify_torch_resnet50_every_stage_succ():
    torch.manual_seed(0)
    report = rv.verify_torch(torchvision.models.resnet50().eval(), torch.randn(1, 3, 224, 224))
    assert report.passed and report["summary"]["compared"] == 182
    # Both sides' top-5, best first, each named after its ImageNet class.
    categories = torchvision.models.ResNet50_Weights.IMAGENET1K_V1.meta["categories"]
    top5 = report["top5"]
    for side in ("reference", "candidate"):
        indices, logits = [c["index"] for c in top5[side]], [c["logit"] for c in top5[side]]
        assert len(set(indices)) == 5, side
        assert logits == sorted(logits, reverse=True), side
        assert [c["name"] for c in top5[side]] == [categories[i] for i in indices], side
    # The k-th largest of two vectors differ by no more than the vectors do
    # (the logits are float32, printed shortest: np.float32 gives them back).
    fc = next(s for s in report["stages"] if s["name"] == "fc")["cumulative"]
    for reference, candidate in zip(top5["reference"], top5["candidate"]):
        difference = abs(float(np.float32(candidate["logit"])) - float(np.float32(reference["logit"])))
        assert difference <= fc["max_abs_error"], (reference, candidate, fc["max_abs_error"])


@pytest.mark.parametrize("name", sorted(models.MODELS))
def test_verify_torch_on_every_torchvision_variant(name):
    model, _ = models.seeded(name, 0, 32)
    report = rv.verify_torch(model, torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1)), upto="layer2")
    assert report.passed, report.failures()
    assert report["stages"][-1]["name"] == "layer2"


def test_a_model_in_train_mode_is_refused_in_the_clis_words_for_a_live_model():
    model, _ = models.seeded("resnet18", 0, 32, width=8, num_classes=10)
    running_mean = model.bn1.running_mean.clone()
    with pytest.raises(rv.TrainModeError) as refused:
        rv.verify_torch(model.train(), torch.randn(2, 3, 32, 32))
    message = str(refused.value)
    cli = subprocess.run([str(ROOT / "target/release/verify"), str(FIXTURES / "resnet18-w8-train")], capture_output=True, text=True)
    # The CLI's message speaks of a dump and its flag; a live model has neither.
    assert "THE REFERENCE WAS DUMPED IN TRAIN MODE" in cli.stdout and "--allow-train-reference" in cli.stdout
    assert message.startswith("THE TORCH MODEL IS IN TRAIN MODE: every module of the torch model is in train mode.")
    assert "dumped" not in message.lower() and "--allow" not in message and "model.eval()" in message
    assert torch.equal(model.bn1.running_mean, running_mean), "the refused model must not have run"


def test_verify_matches_the_cli_json_report():
    report = rv.verify(FIXTURES / "resnext50-w8")
    cli = subprocess.run([str(ROOT / "target/release/verify"), str(FIXTURES / "resnext50-w8"), "--format", "json"],
                         capture_output=True, text=True, check=True)
    expected = json.loads(cli.stdout)
    assert report["summary"] == expected["summary"]
    assert [(s["name"], s["verdict"], s["cumulative"]["max_abs_error"]) for s in report["stages"]] == \
           [(s["name"], s["verdict"], s["cumulative"]["max_abs_error"]) for s in expected["stages"]]
    isolated = rv.verify(FIXTURES / "resnext50-w8", upto="layer1", isolate=True)
    assert isolated.passed and isolated["mode"] == "isolated" and isolated["stages"][-1]["name"] == "layer1"
    with pytest.raises(rv.TrainModeError):
        rv.verify(FIXTURES / "resnet18-w8-train")
    assert not rv.verify(FIXTURES / "resnet18-w8-train", allow_train_reference=True).passed


def test_errors_carry_the_clis_messages():
    with pytest.raises(rv.VerifyError, match="nowhere: no such directory$"):
        rv.verify(ROOT / "nowhere")
    with pytest.raises(rv.VerifyError, match="--upto layer9: no such stage"):
        rv.verify(FIXTURES / "resnet18-w8", upto="layer9")
    with pytest.raises(rv.VerifyError, match="shapes differ"):
        rv.compare(np.zeros(3), np.zeros(4))
    with pytest.raises(rv.VerifyError, match="rtol must be a finite number >= 0, not -0.001"):
        rv.compare(np.zeros(3), np.zeros(3), rtol=-1e-3)
    with pytest.raises(rv.VerifyError, match="atol must be a finite number >= 0, not NaN"):
        rv.verify(FIXTURES / "resnet18-w8", atol=float("nan"))


def test_forward_returns_nchw_stages_equal_to_the_reference():
    dump = FIXTURES / "resnet50-w8"
    manifest = json.loads((dump / "manifest.json").read_text())
    x = np.load(dump / "stages/000_input.npy")
    outputs = rv.forward(dump, x)
    assert list(outputs) == [stage["name"] for stage in manifest["stages"]]
    for stage in manifest["stages"]:
        reference = np.load(dump / stage["file"])
        assert outputs[stage["name"]].shape == reference.shape
        assert rv.compare(reference, outputs[stage["name"]])["verdict"] == "succ", stage["name"]
    upto = rv.forward(dump, x, upto="layer2.0")
    assert list(upto)[-1] == "layer2.0"
    # The same from a torch model, and from a dict of arrays with its architecture.
    model, architecture = models.seeded("resnet18", 0, 32, width=8, num_classes=10)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        logits = model(x).numpy()
    assert rv.compare(logits, rv.forward(model, x)["fc"])["verdict"] == "succ"
    weights = {k: v.numpy() for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert rv.compare(logits, rv.forward(weights, x.numpy(), architecture=architecture)["fc"])["verdict"] == "succ"


@pytest.mark.parametrize("ref, cand, says", [
    (np.array([1 + 1j]), np.array([1 + 2j]), "ref: complex values (complex128)"),
    (np.array([1.0, 1e300]), np.array([1.0, 2e300]), "ref: 1 float64 value(s) float32 cannot hold, e.g. 1e+300 at (1,): "
                                                     "beyond float32's range"),
    (np.array([1.0, 2.0]), np.array([3e-50, 2.0]), "cand: 1 float64 value(s) float32 cannot hold, e.g. 3e-50 at (0,): "
                                                   "nonzero but below float32's smallest"),
    (np.array([16777217]), np.array([16777216]), "ref: 1 int64 value(s) float32 cannot hold, e.g. 16777217 at (0,)"),
    (np.array(["a"]), np.array(["a"]), "ref: <U1 values are not numbers"),
])
def test_compare_refuses_values_float32_would_change_into_equal_ones(ref, cand, says):
    # Each pair differs, and narrowed to float32 each compared as equal.
    with pytest.raises(rv.VerifyError) as refused:
        rv.compare(ref, cand)
    assert str(refused.value).startswith(says), str(refused.value)


def test_compare_takes_what_float32_holds_in_any_dtype():
    assert rv.compare(np.array([1.0, 2.5]), np.array([1.0, 2.5]))["verdict"] == "succ"
    assert rv.compare(np.arange(4, dtype=np.int64), np.arange(4, dtype=np.uint8))["verdict"] == "succ"
    assert rv.compare(torch.tensor([1.5, -2.0], dtype=torch.bfloat16), np.array([1.5, -2.0]))["verdict"] == "succ"
    assert rv.compare(np.array([1.0, np.nan, np.inf]), np.array([1.0, np.nan, np.inf]),
                      equal_nan=True)["verdict"] == "succ"


def test_compare_gives_the_clis_metrics():
    reference = np.arange(24, dtype=np.float32).reshape(1, 2, 3, 4)
    candidate = reference.copy()
    candidate[0, 1, 2, 3] += 1.0
    result = rv.compare(reference, candidate)
    assert result["verdict"] == "fail" and result["mismatched"] == 1
    assert result["worst"] == {"index": [0, 1, 2, 3], "reference": 23.0, "candidate": 24.0}
    assert result["relative_error"] == pytest.approx(1 / 23)
    assert rv.compare(reference, candidate, atol=1.0)["verdict"] == "succ"
    # Strided input is read as what it means.
    assert rv.compare(reference.transpose(0, 1, 3, 2), reference.transpose(0, 1, 3, 2).copy())["verdict"] == "succ"


def test_forward_carries_a_nan_where_torch_does():
    # torch's ReLU keeps NaN; a core whose ReLU gave 0 returned finite
    # logits for an input torch turns into NaN logits.
    from reference import hooks

    model, _ = models.seeded("resnet18", 0, 32, width=8, num_classes=10)
    for poison in (float("nan"), float("inf")):
        x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
        x[0, 0, 5, 5] = poison
        outputs = rv.forward(model, x)
        with torch.no_grad():
            recorded, _ = hooks.stages(model, x)
        for stage in recorded:
            expected = stage["output"].numpy()
            got = outputs[stage["name"]]
            assert np.array_equal(np.isnan(expected), np.isnan(got)), (poison, stage["name"])
            assert np.array_equal(np.isinf(expected), np.isinf(got)), (poison, stage["name"])
        assert np.isnan(outputs["fc"]).all()


def test_a_wrong_input_is_described_in_the_callers_nchw_terms():
    model, _ = models.seeded("resnet18", 0, 32, width=8, num_classes=10)
    with pytest.raises(rv.VerifyError, match=r"x has shape \[1, 32, 32, 3\]: the network takes NCHW \[N, 3, H, W\], "
                                             r"N, H and W at least 1 \(NHWC\? numpy: x.transpose\(0, 3, 1, 2\)"):
        rv.forward(model, np.zeros((1, 32, 32, 3), np.float32))
    with pytest.raises(rv.VerifyError, match=r"x has shape \[0, 3, 32, 32\]: the network takes NCHW"):
        rv.forward(model, np.zeros((0, 3, 32, 32), np.float32))
    with pytest.raises(rv.VerifyError, match=r"x must be NCHW \(4-D\), got shape \[3, 32, 32\]"):
        rv.verify_torch(model, torch.zeros(3, 32, 32))
    # torch refuses a float64 or integer x for a float32 model; verify_torch
    # once passed model(x.float()) for it without a word.
    for dtype in (torch.float64, torch.int64, torch.bfloat16):
        with pytest.raises(rv.VerifyError, match=rf"x: a {dtype} tensor, where the model's weights are float32"):
            rv.verify_torch(model, torch.zeros(1, 3, 32, 32, dtype=dtype))
    # torch's own refusal, once a raw RuntimeError.
    with pytest.raises(rv.VerifyError, match=r"torch could not run the model on x of shape \[1, 1, 32, 32\]: "):
        rv.verify_torch(model, torch.zeros(1, 1, 32, 32))


def test_a_hint_that_computes_what_torch_computes_accuses_nobody(tmp_path):
    # An untrained model's BatchNorms (mean 0, var 1, weight 1, bias 0):
    # 'weight missing', 'bias missing' and 'var used as std' compute the
    # correct BatchNorm there, and once said the (correct) reference
    # matched them. The candidate's own mistake is a channel scaled.
    from reference import dump, models as reference_models, preprocess

    model, architecture = reference_models.build("resnet18", width=8, num_classes=10)
    x, description = preprocess.make_input("random", 32, 1, 0)
    reference = tmp_path / "untrained"
    dump.write(reference, model.eval(), architecture, x, model_name="resnet18",
               weights_description={"source": "seeded"}, input_description=description)
    candidate = tmp_path / "candidate"
    shutil.copytree(reference, candidate)
    manifest = json.loads((candidate / "manifest.json").read_text())
    file = candidate / next(s["file"] for s in manifest["stages"] if s["name"] == "layer1.0.bn1")
    values = np.load(file)
    values[:, 3] *= 1.5
    np.save(file, values)
    result = subprocess.run([str(ROOT / "target/release/verify"), "compare", str(reference), str(candidate),
                             "--format", "json"], capture_output=True, text=True)
    report = json.loads(result.stdout)
    assert report["summary"]["first_failure"] == "layer1.0.bn1"
    hints = [hint["message"] for stage in report["stages"] for hint in stage["hints"]]
    assert not [hint for hint in hints if hint.startswith("the reference")], hints


def test_forward_refuses_a_dump_of_a_model_the_core_does_not_build(tmp_path):
    # A dump written elsewhere of a resnet18 whose stem ReLU is a ReLU6: the
    # core would build a ReLU and return another network's numbers.
    dump = tmp_path / "relu6"
    shutil.copytree(FIXTURES / "resnet18-w8", dump)
    manifest = json.loads((dump / "manifest.json").read_text())
    next(s for s in manifest["stages"] if s["name"] == "relu")["module_type"] = "ReLU6"
    (dump / "manifest.json").write_text(json.dumps(manifest))
    x = np.load(FIXTURES / "resnet18-w8" / "stages" / "000_input.npy")
    with pytest.raises(rv.VerifyError, match="`relu` is a ReLU6 in the reference; the core builds ReLU"):
        rv.forward(dump, x)
    with pytest.raises(rv.VerifyError, match="`relu` is a ReLU6 in the reference"):
        rv.verify(dump)
    assert set(rv.forward(FIXTURES / "resnet18-w8", x, upto="relu")) >= {"conv1", "bn1", "relu"}


def test_an_architecture_with_a_nan_is_refused_by_name():
    architecture = dict(json.loads((FIXTURES / "resnet18-w8" / "manifest.json").read_text())["architecture"],
                        batch_norm_eps=float("nan"))
    with pytest.raises(rv.VerifyError, match=r"^architecture: .* \(every figure must be a finite number\)$"):
        rv.forward({}, np.zeros((1, 3, 32, 32), np.float32), architecture=architecture)
