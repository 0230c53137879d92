"""The power-cut sweep: record an uninterrupted update's event lines, then cut the power at each of
them (or a chosen subset) in a fresh update, and check after every cut that the cart is safe.

    sweep = PowerCutSweep(cart, ota, fleet)
    recorded = sweep.record()                       # one update Vk -> Vk+1 without a cut: its EV lines
    points = select_points(recorded, "reduced", seed=7)      # or "full": every event + 10 random cuts
    report = sweep.run(points)                     # each point updates Vk -> Vk+1 with a cut armed
    report.failures()                              # one line each: "cart-04: cut at bcb-write#3 ...: ..."

**Events** are the profile's ``event`` lines (``EV: <name> ... t=<ns>``), named by the device, never
by the harness. An event is identified by its name and the occurrence of that name in the update's
sequence (``write#3``: the third ``write`` line), not by its slot or page detail: slots alternate
between A and B from one version to the next.

**A point**: the cart runs a confirmed version Vk; a cut is armed on the event (`harness.cut`), the
update to a new version Vk+1 is started, the cut fires, the power stays off for the rig's off time
(physics), comes back, and the invariants are checked (`check_point`, first broken one wins):

  1. the cart boots a valid image within its bound (`no_image` or no banner: a brick);
  2. the version that runs is the old or the new one; `slot status` agrees with it (the booted slot
     holds it; a normal boot is confirmed with nothing pending); the new version runs in normal mode
     only after a trial boot of it; the slot that ran the old version was not written;
  3. the job ends (terminal) or resumes to an end by itself, within the update's budget;
  4. delivering the same release again, if it did not end confirmed, converges to it, confirmed;
  5. ``firmware_rollback_count`` for the target version rose once per bootloader rollback line since
     the cut, and so did the boot control's own rollback count; the boot count only moved on
     (a boot control record that went back to defaults loses it: the cut destroyed boot control);
  6. the device state's security counter and time floor did not go down (a torn write must leave the
     other copy, never an older or an erased state: a lower counter lets a vulnerable release back in);
  7. no brick at any step.

Each point continues from where the previous one left the cart (always on its newest version,
confirmed), so no downgrade or recovery is needed between points.

Kinds of point: ``event`` (cut right at the event line), ``delay`` (a seeded random delay after the
update's first event, within the recorded duration), ``recovery`` (a cut at an event, then a second
cut at the next boot's first event of the name the recorded boot line has), ``rollback`` (a release that
fails its self-test, cut at the first event after the bootloader's rollback line: the rollback's own
boot control write, as recorded in an uninterrupted run of that release).

The report (`SweepReport`) is a table (event x outcome) and an SVG a person reads at a glance: one row
per point, coloured by outcome (old kept / rolled back / new confirmed / FAIL).
"""

from __future__ import annotations

import contextlib
import html
import json
import random
import re
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from harness.ota import ONLINE_METRIC, TERMINAL, OtaError, attach, bump, device_state, step

MODES = ("quick", "reduced", "full")
REDUCED_EVERY = 5          # the reduced sweep: every 5th event, all redundant-store writes, 2 random cuts
REDUCED_RANDOM = 2
FULL_RANDOM = 10
CATCH_ROUNDS = 5           # a fault build's boot-control writes are cut up to this many times over
BCB_HINT = "bcb"           # events whose name has this word are boot-control writes (kept by the reduced sweep)
#: the other two-copy stores (device state, trust store): a write into the other copy must be proven under a cut
REDUNDANT_WRITES = ("state-write", "trust-write")

OLD_KEPT, ROLLED_BACK, NEW_CONFIRMED, FAIL, NOT_RUN = "old kept", "rolled back", "new confirmed", "FAIL", "not run"
COLOURS = {OLD_KEPT: "#8fb8de", ROLLED_BACK: "#f2c14e", NEW_CONFIRMED: "#6dbf73", FAIL: "#d64545",
           NOT_RUN: "#cccccc"}


# ---------------------------------------------------------------- events and points


@dataclass(frozen=True)
class Event:
    """One event line of a recorded update: its name, the occurrence of that name (1-based), its
    position in the whole sequence (0-based), the detail words and the device's stamp."""

    name: str
    occurrence: int
    position: int
    detail: str = ""
    t_ns: int | None = None

    @property
    def key(self) -> str:
        return f"{self.name}#{self.occurrence}"

    @property
    def label(self) -> str:
        return f"{self.key} ({self.detail})" if self.detail else self.key


