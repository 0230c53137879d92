"""`hil repro INCIDENT.yaml`: replay a field incident on one slot of the rig, the cart's console live on
screen, and say in one line whether the failure came back.

    hil repro incidents/near-miss-1-clock-drift.yaml                 the release's firmware: is the fix in?
    hil repro incidents/near-miss-1-clock-drift.yaml --field         the field's defective firmware (a seeded
                                                                     fault build stands in for it): it must fail
    hil repro INCIDENT.yaml --build crash_on_sensor=lidar-tfmini     another fault build in the field's place
    hil repro INCIDENT.yaml --rig rigs/lab.yaml --slot 3             on a lab rig, on the cart in slot 3

An incident file (docs/incidents.md) says what the field saw: the configuration, the firmware it ran
(`from`) and the release it was sent (`to`), how far its clock was off, which roots it held and whether
a CA update came first, where power was lost, what the network did, and how a healthy cart ends
(`expect`). `load_incident(path)` validates it the way harness/config.py validates a rig: every error is
one line naming the file and the field. `check_slot` checks it against the slot it will run on.

The replay is one pytest test, test_suites/incident_replay.py, run by the command on one cart with this module
as a plugin (``-p harness.repro``: the options ``--incident FILE``, ``--incident-build SIDE:FAULT[=VALUE]``,
``--repro-result FILE`` and the fixture ``incident_replay``). `Replay.run` sets the cart up (factory
state, `from` installed as an update, the clock, the CA update), then replays the update to `to` with the
network faults, or the power-cut sweep's point at the incident's event (harness/sweep.py: the invariants
of the gate's sweep). The outcome is judged by the `ota` checks the suites use (`expect_confirmed`,
`expect_rejected`, ...: slots, boot control, boots, the rollback metric), by the update's own causes
(crash loop, retry storm, broker gone, cart silent), by a quiet watch after a refusal (a cart that fetches
or asks again is looping) and, after a CA update, by the overlap (every root the cart held is kept).

The command prints the console as it comes (``cart-04 | ...``), the replay's steps (``== ...``) and one
final line: ``REPRODUCED: <cause>`` (exit 1) or ``not reproduced: <what happened>`` (exit 0). An
incident, rig or slot it cannot use, or a replay that could not set the incident's state up, is one
``hil: ...`` line and exit 2. Reports (console log, JUnit XML, the verdict as JSON) go to
reports/repro/<time>-<incident id>/.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import queue
import re
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import pytest
from pydantic import AfterValidator, BeforeValidator, Field, ValidationError, model_validator

from harness import pki
from harness.cart import CartState
from harness.config import MAX_CLOCK_DRIFT_S, ConfigError, Id, Rig, Slot, _explain, _read_mapping, _Strict
from harness.fleet.timesvc import MODES as TIME_MODES
from harness.ota import OtaError, reason_matches
from harness.recovery import recover_factory
from harness.sweep import CutPoint, Event, PowerCutSweep

if TYPE_CHECKING:
    from harness.cart import Cart
    from harness.ota import CartOta, Fleet, UpdateOutcome, UpdateRun

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RIG = ROOT / "rigs" / "virtual.yaml"
SUITE = "test_suites/incident_replay.py"

OUTCOMES = ("confirmed", "rejected", "failed", "rolled-back", "deferred")
WITH_REASON = ("rejected", "failed", "deferred")
QUIET_S = 5.0          # watched after a refusal: a cart that loops fetches or asks again within it
DROP_HOLD_S = 0.05     # a dropped download: the link goes silent this long, then the connection drops
HELD_S = 30.0          # a download held while the replay acts (bytes swapped, broker dropped), then dropped
RECONNECT_S = 15.0     # the cart back on the broker after its session was taken over
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "y": 365 * 86400}
_OFFSET = re.compile(r"([+-]?)\s*(\d+(?:\.\d+)?)\s*([smhdy]?)")
_VERSION = re.compile(r"\d{1,9}\.\d{1,9}\.\d{1,9}")
_FAULT = re.compile(r"[a-z][a-z0-9_]{0,63}")
_EVENT = re.compile(r"[a-z][a-z-]{0,63}")


class ReplayError(Exception):
    """The replay could not put the cart in the incident's state (nothing was judged); one line."""


# ---------------------------------------------------------------- the incident file


