"""Isolated runs: a private virtual rack per run, and slot locks on a rig that runs share.

A run on a virtual rig gets its own copy of the rig (`derive_private_rig`): every port the rack
listens on is a free one chosen now, and everything the rack writes (flash files, consoles, broker
certificates, factory images, the supply RX log) lives in `<run dir>/rack`. The copy is a real rig
file, `<run dir>/rig.yaml`, that a person can bring up again (`hil rack up reports/<run>/rig.yaml`).
Only the lab PKI (`virtual.pki`) stays shared: its signing keys are the lab's, not a run's.

A rig that runs share — a physical one, or a virtual rig whose rack somebody keeps up — is locked
per slot (`SlotLocks`): one flock'd file per slot, holding who has it, so a second run on a busy
slot waits (`--lock-wait`) or refuses with one line naming the holder. The lock is the kernel's:
a holder killed outright lets go of it.

docs/interfaces.md, "Isolated runs".
"""

from __future__ import annotations

import fcntl
import getpass
import hashlib
import json
import os
import random
import re
import shlex
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import yaml

from harness.config import Rig, Slot
from harness.power.base import DEFAULT_LOCK_DIR, LOCK_DIR_ENV, shared_dir
from harness.rackctl import RackStartError, start_rack

PRIVATE_RIG_FILE = "rig.yaml"   # <run dir>/rig.yaml: the run's copy of a virtual rig
# <run dir>/rack: that copy's virtual.run_dir (not "vrack": the rig's build command runs `python -m vrack` in
# the rig file's directory, where a vrack/ directory would shadow the package)
PRIVATE_RACK_DIR = "rack"
PORT_ATTEMPTS = 5               # port choices tried when another program takes a chosen port first
PORT_FLOOR = 10000              # private ports are chosen in [PORT_FLOOR, the kernel's ephemeral range)

_SOCKET_PORT = re.compile(r"^(TCPIP\d*::[^:]+::)(\d+)(::SOCKET)$")
_IN_USE = re.compile(r"\bport (\d+) on \S+ is in use\b")  # the rack's refusal (docs/interfaces.md)


# ---------------------------------------------------------------- the private rig of a run


def rig_ports(rig: Rig) -> list[int]:
    """The ports a virtual rig's rack listens on: the broker's and every supply's."""
    return [rig.spec.broker.port, *(s.port for s in rig.spec.supplies if s.port is not None)]


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def port_bindable(addr: str, port: int) -> bool:
    """Could a listener bind `addr`:`port` now (SO_REUSEADDR, as the rack's listeners set it)?"""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((addr, port))
        except OSError:
            return False
    return True


def choose_ports(host: str, n: int, avoid: Iterable[int] = ()) -> list[int]:
    """n distinct ports that can be bound on `host` now.

    Chosen at random below the kernel's ephemeral range, not by binding port 0: a port from bind(0) is
    an ephemeral one, which any outgoing connection on the machine may take before the rack listens
    on it (vrack.broker.free_port says the same). Still a race with other choosers: the caller retries."""
    addr = socket.gethostbyname(host)
    low = _ephemeral_low()
    if low - PORT_FLOOR < 100 * n:  # an ephemeral range that starts low: take any port, and the retries
        low = 65536
    skip, ports = set(avoid), []
    rng = random.SystemRandom()
    for _ in range(200 * n):
        port = rng.randrange(PORT_FLOOR, low)
        if port in skip or not port_bindable(addr, port):
            continue
        skip.add(port)
        ports.append(port)
        if len(ports) == n:
            return ports
    raise RackStartError(f"no {n} free ports on {host} in {PORT_FLOOR}..{low - 1} for a private rack")


