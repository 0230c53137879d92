"""The power-cut sweep's logic on synthetic inputs: event recording and identity, point selection,
the invariants (each broken one named), and the report (table, SVG, files). No rack needed."""

from __future__ import annotations

import json
import re
from dataclasses import replace

import pytest

from harness.sweep import (
    FAIL,
    NEW_CONFIRMED,
    OLD_KEPT,
    ROLLED_BACK,
    CutPoint,
    Observation,
    PointResult,
    SweepReport,
    check_point,
    name_pattern,
    parse_events,
    select_points,
    trial_boot_events,
)

EVENT = r"^EV: (?P<name>[a-z][a-z-]*)(?P<detail>(?: [a-z_]+=\S+)*) t=(?P<t_ns>\d+)$"
BANNER = re.compile(r"^BOOT: bl=(?P<bl_version>\S+) slot=(?P<slot>[AB]) fw=(?P<version>\S+) "
                    r"cfg=(?P<config>\S+) mode=(?P<mode>\w+)")

UPDATE = """\
OTA: job j1 started target=1.4.3
EV: download off=0 t=1000000000
EV: download off=26214 t=1100000000
EV: verify t=1200000000
EV: write slot=B page=0/16 t=1300000000
EV: write slot=B page=8/16 t=1400000000
EV: set-pending slot=B t=1500000000
EV: bcb-write copy=1 seq=5 why=set-pending t=1510000000
EV: reset-for-trial t=1600000000
EV: bcb-write copy=0 seq=6 why=trial t=1700000000
BOOT: bl=2.1.0 slot=B fw=1.4.3 cfg=cart-01 mode=trial
EV: boot cause=software slot=B mode=trial t=1800000000
EV: self-test t=1900000000
EV: mark-good t=2000000000
EV: bcb-write copy=1 seq=7 why=mark-good t=2100000000
FW: slot B confirmed""".splitlines()


@pytest.fixture
def events():
    return parse_events(UPDATE, EVENT)


def test_events_are_named_by_name_and_occurrence_not_by_slot(events):
    assert [e.key for e in events][:6] == ["download#1", "download#2", "verify#1", "write#1", "write#2",
                                           "set-pending#1"]
    bcb = [e for e in events if e.name == "bcb-write"]
    assert [e.key for e in bcb] == ["bcb-write#1", "bcb-write#2", "bcb-write#3"]
    assert bcb[2].detail == "copy=1 seq=7 why=mark-good" and bcb[2].t_ns == 2_100_000_000
    assert [e.position for e in events] == list(range(len(events)))
    # the same update into the other slot has the same identities
    other = parse_events([x.replace("slot=B", "slot=A") for x in UPDATE], EVENT)
    assert [e.key for e in other] == [e.key for e in events]


def test_name_pattern_matches_only_that_event():
    rx = re.compile(name_pattern(EVENT, "bcb-write"))
    assert rx.search("EV: bcb-write copy=1 seq=7 why=mark-good t=5")["name"] == "bcb-write"
    assert not rx.search("EV: boot cause=power-on slot=A mode=normal t=5")
    assert not re.search(name_pattern(EVENT, "write"), "EV: bcb-write copy=1 seq=7 why=mark-good t=5")
    with pytest.raises(ValueError):
        name_pattern(r"^EV: (\w+)", "x")


def test_reduced_keeps_every_fifth_and_every_bcb_write_and_two_random_cuts(events):
    points = select_points(events, "reduced", seed=3)
    at = [p.event.key for p in points if p.kind == "event"]
    assert at == ["download#1", "set-pending#1", "bcb-write#1", "bcb-write#2", "self-test#1", "bcb-write#3"]
    randoms = [p for p in points if p.kind == "delay"]
    assert len(randoms) == 2 and all(0 <= p.delay_s <= 1.1 and p.event.key == "download#1" for p in randoms)
    assert select_points(events, "reduced", seed=3) == points          # seeded: reproducible
    assert select_points(events, "reduced", seed=4) != points


