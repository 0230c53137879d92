"""Bench power supplies: the `Supply` protocol and `ScpiSupply`, the base of every SCPI driver.

A dialect driver is mostly command templates (see keysight.py, rigol.py, ...). The base
class does the rest, the same way for every dialect:

- one VISA session (pyvisa, ``@py`` backend, ``\\n`` terminations), opened lazily;
- a per-instrument lock (threads: RLock; processes: ``fcntl.flock`` on a lock file) held
  around each command sequence, so select-then-command on a shared supply never interleaves;
- a confirmation query after a sequence that has none (``*OPC?``), so a lost or dead
  connection shows up as an error instead of a silently dropped ``OUTP OFF``;
- reconnect on failure: the whole sequence is retried on a fresh session (tenacity), then a
  `SupplyError` names the supply, the resource, the command, the attempts and the time spent.

Every wait is bounded: VISA I/O by ``timeout_ms``, the retries by attempts and a deadline,
the lock by ``lock_timeout_s``.
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import os
import re
import select
import socket
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import pyvisa
from pyvisa import errors as visa_errors
from pyvisa import rname
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, stop_before_delay, wait_exponential

LOCK_DIR_ENV = "CART_HIL_LOCK_DIR"
DEFAULT_LOCK_DIR = "/tmp/cart-hil-locks"


def shared_dir(d: Path) -> None:
    """Make `d` (and its parent) a directory every user of this machine can lock in: sticky, 1777 (a lab
    machine is shared; a lock file another user cannot create is a run that cannot start)."""
    if d.is_dir():
        return
    d.parent.parent.mkdir(parents=True, exist_ok=True)
    for p in (d.parent, d):
        try:
            os.mkdir(p, 0o1777)
        except FileExistsError:
            continue
        os.chmod(p, 0o1777)  # past the umask


class PowerError(Exception):
    """Base of the power errors."""


class SupplyError(PowerError):
    """The supply did not do what was asked: no answer, lost connection, unexpected reply."""


class PowerLimitError(PowerError, ValueError):
    """A value above the cart's limits was refused before anything was sent."""


class LinkError(OSError):
    """The session to the instrument is unusable (cannot open, garbled or missing reply)."""


@dataclass(frozen=True)
class Identity:
    """A parsed ``*IDN?`` reply."""

    manufacturer: str
    model: str
    serial: str
    firmware: str
    raw: str

    @classmethod
    def parse(cls, raw: str) -> Identity:
        fields = [f.strip() for f in raw.strip().split(",")]
        fields += [""] * (4 - len(fields))
        return cls(fields[0], fields[1], fields[2], ",".join(fields[3:]), raw.strip())


@runtime_checkable
class Supply(Protocol):
    """What the harness needs from a programmable supply. Channels are 1-based."""

    name: str
    resource: str
    channels: int

    def identify(self) -> Identity: ...
    def on(self, ch: int) -> None: ...
    def off(self, ch: int) -> None: ...
    def is_on(self, ch: int) -> bool: ...
    def set_voltage(self, ch: int, volts: float) -> None: ...
    def set_current_limit(self, ch: int, amps: float) -> None: ...
    def voltage_setpoint(self, ch: int) -> float: ...
    def current_limit_setpoint(self, ch: int) -> float: ...
    def measure_voltage(self, ch: int) -> float: ...
    def measure_current(self, ch: int) -> float: ...
    def safe_state(self, channels: Iterable[int]) -> None: ...
    def close(self) -> None: ...


class Link(Protocol):
    """One open session to an instrument: the seam where tests put a recording fake."""

    def write(self, command: str) -> None: ...
    def query(self, command: str) -> str: ...
    def close(self) -> None: ...


