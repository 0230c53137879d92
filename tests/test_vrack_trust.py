"""Time and trust in the reference firmware (docs/interfaces.md, "Time exchange" and "CA updates";
docs/flash-layout.md, trust store and device state): the signed time exchange and the deferral of a
job without a valid time, verification at the server's time against the device state's security
counter and the trust store's retirements, the security counter raised when an image is confirmed,
CA updates written into the trust store's other copy (a cut leaves the old store or the new one), and
the fault builds of the issue.

In this process: the firmware's agent over a real flash file, its MQTT client replaced by a time
service that answers with answers made by the lab PKI (`Answerer`), TIME_TIMEOUT_S shortened to
0.2 s. On cart processes: the broker, the jobs service and the lab time service (harness.fleet),
the firmware's own 2 s per try."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import random
import re
import time
import types

import pytest
import test_vrack_ota
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from test_vrack_cart import fast_config
from test_vrack_ota import HOST, SETTINGS, InProcessHal, PowerCut, Reset, built, in_order

from harness import pki
from harness.image import build_trust_bundle, make_time_answer, sign_image, time_answer, time_body
from vrack import factory, ota_verify
from vrack.cartconfig import config_from_mapping
from vrack.firmware import reference
from vrack.flash import (
    DeviceState,
    Flash,
    Layout,
    StateByte,
    TrustStore,
    encode_state,
    encode_trust,
    read_open_write,
    read_state,
    read_trust,
    tear_open_write,
    torn_page,
)

# the fixtures of tests/test_vrack_ota.py (its lab PKI, broker, services, carts), used here by name
lab, broker, harness_mqtt, telemetry, clock, host, make_lab, unit_cart = (
    test_vrack_ota.lab, test_vrack_ota.broker, test_vrack_ota.harness_mqtt, test_vrack_ota.telemetry,
    test_vrack_ota.clock, test_vrack_ota.host, test_vrack_ota.make_lab, test_vrack_ota.unit_cart)

THING = SETTINGS["thing"]
OVERLAP_S = 90 * 86400
PAGE = 4096


def time_signers(lab_pki, root: str = pki.ROOT_OLD) -> list:
    leaf = pki.time_signer_of(root)
    return [(root, lab_pki.key(leaf), lab_pki.chain(leaf))]


def answer(lab_pki, nonce: str, t: int, thing: str = THING, root: str = pki.ROOT_OLD) -> bytes:
    return make_time_answer(nonce=nonce, thing=thing, time=t, signers=time_signers(lab_pki, root))


class Answerer:
    """The agent's MQTT client in this process, as far as the time exchange uses it: each request is
    recorded and answered at once with the payloads `reply(nonce)` gives, in order."""

    def __init__(self, agent, reply):
        self.agent = agent
        self.reply = reply
        self.nonces: list[str] = []

    def publish(self, topic, payload, qos=0):
        assert (topic, qos) == (self.agent.time_request_topic, 1)
        body = json.loads(payload)
        assert list(body) == ["nonce"] and re.fullmatch(r"[0-9a-f]{32}", body["nonce"]), payload
        self.nonces.append(body["nonce"])
        for data in self.reply(body["nonce"]):
            self.agent._on_message(None, None, types.SimpleNamespace(topic=self.agent.time_answer_topic, payload=data))


class TrustCart:
    """A provisioned flash file (tests/test_vrack_ota.py's UnitCart) whose trust store holds real roots,
    and the agent of a firmware module over it, answered by an `Answerer`."""

    def __init__(self, unit, lab_pki, module, cas, settings):
        self.unit, self.pki, self.module = unit, lab_pki, module
        self.hal: InProcessHal = unit.hal
        self.layout = unit.layout
        self.write_trust(cas)
        self.reports: list[tuple[str, dict]] = []
        self.t = int(time.time())  # the time service's clock
        self.agent = module.Agent(module.Firmware(self.hal), settings)
        self.fw = self.agent.fw
        self.fw.agent = self.agent
        self.answerer = Answerer(self.agent, lambda nonce: [answer(lab_pki, nonce, self.t)])
        self.agent.client = self.answerer
        self.agent.connected.set()
        self.agent._progress = lambda *a: None
        self.agent.update = self._update

    def time_sync(self, tries: str = "3") -> str:
        """The shell's `time sync N`: its reply line."""
        self.fw.time_sync(tries)
        return self.console()[-1]

    def _update(self, job_id, status, details, **kw):
        self.reports.append((status, dict(details)))
        return "accepted", {}

    def write_trust(self, cas, copy: int = 0, seq: int = 0) -> None:
        """Trust-store copy `copy` with `cas` (names of lab roots, or entries), the other copy erased."""
        entries = [{"name": c, "pem": self.pki.root_pem(c)} if isinstance(c, str) else c for c in cas]
        blob = encode_trust(entries, seq)
        flash = self.unit.flash
        for c in (0, 1):
            first = self.layout.trust_copy_first_page(c)
            flash.write_page(first, blob[:PAGE] if c == copy else b"")
            flash.write_page(first + 1, blob[PAGE:] if c == copy else b"")

    def raw(self) -> bytes:
        return self.unit.raw()

    def trust(self) -> TrustStore:
        lay = self.layout
        return read_trust(self.raw()[lay.trust_offset:lay.trust_offset + lay.trust_size], PAGE)

    def state(self) -> DeviceState:
        lay = self.layout
        return read_state(self.raw()[lay.state_offset:lay.state_offset + lay.state_size], PAGE)

    def set_state(self, counter: int, floor: int) -> None:
        self.unit.flash.write_page(self.layout.state_first_page, encode_state(1, counter, floor))

    def console(self) -> list[str]:
        return self.hal.console.lines

    def events(self) -> list[str]:
        return self.hal.events()

    def trust_doc(self, bundle: bytes, size: int | None = None) -> dict:
        self.agent._download = lambda job_id, doc: bundle
        return {"operation": "trust", "url": f"http://{HOST}/b", "sha256": hashlib.sha256(bundle).hexdigest(),
                "size": len(bundle) if size is None else size}

    def bundle(self, add=(pki.ROOT_NEW,), *, required_ca: str = pki.ROOT_OLD, signer: str | None = None,
               issued: int | None = None, expires: int | None = None, overlap_s: int = OVERLAP_S,
               pems: dict | None = None) -> bytes:
        signer = signer or pki.signer_of(required_ca)
        issued = self.t - 60 if issued is None else issued
        return build_trust_bundle(pems or {name: self.pki.root_pem(name) for name in add}, required_ca=required_ca,
                                  issued=issued, expires=issued + 3600 if expires is None else expires,
                                  overlap_s=overlap_s, signer_key=self.pki.key(signer), chain=self.pki.chain(signer))


@pytest.fixture
def tcart(unit_cart, lab, monkeypatch):
    monkeypatch.setattr(reference, "load_verifier", lambda: ota_verify)  # the dev source has none linked

    def make(module=reference, cas=(pki.ROOT_OLD,), **settings) -> TrustCart:
        monkeypatch.setattr(module, "TIME_TIMEOUT_S", 0.2)
        return TrustCart(unit_cart(module=module), lab, module, cas, {**SETTINGS, **settings})

    return make


def signed(lab_pki, version: str = "1.6.0", *, counter: int = 0, root: str = pki.ROOT_OLD,
           issued: int | None = None, faults: dict | None = None) -> bytes:
    now = int(time.time()) if issued is None else issued
    signer = pki.signer_of(root)
    return sign_image(factory.build_image(version, faults=faults), hardware=["rev-c"], required_ca=root,
                      issued=now - 3600, expires=now + 86400, security_counter=counter,
                      signer_key=lab_pki.key(signer), chain=lab_pki.chain(signer))


# --- the time exchange, in this process ------------------------------------------------------------


def test_a_signed_answer_is_accepted_and_stored_by_whoever_decides_on_it(tcart):
    """The exchange returns the time and stores nothing: `time sync` stores it at once, a job only once
    its verification accepts (below)."""
    cart = tcart()
    assert cart.agent.server_time() == cart.t
    assert cart.events() == ["EV: time-request try=1"]
    assert cart.console()[-1] == f"OTA: time ok t={cart.t}"
    assert cart.state() == DeviceState() and len(cart.answerer.nonces) == 1
    assert cart.time_sync() == f"time ok t={cart.t}"
    assert [re.sub(r"^(EV: .*) t=\d+$", r"\1", x) for x in cart.console()[-3:-1]] == [
        f"OTA: time ok t={cart.t}", "EV: state-write copy=0 seq=1"]
    assert cart.state() == DeviceState(0, cart.t, 1, 0)
    assert cart.time_sync() == f"time ok t={cart.t}", "the same time again is fine (not earlier)"
    assert cart.state().seq == 1, "a time that is not above the floor is not written"
    cart.t += 5
    assert cart.time_sync("1") == f"time ok t={cart.t}"
    assert cart.state() == DeviceState(0, cart.t, 2, 1) and cart.events()[-1] == "EV: state-write copy=1 seq=2"
    assert len(set(cart.answerer.nonces)) == 4, "a fresh nonce for every request"
    for bad in ("0", "4", "x"):
        assert cart.time_sync(bad) == f"error: bad count '{bad}' (want 1..3)"
    assert len(cart.answerer.nonces) == 4


def test_no_answer_is_three_requests_each_with_a_fresh_nonce_and_nothing_written(tcart):
    cart = tcart()
    cart.answerer.reply = lambda nonce: []
    before = cart.raw()
    t0 = time.monotonic()
    with pytest.raises(reference.TimeFailure) as failure:
        cart.agent.server_time()
    assert time.monotonic() - t0 >= 3 * 0.2
    assert str(failure.value) == "time service unreachable" and failure.value.rejected is None
    assert len(cart.answerer.nonces) == reference.TIME_TRIES == 3 and len(set(cart.answerer.nonces)) == 3
    assert cart.events() == ["EV: time-request try=1", "EV: time-request try=2", "EV: time-request try=3"]
    assert cart.raw() == before


def bad_answers(cart: TrustCart, kind: str):
    """reply(nonce) of a time service that answers `kind` (after a good exchange at cart.t)."""
    lab_pki, t = cart.pki, cart.t
    if kind == "replay":
        last = answer(lab_pki, cart.answerer.nonces[-1], t)
        return lambda nonce: [last]
    if kind == "other thing":
        return lambda nonce: [answer(lab_pki, nonce, t, thing="cart-other")]
    if kind == "forged":
        root, _, chain = time_signers(lab_pki)[0]
        return lambda nonce: [make_time_answer(nonce=nonce, thing=THING, time=t,
                                               signers=[(root, ec.generate_private_key(ec.SECP256R1()), chain)])]
    if kind == "rogue":
        return lambda nonce: [answer(lab_pki, nonce, t, root=pki.ROGUE_ROOT)]
    if kind == "unsigned":
        return lambda nonce: [time_answer(time_body(nonce=nonce, thing=THING, time=t), [])]
    if kind == "malformed":
        return lambda nonce: [answer(lab_pki, nonce, t)[:300]]
    if kind == "oversized":
        return lambda nonce: [answer(lab_pki, nonce, t) + b" " * 8192]
    if kind == "earlier":
        return lambda nonce: [answer(lab_pki, nonce, t - 3600)]
    if kind == "future":
        return lambda nonce: [answer(lab_pki, nonce, t + 20 * 365 * 86400)]
    if kind == "retired root":  # signed by a root the store keeps only until before the answer's time
        cart.write_trust([{"name": pki.ROOT_OLD, "pem": lab_pki.root_pem(pki.ROOT_OLD), "until": t}], copy=1, seq=1)
        return lambda nonce: [answer(lab_pki, nonce, t)]
    raise AssertionError(kind)


BAD = [("replay", "nonce mismatch"), ("other thing", "wrong thing"), ("forged", "bad signature"),
       ("rogue", "untrusted signer"), ("unsigned", "unsigned"), ("malformed", "malformed: answer not json"),
       ("oversized", "malformed: answer too large"), ("earlier", "earlier than last accepted"),
       ("future", "from the future"), ("retired root", "untrusted signer")]


@pytest.mark.parametrize(("kind", "reason"), BAD, ids=[k for k, _ in BAD])
def test_a_bad_answer_is_rejected_with_its_reason_and_changes_nothing(tcart, kind, reason):
    cart = tcart()
    assert cart.time_sync() == f"time ok t={cart.t}"  # a good exchange first: a floor, an answer to replay
    cart.answerer.reply = bad_answers(cart, kind)
    state = cart.state()
    assert state.floor == cart.t
    with pytest.raises(reference.TimeFailure) as failure:
        cart.agent.server_time()
    assert str(failure.value) == f"time answer rejected: {reason}" and failure.value.rejected == reason
    said = [x for x in cart.console() if x.startswith("OTA: time ")]
    assert said[1:] == [f"OTA: time rejected: {reason}"] * 3, "each try's answer, said"
    assert len(cart.answerer.nonces) == 1 + 3
    assert cart.time_sync("1") == f"time rejected: {reason}"
    assert cart.state() == state


def test_an_attackers_answer_does_not_stop_the_real_one(tcart):
    cart = tcart()
    cart.agent.server_time()
    replayed = answer(cart.pki, cart.answerer.nonces[-1], cart.t)
    cart.t += 60
    cart.answerer.reply = lambda nonce: [replayed, answer(cart.pki, nonce, cart.t)]
    assert cart.agent.server_time() == cart.t
    said = [x for x in cart.console() if x.startswith("OTA: ")]
    assert said[-2:] == ["OTA: time rejected: nonce mismatch", f"OTA: time ok t={cart.t}"]
    assert len(cart.answerer.nonces) == 2, "the real answer came in the same try"


def test_the_ignore_nonce_build_accepts_a_replayed_answer(tcart):
    cart = tcart(module=built({"ignore_nonce": True}))
    assert cart.agent.server_time() == cart.t
    cart.answerer.reply = bad_answers(cart, "replay")
    assert cart.agent.server_time() == cart.t, "the defect: an answer to another nonce is taken"
    assert cart.console()[-1] == f"OTA: time ok t={cart.t}"


# --- deferral ------------------------------------------------------------------------------------------


def ota_doc(image: bytes = b"x") -> dict:
    return {"operation": "ota", "target_version": "1.6.0", "url": f"http://{HOST}/x",
            "sha256": hashlib.sha256(image).hexdigest(), "size": len(image)}


def test_the_first_back_off_is_thirty_seconds_unless_the_settings_say_otherwise():
    assert reference.DEFER_S == 30.0 and reference.DEFER_MAX_S == 900.0
    assert reference.TIME_TRIES == 3 and reference.TIME_TIMEOUT_S == 2.0
    assert reference.defer_s_of({}) == 30.0 and reference.defer_s_of({"defer_s": 0.5}) == 0.5
    for bad in (0, -1, 901, True, "1", None, float("nan")):
        assert reference.defer_s_of({"defer_s": bad}) == 30.0, bad


def test_a_job_without_a_valid_time_is_deferred_writes_nothing_and_backs_off(tcart, monkeypatch):
    cart = tcart(defer_s=0.25)
    monkeypatch.setattr(reference, "DEFER_MAX_S", 0.6)
    cart.answerer.reply = lambda nonce: []
    cart.agent._download = lambda job_id, doc: pytest.fail("downloaded without a valid time")
    before = cart.raw()
    waits = []
    for _ in range(4):  # back-off 0.25, 0.5, then the (shortened) cap 0.6, 0.6
        cart.agent.run_job("job-1", ota_doc())
        t0 = time.monotonic()
        assert cart.agent.events.get(timeout=5) == ("retry", "job-1")
        waits.append(time.monotonic() - t0)
    assert cart.reports == [("IN_PROGRESS", {"step": "deferred", "reason": "time service unreachable"})] * 4
    assert cart.console()[-1] == "OTA: deferred job=job-1: time service unreachable"
    assert waits[0] >= 0.2 and waits[1] >= 0.45, waits  # (measured from after the deferral's report)
    assert 0.55 <= waits[2] < 0.95 and 0.55 <= waits[3] < 0.95, waits
    assert cart.raw() == before and cart.hal.resets == 0 and cart.agent.state == "idle"
    assert len(cart.answerer.nonces) == 4 * 3
    assert not [x for x in cart.events() if not x.startswith("EV: time-request ")]


def test_a_rejected_answer_defers_the_job_with_the_reason(tcart):
    cart = tcart()
    cart.agent.server_time()
    cart.answerer.reply = bad_answers(cart, "replay")
    cart.agent.run_job("job-1", ota_doc())
    why = "time answer rejected: nonce mismatch"
    assert cart.reports == [("IN_PROGRESS", {"step": "deferred", "reason": why})]
    assert cart.console()[-1] == f"OTA: deferred job=job-1: {why}"
    cart.agent._cancel_deferral()


def test_a_deferred_job_is_run_again_only_while_its_execution_is_in_progress(tcart):
    cart = tcart(defer_s=60)
    agent = cart.agent
    image = factory.build_image("1.6.0")
    doc = ota_doc(image)
    silent = cart.answerer.reply
    cart.answerer.reply = lambda nonce: []
    agent.run_job("job-1", doc)
    # while its back-off runs, start-next handing the same execution back does not run it
    agent.request = lambda suffix, body=None, **kw: ("accepted", {"execution": {"jobId": "job-1", "jobDocument": doc}})
    agent._take_jobs()
    assert len(cart.reports) == 1 and len(cart.answerer.nonces) == 3
    # the timer: {id}/get says CANCELED -> not run, the deferral is over
    agent.request_retry = lambda suffix, body=None, **kw: (
        "accepted", {"execution": {"jobId": "job-1", "status": "CANCELED", "jobDocument": doc}})
    agent.request = lambda suffix, body=None, **kw: ("accepted", {})  # start-next: nothing pending
    agent._retry_deferred("job-1")
    assert cart.console()[-1] == "OTA: job job-1 ended by the service: CANCELED" and agent._deferred is None
    assert len(cart.answerer.nonces) == 3
    # deferred again; this time it is still IN_PROGRESS and the time service answers: the update runs
    agent.run_job("job-1", doc)
    cart.answerer.reply = silent
    agent.request_retry = lambda suffix, body=None, **kw: (
        "accepted", {"execution": {"jobId": "job-1", "status": "IN_PROGRESS", "jobDocument": doc}})
    agent._download = lambda job_id, d: image
    agent._verify = lambda data, now: types.SimpleNamespace(ok=True, reason="ok", ca=pki.ROOT_OLD,
                                                            manifest={"firmware_version": "1.6.0"})
    with pytest.raises(Reset):
        agent._retry_deferred("job-1")
    assert cart.reports[-1] == ("IN_PROGRESS", {"step": "self-test", "target_version": "1.6.0"})
    agent._cancel_deferral()  # (a real reset ends the process, its timer with it)


# --- verification at server time, the security counter ------------------------------------------------


def test_updates_are_verified_at_the_server_time_with_the_stored_security_counter(tcart, lab):
    cart = tcart()
    now = int(time.time())
    image = signed(lab, counter=2)
    assert cart.agent._verify(image, now).ok
    assert cart.agent._verify(image, now - 3 * 86400).reason == "not yet valid"  # the time given, not the RTC
    assert cart.agent._verify(image, now + 3 * 86400).reason == "expired"
    cart.set_state(counter=3, floor=0)
    assert cart.agent._verify(image, now).reason == "security counter"
    cart.set_state(counter=2, floor=0)
    assert cart.agent._verify(image, now).ok, "the same counter is allowed"


def test_the_ignore_security_counter_build_verifies_against_zero(tcart, lab):
    cart = tcart(module=built({"ignore_security_counter": True}))
    cart.set_state(counter=9, floor=0)
    assert cart.agent._verify(signed(lab, "1.7.0", counter=2), int(time.time())).ok  # (the build is 1.6.0)


def test_a_ca_retired_by_the_stores_until_refuses_its_images(tcart, lab):
    cart = tcart()
    now = int(time.time())
    cart.write_trust([{"name": pki.ROOT_OLD, "pem": lab.root_pem(pki.ROOT_OLD), "until": now}], copy=1, seq=1)
    assert cart.agent._verify(signed(lab), now).reason == "ca retired"
    assert cart.agent._verify(signed(lab), now - 1).ok


@pytest.mark.parametrize("build", ["reference", "local_clock"])
def test_a_job_decides_on_the_server_time_and_the_local_clock_build_on_its_rtc(tcart, build):
    cart = tcart(module=reference if build == "reference" else built({"local_clock": True}))
    rtc = dt.datetime.fromtimestamp(cart.t - 12 * 3600, dt.UTC)
    cart.hal.clock = types.SimpleNamespace(now=lambda: rtc)
    got = cart.agent._job_time()
    assert got == (cart.t, cart.t if build == "reference" else cart.t - 12 * 3600), "(server, verified at)"
    assert len(cart.answerer.nonces) == 1, "the exchange runs in both"
    assert cart.state() == DeviceState(), "nothing stored before the job's verification accepts"


def image_job(cart: TrustCart, image: bytes, target: str = "1.6.0") -> dict:
    """The document of an update to `image` (downloaded as it is), verified by the real verifier."""
    cart.agent._download = lambda job_id, doc: image
    return {**ota_doc(image), "target_version": target}


@pytest.mark.parametrize(("make", "target", "reason"), [
    (lambda lab_pki, t: signed(lab_pki, issued=t - 2 * 86400), "1.6.0", "expired"),
    (lambda lab_pki, t: signed(lab_pki, issued=t + 2 * 3600), "1.6.0", "not yet valid"),
    (lambda lab_pki, t: signed(lab_pki, counter=1), "1.6.0", "security counter"),
    (lambda lab_pki, t: signed(lab_pki, "1.7.0", counter=2), "1.6.0", "target version mismatch"),
], ids=["expired", "not-yet-valid", "security-counter", "target-version-mismatch"])
def test_a_rejected_image_leaves_the_device_state_as_it_was(tcart, lab, make, target, reason):
    """The job's exchange accepted a time above the floor, but the image is refused: neither the floor
    nor the counter is written, nor anything else."""
    cart = tcart()
    cart.set_state(counter=2, floor=cart.t - 3600)
    state, before = cart.state(), cart.raw()
    cart.agent.run_job("job-1", image_job(cart, make(lab, cart.t), target))
    assert cart.reports == [("REJECTED", {"reason": reason})]
    assert len(cart.answerer.nonces) == 1, "the exchange ran (a time to store)"
    assert cart.state() == state, "a rejected image moved the device state"
    assert cart.raw() == before and cart.hal.resets == 0
    assert cart.events() == ["EV: time-request try=1", "EV: verify", "EV: job-report status=REJECTED"]


def test_an_accepted_image_stores_the_floor_before_the_slot_is_erased(tcart, lab):
    cart = tcart()
    cart.set_state(counter=2, floor=cart.t - 3600)
    with pytest.raises(Reset):
        cart.agent.run_job("job-1", image_job(cart, signed(lab, counter=2)))
    assert cart.state() == DeviceState(2, cart.t, 2, 1), "the counter kept, the floor raised to the server time"
    ev = cart.events()
    assert ev[:3] == ["EV: time-request try=1", "EV: verify", "EV: state-write copy=1 seq=2"], ev
    assert ev[3].startswith("EV: erase slot=B page=0/"), ev
    said = [re.sub(r"^(EV: .*) t=\d+$", r"\1", x) for x in cart.console()
            if x.startswith(("OTA: verify ok", "EV: state-write"))]
    assert said == [f"OTA: verify ok fw=1.6.0 ca={pki.ROOT_OLD}", "EV: state-write copy=1 seq=2"]


@pytest.mark.parametrize("operation", ["ota", "trust"])
def test_a_floor_the_part_cannot_store_fails_the_job_before_anything_is_written(tcart, lab, operation):
    cart = tcart()
    page = cart.layout.state_first_page  # no valid state yet: the floor goes into copy 0
    cart.unit.faults_path.write_text(json.dumps({"erase_fail": [page]}))
    before = cart.raw()
    doc = image_job(cart, signed(lab)) if operation == "ota" else cart.trust_doc(cart.bundle())
    cart.agent.run_job("job-1", doc)
    reason = f"state write failed: erase failed: page {page}"
    assert cart.reports == [("FAILED", {"reason": reason})]
    assert cart.console()[-1] == f"OTA: failed job=job-1: {reason}"
    assert cart.events()[-3:] == ["EV: verify", "EV: state-write copy=0 seq=1",
                                  "EV: report-failed reason=state-write-failed"]
    lay = cart.layout
    state = slice(lay.state_offset, lay.state_offset + lay.state_size)
    after = cart.raw()
    assert after[:state.start] == before[:state.start] and after[state.stop:] == before[state.stop:], \
        "written outside the device state"
    assert cart.state() == DeviceState() and cart.hal.resets == 0


def test_the_security_counter_rises_when_an_image_is_confirmed_and_never_falls(tcart, lab):
    cart = tcart()
    cart.unit.flash.write_pages(cart.layout.slot_first_page("B"), signed(lab, counter=4))
    cart.hal.booted_slot, cart.hal.mode = "B", "trial"
    fw = reference.Firmware(cart.hal)
    reference.confirm_trial(cart.hal, fw.say, fw.ev)
    assert cart.state() == DeviceState(4, 0, 1, 0)
    assert [re.sub(r" t=\d+$", "", x) for x in cart.console()] == [
        "FW: marking slot B good", "EV: mark-good", "EV: state-write copy=0 seq=1", "FW: security counter 4",
        "FW: slot B confirmed"]
    assert cart.events() == ["EV: mark-good", "EV: state-write copy=0 seq=1"]
    reference.raise_security_counter(cart.hal, fw.say, fw.ev)  # a later normal boot: nothing to raise
    cart.unit.flash.write_pages(cart.layout.slot_first_page("B"), signed(lab, counter=1))
    reference.raise_security_counter(cart.hal, fw.say, fw.ev)  # nor for a lower one
    assert cart.state() == DeviceState(4, 0, 1, 0) and cart.console()[-1] == "FW: slot B confirmed"


def test_a_failed_counter_write_is_said_and_left_to_the_next_boot(tcart, lab):
    cart = tcart()
    cart.unit.flash.write_pages(cart.layout.slot_first_page("A"), signed(lab, version="1.4.2", counter=2))
    page = cart.layout.state_first_page
    cart.unit.faults_path.write_text(json.dumps({"erase_fail": [page]}))
    fw = reference.Firmware(cart.hal)
    reference.raise_security_counter(cart.hal, fw.say, fw.ev)
    assert cart.console()[-1] == f"FW: security counter write failed: erase failed: page {page}"
    assert cart.state() == DeviceState(), "nothing stored"
    cart.unit.faults_path.unlink()
    reference.raise_security_counter(cart.hal, fw.say, fw.ev)  # the next normal boot's repair
    assert cart.console()[-1] == "FW: security counter 2" and cart.state() == DeviceState(2, 0, 1, 0)


# --- CA updates ------------------------------------------------------------------------------------------


def test_a_ca_update_adds_the_root_and_keeps_the_old_one_through_the_overlap(tcart, lab):
    cart = tcart()
    doc = cart.trust_doc(cart.bundle())
    cart.agent.run_job("job-1", doc)
    names = f"{pki.ROOT_OLD},{pki.ROOT_NEW}"
    assert cart.reports == [("SUCCEEDED", {"step": "done", "cas": names})]
    assert cart.hal.resets == 0
    old, new = ({"name": n, "pem": lab.root_pem(n)} for n in (pki.ROOT_OLD, pki.ROOT_NEW))
    assert cart.trust() == TrustStore([{**old, "until": cart.t + OVERLAP_S}, new], 1, 1)
    assert [x for x in cart.console() if x.startswith("OTA: ")][-1] == f"OTA: trust updated cas={names}"
    assert "OTA: job job-1 started trust" in cart.console()
    assert cart.events() == ["EV: time-request try=1", "EV: verify", "EV: state-write copy=0 seq=1",
                             "EV: trust-write copy=1 seq=1", "EV: job-report status=SUCCEEDED"]
    assert cart.state() == DeviceState(0, cart.t, 1, 0), "the accepted bundle's server time is the floor"
    # a second update, a day later, re-adding the new root with a longer overlap: into copy 0, seq 2; the
    # old root keeps its earlier end
    cart.t += 86400
    cart.agent.run_job("job-2", cart.trust_doc(cart.bundle(overlap_s=2 * OVERLAP_S)))
    assert cart.trust() == TrustStore([{**old, "until": cart.t - 86400 + OVERLAP_S}, new], 2, 0)
    assert cart.state() == DeviceState(0, cart.t, 2, 1)
    # an update with no overlap: the old root is gone at once (the same server time: the floor stays)
    cart.agent.run_job("job-3", cart.trust_doc(cart.bundle(overlap_s=0)))
    assert cart.trust() == TrustStore([new], 3, 1) and cart.reports[-1] == ("SUCCEEDED", {"step": "done",
                                                                                           "cas": pki.ROOT_NEW})
    assert cart.state() == DeviceState(0, cart.t, 2, 1)


def test_the_drop_old_ca_build_replaces_the_store_with_the_added_root(tcart, lab):
    cart = tcart(module=built({"drop_old_ca": True}))
    cart.agent.run_job("job-1", cart.trust_doc(cart.bundle()))
    assert cart.trust() == TrustStore([{"name": pki.ROOT_NEW, "pem": lab.root_pem(pki.ROOT_NEW)}], 1, 1)
    assert cart.reports == [("SUCCEEDED", {"step": "done", "cas": pki.ROOT_NEW})]


def test_the_local_clock_build_verifies_a_bundle_at_its_rtc(tcart):
    results = {}
    for build in ("reference", "local_clock"):
        cart = tcart(module=reference if build == "reference" else built({"local_clock": True}))
        rtc = dt.datetime.fromtimestamp(cart.t - 12 * 3600, dt.UTC)
        cart.hal.clock = types.SimpleNamespace(now=lambda rtc=rtc: rtc)
        cart.agent.run_job("job-1", cart.trust_doc(cart.bundle()))
        results[build] = cart.reports, cart.state()
    assert results["reference"][0][0][0] == "SUCCEEDED" and results["reference"][1].floor > 0
    assert results["local_clock"] == ([("REJECTED", {"reason": "not yet valid"})], DeviceState()), \
        "rejected at its RTC: the server time it had is not stored"


@pytest.mark.parametrize(("defect", "reason"), [
    ({"required_ca": pki.ROOT_NEW}, "missing ca"),
    ({"signer": pki.signer_of(pki.ROGUE_ROOT)}, "untrusted signer"),
    ({"issued": "old"}, "expired"),
    ({"issued": "later"}, "not yet valid"),
    ({"leaf": True}, "not a ca"),
    ({"size": 16385}, "malformed: bundle too large"),
    ({"truncated": True}, "malformed: bundle not json"),
], ids=["missing-ca", "rogue-signer", "expired", "not-yet-valid", "not-a-ca", "too-large", "truncated"])
def test_a_bad_ca_update_is_rejected_and_writes_nothing(tcart, lab, defect, reason):
    """Neither the trust store nor the device state: the time the job's exchange accepted (above the
    floor) is not stored for a bundle that is refused."""
    cart = tcart()
    cart.set_state(counter=2, floor=cart.t - 3600)
    state = cart.state()
    kw: dict = {}
    if "required_ca" in defect:
        kw = {"required_ca": defect["required_ca"], "add": (pki.ROGUE_ROOT,)}
    if "signer" in defect:
        kw["signer"] = defect["signer"]
    if defect.get("issued") == "old":
        kw.update(issued=cart.t - 7200, expires=cart.t - 3600)
    if defect.get("issued") == "later":
        kw.update(issued=cart.t + 3600)
    if "leaf" in defect:  # a code-signing leaf where a root should be
        kw["pems"] = {"a-leaf": pem_of(lab, pki.signer_of(pki.ROOT_NEW))}
    bundle = cart.bundle(**kw)
    if "truncated" in defect:
        bundle = bundle[:100]
    before = cart.raw()
    cart.agent.run_job("job-1", cart.trust_doc(bundle, size=defect.get("size")))
    assert cart.reports == [("REJECTED", {"reason": reason})]
    assert cart.console()[-1] == f"OTA: rejected job=job-1: {reason}"
    lay = cart.layout
    trust = slice(lay.trust_offset, lay.trust_offset + lay.trust_size)
    assert cart.raw()[trust] == before[trust], "the trust store was written"
    assert cart.state() == state, "the device state was written"
    assert not [x for x in cart.events() if x.startswith(("EV: trust-write", "EV: state-write"))]
    assert len(cart.answerer.nonces) == (0 if "size" in defect else 1), "the exchange ran (a time to store)"


def pem_of(lab_pki, name: str) -> str:
    return lab_pki.cert(name).public_bytes(serialization.Encoding.PEM).decode()


def test_a_fifth_root_is_refused_as_trust_store_full(tcart, lab):
    cart = tcart(cas=(pki.ROOT_OLD, {"name": "f1", "pem": ""}, {"name": "f2", "pem": ""}, {"name": "f3", "pem": ""}))
    before = cart.trust()
    cart.agent.run_job("job-1", cart.trust_doc(cart.bundle()))
    assert cart.reports == [("REJECTED", {"reason": "trust store full"})]
    assert cart.trust() == before and cart.state() == DeviceState()


def test_a_trust_write_the_part_fails_keeps_the_old_store(tcart, lab):
    cart = tcart()
    before = cart.trust()
    page = cart.layout.trust_copy_first_page(1)
    cart.unit.faults_path.write_text(json.dumps({"program_fail": [page]}))
    cart.agent.run_job("job-1", cart.trust_doc(cart.bundle()))
    reason = f"trust write failed: program failed: page {page}"
    assert cart.reports == [("FAILED", {"reason": reason})]
    assert cart.console()[-1] == f"OTA: failed job=job-1: {reason}"
    assert cart.events()[-1] == "EV: report-failed reason=trust-write-failed"
    assert cart.trust() == before
    assert cart.state().floor == cart.t, "the bundle was verified: its server time was stored before the write"
    cart.unit.faults_path.write_text(json.dumps({"bitflip": [{"page": page, "offset": 20, "mask": 1}]}))
    cart.agent.run_job("job-2", cart.trust_doc(cart.bundle()))
    assert cart.reports[-1] == ("FAILED", {"reason": f"trust write failed: readback mismatch at page {page}"})


def test_a_cut_in_the_trust_store_write_leaves_the_old_store_or_the_new_one(tmp_path, lab, monkeypatch):
    """Power cut while the new store's first page is programmed (the rack's tear, at every byte) or while
    the copy's unused page is erased: the store read afterwards is the old one or the new one, the new
    one exactly when its bytes made it."""
    cfg = config_from_mapping(fast_config())
    path, state_path = tmp_path / "flash.bin", tmp_path / "state"
    old_cas = [{"name": pki.ROOT_OLD, "pem": lab.root_pem(pki.ROOT_OLD)}]
    factory.provision_flash(path, cfg, factory.build_image("1.4.2"), factory.trust_blob(old_cas))
    lay = cfg.flash
    new_cas = [{**old_cas[0], "until": 1_900_000_000}, {"name": pki.ROOT_NEW, "pem": lab.root_pem(pki.ROOT_NEW)}]
    for op in (0, 1):  # the program of the copy's page 0, the erase of its page 1
        path_copy = path.read_bytes()
        with Flash(path, lay, time_scale=1, state=StateByte(state_path)) as flash:
            hal = InProcessHal(flash)
            store, _ = reference.read_trust_store(hal)
            calls = []

            def sleep(_s, calls=calls, op=op):
                calls.append(state_path.read_bytes())
                if len(calls) > op:
                    raise PowerCut

            with monkeypatch.context() as m:
                m.setattr(time, "sleep", sleep)
                with pytest.raises(PowerCut):
                    reference.write_trust_store(hal, lambda *a, **k: None, new_cas, store)
            layout = flash.layout
        cut_state = calls[-1]
        opened = read_open_write(cut_state)
        first = layout.trust_copy_first_page(1)
        assert opened.page == first + op and opened.kind == (b"P" if op == 0 else b"E")
        blob = reference.encode_trust_copy(new_cas, 1)
        region0 = path.read_bytes()[layout.trust_offset:layout.trust_offset + layout.trust_size]
        old = TrustStore(old_cas, 0, 0)
        new = TrustStore(new_cas, 1, 1)
        rng = random.Random(op)
        at = (first - layout.trust_first_page) * PAGE + op * PAGE
        for cut in range(PAGE):
            torn = torn_page(opened.data, cut, rng)
            region = bytearray(region0)
            if op == 1:  # page 0 of the copy programmed in full before the cut
                region[at - PAGE:at] = blob.ljust(PAGE, b"\xff")
            region[at:at + PAGE] = torn
            got = read_trust(bytes(region), PAGE)
            expected = new if op == 1 or cut >= len(blob) else old
            assert got == expected, f"op {op}, cut at byte {cut}"
        # and once through the rack's own tear of the file
        path_torn = path.read_bytes()
        assert path_torn == path_copy or op == 1
        state_path.write_bytes(cut_state)
        assert tear_open_write(state_path, path, PAGE, random.Random(7)) is not None
        got = read_trust(path.read_bytes()[layout.trust_offset:layout.trust_offset + layout.trust_size], PAGE)
        assert got in (old, new)
        path.write_bytes(path_copy)


def firmware_state(region: bytes) -> DeviceState:
    """What the firmware's own reader makes of the bytes of a device-state region."""
    flash = types.SimpleNamespace(layout=types.SimpleNamespace(state_offset=0), page_size=PAGE,
                                  read=lambda off, n: region[off:off + n])
    got = reference.read_device_state(types.SimpleNamespace(flash=flash))
    return DeviceState(got["counter"], got["floor"], got["seq"], got["copy"])


@pytest.mark.parametrize("next_copy", [1, 0])
def test_a_cut_in_the_device_state_write_leaves_the_old_state_or_the_new_one(tmp_path, monkeypatch, next_copy):
    """Power cut while the firmware's writer programs the other copy of the device state (a floor raised, as
    a job or `time sync` stores it), the page torn at every byte: the firmware's reader and the rack's give
    the previous state or the new one, the new one exactly when its record made it; never the defaults, nor
    the older record the write replaces (next_copy 0: copy 0 held seq 1, copy 1 seq 2)."""
    cfg = config_from_mapping(fast_config())
    path, state_path = tmp_path / "flash.bin", tmp_path / "state"
    factory.provision_flash(path, cfg, factory.build_image("1.4.2"), factory.trust_blob([]))
    def ev(*_args, **_detail):
        pass

    with Flash(path, cfg.flash, time_scale=1, state=StateByte(state_path)) as flash:
        hal = InProcessHal(flash)
        reference.update_device_state(hal, ev, lambda cur: (3, 1_700_000_000))  # copy 0, seq 1
        if next_copy == 0:
            reference.update_device_state(hal, ev, lambda cur: (3, 1_700_000_100))  # copy 1, seq 2
        current = reference.read_device_state(hal)
        calls = []

        def sleep(_s):
            calls.append(state_path.read_bytes())
            raise PowerCut

        with monkeypatch.context() as m:
            m.setattr(time, "sleep", sleep)
            with pytest.raises(PowerCut):
                reference.raise_time_floor(hal, ev, 1_800_000_000)
        layout = flash.layout
    old = DeviceState(current["counter"], current["floor"], current["seq"], current["copy"])
    new = DeviceState(3, 1_800_000_000, old.seq + 1, next_copy)
    assert old.copy == 1 - next_copy and len(calls) == 1
    opened = read_open_write(calls[0])
    record = reference.encode_state(new.seq, new.counter, new.floor)
    assert (opened.kind, opened.page) == (b"P", layout.state_first_page + next_copy)
    assert opened.data == record + b"\xff" * (PAGE - len(record))
    region0 = path.read_bytes()[layout.state_offset:layout.state_offset + layout.state_size]
    assert read_state(region0, PAGE) == firmware_state(region0) == old, "the cut came before the page was written"
    rng = random.Random(next_copy)
    at = next_copy * PAGE
    for cut in range(PAGE):
        region = bytearray(region0)
        region[at:at + PAGE] = torn_page(opened.data, cut, rng)
        expected = new if cut >= len(record) else old
        assert read_state(bytes(region), PAGE) == expected, f"the rack's reader, cut at byte {cut}"
        assert firmware_state(bytes(region)) == expected, f"the firmware's reader, cut at byte {cut}"
    # and once through the rack's own tear of the file
    state_path.write_bytes(calls[0])
    assert tear_open_write(state_path, path, PAGE, random.Random(7)) is not None
    region = path.read_bytes()[layout.state_offset:layout.state_offset + layout.state_size]
    assert read_state(region, PAGE) == firmware_state(region) and read_state(region, PAGE) in (old, new)


# --- on cart processes -----------------------------------------------------------------------------------


def test_time_sync_and_state_on_the_shell(make_lab):
    lb = make_lab()
    lb.provision()
    lb.boot()
    cart = lb.cart
    assert cart.command("state") == ["state counter=0 floor=0 seq=0"]
    reply = cart.command("time sync", timeout=15)
    m = re.fullmatch(r"time ok t=(\d+)", reply[-1])
    assert m and abs(int(m.group(1)) - time.time()) < 5, reply
    t = int(m.group(1))
    assert [re.sub(r"^(EV: .*) t=\d+$", r"\1", x) for x in reply[:-1]] == [
        "EV: time-request try=1", f"OTA: time ok t={t}", "EV: state-write copy=0 seq=1"]
    assert cart.command("state") == [f"state counter=0 floor={t} seq=1"]
    assert len(lb.time.requests(lb.thing)) == 1


def test_time_sync_rejected_and_unreachable_change_nothing(make_lab):
    lb = make_lab()
    lb.provision()
    lb.boot()
    cart = lb.cart
    assert cart.command("time sync", timeout=15)[-1].startswith("time ok t=")
    state = cart.command("state")
    lb.time.set_mode(lb.thing, "replay")
    t0 = time.monotonic()
    reply = cart.command("time sync", timeout=15)
    assert reply[-1] == "time rejected: nonce mismatch", reply
    assert reply.count("OTA: time rejected: nonce mismatch") == 3
    assert 3 * reference.TIME_TIMEOUT_S <= time.monotonic() - t0 < 3 * reference.TIME_TIMEOUT_S + 3
    lb.time.set_mode(lb.thing, "normal", offset_s=-3600)
    assert cart.command("time sync", timeout=15)[-1] == "time rejected: earlier than last accepted"
    lb.time.set_mode(lb.thing, "silent")
    assert cart.command("time sync", timeout=15)[-1] == "time unreachable"
    assert cart.command("state") == state
    assert len(lb.time.requests(lb.thing)) == 1 + 3 * 3


def test_an_update_without_a_time_answer_is_deferred_then_retried(make_lab):
    lb = make_lab()
    lb.provision(defer_s=1.0)
    lb.boot()
    cart = lb.cart
    before = cart.slot_hashes()
    lb.time.set_mode(lb.thing, "silent")
    job = lb.job(lb.image("1.6.0"), "1.6.0")
    why = "time service unreachable"
    cart.wait_seen(rf"^OTA: deferred job={job}: {why}\r$", 15)
    t_deferred = next(t for t, line in cart.stamped if line.startswith("OTA: deferred"))
    ex = lb.jobs.execution(job, lb.thing)
    assert (ex["status"], ex["statusDetails"]) == ("IN_PROGRESS", {"step": "deferred", "reason": why})
    assert len(lb.time.requests(lb.thing)) == 3
    assert not [x for x in cart.lines() if x.startswith(("OTA: download", "EV: download"))], "fetched without time"
    assert cart.slot_hashes() == before
    lb.time.set_mode(lb.thing, "normal")
    assert lb.wait(job)["status"] == "SUCCEEDED"
    cart.expect(r"FW: slot B confirmed\r\n", 10)
    requests = lb.time.requests(lb.thing)
    assert len(requests) == 4 and requests[3].t - t_deferred >= 0.9, (requests, t_deferred)
    in_order(cart.lines(), [rf"OTA: job {job} started target=1\.6\.0", r"EV: time-request try=3 t=\d+",
                            rf"OTA: deferred job={job}: {why}", rf"OTA: job {job} started target=1\.6\.0",
                            r"OTA: time ok t=\d+", r"OTA: download done .*"])


def test_the_security_counter_on_a_cart(make_lab, lab):
    lb = make_lab()
    lb.provision(image=signed(lab, "1.4.2", counter=2))
    lb.boot()
    cart = lb.cart
    cart.wait_seen(r"^FW: security counter 2\r$")  # the factory image's first confirmed boot
    assert cart.command("state")[0].startswith("state counter=2 ")
    low = lb.job(signed(lab, "1.6.0", counter=1), "1.6.0")
    assert lb.wait(low)["statusDetails"] == {"reason": "security counter"}
    high = lb.job(signed(lab, "1.7.0", counter=3), "1.7.0")
    assert lb.wait(high)["status"] == "SUCCEEDED"
    cart.expect(r"FW: slot B confirmed\r\n", 10)
    in_order(cart.lines(), [r"FW: marking slot B good", r"EV: state-write copy=\d seq=\d+ t=\d+",
                            r"FW: security counter 3", r"FW: slot B confirmed"])
    assert cart.command("state")[0].startswith("state counter=3 ")
    assert [x for x in cart.lines() if x.startswith("FW: security counter")] == [
        "FW: security counter 2", "FW: security counter 3"]


def trust_job(lb, bundle: bytes) -> str:
    job_id = f"trust-{lb.thing}-{next(lb._ids)}"
    lb.host.add(job_id, bundle)
    lb.jobs.create_job(job_id, [lb.thing], {"operation": "trust", "image_id": job_id,
                                            "sha256": hashlib.sha256(bundle).hexdigest(), "size": len(bundle)})
    return job_id


def test_a_ca_update_on_a_cart_then_an_image_under_the_new_root(make_lab, lab):
    lb = make_lab()
    lb.provision()
    lb.boot()
    cart = lb.cart
    t = int(time.time())
    signer = pki.signer_of(pki.ROOT_OLD)
    bundle = build_trust_bundle({pki.ROOT_NEW: lab.root_pem(pki.ROOT_NEW)}, required_ca=pki.ROOT_OLD, issued=t - 60,
                                expires=t + 3600, overlap_s=OVERLAP_S, signer_key=lab.key(signer),
                                chain=lab.chain(signer))
    job = trust_job(lb, bundle)
    names = f"{pki.ROOT_OLD},{pki.ROOT_NEW}"
    ex = lb.wait(job)
    assert (ex["status"], ex["statusDetails"]) == ("SUCCEEDED", {"step": "done", "cas": names}), ex
    cart.expect(rf"OTA: trust updated cas={names}\r\n")
    listed = cart.command("trust list")
    fp = {n: hashlib.sha256(lab.cert(n).public_bytes(serialization.Encoding.DER)).hexdigest()
          for n in (pki.ROOT_OLD, pki.ROOT_NEW)}
    assert listed[0] == "trust count=2" and listed[2] == f"trust {pki.ROOT_NEW} fp={fp[pki.ROOT_NEW]}"
    m = re.fullmatch(rf"trust {pki.ROOT_OLD} fp={fp[pki.ROOT_OLD]} until=(\d+)", listed[1])
    assert m and t + OVERLAP_S <= int(m.group(1)) <= int(time.time()) + OVERLAP_S + 5, listed
    assert cart.seen.count("CART-BL") == 1, "a CA update does not reset the cart"
    in_order(cart.lines(), [rf"OTA: job {job} started trust", r"OTA: download done .*", r"OTA: time ok t=\d+",
                            r"EV: verify t=\d+", r"EV: state-write copy=0 seq=1 t=\d+",
                            r"EV: trust-write copy=1 seq=1 t=\d+", r"OTA: trust updated .*"])
    new_signer = pki.signer_of(pki.ROOT_NEW)
    image = lb.sign(factory.build_image("1.6.0"), required_ca=pki.ROOT_NEW, signer_key=lab.key(new_signer),
                    chain=lab.chain(new_signer))
    assert lb.wait(lb.job(image, "1.6.0"))["status"] == "SUCCEEDED"
    cart.expect(rf"OTA: verify ok fw=1\.6\.0 ca={pki.ROOT_NEW}\r\n", 10)


def test_recovery_state_reset_reports_a_failing_part(make_lab):
    lb = make_lab()
    lb.provision()
    cart = lb.cart
    page = cart_state_page()
    cart.set_faults({"erase_fail": [page]})
    cart.power_on()
    cart.expect(r"BL: press any key for recovery")
    cart.send("\r")
    cart.expect(r"recovery> ")
    assert cart.command("state reset", "recovery> ") == [f"error state: erase failed: page {page}"]
    cart.set_faults(None)
    assert cart.command("state reset", "recovery> ") == ["ok state reset"]


def cart_state_page() -> int:
    return Layout(4096, 524288).state_first_page  # fast_config's geometry
