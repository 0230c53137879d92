"""Power cuts aimed at an event: a console line (or its Nth occurrence), an MQTT message, or a
delay after either. Works the same on a lab rig: it needs only the cart's supply channel (VISA)
and its console (or the broker).

    cut = cut_on_console(cart.power, cart.console, r"^EV: write slot=B page=64/", nth=1)
    ota.start(image)                      # ... whatever makes the event happen
    cut.wait(60.0)                        # CutTimeout names the pattern, the Nth, the console tail
    cut.seen_to_sent_us, cut.device_to_sent_us      # what it measured
    cut_on_mqtt(cart.power, fleet.mqtt, "$aws/things/cart-01/jobs/+/update", lambda m: b"IN_PROGRESS" in m.payload)

**Arming** (in the caller's thread, before the event): the supply's session is opened, the
channel's OFF is encoded to bytes (`harness.power.base.ArmedOff`), the channel is checked to be
on (a cut on a channel that is already off is refused), a worker thread is started for the
delay and the confirmation, and only then is the trigger attached (a console listener, an MQTT
handler). A supply whose output command switches every output at once is refused.

**Firing** happens on the thread that delivers the event: the console's reader thread (before
the line is published, so by the time ``expect`` can see the line the OFF is on the wire) or
paho's network thread. It is one ``send`` of the pre-encoded bytes on the supply's socket; for a
delay, the worker waits on an event until just before the due time (event time + delay) and
spins the rest. Nothing in the firing path logs, allocates a thread or parses more than it must.

**After firing** the worker checks the output with the driver's normal query path. An OFF that
the instrument lost is sent again through the normal path, and an armed session that died (the
instrument closed it, the driver reopened it) falls back to the normal path too: the cart is left
off either way, and `wait` raises `CutError` saying that the cut did not land at the event.

Times are ``time.monotonic_ns()`` (the console's and MQTT client's ``time.monotonic()`` stamps
converted): ``event_t_ns`` when the event reached the harness, ``device_t_ns`` the device's own
stamp if the line carries ``t=<ns>`` (or a ``t_ns`` group / JSON field), ``sent_t_ns`` right after
the OFF was sent. On the virtual rack every clock is the host's CLOCK_MONOTONIC, so the three
compare directly; on a lab cart ``device_t_ns`` is the cart's own clock.
"""

from __future__ import annotations

import json
import re
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from typing import Any

from harness.power.base import PowerError

__all__ = ["Cut", "CutError", "CutTimeout", "cut_on_console", "cut_on_mqtt"]

_SPIN_S = 0.001          # a delayed cut sleeps until this long before its due time, then spins
_STAMP = re.compile(r"(?:^|\s)t=(\d+)(?:\s|$)")
_MQTT_TAIL = 8


class CutError(PowerError):
    """A cut could not be armed, or it did not land where it was aimed."""


class CutTimeout(CutError, TimeoutError):
    """The event never came. Carries the evidence: what was awaited, how long, the tail."""

    def __init__(self, message: str, what: str = "", waited: float = 0.0, tail: str = ""):
        super().__init__(message)
        self.what = what
        self.waited = waited
        self.tail = tail

    def __reduce__(self):
        return (type(self), (str(self), self.what, self.waited, self.tail))


def _resolve(power: Any) -> tuple[Any, int, str]:
    """(supply, channel, label) of a ChannelPower or a (supply, channel) pair."""
    if isinstance(power, tuple):
        supply, channel = power
        return supply, channel, f"{supply.name} ch{channel}"
    return power.supply, power.channel, power.label


