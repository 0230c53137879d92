"""The virtual cart: one process per powered cart, `python -m vrack.cart ...`.

Power on is starting this process; power off is SIGKILL, at any instant. A reset (watchdog,
crash, `reboot`) is os.execv of the same command line: same pid, so the rack's SIGKILL still
finds it, and the console fd (the pty master kept by the rack) is inherited across it.

This module is the board: the UART console, the state line the supply reads for current
draw, the battery-backed RTC, the sensors, the flash (vrack.flash) and the reset. The boot
logic is in vrack.bootloader.

    python -m vrack.cart --slot N --cart-config PATH --flash PATH --rtc PATH --state PATH
                         --console-fd FD [--flash-time-scale X] [--faults PATH]

Environment: VRACK_RESET_CAUSE (why this image started: power-on, set by the rack at power-on,
or watchdog / software / crash, set by Board.reset across the execv; missing reads power-on),
VRACK_SEED (seeds where a failing erase/program stops; unset: random).
"""

from __future__ import annotations

import argparse
import math
import os
import random
import select
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

from vrack.bootloader import Bootloader
from vrack.cartconfig import CartConfig, CartConfigError, load_cart
from vrack.flash import STATE_BOOTING, Flash, FlashError, StateByte

RESET_ENV = "VRACK_CART_RESET_AT"  # monotonic time of a reset, handed across execv
CAUSE_ENV = "VRACK_RESET_CAUSE"  # the reset-cause register: why this image started
RESET_CAUSES = ("power-on", "watchdog", "software", "crash")
SEED_ENV = "VRACK_SEED"
WRITE_STALL_S = 1.0  # a UART does not wait for a reader: after this long, output is dropped
READY_FRACTION = 0.6  # power-on to "FW: ready" as a fraction of boot.expected_s
MIN_SENSOR_INIT_S = 0.002


def reset_cause() -> str:
    """The latched reset cause, read (and cleared) once at start: a power cut clears it, so a
    process the rack starts (or anyone else) reads power-on."""
    cause = os.environ.pop(CAUSE_ENV, "power-on")
    return cause if cause in RESET_CAUSES else "power-on"


def power_on_time() -> float:
    """time.monotonic() of power-on (or of the reset that started this image): the boot clock."""
    now = time.monotonic()
    try:
        reset_at = float(os.environ.pop(RESET_ENV, "nan"))
    except ValueError:
        reset_at = math.nan
    if 0 <= now - reset_at < 60:
        return reset_at
    try:  # the process start, which precedes this interpreter's own start-up
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return now
    return now - age if 0 <= age < 60 else now


class Console:
    """The cart's UART on the pty master: lines out with \\r\\n, lines or single bytes in."""

    def __init__(self, fd: int):
        self.fd = fd
        self._buf = bytearray()
        self._skip_lf = False
        self._write_lock = threading.Lock()
        self.dropped = 0
        self.at_line_start = True  # the last text written ended a line (or nothing was written yet)

    # output

    def write(self, text: str) -> None:
        with self._write_lock:
            self._write(text)

    def _write(self, text: str) -> None:
        data = memoryview(text.encode("utf-8"))
        if text:
            self.at_line_start = text.endswith("\n")
        while data:
            try:
                _, ready, _ = select.select([], [self.fd], [], WRITE_STALL_S)
                if not ready:
                    break
                n = os.write(self.fd, data)
            except BlockingIOError:
                continue
            except OSError:
                break
            data = data[n:]
        self.dropped += len(data)

    def write_line(self, text: str) -> None:
        self.write(text + "\r\n")

    def write_line_fresh(self, text: str) -> None:
        """A line that must not share a line with whatever is showing (a prompt): a line break first if needed."""
        with self._write_lock:
            self._write(("" if self.at_line_start else "\r\n") + text + "\r\n")

    # input

    def _fill(self, timeout: float | None) -> bool:
        """Wait up to timeout (None: forever) for input; True if bytes were added."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select([self.fd], [], [], remaining)
            if ready:
                try:
                    chunk = os.read(self.fd, 4096)
                except BlockingIOError:  # another reader of the same fd was quicker
                    continue
                except OSError:  # EIO: no one holds the other end, nothing can arrive
                    chunk = b""
                if chunk:
                    self._buf += chunk
                    return True
                time.sleep(min(0.05, remaining if remaining is not None else 0.05))
            if deadline is not None and time.monotonic() >= deadline:
                return False

    def discard_input(self, settle_s: float = 0.0) -> None:
        """Drop everything received so far, then anything arriving within settle_s of quiet."""
        self._buf.clear()
        self._skip_lf = False
        while self._fill(settle_s):
            self._buf.clear()

    def read_byte(self, timeout: float | None) -> bytes | None:
        if not self._buf and not self._fill(timeout):
            return None
        byte = bytes(self._buf[:1])
        del self._buf[:1]
        return byte

    def read_line(self, timeout: float | None) -> str | None:
        """One line without its terminator (\\r, \\n or \\r\\n), or None on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self._skip_lf and self._buf[:1] == b"\n":
                del self._buf[:1]
            if self._buf:
                self._skip_lf = False
            for i, b in enumerate(self._buf):
                if b in (0x0A, 0x0D):
                    line = bytes(self._buf[:i])
                    self._skip_lf = b == 0x0D
                    del self._buf[: i + 1]
                    return line.decode("utf-8", "replace")
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return None
            if not self._fill(remaining):
                return None


