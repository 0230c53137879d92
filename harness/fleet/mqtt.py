"""A small MQTT-over-TLS client for the fleet services, on paho-mqtt 2.x.

`MqttClient` connects with a CA, a client certificate and its key, waits a bounded time for
CONNACK, subscribes waiting for SUBACK, publishes at QoS 1 (optionally waiting for PUBACK) and
reconnects by itself (re-subscribing everything) if the broker goes away.

Every received message becomes a `Message`, stamped with ``time.monotonic()`` the moment paho
hands it over, and is

- passed to the handlers whose topic filter matches, on paho's network thread (handlers must be
  quick and must not wait for anything the network thread delivers), and
- appended to the client's `MessageLog`, where tests and scenario steps wait for it with
  `MessageLog.wait_for` (a condition variable, never a poll).

Timeouts raise `MqttTimeout`, naming what was awaited, for how long, and the last messages seen.

Wildcards follow MQTT: ``#`` and a leading ``+`` never match a topic that begins with ``$``, so
subscribe to ``$aws/things/+/jobs/...`` explicitly.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho

__all__ = [
    "Message",
    "MessageLog",
    "MqttClient",
    "MqttError",
    "MqttTimeout",
    "topic_matches",
]

log = logging.getLogger(__name__)

Handler = Callable[["Message"], None]

_TAIL = 8            # messages shown in a timeout error
_PAYLOAD_SHOWN = 200  # characters of each payload shown in a timeout error


class MqttError(Exception):
    """The broker refused us, or a request could not be sent or was not acknowledged."""


class MqttTimeout(MqttError, TimeoutError):
    """A wait ran out. ``what`` is what was awaited, ``waited`` the seconds waited, ``seen`` the tail."""

    def __init__(self, what: str, waited: float, seen: list[Message], detail: str = ""):
        self.what = what
        self.waited = waited
        self.seen = seen
        lines = [f"timed out after {waited:.3f}s waiting for {what}"]
        if detail:
            lines.append(detail)
        if seen:
            lines.append(f"last {len(seen)} message(s) seen:")
            lines.extend(f"  {m.brief()}" for m in seen)
        else:
            lines.append("no messages seen")
        super().__init__("\n".join(lines))


def topic_matches(topic_filter: str, topic: str) -> bool:
    """MQTT topic matching, including the rule that ``#``/``+`` at the start never match ``$...``."""
    if topic_filter == topic:
        return True
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False
    f = topic_filter.split("/")
    t = topic.split("/")
    for i, level in enumerate(f):
        if level == "#":
            return i == len(f) - 1
        if i >= len(t):
            return False
        if level != "+" and level != t[i]:
            return False
    return len(f) == len(t)


@dataclass(frozen=True)
class Message:
    """One received message. ``t`` is ``time.monotonic()`` at receipt, ``wall`` is ``time.time()``."""

    index: int
    topic: str
    payload: bytes
    qos: int
    retain: bool
    t: float
    wall: float

    @property
    def text(self) -> str:
        return self.payload.decode("utf-8", errors="replace")

    def json(self) -> Any:
        """The payload parsed as JSON (raises ValueError if it is not)."""
        return json.loads(self.payload)

    def brief(self) -> str:
        text = self.text
        if len(text) > _PAYLOAD_SHOWN:
            text = text[:_PAYLOAD_SHOWN] + f"... ({len(self.payload)} bytes)"
        return f"#{self.index} t={self.t:.6f} {self.topic} {text}"


@dataclass
class _Waiter:
    topic_filter: str
    predicate: Callable[[Message], bool] | None


