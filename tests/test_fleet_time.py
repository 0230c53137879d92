"""harness.fleet.timesvc: the time service through a real mosquitto with TLS client certs and the rig's ACL.

A paho client with the cart's own certificate plays the cart: it publishes a nonce on its request topic
and reads its answer topic; every answer is judged by the device's verifier (vrack.ota_verify). Each
test uses its own thing names, so the module shares one broker and one service.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import time
import uuid

import pytest

from harness import image as himage
from harness import pki
from harness.fleet.mqtt import MqttClient, MqttTimeout
from harness.fleet.timesvc import (
    MODES,
    TimeAnswer,
    TimeRequest,
    TimeService,
    TimeServiceError,
    TimeServiceTimeout,
    answer_topic,
    request_topic,
)
from vrack import ota_verify

HOST = "127.0.0.1"
NOW = himage.VECTOR_NOW  # the service's clock in this module: fixed, so verdicts do not depend on the day
TEN_YEARS = 10 * 365 * 86400
QUIET_S = 0.5  # how long "no answer" is waited for
_things = itertools.count(1)


@pytest.fixture(scope="module")
def broker(tmp_path_factory, broker_factory):
    with broker_factory(tmp_path_factory, "time", []) as b:
        yield b


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    lab = pki.LabPki(tmp_path_factory.mktemp("pki") / "pki")
    lab.init()
    return lab


@pytest.fixture(scope="module")
def harness_mqtt(broker):
    c = MqttClient(HOST, broker.port, *broker.client_files("harness"), client_id=f"time-{uuid.uuid4().hex[:8]}")
    c.connect(5)
    yield c
    c.close()


@pytest.fixture(scope="module")
def service(harness_mqtt, lab):
    s = TimeService.for_pki(harness_mqtt, lab, clock=lambda: NOW + 0.75)
    yield s
    s.close()


class Device:
    """A cart's side of the challenge, by hand: publish a nonce, read the answer topic."""

    def __init__(self, broker, thing: str | None = None):
        self.thing = thing or f"cart-time{next(_things):03d}"
        files = broker.ensure_client_cert(self.thing)  # CN = thing: the ACL gives it its own time topics only
        self.mqtt = MqttClient(HOST, broker.port, *files, client_id=f"dev-{self.thing}")
        self.mqtt.connect(5)
        self.mqtt.subscribe(answer_topic(self.thing))

    def ask(self, payload: bytes | None = None, timeout: float = 5.0) -> tuple[str, bytes]:
        """(nonce, answer payload) for a fresh nonce (or the raw request `payload`)."""
        nonce = os.urandom(16).hex()
        since = self.mqtt.log.cursor()
        self.mqtt.publish(request_topic(self.thing), payload if payload is not None else {"nonce": nonce})
        return nonce, self.mqtt.log.wait_for(answer_topic(self.thing), None, timeout, since=since).payload

    def no_answer(self, payload: bytes | dict | None = None) -> str:
        nonce = os.urandom(16).hex()
        since = self.mqtt.log.cursor()
        self.mqtt.publish(request_topic(self.thing), payload if payload is not None else {"nonce": nonce})
        with pytest.raises(MqttTimeout):
            self.mqtt.log.wait_for(answer_topic(self.thing), None, QUIET_S, since=since)
        return nonce

    def close(self):
        self.mqtt.close()


@pytest.fixture
def device(broker, service):
    c = Device(broker)
    service.serve(c.thing)
    yield c
    c.close()


def _verify(lab, device, answer: bytes, nonce: str, *, floor: int = NOW - 3600, roots=pki.TRUSTED_ROOTS, **kw):
    """The device's verdict on an answer (the cart's trust store: `roots`)."""
    return ota_verify.verify_time_answer(answer, nonce=nonce, thing=device.thing,
                                         trust_store_pems=lab.trust_store(roots), floor=floor, max_ahead_s=TEN_YEARS,
                                         **kw)


def _body(answer: bytes) -> dict:
    return json.loads(base64.b64decode(json.loads(answer)["signed"]))


def test_a_normal_answer_is_signed_for_this_cart_and_nonce(lab, service, device):
    nonce, answer = device.ask()
    assert _verify(lab, device, answer, nonce) == ota_verify.TimeVerdict(True, "ok", NOW)
    for roots in ([pki.ROOT_OLD], [pki.ROOT_NEW], [pki.ROOT_NEXT]):  # one signature per lab root: any one does
        assert _verify(lab, device, answer, nonce, roots=roots).ok
    assert [e["ca"] for e in json.loads(answer)["signatures"]] == list(pki.SERVICE_ROOTS)
    (req,) = service.requests(device.thing)
    assert isinstance(req, TimeRequest) and req.nonce == nonce and req.size == len(json.dumps({"nonce": nonce},
                                                                                               separators=(",", ":")))
    assert req.t <= time.monotonic()
    (sent,) = service.answers(device.thing)
    assert isinstance(sent, TimeAnswer) and (sent.mode, sent.nonce, sent.time, sent.payload) == (
        "normal", nonce, NOW, answer)
    assert service.mode(device.thing) == ("normal", 0)


