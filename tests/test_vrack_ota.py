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
import subprocess
import sys
import threading
import time
import types
import uuid
from dataclasses import replace
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from test_vrack_cart import REPO, VirtualCart, fast_config

from harness import pki
from harness.fleet.imagehost import ImageHost
from harness.fleet.jobs import TERMINAL, JobsService
from harness.fleet.mqtt import MqttClient
from harness.fleet.telemetry import Telemetry
from harness.fleet.timesvc import TimeService
from harness.image import sign_image
from vrack import factory
from vrack.bootloader import BcbService
from vrack.cartconfig import config_from_mapping
from vrack.firmware import reference
from vrack.flash import (
    SETTINGS_MAX,
    Bcb,
    BootControl,
    Flash,
    FlashFault,
    SettingsError,
    decode_bcb,
    decode_settings,
    encode_bcb,
    encode_settings,
    read_state,
)
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
        self.faults_path = workdir / "faults.json"
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

    def power_on(self) -> None:
        """As the rack starts a cart: with the fault file its control interface writes (`faults_path`)."""
        cmd = [sys.executable, "-m", "vrack.cart", "--slot", "1", "--cart-config", str(self.config_path),
               "--flash", str(self.flash_path), "--rtc", str(self.rtc_path), "--state", str(self.state_path),
               "--console-fd", str(self.master), "--flash-time-scale", str(self.time_scale),
               "--faults", str(self.faults_path)]
        with open(self.errlog, "ab") as err:
            self.proc = subprocess.Popen(cmd, pass_fds=(self.master,), stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=err, cwd=REPO)

    def set_faults(self, faults: dict | None) -> None:
        """The rack's PUT/DELETE /slots/<n>/flash-faults, as it lands on the cart: the fault file."""
        if faults is None:
            self.faults_path.unlink(missing_ok=True)
        else:
            tmp = self.faults_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(faults))
            os.replace(tmp, self.faults_path)

    def slot_hashes(self) -> dict[str, str]:
        found = (re.fullmatch(r"slot ([AB]) sha256=([0-9a-f]{64}) image=(?:[0-9a-f]{64}|-)", x)
                 for x in self.command("slot hash"))
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
    """One test's cart (with fleet settings), the jobs service and the time service that answer it."""

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
        self.time = TimeService.for_pki(mqtt, lab_pki)
        self.time.serve(self.thing)
        self._ids = itertools.count(1)

    def provision(self, version: str = "1.4.2", settings: bool = True,
                  image_hosts: tuple[str, ...] | None = (HOST,), faults: dict | None = None,
                  defer_s: float | None = None, image: bytes | None = None) -> None:
        """`image_hosts` None: fleet settings of the old format, without the list. `faults`: the
        factory image (slot A) is that fault build; `image`: this image instead. `defer_s`: the
        settings' first back-off of a deferred job (else the firmware's 30 s)."""
        ca, cert, key = self.broker.ensure_client_cert(self.thing)
        blob = factory.settings_blob(self.thing, HOST, self.broker.port, ca.read_text(), cert.read_text(),
                                     key.read_text(), image_hosts=image_hosts or (),
                                     defer_s=defer_s) if settings else None
        if settings and image_hosts is None:
            old = decode_settings(blob)
            del old["image_hosts"]
            blob = encode_settings(old)
        trust = factory.trust_blob([{"name": pki.ROOT_OLD, "pem": self.pki.root_pem(pki.ROOT_OLD)}])
        factory.provision_flash(self.cart.flash_path, self.cart.config,
                                image or factory.build_image(version, faults=faults), trust, blob)

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
        self.time.close()


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
    before, state = cart.slot_hashes(), cart.command("state")
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
    assert cart.command("state") == state, "a rejected job moved the device state (time floor, counter)"
    assert len(lb.time.requests(lb.thing)) > 0, "no job got as far as the time exchange: the state proves nothing"
    assert cart.command("slot status")[0].startswith("slot active=A booted=A pending=- tries=0 confirmed=yes boots=1 ")
    assert cart.command("ota status") == [f"ota state=idle broker=connected thing={lb.thing}"]
    assert cart.seen.count("CART-BL") == 1, "the cart rebooted"
    reports = [x for x in cart.lines() if x.startswith("EV: job-report ")]
    assert len(reports) == len(jobs) and all(re.fullmatch(r"EV: job-report status=REJECTED t=\d+", x) for x in reports)
    assert not [x for x in cart.lines() if x.startswith(("EV: erase", "EV: write", "EV: set-pending"))]


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
        r"EV: self-test t=\d+",
        r"OTA: rollback record slot=B fw=1\.6\.0",
        r"EV: metric-publish target=1\.6\.0 t=\d+",
        r"OTA: metric firmware_rollback_count target=1\.6\.0 published",
        r"EV: report-failed reason=rolled-back t=\d+",
        rf"OTA: job {job} reported FAILED: rolled back from 1\.6\.0",
    ])
    assert not [x for x in cart.lines() if x.startswith("EV: report-succeeded") or x.startswith("EV: mark-good")]
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
    in_order(lb.cart.lines(), [rf"EV: download off={half} t=\d+"] * 8 + [
        r"EV: report-failed reason=download-incomplete t=\d+", rf"OTA: failed job={job}: download incomplete: .*"])
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
    ({"operation": "TRUST", "url": "http://h/x", "sha256": "ab" * 32, "size": 10}, "operation"),
    ({"operation": "trust", "url": 7, "sha256": "ab" * 32, "size": 10}, "url"),
    ({"operation": "trust", "url": "http://h/x", "sha256": "ab" * 32, "size": -1}, "size"),
])
def test_job_document_checks(doc, field):
    assert reference.check_job_document(doc) == (None, field)