class MessageLog:
    """Every message a client received, in order, bounded to the last ``maxlen``.

    `wait_for` returns the first message after a cursor that matches a topic filter (and a
    predicate) and that no earlier `wait_for` returned (each message is handed out once per log),
    so "publish a request, then wait for the reply" works even if the reply arrived before the
    wait began. `mark()` moves the default cursor to "from now on".
    """

    def __init__(self, maxlen: int = 10000):
        self._messages: deque[Message] = deque(maxlen=maxlen)
        self._taken: set[int] = set()
        self._cond = threading.Condition()
        self._next = 0
        self._mark = 0

    def append(self, topic: str, payload: bytes, qos: int, retain: bool, t: float, wall: float) -> Message:
        with self._cond:
            msg = Message(self._next, topic, payload, qos, retain, t, wall)
            self._next += 1
            if len(self._messages) == self._messages.maxlen:
                self._taken.discard(self._messages[0].index)
            self._messages.append(msg)
            self._cond.notify_all()
            return msg

    def mark(self) -> int:
        """Make later waits (without ``since``) ignore everything received so far; returns the cursor."""
        with self._cond:
            self._mark = self._next
            return self._mark

    def cursor(self) -> int:
        """The index the next message will get (pass it as ``since``)."""
        with self._cond:
            return self._next

    def messages(self, topic_filter: str | None = None, since: int = 0) -> list[Message]:
        with self._cond:
            return [
                m for m in self._messages
                if m.index >= since and (topic_filter is None or topic_matches(topic_filter, m.topic))
            ]

    def tail(self, n: int = _TAIL) -> list[Message]:
        with self._cond:
            return list(self._messages)[-n:]

    def _find(self, topic_filter: str, predicate, since: int) -> Message | None:
        for m in self._messages:
            if m.index < since or m.index in self._taken or not topic_matches(topic_filter, m.topic):
                continue
            try:
                ok = predicate is None or predicate(m)
            except Exception:  # a predicate that chokes on a payload simply does not match it
                ok = False
            if ok:
                self._taken.add(m.index)
                return m
        return None

    def wait_for(
        self,
        topic_filter: str,
        predicate: Callable[[Message], bool] | None = None,
        timeout: float = 5.0,
        *,
        since: int | None = None,
        what: str | None = None,
    ) -> Message:
        """The first not-yet-returned message on ``topic_filter`` (from ``since``, default the mark)
        for which ``predicate`` is true; raises `MqttTimeout` after ``timeout`` seconds."""
        t0 = time.monotonic()
        deadline = t0 + timeout
        with self._cond:
            start = self._mark if since is None else since
            while True:
                found = self._find(topic_filter, predicate, start)
                if found is not None:
                    return found
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    desc = what or f"a message on {topic_filter!r}" + (" matching the predicate" if predicate else "")
                    raise MqttTimeout(desc, time.monotonic() - t0, list(self._messages)[-_TAIL:])
                self._cond.wait(remaining)


@dataclass
class _Sub:
    topic_filter: str
    qos: int
    handlers: list[Handler] = field(default_factory=list)


