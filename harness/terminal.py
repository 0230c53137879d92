"""An engineer's terminal on a cart's console (`hil console SLOT`).

The console is a `harness.console.Console`, as a test holds it: read from the moment it opens and
every received line logged, timestamped, to the session's log (what was sent is noted there too).
What arrives is also copied byte for byte to stdout, so a prompt without a newline and the firmware's
colours show as they would on a serial terminal.

On a TTY, stdin is put in raw mode: every key goes to the cart as typed (Ctrl-C too, as on a serial
line) and Ctrl-] ends the session. Otherwise (a script, a test) each line of stdin is sent with the
firmware profile's line ending, and at EOF the session ends once the cart has been quiet for
`QUIET_S`, or after `DRAIN_S` at most (a cart that keeps talking).
"""

from __future__ import annotations

import contextlib
import os
import sys
import termios
import threading
import time
import tty
from pathlib import Path
from typing import BinaryIO

from harness.config import Slot
from harness.console import Console

ESCAPE = b"\x1d"  # Ctrl-], as telnet and picocom-style terminals use it
QUIET_S = 0.5     # s without a byte from the cart after EOF on stdin: its answer is complete
DRAIN_S = 5.0     # s, the most a session waits after EOF for the cart to be quiet


class TeeConsole(Console):
    """A Console that also copies every chunk it receives, raw, to `out`, and knows when the cart last spoke."""

    def __init__(self, url: str, *, out: BinaryIO, **kw):
        super().__init__(url, on_data=self._echo, **kw)
        self._out = out
        self._rx = threading.Condition()
        self._last_rx = 0.0

    def _echo(self, data: bytes) -> None:
        with contextlib.suppress(OSError, ValueError):  # stdout closed: the log still has everything
            self._out.write(data)
            self._out.flush()
        with self._rx:
            self._last_rx = time.monotonic()
            self._rx.notify_all()

    def wait_quiet(self, quiet_s: float, limit_s: float) -> None:
        """Return once nothing has arrived for `quiet_s` (counted from now at the earliest), or after `limit_s`."""
        start = time.monotonic()
        deadline = start + limit_s
        with self._rx:
            while True:
                now = time.monotonic()
                quiet_at = max(self._last_rx, start) + quiet_s
                if now >= min(quiet_at, deadline):
                    return
                self._rx.wait(min(quiet_at, deadline) - now)


def open_console(slot: Slot, log_path: Path, out: BinaryIO | None = None) -> TeeConsole:
    """The slot's console, open and logging to `log_path`, echoing to `out` (stdout). ConsoleError if it
    cannot be opened."""
    console = TeeConsole(slot.console_url, out=out or sys.stdout.buffer, name=slot.cart_id, log_path=log_path,
                         line_ending=slot.profile.line_ending)
    console.open()
    return console


def interactive(stdin: BinaryIO | None = None) -> bool:
    """Is stdin a terminal (keys as typed, Ctrl-] exits) rather than a script's lines?"""
    return os.isatty((stdin or sys.stdin.buffer).fileno())


def run_terminal(console: TeeConsole, stdin: BinaryIO | None = None) -> int:
    """stdin to the console until Ctrl-] (a terminal) or EOF (lines from a script). Exit status 0."""
    stdin = stdin or sys.stdin.buffer
    if interactive(stdin):
        _keys(console, stdin.fileno())
    else:
        for raw in stdin:
            console.send(raw.rstrip(b"\r\n").decode("utf-8", "replace"))
        console.wait_quiet(QUIET_S, DRAIN_S)
    return 0


def _keys(console: Console, fd: int) -> None:
    """Raw keys to the cart until Ctrl-] or EOF; the terminal is restored however this ends."""
    saved = termios.tcgetattr(fd)
    tty.setraw(fd)
    try:
        while True:
            data = os.read(fd, 1024)
            head, escape, _ = data.partition(ESCAPE)
            if head:
                console.send_raw(head)
            if escape or not data:
                return
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)
