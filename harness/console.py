"""A cart's serial console: always read, timestamped per line, logged, and matched with deadlines.

A `Console` opens any pyserial URL (a device path, ``socket://``, ``rfc2217://``) and starts a
background reader at once, so the bootloader's output from before power-on is captured and
nothing backs up while no test is looking. Every received line becomes a `Line` (index,
monotonic and wall time, text with ``\\r`` and control codes stripped), is kept in memory,
written to the console's log file (flushed as it arrives) and offered to listeners on the
reader thread.

`expect` searches from a cursor: the text after the last match, or after `mark()`. The
cursor is a line and a column, so the unterminated line at the end (a prompt such as
``cart> `` has no newline) can be matched, and text that arrives later on the same line (the
echo of a command typed at the prompt, or a new boot after power was cut mid-line) can be
matched without the old part of the line matching again.

If the port itself fails (a USB adapter unplugged, a ser2net connection dropped) the reader
notes ``[console] port lost: ...`` in the log and reopens the port with a bounded backoff
until `close()`; waits keep waiting for their deadline meanwhile.

Remote consoles (ser2net, a labgrid exporter): ``rfc2217://host:port`` is opened with pyserial's
``ign_set_control`` option added (unless the URL has it): ser2net in front of a UART without
modem control does not acknowledge SET_CONTROL the way pyserial waits for, and the harness sets
no control lines or flow control anyway. ``socket://host:port`` is a raw TCP byte stream. Every
write is bounded by `_WRITE_TIMEOUT`: by pyserial's ``write_timeout`` where the port supports it,
and on ``rfc2217://`` (whose client refuses ``write_timeout``) by the timeout of its TCP socket,
which since Python 3.5 bounds a whole ``sendall``.
"""

from __future__ import annotations

import io
import logging
import os
import re
import select
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import IO, Any
from urllib.parse import parse_qs, urlsplit, urlunsplit

import serial

__all__ = [
    "Console",
    "ConsoleError",
    "ConsoleTimeout",
    "Line",
    "Listener",
    "Shell",
    "ShellError",
    "port_options",
    "serial_url",
    "strip_control",
]

log = logging.getLogger(__name__)

Pattern = str | re.Pattern[str]

_READ_CHUNK = 65536            # bytes per read when the port has a file descriptor to wait on
_FALLBACK_READ_TIMEOUT = 0.05  # s, for ports without one (rfc2217://, loop://): read(in_waiting or 1)
_WRITE_TIMEOUT = 5.0           # s, a write that cannot drain in this time fails
_JOIN_TIMEOUT = 5.0            # s, close() waits this long for the reader to stop
_BACKOFF_MIN = 0.05            # s, first delay before reopening a lost port
_BACKOFF_MAX = 1.0             # s, longest delay between reopen attempts
_MAX_LINE = 16384              # bytes; a longer run without "\n" is cut into lines of this size

# CSI (colours, cursor movement), OSC (titles), two-byte escapes, and other C0 controls except tab.
_CONTROL = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]"
    r"|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?"
    r"|\x1b[ -/]*[0-~]?"
    r"|[\x00-\x08\x0a-\x1f\x7f]"
)


def strip_control(text: str) -> str:
    """``text`` without ANSI escape sequences, ``\\r`` or other control characters (tab stays)."""
    return _CONTROL.sub("", text)


def _decode(raw: bytes) -> str:
    text = raw.decode("utf-8", errors="replace")
    if text.endswith("\r"):
        text = text[:-1]
    return text if text.isprintable() else strip_control(text)   # the common case skips the regex


def _iso(t_wall: float) -> str:
    return datetime.fromtimestamp(t_wall).astimezone().isoformat(timespec="microseconds")


def _compile(pattern: Pattern) -> re.Pattern[str]:
    return pattern if isinstance(pattern, re.Pattern) else re.compile(pattern)


@dataclass(frozen=True)
class Line:
    """One received line. ``t_mono``/``t_wall``: when its terminating newline arrived."""

    index: int
    t_mono: float
    t_wall: float
    text: str


class ConsoleError(Exception):
    """A console could not do what was asked (port not open, closed while waiting, ...)."""


