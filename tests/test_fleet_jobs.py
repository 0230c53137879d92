"""harness.fleet.jobs (and .mqtt): the AWS IoT Jobs MQTT API through a real mosquitto with TLS client certs.

A paho device client (harness.fleet.mqtt) plays the cart. Each test uses its own thing name, so the
module can share one broker.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
import time
import urllib.request
import uuid

import pytest

from harness.fleet.imagehost import ImageHost
from harness.fleet.jobs import JobsError, JobsService, JobsTimeout
from harness.fleet.mqtt import MessageLog, MqttClient, MqttError, MqttTimeout, topic_matches
from vrack.broker import Broker, free_port

HOST = "127.0.0.1"
IMAGE = bytes(range(256)) * 64  # 16 KiB
DOC = {"operation": "ota", "target_version": "1.6.0", "image_id": "fw-1.6.0"}
_things = itertools.count(1)


@pytest.fixture(scope="module")
def broker(tmp_path_factory, broker_factory):
    with broker_factory(tmp_path_factory, "jobs", ["cart-01"]) as b:
        yield b


@pytest.fixture
def harness_mqtt(broker):
    c = MqttClient(HOST, broker.port, *broker.client_files("harness"), client_id=f"svc-{uuid.uuid4().hex[:8]}")
    c.connect(5)
    yield c
    c.close()


@pytest.fixture
def host():
    h = ImageHost()
    h.add("fw-1.6.0", IMAGE)
    yield h
    h.close()


@pytest.fixture
def changes():
    return []


@pytest.fixture
def service(harness_mqtt, host, changes, device):
    s = JobsService(harness_mqtt, host, minute_s=0.2, on_status_change=changes.append, things=[device.thing])
    yield s
    s.close()


class Device:
    """A cart's jobs client, by hand: publish a request with a clientToken, wait for the reply."""

    def __init__(self, broker, thing: str | None = None):
        self.thing = thing or f"cart-t{next(_things):03d}"
        self.base = f"$aws/things/{self.thing}/jobs/"
        # its own certificate, CN = the thing name: the broker lets a client use only its own thing's topics
        files = broker.ensure_client_cert(self.thing)
        self.mqtt = MqttClient(HOST, broker.port, *files, client_id=f"dev-{self.thing}")
        self.mqtt.connect(5)
        self.mqtt.subscribe(self.base + "#")

    def request(self, suffix: str, body: dict | None = None, timeout: float = 5.0) -> tuple[str, dict]:
        token = uuid.uuid4().hex
        since = self.mqtt.log.cursor()
        self.mqtt.publish(self.base + suffix, {**(body or {}), "clientToken": token}, wait=False)
        msg = self.mqtt.log.wait_for(
            self.base + suffix + "/+", lambda m: m.json().get("clientToken") == token, timeout, since=since
        )
        return msg.topic.rsplit("/", 1)[1], msg.json()

    def raw(self, suffix: str, payload: bytes, timeout: float = 5.0) -> tuple[str, dict]:
        since = self.mqtt.log.cursor()
        self.mqtt.publish(self.base + suffix, payload, wait=False)
        msg = self.mqtt.log.wait_for(self.base + suffix + "/+", None, timeout, since=since)
        return msg.topic.rsplit("/", 1)[1], msg.json()

    def notification(self, kind: str = "notify-next", predicate=None, timeout: float = 5.0) -> dict:
        return self.mqtt.log.wait_for(self.base + kind, predicate, timeout).json()

    def close(self):
        self.mqtt.close()


@pytest.fixture(scope="module")
def shared(broker):
    """One service and one device for the many single-request cases (each uses its own job id)."""
    c = MqttClient(HOST, broker.port, *broker.client_files("harness"), client_id="svc-shared")
    c.connect(5)
    d = Device(broker)
    s = JobsService(c, None, things=[d.thing])
    yield s, d
    d.close()
    s.close()
    c.close()


@pytest.fixture
def device(broker):
    d = Device(broker)
    yield d
    d.close()


def NOTHING_NEXT(m):  # noqa: N802 - reads as a constant predicate
    return "execution" not in m.json()


