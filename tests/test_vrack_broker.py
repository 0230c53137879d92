"""vrack.broker: mosquitto with TLS client certificates on loopback."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import statistics
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from cryptography import x509

import vrack.broker as vb
from vrack.broker import Broker, BrokerError, PortInUseError, ensure_client_cert, free_port

HOST = "127.0.0.1"
NOTIFY_NEXT = "$aws/things/cart-01/jobs/notify-next"


def _pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.fixture
def broker(tmp_path):
    b = Broker(tmp_path / "rack", free_port(), ["harness", "cart-01", "cart-02"])
    b.start()
    yield b
    b.stop()


class Conn:
    """A paho-mqtt 2.x client with TLS, loop thread, and a queue of received messages."""

    def __init__(self, port, ca, cert, key, client_id, username=None):
        self.connected = threading.Event()
        self.closed = threading.Event()
        self.subscribed = threading.Event()
        self.reason = None
        self.messages: list[tuple[str, bytes, int, int]] = []  # topic, payload, qos, t_ns
        self.got = threading.Condition()
        self.on_message_hook = None
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311)
        c.tls_set(ca_certs=str(ca), certfile=cert and str(cert), keyfile=key and str(key))
        if username is not None:
            c.username_pw_set(username)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_subscribe = lambda *a: self.subscribed.set()
        c.on_message = self._on_message
        self.client = c
        self.error: Exception | None = None
        self._done = False
        try:
            c.connect(HOST, port, keepalive=10)
        except OSError as e:  # ssl.SSLError included: refused during the handshake
            self.error = e
            self.closed.set()
            return
        if self.closed.is_set():  # refused inside connect() (paho already called on_disconnect)
            self.error = ConnectionError(f"refused: {self.reason}")
            return
        c.loop_start()

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        self.reason = reason_code
        if reason_code.is_failure:
            self.closed.set()
        else:
            self.connected.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties):
        self.reason = reason_code
        if not self.connected.is_set():
            client.loop_stop()  # refused: no reconnect attempts (from the loop thread: no join)
        self.closed.set()

    def _on_message(self, client, userdata, msg):
        t = time.perf_counter_ns()
        if self.on_message_hook is not None:
            self.on_message_hook(msg, t)
            return
        with self.got:
            self.messages.append((msg.topic, msg.payload, msg.qos, t))
            self.got.notify_all()

    def wait_connected(self, timeout=5.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.connected.is_set():
                return True
            if self.closed.is_set():
                return False
            self.connected.wait(0.02)
        return False

    def subscribe(self, topic, qos=1):
        self.subscribed.clear()
        self.client.subscribe(topic, qos)
        assert self.subscribed.wait(5), f"no SUBACK for {topic}"

    def wait_messages(self, n, timeout=5.0):
        with self.got:
            self.got.wait_for(lambda: len(self.messages) >= n, timeout)
            return list(self.messages)

    def close(self):
        if self._done:
            return
        self._done = True
        if self.error is not None:  # the loop thread was never started
            return
        if self.connected.is_set():
            self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def conns():
    made: list[Conn] = []

    def make(*args, **kwargs) -> Conn:
        c = Conn(*args, **kwargs)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


# --------------------------------------------------------------------------------------------------


def test_files_and_modes(broker):
    d = broker.dir
    for name in ["ca", "server", "harness", "cart-01", "cart-02"]:
        assert (d / f"{name}.pem").is_file()
        assert (d / f"{name}.key").stat().st_mode & 0o777 == 0o600, name
    assert d.stat().st_mode & 0o077 == 0
    conf = broker.conf_file.read_text()
    for line in [
        "per_listener_settings false",
        f"listener {broker.port} 127.0.0.1",
        "require_certificate true",
        "use_identity_as_username true",
        "allow_anonymous false",
        "persistence false",
        "log_timestamp true",
    ]:
        assert line in conf.splitlines()
    ca = x509.load_pem_x509_certificate((d / "ca.pem").read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    server = x509.load_pem_x509_certificate((d / "server.pem").read_bytes())
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in san.get_values_for_type(x509.DNSName)
    assert "127.0.0.1" in [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    cart = x509.load_pem_x509_certificate((d / "cart-01.pem").read_bytes())
    assert cart.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == "cart-01"
    eku = cart.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert x509.ExtendedKeyUsageOID.CLIENT_AUTH in eku
    assert broker.client_files("cart-01") == (d / "ca.pem", d / "cart-01.pem", d / "cart-01.key")
    with pytest.raises(BrokerError):
        broker.client_files("cart-99")


def test_aws_jobs_topic_round_trip(broker, conns):
    pub = conns(broker.port, *broker.client_files("harness"), client_id="jobs-service")
    sub = conns(broker.port, *broker.client_files("cart-01"), client_id="cart-01")
    # the harness identity may read both the jobs topics and the telemetry (the broker's ACL), so
    # what its '#' subscription misses is down to the MQTT spec, not to a permission
    hash_sub = conns(broker.port, *broker.client_files("harness"), client_id="hash-watcher")
    plain = conns(broker.port, *broker.client_files("cart-02"), client_id="cart-02")
    assert pub.wait_connected() and sub.wait_connected() and hash_sub.wait_connected() and plain.wait_connected()
    sub.subscribe("$aws/things/+/jobs/#", qos=1)
    hash_sub.subscribe("#", qos=1)

    info = pub.client.publish(NOTIFY_NEXT, b'{"timestamp":1}', qos=1)
    info.wait_for_publish(5)
    assert info.is_published()  # PUBACK from the broker
    assert sub.wait_messages(1) == [(NOTIFY_NEXT, b'{"timestamp":1}', 1, sub.messages[0][3])]

    # '#' never matches a topic starting with '$' (MQTT spec 4.7.2); a plain topic (cart-02's own
    # telemetry, published after the notification was delivered) proves it listens.
    plain.client.publish("cart-hil/telemetry/cart-02", b"x", qos=1).wait_for_publish(5)
    got = hash_sub.wait_messages(1)
    assert [m[0] for m in got] == ["cart-hil/telemetry/cart-02"]


def test_identity_is_the_username(broker, conns):
    """The SDK sends a telemetry string as username; mosquitto must use the cert CN instead."""
    c = conns(broker.port, *broker.client_files("cart-01"), client_id="sdk-like", username="?SDK=Python&V=1")
    assert c.wait_connected()
    deadline = time.monotonic() + 5
    while "as sdk-like" not in broker.log_file.read_text() and time.monotonic() < deadline:
        time.sleep(0.02)
    line = next(ln for ln in broker.log_file.read_text().splitlines() if "as sdk-like" in ln)
    assert "u'cart-01'" in line


def test_client_without_certificate_is_refused(broker, conns):
    c = conns(broker.port, broker.ca_file, None, None, client_id="no-cert")
    assert not c.wait_connected()
    assert "as no-cert" not in broker.log_file.read_text()


def test_client_with_foreign_ca_cert_is_refused(broker, conns, tmp_path):
    other = Broker(tmp_path / "other-rack", free_port(), ["cart-01"])
    other.prepare()  # another CA, never started
    _, cert, key = other.client_files("cart-01")
    c = conns(broker.port, broker.ca_file, cert, key, client_id="foreign")
    assert not c.wait_connected()
    assert "as foreign" not in broker.log_file.read_text()
    assert broker.ca_file.read_bytes() != other.ca_file.read_bytes()


def test_new_client_cert_while_running(broker, conns):
    ca, cert, key = ensure_client_cert(broker.run_dir, "cart-07")
    assert key.stat().st_mode & 0o777 == 0o600
    c = conns(broker.port, ca, cert, key, client_id="cart-07")
    assert c.wait_connected()
    # issuing again re-uses the valid cert
    assert ensure_client_cert(broker.run_dir, "cart-07") == (ca, cert, key)
    assert cert.read_bytes() == broker.client_files("cart-07")[1].read_bytes()


def test_ensure_client_cert_needs_a_ca(tmp_path):
    with pytest.raises(BrokerError, match="no valid broker CA"):
        ensure_client_cert(tmp_path, "cart-01")
    with pytest.raises(ValueError):
        ensure_client_cert(tmp_path, "../evil")
    with pytest.raises(ValueError):
        Broker(tmp_path, 1, ["server"])


def test_stop_leaves_no_process(tmp_path):
    b = Broker(tmp_path, free_port(), ["cart-01"])
    b.start()
    pid = b.pid
    assert pid and not _pid_gone(pid)
    assert os.getpgid(pid) == pid  # own process group
    b.stop()
    assert _pid_gone(pid)
    assert not Path(f"/proc/{pid}").exists()
    b.stop()  # idempotent
    assert not b.running()


def test_stop_kills_a_broker_that_ignores_sigterm(tmp_path, monkeypatch):
    monkeypatch.setattr(vb, "STOP_TIMEOUT", 0.3)
    b = Broker(tmp_path, free_port(), [])
    b.start()
    pid = b.pid
    os.kill(pid, signal.SIGSTOP)  # a stopped process leaves SIGTERM pending
    t0 = time.monotonic()
    b.stop()
    assert time.monotonic() - t0 < 2
    assert _pid_gone(pid)


def test_restart_reuses_certs(tmp_path, conns):
    run_dir = tmp_path / "rack"
    port = free_port()
    b = Broker(run_dir, port, ["harness", "cart-01"])
    b.start()
    ensure_client_cert(run_dir, "sdk-01")
    before = {p.name: p.read_bytes() for p in b.dir.glob("*.pem")} | {
        p.name: p.read_bytes() for p in b.dir.glob("*.key")
    }
    b.stop()

    b2 = Broker(run_dir, port, ["harness", "cart-01"])
    b2.start()
    try:
        after = {p.name: p.read_bytes() for p in b2.dir.glob("*.pem")} | {
            p.name: p.read_bytes() for p in b2.dir.glob("*.key")
        }
        assert after == before
        assert (b2.dir / "mosquitto.log.1").exists()
        c = conns(port, *b2.client_files("sdk-01"), client_id="sdk-01")
        assert c.wait_connected()
        c.close()
    finally:
        b2.stop()


def test_invalid_files_are_regenerated(tmp_path):
    b = Broker(tmp_path, free_port(), ["cart-01", "cart-02"])
    b.prepare()
    d = b.dir
    ca0, c1, c2 = (d / "ca.pem").read_bytes(), (d / "cart-01.pem").read_bytes(), (d / "cart-02.pem").read_bytes()

    os.chmod(d / "cart-01.key", 0o644)  # a key that is not 0600 is not trusted
    b.prepare()
    assert (d / "cart-01.pem").read_bytes() != c1
    assert (d / "cart-01.key").stat().st_mode & 0o777 == 0o600
    assert (d / "cart-02.pem").read_bytes() == c2
    assert (d / "ca.pem").read_bytes() == ca0

    ensure_client_cert(tmp_path, "stray")
    (d / "ca.key").unlink()  # CA unusable: everything is issued again, stale client certs removed
    b.prepare()
    assert (d / "ca.pem").read_bytes() != ca0
    assert (d / "cart-02.pem").read_bytes() != c2
    assert not (d / "stray.pem").exists()
    ca = x509.load_pem_x509_certificate((d / "ca.pem").read_bytes())
    for name in ["server", "harness", "cart-01", "cart-02"]:
        x509.load_pem_x509_certificate((d / f"{name}.pem").read_bytes()).verify_directly_issued_by(ca)


def test_port_in_use(tmp_path):
    with socket.socket() as s:
        s.bind((HOST, 0))
        s.listen()
        port = s.getsockname()[1]
        b = Broker(tmp_path, port, [])
        with pytest.raises(PortInUseError, match=rf"port {port}\b.*in use"):
            b.start()
        assert not b.running()


def test_port_in_use_reported_by_mosquitto(tmp_path, monkeypatch):
    """Lost race: the port is taken after our check; mosquitto's own failure is reported."""
    monkeypatch.setattr(vb, "_port_free", lambda host, port: True)
    with socket.socket() as s:
        s.bind((HOST, 0))
        s.listen()
        port = s.getsockname()[1]
        b = Broker(tmp_path, port, [])
        with pytest.raises(PortInUseError, match=rf"port {port}\b") as ei:
            b.start()
        assert "mosquitto.log" in str(ei.value)
        assert not b.running()


