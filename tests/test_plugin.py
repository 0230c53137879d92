"""The pytest plugin, run as a user runs it (a pytest subprocess) against small virtual rigs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from harness.config import Rig
from harness.rackctl import rack_state

SUITE = """
def test_boots(cart):
    banner = cart.power_on()
    assert banner.config == cart.id

def test_version(cart):
    cart.power_on()
    assert cart.version()
"""


def run(pytester, *args):
    return pytester.runpytest_subprocess("--hil-reports", str(pytester.path / "reports"), *args)


def _results(pytester) -> list[dict]:
    files = list(Path(pytester.path / "reports").glob("runs/*/results.jsonl"))
    assert len(files) == 1
    return [json.loads(x) for x in files[0].read_text().splitlines()]


def test_ids_are_config_ids_and_rack_started_and_stopped(pytester, rig_factory):
    rig_path = rig_factory(["cart-01", "cart-05"])
    pytester.makepyfile(test_scenario=SUITE)
    res = run(pytester, "--rig", str(rig_path), "-v", "-p", "no:cacheprovider")
    res.assert_outcomes(passed=4)
    res.stdout.fnmatch_lines(["*test_boots?cart-01? PASSED*", "*test_version?cart-05? PASSED*"])
    rig = Rig.load(rig_path)
    assert rack_state(rig) is None, "the plugin stops the rack it started"
    recs = _results(pytester)
    assert {(r["cart"], r["outcome"]) for r in recs} == {("cart-01", "passed"), ("cart-05", "passed")}
    logs = list(Path(pytester.path / "reports").glob("runs/*/consoles/cart-05.log"))
    assert logs and "BOOT: bl=" in logs[0].read_text()


def test_select_by_tag_under_xdist_groups_each_cart_on_one_worker(pytester, rig_factory):
    rig_path = rig_factory(["cart-01", "cart-06", "cart-07"])
    pytester.makepyfile(test_scenario=SUITE + "".join(f"""
def test_quick_{i}(cart):
    assert cart.id
""" for i in range(6)))
    res = run(pytester, "--rig", str(rig_path), "--tag", "rev-d", "-n", "3", "-v")
    res.assert_outcomes(passed=16)
    assert "cart-01" not in res.stdout.str()
    workers: dict[str, set] = {}
    for line in res.stdout.lines:
        m = re.search(r"\[(gw\d+)\].* PASSED .*::test_\w+\[(cart-\d+)\]", line)
        if m:
            workers.setdefault(m.group(2), set()).add(m.group(1))
    assert sorted(workers) == ["cart-06", "cart-07"] and sum(map(len, workers.values())) == 2, workers
    assert all(len(v) == 1 for v in workers.values()), workers


def test_broken_cart_fails_with_console_tail_and_others_go_on(pytester, rig_factory):
    # cart-03's first use is the power-on that sets its clock to its configured drift, before the test body
    rig_path = rig_factory(["cart-01", "cart-03"])
    rig = Rig.load(rig_path)
    geo = rig.slot_for("cart-03").cart.flash
    run_dir = pytester.path / "reports" / "runs" / "broken-cart"
    flash = run_dir / "rack" / "flash" / "slot02.bin"  # the run's private rack (docs/interfaces.md, "Isolated runs")
    flash.parent.mkdir(parents=True)
    flash.write_bytes(b"\xff" * (10 * geo.page_size + 2 * geo.slot_size))  # erased: docs/flash-layout.md's size
    pytester.makepyfile(test_scenario=SUITE)
    res = run(pytester, "--rig", str(rig_path), "--hil-run-dir", str(run_dir), "-v", "-rs")
    res.assert_outcomes(passed=2, failed=1, skipped=1)
    out = res.stdout.str()
    assert "no bootable image" in out
    # the cause once, on the test it happened in; the cart's next test is not run and says why in one line
    assert re.search(r"SKIPPED \[1\] .*not run: cart-03 was quarantined during \S*test_scenario.py::"
                     r"test_boots\[cart-03\]: no boot: BL: no bootable image \(BL: slot A invalid: erased; "
                     r"BL: slot B invalid: erased\)", out), out
    recs = _results(pytester)
    assert {r["outcome"] for r in recs if r["cart"] == "cart-01"} == {"passed"}
    assert rack_state(rig) is None


CLOCK_SUITE = """
import datetime as dt