def _epoch_ok(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and abs(v - time.time()) < 60


# --------------------------------------------------------------------------------------------------
# mqtt helpers


def test_topic_matching_follows_mqtt_including_dollar_topics():
    assert topic_matches("$aws/things/+/jobs/get", "$aws/things/cart-01/jobs/get")
    assert not topic_matches("+/things/+/jobs/get", "$aws/things/cart-01/jobs/get")
    assert not topic_matches("#", "$aws/things/cart-01/jobs/get")
    assert topic_matches("$aws/things/cart-01/jobs/#", "$aws/things/cart-01/jobs/j1/get/accepted")
    assert topic_matches("a/#", "a")
    assert not topic_matches("$aws/things/+/jobs/+/get", "$aws/things/cart-01/jobs/get")
    assert not topic_matches("a/+", "a/b/c")


def test_message_log_hands_each_message_out_once_and_times_out_with_evidence():
    log = MessageLog()
    log.append("x/1", b'{"n":1}', 1, False, time.monotonic(), time.time())
    log.append("x/2", b'{"n":2}', 1, False, time.monotonic(), time.time())
    assert log.wait_for("x/+", timeout=0).json() == {"n": 1}
    assert log.wait_for("x/+", timeout=0).json() == {"n": 2}
    with pytest.raises(MqttTimeout) as e:
        log.wait_for("y/#", timeout=0.05)
    text = str(e.value)
    assert "waiting for a message on 'y/#'" in text and "timed out after 0." in text and 'x/2 {"n":2}' in text
    log.mark()
    with pytest.raises(MqttTimeout):
        log.wait_for("x/+", lambda m: True, timeout=0)


def test_connect_refused_without_a_valid_cert_says_so(broker, tmp_path):
    ca, _, _ = broker.client_files("harness")
    bad = tmp_path / "k.pem"
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "intruder")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now).not_valid_after(now + dt.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    bad.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()) + cert.public_bytes(serialization.Encoding.PEM))
    c = MqttClient(HOST, broker.port, ca, bad, bad, client_id="intruder")
    with pytest.raises(MqttError) as e:
        c.connect(3)
    assert f"{HOST}:{broker.port}" in str(e.value)
    c.close()


# --------------------------------------------------------------------------------------------------
# the happy path


def test_get_start_next_update_to_succeeded(service, device, host, changes):
    job = service.create_job("ota-1", [device.thing], DOC)
    assert job.document["sha256"] == hashlib.sha256(IMAGE).hexdigest() and job.document["size"] == len(IMAGE)

    nn = device.notification("notify-next")
    ex = nn["execution"]
    assert _epoch_ok(nn["timestamp"]) and ex["jobId"] == "ota-1" and ex["status"] == "QUEUED"
    assert ex["thingName"] == device.thing and ex["versionNumber"] == 1 and ex["executionNumber"] == 1
    assert _epoch_ok(ex["queuedAt"]) and _epoch_ok(ex["lastUpdatedAt"]) and "startedAt" not in ex
    doc = ex["jobDocument"]
    assert list(doc) == ["operation", "target_version", "url", "sha256", "size"]
    with urllib.request.urlopen(doc["url"], timeout=5) as r:
        assert hashlib.sha256(r.read()).hexdigest() == doc["sha256"]
    notify = device.notification("notify")
    assert [j["jobId"] for j in notify["jobs"]["QUEUED"]] == ["ota-1"]

    outcome, body = device.request("get")
    assert outcome == "accepted" and body["inProgressJobs"] == [] and _epoch_ok(body["timestamp"])
    assert [j["jobId"] for j in body["queuedJobs"]] == ["ota-1"]

    outcome, body = device.request("start-next", {"statusDetails": {"receive": "0/16"}, "stepTimeoutInMinutes": 50})
    assert outcome == "accepted"
    ex = body["execution"]
    assert ex["status"] == "IN_PROGRESS" and ex["statusDetails"] == {"receive": "0/16"} and ex["versionNumber"] == 2
    assert _epoch_ok(ex["startedAt"]) and ex["jobDocument"]["url"].startswith(host.base_url)
    assert 0 < ex["approximateSecondsBeforeTimedOut"] <= 10  # 50 lab minutes of 0.2 s

    outcome, body = device.request("$next/get")
    assert outcome == "accepted" and body["execution"]["jobId"] == "ota-1"
    assert body["execution"]["status"] == "IN_PROGRESS"
    outcome, body = device.request("ota-1/get", {"includeJobDocument": False})
    assert outcome == "accepted" and "jobDocument" not in body["execution"]

    outcome, body = device.request("ota-1/update", {
        "status": "IN_PROGRESS", "statusDetails": {"receive": "16/16"}, "expectedVersion": 2,
        "includeJobExecutionState": True,
    })
    assert outcome == "accepted" and _epoch_ok(body["timestamp"]) and "jobDocument" not in body
    assert body["executionState"] == {
        "status": "IN_PROGRESS", "statusDetails": {"receive": "16/16"}, "versionNumber": 3
    }

    device.mqtt.log.mark()
    outcome, body = device.request("ota-1/update", {
        "status": "SUCCEEDED", "statusDetails": {"reason": "accepted v1.6.0"}, "expectedVersion": 3,
        "executionNumber": 1, "includeJobDocument": True,
    })
    assert outcome == "accepted" and body["jobDocument"]["target_version"] == "1.6.0" and "executionState" not in body
    nn = device.notification("notify-next", NOTHING_NEXT)
    assert set(nn) == {"timestamp"}  # nothing pending any more
    assert device.notification("notify", lambda m: m.json()["jobs"] == {})

    ex = service.wait_status("ota-1", device.thing, "SUCCEEDED", timeout=1)
    assert ex["statusDetails"] == {"reason": "accepted v1.6.0"} and ex["versionNumber"] == 4
    assert service.job("ota-1").status == "COMPLETED"
    assert [(c.old, c.new, c.source) for c in changes] == [
        ("", "QUEUED", "create"), ("QUEUED", "IN_PROGRESS", "start-next"),
        ("IN_PROGRESS", "IN_PROGRESS", "device"), ("IN_PROGRESS", "SUCCEEDED", "device"),
    ]
    assert all(c.t_request is not None and c.t_request <= c.t for c in changes[1:])
    assert len(service.document_fetches("ota-1", device.thing)) == 4  # notify-next, start-next, get, update