def parse_events(lines: Iterable[str], event_pattern: str | re.Pattern[str]) -> list[Event]:
    """The event lines among ``lines`` (console texts), in order, each with its occurrence index."""
    rx = re.compile(event_pattern) if isinstance(event_pattern, str) else event_pattern
    out: list[Event] = []
    seen: dict[str, int] = {}
    for text in lines:
        m = rx.search(text)
        if m is None:
            continue
        name = m["name"]
        seen[name] = seen.get(name, 0) + 1
        gd = m.groupdict()
        t = gd.get("t_ns")
        out.append(Event(name, seen[name], len(out), (gd.get("detail") or "").strip(),
                         int(t) if t else None))
    return out


def name_pattern(event_pattern: str, name: str) -> str:
    """The profile's event pattern narrowed to one event name: its ``(?P<name>...)`` group replaced by
    the literal name (the group stays, so a match still names it)."""
    start = event_pattern.find("(?P<name>")
    if start < 0:
        raise ValueError(f"event pattern {event_pattern!r} has no (?P<name>...) group")
    depth, i = 0, start
    while i < len(event_pattern):
        c = event_pattern[i]
        if c == "\\":
            i += 2
            continue
        if c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
            if depth == 0:
                break
        i += 1
    else:
        raise ValueError(f"event pattern {event_pattern!r}: unbalanced (?P<name>...) group")
    return f"{event_pattern[:start]}(?P<name>{re.escape(name)}){event_pattern[i + 1:]}"


@dataclass(frozen=True)
class CutPoint:
    """Where a point cuts. ``event``: the cut's trigger (the Nth line of that name from the start of
    the update); ``delay_s`` after it. ``kind``: event | delay | recovery | rollback."""

    kind: str
    event: Event
    delay_s: float = 0.0

    @property
    def label(self) -> str:
        if self.kind == "delay":
            return f"random {self.delay_s * 1e3:.1f} ms after {self.event.key}"
        if self.kind == "recovery":
            return f"{self.event.key}, then the next boot"
        if self.kind == "rollback":
            return f"{self.event.label} of the rollback"
        return self.event.label


def trial_boot_events(texts: Sequence[str], events: Sequence[Event], banner: re.Pattern[str],
                      event_rx: re.Pattern[str]) -> tuple[Event, Event] | None:
    """In a recorded update: the first event after the trial boot's banner (the boot line) and the one
    after it (the trial's first step): the first cut of a "second cut during recovery" point."""
    for i, text in enumerate(texts):
        m = banner.search(text)
        if m and m["mode"] == "trial":
            k = len(parse_events(texts[:i + 1], event_rx))
            return (events[k], events[k + 1]) if k + 1 < len(events) else None
    return None


def is_bcb_write(event: Event) -> bool:
    return BCB_HINT in event.name


def is_redundant_write(event: Event) -> bool:
    """A write of a store kept in two copies (boot control, device state, trust store): the reduced
    sweep cuts every one, since only a cut shows the other copy survives."""
    return is_bcb_write(event) or event.name in REDUNDANT_WRITES


def select_points(events: Sequence[Event], mode: str = "reduced", *, seed: int = 0,
                  random_cuts: int | None = None, every: int = REDUCED_EVERY) -> list[CutPoint]:
    """The points of a sweep over a recorded sequence. ``full``: every event plus 10 random-delay cuts;
    ``reduced``: every ``every``-th event (the first included), every write of a two-copy store (boot
    control, device state, trust store), plus 2 random cuts; ``quick``: every boot-control write alone.
    Random cuts are drawn (seeded: the same seed, the same points) uniformly within the recorded update's
    duration, measured from its first event on the device's clock."""
    if mode not in MODES:
        raise ValueError(f"sweep mode must be one of {', '.join(MODES)}, got {mode!r}")
    if not events:
        raise ValueError("no events recorded: nothing to sweep (does the profile have an 'event' pattern?)")
    if mode == "full":
        chosen = list(events)
        n_random = FULL_RANDOM if random_cuts is None else random_cuts
    elif mode == "quick":  # `hil gate --quick`: the writes a cut must never break, nothing else
        chosen = [e for e in events if is_bcb_write(e)]
        n_random = 0 if random_cuts is None else random_cuts
    else:
        chosen = [e for e in events if e.position % every == 0 or is_redundant_write(e)]
        n_random = REDUCED_RANDOM if random_cuts is None else random_cuts
    points = [CutPoint("event", e) for e in chosen]
    first, last = events[0], events[-1]
    duration = ((last.t_ns - first.t_ns) / 1e9) if first.t_ns is not None and last.t_ns is not None else 0.0
    rng = random.Random(f"sweep:{seed}")
    for _ in range(n_random if duration > 0 else 0):
        points.append(CutPoint("delay", first, round(rng.uniform(0.0, duration), 6)))
    return points


# ---------------------------------------------------------------- the invariants