def parse_offset(value: Any) -> int:
    """Seconds from "+12h", "-43200s", "-12 h", "3y", "1.5d", "90m" or a plain number of seconds
    (y = 365 days); at most 100 years either way."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"expected an offset like -12h, +43200s or 3y, got {value!r}")
    if isinstance(value, str):
        m = _OFFSET.fullmatch(value.strip())
        if m is None:
            raise ValueError(f"{value!r} is not an offset like -12h, +43200s, 90m, 1.5d or 3y")
        seconds = float(m[2]) * _UNITS[m[3] or "s"] * (-1 if m[1] == "-" else 1)
    else:
        seconds = float(value)
    if seconds != seconds or abs(seconds) > MAX_CLOCK_DRIFT_S:
        raise ValueError(f"{value!r} is more than 100 years either way")
    return round(seconds)


def describe_offset(seconds: int) -> str:
    """-43200 -> "-12h", 3 years -> "+3y", 95 -> "+95s"."""
    for unit in ("y", "d", "h", "m"):
        if seconds and seconds % _UNITS[unit] == 0:
            return f"{seconds // _UNITS[unit]:+d}{unit}"
    return f"{seconds:+d}s"


def parse_build(value: Any) -> dict[str, Any]:
    """A fault build: a fault name ("local_clock": that fault on), "name=value", or a mapping
    {name: value, ...}; as the fault set FirmwareBuilds takes."""
    if isinstance(value, str):
        items = [value.split("=", 1)] if "=" in value else [(value, True)]
    elif isinstance(value, dict) and value:
        items = list(value.items())
    else:
        raise ValueError(f"expected a fault name (local_clock), name=value or a mapping of faults, got {value!r}")
    faults: dict[str, Any] = {}
    for name, v in items:
        if not isinstance(name, str) or not _FAULT.fullmatch(name):
            raise ValueError(f"{name!r} is not a fault name (a-z, 0-9 and '_', like local_clock)")
        plain = re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", v) if isinstance(v, str) else isinstance(v, int)  # bool too
        if not plain:
            raise ValueError(f"fault {name}: {v!r} is not a plain value (a word, a number or true)")
        faults[name] = v
    return faults


def build_label(version: str, faults: dict[str, Any] | None) -> str:
    """1.4.2, or 1.4.2+local_clock, or 1.5.1+crash_on_sensor=radar-iwr6843."""
    if not faults:
        return version
    return version + "+" + ",".join(k if v is True else f"{k}={v}" for k, v in sorted(faults.items()))


def _version_key(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in v.split("."))


def _version(v: str) -> str:
    if not _VERSION.fullmatch(v):
        raise ValueError(f"{v!r} is not a version like 1.4.2")
    return v


def _root(v: str) -> str:
    if v not in pki.ROOTS:
        raise ValueError(f"{v!r} is not a root of the lab PKI ({', '.join(pki.ROOTS)})")
    return v


Version = Annotated[str, AfterValidator(_version)]
Offset = Annotated[int, BeforeValidator(parse_offset)]
Build = Annotated[dict[str, Any], BeforeValidator(parse_build)]
RootName = Annotated[str, AfterValidator(_root)]


class About(_Strict):
    id: Id
    title: str = Field(min_length=1)
    summary: str = ""
    source: str = ""


class Configuration(_Strict):
    cart: Id  # the configuration (cart id); the slot holding it is found in the rig


class Running(_Strict):
    version: Version


class Release(_Strict):
    version: Version
    signed_under: RootName | None = None  # the root its manifest requires (default: the cart's first root)


class FieldFirmware(_Strict):
    """The defective firmware of the incident, and the seeded fault build that stands in for it."""

    side: Literal["from", "to"]  # the firmware that was running (from) or the release (to)
    build: Build


class Clock(_Strict):
    offset: Offset  # the cart's RTC against true UTC (+ ahead)


class Trust(_Strict):
    holds: list[Id] | None = None  # the roots the cart holds when it starts: what its configuration was given
    update_first: list[RootName] = Field(default_factory=list)  # a CA update adding these, before the release


def _event(v: str) -> str:
    if not _EVENT.fullmatch(v):
        raise ValueError(f"{v!r} is not an event name (like write, bcb-write, trust-write)")
    return v


def _where(v: int | str) -> int | str:
    if isinstance(v, str):
        m = re.fullmatch(r"(\d{1,2}(?:\.\d+)?)%", v.strip())
        if m is None or not 0 < float(m[1]) < 100:
            raise ValueError(f"{v!r} is neither a byte offset nor a share like 50%")
    elif v < 0:
        raise ValueError(f"{v} is not a byte offset")
    return v


class PowerCut(_Strict):
    event: Annotated[str, AfterValidator(_event)]  # a device event line's name (EV: <name> ...), as in the sweep
    occurrence: int = Field(default=1, ge=1, le=100_000)
    delay_ms: float = Field(default=0.0, ge=0, lt=60_000)


class DownloadDrop(_Strict):
    at: Annotated[int | str, AfterValidator(_where)]  # a byte offset of the image, or a share of it ("50%")
    every_attempt: bool = False  # the link drops there every time (the download cannot complete)

    def offset(self, size: int) -> int:
        if isinstance(self.at, int):
            return self.at
        return int(size * float(self.at.strip()[:-1]) / 100)


class Network(_Strict):
    download_drop: DownloadDrop | None = None
    resume_changed_bytes: bool = False  # bytes after the drop swapped under the same ETag (a mirror's swap)
    broker_disconnect: bool = False     # the broker drops the cart's session while its download is held
    time_service: Literal[tuple(m for m in TIME_MODES if m != "normal")] | None = None  # type: ignore[valid-type]

    @property
    def holds_download(self) -> bool:
        return self.resume_changed_bytes or self.broker_disconnect


class Expect(_Strict):
    outcome: Literal[OUTCOMES]  # type: ignore[valid-type]
    reason: str | None = None

    def describe(self) -> str:
        return self.outcome + (f" for {self.reason!r}" if self.reason else "")


class Incident(_Strict):
    incident: About
    configuration: Configuration
    from_: Running = Field(alias="from")
    to: Release
    field_firmware: FieldFirmware | None = None
    clock: Clock | None = None  # absent: the cart's clock as its configuration has it (clock.drift_s)
    ca: Trust = Trust()
    power_cut: PowerCut | None = None
    network: Network = Network()
    expect: Expect

    @model_validator(mode="after")
    def _consistent(self) -> Incident:
        """Checks across fields; each message starts with the field it blames."""
        exp, net = self.expect, self.network
        if exp.outcome in WITH_REASON and not exp.reason:
            raise ValueError(f"expect.reason: missing (a healthy cart ends {exp.outcome} for a reason: say which)")
        if exp.outcome not in WITH_REASON and exp.reason:
            raise ValueError(f"expect.reason: an update that ends {exp.outcome} has no reason")
        for name in ("resume_changed_bytes", "broker_disconnect"):
            if getattr(net, name) and (net.download_drop is None or net.download_drop.every_attempt):
                raise ValueError(f"network.{name}: needs a download_drop that happens once: it acts while the "
                                 "dropped download is held")
        if _version_key(self.to.version) <= _version_key(self.from_.version):
            raise ValueError(f"to.version: {self.to.version} is not above from.version {self.from_.version} "
                             "(a cart refuses the same or a lower version)")
        if self.power_cut is not None:
            nxt = self.from_.version.rsplit(".", 1)
            if self.to.version != f"{nxt[0]}.{int(nxt[1]) + 1}":
                raise ValueError(f"to.version: a replay with a power cut updates to the next patch version "
                                 f"{nxt[0]}.{int(nxt[1]) + 1} (the sweep's point), got {self.to.version}")
            if net.holds_download or net.time_service or (net.download_drop and net.download_drop.every_attempt):
                raise ValueError("power_cut: the cut's update must reach the write: it cannot be combined with "
                                 "network.time_service, a download that fails on every attempt, "
                                 "resume_changed_bytes or broker_disconnect")
            if self.expect.outcome != "confirmed":
                raise ValueError("expect.outcome: after a power cut a healthy cart converges to the release: "
                                 "confirmed")
        return self

    @property
    def id(self) -> str:
        return self.incident.id


def load_incident(path: Path | str) -> Incident:
    """The validated incident; ConfigError (one line: file and field) otherwise."""
    path = Path(path)
    data = _read_mapping(path)
    try:
        return Incident.model_validate(data)
    except ValidationError as exc:
        raise _explain(path, exc, data) from None


def find_slot(rig: Rig, incident: Incident, path: Path, slot_number: int | None = None) -> Slot:
    """The slot of the incident's configuration, or slot `slot_number` (another configuration, on purpose)."""
    if slot_number is not None:
        for s in rig.slots:
            if s.number == slot_number:
                return s
        raise ConfigError(f"{rig.path}: no slot {slot_number} (slots {', '.join(str(s.number) for s in rig.slots)})")
    try:
        return rig.slot_for(incident.configuration.cart)
    except KeyError:
        raise ConfigError(f"{path}: configuration.cart: no slot of rig {rig.path} holds "
                          f"{incident.configuration.cart} (--slot N replays on another cart)") from None