def test_start_failures(tmp_path):
    b = Broker(tmp_path, free_port(), [], mosquitto="/bin/false")
    with pytest.raises(BrokerError, match="exited with 1"):
        b.start(timeout=5)
    assert not b.running()
    with pytest.raises(BrokerError, match="cannot run mosquitto"):
        Broker(tmp_path, free_port(), [], mosquitto=str(tmp_path / "nope")).start(timeout=5)


def test_start_timeout_kills_the_process(tmp_path, monkeypatch):
    fake = tmp_path / "fake-mosquitto"
    fake.write_text("#!/bin/sh\necho 'fake broker, never listens'\nexec sleep 30\n")
    fake.chmod(0o755)
    b = Broker(tmp_path, free_port(), [], mosquitto=str(fake))
    pids = []
    real_probe = vb.probe

    def spy(*a, **kw):
        pids.append(b.pid)
        return real_probe(*a, **kw)

    monkeypatch.setattr(vb, "probe", spy)
    with pytest.raises(BrokerError, match=r"did not accept(.|\n)*fake broker, never listens"):
        b.start(timeout=0.5)
    assert pids and _pid_gone(pids[0])
    assert not b.running()


def test_qos1_latency(broker, conns, capsys):
    """Print (not assert) QoS1 publish -> receive latency through mosquitto over TLS."""
    pub = conns(broker.port, *broker.client_files("harness"), client_id="lat-pub")
    sub = conns(broker.port, *broker.client_files("cart-01"), client_id="lat-sub")
    assert pub.wait_connected() and sub.wait_connected()
    sub.subscribe("$aws/things/+/jobs/#", qos=1)
    n = 500
    lat_us: list[float] = []
    got = threading.Event()

    def hook(msg, t):
        lat_us.append((t - int(msg.payload)) / 1000)
        got.set()

    sub.on_message_hook = hook
    for _ in range(20):  # warm-up
        got.clear()
        pub.client.publish(NOTIFY_NEXT, str(time.perf_counter_ns()).encode(), qos=1)
        assert got.wait(5)
    lat_us.clear()
    for _ in range(n):
        got.clear()
        pub.client.publish(NOTIFY_NEXT, str(time.perf_counter_ns()).encode(), qos=1)
        assert got.wait(5)
    lat_us.sort()
    with capsys.disabled():
        print(
            f"\nQoS1 publish->receive over TLS, {n} msgs, one at a time: median {statistics.median(lat_us):.0f} us,"
            f" p99 {lat_us[int(0.99 * n) - 1]:.0f} us, max {lat_us[-1]:.0f} us"
        )


def test_mosquitto_dies_with_the_process_that_started_it_even_by_sigkill(tmp_path):
    """A rack (or test) killed outright cannot run its teardown: its mosquitto must not outlive it."""
    import select
    import subprocess
    import sys

    script = ("import sys, time\nfrom vrack.broker import Broker, free_port\n"
              f"b = Broker({str(tmp_path / 'rack')!r}, free_port(), ['harness'])\n"
              "b.start()\nprint(b.pid, flush=True)\ntime.sleep(120)\n")
    owner = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        ready, _, _ = select.select([owner.stdout], [], [], 30)
        assert ready, "the broker did not start within 30 s"
        mosquitto = int(owner.stdout.readline())
        fd = os.pidfd_open(mosquitto)
    finally:
        owner.kill()
        owner.wait(10)
    try:
        gone, _, _ = select.select([fd], [], [], 10)
        assert gone, f"mosquitto {mosquitto} still runs 10 s after the process that started it was SIGKILLed"
    finally:
        os.close(fd)
        with contextlib.suppress(ProcessLookupError):
            os.kill(mosquitto, signal.SIGKILL)