def test_a_service_for_all_things_answers_any_thing_and_one_for_some_only_those(harness_mqtt, broker):
    a, b = Device(broker), Device(broker)
    try:
        with JobsService(harness_mqtt, None) as every:
            assert every.things is None
            assert a.request("get")[0] == "accepted" and b.request("get")[0] == "accepted"
        with JobsService(harness_mqtt, None, things=[a.thing]) as some:
            assert some.things == {a.thing}
            assert a.request("get")[0] == "accepted"
            with pytest.raises(MqttTimeout):
                b.request("get", timeout=0.3)
            with pytest.raises(JobsError, match="does not answer"):
                some.create_job("x-1", [b.thing], DOC)
    finally:
        a.close()
        b.close()


def test_replies_come_before_the_notifications_they_cause(service, device):
    service.create_job("order-1", [device.thing], DOC)
    device.notification("notify-next")
    device.request("start-next")
    device.request("order-1/update", {"status": "SUCCEEDED"})
    device.notification("notify-next", NOTHING_NEXT)
    topics = [m.topic.rsplit("/jobs/", 1)[1] for m in device.mqtt.log.messages(device.base + "#")]
    i = topics.index("order-1/update/accepted")
    assert topics[i + 1:] == ["notify", "notify-next"]


def test_nothing_pending_answers_with_just_a_timestamp(service, device):
    for suffix in ("start-next", "$next/get"):
        outcome, body = device.request(suffix)
        assert outcome == "accepted" and set(body) == {"timestamp", "clientToken"}
    outcome, body = device.request("get")
    assert body["queuedJobs"] == [] and body["inProgressJobs"] == []


def test_two_jobs_queue_in_order_and_notify_next_moves_on(service, device):
    service.create_job("a-1", [device.thing], DOC)
    service.create_job("a-2", [device.thing], {"operation": "noop"})
    assert device.notification("notify-next")["execution"]["jobId"] == "a-1"
    _, body = device.request("get")
    assert [j["jobId"] for j in body["queuedJobs"]] == ["a-1", "a-2"]
    # the device may pick any queued job: starting a-2 makes it the next one
    outcome, _ = device.request("a-2/update", {"status": "IN_PROGRESS"})
    assert outcome == "accepted"
    assert device.notification("notify-next")["execution"]["jobId"] == "a-2"  # the next one after a-1's
    outcome, body = device.request("start-next")
    assert body["execution"]["jobId"] == "a-2"  # the one in progress, unchanged
    device.request("a-2/update", {"status": "FAILED", "statusDetails": {"reason": "rejected: test"}})
    nn = device.notification("notify-next")
    assert nn["execution"]["jobId"] == "a-1" and nn["execution"]["status"] == "QUEUED"