def derive_private_rig(rig: Rig, run_dir: Path, *, note: str = "") -> Path:
    """Write `<run_dir>/rig.yaml`: `rig` with free ports and its rack's files in `<run_dir>/vrack`.

    Paths under the rig's own run dir move to the same place under `<run_dir>/vrack` (written relative
    to the new file, so the run dir can be moved); other paths (configs, the lab PKI) are written
    absolute and stay shared. The supply RX log is the rack's own output: it moves in any case.
    The image host's port becomes 0 (each process takes a free one). Returns the file's path."""
    assert rig.is_virtual and rig.run_dir is not None
    base = rig.path.parent
    own_run_dir = os.path.realpath(rig.run_dir)

    def place(p: str) -> str:
        # the directory resolved, the name kept: a console is a link to today's pty, never followed
        absolute = os.path.normpath(os.path.join(base, p))
        absolute = os.path.join(os.path.realpath(os.path.dirname(absolute)), os.path.basename(absolute))
        if absolute == own_run_dir or absolute.startswith(own_run_dir + os.sep):
            return os.path.normpath(os.path.join(PRIVATE_RACK_DIR, os.path.relpath(absolute, own_run_dir)))
        return absolute

    d = rig.spec.model_dump(mode="json", exclude_unset=True)
    virt = d["virtual"]
    d["configs"] = place(d["configs"])
    virt["run_dir"] = PRIVATE_RACK_DIR
    if virt.get("pki") is not None:
        virt["pki"] = place(virt["pki"])
    if virt.get("supply_rx_log") is not None:
        log = place(virt["supply_rx_log"])
        virt["supply_rx_log"] = log if not os.path.isabs(log) else os.path.join(PRIVATE_RACK_DIR, os.path.basename(log))
    for key in ("ca", "cert", "key"):
        d["broker"][key] = place(d["broker"][key])
    for key in ("image", "trust_store"):
        d["recovery"][key] = place(d["recovery"][key])
    for s in d["slots"]:
        s["console"] = place(s["console"])
    if d.get("image_host", {}).get("port"):
        d["image_host"]["port"] = 0

    ports = choose_ports(rig.spec.broker.host, len(rig_ports(rig)), avoid=rig_ports(rig))
    d["broker"]["port"] = ports[0]
    chosen = iter(ports[1:])
    for s in d["supplies"]:
        m = _SOCKET_PORT.match(s["resource"])
        if m:
            s["resource"] = f"{m.group(1)}{next(chosen)}{m.group(3)}"

    header = (f"# A private copy of {rig.path}{f' for {note}' if note else ''}, written "
              f"{time.strftime('%Y-%m-%d %H:%M:%S')}:\n"
              "# its own free ports, its rack's files in vrack/ (docs/interfaces.md, \"Isolated runs\").\n"
              f"# Bring its rack up again: hil rack up {run_dir / PRIVATE_RIG_FILE}\n")
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / PRIVATE_RIG_FILE
    tmp = path.with_name(f".{PRIVATE_RIG_FILE}.{os.getpid()}.tmp")
    tmp.write_text(header + yaml.safe_dump(d, sort_keys=False))
    os.replace(tmp, path)
    return path


def _lost_port_race(private: Rig, exc: RackStartError) -> bool:
    """The rack refused a port we chose because something else took it in between."""
    m = _IN_USE.search(str(exc).splitlines()[0] if str(exc) else "")
    return bool(m) and int(m.group(1)) in rig_ports(private)


def start_private_rack(rig: Rig, run_dir: Path, *, owner_pid: int, note: str = "",
                       attempts: int = PORT_ATTEMPTS) -> tuple[Rig, int]:
    """Derive `rig`'s private copy in `run_dir` and start its rack; (the copy, the rack's pid).

    A chosen port taken by another program before the rack could listen on it: new ports, up to
    `attempts` times, then one RackStartError naming the user's rig file."""
    last = ""
    for _ in range(attempts):
        private = Rig.load(derive_private_rig(rig, run_dir, note=note))
        try:
            return private, start_rack(private, owner_pid=owner_pid)
        except RackStartError as exc:
            if not _lost_port_race(private, exc):
                raise
            last = str(exc).splitlines()[0]
    raise RackStartError(f"{rig.path}: a private rack in {run_dir / PRIVATE_RACK_DIR} lost the ports chosen "
                         f"for it to other programs {attempts} times (last: {last})")


# ---------------------------------------------------------------- slot locks of a shared rig


class SlotLockError(Exception):
    """A slot of a shared rig is another run's (or its lock cannot be taken): one line."""


def lock_dir(rig: Rig) -> Path:
    """Where the slot locks of `rig` live: `$CART_HIL_LOCK_DIR` (for a rig used from several machines, a
    directory they all see) or /tmp/cart-hil-locks, then the rig's name; a virtual rig's rack is told apart
    by its run dir (two engineers' racks may both be named "virtual")."""
    base = Path(os.environ.get(LOCK_DIR_ENV) or DEFAULT_LOCK_DIR)
    if rig.is_virtual:
        tag = hashlib.sha256(str(rig.run_dir).encode()).hexdigest()[:10]
        return base / f"{rig.name}-{tag}"
    return base / rig.name


def _open_lock_file(path: Path) -> int:
    """Open (or create, writable by all) one slot's lock file. An existing file is opened without
    O_CREAT: in a sticky directory the kernel may refuse O_CREAT on another user's file."""
    flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        return os.open(path, flags)
    except FileNotFoundError:
        pass
    try:
        fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o666)
    except FileExistsError:
        return os.open(path, flags)
    os.fchmod(fd, 0o666)
    return fd


