"""The lab jobs service: the AWS IoT Jobs MQTT API on the lab broker, for any thing.

Firmware written for AWS IoT Jobs runs against it unchanged (an unmodified AWS IoT device SDK
jobs client does; see tests/test_awsiot_sdk.py). Topics, all ``$aws/things/{thing}/jobs/...``:

==========================  ============================================================
device publishes            service answers on (``<request topic>/accepted|rejected``)
==========================  ============================================================
``get``                     pending list: ``inProgressJobs``, ``queuedJobs`` (summaries)
``{jobId}/get``             ``execution`` (``$next``: the next pending one, if any)
``start-next``              ``execution`` started (QUEUED -> IN_PROGRESS), if any pending
``{jobId}/update``          ``executionState`` / ``jobDocument`` when asked for
==========================  ============================================================

Subscriptions are explicit ``$aws/things/+/jobs/...`` filters (a leading wildcard never matches a
``$`` topic). Exactly one service may answer a thing: harness workers sharing a broker each build
theirs with ``things=[their carts]`` (or `serve` them one by one), else every service would answer
every request and a device would get one reply per service.

Pushed: ``notify-next`` (``{"timestamp", "execution"?}``) whenever the thing's next pending
execution changes, ``notify`` (``{"timestamp", "jobs": {"QUEUED": [...], "IN_PROGRESS": [...]}}``)
whenever its pending list changes. Every timestamp is integer epoch seconds; every reply echoes
the request's ``clientToken``; every rejection is ``{"code", "message", "timestamp", "clientToken"?,
"executionState"?}``. A malformed request of any size or shape is rejected, never fatal.

Statuses: a device may set IN_PROGRESS, SUCCEEDED, FAILED, REJECTED (from QUEUED or IN_PROGRESS;
IN_PROGRESS -> IN_PROGRESS updates the details). The service sets TIMED_OUT (step timer or
in-progress timer, each a scheduled deadline) and CANCELED (`cancel`). Every update of a terminal
execution is refused with ``InvalidStateTransition`` and the execution's ``executionState`` (status,
statusDetails, versionNumber), whatever status it asks for: IN_PROGRESS again, another terminal
status, or the same terminal status once more (a retry is not idempotent: its rejection's
``executionState`` tells the device that its first update landed). This follows the AWS IoT Jobs
ErrorResponse reference: "InvalidStateTransition: An update attempted to change the job execution
to a state that is invalid because of the job execution's current state (for example, an attempt to
change a request in state SUCCEEDED to state IN_PROGRESS). In this case, the body of the error
message also contains the executionState field." AWS documents ``TerminalStateReached`` only for
describing ("Occurs when a command to describe a job is performed on a job that is in a terminal
state"), never for an update, so an update never gets it (and a describe of a terminal execution
is answered, as a device that lost an update reply needs). Checks run in this order: request shape
(InvalidJson, InvalidRequest, InvalidTopic), existence and executionNumber (ResourceNotFound),
expectedVersion (VersionMismatch), terminal state (InvalidStateTransition); a refused update changes
nothing (status, details, version, timers, history).

Timeouts in the lab: ``stepTimeoutInMinutes`` from a device (1..10080, or -1 on update to clear the
step timer, as AWS allows) is multiplied by ``minute_s`` (default 60 s; a virtual rig may scale it
down). `create_job` takes ``step_timeout_s`` (a default step timer, started when an execution goes
IN_PROGRESS, replaced when the device sends a new ``stepTimeoutInMinutes``) and
``in_progress_timeout_s`` (AWS ``inProgressTimeoutInMinutes``: from IN_PROGRESS, never reset).

The job document is stored as a template. If it holds ``image_id``, every read by a device
(get, start-next, notify-next, update with includeJobDocument) replaces it, in place, with ``url``:
a presigned URL freshly minted by the image host (presigned URLs expire, so a device stalled
past expiry fetches the document again). ``sha256`` and ``size`` are filled from the image host
at `create_job` when the template leaves them out. Anything else in the document is sent as is
(a malformed document is a legitimate negative test).

Every execution status change is a `StatusChange`, kept in `history` and passed to listeners
(`add_listener`; e.g. telemetry) in order, under the service lock: listeners must be quick and
must not wait on the service.
"""

from __future__ import annotations

import copy
import heapq
import itertools
import json
import logging
import math
import re
import threading
import time
import unicodedata
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from .mqtt import Message, MqttClient

if TYPE_CHECKING:
    from .imagehost import ImageHost

__all__ = [
    "DEVICE_STATUSES",
    "JobRequest",
    "JobsError",
    "JobsService",
    "JobsTimeout",
    "Job",
    "StatusChange",
    "STATUSES",
    "SUBSCRIPTIONS",
    "subscriptions",
    "TERMINAL",
]