class Cut:
    """One armed cut on one supply channel. Build it with `cut_on_console` / `cut_on_mqtt`.

    ``state``: "armed", then "firing" (the event came), then "fired" (confirmed off) or "failed";
    or "disarmed" (`disarm`, a `wait` that timed out, teardown).
    """

    def __init__(self, power: Any, *, trigger: str, nth: int = 1, delay_s: float = 0.0,
                 evidence: Callable[[], str] | None = None):
        supply, channel, label = _resolve(power)
        if isinstance(nth, bool) or not isinstance(nth, int) or nth < 1:
            raise ValueError(f"{label}: cut nth must be an integer >= 1, got {nth!r}")
        delay_s = float(delay_s)
        if not 0.0 <= delay_s < 3600.0:
            raise ValueError(f"{label}: cut delay_s must be in [0, 3600) s, got {delay_s!r}")
        self.supply = supply
        self.channel = channel
        self.label = label
        self.trigger = trigger
        self.nth = nth
        self.delay_s = delay_s
        self.state = "arming"
        self.matches = 0                      # events seen since arming
        self.event: str | None = None         # the event's text (console line, "topic payload")
        self.event_index: int | None = None   # console line index / MQTT message index
        self.event_t_ns: int | None = None    # when the event reached the harness
        self.device_t_ns: int | None = None   # the device's own stamp, if the event carries one
        self.due_t_ns: int | None = None      # event_t_ns + delay
        self.sent_t_ns: int | None = None     # right after the armed OFF went out
        self.path: str | None = None          # "socket", "visa", "fake"; "fallback" if the normal path did it
        self.confirmed_off: bool | None = None
        self.confirm_t_ns: int | None = None
        self.error: str | None = None
        self._evidence = evidence or (lambda: "")
        self._lock = threading.Lock()
        self._triggered = threading.Event()   # the Nth event came, or disarmed
        self._cancel = threading.Event()      # disarmed: a pending delayed fire must not happen
        self._done = threading.Event()        # fired and checked (or failed)
        self._fire_error: BaseException | None = None
        self._detach: Callable[[], None] | None = None

        if not getattr(supply, "PER_CHANNEL_OUTPUT", True):
            raise CutError(f"{label}: cannot arm a cut on supply {supply.name}: its output command switches "
                           f"every output at once, so a cut on channel {channel} would cut the others too")
        arm_off = getattr(supply, "arm_off", None)
        if arm_off is None:
            raise CutError(f"{label}: supply {supply.name} ({type(supply).__name__}) cannot be armed for a cut")
        try:
            self._armed = arm_off(channel)
            on = supply.is_on(channel)
        except PowerError as exc:
            raise CutError(f"{label}: cannot arm a cut: {exc}") from exc
        if not on:
            raise CutError(f"{label}: cannot arm a cut on supply {supply.name} channel {channel}: its output is "
                           "already off (nothing to cut; power the cart on first)")
        self._worker = threading.Thread(target=self._work, daemon=True, name=f"cut-{supply.name}-ch{channel}")
        self._worker.start()
        self.state = "armed"

    # ------------------------------------------------------------------ trigger side
    def _attach(self, detach: Callable[[], None]) -> None:
        with self._lock:
            if self.state == "armed":
                self._detach = detach
                return
        detach()   # disarmed (or fired) before the trigger was even attached

    def _on_event(self, t_ns: int, text: str, index: int | None, stamp: Callable[[], int | None]) -> None:
        """The trigger saw a matching event (on the delivering thread)."""
        with self._lock:
            if self.state != "armed":
                return
            self.matches += 1
            if self.matches < self.nth:
                return
            self.state = "firing"
        if not self.delay_s:
            self._fire()
        else:
            self.due_t_ns = t_ns + round(self.delay_s * 1e9)
        self.event_t_ns, self.event, self.event_index = t_ns, text, index
        try:
            self.device_t_ns = stamp()
        except (ValueError, TypeError):
            self.device_t_ns = None
        self._triggered.set()   # the worker: the delay (if any), then the check
        self._detach_trigger()

    def _fire(self) -> None:
        try:
            self.sent_t_ns = self._armed.fire()
            self.path = self._armed.path
        except Exception as exc:  # the worker falls back to the normal path (this thread must go on)
            self._fire_error = exc

    def _detach_trigger(self) -> None:
        with self._lock:
            detach, self._detach = self._detach, None
        if detach is not None:
            detach()

    # ------------------------------------------------------------------ worker
    def _work(self) -> None:
        self._triggered.wait()   # bounded by the cut's life: the event, disarm() or a wait() that timed out
        try:
            if self.state == "disarmed":
                return
            if self.due_t_ns is not None:
                left = (self.due_t_ns - time.monotonic_ns()) / 1e9 - _SPIN_S
                if left > 0 and self._cancel.wait(left):
                    self._cancelled_while_delayed()
                    return
                while time.monotonic_ns() < self.due_t_ns:
                    time.sleep(0)   # gives the GIL away between checks
                if self._cancel.is_set():
                    self._cancelled_while_delayed()
                    return
                self._fire()
            self._check()
        finally:
            self._done.set()

    def _cancelled_while_delayed(self) -> None:
        self.state = "disarmed"

    def _check(self) -> None:
        """Confirm the output is off with the normal query path; if not, switch it off that way."""
        supply, ch = self.supply, self.channel
        late = ""
        if self._fire_error is not None:
            why = _describe(self._fire_error)
            try:
                supply.off(ch)
            except Exception as exc:
                self._fail(f"the armed OFF could not be sent ({why}) and switching channel {ch} off through "
                           f"the normal path failed too ({_describe(exc)}): its output state is unknown")
                return
            self.path = "fallback"
            self.sent_t_ns = time.monotonic_ns()
            late = f"the armed OFF could not be sent ({why}); switched off through the normal path"
        sent_ns = self.sent_t_ns
        try:
            on = supply.is_on(ch)
            if on:
                supply.off(ch)
                sent_ns = time.monotonic_ns()
                on = supply.is_on(ch)
                late = late or "the instrument still reported the output on after the armed OFF; switched off again"
        except Exception as exc:
            self._fail(f"OFF {'sent' if not late else 'attempted'} but checking channel {ch} failed: "
                       f"{_describe(exc)}" + (f" ({late})" if late else ""))
            return
        self.confirm_t_ns = time.monotonic_ns()
        self.confirmed_off = not on
        if on:
            self._fail(f"channel {ch} is still on after the cut and a second OFF")
        elif late:
            ms = ((sent_ns or self.confirm_t_ns) - (self.due_t_ns or self.event_t_ns or 0)) / 1e6
            self._fail(f"{late} {ms:.1f} ms after it was due: the cut did not land at the event "
                       "(the cart is off)")
        else:
            self.state = "fired"

    def _fail(self, text: str) -> None:
        self.error = f"{self.label}: cut on {self.trigger}: {text}"
        self.state = "failed"

    # ------------------------------------------------------------------ caller side
    def wait(self, timeout: float) -> Cut:
        """Wait for the cut to fire and be confirmed. The event must come within ``timeout``;
        confirming it has the supply's own bound on top. Raises `CutTimeout` (the trigger is
        removed and the channel switched off: safe state) or `CutError` (it fired but not cleanly)."""
        t0 = time.monotonic()
        if not self._triggered.wait(timeout):
            if self._disarm_if_armed():
                waited = time.monotonic() - t0
                safe = self._safe_state()
                tail = self._evidence()
                raise CutTimeout(
                    f"{self.label}: cut not fired: {self.trigger}, occurrence {self.nth} "
                    f"(seen {self.matches} since arming) did not come within {waited:.2f} s; {safe}\n{tail}",
                    what=self.trigger, waited=waited, tail=tail)
            self._triggered.wait(1.0)   # the event came just as the wait gave up: its thread is firing
        if self.event_t_ns is None:
            raise CutError(f"{self.label}: cut on {self.trigger} was disarmed before the event came")
        bound = getattr(self.supply, "deadline_s", 5.0) * 3 + self.delay_s + 1.0
        if not self._done.wait(bound):
            raise CutError(f"{self.label}: cut on {self.trigger} fired at the event but the supply did not "
                           f"confirm the output off within {bound:.1f} s")
        if self.error is not None:
            raise CutError(self.error)
        if self.state == "disarmed":
            raise CutError(f"{self.label}: cut on {self.trigger} was disarmed before its delay ran out")
        return self

    def _safe_state(self) -> str:
        try:
            self.supply.safe_state([self.channel])
        except Exception as exc:
            return f"switching channel {self.channel} off failed too: {_describe(exc)}"
        return f"channel {self.channel} switched off (safe state)"

    def _disarm_if_armed(self) -> bool:
        with self._lock:
            armed = self.state == "armed"
            if armed:
                self.state = "disarmed"
        if armed:
            self._detach_trigger()
            self._cancel.set()
            self._triggered.set()
        return armed

    def disarm(self, timeout: float = 5.0) -> None:
        """Remove the trigger; a delayed cut not yet fired will not fire. Idempotent; safe in teardown."""
        self._disarm_if_armed()
        self._detach_trigger()
        self._cancel.set()
        if threading.current_thread() is not self._worker and self._worker.is_alive():
            self._worker.join(timeout)

    close = disarm

    def __enter__(self) -> Cut:
        return self

    def __exit__(self, *exc: object) -> None:
        self.disarm()

    @property
    def attached(self) -> bool:
        """Whether the trigger (console listener, MQTT handler) is still in place."""
        return self._detach is not None

    # ------------------------------------------------------------------ the record
    @staticmethod
    def _us(a: int | None, b: int | None) -> float | None:
        return None if a is None or b is None else round((b - a) / 1e3, 1)

    @property
    def seen_to_sent_us(self) -> float | None:
        """Event reached the harness -> OFF sent (includes the delay, if any)."""
        return self._us(self.event_t_ns, self.sent_t_ns)

    @property
    def device_to_seen_us(self) -> float | None:
        return self._us(self.device_t_ns, self.event_t_ns)

    @property
    def device_to_sent_us(self) -> float | None:
        return self._us(self.device_t_ns, self.sent_t_ns)

    @property
    def off_bytes(self) -> bytes:
        """What the armed OFF sends (pre-encoded at arming)."""
        return self._armed.data

    def as_dict(self) -> dict:
        return {"label": self.label, "supply": getattr(self.supply, "name", "?"), "channel": self.channel,
                "trigger": self.trigger, "nth": self.nth, "delay_s": self.delay_s, "state": self.state,
                "event": self.event, "event_index": self.event_index, "event_t_ns": self.event_t_ns,
                "device_t_ns": self.device_t_ns, "sent_t_ns": self.sent_t_ns, "path": self.path,
                "confirmed_off": self.confirmed_off, "confirm_t_ns": self.confirm_t_ns, "error": self.error,
                "seen_to_sent_us": self.seen_to_sent_us, "device_to_sent_us": self.device_to_sent_us}

    def __repr__(self) -> str:
        return f"<Cut {self.label} on {self.trigger} #{self.nth} {self.state}>"


