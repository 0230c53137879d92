"""The run's record and its reports (harness.report), and the live progress lines (harness.progress):
verdict.json and junit.xml written as results happen, what tests record (firmware, images, rollbacks) read and
never invented, the matrix as text and image, the HTML report."""

from __future__ import annotations

import base64
import json
import os
import pty
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from harness import report
from harness.progress import Progress
from harness.report import Matrix, RunRecord, split_cart

ROOT = Path(__file__).resolve().parent.parent

SUITE = '''
import json, os
import xml.etree.ElementTree as ET

import pytest

RUN = {run!r}

@pytest.fixture
def cart(request):  # the plugin parametrizes `cart` over the rig's slots; nothing here needs the rack
    return request.param

def test_a_updates(cart, record_property):
    record_property("firmware_from", "1.4.2")
    for version, digest in (("1.4.3", "ab" * 32), ("1.4.4", "cd" * 32)):
        record_property("firmware_to", version)
        record_property("image_sha256", digest)
        record_property("rollbacks", 1)

@pytest.mark.parametrize("mode", ["quick", "slow"])
def test_b_sees_a_on_disk(cart, mode):
    v = json.load(open(os.path.join(RUN, "verdict.json")))
    assert v["status"] == "running" and v["verdict"] == "RUNNING"
    assert [r["outcome"] for r in v["results"] if r["test"].endswith(f"test_a_updates[{{cart}}]")] == ["passed"]
    assert [r["test"] for r in v["results"] if r["test"].endswith(f"[{{cart}}-{{mode}}]")] == v["running"]
    cases = ET.parse(os.path.join(RUN, "junit.xml")).getroot().findall("testsuite/testcase")
    assert f"test_a_updates[{{cart}}]" in [c.get("name") for c in cases]
    assert not (cart == "cart-02" and mode == "slow"), "cart-02: slow mode lost the console\\nthe evidence"

def test_c_fails_and_its_teardown_too(cart, request):
    request.addfinalizer(lambda: (_ for _ in ()).throw(RuntimeError("safe state failed")))
    assert cart != "cart-02", "cart-02 never booted"
'''


PROGRESS_SUITE = '''
import pytest

@pytest.fixture
def cart(request):
    return request.param

def test_a(cart):
    pass

@pytest.mark.parametrize("mode", ["quick", "slow"])
def test_b(cart, mode):
    assert not (cart == "cart-02" and mode == "slow"), "cart-02: slow mode lost the console"
'''


@pytest.fixture
def gate_like(pytester, rig_factory):
    """Run a suite (SUITE and `extra` source by default) on a two-cart rig with the report plugin:
    (its verdict.json, its run dir, pytest's result)."""

    def run(*args, extra: str = "", suite: str | None = None):
        rig = rig_factory(["cart-01", "cart-02"])
        out = pytester.path / "run"
        pytester.makepyfile(test_gate_like=(suite or SUITE.format(run=str(out))) + extra)
        res = pytester.runpytest_subprocess("-p", "harness.report", "--rig", str(rig), f"--hil-run-dir={out}",
                                            "-p", "no:cacheprovider", *args)
        return report.load(out), out, res

    return run


