"""`verify repro` and `verify case`: a failing stage handed over as a bundle
whose own test_repro.py passes its torch check and fails its candidate check
under pytest, for the bug classes of docs/tolerance.md; --shrink cuts it to
the worst element's receptive field and it still fails."""

import json
import subprocess
import sys
import types

import pytest

from conftest import ROOT, run_dump, run_verify as verify
from reference import tolerance_study

SMALL = ("--model", "resnet50", "--width", "8", "--size", "64", "--threads", "1")



def pytest_bundle(bundle):
    """The bundle's own tests, as its receiver runs them: {test name: passed}."""
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", "test_repro.py"],
                            cwd=bundle, capture_output=True, text=True)
    outcomes = {}
    for line in result.stdout.splitlines():
        for word in ("PASSED", "FAILED"):
            if line.startswith(word + " "):
                outcomes[line.split("::")[-1].split(" ")[0]] = word == "PASSED"
    return outcomes, result.stdout


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("repro") / "reference"
    run_dump(out, *SMALL)
    return out


def without_residual(model):
    """layer2.1 adds no identity: relu(bn3(...)) instead of relu(bn3(...) + x)."""
    block = model.get_submodule("layer2.1")

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)))
    block.forward = types.MethodType(forward, block)


def candidate(reference, out, change):
    model, x = tolerance_study.reference_model(reference)
    change(model)
    tolerance_study.write_candidate(reference, out, tolerance_study.torch_stages(model, x))
    return out


def check_bundle(bundle, stage, hypothesis_words):
    case = json.loads((bundle / "case.json").read_text())
    assert case["stage"] == stage and case["verdict"]["verdict"] == "fail"
    assert any(hypothesis_words in hint for hint in case["hints"]), case["hints"]
    outcomes, output = pytest_bundle(bundle)
    assert outcomes == {"test_the_reference_is_what_torch_computes": True,
                        "test_the_candidate_matches_the_reference": False}, output
    assert f"{stage}: " in output and "out of tolerance" in output
    return case


@pytest.mark.parametrize("name, change, stage, words", [
    ("weight-order", tolerance_study.wrong_weight_layout, "conv1", "read as OHWI"),
    ("missing-residual", without_residual, "layer2.1.relu#2", "the residual add is missing"),
])
def test_a_bundle_of_another_engines_failure_runs_as_verify_judged(reference, tmp_path, name, change, stage, words):
    engine = candidate(reference, tmp_path / name, change)
    bundle = tmp_path / "bundle"
    written = verify("repro", "compare", reference, engine, "--out", bundle)
    assert written.returncode == 0, written.stderr
    assert f"wrote {bundle}: stage {stage}" in written.stdout
    case = check_bundle(bundle, stage, words)
    readme = (bundle / "README.md").read_text()
    assert f"# {stage}: fail" in readme and "pytest test_repro.py" in readme
    # verify case: the core computes the stage right; the stored candidate
    # fails as verify said.
    rerun = verify("case", bundle)
    assert rerun.returncode == 0, rerun.stdout
    assert "the core: succ" in rerun.stdout
    v = case["verdict"]
    assert f"the stored candidate: fail ({v['mismatched']} of {v['elements']} elements" in rerun.stdout

    shrunk = tmp_path / "shrunk"
    assert verify("repro", "compare", reference, engine, "--out", shrunk, "--shrink").returncode == 0
    size = lambda directory: sum(f.stat().st_size for f in directory.rglob("*.npy"))
    assert size(shrunk) < size(bundle) / 10
    cut = check_bundle(shrunk, stage, words)
    assert cut["shrunk"].startswith("shrunk to the worst element's receptive field")
    assert verify("case", shrunk).returncode == 0


def test_a_bundle_of_the_cores_failure_fails_the_core_again(reference, tmp_path):
    # The dump says eps 1e-3, the stored stages were made with 1e-5: the
    # core, which follows the dump, fails at bn1.
    dump = tmp_path / "eps"
    subprocess.run(["cp", "-r", str(reference), str(dump)], check=True)
    manifest = json.loads((dump / "manifest.json").read_text())
    manifest["architecture"]["batch_norm_eps"] = 1e-3
    (dump / "manifest.json").write_text(json.dumps(manifest))
    bundle = tmp_path / "bundle"
    assert verify("repro", dump, "--out", bundle).returncode == 0
    case = check_bundle(bundle, "bn1", "eps")
    assert case["core"] == {"op": "batch_norm", "eps": 1e-3} and case["params"]["eps"] == 1e-5
    rerun = verify("case", bundle)
    assert rerun.returncode == 1 and "the core: fail" in rerun.stdout
    shrunk = tmp_path / "shrunk"
    assert verify("repro", dump, "--out", shrunk, "--shrink").returncode == 0
    check_bundle(shrunk, "bn1", "eps")
    assert verify("case", shrunk).returncode == 1


