"""Emulated programmable bench supplies: SCPI (and Aim-TTi) servers on loopback TCP.

One `EmulatedSupply` is one instrument: a few channels, one command processor, one error
queue, one "selected channel" shared by every connection (that is why two harness processes
sharing a real multi-channel supply need a lock around select-then-command). The harness
opens it as ``TCPIP0::127.0.0.1::PORT::SOCKET``; commands and replies end with ``\\n``.

Like the real instrument it has ONE input queue: a single thread reads all its connections and
executes their lines one at a time in the order they reached it, each reply going to the
connection that asked (a thread per connection ran them in whatever order the threads got the
CPU: a worker's ``OUTP:SEL?`` could read the channel another worker had selected after it). A
line's arrival is the kernel's stamp (SO_TIMESTAMPNS) of the read that completed it; the lines of
one read keep their order. Segments that queue on one connection while the instrument is busy
are merged by the kernel and carry the last one's stamp: the earlier lines may then run after
another connection's line that came between them, never before a line that came earlier.

Dialects follow the vendors' programming manuals closely enough for the harness drivers to
be the same code that runs against the real instruments:

==================  ===============================================================
keysight-e36312a    channel lists ``VOLT 5,(@1)``, ``OUTP ON,(@1)``, ``OUTP? (@1)`` -> 1/0
rigol-dp800         ``:INST:NSEL n``, ``:SOUR1:VOLT 5``, ``:OUTP CH1,ON``, ``:OUTP? CH1`` -> ON/OFF
rs-ngx              ``INST:NSEL n``, ``VOLT``, ``OUTP:SEL ON`` per channel, master ``OUTP:GEN ON``
rs-hmc              ``INST:NSEL n``, ``VOLT``, ``OUTP:CHAN ON`` per channel, master ``OUTP:MAST ON``
siglent-spd         ``CH1:VOLT 5``, ``OUTP CH1,ON``, ``SYST:STAT?`` status word; a command that
                    arrives < 20 ms after the last accepted one is lost (and an error queued)
aimtti              not SCPI: ``V1 5.0``, ``I1 0.5``, ``OP1 1``, ``OPALL 0``, ``V1O?`` -> ``5.000V``
==================  ===============================================================

Every dialect answers ``*IDN?``, ``*RST``, ``*OPC?``, ``*CLS`` and ``SYST:ERR?``.

Each channel enforces its model's rating (RATINGS): a setting above it is refused as a real
supply refuses it, quietly: the setting stays as it was and an error is queued, SCPI
``-222,"Data out of range"`` (read with ``SYST:ERR?``, ``0,"No error"`` when empty), and on
the Aim-TTi execution error 100 (read and cleared with ``EER?``; ``*ESR?`` bit 4 set too).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import random
import re
import selectors
import socket
import struct
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, TextIO

log = logging.getLogger(__name__)

#: dialect -> (manufacturer as *IDN? spells it, firmware version field(s))
DIALECTS: dict[str, tuple[str, str]] = {
    "keysight-e36312a": ("Keysight Technologies", "2.1.0-1.0.4-1.12"),
    "rigol-dp800": ("RIGOL TECHNOLOGIES", "00.01.14"),
    "rs-ngx": ("Rohde&Schwarz", "02.067"),
    "rs-hmc": ("Rohde&Schwarz", "HW50020001/SW02.200"),
    "siglent-spd": ("Siglent Technologies", "1.01.01.02.05,V3.0"),
    "aimtti": ("THURLBY THANDAR", "1.00-1.00"),
}

#: Physics of the SPD3303X: it needs this long after a command before it takes the next one.
SIGLENT_COMMAND_INTERVAL_S = 0.020

#: Current limit after power-up or *RST, amps.
DEFAULT_CURRENT_LIMIT = 1.0
#: What a channel of a model the rack has no data sheet for can be set to.
MAX_VOLTAGE = 60.0
MAX_CURRENT = 10.0

#: model -> (volts, amps) each channel can be set to, from the model's data sheet. A setting
#: above it is refused as the instrument does: an error queued (SCPI -222 "Data out of range";
#: Aim-TTi execution error 100), the setting unchanged. The harness keeps its own copy
#: (harness/power/ratings.py); tests/test_power_emulated.py holds the two to the same numbers.
RATINGS: dict[str, tuple[tuple[float, float], ...]] = {
    "E36312A": ((6.0, 5.0), (25.0, 1.0), (25.0, 1.0)),        # Keysight E36300 Series data sheet
    "E36313A": ((6.0, 10.0), (25.0, 2.0), (25.0, 2.0)),
    "DP832": ((30.0, 3.0), (30.0, 3.0), (5.0, 3.0)),           # Rigol DP800 Series data sheet
    "DP832A": ((30.0, 3.0), (30.0, 3.0), (5.0, 3.0)),
    "NGP802": ((32.0, 20.0),) * 2,                             # R&S NGP800 data sheet (200 W per channel)
    "NGP804": ((32.0, 20.0),) * 4,
    "NGE103B": ((32.0, 3.0),) * 3,                             # R&S NGE100B data sheet
    "HMC8043": ((32.0, 3.0),) * 3,                             # R&S HMC804x data sheet
    "SPD3303X": ((32.0, 3.2), (32.0, 3.2), (5.0, 3.2)),        # Siglent SPD3303X data sheet (CH3 2.5/3.3/5 V)
    "SPD3303X-E": ((32.0, 3.2), (32.0, 3.2), (5.0, 3.2)),
    "QL355TP": ((35.0, 5.0), (35.0, 5.0), (6.0, 3.0)),         # Aim-TTi QL series data sheet (CH3: aux 1-6 V)
}

#: Aim-TTi Execution Error Register: "100: Range error. The numeric value sent is not allowed."
AIMTTI_RANGE_ERROR = 100

# SPD3303X SYSTem:STATus? bits (programming guide): 0/1 CH1/CH2 CC mode, 2-3 tracking mode
# (01 independent), 4/5 CH1/CH2 output on, 6/7 timers, 8/9 waveform display.
SIGLENT_STAT_CC = (0x0001, 0x0002)
SIGLENT_STAT_INDEPENDENT = 0x0004
SIGLENT_STAT_OUTPUT = (0x0010, 0x0020)

_SHORT = {
    "INSTRUMENT": "INST", "NSELECT": "NSEL", "SELECT": "SEL", "SOURCE": "SOUR",
    "VOLTAGE": "VOLT", "CURRENT": "CURR", "OUTPUT": "OUTP", "MEASURE": "MEAS",
    "SYSTEM": "SYST", "ERROR": "ERR", "STATUS": "STAT", "STATE": "STAT",
    "GENERAL": "GEN", "CHANNEL": "CHAN", "MASTER": "MAST", "LEVEL": "LEV",
    "IMMEDIATE": "IMM", "AMPLITUDE": "AMPL", "SCALAR": "SCAL", "APPLY": "APPL",
    "POWER": "POWE", "POW": "POWE", "VERSION": "VERS",
}
_OPTIONAL = {"LEV", "IMM", "AMPL", "SCAL", "DC", "NEXT"}
_STATE_PARENTS = {"OUTP", "SEL", "GEN", "CHAN", "MAST"}
_TOKEN = re.compile(r"([A-Z]+)(\d*)")
_AIMTTI = re.compile(r"(V|I|OP)(\d+)(O?)")


class _ScpiError(Exception):
    def __init__(self, code: int, text: str):
        super().__init__(f'{code},"{text}"')
        self.code = code
        self.entry = f'{code},"{text}"'


def _undefined(header: str) -> _ScpiError:
    return _ScpiError(-113, "Undefined header")


@dataclass
class _Channel:
    voltage: float = 0.0
    current_limit: float = DEFAULT_CURRENT_LIMIT
    enabled: bool = False  # the channel's own output switch (OUTP, OUTP:SEL, OUTP:CHAN, OPn)


@dataclass
class _Connection:
    id: int
    sock: socket.socket
    stamped: bool  # the kernel stamps what arrives on it (SO_TIMESTAMPNS)
    partial: bytes = b""  # the start of a line not yet complete


class _Line(NamedTuple):
    arrived_ns: int  # CLOCK_REALTIME, the kernel's stamp of the read that completed the line
    mono_ns: int  # the same moment on CLOCK_MONOTONIC (the RX log's clock)
    conn: _Connection
    text: str


class EmulatedSupply:
    """A programmable multi-channel bench supply answering its vendor's dialect over TCP.

    ``on_output(ch, on)`` is called for every change of a channel's delivered power (channel
    switch and master switch together), in the instrument's thread, with its state lock held and
    before the command's reply is sent: keep it short (start or kill a process), no other line of
    any connection runs meanwhile.
    ``draw(ch)`` gives the amps the load would draw now; the supply reports min(draw, limit).
    """

    def __init__(
        self,
        name: str,
        dialect: str,
        model: str,
        channels: int,
        port: int,
        host: str = "127.0.0.1",
        on_output: Callable[[int, bool], None] | None = None,
        draw: Callable[[int], float] | None = None,
        serial: str = "VRACK0001",
        rx_log: RxLog | None = None,
    ):
        if dialect not in DIALECTS:
            raise ValueError(f"supply {name}: unknown dialect {dialect!r}; known: {', '.join(DIALECTS)}")
        if channels < 1:
            raise ValueError(f"supply {name}: channels must be >= 1, got {channels}")
        self.name = name
        self.dialect = dialect
        self.model = model
        self.serial = serial
        self.host = host
        self.port = port  # 0: pick a free port at start(); the real one is here afterwards
        self.on_output = on_output
        self.draw = draw
        self.rx_log = rx_log  # every received line, stamped on arrival (see RxLog)
        self.dropped = 0  # commands lost because they came too fast (siglent-spd)
        self.history: deque[tuple[int, str]] = deque(maxlen=10_000)  # (connection id, line) executed
        self._n = channels
        rated = RATINGS.get(model.upper(), ())
        #: (volts, amps) per channel: the data sheet's, or the generic limits for a model not in RATINGS
        self.ratings = [rated[i] if i < len(rated) else (MAX_VOLTAGE, MAX_CURRENT) for i in range(channels)]
        self._has_master = dialect in ("rs-ngx", "rs-hmc")
        self._state = threading.RLock()  # held while a command executes, callbacks included
        self._rng = random.Random(f"{name}/{serial}")
        self._listener: socket.socket | None = None
        self._conns: dict[int, socket.socket] = {}  # open connections by id (the instrument's thread keeps it)
        self._thread: threading.Thread | None = None
        self._next_conn = 0
        self._hung = False
        self._reset_state()

    # ----------------------------------------------------------------- lifecycle
    def start(self) -> None:
        """Listen; returns once connections are accepted."""
        if self._listener is not None:
            return
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            listener.bind((self.host, self.port))
            listener.listen(16)
        except OSError as exc:
            listener.close()
            if exc.errno == errno.EADDRINUSE:
                raise OSError(exc.errno, f"supply {self.name}: port {self.port} on {self.host} is in use") from exc
            raise OSError(
                exc.errno, f"supply {self.name}: cannot listen on {self.host}:{self.port}: {exc.strerror}"
            ) from exc
        listener.setblocking(False)
        self.port = listener.getsockname()[1]
        self._listener = listener
        self._thread = threading.Thread(target=self._serve, args=(listener,), daemon=True, name=f"psu-{self.name}")
        self._thread.start()

    def stop(self) -> None:
        """Close the listener and every connection. Outputs stay as they are; on_output is not called."""
        listener, self._listener = self._listener, None
        if listener is None:
            return
        with contextlib.suppress(OSError):
            listener.shutdown(socket.SHUT_RDWR)  # wakes the instrument's thread, which closes everything
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=2.0)

    def hang(self) -> None:
        """Fault injection: keep connections, read everything, execute and answer nothing."""
        self._hung = True

    def resume(self) -> None:
        self._hung = False

    def __enter__(self) -> EmulatedSupply:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------- inspect
    def channel(self, ch: int) -> dict:
        """{"voltage", "current_limit", "output"} of channel ch (1-based); output = powered."""
        with self._state:
            c = self._channels[ch - 1]
            return {"voltage": c.voltage, "current_limit": c.current_limit, "output": self._powered(ch)}

    @property
    def resource(self) -> str:
        return f"TCPIP0::{self.host}::{self.port}::SOCKET"

    # ------------------------------------------------------------------- network
    def _serve(self, listener: socket.socket) -> None:
        """The instrument's one input queue: read every connection, run every line in arrival order."""
        sel = selectors.DefaultSelector()
        sel.register(listener, selectors.EVENT_READ)
        try:
            while (lines := self._receive(sel, listener)) is not None:
                for line in lines:
                    self._run(sel, line)
        finally:
            for key in list(sel.get_map().values()):
                key.fileobj.close()
            sel.close()
            with self._state:
                self._conns.clear()

    def _receive(self, sel: selectors.BaseSelector, listener: socket.socket) -> list[_Line] | None:
        """Wait for input, then read until no socket has more: every complete line, in arrival order.

        Reading on until all is quiet keeps a line that arrived on one socket while this pass read
        the others from being run after lines that came later. None once stop() shut the listener.
        """
        lines: list[_Line] = []
        events = sel.select()
        while events:
            for key, _ in events:
                if key.fileobj is listener:
                    if not self._accept(sel, listener):
                        return None
                elif not self._read(key.data, lines):
                    self._drop(sel, key.data)
            events = sel.select(0)
        lines.sort(key=lambda line: line.arrived_ns)  # stable: the lines of one read keep their order
        return lines

    def _accept(self, sel: selectors.BaseSelector, listener: socket.socket) -> bool:
        try:
            sock, _ = listener.accept()
        except BlockingIOError:
            return True  # the client gave up before it was taken
        except OSError:
            return False  # shut by stop()
        sock.setblocking(True)  # read only when select says data is there; replies are sent whole
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._next_conn += 1
        conn = _Connection(self._next_conn, sock, _enable_rx_timestamps(sock))
        with self._state:
            self._conns[conn.id] = sock
        sel.register(sock, selectors.EVENT_READ, conn)
        return True

    def _read(self, conn: _Connection, lines: list[_Line]) -> bool:
        """One read from conn: its complete lines, stamped, onto lines. False when the peer has gone."""
        try:
            if conn.stamped:
                data, ancdata, _, _ = conn.sock.recvmsg(4096, _CMSG_SPACE)
                arrived_ns = _rx_timestamp_ns(ancdata)
            else:
                data, arrived_ns = conn.sock.recv(4096), None
        except OSError:
            return False
        if not data:
            return False
        now_ns = time.clock_gettime_ns(time.CLOCK_REALTIME)
        if arrived_ns is None:
            arrived_ns = now_ns
        mono_ns = arrived_ns - (now_ns - time.monotonic_ns())
        *complete, conn.partial = (conn.partial + data).split(b"\n")
        lines.extend(_Line(arrived_ns, mono_ns, conn, raw.decode("ascii", "replace").strip()) for raw in complete)
        return True

    def _drop(self, sel: selectors.BaseSelector, conn: _Connection) -> None:
        """Forget a connection the peer closed or that broke; its lines already read still run."""
        with self._state:
            if self._conns.pop(conn.id, None) is None:
                return
        sel.unregister(conn.sock)
        conn.sock.close()

    def _run(self, sel: selectors.BaseSelector, line: _Line) -> None:
        """Execute one line, log it with its arrival stamp, answer the connection that sent it."""
        try:
            reply = self._execute(line.conn.id, line.text, line.arrived_ns)
        except Exception:  # an emulator bug or a failing draw(): that connection goes, not the instrument
            log.exception("supply %s: line %r of connection %d failed; connection closed",
                          self.name, line.text, line.conn.id)
            self._drop(sel, line.conn)
            return
        if self.rx_log is not None:
            self.rx_log.write(line.mono_ns, self.name, line.text)
        if reply is not None:
            try:
                line.conn.sock.sendall(reply.encode("ascii") + b"\n")
            except OSError:
                self._drop(sel, line.conn)

    # ----------------------------------------------------------------- execution
    def _execute(self, conn_id: int, line: str, arrived_ns: int) -> str | None:
        """Run one line that reached the instrument at arrived_ns (CLOCK_REALTIME, kernel stamp)."""
        if self._hung or not line:
            return None
        with self._state:
            if self.dialect == "siglent-spd":
                # Pacing is judged on arrival at the instrument, not on when this thread got to run.
                last = self._last_accepted
                if last is not None and arrived_ns - last < SIGLENT_COMMAND_INTERVAL_S * 1e9:
                    self.dropped += 1
                    self._errors.append(f'-363,"Input buffer overrun; command lost: {line[:40]}"')
                    return None
                self._last_accepted = arrived_ns
            self.history.append((conn_id, line))
            replies = []
            for part in line.split(";"):
                part = part.strip()
                if not part:
                    continue
                before = self._powered_set()
                try:
                    reply = self._dispatch(part)
                except _ScpiError as exc:
                    self._errors.append(exc.entry)
                    self._esr |= 0x20 if exc.entry.startswith("-1") else 0x10
                    if exc.code in (-222, -224):  # Aim-TTi: a value it does not allow
                        self._eer = AIMTTI_RANGE_ERROR
                    reply = None
                self._notify(before)
                if reply is not None:
                    replies.append(reply)
            return ";".join(replies) if replies else None

    def _powered(self, ch: int) -> bool:
        return self._channels[ch - 1].enabled and self._master

    def _powered_set(self) -> list[bool]:
        return [self._powered(ch) for ch in range(1, self._n + 1)]

    def _notify(self, before: list[bool]) -> None:
        if self.on_output is None:
            return
        for ch, (was, now) in enumerate(zip(before, self._powered_set(), strict=True), start=1):
            if was != now:
                try:
                    self.on_output(ch, now)
                except Exception:  # a broken callback must not take the instrument down
                    log.exception("supply %s: on_output(%d, %s) failed", self.name, ch, now)

    def _reset_state(self) -> None:
        self._channels = [_Channel() for _ in range(self._n)]
        self._master = not self._has_master
        self._selected = 1
        self._errors: deque[str] = deque(maxlen=32)
        self._esr = 0
        self._eer = 0  # Aim-TTi Execution Error Register: the last execution error, cleared by EER?
        self._last_accepted: int | None = None

    def _idn(self) -> str:
        maker, firmware = DIALECTS[self.dialect]
        sep = ", " if self.dialect == "aimtti" else ","
        return sep.join([maker, self.model, self.serial, firmware])

    def _dispatch(self, part: str) -> str | None:
        header, _, argtext = part.partition(" ")
        args = _split_args(argtext)
        query = header.endswith("?")
        header = header.rstrip("?").upper()
        if header.startswith("*"):
            return self._common(header, query, args)
        if self.dialect == "aimtti":
            reply = self._aimtti(header, query, args)
            if reply is not False:
                return reply
        tokens, prefix_ch = _normalize(header)
        key = ":".join(tokens)
        if key == "SYST:ERR" and query:
            return self._errors.popleft() if self._errors else '0,"No error"'
        if key == "SYST:VERS" and query:
            return "1999.0"
        handler = {
            "keysight-e36312a": self._keysight,
            "rigol-dp800": self._rigol,
            "rs-ngx": self._rohde,
            "rs-hmc": self._rohde,
            "siglent-spd": self._siglent,
            "aimtti": None,
        }[self.dialect]
        if handler is None:
            raise _undefined(header)
        return handler(key, prefix_ch, query, args)

    def _common(self, header: str, query: bool, args: list[str]) -> str | None:
        if header == "*IDN" and query:
            return self._idn()
        if header == "*OPC" and query:
            return "1"
        if header == "*RST" and not query:
            self._reset_state()
            return None
        if header == "*CLS" and not query:
            self._errors.clear()
            self._esr = 0
            self._eer = 0
            return None
        if header == "*ESR" and query:
            esr, self._esr = self._esr, 0
            return str(esr)
        raise _undefined(header)

    # ---- helpers shared by the dialects
    def _check_ch(self, ch: int) -> int:
        if not 1 <= ch <= self._n:
            raise _ScpiError(-222, "Data out of range")
        return ch

    def _measure(self, ch: int, what: str) -> float:
        c = self._channels[ch - 1]
        if not self._powered(ch):
            return self._rng.uniform(0.0, 0.002)
        if what == "VOLT":
            return max(0.0, c.voltage + self._rng.uniform(-0.0005, 0.0005))
        drawn = self.draw(ch) if self.draw is not None else 0.0
        return max(0.0, min(drawn, c.current_limit) + self._rng.uniform(-0.0005, 0.0005))

    def _in_cc(self, ch: int) -> bool:
        drawn = self.draw(ch) if self.draw is not None and self._powered(ch) else 0.0
        return self._powered(ch) and drawn >= self._channels[ch - 1].current_limit

    def _rated(self, ch: int, what: str, value: float) -> float:
        """The value a setting of channel ch may take (MAX: the rating); -222 above the channel's rating."""
        volts, amps = self.ratings[self._check_ch(ch) - 1]
        limit = volts if what == "VOLT" else amps
        if value == math.inf:  # MAX / MAXIMUM
            return limit
        if value > limit:
            raise _ScpiError(-222, "Data out of range")
        return value

    def _set(self, ch: int, what: str, value: float) -> None:
        self._set_all([(ch, what, value)])

    def _set_all(self, settings: list[tuple[int, str, float]]) -> None:
        """Every setting checked against its channel's rating before any is made: a refused
        command leaves the instrument as it was."""
        checked = [(ch, what, self._rated(ch, what, value)) for ch, what, value in settings]
        for ch, what, value in checked:
            c = self._channels[ch - 1]
            if what == "VOLT":
                c.voltage = value
            else:
                c.current_limit = value

    def _setpoint(self, ch: int, what: str) -> float:
        c = self._channels[self._check_ch(ch) - 1]
        return c.voltage if what == "VOLT" else c.current_limit

    def _value(self, args: list[str], what: str, index: int = 0) -> float:
        if len(args) <= index:
            raise _ScpiError(-109, "Missing parameter")
        text = args[index].upper()
        special = {"MIN": 0.0, "MINIMUM": 0.0, "MAX": math.inf, "MAXIMUM": math.inf,  # MAX: _rated() resolves
                   "DEF": DEFAULT_CURRENT_LIMIT if what == "CURR" else 0.0}
        if text in special:
            return special[text]
        try:
            value = float(text.rstrip("VA"))
        except ValueError:
            raise _ScpiError(-224, "Illegal parameter value") from None
        if not math.isfinite(value) or value < 0.0:
            raise _ScpiError(-222, "Data out of range")
        return value

    def _channels_arg(self, arg: str) -> list[int]:
        """``(@1)``, ``(@1,3)``, ``(@1:3)``, ``CH2``, ``OUT2`` or ``2`` -> channel numbers."""
        text = arg.strip().upper()
        if text.startswith("(@") and text.endswith(")"):
            chans: list[int] = []
            for item in text[2:-1].split(","):
                lo, _, hi = item.partition(":")
                try:
                    first, last = int(lo), int(hi or lo)
                except ValueError:
                    raise _ScpiError(-224, "Illegal parameter value") from None
                if first > last:
                    raise _ScpiError(-224, "Illegal parameter value")
                chans.extend(range(first, last + 1))
            return [self._check_ch(ch) for ch in chans]
        m = re.fullmatch(r"(?:CH|OUT|OUTP)?(\d+)", text)
        if not m:
            raise _ScpiError(-224, "Illegal parameter value")
        return [self._check_ch(int(m.group(1)))]

    def _select(self, arg: str) -> None:
        self._selected = self._channels_arg(arg)[0]

    def _targets(self, arg: str | None, prefix_ch: int | None) -> list[int]:
        if arg:
            return self._channels_arg(arg)
        return [self._check_ch(prefix_ch or self._selected)]

    # ---- dialects
    def _keysight(self, key: str, prefix_ch: int | None, query: bool, args: list[str]) -> str | None:
        chlist = args[-1] if args and args[-1].startswith("(@") else None
        if key == "INST:NSEL":
            if query:
                return str(self._selected)
            return self._select(_arg(args, 0))
        if key == "INST":
            if query:
                return f"CH{self._selected}"
            return self._select(_arg(args, 0))
        if key in ("VOLT", "CURR"):
            chans = self._targets(chlist, prefix_ch)
            if query:
                return ",".join(f"{self._setpoint(ch, key):+.8E}" for ch in chans)
            value = self._value(args, key)
            self._set_all([(ch, key, value) for ch in chans])
            return None
        if key == "OUTP":
            chans = self._targets(chlist, None)
            if query:
                return ",".join("1" if self._powered(ch) else "0" for ch in chans)
            on = _bool(_arg(args, 0))
            for ch in chans:
                self._channels[ch - 1].enabled = on
            return None
        if key in ("MEAS:VOLT", "MEAS:CURR") and query:
            chans = self._targets(args[0] if args else None, None)
            return ",".join(f"{self._measure(ch, key[5:]):+.8E}" for ch in chans)
        raise _undefined(key)

    def _rigol(self, key: str, prefix_ch: int | None, query: bool, args: list[str]) -> str | None:
        if key == "INST:NSEL":
            if query:
                return str(self._selected)
            return self._select(_arg(args, 0))
        if key == "INST":
            if query:
                return f"CH{self._selected}"
            return self._select(_arg(args, 0))
        if key in ("VOLT", "CURR"):
            ch = self._targets(None, prefix_ch)[0]
            if query:
                return f"{self._setpoint(ch, key):.4f}"
            self._set(ch, key, self._value(args, key))
            return None
        if key == "OUTP":
            if query:
                ch = self._targets(args[0] if args else None, None)[0]
                return "ON" if self._powered(ch) else "OFF"
            if len(args) >= 2:
                ch, state = self._channels_arg(args[0])[0], args[1]
            else:
                ch, state = self._targets(None, None)[0], _arg(args, 0)
            self._channels[ch - 1].enabled = _bool(state)
            return None
        if key in ("MEAS:VOLT", "MEAS:CURR") and query:
            ch = self._targets(args[0] if args else None, None)[0]
            return f"{self._measure(ch, key[5:]):.4f}"
        if key == "APPL" and not query:
            ch = self._channels_arg(_arg(args, 0))[0]
            settings = [(ch, "VOLT", self._value(args, "VOLT", 1))]
            if len(args) > 2:
                settings.append((ch, "CURR", self._value(args, "CURR", 2)))
            self._set_all(settings)
            return None
        raise _undefined(key)

    def _rohde(self, key: str, prefix_ch: int | None, query: bool, args: list[str]) -> str | None:
        channel_switch, master_switch = ("OUTP:SEL", "OUTP:GEN") if self.dialect == "rs-ngx" else (
            "OUTP:CHAN", "OUTP:MAST")
        ch = self._selected
        if key == "INST:NSEL":
            if query:
                return str(ch)
            return self._select(_arg(args, 0))
        if key == "INST":
            if query:
                return f"OUT{ch}"
            return self._select(_arg(args, 0))
        if key in ("VOLT", "CURR"):
            if query:
                return f"{self._setpoint(ch, key):.4f}"
            self._set(ch, key, self._value(args, key))
            return None
        if key == channel_switch:
            if query:
                return "1" if self._channels[ch - 1].enabled else "0"
            self._channels[ch - 1].enabled = _bool(_arg(args, 0))
            return None
        if key == master_switch:
            if query:
                return "1" if self._master else "0"
            self._master = _bool(_arg(args, 0))
            return None
        if key == "OUTP":  # OUTP[:STAT]: the selected channel, and the master with it when switching on
            if query:
                return "1" if self._powered(ch) else "0"
            on = _bool(_arg(args, 0))
            self._channels[ch - 1].enabled = on
            if on:
                self._master = True
            return None
        if key in ("MEAS:VOLT", "MEAS:CURR") and query:
            return f"{self._measure(ch, key[5:]):.4f}"
        if key == "APPL" and not query:
            settings = [(ch, "VOLT", self._value(args, "VOLT", 0))]
            if len(args) > 1:
                settings.append((ch, "CURR", self._value(args, "CURR", 1)))
            self._set_all(settings)
            return None
        raise _undefined(key)

    def _siglent(self, key: str, prefix_ch: int | None, query: bool, args: list[str]) -> str | None:
        if key == "INST":
            if query:
                return f"CH{self._selected}"
            return self._select(_arg(args, 0))
        if key in ("VOLT", "CURR"):
            ch = self._targets(None, prefix_ch)[0]
            if query:
                return f"{self._setpoint(ch, key):.3f}"
            self._set(ch, key, self._value(args, key))
            return None
        if key == "OUTP" and not query:
            if len(args) < 2:
                raise _ScpiError(-109, "Missing parameter")
            ch = self._channels_arg(args[0])[0]
            self._channels[ch - 1].enabled = _bool(args[1])
            return None
        if key in ("MEAS:VOLT", "MEAS:CURR", "MEAS:POWE") and query:
            ch = self._targets(args[0] if args else None, None)[0]
            if key == "MEAS:POWE":
                return f"{self._measure(ch, 'VOLT') * self._measure(ch, 'CURR'):.3f}"
            return f"{self._measure(ch, key[5:]):.3f}"
        if key == "SYST:STAT" and query:
            word = SIGLENT_STAT_INDEPENDENT
            for ch in (1, 2):
                if ch <= self._n and self._powered(ch):
                    word |= SIGLENT_STAT_OUTPUT[ch - 1]
                if ch <= self._n and self._in_cc(ch):
                    word |= SIGLENT_STAT_CC[ch - 1]
            return f"0x{word:04X}"
        raise _undefined(key)

    def _aimtti(self, header: str, query: bool, args: list[str]) -> str | None | bool:
        """Aim-TTi's own language; returns False when the header is not one of it (then SCPI is tried)."""
        if header == "OPALL" and not query:
            on = _bool(_arg(args, 0))
            for c in self._channels:
                c.enabled = on
            return None
        if header == "EER" and query:  # read and clear: the last execution error, 0 = none
            eer, self._eer = self._eer, 0
            return str(eer)
        if header == "QER" and query:  # query errors (a reply nobody read): the emulator never makes one
            return "0"
        m = _AIMTTI.fullmatch(header)
        if not m:
            return False
        what, ch, readback = m.group(1), self._check_ch(int(m.group(2))), m.group(3) == "O"
        if what == "OP":
            if readback:
                raise _undefined(header)
            if query:
                return "1" if self._powered(ch) else "0"
            self._channels[ch - 1].enabled = _bool(_arg(args, 0))
            return None
        kind, unit = ("VOLT", "V") if what == "V" else ("CURR", "A")
        if readback:
            if not query:
                raise _undefined(header)
            return f"{self._measure(ch, kind):.3f}{unit}"
        if query:
            return f"{what}{ch} {self._setpoint(ch, kind):.3f}"
        self._set(ch, kind, self._value(args, kind))
        return None


