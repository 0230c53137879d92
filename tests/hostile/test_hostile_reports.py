"""Reports that cannot be written: refused before the run starts with one line and exit status 2,
and a write that fails mid-run (a real ENOSPC from /dev/full) ends the run with one line and the
verdict it had so far, never a pytest INTERNALERROR.

We run as root, where chmod does not stop writes: the unwritable places here are a path under a
file (ENOTDIR), /proc and /sys, and /dev/full; low free space is injected into os.statvfs."""

from __future__ import annotations

import os
import re
import time

import pytest

from harness import cli

TRIVIAL = """
import os

def test_runs():
    open(os.path.join({marks!r}, "ran"), "w").close()
"""


def _run(pytester, *args):
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", *args)


def _one_clean_line(res, pattern: str) -> None:
    """Exit status 2, `pattern` (fnmatch) on a line of the output, no traceback, no INTERNALERROR."""
    out = res.stdout.str() + "\n" + res.stderr.str()
    assert res.ret == 2, out
    assert "Traceback" not in out and "INTERNALERROR" not in out, out
    lines = [ln for ln in out.splitlines() if "hil: " in ln]
    assert lines, out
    import fnmatch

    assert any(fnmatch.fnmatch(ln, pattern) for ln in lines), (pattern, lines)


@pytest.fixture
def marks(tmp_path):
    d = tmp_path / "marks"
    d.mkdir()
    return d


# ---------------------------------------------------------------- before the run


def test_run_dir_under_a_file_is_refused_before_anything_runs(pytester, marks):
    blocker = pytester.path / "afile"
    blocker.write_text("not a directory")
    pytester.makepyfile(test_x=TRIVIAL.format(marks=str(marks)))
    res = _run(pytester, "--hil-reports", str(blocker / "reports"))
    _one_clean_line(res, f"Exit: hil: cannot write the run's results and consoles in {blocker}/reports/runs/*: "
                         "Not a directory")
    assert not (marks / "ran").exists(), "no test ran"


def test_junitxml_under_a_file_is_refused_before_anything_runs(pytester, marks):
    blocker = pytester.path / "afile"
    blocker.write_text("not a directory")
    pytester.makepyfile(test_x=TRIVIAL.format(marks=str(marks)))
    res = _run(pytester, "--hil-reports", str(pytester.path / "reports"), f"--junitxml={blocker}/junit.xml")
    _one_clean_line(res, f"Exit: hil: cannot write --junitxml {blocker}/junit.xml: Not a directory")
    assert not (marks / "ran").exists()


def test_alluredir_in_proc_is_refused_before_anything_runs(pytester, marks):
    pytester.makepyfile(test_x=TRIVIAL.format(marks=str(marks)))
    target = f"/proc/hil-allure-{os.getpid()}"
    res = _run(pytester, "--hil-reports", str(pytester.path / "reports"), f"--alluredir={target}")
    _one_clean_line(res, f"Exit: hil: cannot write --alluredir {target}: No such file or directory")
    assert not (marks / "ran").exists()


def test_reports_in_sys_are_refused(pytester, marks):
    pytester.makepyfile(test_x=TRIVIAL.format(marks=str(marks)))
    res = _run(pytester, "--hil-reports", "/sys/hil-reports")
    # root gets EPERM there, anyone else EACCES: either way one line, exit 2
    _one_clean_line(res, "Exit: hil: cannot write the run's results and consoles in /sys/hil-reports/runs/*: "
                         "*ermi*")
    assert not (marks / "ran").exists()


NEARLY_FULL = """
import os

_real = os.statvfs


def _nearly_full(path):  # fault injection: 4 KiB left on every file system
    st = _real(path)
    return os.statvfs_result((st.f_bsize, 4096, st.f_blocks, st.f_bfree, 1, st.f_files, st.f_ffree,
                              st.f_favail, st.f_flag, st.f_namemax))


os.statvfs = _nearly_full
"""


def test_a_nearly_full_disk_is_refused_before_anything_runs(pytester, marks):
    pytester.makeconftest(NEARLY_FULL)
    pytester.makepyfile(test_x=TRIVIAL.format(marks=str(marks)))
    res = _run(pytester, "--hil-reports", str(pytester.path / "reports"))
    _one_clean_line(res, f"Exit: hil: cannot write the run's results and consoles in {pytester.path}/reports/runs/*: "
                         "only 4 KiB free on its file system")
    assert not (marks / "ran").exists()