# ------------------------------------------------------------------------ VISA
class VisaLink:
    """A pyvisa-py session (``@py``), ``\\n`` terminated, TCP_NODELAY on raw sockets."""

    def __init__(self, resource_manager: pyvisa.ResourceManager, resource: str, timeout_ms: int):
        self.resource = resource
        try:
            self._inst: Any = resource_manager.open_resource(
                resource,
                open_timeout=timeout_ms,
                timeout=timeout_ms,
                read_termination="\n",
                write_termination="\n",
            )
        except (visa_errors.Error, OSError):
            raise
        except Exception as exc:  # pyvisa-py raises a bare Exception("could not connect: ...")
            raise LinkError(f"cannot open {resource}: {exc}") from exc
        self._sock = _session_socket(self._inst)
        if self._sock is not None:
            # pyvisa-py's non-blocking connect reports success even when refused: ask the socket.
            err = self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self.close()
                raise ConnectionRefusedError(err, f"cannot connect to {resource}: {os.strerror(err)}")
            self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def write(self, command: str) -> None:
        self._inst.write(command)

    def query(self, command: str) -> str:
        return self._inst.query(command)

    def send_now(self, data: bytes) -> None:
        """Send pre-encoded, terminated bytes in one write and never block (a cut's OFF): straight
        to the socket of a SOCKET resource, else through the VISA session's write_raw."""
        if self._sock is None:
            self._inst.write_raw(data)
            return
        sent = self._sock.send(data, socket.MSG_DONTWAIT)  # BlockingIOError if the send buffer is full
        if sent != len(data):
            raise LinkError(f"{self.resource}: sent {sent} of {len(data)} bytes of {data!r} (send buffer full)")

    def peer_closed(self) -> bool:
        """True if the instrument closed the connection (FIN or reset): checked right after a cut's send."""
        if self._sock is None:
            return False
        try:
            poller = select.poll()
            poller.register(self._sock, select.POLLRDHUP | select.POLLHUP | select.POLLERR)
            return bool(poller.poll(0))
        except (OSError, ValueError):
            return True

    def is_stale(self) -> bool:
        """True if the peer closed the connection or sent bytes nobody asked for."""
        if self._sock is None:
            return False
        try:
            readable, _, _ = select.select([self._sock], [], [], 0)
        except (OSError, ValueError):
            return True
        return bool(readable)  # EOF, reset or unsolicited data: all mean "start afresh"

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._inst.close()


def _session_socket(inst: Any) -> socket.socket | None:
    """The raw socket under a pyvisa-py SOCKET session, or None for other kinds of resource."""
    try:
        sock = inst.visalib.sessions[inst.session].interface
    except Exception:
        return None
    return sock if isinstance(sock, socket.socket) else None


def canonical_resource(resource: str) -> str:
    """``TCPIP::h::5025::SOCKET`` and ``TCPIP0::h::5025::SOCKET`` name the same instrument."""
    try:
        return str(rname.parse_resource_name(resource.strip()))
    except Exception:
        return resource.strip()