def test_job_document_extra_keys_are_fine():
    doc = {"operation": "ota", "target_version": "1.6.0", "url": "https://h:8443/x?y=1", "sha256": "AB" * 32,
           "size": 1000, "note": {"any": ["thing"]}}
    assert reference.check_job_document(doc) == (
        {"operation": "ota", "target_version": "1.6.0", "url": doc["url"], "sha256": "ab" * 32, "size": 1000}, None)


def test_a_ca_update_document_has_no_target_version():
    doc = {"operation": "trust", "url": "http://h/b", "sha256": "CD" * 32, "size": 900, "target_version": "x"}
    assert reference.check_job_document(doc) == (
        {"operation": "trust", "url": "http://h/b", "sha256": "cd" * 32, "size": 900}, None)


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

        def _cancel_deferral(self):
            pass

        def ev(self, name, reprompt=True, **detail):
            events.append((name, detail))

    events = []
    agent = Stub()
    reference.Agent.run_job(agent, "j1", {"operation": "ota"})
    assert reports == [("j1", "FAILED", {"reason": "internal error: KeyError: 'boom'"})]
    assert lines == ["OTA: failed job=j1: internal error: KeyError: 'boom'"] and agent.state == "idle"
    assert events == [("report-failed", {"reason": "internal-error"})]
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
        assert set(ok) == {"operation", "target_version", "url", "sha256", "size"}
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


# --- event lines (cut targets) -------------------------------------------------------------------

PROFILE = Path(__file__).resolve().parents[1] / "configs" / "profiles" / "reference.yaml"
FIRMWARE_EVENTS = ("time-request", "state-write", "download", "verify", "erase", "write", "readback", "set-pending",
                   "job-report", "reset-for-trial", "self-test", "report-succeeded", "mark-good", "metric-publish",
                   "report-failed")


def event_pattern() -> re.Pattern:
    return re.compile(yaml.safe_load(PROFILE.read_text())["patterns"]["event"])


def events_of(lines: list[str]) -> list[re.Match]:
    """Every EV line as a match of the profile's `event` pattern (each must match it)."""
    rx = event_pattern()
    found = []
    for line in lines:
        assert "EV:" not in line or line.startswith("EV: "), f"an event line shares a line: {line!r}"
        if line.startswith("EV: "):
            m = rx.fullmatch(line)
            assert m, f"event line does not match the profile's pattern: {line!r}"
            found.append(m)
    return found


def detail(m: re.Match) -> dict[str, str]:
    return dict(w.split("=", 1) for w in m.group("detail").split())


