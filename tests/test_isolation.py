"""Isolated runs (docs/interfaces.md, "Isolated runs"): every run on a virtual rig owns a private rack on
free ports in its own run dir; a shared rig (physical, or a virtual rack kept up) is locked per slot."""

from __future__ import annotations

import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

from harness.config import Rig
from harness.isolation import (
    PORT_ATTEMPTS,
    SlotLockError,
    SlotLocks,
    derive_private_rig,
    lock_dir,
    port_bindable,
    rig_ports,
    start_private_rack,
)
from harness.rackctl import RackStartError, _wait_gone, rack_state, start_rack, stop_rack

ROOT = Path(__file__).resolve().parent.parent
PYTEST = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:hypothesispytest"]


def _procs_naming(text: str) -> list[str]:
    """Live processes whose command line contains `text` (a run dir: the rack, mosquitto, the carts)."""
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if text in cmd:
                found.append(f"{d.name}: {cmd[:200]}")
    return found


def _assert_nothing_left(run_dir: Path) -> None:
    rig = Rig.load(run_dir / "rig.yaml")
    assert rack_state(rig) is None and not (rig.run_dir / "rack.json").exists()
    assert not _procs_naming(str(run_dir)), _procs_naming(str(run_dir))
    assert all(port_bindable("127.0.0.1", p) for p in rig_ports(rig)), rig_ports(rig)
    assert not any(os.path.lexists(s.console_url) for s in rig.slots), "console links (ptys) left behind"


def _read_line(stream, timeout: float) -> str:
    """The next line of a child's pipe, or '' at its end or after `timeout`."""
    ready, _, _ = select.select([stream], [], [], timeout)
    return stream.readline() if ready else ""


# ---------------------------------------------------------------- private racks