# ---------------------------------------------------------------------- console
def cut_on_console(power: Any, console: Any, pattern: str | re.Pattern[str], *, nth: int = 1,
                   delay_s: float = 0.0) -> Cut:
    """Arm ``power`` (a ChannelPower, or (supply, channel)) to cut when ``pattern`` (``re.search``)
    matches its ``nth`` complete console line from now on, ``delay_s`` after that line arrived.
    The device stamp is the match's ``t_ns`` group, else a ``t=<ns>`` word on the line."""
    rx = pattern if isinstance(pattern, re.Pattern) else re.compile(pattern)
    log_path = getattr(console, "log_path", None)

    def evidence() -> str:
        lines = "\n".join(f"    | {x}" for x in console.tail().splitlines()) or "    (nothing received)"
        where = str(log_path) if log_path is not None else "(no log file for this console)"
        return f"last lines received (control codes stripped):\n{lines}\nfull log: {where}"

    cut = Cut(power, trigger=f"console {console.name} pattern {rx.pattern!r}", nth=nth, delay_s=delay_s,
              evidence=evidence)

    def on_line(line: Any, m: re.Match[str]) -> None:
        cut._on_event(round(line.t_mono * 1e9), line.text, line.index, lambda: _line_stamp(line.text, m))

    handle = console.add_listener(rx, on_line)
    cut._attach(lambda: console.remove_listener(handle))
    return cut