def check_slot(incident: Incident, path: Path, slot: Slot, faults: FieldBuild) -> None:
    """What the incident asks of the cart it runs on: a `from` the cart can be put on (its factory version,
    or a later one installed as an update) and the roots it says the cart holds."""
    cart = slot.cart
    factory, running = cart.firmware.initial_version, incident.from_.version
    if _version_key(running) < _version_key(factory):
        raise ConfigError(f"{path}: from.version: {running} is below {cart.id}'s factory version {factory} "
                          "(it is installed as an update, and a cart refuses a lower version)")
    if running == factory and faults.from_:
        raise ConfigError(f"{path}: from.version: {running} is {cart.id}'s factory version: a fault build of it "
                          "cannot be installed over it (a cart refuses the same version); give a later version")
    holds = incident.ca.holds
    if holds is not None and sorted(holds) != sorted(cart.provisioned_cas):
        raise ConfigError(f"{path}: ca.holds: {', '.join(holds)}, but {cart.id} is provisioned with "
                          f"{', '.join(cart.provisioned_cas)}")


@dataclass(frozen=True)
class FieldBuild:
    """Which fault builds replace the reference firmware: none (the release's firmware), or the field's."""

    from_: dict[str, Any] = field(default_factory=dict)
    to: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def choose(cls, incident: Incident, path: Path, use_field: bool, builds: list[str]) -> FieldBuild:
        """`--field`: the incident's field_firmware build on its side; `--build F` (repeatable): these faults
        there instead."""
        if not use_field and not builds:
            return cls()
        ff = incident.field_firmware
        if ff is None:
            raise ConfigError(f"{path}: field_firmware: missing (--field and --build need to know which firmware, "
                              "from or to, was the field's)")
        faults: dict[str, Any] = {}
        for b in builds:
            try:
                faults |= parse_build(b)
            except ValueError as exc:
                raise ConfigError(f"--build {b}: {exc}") from None
        faults = faults or dict(ff.build)
        return cls(from_=faults) if ff.side == "from" else cls(to=faults)

    def as_args(self) -> list[str]:
        """The values of --incident-build that say the same: ["from:local_clock"]."""
        return [f"{side}:{k if v is True else f'{k}={v}'}" for side, faults in (("from", self.from_), ("to", self.to))
                for k, v in faults.items()]

    @classmethod
    def from_args(cls, args: list[str]) -> FieldBuild:
        out: dict[str, dict[str, Any]] = {"from": {}, "to": {}}
        for a in args:
            side, _, fault = a.partition(":")
            if side not in out or not fault:
                raise ConfigError(f"--incident-build {a}: expected from:FAULT[=VALUE] or to:FAULT[=VALUE]")
            try:
                out[side] |= parse_build(fault)
            except ValueError as exc:
                raise ConfigError(f"--incident-build {a}: {exc}") from None
        return cls(from_=out["from"], to=out["to"])


