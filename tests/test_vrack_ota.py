"""The reference firmware's OTA agent end to end: a real cart process on a pty with fleet settings,
mosquitto with client certificates, the lab jobs service, image host and telemetry collector
(harness.fleet), images signed with a lab PKI. Also the fleet-settings region, the build checksum
and the job-document checks on their own."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import select
import threading
import time
import uuid
from urllib.parse import urlsplit

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_vrack_cart import VirtualCart, fast_config

from harness import pki
from harness.fleet.imagehost import ImageHost
from harness.fleet.jobs import TERMINAL, JobsService
from harness.fleet.mqtt import MqttClient
from harness.fleet.telemetry import Telemetry
from harness.image import sign_image
from vrack import factory
from vrack.firmware import reference
from vrack.flash import SETTINGS_MAX, Flash, SettingsError, decode_settings, encode_settings
from vrack.image import build_image as assemble_image

HOST = "127.0.0.1"
SIGNER = pki.signer_of(pki.ROOT_OLD)
_things = itertools.count(1)


# --- a cart whose console is read all the time (the agent writes whenever it likes) ---------------


class OtaCart(VirtualCart):
    def __init__(self, workdir, config, time_scale=0.02):
        super().__init__(workdir, config, time_scale)
        self.seen = ""  # everything the cart wrote, for order checks
        self.stamped: list[tuple[float, str]] = []  # (monotonic time read, complete line)
        self._partial = ""
        self._cond = threading.Condition()
        self._stop = False
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while not self._stop:
            if not select.select([self.slave], [], [], 0.05)[0]:
                continue
            try:
                data = os.read(self.slave, 65536).decode("utf-8", "replace")
            except OSError:
                return
            now = time.monotonic()
            with self._cond:
                self.out += data
                self.seen += data
                *done, self._partial = (self._partial + data).split("\r\n")
                self.stamped += [(now, x.replace("cart> ", "")) for x in done]
                self._cond.notify_all()

    def expect(self, pattern: str, timeout: float = 5.0) -> re.Match:
        regex = re.compile(pattern, re.S)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                m = regex.search(self.out)
                if m:
                    self.out = self.out[m.end():]
                    return m
                left = deadline - time.monotonic()
                if left <= 0:
                    err = self.errlog.read_text(errors="replace")[-2000:] if self.errlog.exists() else ""
                    raise AssertionError(f"waited {timeout} s for /{pattern}/ on the cart console; unread tail:\n"
                                         f"{self.out[-2500:]}\ncart stderr tail:\n{err}")
                self._cond.wait(left)

    def wait_seen(self, pattern: str, timeout: float = 5.0) -> re.Match:
        """Wait until `pattern` matches anywhere in what the cart wrote (consumes nothing)."""
        regex = re.compile(pattern, re.M)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                m = regex.search(self.seen)
                if m:
                    return m
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no /{pattern}/ within {timeout} s in:\n{self.seen[-2500:]}")
                self._cond.wait(left)

    def lines(self) -> list[str]:
        with self._cond:
            return [x.replace("cart> ", "") for x in self.seen.split("\r\n")]

    def close(self) -> None:
        self._stop = True
        self._reader.join(2)
        super().close()

    def slot_hashes(self) -> dict[str, str]:
        found = (re.fullmatch(r"slot ([AB]) sha256=([0-9a-f]{64})", x) for x in self.command("slot hash"))
        return dict(m.groups() for m in found if m)  # (an async OTA line may come between)


def ota_config(thing: str, **boot) -> dict:
    cfg = fast_config(**boot)
    cfg["id"] = thing
    return cfg


# --- the lab --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    p = pki.LabPki(tmp_path_factory.mktemp("pki"))
    p.init()
    return p


@pytest.fixture(scope="module")
def broker(tmp_path_factory, broker_factory):
    with broker_factory(tmp_path_factory, "ota", []) as b:
        yield b


@pytest.fixture(scope="module")
def harness_mqtt(broker):
    c = MqttClient(HOST, broker.port, *broker.client_files("harness"), client_id=f"svc-{uuid.uuid4().hex[:8]}")
    c.connect(5)
    yield c
    c.close()


@pytest.fixture(scope="module")
def telemetry(harness_mqtt):
    t = Telemetry(harness_mqtt)
    yield t
    t.close()


class Clock:
    """The image host's clock: real time plus an offset a test can move forward."""

    def __init__(self):
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def host(clock):
    h = ImageHost(allow_short_ttl_for_tests=True, clock=clock)
    yield h
    h.close()


