"""`verify --format html`: one self-contained page, opened in headless
Chromium as a person would open it: it loads with no console error and no
request of any kind, its tree has a row per stage, a failing stage shows its
channel strip and hint, and with script off the summary and the table
still read. Screenshots go to out/html-report/."""

import json
import re
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT, VERIFY, run_dump

sys.path.insert(0, str(ROOT / "scripts"))
import report_browser  # noqa: E402

SHOTS = ROOT / "out" / "html-report"


def html(tmp_path, name, *arguments):
    page = tmp_path / f"{name}.html"
    result = subprocess.run([str(VERIFY), *map(str, arguments), "--format", "html", "--output", str(page)],
                            capture_output=True, text=True)
    assert result.returncode in (0, 1), result.stderr
    assert "summary " in result.stdout  # the text report still goes to stdout
    return page, result.returncode


def eps_dump(tmp_path):
    dump = tmp_path / "eps"
    shutil.copytree(ROOT / "fixtures" / "resnet50-w8", dump)
    manifest = json.loads((dump / "manifest.json").read_text())
    manifest["architecture"]["batch_norm_eps"] = 1e-3
    (dump / "manifest.json").write_text(json.dumps(manifest))
    return dump


def test_a_failing_report_loads_with_no_error_and_no_request(tmp_path):
    page, status = html(tmp_path, "eps", eps_dump(tmp_path))
    assert status == 1
    seen = report_browser.look(page, screenshot=SHOTS / "eps.png")
    assert seen["errors"] == [] and seen["other_requests"] == [], seen
    assert seen["title"] == "verify resnet50: fail"
    assert seen["tree_rows"] == seen["table_rows"] == 182
    assert seen["plot"] == 1
    bn1 = next(failure for failure in seen["failures"] if failure["id"] == "failure-bn1")
    assert bn1["channels"] == 8 and bn1["drawn"] > 0 and bn1["hints"] >= 1 and bn1["worst"] == 8
    assert "root: bn1" in seen["summary"] and "eps" in seen["summary"]
    assert seen["visible_when_failing"] == 181
    text = page.read_text()
    # Nothing that could fetch: no URL, no external script, style or font.
    assert not re.search(r"(src|href)=\"(?!#)", text)
    assert "http://" not in text.replace("http://www.w3.org/2000/svg", "") and "https://" not in text
    assert "@import" not in text and "url(" not in text


def test_without_script_the_summary_tree_and_table_still_read(tmp_path):
    page, _ = html(tmp_path, "eps", eps_dump(tmp_path))
    seen = report_browser.look(page, script=False)
    assert seen["errors"] == [] and seen["other_requests"] == []
    assert seen["tree_rows"] == seen["table_rows"] == 182 and "181 fail" in seen["summary"]


def test_a_passing_run_and_a_both_run_on_a_train_mode_reference(tmp_path):
    page, status = html(tmp_path, "pass", ROOT / "fixtures" / "resnet50-w8")
    assert status == 0
    seen = report_browser.look(page, screenshot=SHOTS / "pass.png")
    assert seen["errors"] == [] and seen["other_requests"] == [] and seen["failures"] == []
    assert seen["tree_rows"] == 182 and "182 succ" in seen["summary"]
    train, status = html(tmp_path, "train-both", ROOT / "fixtures" / "resnet18-w8-train", "--both",
                         "--allow-train-reference")
    assert status == 1
    seen = report_browser.look(train, screenshot=SHOTS / "train-both.png")
    assert seen["errors"] == [] and seen["other_requests"] == []
    assert seen["tree_rows"] == 75 and "TRAIN MODE" in seen["summary"]
    assert any(failure["hints"] for failure in seen["failures"])
    assert "isolated rel err" in train.read_text()


def test_compare_writes_the_same_page(tmp_path):
    page, status = html(tmp_path, "compare", "compare", ROOT / "fixtures" / "resnet50-w8", eps_dump(tmp_path))
    seen = report_browser.look(page)
    assert seen["errors"] == [] and seen["other_requests"] == [] and seen["tree_rows"] == 183


def test_the_deepest_network_stays_under_two_megabytes(tmp_path):
    # ResNet152's 522 stages, every one failing (eps), 16 of them in detail.
    dump = tmp_path / "r152"
    run_dump(dump, "--model", "resnet152", "--width", "8", "--size", "32", "--threads", "1")
    manifest = json.loads((dump / "manifest.json").read_text())
    manifest["architecture"]["batch_norm_eps"] = 1e-3
    (dump / "manifest.json").write_text(json.dumps(manifest))
    page, _ = html(tmp_path, "r152", dump)
    assert page.stat().st_size < 2_000_000
    seen = report_browser.look(page)
    assert seen["errors"] == [] and seen["tree_rows"] == 522
