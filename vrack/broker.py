"""The virtual rack's MQTT broker: mosquitto on loopback with TLS and client certificates.

Everything lives under ``<run_dir>/broker``:

- ``ca.pem`` / ``ca.key``: the rack's CA (ECDSA P-256); it signs the server and every client cert;
- ``server.pem`` / ``server.key``: the broker's certificate (SAN IP 127.0.0.1, the listen host, DNS localhost);
- ``<client>.pem`` / ``<client>.key``: one client identity each (CN=<client>, EKU clientAuth);
- ``mosquitto.conf``, ``mosquitto.acl`` (the topic permissions), ``mosquitto.log`` (the previous
  run's log is kept as ``mosquitto.log.1``).

Private keys are created with mode 0600. Valid existing certificates are reused, so a restarted rack
keeps the client certificates it issued; anything missing, expiring or not matching the CA is issued
again (a new CA invalidates every client cert, and those are then removed or re-issued).

mosquitto authenticates clients by certificate only: ``require_certificate true`` refuses a TLS client
without a certificate signed by the CA, and ``use_identity_as_username true`` makes the certificate CN
the MQTT username (whatever username the client sends is ignored), so ``allow_anonymous false`` holds.

Topic permissions work like an AWS IoT device policy scoped to ``${iot:Connection.Thing.ThingName}``
(the ``acl_file``, see `acl_text` and docs/interfaces.md, "Broker permissions"): every client may use
only its own thing's topics ``$aws/things/<its CN>/#`` and publish its own telemetry
``cart-hil/telemetry/<its CN>``; the harness identity (CN ``harness``) is the jobs service of every
thing and reads every cart's telemetry. A denied subscription is still granted in the SUBACK by
mosquitto 2.0, but nothing that the client may not read is ever delivered to it; a denied publish is
dropped (MQTT 3.1.1 still gets its PUBACK).

This module must not import ``harness``.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime as dt
import errno
import fcntl
import ipaddress
import os
import pwd
import random
import re
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "Broker",
    "BrokerError",
    "PortInUseError",
    "acl_text",
    "broker_dir",
    "ensure_client_cert",
    "free_port",
    "probe",
]

HARNESS = "harness"
TELEMETRY_PREFIX = "cart-hil/telemetry/"  # + <thing>: what a cart publishes its metrics on
TIME_PREFIX = "cart-hil/time/"  # + <thing>/request (the cart asks), <thing>/answer (the time service answers)
CA_VALIDITY = dt.timedelta(days=5 * 365)
LEAF_VALIDITY = dt.timedelta(days=365)
BACKDATE = dt.timedelta(hours=1)
RENEW_MARGIN = dt.timedelta(days=7)  # re-issue a cert that expires sooner than this
STOP_TIMEOUT = 5.0
_RESERVED = {"ca", "server", "mosquitto"}
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class BrokerError(RuntimeError):
    """mosquitto could not be started, or the broker's files are unusable."""


class PortInUseError(BrokerError):
    """The broker's port is already taken by another listener."""