def test_reduced_cuts_every_state_and_trust_store_write():
    """The device state and the trust store are kept in two copies like boot control: every write of
    them is cut in the gate's sweep, wherever it falls, and nothing merely named like them."""
    lines = UPDATE[:4] + ["EV: state-write copy=1 seq=3 t=1210000000", "EV: trust-write copy=0 seq=1 t=1220000000",
                          "EV: time-request try=1 t=1230000000", "EV: statement t=1240000000"] + UPDATE[4:]
    events = parse_events(lines, EVENT)
    assert [(e.key, e.position) for e in events[3:7]] == [("state-write#1", 3), ("trust-write#1", 4),
                                                          ("time-request#1", 5), ("statement#1", 6)]
    at = [p.event.key for p in select_points(events, "reduced", seed=3) if p.kind == "event"]
    assert "state-write#1" in at and "trust-write#1" in at  # positions 3 and 4: not among every 5th
    assert "statement#1" not in at
    assert [k for k in at if k.startswith("bcb-write")] == ["bcb-write#1", "bcb-write#2", "bcb-write#3"]


def test_full_covers_every_event_and_ten_random_cuts(events):
    points = select_points(events, "full", seed=1)
    assert [p.event for p in points if p.kind == "event"] == events
    assert sum(p.kind == "delay" for p in points) == 10
    with pytest.raises(ValueError, match="sweep mode"):
        select_points(events, "half")
    with pytest.raises(ValueError, match="no events"):
        select_points([], "full")


def test_trial_boot_events_find_the_boot_line_and_the_step_after(events):
    boot, first = trial_boot_events(UPDATE, events, BANNER, re.compile(EVENT))
    assert (boot.key, first.key) == ("boot#1", "self-test#1")


def ok(**kw) -> Observation:
    """A point where the cut landed mid-write: the old release kept, the job resumed and confirmed."""
    base = Observation(old="1.4.2", new="1.4.3", old_slot="A", boots_before=10, rollbacks_before=2,
                       first_version="1.4.2", first_slot="A", first_mode="normal", job_status="SUCCEEDED",
                       running="1.4.3", running_slot="B", running_mode="normal", new_trial_seen=True,
                       status={"active": "B", "booted": "B", "pending": None, "confirmed": True, "boots": 13,
                               "rollbacks": 2, "slots": {"A": {"fw": "1.4.2"}, "B": {"fw": "1.4.3"}}},
                       old_slot_hash_before="aa", old_slot_hash_after="aa", counter_before=4,
                       floor_before=1_790_000_000, counter_after=4, floor_after=1_790_000_042)
    return replace(base, **kw)


def test_a_safe_point_passes():
    assert check_point(ok()) is None


@pytest.mark.parametrize(("change", "says"), [
    ({"cut_error": "cut not fired"}, "the cut did not land"),
    ({"brick": "'BL: no bootable image, halting'"}, "bricked"),
    ({"first_version": "1.0.0"}, "neither the old 1.4.2 nor the new 1.4.3"),
    ({"settle_error": "the job neither ended nor resumed"}, "neither ended nor resumed"),
    ({"running_slot": "A"}, "slot status says slot B booted"),
    ({"status": {"booted": "B", "pending": "A", "confirmed": True, "slots": {"B": {"fw": "1.4.3"}}}},
     "boot control inconsistent"),
    ({"new_trial_seen": False, "first_version": "1.4.3", "first_slot": "B"}, "without ever passing a trial"),
    ({"status": {"booted": "B", "confirmed": True, "boots": 1, "rollbacks": 0, "slots": {"B": {"fw": "1.4.3"}}}},
     "boot control lost: the boot count went from 10 to 1"),
    ({"counter_after": 3}, "device state went back: counter 4 -> 3"),
    ({"counter_after": 0, "floor_after": 0}, "device state went back: counter 4 -> 0"),
    ({"floor_after": 1_789_999_999}, "device state went back: time floor 1790000000 -> 1789999999"),
    ({"rollback_metric": 1}, "rose by 1 for 0 rollback"),
    ({"running": "1.4.2", "running_slot": "A", "status": {"booted": "A", "confirmed": True, "boots": 12,
                                                          "rollbacks": 2, "slots": {"A": {"fw": "1.4.2"}}}},
     "job SUCCEEDED but the cart runs the old 1.4.2 and no rollback was counted"),
    ({"job_status": "FAILED", "running": "1.4.2", "running_slot": "A", "old_slot_hash_after": "bb",
      "status": {"booted": "A", "confirmed": True, "boots": 12, "rollbacks": 2, "slots": {"A": {"fw": "1.4.2"}}}},
     "slot A, which runs the old 1.4.2, was written"),
    ({"converge_error": "expected confirmed, got rolled-back"}, "delivering again did not converge"),
])
def test_each_broken_invariant_is_named(change, says):
    assert says in (check_point(ok(**change)) or ""), check_point(ok(**change))


