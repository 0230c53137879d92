"""The lab time service: signed answers to a cart's time challenge (docs/image-format.md, "Time answers").

A cart has no clock it may trust for validity checks, so before it verifies an update it asks:

==========================================  ======================================================
the cart publishes (QoS 1)                  the service answers (QoS 1)
==========================================  ======================================================
``cart-hil/time/{thing}/request``           ``cart-hil/time/{thing}/answer``: the cart's nonce, its
``{"nonce": "<32 lowercase hex>"}``         thing name and the time, signed by every trusted root's
                                            time leaf (`harness.image.make_time_answer`)
==========================================  ======================================================

Only served things are answered (`serve`), as with the jobs service: harness workers sharing a
broker each serve their own carts, else a cart would get one answer per worker. A request that is
not a JSON object with a 32-hex ``nonce`` is recorded (nonce None) and not answered.

Each thing has a mode (`set_mode`), the faults a cart must survive:

=============  ===================================================================================
normal         the signed time, one signature per trusted root
silent         requests are recorded, never answered (an unreachable time service)
replay         the last answer sent to this thing, again (or, before any, one recorded for another
               nonce): the cart must say ``nonce mismatch``
forged         the real chains, signatures by a fresh key: ``bad signature``
rogue          rogue-root's time leaf, ``ca`` "rogue-root": ``untrusted signer``
malformed      a normal answer cut in half (a broken message): ``malformed: answer not json``
oversized      a normal answer padded with spaces past 8192 bytes: ``malformed: answer too large``
unsigned       the signed body with an empty ``signatures`` list: ``unsigned``
=============  ===================================================================================

``offset_s`` shifts the time the service signs, in any mode (a server clock that is off, or an
attacker's old-but-genuine time: an answer earlier than the cart's last accepted time is refused
as ``earlier than last accepted``). `requests` and `answers` are the evidence; `wait_requests`
waits for them and `wait_quiet` counts what comes in a window (a condition variable, never a poll).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, NamedTuple

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from harness import image as himage
from harness import pki as hpki

from .mqtt import Message, MqttClient

if TYPE_CHECKING:
    from harness.pki import LabPki

__all__ = [
    "MODES",
    "TimeAnswer",
    "TimeRequest",
    "TimeService",
    "TimeServiceError",
    "TimeServiceTimeout",
    "answer_topic",
    "request_topic",
]

log = logging.getLogger(__name__)

MODES = ("normal", "silent", "replay", "forged", "rogue", "malformed", "oversized", "unsigned")
REQUEST_MAX = 1024  # bytes; a request is {"nonce": "<32 hex>"}
OFFSET_MAX = 100 * 366 * 86400  # |offset_s|: the cart clock bound of the lab
_THING_RE = re.compile(r"[a-zA-Z0-9:_-]{1,128}")
_NONCE_RE = re.compile(r"[0-9a-f]{32}")

Signer = tuple[str, ec.EllipticCurvePrivateKey, Sequence[x509.Certificate]]


def request_topic(thing: str) -> str:
    return f"cart-hil/time/{thing}/request"


def answer_topic(thing: str) -> str:
    return f"cart-hil/time/{thing}/answer"


class TimeServiceError(Exception):
    """A harness-side request to the time service was refused; the message says why."""


class TimeServiceTimeout(TimeServiceError, TimeoutError):
    pass


class TimeRequest(NamedTuple):
    """One request as received: ``t`` is ``time.monotonic()`` at receipt, ``nonce`` None when the
    request was malformed (it was not answered), ``size`` the payload's bytes."""

    t: float
    nonce: str | None
    size: int


class TimeAnswer(NamedTuple):
    """One answer as sent: ``nonce`` is the request's, ``time`` the time the payload carries (None
    when it carries none that a cart could read: malformed)."""

    t: float
    mode: str
    nonce: str
    time: int | None
    payload: bytes


class _Thing:
    def __init__(self) -> None:
        self.mode = "normal"
        self.offset_s = 0
        self.requests: list[TimeRequest] = []
        self.answers: list[TimeAnswer] = []


