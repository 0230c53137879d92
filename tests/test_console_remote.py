"""Remote consoles as labs run them: a real ser2net (Debian's, started here with its own YAML
config) in front of a serial port, opened by the harness as ``rfc2217://`` or ``socket://``.

The serial port is a pty: a bare one for the console-level tests, and the virtual rack's cable
for the end-to-end tests, where the harness sees a lab rig file whose console is the ser2net URL
and drives the cart through it: boot, commands, power cycles, recovery, ser2net restarts.
ser2net is required: without it these tests fail (CI installs it), they do not skip.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import subprocess
import threading
import time
import tty
from pathlib import Path

import pytest
import serial
import yaml

import harness.cart
import harness.console
from harness.cart import Bench, CartError, CartState
from harness.config import Rig
from harness.console import Console, ConsoleError, ConsoleTimeout, port_options, serial_url
from harness.rackctl import start_rack, stop_rack
from harness.recovery import recover_factory
from vrack.broker import free_port

SCHEMES = ["rfc2217", "socket"]
_ACCEPTER = {"rfc2217": "telnet(rfc2217),tcp", "socket": "tcp"}


def ser2net_exe() -> str:
    exe = shutil.which("ser2net") or next((p for p in ("/usr/sbin/ser2net", "/usr/local/sbin/ser2net")
                                           if os.access(p, os.X_OK)), None)
    if exe is None:
        pytest.fail("ser2net is not installed, and the remote-console tests need the real one: "
                    "apt-get install ser2net (.ci/run and ./hil install it when missing)", pytrace=False)
    return exe


class Ser2net:
    """One ser2net process serving one device on one loopback port, as a lab's console server does
    (``local``: the port has no modem control lines; ``kickolduser``: a reconnecting harness wins)."""

    def __init__(self, workdir: Path, device: str, scheme: str, port: int | None = None):
        self.device = device
        self.scheme = scheme
        self.port = port or free_port()
        self.config = workdir / f"ser2net-{scheme}-{self.port}.yaml"
        self.log_path = workdir / f"ser2net-{scheme}-{self.port}.log"
        self.config.write_text(
            "%YAML 1.1\n---\n"
            "connection: &console\n"
            f"  accepter: {_ACCEPTER[scheme]},127.0.0.1,{self.port}\n"
            f"  connector: serialdev,{device},115200n81,local\n"
            "  options:\n"
            "    kickolduser: true\n"
        )
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> None:
        """Run ser2net in the foreground (-n), without UUCP lock files (-u), and wait until it
        listens on its port (its own socket, found through /proc: nothing connects to it)."""
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([ser2net_exe(), "-n", "-u", "-c", str(self.config)],
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout
        while not _listening(self.proc.pid, self.port):
            rc = self.proc.poll()
            if rc is not None:
                raise AssertionError(f"ser2net for {self.device} exited with {rc} before it listened on "
                                     f"127.0.0.1:{self.port}; {self.log_path}:\n{self.log()}")
            if time.monotonic() >= deadline:
                self.stop()
                raise AssertionError(f"ser2net for {self.device} did not listen on 127.0.0.1:{self.port} "
                                     f"within {timeout:.0f} s; {self.log_path}:\n{self.log()}")
            time.sleep(0.01)  # no event says "listening": look again shortly

    def stop(self, timeout: float = 10.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)  # a paused ser2net cannot act on SIGTERM
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        else:
            proc.wait()

    def pause(self) -> None:
        """The console server hangs (its host stalls): nothing it has accepted is read any more."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-2000:]
        except OSError:
            return "(no log)"


def _listening(pid: int, port: int) -> bool:
    """Whether process ``pid`` has a TCP socket listening on ``port``."""
    inodes = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[len("socket:["):-1])
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            f = row.split()
            if f[3] == "0A" and int(f[1].rsplit(":", 1)[1], 16) == port and f[9] in inodes:
                return True
    return False


@pytest.fixture
def ser2net(tmp_path):
    """``ser2net(device, scheme, port=None)`` starts one; all are stopped (and checked gone) afterwards."""
    started: list[Ser2net] = []

    def start(device: str, scheme: str, port: int | None = None) -> Ser2net:
        s = Ser2net(tmp_path, device, scheme, port)
        started.append(s)
        s.start()
        return s

    yield start
    procs = [s.proc for s in started if s.proc is not None]
    for s in started:
        s.stop()
    assert all(p.poll() is not None for p in procs), "a ser2net process was left running"


class Device:
    """A bare pty: the test plays the device on the master, ser2net opens the slave."""

    def __init__(self) -> None:
        self.master, self.slave = os.openpty()
        tty.setraw(self.master)
        tty.setraw(self.slave)
        self.path = os.ttyname(self.slave)

    def close(self) -> None:
        for fd in (self.master, self.slave):
            if fd >= 0:
                os.close(fd)
        self.master = self.slave = -1


