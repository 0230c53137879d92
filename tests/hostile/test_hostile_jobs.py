"""A hostile device against the lab jobs service (harness.fleet.jobs): the AWS IoT Jobs MQTT API on a
real mosquitto with TLS client certificates, spoken to by a cart's own certificate (the broker lets a
device use only its own ``$aws/things/<thing>/jobs/...`` topics), with whatever it likes in them.

Hypothesis sends, on ``get``, ``start-next``, ``<jobId>/get`` and ``<jobId>/update``, arbitrary bytes,
arbitrary JSON values and valid requests with fields mutated (wrong types, out-of-range numbers,
statusDetails beyond ``[a-zA-Z0-9:_-]{1,128}`` / 1..1024 characters, huge strings, unknown fields,
clientTokens of every type); the job id is arbitrary too: the known job, a terminal one, ``$next``,
valid-looking unknown ids, unicode, and ids up to the longest whose reply topic MQTT can carry.

Each example is one round trip, and what it is held to comes from the AWS IoT Jobs reference
(/work/shared/reference/aws-iot-jobs.md), written out in `expected` below, not taken from the service:

- the service answers on ``<request topic>/accepted`` or ``/rejected`` within `WAIT` seconds;
- a rejection is ``{code, message, timestamp, clientToken?, executionState?}`` with a documented code,
  one the request really deserves (never InternalError), and ``executionState`` exactly for
  VersionMismatch and InvalidStateTransition;
- a valid clientToken is echoed; nothing else is put in its place;
- an accepted reply carries what the operation promises (the pending lists, the execution, the state);
- every execution of the thing is unchanged, except the one a valid transition moved, which moved
  exactly as asked (status, details, version + 1);
- the service logged no error and still serves: a describe of the known job is accepted and agrees
  with the service's own view.

Waits are on the device's message log (a condition variable) with a deadline, never a sleep.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
import unicodedata
import uuid

import paho.mqtt.client as paho
import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from harness.fleet.imagehost import ImageHost
from harness.fleet.jobs import MAX_PAYLOAD, JobsService
from harness.fleet.mqtt import Message, MqttClient, MqttTimeout

HOST = "127.0.0.1"
THING = "cart-hj01"
WAIT = 5.0                 # seconds a reply may take (they take a few ms)
IMAGE = bytes(range(256)) * 16
DOC = {"operation": "ota", "target_version": "9.9.9", "image_id": "fw-hostile"}

DOCUMENTED = {"InvalidTopic", "InvalidJson", "InvalidRequest", "InvalidStateTransition", "ResourceNotFound",
              "VersionMismatch", "InternalError", "RequestThrottled", "TerminalStateReached"}
WITH_STATE = {"VersionMismatch", "InvalidStateTransition"}
DEVICE_STATUSES = {"IN_PROGRESS", "SUCCEEDED", "FAILED", "REJECTED"}
TERMINAL = {"SUCCEEDED", "FAILED", "REJECTED", "REMOVED", "CANCELED", "TIMED_OUT"}
JOB_ID = re.compile(r"[a-zA-Z0-9_-]{1,64}")            # AWS: jobId
DETAIL_KEY = re.compile(r"[a-zA-Z0-9:_-]{1,128}")       # AWS: statusDetails keys
DETAIL_VALUE_MAX = 1024                                  # AWS: statusDetails values, [^\p{C}]+
TOKEN = re.compile(r"[\x21-\x7e]{1,64}")                 # AWS IoT refuses longer client tokens
INT64 = 2**63 - 1
OPS = ("get", "start-next", "describe", "update")
BASE = f"$aws/things/{THING}/jobs/"
# the longest job id whose reply topic (request topic + "/accepted") still fits MQTT's 65535 bytes
LONGEST_ANSWERABLE = 65535 - len(BASE) - len("/update") - len("/accepted")


# --------------------------------------------------------------------------------------------------
# the lab: one broker, one service, one device connection for the module


class _Errors(logging.Handler):
    """ERROR records of harness.fleet.jobs (the service's thread logs what it could not handle)."""

    def __init__(self):
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []
        self.event = threading.Event()

    def emit(self, record):
        self.records.append(record)
        self.event.set()

    def take(self) -> list[str]:
        out = [r.getMessage()[:300] + (f" ({r.exc_info[1]!r})" if r.exc_info else "") for r in self.records]
        self.records.clear()
        self.event.clear()
        return out


class Lab:
    def __init__(self, broker, service: JobsService, device: MqttClient, errors: _Errors):
        self.broker = broker
        self.service = service
        self.device = device
        self.errors = errors
        self.job_ids: list[str] = []      # every job of THING, oldest first
        self._n = 0

    # jobs ---------------------------------------------------------------------------------------
    def new_job(self) -> str:
        self._n += 1
        job_id = f"known-{self._n}"
        self.service.create_job(job_id, [THING], DOC)
        self.job_ids.append(job_id)
        return job_id

    def state(self) -> dict[str, dict]:
        """Every execution of THING as the service holds it (the oracle's view, not the device's)."""
        out = {}
        for j in self.job_ids:
            ex = self.service.execution(j, THING)
            ex.pop("approximateSecondsBeforeTimedOut", None)  # a countdown, not state
            out[j] = ex
        return out

    def pending(self, state: dict[str, dict]) -> list[str]:
        """Pending executions in AWS order: IN_PROGRESS first, then QUEUED, each oldest first."""
        return ([j for j in self.job_ids if state[j]["status"] == "IN_PROGRESS"]
                + [j for j in self.job_ids if state[j]["status"] == "QUEUED"])

    def known(self) -> str:
        """The thing's next pending job (made if there is none)."""
        self.refill()
        return self.pending(self.state())[0]

    def terminal(self) -> str:
        return [j for j in self.job_ids if self.service.execution(j, THING)["status"] in TERMINAL][-1]

    def refill(self) -> None:
        if not self.pending(self.state()):
            self.new_job()

    # the wire -----------------------------------------------------------------------------------
    def round_trip(self, topic: str, payload: bytes, token: str | None = None, timeout: float = WAIT) -> Message:
        """Publish ``payload`` on ``topic``; the reply on ``topic/accepted|rejected`` (with ``token``, if
        given), waited for on the device's log with a deadline."""
        since = self.device.log.cursor()
        self.device.publish(topic, payload, wait=False)
        pred = None if token is None else (lambda m: json.loads(m.payload).get("clientToken") == token)
        return self.device.log.wait_for(topic + "/+", pred, timeout, since=since,
                                        what=f"the jobs service's answer to {topic[:120]!r} ({len(payload)} bytes)")

    def assert_serving(self) -> None:
        """No error logged, and a valid describe of the known job is accepted and agrees with the service."""
        assert self.errors.take() == []
        job_id, token = self.known(), uuid.uuid4().hex
        msg = self.round_trip(f"{BASE}{job_id}/get", json.dumps({"clientToken": token}).encode(), token)
        assert msg.topic.endswith("/accepted"), msg.brief()
        ex = json.loads(msg.payload)["execution"]
        ex.pop("approximateSecondsBeforeTimedOut", None)
        doc = ex.pop("jobDocument")
        assert ex == self.state()[job_id]
        assert "image_id" not in doc and doc["url"].startswith("http://"), doc
        assert self.errors.take() == []


@pytest.fixture(scope="module")
def lab(tmp_path_factory, broker_factory):
    errors = _Errors()
    jobs_log = logging.getLogger("harness.fleet.jobs")
    jobs_log.addHandler(errors)
    with broker_factory(tmp_path_factory, "hostile-jobs", []) as broker:
        svc = MqttClient(HOST, broker.port, *broker.client_files("harness"), client_id="svc-hostile-jobs")
        svc.connect(5)
        # the device: its own certificate (CN = its thing name), as the broker's per-thing ACL requires
        dev = MqttClient(HOST, broker.port, *broker.ensure_client_cert(THING), client_id=f"dev-{THING}")
        dev.connect(5)
        dev.subscribe(BASE + "#")
        host = ImageHost()
        host.add("fw-hostile", IMAGE)
        service = JobsService(svc, host, things=[THING])  # minute_s=60: no step timer fires during the run
        try:
            lb = Lab(broker, service, dev, errors)
            done = lb.new_job()
            service.cancel(done)  # a terminal execution from the start (CANCELED)
            lb.new_job()
            lb.assert_serving()
            yield lb
        finally:
            service.close()
            host.close()
            dev.close()
            svc.close()
            jobs_log.removeHandler(errors)


# --------------------------------------------------------------------------------------------------
# what the reference says each request deserves


class _Ref:
    """A job id decided when the example runs (the known job changes as valid transitions land)."""

    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return f"<{self.name}>"


KNOWN, DONE = _Ref("known job"), _Ref("terminal job")
VERSION, VERSION_PLUS_1 = _Ref("current version"), _Ref("current version + 1")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _int_ok(v, lo: int, hi: int, *also: int) -> bool:
    return v is None or (_is_int(v) and (lo <= v <= hi or v in also))


def _bool_ok(v) -> bool:
    return v is None or isinstance(v, bool)


def _details_ok(v) -> bool:
    if v is None:
        return True
    if not isinstance(v, dict):
        return False
    return all(
        DETAIL_KEY.fullmatch(k) and isinstance(val, str) and 1 <= len(val) <= DETAIL_VALUE_MAX
        and not any(unicodedata.category(c).startswith("C") for c in val)
        for k, val in v.items()
    )


def _reject_constant(name):
    raise ValueError(name)


def parse(payload: bytes) -> tuple[object, str | None]:
    """(the request, or None) and the shape error it has, if any."""
    if len(payload) > MAX_PAYLOAD:                     # AWS IoT: 128 KiB per message
        return None, "InvalidRequest"
    if not payload.strip():
        return {}, None                                 # no body: an empty request
    try:
        req = json.loads(payload.decode("utf-8"), parse_constant=_reject_constant)  # NaN is not JSON
    except (ValueError, RecursionError):
        return None, "InvalidJson"
    if not isinstance(req, dict):
        return req, "InvalidRequest"
    return req, None


def token_of(req) -> tuple[str | None, bool]:
    """(the token to echo, whether the token is acceptable)."""
    if not isinstance(req, dict) or req.get("clientToken") is None:
        return None, True
    tok = req["clientToken"]
    if isinstance(tok, str) and TOKEN.fullmatch(tok):
        return tok, True
    return None, False


def expected(op: str, job_id: str | None, payload: bytes, state: dict[str, dict], pending: list[str]) -> set[str]:
    """The outcomes the request may get: {"accepted"}, or the rejection codes it deserves (several when
    it has several faults: the reference does not order the checks)."""
    req, shape = parse(payload)
    faults: set[str] = set()
    if shape:
        faults.add(shape)
    if not token_of(req)[1]:
        faults.add("InvalidRequest")
    if job_id is not None and not (JOB_ID.fullmatch(job_id) or (op == "describe" and job_id == "$next")):
        faults.add("InvalidTopic")
    if isinstance(req, dict) and not shape:
        g = req.get
        ok = True
        if op == "describe":
            ok = _int_ok(g("executionNumber"), 1, INT64) and _bool_ok(g("includeJobDocument"))
        elif op == "start-next":
            ok = _details_ok(g("statusDetails")) and _int_ok(g("stepTimeoutInMinutes"), 1, 10080)
        elif op == "update":
            ok = (isinstance(g("status"), str) and g("status") in DEVICE_STATUSES
                  and _details_ok(g("statusDetails")) and _int_ok(g("expectedVersion"), 0, INT64)
                  and _int_ok(g("executionNumber"), 1, INT64) and _bool_ok(g("includeJobExecutionState"))
                  and _bool_ok(g("includeJobDocument")) and _int_ok(g("stepTimeoutInMinutes"), 1, 10080, -1))
        if not ok:
            faults.add("InvalidRequest")
    if faults:
        return faults
    # a well-formed request: what it finds decides
    if op in ("get", "start-next"):
        return {"accepted"}
    if job_id == "$next":  # the next pending execution, or nothing
        if not pending:
            return {"accepted"}
        job_id = pending[0]
    ex = state.get(job_id)
    number = req.get("executionNumber")
    if ex is None or (number is not None and number != ex["executionNumber"]):
        return {"ResourceNotFound"}
    if op == "describe":
        return {"accepted"}
    version = req.get("expectedVersion")
    if version is not None and version != ex["versionNumber"]:
        return {"VersionMismatch"}
    if ex["status"] in TERMINAL:
        return {"InvalidStateTransition"}
    return {"accepted"}


def _resolve(v, lab: Lab, job_id: str | None):
    """Replace the _Ref placeholders in a generated request with this moment's values."""
    if isinstance(v, _Ref):
        version = lab.state()[job_id]["versionNumber"] if job_id in lab.job_ids else 1
        return version if v is VERSION else version + 1
    if isinstance(v, dict):
        return {k: _resolve(x, lab, job_id) for k, x in v.items()}
    if isinstance(v, list):
        return [_resolve(x, lab, job_id) for x in v]
    return v


def _epoch_ok(v) -> bool:
    return _is_int(v) and abs(v - time.time()) < 60


def _exec_state(ex: dict) -> dict:
    """An execution's ``executionState`` (a QUEUED one without details shows none in its payload)."""
    return {"status": ex["status"], "statusDetails": ex.get("statusDetails", {}), "versionNumber": ex["versionNumber"]}


def _transition(before: dict, status: str, details: dict | None) -> dict:
    want = dict(before, status=status, versionNumber=before["versionNumber"] + 1)
    if details is not None:
        want["statusDetails"] = details
    want.setdefault("statusDetails", {})  # a QUEUED execution without details shows none
    return want


def exchange(lab: Lab, op: str, job_ref, payload: bytes) -> str:
    """One hostile request and everything it is held to; returns the outcome ("accepted" or the code)."""
    lab.refill()
    job_id = lab.known() if job_ref is KNOWN else lab.terminal() if job_ref is DONE else job_ref
    if op == "describe":
        topic = f"{BASE}{job_id}/get"
    elif op == "update":
        topic = f"{BASE}{job_id}/update"
    else:
        topic, job_id = BASE + op, None
    before = lab.state()
    pending = lab.pending(before)
    allowed = expected(op, job_id, payload, before, pending)
    req, _ = parse(payload)
    token, token_ok = token_of(req)
    t0 = time.time()

    msg = lab.round_trip(topic, payload)
    outcome = msg.topic[len(topic) + 1:]
    body = json.loads(msg.payload)
    after = lab.state()
    what = f"{op} on {topic[:100]!r} with {payload[:300]!r}: {outcome} {str(body)[:400]}"

    assert outcome in ("accepted", "rejected"), what
    assert isinstance(body, dict) and _epoch_ok(body.get("timestamp")), what
    if token is not None:
        assert body.get("clientToken") == token, what
    elif token_ok:
        assert "clientToken" not in body, what
    else:  # a token AWS would refuse: echoed as sent, or not at all
        assert body.get("clientToken", req["clientToken"]) == req["clientToken"], what
    code = "accepted"
    if outcome == "rejected":
        code = body.get("code")
        assert code in DOCUMENTED and code != "InternalError", what
        assert set(body) <= {"code", "message", "timestamp", "clientToken", "executionState"}, what
        assert isinstance(body.get("message"), str) and body["message"], what
        if code in WITH_STATE:
            ex = before[job_id]
            assert body["executionState"] == _exec_state(ex), what
        else:
            assert "executionState" not in body, what
    assert code in allowed, f"expected one of {sorted(allowed)}; {what}"
    handled = [r for r in lab.service.requests() if r.topic == topic]
    assert handled and handled[-1].outcome == code, what

    # the state: unchanged, except what a valid transition moved
    want = dict(before)
    if code == "accepted" and op == "update":
        want[job_id] = _transition(before[job_id], req["status"], req.get("statusDetails"))
    elif code == "accepted" and op == "start-next" and before[pending[0]]["status"] == "QUEUED":
        want[pending[0]] = _transition(before[pending[0]], "IN_PROGRESS", req.get("statusDetails") or {})
    for j in want:
        if want[j] is not before[j]:  # moved: its clocks moved with it
            moved = after[j]
            assert moved["lastUpdatedAt"] >= int(t0) - 1, what
            want[j] = dict(want[j], lastUpdatedAt=moved["lastUpdatedAt"])
            if before[j]["status"] == "QUEUED" and want[j]["status"] == "IN_PROGRESS":  # it started
                assert _epoch_ok(moved.get("startedAt")), what
                want[j]["startedAt"] = moved["startedAt"]
    assert after == want, what

    # what an accepted reply carries
    if code == "accepted":
        if op == "get":
            assert [s["jobId"] for s in body["inProgressJobs"]] == [j for j in pending if before[j]["status"]
                                                                   == "IN_PROGRESS"], what
            assert [s["jobId"] for s in body["queuedJobs"]] == [j for j in pending if before[j]["status"]
                                                               == "QUEUED"], what
        elif op in ("describe", "start-next"):
            shown = job_id if op == "describe" and job_id != "$next" else pending[0]
            ex = dict(body["execution"])
            ex.pop("approximateSecondsBeforeTimedOut", None)
            doc = ex.pop("jobDocument", None)
            assert ex == after[shown], what
            if op == "start-next" or req.get("includeJobDocument") is not False:
                assert doc is not None and doc["url"].startswith("http://") and "image_id" not in doc, what
            else:
                assert doc is None, what
        else:
            if req.get("includeJobExecutionState") is True:
                ex = after[job_id]
                assert body["executionState"] == _exec_state(ex)
            else:
                assert "executionState" not in body, what
            assert ("jobDocument" in body) == (req.get("includeJobDocument") is True), what

    lab.refill()
    lab.assert_serving()
    return code


# --------------------------------------------------------------------------------------------------
# strategies


def _mqtt_char(c: str) -> bool:
    # what mosquitto refuses in a topic (it drops the message, or the connection): not the service's case
    cp = ord(c)
    return not (0xFDD0 <= cp <= 0xFDEF or (cp & 0xFFFE) == 0xFFFE)


TOPIC_CHARS = st.characters(blacklist_categories=("Cc", "Cs"), blacklist_characters="/+#").filter(_mqtt_char)

job_refs = st.one_of(
    st.sampled_from([KNOWN, KNOWN, DONE, "$next", "", "known-0", "-", "_", "x" * 64, "x" * 65]),
    st.from_regex(JOB_ID, fullmatch=True),                       # valid, but no such job
    st.text(TOPIC_CHARS, max_size=70),                           # anything a topic level may hold
    st.integers(65, LONGEST_ANSWERABLE).map(lambda n: "j" * n),  # too long, up to MQTT's limit
)
ops = st.sampled_from(OPS)

scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True)
           | st.text(max_size=40))