@pytest.mark.parametrize("mode, reason", [
    ("forged", "bad signature"),
    ("rogue", "untrusted signer"),
    ("malformed", "malformed: answer not json"),
    ("oversized", "malformed: answer too large"),
    ("unsigned", "unsigned"),
])
def test_each_fault_mode_gives_the_cart_its_verdict(lab, service, device, mode, reason):
    service.set_mode(device.thing, mode)
    nonce, answer = device.ask()
    assert _verify(lab, device, answer, nonce).reason == reason
    assert service.answers(device.thing)[-1].mode == mode
    if mode == "oversized":
        assert len(answer) == himage.TIME_ANSWER_MAX + 1 and _verify(lab, device, answer.rstrip(), nonce).ok
    if mode == "rogue":
        assert [e["ca"] for e in json.loads(answer)["signatures"]] == [pki.ROGUE_ROOT]
        rogue_store = {pki.ROGUE_ROOT: lab.root_pem(pki.ROGUE_ROOT)}
        assert ota_verify.verify_time_answer(answer, nonce=nonce, thing=device.thing, trust_store_pems=rogue_store,
                                             floor=0, max_ahead_s=TEN_YEARS).ok  # it is rogue-root's real leaf
    if mode in ("forged", "unsigned"):
        assert _body(answer) == {"format": 1, "nonce": nonce, "thing": device.thing, "time": NOW}
    service.set_mode(device.thing, "normal")
    nonce, answer = device.ask()
    assert _verify(lab, device, answer, nonce).ok


def test_replay_resends_the_last_answer(lab, service, device):
    first_nonce, first = device.ask()
    assert _verify(lab, device, first, first_nonce).ok
    service.set_mode(device.thing, "replay")
    nonce, again = device.ask()
    assert again == first
    assert _verify(lab, device, again, nonce).reason == "nonce mismatch"
    nonce, third = device.ask()
    assert third == first
    last = service.answers(device.thing)[-1]
    assert (last.mode, last.nonce, last.time, last.payload) == ("replay", nonce, NOW, first)


def test_replay_before_any_answer_is_an_answer_to_another_nonce(lab, service, device):
    service.set_mode(device.thing, "replay")
    nonce, answer = device.ask()
    assert _verify(lab, device, answer, nonce).reason == "nonce mismatch"
    assert _body(answer)["nonce"] != nonce and _body(answer)["thing"] == device.thing


def test_silent_counts_and_never_answers(lab, service, device):
    service.set_mode(device.thing, "silent")
    nonces = [device.no_answer() for _ in range(2)]
    assert [r.nonce for r in service.requests(device.thing)] == nonces
    assert service.answers(device.thing) == []
    service.set_mode(device.thing, "normal")
    nonce, answer = device.ask()
    assert _verify(lab, device, answer, nonce).ok


def test_offset_shifts_the_signed_time_in_any_mode(lab, service, device):
    nonce, answer = device.ask()
    floor = _verify(lab, device, answer, nonce).time
    assert floor == NOW
    service.set_mode(device.thing, "normal", offset_s=-3600)
    nonce, answer = device.ask()
    assert _body(answer)["time"] == NOW - 3600
    assert _verify(lab, device, answer, nonce, floor=floor).reason == "earlier than last accepted"
    service.set_mode(device.thing, "normal", offset_s=TEN_YEARS + 1)
    nonce, answer = device.ask()
    assert _verify(lab, device, answer, nonce, floor=floor).reason == "from the future"
    service.set_mode(device.thing, "rogue", offset_s=86400.4)
    nonce, answer = device.ask()
    assert _body(answer)["time"] == NOW + 86400 and service.mode(device.thing) == ("rogue", 86400)
    service.set_mode(device.thing, "unsigned", offset_s=-60)
    nonce, answer = device.ask()
    assert _body(answer)["time"] == NOW - 60 and service.answers(device.thing)[-1].time == NOW - 60


@pytest.mark.parametrize("payload", [b"", b"not json", b"[]", b'{"nonce": 5}', b'{"nonce": "abc"}',
                                     json.dumps({"nonce": "A" * 32}).encode(), b'{"nonce": "' + b"0" * 2000 + b'"}',
                                     b"\xff\xfe", b"[" * 600])
def test_a_malformed_request_is_counted_and_not_answered(lab, service, device, payload):
    device.no_answer(payload)
    (req,) = service.requests(device.thing)
    assert req.nonce is None and req.size == len(payload)
    nonce, answer = device.ask()  # the service is still there
    assert _verify(lab, device, answer, nonce).ok


