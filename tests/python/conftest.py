import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
VERIFY = ROOT / "target" / "release" / "verify"


def run_verify(*arguments):
    """`verify ARGUMENTS` as a user runs it: the finished process, output as text."""
    return subprocess.run([str(VERIFY), *map(str, arguments)], capture_output=True, text=True)


def verify_report(*arguments):
    """The JSON report of `verify ARGUMENTS`; bad input (exit 2) fails the test."""
    result = run_verify(*arguments, "--format", "json")
    assert result.returncode in (0, 1), result.stderr
    return json.loads(result.stdout)


def run_dump(out, *arguments):
    """Runs the dump command's entry point with a user's arguments (in this
    process: importing torch anew for each dump would double the suite's
    time), and returns the manifest it wrote."""
    from reference import dump

    dump.main(["--out", str(out), *map(str, arguments)])
    return json.loads((Path(out) / "manifest.json").read_text())


@pytest.fixture
def dump(tmp_path):
    def make(name="dump", *arguments):
        return run_dump(tmp_path / name, *arguments), tmp_path / name
    return make