json_values = st.recursive(
    scalars,
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=12), kids, max_size=4),
    max_leaves=12,
)
huge = st.sampled_from([1025, 4096, 20_000, 140_000]).map(lambda n: "é" * n)
odd = st.one_of(
    json_values,
    huge,
    st.sampled_from([0, -1, -2, 10081, 10080, 1, INT64, INT64 + 1, 2**64, -(2**63), 1.0, 1.5, 1e308, "1", "", [],
                     {}, True, False, None, float("inf"), float("nan"), "IN_PROGRESS", "QUEUED", "in_progress"]),
)
detail_keys = st.one_of(
    st.from_regex(DETAIL_KEY, fullmatch=True),
    st.sampled_from(["", "k" * 128, "k" * 129, "a b", "a/b", "ключ", "k\n", "$k", "a.b"]),
    st.text(max_size=140),
)
PRINTABLE = st.characters(blacklist_categories=("C",))   # AWS: statusDetails values are [^\p{C}]+
detail_values = st.one_of(
    st.text(PRINTABLE, min_size=1, max_size=30),
    st.sampled_from(["", "v" * 1024, "v" * 1025, "é" * 1024, "tab\there", "nl\n", "\u200b", "\ud800", "ok"]),
    odd,
)
details = st.one_of(st.dictionaries(detail_keys, detail_values, max_size=4),
                    st.dictionaries(st.from_regex(DETAIL_KEY, fullmatch=True), st.text(PRINTABLE, min_size=1,
                                                                                         max_size=20), max_size=3),
                    odd)