# ------------------------------------------------------------------------ lock
class InstrumentLock:
    """Mutual exclusion per instrument, across threads (RLock) and processes (flock).

    Reentrant within a thread. The lock file also carries the holder's pid (for the error
    message when waiting times out) and the time of the last command sent to the instrument
    (CLOCK_MONOTONIC is system-wide), so command pacing holds across processes too.
    """

    _RECORD = 40  # fixed-width "pid last_command_ns" record

    def __init__(self, path: Path, *, timeout_s: float, owner: str):
        self.path = path
        self.timeout_s = timeout_s
        self.owner = owner
        self._pid = os.getpid()
        self._thread_lock = threading.RLock()
        self._depth = 0
        self._fd: int | None = None
        self._held_fd: int | None = None
        self.last_command_ns = 0  # valid while held
        self._written_ns = 0

    def _fresh_after_fork(self) -> None:
        # A forked child shares the parent's open file description, hence its flock: reopen.
        if self._pid != os.getpid():
            self._pid = os.getpid()
            self._thread_lock = threading.RLock()
            self._depth = 0
            self._fd = None
            self._held_fd = None

    def _file(self) -> int:
        if self._fd is None:
            shared_dir(self.path.parent)
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        return self._fd

    def acquire(self, timeout_s: float | None = None, *, record: bool = True) -> None:
        """Take the lock, waiting at most ``timeout_s`` (default: the lock's own timeout).

        ``record=False`` (a cut firing on an unpaced instrument) skips reading and writing the
        lock file's record when the lock is free: no pacing time is needed, and the holder's pid
        is only for the message of someone who waits."""
        self._fresh_after_fork()
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        started = time.monotonic()
        if not self._thread_lock.acquire(timeout=timeout_s):
            raise SupplyError(
                f"{self.owner}: waited {timeout_s:.3f} s for the instrument lock held by another "
                f"thread of this process (pid {os.getpid()})"
            )
        if self._depth == 0:
            try:
                self._flock(started + timeout_s, timeout_s, record)
            except BaseException:
                self._thread_lock.release()
                raise
        self._depth += 1

    def _flock(self, deadline: float, timeout_s: float, record: bool = True) -> None:
        fd = self._file()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self._held_fd = fd
            if not record:
                self._written_ns = self.last_command_ns  # nothing to write back at release
                return
        except BlockingIOError:
            # Contended: queue in the kernel (woken as soon as the holder lets go) from a helper
            # thread, because a blocking flock cannot time out and polling starves the waiter.
            waiter = _FlockWaiter(self.path)
            if not waiter.wait(max(0.0, deadline - time.monotonic())):
                holder = self._read_record()[0]
                raise SupplyError(
                    f"{self.owner}: waited {timeout_s:.3f} s for the instrument lock {self.path} "
                    f"held by pid {holder or '?'}"
                ) from None
            self._held_fd = waiter.fd
        self.last_command_ns = self._read_record()[1]
        self._write_record()
        self._written_ns = self.last_command_ns

    def release(self) -> None:
        self._depth -= 1
        if self._depth == 0:
            held, self._held_fd = self._held_fd, None
            try:
                if self.last_command_ns != self._written_ns:
                    self._write_record()
            finally:
                if held is not None:
                    fcntl.flock(held, fcntl.LOCK_UN)
                    if held != self._fd:
                        os.close(held)
        self._thread_lock.release()

    def _read_record(self) -> tuple[int, int]:
        try:
            pid, last = os.pread(self._file(), self._RECORD, 0).split()
            return int(pid), int(last)
        except (ValueError, OSError):
            return 0, 0

    def _write_record(self) -> None:
        record = f"{os.getpid()} {self.last_command_ns}".ljust(self._RECORD - 1) + "\n"
        os.pwrite(self._file(), record.encode("ascii"), 0)

    def close(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = None

    def __enter__(self) -> InstrumentLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class _FlockWaiter:
    """A blocking flock on its own file description, in a thread the caller can stop waiting for.

    If the caller gives up, the thread keeps waiting and drops the lock as soon as it gets it.
    """

    def __init__(self, path: Path):
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        self._got = threading.Event()
        self._mutex = threading.Lock()
        self._abandoned = False
        threading.Thread(target=self._run, daemon=True, name=f"flock-{path.name}").start()

    def _run(self) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        with self._mutex:
            if self._abandoned:
                fcntl.flock(self.fd, fcntl.LOCK_UN)
                os.close(self.fd)
            else:
                self._got.set()

    def wait(self, timeout_s: float) -> bool:
        self._got.wait(timeout_s)
        with self._mutex:
            if not self._got.is_set():
                self._abandoned = True
            return self._got.is_set()


def lock_path(resource: str, lock_dir: str | os.PathLike[str] | None = None) -> Path:
    directory = Path(lock_dir or os.environ.get(LOCK_DIR_ENV) or DEFAULT_LOCK_DIR)
    return directory / (re.sub(r"[^A-Za-z0-9._-]+", "_", canonical_resource(resource)) + ".lock")


# --------------------------------------------------------------------- driver
_RETRYABLE = (OSError, visa_errors.VisaIOError, visa_errors.InvalidSession)


def is_query(command: str) -> bool:
    return "?" in command.split(" ", 1)[0]


@dataclass
class _Progress:
    command: str = ""
    attempts: int = 0


class ScpiSupply:
    """A supply reached through VISA. Subclasses fill in the command templates.

    Templates are tuples of commands formatted with ``ch`` (channel) and ``value``; a
    command whose header contains ``?`` is a query. Parsers turn the replies into values.
    """

    dialect: ClassVar[str] = ""
    #: Sent after a sequence that has no query, to learn that the instrument got it.
    confirm: ClassVar[str | None] = "*OPC?"
    #: Minimum time between two commands to this instrument (physics of slow firmware).
    command_interval_s: float = 0.0
    #: False for an instrument whose output command switches every output at once (a Keysight
    #: E3631A's ``OUTP``): a cut on one cart would cut its neighbours, so arming one is refused.
    PER_CHANNEL_OUTPUT: ClassVar[bool] = True

    IDENTIFY: ClassVar[tuple[str, ...]] = ("*IDN?",)
    #: Pops the oldest entry of the instrument's error queue ("0,..." when empty). Sent after every
    #: setting in the same sequence, where it also confirms that the instrument got the setting.
    ERROR_QUERY: ClassVar[str] = "SYST:ERR?"
    #: A setting check reads at most this many entries (real queues hold 10-30): none is left behind.
    MAX_ERRORS: ClassVar[int] = 16
    #: The instrument's model, for error messages: from the rig (open_supply) or from identify().
    model: str | None = None
    ON: ClassVar[tuple[str, ...]] = ()
    OFF: ClassVar[tuple[str, ...]] = ()
    IS_ON: ClassVar[tuple[str, ...]] = ()
    SET_VOLTAGE: ClassVar[tuple[str, ...]] = ()
    SET_CURRENT_LIMIT: ClassVar[tuple[str, ...]] = ()
    VOLTAGE_SETPOINT: ClassVar[tuple[str, ...]] = ()
    CURRENT_LIMIT_SETPOINT: ClassVar[tuple[str, ...]] = ()
    MEASURE_VOLTAGE: ClassVar[tuple[str, ...]] = ()
    MEASURE_CURRENT: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        name: str,
        resource: str,
        channels: int,
        *,
        timeout_ms: int = 1000,
        attempts: int = 3,
        backoff_s: float = 0.05,
        open_link: Callable[[], Link] | None = None,
        lock_dir: str | os.PathLike[str] | None = None,
        lock_timeout_s: float | None = None,
    ):
        if channels < 1:
            raise ValueError(f"supply {name}: channels must be >= 1, got {channels}")
        if attempts < 1:
            raise ValueError(f"supply {name}: attempts must be >= 1, got {attempts}")
        self.name = name
        self.resource = resource
        self.channels = channels
        self.timeout_ms = timeout_ms
        self.attempts = attempts
        self.backoff_s = backoff_s
        timeout_s = timeout_ms / 1000.0
        # An attempt is an open plus I/O, each bounded by the timeout; no attempt starts after this.
        self.deadline_s = attempts * (2 * timeout_s + backoff_s * 2**attempts)
        self._open_link = open_link or self._open_visa
        self._rm: pyvisa.ResourceManager | None = None
        self._link: Link | None = None
        self._lock = InstrumentLock(
            lock_path(resource, lock_dir),
            timeout_s=lock_timeout_s if lock_timeout_s is not None else 3 * self.deadline_s + 1.0,
            owner=f"supply {name} ({resource})",
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {self.resource!r}, channels={self.channels})"

    # ------------------------------------------------------------ session
    def _open_visa(self) -> Link:
        if self._rm is None:
            self._rm = pyvisa.ResourceManager("@py")
        try:
            return VisaLink(self._rm, self.resource, self.timeout_ms)
        except rname.InvalidResourceName as exc:  # a config error: retrying will not help
            raise SupplyError(f"supply {self.name}: bad VISA resource {self.resource!r}: {exc}") from exc

    def connect(self) -> None:
        """Open the session now (otherwise the first command does)."""
        self.transact([], confirm=False)

    def _ensure_link(self) -> Link:
        if self._link is not None:
            stale = getattr(self._link, "is_stale", None)
            if stale is not None and stale():
                self._drop_link()
        if self._link is None:
            self._link = self._open_link()
        return self._link

    def _drop_link(self) -> None:
        link, self._link = self._link, None
        if link is not None:
            with contextlib.suppress(Exception):
                link.close()

    def close(self) -> None:
        """Close the session. Outputs stay as they are (use safe_state first to switch them off)."""
        try:
            with self._lock:
                self._drop_link()
        except SupplyError:  # another process holds the instrument for too long: close anyway
            self._drop_link()
        # pyvisa hands every caller the same ResourceManager per backend: closing it here would
        # close every other supply's session in this process. Only this instrument's link is ours.
        self._rm = None
        self._lock.close()

    def __enter__(self) -> ScpiSupply:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ cut (harness/cut.py)
    def arm_off(self, ch: int) -> ArmedOff:
        """Open the session now and encode channel ``ch``'s OFF to bytes, ready to `ArmedOff.fire`.

        Refused (`SupplyError`) on an instrument that can only switch all outputs at once."""
        ch = self._channel(ch)
        if not self.PER_CHANNEL_OUTPUT:
            raise SupplyError(
                f"supply {self.name} ({self.resource}): the {self.dialect or type(self).__name__} output "
                f"command switches every output at once: a cut on channel {ch} would cut the others too"
            )
        self.connect()
        return ArmedOff(self, ch)

    # ------------------------------------------------------------ commands
    def write(self, command: str) -> None:
        """Send one command (then the confirmation query)."""
        self.transact([command])

    def query(self, command: str) -> str:
        return self.transact([command])[-1]

    def transact(self, commands: Sequence[str], *, confirm: bool = True) -> list[str]:
        """Send commands in order under the instrument lock; return the replies to the queries.

        On a failure the session is reopened and the whole sequence sent again (a channel
        selection may have been lost with the session); after the last attempt, SupplyError.
        """
        commands = list(commands)
        confirm_query = self.confirm if confirm and commands and not any(map(is_query, commands)) else None
        if confirm_query:
            commands.append(confirm_query)
        progress = _Progress(command=commands[0] if commands else "(open)")
        started = time.monotonic()
        try:  # fast path: the first attempt without the retry machinery (~100 us saved per call)
            return self._attempt(commands, progress, confirm_query)
        except _RETRYABLE as exc:
            first_failure: BaseException | None = exc

        def attempt() -> list[str]:
            nonlocal first_failure
            if first_failure is not None:  # hand the first failure to the policy as its attempt 1
                failure, first_failure = first_failure, None
                raise failure
            return self._attempt(commands, progress, confirm_query)

        retrying = Retrying(
            stop=stop_after_attempt(self.attempts) | stop_before_delay(self.deadline_s),
            wait=wait_exponential(multiplier=self.backoff_s, max=self.backoff_s * 2 ** self.attempts),
            retry=retry_if_exception_type(_RETRYABLE),
            reraise=True,
        )
        try:
            return retrying(attempt)
        except _RETRYABLE as exc:
            sequence = f" (in sequence {'; '.join(commands)})" if len(commands) > 1 else ""
            raise SupplyError(
                f"supply {self.name} ({self.resource}): {progress.command!r}{sequence} failed after "
                f"{progress.attempts} attempt(s) in {time.monotonic() - started:.2f} s "
                f"(timeout {self.timeout_ms} ms per I/O, reconnecting between attempts); "
                f"last error: {_describe(exc)}"
            ) from exc

    def _attempt(self, commands: list[str], progress: _Progress, confirm_query: str | None) -> list[str]:
        progress.attempts += 1
        with self._lock:
            progress.command = commands[0] if commands else "(open)"
            try:
                link = self._ensure_link()
                replies = []
                for command in commands:
                    progress.command = command
                    self._pace()
                    if is_query(command):
                        reply = link.query(command).strip()
                        if command == self.ERROR_QUERY and self.parse_error(reply) is None:
                            raise LinkError(f"{command!r} answered {reply!r}, not an error queue entry")
                        replies.append(reply)
                    else:
                        link.write(command)
                    if self.command_interval_s:
                        self._lock.last_command_ns = time.monotonic_ns()
                if confirm_query:
                    reply = replies.pop()
                    if not self.confirmed(reply):
                        raise LinkError(f"{confirm_query!r} answered {reply!r}, not a confirmation")
            except _RETRYABLE:
                self._drop_link()  # stale bytes or a dead socket: the next attempt starts afresh
                raise
            return replies

    def _pace(self) -> None:
        """Sleep only the rest of command_interval_s since the last command (any process)."""
        if not self.command_interval_s or not self._lock.last_command_ns:
            return
        remaining = self.command_interval_s - (time.monotonic_ns() - self._lock.last_command_ns) / 1e9
        if remaining > 0:
            time.sleep(remaining)

    def confirmed(self, reply: str) -> bool:
        """Whether the reply to the confirmation query says the instrument is in step."""
        return reply.strip().lstrip("+") == "1"

    def errors(self, max_entries: int = 32) -> list[str]:
        """Drain the instrument's error queue; [] if it is empty."""
        found = []
        for _ in range(max_entries):
            reply = self.query(self.ERROR_QUERY)
            parsed = self.parse_error(reply)
            if parsed is None:
                raise self._bad_reply(self.ERROR_QUERY, reply, "an error code and message")
            if parsed[0] == 0:
                break
            found.append(reply)
        return found

    def parse_error(self, reply: str) -> tuple[int, str] | None:
        """``-222,"Data out of range"`` -> (-222, 'Data out of range'); None if it is no error entry."""
        m = _ERROR_ENTRY.fullmatch(reply)
        return (int(m.group(1)), m.group(2).strip().strip('"').strip()) if m else None

    def lost_command(self, entry: str) -> str | None:
        """The command an error-queue entry says the instrument lost unexecuted (not refused), or None.
        Only instruments that drop commands sent too fast (the SPD3303X) say so."""
        return None

    def _drain_errors(self, reply: str) -> list[str]:
        """The error queue, from the reply to the first error query, read until it says no error."""
        found: list[str] = []
        while True:
            parsed = self.parse_error(reply)
            if parsed is None:
                raise self._bad_reply(self.ERROR_QUERY, reply, "an error code and message")
            if parsed[0] == 0:
                return found
            found.append(self.describe_error(reply))
            if len(found) >= self.MAX_ERRORS:
                found.append(f"(the queue still held errors after {self.MAX_ERRORS} reads)")
                return found
            reply = self.query(self.ERROR_QUERY)

    def describe_error(self, reply: str) -> str:
        """An error entry as the message shows it: SCPI's own text, as the instrument said it."""
        return reply.strip()

    def _setting(self, template: Sequence[str], ch: int, value: float) -> None:
        """Send a setting with the error query after it, then read the queue until it is empty:
        a refused setting (a supply keeps its old one and says so only in the queue) is a
        SupplyError naming the supply, the channel, the command and the instrument's error."""
        if not template:
            raise SupplyError(f"supply {self.name} ({self.resource}): {self.dialect} driver has no such command")
        commands = [c.format(ch=ch, value=value) for c in template]
        with self._lock:  # the queue is the instrument's: no other sequence may read our error or add its own
            for _ in range(max(1, self.attempts)):
                found = self._drain_errors(self.transact([*commands, self.ERROR_QUERY], confirm=False)[-1])
                # a command the instrument lost (too soon after another: it was busy) was not refused: ours
                # is sent again; one of another sequence's is that sequence's to notice (its own check)
                ours = [e for e in found if self.lost_command(e) in commands]
                found = [e for e in found if self.lost_command(e) is None]
                if found or not ours:
                    break
            else:
                found = [f"lost by the instrument {max(1, self.attempts)} time(s): {ours[-1]}"]
        if found:
            model = f"{self.model} at " if self.model else ""
            raise SupplyError(
                f"supply {self.name} ({model}{self.resource}) channel {ch}: {'; '.join(commands)!r} refused by "
                f"the instrument: {'; '.join(found)}"
            )

    # ------------------------------------------------------------ operations
    def _run(self, template: Sequence[str], ch: int | None = None, value: float | None = None) -> list[str]:
        if not template:
            raise SupplyError(f"supply {self.name} ({self.resource}): {self.dialect} driver has no such command")
        return self.transact([c.format(ch=ch, value=value) for c in template])

    def _channel(self, ch: int) -> int:
        if not isinstance(ch, int) or isinstance(ch, bool) or not 1 <= ch <= self.channels:
            raise ValueError(f"supply {self.name}: channel {ch!r} not in 1..{self.channels}")
        return ch

    def _level(self, what: str, value: float) -> float:
        value = float(value)
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"supply {self.name}: {what} {value!r} must be a finite number >= 0")
        return value

    def identify(self) -> Identity:
        identity = Identity.parse(self._run(self.IDENTIFY)[-1])
        if identity.model:
            self.model = identity.model
        return identity

    def on(self, ch: int) -> None:
        self._run(self.ON, self._channel(ch))

    def off(self, ch: int) -> None:
        self._run(self.OFF, self._channel(ch))

    def is_on(self, ch: int) -> bool:
        replies = self._run(self.IS_ON, self._channel(ch))
        return self.parse_output_state(replies, ch)

    def set_voltage(self, ch: int, volts: float) -> None:
        self._setting(self.SET_VOLTAGE, self._channel(ch), self._level("voltage", volts))

    def set_current_limit(self, ch: int, amps: float) -> None:
        self._setting(self.SET_CURRENT_LIMIT, self._channel(ch), self._level("current limit", amps))

    def voltage_setpoint(self, ch: int) -> float:
        command = self.VOLTAGE_SETPOINT
        return self.parse_number(command[-1], self._run(command, self._channel(ch))[-1], "V")

    def current_limit_setpoint(self, ch: int) -> float:
        command = self.CURRENT_LIMIT_SETPOINT
        return self.parse_number(command[-1], self._run(command, self._channel(ch))[-1], "A")

    def measure_voltage(self, ch: int) -> float:
        command = self.MEASURE_VOLTAGE
        return self.parse_number(command[-1], self._run(command, self._channel(ch))[-1], "V")

    def measure_current(self, ch: int) -> float:
        command = self.MEASURE_CURRENT
        return self.parse_number(command[-1], self._run(command, self._channel(ch))[-1], "A")

    def safe_state(self, channels: Iterable[int]) -> None:
        """Outputs off on these channels, in one locked sequence (other channels untouched)."""
        chans = sorted({self._channel(ch) for ch in channels})
        if chans:
            self.transact(self.safe_state_commands(chans))

    def safe_state_commands(self, channels: list[int]) -> list[str]:
        return [c.format(ch=ch, value=None) for ch in channels for c in self.OFF]

    # ------------------------------------------------------------ parsing
    def parse_output_state(self, replies: list[str], ch: int) -> bool:
        """Default: the last reply is 1/0 (also ON/OFF)."""
        return self.parse_bool(self.IS_ON[-1], replies[-1])

    def parse_bool(self, command: str, reply: str) -> bool:
        text = reply.strip().upper().lstrip("+")
        if text in ("1", "ON"):
            return True
        if text in ("0", "OFF"):
            return False
        raise self._bad_reply(command, reply, "1/0 or ON/OFF")

    def parse_number(self, command: str, reply: str, unit: str) -> float:
        try:
            value = float(reply.strip())
        except ValueError:
            raise self._bad_reply(command, reply, f"a number of {unit}") from None
        if not math.isfinite(value):
            raise self._bad_reply(command, reply, f"a finite number of {unit}")
        return value

    def _bad_reply(self, command: str, reply: str, expected: str) -> SupplyError:
        return SupplyError(
            f"supply {self.name} ({self.resource}): {command!r} answered {reply!r}, expected {expected}"
        )