# --------------------------------------------------------------------------------------------------
# small helpers


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now, picked at random BELOW the kernel's ephemeral
    range: a port from bind(0) is an ephemeral one, which any outgoing connection may take before the
    server binds it (seen: a broker port taken that way). Still racy between two pickers; use promptly."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.randrange(10000, max(10001, low))
        with socket.socket(family, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def broker_dir(run_dir: Path | str) -> Path:
    return Path(run_dir) / "broker"


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or name in _RESERVED:
        raise ValueError(
            f"invalid client identity {name!r}: use 1-64 of [A-Za-z0-9._-], not starting with"
            f" '.', '-' or '_', and not one of {sorted(_RESERVED)}"
        )
    return name


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to ``path`` via a temp file + rename; the file is created with ``mode``."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)  # the umask only ever narrows it; be exact anyway
        with os.fdopen(fd, "wb") as f:
            fd = -1
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


@contextlib.contextmanager
def _locked(d: Path) -> Iterator[None]:
    """Serialise certificate writes between processes (rack, harness workers issuing certs)."""
    d.mkdir(parents=True, exist_ok=True)
    fd = os.open(d / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _pub_der(key) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _load_pair(cert_path: Path, key_path: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None:
    """Load a cert and its key if both exist, the key is mode 0600 and matches the cert."""
    try:
        if (key_path.stat().st_mode & 0o777) != 0o600:
            return None
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError):
        return None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or _pub_der(key.public_key()) != _pub_der(cert.public_key()):
        return None
    return cert, key


def _valid_now(cert: x509.Certificate) -> bool:
    now = _now()
    return cert.not_valid_before_utc <= now and cert.not_valid_after_utc - now > RENEW_MARGIN


def _issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _ext(cert: x509.Certificate, cls):
    try:
        return cert.extensions.get_extension_for_class(cls).value
    except x509.ExtensionNotFound:
        return None


# --------------------------------------------------------------------------------------------------
# certificates


class _CA:
    def __init__(self, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey):
        self.cert = cert
        self.key = key

    @classmethod
    def load(cls, d: Path) -> _CA | None:
        pair = _load_pair(d / "ca.pem", d / "ca.key")
        if pair is None:
            return None
        cert, key = pair
        bc = _ext(cert, x509.BasicConstraints)
        if bc is None or not bc.ca or not _valid_now(cert) or not _issued_by(cert, cert):
            return None
        return cls(cert, key)

    @classmethod
    def create(cls, d: Path) -> _CA:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "cart-hil"),
                x509.NameAttribute(NameOID.COMMON_NAME, "cart-hil vrack CA"),
            ]
        )
        now = _now()
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(now + CA_VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(ski, critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
            .sign(key, hashes.SHA256())
        )
        _write_atomic(d / "ca.key", _key_pem(key), 0o600)
        _write_atomic(d / "ca.pem", cert.public_bytes(serialization.Encoding.PEM), 0o644)
        return cls(cert, key)

    def issue(self, d: Path, stem: str, common_name: str, *, server_hosts: list[str] | None = None) -> None:
        """Write ``<stem>.pem``/``<stem>.key``: a server cert if ``server_hosts``, else a client cert."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = _now()
        not_after = min(now + LEAF_VALIDITY, self.cert.not_valid_after_utc)
        eku = ExtendedKeyUsageOID.SERVER_AUTH if server_hosts is not None else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = (
            x509.CertificateBuilder()
            .subject_name(
                x509.Name(
                    [
                        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "cart-hil"),
                        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                    ]
                )
            )
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.cert.public_key()), critical=False)
        )
        if server_hosts is not None:
            builder = builder.add_extension(x509.SubjectAlternativeName(_san_entries(server_hosts)), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        _write_atomic(d / f"{stem}.key", _key_pem(key), 0o600)
        _write_atomic(d / f"{stem}.pem", cert.public_bytes(serialization.Encoding.PEM), 0o644)

    def leaf_ok(self, d: Path, stem: str, common_name: str, *, server_hosts: list[str] | None = None) -> bool:
        pair = _load_pair(d / f"{stem}.pem", d / f"{stem}.key")
        if pair is None:
            return False
        cert, _ = pair
        if not _valid_now(cert) or cert.issuer != self.cert.subject or not _issued_by(cert, self.cert):
            return False
        cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        if [a.value for a in cns] != [common_name]:
            return False
        eku = _ext(cert, x509.ExtendedKeyUsage)
        want = ExtendedKeyUsageOID.SERVER_AUTH if server_hosts is not None else ExtendedKeyUsageOID.CLIENT_AUTH
        if eku is None or want not in eku:
            return False
        if server_hosts is not None:
            san = _ext(cert, x509.SubjectAlternativeName)
            if san is None or not set(_san_entries(server_hosts)) <= set(san):
                return False
        return True


def _san_entries(hosts: Iterable[str]) -> list[x509.GeneralName]:
    out: list[x509.GeneralName] = []
    for h in ["127.0.0.1", "localhost", *hosts]:
        try:
            entry: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(h))
        except ValueError:
            entry = x509.DNSName(h)
        if entry not in out:
            out.append(entry)
    return out


def _client_stems(d: Path) -> list[str]:
    """Client identities that have a cert/key pair in ``d``."""
    return sorted(
        p.stem
        for p in d.glob("*.pem")
        if p.stem not in _RESERVED and _NAME_RE.fullmatch(p.stem) and (d / f"{p.stem}.key").exists()
    )


def _ensure_files(d: Path, clients: Iterable[str], hosts: list[str]) -> _CA:
    """Create or re-use the CA, server and client certs in ``d`` (caller holds the lock)."""
    d.mkdir(parents=True, exist_ok=True)
    os.chmod(d, 0o700)
    ca = _CA.load(d)
    if ca is None:
        # A new CA makes every cert issued by the old one useless: drop them all.
        for stem in ["server", *_client_stems(d)]:
            for suffix in (".pem", ".key"):
                with contextlib.suppress(FileNotFoundError):
                    (d / f"{stem}{suffix}").unlink()
        ca = _CA.create(d)
    if not ca.leaf_ok(d, "server", "localhost", server_hosts=hosts):
        ca.issue(d, "server", "localhost", server_hosts=hosts)
    for name in clients:
        if not ca.leaf_ok(d, name, name):
            ca.issue(d, name, name)
    return ca


def ensure_client_cert(run_dir: Path | str, name: str) -> tuple[Path, Path, Path]:
    """Issue (or re-use) a client certificate CN=``name`` signed by the broker CA in ``run_dir``.

    Safe to call while the broker runs (mosquitto checks clients against the CA, not a list) and
    from several processes at once. Returns ``(ca, cert, key)``. Raises BrokerError when there is
    no usable CA yet (start the broker, or call ``Broker.prepare()``, first).
    """
    _check_name(name)
    d = broker_dir(run_dir)
    with _locked(d):
        ca = _CA.load(d)
        if ca is None:
            raise BrokerError(f"no valid broker CA in {d}: start the broker (or Broker.prepare()) first")
        if not ca.leaf_ok(d, name, name):
            ca.issue(d, name, name)
    return d / "ca.pem", d / f"{name}.pem", d / f"{name}.key"


# --------------------------------------------------------------------------------------------------
# topic permissions


def acl_text() -> str:
    """The mosquitto ``acl_file``: per-thing permissions, as an AWS IoT policy gives them.

    ``%u`` is the username, i.e. the client certificate's CN (``use_identity_as_username``). By the
    MQTT spec a filter starting with a wildcard (``#``, ``+/...``) never matches a ``$`` topic, so
    every ``$aws`` grant names ``$aws`` explicitly. Anything not granted is denied."""
    return f"""\
# written by vrack.broker; regenerated on every start. Anything not granted here is denied.
# Every client (%u = its certificate CN = its thing name): its own thing's topics (the AWS IoT
# Jobs API, $aws/things/<thing>/jobs/...), publishing its own telemetry, asking the time service
# for its own time and reading the answers to itself, nothing else: not another thing's topics,
# telemetry or time answers, not even reading its own telemetry or requests.
pattern readwrite $aws/things/%u/#
pattern write {TELEMETRY_PREFIX}%u
pattern write {TIME_PREFIX}%u/request
pattern read {TIME_PREFIX}%u/answer

# The harness: the jobs service of every thing (requests in, replies and notifications out),
# the telemetry collector of every cart and the time service (requests in, answers out).
user {HARNESS}
topic readwrite $aws/things/+/jobs/#
topic read {TELEMETRY_PREFIX}#
topic read {TIME_PREFIX}+/request
topic write {TIME_PREFIX}+/answer
"""


# --------------------------------------------------------------------------------------------------
# readiness probe: one MQTT 3.1.1 CONNECT over TLS, no client library needed


def _tls_context(ca: Path, cert: Path, key: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile=str(ca))
    ctx.load_cert_chain(certfile=str(cert), keyfile=str(key))
    return ctx


def _recv_exact(sock: ssl.SSLSocket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("connection closed by broker")
        buf += chunk
    return buf


def probe(host: str, port: int, ca: Path, cert: Path, key: Path, timeout: float = 2.0) -> None:
    """Connect with TLS and a client cert, send MQTT CONNECT, expect CONNACK accepted, disconnect.

    Raises OSError/ssl.SSLError/ConnectionError (or BrokerError for a refused CONNACK).
    """
    ctx = _tls_context(ca, cert, key)
    client_id = f"vrack-probe-{os.getpid()}".encode()
    var = b"\x00\x04MQTT\x04\x02\x00\x0a"  # protocol name, level 4 (3.1.1), clean session, keepalive 10
    body = var + len(client_id).to_bytes(2, "big") + client_id
    assert len(body) < 128
    with socket.create_connection((host, port), timeout=timeout) as raw:
        with ctx.wrap_socket(raw, server_hostname=host) as s:
            s.sendall(bytes([0x10, len(body)]) + body)
            connack = _recv_exact(s, 4)
            if connack[0] != 0x20 or connack[1] != 0x02:
                raise ConnectionError(f"unexpected reply to CONNECT: {connack!r}")
            if connack[3] != 0:
                raise BrokerError(f"broker refused CONNECT, return code {connack[3]}")
            s.sendall(b"\xe0\x00")  # DISCONNECT


# --------------------------------------------------------------------------------------------------
# the broker


def _find_mosquitto() -> str:
    found = shutil.which("mosquitto")
    if found:
        return found
    for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto", "/opt/homebrew/sbin/mosquitto"):
        if os.access(p, os.X_OK):
            return p
    raise BrokerError("mosquitto not found on PATH nor in /usr/sbin, /usr/local/sbin")


def _port_free(host: str, port: int) -> bool:
    """Can a listener bind ``host:port``? SO_REUSEADDR like mosquitto, so TIME_WAIT does not count."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                return False
            raise
    return True


_PR_SET_PDEATHSIG = 1
try:
    _prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before any fork: the child only calls it
except (OSError, AttributeError):  # not Linux
    _prctl = None


def _die_with_parent(parent: int) -> Callable[[], None] | None:
    """A preexec_fn: the child gets SIGTERM when `parent` (the thread that starts it) dies, even by
    SIGKILL, so a rack or test process killed outright does not leave its mosquitto behind."""
    if _prctl is None or threading.current_thread() is not threading.main_thread():
        return None  # the signal follows the starting *thread*: only the main thread lives as long as the process

    def preexec() -> None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the line above
            os._exit(1)

    return preexec


def _kill_group(proc: subprocess.Popen) -> None:
    """Last resort (garbage collection / interpreter exit): never leave mosquitto behind."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=STOP_TIMEOUT)


class Broker:
    """mosquitto on ``host:port`` with TLS client-certificate authentication.

    ``clients`` are the identities to issue certs for; ``harness`` is always included (the
    readiness probe uses it). Use as a context manager or call ``start()``/``stop()``.
    """

    def __init__(
        self,
        run_dir: Path,
        port: int,
        clients: Iterable[str],
        host: str = "127.0.0.1",
        *,
        mosquitto: str | None = None,
    ):
        self.run_dir = Path(run_dir)
        self.dir = broker_dir(self.run_dir)
        self.port = int(port)
        self.host = host
        names = [_check_name(c) for c in clients]
        self.clients: list[str] = list(dict.fromkeys([HARNESS, *names]))
        self._mosquitto = mosquitto
        self._proc: subprocess.Popen | None = None
        self._finalizer: weakref.finalize | None = None

    # paths ---------------------------------------------------------------------------------------
    @property
    def ca_file(self) -> Path:
        return self.dir / "ca.pem"

    @property
    def conf_file(self) -> Path:
        return self.dir / "mosquitto.conf"

    @property
    def acl_file(self) -> Path:
        return self.dir / "mosquitto.acl"

    @property
    def log_file(self) -> Path:
        return self.dir / "mosquitto.log"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def client_files(self, client: str) -> tuple[Path, Path, Path]:
        """``(ca, cert, key)`` for an issued client identity."""
        _check_name(client)
        cert, key = self.dir / f"{client}.pem", self.dir / f"{client}.key"
        if not (cert.exists() and key.exists()):
            raise BrokerError(f"no certificate issued for {client!r} in {self.dir} (see ensure_client_cert)")
        return self.ca_file, cert, key

    def ensure_client_cert(self, name: str) -> tuple[Path, Path, Path]:
        return ensure_client_cert(self.run_dir, name)

    # files ---------------------------------------------------------------------------------------
    def prepare(self) -> None:
        """Write (or re-use) the certificates and write mosquitto.conf and mosquitto.acl; does not
        start anything."""
        for ch in "\n\r":
            if ch in str(self.dir.resolve()):
                raise BrokerError(f"run_dir path unusable in mosquitto.conf: {self.dir!r}")
        with _locked(self.dir):
            _ensure_files(self.dir, self.clients, [self.host])
            self._write_conf()

    def _write_conf(self) -> None:
        d = self.dir.resolve()
        # mosquitto 2.0 started as root drops to user "mosquitto" right after reading the config, and
        # could then read neither our 0600 keys nor a run_dir under a private tmp. Naming the current
        # user keeps it as is (for a non-root user the option has no effect).
        user = pwd.getpwuid(os.geteuid()).pw_name
        conf = f"""\
# written by vrack.broker; regenerated on every start
per_listener_settings false
allow_anonymous false
persistence false
# small MQTT packets go out at once (Nagle + delayed ACK costs ~40 ms per hop otherwise)
set_tcp_nodelay true
user {user}
log_dest file {d / "mosquitto.log"}
log_type error
log_type warning
log_type notice
log_type information
log_timestamp true
log_timestamp_format %Y-%m-%dT%H:%M:%S
connection_messages true
# max_inflight_messages / max_queued_messages: mosquitto defaults

listener {self.port} {self.host}
cafile {d / "ca.pem"}
certfile {d / "server.pem"}
keyfile {d / "server.key"}
require_certificate true
use_identity_as_username true
# per-thing topic permissions (see vrack.broker.acl_text)
acl_file {d / "mosquitto.acl"}
"""
        _write_atomic(self.acl_file, acl_text().encode(), 0o644)
        _write_atomic(self.conf_file, conf.encode(), 0o644)

    def _log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_file.read_text(errors="replace")
        except OSError:
            return "(no mosquitto.log)"
        tail = text.splitlines()[-lines:]
        return "\n".join(tail) if tail else "(mosquitto.log is empty)"

    # process -------------------------------------------------------------------------------------
    def start(self, timeout: float = 10.0) -> None:
        """Write certs and config, start mosquitto and wait until a harness TLS connection works."""
        if self.running():
            raise BrokerError(f"broker already running (pid {self.pid}) on {self.host}:{self.port}")
        deadline = time.monotonic() + timeout
        if not _port_free(self.host, self.port):
            raise PortInUseError(f"broker port {self.port} on {self.host} is already in use")
        exe = self._mosquitto or _find_mosquitto()
        self.prepare()
        if self.log_file.exists():
            os.replace(self.log_file, self.log_file.with_name("mosquitto.log.1"))
        with open(self.log_file, "ab") as log:  # early errors (before log_dest opens) land here too
            try:
                proc = subprocess.Popen(
                    [exe, "-c", str(self.conf_file.resolve())],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    start_new_session=True,  # own session and process group
                    close_fds=True,
                    preexec_fn=_die_with_parent(os.getpid()),
                )
            except OSError as e:
                raise BrokerError(f"cannot run mosquitto {exe!r}: {e}") from e
        self._proc = proc
        self._finalizer = weakref.finalize(self, _kill_group, self._proc)
        ca, cert, key = self.client_files(HARNESS)
        pause = 0.005
        last: Exception | None = None
        while True:
            rc = self._proc.poll()
            if rc is not None:
                self._proc.wait()
                self._cleanup()
                tail = self._log_tail()
                if "Address already in use" in tail:
                    raise PortInUseError(
                        f"broker port {self.port} on {self.host} is already in use (mosquitto exited {rc})"
                        f"\n--- {self.log_file} ---\n{tail}"
                    )
                raise BrokerError(f"mosquitto exited with {rc}\n--- {self.log_file} ---\n{tail}")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.stop()
                raise BrokerError(
                    f"mosquitto on {self.host}:{self.port} did not accept a TLS connection with the"
                    f" harness cert within {timeout:.1f}s (last error: {last!r})"
                    f"\n--- {self.log_file} ---\n{self._log_tail()}"
                )
            try:
                # short attempts: a stalled handshake (e.g. someone else's listener) must not hide an exit
                probe(self.host, self.port, ca, cert, key, timeout=max(0.05, min(0.5, remaining)))
                return
            except (OSError, ConnectionError, BrokerError) as e:  # ssl.SSLError is an OSError
                last = e
            time.sleep(min(pause, max(0.0, deadline - time.monotonic())))
            pause = min(pause * 2, 0.1)

    def stop(self) -> None:
        """SIGTERM the process group, wait a bounded time, then SIGKILL. Idempotent."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=STOP_TIMEOUT)
        else:
            proc.wait()
        self._cleanup()

    def _cleanup(self) -> None:
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        self._proc = None

    def __enter__(self) -> Broker:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"pid {self.pid}" if self.running() else "stopped"
        return f"<Broker {self.host}:{self.port} {state} dir={self.dir}>"
