"""An unmodified AWS IoT device SDK jobs client (awsiotsdk from PyPI) runs a job end to end against the
lab jobs service, over mosquitto with TLS client certificates (the cert identity is the username,
no ALPN off port 443)."""

from __future__ import annotations

import hashlib
import threading
import urllib.request
from concurrent.futures import Future

import awscrt.mqtt_request_response as mqtt_rr  # awsiotsdk (and awscrt) come with the dev extra; no skip:
import awsiot  # this test is the proof that a real client works, it must not vanish quietly
import pytest
from awscrt import mqtt
from awsiot import iotjobs, mqtt_connection_builder

from harness.fleet.imagehost import ImageHost
from harness.fleet.jobs import JobsService
from harness.fleet.mqtt import MqttClient
from vrack.broker import Broker, free_port

HOST = "127.0.0.1"
IMAGE = b"\x5a" * 4096
TIMEOUT = 10
DOC = {"operation": "ota", "target_version": "1.6.0", "image_id": "fw-1.6.0"}


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    broker = Broker(tmp_path_factory.mktemp("sdk") / "rack", free_port(), ["harness", "sdk-cart", "sdk-cart-v2"])
    broker.start()
    harness = MqttClient(HOST, broker.port, *broker.client_files("harness"), client_id="sdk-test-harness")
    harness.connect(5)
    host = ImageHost()
    host.add("fw-1.6.0", IMAGE)
    service = JobsService(harness, host, things=["sdk-cart", "sdk-cart-v2"])
    yield broker, service, host
    service.close()
    host.close()
    harness.close()
    broker.stop()


def connect(broker: Broker, thing: str, metrics: bool = True) -> mqtt.Connection:
    """The SDK's own builder. With metrics on (its default) it sends an SDK string as the MQTT username;
    mosquitto ignores it (use_identity_as_username), so both ways must work."""
    ca, cert, key = broker.client_files(thing)
    conn = mqtt_connection_builder.mtls_from_path(
        endpoint=HOST, port=broker.port, cert_filepath=str(cert), pri_key_filepath=str(key),
        ca_filepath=str(ca), client_id=thing, clean_session=True, keep_alive_secs=30,
        enable_metrics_collection=metrics,
    )
    conn.connect().result(TIMEOUT)
    return conn


class Inbox:
    """SDK callbacks land here; tests wait on futures, never poll."""

    def __init__(self):
        self._lock = threading.Lock()
        self._waiting: dict[str, list[Future]] = {}
        self._items: dict[str, list] = {}

    def put(self, kind: str, item) -> None:
        with self._lock:
            waiters = self._waiting.get(kind)
            if waiters:
                waiters.pop(0).set_result(item)
            else:
                self._items.setdefault(kind, []).append(item)

    def get(self, kind: str, timeout: float = TIMEOUT):
        fut: Future = Future()
        with self._lock:
            items = self._items.get(kind)
            if items:
                return items.pop(0)
            self._waiting.setdefault(kind, []).append(fut)
        return fut.result(timeout)

    def cb(self, kind: str):
        return lambda item: self.put(kind, item)