class Rtc:
    """Battery-backed real-time clock: host UTC plus the offset kept in the rtc file.

    `now()` is the one source of wall time on the device. The file holds the offset in
    seconds as ASCII decimal; a missing or unreadable file counts as offset 0.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def offset_s(self) -> float:
        try:
            value = float(self.path.read_text().strip() or 0)
        except (OSError, ValueError):
            return 0.0
        return value if math.isfinite(value) else 0.0

    def now(self) -> datetime:
        return datetime.fromtimestamp(time.time() + self.offset_s(), UTC)

    def set(self, when: datetime) -> None:
        if when.tzinfo is None:
            raise ValueError("rtc set needs an aware datetime")
        offset = when.timestamp() - time.time()
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(f"{offset:.6f}\n")
        os.replace(tmp, self.path)


_SENSOR_MODELS = {  # kind prefix -> (nominal reading, variation)
    "imu": (9.807, 0.01),
    "gnss": (0.9, 0.05),
    "lidar": (3.25, 0.02),
    "temp": (24.5, 0.1),
}


class Sensor:
    """A sensor on the cart's buses: init takes a modelled time, read gives a plausible value."""

    def __init__(self, name: str, board: Board):
        self.name = name
        self.kind = name.split("-", 1)[0]
        self._board = board
        self.ready = False

    def init(self) -> None:
        time.sleep(self._board.sensor_init_s())
        self.ready = True

    def read(self) -> float:
        nominal, spread = _SENSOR_MODELS.get(self.kind, (1.0, 0.01))
        return nominal + spread * math.sin(time.monotonic() + len(self.name))


class Board:
    """Everything the bootloader and firmware can touch on one cart."""

    def __init__(self, *, config: CartConfig, console: Console, flash: Flash, state: StateByte,
                 clock: Rtc, slot: int, argv: list[str], power_on: float, reset_cause: str = "power-on"):
        self.config = config
        self.console = console
        self.flash = flash
        self.state = state
        self.clock = clock
        self.slot = slot
        self.argv = argv
        self.power_on = power_on
        self.reset_cause = reset_cause  # why this image started (the reset-cause register)
        self.sensors = [Sensor(name, self) for name in config.sensors]
        self._sensor_init_s: float | None = None

    def sensor_init_s(self) -> float:
        """Per-sensor init time, fixed at the first init: the sensors take what is left of
        READY_FRACTION * boot.expected_s since power-on, at least MIN_SENSOR_INIT_S each."""
        if self._sensor_init_s is None:
            target = self.power_on + READY_FRACTION * self.config.boot.expected_s
            left = target - time.monotonic()
            self._sensor_init_s = max(MIN_SENSOR_INIT_S, left / max(1, len(self.sensors)))
        return self._sensor_init_s

    def reset(self, cause: str = "software") -> None:
        """Reset the cart: the bootloader starts again in this same process (same pid). `cause`
        (watchdog, software, crash) is what the next image reads as its reset cause."""
        if cause not in RESET_CAUSES:
            raise ValueError(f"unknown reset cause {cause!r}")
        sys.stdout.flush()
        sys.stderr.flush()
        os.set_inheritable(self.console.fd, True)
        os.environ[RESET_ENV] = repr(time.monotonic())
        os.environ[CAUSE_ENV] = cause
        os.execv(sys.executable, [sys.executable, "-m", "vrack.cart", *self.argv])


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m vrack.cart", description="One virtual cart (powered).")
    p.add_argument("--slot", type=int, default=0, help="rack slot number (for logs)")
    p.add_argument("--cart-config", required=True, help="configs/carts/<id>.yaml")
    p.add_argument("--flash", required=True, help="flash file (provisioned by the rack)")
    p.add_argument("--rtc", required=True, help="battery-backed RTC offset file")
    p.add_argument("--state", required=True, help="one-byte state file (0 off 1 booting 2 idle 3 flash)")
    p.add_argument("--console-fd", type=int, required=True, help="inherited pty master fd")
    p.add_argument("--flash-time-scale", type=float, default=1.0, help="multiplies page_program_ms")
    p.add_argument("--faults", default=None, help="flash fault file (JSON, set by the rack's control interface)")
    return p.parse_args(argv)


def lose_power_with_the_supply() -> None:
    """The process that started this cart (the rack: its supply) going away, even by SIGKILL, is a power
    loss: the cart process ends at once, as a board does when its supply dies. Event-driven (a pidfd)."""
    parent = os.getppid()
    if parent == 1:  # started by init itself: nothing to watch
        return
    try:
        fd = os.pidfd_open(parent)
    except (OSError, AttributeError):  # not Linux >= 5.3: nothing to watch with
        return
    if os.getppid() != parent:  # orphaned before the pidfd was open
        os._exit(137)

    def watch() -> None:
        select.select([fd], [], [])
        os._exit(137)

    threading.Thread(target=watch, name="supply-watch", daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    power_on = power_on_time()
    lose_power_with_the_supply()
    cause = reset_cause()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    console = Console(args.console_fd)
    console.discard_input()  # an unpowered UART received nothing
    state = StateByte(args.state)
    state.set(STATE_BOOTING)
    try:
        config = load_cart(args.cart_config)
        seed = os.environ.get(SEED_ENV)
        flash = Flash(args.flash, config.flash, time_scale=args.flash_time_scale, state=state, faults=args.faults,
                      rng=random.Random(seed) if seed else None)
    except (CartConfigError, FlashError, OSError) as exc:
        print(f"vrack.cart slot {args.slot}: {exc}", file=sys.stderr)
        return 2
    board = Board(config=config, console=console, flash=flash, state=state, clock=Rtc(args.rtc),
                  slot=args.slot, argv=argv, power_on=power_on, reset_cause=cause)
    Bootloader(board).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