class Lab:
    """One test's cart (with fleet settings) and the jobs service that answers it."""

    def __init__(self, tmp_path, lab_pki, broker, mqtt, host, telemetry, **boot):
        self.pki = lab_pki
        self.broker = broker
        self.host = host
        self.telemetry = telemetry
        self.thing = f"cart-ota{os.getpid() % 10000}-{next(_things)}"
        workdir = tmp_path / self.thing
        workdir.mkdir()
        self.cart = OtaCart(workdir, ota_config(self.thing, **boot))
        self.jobs = JobsService(mqtt, host, things=[self.thing])
        self._ids = itertools.count(1)

    def provision(self, version: str = "1.4.2", settings: bool = True,
                  image_hosts: tuple[str, ...] | None = (HOST,)) -> None:
        """`image_hosts` None: fleet settings of the old format, without the list."""
        ca, cert, key = self.broker.ensure_client_cert(self.thing)
        blob = factory.settings_blob(self.thing, HOST, self.broker.port, ca.read_text(), cert.read_text(),
                                     key.read_text(), image_hosts=image_hosts or ()) if settings else None
        if settings and image_hosts is None:
            old = decode_settings(blob)
            del old["image_hosts"]
            blob = encode_settings(old)
        trust = factory.trust_blob([{"name": pki.ROOT_OLD, "pem": self.pki.root_pem(pki.ROOT_OLD)}])
        factory.provision_flash(self.cart.flash_path, self.cart.config, factory.build_image(version), trust, blob)

    def sign(self, unsigned: bytes, **kw) -> bytes:
        now = int(time.time())
        args = dict(hardware=["rev-c"], required_ca=pki.ROOT_OLD, issued=now - 3600, expires=now + 86400,
                    security_counter=0, signer_key=self.pki.key(SIGNER), chain=self.pki.chain(SIGNER))
        args.update(kw)
        return sign_image(unsigned, **args)

    def image(self, version: str, faults=None) -> bytes:
        return self.sign(factory.build_image(version, faults=faults))

    def job(self, image: bytes | None, target: str, document: dict | None = None, **kw) -> str:
        job_id = f"job-{self.thing}-{next(self._ids)}"
        doc = {"operation": "ota", "target_version": target}
        if image is not None:
            self.host.add(job_id, image)
            doc["image_id"] = job_id
        doc.update(document or {})
        self.jobs.create_job(job_id, [self.thing], doc, **kw)
        return job_id

    def wait(self, job_id: str, timeout: float = 20.0) -> dict:
        try:
            return self.jobs.wait_status(job_id, self.thing, TERMINAL, timeout)
        except Exception as exc:
            raise AssertionError(f"{exc}\nconsole:\n" + "\n".join(self.cart.lines()[-40:])) from None

    def boot(self) -> None:
        self.cart.power_on()
        self.cart.boot_to_shell()
        self.cart.expect(r"OTA: rollback record none\r\n")

    def close(self) -> None:
        self.cart.close()
        self.jobs.close()


@pytest.fixture
def make_lab(tmp_path, lab, broker, harness_mqtt, host, telemetry):
    labs = []

    def make(**boot) -> Lab:
        lb = Lab(tmp_path, lab, broker, harness_mqtt, host, telemetry, **boot)
        labs.append(lb)
        return lb

    yield make
    for lb in labs:
        lb.close()


def in_order(lines: list[str], wanted: list[str]) -> None:
    """Each regex of `wanted` matches a whole line, in this order (other lines may come between)."""
    i = 0
    for pattern in wanted:
        rx = re.compile(pattern)
        while i < len(lines) and not rx.fullmatch(lines[i]):
            i += 1
        assert i < len(lines), f"no line /{pattern}/ after the previous ones in:\n" + "\n".join(lines)
        i += 1


# --- end to end -----------------------------------------------------------------------------------