def test_iot_jobs_client_runs_a_job_end_to_end(lab):
    broker, service, host = lab
    thing = "sdk-cart"
    conn = connect(broker, thing)
    try:
        jobs = iotjobs.IotJobsClient(conn)
        inbox = Inbox()
        subs = [
            (jobs.subscribe_to_next_job_execution_changed_events,
             iotjobs.NextJobExecutionChangedSubscriptionRequest(thing_name=thing), "next"),
            (jobs.subscribe_to_get_pending_job_executions_accepted,
             iotjobs.GetPendingJobExecutionsSubscriptionRequest(thing_name=thing), "pending"),
            (jobs.subscribe_to_start_next_pending_job_execution_accepted,
             iotjobs.StartNextPendingJobExecutionSubscriptionRequest(thing_name=thing), "started"),
            (jobs.subscribe_to_start_next_pending_job_execution_rejected,
             iotjobs.StartNextPendingJobExecutionSubscriptionRequest(thing_name=thing), "start-rejected"),
            (jobs.subscribe_to_describe_job_execution_accepted,
             iotjobs.DescribeJobExecutionSubscriptionRequest(thing_name=thing, job_id="+"), "described"),
            (jobs.subscribe_to_update_job_execution_accepted,
             iotjobs.UpdateJobExecutionSubscriptionRequest(thing_name=thing, job_id="+"), "updated"),
            (jobs.subscribe_to_update_job_execution_rejected,
             iotjobs.UpdateJobExecutionSubscriptionRequest(thing_name=thing, job_id="+"), "update-rejected"),
        ]
        for subscribe, request, kind in subs:
            future, _topic = subscribe(request=request, qos=mqtt.QoS.AT_LEAST_ONCE, callback=inbox.cb(kind))
            future.result(TIMEOUT)

        service.create_job("sdk-ota-1", [thing], DOC)
        event = inbox.get("next")
        ex = event.execution
        assert ex.job_id == "sdk-ota-1" and ex.status == "QUEUED" and ex.thing_name == thing
        assert ex.queued_at.year >= 2025 and ex.version_number == 1
        assert ex.job_document["sha256"] == hashlib.sha256(IMAGE).hexdigest()

        jobs.publish_get_pending_job_executions(
            iotjobs.GetPendingJobExecutionsRequest(thing_name=thing, client_token="tok-get"), mqtt.QoS.AT_LEAST_ONCE
        ).result(TIMEOUT)
        pending = inbox.get("pending")
        assert [j.job_id for j in pending.queued_jobs] == ["sdk-ota-1"] and pending.client_token == "tok-get"

        jobs.publish_start_next_pending_job_execution(
            iotjobs.StartNextPendingJobExecutionRequest(
                thing_name=thing, client_token="tok-start", step_timeout_in_minutes=30,
                status_details={"receive": "0/1"},
            ),
            mqtt.QoS.AT_LEAST_ONCE,
        ).result(TIMEOUT)
        started = inbox.get("started")
        ex = started.execution
        assert started.client_token == "tok-start" and ex.status == "IN_PROGRESS" and ex.started_at is not None
        assert ex.status_details == {"receive": "0/1"}
        with urllib.request.urlopen(ex.job_document["url"], timeout=5) as r:  # what a device would download
            assert r.read() == IMAGE

        jobs.publish_describe_job_execution(
            iotjobs.DescribeJobExecutionRequest(thing_name=thing, job_id="$next", client_token="tok-desc"),
            mqtt.QoS.AT_LEAST_ONCE,
        ).result(TIMEOUT)
        assert inbox.get("described").execution.job_id == "sdk-ota-1"

        jobs.publish_update_job_execution(
            iotjobs.UpdateJobExecutionRequest(
                thing_name=thing, job_id="sdk-ota-1", status="SUCCEEDED", expected_version=2,
                status_details={"reason": "accepted v1.6.0"}, include_job_execution_state=True,
                include_job_document=True, client_token="tok-upd",
            ),
            mqtt.QoS.AT_LEAST_ONCE,
        ).result(TIMEOUT)
        updated = inbox.get("updated")
        assert updated.client_token == "tok-upd" and updated.execution_state.status == "SUCCEEDED"
        assert updated.execution_state.version_number == 3 and updated.job_document["target_version"] == "1.6.0"
        assert inbox.get("next").execution is None  # nothing pending now

        # a refused transition comes back as a modeled RejectedError
        jobs.publish_update_job_execution(
            iotjobs.UpdateJobExecutionRequest(thing_name=thing, job_id="sdk-ota-1", status="IN_PROGRESS",
                                              client_token="tok-bad"),
            mqtt.QoS.AT_LEAST_ONCE,
        ).result(TIMEOUT)
        rejected = inbox.get("update-rejected")
        assert rejected.code == "InvalidStateTransition" and rejected.client_token == "tok-bad"
        assert rejected.execution_state.status == "SUCCEEDED"
        assert service.execution("sdk-ota-1", thing)["status"] == "SUCCEEDED"
    finally:
        conn.disconnect().result(TIMEOUT)


def test_iot_jobs_client_v2_matches_replies_by_client_token(lab):
    broker, service, _ = lab
    thing = "sdk-cart-v2"
    conn = connect(broker, thing, metrics=False)
    try:
        options = mqtt_rr.ClientOptions(max_request_response_subscriptions=4, max_streaming_subscriptions=2,
                                        operation_timeout_in_seconds=TIMEOUT)
        jobs = iotjobs.IotJobsClientV2(conn, options)
        inbox = Inbox()
        stream = jobs.create_next_job_execution_changed_stream(
            iotjobs.NextJobExecutionChangedSubscriptionRequest(thing_name=thing),
            awsiot.ServiceStreamOptions(
                incoming_event_listener=inbox.cb("next"),
                subscription_status_listener=lambda ev: inbox.put("sub", ev),
            ),
        )
        stream.open()
        status = inbox.get("sub")
        assert status.type == mqtt_rr.SubscriptionStatusEventType.SUBSCRIPTION_ESTABLISHED, status

        service.create_job("sdk-v2-1", [thing], DOC)
        assert inbox.get("next").execution.job_id == "sdk-v2-1"

        started = jobs.start_next_pending_job_execution(
            iotjobs.StartNextPendingJobExecutionRequest(thing_name=thing)
        ).result(TIMEOUT)
        assert started.execution.status == "IN_PROGRESS" and "url" in started.execution.job_document

        pending = jobs.get_pending_job_executions(iotjobs.GetPendingJobExecutionsRequest(thing_name=thing)).result(
            TIMEOUT
        )
        assert [j.job_id for j in pending.in_progress_jobs] == ["sdk-v2-1"]

        described = jobs.describe_job_execution(
            iotjobs.DescribeJobExecutionRequest(thing_name=thing, job_id="sdk-v2-1")
        ).result(TIMEOUT)
        assert described.execution.status == "IN_PROGRESS"

        updated = jobs.update_job_execution(
            iotjobs.UpdateJobExecutionRequest(thing_name=thing, job_id="sdk-v2-1", status="SUCCEEDED",
                                              include_job_execution_state=True)
        ).result(TIMEOUT)
        assert updated.execution_state.status == "SUCCEEDED"
        assert inbox.get("next").execution is None

        with pytest.raises(awsiot.V2ServiceException) as e:
            jobs.update_job_execution(
                iotjobs.UpdateJobExecutionRequest(thing_name=thing, job_id="sdk-v2-1", status="IN_PROGRESS")
            ).result(TIMEOUT)
        assert e.value.modeled_error.code == "InvalidStateTransition"
        del stream
    finally:
        conn.disconnect().result(TIMEOUT)
    assert service.wait_status("sdk-v2-1", thing, "SUCCEEDED", 1)["versionNumber"] == 3