# ---------------------------------------------------------------- the verdict


@dataclass(frozen=True)
class Verdict:
    reproduced: bool
    cause: str  # one line: what broke (reproduced) or what happened (not reproduced)

    def line(self) -> str:
        return f"REPRODUCED: {self.cause}" if self.reproduced else f"not reproduced: {self.cause}"


def _first_line(exc: BaseException | str) -> str:
    return (str(exc).splitlines() or [""])[0]


# ---------------------------------------------------------------- the console on screen


class ConsoleEcho:
    """The cart's console lines, and the replay's own notes, printed as they come. Lines are handed to a
    printer thread: a console listener runs on the reader thread, which must never wait for a terminal."""

    def __init__(self, cart: Cart, write: Callable[[str], None]):
        self.cart = cart
        self.write = write
        self._q: queue.Queue[str | None] = queue.Queue()
        self._prompt = cart.profile.prompt.strip()
        self._held = 0  # lines not shown while the echo is hushed
        self._hushed = False
        self._thread = threading.Thread(target=self._print, name=f"echo-{cart.id}", daemon=True)
        self._thread.start()
        self._handle = cart.console.add_listener("", self._line)

    def _line(self, line, _m) -> None:
        text = line.text.strip()
        if not text or text == self._prompt:  # a bare prompt, re-printed around the firmware's own output
            return
        if self._hushed:
            self._held += 1
        else:
            self._q.put(f"{self.cart.id} | {line.text}")

    def note(self, text: str) -> None:
        self._q.put(f"== {text}")

    @contextlib.contextmanager
    def hushed(self, what: str):
        """Console lines not shown meanwhile (a factory image sent as base64 is hundreds of them), counted."""
        self._held, self._hushed = 0, True
        try:
            yield
        finally:
            self._hushed = False
            self.note(f"({what}: {self._held} console lines not shown; all of them are in the console log)")

    def _print(self) -> None:
        while (text := self._q.get()) is not None:
            with contextlib.suppress(Exception):  # a closed terminal must not end the replay
                self.write(text)

    def close(self) -> None:
        self.cart.console.remove_listener(self._handle)
        self._q.put(None)
        self._thread.join(5.0)


# ---------------------------------------------------------------- the replay