def test_happy_path_then_a_second_update_from_the_trial_boot(make_lab, telemetry):
    lb = make_lab()
    lb.provision()
    lb.boot()
    cart = lb.cart
    assert cart.command("ota status") == [f"ota state=idle broker=connected thing={lb.thing}"]
    before = cart.slot_hashes()
    image = lb.image("1.6.0")
    t0 = time.monotonic()
    job = lb.job(image, "1.6.0")
    ex = lb.wait(job)
    assert ex["status"] == "SUCCEEDED" and ex["statusDetails"] == {"step": "done", "version": "1.6.0"}, ex
    cart.expect(r"FW: slot B confirmed\r\n", 10)
    elapsed = time.monotonic() - t0
    assert cart.command("version") == ["version 1.6.0"]
    status = cart.command("slot status")
    assert re.fullmatch(r"slot active=B booted=B pending=- tries=0 confirmed=yes boots=2 rollbacks=0", status[0])
    assert status[1:] == ["slot A fw=1.4.2 valid=yes", "slot B fw=1.6.0 valid=yes"]
    after = cart.slot_hashes()
    assert after["A"] == before["A"] and after["B"] != before["B"]
    size, page = len(image), 4096
    in_order(cart.lines(), [
        rf"OTA: job {job} started target=1\.6\.0",
        r"OTA: download \d+/\d+",
        rf"OTA: download done {size} bytes sha256={hashlib.sha256(image).hexdigest()}",
        rf"OTA: verify ok fw=1\.6\.0 ca={pki.ROOT_OLD}",
        rf"OTA: write {-(-size // page)}/{-(-size // page)} pages slot=B",
        r"OTA: write done slot=B sha256=[0-9a-f]{64}",
        r"OTA: trial armed slot=B fw=1\.6\.0, rebooting",
        r"CART-BL 2\.1\.0 .*",
        r"BOOT: bl=2\.1\.0 slot=B fw=1\.6\.0 cfg=\S+ mode=trial",
        r"FW: self-test ok",
        rf"OTA: connected broker=127\.0\.0\.1:{lb.broker.port} thing={lb.thing}",
        r"OTA: rollback record none",
        rf"OTA: trial fw=1\.6\.0 reported SUCCEEDED job={job}",
        r"FW: marking slot B good",
        r"FW: slot B confirmed",
    ])
    lines = cart.lines()
    assert len([x for x in lines if x.startswith("OTA: download ") and "/" in x]) <= 11
    assert len([x for x in lines if x.startswith("OTA: write ") and "pages" in x]) <= 11
    assert not [x for x in lines if "OTA:" in x and not x.startswith("OTA:")], "an async line shares a line"
    statuses = [(c.new, c.status_details.get("step")) for c in lb.jobs.history(job, lb.thing)]
    assert statuses[:2] == [("QUEUED", None), ("IN_PROGRESS", None)] and statuses[-1] == ("SUCCEEDED", "done")
    assert ("IN_PROGRESS", "self-test") in statuses and ("IN_PROGRESS", "download") in statuses
    online = telemetry.wait_metric("agent_online", thing=lb.thing, at_least=2, timeout=5)
    assert [e.fields["boot_id"] for e in online] == [f"{lb.thing}-1", f"{lb.thing}-2"]
    assert online[-1].fields["fw_version"] == "1.6.0"
    assert telemetry.rollback_count(thing=lb.thing) == 0
    marks = {}
    for t, line in cart.stamped:
        for key in ("started", "download done", "verify ok", "write done", "trial armed", "mode=trial",
                    "reported SUCCEEDED", "slot B confirmed"):
            if key in line and key not in marks:
                marks[key] = t
    keys = list(marks)
    print(f"\nupdate 1.4.2 -> 1.6.0 queued to confirmed: {elapsed:.2f} s; "
          + ", ".join(f"{a} -> {b}: {marks[b] - marks[a]:.3f} s" for a, b in zip(keys, keys[1:], strict=False)))

    # the confirmed trial boot takes the next job: into slot A
    job2 = lb.job(lb.image("1.7.0"), "1.7.0")
    assert lb.wait(job2)["status"] == "SUCCEEDED"
    cart.expect(r"FW: slot A confirmed\r\n", 10)
    assert cart.command("slot status")[0].startswith("slot active=A booted=A pending=- tries=0 confirmed=yes boots=3")
    assert cart.command("bench mqtt 5") == ["bench mqtt done 5"]
    bench = telemetry.wait_metric("bench", thing=lb.thing, at_least=5, timeout=5)
    assert [e.fields["i"] for e in bench] == list(range(5))