def test_two_runs_at_once_on_the_default_rig_each_own_a_rack(tmp_path):
    """Both runs pass; the one that ends first stops only its own rack (the other is still using its own:
    it runs a power cycle more); each rack had its own ports, never the default rig's fixed ones."""
    runs = {"a": ["-k", "test_supply_identity"],
            "b": ["-k", "test_supply_identity or test_console_alive_across_power_cycle"]}
    procs = {name: subprocess.Popen([*PYTEST, "test_suites/test_rack_smoke.py", "--cart", "cart-01",
                                     "--hil-run-dir", str(tmp_path / name), *k],
                                    cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for name, k in runs.items()}
    out = {name: p.communicate(timeout=120)[0] for name, p in procs.items()}
    assert procs["a"].returncode == 0 and "1 passed" in out["a"], out["a"]
    assert procs["b"].returncode == 0 and "2 passed" in out["b"], out["b"]
    default = Rig.load(ROOT / "rigs" / "virtual.yaml")
    private = {name: Rig.load(tmp_path / name / "rig.yaml") for name in runs}
    a, b = (set(rig_ports(r)) for r in private.values())
    assert not a & b and not (a | b) & set(rig_ports(default)), (a, b)
    assert "BOOT: bl=" in (tmp_path / "b" / "consoles" / "cart-01.log").read_text()
    for name, rig in private.items():
        assert rig.run_dir == tmp_path / name / "rack"
        _assert_nothing_left(tmp_path / name)


def test_private_rig_file_is_a_rig_of_its_own(tmp_path):
    """The copy keeps the rig, moves what the rack writes into <run dir>/rack and shares the lab PKI."""
    user = Rig.load(ROOT / "rigs" / "virtual.yaml")
    private = Rig.load(derive_private_rig(user, tmp_path, note="run r1"))
    data = yaml.safe_load((tmp_path / "rig.yaml").read_text())
    assert data["virtual"]["run_dir"] == "rack" and data["slots"][0]["console"] == \
        "rack/dev/serial/by-id/vcart-slot01"
    assert private.run_dir == tmp_path / "rack"
    assert private.resolve(private.spec.virtual.pki) == user.resolve(user.spec.virtual.pki)
    assert private.resolve(private.spec.virtual.supply_rx_log) == tmp_path / "rack" / "supply-rx.log"
    assert private.resolve(private.spec.broker.ca) == tmp_path / "rack" / "broker" / "ca.pem"
    assert private.resolve(private.spec.recovery.image) == tmp_path / "rack" / "factory" / "fw-{version}.img"
    assert [s.cart_id for s in private.slots] == [s.cart_id for s in user.slots]
    assert len(set(rig_ports(private))) == len(rig_ports(user)) and not set(rig_ports(private)) & set(rig_ports(user))


def test_a_port_taken_before_the_rack_listens_is_chosen_again(rig_factory, tmp_path, monkeypatch):
    import harness.isolation as iso

    user = Rig.load(rig_factory(["cart-02"]))
    thief = socket.socket()
    thief.bind(("127.0.0.1", 0))
    thief.listen()
    taken = thief.getsockname()[1]
    real, calls = iso.choose_ports, []

    def first_one_taken(host, n, avoid=()):
        ports = real(host, n, avoid)
        calls.append(ports)
        return [taken, *ports[1:]] if len(calls) == 1 else ports

    monkeypatch.setattr(iso, "choose_ports", first_one_taken)
    try:
        private, pid = start_private_rack(user, tmp_path / "run", owner_pid=os.getpid())
        try:
            assert len(calls) == 2 and private.spec.broker.port == calls[1][0] != taken
            assert rack_state(private)["pid"] == pid
        finally:
            stop_rack(pid)
        calls.clear()
        monkeypatch.setattr(iso, "choose_ports", lambda host, n, avoid=(): [taken, *real(host, n - 1, avoid)])
        with pytest.raises(RackStartError) as ei:
            start_private_rack(user, tmp_path / "run2", owner_pid=os.getpid())
        assert str(ei.value) == (f"{user.path}: a private rack in {tmp_path / 'run2' / 'rack'} lost the ports chosen "
                                 f"for it to other programs {PORT_ATTEMPTS} times (last: "
                                 f"{tmp_path / 'run2' / 'rig.yaml'}: broker: port {taken} on 127.0.0.1 is in use "
                                 f"(virtual rack exited with 2; log {tmp_path / 'run2' / 'rack' / 'vrack.log'}))")
    finally:
        thief.close()


WAIT_ON_STDIN = """
import sys

def test_hold(cart):
    cart.power_on()
    print("READY", flush=True)
    sys.stdin.read()
"""


def test_private_rack_dies_with_a_controller_killed_outright(rig_factory, tmp_path):
    rig_path = rig_factory(["cart-03"])
    (tmp_path / "test_hold.py").write_text(WAIT_ON_STDIN)
    run = tmp_path / "killed-run"
    p = subprocess.Popen([*PYTEST, "-s", str(tmp_path / "test_hold.py"), "--rig", str(rig_path),
                          "--hil-run-dir", str(run), "--rootdir", str(tmp_path)],
                         cwd=tmp_path, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True)
    try:
        lines = []
        while not lines or "READY" not in lines[-1]:
            line = _read_line(p.stdout, 60)
            assert line, f"the run never got its cart up: {''.join(lines)}"
            lines.append(line)
        private = Rig.load(run / "rig.yaml")
        rack_pid = rack_state(private)["pid"]
        assert _procs_naming(str(run / "rack" / "flash")), "the cart is running"
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    assert _wait_gone(rack_pid, 20.0), "the private rack outlived its run"
    _assert_nothing_left(run)
    assert not (rig_path.parent / "run").exists(), "the rig's own run dir is never touched"


# ---------------------------------------------------------------- shared rigs: slot locks

QUICK = """
def test_quick():
    assert True
"""

HOLD = """
import sys

def test_hold():
    print("READY", flush=True)
    sys.stdin.read()
"""


@pytest.fixture
def lab_rig(tmp_path):
    """rigs/lab-example.yaml (lab-bench-3, five slots) as a file of its own; no instrument is ever opened."""
    data = yaml.safe_load((ROOT / "rigs" / "lab-example.yaml").read_text())
    data["configs"] = str(ROOT / "configs")
    path = tmp_path / "lab.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture
def lock_env(tmp_path):
    return {**os.environ, "CART_HIL_LOCK_DIR": str(tmp_path / "locks")}


def _start_holder(tmp_path: Path, rig: Path, env: dict, cart: str, run: str) -> subprocess.Popen:
    (tmp_path / "test_hold.py").write_text(HOLD)
    p = subprocess.Popen([*PYTEST, "-s", str(tmp_path / "test_hold.py"), "--rig", str(rig), "--cart", cart,
                          "--hil-run-dir", str(tmp_path / run), "--rootdir", str(tmp_path)],
                         cwd=tmp_path, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    out = ""
    while "READY" not in out:
        line = _read_line(p.stdout, 60)
        assert line, f"the holder never started: {out}"
        out += line
    return p


def _quick(tmp_path: Path, rig: Path, env: dict, *args: str, run: str = "second") -> subprocess.Popen:
    (tmp_path / "test_quick.py").write_text(QUICK)
    return subprocess.Popen([*PYTEST, str(tmp_path / "test_quick.py"), "--rig", str(rig),
                             "--hil-run-dir", str(tmp_path / run), "--rootdir", str(tmp_path), *args],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


HOLDER_RE = (r"run holder-run \(pid {pid}, user \S+ on \S+, since \d\d:\d\d:\d\d\)")


def test_busy_slot_of_a_physical_rig_is_refused_naming_the_holder(tmp_path, lab_rig, lock_env):
    holder = _start_holder(tmp_path, lab_rig, lock_env, "cart-06", "holder-run")
    try:
        p = _quick(tmp_path, lab_rig, lock_env, "--cart", "cart-06")
        out, err = p.communicate(timeout=60)
        assert p.returncode == 2, out + err
        (line,) = err.splitlines()
        assert re.fullmatch(r"Exit: hil: slot 3 \(cart-06\) of rig lab-bench-3 is in use by "
                            + HOLDER_RE.format(pid=holder.pid) + r": not waiting \(--lock-wait 0\)", line), line
        # another slot of the same rig is free
        p = _quick(tmp_path, lab_rig, lock_env, "--cart", "cart-01", run="other-slot")
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0 and "1 passed" in out, out + err
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    p = _quick(tmp_path, lab_rig, lock_env, "--cart", "cart-06", run="after")
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0 and "1 passed" in out, out + err


def test_a_run_waits_for_a_slot_whose_holder_is_killed(tmp_path, lab_rig, lock_env):
    holder = _start_holder(tmp_path, lab_rig, lock_env, "cart-06", "holder-run")
    try:
        waiter = _quick(tmp_path, lab_rig, lock_env, "--cart", "cart-06", "--lock-wait", "60")
        line = _read_line(waiter.stderr, 60)
        assert re.fullmatch(r"hil: slot 3 \(cart-06\) of rig lab-bench-3 is in use by "
                            + HOLDER_RE.format(pid=holder.pid) + r": waiting up to 60 s\n", line), line
    finally:
        holder.kill()  # the kernel lets go of a killed holder's lock
        holder.wait()
    out, err = waiter.communicate(timeout=60)
    assert waiter.returncode == 0 and "1 passed" in out, out + err


def test_slot_locks_in_process(lab_rig, tmp_path):
    rig = Rig.load(lab_rig)
    first = SlotLocks(rig, rig.select(["cart-01", "cart-06"]), run_id="first", directory=tmp_path / "locks")
    first.acquire()
    heard: list[str] = []
    second = SlotLocks(rig, rig.select(["cart-03", "cart-06"]), run_id="second", directory=tmp_path / "locks")
    with pytest.raises(SlotLockError, match=r"^slot 3 \(cart-06\) of rig lab-bench-3 is in use by run first "):
        second.acquire()
    assert not second.held, "a refusal lets go of the slots it took (slot 2, cart-03)"
    announced, done = threading.Event(), threading.Event()

    def announce(line: str) -> None:
        heard.append(line)
        announced.set()

    def waiting() -> None:
        second.acquire(30, announce=announce)
        done.set()

    t = threading.Thread(target=waiting)
    t.start()
    assert announced.wait(10) and "waiting up to 30 s" in heard[-1]
    assert not done.is_set()
    first.release()
    t.join(10)
    assert done.is_set() and len(second.held) == 2
    assert b'"run_id": "second"' in (tmp_path / "locks" / "slot-03.lock").read_bytes()
    second.release()
    assert (tmp_path / "locks" / "slot-03.lock").read_bytes() == b"", "a released slot names nobody"


def test_a_virtual_rack_kept_up_is_used_as_it_is_and_locked(rig_factory, tmp_path, lock_env):
    """--rig naming a virtual rig whose rack is up: the run uses that rack (no private copy), leaves it up,
    and holds its slot locks like a physical rig's."""
    rig = Rig.load(rig_factory(["cart-04"]))
    pid = start_rack(rig, owner_pid=os.getpid())
    try:
        (tmp_path / "test_scenario.py").write_text("def test_boots(cart):\n    assert cart.power_on().config == "
                                                   "cart.id\n")
        p = subprocess.run([*PYTEST, str(tmp_path / "test_scenario.py"), "--rig", str(rig.path),
                            "--hil-run-dir", str(tmp_path / "shared-run"), "--rootdir", str(tmp_path)],
                           cwd=tmp_path, env=lock_env, capture_output=True, text=True, timeout=60)
        assert p.returncode == 0 and "1 passed" in p.stdout, p.stdout + p.stderr
        assert not (tmp_path / "shared-run" / "rig.yaml").exists()
        assert rack_state(rig)["pid"] == pid, "a rack the run did not start stays up"
        holder = SlotLocks(rig, rig.slots, run_id="bench-engineer",
                           directory=Path(lock_env["CART_HIL_LOCK_DIR"]) / lock_dir(rig).name)
        holder.acquire()
        try:
            p = subprocess.run([*PYTEST, str(tmp_path / "test_scenario.py"), "--rig", str(rig.path),
                                "--hil-run-dir", str(tmp_path / "refused"), "--rootdir", str(tmp_path)],
                               cwd=tmp_path, env=lock_env, capture_output=True, text=True, timeout=60)
        finally:
            holder.release()
        assert p.returncode == 2
        assert p.stderr.startswith("Exit: hil: slot 1 (cart-04) of rig test-rig is in use by run bench-engineer "), \
            p.stderr
    finally:
        stop_rack(pid)
