"""harness.fleet.telemetry: firmware_rollback_count and other metrics over MQTT, job-status changes, export."""

from __future__ import annotations

import json
import time
import uuid

import pytest

from harness.fleet.jobs import JobsService
from harness.fleet.mqtt import MqttClient
from harness.fleet.telemetry import ROLLBACK_METRIC, Telemetry, TelemetryTimeout, telemetry_topic

HOST = "127.0.0.1"


@pytest.fixture(scope="module")
def broker(tmp_path_factory, broker_factory):
    with broker_factory(tmp_path_factory, "telemetry", ["cart-01"]) as b:
        yield b


class Devices:
    """The carts: one MQTT client per thing, each with that thing's own certificate (the broker lets
    a cart publish only its own telemetry). `devices("cart-03").publish(...)`."""

    def __init__(self, broker):
        self.broker = broker
        self._clients: dict[str, MqttClient] = {}

    def __call__(self, thing: str) -> MqttClient:
        if thing not in self._clients:
            c = MqttClient(HOST, self.broker.port, *self.broker.ensure_client_cert(thing),
                           client_id=f"dev-{thing}-{uuid.uuid4().hex[:6]}")
            c.connect(5)
            self._clients[thing] = c
        return self._clients[thing]

    def close(self) -> None:
        for c in self._clients.values():
            c.close()


@pytest.fixture
def clients(broker):
    svc = MqttClient(HOST, broker.port, *broker.client_files("harness"), client_id=f"tel-{uuid.uuid4().hex[:6]}")
    svc.connect(5)
    dev = Devices(broker)
    yield svc, dev
    dev.close()
    svc.close()


@pytest.fixture
def telemetry(clients):
    t = Telemetry(clients[0])
    yield t
    t.close()


def rollback(thing: str, version: str, boot_id: str, **extra) -> dict:
    return {"metric": ROLLBACK_METRIC, "target_version": version, "value": 1, "thing": thing, "boot_id": boot_id,
            **extra}


def test_rollbacks_are_counted_by_target_version_and_thing(telemetry, clients):
    _, dev = clients
    mark = telemetry.mark()
    # each publish waits for its PUBACK: the broker has routed it before the next one is sent
    dev("cart-03").publish(telemetry_topic("cart-03"), rollback("cart-03", "1.6.0", "b1"))
    dev("cart-04").publish(telemetry_topic("cart-04"), rollback("cart-04", "1.6.0", "b2"))
    dev("cart-03").publish(telemetry_topic("cart-03"), rollback("cart-03", "1.7.0", "b3", slot="B"))
    dev("cart-03").publish(telemetry_topic("cart-03"), {"metric": "boot_ms", "value": 1512.5, "thing": "cart-03"})
    events = telemetry.wait_metric(ROLLBACK_METRIC, at_least=3, since=mark, timeout=5)
    assert [e.thing for e in events] == ["cart-03", "cart-04", "cart-03"]
    telemetry.wait_metric("boot_ms", thing="cart-03", timeout=5)
    assert telemetry.rollback_count() == 3
    assert telemetry.rollback_count("1.6.0") == 2
    assert telemetry.rollback_count("1.6.0", thing="cart-03") == 1
    assert telemetry.rollback_count(thing="cart-03") == 2
    assert telemetry.rollback_count("9.9.9") == 0
    assert telemetry.total("boot_ms") == 1512.5
    assert events[2].fields["slot"] == "B" and events[0].t <= events[1].t


def test_a_second_report_of_the_same_rollback_counts_and_is_listed(telemetry, clients):
    _, dev = clients
    for _ in range(2):
        dev("cart-05").publish(telemetry_topic("cart-05"), rollback("cart-05", "1.6.0", "same-boot"))
    telemetry.wait_metric(at_least=2, thing="cart-05", timeout=5)
    assert telemetry.rollback_count("1.6.0", "cart-05") == 2
    assert telemetry.duplicates() == [
        {"thing": "cart-05", "boot_id": "same-boot", "target_version": "1.6.0", "count": 2, "indexes": [0, 1]}
    ]


