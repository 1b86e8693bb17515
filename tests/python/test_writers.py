"""Candidate writers for Python, C++ and Rust (issue 22): each example engine
(examples/) computes a ResNet's stem and first block from a fixture's
weights and input, writes them with its language's writer, and
`verify compare` says succ for those stages and lists the rest as not
compared. Each writer refuses a wrong name, a wrong shape, another dtype
and writing after close, with a message that says which; the C++ and Rust
writers' .npy files are byte for byte what the Python writer (numpy.save)
writes for the same data."""

import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest

import resnet_verify as rv
from conftest import ROOT, VERIFY

FIXTURES = ROOT / "fixtures"
MODELS = ["resnet18-w8", "resnet50-w8", "resnext50-w8"]
CXX_FLAGS = ["-Wall", "-Wextra", "-Werror", "-std=c++17", f"-I{ROOT / 'include'}"]


def numpy_engine():
    spec = importlib.util.spec_from_file_location("numpy_engine", ROOT / "examples" / "numpy_engine.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def cpp_engine(tmp_path_factory):
    binary = tmp_path_factory.mktemp("cpp") / "cpp_engine"
    subprocess.run(["c++", *CXX_FLAGS, "-O2", str(ROOT / "examples" / "cpp_engine.cpp"), "-o", str(binary)],
                   check=True, capture_output=True, text=True)
    return binary


@pytest.fixture(scope="module")
def rust_engine():
    subprocess.run(["cargo", "build", "--release", "--quiet", "-p", "resnet-dump", "--example", "rust_engine"],
                   cwd=ROOT, check=True)
    return ROOT / "target" / "release" / "examples" / "rust_engine"


def engines(cpp_engine, rust_engine):
    return {
        "python": lambda reference, out: numpy_engine().run(reference, out),
        "c++": lambda reference, out: subprocess.run([str(cpp_engine), str(reference), str(out)], check=True),
        "rust": lambda reference, out: subprocess.run([str(rust_engine), str(reference), str(out)], check=True),
    }


@pytest.mark.parametrize("language", ["python", "c++", "rust"])
@pytest.mark.parametrize("model", MODELS)
def test_each_example_engine_passes_verify_compare(tmp_path, cpp_engine, rust_engine, language, model):
    reference, candidate = FIXTURES / model, tmp_path / "candidate"
    engines(cpp_engine, rust_engine)[language](reference, candidate)
    written = [stage["name"] for stage in json.loads((candidate / "manifest.json").read_text())["stages"]]
    assert written[:4] == ["conv1", "bn1", "relu", "maxpool"] and written[-1] == "layer1.0"
    result = subprocess.run([str(VERIFY), "compare", str(reference), str(candidate), "--format", "json"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr
    report = json.loads(result.stdout)
    assert report["summary"]["compared"] == len(written) and report["summary"]["fail"] == 0
    not_written = len(rv.stage_names(reference)) - len(written)
    assert report["summary"]["stopped"].startswith(f"{not_written} reference stage(s) not in the candidate, not compared")


@pytest.mark.parametrize("language", ["c++", "rust"])
def test_npy_files_are_what_the_python_writer_writes(tmp_path, cpp_engine, rust_engine, language):
    """The same data through rv.CandidateWriter (numpy.save), file for file."""
    reference, candidate = FIXTURES / "resnet50-w8", tmp_path / "candidate"
    engines(cpp_engine, rust_engine)[language](reference, candidate)
    stages = json.loads((candidate / "manifest.json").read_text())["stages"]
    with rv.CandidateWriter(tmp_path / "python", reference=reference) as writer:
        for stage in stages:
            writer.stage(stage["name"], np.load(candidate / stage["file"]))
    python_stages = json.loads((tmp_path / "python" / "manifest.json").read_text())["stages"]
    assert [(s["name"], s["module_type"], s["shape"], s["file"]) for s in python_stages] == \
        [(s["name"], s["module_type"], s["shape"], s["file"]) for s in stages]
    for stage in stages:
        assert (candidate / stage["file"]).read_bytes() == (tmp_path / "python" / stage["file"]).read_bytes(), \
            stage["name"]


def test_the_python_writer_refuses_each_mistake_at_once(tmp_path):
    reference = FIXTURES / "resnet18-w8"
    writer = rv.CandidateWriter(tmp_path / "candidate", reference=reference)
    conv1 = np.zeros((1, 8, 16, 16), np.float32)
    writer.stage("conv1", conv1)
    with pytest.raises(ValueError, match=r"stage 'layer1\.0\.relu#3': the reference .* has no stage of that name; "
                                         r"did you mean layer1\.0\.relu#1, layer1\.0\.relu#0"):
        writer.stage("layer1.0.relu#3", conv1)
    with pytest.raises(ValueError, match=r"stage 'BN1': .* has no stage of that name; did you mean bn1\? "):
        writer.stage("BN1", conv1)
    with pytest.raises(ValueError, match=r"stage 'bn1': shape \[1, 16, 16, 8\], where the reference's is "
                                         r"\[1, 8, 16, 16\] \(NCHW\)$"):
        writer.stage("bn1", np.zeros((1, 16, 16, 8), np.float32))
    with pytest.raises(TypeError, match=r"stage 'bn1': float64 array; the format stores float32"):
        writer.stage("bn1", np.zeros((1, 8, 16, 16)))
    # A bfloat16 tensor, which numpy cannot hold: once torch's own TypeError,
    # without the stage.
    import torch
    with pytest.raises(TypeError, match=r"stage 'bn1': torch.bfloat16 tensor; the format stores float32 "
                                        r"\(convert with .float\(\)\)"):
        writer.stage("bn1", torch.zeros((1, 8, 16, 16), dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="stage 'conv1': written already"):
        writer.stage("conv1", conv1)
    assert writer.close() == tmp_path / "candidate"
    with pytest.raises(ValueError, match="stage 'bn1': the writer for .* is closed"):
        writer.stage("bn1", conv1)
    manifest = json.loads((tmp_path / "candidate" / "manifest.json").read_text())
    assert [(s["name"], s["module_type"], s["shape"]) for s in manifest["stages"]] == \
        [("conv1", "Conv2d", [1, 8, 16, 16])]


def test_the_python_writer_takes_nhwc_and_torch_tensors(tmp_path):
    import torch

    reference = FIXTURES / "resnet18-w8"
    with rv.CandidateWriter(tmp_path / "candidate", reference=reference, layout="nhwc") as writer:
        with pytest.raises(ValueError, match=r"\[1, 16, 16, 8\] stored NHWC"):
            writer.stage("conv1", np.zeros((1, 8, 16, 16), np.float32))
        writer.stage("conv1", torch.zeros(1, 16, 16, 8))
        writer.stage("fc", np.zeros((1, 10), np.float32))  # 2-D: the same in every layout
    manifest = json.loads((tmp_path / "candidate" / "manifest.json").read_text())
    assert manifest["layout"] == "NHWC"
    assert [s["shape"] for s in manifest["stages"]] == [[1, 16, 16, 8], [1, 10]]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(ValueError, match="holds notes.txt, so it is not a candidate written before; refusing"):
        rv.CandidateWriter(tmp_path / "mine", reference=reference)
    # Nor a stages/ of someone else's without a manifest.
    (tmp_path / "stages-only" / "stages").mkdir(parents=True)
    (tmp_path / "stages-only" / "stages" / "precious.txt").write_text("mine")
    with pytest.raises(ValueError, match="holds stages, so it is not a candidate written before"):
        rv.CandidateWriter(tmp_path / "stages-only", reference=reference)
    assert (tmp_path / "stages-only" / "stages" / "precious.txt").exists()
    # Not even the reference itself, written into by mistake.
    files = sorted(path.relative_to(reference) for path in reference.rglob("*"))
    with pytest.raises(ValueError, match=r"holds SHA256SUMS|holds stages, weights|holds .*weights"):
        rv.CandidateWriter(reference, reference=reference)
    assert sorted(path.relative_to(reference) for path in reference.rglob("*")) == files
    assert rv.stage_names(reference)[:3] == ["input", "conv1", "bn1"]
    # A reference stored NHWC gives the same NCHW shapes.
    nhwc_reference = tmp_path / "nhwc-reference"
    nhwc_reference.mkdir()
    manifest = json.loads((reference / "manifest.json").read_text())
    manifest["layout"] = "NHWC"
    for stage in manifest["stages"]:
        if len(stage["shape"]) == 4:
            n, c, h, w = stage["shape"]
            stage["shape"] = [n, h, w, c]
    (nhwc_reference / "manifest.json").write_text(json.dumps(manifest))
    with rv.CandidateWriter(tmp_path / "from-nhwc", reference=nhwc_reference) as writer:
        writer.stage("conv1", np.zeros((1, 8, 16, 16), np.float32))


def test_the_cpp_writer_refuses_each_mistake(tmp_path):
    binary = tmp_path / "writer_refusals"
    subprocess.run(["c++", *CXX_FLAGS, str(ROOT / "tests" / "cpp" / "writer_refusals.cpp"), "-o", str(binary)],
                   check=True, capture_output=True, text=True)
    out = tmp_path / "candidate"
    said = dict(line.split(": ", 1) for line in
                subprocess.run([str(binary), str(out)], check=True, capture_output=True, text=True).stdout.splitlines())
    assert said == {
        "duplicate": 'stage "relu": written already',
        "shape": 'stage "bn1": shape [1, 2, 2, 2] holds 8 values; the data has 4',
        "name": 'stage "": not a stage name (the reference\'s, such as layer1.0.relu#1)',
        "path": 'stage "../relu": not a stage name (the reference\'s, such as layer1.0.relu#1)',
        "type": 'stage "fc": no module type (the torch class: Conv2d, BatchNorm2d, ReLU, ...)',
        "layout": 'layout "NHCW": NCHW or NHWC',
        "closed": f'stage "fc": the writer for {out} is closed',
        "not a dump": f"{out}/stages: holds 000_relu.npy, so it is not a candidate written before; "
                      "refusing to overwrite it",
    }
    # Another element type does not compile, and says why.
    source = tmp_path / "wide.cpp"
    source.write_text('#include "resnet_verify/candidate.hpp"\n'
                      'int main() { rv::CandidateWriter w("out"); w.stage("fc", "Linear", {1, 2}, '
                      'std::vector<double>{1.0, 2.0}); }\n')
    compiled = subprocess.run(["c++", *CXX_FLAGS, "-fsyntax-only", str(source)], capture_output=True, text=True)
    assert compiled.returncode != 0
    assert "rv::CandidateWriter stores float32: convert the data to std::vector<float>" in compiled.stderr


def test_a_candidate_stage_the_reference_lacks_is_refused_by_name(tmp_path, cpp_engine):
    # It was listed as 'not compared' under a run that said succ, exit 0:
    # the engine's maxpool was never judged.
    candidate = tmp_path / "candidate"
    subprocess.run([str(cpp_engine), str(FIXTURES / "resnet18-w8"), str(candidate)], check=True)
    manifest = json.loads((candidate / "manifest.json").read_text())
    manifest["stages"][3]["name"] = "max_pool"
    (candidate / "manifest.json").write_text(json.dumps(manifest))
    result = subprocess.run([str(VERIFY), "compare", str(FIXTURES / "resnet18-w8"), str(candidate)],
                            capture_output=True, text=True)
    assert result.returncode == 2, result.stdout
    assert ("manifest.json: 1 stage(s) the reference does not have: max_pool (for max_pool, did you mean maxpool?). "
            "A candidate stage is judged against the reference's stage of its name") in result.stderr, result.stderr


if __name__ == "__main__":
    sys.exit(pytest.main([__file__]))