def test_rejected_images_and_documents_write_nothing(make_lab, host):
    lb = make_lab()
    lb.provision()
    lb.boot()
    cart = lb.cart
    before = cart.slot_hashes()
    unsigned = factory.build_image("1.6.0")
    signed = lb.image("1.6.0")
    sha, size = hashlib.sha256(signed).hexdigest(), len(signed)
    url = host.presign("spare", 3600)
    cases = [
        (unsigned, "1.6.0", None, "unsigned"),
        (lb.image("1.4.2"), "1.4.2", None, "same version"),
        (lb.sign(factory.build_image("1.6.0"), hardware=["rev-z"]), "1.6.0", None, "wrong hardware"),
        (signed, "1.6.1", None, "target version mismatch"),
        (signed, "1.6.0", {"sha256": "0" * 64}, "download hash mismatch"),
        (signed, "1.6.0", {"size": size + 1}, "download size mismatch"),
        (signed, "1.6.0", {"size": size - 1}, "download size mismatch"),
        (None, "1.6.0", {"url": url, "sha256": sha, "size": 600000}, "image too large: 600000 > slot 524288"),
        (None, "1.6.0", {"url": "ftp://example.com/x", "sha256": sha, "size": size}, "malformed job document: url"),
        (None, "1.6.0", {"sha256": sha, "size": size}, "malformed job document: url"),
        (None, 160, {"url": url, "sha256": sha, "size": size}, "malformed job document: target_version"),
        (None, "1." * 3000 + "0", {"url": url, "sha256": sha, "size": size}, "malformed job document: target_version"),
        (None, "1.6.0", {"url": url, "sha256": "xyz", "size": size}, "malformed job document: sha256"),
        (None, "1.6.0", {"url": url, "sha256": sha, "size": -5}, "malformed job document: size"),
        (None, "1.6.0", {"url": url, "sha256": sha, "size": 10**40}, "malformed job document: size"),
        (None, "1.6.0", {"url": url, "sha256": sha, "size": "lots"}, "malformed job document: size"),
        (None, "1.6.0", {"operation": "format-flash", "url": url, "sha256": sha, "size": size},
         "malformed job document: operation"),
        (None, "1.6.0", {"operation": ["ota"], "url": url, "sha256": sha, "size": size},
         "malformed job document: operation"),
    ]
    # queued all at once: after each REJECTED the agent asks start-next again
    jobs = [(lb.job(img, target, doc), reason) for img, target, doc, reason in cases]
    # not JSON, or not an object, on the cart's own topics: ignored
    for payload in (b"\xff\xfe not json", b"[1, 2]", b"null"):
        lb.jobs.mqtt.publish(f"$aws/things/{lb.thing}/jobs/notify-next", payload)
    for job, reason in jobs:
        ex = lb.wait(job)
        assert (ex["status"], ex["statusDetails"]) == ("REJECTED", {"reason": reason}), (job, ex)
        cart.expect(rf"OTA: rejected job={job}: {re.escape(reason)}\r\n")
    assert cart.slot_hashes() == before
    assert cart.command("slot status")[0].startswith("slot active=A booted=A pending=- tries=0 confirmed=yes boots=1 ")
    assert cart.command("ota status") == [f"ota state=idle broker=connected thing={lb.thing}"]
    assert cart.seen.count("CART-BL") == 1, "the cart rebooted"


class Redirector:
    """An HTTP server on an allowed host that answers every GET with a redirect to `target`."""

    def __init__(self, target: str):
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        hits = self.hits = []

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - the http.server API
                hits.append(self.path)
                self.send_response(302)
                self.send_header("Location", target)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer((HOST, 0), Handler)
        self.url = f"http://{HOST}:{self.server.server_port}/images/x"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_images_only_from_the_image_hosts_in_the_fleet_settings(make_lab, host):
    """Defense in depth: whatever a job document says (or a redirect), the cart fetches only from the
    hosts its fleet settings list; another host on the same machine (127/8 is all loopback) is refused
    before a byte is fetched."""
    lb = make_lab()
    lb.provision()
    lb.boot()
    cart = lb.cart
    before = cart.slot_hashes()
    signed = lb.image("1.6.0")
    sha, size = hashlib.sha256(signed).hexdigest(), len(signed)
    other = ImageHost("127.0.0.2", 0)
    try:
        other.add("fw-1.6.0", signed)
        elsewhere = other.presign("fw-1.6.0", 3600)
        assert elsewhere.startswith("http://127.0.0.2:")
        redirector = Redirector(elsewhere)
        try:
            host.add("fw-1.6.0-by-name", signed)
            by_name = host.presign("fw-1.6.0-by-name", 3600).replace(f"//{HOST}:", "//LocalHost:")
            cases = [
                (elsewhere, "image host not allowed: 127.0.0.2"),
                (by_name, "image host not allowed: localhost"),  # the same server, under a name not listed
                (redirector.url, "redirected: image host not allowed: 127.0.0.2"),
            ]
            jobs = [(lb.job(None, "1.6.0", {"url": url, "sha256": sha, "size": size}), reason)
                    for url, reason in cases]
            for job, reason in jobs:
                ex = lb.wait(job)
                assert (ex["status"], ex["statusDetails"]) == ("REJECTED", {"reason": reason}), (job, ex)
                cart.expect(rf"OTA: rejected job={job}: {re.escape(reason)}\r\n")
            assert redirector.hits == ["/images/x"]  # the allowed host was asked; its redirect was not followed
        finally:
            redirector.close()
        assert other.requests() == [] and host.requests("fw-1.6.0-by-name") == []
        # the positive control: the same image from the listed host goes through
        ok = lb.job(signed, "1.6.0")
        assert lb.wait(ok)["status"] == "SUCCEEDED"
    finally:
        other.close()
    assert cart.seen.count("CART-BL") == 2, "one boot, then the trial of the allowed update"
    after = cart.slot_hashes()
    assert after["A"] == before["A"]


