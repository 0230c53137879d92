"""A hostile cart on the lab broker: per-thing permissions, as an AWS IoT policy scoped to
`${iot:Connection.Thing.ThingName}` gives them (vrack.broker.acl_text, docs/interfaces.md).

cart-03's own certificate is used against cart-05 and the harness. mosquitto 2.0 grants every
SUBACK and checks read permission per message, and a denied publish still gets its PUBACK under
MQTT 3.1.1, so these tests assert what arrives: forbidden messages are published first, then a
barrier message on a topic the observer may read; once the barrier is in, nothing else may be.
Every test also has its positive control (what the same identity may do arrives), so a broker that
delivers nothing at all fails here too.
"""

from __future__ import annotations

import json
import threading
import time
import uuid

import paho.mqtt.client as mqtt
import pytest

HOST = "127.0.0.1"
TIMEOUT = 5.0
SPY, VICTIM = "cart-03", "cart-05"


def jobs(thing: str, suffix: str) -> str:
    return f"$aws/things/{thing}/jobs/{suffix}"


def telemetry(thing: str) -> str:
    return f"cart-hil/telemetry/{thing}"


def time_topic(thing: str, kind: str) -> str:
    return f"cart-hil/time/{thing}/{kind}"  # kind: request (the cart asks) or answer (the time service)


class Conn:
    """A paho-mqtt 2.x client on the broker with one issued identity; received messages in order."""

    def __init__(self, broker, identity: str, protocol=mqtt.MQTTv311):
        self.identity = identity
        self.messages: list[tuple[str, bytes]] = []
        self.acks: dict[int, object] = {}  # mid -> PUBACK reason code (MQTT 5)
        self._cond = threading.Condition()
        ca, cert, key = broker.client_files(identity)
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"{identity}-{uuid.uuid4().hex[:6]}",
                        protocol=protocol)
        c.tls_set(ca_certs=str(ca), certfile=str(cert), keyfile=str(key))
        c.on_connect = self._on_connect
        c.on_message = self._on_message
        c.on_subscribe = self._on_subscribe
        c.on_publish = self._on_publish
        self.client = c
        self._connected = False
        self._subacks: dict[int, list] = {}
        c.connect(HOST, broker.port, keepalive=30)
        c.loop_start()
        self._wait(lambda: self._connected, f"{identity}: CONNACK")

    def _wait(self, done, what: str, timeout: float = TIMEOUT):
        deadline = time.monotonic() + timeout
        with self._cond:
            while not done():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"{what}: nothing within {timeout} s; received {self.messages}")
                self._cond.wait(left)

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        with self._cond:
            self._connected = not reason_code.is_failure
            self._cond.notify_all()

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties):
        with self._cond:
            self._subacks[mid] = list(reason_codes)
            self._cond.notify_all()

    def _on_publish(self, client, userdata, mid, reason_code, properties):
        with self._cond:
            self.acks[mid] = reason_code
            self._cond.notify_all()

    def _on_message(self, client, userdata, msg):
        with self._cond:
            self.messages.append((msg.topic, bytes(msg.payload)))
            self._cond.notify_all()

    def subscribe(self, *filters: str) -> list:
        """Subscribe (QoS 1) and wait for the SUBACK; its reason codes (mosquitto 2.0 grants them all)."""
        rc, mid = self.client.subscribe([(f, 1) for f in filters])
        assert rc == mqtt.MQTT_ERR_SUCCESS
        self._wait(lambda: mid in self._subacks, f"{self.identity}: SUBACK for {filters}")
        return self._subacks[mid]

    def publish(self, topic: str, payload: bytes) -> int:
        """QoS 1, waits for the PUBACK (a denied publish gets one too); the message id."""
        info = self.client.publish(topic, payload, qos=1)
        info.wait_for_publish(TIMEOUT)
        assert info.is_published(), f"{self.identity}: no PUBACK for {topic}"
        return info.mid

    def wait_for(self, topic: str, payload: bytes) -> list[tuple[str, bytes]]:
        """Wait for this exact message; everything received up to and including it."""
        self._wait(lambda: (topic, payload) in self.messages, f"{self.identity}: {payload!r} on {topic}")
        with self._cond:
            return self.messages[:self.messages.index((topic, payload)) + 1]

    def received(self) -> list[tuple[str, bytes]]:
        with self._cond:
            return list(self.messages)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture(scope="module")
def broker(tmp_path_factory, broker_factory):
    with broker_factory(tmp_path_factory, "hostile", [SPY, VICTIM]) as b:
        yield b


@pytest.fixture
def connect(broker):
    conns: list[Conn] = []

    def make(identity: str, protocol=mqtt.MQTTv311) -> Conn:
        c = Conn(broker, identity, protocol)
        conns.append(c)
        return c

    yield make
    for c in conns:
        c.close()