def _line_stamp(text: str, m: re.Match[str]) -> int | None:
    group = m.groupdict().get("t_ns")
    if group is not None:
        return int(group)
    found = _STAMP.search(text)
    return int(found.group(1)) if found else None


# ---------------------------------------------------------------------- MQTT
class _Router:
    """The one handler a cut module puts on an (MQTT client, topic filter): armed cuts come and go
    here, because the client's handler list has no removal."""

    def __init__(self) -> None:
        self.handlers: tuple[Callable[[Any], None], ...] = ()
        self.lock = threading.Lock()

    def __call__(self, message: Any) -> None:
        for handler in self.handlers:
            handler(message)

    def add(self, handler: Callable[[Any], None]) -> None:
        with self.lock:
            self.handlers = (*self.handlers, handler)

    def remove(self, handler: Callable[[Any], None]) -> None:
        with self.lock:
            self.handlers = tuple(h for h in self.handlers if h is not handler)


_routers: weakref.WeakKeyDictionary[Any, dict[str, _Router]] = weakref.WeakKeyDictionary()
_routers_lock = threading.Lock()


def cut_on_mqtt(power: Any, source: Any, topic_filter: str | Callable[[Any], bool] | None = None,
                predicate: Callable[[Any], bool] | None = None, *, nth: int = 1, delay_s: float = 0.0) -> Cut:
    """Arm ``power`` to cut on the ``nth`` MQTT message on ``topic_filter`` for which ``predicate``
    (default: any) is true, ``delay_s`` after it was received.

    ``source`` is the harness's `MqttClient` (``fleet.mqtt``): the cut subscribes (or joins an
    existing subscription) itself. Or ``source`` is the topic filter itself and you hook
    ``cut.mqtt_handler`` (a harness handler, ``Message -> None``) or ``cut.on_message`` (paho's
    ``on_message(client, userdata, msg)``) into a client of your own.
    The device stamp is the payload's JSON ``t_ns`` field, else a ``t=<ns>`` word in it."""
    client = None
    if isinstance(source, str):   # cut_on_mqtt(power, "a/filter", predicate)
        if callable(topic_filter) and predicate is None:
            topic_filter, predicate = None, topic_filter
        if topic_filter is not None:
            raise ValueError(f"cut_on_mqtt: two topic filters given: {source!r} and {topic_filter!r}")
        topic_filter = source
    else:
        client = source
    if not topic_filter:
        raise ValueError("cut_on_mqtt: a topic filter is needed")
    from harness.fleet.mqtt import topic_matches

    seen: deque[str] = deque(maxlen=_MQTT_TAIL)

    def evidence() -> str:
        return (f"last {len(seen)} message(s) on {topic_filter}:\n" + "\n".join(f"    {x}" for x in seen)
                if seen else f"no message on {topic_filter} since arming")

    cut = Cut(power, trigger=f"MQTT {topic_filter}" + (f" where {_name(predicate)}" if predicate else ""),
              nth=nth, delay_s=delay_s, evidence=evidence)

    def handler(msg: Any) -> None:
        t = getattr(msg, "t", None)
        t_ns = round(t * 1e9) if t is not None else time.monotonic_ns()
        if not topic_matches(topic_filter, msg.topic) or (predicate is not None and not predicate(msg)):
            seen.append(_brief(msg))
            return
        cut._on_event(t_ns, _brief(msg), getattr(msg, "index", None), lambda: _payload_stamp(msg.payload))

    cut.mqtt_handler = handler
    cut.on_message = lambda _client, _userdata, msg: handler(msg)
    if client is None:
        cut._attach(lambda: None)
        return cut
    with _routers_lock:
        router = _routers.setdefault(client, {}).setdefault(topic_filter, _Router())
    router.add(handler)
    cut._attach(lambda: router.remove(handler))
    try:
        add = getattr(client, "add_handler", None)
        try:
            if add is None:
                raise LookupError
            add(topic_filter, router)        # already subscribed: join it (a no-op if joined before)
        except Exception:
            client.subscribe(topic_filter, handler=router)
    except BaseException:
        cut.disarm()
        raise
    return cut


def _payload_stamp(payload: bytes) -> int | None:
    try:
        value = json.loads(payload).get("t_ns")
        if isinstance(value, int):
            return value
    except (ValueError, AttributeError, TypeError):
        pass
    found = _STAMP.search(payload.decode("utf-8", "replace"))
    return int(found.group(1)) if found else None


def _brief(msg: Any) -> str:
    brief = getattr(msg, "brief", None)
    if callable(brief):
        return brief()
    return f"{msg.topic} {bytes(msg.payload)[:200].decode('utf-8', 'replace')}"


def _name(fn: Callable) -> str:
    return getattr(fn, "__name__", None) or repr(fn)


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if type(exc).__name__ in text else f"{type(exc).__name__}: {text}"