class TimeService:
    """The time service on an already connected `MqttClient` (the harness identity)."""

    def __init__(self, mqtt: MqttClient, signers: Iterable[Signer], *,
                 rogue: tuple[ec.EllipticCurvePrivateKey, Sequence[x509.Certificate]] | None = None,
                 clock: Callable[[], float] = time.time, subscribe_timeout: float = 5.0):
        self.mqtt = mqtt
        self.signers = [tuple(s) for s in signers]
        self.rogue = rogue
        self.clock = clock
        # a bad signer fails here, not on the network thread at the first request
        himage.make_time_answer(nonce="0" * 32, thing="check", time=0, signers=self.signers)
        if rogue is not None:
            himage.make_time_answer(nonce="0" * 32, thing="check", time=0, signers=[(hpki.ROGUE_ROOT, *rogue)])
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._things: dict[str, _Thing] = {}
        self._subscribe_timeout = subscribe_timeout
        self._closed = False

    @classmethod
    def for_pki(cls, mqtt: MqttClient, lab_pki: LabPki, **kwargs) -> TimeService:
        """Signed by the time leaves of every root the lab's services sign under (lab-root-2025-time,
        lab-root-2026-time, lab-root-2027-time: a cart trusting any of them can check the answer);
        the rogue mode signs with rogue-root-time."""
        signers = [(root, lab_pki.key(hpki.time_signer_of(root)), lab_pki.chain(hpki.time_signer_of(root)))
                   for root in hpki.SERVICE_ROOTS]
        rogue_leaf = hpki.time_signer_of(hpki.ROGUE_ROOT)
        return cls(mqtt, signers, rogue=(lab_pki.key(rogue_leaf), lab_pki.chain(rogue_leaf)), **kwargs)

    # harness API --------------------------------------------------------------------------------
    def serve(self, thing: str) -> None:
        """Answer ``thing`` from now on (idempotent); subscribes to its request topic."""
        if not isinstance(thing, str) or not _THING_RE.fullmatch(thing):
            raise TimeServiceError(f"invalid thing name {thing!r}")
        with self._lock:
            if self._closed:
                raise TimeServiceError("the time service is closed")
            if thing in self._things:
                return
            self._things[thing] = _Thing()
        self.mqtt.subscribe(request_topic(thing), qos=1, timeout=self._subscribe_timeout, handler=self._on_message)

    @property
    def things(self) -> set[str]:
        with self._lock:
            return set(self._things)

    def set_mode(self, thing: str, mode: str, *, offset_s: float = 0) -> None:
        """How the service answers ``thing`` from now on (see the module docstring); ``offset_s``
        shifts the signed time (whole seconds) in any mode."""
        if mode not in MODES:
            raise TimeServiceError(f"unknown time service mode {mode!r}; modes are {', '.join(MODES)}")
        if mode == "rogue" and self.rogue is None:
            raise TimeServiceError("mode 'rogue' needs the service built with rogue=(key, chain)")
        if isinstance(offset_s, bool) or not isinstance(offset_s, int | float) or not math.isfinite(offset_s) \
                or abs(offset_s) > OFFSET_MAX:
            raise TimeServiceError(f"offset_s {offset_s!r}: seconds, at most {OFFSET_MAX} either way")
        with self._lock:
            state = self._thing(thing)
            state.mode, state.offset_s = mode, round(offset_s)

    def mode(self, thing: str) -> tuple[str, int]:
        """(mode, offset_s) of ``thing``."""
        with self._lock:
            state = self._thing(thing)
            return state.mode, state.offset_s

    def requests(self, thing: str) -> list[TimeRequest]:
        """Every request received from ``thing`` so far, in order."""
        with self._lock:
            return list(self._thing(thing).requests)

    def answers(self, thing: str) -> list[TimeAnswer]:
        """Every answer sent to ``thing`` so far, in order."""
        with self._lock:
            return list(self._thing(thing).answers)

    def wait_requests(self, thing: str, n: int, timeout: float) -> list[TimeRequest]:
        """Wait until ``thing`` has sent at least ``n`` requests (counted since it was served);
        returns them all. TimeServiceTimeout names what it got."""
        t0 = time.monotonic()
        deadline = t0 + timeout
        with self._cond:
            state = self._thing(thing)
            while len(state.requests) < n:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    got = ", ".join(f"t={r.t:.3f} nonce={r.nonce}" for r in state.requests[-5:]) or "none"
                    raise TimeServiceTimeout(
                        f"timed out after {time.monotonic() - t0:.3f}s waiting for {n} time request(s) from {thing} "
                        f"on {request_topic(thing)}; got {len(state.requests)} (mode {state.mode}; last: {got})")
                self._cond.wait(remaining)
            return list(state.requests)

    def wait_quiet(self, thing: str, *, since: int = 0, quiet_s: float) -> int:
        """Watch ``thing`` for the whole ``quiet_s`` seconds; returns how many of its requests there
        are beyond the first ``since`` at the end (0: it kept quiet). A retry storm is counted, not
        just noticed, so the window is never cut short."""
        deadline = time.monotonic() + quiet_s
        with self._cond:
            state = self._thing(thing)
            while (remaining := deadline - time.monotonic()) > 0:
                self._cond.wait(remaining)
            return max(0, len(state.requests) - since)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            things = sorted(self._things)
        if things:
            self.mqtt.unsubscribe([request_topic(t) for t in things])

    def __enter__(self) -> TimeService:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # internals ----------------------------------------------------------------------------------
    def _thing(self, thing: str) -> _Thing:
        try:
            return self._things[thing]
        except KeyError:
            raise TimeServiceError(f"the time service does not serve {thing!r} (serve(thing) first)") from None

    def _on_message(self, msg: Message) -> None:
        """A request (paho's network thread): record it, answer it as the thing's mode says."""
        parts = msg.topic.split("/")
        if len(parts) != 4 or parts[:2] != ["cart-hil", "time"] or parts[3] != "request":
            return
        thing = parts[2]
        nonce = _nonce(msg.payload)
        with self._lock:
            state = self._things.get(thing)
            if state is None or self._closed:
                return
            state.requests.append(TimeRequest(msg.t, nonce, len(msg.payload)))
            self._cond.notify_all()
            if nonce is None:
                log.warning("time service: malformed request from %s (%d bytes), not answered", thing,
                            len(msg.payload))
                return
            mode, offset = state.mode, state.offset_s
            last = state.answers[-1] if state.answers else None
        try:
            answer = self._answer(thing, nonce, mode, int(self.clock()) + offset, last)
        except Exception:
            log.exception("time service could not answer %s", msg.brief())
            return
        if answer is None:
            return
        try:
            self.mqtt.publish(answer_topic(thing), answer.payload, qos=1, wait=False)
        except Exception:
            log.exception("time service could not publish the answer to %s", thing)
            return
        with self._lock:
            state.answers.append(answer)
            self._cond.notify_all()

    def _answer(self, thing: str, nonce: str, mode: str, now: int, last: TimeAnswer | None) -> TimeAnswer | None:
        def sent(payload: bytes, signed_time: int | None = now) -> TimeAnswer:
            return TimeAnswer(time.monotonic(), mode, nonce, signed_time, payload)

        def signed(signers, for_nonce: str = nonce) -> bytes:
            return himage.make_time_answer(nonce=for_nonce, thing=thing, time=now, signers=signers)

        if mode == "silent":
            return None
        if mode == "replay":
            if last is not None:
                return sent(last.payload, last.time)
            return sent(signed(self.signers, os.urandom(16).hex()))  # as if recorded from another exchange
        if mode == "forged":
            return sent(signed([(ca, ec.generate_private_key(ec.SECP256R1()), chain) for ca, _, chain in self.signers]))
        if mode == "rogue":
            assert self.rogue is not None  # set_mode checked
            return sent(signed([(hpki.ROGUE_ROOT, *self.rogue)]))
        if mode == "unsigned":
            return sent(himage.time_answer(himage.time_body(nonce=nonce, thing=thing, time=now), []))
        normal = signed(self.signers)
        if mode == "malformed":
            return sent(normal[: len(normal) // 2], None)
        if mode == "oversized":
            return sent(normal + b" " * max(0, himage.TIME_ANSWER_MAX + 1 - len(normal)))
        return sent(normal)


def _nonce(payload: bytes) -> str | None:
    """The request's nonce, or None if the request is not a JSON object with a 32-hex nonce."""
    if len(payload) > REQUEST_MAX:
        return None
    try:
        req = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    nonce = req.get("nonce") if isinstance(req, dict) else None
    return nonce if isinstance(nonce, str) and _NONCE_RE.fullmatch(nonce) else None