class _LockWaiter(threading.Thread):
    """A blocking flock on a dup of the caller's descriptor: the kernel wakes it when the holder lets
    go (or dies). If the caller has given up by then, the lock is let go at once."""

    def __init__(self, fd: int):
        super().__init__(daemon=True, name="hil-slot-lock-wait")
        self.fd = os.dup(fd)
        self.mutex = threading.Lock()
        self.done = threading.Event()
        self.gave_up = False
        self.error: OSError | None = None

    def run(self) -> None:
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        except OSError as exc:
            self.error = exc
        with self.mutex:
            if self.gave_up and self.error is None:
                fcntl.flock(self.fd, fcntl.LOCK_UN)
            self.done.set()
        os.close(self.fd)  # the caller's descriptor (same open file) keeps the lock

    def wait_for(self, seconds: float) -> bool:
        self.start()
        self.done.wait(seconds)
        with self.mutex:
            if not self.done.is_set():
                self.gave_up = True
                return False
        if self.error is not None:
            raise self.error
        return True


def _flock(fd: int, wait: float) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        if wait <= 0:
            return False
    return _LockWaiter(fd).wait_for(wait)


def _holder(fd: int) -> dict:
    try:
        info = json.loads(os.pread(fd, 65536, 0) or b"{}")
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def describe_holder(info: dict) -> str:
    """'run R (pid P, user U on H, since 12:03:11)' from a lock file's record."""
    if not info.get("run_id"):
        return "another run (it has not written who it is yet)"
    since = info.get("since")
    if isinstance(since, int | float):
        fmt = "%H:%M:%S" if time.localtime(since)[:3] == time.localtime()[:3] else "%Y-%m-%d %H:%M:%S"
        when = time.strftime(fmt, time.localtime(since))
    else:
        when = "?"
    return (f"run {info['run_id']} (pid {info.get('pid', '?')}, user {info.get('user', '?')} on "
            f"{info.get('host', '?')}, since {when})")


def _me(run_id: str, slot: Slot) -> bytes:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return json.dumps({"run_id": run_id, "pid": os.getpid(), "user": user, "host": socket.gethostname(),
                       "since": round(time.time(), 3), "slot": slot.number, "cart": slot.cart_id,
                       "command": shlex.join(sys.argv)[:1000]}).encode() + b"\n"


class SlotLocks:
    """The slots of a shared rig one run holds, from `acquire()` until `release()` (or the process ends).

    One file per slot, `<lock dir>/slot-NN.lock`, flock'd exclusively and holding a JSON record of the
    holder: run_id, pid, user, host, since (epoch s), slot, cart, command. Slots are taken in slot order
    (two runs waiting on each other's slots cannot deadlock); a refusal lets go of the ones taken."""

    def __init__(self, rig: Rig, slots: Iterable[Slot], *, run_id: str, directory: Path | None = None):
        self.rig = rig
        self.slots = sorted(slots, key=lambda s: s.number)
        self.run_id = run_id
        self.dir = directory or lock_dir(rig)
        self.held: list[int] = []

    def path(self, slot: Slot) -> Path:
        return self.dir / f"slot-{slot.number:02d}.lock"

    def acquire(self, wait: float = 0.0, announce: Callable[[str], None] | None = None) -> None:
        """Take every slot's lock, waiting up to `wait` s for each busy one (`announce` hears, once per
        busy slot, who has it). SlotLockError (one line naming the holder) if one stays busy."""
        try:
            shared_dir(self.dir)
        except OSError as exc:
            raise SlotLockError(f"cannot make the slot lock directory {self.dir} of rig {self.rig.name}: "
                                f"{exc.strerror or exc}") from None
        try:
            for slot in self.slots:
                self._take(slot, wait, announce)
        except BaseException:
            self.release()
            raise

    def _take(self, slot: Slot, wait: float, announce: Callable[[str], None] | None) -> None:
        where = f"slot {slot.number} ({slot.cart_id}) of rig {self.rig.name}"
        try:
            fd = _open_lock_file(self.path(slot))
        except OSError as exc:
            raise SlotLockError(f"{where}: cannot open its lock {self.path(slot)}: {exc.strerror or exc}") from None
        try:
            got = _flock(fd, 0)
            if not got and wait > 0:
                if announce:
                    announce(f"{where} is in use by {describe_holder(_holder(fd))}: waiting up to {wait:g} s")
                got = _flock(fd, wait)
            if not got:
                how = f"gave up after {wait:g} s (--lock-wait)" if wait > 0 else "not waiting (--lock-wait 0)"
                raise SlotLockError(f"{where} is in use by {describe_holder(_holder(fd))}: {how}")
            os.ftruncate(fd, 0)
            os.pwrite(fd, _me(self.run_id, slot), 0)
        except BaseException:
            os.close(fd)
            raise
        self.held.append(fd)

    def release(self) -> None:
        """Let go of every slot: its record emptied, then the file closed (which lets go of the lock). A
        holder killed outright leaves its record behind, but no lock: the next holder writes over it."""
        while self.held:
            fd = self.held.pop()
            try:
                os.ftruncate(fd, 0)
            except OSError:
                pass
            os.close(fd)