class Replay:
    """One incident replayed on one cart (the `incident_replay` fixture; `run()` gives the verdict)."""

    def __init__(self, incident: Incident, cart: Cart, ota: CartOta, fleet: Fleet, *, builds: FieldBuild,
                 echo: ConsoleEcho | None = None):
        self.incident = incident
        self.cart = cart
        self.ota = ota
        self.fleet = fleet
        self.builds = builds
        self.echo = echo
        self.running = build_label(incident.from_.version, builds.from_)  # what the cart runs when the update starts
        self.setting: list[str] = []    # how the cart was set up, for the verdict line ("clock -12h", ...)
        self.findings: list[str] = []   # what broke before the update was judged (a CA update without overlap)
        self.clock_moved = False

    def note(self, text: str) -> None:
        if self.echo is not None:
            self.echo.note(text)

    def _hushed(self, what: str):
        return self.echo.hushed(what) if self.echo is not None else contextlib.nullcontext()

    # ------------------------------------------------------------ the steps
    def run(self) -> Verdict:
        inc, cart = self.incident, self.cart
        title = inc.incident.title
        self.note(f"replaying {title!r} on {cart.id} (slot {cart.slot.number})"
                  + ("" if cart.id == inc.configuration.cart else f", not on {inc.configuration.cart} as in the "
                                                                  "field"))
        if self.builds.from_ or self.builds.to:
            side, faults = ("from", self.builds.from_) if self.builds.from_ else ("to", self.builds.to)
            version = inc.from_.version if side == "from" else inc.to.version
            self.note(f"firmware: the field's: the fault build {build_label(version, faults)} stands in for the "
                      f"defective {side} firmware")
        else:
            self.note("firmware: the reference firmware (the fix in)")
        self.factory_state()
        self.install_from()
        self.set_clock()
        refused = self.ca_state()
        if refused is not None:
            return refused
        if inc.power_cut is not None:
            return self.cut_update()
        return self.update()

    def factory_state(self) -> None:
        self.note(f"factory state: {self.cart.config.firmware.initial_version} in slot A, the factory trust store")
        with self._hushed("factory recovery"):
            recover_factory(self.cart)
        want, held = self.incident.ca.holds, sorted(self.cart.trust_store())
        if want is not None and sorted(want) != held:
            raise ReplayError(f"{self.cart.id}: the factory trust store holds {', '.join(held)}, the incident says "
                              f"{', '.join(sorted(want))}")

    def install_from(self) -> None:
        version, faults = self.incident.from_.version, self.builds.from_
        if version == self.cart.config.firmware.initial_version:
            return
        self.note(f"install {self.running} as the running firmware")
        try:
            self.ota.update(self.ota.image(version, faults=faults)).expect_confirmed()
        except OtaError as exc:
            raise ReplayError(f"{self.cart.id}: cannot put the cart on {self.running}: {_first_line(exc)}") from None

    def set_clock(self) -> None:
        clock = self.incident.clock
        if clock is None:  # as the configuration has it
            drift = round(self.cart.config.clock.drift_s)
            self.note(f"clock: as configured ({describe_offset(drift) + ' off UTC' if drift else 'no drift'})")
            self.cart.apply_drift()
            if drift:
                self.setting.append(f"clock {describe_offset(drift)}")
            return
        self.note(f"clock: {describe_offset(clock.offset)} off UTC")
        self.cart.skew_clock(clock.offset)
        self.clock_moved = True
        self.setting.append(f"clock {describe_offset(clock.offset)}")

    def ca_state(self) -> Verdict | None:
        """The CA update that came first, as its own job. A rejected one is the verdict; one that left out a
        root the cart held (no overlap) is a finding."""
        add = self.incident.ca.update_first
        if not add:
            return None
        before = sorted(self.cart.trust_store())
        self.note(f"CA update adding {', '.join(add)} (the cart holds {', '.join(before)})")
        try:
            out = self.ota.deliver_trust(self.ota.trust_bundle(add))
        except OtaError as exc:  # a crash loop, a silent cart, a job that never ends
            return Verdict(True, f"{self._who()}: the CA update adding {', '.join(add)}: {_first_line(exc)}")
        after = sorted(out.trust_after)
        dropped = [r for r in before if r not in after]
        self.setting.append(f"after the CA update adding {', '.join(add)} (trust store {', '.join(after)})")
        if out.outcome != "applied":
            return Verdict(True, f"{self._who()}: the CA update adding {', '.join(add)} was {out.outcome}"
                                 + (f" for {out.reason!r}" if out.reason else "") + "; expected applied")
        if dropped:
            self.findings.append(f"the CA update adding {', '.join(add)} dropped {', '.join(dropped)} at once "
                                 f"(no overlap: a release signed under {' or '.join(dropped)} is refused from now on)")
        return None

    def release(self) -> bytes:
        """The incident's release: `to`, its fault build if the field's, signed under its root."""
        sign = {"ca": self.incident.to.signed_under} if self.incident.to.signed_under else {}
        return self.ota.image(self.incident.to.version, faults=self.builds.to, **sign)

    def update(self) -> Verdict:
        inc, fleet, cart = self.incident, self.fleet, self.cart
        target = build_label(inc.to.version, self.builds.to)
        image = self.release()
        net = inc.network
        if net.time_service:
            self.note(f"time service: {net.time_service}")
            fleet.time.set_mode(cart.id, net.time_service)
        if net.download_drop is not None:
            self._drop(len(image))
        self.note(f"update {self.running} -> {target}"
                  + (f" signed under {inc.to.signed_under}" if inc.to.signed_under else "")
                  + f"; a healthy cart ends {inc.expect.describe()}")
        run = self.ota.start(image)
        try:
            try:
                self._during(run, image)
                out = run.wait_deferred() if net.time_service else run.wait()
            except OtaError as exc:  # a crash loop, a retry storm, a silent cart, a job that never ends
                return Verdict(True, f"{self._who()}: the update to {target}: {_first_line(exc)}")
            finally:
                fleet.images.stall_after(None)
            return self.judge(out, target)  # a deferred job still open: the cart is watched as it left it
        finally:
            run.close()

    def _drop(self, size: int) -> None:
        """The image host drops the next download at the incident's byte (every download, if every_attempt);
        held silent first for as long as the replay needs to act on it."""
        net = self.incident.network
        drop = net.download_drop
        at = drop.offset(size)
        self.note(f"download drops at byte {at} of {size}" + (" on every attempt" if drop.every_attempt else ""))
        self.fleet.images.stall_after(at, once=not drop.every_attempt,
                                      hold_s=HELD_S if net.holds_download else DROP_HOLD_S)

    def _during(self, run: UpdateRun, image: bytes) -> None:
        """What the network does while the download is held: the later bytes swapped, the broker session
        taken over; then the held connection drops and the cart resumes."""
        net, fleet = self.incident.network, self.fleet
        if not net.holds_download:
            return
        fleet.images.wait_stalled(timeout=run.budget)
        if net.resume_changed_bytes:
            at = net.download_drop.offset(len(image))
            swapped = image[:at] + bytes(b ^ 0x5A for b in image[at:at + 256]) + image[at + 256:]
            self.note(f"the image host swaps the bytes after {at} under the same ETag")
            fleet.images.add(run.job_id, swapped, etag_of=image)
        if net.broker_disconnect:
            self.note("the broker drops the cart's session")
            t = time.monotonic()
            fleet.kick(self.cart.id)
            run.wait_event("ota_connected", RECONNECT_S, after=t, what="the cart reconnecting to the broker")
        fleet.images.release()

    def cut_update(self) -> Verdict:
        """The power-cut sweep's point at the incident's event, in the update to `to`: the sweep's invariants
        decide (boots a valid image, slots agree, the job ends, delivering again converges, rollbacks counted)."""
        cut, net = self.incident.power_cut, self.incident.network
        if net.download_drop is not None:  # the cut's update is started by the sweep: a drop set up before it
            self._drop(len(self.release()))
        point = CutPoint("event", Event(cut.event, cut.occurrence, 0), cut.delay_ms / 1000)
        if cut.delay_ms:
            self.setting.append(f"the cut {cut.delay_ms:g} ms after the event")
        self.note(f"update {self.running} -> {build_label(self.incident.to.version, self.builds.to)}, power cut at "
                  f"{cut.event}#{cut.occurrence}" + (f" + {cut.delay_ms:g} ms" if cut.delay_ms else ""))
        try:
            result = IncidentSweep(self).run_point(point)
        finally:
            self.fleet.images.stall_after(None)
        if result.observation.cut_error:  # the event never came (or the supply missed it): nothing to judge
            raise ReplayError(f"{self.cart.id}: the power cut at {cut.event}#{cut.occurrence} did not land: "
                              f"{result.observation.cut_error}")
        line = result.line().removeprefix(f"{self.cart.id}: ")
        if result.broken:
            return Verdict(True, f"{self._who()}: {line}")
        return self._finding_or(f"{self._who()}: {line}")

    # ------------------------------------------------------------ judging
    def judge(self, out: UpdateOutcome, target: str) -> Verdict:
        exp = self.incident.expect
        what = f"{self._who()}: the update to {target}"
        if out.outcome != exp.outcome or (exp.reason and not reason_matches(out.reason, exp.reason)):
            return Verdict(True, f"{what} {self._happened(out)}; expected {exp.describe()}")
        checks = {"confirmed": out.expect_confirmed, "rolled-back": out.expect_rolled_back,
                  "rejected": lambda: out.expect_rejected(exp.reason), "failed": lambda: out.expect_failed(exp.reason),
                  "deferred": lambda: out.expect_deferred(exp.reason)}
        try:
            checks[exp.outcome]()
        except OtaError as exc:
            return Verdict(True, f"{what} {self._happened(out)}, but {_first_line(exc)}")
        if exp.outcome != "confirmed":
            looped = self._loops(out)
            if looped:
                return Verdict(True, f"{what} {self._happened(out)}, then {looped}")
        return self._finding_or(f"{what} {self._happened(out)}, as a healthy cart does")

    def _happened(self, out: UpdateOutcome) -> str:
        """What the update did, in words: "was confirmed (slot B, ...)", "was rejected for 'not yet valid'"."""
        cart = self.cart
        if out.outcome == "confirmed":
            return f"was confirmed (slot {out.after.active}, one trial boot, no rollback)"
        if out.outcome in ("rolled-back", "succeeded-but-rolled-back"):
            first = "was reported SUCCEEDED, yet " if out.outcome == "succeeded-but-rolled-back" else "was "
            why = "its trial was not confirmed"
            for key, text in (("crash", "its trial boot crashed ({}) before marking itself good"),
                              ("self_test_failed", "its trial boot failed its self-test ({})"),
                              ("watchdog", "its trial never marked itself good (watchdog reset)")):
                if out.events.get(key):
                    m = cart.pattern(key).search(out.events[key][0][1])
                    why = text.format(m.groupdict().get("reason", "") if m else "")
                    break
            return f"{first}rolled back by the bootloader: {why}"
        verb = {"failed": "failed", "timed-out": "timed out"}.get(out.outcome, f"was {out.outcome}")
        reason = f" for {out.reason!r}" if out.reason else ""
        return f"{verb}{reason}" + (", nothing written" if out.outcome in ("rejected", "deferred") else "")

    def _loops(self, out: UpdateOutcome) -> str | None:
        """After a refusal the cart must leave the job alone: no new fetch of its image, no new time request
        within QUIET_S (the field's loop: rejected, retried at the next interval, rejected again)."""
        fleet, cart = self.fleet, self.cart
        fetched = len(fleet.images.requests(out.job_id))
        asked = len(fleet.time.requests(cart.id))
        self.note(f"watching {QUIET_S:g} s for the cart to try again")
        more_time = fleet.time.wait_quiet(cart.id, since=asked, quiet_s=QUIET_S)
        more_fetch = len(fleet.images.requests(out.job_id)) - fetched
        if more_fetch or more_time:
            return (f"it tried again within {QUIET_S:g} s ({more_fetch} more fetch(es) of the image, {more_time} more "
                    f"time request(s)): a retry loop")
        return None

    def _finding_or(self, healthy: str) -> Verdict:
        if self.findings:  # (a finding says what was set up: not the whole setting again)
            return Verdict(True, f"{self.cart.id} running {self.running}: {self.findings[0]}")
        return Verdict(False, healthy)

    def _who(self) -> str:
        """cart-04 running 1.4.2+local_clock, clock -12h"""
        return ", ".join([f"{self.cart.id} running {self.running}", *self.setting])