def test_verdict_and_junit_are_on_disk_after_every_test_and_say_what_the_tests_recorded(gate_like):
    v, run, res = gate_like()
    assert res.parseoutcomes() == {"passed": 6, "failed": 2, "errors": 2}, res.stdout.str()
    assert (v["status"], v["verdict"]) == ("finished", "FAIL")
    a = next(r for r in v["results"] if r["test"].endswith("test_a_updates[cart-01]"))
    assert (a["firmware_from"], a["firmware_to"], a["image_sha256"], a["rollbacks"]) == \
        ("1.4.2", ["1.4.3", "1.4.4"], ["ab" * 32, "cd" * 32], 2)
    b = next(r for r in v["results"] if r["test"].endswith("test_b_sees_a_on_disk[cart-01-quick]"))
    assert not {"firmware_from", "firmware_to", "image_sha256", "rollbacks"} & set(b), b  # nothing invented
    assert b["scenario"].endswith("test_gate_like.py::test_b_sees_a_on_disk[quick]")
    slow = next(r for r in v["results"] if r["test"].endswith("test_b_sees_a_on_disk[cart-02-slow]"))
    assert (slow["configuration"], slow["outcome"], slow["cause"]) == \
        ("cart-02", "failed", "cart-02: slow mode lost the console")
    c = next(r for r in v["results"] if r["test"].endswith("test_c_fails_and_its_teardown_too[cart-02]"))
    assert (c["outcome"], c["cause"], c["teardown_error"]) == \
        ("failed", "cart-02 never booted", "RuntimeError: safe state failed")
    carts = {c["id"]: c for c in v["configurations"]}
    assert carts["cart-01"]["firmware"] == {"field": "1.4.2", "candidates": [
        {"version": "1.4.3", "image_sha256": "ab" * 32}, {"version": "1.4.4", "image_sha256": "cd" * 32}]}
    assert (carts["cart-01"]["slot"], carts["cart-01"]["supply"], carts["cart-01"]["rollbacks"]) == (1, "psu-k:1", 2)
    assert v["rig"]["name"] == "test-rig" and v["rig"]["kind"] == "virtual"
    assert [(s["name"], s["model"], s["dialect"]) for s in v["supplies"]] == \
        [("psu-k", "NGP804", "rs-ngx"), ("psu-r", "DP832", "rigol-dp800")]
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    assert v["harness"]["revision"] == (head.stdout.strip() if head.returncode == 0 else "unknown")
    suite = ET.parse(run / "junit.xml").getroot().find("testsuite")
    cases = suite.findall("testcase")
    assert len(cases) == 8 == len({c.get("name") for c in cases})  # a teardown error is no second test case
    failed_c = next(c for c in cases if c.get("name") == "test_c_fails_and_its_teardown_too[cart-02]")
    assert failed_c.find("failure").get("message") == \
        "cart-02 never booted (then teardown: RuntimeError: safe state failed)"
    assert "RuntimeError: safe state failed" in failed_c.find("failure").text
    assert (suite.get("tests"), suite.get("failures"), suite.get("errors")) == ("8", "2", "1")
    ET.parse(run / "matrix.svg")  # well-formed


def test_a_run_the_harness_stops_names_why_and_the_test_it_was_on(gate_like):
    stop = '''

def test_d_the_rack_falls_over(cart):
    if cart == "cart-01":
        pytest.exit("hil: psu-k: the supply stopped answering", returncode=2)
'''
    v, run, _ = gate_like("-k", "rack_falls_over or a_updates", extra=stop)
    assert (v["status"], v["stopped"]) == ("stopped", "psu-k: the supply stopped answering")
    assert report.judge(v) == ("FAIL", "the run was stopped: psu-k: the supply stopped answering")
    d = next(r for r in v["results"] if r["test"].endswith("test_d_the_rack_falls_over[cart-01]"))
    assert (d["outcome"], d["cause"]) == \
        ("interrupted", "the run was stopped during this test: psu-k: the supply stopped answering")
    assert [r["outcome"] for r in v["results"] if r["test"].endswith("[cart-02]")] == ["passed", "not-run"]


@pytest.mark.parametrize(("nodeid", "expected_cart", "scenario"), [
    ("t.py::test_x[cart-01]", "cart-01", "t.py::test_x"),
    ("t.py::test_x[cart-01-unsigned]", "cart-01", "t.py::test_x[unsigned]"),
    ("t.py::test_x[ahead-3y-cart-10]", "cart-10", "t.py::test_x[ahead-3y]"),
    ("t.py::test_x[a-cart-1-b]", "cart-1", "t.py::test_x[a-b]"),
    ("t.py::test_x[cart-100]", None, "t.py::test_x[cart-100]"),
    ("t.py::test_y", None, "t.py::test_y"),
])
def test_a_scenario_is_the_test_without_its_cart(nodeid, expected_cart, scenario):
    assert split_cart(nodeid, ["cart-1", "cart-01", "cart-10"]) == (expected_cart, scenario)


def _verdict(carts: list[str], rows: dict[str, list[str]]) -> dict:
    """A record of `rows` (scenario -> outcome per cart; "" where it does not run)."""
    results = [{"configuration": c, "scenario": s, "test": f"{s}[{c}]", "outcome": o, "cause": f"{c} broke"}
               for s, outcomes in rows.items() for c, o in zip(carts, outcomes, strict=True) if o]
    return {"run_id": "gate-x", "status": "finished", "configurations": [{"id": c} for c in carts],
            "results": results}