@dataclass
class Observation:
    """What one point saw, as plain values: `check_point` decides on it (unit-testable)."""

    old: str
    new: str
    old_slot: str
    boots_before: int | None = None
    rollbacks_before: int | None = None
    counter_before: int | None = None       # the device state before the point (None: the family has none)
    floor_before: int | None = None
    cut_error: str | None = None            # the cut did not fire, or not cleanly
    cut_after: str = ""                     # the last event line seen before the cut ("-" if none)
    brick: str | None = None                # no bootable image / no banner, with the evidence line
    first_version: str | None = None        # what the first boot after the power came back ran
    first_slot: str | None = None
    first_mode: str | None = None
    settle_error: str | None = None         # the job or the cart did not settle within the bound
    job_status: str | None = None
    running: str | None = None              # at the end (before delivering again)
    running_slot: str | None = None
    running_mode: str | None = None
    status: dict[str, Any] = field(default_factory=dict)   # slot status at the end (SlotStatus fields)
    counter_after: int | None = None        # the device state at the end
    floor_after: int | None = None
    old_slot_hash_before: str | None = None
    old_slot_hash_after: str | None = None
    new_trial_seen: bool = False            # a trial boot of the new version since the cut
    rollback_lines: int = 0                 # bootloader rollback lines since the cut
    rollback_metric: int = 0                # firmware_rollback_count for the new version since the cut
    redelivered: bool = False
    converge_error: str | None = None
    seconds: float = 0.0


def check_point(o: Observation) -> str | None:
    """The first broken invariant, in words a release manager understands; None if all hold."""
    if o.cut_error:
        return f"the cut did not land: {o.cut_error}"
    if o.brick:
        return f"bricked: {o.brick}"
    if o.first_version not in (o.old, o.new):
        return f"booted {o.first_version} after the cut, neither the old {o.old} nor the new {o.new}"
    if o.settle_error:
        return o.settle_error
    if o.running not in (o.old, o.new):
        return f"runs {o.running} after the cut, neither the old {o.old} nor the new {o.new}"
    st = o.status
    fw = (st.get("slots") or {}).get(o.running_slot or "", {}).get("fw")
    if st.get("booted") != o.running_slot:
        return f"slot status says slot {st.get('booted')} booted, the banner said slot {o.running_slot}"
    if fw != o.running:
        return f"slot status says slot {o.running_slot} holds {fw}, but {o.running} runs from it"
    if o.running_mode == "normal" and (st.get("pending") or not st.get("confirmed")):
        return (f"boot control inconsistent: slot {o.running_slot} runs in normal mode but is "
                f"{'pending ' + str(st.get('pending')) if st.get('pending') else 'not confirmed'}")
    if o.running == o.new and o.running_mode == "normal" and not o.new_trial_seen and o.first_mode != "trial":
        return (f"boot control lost: {o.new} runs in normal mode from slot {o.running_slot} without ever "
                f"passing a trial boot")
    if o.boots_before is not None and st.get("boots") is not None and st["boots"] <= o.boots_before:
        return (f"boot control lost: the boot count went from {o.boots_before} to {st['boots']} "
                f"(the record went back to defaults)")
    went_back = state_went_back(o)
    if went_back:
        return f"device state went back: {went_back}"
    happened = rollbacks_happened(o)
    if happened < 0 or happened > o.rollback_lines:
        return (f"boot control's rollback count went {o.rollbacks_before} -> {st.get('rollbacks')} with "
                f"{o.rollback_lines} rollback line(s) on the console")
    if o.rollback_metric != happened:
        return (f"firmware_rollback_count for {o.new} rose by {o.rollback_metric} for {happened} "
                f"rollback(s) that happened")
    if o.job_status == "SUCCEEDED" and o.running == o.old and not happened:
        return f"job SUCCEEDED but the cart runs the old {o.old} and no rollback was counted"
    if o.running == o.old and o.running_slot == o.old_slot and o.old_slot_hash_before \
            and o.old_slot_hash_after != o.old_slot_hash_before:
        return f"slot {o.old_slot}, which runs the old {o.old}, was written"
    if o.converge_error:
        return f"delivering again did not converge: {o.converge_error}"
    return None


def state_went_back(o: Observation) -> str | None:
    """The device state's value that went down across the point ("counter 4 -> 3"), or None."""
    for name, before, after in (("counter", o.counter_before, o.counter_after),
                                ("time floor", o.floor_before, o.floor_after)):
        if before is not None and after is not None and after < before:
            return f"{name} {before} -> {after}"
    return None