tokens = st.one_of(
    st.from_regex(TOKEN, fullmatch=True),
    st.sampled_from(["", " ", "t" * 64, "t" * 65, "tok en", "tøk", "\x00", 7, 0, True, None, [], {"a": 1}, 1.5]),
    st.text(max_size=80),
    odd,
)
statuses = st.one_of(st.sampled_from(sorted(DEVICE_STATUSES)), st.sampled_from(
    ["QUEUED", "TIMED_OUT", "CANCELED", "REMOVED", "succeeded", " SUCCEEDED", "SUCCEEDED\x00", ""]), odd)
FIELD_VALUES = {
    "status": statuses,
    "statusDetails": details,
    "expectedVersion": st.one_of(st.sampled_from([VERSION, VERSION, VERSION_PLUS_1, 0]), odd),
    "executionNumber": st.one_of(st.sampled_from([1, 1, 2, 0]), odd),
    "stepTimeoutInMinutes": st.one_of(st.sampled_from([1, 10080, -1, 0, 10081, 60]), odd),
    "includeJobExecutionState": st.one_of(st.booleans(), odd),
    "includeJobDocument": st.one_of(st.booleans(), odd),
    "clientToken": tokens,
}


@st.composite
def mutated(draw):
    """A valid request for the operation, then a few fields replaced, dropped or added."""
    op = draw(st.sampled_from(["get", "start-next", "describe", "describe", "update", "update", "update"]))
    req: dict = {"clientToken": uuid.UUID(int=draw(st.integers(0, 2**128 - 1))).hex}
    if op == "update":
        req["status"] = draw(st.sampled_from(sorted(DEVICE_STATUSES)))
        req["statusDetails"] = {"step": "download", "progress": "3/7"}
        version = draw(st.sampled_from([VERSION, VERSION, VERSION_PLUS_1, 0, None]))
        if version is not None:
            req["expectedVersion"] = version
    elif op == "start-next":
        req["statusDetails"] = {"step": "start"}
    elif op == "describe":
        req["includeJobDocument"] = True
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(["set", "set", "set", "drop", "unknown"]))
        if kind == "set":
            name = draw(st.sampled_from(sorted(FIELD_VALUES)))
            req[name] = draw(FIELD_VALUES[name])
        elif kind == "drop" and req:
            req.pop(draw(st.sampled_from(sorted(req))))
        else:
            req[draw(st.text(max_size=20))] = draw(odd)
    job = None
    if op in ("describe", "update"):  # mostly jobs that exist: their state is what may (not) change
        job = draw(st.sampled_from([KNOWN, KNOWN, KNOWN, DONE, "$next"]) if draw(st.integers(0, 3)) else job_refs)
    return op, job, req