def test_event_lines_of_an_uninterrupted_update(make_lab):
    """The event sequence a sweep records: ordered names, one line each before its step, stamps
    strictly increasing (device monotonic_ns, across the reset into the trial), every line matching
    the profile's `event` pattern."""
    lb = make_lab()
    lb.provision()
    lb.boot()
    cart = lb.cart
    image = lb.image("1.6.0")
    job = lb.job(image, "1.6.0")
    assert lb.wait(job)["status"] == "SUCCEEDED"
    cart.expect(r"FW: slot B confirmed\r\n", 10)
    lines = cart.lines()
    events = events_of(lines)
    stamps = [int(m.group("t_ns")) for m in events]
    assert stamps == sorted(stamps) and len(set(stamps)) == len(stamps), "t not strictly increasing"
    assert stamps[0] > 0 and stamps[-1] <= time.monotonic_ns()
    mine = [m for m in events if m.group("name") in FIRMWARE_EVENTS]  # the bootloader's own are not the agent's
    runs = [name for name, _ in itertools.groupby(m.group("name") for m in mine)]
    assert runs == ["self-test", "time-request", "download", "verify", "state-write", "erase", "write", "readback",
                    "set-pending", "job-report", "reset-for-trial", "self-test", "report-succeeded", "mark-good"], runs
    assert [detail(m) for m in mine if m.group("name") in ("time-request", "state-write")] == [
        {"try": "1"}, {"copy": "0", "seq": "1"}]  # one exchange; its time, once verified, the first floor: copy 0
    by = {name: [detail(m) for m in mine if m.group("name") == name] for name in FIRMWARE_EVENTS}
    offsets = [int(d["off"]) for d in by["download"]]
    assert offsets[0] == 0 and offsets == sorted(set(offsets)) and offsets[-1] < len(image)
    assert 5 <= len(offsets) <= 11, offsets  # about every 10 %
    n = -(-len(image) // 4096)
    groups = [f"{i}/{n}" for i in range(0, n, 8)]
    assert by["erase"] == [{"slot": "B", "page": g} for g in groups]
    assert by["write"] == [{"slot": "B", "page": g} for g in groups]
    assert by["readback"] == [{"slot": "B"}] and by["set-pending"] == [{"slot": "B"}]
    assert by["job-report"] == [{"status": "IN_PROGRESS"}] and by["metric-publish"] == by["report-failed"] == []
    # each line comes before the work it announces
    in_order(lines, [
        r"OTA: download \d+/\d+", r"EV: verify t=\d+", r"OTA: verify ok fw=1\.6\.0 ca=\S+",
        r"EV: state-write copy=0 seq=1 t=\d+", rf"EV: erase slot=B page=0/{n} t=\d+",
        rf"EV: write slot=B page=0/{n} t=\d+",
        r"OTA: write \d+/\d+ pages slot=B", r"EV: readback slot=B t=\d+", r"OTA: write done slot=B sha256=\S+",
        r"EV: set-pending slot=B t=\d+", r"EV: job-report status=IN_PROGRESS t=\d+",
        r"OTA: trial armed slot=B fw=1\.6\.0, rebooting", r"EV: reset-for-trial t=\d+", r"CART-BL .*",
        r"BOOT: .* mode=trial", r"FW: sensor \S+ ok", r"EV: self-test t=\d+", r"FW: self-test ok",
        r"EV: report-succeeded t=\d+", rf"OTA: trial fw=1\.6\.0 reported SUCCEEDED job={job}",
        r"FW: marking slot B good", r"EV: mark-good t=\d+", r"FW: slot B confirmed",
    ])
    assert lines.index(next(x for x in lines if x.startswith("EV: download off=0 "))) < \
        lines.index(next(x for x in lines if x.startswith("OTA: download ")))
    print("\nevent lines of an update:\n" + "\n".join(m.group(0) for m in events))


def test_event_values_are_single_words():
    lines = []

    class Console:
        def write(self, text):
            lines.append(text)

        def write_line(self, text):
            lines.append(text)

    class Hal:
        console = Console()

    fw = reference.Firmware(Hal())
    fw.ev("report-failed", reason="a b\tc\x00d")
    fw.ev("erase", slot="B", page="0/13")
    rx = event_pattern()
    assert [rx.fullmatch(x).group("name", "detail") for x in lines] == [
        ("report-failed", " reason=a-b-c-d"), ("erase", " slot=B page=0/13")]
    assert reference.reason_word("write failed: program failed: page 9") == "write-failed"
    assert reference.reason_word("rolled back") == "rolled-back" and reference.reason_word(": x") == "unknown"


# --- flash faults and the agent, in this process: a real flash file, the rack's fault file ----------


class PowerCut(BaseException):
    """The process dies here (nothing in the firmware may catch it)."""


class Reset(BaseException):
    pass


class LineConsole:
    def __init__(self):
        self.lines: list[str] = []

    def write(self, text: str) -> None:
        self.lines += [x for x in text.replace("cart> ", "").split("\r\n") if x]

    def write_line(self, text: str) -> None:
        self.lines.append(text)


class CutFlash:
    """A flash whose power goes at the start of one operation (`cut`: ("erase"|"program", page)):
    that page is left as it was, nothing after it happens."""

    def __init__(self, flash: Flash, cut: tuple[str, int] | None = None):
        self._flash = flash
        self.cut = cut
        self.layout, self.page_size, self.slot_size = flash.layout, flash.page_size, flash.slot_size
        self.read, self.read_page, self.read_slot = flash.read, flash.read_page, flash.read_slot

    def erase_page(self, index: int) -> None:
        if self.cut == ("erase", index):
            raise PowerCut()
        self._flash.erase_page(index)

    def write_page(self, index: int, data: bytes) -> None:
        if self.cut == ("program", index):
            raise PowerCut()
        self._flash.write_page(index, data)


class InProcessHal:
    """What main(hal) gets from the bootloader (vrack.bootloader.Hal), minus the process: the flash is
    the cart's real flash file (with the rack's fault file), boot control the bootloader's own code."""

    FlashFault = FlashFault

    def __init__(self, flash, booted: str = "A", mode: str = "normal"):
        self.flash = flash
        self.console = LineConsole()
        self.booted_slot, self.mode = booted, mode
        self.config = {"hardware_revision": "rev-c"}
        self._confirmed = threading.Event()
        self.bcb = BcbService(BootControl(flash), self)
        self.resets = 0

    def reset(self) -> None:
        self.resets += 1
        raise Reset()

    def events(self) -> list[str]:
        return [re.sub(r" t=\d+$", "", x) for x in self.console.lines if x.startswith("EV: ")]


SETTINGS = {"thing": "cart-unit", "mqtt": {"host": HOST, "port": 8883, "ca": "C", "cert": "P", "key": "K"},
            "image_hosts": [HOST]}


class UnitCart:
    """A provisioned flash file (1.4.2 in slot A, a stale 1.3.0 in slot B), its fault file, and
    the agent of a firmware module (the reference source, or a fault build's payload) over it."""

    def __init__(self, tmp_path, module=reference, faults: dict | None = None, booted: str = "A"):
        self.config = config_from_mapping(fast_config())
        self.path = tmp_path / "flash.bin"
        self.faults_path = tmp_path / "faults.json"
        factory.provision_flash(self.path, self.config, factory.build_image("1.4.2"),
                                factory.trust_blob([{"name": "lab-root-2025", "pem": ""}]))
        with Flash(self.path, self.config.flash, time_scale=0) as f:
            f.write_pages(f.layout.slot_first_page("B"), factory.build_image("1.3.0"))
        if faults is not None:
            self.faults_path.write_text(json.dumps(faults))
        self.flash = Flash(self.path, self.config.flash, time_scale=0, faults=self.faults_path)
        self.layout = self.flash.layout
        self.hal = InProcessHal(self.flash, booted)
        self.module = module
        self.reports: list[tuple[str, dict]] = []

    def close(self) -> None:
        self.flash.close()

    def raw(self) -> bytes:
        return self.path.read_bytes()  # the stored bytes (no read fault applied)

    def slot_raw(self, slot: str) -> bytes:
        off = self.layout.slot_offset(slot)
        return self.raw()[off:off + self.layout.slot_size]

    def agent(self, image: bytes):
        fw = self.module.Firmware(self.hal)
        agent = self.module.Agent(fw, SETTINGS)
        agent._download = lambda job_id, doc: image
        agent.server_time = lambda: int(time.time())  # the time exchange: tests/test_vrack_trust.py
        agent._verify = lambda data, now: type("Verdict", (), {"ok": True, "reason": None, "ca": "lab-root-2025",
                                                              "manifest": {"firmware_version": "1.6.0"}})()
        agent._progress = lambda *a: None

        def update(job_id, status, details, **kw):
            self.reports.append((status, dict(details)))
            return "accepted", {}

        agent.update = update
        return agent

    def run_job(self, image: bytes) -> None:
        doc = {"operation": "ota", "target_version": "1.6.0", "url": f"http://{HOST}/x",
               "sha256": hashlib.sha256(image).hexdigest(), "size": len(image)}
        self.agent(image).run_job("job-1", doc)


@pytest.fixture
def unit_cart(tmp_path):
    carts = []

    def make(**kw) -> UnitCart:
        workdir = tmp_path / f"c{len(carts)}"
        workdir.mkdir()
        c = UnitCart(workdir, **kw)
        carts.append(c)
        return c

    yield make
    for c in carts:
        c.close()


def pages(data: bytes, page: int) -> list[bytes]:
    return [data[i:i + page] for i in range(0, len(data), page)]


def test_update_in_process_erases_writes_reads_back_then_arms_the_trial(unit_cart):
    """The positive control of the flash-fault tests below: same setup, no fault."""
    cart = unit_cart()
    image = factory.build_image("1.6.0")
    before = cart.raw()
    with pytest.raises(Reset):
        cart.run_job(image)
    assert cart.reports == [("IN_PROGRESS", {"step": "self-test", "target_version": "1.6.0"})]
    bcb = BootControl(cart.flash).read()
    assert (bcb.active, bcb.pending, bcb.tries) == ("A", "B", 1)
    assert cart.slot_raw("A") == before[cart.layout.slot_offset("A"):][:cart.layout.slot_size]
    n = -(-len(image) // 4096)
    assert cart.slot_raw("B")[:n * 4096] == image + b"\xff" * (n * 4096 - len(image))
    assert cart.slot_raw("B")[n * 4096:] == before[cart.layout.slot_offset("B") + n * 4096:][
        :cart.layout.slot_size - n * 4096]  # only the pages the image needs are erased
    ev = cart.hal.events()
    assert ev[:3] == ["EV: verify", "EV: state-write copy=0 seq=1", f"EV: erase slot=B page=0/{n}"] and ev[-4:] == [
        "EV: readback slot=B", "EV: set-pending slot=B", "EV: job-report status=IN_PROGRESS", "EV: reset-for-trial"]
    assert [x for x in ev if x.startswith("EV: write ")][-1] == f"EV: write slot=B page={(n - 1) // 8 * 8}/{n}"
    assert cart.hal.resets == 1


FAULT_PAGE = 10  # within slot B's image pages


@pytest.mark.parametrize("kind", ["erase_fail", "program_fail", "bitflip"])
def test_a_flash_fault_fails_the_job_and_changes_nothing_but_the_inactive_slot(unit_cart, kind):
    cart = unit_cart()
    p = cart.layout.slot_first_page("B") + FAULT_PAGE
    fault = {"bitflip": [{"page": p, "offset": 100, "mask": 4}]} if kind == "bitflip" else {kind: [p]}
    cart.faults_path.write_text(json.dumps(fault))
    reason = {"erase_fail": f"erase failed: page {p}", "program_fail": f"write failed: program failed: page {p}",
              "bitflip": f"write failed: readback mismatch at page {p}"}[kind]
    image = factory.build_image("1.6.0")
    before = cart.raw()
    cart.run_job(image)  # returns: no reset
    assert cart.reports == [("FAILED", {"reason": reason})]
    assert cart.hal.resets == 0
    assert cart.hal.console.lines[-1] == f"OTA: failed job=job-1: {reason}"
    after = cart.raw()
    b0, b1 = cart.layout.slot_offset("B"), cart.layout.slot_offset("B") + cart.layout.slot_size
    s0, s1 = cart.layout.state_offset, cart.layout.state_offset + cart.layout.state_size
    assert after[:b0] == before[:b0], "written outside the inactive slot (boot control, slot A)"
    assert after[b1:s0] + after[s1:] == before[b1:s0] + before[s1:], \
        "written outside the inactive slot (trust store, settings)"
    assert read_state(after[s0:s1], 4096).floor > 0, "the image was verified: its server time, stored before the erase"
    a0 = cart.layout.slot_offset("A")
    assert hashlib.sha256(cart.slot_raw("A")).digest() == hashlib.sha256(before[a0:b0]).digest(), "running slot"
    assert BootControl(cart.flash).read().pending is None
    old, new, now = pages(before[b0:b1], 4096), pages(image, 4096), pages(cart.slot_raw("B"), 4096)
    n, erased = len(new), b"\xff" * 4096
    if kind == "erase_fail":  # pages before p erased, p partly erased, the rest as they were
        assert now[:FAULT_PAGE] == [erased] * FAULT_PAGE and now[FAULT_PAGE + 1:] == old[FAULT_PAGE + 1:]
        assert now[FAULT_PAGE] not in (old[FAULT_PAGE], erased)
    elif kind == "program_fail":  # all n erased, pages before p programmed, p partly
        assert now[:FAULT_PAGE] == new[:FAULT_PAGE] and now[FAULT_PAGE + 1:n] == [erased] * (n - FAULT_PAGE - 1)
        assert now[FAULT_PAGE] != new[FAULT_PAGE] and now[FAULT_PAGE][:1] == new[FAULT_PAGE][:1]
    else:  # the whole image stored; the part reads one page back wrong
        assert b"".join(now[:n]).rstrip(b"\xff") == image.rstrip(b"\xff")
    ev = cart.hal.events()
    assert not [x for x in ev if x.startswith(("EV: set-pending", "EV: bcb-write", "EV: reset-for-trial"))]
    assert ev[-1] == f"EV: report-failed reason={reason.split(':')[0].replace(' ', '-')}"
    assert ev[:3] == ["EV: verify", "EV: state-write copy=0 seq=1", f"EV: erase slot=B page=0/{n}"]
    assert any(x.startswith("EV: readback") for x in ev) == (kind == "bitflip")
    assert any(x.startswith("EV: write ") for x in ev) == (kind != "erase_fail")


# --- fault builds, in this process: the built payload as a module ---------------------------------


def built(faults: dict):
    """A fault build's payload (what the bootloader would compile and run) as a module."""
    payload = factory.firmware_payload("1.6.0", faults=faults)
    module = types.ModuleType("firmware_" + "_".join(sorted(faults)))
    exec(compile(payload, "<fault build>", "exec"), module.__dict__)
    assert {k: True for k in faults} == module.FAULTS
    return module


def test_write_running_on_erase_fail_build_overwrites_the_running_slot(unit_cart):
    """The defect the invariant "the running slot is byte for byte unchanged" must catch: the job
    ends exactly as the reference's does (same reason, no reset), only the running slot tells."""
    image = factory.build_image("1.6.0")
    results = {}
    for name, module in (("reference", reference), ("fault", built({"write_running_on_erase_fail": True}))):
        cart = unit_cart(module=module)
        p = cart.layout.slot_first_page("B") + FAULT_PAGE
        cart.faults_path.write_text(json.dumps({"erase_fail": [p]}))
        before_a = cart.slot_raw("A")
        cart.run_job(image)
        results[name] = (cart.reports, cart.hal.resets, cart.slot_raw("A") == before_a, cart.slot_raw("A"),
                         cart.hal.events())
        assert cart.reports == [("FAILED", {"reason": f"erase failed: page {p}"})]
        assert BootControl(cart.flash).read().pending is None
    assert results["reference"][:3] == ([("FAILED", {"reason": results["reference"][0][0][1]["reason"]})], 0, True)
    reports, resets, a_unchanged, slot_a, ev = results["fault"]
    assert (reports, resets, a_unchanged) == (results["reference"][0], 0, False)
    assert slot_a.startswith(image), "the running slot now holds the new image"
    assert "EV: erase slot=A page=0/49" in ev and "EV: write slot=A page=0/49" in ev
    assert not [x for x in results["reference"][4] if "slot=A" in x]


@pytest.mark.parametrize("bcb", [
    Bcb(), Bcb(seq=7, active="B", pending="A", tries=1, confirmed=False, boot_count=42, rollback_slot="A",
               rollback_version="1.6.0-rc.1", rollback_count=3),
    Bcb(seq=2**32 - 1, active="A", pending=None, tries=255, boot_count=2**32 - 1, rollback_version="x" * 32),
])
def test_the_firmware_encodes_boot_control_as_the_bootloader_reads_it(bcb):
    raw = reference.encode_boot_control(bcb.seq, bcb.active, bcb.pending, bcb.tries, bcb.confirmed, bcb.boot_count,
                                        bcb.rollback_slot, bcb.rollback_version, bcb.rollback_count)
    assert raw == encode_bcb(bcb) and len(raw) == 64 and decode_bcb(raw) == bcb


def test_bcb_single_copy_build_writes_one_copy_in_place(unit_cart):
    """Uninterrupted, the fault build's update works: one valid copy (copy 0), copy 1 erased, where the
    reference leaves two valid copies."""
    image = factory.build_image("1.6.0")
    copies = {}
    for name, module in (("reference", reference), ("fault", built({"bcb_single_copy": True}))):
        cart = unit_cart(module=module)
        previous = BootControl(cart.flash).read()
        with pytest.raises(Reset):
            cart.run_job(image)
        copies[name] = BootControl(cart.flash).copies()
        assert BootControl(cart.flash).read() == replace(previous, seq=previous.seq + 1, pending="B", tries=1)
        if name == "fault":
            assert "EV: bcb-write copy=0 seq=2 why=set-pending" in cart.hal.events()
            assert cart.hal.events().index("EV: set-pending slot=B") < \
                cart.hal.events().index("EV: bcb-write copy=0 seq=2 why=set-pending")
            assert cart.raw()[4096:8192] == b"\xff" * 4096
    assert all(c is not None for c in copies["reference"])
    assert copies["fault"][0] is not None and copies["fault"][1] is None


@pytest.mark.parametrize("build", ["reference", "bcb_single_copy"])
def test_a_cut_while_boot_control_is_written(unit_cart, build):
    """A power cut at the start of programming boot control's new copy (set-pending): the reference
    still has the previous record; the single-copy build has none, so the bootloader would take
    defaults (active A, nothing pending, confirmed) whatever ran before."""
    module = reference if build == "reference" else built({"bcb_single_copy": True})
    cart = unit_cart(module=module)
    ctl = BootControl(cart.flash)
    previous = ctl.write(Bcb(active="B", confirmed=True, boot_count=9, rollback_count=2))  # running B, confirmed
    cart.hal.booted_slot = "B"
    target = 1 - next(c for c, b in enumerate(ctl.copies()) if b == previous) if build == "reference" else 0
    cart.hal.flash = CutFlash(cart.flash, ("program", target))
    cart.hal.bcb = BcbService(BootControl(cart.hal.flash), cart.hal)
    with pytest.raises(PowerCut):
        cart.run_job(factory.build_image("1.6.0"))
    assert cart.hal.events()[-1].startswith("EV: bcb-write" if build != "reference" else "EV: set-pending")
    assert cart.reports == [] and cart.hal.resets == 0
    after = BootControl(cart.flash).read_valid()
    if build == "reference":
        assert after == previous
    else:
        assert after is None, "no valid boot control: the bootloader boots its defaults (slot A)"
        assert BootControl(cart.flash).read() == Bcb()


def test_bcb_single_copy_build_marks_good_itself_and_stops_the_watchdog(unit_cart):
    module = built({"bcb_single_copy": True})
    cart = unit_cart(module=module)
    ctl = BootControl(cart.flash)
    ctl.write(replace(ctl.read(), pending="B", tries=0, boot_count=5))  # the bootloader's trial-boot write
    cart.hal.booted_slot, cart.hal.mode = "B", "trial"
    seq = ctl.read().seq
    cart.hal.flash = CutFlash(cart.flash)  # counts nothing, cuts nothing: the HAL's own mark_good must not write
    writes = []
    cart.hal.flash.write_page = lambda i, d, w=cart.hal.flash.write_page: (writes.append(i), w(i, d))[1]
    cart.hal.bcb = BcbService(BootControl(cart.hal.flash), cart.hal)
    fw = module.Firmware(cart.hal)
    module.confirm_trial(cart.hal, fw.say, fw.ev)
    assert writes == [0], "one program of copy 0, nothing else"
    assert ctl.copies()[1] is None and ctl.read() == replace(ctl.read(), seq=seq + 1, active="B", pending=None,
                                                            tries=0, confirmed=True, boot_count=5)
    assert cart.hal._confirmed.is_set()
    assert cart.hal.events() == ["EV: mark-good", f"EV: bcb-write copy=0 seq={seq + 1} why=mark-good"]
    assert cart.hal.console.lines[-1] == "FW: slot B confirmed"


# --- flash faults on a cart process (the rack's fault file) -------------------------------------------


def cart_layout():
    from vrack.flash import Layout

    return Layout(4096, 524288)  # fast_config's geometry


@pytest.mark.parametrize("kind", ["erase_fail", "program_fail", "bitflip"])
def test_flash_faults_on_a_cart_fail_the_update_and_nothing_else_changes(make_lab, kind):
    lb = make_lab()
    lb.provision()
    lb.boot()
    cart = lb.cart
    layout = cart_layout()
    p = layout.slot_first_page("B") + FAULT_PAGE
    cart.set_faults({"bitflip": [{"page": p, "offset": 100, "mask": 4}]} if kind == "bitflip" else {kind: [p]})
    reason = {"erase_fail": f"erase failed: page {p}", "program_fail": f"write failed: program failed: page {p}",
              "bitflip": f"write failed: readback mismatch at page {p}"}[kind]
    before, bcb_before = cart.slot_hashes(), cart.bcb()
    image = lb.image("1.6.0")
    job = lb.job(image, "1.6.0")
    ex = lb.wait(job)
    assert (ex["status"], ex["statusDetails"]) == ("FAILED", {"reason": reason}), ex
    cart.expect(rf"OTA: failed job={job}: {re.escape(reason)}\r\n")
    after = cart.slot_hashes()
    assert after["A"] == before["A"], "the running slot changed"
    slot_b = image + b"\xff" * (layout.slot_size - len(image))
    if kind == "erase_fail":  # slot B was erased: a partly erased page of it is still erased
        assert after["B"] == before["B"]
    elif kind == "bitflip":  # all written; the part reads one byte of page p back flipped
        i = FAULT_PAGE * 4096 + 100
        flipped = slot_b[:i] + bytes([slot_b[i] ^ 4]) + slot_b[i + 1:]
        assert after["B"] == hashlib.sha256(flipped).hexdigest()
    else:
        with cart.flash() as f:
            raw = f.read_slot("B")
        assert raw[:FAULT_PAGE * 4096] == slot_b[:FAULT_PAGE * 4096] and raw[(FAULT_PAGE + 1) * 4096:] == \
            b"\xff" * (layout.slot_size - (FAULT_PAGE + 1) * 4096)
        assert after["B"] != before["B"]
    assert cart.bcb() == bcb_before, "boot control was written"
    assert cart.command("slot status")[0].startswith("slot active=A booted=A pending=- tries=0 confirmed=yes")
    assert cart.seen.count("CART-BL") == 1, "the cart rebooted"
    assert not [x for x in cart.lines() if x.startswith(("EV: set-pending", "EV: reset-for-trial"))]
    # the part is healthy again: the same update goes through
    cart.set_faults(None)
    again = lb.job(image, "1.6.0")
    assert lb.wait(again)["status"] == "SUCCEEDED"
    cart.expect(r"FW: slot B confirmed\r\n", 10)


def test_write_running_on_erase_fail_build_on_a_cart_is_caught_by_the_running_slot(make_lab):
    """The fault build reports exactly what the reference does; the running slot's hash is what
    catches it (and slot A now holds an image that was never trial-booted)."""
    lb = make_lab()
    lb.provision(faults={"write_running_on_erase_fail": True})
    lb.boot()
    cart = lb.cart
    p = cart_layout().slot_first_page("B") + FAULT_PAGE
    cart.set_faults({"erase_fail": [p]})
    before, bcb_before = cart.slot_hashes(), cart.bcb()
    job = lb.job(lb.image("1.6.0"), "1.6.0")
    ex = lb.wait(job)
    assert (ex["status"], ex["statusDetails"]) == ("FAILED", {"reason": f"erase failed: page {p}"}), ex
    after = cart.slot_hashes()
    assert after["B"] == before["B"] and after["A"] != before["A"], "the running slot must have been overwritten"
    assert cart.bcb() == bcb_before and cart.seen.count("CART-BL") == 1
    status = cart.command("slot status")
    assert status[1:] == ["slot A fw=1.6.0 valid=yes", "slot B fw=- valid=no"]
    in_order(cart.lines(), [r"EV: erase slot=B page=8/\d+ t=\d+", r"EV: erase slot=A page=0/\d+ t=\d+",
                            r"EV: write slot=A page=0/\d+ t=\d+", r"EV: report-failed reason=erase-failed t=\d+"])


def test_bcb_single_copy_build_cut_while_marking_good_leaves_no_boot_control(make_lab, telemetry):
    """What the sweep catches in this fault build, on a cart process: the trial boot marks itself good
    by rewriting its single copy in place; power goes while that copy is programmed (after both
    copy pages were erased). At the next power-on the bootloader finds no boot control, boots its
    defaults (slot A, normal) and records no rollback: the trial is gone without a trace."""
    lb = make_lab()
    lb.provision()
    cart = lb.cart
    cart.put_image("B", factory.build_image("1.6.0", faults={"bcb_single_copy": True}))
    cart.set_pending("B")
    cart.time_scale = 40  # 100 ms per page erase or program: the cut lands inside the program of copy 0
    cart.power_on()
    cart.boot_to_shell("B", "1.6.0", "trial")
    m = cart.wait_seen(r"^EV: bcb-write copy=0 seq=(\d+) why=mark-good t=\d+\r$", 10)
    time.sleep(0.15)  # erase of copy 0 (100 ms) done, its program (100 ms) under way
    cart.power_off()
    assert "FW: slot B confirmed" not in cart.seen
    assert cart.bcb() == Bcb(), "boot control should be gone (neither copy valid)"
    with cart.flash() as f:
        assert f.read_page(1) == b"\xff" * 4096, "copy 1 erased by the single-copy writer"
    cart.time_scale = 0.02
    cart.out = ""
    cart.power_on()
    cart.expect(r"BL: bcb blank, using defaults\r\n")
    cart.boot_to_shell("A", "1.4.2", "normal")
    cart.expect(r"OTA: rollback record none\r\n", 10)
    status = cart.command("slot status")
    assert status[0].startswith("slot active=A booted=A pending=- tries=0 confirmed=yes boots=1 rollbacks=0"), status
    assert int(m.group(1)) >= 3 and telemetry.rollback_count(thing=lb.thing) == 0