def test_a_bundle_of_a_nan_failure_reads_back_and_runs(reference, tmp_path):
    # An engine that wrote one NaN: case.json writes its infinite error as
    # null (JSON has no inf), which verify case and the bundle's tests once
    # could not read or format.
    import numpy as np

    engine = candidate(reference, tmp_path / "engine", lambda model: None)
    manifest = json.loads((engine / "manifest.json").read_text())
    conv1 = engine / next(s["file"] for s in manifest["stages"] if s["name"] == "conv1")
    values = np.load(conv1)
    values.flat[5] = np.nan
    np.save(conv1, values)
    bundle = tmp_path / "bundle"
    assert verify("repro", "compare", reference, engine, "--out", bundle).returncode == 0
    case = json.loads((bundle / "case.json").read_text())
    assert case["stage"] == "conv1" and case["verdict"]["max_abs_error"] is None
    rerun = verify("case", bundle)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "the stored candidate: fail (1 of" in rerun.stdout and "max abs error inf" in rerun.stdout
    outcomes, output = pytest_bundle(bundle)
    assert outcomes == {"test_the_reference_is_what_torch_computes": True,
                        "test_the_candidate_matches_the_reference": False}, output
    assert "conv1: 1 of " in output and "max abs error inf" in output


def test_bad_requests_write_nothing(reference, tmp_path):
    engine = candidate(reference, tmp_path / "engine", tolerance_study.wrong_weight_layout)
    missing = verify("repro", "compare", reference, engine, "--out", tmp_path / "a", "--stage", "layer1.0.conv9")
    assert missing.returncode == 2 and "--stage layer1.0.conv9: no such stage" in missing.stderr
    assert "did you mean layer1.0.conv1" in missing.stderr and not (tmp_path / "a").exists()
    # A stage that passes: said, exit 0, nothing written unless --force.
    passing = verify("repro", reference, "--out", tmp_path / "b", "--stage", "layer1.0.conv1")
    assert passing.returncode == 0 and "stage layer1.0.conv1 passes: nothing written" in passing.stdout
    assert not (tmp_path / "b").exists()
    everything = verify("repro", reference, "--out", tmp_path / "b")
    assert everything.returncode == 0 and "nothing to hand over" in everything.stdout
    forced = verify("repro", reference, "--out", tmp_path / "b", "--stage", "layer1.0.conv2", "--force", "--shrink")
    assert forced.returncode == 0 and (tmp_path / "b" / "case.json").exists()
    # Nothing to cut to: the whole stage, and a bundle that still holds together.
    case = json.loads((tmp_path / "b" / "case.json").read_text())
    assert case["shrunk"].startswith("not shrunk (no element is out of tolerance)")
    assert case["params"]["padding"] == [1, 1] and case["core"]["padding"] == [1, 1]
    outcomes, output = pytest_bundle(tmp_path / "b")
    assert all(outcomes.values()) and len(outcomes) == 2, output
    assert verify("case", tmp_path / "b").returncode == 0
    item = verify("repro", reference, "--out", tmp_path / "d", "--item", "0")
    assert item.returncode == 2 and "--item does not apply" in item.stderr
    # An output directory that holds something is left alone.
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("mine")
    refused = verify("repro", "compare", reference, engine, "--out", occupied)
    assert refused.returncode == 2 and "exists and is not empty" in refused.stderr
    assert [path.name for path in occupied.iterdir()] == ["keep.txt"]
    left_out = verify("repro", "compare", reference, engine, "--out", tmp_path / "e", "--stage", "layer3.0.conv1",
                      "--only", "layer1.*")
    assert left_out.returncode == 2 and "not compared in this run" in left_out.stderr
    container = verify("repro", "compare", reference, engine, "--out", tmp_path / "c", "--stage", "layer1.0")
    assert container.returncode == 2 and "hand over that stage" in container.stderr
    assert verify("case", tmp_path / "nothing").returncode == 2


def test_the_bindings_write_the_same_bundle(reference, tmp_path):
    import resnet_verify

    engine = candidate(reference, tmp_path / "engine", tolerance_study.wrong_weight_layout)
    stage, written = resnet_verify.repro(tmp_path / "bundle", reference=reference, candidate=engine, shrink=True)
    assert (stage, written) == ("conv1", str(tmp_path / "bundle"))
    check_bundle(tmp_path / "bundle", "conv1", "read as OHWI")
    assert resnet_verify.repro(tmp_path / "none", dump_dir=reference) == ("", None)
    with pytest.raises(resnet_verify.VerifyError, match="give dump_dir"):
        resnet_verify.repro(tmp_path / "x", reference=reference)