def test_document_url_is_minted_on_every_read(harness_mqtt, device):
    now = [1_000_000.0]
    with ImageHost(clock=lambda: now[0]) as host:
        host.add("fw-1.6.0", IMAGE)
        with JobsService(harness_mqtt, host, url_ttl_s=60, things=[device.thing]) as service:
            service.create_job("mint-1", [device.thing], DOC)
            first = device.notification("notify-next")["execution"]["jobDocument"]["url"]
            assert "expires=1000060&" in first
            now[0] += 61  # the first URL has expired
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(first, timeout=5)
            assert e.value.code == 403
            _, body = device.request("start-next")
            second = body["execution"]["jobDocument"]["url"]
            assert second != first and "expires=1000121&" in second
            with urllib.request.urlopen(second, timeout=5) as r:
                assert r.read() == IMAGE
            assert [f["operation"] for f in service.document_fetches("mint-1")] == ["notify-next", "start-next"]


# --------------------------------------------------------------------------------------------------
# refusals


def _update_with_token(device, job_id: str, body: dict, token: str) -> tuple[str, dict]:
    since = device.mqtt.log.cursor()
    device.mqtt.publish(f"{device.base}{job_id}/update", {**body, "clientToken": token}, wait=False)
    msg = device.mqtt.log.wait_for(f"{device.base}{job_id}/update/+", None, 5, since=since)
    return msg.topic.rsplit("/", 1)[1], msg.json()


@pytest.mark.parametrize(
    ("final", "details", "asked"),
    [
        ("SUCCEEDED", {"reason": "accepted v1.6.0"}, "IN_PROGRESS"),   # AWS's own example
        ("FAILED", {"reason": "rejected: bad signature"}, "SUCCEEDED"),
        ("SUCCEEDED", {"reason": "accepted v1.6.0"}, "SUCCEEDED"),     # a retry of the same update
        ("REJECTED", {"reason": "wrong hardware"}, "FAILED"),
    ],
)
def test_an_update_of_a_terminal_execution_is_invalid_state_transition(service, device, changes, final, details,
                                                                         asked):
    """AWS: "InvalidStateTransition: An update attempted to change the job execution to a state that is
    invalid because of the job execution's current state ... the body of the error message also contains
    the executionState field." TerminalStateReached is documented for describe only."""
    service.create_job("t-1", [device.thing], DOC, step_timeout_s=30)
    device.request("start-next")
    assert device.request("t-1/update", {"status": final, "statusDetails": details})[0] == "accepted"
    device.notification("notify", lambda m: m.json().get("jobs") == {})   # what that update caused
    device.notification("notify-next", NOTHING_NEXT)
    before = service.execution("t-1", device.thing)
    assert (before["status"], before["versionNumber"]) == (final, 3)
    n_changes, since = len(changes), device.mqtt.log.cursor()

    token = f"tok-{final}-{asked}"
    outcome, body = _update_with_token(
        device, "t-1", {"status": asked, "statusDetails": {"reason": "late"}, "stepTimeoutInMinutes": 5,
                        "includeJobExecutionState": True, "includeJobDocument": True}, token)
    assert outcome == "rejected", body
    assert set(body) == {"code", "message", "timestamp", "clientToken", "executionState"}, body
    assert body["code"] == "InvalidStateTransition" and body["clientToken"] == token and _epoch_ok(body["timestamp"])
    assert body["executionState"] == {"status": final, "statusDetails": details, "versionNumber": 3}
    assert final in body["message"] and asked in body["message"]

    # nothing changed: the service's view, a device's describe, history, timers, and no notification
    assert service.execution("t-1", device.thing) == before
    outcome, desc = device.request("t-1/get", {"includeJobDocument": False})
    assert outcome == "accepted"
    ex = desc["execution"]
    assert (ex["status"], ex["statusDetails"], ex["versionNumber"]) == (final, details, 3)
    assert ex["lastUpdatedAt"] == before["lastUpdatedAt"] and "approximateSecondsBeforeTimedOut" not in ex
    assert len(changes) == n_changes and service.history("t-1")[-1].new == final
    assert device.mqtt.log.messages(device.base + "notify", since) == []
    assert device.mqtt.log.messages(device.base + "notify-next", since) == []
    assert [r.outcome for r in service.requests() if r.client_token == token] == ["InvalidStateTransition"]