def test_settings_without_image_hosts_refuse_every_download(make_lab, host):
    """Fleet settings of the older format (no `image_hosts`): the agent still reports to the jobs
    service, but downloads nothing (the rack rewrites the settings at every start anyway)."""
    lb = make_lab()
    lb.provision(image_hosts=None)
    lb.boot()
    before = lb.cart.slot_hashes()
    job = lb.job(lb.image("1.6.0"), "1.6.0")
    ex = lb.wait(job)
    assert (ex["status"], ex["statusDetails"]) == ("REJECTED", {"reason": "no image hosts in the fleet settings"})
    lb.cart.expect(rf"OTA: rejected job={job}: no image hosts in the fleet settings\r\n")
    assert host.requests(job) == [] and lb.cart.slot_hashes() == before


def test_never_mark_good_is_rolled_back_and_reported_once(make_lab, telemetry):
    lb = make_lab(mark_good_window_s=1.5)
    lb.provision()
    lb.boot()
    cart = lb.cart
    mark = telemetry.mark()
    job = lb.job(lb.image("1.6.0", {"never_mark_good": True}), "1.6.0")
    cart.expect(r"BOOT: bl=2\.1\.0 slot=B fw=1\.6\.0 cfg=\S+ mode=trial\r\n", 10)
    cart.expect(r"BL: watchdog reset\r\n", 5)
    cart.expect(r"BL: rollback: slot B not confirmed, back to slot A\r\n")
    ex = lb.wait(job)
    assert ex["status"] == "FAILED"
    assert ex["statusDetails"] == {"reason": "rolled back", "rolled_back_version": "1.6.0", "version": "1.4.2"}
    (online,) = telemetry.wait_metric("agent_online", thing=lb.thing, since=mark, timeout=5,
                                      predicate=lambda e: e.boot_id == f"{lb.thing}-3")
    assert telemetry.rollback_count("1.6.0", lb.thing) == 1
    (event,) = telemetry.events("firmware_rollback_count", thing=lb.thing)
    assert event.boot_id == f"{lb.thing}-3" and event.index < online.index
    in_order(cart.lines(), [
        r"BL: rollback: slot B not confirmed, back to slot A",
        r"BOOT: bl=2\.1\.0 slot=A fw=1\.4\.2 cfg=\S+ mode=normal",
        r"OTA: rollback record slot=B fw=1\.6\.0",
        r"OTA: metric firmware_rollback_count target=1\.6\.0 published",
        rf"OTA: job {job} reported FAILED: rolled back from 1\.6\.0",
    ])
    assert cart.command("slot status")[0] == \
        "slot active=A booted=A pending=- tries=0 confirmed=yes boots=3 rollbacks=1"
    bcb = cart.bcb()
    assert bcb.rollback_slot is None and bcb.rollback_version == "" and bcb.rollback_count == 1
    # the record is cleared: the next boot reports nothing again
    cart.send("reboot\r\n")
    cart.boot_to_shell()
    cart.expect(r"OTA: rollback record none\r\n")
    telemetry.wait_metric("agent_online", thing=lb.thing, since=mark, timeout=5,
                          predicate=lambda e: e.boot_id == f"{lb.thing}-4")
    assert telemetry.rollback_count("1.6.0", lb.thing) == 1 and not telemetry.duplicates()


def test_early_success_then_failed_self_test(make_lab, telemetry):
    """The fault build reports SUCCEEDED before its self-test, which then fails: the job says
    SUCCEEDED, the cart went back, and the rollback is counted."""
    lb = make_lab()
    lb.provision()
    lb.boot()
    job = lb.job(lb.image("1.6.0", {"early_success": True, "self_test_fail": True}), "1.6.0")
    assert lb.wait(job)["status"] == "SUCCEEDED"
    lb.cart.expect(r"FW: self-test failed: fault build: self-test forced to fail\r\n", 10)
    lb.cart.expect(r"BL: rollback: slot B not confirmed, back to slot A\r\n")
    lb.cart.expect(r"OTA: metric firmware_rollback_count target=1\.6\.0 published\r\n", 10)
    in_order(lb.cart.lines(), [r"BOOT: .* mode=trial", r"OTA: trial fw=1\.6\.0 reported SUCCEEDED job=\S+",
                               r"FW: sensor \S+ ok", r"FW: self-test failed: .*"])
    assert telemetry.wait_metric(thing=lb.thing, target_version="1.6.0", timeout=5)[0].value == 1