def rollbacks_happened(o: Observation) -> int:
    """Rollbacks boot control recorded since the cut (its own count), else the bootloader's rollback
    lines. A rollback line whose boot control write the cut tore did not happen: the next boot rolls
    back again and prints the line again, and the count moves once."""
    after = o.status.get("rollbacks")
    if o.rollbacks_before is not None and after is not None:
        return after - o.rollbacks_before
    return o.rollback_lines


def outcome_of(o: Observation, broken: str | None) -> str:
    if broken:
        return FAIL
    if o.rollback_lines:
        return ROLLED_BACK
    return NEW_CONFIRMED if o.first_version == o.new else OLD_KEPT


@dataclass
class PointResult:
    cart: str
    point: CutPoint
    observation: Observation
    broken: str | None = None

    @property
    def outcome(self) -> str:
        return outcome_of(self.observation, self.broken)

    @property
    def passed(self) -> bool:
        return self.broken is None

    def line(self) -> str:
        o = self.observation
        where = f"cut at {self.point.label}"
        if self.point.kind == "delay" and o.cut_after:
            where += f" (after {o.cut_after})"
        if self.broken:
            return f"{self.cart}: {where}: {self.broken}"
        how = "delivered again" if o.redelivered else "resumed" if o.first_version == o.old else "completed"
        return (f"{self.cart}: {where}: PASS, {self.outcome} ({o.first_version} slot {o.first_slot} "
                f"{o.first_mode} after the cut), job {o.job_status}, {how}, {o.seconds:.1f} s")

    def as_dict(self) -> dict:
        return {"cart": self.cart, "kind": self.point.kind, "event": self.point.event.key,
                "detail": self.point.event.detail, "delay_s": self.point.delay_s, "label": self.point.label,
                "outcome": self.outcome, "passed": self.passed, "broken": self.broken, "line": self.line(),
                "observation": asdict(self.observation)}


# ---------------------------------------------------------------- the report


@dataclass
class SweepReport:
    cart: str
    mode: str
    recorded: list[Event]
    results: list[PointResult] = field(default_factory=list)
    not_run: list[CutPoint] = field(default_factory=list)
    wall_s: float = 0.0
    label: str = ""          # what was swept: "reference" or a fault build

    def failures(self) -> list[str]:
        return [r.line() for r in self.results if not r.passed]

    @property
    def coverage(self) -> float:
        """Share of the recorded events a cut was aimed at (and ran)."""
        hit = {r.point.event.key for r in self.results if r.point.kind == "event"}
        return len(hit & {e.key for e in self.recorded}) / len(self.recorded) if self.recorded else 0.0

    def summary(self) -> str:
        n = len(self.results)
        bad = len(self.failures())
        return (f"{self.cart}: {self.label or 'sweep'} ({self.mode}): {n} cut point(s), {n - bad} pass, {bad} fail"
                + (f", {len(self.not_run)} not run" if self.not_run else "")
                + f"; {len(self.recorded)} events recorded, {self.coverage:.0%} of them cut; {self.wall_s:.1f} s")

    def table(self) -> str:
        rows = [f"# {self.summary()}", "",
                "| # | cut at | outcome | after the cut | job | then | s | verdict |",
                "|---|---|---|---|---|---|---|---|"]
        for i, r in enumerate(self.results, 1):
            o = r.observation
            after = f"{o.first_version or '-'} {o.first_slot or ''} {o.first_mode or ''}".strip()
            then = "delivered again" if o.redelivered else "resumed" if o.first_version == o.old else "completed"
            verdict = "PASS" if r.passed else f"FAIL: {r.broken}"
            label = r.point.label + (f" (after {o.cut_after})" if r.point.kind == "delay" and o.cut_after else "")
            rows.append(f"| {i} | {label} | {r.outcome} | {after} | {o.job_status or '-'} | {then} | "
                        f"{o.seconds:.1f} | {verdict} |")
        for p in self.not_run:
            rows.append(f"| - | {p.label} | {NOT_RUN} | | | | | not run (the sweep stopped) |")
        rows += ["", "recorded events: " + " ".join(e.key for e in self.recorded)]
        return "\n".join(rows) + "\n"

    def svg(self) -> str:
        """One row per point, coloured by outcome; failing rows say why."""
        rows = [(r.point.label, r.outcome, r.broken or "") for r in self.results] + \
               [(p.label, NOT_RUN, "") for p in self.not_run]
        row_h, top, left, bar_w = 18, 44, 250, 120
        width = left + bar_w + 620
        height = top + row_h * max(1, len(rows)) + 30
        out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
               f'font-family="sans-serif" font-size="12">',
               f'<rect width="{width}" height="{height}" fill="white"/>',
               f'<text x="8" y="18" font-size="14" font-weight="bold">{html.escape(self.summary())}</text>']
        x = 8
        for name, colour in COLOURS.items():
            out.append(f'<rect x="{x}" y="26" width="12" height="12" fill="{colour}"/>'
                       f'<text x="{x + 16}" y="36">{html.escape(name)}</text>')
            x += 24 + 8 * len(name)
        for i, (label, outcome, why) in enumerate(rows):
            y = top + i * row_h
            out.append(f'<text x="8" y="{y + 13}">{html.escape(label[:40])}</text>')
            out.append(f'<rect x="{left}" y="{y + 2}" width="{bar_w}" height="{row_h - 4}" '
                       f'fill="{COLOURS[outcome]}"><title>{html.escape(why or outcome)}</title></rect>')
            out.append(f'<text x="{left + 4}" y="{y + 13}">{html.escape(outcome)}</text>')
            if why:
                out.append(f'<text x="{left + bar_w + 8}" y="{y + 13}" fill="#a00">{html.escape(why[:100])}</text>')
        out.append("</svg>")
        return "\n".join(out) + "\n"

    def as_dict(self) -> dict:
        return {"cart": self.cart, "mode": self.mode, "label": self.label, "wall_s": round(self.wall_s, 2),
                "coverage": self.coverage, "summary": self.summary(),
                "recorded": [asdict(e) for e in self.recorded],
                "points": [r.as_dict() for r in self.results],
                "not_run": [p.label for p in self.not_run]}

    def write(self, directory: Path) -> list[Path]:
        """Table, SVG and JSON into ``directory`` (the run's report dir), as ``sweep-<cart>-<label>.*``."""
        directory.mkdir(parents=True, exist_ok=True)
        stem = f"sweep-{self.cart}-{re.sub(r'[^A-Za-z0-9_.-]', '_', self.label or self.mode)}"
        paths = [directory / f"{stem}.md", directory / f"{stem}.svg", directory / f"{stem}.json"]
        paths[0].write_text(self.table())
        paths[1].write_text(self.svg())
        paths[2].write_text(json.dumps(self.as_dict(), indent=2, default=str))
        return paths

    def attach(self) -> None:
        """The table and the image on the Allure result (a no-op without allure)."""
        attach(f"power-cut sweep {self.cart} {self.label}", self.table())
        with contextlib.suppress(Exception):
            import allure

            allure.attach(self.svg(), name=f"power-cut sweep {self.cart} {self.label} (image)",
                          attachment_type=allure.attachment_type.SVG)