def test_the_broker_runs_with_the_acl(broker):
    conf = broker.conf_file.read_text()
    assert f"acl_file {broker.acl_file.resolve()}" in conf.splitlines()
    acl = broker.acl_file.read_text().splitlines()
    assert "pattern readwrite $aws/things/%u/#" in acl and "pattern write cart-hil/telemetry/%u" in acl
    assert "pattern write cart-hil/time/%u/request" in acl and "pattern read cart-hil/time/%u/answer" in acl
    assert "topic read cart-hil/time/+/request" in acl and "topic write cart-hil/time/+/answer" in acl
    assert "topic readwrite #" not in acl and "topic read #" not in acl  # nothing grants everything


def test_a_cart_subscribing_to_other_things_topics_receives_nothing_of_them(connect):
    spy, victim, harness = connect(SPY), connect(VICTIM), connect("harness")
    victim.subscribe(jobs(VICTIM, "#"))
    harness.subscribe("cart-hil/telemetry/+")
    # mosquitto 2.0 grants these (its read check runs per message): what arrives is what counts
    spy.subscribe(jobs(VICTIM, "#"), f"$aws/things/{VICTIM}/#", "$aws/#", "$aws/things/+/jobs/#", "#",
                  "cart-hil/telemetry/+", telemetry(VICTIM), "+/+/+")

    # what cart-05 and the harness say to each other, each delivered to its rightful reader
    harness.publish(jobs(VICTIM, "notify-next"), b'{"timestamp":1,"secret":"for cart-05"}')
    victim.publish(jobs(VICTIM, "start-next"), b'{"clientToken":"victim-1"}')
    victim.publish(telemetry(VICTIM), b'{"metric":"secret","value":1}')
    assert victim.wait_for(jobs(VICTIM, "start-next"), b'{"clientToken":"victim-1"}')  # echo of its own request
    assert (jobs(VICTIM, "notify-next"), b'{"timestamp":1,"secret":"for cart-05"}') in victim.received()
    harness.wait_for(telemetry(VICTIM), b'{"metric":"secret","value":1}')

    # the barrier: on cart-03's own jobs topic, published after everything above had its PUBACK
    barrier = (jobs(SPY, "notify-next"), b'{"timestamp":2,"barrier":true}')
    harness.publish(*barrier)
    spy.wait_for(*barrier)
    assert {m for m in spy.received()} == {barrier}, spy.received()


def test_a_cart_cannot_publish_on_another_things_jobs_topics(connect):
    spy, victim, harness = connect(SPY), connect(VICTIM), connect("harness")
    victim.subscribe(jobs(VICTIM, "#"))
    harness.subscribe("$aws/things/+/jobs/#")
    forged = [  # the service's side to cart-05, and cart-05's side to the service
        (jobs(VICTIM, "notify-next"), b'{"timestamp":1,"execution":{"jobId":"forged"}}'),
        (jobs(VICTIM, "start-next/accepted"), b'{"timestamp":1,"execution":{"jobId":"forged"}}'),
        (jobs(VICTIM, "start-next"), b'{"clientToken":"forged"}'),
        (jobs(VICTIM, "forged/update"), b'{"status":"SUCCEEDED","clientToken":"forged"}'),
        (jobs(VICTIM, "get"), b'{"clientToken":"forged"}'),
    ]
    for topic, payload in forged:
        spy.publish(topic, payload)
    # positive control and barrier for the harness: cart-03's own request, on the same connection
    own = (jobs(SPY, "start-next"), b'{"clientToken":"spy-own"}')
    spy.publish(*own)
    assert harness.wait_for(*own) == [own]
    # barrier for cart-05: the harness may speak to it, after every forged publish had its PUBACK
    barrier = (jobs(VICTIM, "notify-next"), b'{"timestamp":2,"barrier":true}')
    harness.publish(*barrier)
    assert victim.wait_for(*barrier) == [barrier]
    assert harness.wait_for(*barrier) == [own, barrier]  # the harness also reads what it sent to cart-05


def test_a_denied_publish_is_not_authorized_under_mqtt5(connect):
    spy = connect(SPY, protocol=mqtt.MQTTv5)
    denied = spy.publish(jobs(VICTIM, "start-next"), b'{"clientToken":"forged"}')
    allowed = spy.publish(jobs(SPY, "get"), b'{"clientToken":"own"}')
    assert str(spy.acks[denied]) == "Not authorized" and spy.acks[denied].value == 0x87
    assert not spy.acks[allowed].is_failure


def test_a_cart_cannot_publish_another_carts_telemetry(connect):
    spy, harness = connect(SPY), connect("harness")
    harness.subscribe("cart-hil/telemetry/+")
    rollback = {"metric": "firmware_rollback_count", "target_version": "1.6.0", "value": 1, "thing": VICTIM}
    spy.publish(telemetry(VICTIM), json.dumps(rollback).encode())
    spy.publish("cart-hil/telemetry/harness", b'{"metric":"forged","value":1}')
    spy.publish(f"{telemetry(SPY)}/extra", b'{"metric":"forged","value":1}')
    own = (telemetry(SPY), b'{"metric":"agent_online","value":1,"thing":"cart-03"}')
    spy.publish(*own)  # positive control and barrier: its own telemetry, on the same connection
    assert harness.wait_for(*own) == [own]
    assert harness.received() == [own]