def test_payload_changed_before_signing_fails_the_build_checksum(make_lab):
    lb = make_lab()
    lb.provision()
    lb.boot()
    payload = factory.firmware_payload("1.6.0")
    i = payload.find(b"# pad ", len(payload) // 2) + 8
    edited = payload[:i] + (b"x" if payload[i:i + 1] != b"x" else b"y") + payload[i + 1:]
    image = lb.sign(assemble_image(edited, "1.6.0"))
    job = lb.job(image, "1.6.0")
    lb.cart.expect(r"OTA: verify ok fw=1\.6\.0", 10)
    lb.cart.expect(r"FW: self-test failed: build checksum mismatch\r\nFW: trial not confirmed, resetting\r\n", 10)
    lb.cart.expect(r"BL: rollback: slot B not confirmed, back to slot A\r\n")
    ex = lb.wait(job)
    assert (ex["status"], ex["statusDetails"]["reason"]) == ("FAILED", "rolled back")


def test_download_resumes_after_a_dropped_connection_and_a_lost_broker(make_lab, host, broker):
    lb = make_lab()
    lb.provision()
    lb.boot()
    image = lb.image("1.6.0")
    host.stall_after(len(image) // 2, hold_s=30)
    job = lb.job(image, "1.6.0")
    host.wait_stalled(10)
    # another client takes over the cart's MQTT session: the broker drops the cart, which reconnects
    intruder = MqttClient(HOST, broker.port, *broker.client_files("harness"), client_id=lb.thing)
    intruder.connect(5)
    intruder.close()
    lb.cart.expect(r"OTA: connection lost: .*?\r\n.*OTA: connected broker=", 10)
    host.release()
    assert lb.wait(job)["status"] == "SUCCEEDED"
    m = re.search(r"OTA: download resumed at (\d+): (.*)", "\n".join(lb.cart.lines()))
    assert m and int(m.group(1)) >= len(image) // 2 - 65536, m
    ranged = [r for r in host.requests(job) if r.range]
    assert ranged and ranged[0].status == 206 and ranged[0].range == f"bytes={m.group(1)}-"
    assert sum(r.bytes_sent for r in host.requests(job)) == len(image)


def test_url_expired_mid_download_fetches_the_document_again(make_lab, host, clock):
    lb = make_lab()
    lb.provision()
    lb.boot()
    image = lb.image("1.6.0")
    host.stall_after(len(image) // 2, hold_s=30)
    job = lb.job(image, "1.6.0", url_ttl_s=60)
    host.wait_stalled(10)
    clock.offset = 120  # the URL the cart holds has expired
    host.release()
    assert lb.wait(job)["status"] == "SUCCEEDED"
    assert any(r.status == 403 and r.reason == "expired" for r in host.requests(job))
    assert "describe" in [f["operation"] for f in lb.jobs.document_fetches(job, lb.thing)]
    in_order(lb.cart.lines(), [r"OTA: url expired at \d+, fetching the job document again",
                               rf"OTA: download done {len(image)} bytes sha256=[0-9a-f]{{64}}"])
    resumed = [r for r in host.requests(job) if r.status == 206]
    assert resumed and not resumed[-1].range.startswith("bytes=0-")


def test_truncated_download_fails_after_eight_attempts(make_lab, host):
    lb = make_lab()
    lb.provision()
    lb.boot()
    image = lb.image("1.6.0")
    before = lb.cart.slot_hashes()
    half = len(image) // 2
    host.stall_after(half, once=False, hold_s=0.01)
    job = lb.job(image, "1.6.0")
    ex = lb.wait(job, 30)
    host.stall_after(None)
    assert (ex["status"], ex["statusDetails"]) == (
        "FAILED", {"reason": f"download incomplete: {half} of {len(image)} bytes"})
    assert len([r for r in host.requests(job) if r.range == f"bytes={half}-"]) == 8
    lb.cart.expect(rf"OTA: failed job={job}: download incomplete: {half} of {len(image)} bytes\r\n")
    assert lb.cart.slot_hashes() == before


def test_without_fleet_settings_the_agent_stays_off(make_lab):
    lb = make_lab()
    lb.provision(settings=False)
    lb.cart.power_on()
    lb.cart.expect(r"FW: self-test ok\r\nOTA: no fleet settings \(erased\)\r\nFW: ready\r\ncart> ")
    assert lb.cart.command("ota status") == ["ota state=idle broker=none thing=-"]
    assert lb.cart.command("bench mqtt 3") == ["error: no fleet settings (erased)"]


def test_no_broker_build_never_connects_and_its_trial_is_rolled_back(make_lab):
    lb = make_lab(mark_good_window_s=1.5)
    lb.provision()
    lb.cart.put_image("B", factory.build_image("1.6.0", faults={"no_broker": True}))
    lb.cart.set_pending("B")
    lb.cart.power_on()
    lb.cart.expect(r"FW: ready\r\n")
    lb.cart.wait_seen(r"^OTA: broker unreachable: no endpoint in the fleet settings \(key 'mqtt_endpoint'\)\r$")
    assert lb.cart.command("ota status") == [f"ota state=idle broker=disconnected thing={lb.thing}"]
    lb.cart.expect(r"BL: watchdog reset\r\n", 3)
    lb.cart.expect(r"BL: rollback: slot B not confirmed, back to slot A\r\n")
    lb.cart.expect(r"OTA: rollback record slot=B fw=1\.6\.0\r\n", 10)


# --- pieces -------------------------------------------------------------------------------------------


def test_settings_blob_round_trip_and_size_limit():
    settings = {"thing": "cart-03", "mqtt": {"host": "127.0.0.1", "port": 47883, "ca": "C", "cert": "P", "key": "K"}}
    blob = encode_settings(settings)
    assert blob[:4] == b"CSET" and blob[4:8] == b"\x01\x00\x00\x00"
    assert decode_settings(blob + b"\xff" * 100) == settings
    assert reference.parse_settings(blob + b"\xff" * 100) == (settings, None)
    for raw, reason in [(b"\xff" * 64, "erased"), (b"XSET" + blob[4:], "bad magic"), (blob[:-1], "bad size"),
                        (blob[:20] + bytes([blob[20] ^ 1]) + blob[21:], "bad crc")]:
        with pytest.raises(SettingsError, match=reason):
            decode_settings(raw)
        assert reference.parse_settings(raw) == (None, reason)
    assert reference.parse_settings(encode_settings({"thing": "a/b", "mqtt": settings["mqtt"]}))[1] == "bad thing"
    assert reference.parse_settings(encode_settings({"thing": "x", "mqtt": {"host": "h"}}))[1] == "bad mqtt"
    with pytest.raises(SettingsError, match="do not fit"):
        encode_settings({"thing": "x", "pad": "y" * SETTINGS_MAX})


def test_rack_up_writes_settings_for_every_cart(rig_factory):
    from vrack.rack import Rack, load_rig

    rack = Rack(load_rig(rig_factory(["cart-01", "cart-06"])))
    rack.up()
    try:
        for sock in rack.sockets.values():
            with Flash(sock.flash, sock.cart.flash, time_scale=0) as f:
                raw = f.read(f.layout.settings_offset, f.layout.settings_size)
            settings = decode_settings(raw)
            assert settings["thing"] == sock.cart.id
            mqtt = settings["mqtt"]
            assert (mqtt["host"], mqtt["port"]) == ("127.0.0.1", rack.rig.broker_port)
            assert mqtt["cert"] == (rack.run_dir / "broker" / f"{sock.cart.id}.pem").read_text()
            assert settings["image_hosts"] == ["127.0.0.1"]  # the rig's image host (default bind)
            assert mqtt["ca"] == (rack.run_dir / "broker" / "ca.pem").read_text()
    finally:
        rack.down()


def test_build_checksum_line():
    payload = factory.firmware_payload("1.6.0", size=131072)
    assert len(payload) == 131072 and payload.endswith(b"\n")
    last = payload[:-1].rsplit(b"\n", 1)[1]
    assert last == b"# build-sha256 " + hashlib.sha256(payload[:-len(last) - 1]).hexdigest().encode()
    assert reference.check_build_checksum(payload) is None
    flipped = payload.replace(b"# pad 000001", b"# pad 00000x", 1)
    assert reference.check_build_checksum(flipped) == "build checksum mismatch"
    assert reference.check_build_checksum(payload[:-81] + b"\n") == "no build checksum"
    assert reference.check_build_checksum(b"") == "no build checksum"
    assert b"OTA_VERIFY_SOURCE = '" in payload and b"import vrack" not in payload


@pytest.mark.parametrize("doc,field", [
    (None, "operation"), ([], "operation"), ("ota", "operation"), ({}, "operation"),
    ({"operation": "ota"}, "target_version"),
    ({"operation": "ota", "target_version": "1.6"}, "target_version"),
    ({"operation": "ota", "target_version": "1.6.0", "url": "http://"}, "url"),
    ({"operation": "ota", "target_version": "1.6.0", "url": "http://h:99999/x"}, "url"),
    ({"operation": "ota", "target_version": "1.6.0", "url": "http://h/\x00"}, "url"),
    ({"operation": "ota", "target_version": "1.6.0", "url": "http://h/" + "a" * 5000}, "url"),
    ({"operation": "ota", "target_version": "1.6.0", "url": "http://h/x", "sha256": 5}, "sha256"),
    ({"operation": "ota", "target_version": "1.6.0", "url": "http://h/x", "sha256": "ab" * 32, "size": True},
     "size"),
    ({"operation": "ota", "target_version": "1.6.0", "url": "http://h/x", "sha256": "ab" * 32, "size": 1.5},
     "size"),
    ({"operation": "ota", "target_version": "1.6.0", "url": "http://h/x", "sha256": "ab" * 32, "size": 0}, "size"),
])
def test_job_document_checks(doc, field):
    assert reference.check_job_document(doc) == (None, field)


def test_job_document_extra_keys_are_fine():
    doc = {"operation": "ota", "target_version": "1.6.0", "url": "https://h:8443/x?y=1", "sha256": "AB" * 32,
           "size": 1000, "note": {"any": ["thing"]}}
    assert reference.check_job_document(doc) == (
        {"target_version": "1.6.0", "url": doc["url"], "sha256": "ab" * 32, "size": 1000}, None)


def test_an_unexpected_error_in_a_job_is_reported_failed():
    reports, lines = [], []

    class Stub:
        state = "downloading"
        say = staticmethod(lines.append)

        def _job(self, job_id, document):
            raise KeyError("boom")

        def update(self, job_id, status, details, **kw):
            reports.append((job_id, status, details))
            return "accepted", {}

        _finish = reference.Agent._finish

    agent = Stub()
    reference.Agent.run_job(agent, "j1", {"operation": "ota"})
    assert reports == [("j1", "FAILED", {"reason": "internal error: KeyError: 'boom'"})]
    assert lines == ["OTA: failed job=j1: internal error: KeyError: 'boom'"] and agent.state == "idle"
    assert json.dumps(reports)


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=200),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=20), children, max_size=6),
    max_leaves=30)