class IncidentSweep(PowerCutSweep):
    """The sweep's point with the incident's release as its image (its version, fault build and root)."""

    def __init__(self, replay: Replay):
        super().__init__(replay.cart, replay.ota, replay.fleet, label=replay.incident.id)
        self.replay = replay

    def _image(self, version: str, faults: dict | None = None) -> bytes:
        return self.replay.release()


# ---------------------------------------------------------------- the pytest side (-p harness.repro)


def pytest_addoption(parser: pytest.Parser) -> None:
    g = parser.getgroup("cart-hil repro", "replay a field incident (test_suites/incident_replay.py)")
    g.addoption("--incident", default=None, metavar="FILE", help="the incident file to replay")
    g.addoption("--incident-build", action="append", default=[], metavar="SIDE:FAULT[=VALUE]",
                help="a fault build in place of the reference firmware on side from or to (repeatable)")
    g.addoption("--repro-result", default=None, metavar="FILE", help="write the verdict here as JSON")


@pytest.fixture
def incident_replay(request: pytest.FixtureRequest, cart, ota, fleet, factory_reset):
    """The incident of --incident, on this test's cart, its console printed as it comes. Afterwards the cart
    is put back as shipped (`factory_reset`) and its clock as configured."""
    incident = load_incident(request.config.getoption("--incident"))
    builds = FieldBuild.from_args(request.config.getoption("--incident-build"))
    result = request.config.getoption("--repro-result")
    echo = ConsoleEcho(cart, lambda text: print(text, flush=True))
    replay = Replay(incident, cart, ota, fleet, builds=builds, echo=echo)
    try:
        yield _Recorded(replay, Path(result) if result else None)
    finally:
        echo.close()
        if replay.clock_moved and cart.state is CartState.RUNNING:
            cart.apply_drift()