@pytest.fixture
def pty():
    device = Device()
    yield device
    device.close()


def _read_master(master: int, marker: bytes, timeout: float = 3.0) -> bytes:
    buf = b""
    deadline = time.monotonic() + timeout
    while marker not in buf:
        left = deadline - time.monotonic()
        assert left > 0, f"waited {timeout} s for {marker!r} on the device side, got {buf!r}"
        ready, _, _ = select.select([master], [], [], left)
        if ready:
            buf += os.read(master, 4096)
    return buf


# ---- the console itself -------------------------------------------------------------------------

def test_rfc2217_url_opens_with_the_harness_options(pty, ser2net):
    """pyserial's RFC 2217 client raises NotImplementedError on write_timeout, and ser2net in front of
    a port without modem control never acknowledges SET_CONTROL as pyserial waits for: the harness's
    URL and options must open it."""
    server = ser2net(pty.path, "rfc2217")
    url = serial_url(server.url)
    assert url == server.url + "?ign_set_control"
    port = serial.serial_for_url(url, **port_options(url))
    try:
        assert port.is_open
    finally:
        port.close()


@pytest.mark.parametrize("scheme", SCHEMES)
def test_remote_console_reads_writes_and_times_out_with_its_tail(scheme, pty, ser2net, tmp_path):
    master = pty.master
    server = ser2net(pty.path, scheme)
    with Console(server.url, name="cart-01", log_path=tmp_path / "cart-01.log") as c:
        assert c.connected
        os.write(master, b"CART-BL 2.1.0 hw=rev-c cfg=cart-01\r\nFW: ready\r\ncart> ")
        c.expect(r"^CART-BL 2\.1\.0 hw=rev-c cfg=cart-01$", 3)
        c.expect(r"^cart> $", 3)
        c.send("version")
        assert _read_master(master, b"version\r\n").endswith(b"version\r\n")
        t0 = time.monotonic()
        with pytest.raises(ConsoleTimeout) as err:
            c.expect(r"^never printed$", 0.3, what="a line the device never sends")
        assert 0.3 <= time.monotonic() - t0 < 1.5
        assert "FW: ready" in err.value.tail and "cart> " in err.value.tail
        assert "a line the device never sends" in str(err.value)
    log_text = (tmp_path / "cart-01.log").read_text()
    if scheme == "rfc2217":
        assert f"open {server.url} (as {server.url}?ign_set_control)" in log_text
    else:
        assert f"open {server.url}\n" in log_text


def test_ign_set_control_in_the_rig_url_is_kept_not_doubled(pty, ser2net, tmp_path):
    master = pty.master
    server = ser2net(pty.path, "rfc2217")
    url = server.url + "?ign_set_control"
    assert serial_url(url) == url
    with Console(url, name="cart-02", log_path=tmp_path / "cart-02.log") as c:
        os.write(master, b"FW: ready\r\n")
        c.expect(r"^FW: ready$", 3)
    assert f"open {url}\n" in (tmp_path / "cart-02.log").read_text()


@pytest.mark.parametrize("scheme", SCHEMES)
def test_remote_write_is_bounded_when_the_console_server_hangs(scheme, pty, ser2net, tmp_path, monkeypatch):
    """No write_timeout on rfc2217://: its socket's timeout bounds the write instead. A hung ser2net
    fills the TCP buffers; the send must fail within the bound, naming the console."""
    monkeypatch.setattr(harness.console, "_WRITE_TIMEOUT", 0.5)
    server = ser2net(pty.path, scheme)
    with Console(server.url, name="cart-03", log_path=tmp_path / "cart-03.log") as c:
        server.pause()
        try:
            t0 = time.monotonic()
            with pytest.raises(ConsoleError, match=r"console cart-03: send failed"):
                c.send_raw(b"x" * _more_than_tcp_buffers())
            waited = time.monotonic() - t0
        finally:
            server.resume()
    with _draining(pty.master):  # the device reads again: ser2net can flush what it holds and stop
        server.stop()
    assert 0.4 <= waited < 3.0, f"the write failed after {waited:.2f} s, bound 0.5 s"


@contextlib.contextmanager
def _draining(master: int):
    """Read and drop whatever arrives on the device side while the block runs."""
    stop_r, stop_w = os.pipe()

    def drain() -> None:
        while True:
            ready, _, _ = select.select([master, stop_r], [], [])
            if stop_r in ready:
                return
            try:
                os.read(master, 1 << 16)
            except OSError:
                return

    thread = threading.Thread(target=drain, daemon=True)
    thread.start()
    try:
        yield
    finally:
        os.write(stop_w, b"x")
        thread.join(5)
        os.close(stop_r)
        os.close(stop_w)
        assert not thread.is_alive()