def test_the_matrix_fits_ten_carts_and_long_scenarios_in_a_terminal():
    carts = [f"cart-{i:02d}" for i in range(1, 11)]
    long = ("test_suites/test_signed_update.py::"
            "test_resumed_download_whose_later_bytes_changed_under_the_same_etag_is_rejected")
    v = _verdict(carts, {
        "test_suites/test_rack_smoke.py::test_supply_identity": ["passed"] * 10,
        long: ["passed"] * 9 + ["failed"],
        "test_suites/test_signed_update.py::test_defective_image_is_rejected[unsigned]": ["passed"] * 10,
        "test_suites/test_signed_update.py::test_defective_image_is_rejected[expired]": ["failed"] + ["passed"] * 9,
        "test_suites/test_flash_faults.py::test_gate_catches[x]": ["passed"] + [""] * 9,
        "test_suites/test_power_cut.py::test_every_cut[y]": ["interrupted", "not-run", "skipped", "error"] + [""] * 6,
    })
    text = Matrix(v).text()
    lines = text.splitlines()
    assert max(len(x) for x in lines[1:]) <= 100, text
    assert lines[1].strip() == "cart-" and lines[2].split() == [f"{i:02d}" for i in range(1, 11)]
    row = {x.split()[0]: x.split()[1:] for x in lines[3:] if x.startswith("  ")}
    assert row["supply_identity"] == ["."] * 10
    assert row["defective_image_is_rejected"] == ["(2)", "F1"] + ["."] * 9  # two cases share the row
    assert row["gate_catches"] == ["."]  # blank: not on that cart
    assert row["every_cut"] == ["!", "-", "s", "E"]
    name = next(x for x in lines if "resumed_download" in x).split()[0]
    assert re.fullmatch(r"resumed_download_whose_\w+…\w+_is_rejected", name), name  # the middle gives way
    assert [x for x in lines if not x.startswith(" ")][1:] == ["rack_smoke", "signed_update", "flash_faults",
                                                               "power_cut"]
    svg = ET.fromstring(Matrix(dict(v, verdict="FAIL", why="2 failed")).svg())
    ns = "{http://www.w3.org/2000/svg}"
    cells = [r for r in svg.iter(f"{ns}rect") if r.find(f"{ns}title") is not None]  # (the legend has none)
    fails = [r for r in cells if r.get("fill") == report.COLOUR["failed"]]
    assert len(cells) == 35 and len(fails) == 2  # one per cell, however many of its cases failed
    assert any("cart-01 broke" in (r.findtext(f"{ns}title") or "") for r in fails)


def test_finalize_judges_with_the_signal_and_gives_allure_the_matrix_and_the_verdict(tmp_path):
    (tmp_path / "allure-results").mkdir()
    v = _verdict(["cart-01"], {"t.py::test_a": ["passed"], "t.py::test_b": ["interrupted"]})
    v.update(status="interrupted", interrupted={"tests": ["t.py::test_b[cart-01]"]})
    v = report.finalize(tmp_path, v, signal="SIGTERM")
    assert (v["verdict"], v["why"]) == ("INTERRUPTED", "no verdict: interrupted by SIGTERM during cart-01 t::b "
                                                       "(1 passed, 0 failed, 0 skipped, 1 interrupted so far)")
    assert report.load(tmp_path)["verdict"] == "INTERRUPTED"
    (globals_file,) = (tmp_path / "allure-results").glob("*-globals.json")
    g = json.loads(globals_file.read_text())
    assert [(a["name"], a["type"]) for a in g["attachments"]] == \
        [("configuration × scenario matrix", "image/svg+xml"), ("verdict.json", "application/json")]
    assert all((tmp_path / "allure-results" / a["source"]).exists() for a in g["attachments"])
    assert [e["message"] for e in g["errors"]] == [f"INTERRUPTED: {v['why']}"]


def test_no_html_report_without_the_allure_package_says_so_in_one_line(tmp_path, monkeypatch):
    if report._node_major() is None:
        assert report.generate_html(tmp_path, {})[1].startswith("no HTML report: Node.js is not installed")
        return
    monkeypatch.setattr(report, "allure_command", lambda: tmp_path / "no-allure")
    assert report.generate_html(tmp_path, {}) == \
        (None, f"no HTML report: the allure package is not installed (npm ci in {report.ROOT}; ./hil does it when "
               "npm is there)")


