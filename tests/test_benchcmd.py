"""The bench commands as an engineer runs them: `hil rack up|down|status`, `hil power`, `hil console`,
each as a subprocess on a real virtual rack of its own (a copy of rigs/virtual.yaml with two carts, its
ports moved into 48400-48499 and its paths into tmp_path)."""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from harness.config import Rig
from harness.isolation import port_bindable
from harness.power import open_supply
from harness.rackctl import rack_state, stop_rack

ROOT = Path(__file__).resolve().parent.parent
PORTS = range(48400, 48500)  # this file's own: every rack here takes a block of ten (see `rig_file`)


def hil(*args: str, timeout: float = 90) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "harness.cli", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, stdin=subprocess.DEVNULL, timeout=timeout)


def write_rig(tmp_path: Path, base: int, kind: str = "virtual", carts: int = 2) -> Path:
    """rigs/virtual.yaml with its first `carts` slots, the broker on `base`, supply i on base + i, and every
    path that pointed into reports/ moved under tmp_path. kind physical: the same supplies and consoles
    described as a lab rig (no rack of its own)."""
    assert base in PORTS and base + 9 in PORTS
    rig = yaml.safe_load((ROOT / "rigs" / "virtual.yaml").read_text())

    def moved(v):
        if isinstance(v, dict):
            return {k: moved(x) for k, x in v.items()}
        if isinstance(v, list):
            return [moved(x) for x in v]
        if isinstance(v, str) and v.startswith("../reports/"):
            return str(tmp_path / v[len("../"):])
        return v

    rig = moved(rig)
    rig["configs"] = str(ROOT / "configs")
    rig["broker"]["port"] = base
    for i, s in enumerate(rig["supplies"], 1):
        s["resource"] = re.sub(r"::\d+::SOCKET$", f"::{base + i}::SOCKET", s["resource"])
    rig["slots"] = rig["slots"][:carts]
    if kind == "physical":
        rig["kind"] = "physical"
        del rig["virtual"]
    text = yaml.safe_dump(rig, sort_keys=False)
    ports = [rig["broker"]["port"], *(int(s["resource"].split("::")[2]) for s in rig["supplies"])]
    assert all(p in PORTS for p in ports) and str(ROOT / "reports") not in text, "nothing of the shared rig left"
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / f"{kind}-rig.yaml"
    path.write_text(text)
    return path


@pytest.fixture
def rig_file(tmp_path):
    return lambda base, **kw: write_rig(tmp_path, base, **kw)


def port_blocks():
    """Bases of this file's port blocks whose ports (broker, five supplies) are free now. The range lies in the
    kernel's ephemeral range: an outgoing connection may hold one of its ports for a while."""
    for base in range(PORTS.start, PORTS.stop - 9, 10):
        if all(port_bindable("127.0.0.1", p) for p in range(base, base + 6)):
            yield base


def in_use(stderr: str) -> bool:
    """The rack refused a port taken since we looked (another worker's rack, an outgoing connection)."""
    return re.search(r": port 484\d\d on 127\.0\.0\.1 is in use", stderr) is not None


@pytest.fixture
def rack(rig_file):
    """`rack()`: a rig's rack brought up with `hil rack up` (background) on a free block of ports;
    (rig file, base port, what `rack up` said). Taken down with `hil rack down` afterwards (and stopped
    outright if that failed)."""
    started = []

    def up():
        for base in port_blocks():
            path = rig_file(base)
            r = hil("rack", "up", path)
            if in_use(r.stderr):
                continue
            assert r.returncode == 0, r.stderr
            started.append(path)
            return path, base, r.stdout
        pytest.fail(f"no free block of ports in {PORTS}")

    yield up
    for path in started:
        hil("rack", "down", path)
        state = rack_state(Rig.load(path))
        if state is not None:
            stop_rack(int(state["pid"]))


def tree(pid: int) -> list[int]:
    """pid and every process below it."""
    ppid = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError):
                continue
    found, todo = [pid], [pid]
    while todo:
        parent = todo.pop()
        kids = [p for p, pp in ppid.items() if pp == parent]
        found += kids
        todo += kids
    return found