# --------------------------------------------------------------------- RX log
class RxLog:
    """The rig's ``virtual.supply_rx_log``: ``<monotonic_ns> RX <supply> <line>`` for every command
    line any of the rack's supplies receives, so a cut's latency is measured outside the harness.

    The stamp is the kernel's arrival time of the segment that completed the line (SO_TIMESTAMPNS,
    CLOCK_REALTIME) converted to CLOCK_MONOTONIC with the offset between the two clocks read right
    after the receive (without SO_TIMESTAMPNS: CLOCK_MONOTONIC at the receive), so it does not
    depend on when the supply's thread got to run. It is written after the line was executed, off
    the power path. One file for all supplies, appended under a lock, line-buffered (flushed per
    line); lines are in the order written, not strictly in stamp order across supplies.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._file: TextIO | None = open(self.path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 - close()

    def write(self, stamp_ns: int, supply: str, line: str) -> None:
        """Append one line. A write that fails (disk full) stops the log, never the supply."""
        with self._lock:
            if self._file is None:
                return
            try:
                self._file.write(f"{stamp_ns} RX {supply} {line}\n")
            except OSError as exc:
                log.error("supply RX log %s: write failed, log stopped: %s", self.path, exc)
                f, self._file = self._file, None
                with contextlib.suppress(OSError):
                    f.close()

    def close(self) -> None:
        with self._lock:
            f, self._file = self._file, None
        if f is not None:
            f.close()


# --------------------------------------------------------------------- arrival time
# Linux SO_TIMESTAMPNS (== SCM_TIMESTAMPNS): the kernel stamps each received segment, so the
# arrival time of a command does not depend on when the connection thread is scheduled.
_SO_TIMESTAMPNS = 35
_TIMESPEC = struct.Struct("@qq")
_CMSG_SPACE = socket.CMSG_SPACE(_TIMESPEC.size)


def _enable_rx_timestamps(conn: socket.socket) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        conn.setsockopt(socket.SOL_SOCKET, _SO_TIMESTAMPNS, 1)
    except OSError:
        return False
    return True


def _rx_timestamp_ns(ancdata: list[tuple[int, int, bytes]]) -> int | None:
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == _SO_TIMESTAMPNS and len(data) >= _TIMESPEC.size:
            sec, nsec = _TIMESPEC.unpack_from(data)
            return sec * 1_000_000_000 + nsec
    return None


# --------------------------------------------------------------------- parsing
def _split_args(text: str) -> list[str]:
    """Split on commas outside parentheses: ``1,(@1,2)`` -> ["1", "(@1,2)"]."""
    args, depth, current = [], 0, []
    for char in text.strip():
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        if char == "," and depth == 0:
            args.append("".join(current).strip())
            current = []
        else:
            current.append(char)
    if current or args:
        args.append("".join(current).strip())
    return args


def _normalize(header: str) -> tuple[list[str], int | None]:
    """``:SOURce1:VOLTage:LEVel`` -> (["VOLT"], 1); ``CH2:CURR`` -> (["CURR"], 2)."""
    tokens: list[str] = []
    suffixes: list[str] = []
    for raw in header.lstrip(":").split(":"):
        m = _TOKEN.fullmatch(raw)
        if not m:
            raise _undefined(header)
        tokens.append(_SHORT.get(m.group(1), m.group(1)))
        suffixes.append(m.group(2))
    prefix_ch = None
    if tokens and tokens[0] in ("SOUR", "CH") and len(tokens) > 1:
        prefix_ch = int(suffixes[0]) if suffixes[0] else None
        tokens, suffixes = tokens[1:], suffixes[1:]
    kept = []
    for i, tok in enumerate(tokens):
        if i > 0 and (tok in _OPTIONAL or (tok == "STAT" and tokens[i - 1] in _STATE_PARENTS)):
            continue
        kept.append(tok)
    return kept, prefix_ch


def _arg(args: list[str], index: int) -> str:
    if len(args) <= index or not args[index]:
        raise _ScpiError(-109, "Missing parameter")
    return args[index]


def _bool(text: str) -> bool:
    value = text.strip().upper()
    if value in ("ON", "1"):
        return True
    if value in ("OFF", "0"):
        return False
    raise _ScpiError(-224, "Illegal parameter value")