def test_only_served_things_are_answered(lab, broker, service):
    other = Device(broker)
    try:
        other.no_answer()
        with pytest.raises(TimeServiceError, match="does not serve"):
            service.requests(other.thing)
        with pytest.raises(TimeServiceError, match="does not serve"):
            service.set_mode(other.thing, "silent")
        service.serve(other.thing)
        service.serve(other.thing)  # idempotent
        assert other.thing in service.things
        nonce, answer = other.ask()
        assert _verify(lab, other, answer, nonce).ok
        assert len(service.requests(other.thing)) == 1  # counted from serve() on
    finally:
        other.close()


def test_modes_are_per_thing(lab, broker, service, device):
    other = Device(broker)
    try:
        service.serve(other.thing)
        service.set_mode(device.thing, "forged")
        nonce, answer = other.ask()
        assert _verify(lab, other, answer, nonce).ok
        nonce, answer = device.ask()
        assert _verify(lab, device, answer, nonce).reason == "bad signature"
    finally:
        other.close()


def test_wait_requests_is_event_driven_and_times_out_with_evidence(service, device):
    with pytest.raises(TimeServiceTimeout) as err:
        service.wait_requests(device.thing, 1, timeout=0.2)
    text = str(err.value)
    assert device.thing in text and "got 0" in text and request_topic(device.thing) in text
    service.set_mode(device.thing, "silent")
    nonce = os.urandom(16).hex()
    t0 = time.monotonic()
    device.mqtt.publish(request_topic(device.thing), {"nonce": nonce})
    (req,) = service.wait_requests(device.thing, 1, timeout=5)
    assert req.nonce == nonce and time.monotonic() - t0 < 1.0
    with pytest.raises(TimeServiceTimeout, match="waiting for 2 time request"):
        service.wait_requests(device.thing, 2, timeout=0.2)
    with pytest.raises(TimeServiceError, match="does not serve"):
        service.wait_requests("cart-nobody", 1, timeout=0.1)


def test_wait_quiet_counts_the_requests_of_a_whole_window(service, device):
    service.set_mode(device.thing, "silent")
    t0 = time.monotonic()
    assert service.wait_quiet(device.thing, quiet_s=0.3) == 0
    assert time.monotonic() - t0 >= 0.3
    for _ in range(2):
        device.mqtt.publish(request_topic(device.thing), {"nonce": os.urandom(16).hex()})
    t0 = time.monotonic()
    assert service.wait_quiet(device.thing, since=0, quiet_s=QUIET_S) == 2  # both, though they came at once
    assert time.monotonic() - t0 >= QUIET_S
    assert service.wait_quiet(device.thing, since=2, quiet_s=0.1) == 0
    with pytest.raises(TimeServiceError, match="does not serve"):
        service.wait_quiet("cart-nobody", quiet_s=0.1)


def test_harness_side_errors_name_the_problem(lab, harness_mqtt, service, device):
    with pytest.raises(TimeServiceError, match="unknown time service mode 'loud'"):
        service.set_mode(device.thing, "loud")
    for bad in (True, "60", float("nan"), 200 * 366 * 86400):
        with pytest.raises(TimeServiceError, match="offset_s"):
            service.set_mode(device.thing, "normal", offset_s=bad)
    with pytest.raises(TimeServiceError, match="invalid thing name"):
        service.serve("cart/01")
    assert service.mode(device.thing) == ("normal", 0)  # nothing changed
    plain = TimeService(harness_mqtt, [(pki.ROOT_OLD, lab.key(pki.time_signer_of(pki.ROOT_OLD)),
                                        lab.chain(pki.time_signer_of(pki.ROOT_OLD)))])
    try:
        plain.serve(f"{device.thing}-plain")  # not the device's: one service per thing
        with pytest.raises(TimeServiceError, match="rogue"):
            plain.set_mode(f"{device.thing}-plain", "rogue")
    finally:
        plain.close()
    with pytest.raises(ValueError, match="signers"):
        TimeService(harness_mqtt, [])
    with pytest.raises(ValueError, match="not a CA name"):
        TimeService(harness_mqtt, [("bad name", lab.key(pki.time_signer_of(pki.ROOT_OLD)),
                                    lab.chain(pki.time_signer_of(pki.ROOT_OLD)))])
    assert set(MODES) == {"normal", "silent", "replay", "forged", "rogue", "malformed", "oversized", "unsigned"}


def test_a_real_clock_and_the_challenge_round_trip_is_quick(lab, broker, harness_mqtt):
    """Built as the fleet builds it (the real clock): an answer within the cart's 2 s per try, and the
    time it carries is now."""
    svc = TimeService.for_pki(harness_mqtt, lab)
    c = Device(broker)
    try:
        svc.serve(c.thing)
        t0 = time.monotonic()
        nonce, answer = c.ask()
        elapsed = time.monotonic() - t0
        verdict = _verify(lab, c, answer, nonce, floor=0)
        assert verdict.ok and abs(verdict.time - time.time()) < 5
        assert elapsed < 0.5, f"answer took {elapsed:.3f}s"
    finally:
        c.close()
        svc.close()
