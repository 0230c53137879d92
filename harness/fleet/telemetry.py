"""The lab telemetry collector: device metrics over MQTT, plus every job-status change.

Devices publish one JSON object per event to ``cart-hil/telemetry/<thing>``::

    {"metric": "firmware_rollback_count", "target_version": "1.6.0", "value": 1,
     "thing": "cart-03", "boot_id": "..."}

``metric`` (required, ``[A-Za-z0-9_.:-]{1,128}``) and ``value`` (required, a finite number: the
increment this event reports; 1 for a rollback) plus optional ``thing`` (must equal the topic's
thing when present), ``target_version``, ``boot_id`` (strings) and any other fields (kept as
given). ``firmware_rollback_count`` is the rollback channel: the firmware that boots after a
rollback publishes it once, for the version that was rolled back, separate from job status
(AWS IoT Jobs has no "rolled back after SUCCEEDED" state). Counts are raw: a second message for
the same (thing, boot_id, target_version) counts again and is listed by `duplicates`, so "exactly
once per rollback" stays checkable. Malformed messages are kept apart (`malformed`), never counted.

Job-status changes come from the jobs service: ``jobs.add_listener(telemetry.record_job_status)``.
`export` returns everything as one JSON-able dict; `write` saves it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .mqtt import Message, MqttClient

__all__ = ["MetricEvent", "ROLLBACK_METRIC", "TOPIC_FILTER", "Telemetry", "TelemetryTimeout", "telemetry_topic"]

TOPIC_PREFIX = "cart-hil/telemetry/"
TOPIC_FILTER = TOPIC_PREFIX + "+"
ROLLBACK_METRIC = "firmware_rollback_count"
MAX_PAYLOAD = 64 * 1024
_METRIC_RE = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
_MALFORMED_KEPT = 1000


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def telemetry_topic(thing: str) -> str:
    return TOPIC_PREFIX + thing


class TelemetryTimeout(TimeoutError):
    pass


@dataclass(frozen=True)
class MetricEvent:
    """One metric message. ``t`` is ``time.monotonic()`` at receipt."""

    index: int
    metric: str
    value: float
    thing: str
    target_version: str | None
    boot_id: str | None
    t: float
    wall: float
    fields: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


def _labels(metric: str, thing: str | None, target_version: str | None) -> str:
    dims = [f"{k}={v}" for k, v in (("thing", thing), ("target_version", target_version)) if v is not None]
    return metric + ("{" + ",".join(dims) + "}" if dims else "")


class Telemetry:
    """Collects metrics from ``cart-hil/telemetry/+`` on a connected `MqttClient`; subscribes when built."""

    def __init__(self, mqtt: MqttClient | None, *, topic_filter: str = TOPIC_FILTER, subscribe_timeout: float = 5.0):
        self.mqtt = mqtt
        self.topic_filter = topic_filter
        self._cond = threading.Condition()
        self._events: list[MetricEvent] = []
        self._malformed: list[dict] = []
        self._status_changes: list[dict] = []
        self._closed = False
        if mqtt is not None:
            mqtt.subscribe(topic_filter, qos=1, timeout=subscribe_timeout, handler=self._on_message)

    def close(self) -> None:
        if not self._closed and self.mqtt is not None:
            self.mqtt.unsubscribe(self.topic_filter)
        self._closed = True

    def __enter__(self) -> Telemetry:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # input --------------------------------------------------------------------------------------
    def _on_message(self, msg: Message) -> None:
        thing = msg.topic.rsplit("/", 1)[-1]
        try:
            fields = self._validate(msg.payload, thing)
        except ValueError as e:
            with self._cond:
                self._malformed.append({"topic": msg.topic, "t": msg.t, "reason": str(e),
                                        "payload": msg.payload[:256].decode("utf-8", "replace")})
                del self._malformed[:-_MALFORMED_KEPT]
                self._cond.notify_all()
            return
        self.record(fields, thing, t=msg.t, wall=msg.wall)

    @staticmethod
    def _validate(payload: bytes, thing: str) -> dict:
        if len(payload) > MAX_PAYLOAD:
            raise ValueError(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
        try:
            d = json.loads(payload.decode("utf-8"), parse_constant=_no_constant)
        except Exception as e:
            raise ValueError(f"not UTF-8 JSON: {e.__class__.__name__}") from None
        if not isinstance(d, dict):
            raise ValueError("payload must be a JSON object")
        metric = d.get("metric")
        if not isinstance(metric, str) or not _METRIC_RE.fullmatch(metric):
            raise ValueError("metric must be a name of 1-128 [A-Za-z0-9_.:-]")
        value = d.get("value")
        if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
            raise ValueError("value must be a finite number")
        for k in ("thing", "target_version", "boot_id"):
            if k in d and not isinstance(d[k], str):
                raise ValueError(f"{k} must be a string")
        if "thing" in d and d["thing"] != thing:
            raise ValueError(f"thing {d['thing']!r} in the payload differs from {thing!r} in the topic")
        return d

    def record(self, fields: dict, thing: str, *, t: float | None = None, wall: float | None = None) -> MetricEvent:
        """Record one (already validated) metric event; used by the MQTT handler and by tests."""
        with self._cond:
            ev = MetricEvent(
                index=len(self._events), metric=fields["metric"], value=fields["value"], thing=thing,
                target_version=fields.get("target_version"), boot_id=fields.get("boot_id"),
                t=time.monotonic() if t is None else t, wall=time.time() if wall is None else wall,
                fields=dict(fields),
            )
            self._events.append(ev)
            self._cond.notify_all()
            return ev

    def record_job_status(self, change: Any) -> None:
        """A jobs-service listener: keep one job-status change (a StatusChange, or a dict)."""
        d = change.as_dict() if hasattr(change, "as_dict") else dict(change)
        with self._cond:
            self._status_changes.append(d)
            self._cond.notify_all()

    # queries ------------------------------------------------------------------------------------
    def mark(self) -> int:
        """The index the next metric event will get (pass as ``since``)."""
        with self._cond:
            return len(self._events)

    def events(self, metric: str | None = None, *, thing: str | None = None, target_version: str | None = None,
               since: int = 0) -> list[MetricEvent]:
        with self._cond:
            return [e for e in self._events[since:]
                    if (metric is None or e.metric == metric) and (thing is None or e.thing == thing)
                    and (target_version is None or e.target_version == target_version)]

    def total(self, metric: str, *, thing: str | None = None, target_version: str | None = None,
              since: int = 0) -> float:
        return sum(e.value for e in self.events(metric, thing=thing, target_version=target_version, since=since))

    def rollback_count(self, target_version: str | None = None, thing: str | None = None, *, since: int = 0) -> int:
        """``firmware_rollback_count`` summed over matching events."""
        return int(self.total(ROLLBACK_METRIC, thing=thing, target_version=target_version, since=since))

    def duplicates(self, metric: str = ROLLBACK_METRIC) -> list[dict]:
        """Groups of events with the same (thing, boot_id, target_version) seen more than once."""
        groups: dict[tuple, list[MetricEvent]] = defaultdict(list)
        for e in self.events(metric):
            if e.boot_id is not None:
                groups[(e.thing, e.boot_id, e.target_version)].append(e)
        return [{"thing": k[0], "boot_id": k[1], "target_version": k[2], "count": len(v),
                 "indexes": [e.index for e in v]} for k, v in groups.items() if len(v) > 1]

    def malformed(self) -> list[dict]:
        with self._cond:
            return list(self._malformed)

    def job_status_changes(self, job_id: str | None = None, thing: str | None = None) -> list[dict]:
        with self._cond:
            return [c for c in self._status_changes
                    if (job_id is None or c.get("job_id") == job_id) and (thing is None or c.get("thing") == thing)]

    def wait_metric(
        self,
        metric: str = ROLLBACK_METRIC,
        *,
        thing: str | None = None,
        target_version: str | None = None,
        at_least: float = 1,
        since: int = 0,
        predicate: Callable[[MetricEvent], bool] | None = None,
        timeout: float = 10.0,
    ) -> list[MetricEvent]:
        """Wait until matching events (from index ``since``) sum to ``at_least``; returns them."""
        what = _labels(metric, thing, target_version)
        t0 = time.monotonic()
        deadline = t0 + timeout
        with self._cond:
            while True:
                found = [e for e in self.events(metric, thing=thing, target_version=target_version, since=since)
                         if predicate is None or predicate(e)]
                have = sum(e.value for e in found)
                if have >= at_least:
                    return found
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    tail = "\n".join(
                        f"  #{e.index} t={e.t:.3f} {e.thing} {e.metric}={e.value} tv={e.target_version}"
                        for e in self._events[-8:]
                    ) or "  (none)"
                    bad = f"; {len(self._malformed)} malformed message(s), last: {self._malformed[-1]['reason']}" \
                        if self._malformed else ""
                    raise TelemetryTimeout(
                        f"timed out after {time.monotonic() - t0:.3f}s waiting for {what} to reach {at_least}"
                        f" (have {have}) from event #{since} on {self.topic_filter}{bad}\nlast telemetry:\n{tail}"
                    )
                self._cond.wait(remaining)

    # output -------------------------------------------------------------------------------------
    def export(self) -> dict:
        with self._cond:
            events = list(self._events)
            changes = list(self._status_changes)
            malformed = list(self._malformed)
        metrics: dict[str, dict] = {}
        for e in events:
            m = metrics.setdefault(e.metric, {"total": 0, "by_target_version": {}, "by_thing": {}})
            m["total"] += e.value
            if e.target_version is not None:
                m["by_target_version"][e.target_version] = m["by_target_version"].get(e.target_version, 0) + e.value
            m["by_thing"][e.thing] = m["by_thing"].get(e.thing, 0) + e.value
        status_counts = Counter((c.get("job_id"), c.get("new")) for c in changes)
        jobs: dict[str, dict[str, int]] = {}
        for (job_id, status), n in status_counts.items():
            jobs.setdefault(str(job_id), {})[str(status)] = n
        return {
            "generated_at": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "topic": self.topic_filter,
            ROLLBACK_METRIC: metrics.get(ROLLBACK_METRIC, {}).get("by_target_version", {}),
            "metrics": metrics,
            "events": [e.as_dict() for e in events],
            "duplicates": self.duplicates(),
            "job_status_changes": changes,
            "job_status_counts": jobs,
            "malformed": malformed,
        }

    def write(self, path: str | Path) -> Path:
        """Write `export()` as JSON (atomically: a temp file, then rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps(self.export(), indent=2, default=str))
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        return path