def test_gate_refuses_a_reports_dir_it_cannot_write(rig_factory, tmp_path, monkeypatch, capsys):
    rig = rig_factory(["cart-01"])  # loaded only: nothing starts
    root = tmp_path / "checkout"
    root.mkdir()
    (root / "reports").write_text("a file where the reports directory should be")
    monkeypatch.setattr(cli, "ROOT", root)
    rc = cli.main(["gate", "--rig", str(rig)])
    err = capsys.readouterr().err
    assert rc == 2
    assert re.fullmatch(rf"hil: cannot write reports in {re.escape(str(root))}/reports/"
                        r"gate-\d{8}-\d{6}-[0-9a-f]{6}: Not a directory\n", err), err


# ---------------------------------------------------------------- during the run

FILL_THE_DISK = """
import glob, os

REPORTS = {reports!r}
MARKS = {marks!r}

def test_a_fails():
    assert False, "boom"

def test_b_passes():
    pass

def test_c_fills_the_disk():
    # from now on results.jsonl is /dev/full: every write is a real ENOSPC
    (run,) = glob.glob(os.path.join(REPORTS, "runs", "*"))
    tmp = os.path.join(run, ".full")
    os.symlink("/dev/full", tmp)
    os.replace(tmp, os.path.join(run, "results.jsonl"))

def test_d_after():
    open(os.path.join(MARKS, "d-ran"), "w").close()
"""


def test_disk_full_mid_run_stops_with_the_verdict_so_far(pytester, marks):
    reports = pytester.path / "reports"
    pytester.makepyfile(test_fill=FILL_THE_DISK.format(reports=str(reports), marks=str(marks)))
    res = _run(pytester, "--hil-reports", str(reports))
    _one_clean_line(res, f"*hil: cannot write {reports}/runs/*/results.jsonl: No space left on device — "
                         "run stopped; so far 2 passed, 1 failed*")
    assert not (marks / "d-ran").exists(), "the run stopped at the write that failed"
    (results,) = reports.glob("runs/*/results.jsonl")
    assert results.is_symlink() and os.readlink(results) == "/dev/full"


def test_disk_full_mid_run_under_xdist(pytester, marks):
    reports = pytester.path / "reports"
    pytester.makepyfile(test_fill=FILL_THE_DISK.format(reports=str(reports), marks=str(marks)))
    res = _run(pytester, "--hil-reports", str(reports), "-n", "2")
    _one_clean_line(res, f"*hil: cannot write {reports}/runs/*/results.jsonl: No space left on device — "
                         "run stopped; so far * passed*")


# ---------------------------------------------------------------- a rack that will not start

CART_SUITE = """
def test_boots(cart):
    cart.power_on()
"""


@pytest.mark.parametrize("workers", [None, "2"], ids=["in-process", "xdist"])
def test_rack_that_will_not_start_is_one_line_and_exit_2(pytester, rig_factory, workers):
    rig_path = rig_factory(["cart-01", "cart-02"])
    run_dir = pytester.path / "reports" / "runs" / "no-rack"
    (run_dir / "rack").mkdir(parents=True)
    (run_dir / "rack" / "flash").write_text("not the rack's\n")  # where the run's rack keeps its flash files
    pytester.makepyfile(test_carts=CART_SUITE)
    args = ["--rig", str(rig_path), "--hil-run-dir", str(run_dir)]
    t0 = time.monotonic()
    res = _run(pytester, *args, *(["-n", workers] if workers else []))
    # the cause, on one line (the rack's log holds the rest); under xdist too, not "worker crashed"
    _one_clean_line(res, "*hil: *flash is not a directory: refusing to touch it*")
    out = res.stdout.str() + res.stderr.str()
    assert "crashed" not in out and " passed" not in out, out
    assert (run_dir / "rack" / "flash").read_text() == "not the rack's\n"
    assert time.monotonic() - t0 < 60


# ---------------------------------------------------------------- a console log that stops mid-run

CONSOLE_LOG_FILLS = """
import os

def test_a_disk_fills_under_the_console_log(cart):
    cart.power_on()
    full = os.open("/dev/full", os.O_WRONLY)       # the log's file from now on: a real ENOSPC on write
    os.dup2(full, cart.console._log.fileno())
    os.close(full)
    cart.power_off()
    cart.power_on()                                 # boot lines arrive, their log write fails

def test_never_runs(cart):
    open(os.path.join({marks!r}, "ran"), "w").close()
"""


def test_console_log_that_cannot_be_written_stops_the_run_with_one_line(pytester, rig_factory, marks):
    rig_path = rig_factory(["cart-01"])
    pytester.makepyfile(test_carts=CONSOLE_LOG_FILLS.format(marks=str(marks)))
    res = _run(pytester, "--rig", str(rig_path), "--hil-reports", str(pytester.path / "reports"))
    _one_clean_line(res, "*hil: cannot write */consoles/*cart-01*.log: No space left on device — run stopped*")
    assert not (marks / "ran").exists()