def test_a_terminal_update_with_a_stale_expected_version_is_a_version_mismatch(service, device):
    """expectedVersion is checked before the terminal state (both carry executionState)."""
    service.create_job("t-2", [device.thing], DOC)
    device.request("start-next")
    device.request("t-2/update", {"status": "SUCCEEDED"})
    outcome, body = device.request("t-2/update", {"status": "SUCCEEDED", "expectedVersion": 2})
    assert (outcome, body["code"], body["executionState"]["status"]) == ("rejected", "VersionMismatch", "SUCCEEDED")
    outcome, body = device.request("t-2/update", {"status": "SUCCEEDED", "expectedVersion": 3})
    assert (outcome, body["code"]) == ("rejected", "InvalidStateTransition")
    assert body["executionState"] == {"status": "SUCCEEDED", "statusDetails": {}, "versionNumber": 3}


@pytest.mark.parametrize("status", ["QUEUED", "TIMED_OUT", "CANCELED", "REMOVED", "succeeded", 3, None])
def test_device_may_not_set_service_statuses(shared, status):
    service, device = shared
    job = f"s-{uuid.uuid4().hex[:8]}"
    service.create_job(job, [device.thing], {"operation": "noop"})
    outcome, body = device.request(f"{job}/update", {} if status is None else {"status": status})
    assert (outcome, body["code"]) == ("rejected", "InvalidRequest")
    assert service.execution(job, device.thing)["status"] == "QUEUED"
    service.cancel(job)


def test_expected_version_mismatch_carries_the_execution_state(service, device):
    service.create_job("v-1", [device.thing], DOC)
    device.request("start-next", {"statusDetails": {"receive": "0/1"}})
    outcome, body = device.request("v-1/update", {"status": "IN_PROGRESS", "expectedVersion": 1})
    assert (outcome, body["code"]) == ("rejected", "VersionMismatch")
    assert body["executionState"] == {"status": "IN_PROGRESS", "statusDetails": {"receive": "0/1"}, "versionNumber": 2}
    assert service.execution("v-1", device.thing)["versionNumber"] == 2  # nothing changed


def test_unknown_job_execution_number_and_job_id(service, device):
    service.create_job("r-1", [device.thing], DOC)
    assert device.request("nope/get")[1]["code"] == "ResourceNotFound"
    assert device.request("nope/update", {"status": "IN_PROGRESS"})[1]["code"] == "ResourceNotFound"
    assert device.request("r-1/get", {"executionNumber": 2})[1]["code"] == "ResourceNotFound"
    assert device.request("r-1/update", {"status": "FAILED", "executionNumber": 7})[1]["code"] == "ResourceNotFound"
    assert device.request("$next/update", {"status": "FAILED"})[1]["code"] == "InvalidTopic"
    assert device.request("bad.id/get")[1]["code"] == "InvalidTopic"