_fields = st.fixed_dictionaries({}, optional={
    "operation": st.sampled_from(["ota", "OTA", ""]) | _json,
    "target_version": st.from_regex(r"[0-9]{1,6}\.[0-9]{1,6}\.[0-9]{1,6}(-[a-z.]{0,14})?", fullmatch=True) | _json,
    "url": st.tuples(st.sampled_from(["http://127.0.0.1:8/", "http://127.0.0.2:8/", "https://LocalHost/"]),
                     st.text(max_size=3000)).map("".join) | _json,
    "sha256": st.text(alphabet="0123456789abcdefABCDEF", min_size=60, max_size=66) | _json,
    "size": st.integers(min_value=-2**70, max_value=2**70) | _json,
})


@settings(max_examples=400, deadline=None)
@given(st.one_of(_fields, _json))
def test_any_job_document_is_accepted_or_refused_by_field_and_never_raises(doc):
    ok, field = reference.check_job_document(doc)
    assert (ok is None) != (field is None)
    if ok is not None:
        assert set(ok) == {"target_version", "url", "sha256", "size"}
        assert 0 < ok["size"] < 2**32 and len(ok["sha256"]) == 64
    else:
        assert field in ("operation", "target_version", "url", "sha256", "size")
    if ok is not None:  # a well-formed document's URL is on an allowed host, or refused by name
        host = urlsplit(ok["url"]).hostname
        refusal = reference.image_host_refusal(ok["url"], frozenset({"127.0.0.1"}))
        assert (refusal is None) == (host == "127.0.0.1"), (ok["url"], refusal)
        assert refusal is None or refusal.startswith("image host not allowed: ")
        assert reference.image_host_refusal(ok["url"], None) == "no image hosts in the fleet settings"


@pytest.mark.parametrize(("url", "refusal"), [
    ("http://127.0.0.1:8070/images/x?sig=1", None),
    ("https://Hil-Host.Lab.Example/x", None),
    ("http://127.0.0.2:8070/images/x", "image host not allowed: 127.0.0.2"),
    ("http://127.0.0.1.evil.example/x", "image host not allowed: 127.0.0.1.evil.example"),
    ("http://evil.example/127.0.0.1/x", "image host not allowed: evil.example"),
    ("http://127.0.0.1@evil.example/x", "image host not allowed: evil.example"),
    ("http://[::1]:8070/x", "image host not allowed: ::1"),
    ("http:///x", "malformed job document: url"),
])
def test_image_host_refusal(url, refusal):
    allowed = reference.image_hosts_of({"image_hosts": ["127.0.0.1", "hil-host.lab.example"]})
    assert reference.image_host_refusal(url, allowed) == refusal


@pytest.mark.parametrize("hosts", [None, [], "127.0.0.1", [5], [""], ["a"] * 17, ["h\x00"]])
def test_unusable_image_host_lists_allow_nothing(hosts):
    settings = {} if hosts is None else {"image_hosts": hosts}
    assert reference.image_hosts_of(settings) is None