class ArmedOff:
    """One channel's OFF, encoded in advance for an open session: `fire` sends it in one write.

    Firing takes no lock when the OFF is a single command naming its channel (Keysight, Rigol,
    Aim-TTi): one line cannot land inside another thread's or process's select-then-command
    sequence, and sends on one socket do not interleave. When the OFF needs a channel selection
    first (R&S) or the instrument needs pacing (Siglent), firing takes the instrument lock, which
    anyone else holds for one command sequence; it waits at most ``lock_wait_s`` for it.
    Nothing is retried here and no reply is read: the caller confirms with `ScpiSupply.is_on`.
    """

    def __init__(self, supply: ScpiSupply, ch: int, *, lock_wait_s: float = 0.1):
        self.supply = supply
        self.channel = ch
        self.commands = tuple(c.format(ch=ch, value=None) for c in supply.OFF)
        if not self.commands:
            raise SupplyError(f"supply {supply.name} ({supply.resource}): {supply.dialect} driver has no OFF command")
        self.data = b"".join(c.encode("ascii") + b"\n" for c in self.commands)
        self.locked = len(self.commands) > 1 or bool(supply.command_interval_s)
        self.lock_wait_s = lock_wait_s
        with supply._lock:
            self._link = supply._ensure_link()

    def __repr__(self) -> str:
        return f"ArmedOff({self.supply.name} ch{self.channel}: {self.data!r})"

    @property
    def path(self) -> str:
        """How `fire` reaches the instrument: "socket" (raw TCP send) or "visa" (the session's write)."""
        return "socket" if getattr(self._link, "_sock", None) is not None else "visa"

    def fire(self) -> int:
        """Send the OFF now; returns ``time.monotonic_ns()`` taken right after the send.

        Raises `LinkError` (an OSError) if the session was closed or dropped since arming or the
        instrument closed the connection, `SupplyError` if the lock could not be had in time."""
        supply = self.supply
        if self.locked:
            supply._lock.acquire(self.lock_wait_s, record=bool(supply.command_interval_s))
        try:
            link = self._link
            if link is not supply._link:
                raise LinkError(f"{supply.resource}: the session armed for the cut was closed (reopened since?)")
            if self.locked:
                supply._pace()
            send_now = getattr(link, "send_now", None)
            if send_now is None:  # a Link without a raw path (a test double): its own write, per command
                for command in self.commands:
                    link.write(command)
            else:
                send_now(self.data)
            sent_ns = time.monotonic_ns()
            if send_now is not None and link.peer_closed():  # checked after the send: off the fast path
                raise LinkError(f"{supply.resource}: the instrument closed the connection while armed: "
                                "the OFF went nowhere")
            if self.locked and supply.command_interval_s:
                supply._lock.last_command_ns = sent_ns
            return sent_ns
        finally:
            if self.locked:
                supply._lock.release()


#: ``-222,"Data out of range"``, ``+0,"No error"``, ``0  No Error``: a code, then its text.
_ERROR_ENTRY = re.compile(r"\s*([-+]?\d+)\s*[,\s]\s*(\S.*?)\s*")


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if type(exc).__name__ in text else f"{type(exc).__name__}: {text}"
