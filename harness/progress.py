"""Live progress of a run: one line per cart — tests done of its total, passed and failed so far, the time
since it began, and the test it is on and for how long — so a slow or stuck cart shows without tailing logs.

    cart-01   41/91   40 passed   1 failed   12:03  signed_update::defective_image_is_rejected[unsigned] (0:42)
    cart-02   91/91   91 passed   0 failed   25:10  done

A pytest plugin (``-p harness.progress``, after ``-p harness.report``, whose record it reads), in the
controller only. On a terminal the lines are a block redrawn in place once a second and at every test start
and end; pytest's per-test letters are left out while it runs (the block says the same per cart), so nothing
else writes between two redraws. Elsewhere (a CI log) a cart's line is printed when it starts, fails a test
or finishes, and every HEARTBEAT_S while a test runs.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from dataclasses import dataclass

import pytest

from harness.report import RECORD, RunRecord, short

HEARTBEAT_S = 30.0
REDRAW_S = 1.0


def _clock(seconds: float) -> str:
    m, s = divmod(int(max(0.0, seconds)), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m}:{s:02d}"


class CartLine:
    """What one cart has done so far, read from the run's record."""

    def __init__(self, cart: str, cases: list):
        self.cart = cart
        self.total = len(cases)
        finished = [c for c in cases if c.finished is not None]
        self.done = len(finished)
        self.passed = sum(c.outcome == "passed" for c in finished)
        self.failed = sum(c.outcome in ("failed", "error") for c in finished)
        starts = [c.started for c in cases if c.started is not None]
        self.began = min(starts) if starts else None
        self.running = [c for c in cases if c.running]
        self.latest = max((c for c in cases if c.started is not None), key=lambda c: c.started, default=None)
        self.cut_short = [c for c in cases if c.outcome == "interrupted"]
        bad = [c for c in finished if c.outcome in ("failed", "error")]
        self.last_failure = max(bad, key=lambda c: c.finished) if bad else None
        ends = [c.finished for c in cases if c.finished is not None]
        self.ended = max(ends) if ends and self.done == self.total else None

    def text(self, width: int, now: float) -> str:
        if self.began is None:
            what, elapsed = "waiting", "-"
        else:
            elapsed = _clock((self.ended or now) - self.began)
            if self.running:
                c = self.running[0]
                what = f"{short(c.scenario)} ({_clock(now - c.started)})"
            elif self.cut_short:
                what = f"interrupted during {short(self.cut_short[0].scenario)}"
            elif self.done == self.total:
                what = "done"
            else:  # between two tests (a moment)
                what = short(self.latest.scenario)
        return (f"{self.cart:<{width}} {self.done:>4}/{self.total:<4} {self.passed:>4} passed {self.failed:>3} failed "
                f"{elapsed:>8}  {what}")


@dataclass
class Shown:
    at: float
    failed: int
    done: bool


class Progress:
    def __init__(self, record: RunRecord, out: int):
        self.record = record
        self.out = out
        self.tty = os.isatty(out)
        self.lock = threading.Lock()
        self.drawn = 0                           # lines of the block on screen (terminal)
        self.shown: dict[str, Shown] = {}        # cart -> its line last printed (log)
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None
        self.note: str | None = None             # the block's last line once the run is interrupted (terminal)

    def carts(self) -> list[CartLine]:
        by: dict[str, list] = {}
        for c in list(self.record.cases.values()):  # (the hooks add to it while the redraw thread reads)
            by.setdefault(c.configuration, []).append(c)
        order = [c["id"] for c in self.record.facts.get("configurations", [])]
        names = [c for c in order if c in by] + sorted(set(by) - set(order))
        return [CartLine(n, by[n]) for n in names]

    def _write(self, text: str) -> None:
        data = text.encode(errors="replace")
        try:
            while data:
                data = data[os.write(self.out, data):]
        except OSError:  # the terminal or log went away: progress is for people, the run goes on without it
            self.stop.set()

    def draw(self, final: bool = False) -> None:
        """The block in place (terminal), or the lines of carts whose state changed (log)."""
        with self.lock:
            now = time.time()
            lines = self.carts()
            width = max([7, *(len(x.cart) for x in lines)])
            if self.tty:
                try:
                    cols = os.get_terminal_size(self.out).columns or 120  # (a pty nobody sized says 0)
                except OSError:
                    cols = 120
                frame = f"\x1b[{self.drawn}F" if self.drawn else ""
                texts = [x.text(width, now) for x in lines] + ([self.note] if self.note else [])
                frame += "".join(f"\x1b[2K{t[: cols - 1]}\n" for t in texts)
                self._write(frame)
                self.drawn = len(texts)
                return
            for x in lines:
                seen = self.shown.get(x.cart)
                finished = x.done == x.total
                failed = seen is not None and x.failed > seen.failed
                if (x.began is not None and (seen is None or failed or (finished and not seen.done)
                                             or (x.running and now - seen.at >= HEARTBEAT_S))) \
                        or (final and not (seen and seen.done)):
                    line = x.text(width, now)
                    if failed and x.last_failure is not None:
                        line += f"  — {x.last_failure.outcome.upper()} {short(x.last_failure.scenario)}: " \
                                f"{x.last_failure.cause}"
                    self._write(line + "\n")
                    self.shown[x.cart] = Shown(now, x.failed, finished)

    def _tick(self) -> None:
        while not self.stop.wait(REDRAW_S):
            self.draw()

    # -------------------------------------------------------------- hooks (after harness.report's)

    @pytest.hookimpl(trylast=True)
    def pytest_runtest_logstart(self, nodeid: str, location) -> None:
        if self.thread is None:
            self.thread = threading.Thread(target=self._tick, name="hil-progress", daemon=True)
            self.thread.start()
        self.draw()

    @pytest.hookimpl(trylast=True)
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.when in ("teardown", "???"):  # the test is over
            self.draw()

    @pytest.hookimpl(wrapper=True)
    def pytest_report_teststatus(self, report, config):
        """pytest's letter for a test (. F E s) left out: the cart's line says it."""
        res = yield
        if res and report.when in ("setup", "call", "teardown"):
            category, _, word = res
            return category, "", word
        return res

    def pytest_keyboard_interrupt(self, excinfo) -> None:
        if excinfo.type is KeyboardInterrupt and self.thread is not None:
            # `hil` passed on Ctrl-C or SIGTERM; on a terminal the block says so (hil's own line would be drawn over)
            self.note = ("interrupted — ending the tests in progress, powering the rack down, writing the reports "
                         "(Ctrl-C again to stop at once)")
            self._halt()
            self.draw()

    def _halt(self) -> None:
        self.stop.set()
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join()

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session, exitstatus) -> None:
        self._halt()
        if self.thread is not None:
            self.draw(final=True)
        os.close(self.out)


@pytest.hookimpl(trylast=True)  # after harness.report's, which makes the record
def pytest_configure(config: pytest.Config) -> None:
    record = config.stash.get(RECORD, None)
    if record is None or hasattr(config, "workerinput"):
        return
    sys.stdout.flush()
    try:  # a descriptor of its own on the terminal (or log): pytest's output capture moves fd 1 around
        out = os.dup(sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # no file behind stdout (pytest run in-process): no progress
        return
    config.pluginmanager.register(Progress(record, out), "cart-hil-progress")