log = logging.getLogger(__name__)

QUEUED, IN_PROGRESS, SUCCEEDED, FAILED = "QUEUED", "IN_PROGRESS", "SUCCEEDED", "FAILED"
TIMED_OUT, REJECTED, REMOVED, CANCELED = "TIMED_OUT", "REJECTED", "REMOVED", "CANCELED"
STATUSES = (QUEUED, IN_PROGRESS, SUCCEEDED, FAILED, TIMED_OUT, REJECTED, REMOVED, CANCELED)
DEVICE_STATUSES = frozenset({IN_PROGRESS, SUCCEEDED, FAILED, REJECTED})
TERMINAL = frozenset({SUCCEEDED, FAILED, REJECTED, REMOVED, CANCELED, TIMED_OUT})
PENDING = frozenset({QUEUED, IN_PROGRESS})

SUBSCRIPTIONS = (
    "$aws/things/+/jobs/get",
    "$aws/things/+/jobs/start-next",
    "$aws/things/+/jobs/+/get",
    "$aws/things/+/jobs/+/update",
)


def subscriptions(thing: str = "+") -> list[str]:
    """The request topics the service subscribes to, for one thing or (``+``) for all."""
    return [f.replace("$aws/things/+/", f"$aws/things/{thing}/", 1) for f in SUBSCRIPTIONS]

MAX_PAYLOAD = 128 * 1024          # bytes; AWS IoT's MQTT payload limit
_MAX_TOPIC_BYTES = 65535          # MQTT: a topic name is at most 65535 bytes of UTF-8
STEP_TIMEOUT_MIN, STEP_TIMEOUT_MAX = 1, 10080
_THING_RE = re.compile(r"[a-zA-Z0-9:_-]{1,128}")
_JOB_RE = re.compile(r"[a-zA-Z0-9_-]{1,64}")
_DETAIL_KEY_RE = re.compile(r"[a-zA-Z0-9:_-]{1,128}")
_DETAIL_VALUE_MAX = 1024
_TOKEN_RE = re.compile(r"[\x21-\x7e]{1,64}")


class JobsError(Exception):
    """A harness-side request to the jobs service was refused (``code`` as AWS would name it)."""

    def __init__(self, message: str, code: str = "InvalidRequest"):
        super().__init__(message)
        self.code = code


class JobsTimeout(JobsError, TimeoutError):
    def __init__(self, message: str):
        super().__init__(message, "Timeout")


class JobsAborted(JobsError):
    """A wait ended early: what the waiter watched (the cart) showed the job can no longer end well."""

    def __init__(self, message: str):
        super().__init__(message, "Aborted")


class _Rejected(Exception):
    def __init__(self, code: str, message: str, execution: _Execution | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.execution = execution


def _epoch() -> int:
    return int(time.time())


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))


# --------------------------------------------------------------------------------------------------
# records


@dataclass(frozen=True)
class StatusChange:
    """One execution status change. ``t`` is ``time.monotonic()`` when it was applied; ``t_request``
    the receipt time of the device request that caused it (None for the service's own changes)."""

    job_id: str
    thing: str
    old: str
    new: str
    status_details: dict[str, str]
    version: int
    source: str           # "device", "start-next", "step-timeout", "in-progress-timeout", "cancel", "create"
    t: float
    timestamp: int        # epoch seconds
    t_request: float | None = None
    client_token: str | None = None

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class JobRequest:
    """One device request as the service handled it (evidence, and the service's own latency)."""

    topic: str
    thing: str
    operation: str
    t_received: float     # paho handed the message over (monotonic)
    t_handled: float      # the reply was published (monotonic)
    outcome: str          # "accepted" or the rejection code
    client_token: str | None


@dataclass
class Job:
    job_id: str
    targets: tuple[str, ...]
    document: dict             # the template (``image_id`` kept; minted into ``url`` on read)
    status: str = IN_PROGRESS  # IN_PROGRESS, CANCELED, COMPLETED
    created_at: int = 0
    step_timeout_s: float | None = None
    in_progress_timeout_s: float | None = None
    url_ttl_s: float | None = None