def gone(pid: int) -> bool:
    """Exited (a zombie waiting for init to reap it counts: it holds no port, pty or file)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def read_until(stream, pattern: str, timeout: float) -> str:
    """What `stream` (a pipe) says until `pattern` matches it; fails at the deadline with what it said."""
    fd, text = stream.fileno(), ""
    deadline = time.monotonic() + timeout
    while not re.search(pattern, text):
        left = deadline - time.monotonic()
        assert left > 0, f"no {pattern!r} within {timeout} s; got:\n{text}"
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            chunk = os.read(fd, 65536)
            assert chunk, f"EOF before {pattern!r}; got:\n{text}"
            text += chunk.decode(errors="replace")
    return text


def output(rig_path: Path, slot: int) -> tuple[bool, float]:
    """The slot's output as the supply itself says it (a driver of our own, not hil's)."""
    s = next(x for x in Rig.load(rig_path).slots if x.number == slot)
    sup = open_supply(s.supply.name, s.supply.resource, s.supply.dialect, s.supply.channels, model=s.supply.model)
    try:
        return sup.is_on(s.channel), sup.measure_voltage(s.channel)
    finally:
        sup.close()


# ------------------------------------------------------------------ rack up / status / down


def test_rack_up_lists_slots_and_a_second_up_says_already_up(rack):
    path, _, said = rack()
    rig = Rig.load(path)
    pid = rack_state(rig)["pid"]
    lines = said.splitlines()
    assert lines[0].startswith(f"rack of rig virtual: up in the background, pid {pid}, up 0m"), said
    assert lines[1].split() == ["slot", "1", "cart-01", "console", rig.slots[0].console_url, "supply", "psu-c:3"]
    assert lines[2].split() == ["slot", "2", "cart-02", "console", rig.slots[1].console_url, "supply", "psu-a:2"]
    assert lines[3] == f"stop it with: hil rack down {rig.path}"

    again = hil("rack", "up", path)
    assert again.returncode == 0, again.stderr
    assert again.stdout.startswith(f"rack of rig virtual: already up, pid {pid}, up "), again.stdout
    assert rack_state(rig)["pid"] == pid


def test_status_shows_each_slot_through_its_supply(rack):
    path, _, _ = rack()
    assert hil("power", "2", "on", "--rig", path).returncode == 0
    r = hil("rack", "status", path)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert re.fullmatch(rf"rack of rig virtual: up, pid {rack_state(Rig.load(path))['pid']}, up \d+m\d\ds \(since .*\)",
                        lines[0]), lines[0]
    assert re.fullmatch(r"  slot  1  cart-01 +psu-c:3  output OFF, 0\.\d+ V, 0\.\d+ A  console .*vcart-slot01",
                        lines[1]), lines[1]
    assert re.fullmatch(r"  slot  2  cart-02 +psu-a:2  output ON, 12\.000 V, 0\.\d+ A  console .*vcart-slot02",
                        lines[2]), lines[2]


def test_rack_down_switches_outputs_off_and_leaves_no_process(rack):
    path, base, _ = rack()
    rig = Rig.load(path)
    assert hil("power", "cart-01", "on", "--rig", path).returncode == 0
    pid = rack_state(rig)["pid"]
    procs = tree(pid)
    assert len(procs) >= 3, "the rack, its broker and the cart that is on"

    r = hil("rack", "down", path)
    assert r.returncode == 0, r.stderr
    assert re.fullmatch(rf"rack of rig virtual: 2 outputs off, rack stopped \(pid {pid}, \d+ processes gone\)\n",
                        r.stdout), r.stdout
    assert [p for p in procs if not gone(p)] == []
    assert all(port_bindable("127.0.0.1", p) for p in range(base, base + 6))
    assert not any(os.path.lexists(s.console_url) for s in rig.slots), "console links removed"

    status = hil("rack", "status", path)
    assert (status.returncode, status.stdout) == (3, f"rack of rig virtual: down (run dir {rig.run_dir})\n")
    again = hil("rack", "down", path)
    assert (again.returncode, again.stdout) == (0, f"rack of rig virtual: not up (run dir {rig.run_dir}): "
                                                   "nothing to stop\n")


def foreground_rack(rig_file) -> tuple[subprocess.Popen, Path, int]:
    """`hil rack up --foreground` on a free block of ports, once it has said how to stop it:
    (its process, the rig file, the base port)."""
    for base in port_blocks():
        path = rig_file(base)
        proc = subprocess.Popen([sys.executable, "-m", "harness.cli", "rack", "up", str(path), "--foreground"],
                                cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            read_until(proc.stdout, r"Ctrl-C or SIGTERM stops it", 60)
        except AssertionError:
            proc.kill()
            proc.wait()
            if in_use(proc.stderr.read().decode()):
                continue
            raise
        return proc, path, base
    pytest.fail(f"no free block of ports in {PORTS}")


@pytest.mark.parametrize(("sig", "status", "said"), [(signal.SIGTERM, 143, "SIGTERM"), (signal.SIGINT, 0, "Ctrl-C")],
                         ids=["sigterm", "ctrl-c"])
def test_a_stopped_foreground_rack_leaves_no_orphan(rig_file, sig, status, said):
    """SIGTERM is what a CI runner cancelling a job sends; Ctrl-C the engineer's normal stop. Either way the
    outputs go off, then the rack, its broker, its carts and its ports."""
    proc, path, base = foreground_rack(rig_file)
    try:
        assert hil("power", "1", "on", "--rig", path).returncode == 0
        procs = tree(proc.pid)
        cmdlines = [Path(f"/proc/{p}/cmdline").read_bytes() for p in procs]
        assert any(b"mosquitto" in c for c in cmdlines) and any(b"vrack.cart" in c for c in cmdlines)
        proc.send_signal(sig)
        rc = proc.wait(timeout=40)
        err = proc.stderr.read().decode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert rc == status
    assert re.fullmatch(rf"hil rack up: {said}: 2 outputs off, rack stopped \(pid {procs[1]}, \d+ processes gone\)\n",
                        err), err
    assert [p for p in procs if not gone(p)] == []
    assert all(port_bindable("127.0.0.1", p) for p in range(base, base + 6))
    assert rack_state(Rig.load(path)) is None


# ------------------------------------------------------------------ power


def test_power_on_measure_off_cycle_through_the_supply(rack):
    path, _, _ = rack()
    on = hil("power", "1", "on", "--rig", path)
    assert (on.returncode, on.stdout) == (0, "slot 1 cart-01 (psu-c:3): output ON at 12 V, limit 1.5 A\n"), on.stderr
    assert output(path, 1) == (True, pytest.approx(12.0, abs=0.05))
    m = hil("power", "cart-01", "measure", "--rig", path)
    assert m.returncode == 0, m.stderr
    volts, amps = map(float, re.fullmatch(r"slot 1 cart-01 \(psu-c:3\): output ON, (\S+) V, (\S+) A\n",
                                          m.stdout).groups())
    assert volts == 12.0 and amps > 0, "a cart that is on draws current"

    off = hil("power", "1", "off", "--rig", path)
    assert (off.returncode, off.stdout) == (0, "slot 1 cart-01 (psu-c:3): output OFF\n"), off.stderr
    assert output(path, 1)[0] is False
    cycle = hil("power", "1", "cycle", "--rig", path, "--off-s", "0.1")
    assert (cycle.returncode, cycle.stdout) == (
        0, "slot 1 cart-01 (psu-c:3): power cycled (OFF for 0.1 s), output ON at 12 V, limit 1.5 A\n"), cycle.stderr
    assert output(path, 1)[0] is True


def test_sigterm_during_a_power_cycle_leaves_the_output_off(rack):
    path, _, _ = rack()
    assert hil("power", "1", "on", "--rig", path).returncode == 0
    proc = subprocess.Popen([sys.executable, "-m", "harness.cli", "power", "1", "cycle", "--rig", str(path),
                             "--off-s", "60"], cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while output(path, 1)[0]:  # the cycle's OFF: then it waits out the off time
            assert time.monotonic() < deadline, "the cycle never switched the output off"
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 143
    assert (out, err) == ("", "hil power: SIGTERM: slot 1 cart-01 (psu-c:3): cycle stopped, output left OFF "
                              "(safe state)\n")
    assert output(path, 1)[0] is False


# ------------------------------------------------------------------ console


def test_console_passes_stdin_lines_and_logs_what_the_cart_says(rack, tmp_path):
    path, _, _ = rack()
    logs = tmp_path / "console-logs"
    proc = subprocess.Popen([sys.executable, "-m", "harness.cli", "console", "1", "--rig", str(path),
                             "--log-dir", str(logs)], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        opened = read_until(proc.stderr, r"EOF ends\n", 30)
        log_path = Path(re.search(r"; log (\S+);", opened)[1])
        assert log_path.parent == logs and re.fullmatch(r"cart-01-\d{8}-\d{6}\.log", log_path.name)
        # the engineer powers the cart on in another terminal while watching its console here
        assert hil("power", "1", "on", "--rig", path).returncode == 0
        boot = read_until(proc.stdout, r"FW: ready", 60)
        assert "BOOT: bl=" in boot and "cfg=cart-01" in boot
        proc.stdin.write(b"version\n")
        proc.stdin.flush()
        answer = read_until(proc.stdout, r"version 1\.4\.2\r\n", 10)
        proc.stdin.close()
        rc = proc.wait(timeout=20)
        err = proc.stderr.read().decode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert rc == 0
    assert "version\r\nversion 1.4.2\r\n" in answer, "the echo, then the answer, as the cart sent them"
    assert err == f"hil console: closed; log {log_path}\n"
    log = log_path.read_text()
    assert re.search(r"\] >> version\n.*\+\d\d:\d\d version 1\.4\.2\n", log, re.S), log
    assert re.search(r"\+\d\d:\d\d FW: ready\n", log), "the boot is in the log too"


def test_console_sigterm_says_so_and_closes(rack, tmp_path):
    path, _, _ = rack()
    proc = subprocess.Popen([sys.executable, "-m", "harness.cli", "console", "cart-02", "--rig", str(path),
                             "--log-dir", str(tmp_path)], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        opened = read_until(proc.stderr, r"EOF ends\n", 30)
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=20)
        err = proc.stderr.read().decode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log_path = re.search(r"; log (\S+);", opened)[1]
    assert (rc, err) == (143, f"hil console: SIGTERM: console closed; log {log_path}\n")
    assert Path(log_path).read_text().splitlines()[-1].endswith("[console] closed")


# ------------------------------------------------------------------ refusals, physical rigs


def test_unknown_slot_is_refused_naming_the_slots(rig_file):
    path = rig_file(48480)
    for args in (("power", "9", "on"), ("console", "cart-07"), ("power", "cart-07", "measure")):
        r = hil(*args, "--rig", path)
        wanted = args[1]
        assert (r.returncode, r.stdout, r.stderr) == (
            2, "", f"hil: {Rig.load(path).path}: no slot {wanted!r} (slots: 1 cart-01, 2 cart-02)\n"), args


def test_commands_refuse_while_the_rack_is_down(rig_file):
    path = rig_file(48480)
    rig = Rig.load(path)
    refusal = (f"hil: {rig.path}: the virtual rack of rig virtual is not up (run dir {rig.run_dir}): "
               f"start it with `hil rack up {rig.path}`\n")
    for args in (("power", "1", "measure"), ("power", "cart-02", "on"), ("console", "1")):
        r = hil(*args, "--rig", path)
        assert (r.returncode, r.stdout, r.stderr) == (2, "", refusal), args
    status = hil("rack", "status", path)
    assert (status.returncode, status.stdout) == (3, f"rack of rig virtual: down (run dir {rig.run_dir})\n")


def test_a_physical_rig_uses_its_supplies_directly(rack, rig_file, tmp_path):
    """A lab rig: no rack to be up, the same commands through its supplies (here: a running rack's, described
    as a lab rig). A supply that does not answer: one line naming slot, cart, supply and channel."""
    path, base, _ = rack()
    lab = write_rig(tmp_path / "lab", base, kind="physical")
    on = hil("power", "2", "on", "--rig", lab)
    assert (on.returncode, on.stdout) == (0, "slot 2 cart-02 (psu-a:2): output ON at 12 V, limit 1.5 A\n"), on.stderr
    assert output(path, 2) == (True, pytest.approx(12.0, abs=0.05))
    status = hil("rack", "status", lab)
    assert status.returncode == 0, status.stderr
    assert status.stdout.splitlines()[0] == "rig virtual (physical): 2 slots"
    assert "output ON, 12.000 V" in status.stdout.splitlines()[2]
    up = hil("rack", "up", lab)
    assert up.returncode == 2 and up.stderr.startswith(f"hil: {lab.resolve()}: rig virtual is physical: "), up.stderr
    down = hil("rack", "down", lab)
    assert (down.returncode, down.stdout) == (0, "rig virtual (physical): 2 of 2 outputs off\n"), down.stderr
    assert output(path, 2)[0] is False

    dead = tmp_path / "dead"
    dead_rig = yaml.safe_load(write_rig(dead, base, kind="physical").read_text())
    dead_rig["supplies"][2]["resource"] = "TCPIP0::127.0.0.1::48499::SOCKET"  # psu-c: nothing listens there
    (dead / "physical-rig.yaml").write_text(yaml.safe_dump(dead_rig, sort_keys=False))
    r = hil("power", "1", "on", "--rig", dead / "physical-rig.yaml")
    assert r.returncode == 1 and r.stdout == "" and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("hil power: slot 1 cart-01 (psu-c:3): supply psu-c (TCPIP0::127.0.0.1::48499::SOCKET)"
                               ), r.stderr
    assert "Connection refused" in r.stderr or "ConnectionRefusedError" in r.stderr, r.stderr