class _Recorded:
    """`run()`: the replay's verdict, also written as JSON for `hil repro` (or, if the replay could not be
    set up, why)."""

    def __init__(self, replay: Replay, path: Path | None):
        self.replay = replay
        self.path = path

    def run(self) -> Verdict:
        try:
            verdict = self.replay.run()
        except Exception as exc:
            line, cid = _first_line(exc), self.replay.cart.id
            self._write({"verdict": "no replay", "line": line if line.startswith(cid) else f"{cid}: {line}"})
            raise
        self._write({"verdict": "reproduced" if verdict.reproduced else "not reproduced", "line": verdict.line(),
                     "cause": verdict.cause, "incident": self.replay.incident.id, "cart": self.replay.cart.id})
        return verdict

    def _write(self, record: dict) -> None:
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps(record, indent=2) + "\n")


# ---------------------------------------------------------------- the command


def cmd_repro(a: argparse.Namespace) -> int:
    from harness.cli import _pytest
    from harness.plugin import dir_write_problem

    incident = load_incident(a.incident)
    rig = Rig.load(a.rig)
    slot = find_slot(rig, incident, a.incident, a.slot)
    builds = FieldBuild.choose(incident, a.incident, a.field, a.build)
    check_slot(incident, a.incident, slot, builds)
    out = (a.out or ROOT / "reports" / "repro" / f"{time.strftime('%Y%m%d-%H%M%S')}-{incident.id}").absolute()
    why = dir_write_problem(out)
    if why:
        raise ConfigError(f"cannot write reports in {out}: {why}")
    result = out / "verdict.json"
    args = [SUITE, "-p", "harness.repro", "--rig", str(rig.path), "--cart", slot.cart_id,
            "--incident", str(Path(a.incident).absolute()), "--repro-result", str(result),
            *(f"--incident-build={v}" for v in builds.as_args()),
            "--hil-run-dir", str(out / "run"), f"--junitxml={out / 'junit.xml'}", "-s", "-q", "-p", "no:cacheprovider",
            "-p", "no:hypothesispytest"]
    run = _pytest(args)
    if run.signal:  # Ctrl-C, a CI runner's SIGTERM: the replay was ended, whatever it had seen so far
        print(f"hil repro: INTERRUPTED ({run.signal_name}) — no verdict; reports in {out}")
        return run.status
    try:
        record = json.loads(result.read_text())
    except (OSError, ValueError):
        record = {}
    if record.get("verdict") in ("reproduced", "not reproduced"):
        print(f"reports in {out}")
        print(record["line"])
        return 1 if record["verdict"] == "reproduced" else 0
    why = record.get("line") or _junit_failure(out / "junit.xml") or f"pytest exited {run.status} (see above)"
    print(f"hil: repro {a.incident}: no replay: {why}", file=sys.stderr)
    return 2