@dataclass
class _Execution:
    job: Job
    thing: str
    seq: int
    queued_at: int
    status: str = QUEUED
    status_details: dict[str, str] = field(default_factory=dict)
    started_at: int | None = None
    last_updated_at: int = 0
    version: int = 1
    execution_number: int = 1
    step_deadline: float | None = None     # monotonic
    step_timer: _Timer | None = None
    progress_timer: _Timer | None = None
    history: list[StatusChange] = field(default_factory=list)

    @property
    def job_id(self) -> str:
        return self.job.job_id

    def summary(self) -> dict:
        d = {"jobId": self.job_id, "queuedAt": self.queued_at}
        if self.started_at is not None:
            d["startedAt"] = self.started_at
        d.update(lastUpdatedAt=self.last_updated_at, versionNumber=self.version,
                 executionNumber=self.execution_number)
        return d

    def state(self) -> dict:
        return {"status": self.status, "statusDetails": dict(self.status_details), "versionNumber": self.version}

    def payload(self, document: dict | None) -> dict:
        d: dict[str, Any] = {"jobId": self.job_id, "thingName": self.thing, "status": self.status}
        if self.status != QUEUED or self.status_details:
            d["statusDetails"] = dict(self.status_details)
        d["queuedAt"] = self.queued_at
        if self.started_at is not None:
            d["startedAt"] = self.started_at
        d.update(lastUpdatedAt=self.last_updated_at, versionNumber=self.version,
                 executionNumber=self.execution_number)
        if self.step_deadline is not None and self.status == IN_PROGRESS:
            d["approximateSecondsBeforeTimedOut"] = max(0, math.ceil(self.step_deadline - time.monotonic()))
        if document is not None:
            d["jobDocument"] = document
        return d


# --------------------------------------------------------------------------------------------------
# deadlines: one thread, a heap, a condition variable


class _Timer:
    __slots__ = ("deadline", "fn", "cancelled")

    def __init__(self, deadline: float, fn: Callable[[], None]):
        self.deadline = deadline
        self.fn = fn
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class _Scheduler:
    def __init__(self, name: str):
        self._heap: list[tuple[float, int, _Timer]] = []
        self._cond = threading.Condition()
        self._seq = itertools.count()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def call_at(self, deadline: float, fn: Callable[[], None]) -> _Timer:
        timer = _Timer(deadline, fn)
        with self._cond:
            heapq.heappush(self._heap, (deadline, next(self._seq), timer))
            self._cond.notify()
        return timer

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._thread.join(5)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stop:
                    if self._heap and self._heap[0][2].cancelled:
                        heapq.heappop(self._heap)
                        continue
                    wait = None if not self._heap else self._heap[0][0] - time.monotonic()
                    if wait is not None and wait <= 0:
                        break
                    self._cond.wait(wait)
                if self._stop:
                    return
                _, _, timer = heapq.heappop(self._heap)
            if not timer.cancelled:
                try:
                    timer.fn()
                except Exception:
                    log.exception("jobs timer failed")


# --------------------------------------------------------------------------------------------------
# request validation


def _reject_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def _parse(payload: bytes, limit: int) -> dict:
    if len(payload) > limit:
        raise _Rejected("InvalidRequest", f"payload of {len(payload)} bytes exceeds {limit} bytes")
    if not payload.strip():
        return {}
    try:
        req = json.loads(payload.decode("utf-8"), parse_constant=_reject_constant)
    except Exception as e:  # UnicodeDecodeError, JSONDecodeError, RecursionError, ValueError
        raise _Rejected("InvalidJson", f"payload is not UTF-8 JSON: {e.__class__.__name__}") from None
    if not isinstance(req, dict):
        raise _Rejected("InvalidRequest", f"payload must be a JSON object, not {type(req).__name__}")
    return req


def _token(req: dict) -> str | None:
    tok = req.get("clientToken")
    if tok is None:
        return None
    if not isinstance(tok, str) or not _TOKEN_RE.fullmatch(tok):
        raise _Rejected("InvalidRequest", "clientToken must be 1-64 printable ASCII characters")
    return tok


def _int(req: dict, key: str, lo: int, hi: int, also: tuple[int, ...] = ()) -> int | None:
    v = req.get(key)
    if v is None:
        return None
    if not isinstance(v, int) or isinstance(v, bool) or not (lo <= v <= hi or v in also):
        extra = f" or {', '.join(map(str, also))}" if also else ""
        raise _Rejected("InvalidRequest", f"{key} must be an integer in {lo}..{hi}{extra}")
    return v


def _bool(req: dict, key: str, default: bool) -> bool:
    v = req.get(key)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise _Rejected("InvalidRequest", f"{key} must be true or false")
    return v


