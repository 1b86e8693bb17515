"""The committed fixtures are what scripts/make-fixtures makes, byte for byte."""

import subprocess
from pathlib import Path

from conftest import ROOT


def test_fixtures_regenerate_to_the_same_bytes(tmp_path):
    subprocess.run([str(ROOT / "scripts" / "make-fixtures"), str(tmp_path)], check=True, capture_output=True)
    committed = (ROOT / "fixtures" / "SHA256SUMS").read_text()
    regenerated = (tmp_path / "SHA256SUMS").read_text()
    differing = [a.split()[1] for a, b in zip(committed.splitlines(), regenerated.splitlines()) if a != b]
    assert committed.splitlines().__len__() == regenerated.splitlines().__len__()
    assert not differing, f"regenerated fixtures differ: {differing[:10]}"


def test_committed_fixtures_match_their_checksums():
    import hashlib
    for line in (ROOT / "fixtures" / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split(maxsplit=1)
        assert hashlib.sha256((ROOT / "fixtures" / name).read_bytes()).hexdigest() == digest, name


def test_fixtures_stay_small():
    size = sum(p.stat().st_size for p in Path(ROOT / "fixtures").rglob("*") if p.is_file())
    assert size < 8 * 1024 * 1024, f"fixtures are {size / 1e6:.1f} MB"