MALFORMED = [
    ("r-1/update", b"{not json", "InvalidJson"),
    ("r-1/update", b"\xff\xfe\x00", "InvalidJson"),
    ("r-1/update", b'{"status": NaN}', "InvalidJson"),
    ("r-1/update", b"[" * 60000 + b"]" * 60000, "InvalidJson"),
    ("r-1/update", b"[1, 2]", "InvalidRequest"),
    ("r-1/update", b'"IN_PROGRESS"', "InvalidRequest"),
    ("r-1/update", b" " + b"x" * (129 * 1024), "InvalidRequest"),
    ("r-1/update", b'{"status": "IN_PROGRESS", "statusDetails": {"bad key!": "x"}}', "InvalidRequest"),
    ("r-1/update", b'{"status": "IN_PROGRESS", "statusDetails": {"k": 5}}', "InvalidRequest"),
    ("r-1/update", b'{"status": "IN_PROGRESS", "statusDetails": {"k": ""}}', "InvalidRequest"),
    ("r-1/update", b'{"status": "IN_PROGRESS", "statusDetails": {"k": "a\\nb"}}', "InvalidRequest"),
    ("r-1/update", json.dumps({"status": "IN_PROGRESS", "statusDetails": {"k": "v" * 1025}}).encode(),
     "InvalidRequest"),
    ("r-1/update", json.dumps({"status": "IN_PROGRESS", "statusDetails": {"k" * 129: "v"}}).encode(),
     "InvalidRequest"),
    ("r-1/update", b'{"status": "IN_PROGRESS", "statusDetails": ["a"]}', "InvalidRequest"),
    ("r-1/update", b'{"status": "IN_PROGRESS", "expectedVersion": "1"}', "InvalidRequest"),
    ("r-1/update", b'{"status": "IN_PROGRESS", "expectedVersion": 1.0}', "InvalidRequest"),
    ("r-1/update", b'{"status": "IN_PROGRESS", "stepTimeoutInMinutes": 0}', "InvalidRequest"),
    ("r-1/update", b'{"status": "IN_PROGRESS", "stepTimeoutInMinutes": 10081}', "InvalidRequest"),
    ("r-1/update", b'{"status": "IN_PROGRESS", "stepTimeoutInMinutes": true}', "InvalidRequest"),
    ("r-1/update", b'{"status": "IN_PROGRESS", "includeJobDocument": 1}', "InvalidRequest"),
    ("r-1/update", b'{"status": "IN_PROGRESS", "clientToken": 5}', "InvalidRequest"),
    ("r-1/update", json.dumps({"status": "IN_PROGRESS", "clientToken": "t" * 65}).encode(), "InvalidRequest"),
    ("start-next", b'{"stepTimeoutInMinutes": -1}', "InvalidRequest"),
    ("start-next", b'{"statusDetails": "x"}', "InvalidRequest"),
    ("get", b"null", "InvalidRequest"),
    ("r-1/get", b'{"includeJobDocument": "yes"}', "InvalidRequest"),
    ("r-1/get", b'{"executionNumber": 0}', "InvalidRequest"),
]


@pytest.mark.parametrize(("suffix", "payload", "code"), MALFORMED, ids=range(len(MALFORMED)))
def test_malformed_requests_are_rejected_with_the_right_code(shared, suffix, payload, code):
    service, device = shared
    job = f"r-{uuid.uuid4().hex[:8]}"
    service.create_job(job, [device.thing], {"operation": "noop"})
    outcome, body = device.raw(suffix.replace("r-1", job), payload)
    assert (outcome, body["code"]) == ("rejected", code), body
    assert _epoch_ok(body["timestamp"]) and "clientToken" not in body
    assert service.execution(job, device.thing)["versionNumber"] == 1
    service.cancel(job)


def test_client_token_is_echoed_in_rejections_too(service, device):
    service.create_job("c-1", [device.thing], DOC)
    outcome, body = device.raw("c-1/update", b'{"clientToken": "tok-1", "status": "BOGUS"}')
    assert (outcome, body["code"], body["clientToken"]) == ("rejected", "InvalidRequest", "tok-1")
    outcome, body = device.raw("c-1/update", b'{"clientToken": "tok-2", "status": "IN_PROGRESS", "expectedVersion": 9}')
    assert (body["code"], body["clientToken"]) == ("VersionMismatch", "tok-2")
    outcome, body = device.raw("c-1/get", b'{"clientToken": "tok-3"}')
    assert (outcome, body["clientToken"]) == ("accepted", "tok-3")


def _fuzz_value(rng: random.Random, depth: int = 0):
    kind = rng.randrange(9 if depth < 3 else 6)
    return [
        lambda: None, lambda: rng.choice([True, False]), lambda: rng.randint(-2**70, 2**70),
        lambda: rng.uniform(-1e9, 1e9),
        lambda: "".join(chr(rng.randrange(0, 0x3000)) for _ in range(rng.randrange(40))),
        lambda: rng.choice(["IN_PROGRESS", "SUCCEEDED", "FAILED", "REJECTED", "QUEUED", "$next", ""]),
        lambda: [_fuzz_value(rng, depth + 1) for _ in range(rng.randrange(4))],
        lambda: {rng.choice(FIELDS): _fuzz_value(rng, depth + 1) for _ in range(rng.randrange(4))},
        lambda: {"".join(rng.choice("ab:_-! ") for _ in range(rng.randrange(6))): _fuzz_value(rng, depth + 1)},
    ][kind]()


FIELDS = ["status", "statusDetails", "expectedVersion", "executionNumber", "includeJobExecutionState",
          "includeJobDocument", "stepTimeoutInMinutes", "clientToken", "other"]