def test_the_device_state_may_stay_or_move_on_across_a_cut_but_never_go_back():
    """A cut inside a device-state write leaves the other copy: the counter and floor as they were, or the new
    ones; a raised counter (a confirmed image carrying a higher one) is fine; a family without a device state
    (nothing read) is not judged on it."""
    assert check_point(ok(floor_after=1_790_000_000)) is None
    assert check_point(ok(counter_after=5)) is None
    assert check_point(ok(counter_before=None, floor_before=None, counter_after=None, floor_after=None)) is None


def test_rollbacks_counted_once_including_one_whose_write_was_cut():
    # two rollback lines (the first write torn by a cut, the boot after rolled back again), one recorded
    rolled = ok(rollback_lines=2, rollback_metric=1, running="1.4.2", running_slot="A", job_status="FAILED",
                status={"booted": "A", "confirmed": True, "boots": 14, "rollbacks": 3, "slots": {"A": {"fw": "1.4.2"}}})
    assert check_point(rolled) is None
    assert "rose by 0" in check_point(replace(rolled, rollback_metric=0))
    assert "rose by 2" in check_point(replace(rolled, rollback_metric=2))
    assert "rollback count went 2 -> 5" in check_point(replace(rolled, status=rolled.status | {"rollbacks": 5}))


def report(events) -> SweepReport:
    r = SweepReport("cart-04", "reduced", list(events), label="reference", wall_s=12.0)
    pts = [CutPoint("event", e) for e in events[:4]]
    r.results = [
        PointResult("cart-04", pts[0], ok()),
        PointResult("cart-04", pts[1], ok(first_version="1.4.3", first_slot="B", first_mode="trial")),
        PointResult("cart-04", pts[2], ok(rollback_lines=1, rollback_metric=1,
                                          status=ok().status | {"rollbacks": 3})),
        PointResult("cart-04", pts[3], ok(), broken="boot control lost: the boot count went from 10 to 1"),
    ]
    r.not_run = [CutPoint("delay", events[0], 0.25)]
    return r


def test_report_table_image_and_files(events, tmp_path):
    r = report(events)
    assert [x.outcome for x in r.results] == [OLD_KEPT, NEW_CONFIRMED, ROLLED_BACK, FAIL]
    assert r.failures() == ["cart-04: cut at write#1 (slot=B page=0/16): boot control lost: the boot count went "
                            "from 10 to 1"]
    table = r.table()
    assert "| 4 | write#1 (slot=B page=0/16) | FAIL |" in table and "not run" in table
    assert "4 cut point(s), 3 pass, 1 fail" in table
    svg = r.svg()
    assert svg.startswith("<svg") and svg.count("<rect") >= 1 + 5 + 5 and "#d64545" in svg
    assert "boot count went from 10 to 1" in svg
    paths = r.write(tmp_path)
    assert [p.name for p in paths] == ["sweep-cart-04-reference.md", "sweep-cart-04-reference.svg",
                                       "sweep-cart-04-reference.json"]
    data = json.loads(paths[2].read_text())
    assert data["points"][3]["passed"] is False and data["coverage"] == pytest.approx(4 / len(events))


def test_a_pass_line_says_what_happened(events):
    line = PointResult("cart-01", CutPoint("delay", events[0], 0.5123), ok(cut_after="write#2", seconds=4.2)).line()
    assert line.startswith("cart-01: cut at random 512.3 ms after download#1 (after write#2): PASS")
    assert "PASS, old kept" in line and "job SUCCEEDED" in line