@pytest.mark.skipif(not (shutil.which("node") and report.allure_command().exists()),
                    reason="needs Node.js and the allure package (./hil installs it with npm)")
def test_the_html_report_is_one_page_with_the_matrix_in_it(gate_like):
    v, run, _ = gate_like()
    (run / "allure-results").mkdir()  # (the suite ran without --alluredir: the report has the globals alone)
    v = report.finalize(run, v)
    page, line = report.generate_html(run, v)
    assert page == run / "allure-report" / "index.html" and re.fullmatch(
        rf"HTML report: {re.escape(str(page))} \(\d+\.\d s to generate\)", line), line
    html = page.read_text()
    assert f"<title> cart-hil {run.name}: FAIL </title>" in html
    assert "googletagmanager" not in html and "gtag(" not in html  # the page calls nobody
    globals_data = re.search(r'd\("widgets/globals\.json","([^"]+)"\)', html).group(1)
    names = [a["name"] for a in json.loads(base64.b64decode(globals_data))["attachments"]]
    assert "configuration × scenario matrix" in names


# ---------------------------------------------------------------- live progress


def test_progress_in_a_log_is_one_line_per_cart_when_it_starts_fails_or_ends(gate_like):
    _, _, res = gate_like("-p", "harness.progress", "-n", "2", "-q", "-o", "console_output_style=classic",
                          suite=PROGRESS_SUITE)
    out = res.stdout.lines
    lines = {c: [x for x in out if x.startswith(c + " ")] for c in ("cart-01", "cart-02")}
    for cart, mine in lines.items():
        assert re.fullmatch(rf"{cart} +0/3 +0 passed +0 failed +0:0\d  gate_like::a \(0:0\d\)", mine[0]), mine
        assert re.match(rf"{cart} +3/3 +\d passed +\d failed +0:0\d  done", mine[-1]), mine
    failed = [x for x in lines["cart-02"] if "— FAILED" in x]
    assert len(failed) == 1 and re.match(r"cart-02 +\d/3 +\d passed +1 failed", failed[0]) \
        and failed[0].endswith("— FAILED gate_like::b[slow]: cart-02: slow mode lost the console"), failed
    assert not [x for x in lines["cart-01"] if "FAILED" in x]
    before = out[: next(i for i, x in enumerate(out) if "FAILURES" in x)]
    assert not [x for x in before if re.fullmatch(r"[.FEs]+", x.strip())], out  # pytest's letters are left out


def _record(carts: list[str]) -> RunRecord:
    r = RunRecord("gate-x", Path("/nonexistent"), {"configurations": [{"id": c} for c in carts]}, carts)
    r.collected(f"t.py::test_{k}[{c}]" for c in carts for k in ("a", "b"))
    return r


def test_progress_on_a_terminal_redraws_its_block_in_place():
    master, slave = pty.openpty()
    record = _record(["cart-01", "cart-02"])
    progress = Progress(record, slave)
    record.start("t.py::test_a[cart-01]")
    progress.draw()
    first = os.read(master, 65536).decode()
    record.start("t.py::test_a[cart-02]")
    progress.draw()
    second = os.read(master, 65536).decode()
    os.close(master)
    os.close(slave)
    assert first.startswith("\x1b[2Kcart-01 ") and "\x1b[2F" not in first
    assert second.startswith("\x1b[2F\x1b[2Kcart-01 ")  # two lines up: the block is redrawn, not repeated
    assert re.search(r"cart-02 +0/2 +0 passed +0 failed +0:00  t::a \(0:00\)", second), second
    assert second.count("\n") == 2


def test_checks_a_rig_could_not_run_are_listed_not_dropped():
    v = {"results": [
        {"configuration": "cart-01", "scenario": "rack_smoke::recovery_to_factory_image", "outcome": "passed",
         "checks_not_run": ["factory trust-store fingerprints: rig lab names no lab PKI (virtual.pki)"]},
        {"configuration": "cart-02", "scenario": "rack_smoke::recovery_to_factory_image", "outcome": "passed"}]}
    lines = report.checks_not_run(v)
    assert len(lines) == 1 and lines[0].startswith("cart-01 ") and lines[0].endswith(
        "factory trust-store fingerprints: rig lab names no lab PKI (virtual.pki)")
