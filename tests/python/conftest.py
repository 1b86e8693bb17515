import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def run_dump(out, *arguments):
    """Runs the dump command as a user would, and returns its manifest."""
    subprocess.run([sys.executable, "-m", "reference.dump", "--out", str(out), *map(str, arguments)],
                   cwd=ROOT, check=True, capture_output=True)
    return json.loads((Path(out) / "manifest.json").read_text())


@pytest.fixture
def dump(tmp_path):
    def make(name="dump", *arguments):
        return run_dump(tmp_path / name, *arguments), tmp_path / name
    return make