class ConsoleTimeout(ConsoleError):
    """Nothing matched before the deadline. Carries the evidence."""

    def __init__(self, console: str, pattern: str, waited: float, tail: str,
                 log_path: Path | None, what: str | None = None):
        self.console = console
        self.pattern = pattern
        self.waited = waited
        self.tail = tail
        self.log_path = log_path
        self.what = what
        label = f" ({what})" if what else ""
        tail_text = "\n".join(f"    | {line}" for line in tail.splitlines()) or "    (nothing received)"
        where = str(log_path) if log_path is not None else "(no log file for this console)"
        super().__init__(
            f"console {console}: no match for {pattern!r}{label} after {waited:.2f} s\n"
            f"last lines received (control codes stripped):\n{tail_text}\n"
            f"full log: {where}"
        )

    def __reduce__(self):
        return (type(self), (self.console, self.pattern, self.waited, self.tail, self.log_path, self.what))


class ShellError(ConsoleError):
    """A shell command answered with an error line."""

    def __init__(self, console: str, command: str, line: str, lines: list[str]):
        self.console = console
        self.command = command
        self.line = line
        self.lines = lines
        super().__init__(f"console {console}: command {command!r} failed: {line}")

    def __reduce__(self):
        return (type(self), (self.console, self.command, self.line, self.lines))


@dataclass(frozen=True, eq=False)
class Listener:
    """Handle returned by `Console.add_listener`; pass it to `Console.remove_listener`."""

    pattern: re.Pattern[str]
    callback: Callable[[Line, re.Match[str]], None]