class MqttClient:
    """A TLS MQTT client (paho 2.x, MQTT 3.1.1) with a message log and per-filter handlers.

    ``MqttClient(host, port, ca, cert, key)`` then `connect()`; or use it as a context manager.
    The broker takes the identity from the certificate, so ``username`` is usually not needed.
    """

    def __init__(
        self,
        host: str,
        port: int,
        ca: str | Path,
        cert: str | Path,
        key: str | Path,
        client_id: str | None = None,
        *,
        username: str | None = None,
        keepalive: int = 30,
        log_size: int = 10000,
    ):
        self.host = host
        self.port = int(port)
        self.client_id = client_id or f"cart-hil-{Path(str(cert)).stem}-{id(self):x}"
        self.log = MessageLog(log_size)
        self._connected = threading.Event()
        self._settled = threading.Event()  # the first connection attempt succeeded or failed
        self._connack: Any = None
        self._disconnect_reason: Any = None
        self._lock = threading.Lock()
        self._subs: dict[str, _Sub] = {}
        self._suback: dict[int, tuple[threading.Event, list]] = {}
        self._resubscribe_mid: int | None = None
        self._loop_thread: int | None = None
        self._closed = False
        c = paho.Client(
            paho.CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=paho.MQTTv311, clean_session=True
        )
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(cafile=str(ca))
        ctx.load_cert_chain(certfile=str(cert), keyfile=str(key))
        c.tls_set_context(ctx)
        if username is not None:
            c.username_pw_set(username)
        c.reconnect_delay_set(min_delay=0.05, max_delay=2)
        c.max_inflight_messages_set(100)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_subscribe = self._on_subscribe
        c.on_message = self._on_message
        self._keepalive = keepalive
        self._client = c

    # connection ---------------------------------------------------------------------------------
    def connect(self, timeout: float = 10.0) -> MqttClient:
        """Connect and wait for CONNACK; raises `MqttError` if refused, `MqttTimeout` if none came."""
        t0 = time.monotonic()
        self._client.connect_timeout = max(0.1, timeout)
        try:
            self._client.connect(self.host, self.port, keepalive=self._keepalive)
        except OSError as e:  # ssl.SSLError included
            raise MqttError(f"cannot connect to MQTT broker {self.host}:{self.port} as {self.client_id}: {e}") from e
        self._client.loop_start()
        self._settled.wait(max(0.0, timeout - (time.monotonic() - t0)))
        if not self._connected.is_set() and self._connack is not None and not self._connack.is_failure:
            self._connected.wait(max(0.0, timeout - (time.monotonic() - t0)))  # re-subscribing
        if not self._connected.is_set():
            reason = self._connack if self._connack is not None else self._disconnect_reason
            self._shutdown()
            if self._disconnect_reason is not None and self._connack is None:
                raise MqttError(
                    f"broker {self.host}:{self.port} dropped {self.client_id} before CONNACK"
                    f" ({self._disconnect_reason}; a TLS client certificate it does not accept?)"
                )
            if reason is not None and getattr(reason, "is_failure", False):
                raise MqttError(f"broker {self.host}:{self.port} refused {self.client_id}: {reason}")
            raise MqttTimeout(
                f"CONNACK from {self.host}:{self.port} for {self.client_id}", time.monotonic() - t0, [],
                f"last reason: {reason}",
            )
        return self

    def is_connected(self) -> bool:
        """Connected, and (after a reconnect) every subscription restored."""
        return self._connected.is_set()

    def wait_connected(self, timeout: float) -> None:
        """Wait until connected again with every subscription restored (paho reconnects by itself)."""
        if not self._connected.wait(timeout):
            raise MqttTimeout(f"reconnection to {self.host}:{self.port}", timeout, self.log.tail(),
                              f"last disconnect reason: {self._disconnect_reason}")

    def close(self) -> None:
        """Disconnect cleanly and stop the network thread. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._shutdown()

    def _shutdown(self) -> None:
        with contextlib.suppress(Exception):
            self._client.disconnect()
        with contextlib.suppress(Exception):
            self._client.loop_stop()
        self._connected.clear()

    def __enter__(self) -> MqttClient:
        if not self._connected.is_set():
            self.connect()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # paho callbacks (network thread) ------------------------------------------------------------
    def _on_connect(self, client, userdata, flags, reason_code, properties):
        self._loop_thread = threading.get_ident()
        sock = client.socket()
        if sock is not None:  # paho leaves Nagle on: every small packet would wait for an ACK (~40 ms)
            with contextlib.suppress(OSError, AttributeError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._connack = reason_code
        if reason_code.is_failure:
            self._settled.set()
            log.warning("MQTT %s:%s refused %s: %s", self.host, self.port, self.client_id, reason_code)
            return
        with self._lock:
            subs = [(s.topic_filter, s.qos) for s in self._subs.values()]
            if subs:  # a clean session forgot them: subscribe again; "connected" once SUBACK is in
                rc, mid = client.subscribe(subs)
                if rc == paho.MQTT_ERR_SUCCESS and mid is not None:
                    self._resubscribe_mid = mid
                    self._settled.set()
                    return
        # "connected" before "settled": connect() wakes on settled and must then see connected
        self._connected.set()
        self._settled.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties):
        self._disconnect_reason = reason_code
        self._connected.clear()
        self._settled.set()
        if not self._closed:
            log.info("MQTT %s disconnected from %s:%s: %s", self.client_id, self.host, self.port, reason_code)

    def _on_subscribe(self, client, userdata, mid, reason_code_list, properties):
        with self._lock:
            entry = self._suback.pop(mid, None)
            if mid == self._resubscribe_mid:
                self._resubscribe_mid = None
                failed = [c for c in reason_code_list if c.is_failure]
                if failed:
                    log.error("MQTT %s: broker refused re-subscription after reconnect: %s", self.client_id, failed)
                self._connected.set()
        if entry is not None:
            entry[1].extend(reason_code_list)
            entry[0].set()

    def _on_message(self, client, userdata, msg):
        t = time.monotonic()
        self._loop_thread = threading.get_ident()
        m = self.log.append(msg.topic, bytes(msg.payload), msg.qos, bool(msg.retain), t, time.time())
        with self._lock:
            handlers = [h for s in self._subs.values() if topic_matches(s.topic_filter, m.topic) for h in s.handlers]
        for h in handlers:
            try:
                h(m)
            except Exception:
                log.exception("MQTT handler %r failed on %s", h, m.brief())

    # requests -----------------------------------------------------------------------------------
    def subscribe(
        self,
        topic_filters: str | Iterable[str],
        qos: int = 1,
        timeout: float = 5.0,
        handler: Handler | None = None,
    ) -> None:
        """Subscribe and wait for SUBACK; ``handler`` (optional) gets every matching message."""
        filters = [topic_filters] if isinstance(topic_filters, str) else list(topic_filters)
        with self._lock:
            for f in filters:
                sub = self._subs.setdefault(f, _Sub(f, qos))
                sub.qos = qos
                if handler is not None and handler not in sub.handlers:
                    sub.handlers.append(handler)
        if self._on_loop_thread():
            self._client.subscribe([(f, qos) for f in filters])
            return
        done, codes = threading.Event(), []
        with self._lock:  # hold the lock so SUBACK cannot be handled before the mid is registered
            rc, mid = self._client.subscribe([(f, qos) for f in filters])
            if rc != paho.MQTT_ERR_SUCCESS or mid is None:
                raise MqttError(f"cannot subscribe to {filters} on {self.host}:{self.port}: {paho.error_string(rc)}")
            self._suback[mid] = (done, codes)
        if not done.wait(timeout):
            with self._lock:
                self._suback.pop(mid, None)
            raise MqttTimeout(f"SUBACK for {filters}", timeout, self.log.tail())
        failed = [f for f, code in zip(filters, codes, strict=False) if code.is_failure]
        if failed:
            raise MqttError(f"broker refused subscription to {failed}: {codes}")

    def add_handler(self, topic_filter: str, handler: Handler) -> None:
        """Also call ``handler`` for messages on an already subscribed filter."""
        with self._lock:
            sub = self._subs.get(topic_filter)
            if sub is None:
                raise MqttError(f"not subscribed to {topic_filter!r}")
            if handler not in sub.handlers:
                sub.handlers.append(handler)

    def unsubscribe(self, topic_filters: str | Iterable[str]) -> None:
        filters = [topic_filters] if isinstance(topic_filters, str) else list(topic_filters)
        with self._lock:
            for f in filters:
                self._subs.pop(f, None)
        if self._connected.is_set():
            self._client.unsubscribe(filters)

    def publish(
        self,
        topic: str,
        payload: bytes | str | dict | list | None = None,
        qos: int = 1,
        retain: bool = False,
        *,
        wait: bool = True,
        timeout: float = 5.0,
    ) -> paho.MQTTMessageInfo:
        """Publish (dicts and lists as compact JSON). With ``wait`` (not possible on the network
        thread, where it is skipped) wait for PUBACK at QoS 1."""
        if isinstance(payload, dict | list):
            payload = json.dumps(payload, separators=(",", ":"))
        bad = _topic_problem(topic)
        if bad:  # the broker would drop the connection, and paho resend it on every reconnect: a storm
            raise MqttError(f"cannot publish to {topic[:120]!r}: {bad}")
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc not in (paho.MQTT_ERR_SUCCESS, paho.MQTT_ERR_NO_CONN):
            raise MqttError(f"cannot publish to {topic!r}: {paho.error_string(info.rc)}")
        if wait and qos > 0 and not self._on_loop_thread():
            t0 = time.monotonic()
            try:
                info.wait_for_publish(timeout)
            except (RuntimeError, ValueError) as e:
                raise MqttError(f"publish to {topic!r} failed: {e}") from e
            if not info.is_published():
                raise MqttTimeout(f"PUBACK for a publish to {topic!r}", time.monotonic() - t0, self.log.tail())
        return info

    def _on_loop_thread(self) -> bool:
        return self._loop_thread == threading.get_ident()

    def __repr__(self) -> str:
        state = "connected" if self._connected.is_set() else "not connected"
        return f"<MqttClient {self.client_id} {self.host}:{self.port} {state}>"


def _topic_problem(topic: str) -> str | None:
    """Why a broker refuses `topic` as a publish topic (MQTT 3.1.1 §1.5.3, §4.7; mosquitto also refuses
    C0/C1 control characters and Unicode noncharacters), or None."""
    if not topic:
        return "empty topic"
    if "+" in topic or "#" in topic:
        return "wildcards are not allowed in a publish topic"
    if len(topic.encode("utf-8", "surrogatepass")) > 65535:
        return "topic longer than 65535 bytes"
    for c in topic:
        o = ord(c)
        if o < 0x20 or 0x7F <= o <= 0x9F or 0xD800 <= o <= 0xDFFF or 0xFDD0 <= o <= 0xFDEF or (o & 0xFFFE) == 0xFFFE:
            return f"character U+{o:04X} is not allowed in a topic"
    return None
