"""The gate's verdict is earned: it judges the run's record (harness.report, verdict.json), in which a teardown
error is part of its test, a run that ran nothing or skipped a scenario is no PASS (issue: `hil gate --tag <none>`
used to skip everything and print PASS), a run ended by Ctrl-C or SIGTERM says which test it cut short,
leaves the supply outputs off and stops its rack, and the rollout preflight of the candidate is part of the
verdict (a configuration no signed release reaches fails the gate, named)."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import yaml

from harness import cli, pki, report
from harness.config import Rig

ROOT = Path(__file__).resolve().parent.parent

SUITE = '''
import pytest

@pytest.fixture
def cart(request):  # the plugin parametrizes `cart` over the rig's slots; nothing here needs the rack
    return request.param

def test_runs(cart):
    pass

def test_skips(cart):
    if cart == "cart-01":
        pytest.skip("the rig cannot do this")

@pytest.fixture
def breaks_after():
    yield
    raise RuntimeError("teardown")

def test_teardown_error(cart, breaks_after):
    pass

@pytest.mark.hil_self_check("caught_build")
def test_self_check_caught(cart, self_check):
    self_check.caught("cart-01: crash loop: crashed 3 times")

@pytest.mark.hil_self_check("missed_build")
def test_self_check_missed(cart):
    assert False, "the fault build went through: confirmed"
'''


def record(pytester, rig_factory, *args) -> tuple[dict, Path]:
    """Run the gate-like suite on a two-cart rig with the report plugin; its verdict.json and run dir."""
    rig = rig_factory(["cart-01", "cart-02"])
    pytester.makepyfile(test_gate_like=SUITE)
    run = pytester.path / "run"
    pytester.runpytest_subprocess("-p", "harness.report", "--rig", str(rig), f"--hil-run-dir={run}",
                                  "-p", "no:cacheprovider", *args)
    v = report.load(run)
    assert v is not None, f"no verdict.json in {run}"
    return v, run


def test_a_teardown_error_is_one_failing_case_in_the_record_and_in_junit(pytester, rig_factory):
    v, run = record(pytester, rig_factory, "-k", "not self_check")
    assert report.summary(v) == "3 passed, 0 failed, 1 skipped, 2 error(s); scenarios per cart: cart-01 3, cart-02 3"
    broken = [r for r in v["results"] if r["scenario"].endswith("test_gate_like.py::test_teardown_error")]
    assert [(r["configuration"], r["outcome"], r["cause"]) for r in broken] == \
        [(c, "error", "teardown: RuntimeError: teardown") for c in ("cart-01", "cart-02")]
    cases = ET.parse(run / "junit.xml").getroot().findall("testsuite/testcase")
    names = [c.get("name") for c in cases]
    assert sorted(names) == sorted(set(names)) and len(names) == 6, names  # one case per test, no second entry
    errors = [c.find("error").get("message") for c in cases if c.find("error") is not None]
    assert errors == ["teardown: RuntimeError: teardown"] * 2
    assert report.judge(v) == ("FAIL", "2 failed: cart-01 gate_like::teardown_error: teardown: RuntimeError: teardown "
                                       "(and 1 more)")


def test_a_skip_is_no_pass(pytester, rig_factory):
    v, _ = record(pytester, rig_factory, "-k", "runs or skips")
    assert report.judge(v) == ("FAIL", "1 scenario(s) skipped — a skipped scenario is not a pass: test_skips[cart-01]")


def test_a_selection_that_runs_nothing_is_no_verdict(pytester, rig_factory):
    v, _ = record(pytester, rig_factory, "-k", "no_such_test")
    assert report.judge(v) == ("FAIL", "nothing ran (no scenario matched the selection): no verdict")


def test_self_check_lines_say_caught_with_the_gates_reason_or_missed(pytester, rig_factory):
    v, _ = record(pytester, rig_factory, "-k", "self_check")
    lines = report.self_check_lines(v)
    assert len(lines) == 2  # on cart-01 only: both carts are rev-b, one cart per hardware revision
    assert lines[0].split()[:3] == ["caught", "caught_build", "cart-01"] and "crash loop: crashed 3 times" in lines[0]
    assert lines[1].split()[:3] == ["MISSED", "missed_build", "cart-01"] and "the fault build went through" in lines[1]


def test_all_passed_is_earned_and_the_gates_own_failed_checks_stand_against_it(pytester, rig_factory):
    v, _ = record(pytester, rig_factory, "-k", "test_runs")
    assert report.judge(v) == ("PASS", "2 scenario run(s) passed on 2 configuration(s)")
    assert report.judge(v, ["rollout preflight: cart-09 unreachable"]) == \
        ("FAIL", "rollout preflight: cart-09 unreachable")


def test_a_run_that_never_recorded_its_end_is_no_verdict():
    v = {"status": "running", "results": [{"configuration": "cart-01", "scenario": "t.py::test_a", "test": "t",
                                           "outcome": "passed"}]}
    assert report.judge(v) == ("FAIL", "the test run ended without recording its end (crashed or killed): no verdict")


# ---------------------------------------------------------------- interrupted runs, for real


def _start_sweep(rig_factory, tmp_path) -> tuple[subprocess.Popen, Path]:
    rx = tmp_path / "supply-rx.log"
    virtual = {"run_dir": str(tmp_path / "run"), "flash_time_scale": 0.05, "pki": str(tmp_path / "pki"),
               "supply_rx_log": str(rx)}
    rig = rig_factory(["cart-01"], virtual=virtual,
                      firmware={"build": ["{python}", "-m", "vrack", "build", "--version", "{version}", "-o", "{out}",
                                          "{faults}"]})
    proc = subprocess.Popen([sys.executable, "-m", "harness.cli", "sweep", "--rig", str(rig), "-n", "1"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    return proc, rx


def _supply_lines(tmp_path: Path, reports: Path) -> list[str]:
    """What the cart's supply (psu-k, an R&S NGP804: cart-01 on channel 1) received, from the RX log the rig
    names (or the run's private copy of it, when the run got a private rack)."""
    logs = [tmp_path / "supply-rx.log", *reports.glob("**/supply-rx.log")]
    return [ln.split(" RX psu-k ", 1)[1] for p in logs if p.exists() for ln in p.read_text().splitlines()
            if " RX psu-k " in ln]


def _wait_until_the_sweep_powers_its_cart(proc: subprocess.Popen, tmp_path: Path) -> tuple[Path, str]:
    """Polls (deadline 120 s) until the sweep test is in progress and has switched its cart's output on."""
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None, f"hil ended first: {proc.communicate()}"
        assert time.monotonic() < deadline, "the sweep never powered its cart"
        runs = sorted((ROOT / "reports").glob("sweep-*/verdict.json"), key=lambda p: p.stat().st_mtime)
        for path in runs[-3:]:
            try:
                v = json.loads(path.read_text())
            except ValueError:  # (never half-written: replaced whole; a run of another test may be starting)
                continue
            if str(tmp_path) in v.get("rig", {}).get("path", "") and v["running"] \
                    and "OUTP:SEL ON" in _supply_lines(tmp_path, path.parent):
                return path.parent, v["running"][0]
        time.sleep(0.2)


def _assert_interrupted(proc, out: str, err: str, reports: Path, test: str, sig: signal.Signals,
                        tmp_path: Path) -> None:
    assert proc.returncode == 128 + sig, (proc.returncode, out[-2000:], err[-2000:])
    assert "Traceback" not in err, err[-3000:]
    lines = [x for x in out.splitlines() if x.startswith("hil sweep: ")]
    assert len(lines) == 1, out[-3000:]
    assert lines[0].startswith(f"hil sweep: INTERRUPTED — no verdict: interrupted by {sig.name} during cart-01 "
                               f"power_cut::every_cut_leaves_the_cart_safe ("), lines[0]
    assert lines[0].endswith(f"; reports in {reports}"), lines[0]
    v = report.load(reports)
    assert (v["status"], v["verdict"], v["signal"], v["interrupted"]) == \
        ("interrupted", "INTERRUPTED", sig.name, {"tests": [test]})
    assert next(r for r in v["results"] if r["test"] == test)["outcome"] == "interrupted"
    suite = ET.parse(reports / "junit.xml").getroot().find("testsuite")
    assert {p.get("name"): p.get("value") for p in suite.iterfind("properties/property")}["interrupted_during"] == test
    case = next(c for c in suite.iterfind("testcase") if c.get("name") == test.rsplit("::", 1)[1])
    assert case.find("error").get("type") == "interrupted"
    switched = [x for x in _supply_lines(tmp_path, reports) if x.startswith("OUTP:SEL ") and "?" not in x]
    assert switched[-1] == "OUTP:SEL OFF", switched[-5:]  # the cart's output left off (cart-01: channel 1 only)
    left = subprocess.run(["pgrep", "-f", f"{tmp_path}|{reports}"], capture_output=True, text=True).stdout.split()
    session = subprocess.run(["pgrep", "-s", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert not left and not session, f"processes of the interrupted run still running: {left + session}"
    shutil.rmtree(reports)  # (kept when an assertion above fails: the evidence)


@pytest.fixture
def latest_kept():
    """reports/latest as it was, if the run a test made (and removed) is still the one it points at."""
    latest = ROOT / "reports" / "latest"
    before = os.readlink(latest) if latest.is_symlink() else None
    yield
    if latest.is_symlink() and not latest.exists():
        if before is None:
            latest.unlink()
        else:
            tmp = latest.with_name(f".latest-{os.getpid()}")
            os.symlink(before, tmp)
            os.replace(tmp, latest)


def test_ctrl_c_ends_the_run_with_its_reports_one_line_and_nothing_left(rig_factory, tmp_path, latest_kept):
    """Ctrl-C at a terminal reaches `hil` (pytest runs in a process group of its own): it passes it on, the run
    ends the test in progress, writes its reports, powers the cart and its rack down, and `hil` says INTERRUPTED in
    one line naming the test cut short, exit 130, no traceback."""
    proc, _ = _start_sweep(rig_factory, tmp_path)
    reports, test = _wait_until_the_sweep_powers_its_cart(proc, tmp_path)
    os.killpg(proc.pid, signal.SIGINT)  # the terminal's Ctrl-C: to hil's whole process group
    out, err = proc.communicate(timeout=180)
    _assert_interrupted(proc, out, err, reports, test, signal.SIGINT, tmp_path)


def test_sigterm_to_hil_alone_ends_the_run_like_ctrl_c(rig_factory, tmp_path, latest_kept):
    """SIGTERM — a CI runner cancelling the job, `timeout` — reaches `hil` alone: the same orderly end, exit 143."""
    proc, _ = _start_sweep(rig_factory, tmp_path)
    reports, test = _wait_until_the_sweep_powers_its_cart(proc, tmp_path)
    os.kill(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=180)
    assert "hil: SIGTERM — ending the tests in progress, powering the rack down, writing the reports" in err, err
    _assert_interrupted(proc, out, err, reports, test, signal.SIGTERM, tmp_path)


@pytest.mark.parametrize(("statuses", "rc", "summary"), [
    ([0, 0, 0], 0, "3 of 3 run(s) passed"),
    ([0, 1, 0], 1, "2 of 3 run(s) passed"),
    ([0, 130], 130, "1 of 2 run(s) passed (1 not run: interrupted)"),
], ids=["all-pass", "one-flake", "interrupted"])
def test_repeat_runs_the_gate_n_times_and_fails_on_any_run_that_did_not_pass(monkeypatch, capsys, statuses, rc,
                                                                             summary):
    calls = iter(statuses)
    monkeypatch.setattr(cli, "_run_once", lambda a: next(calls))
    a = argparse.Namespace(cmd="gate", repeat=3)
    assert cli.cmd_smoke(a) == rc
    out = capsys.readouterr().out
    assert f"hil gate --repeat 3: {summary}; wall " in out
    assert out.count("hil gate: run ") == len(statuses)


def test_a_candidate_no_cart_could_take_is_refused_before_anything_runs(capsys, tmp_path):
    rc = cli.main(["gate", "--build", "1.0.0", "--cart", "cart-03"])
    assert rc == 2
    assert capsys.readouterr().err == ("hil: candidate 1.0.0 is not above cart-03's field version 1.4.2: a cart "
                                       "takes only a higher version\n")
    bad = tmp_path / "fw.img"
    bad.write_bytes(b"not an image")
    assert cli.main(["gate", "--firmware", str(bad)]) == 2
    assert capsys.readouterr().err.startswith(f"hil: {bad}: not a firmware image: ")


# ---------------------------------------------------------------- the rollout preflight in the verdict


def _lab_rig(tmp_path: Path, configs: Path = ROOT / "configs", **changes) -> Rig:
    """rigs/virtual.yaml (all ten carts) moved under tmp_path: its lab PKI, builds and run dir land there."""
    data = yaml.safe_load((ROOT / "rigs" / "virtual.yaml").read_text())
    data.update(configs=str(configs), **changes)
    path = tmp_path / "rigs" / "virtual.yaml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return Rig.load(path)


def _gate_checks(rig: Rig, out: Path, failed: str | None = None) -> dict:
    """The gate's checks after a finished run of the default candidate on every cart (one scenario each, passed,
    or failed on `failed`): the verdict they write."""
    slots = rig.select()
    scenario = "test_suites/test_release.py::test_candidate_from_field"
    results = [{"configuration": s.cart_id, "scenario": scenario, "test": f"{scenario}[{s.cart_id}]",
                "outcome": "failed" if s.cart_id == failed else "passed"}
               | ({"cause": f"{failed}: rejected for 'missing ca'"} if s.cart_id == failed else {}) for s in slots]
    v = {"run_id": out.name, "status": "finished", "configurations": [{"id": s.cart_id} for s in slots],
         "results": results}
    a = argparse.Namespace(cmd="gate", self_check=False, firmware=None, build=None)
    out.mkdir()
    return cli._gate_verdict(a, rig, slots, out, v, checks=False)


def test_the_preflight_of_a_candidate_every_configuration_can_take_is_in_the_verdict(tmp_path):
    """The repo's ten configurations: the default candidate signed under lab-root-2025 reaches the carts holding
    it, under lab-root-2026 the others; every configuration is reached by some signing: PASS, the entry says so."""
    out = tmp_path / "gate-run"
    v = _gate_checks(_lab_rig(tmp_path), out)
    assert (v["verdict"], "checks_failed" in v) == ("PASS", False), v["why"]
    old, new = (f"lacks CA {pki.ROOT_OLD} (has {pki.ROOT_NEW})", f"lacks CA {pki.ROOT_NEW} (has {pki.ROOT_OLD})")
    assert v["preflight"] == {"version": "1.6.0", "ok": True, "unreachable": [], "roots": {
        pki.ROOT_OLD: {"reaches": [f"cart-0{i}" for i in range(1, 8)] + ["cart-09"],
                       "refuses": {"cart-08": [old], "cart-10": [old]}},
        pki.ROOT_NEW: {"reaches": [f"cart-0{i}" for i in range(6, 10)] + ["cart-10"],
                       "refuses": {f"cart-0{i}": [new] for i in range(1, 6)}}}}
    assert report.load(out)["preflight"] == v["preflight"] == json.loads((out / "preflight.json").read_text())
    assert report.load(out)["verdict"] == "PASS"


def test_a_configuration_no_signed_release_reaches_fails_the_gate_naming_it(tmp_path):
    """cart-03 provisioned only with rogue-root: no release the lab signs reaches it (the CA-rotation deadlock).
    The gate FAILs with one line naming it, in verdict.json's why and checks_failed — and still in checks_failed
    when a test failed too (the why then names the test)."""
    configs = tmp_path / "configs"
    shutil.copytree(ROOT / "configs", configs)
    cart = configs / "carts" / "cart-03.yaml"
    text = cart.read_text()
    assert f"provisioned_cas: [{pki.ROOT_OLD}]" in text
    cart.write_text(text.replace(f"provisioned_cas: [{pki.ROOT_OLD}]", f"provisioned_cas: [{pki.ROGUE_ROOT}]"))
    rig = _lab_rig(tmp_path, configs)
    cause = (f"rollout preflight: no release of 1.6.0 signed under {pki.ROOT_OLD} or {pki.ROOT_NEW} reaches "
             f"cart-03 (trusts {pki.ROGUE_ROOT})")

    v = _gate_checks(rig, tmp_path / "gate-run")
    assert (v["verdict"], v["why"], v["checks_failed"]) == ("FAIL", cause, [cause])
    pre = v["preflight"]
    assert (pre["ok"], pre["unreachable"], pre["cause"]) == (False, ["cart-03"], cause)
    for root in (pki.ROOT_OLD, pki.ROOT_NEW):
        assert pre["roots"][root]["refuses"]["cart-03"] == [f"lacks CA {root} (has {pki.ROGUE_ROOT})"]
        assert "cart-03" not in pre["roots"][root]["reaches"]
    on_disk = report.load(tmp_path / "gate-run")
    assert (on_disk["verdict"], on_disk["checks_failed"], on_disk["preflight"]) == ("FAIL", [cause], pre)
    assert report.failing_lines(on_disk) == [f"F gate      {cause}"]

    v = _gate_checks(rig, tmp_path / "gate-run-2", failed="cart-05")
    assert v["verdict"] == "FAIL" and v["why"].startswith("1 failed: cart-05 release::candidate_from_field: ")
    assert report.load(tmp_path / "gate-run-2")["checks_failed"] == [cause]


def test_a_preflight_that_cannot_run_fails_the_gate_in_one_line(tmp_path):
    """No candidate to check (the rig cannot build the default one): the verdict is no PASS, and says why."""
    rig = _lab_rig(tmp_path, firmware=None)
    v = _gate_checks(rig, tmp_path / "gate-run")
    cause = (f"rollout preflight: could not run: {rig.path}: no 'firmware' section: the rig does not say how images "
             "are built")
    assert (v["verdict"], v["why"], v["preflight"]) == ("FAIL", cause, {"ok": False, "cause": cause})
    assert report.load(tmp_path / "gate-run")["checks_failed"] == [cause]