def encode(obj, ascii_only: bool) -> bytes:
    # lone surrogates pass through as (invalid) UTF-8 when not escaped: the service must say InvalidJson
    return json.dumps(obj, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


FUZZ = settings(max_examples=150, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# --------------------------------------------------------------------------------------------------
# the tests


@FUZZ
@given(op=ops, job=job_refs, payload=st.one_of(
    st.binary(max_size=300),
    st.sampled_from([b"", b" \n", b"{}", b"{", b"null", b"[]", b"\xef\xbb\xbf{}", b"\xff\xfe{\x00}\x00", b"NaN",
                     b'{"clientToken":"t"}\x00', b'{"a":1}{"b":2}']),
))
def test_arbitrary_bytes_get_a_documented_answer(lab, op, job, payload):
    event(f"{op}: {exchange(lab, op, job, payload)}")  # pytest --hypothesis-show-statistics


@FUZZ
@given(op=ops, job=job_refs, value=json_values, ascii_only=st.booleans())
def test_arbitrary_json_values_get_a_documented_answer(lab, op, job, value, ascii_only):
    event(f"{op}: {exchange(lab, op, job, encode(value, ascii_only))}")


@settings(FUZZ, max_examples=200)
@given(case=mutated(), ascii_only=st.booleans())
@example(case=("update", KNOWN, {"status": "SUCCEEDED", "clientToken": "t" * 65}), ascii_only=True)
@example(case=("update", DONE, {"status": "SUCCEEDED", "expectedVersion": VERSION}), ascii_only=True)
@example(case=("update", KNOWN, {"status": "IN_PROGRESS", "statusDetails": {"k" * 129: "v"}}), ascii_only=True)
@example(case=("update", KNOWN, {"status": "IN_PROGRESS", "statusDetails": {"k": "v" * 1025}}), ascii_only=True)
@example(case=("update", KNOWN, {"status": "IN_PROGRESS", "statusDetails": {"k" * 128: "é" * 1024}}),
         ascii_only=False)
@example(case=("update", KNOWN, {"status": "IN_PROGRESS", "expectedVersion": VERSION_PLUS_1}), ascii_only=True)
@example(case=("start-next", None, {"stepTimeoutInMinutes": -1}), ascii_only=True)
@example(case=("describe", "$next", {"executionNumber": 2}), ascii_only=True)
@example(case=("update", "$next", {"status": "SUCCEEDED"}), ascii_only=True)
def test_mutated_requests_get_a_documented_answer_and_change_only_what_they_may(lab, case, ascii_only):
    op, job, req = case
    job_id = lab.known() if job is KNOWN else lab.terminal() if job is DONE else job
    event(f"{op}: {exchange(lab, op, job_id, encode(_resolve(req, lab, job_id), ascii_only))}")


def _nested(depth: int) -> bytes:
    return b'{"clientToken":"deep","x":' + b"[" * depth + b"]" * depth + b"}"


@pytest.mark.parametrize("payload", [
    pytest.param(b'{"clientToken":"edge"}' + b" " * (MAX_PAYLOAD - 22), id="exactly-128KiB"),
    pytest.param(b'{"clientToken":"edge"}' + b" " * (MAX_PAYLOAD - 21), id="128KiB-plus-1"),
    pytest.param(b"{" * (1 << 20), id="1MiB-of-braces"),
    pytest.param(b"[" * 100_000, id="unclosed-100k-deep"),
    pytest.param(_nested(900), id="closed-900-deep"),
    pytest.param(_nested(50_000), id="closed-50k-deep"),
    pytest.param(b'{"clientToken":"big","expectedVersion":' + b"9" * 5000 + b"}", id="5000-digit-int"),
    pytest.param(b'{"clientToken":"dup","status":"SUCCEEDED","status":7}', id="duplicate-key"),
    pytest.param(b'{"clientToken":"esc","status":"\\u0053UCCEEDED","statusDetails":{"k":"\\ud800"}}', id="escapes"),
])
@pytest.mark.parametrize("op", OPS)
def test_absurd_payloads_get_a_documented_answer(lab, op, payload):
    exchange(lab, op, KNOWN, payload)


def test_a_job_id_up_to_the_longest_answerable_is_invalid_topic(lab):
    for n in (65, 1000, 65_000, LONGEST_ANSWERABLE):
        assert exchange(lab, "update", "j" * n, b'{"clientToken":"long","status":"SUCCEEDED"}') == "InvalidTopic"


@pytest.mark.parametrize("char", ["\x01", "\x1f", "\x7f", "\x85", "\ufdd0", "\ufffe", "\U0010ffff"])
def test_a_topic_the_broker_refuses_never_reaches_the_service(lab, char):
    """mosquitto refuses a PUBLISH whose topic holds a control character or a Unicode noncharacter: it drops
    the connection ("malformed packet"), so the strategies above leave those characters out. Sent here on a
    connection of its own (plain paho 2.x, the thing's certificate): the broker drops that connection, the
    service never sees the request, and it goes on answering the module's device."""
    topic = f"{BASE}a{char}b/get"
    ca, cert, key = lab.broker.ensure_client_cert(THING)
    connected, dropped = threading.Event(), threading.Event()
    c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"dev-{THING}-refused", protocol=paho.MQTTv311)
    c.tls_set(ca_certs=str(ca), certfile=str(cert), keyfile=str(key))
    c.on_connect = lambda *a: connected.set()
    c.on_disconnect = lambda *a: dropped.set()
    c.reconnect_delay_set(0.01, 0.01)  # loop_stop waits out the network thread's reconnect delay
    c.connect(HOST, lab.broker.port)
    c.loop_start()
    try:
        assert connected.wait(WAIT), "no CONNACK"
        c.publish(topic, b'{"clientToken":"refused"}', qos=0)
        assert dropped.wait(WAIT), "the broker kept a connection that sent a malformed topic"
    finally:
        c.disconnect()
        c.loop_stop()
    assert exchange(lab, "describe", KNOWN, b'{"clientToken":"after"}') == "accepted"
    assert not [r for r in lab.service.requests() if r.topic == topic]


def test_a_request_whose_reply_topic_cannot_exist_breaks_nothing(lab):
    """No reply can exist for it (its topic would exceed MQTT's limit); what the service then owes is to
    break nothing: no error, and the next job is still announced (notify-next)."""
    thing = "cart-hj02"  # its own thing: the job made here must not disturb the module's known job
    base = f"$aws/things/{thing}/jobs/"
    lab.service.serve(thing)
    barrier = base + "barrier"  # the service's client sees it after the request, so after its handling
    lab.service.mqtt.subscribe(barrier)
    dev = MqttClient(HOST, lab.broker.port, *lab.broker.ensure_client_cert(thing), client_id=f"dev-{thing}")
    dev.connect(5)
    try:
        dev.subscribe(base + "#")
        topic = base + "j" * (65535 - len(base) - len("/update")) + "/update"  # the longest topic MQTT allows
        since, svc_since = dev.log.cursor(), lab.service.mqtt.log.cursor()
        lab.errors.take()
        dev.publish(topic, b'{"clientToken":"longest","status":"SUCCEEDED"}', wait=True)
        dev.publish(barrier, b"{}", wait=True)
        lab.service.mqtt.log.wait_for(barrier, None, WAIT, since=svc_since)
        errors = lab.errors.take()
        lab.service.create_job("after-longest", [thing], DOC)
        try:
            told = dev.log.wait_for(base + "notify-next", lambda m: "execution" in json.loads(m.payload), 2,
                                    since=since)
        except MqttTimeout:
            told = None
        problems = [f"the service logged {errors}"] if errors else []
        if told is None:
            problems.append("notify-next for a job created after that request never came")
        assert not problems, f"a request on a {len(topic)}-byte topic: " + "; ".join(problems)
    finally:
        dev.close()
        lab.service.mqtt.unsubscribe(barrier)
        lab.assert_serving()  # a device request: it resets the service's deferred notifications