def test_a_cart_uses_its_own_jobs_topics(connect):
    spy, harness = connect(SPY), connect("harness")
    spy.subscribe(jobs(SPY, "notify-next"), jobs(SPY, "+/update/accepted"))
    harness.subscribe("$aws/things/+/jobs/+/update")
    request = (jobs(SPY, "j-1/update"), b'{"status":"IN_PROGRESS","clientToken":"t1"}')
    spy.publish(*request)
    assert harness.wait_for(*request) == [request]
    reply = (jobs(SPY, "j-1/update/accepted"), b'{"timestamp":1,"clientToken":"t1"}')
    notify = (jobs(SPY, "notify-next"), b'{"timestamp":1}')
    harness.publish(*reply)
    harness.publish(*notify)
    assert spy.wait_for(*notify) == [reply, notify]


def test_the_harness_speaks_on_every_carts_jobs_topics(connect):
    spy, victim, harness = connect(SPY), connect(VICTIM), connect("harness")
    spy.subscribe(jobs(SPY, "#"))
    victim.subscribe(jobs(VICTIM, "#"))
    sent = {}
    for conn in (spy, victim):
        sent[conn.identity] = [(jobs(conn.identity, s), json.dumps({"timestamp": 1, "to": conn.identity}).encode())
                               for s in ("notify-next", "notify", "start-next/accepted", "j-9/get/rejected")]
        for msg in sent[conn.identity]:
            harness.publish(*msg)
    for conn in (spy, victim):
        assert conn.wait_for(*sent[conn.identity][-1]) == sent[conn.identity]


# --- the time service: a cart asks for its own time and reads only the answers to itself -----------


def test_a_cart_reads_neither_another_carts_time_answers_nor_any_request(connect):
    spy, victim, harness = connect(SPY), connect(VICTIM), connect("harness")
    victim.subscribe(time_topic(VICTIM, "answer"))
    harness.subscribe(time_topic("+", "request"))
    spy.subscribe("cart-hil/time/#", time_topic(VICTIM, "answer"), time_topic("+", "answer"),
                  time_topic(VICTIM, "request"), time_topic(SPY, "request"), "#")
    # cart-05's exchange, each message delivered to its rightful reader
    request = (time_topic(VICTIM, "request"), b'{"nonce":"' + b"a" * 32 + b'"}')
    answer = (time_topic(VICTIM, "answer"), b'{"format":1,"for":"cart-05"}')
    victim.publish(*request)
    harness.publish(*answer)
    assert harness.wait_for(*request) == [request]
    assert victim.wait_for(*answer) == [answer]
    own = (time_topic(SPY, "request"), b'{"nonce":"' + b"b" * 32 + b'"}')
    spy.publish(*own)  # a cart does not read its own requests either
    assert harness.wait_for(*own) == [request, own]
    # the barrier: the answer to cart-03 itself (positive control), after everything above
    barrier = (time_topic(SPY, "answer"), b'{"format":1,"for":"cart-03"}')
    harness.publish(*barrier)
    spy.wait_for(*barrier)
    assert spy.received() == [barrier], spy.received()


def test_a_cart_cannot_ask_or_answer_in_another_things_name(connect):
    spy, victim, harness = connect(SPY), connect(VICTIM), connect("harness")
    victim.subscribe(time_topic(VICTIM, "answer"))
    spy.subscribe(time_topic(SPY, "answer"))
    harness.subscribe(time_topic("+", "request"), time_topic("+", "answer"))  # it may write answers, not read them
    forged = [  # asking in cart-05's name, answering cart-05 or itself as if it were the time service
        (time_topic(VICTIM, "request"), b'{"nonce":"' + b"c" * 32 + b'"}'),
        (time_topic(VICTIM, "answer"), b'{"format":1,"forged":true}'),
        (time_topic(SPY, "answer"), b'{"format":1,"forged":true}'),
        ("cart-hil/time/harness/request", b'{"nonce":"' + b"d" * 32 + b'"}'),
    ]
    for msg in forged:
        spy.publish(*msg)
    own = (time_topic(SPY, "request"), b'{"nonce":"' + b"e" * 32 + b'"}')
    spy.publish(*own)  # positive control and barrier: its own request, on the same connection
    assert harness.wait_for(*own) == [own]
    barrier = (time_topic(VICTIM, "answer"), b'{"format":1,"barrier":true}')
    harness.publish(*barrier)
    assert victim.wait_for(*barrier) == [barrier]
    assert harness.received() == [own]
    assert spy.received() == [], "cart-03 answered itself"
