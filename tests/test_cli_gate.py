"""The gate's verdict is earned: it reads the run's JUnit XML, and a run that ran nothing or skipped a
scenario is no PASS (issue: `hil gate --tag <none>` used to skip everything and print PASS)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from harness.cli import junit_tally

SUITE = textwrap.dedent('''
    import pytest

    @pytest.fixture
    def cart(request):
        request.node.user_properties.append(("cart", request.param))
        return request.param

    @pytest.mark.parametrize("cart", ["cart-01", "cart-02"], indirect=True)
    def test_runs(cart):
        pass

    @pytest.mark.parametrize("cart", ["cart-01"], indirect=True)
    def test_skips(cart):
        pytest.skip("the rig cannot do this")

    @pytest.fixture
    def breaks_after():
        yield
        raise RuntimeError("teardown")

    def test_teardown_error(breaks_after):
        pass

    @pytest.fixture
    def build(request):
        request.node.user_properties.append(("fault_build", request.param))
        return request.param

    @pytest.mark.parametrize("build", ["caught_build"], indirect=True)
    def test_self_check_caught(build, record_property):
        record_property("caught", "cart-01: crash loop: crashed 3 times")

    @pytest.mark.parametrize("build", ["missed_build"], indirect=True)
    def test_self_check_missed(build):
        assert False, "the fault build went through: confirmed"
''')


def junit(tmp_path, *args):
    (tmp_path / "test_gate_like.py").write_text(SUITE)
    out = tmp_path / "junit.xml"
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:cart_hil",
                    "-p", "no:hypothesispytest", f"--junitxml={out}", "test_gate_like.py", *args],
                   cwd=tmp_path, capture_output=True, check=False)
    return junit_tally(out)


def test_a_skip_is_no_pass_and_a_teardown_error_is_one_failure(tmp_path):
    tally = junit(tmp_path, "-k", "not self_check")
    assert (tally.passed, tally.failed, tally.skipped) == (2, 1, ["test_skips[cart-01]"])
    assert tally.per_cart == {"cart-01": 2, "cart-02": 1}
    assert tally.unearned().startswith("1 scenario(s) skipped — a skipped scenario is not a pass")
    assert "scenarios per cart: cart-01 2, cart-02 1" in tally.summary()


def test_a_selection_that_runs_nothing_is_no_verdict(tmp_path):
    assert junit(tmp_path, "-k", "no_such_test").unearned() == \
        "nothing ran (no scenario matched the selection): no verdict"


def test_self_check_lines_say_caught_with_the_gates_reason_or_missed(tmp_path):
    lines = junit(tmp_path, "-k", "self_check").self_check_lines()
    assert len(lines) == 2
    assert lines[0].split()[:2] == ["caught", "caught_build"] and "crash loop: crashed 3 times" in lines[0]
    assert lines[1].split()[:2] == ["MISSED", "missed_build"] and "the fault build went through" in lines[1]


def test_all_passed_is_earned(tmp_path):
    tally = junit(tmp_path, "-k", "test_runs")
    assert tally.unearned() is None and tally.passed == 2


def test_no_junit_xml_is_no_verdict(tmp_path):
    assert junit_tally(tmp_path / "missing.xml").unearned() == "no JUnit XML was written: no verdict"


def test_ctrl_c_ends_the_run_with_its_reports_one_line_and_nothing_left(rig_factory, tmp_path):
    """Ctrl-C at a terminal reaches `hil` and pytest alike (one process group): the run stops, writes its
    JUnit XML, powers its rack down, and `hil` says INTERRUPTED in one line, exit 130, no traceback."""
    import os
    import re
    import signal
    import time
    from pathlib import Path

    run = tmp_path / "run"
    virtual = {"run_dir": str(run), "flash_time_scale": 0.05, "pki": str(tmp_path / "pki")}
    rig = rig_factory(["cart-01"], virtual=virtual,
                      firmware={"build": ["{python}", "-m", "vrack", "build", "--version", "{version}", "-o", "{out}",
                                          "{faults}"]})
    proc = subprocess.Popen([sys.executable, "-m", "harness.cli", "sweep", "--rig", str(rig), "-n", "1"],
                            cwd=Path(__file__).resolve().parent.parent, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 60
    while not list(run.glob("logs/*")):  # the rack has powered a cart on: the sweep has begun
        assert time.monotonic() < deadline and proc.poll() is None, "the sweep never reached a cart"
        time.sleep(0.2)
    time.sleep(3.0)  # well inside the sweep (a minute or more on one cart)
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=150)
    assert proc.returncode == 130, (proc.returncode, out[-2000:], err[-2000:])
    assert "Traceback" not in err, err[-3000:]
    line = next(x for x in out.splitlines() if x.startswith("hil sweep: INTERRUPTED — no verdict"))
    reports = Path(re.search(r"reports in (\S+)$", line).group(1))
    assert (reports / "junit.xml").exists(), line
    left = subprocess.run(["pgrep", "-f", str(run)], capture_output=True, text=True).stdout.split()
    assert not left, f"processes of the interrupted run still running: {left}"