def _more_than_tcp_buffers() -> int:
    """More bytes than the largest send buffer plus the largest receive buffer the kernel allows."""
    try:
        total = sum(int(Path(f"/proc/sys/net/ipv4/{name}").read_text().split()[2]) for name in ("tcp_wmem", "tcp_rmem"))
    except (OSError, ValueError, IndexError):
        total = 64 << 20
    return total + (1 << 20)


# ---- a cart behind ser2net, driven through the harness -------------------------------------------

@pytest.fixture
def rack(rig_factory):
    """A one-cart virtual rack (the cart, its supply and its console cable), stopped afterwards."""
    rig = Rig.load(rig_factory(["cart-01"]))
    pid = start_rack(rig, owner_pid=os.getpid())
    yield rig
    stop_rack(pid)


def lab_rig(rig: Rig, tmp_path: Path, consoles: dict[str, str]) -> Rig:
    """The rack as a lab engineer writes it: a physical rig whose consoles are ser2net URLs."""
    data = yaml.safe_load(rig.path.read_text())
    data["kind"] = "physical"
    data.pop("virtual")
    for s in data["slots"]:
        s["console"] = consoles[s["cart"]]
    path = tmp_path / "lab-rig.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    lab = Rig.load(path)
    assert [s.console_url for s in lab.slots] == [consoles[s.cart_id] for s in lab.slots]
    return lab


@pytest.mark.parametrize("scheme", SCHEMES)
def test_cart_behind_ser2net_boots_runs_commands_power_cycles_and_recovers(scheme, rack, ser2net, tmp_path):
    slot = rack.slot_for("cart-01")
    server = ser2net(os.path.realpath(slot.console_url), scheme)
    bench = Bench(lab_rig(rack, tmp_path, {"cart-01": server.url}), tmp_path / "consoles")
    want = slot.cart.firmware.initial_version
    try:
        cart = bench.cart("cart-01")
        banner = cart.power_on()
        assert (banner.config, banner.slot, banner.version) == ("cart-01", "A", want)
        assert cart.state is CartState.RUNNING
        assert cart.version() == want

        again = cart.power_cycle()
        assert again is not None and again.config == "cart-01" and len(cart.boots) == 2
        assert cart.version() == want

        recovered = recover_factory(cart)
        assert (recovered.slot, recovered.version) == ("A", want) and len(cart.boots) == 3
        assert cart.slot_status().active == "A"

        with pytest.raises(ConsoleTimeout) as err:
            cart.console.expect(r"^never printed$", 0.3, what="nothing")
        assert "cart> " in err.value.tail
    finally:
        bench.close()
    log_text = (tmp_path / "consoles" / "cart-01.log").read_text()
    assert "port lost" not in log_text, "a power cycle must not drop the remote connection"


@pytest.mark.parametrize("scheme", SCHEMES)
def test_console_survives_a_ser2net_restart_and_power_on_waits_for_it(scheme, rack, ser2net, tmp_path,
                                                                      monkeypatch):
    slot = rack.slot_for("cart-01")
    server = ser2net(os.path.realpath(slot.console_url), scheme)
    bench = Bench(lab_rig(rack, tmp_path, {"cart-01": server.url}), tmp_path / "consoles")
    try:
        cart = bench.cart("cart-01")
        cart.power_on()

        server.stop()                                   # the console server restarts
        cart.console.wait_port(5, up=False, what="ser2net stopped")
        assert not cart.console.connected
        with pytest.raises(ConsoleError, match="cannot send"):
            cart.console.send("version")
        server.start()                                  # same port; the console reconnects by itself
        banner = cart.power_cycle()                     # power on waits for it: the whole boot is seen
        assert banner is not None and banner.config == "cart-01"
        assert cart.version() == slot.cart.firmware.initial_version
        log_text = (tmp_path / "consoles" / "cart-01.log").read_text()
        assert "[console] port lost: " in log_text and "[console] port reopened" in log_text

        server.stop()                                   # and now it stays down
        cart.console.wait_port(5, up=False, what="ser2net stopped for good")
        monkeypatch.setattr(harness.cart, "CONSOLE_UP_S", 1.0)
        cart.power_off()
        t0 = time.monotonic()
        with pytest.raises(CartError) as err:
            cart.power_on()
        assert 1.0 <= time.monotonic() - t0 < 3.0
        msg = str(err.value)
        assert "console before power on" in msg and server.url in msg and "down: " in msg
        assert cart.state is CartState.QUARANTINED
        assert not cart.power.is_on(), "power must stay off while nobody reads the console"
    finally:
        bench.close()
