import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


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