def _details(req: dict) -> dict[str, str] | None:
    v = req.get("statusDetails")
    if v is None:
        return None
    if not isinstance(v, dict):
        raise _Rejected("InvalidRequest", "statusDetails must be an object of strings")
    for k, val in v.items():
        if not _DETAIL_KEY_RE.fullmatch(k):
            raise _Rejected("InvalidRequest", f"statusDetails key {k[:40]!r} must match [a-zA-Z0-9:_-]{{1,128}}")
        if not isinstance(val, str) or not 1 <= len(val) <= _DETAIL_VALUE_MAX:
            raise _Rejected("InvalidRequest", f"statusDetails[{k!r}] must be a string of 1-{_DETAIL_VALUE_MAX} chars")
        if any(unicodedata.category(c)[0] == "C" for c in val):
            raise _Rejected("InvalidRequest", f"statusDetails[{k!r}] must not contain control characters")
    return dict(v)


# --------------------------------------------------------------------------------------------------
# the service


class JobsService:
    """The jobs service on an already connected `MqttClient`; subscribes when constructed."""

    def __init__(
        self,
        mqtt: MqttClient,
        image_host: ImageHost | None = None,
        *,
        url_ttl_s: float = 1800,
        minute_s: float = 60.0,
        max_payload: int = MAX_PAYLOAD,
        on_status_change: Callable[[StatusChange], None] | None = None,
        things: Iterable[str] | None = None,
        subscribe_timeout: float = 5.0,
    ):
        self.mqtt = mqtt
        self.image_host = image_host
        self.url_ttl_s = url_ttl_s
        self.minute_s = float(minute_s)
        self.max_payload = max_payload
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._jobs: dict[str, Job] = {}
        self._executions: dict[tuple[str, str], _Execution] = {}
        self._by_thing: dict[str, list[_Execution]] = {}
        self._seq = itertools.count(1)
        self._history: list[StatusChange] = []
        self._listeners: list[Callable[[StatusChange], None]] = []
        self._requests: deque[JobRequest] = deque(maxlen=10000)
        self._fetches: list[tuple[float, str, str, str, str]] = []  # t, job, thing, operation, url
        self._deferred: list[tuple[str, tuple]] | None = None
        if on_status_change is not None:
            self._listeners.append(on_status_change)
        self._timers = _Scheduler("jobs-timers")
        self._closed = False
        self._subscribe_timeout = subscribe_timeout
        self._served: set[str] | None = None
        if things is None:
            mqtt.subscribe(subscriptions(), qos=1, timeout=subscribe_timeout, handler=self._on_message)
        else:
            self._served = set()
            for thing in things:
                self.serve(thing)

    def serve(self, thing: str) -> None:
        """Also answer ``thing`` (a service built with ``things=[...]`` answers only those)."""
        if self._served is None:
            return
        if not isinstance(thing, str) or not _THING_RE.fullmatch(thing):
            raise JobsError(f"invalid thing name {thing!r}")
        with self._lock:
            if thing in self._served:
                return
            self._served.add(thing)
        self.mqtt.subscribe(subscriptions(thing), qos=1, timeout=self._subscribe_timeout, handler=self._on_message)

    @property
    def things(self) -> set[str] | None:
        """The things this service answers, or None for all."""
        with self._lock:
            return None if self._served is None else set(self._served)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._served is None:
            self.mqtt.unsubscribe(subscriptions())
        else:
            for thing in sorted(self._served):
                self.mqtt.unsubscribe(subscriptions(thing))
        self._timers.close()

    def __enter__(self) -> JobsService:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # harness API --------------------------------------------------------------------------------
    def add_listener(self, callback: Callable[[StatusChange], None]) -> None:
        with self._lock:
            self._listeners.append(callback)

    def create_job(
        self,
        job_id: str,
        targets: Iterable[str],
        document: dict,
        *,
        step_timeout_s: float | None = None,
        in_progress_timeout_s: float | None = None,
        url_ttl_s: float | None = None,
    ) -> Job:
        """Queue ``document`` for every thing in ``targets``; notifies them (notify-next, notify)."""
        if not isinstance(job_id, str) or not _JOB_RE.fullmatch(job_id):
            raise JobsError(f"invalid job id {job_id!r}: 1-64 of [a-zA-Z0-9_-]")
        things = list(dict.fromkeys(targets))
        if not things:
            raise JobsError(f"job {job_id}: no targets")
        for t in things:
            if not isinstance(t, str) or not _THING_RE.fullmatch(t):
                raise JobsError(f"job {job_id}: invalid thing name {t!r}")
        served = self.things
        if served is not None and not set(things) <= served:
            raise JobsError(f"job {job_id}: this service does not answer {sorted(set(things) - served)}"
                            " (serve(thing) first)")
        if not isinstance(document, dict):
            raise JobsError(f"job {job_id}: the document must be a dict")
        for name, v in (("step_timeout_s", step_timeout_s), ("in_progress_timeout_s", in_progress_timeout_s)):
            if v is not None and not v > 0:
                raise JobsError(f"job {job_id}: {name} must be > 0 (or None)")
        template = copy.deepcopy(document)
        image_id = template.get("image_id")
        if image_id is not None:
            if "url" in template:
                raise JobsError(f"job {job_id}: the document has both image_id and url (url is minted from image_id)")
            if self.image_host is None:
                raise JobsError(f"job {job_id}: the document names image_id {image_id!r} but there is no image host")
            self.image_host.presign(image_id, url_ttl_s or self.url_ttl_s)  # validates id and ttl now
            if self.image_host.has(image_id):
                for k, v in self.image_host.info(image_id).items():
                    template.setdefault(k, v)
        json.dumps(template)  # must be serialisable: fail here, not on a device request
        with self._lock:
            if job_id in self._jobs:
                raise JobsError(f"job {job_id} already exists", "ResourceAlreadyExists")
            now = _epoch()
            job = Job(job_id, tuple(things), template, created_at=now, step_timeout_s=step_timeout_s,
                      in_progress_timeout_s=in_progress_timeout_s, url_ttl_s=url_ttl_s)
            self._jobs[job_id] = job
            for thing in things:
                before = self._snapshot(thing)
                ex = _Execution(job, thing, next(self._seq), queued_at=now, last_updated_at=now)
                self._executions[(job_id, thing)] = ex
                self._by_thing.setdefault(thing, []).append(ex)
                self._change(ex, QUEUED, "create", None, None, old="")
                self._notify(thing, before)
            return job

    def cancel(self, job_id: str, force: bool = False, things: Iterable[str] | None = None) -> list[str]:
        """Cancel the job (or only its executions on ``things``): QUEUED -> CANCELED, and IN_PROGRESS
        -> CANCELED with ``force``. Without ``force`` an IN_PROGRESS execution refuses the cancel: a
        JobsError (code InvalidStateTransition) and nothing changes. (AWS CancelJob would instead
        leave it running; the harness makes the caller say which it meant.) Returns the things canceled."""
        with self._lock:
            job = self._job(job_id)
            exs = [self._executions[(job_id, t)] for t in job.targets] if things is None else [
                self._execution(job_id, t) for t in things
            ]
            running = [ex.thing for ex in exs if ex.status == IN_PROGRESS]
            if running and not force:
                raise JobsError(
                    f"job {job_id} is IN_PROGRESS on {', '.join(running)}: cancel(force=True) to cancel it there",
                    "InvalidStateTransition",
                )
            done = []
            for ex in exs:
                if ex.status in PENDING:
                    before = self._snapshot(ex.thing)
                    self._change(ex, CANCELED, "cancel", None, None)
                    self._notify(ex.thing, before)
                    done.append(ex.thing)
            if things is None:
                job.status = CANCELED
            return done

    def job(self, job_id: str) -> Job:
        with self._lock:
            return self._job(job_id)

    def jobs(self) -> list[Job]:
        with self._lock:
            return list(self._jobs.values())

    def execution(self, job_id: str, thing: str, include_document: bool = False) -> dict:
        """The execution as a device would see it (the template document, unminted, if asked for)."""
        with self._lock:
            ex = self._execution(job_id, thing)
            return ex.payload(copy.deepcopy(ex.job.document) if include_document else None)

    def history(self, job_id: str | None = None, thing: str | None = None) -> list[StatusChange]:
        with self._lock:
            return [c for c in self._history
                    if (job_id is None or c.job_id == job_id) and (thing is None or c.thing == thing)]

    def requests(self) -> list[JobRequest]:
        """Device requests handled so far (the last 10000)."""
        with self._lock:
            return list(self._requests)

    def document_fetches(self, job_id: str | None = None, thing: str | None = None) -> list[dict]:
        """Each time a device was sent the job document (so a fresh URL was minted)."""
        with self._lock:
            return [{"t": t, "job_id": j, "thing": th, "operation": op, "url": url}
                    for t, j, th, op, url in self._fetches
                    if (job_id is None or j == job_id) and (thing is None or th == thing)]

    def wait_status(self, job_id: str, thing: str, statuses: str | Iterable[str], timeout: float, *,
                    abort: Callable[[], str | None] | None = None, recheck_s: float = 1.0) -> dict:
        """Wait until the execution's status is one of ``statuses``; returns the execution.

        ``abort`` (a test's watch on the cart: a crash loop, a silent console) is asked at every status
        change, at every `wake()` and at least every ``recheck_s``; a cause it returns ends the wait at
        once with `JobsAborted` whose message starts with that cause."""
        wanted = {statuses} if isinstance(statuses, str) else set(statuses)
        unknown = wanted - set(STATUSES)
        if unknown:
            raise JobsError(f"unknown status(es) {sorted(unknown)}; statuses are {', '.join(STATUSES)}")
        t0 = time.monotonic()
        deadline = t0 + timeout
        with self._cond:
            while True:
                ex = self._execution(job_id, thing)
                if ex.status in wanted:
                    return ex.payload(None)
                cause = abort() if abort is not None else None
                if cause:
                    raise JobsAborted(f"{cause} (job {job_id} on {thing} still {ex.status} after "
                                      f"{time.monotonic() - t0:.1f} s)")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    hist = "\n".join(
                        f"  {c.old or '-'} -> {c.new} v{c.version} ({c.source}) {c.status_details}" for c in ex.history
                    )
                    raise JobsTimeout(
                        f"timed out after {time.monotonic() - t0:.3f}s waiting for job {job_id} on {thing} to be"
                        f" {' or '.join(sorted(wanted))}; it is {ex.status} v{ex.version}"
                        f" {ex.status_details}\nhistory:\n{hist}"
                    )
                self._cond.wait(min(remaining, recheck_s) if abort is not None else remaining)

    def wake(self) -> None:
        """Wake every `wait_status` to ask its `abort` again (something it watches has happened)."""
        with self._cond:
            self._cond.notify_all()

    # internals ----------------------------------------------------------------------------------
    def _job(self, job_id: str) -> Job:
        try:
            return self._jobs[job_id]
        except KeyError:
            raise JobsError(f"no job {job_id!r}", "ResourceNotFound") from None

    def _execution(self, job_id: str, thing: str) -> _Execution:
        try:
            return self._executions[(job_id, thing)]
        except KeyError:
            raise JobsError(f"no execution of job {job_id!r} on {thing!r}", "ResourceNotFound") from None

    def _pending(self, thing: str) -> list[_Execution]:
        exs = [ex for ex in self._by_thing.get(thing, ()) if ex.status in PENDING]
        return [ex for ex in exs if ex.status == IN_PROGRESS] + [ex for ex in exs if ex.status == QUEUED]

    def _next(self, thing: str) -> _Execution | None:
        pending = self._pending(thing)
        return pending[0] if pending else None

    def _snapshot(self, thing: str) -> tuple[str | None, tuple]:
        nxt = self._next(thing)
        return (nxt.job_id if nxt else None), tuple((ex.job_id, ex.status) for ex in self._pending(thing))

    def _document(self, ex: _Execution, operation: str) -> dict:
        job = ex.job
        tpl = job.document
        image_id = tpl.get("image_id")
        if image_id is None or self.image_host is None:
            return copy.deepcopy(tpl)
        url = self.image_host.presign(image_id, job.url_ttl_s or self.url_ttl_s)
        self._fetches.append((time.monotonic(), job.job_id, ex.thing, operation, url))
        return {("url" if k == "image_id" else k): (url if k == "image_id" else copy.deepcopy(v))
                for k, v in tpl.items()}

    def _publish(self, topic: str, body: dict) -> None:
        self.mqtt.publish(topic, _dumps(body), qos=1, wait=False)

    def _notify(self, thing: str, before: tuple[str | None, tuple]) -> None:
        """Publish notify / notify-next for ``thing`` if its pending list / next execution changed
        (while a device request is handled: after its reply)."""
        if self._deferred is not None:
            self._deferred.append((thing, before))
            return
        nxt = self._next(thing)
        after = ((nxt.job_id if nxt else None), tuple((ex.job_id, ex.status) for ex in self._pending(thing)))
        base = f"$aws/things/{thing}/jobs/"
        now = _epoch()
        if after[1] != before[1]:
            jobs: dict[str, list] = {}
            for ex in self._pending(thing):
                jobs.setdefault(ex.status, []).append(ex.summary())
            self._publish(base + "notify", {"timestamp": now, "jobs": jobs})
        if after[0] != before[0]:
            body: dict[str, Any] = {"timestamp": now}
            if nxt is not None:
                body["execution"] = nxt.payload(self._document(nxt, "notify-next"))
            self._publish(base + "notify-next", body)

    def _change(self, ex: _Execution, new: str, source: str, t_request: float | None, token: str | None,
                old: str | None = None) -> None:
        """Apply a status change (the caller holds the lock and has set everything else)."""
        prev = ex.status if old is None else old
        now = _epoch()
        if source != "create":
            ex.status = new
            ex.version += 1
            ex.last_updated_at = now
        if new == IN_PROGRESS and prev == QUEUED:
            ex.started_at = now
            if ex.job.in_progress_timeout_s is not None:
                ex.progress_timer = self._timers.call_at(
                    time.monotonic() + ex.job.in_progress_timeout_s, lambda: self._timeout(ex, "in-progress-timeout")
                )
        if new in TERMINAL:
            for timer in (ex.step_timer, ex.progress_timer):
                if timer is not None:
                    timer.cancel()
            ex.step_timer = ex.progress_timer = None
            ex.step_deadline = None
        change = StatusChange(ex.job_id, ex.thing, prev, new, dict(ex.status_details), ex.version, source,
                              time.monotonic(), now, t_request, token)
        ex.history.append(change)
        self._history.append(change)
        job = ex.job
        siblings = [self._executions.get((job.job_id, t)) for t in job.targets]
        if job.status == IN_PROGRESS and all(e is not None and e.status in TERMINAL for e in siblings):
            job.status = "COMPLETED"
        self._cond.notify_all()
        for cb in list(self._listeners):
            try:
                cb(change)
            except Exception:
                log.exception("jobs status listener %r failed", cb)

    def _set_step_timer(self, ex: _Execution, seconds: float | None) -> None:
        if ex.step_timer is not None:
            ex.step_timer.cancel()
        ex.step_timer, ex.step_deadline = None, None
        if seconds is not None:
            ex.step_deadline = time.monotonic() + seconds
            ex.step_timer = self._timers.call_at(ex.step_deadline, lambda: self._timeout(ex, "step-timeout"))

    def _timeout(self, ex: _Execution, source: str) -> None:
        with self._lock:
            if self._closed or ex.status != IN_PROGRESS:
                return
            if source == "step-timeout" and (ex.step_deadline is None or ex.step_deadline > time.monotonic()):
                return  # re-armed meanwhile
            before = self._snapshot(ex.thing)
            self._change(ex, TIMED_OUT, source, None, None)
            self._notify(ex.thing, before)
            log.info("job %s on %s: %s -> TIMED_OUT", ex.job_id, ex.thing, source)

    # device requests (network thread) -----------------------------------------------------------
    def _on_message(self, msg: Message) -> None:
        parts = msg.topic.split("/")
        if len(parts) < 5 or parts[0] != "$aws" or parts[1] != "things" or parts[3] != "jobs":
            return
        thing, rest = parts[2], parts[4:]
        if rest == ["get"]:
            op, job_id = "get", None
        elif rest == ["start-next"]:
            op, job_id = "start-next", None
        elif len(rest) == 2 and rest[1] in ("get", "update"):
            op, job_id = rest[1], rest[0]
            op = "describe" if op == "get" else "update"
        else:
            return
        token: str | None = None
        outcome = "accepted"
        if len(msg.topic.encode()) + len("/accepted") > _MAX_TOPIC_BYTES:  # no reply topic can exist
            log.warning("jobs service: no reply possible to %s (topic too long)", msg.brief())
            with self._lock:
                self._requests.append(JobRequest(msg.topic, thing, op, msg.t, time.monotonic(), "InvalidTopic", None))
            return
        try:
            with self._lock:
                if self._closed:
                    return
                self._deferred = []
                try:
                    req = _parse(msg.payload, self.max_payload)
                    token = _token(req)
                    if not _THING_RE.fullmatch(thing):
                        raise _Rejected("InvalidTopic", f"invalid thing name {thing[:140]!r} in the topic")
                    next_ok = op == "describe" and job_id == "$next"
                    if job_id is not None and not (_JOB_RE.fullmatch(job_id) or next_ok):
                        raise _Rejected("InvalidTopic", f"invalid job id {job_id[:80]!r} in the topic")
                    if op == "get":
                        body = self._op_get(thing)
                    elif op == "describe":
                        body = self._op_describe(thing, job_id, req)
                    elif op == "start-next":
                        body = self._op_start_next(thing, req, msg.t, token)
                    else:
                        body = self._op_update(thing, job_id, req, msg.t, token)
                    body["timestamp"] = _epoch()
                    if token is not None:
                        body["clientToken"] = token
                    self._publish(msg.topic + "/accepted", body)
                except _Rejected as r:
                    outcome = r.code
                    self._reject(msg.topic, r, token)
                except Exception as e:
                    outcome = "InternalError"
                    log.exception("jobs service failed on %s", msg.brief())
                    r = _Rejected("InternalError", f"internal error: {e.__class__.__name__}")
                    self._reject(msg.topic, r, token)
                finally:  # whatever happened, the bookkeeping ends: notifications are never left deferred
                    self._requests.append(JobRequest(msg.topic, thing, op, msg.t, time.monotonic(), outcome, token))
                    deferred, self._deferred = self._deferred, None
                    for t, before in deferred:
                        self._notify(t, before)
        except Exception:
            log.exception("jobs service could not answer %s", msg.brief())

    def _reject(self, topic: str, r: _Rejected, token: str | None) -> None:
        body: dict[str, Any] = {"code": r.code, "message": r.message, "timestamp": _epoch()}
        if token is not None:
            body["clientToken"] = token
        if r.execution is not None:
            body["executionState"] = r.execution.state()
        self._publish(topic + "/rejected", body)

    def _lookup(self, thing: str, job_id: str) -> _Execution:
        ex = self._executions.get((job_id, thing))
        if ex is None:
            raise _Rejected("ResourceNotFound", f"no execution of job {job_id} for {thing}")
        return ex

    def _op_get(self, thing: str) -> dict:
        pending = self._pending(thing)
        return {
            "inProgressJobs": [ex.summary() for ex in pending if ex.status == IN_PROGRESS],
            "queuedJobs": [ex.summary() for ex in pending if ex.status == QUEUED],
        }

    def _op_describe(self, thing: str, job_id: str, req: dict) -> dict:
        number = _int(req, "executionNumber", 1, 2**63 - 1)
        include_doc = _bool(req, "includeJobDocument", True)
        if job_id == "$next":
            ex = self._next(thing)
            if ex is None:
                return {}
        else:
            ex = self._lookup(thing, job_id)
        if number is not None and number != ex.execution_number:
            raise _Rejected("ResourceNotFound", f"no execution number {number} of job {ex.job_id} for {thing}")
        return {"execution": ex.payload(self._document(ex, "describe") if include_doc else None)}

    def _op_start_next(self, thing: str, req: dict, t_req: float, token: str | None) -> dict:
        details = _details(req)
        step = _int(req, "stepTimeoutInMinutes", STEP_TIMEOUT_MIN, STEP_TIMEOUT_MAX)
        ex = self._next(thing)
        if ex is None:
            return {}
        if ex.status == QUEUED:
            before = self._snapshot(thing)
            ex.status_details = details or {}
            seconds = step * self.minute_s if step is not None else ex.job.step_timeout_s
            self._set_step_timer(ex, seconds)
            self._change(ex, IN_PROGRESS, "start-next", t_req, token)
            self._notify(thing, before)
        return {"execution": ex.payload(self._document(ex, "start-next"))}

    def _op_update(self, thing: str, job_id: str, req: dict, t_req: float, token: str | None) -> dict:
        status = req.get("status")
        if status is None:
            raise _Rejected("InvalidRequest", "status is required")
        if not isinstance(status, str) or status not in DEVICE_STATUSES:
            allowed = ", ".join(sorted(DEVICE_STATUSES))
            raise _Rejected("InvalidRequest", f"status must be one of {allowed}, not {str(status)[:40]!r}")
        details = _details(req)
        expected = _int(req, "expectedVersion", 0, 2**63 - 1)
        number = _int(req, "executionNumber", 1, 2**63 - 1)
        include_state = _bool(req, "includeJobExecutionState", False)
        include_doc = _bool(req, "includeJobDocument", False)
        step = _int(req, "stepTimeoutInMinutes", STEP_TIMEOUT_MIN, STEP_TIMEOUT_MAX, also=(-1,))
        ex = self._lookup(thing, job_id)
        if number is not None and number != ex.execution_number:
            raise _Rejected("ResourceNotFound", f"no execution number {number} of job {job_id} for {thing}")
        if expected is not None and expected != ex.version:
            raise _Rejected("VersionMismatch", f"expectedVersion {expected} but the execution is at {ex.version}", ex)
        if ex.status in TERMINAL:
            # AWS IoT Jobs ErrorResponse: "InvalidStateTransition: An update attempted to change the job
            # execution to a state that is invalid because of the job execution's current state (for
            # example, an attempt to change a request in state SUCCEEDED to state IN_PROGRESS). In this
            # case, the body of the error message also contains the executionState field."
            # TerminalStateReached is documented for a describe only, so every update of a terminal
            # execution (IN_PROGRESS, another terminal status, or the same one again) gets this code.
            raise _Rejected(
                "InvalidStateTransition",
                f"job {job_id} on {thing} is already {ex.status} (terminal): {ex.status} -> {status} is not allowed",
                ex,
            )
        before = self._snapshot(thing)
        old = ex.status
        if details is not None:
            ex.status_details = details
        if status == IN_PROGRESS:
            if step is not None:
                self._set_step_timer(ex, None if step == -1 else step * self.minute_s)
            elif old == QUEUED:
                self._set_step_timer(ex, ex.job.step_timeout_s)
        self._change(ex, status, "device", t_req, token)
        body: dict[str, Any] = {}
        if include_state:
            body["executionState"] = ex.state()
        if include_doc:
            body["jobDocument"] = self._document(ex, "update")
        self._notify(thing, before)
        return body