def test_clock(cart):
    cart.power_on()
    off = (cart.clock() - dt.datetime.now(dt.UTC)).total_seconds() - cart.config.clock.drift_s
    assert abs(off) <= 5, f"{cart.id}: RTC {off:+.0f} s off its configured drift"
"""


def test_a_clock_left_skewed_is_put_back_even_at_a_configured_drift_of_zero(pytester, rig_factory):
    """An earlier run left cart-03's battery-backed RTC a day ahead; its configuration has no drift (0): the
    plugin sets it to UTC all the same before the first test on it, as it sets cart-02's to its 95 s."""
    rig_path = rig_factory(["cart-03", "cart-02"])
    run_dir = pytester.path / "reports" / "runs" / "skewed-clock"
    rtc = run_dir / "rack" / "rtc"  # the run's private rack: the RTC offset files (docs/interfaces.md)
    rtc.mkdir(parents=True)
    for slot in ("slot01", "slot02"):
        (rtc / slot).write_text("86400.0\n")
    pytester.makepyfile(test_scenario=CLOCK_SUITE)
    res = run(pytester, "--rig", str(rig_path), "--hil-run-dir", str(run_dir), "-v")
    res.assert_outcomes(passed=2)


def test_bad_rig_is_one_line_and_nothing_starts(pytester, rig_factory):
    rig_path = rig_factory(["cart-01", "cart-02"])
    text = rig_path.read_text().replace("dialect: rigol-dp800", "dialect: rigol-dp9000")
    rig_path.write_text(text)
    pytester.makepyfile(test_scenario=SUITE)
    res = run(pytester, "--rig", str(rig_path))
    assert res.ret == 2
    (line,) = res.stderr.lines
    assert line.startswith(f"Exit: hil: {rig_path}: supply psu-r: dialect: unknown dialect 'rigol-dp9000'; known: ")
    assert "Traceback" not in res.stdout.str()
    assert not (rig_path.parent / "run").exists(), "nothing started"


@pytest.mark.parametrize("workers", [[], ["-n", "2"]], ids=["in-process", "xdist"])
def test_unusable_default_rig_is_one_line_once_collected(pytester, workers):
    # no --rig: the default rig (rigs/virtual.yaml under the rootdir; absent here) is read when a
    # test needs a cart, while collecting; the run ends right after collection, nothing runs
    pytester.makepyfile(test_scenario=SUITE)
    res = run(pytester, *workers)
    out = res.stdout.str() + res.stderr.str()
    assert res.ret == 2, out
    assert f"hil: {pytester.path}/rigs/virtual.yaml: cannot read: No such file or directory" in out
    assert "Traceback" not in out and "crashed" not in out and "ERROR" not in out, out


def test_selection_nobody_matches_is_refused_before_anything_runs(pytester, rig_factory):
    rig_path = rig_factory(["cart-01", "cart-02"])
    pytester.makepyfile(test_scenario=SUITE)
    res = run(pytester, "--rig", str(rig_path), "--tag", "rev-q")
    assert res.ret == 2
    assert res.stderr.lines == [f"Exit: hil: {rig_path}: no cart of the rig has tag 'rev-q'"]
    res = run(pytester, "--rig", str(rig_path), "--cart", "cart-07")
    assert res.ret == 2
    assert res.stderr.lines == [f"Exit: hil: {rig_path}: no slot holds cart 'cart-07'"]
    assert not (rig_path.parent / "run").exists(), "nothing started"