def test_fuzzed_requests_always_get_an_answer_and_never_break_the_service(service, device):
    service.create_job("f-1", [device.thing], DOC)
    rng = random.Random(20260101)
    suffixes = ["get", "start-next", "f-1/get", "f-1/update", "$next/get", "zz/update"]
    sent = 0
    for i in range(400):
        suffix = rng.choice(suffixes)
        r = rng.random()
        if r < 0.15:
            payload = bytes(rng.randrange(256) for _ in range(rng.randrange(64)))
        elif r < 0.6:
            payload = json.dumps({rng.choice(FIELDS): _fuzz_value(rng) for _ in range(rng.randrange(6))}).encode()
        else:
            payload = json.dumps(_fuzz_value(rng)).encode()
        device.mqtt.publish(device.base + suffix, payload, wait=(i % 50 == 49))
        sent += 1
    deadline = time.monotonic() + 10
    while len(service.requests()) < sent and time.monotonic() < deadline:
        device.request("get", timeout=2)  # a round trip: everything published before it has been handled
    handled = service.requests()
    assert len([r for r in handled if r.topic.startswith(device.base)]) >= sent
    assert not [r for r in handled if r.outcome == "InternalError"]
    codes = {r.outcome for r in handled}
    assert codes <= {"accepted", "InvalidJson", "InvalidRequest", "InvalidTopic", "ResourceNotFound",
                     "VersionMismatch", "InvalidStateTransition"}, codes
    assert device.request("get")[0] == "accepted"  # still serving


# --------------------------------------------------------------------------------------------------
# the service's own transitions


def test_step_timeout_times_the_execution_out(service, device, changes):
    service.create_job("st-1", [device.thing], DOC, step_timeout_s=0.3)
    t0 = time.monotonic()
    device.request("start-next")
    ex = service.wait_status("st-1", device.thing, "TIMED_OUT", timeout=3)
    took = time.monotonic() - t0
    assert 0.25 <= took < 2.0, took
    assert ex["versionNumber"] == 3 and changes[-1].source == "step-timeout" and changes[-1].t_request is None
    nn = device.notification("notify-next", NOTHING_NEXT)
    assert set(nn) == {"timestamp"}
    outcome, body = device.request("st-1/update", {"status": "SUCCEEDED"})
    assert outcome == "rejected" and body["code"] == "InvalidStateTransition"
    assert body["executionState"] == {"status": "TIMED_OUT", "statusDetails": {}, "versionNumber": 3}


def test_device_step_timeout_in_lab_minutes_can_be_reset_and_cleared(service, device):
    # minute_s=0.2: stepTimeoutInMinutes=1 is 0.2 s
    service.create_job("st-2", [device.thing], DOC)
    device.request("start-next", {"stepTimeoutInMinutes": 1})
    device.request("st-2/update", {"status": "IN_PROGRESS", "stepTimeoutInMinutes": -1})  # cleared
    with pytest.raises(JobsTimeout):
        service.wait_status("st-2", device.thing, "TIMED_OUT", timeout=0.5)
    t0 = time.monotonic()
    device.request("st-2/update", {"status": "IN_PROGRESS", "stepTimeoutInMinutes": 2})
    service.wait_status("st-2", device.thing, "TIMED_OUT", timeout=3)
    assert time.monotonic() - t0 >= 0.35


def test_in_progress_timeout_is_not_reset_by_updates(service, device):
    service.create_job("ip-1", [device.thing], DOC, in_progress_timeout_s=0.4)
    device.request("start-next", {"stepTimeoutInMinutes": 100})
    device.request("ip-1/update", {"status": "IN_PROGRESS", "stepTimeoutInMinutes": 100})
    service.wait_status("ip-1", device.thing, "TIMED_OUT", timeout=3)
    assert service.history("ip-1")[-1].source == "in-progress-timeout"


def test_terminal_update_stops_the_timers(service, device):
    service.create_job("ok-1", [device.thing], DOC, step_timeout_s=0.2, in_progress_timeout_s=0.2)
    device.request("start-next")
    device.request("ok-1/update", {"status": "SUCCEEDED"})
    with pytest.raises(JobsTimeout):
        service.wait_status("ok-1", device.thing, "TIMED_OUT", timeout=0.4)
    assert service.execution("ok-1", device.thing)["status"] == "SUCCEEDED"


