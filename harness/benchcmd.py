"""Bench commands for an engineer at the rack: `hil rack up|down|status`, `hil console SLOT`,
`hil power SLOT on|off|cycle|measure`.

They use only the rig file and the drivers (supply drivers over VISA, the console through
`harness.console`), so they work on a physical rig as they do on a virtual one; a virtual rig needs
its own rack up (`hil rack up`: the rig's run dir and ports). A SLOT is a slot number or a cart id.

Exit status: 0 done; 1 a supply or console failed while doing it; 2 refused before anything was
done (bad input, the rack is not up, a console that cannot be opened); 3 `rack status`: the rack is
down; 128 + the signal's number when a signal stopped it (143 SIGTERM, 129 SIGHUP, 130 Ctrl-C). A stop
by signal prints one line, leaves the output the command was switching off (safe state) and stops the
rack the command started; `rack down` finishes its stop instead, and Ctrl-C is the normal end of
`rack up --foreground` (exit 0).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import math
import os
import select
import signal
import sys
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path

from harness.config import Rig, Slot
from harness.power import ChannelPower, PowerError, ScpiSupply, open_supply

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RIG = ROOT / "rigs" / "virtual.yaml"
CONSOLE_LOG_DIR = ROOT / "reports" / "console"

#: a CI runner or `timeout` cancelling the job, the terminal closed, Ctrl-C
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)
PROCESSES_GONE_S = 30.0  # rack down: the rack's own stop (20 s, then SIGKILL) and the processes it started


class BenchError(Exception):
    """Refused before anything was done: one line, exit status 2."""


class Terminated(BaseException):
    """A stop signal, raised in the main thread where the command is waiting. `status` is what a shell
    reports for a job the signal ended: 128 + its number."""

    def __init__(self, signum: int):
        self.signum = signum
        self.status = 128 + signum
        super().__init__("Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name)


@contextlib.contextmanager
def _stop_signals() -> Iterator[None]:
    """A stop signal raises `Terminated`, once: the cleanup that follows is not cut short by another."""

    def handler(signum, frame):
        _hold_signals()
        raise Terminated(signum)

    old = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@contextlib.contextmanager
def _uninterrupted() -> Iterator[None]:
    """A stop signal waits until the instrument exchange in here is done (a command sent, its reply and the error
    queue read): cut in the middle, the link would be left out of step, and the safe state after it would hang
    on a reply that belongs to the cut exchange. The signal is delivered on leaving."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _hold_signals() -> None:
    """From here on the command finishes what it does (a cleanup, a stop): stop signals are ignored."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)


def _command(name: str, fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """The frame of every bench command: refusals as one line (exit 2), a stop by signal as one line
    (128 + its number) when the command had nothing of its own to undo."""

    def run(a: argparse.Namespace) -> int:
        with _stop_signals():
            try:
                return fn(a)
            except BenchError as exc:
                print(f"hil: {(str(exc).splitlines() or [''])[0]}", file=sys.stderr)
                return 2
            except Terminated as sig:
                print(f"hil {name}: {sig}: stopped, nothing changed", file=sys.stderr)
                return sig.status

    return run


# ------------------------------------------------------------------ rig, slots, supplies


def _slot(rig: Rig, text: str) -> Slot:
    """A slot by number or by the id of the cart in it."""
    for s in rig.slots:
        if text in (str(s.number), s.cart_id):
            return s
    known = ", ".join(f"{s.number} {s.cart_id}" for s in rig.slots)
    raise BenchError(f"{rig.path}: no slot {text!r} (slots: {known})")


def _where(slot: Slot) -> str:
    return f"slot {slot.number} {slot.cart_id} ({slot.supply.name}:{slot.channel})"


def _need_rack(rig: Rig) -> None:
    """BenchError if the rig is virtual and its rack is not up (a physical rig's rack is the hardware)."""
    if not rig.is_virtual:
        return
    from harness.rackctl import rack_state

    if rack_state(rig) is None:
        raise BenchError(f"{rig.path}: the virtual rack of rig {rig.name} is not up (run dir {rig.run_dir}): "
                         f"start it with `hil rack up {rig.path}`")


class Supplies:
    """One driver per supply of the rig, opened on first use; `close()` closes the sessions and leaves
    the outputs as they are."""

    def __init__(self, rig: Rig):
        self.rig = rig
        self._open: dict[str, ScpiSupply] = {}

    def driver(self, name: str) -> ScpiSupply:
        if name not in self._open:
            spec = self.rig.supply(name)
            self._open[name] = open_supply(spec.name, spec.resource, spec.dialect, spec.channels,
                                           timeout_ms=spec.timeout_ms, model=spec.model)
        return self._open[name]

    def channel(self, slot: Slot) -> ChannelPower:
        """The slot's channel with its cart's limits (a voltage above them is refused before it is sent)."""
        lim = slot.cart.supply
        return ChannelPower(self.driver(slot.supply.name), slot.channel, max_voltage=lim.max_voltage,
                            current_limit=lim.current_limit, label=_where(slot))

    def outputs_off(self) -> tuple[int, list[str]]:
        """Safe state on every slot's channel, one sequence per supply: (outputs switched off, errors)."""
        by_supply: dict[str, list[Slot]] = {}
        for s in self.rig.slots:
            by_supply.setdefault(s.supply.name, []).append(s)
        done, errors = 0, []
        for name, slots in by_supply.items():
            try:
                self.driver(name).safe_state([s.channel for s in slots])
                done += len(slots)
            except PowerError as exc:  # every supply is still tried
                carts = ", ".join(s.cart_id for s in slots)
                errors.append(f"supply {name} ({carts}): {_first(exc)}")
        return done, errors

    def close(self) -> None:
        for sup in self._open.values():
            with contextlib.suppress(PowerError):
                sup.close()
        self._open.clear()


def _first(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0]


# ------------------------------------------------------------------ hil power


def _power_on(power: ChannelPower, slot: Slot) -> str:
    """The cart's nominal voltage and current limit, then output on, read back."""
    lim = slot.cart.supply
    power.set_voltage(lim.voltage)
    power.set_current_limit(lim.current_limit)
    power.on()
    _expect_output(power, True, "ON")
    return f"output ON at {lim.voltage:g} V, limit {lim.current_limit:g} A"


def _power_off(power: ChannelPower) -> str:
    power.off()
    _expect_output(power, False, "OFF")
    return "output OFF"


def _expect_output(power: ChannelPower, on: bool, command: str) -> None:
    """The output reads back as switched; else the error names what the supply's error queue holds."""
    if power.is_on() == on:
        return
    errors = power.supply.errors()
    raise PowerError(f"output still {'OFF' if on else 'ON'} after output {command}; the supply's error queue: "
                     + ("; ".join(errors) if errors else "empty"))


def _reading(power: ChannelPower) -> str:
    state = "ON" if power.is_on() else "OFF"
    return f"output {state}, {power.measure_voltage():.3f} V, {power.measure_current():.3f} A"


def cmd_power(a: argparse.Namespace) -> int:
    rig = Rig.load(a.rig)
    slot = _slot(rig, a.slot)
    _need_rack(rig)
    off_s = rig.spec.power_off_s if a.off_s is None else a.off_s
    supplies = Supplies(rig)
    power = supplies.channel(slot)
    try:
        if a.action == "measure":
            with _uninterrupted():
                said = _reading(power)
        elif a.action == "on":
            with _uninterrupted():
                said = _power_on(power, slot)
        elif a.action == "off":
            with _uninterrupted():
                said = _power_off(power)
        else:
            with _uninterrupted():
                _power_off(power)
            time.sleep(off_s)  # physics: the rail falls and the cart's capacitors drain
            with _uninterrupted():
                said = f"power cycled (OFF for {off_s:g} s), {_power_on(power, slot)}"
        print(f"{_where(slot)}: {said}")
        return 0
    except PowerError as exc:
        print(f"hil power: {_where(slot)}: {_first(exc)}", file=sys.stderr)
        return 1
    except Terminated as sig:
        if a.action == "measure":
            raise
        try:
            power.safe_state()
            left = "output left OFF (safe state)"
        except PowerError as exc:
            left = f"could not switch the output off: {_first(exc)}"
        print(f"hil power: {sig}: {_where(slot)}: {a.action} stopped, {left}", file=sys.stderr)
        return sig.status
    finally:
        supplies.close()


def _off_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or not 0 <= value <= 60:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds in 0..60")
    return value


# ------------------------------------------------------------------ hil rack up|down|status


def _since(started: float) -> str:
    s = max(0, int(time.time() - started))
    up = f"{s // 3600}h{s % 3600 // 60:02d}m{s % 60:02d}s" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"
    return f"up {up} (since {datetime.fromtimestamp(started).astimezone().isoformat(timespec='seconds')})"


def _slot_lines(rig: Rig) -> list[str]:
    return [f"  slot {s.number:2d}  {s.cart_id:10s} console {s.console_url}  supply {s.supply.name}:{s.channel}"
            for s in rig.slots]


def _print_up(rig: Rig, state: dict, how: str) -> None:
    print(f"rack of rig {rig.name}: {how}, pid {state['pid']}, {_since(state['started'])}; run dir {rig.run_dir}, "
          f"log {rig.run_dir / 'vrack.log'}")
    print("\n".join(_slot_lines(rig)), flush=True)


def cmd_rack_up(a: argparse.Namespace) -> int:
    rig = Rig.load(a.rig)
    if not rig.is_virtual:
        raise BenchError(f"{rig.path}: rig {rig.name} is physical: its rack is the hardware on the bench, nothing "
                         f"to start (`hil rack status {rig.path}` shows its outputs)")
    from harness.rackctl import check_run_dir, rack_state, start_rack

    check_run_dir(rig)
    rig.run_dir.mkdir(parents=True, exist_ok=True)
    try:
        with open(rig.run_dir / ".rack.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # a test run starting this rig's rack right now: wait for it
            state = rack_state(rig)
            if state is not None:
                _print_up(rig, state, "already up")
                return 0
            pid = start_rack(rig, owner_pid=os.getpid() if a.foreground else None)
    except Terminated as sig:  # while it was starting: a half-started rack is ours to stop
        _hold_signals()
        stopped = [_stop_tree(p) for p in _children(os.getpid())]
        print(f"hil rack up: {sig} while the rack was starting: stopped it "
              f"({sum(n for n, _ in stopped)} processes gone)", file=sys.stderr)
        return sig.status
    state = rack_state(rig)  # written by the rack before it says it is ready
    if state is None:
        raise BenchError(f"{rig.path}: the virtual rack (pid {pid}) ended right after it was ready; "
                         f"log {rig.run_dir / 'vrack.log'}")
    if not a.foreground:
        _print_up(rig, state, "up in the background")
        print(f"stop it with: hil rack down {rig.path}")
        return 0
    _print_up(rig, state, "up in the foreground")
    print("Ctrl-C or SIGTERM stops it (supply outputs off, then the rack)", flush=True)
    return _serve(rig, pid)


def _serve(rig: Rig, pid: int) -> int:
    """Wait until the rack ends or we are told to stop it (Ctrl-C: exit 0, the normal end; a signal: 128 + it)."""
    fd = os.pidfd_open(pid)
    try:
        select.select([fd], [], [])
    except Terminated as sig:
        print(f"hil rack up: {sig}: {_down(rig, pid)[1]}", file=sys.stderr)
        return 0 if sig.signum == signal.SIGINT else sig.status
    finally:
        os.close(fd)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)
    print(f"hil rack up: the rack (pid {pid}) exited by itself; see {rig.run_dir / 'vrack.log'}", file=sys.stderr)
    return 1


def _outputs_off(rig: Rig) -> tuple[int, list[str]]:
    supplies = Supplies(rig)
    try:
        return supplies.outputs_off()
    finally:
        supplies.close()


def _down(rig: Rig, pid: int) -> tuple[bool, str]:
    """Supply outputs off, then the rack and every process it started: (all done, what was done in one line)."""
    off, errors = _outputs_off(rig)
    gone, left = _stop_tree(pid)
    said = f"{off} outputs off, rack stopped (pid {pid}, {gone} processes gone)"
    if errors:
        said += f"; outputs not confirmed off: {'; '.join(errors)}"
    if left:
        said += f"; still running after {PROCESSES_GONE_S:.0f} s (killed): pids {', '.join(map(str, left))}"
    return not errors and not left, said


def cmd_rack_down(a: argparse.Namespace) -> int:
    rig = Rig.load(a.rig)
    state = None
    if rig.is_virtual:
        from harness.rackctl import rack_state

        state = rack_state(rig)
        if state is None:
            print(f"rack of rig {rig.name}: not up (run dir {rig.run_dir}): nothing to stop")
            return 0
    _hold_signals()  # a stop under way is finished, whatever arrives meanwhile: it is what a stop signal asks for
    if state is None:  # a physical rig: its outputs are what there is to switch off
        off, errors = _outputs_off(rig)
        print(f"rig {rig.name} (physical): {off} of {len(rig.slots)} outputs off"
              + (f"; {'; '.join(errors)}" if errors else ""))
        return 1 if errors else 0
    ok, said = _down(rig, int(state["pid"]))
    print(f"rack of rig {rig.name}: {said}")
    return 0 if ok else 1


def cmd_rack_status(a: argparse.Namespace) -> int:
    rig = Rig.load(a.rig)
    if rig.is_virtual:
        from harness.rackctl import rack_state

        state = rack_state(rig)
        if state is None:
            print(f"rack of rig {rig.name}: down (run dir {rig.run_dir})")
            return 3
        print(f"rack of rig {rig.name}: up, pid {state['pid']}, {_since(state['started'])}")
    else:
        print(f"rig {rig.name} (physical): {len(rig.slots)} slots")
    supplies = Supplies(rig)
    failed = False
    try:
        for s in rig.slots:
            try:
                said = _reading(supplies.channel(s))
            except PowerError as exc:
                said, failed = f"supply error: {_first(exc)}", True
            print(f"  slot {s.number:2d}  {s.cart_id:10s} {s.supply.name}:{s.channel}  {said}  console {s.console_url}")
    finally:
        supplies.close()
    return 1 if failed else 0


# ------------------------------------------------------------------ processes


def _children(pid: int) -> list[int]:
    return [p for p, pp in _ppids().items() if pp == pid]


def _ppids() -> dict[int, int]:
    """pid -> parent pid of every process now."""
    out = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    out[int(d)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    return out


def _tree(pid: int) -> list[int]:
    """`pid` and every process below it (the rack's carts, its broker)."""
    ppids = _ppids()
    found, todo = [pid], [pid]
    while todo:
        parent = todo.pop()
        kids = [p for p, pp in ppids.items() if pp == parent]
        found += kids
        todo += kids
    return found


def _stop_tree(pid: int) -> tuple[int, list[int]]:
    """Stop the rack (SIGTERM: it stops its carts, ptys and broker itself) and wait until it and every
    process it had started are gone; SIGKILL what is left at the deadline. (processes gone, pids left)."""
    from harness.rackctl import stop_rack

    fds = {}
    for p in _tree(pid):  # held before the stop: a pid reused meanwhile is not mistaken for ours
        with contextlib.suppress(ProcessLookupError):
            fds[p] = os.pidfd_open(p)
    deadline = time.monotonic() + PROCESSES_GONE_S
    try:
        stop_rack(pid)
        alive = dict(fds)
        while alive and (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select(list(alive.values()), [], [], left)
            alive = {p: fd for p, fd in alive.items() if fd not in ready}
        for fd in alive.values():
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(fd, signal.SIGKILL)
        return len(fds) - len(alive), sorted(alive)
    finally:
        for fd in fds.values():
            os.close(fd)


# ------------------------------------------------------------------ hil console


def cmd_console(a: argparse.Namespace) -> int:
    from harness.console import ConsoleError
    from harness.terminal import interactive, open_console, run_terminal

    rig = Rig.load(a.rig)
    slot = _slot(rig, a.slot)
    _need_rack(rig)
    log_path = a.log_dir / f"{slot.cart_id}-{time.strftime('%Y%m%d-%H%M%S')}.log"
    try:
        console = open_console(slot, log_path)
    except ConsoleError as exc:
        raise BenchError(f"slot {slot.number} {slot.cart_id}: {_first(exc)}") from None
    except OSError as exc:  # the log cannot be written: no session without its record
        raise BenchError(f"slot {slot.number} {slot.cart_id}: cannot write the console log {log_path}: "
                         f"{exc.strerror or exc}") from None
    keys = interactive()
    leave = "Ctrl-] exits" if keys else "sending stdin's lines; EOF ends"
    nl = "\n" if keys else ""  # after the cart's last output (a prompt has no newline)
    try:  # (the line inside: a stop signal right after it still closes the console and says so)
        print(f"hil console: slot {slot.number} {slot.cart_id} on {slot.console_url}; log {log_path}; {leave}",
              file=sys.stderr, flush=True)
        rc = run_terminal(console)
        print(f"{nl}hil console: closed; log {log_path}", file=sys.stderr)
        return rc
    except ConsoleError as exc:
        print(f"hil console: slot {slot.number} {slot.cart_id}: {_first(exc)}; log {log_path}", file=sys.stderr)
        return 1
    except Terminated as sig:
        print(f"{nl}hil console: {sig}: console closed; log {log_path}", file=sys.stderr)
        return sig.status
    finally:
        console.close()


# ------------------------------------------------------------------ command line


def add_cli(sub) -> None:
    k = sub.add_parser("rack", help="the rig's rack: bring a virtual rack up or down, show every slot's output")
    ks = k.add_subparsers(dest="rackcmd", required=True)
    ku = ks.add_parser("up", help="start a virtual rig's rack in the background (returns once it is ready)")
    ku.add_argument("rig", type=Path, nargs="?", default=DEFAULT_RIG)
    ku.add_argument("--foreground", action="store_true",
                    help="keep it in this terminal: Ctrl-C or SIGTERM switches the outputs off and stops it")
    ku.set_defaults(fn=_command("rack up", cmd_rack_up))
    kd = ks.add_parser("down", help="switch every slot's output off, then stop the rack and wait for its processes")
    kd.add_argument("rig", type=Path, nargs="?", default=DEFAULT_RIG)
    kd.set_defaults(fn=_command("rack down", cmd_rack_down))
    kst = ks.add_parser("status", help="up or down (exit 0 / 3), and per slot: cart, output, measured V and I, "
                                       "console")
    kst.add_argument("rig", type=Path, nargs="?", default=DEFAULT_RIG)
    kst.set_defaults(fn=_command("rack status", cmd_rack_status))

    c = sub.add_parser("console", help="an interactive terminal on a cart's console (Ctrl-] exits), logged to "
                                       "reports/console/")
    c.add_argument("slot", metavar="SLOT", help="slot number or cart id")
    c.add_argument("--rig", type=Path, default=DEFAULT_RIG)
    c.add_argument("--log-dir", type=Path, default=CONSOLE_LOG_DIR, help=f"where the log goes ({CONSOLE_LOG_DIR})")
    c.set_defaults(fn=_command("console", cmd_console))

    p = sub.add_parser("power", help="switch or measure a slot's supply output")
    p.add_argument("slot", metavar="SLOT", help="slot number or cart id")
    p.add_argument("action", choices=["on", "off", "cycle", "measure"],
                   help="on: the cart's nominal voltage and current limit, output on; cycle: off, wait, on; "
                        "measure: output state, V, I")
    p.add_argument("--rig", type=Path, default=DEFAULT_RIG)
    p.add_argument("--off-s", type=_off_seconds, default=None, metavar="S",
                   help="cycle: seconds off (default: the rig's power_off_s)")
    p.set_defaults(fn=_command("power", cmd_power))