# ---------------------------------------------------------------- running it on a cart


class _Watch:
    """Console lines of the profile's boot-related patterns since a point began (listener-fed)."""

    KEYS = ("banner", "ready", "no_image", "rollback", "confirmed", "event")

    def __init__(self, cart):
        self.cart = cart
        self.cond = threading.Condition()
        self.seen: list[tuple[int, float, str, re.Match]] = []   # (line index, t_mono, key, match)
        self.handles = []
        for key in self.KEYS:
            if key in cart.profile.patterns:
                self.handles.append(cart.console.add_listener(cart.profile.patterns[key], self._cb(key)))

    def _cb(self, key):
        def cb(line, m):
            with self.cond:
                self.seen.append((line.index, line.t_mono, key, m))
                self.cond.notify_all()
        return cb

    def close(self) -> None:
        for h in self.handles:
            self.cart.console.remove_listener(h)
        self.handles = []

    def items(self, key: str, after: int = -1) -> list[tuple[int, float, re.Match]]:
        with self.cond:
            return [(i, t, m) for i, t, k, m in self.seen if k == key and i > after]

    def last(self, key: str) -> tuple[int, float, re.Match] | None:
        found = self.items(key)
        return found[-1] if found else None

    def wait(self, pred, timeout: float):
        """Wait until ``pred()`` returns something truthy (re-evaluated on each watched line)."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                got = pred()
                if got:
                    return got
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self.cond.wait(left)


class PowerCutSweep:
    """The sweep on one cart (its `ota` steps and the process's fleet services)."""

    def __init__(self, cart, ota, fleet, *, faults: dict | None = None, label: str = "reference"):
        self.cart = cart
        self.ota = ota
        self.fleet = fleet
        self.faults = dict(faults or {})
        self.label = label
        pattern = cart.profile.patterns.get("event")
        if pattern is None:
            raise OtaError(f"{cart.id}: the firmware profile {cart.profile.family} has no 'event' pattern: "
                           "nothing to aim a power cut at")
        self.event_pattern = pattern
        self.event_rx = re.compile(pattern)
        self.trial_boot: tuple[Event, Event] | None = None   # set by record()

    # ------------------------------------------------------------ helpers
    def _image(self, version: str, faults: dict | None = None) -> bytes:
        return self.ota.image(version, faults=self.faults if faults is None else faults)

    def _running(self) -> str:
        return self.cart.version()

    def _settle(self, watch: _Watch, after_line: int, job_id: str | None,
                budget: float) -> tuple[str | None, str | None]:
        """After the power came back: wait for the job to end (it may resume by itself) and for the cart
        to come to rest (a normal boot that is ready, or a trial that confirmed), then for the agent's
        online telemetry of that boot. Returns (job status, error)."""
        cart, fleet = self.cart, self.fleet
        deadline = time.monotonic() + budget
        left = lambda: max(0.5, deadline - time.monotonic())  # noqa: E731
        status = None
        if job_id is not None:
            try:
                status = fleet.jobs.wait_status(job_id, cart.id, TERMINAL, left())["status"]
            except Exception as exc:
                ex = fleet.jobs.execution(job_id, cart.id)
                return ex.get("status"), (f"the job neither ended nor resumed to an end within {budget:.0f} s "
                                          f"(status {ex.get('status')}): {str(exc).splitlines()[0]}")

        def at_rest():
            b = watch.last("banner")
            if b is None or b[0] <= after_line:
                return None
            i = b[0]
            if b[2]["mode"] == "trial":
                if watch.items("confirmed", i) and watch.items("ready", i):
                    return b
                return None
            return b if watch.items("ready", i) else None

        while True:
            b = watch.wait(at_rest, left())
            if b is None:
                return status, f"the cart did not come to rest (ready, confirmed) within {budget:.0f} s"
            try:
                fleet.telemetry.wait_metric(ONLINE_METRIC, thing=cart.id, since=self._tele_mark,
                                            predicate=lambda e, t=b[1]: e.t > t, timeout=left())
            except Exception as exc:
                if watch.last("banner")[0] != b[0]:
                    continue   # it rebooted meanwhile: wait for that boot
                return status, f"no agent online telemetry after the last boot: {str(exc).splitlines()[0]}"
            if watch.last("banner")[0] == b[0]:
                return status, None

    # ------------------------------------------------------------ recording
    def record(self, *, faults: dict | None = None) -> list[Event]:
        """One uninterrupted update (running version + 1): its event lines, from the job's start to the
        new version's confirmation. The cart must be running."""
        with step(f"{self.cart.id}: record an uninterrupted update's events"):
            version = self._running()
            start = self.cart.console.mark()
            out = self.ota.start(self._image(bump(version, patch=1), faults)).wait().expect_confirmed()
            texts = [ln.text for ln in self.cart.console.lines(start)]
            # up to the confirmation: the events of the new version's first boot after it are not the update's
            confirmed = self.cart.pattern("confirmed")
            end = next((i for i, t in enumerate(texts) if confirmed.search(t)), len(texts))
            events = parse_events(texts[:end + 1], self.event_rx)
            self.trial_boot = trial_boot_events(texts[:end + 1], events, self.cart.pattern("banner"),
                                                self.event_rx)
            attach(f"recorded events {self.cart.id}", "\n".join(
                f"{e.position:3d} {e.label} t={e.t_ns}" for e in events) + f"\n\nupdate: {out.timings}")
            return events

    def record_rollback(self, faults: dict) -> tuple[list[Event], Event | None]:
        """An uninterrupted update to a release that rolls back (``faults``): its events, and the first
        event after the bootloader's rollback line (the rollback's boot control write)."""
        with step(f"{self.cart.id}: record an uninterrupted rollback's events"):
            version = self._running()
            start = self.cart.console.mark()
            self.ota.start(self._image(bump(version, patch=1), faults)).wait().expect_rolled_back()
            texts = [ln.text for ln in self.cart.console.lines(start)]
            events = parse_events(texts, self.event_rx)
            rollback = self.cart.pattern("rollback")
            at = next((i for i, t in enumerate(texts) if rollback.search(t)), None)
            if at is None:
                return events, None
            after = parse_events(texts[:at + 1], self.event_rx)
            return events, events[len(after)] if len(after) < len(events) else None

    # ------------------------------------------------------------ one point
    def run_point(self, point: CutPoint, *, image_faults: dict | None = None,
                  second_cut: str | None = None) -> PointResult:
        """Cut the update running version -> running version + 1 at ``point``; check the invariants.
        ``second_cut``: an event name: cut again at its first line after the power came back."""
        from harness.cut import CutError, cut_on_console

        cart, fleet, ota = self.cart, self.fleet, self.ota
        t0 = time.monotonic()
        before = cart.slot_status()
        hashes = cart.slot_hashes()
        old = cart.version()
        new = bump(old, patch=1)
        state = device_state(cart)
        image = self._image(new, image_faults)
        obs = Observation(old=old, new=new, old_slot=before.booted, boots_before=before.boots,
                          rollbacks_before=before.rollbacks, old_slot_hash_before=hashes.get(before.booted))
        if state is not None:
            obs.counter_before, obs.floor_before = state.counter, state.floor
        self._tele_mark = fleet.telemetry.mark()
        start = cart.console.mark()
        watch = _Watch(cart)
        run = None
        try:
            with step(f"{cart.id}: cut at {point.label} in the update {old} -> {new}"):
                cut = cut_on_console(cart.power, cart.console, name_pattern(self.event_pattern, point.event.name),
                                     nth=point.event.occurrence, delay_s=point.delay_s)
                try:
                    run = ota.start(image, label="sweep")
                    cut.wait(run.budget)
                except CutError as exc:
                    obs.cut_error = str(exc).splitlines()[0]
                finally:
                    cut.disarm()
                attach("cut", cut.as_dict())
            if obs.cut_error is None:
                obs.cut_after = self._last_event_before(start, cut.sent_t_ns)
                time.sleep(cart.off_time)   # physics: the rail falls, the capacitors drain
                self._power_back(obs, watch, second_cut)
            if obs.cut_error is None and obs.brick is None:
                self._observe(obs, watch, start, run)
            elif obs.cut_error is not None:   # a cut that did not land left the cart off, or on: boot it
                with contextlib.suppress(Exception):
                    cart.power_cycle()
        finally:
            watch.close()
            if run is not None:
                run.close()
        obs.seconds = time.monotonic() - t0
        broken = check_point(obs)
        if broken is None and (obs.running != new or obs.job_status != "SUCCEEDED"
                               or not obs.status.get("confirmed")):
            self._deliver_again(obs, image if image_faults is None else self._image(new))
            broken = check_point(obs)
        obs.seconds = time.monotonic() - t0
        result = PointResult(cart.id, point, obs, broken)
        attach(f"point {point.label}", result.as_dict())
        return result

    def _last_event_before(self, start: int, t_ns: int | None) -> str:
        if t_ns is None:
            return "-"
        texts = [ln.text for ln in self.cart.console.lines(start) if ln.t_mono * 1e9 <= t_ns]
        events = parse_events(texts, self.event_rx)
        return events[-1].key if events else "-"

    def _power_back(self, obs: Observation, watch: _Watch, second_cut: str | None) -> None:
        from harness.cut import CutError, cut_on_console

        cart = self.cart
        with step(f"{cart.id}: power back after {cart.off_time} s off"):
            cart.power_on(wait=False)
            if second_cut:
                try:
                    cut2 = cut_on_console(cart.power, cart.console, name_pattern(self.event_pattern, second_cut))
                    cut2.wait(cart.boot_timeout)
                except CutError as exc:
                    obs.cut_error = f"second cut (at the next {second_cut}): {str(exc).splitlines()[0]}"
                    return
                time.sleep(cart.off_time)   # physics
                cart.power_on(wait=False)
            patterns = {"banner": cart.pattern("banner")}
            if "no_image" in cart.profile.patterns:
                patterns["no_image"] = cart.pattern("no_image")
            try:
                key, m = cart.console.expect_any(patterns, cart.boot_timeout, what=f"{cart.id} boot after the cut")
            except Exception as exc:
                obs.brick = f"no boot banner within {cart.boot_timeout:.1f} s: {str(exc).splitlines()[0]}"
                return
            if key == "no_image":
                obs.brick = f"'{m.group(0)}'"
                return
            obs.first_version, obs.first_slot, obs.first_mode = m["version"], m["slot"], m["mode"]

    def _observe(self, obs: Observation, watch: _Watch, start: int, run) -> None:
        cart = self.cart
        with step(f"{cart.id}: after the cut: job, boots, boot control, metric"):
            status, err = self._settle(watch, start - 1, run.job_id if run else None, run.budget if run else 60.0)
            obs.job_status = status
            if err:
                obs.settle_error = err
                return
            b = watch.last("banner")[2]
            obs.running, obs.running_slot, obs.running_mode = b["version"], b["slot"], b["mode"]
            if obs.running_mode == "trial":   # a trial that confirmed itself: it runs as a normal boot now
                obs.running_mode = "normal"
            st = cart.slot_status()
            obs.status = asdict(st)
            state = device_state(cart)
            if state is not None:
                obs.counter_after, obs.floor_after = state.counter, state.floor
            obs.old_slot_hash_after = cart.slot_hashes().get(obs.old_slot)
            obs.new_trial_seen = any(m["version"] == obs.new and m["mode"] == "trial"
                                     for _, _, m in watch.items("banner"))
            obs.rollback_lines = len(watch.items("rollback"))
            obs.rollback_metric = self.fleet.telemetry.rollback_count(obs.new, cart.id, since=self._tele_mark)

    def _deliver_again(self, obs: Observation, image: bytes) -> None:
        """Invariant 4: the same release delivered again converges to it, confirmed."""
        obs.redelivered = True
        with step(f"{self.cart.id}: deliver {obs.new} again"):
            try:
                self.ota.start(image, label="sweep-again").wait().expect_confirmed()
            except Exception as exc:
                obs.converge_error = str(exc).splitlines()[0]

    # ------------------------------------------------------------ the sweep
    def power_on(self) -> None:
        """Power the cart on and wait until its agent is online: whatever that boot publishes first (a
        rollback record left by an earlier run, say) must not land inside the first update."""
        mark = self.fleet.telemetry.mark()
        self.cart.power_on()
        self.fleet.telemetry.wait_metric(ONLINE_METRIC, thing=self.cart.id, since=mark,
                                         timeout=self.cart.boot_timeout + 30.0)

    def sweep(self, mode: str = "reduced", *, seed: int = 0,
              rollback_faults: dict | None = None) -> SweepReport:
        """The whole sweep of this cart: record an update, then cut it at the selected events and at
        seeded random delays, once with a second cut at the next boot (during recovery) and, with
        ``rollback_faults`` (a release that rolls back), once during the bootloader's rollback. Powers
        the cart on first."""
        t0 = time.monotonic()
        self.power_on()
        rollback_point = None
        if rollback_faults:
            _, ev = self.record_rollback(rollback_faults)
            if ev is not None:
                rollback_point = CutPoint("rollback", ev)
        recorded = self.record()
        points = select_points(recorded, mode, seed=seed)
        second: dict[int, str] = {}
        faults: dict[int, dict] = {}
        if self.trial_boot is not None:
            boot, first = self.trial_boot
            second[len(points)] = boot.name
            points.append(CutPoint("recovery", first))
        if rollback_point is not None:
            faults[len(points)] = dict(rollback_faults)
            points.append(rollback_point)
        report = self.run(points, mode=mode, recorded=recorded, second_cuts=second, image_faults=faults)
        if rollback_faults and rollback_point is None:
            report.results.append(PointResult(self.cart.id, CutPoint("rollback", Event("?", 1, -1)), Observation(
                "-", "-", "-", cut_error="no event after the bootloader's rollback line in the recorded rollback"),
                "the cut during a rollback could not be aimed: no event after the bootloader's rollback line"))
        report.wall_s = time.monotonic() - t0
        return report

    def catch_fault_build(self, *, rounds: int = CATCH_ROUNDS) -> SweepReport:
        """For a seeded fault build (``faults`` of this sweep): install it, record its next update, and
        cut at each of that update's boot-control writes, up to ``rounds`` times over, until an invariant
        breaks. Rounds, because a cut lands some 0.1 to 1 ms after its event line (the supply's command
        has to travel) while a boot-control write at the rig's flash speed lasts about as long: a cut
        at the line may land inside the write or just after it, as a real power loss would."""
        self.power_on()
        with step(f"{self.cart.id}: install the fault build {self.faults}"):
            version = self._running()
            self.ota.start(self._image(bump(version, patch=1))).wait().expect_confirmed()
        t0 = time.monotonic()
        recorded = self.record()
        points = [CutPoint("event", e) for e in recorded if is_bcb_write(e)] * rounds
        report = self.run(points, mode="boot-control writes", recorded=recorded, stop_on_fail=True)
        report.not_run = []   # the rounds left after the catch are not points anyone asked for
        report.wall_s = time.monotonic() - t0
        return report

    def run(self, points: Sequence[CutPoint], *, mode: str = "reduced", recorded: Sequence[Event] = (),
            stop_on_fail: bool = False, second_cuts: dict[int, str] | None = None,
            image_faults: dict[int, dict] | None = None) -> SweepReport:
        """Every point in order (each continues from where the previous left the cart). A brick ends
        the sweep (the points left are reported as not run); so does a failure with ``stop_on_fail``."""
        report = SweepReport(self.cart.id, mode, list(recorded), label=self.label)
        t0 = time.monotonic()
        for i, p in enumerate(points):
            r = self.run_point(p, image_faults=(image_faults or {}).get(i), second_cut=(second_cuts or {}).get(i))
            report.results.append(r)
            if r.observation.brick or (stop_on_fail and not r.passed):
                report.not_run = list(points[i + 1:])
                break
        report.wall_s = time.monotonic() - t0
        return report