@pytest.mark.parametrize(
    "payload",
    [b"{nope", b"\xff", b"[]", b'{"metric": "x"}', b'{"metric": "", "value": 1}', b'{"metric": "x", "value": "1"}',
     b'{"metric": "x", "value": true}', b'{"metric": "x", "value": NaN}', b'{"metric": "x y", "value": 1}',
     b'{"metric": "x", "value": 1, "thing": "cart-99"}', b'{"metric": "x", "value": 1, "target_version": 1}',
     b" " * (65 * 1024)],
)
def test_malformed_messages_are_kept_apart_never_counted(telemetry, clients, payload):
    _, dev = clients
    dev("cart-06").publish(telemetry_topic("cart-06"), payload)
    dev("cart-06").publish(telemetry_topic("cart-06"), {"metric": "sentinel", "value": 1})
    telemetry.wait_metric("sentinel", timeout=5)  # in order: the malformed one was handled before
    assert len(telemetry.malformed()) == 1 and telemetry.events("x") == []
    assert telemetry.malformed()[0]["topic"] == "cart-hil/telemetry/cart-06"


def test_wait_metric_timeout_says_what_it_waited_for(telemetry, clients):
    _, dev = clients
    dev("cart-07").publish(telemetry_topic("cart-07"), rollback("cart-07", "1.5.0", "b"))
    telemetry.wait_metric(timeout=5)
    with pytest.raises(TelemetryTimeout) as e:
        telemetry.wait_metric(thing="cart-07", target_version="1.6.0", timeout=0.1)
    text = str(e.value)
    assert "firmware_rollback_count{thing=cart-07,target_version=1.6.0}" in text and "have 0" in text
    assert "cart-07 firmware_rollback_count=1 tv=1.5.0" in text


def test_job_status_changes_flow_in_and_everything_exports(telemetry, clients, broker, tmp_path):
    svc, dev = clients
    jobs = JobsService(svc, None, things=["cart-08"])
    try:
        jobs.add_listener(telemetry.record_job_status)
        jobs.create_job("tel-1", ["cart-08"], {"operation": "ota", "target_version": "1.6.0"})
        dev("cart-08").subscribe("$aws/things/cart-08/jobs/+/update/accepted")
        dev("cart-08").publish("$aws/things/cart-08/jobs/tel-1/update", {"status": "SUCCEEDED"})
        jobs.wait_status("tel-1", "cart-08", "SUCCEEDED", 5)
    finally:
        jobs.close()
    # the cart rolled back after reporting SUCCEEDED: only the metric shows it
    dev("cart-08").publish(telemetry_topic("cart-08"), rollback("cart-08", "1.6.0", "b9"))
    telemetry.wait_metric(thing="cart-08", timeout=5)
    assert [c["new"] for c in telemetry.job_status_changes("tel-1")] == ["QUEUED", "SUCCEEDED"]
    out = telemetry.export()
    assert out[ROLLBACK_METRIC] == {"1.6.0": 1}
    assert out["metrics"][ROLLBACK_METRIC]["by_thing"] == {"cart-08": 1}
    assert out["job_status_counts"] == {"tel-1": {"QUEUED": 1, "SUCCEEDED": 1}}
    path = telemetry.write(tmp_path / "out" / "telemetry.json")
    assert json.loads(path.read_text())[ROLLBACK_METRIC] == {"1.6.0": 1}


def test_record_without_a_broker():
    t = Telemetry(None)
    t.record({"metric": ROLLBACK_METRIC, "value": 1, "target_version": "2.0.0"}, "cart-01")
    t.record_job_status({"job_id": "j", "thing": "cart-01", "new": "FAILED"})
    assert t.rollback_count("2.0.0") == 1 and t.job_status_changes(thing="cart-01")[0]["new"] == "FAILED"
    t0 = time.monotonic()
    with pytest.raises(TelemetryTimeout):
        t.wait_metric(at_least=2, timeout=0.05)
    assert time.monotonic() - t0 < 1