class Console:
    """One serial console, read continuously from `open()` to `close()`.

    ``expect``/``expect_any``/``mark`` share one cursor: drive a console's expectations from
    one thread at a time. ``send``, ``lines``, ``tail`` and listeners are thread-safe.
    """

    def __init__(self, url: str, *, name: str, log_path: Path | None = None, baudrate: int = 115200,
                 line_ending: str = "\r\n", tail_lines: int = 20,
                 on_data: Callable[[bytes], None] | None = None):
        self.url = url
        self.name = name
        self.on_data = on_data  # every chunk received, raw, in the reader thread (a terminal echoes it)
        self.log_path = Path(log_path) if log_path is not None else None
        self.baudrate = baudrate
        self.line_ending = line_ending
        self.tail_lines = tail_lines

        self._cond = threading.Condition()           # guards lines, partial, cursor, state
        self._lines: list[Line] = []
        self._partial = ""                           # the unterminated last line, stripped
        self._pending = b""                          # its raw bytes (reader thread only)
        self._cursor = (0, 0)                        # (line index, column) where matching starts
        self._listeners: tuple[Listener, ...] = ()
        self._open = False

        self._write_lock = threading.Lock()          # guards _port swaps and writes
        self._port: serial.SerialBase | None = None
        self._port_down = ""                         # why _port is None while open (under _cond)
        self._log_lock = threading.Lock()
        self._log: IO[str] | None = None
        self.log_error: str | None = None  # why the log file stopped (a failed write), if it did
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._wake_r = self._wake_w = -1

    # ---- lifecycle -------------------------------------------------------------------------

    def open(self) -> None:
        """Open the port and start the reader. A no-op if already open."""
        if self._open:
            return
        self._end_partial_line()   # reopened after close(): the old stream's half line ends here
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log = open(self.log_path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        opened_as = serial_url(self.url)
        self._note(f"open {self.url}" + (f" (as {opened_as})" if opened_as != self.url else ""))
        try:
            port = self._open_port()
        except (serial.SerialException, OSError, ValueError) as exc:
            self._note(f"cannot open {self.url}: {exc}")
            self._close_log()
            raise ConsoleError(f"console {self.name}: cannot open {self.url}: {exc}") from exc
        self._port = port
        self._port_down = ""
        self._stop = threading.Event()
        self._wake_r, self._wake_w = os.pipe()
        with self._cond:
            self._open = True
        self._thread = threading.Thread(target=self._reader, args=(port, self._stop, self._wake_r),
                                        name=f"console-{self.name}", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop the reader, close the port and the log. A no-op if not open."""
        if not self._open:
            return
        self._stop.set()
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass
        port = self._port
        if port is not None and hasattr(port, "cancel_read"):
            try:
                port.cancel_read()
            except Exception:  # best effort; the reader also stops on _stop
                pass
        thread = self._thread
        if thread is not None:
            thread.join(_JOIN_TIMEOUT)
            if thread.is_alive():
                log.warning("console %s: reader did not stop within %.1f s", self.name, _JOIN_TIMEOUT)
        self._thread = None
        with self._write_lock:
            port, self._port = self._port, None
        if port is not None:
            _close_quietly(port)
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
        self._wake_r = self._wake_w = -1
        with self._cond:
            self._open = False
            partial = self._partial
            self._cond.notify_all()
        if partial:
            self._note(f"unterminated at close: {partial!r}")
        self._note("closed")
        self._close_log()

    def __enter__(self) -> Console:
        self.open()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Console({self.url!r}, name={self.name!r}, open={self._open})"

    @property
    def is_open(self) -> bool:
        return self._open

    @property
    def connected(self) -> bool:
        """Open and the port is up: not lost and waiting to be reopened (a dropped ser2net connection)."""
        return self._open and self._port is not None

    def wait_port(self, timeout: float, *, up: bool = True, what: str | None = None) -> None:
        """Wait until the port is up (``up=True``: at once unless it was lost and is being reopened)
        or until the reader has noticed it is lost (``up=False``). Output that arrives while a remote
        console's connection is down is lost to it, so wait for the port before powering a cart on.
        Raises ConsoleError naming what was awaited, how long, and why the port is down."""
        want = "up" if up else "lost"
        t0 = time.monotonic()
        deadline = t0 + timeout
        with self._cond:
            while True:
                if not self._open:
                    raise ConsoleError(f"console {self.name}: not open while waiting for its port to be {want}"
                                       + (f" ({what})" if what else ""))
                if (self._port is not None) == up:
                    return
                now = time.monotonic()
                if now >= deadline:
                    break
                self._cond.wait(deadline - now)
            down = self._port_down
        tail = "\n".join(f"    | {line}" for line in self.tail().splitlines()) or "    (nothing received)"
        raise ConsoleError(
            f"console {self.name}: port {self.url} not {want}" + (f" ({what})" if what else "")
            + f" after {time.monotonic() - t0:.2f} s" + (f"; down: {down}" if up and down else "")
            + f"\nlast lines received (control codes stripped):\n{tail}\n"
            f"full log: {self.log_path if self.log_path is not None else '(no log file for this console)'}"
        )

    # ---- reading ---------------------------------------------------------------------------

    def last_line(self) -> Line | None:
        """The last complete line received, or None."""
        with self._cond:
            return self._lines[-1] if self._lines else None

    def mark(self) -> int:
        """Move the expect cursor to now: nothing received so far can match. Returns the index
        the next line will have (the current unterminated line's, if there is one)."""
        return self._mark()[0]

    def _mark(self) -> tuple[int, int]:
        with self._cond:
            self._cursor = (len(self._lines), len(self._partial))
            return self._cursor

    def lines(self, start: int = 0, end: int | None = None) -> list[Line]:
        """Complete lines ``start``..``end`` (list-slice semantics)."""
        with self._cond:
            return self._lines[start:end]

    def slice_text(self, start: int, end: int | None = None) -> str:
        return "\n".join(line.text for line in self.lines(start, end))

    @property
    def partial(self) -> str:
        """The unterminated last line received so far (e.g. a prompt), stripped."""
        with self._cond:
            return self._partial

    def tail(self, n: int | None = None) -> str:
        """The last ``n`` lines (default ``tail_lines``), with the unterminated line last."""
        n = self.tail_lines if n is None else n
        if n <= 0:
            return ""
        with self._cond:
            texts = [line.text for line in self._lines[-n:]]
            if self._partial:
                texts.append(self._partial)
        return "\n".join(texts[-n:])

    def expect(self, pattern: Pattern, timeout: float, *, what: str | None = None) -> re.Match[str]:
        """Wait for ``pattern`` (``re.search``) on a line at or after the cursor, including the
        unterminated last line. On a complete line the cursor moves past that line; on the
        unterminated line it moves past the match. On the cursor's own line only the text after
        the cursor's column is searched (match offsets are relative to it), so ``^`` anchors
        there: ``^version$`` matches the echo of ``version`` typed at a ``cart> `` prompt.
        Raises ConsoleTimeout at the deadline (ConsoleError if the console is closed)."""
        rx = _compile(pattern)
        _, match, _ = self._expect({rx.pattern: rx}, timeout, what=what, label=rx.pattern)
        return match

    def expect_any(self, patterns: Mapping[str, Pattern], timeout: float, *,
                   what: str | None = None) -> tuple[str, re.Match[str]]:
        """Like expect, for several patterns: the earliest line any of them matches wins (ties go to
        the first in ``patterns``). Returns the winning key and its match."""
        if not patterns:
            raise ValueError("expect_any needs at least one pattern")
        compiled = {key: _compile(p) for key, p in patterns.items()}
        label = " | ".join(f"{key}: {rx.pattern}" for key, rx in compiled.items())
        key, match, _ = self._expect(compiled, timeout, what=what, label=label)
        return key, match

    def _expect(self, patterns: Mapping[str, re.Pattern[str]], timeout: float, *,
                what: str | None, label: str) -> tuple[str, re.Match[str], int]:
        """Returns (key, match, line index); the index is the unterminated line's if it matched there."""
        t0 = time.monotonic()
        deadline = t0 + timeout
        items = list(patterns.items())
        with self._cond:
            scanned = self._cursor[0]   # complete lines below this were searched already
            while True:
                line_i, col = self._cursor
                i = max(line_i, scanned)
                n = len(self._lines)
                while i < n:
                    text = self._lines[i].text
                    if i == line_i and col:
                        text = text[col:]
                    for key, rx in items:
                        m = rx.search(text)
                        if m is not None:
                            self._cursor = (i + 1, 0)
                            return key, m, i
                    i += 1
                scanned = n
                if self._partial and line_i <= n:
                    text = self._partial[col:] if line_i == n else self._partial
                    offset = col if line_i == n else 0
                    for key, rx in items:
                        m = rx.search(text)
                        if m is not None:
                            self._cursor = (n, offset + m.end())
                            return key, m, n
                now = time.monotonic()
                if not self._open:
                    raise ConsoleError(f"console {self.name}: not open while waiting for {label!r}"
                                       + (f" ({what})" if what else "") + f" after {now - t0:.2f} s")
                if now >= deadline:
                    break
                self._cond.wait(deadline - now)
        raise ConsoleTimeout(self.name, label, time.monotonic() - t0, self.tail(), self.log_path, what)

    # ---- writing ---------------------------------------------------------------------------

    def send(self, text: str) -> None:
        """Send ``text`` followed by the line ending."""
        self._write((text + self.line_ending).encode("utf-8"), f">> {_abridge(text)}")

    def send_raw(self, data: bytes) -> None:
        self._write(bytes(data), f">> raw {_abridge(repr(bytes(data)))}")

    def _write(self, data: bytes, note: str) -> None:
        with self._write_lock:
            port = self._port
            if port is None:
                state = "not open" if not self._open else "port lost, reopening"
                raise ConsoleError(f"console {self.name}: cannot send ({state}): {data!r}")
            try:
                port.write(data)
            except (serial.SerialException, OSError) as exc:
                raise ConsoleError(f"console {self.name}: send failed: {exc}") from exc
        self._note(note)

    # ---- listeners -------------------------------------------------------------------------

    def add_listener(self, pattern: Pattern, callback: Callable[[Line, re.Match[str]], None]) -> Listener:
        """Call ``callback(line, match)`` on the reader thread for each complete line that
        ``pattern`` matches (``re.search``), as soon as it arrives and before ``expect`` or
        ``lines()`` can see it. Keep callbacks short (the reader waits for them); an exception
        in one is logged and does not stop the reader."""
        handle = Listener(_compile(pattern), callback)
        with self._cond:
            self._listeners = (*self._listeners, handle)
        return handle

    def remove_listener(self, handle: Listener) -> None:
        """Stop calling a listener. A no-op if it is not registered."""
        with self._cond:
            self._listeners = tuple(h for h in self._listeners if h is not handle)

    # ---- internals -------------------------------------------------------------------------

    def _open_port(self) -> serial.SerialBase:
        url = serial_url(self.url)
        port = serial.serial_for_url(url, do_not_open=True, **port_options(url, self.baudrate))
        # Ports with a file descriptor are waited on with select() (no read timeout, woken by
        # close()); others are read with a short timeout.
        port.timeout = 0 if _has_fileno(port) else _FALLBACK_READ_TIMEOUT
        port.open()
        if _is_rfc2217(url):
            _bound_socket_writes(port)
        return port

    def _reader(self, port: serial.SerialBase, stop: threading.Event, wake_r: int) -> None:
        try:
            while not stop.is_set():
                try:
                    self._read_until_stopped(port, stop, wake_r)
                    return
                except Exception as exc:  # SerialException/OSError: port lost; else a bug:
                    if stop.is_set():      # either way keep the console alive and try again
                        return
                    lost = exc if isinstance(exc, serial.SerialException | OSError) else repr(exc)
                    if not isinstance(exc, serial.SerialException | OSError):
                        log.exception("console %s: reader failed", self.name)
                self._set_port(None, f"lost: {lost}")
                _close_quietly(port)
                self._end_partial_line()
                self._note(f"port lost: {lost}")
                log.warning("console %s: port lost: %s", self.name, lost)
                reopened = self._reopen(stop)
                if reopened is None:
                    return
                port = reopened
        finally:
            with self._write_lock:
                if self._port is port:
                    self._port = None
            _close_quietly(port)

    def _reopen(self, stop: threading.Event) -> serial.SerialBase | None:
        backoff = _BACKOFF_MIN
        attempts = 0
        while not stop.wait(backoff):
            attempts += 1
            try:
                port = self._open_port()
            except (serial.SerialException, OSError, ValueError) as exc:
                if attempts == 1:
                    self._note(f"reopen failed, retrying every <= {_BACKOFF_MAX:.1f} s: {exc}")
                with self._cond:
                    self._port_down = f"reopen attempt {attempts} failed: {exc}"
                backoff = min(backoff * 2, _BACKOFF_MAX)
                continue
            self._set_port(port)
            self._note(f"port reopened after {attempts} attempt(s)")
            log.info("console %s: port reopened", self.name)
            return port
        return None

    def _set_port(self, port: serial.SerialBase | None, down: str = "") -> None:
        with self._write_lock:
            self._port = port
        with self._cond:
            self._port_down = down
            self._cond.notify_all()

    def _read_until_stopped(self, port: serial.SerialBase, stop: threading.Event, wake_r: int) -> None:
        if port.timeout == 0:
            fd = port.fileno()
            while True:
                ready, _, _ = select.select([fd, wake_r], [], [])
                if wake_r in ready or stop.is_set():
                    return
                data = port.read(_READ_CHUNK)
                if data:
                    self._feed(data, time.monotonic(), time.time())
        else:
            while not stop.is_set():
                data = port.read(port.in_waiting or 1)
                if data:
                    self._feed(data, time.monotonic(), time.time())

    def _feed(self, data: bytes, t_mono: float, t_wall: float) -> None:
        buf = self._pending + data
        if b"\n" in data:
            *complete, rest = buf.split(b"\n")
        else:
            complete, rest = [], buf
        while len(rest) > _MAX_LINE:
            complete.append(rest[:_MAX_LINE])
            rest = rest[_MAX_LINE:]
        self._pending = rest
        self._publish(complete, _decode(rest) if rest else "", t_mono, t_wall)
        if self.on_data is not None:
            self.on_data(data)

    def _end_partial_line(self) -> None:
        """The stream broke (port lost): what was received of the last line becomes a line."""
        if self._pending:
            raw, self._pending = self._pending, b""
            self._publish([raw], "", time.monotonic(), time.time())

    def _publish(self, complete: list[bytes], partial: str, t_mono: float, t_wall: float) -> None:
        first = len(self._lines)   # only the reader thread appends
        new = [Line(first + k, t_mono, t_wall, _decode(raw)) for k, raw in enumerate(complete)]
        # Listeners run before the lines are published: by the time expect() can return a line,
        # every listener on it has returned (a power cut on a console line has happened).
        listeners = self._listeners
        if listeners and new:
            for line in new:
                for handle in listeners:
                    m = handle.pattern.search(line.text)
                    if m is not None:
                        try:
                            handle.callback(line, m)
                        except Exception as exc:  # a listener must not kill the reader
                            log.exception("console %s: listener %r failed", self.name, handle.callback)
                            self._note(f"listener {handle.callback!r} raised {exc!r} on line {line.index}")
        with self._cond:
            if new:
                self._lines.extend(new)
            self._partial = partial
            self._cond.notify_all()
        if new:
            stamp = _iso(t_wall)   # one read, one time: the same for all its lines
            self._write_log("".join(f"{stamp} {line.text}\n" for line in new))

    def _note(self, text: str) -> None:
        """A harness note in the log (never a Line: it cannot match)."""
        self._write_log(f"{_iso(time.time())} [console] {text}\n")

    def _write_log(self, text: str) -> None:
        """Append to the log file. A write that fails (disk full, file system gone read-only) stops
        the log and is kept in `log_error` for the run to end on; it never touches the port or the
        lines in memory, so waits on this console go on working."""
        if self._log is None:
            return
        with self._log_lock:
            if self._log is None:
                return
            try:
                self._log.write(text)
                self._log.flush()
            except OSError as exc:
                self.log_error = f"cannot write {self.log_path}: {exc.strerror or exc}"
                f, self._log = self._log, None
                try:
                    f.close()
                except OSError:
                    pass

    def _close_log(self) -> None:
        with self._log_lock:
            f, self._log = self._log, None
        if f is not None:
            f.close()


def _is_rfc2217(url: str) -> bool:
    return url.lower().startswith("rfc2217://")


def serial_url(url: str) -> str:
    """The URL pyserial opens for a rig's console URL: an ``rfc2217://`` URL gets the
    ``ign_set_control`` option unless it already has it (any other URL is unchanged)."""
    if not _is_rfc2217(url):
        return url
    parts = urlsplit(url)
    if "ign_set_control" in parse_qs(parts.query, keep_blank_values=True):
        return url
    query = f"{parts.query}&ign_set_control" if parts.query else "ign_set_control"
    return urlunsplit(parts._replace(query=query))


def port_options(url: str, baudrate: int = 115200) -> dict[str, Any]:
    """Keyword arguments for ``serial.serial_for_url(url, ...)``. pyserial's RFC 2217 client
    raises NotImplementedError on ``write_timeout`` when it opens: its writes are bounded by
    `_bound_socket_writes` instead."""
    options: dict[str, Any] = {"baudrate": baudrate}
    if not _is_rfc2217(url):
        options["write_timeout"] = _WRITE_TIMEOUT
    return options


def _bound_socket_writes(port: serial.SerialBase) -> None:
    """An RFC 2217 port writes with ``socket.sendall`` on a socket in timeout mode (pyserial
    connects it with a 5 s timeout); make that bound ours. With a timeout a ``sendall`` that
    cannot finish in time raises ``TimeoutError``, which pyserial turns into SerialException."""
    sock = getattr(port, "_socket", None)
    if isinstance(sock, socket.socket):
        sock.settimeout(_WRITE_TIMEOUT)
    else:  # a pyserial that no longer keeps its socket there: say so rather than block unbounded
        _close_quietly(port)
        raise serial.SerialException(f"{type(port).__name__} has no socket to bound its writes with; "
                                     f"cannot guarantee a {_WRITE_TIMEOUT:.0f} s write bound")


def _has_fileno(port: Any) -> bool:
    return type(port).fileno is not io.RawIOBase.fileno


def _close_quietly(port: serial.SerialBase) -> None:
    try:
        port.close()
    except Exception:  # the port is being abandoned anyway
        pass


class Shell:
    """A firmware shell on a console: send a command, skip its echo, collect lines until the prompt."""

    def __init__(self, console: Console, prompt: str = "cart> ", echo: bool = True,
                 error_pattern: str = r"^error: "):
        self.console = console
        self.prompt = prompt
        self.echo = echo
        self._prompt_rx = re.compile("^" + re.escape(prompt))
        self._error_rx = re.compile(error_pattern)

    def run(self, command: str, timeout: float = 5.0) -> list[str]:
        """Run ``command``; return its reply lines (between the echo and the next prompt).
        Raises ShellError if a reply line matches the error pattern, ConsoleTimeout if the
        echo or the prompt does not come within ``timeout`` (for the whole command)."""
        console = self.console
        deadline = time.monotonic() + timeout
        first, col = console._mark()
        console.send(command)
        if self.echo:
            # the echo is the command alone on its line (after the prompt it was typed at): an unsolicited
            # line that merely ends with the command's words ("OTA: rejected ...: same version") is not it
            echo_rx = re.compile(rf"^(?:{re.escape(self.prompt.strip())}\s*)?{re.escape(command)}\s*$")
            _, _, echo_i = console._expect({"echo": echo_rx}, max(0.0, deadline - time.monotonic()),
                                           what=f"echo of {command!r}", label=echo_rx.pattern)
            first, col = echo_i + 1, 0
        _, _, prompt_i = console._expect({"prompt": self._prompt_rx}, max(0.0, deadline - time.monotonic()),
                                         what=f"prompt after {command!r}", label=self._prompt_rx.pattern)
        replies = [line.text for line in console.lines(first, prompt_i)]
        if replies and col:
            replies[0] = replies[0][col:]
        for text in replies:
            if self._error_rx.search(text):
                raise ShellError(console.name, command, text, replies)
        return replies


def _abridge(text: str, limit: int = 160) -> str:
    """What the log keeps of a sent text: a bulk transfer (an image in base64) is not copied in."""
    if len(text) <= limit and "\n" not in text:
        return text
    first = text.split("\n", 1)[0][:limit]
    return f"{first}... ({len(text)} chars sent)"