def test_cancel_needs_force_for_an_execution_in_progress(service, device, broker):
    other = Device(broker)
    service.serve(other.thing)
    try:
        service.create_job("cx-1", [device.thing, other.thing], DOC)
        device.request("start-next")
        with pytest.raises(JobsError) as e:
            service.cancel("cx-1")
        assert e.value.code == "InvalidStateTransition" and device.thing in str(e.value)
        assert service.execution("cx-1", other.thing)["status"] == "QUEUED"  # nothing changed
        assert service.cancel("cx-1", things=[other.thing]) == [other.thing]
        assert set(other.notification("notify-next", NOTHING_NEXT)) == {"timestamp"}
        assert service.cancel("cx-1", force=True) == [device.thing]
        assert set(device.notification("notify-next", NOTHING_NEXT)) == {"timestamp"}
        assert service.execution("cx-1", device.thing)["status"] == "CANCELED"
        assert service.job("cx-1").status == "CANCELED"
        outcome, body = device.request("cx-1/update", {"status": "SUCCEEDED"})
        assert (body["code"], body["executionState"]["status"]) == ("InvalidStateTransition", "CANCELED")
        assert device.request("cx-1/update", {"status": "IN_PROGRESS"})[1]["code"] == "InvalidStateTransition"
    finally:
        other.close()


def test_harness_side_errors_name_the_problem(service, device):
    with pytest.raises(JobsError, match="invalid job id"):
        service.create_job("bad id", [device.thing], DOC)
    service.create_job("h-1", [device.thing], DOC)
    with pytest.raises(JobsError, match="already exists"):
        service.create_job("h-1", [device.thing], DOC)
    with pytest.raises(JobsError) as e:
        service.execution("h-1", "cart-nobody")
    assert e.value.code == "ResourceNotFound"
    with pytest.raises(JobsTimeout) as e:
        service.wait_status("h-1", device.thing, ["SUCCEEDED", "FAILED"], timeout=0.1)
    text = str(e.value)
    assert "h-1" in text and device.thing in text and "FAILED or SUCCEEDED" in text and "it is QUEUED" in text
    with pytest.raises(ValueError):
        service.create_job("h-2", [device.thing], {**DOC, "image_id": "../etc"})


def test_the_service_survives_a_broker_restart(tmp_path):
    b = Broker(tmp_path / "rack", free_port(), ["harness", "cart-01"])
    b.start()
    try:
        c = MqttClient(HOST, b.port, *b.client_files("harness"), client_id="svc-restart").connect(5)
        dev = Device(b)
        with JobsService(c, None, things=[dev.thing]) as service:
            service.create_job("rs-1", [dev.thing], {"operation": "noop"})
            assert dev.request("start-next")[0] == "accepted"
            b.stop()
            b.start()
            c.wait_connected(10)  # connected again and subscriptions restored
            dev.mqtt.wait_connected(10)
            outcome, body = dev.request("rs-1/update", {"status": "SUCCEEDED"}, timeout=5)
            assert outcome == "accepted"
            assert service.execution("rs-1", dev.thing)["status"] == "SUCCEEDED"
        dev.close()
        c.close()
    finally:
        b.stop()


def test_notice_latency_is_small(service, device):
    """Device publish -> the service has handled it: quick measurement, loose bound (the bench measures it)."""
    service.create_job("lat-1", [device.thing], DOC)
    device.request("start-next")
    lat = []
    for i in range(20):
        t0 = time.monotonic()
        device.request("lat-1/update", {"status": "IN_PROGRESS", "statusDetails": {"receive": f"{i}/20"}})
        lat.append(service.history("lat-1")[-1].t_request - t0)
    lat.sort()
    assert lat[len(lat) // 2] < 0.05, lat


@pytest.mark.parametrize("topic", ["cart-hil/telemetry/x\x01y", "a/\x85/b", "a/\ufdd0", "a/+/b", "a/#", ""])
def test_a_topic_the_broker_would_refuse_is_refused_before_it_is_sent(harness_mqtt, topic):
    """mosquitto drops a connection that publishes such a topic, and paho resends a QoS 1 message on
    every reconnect: one bad publish would be a reconnect storm. The client refuses it instead."""
    with pytest.raises(MqttError, match="cannot publish to"):
        harness_mqtt.publish(topic, {"x": 1})
    assert harness_mqtt.is_connected()
    harness_mqtt.publish("$aws/things/cart-01/jobs/notify", {"x": 1})  # still connected: PUBACK arrives