def _junit_failure(path: Path) -> str | None:
    """The first line of the first failure or error the run's JUnit XML reports (a fixture that broke)."""
    import xml.etree.ElementTree as ET

    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    for case in root.iter("testcase"):
        for kind in ("error", "failure"):
            bad = case.find(kind)
            if bad is not None:
                return _first_line(bad.get("message") or bad.text or kind)
    return None


def add_cli(sub) -> None:
    p = sub.add_parser("repro", help="replay a field incident on one slot, its console live; exit 1 if the failure "
                                     "reproduces",
                       description="Replay a field incident (docs/incidents.md) on one cart, its console on screen. "
                                   "The last line is 'REPRODUCED: <cause>' (exit 1) or 'not reproduced: <what "
                                   "happened>' (exit 0); an incident, rig or slot that cannot be used is one 'hil:' "
                                   "line (exit 2).")
    p.add_argument("incident", type=Path, metavar="INCIDENT.yaml", help="the incident file (e.g. incidents/*.yaml)")
    p.add_argument("--rig", type=Path, default=DEFAULT_RIG, help=f"rig file (default {DEFAULT_RIG.relative_to(ROOT)})")
    p.add_argument("--slot", type=int, help="replay on the cart in this slot (default: the slot holding the "
                                            "incident's configuration)")
    p.add_argument("--field", action="store_true",
                   help="with the field's defective firmware: the incident's field_firmware fault build stands in "
                        "for it (the failure must reproduce)")
    p.add_argument("--build", action="append", default=[], metavar="FAULT[=VALUE]",
                   help="this fault build in the field firmware's place instead (repeatable; implies --field)")
    p.add_argument("--out", type=Path, help="reports directory (default reports/repro/<time>-<incident id>)")
    p.set_defaults(fn=cmd_repro)
