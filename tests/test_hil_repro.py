"""`hil repro`: incident files are validated at the door (one line naming file and field), checked against
the slot they will run on, and replayed end to end on a private virtual rack: a near-miss with the
reference firmware does not reproduce (exit 0), the same with the field's fault build does (exit 1)."""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from harness.config import ConfigError, Rig
from harness.isolation import choose_ports
from harness.repro import (
    FieldBuild,
    build_label,
    check_slot,
    describe_offset,
    find_slot,
    load_incident,
    parse_build,
    parse_offset,
)

ROOT = Path(__file__).resolve().parent.parent
RIG = ROOT / "rigs" / "virtual.yaml"
NEAR_MISSES = sorted((ROOT / "incidents").glob("near-miss-*.yaml"))
NM1, NM2, NM3 = NEAR_MISSES


def hil(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "harness.cli", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, check=False)


def edited(tmp_path: Path, base: Path, **changes) -> Path:
    """A copy of the incident `base` with top-level sections replaced (None: removed)."""
    data = yaml.safe_load(base.read_text())
    for key, value in changes.items():
        key = key.rstrip("_")
        if value is None:
            data.pop(key, None)
        else:
            data[key] = copy.deepcopy(value)
    path = tmp_path / "incident.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# ---------------------------------------------------------------- the shipped incidents


def test_the_three_near_misses_are_shipped_each_with_the_fault_build_standing_in_for_the_field():
    loaded = {p.name: load_incident(p) for p in NEAR_MISSES}
    assert list(loaded) == ["near-miss-1-clock-drift.yaml", "near-miss-2-untested-sensor-config.yaml",
                            "near-miss-3-ca-rotation-deadlock.yaml"]
    stand_ins = {name: (i.field_firmware.side, build_label("v", i.field_firmware.build)) for name, i in loaded.items()}
    assert stand_ins == {"near-miss-1-clock-drift.yaml": ("from", "v+local_clock"),
                         "near-miss-2-untested-sensor-config.yaml": ("to", "v+crash_on_sensor=radar-iwr6843"),
                         "near-miss-3-ca-rotation-deadlock.yaml": ("from", "v+drop_old_ca")}
    assert all(i.expect.outcome == "confirmed" for i in loaded.values())
    assert loaded[NM1.name].clock.offset == -12 * 3600
    assert loaded[NM3.name].ca.update_first == ["lab-root-2027"] and loaded[NM3.name].to.signed_under == "lab-root-2025"
    rig = Rig.load(RIG)
    for path, incident in zip(NEAR_MISSES, loaded.values(), strict=True):  # each fits its configuration's slot
        slot = find_slot(rig, incident, path)
        check_slot(incident, path, slot, FieldBuild.choose(incident, path, True, []))


# ---------------------------------------------------------------- validation: one line, file and field

BAD_FIELDS = [
    pytest.param({"clock": {"offset": "12 parsecs"}},
                 "clock.offset: '12 parsecs' is not an offset like -12h, +43200s, 90m, 1.5d or 3y", id="offset"),
    pytest.param({"expect": {"outcome": "fine"}}, "expect.outcome: Input should be 'confirmed', 'rejected', 'failed', "
                 "'rolled-back' or 'deferred'", id="outcome"),
    pytest.param({"expect": {"outcome": "rejected"}},
                 "expect.reason: missing (a healthy cart ends rejected for a reason: say which)", id="no-reason"),
    pytest.param({"expect": {"outcome": "confirmed", "reason": "why"}},
                 "expect.reason: an update that ends confirmed has no reason", id="reason-not-wanted"),
    pytest.param({"colour": "blue"}, "colour: unknown field", id="unknown-field"),
    pytest.param({"from_": {"version": "1.4"}}, "from.version: '1.4' is not a version like 1.4.2", id="version"),
    pytest.param({"to": {"version": "1.4.1"}},
                 "to.version: 1.4.1 is not above from.version 1.4.2 (a cart refuses the same or a lower version)",
                 id="downgrade"),
    pytest.param({"to": {"version": "1.4.3", "signed_under": "lab-root-2099"}},
                 "to.signed_under: 'lab-root-2099' is not a root of the lab PKI", id="unknown-root"),
    pytest.param({"field_firmware": {"side": "from", "build": "Local Clock"}},
                 "field_firmware.build: 'Local Clock' is not a fault name", id="fault-name"),
    pytest.param({"power_cut": {"event": "write", "occurrence": 0}},
                 "power_cut.occurrence: Input should be greater than or equal to 1", id="occurrence"),
    pytest.param({"power_cut": {"event": "write"}, "network": {"time_service": "silent"}},
                 "power_cut: the cut's update must reach the write", id="cut-without-time"),
    pytest.param({"network": {"download_drop": {"at": "150%"}}},
                 "network.download_drop.at: '150%' is neither a byte offset nor a share like 50%", id="drop-at"),
    pytest.param({"network": {"broker_disconnect": True}},
                 "network.broker_disconnect: needs a download_drop that happens once", id="kick-needs-drop"),
    pytest.param({"configuration": None}, "configuration: missing", id="missing-section"),
]


@pytest.mark.parametrize(("changes", "message"), BAD_FIELDS)
def test_a_bad_field_is_one_line_naming_the_file_and_the_field(tmp_path, changes, message):
    path = edited(tmp_path, NM1, **changes)
    with pytest.raises(ConfigError) as err:
        load_incident(path)
    text = str(err.value)
    assert "\n" not in text and text.startswith(f"{path}: {message}"), text


def test_a_power_cut_replay_goes_to_the_next_patch_version(tmp_path):
    path = edited(tmp_path, NM1, power_cut={"event": "bcb-write"}, to={"version": "1.4.5"})
    with pytest.raises(ConfigError, match=r": to\.version: a replay with a power cut updates to the next patch "
                                          r"version 1\.4\.3 \(the sweep's point\), got 1\.4\.5$"):
        load_incident(path)
    cut = load_incident(edited(tmp_path, NM1, power_cut={"event": "bcb-write", "delay_ms": 2}))
    assert (cut.power_cut.event, cut.power_cut.occurrence, cut.power_cut.delay_ms) == ("bcb-write", 1, 2.0)


@pytest.mark.parametrize(("text", "seconds"), [("+12h", 43200), ("-43200s", -43200), ("-12 h", -43200),
                                               ("3y", 3 * 365 * 86400), ("1.5d", 129600), ("90m", 5400), (-95, -95),
                                               ("0", 0)])
def test_clock_offsets(text, seconds):
    assert parse_offset(text) == seconds


@pytest.mark.parametrize("text", ["12", "-43200"])
def test_plain_numbers_are_seconds(text):
    assert parse_offset(text) == int(text)


@pytest.mark.parametrize("bad", ["12 parsecs", "h", "++1h", "101y", True, None])
def test_bad_clock_offsets_are_refused(bad):
    with pytest.raises(ValueError):
        parse_offset(bad)


def test_offsets_are_shown_in_the_largest_whole_unit():
    assert [describe_offset(s) for s in (-43200, 3 * 365 * 86400, 95, 5400, 0)] == ["-12h", "+3y", "+95s", "+90m",
                                                                                    "+0s"]


def test_fault_builds_by_name_name_value_or_mapping():
    assert parse_build("local_clock") == {"local_clock": True}
    assert parse_build("crash_on_sensor=lidar-tfmini") == {"crash_on_sensor": "lidar-tfmini"}
    assert parse_build({"crash_on_sensor": "radar-iwr6843"}) == {"crash_on_sensor": "radar-iwr6843"}
    for bad in ("", "x=a b", {"crash_on_sensor": "a/b"}, {}, ["local_clock"]):
        with pytest.raises(ValueError):
            parse_build(bad)


def test_field_selects_the_incidents_stand_in_and_build_replaces_it():
    inc = load_incident(NM2)
    assert FieldBuild.choose(inc, NM2, False, []) == FieldBuild()
    field = FieldBuild.choose(inc, NM2, True, [])
    assert field == FieldBuild(to={"crash_on_sensor": "radar-iwr6843"})
    other = FieldBuild.choose(inc, NM2, False, ["crash_on_sensor=gnss-zed-f9p"])
    assert other == FieldBuild(to={"crash_on_sensor": "gnss-zed-f9p"})
    assert other.as_args() == ["to:crash_on_sensor=gnss-zed-f9p"]
    assert FieldBuild.from_args(other.as_args()) == other  # what `hil repro` hands to the test
    assert FieldBuild.from_args(FieldBuild.choose(load_incident(NM1), NM1, True, []).as_args()) == \
        FieldBuild(from_={"local_clock": True})


def test_field_without_a_field_firmware_section_is_refused(tmp_path):
    path = edited(tmp_path, NM1, field_firmware=None)
    with pytest.raises(ConfigError, match=r"field_firmware: missing \(--field and --build need to know which "):
        FieldBuild.choose(load_incident(path), path, True, [])


@pytest.mark.parametrize(("changes", "use_field", "message"), [
    pytest.param({"from_": {"version": "1.4.0"}}, False,
                 "from.version: 1.4.0 is below cart-04's factory version 1.4.1", id="below-factory"),
    pytest.param({"from_": {"version": "1.4.1"}}, True,
                 "from.version: 1.4.1 is cart-04's factory version: a fault build of it cannot be installed",
                 id="fault-build-at-factory-version"),
    pytest.param({"ca": {"holds": ["lab-root-2026"]}}, False,
                 "ca.holds: lab-root-2026, but cart-04 is provisioned with lab-root-2025", id="roots"),
])
def test_the_incident_is_checked_against_the_slot(tmp_path, changes, use_field, message):
    path = edited(tmp_path, NM1, **changes)
    incident = load_incident(path)
    slot = find_slot(Rig.load(RIG), incident, path)
    with pytest.raises(ConfigError) as err:
        check_slot(incident, path, slot, FieldBuild.choose(incident, path, use_field, []))
    assert str(err.value).startswith(f"{path}: {message}"), err.value


def test_slot_override_and_a_configuration_the_rig_lacks(tmp_path):
    rig = Rig.load(RIG)
    incident = load_incident(NM1)
    assert find_slot(rig, incident, NM1, 2).cart_id == "cart-02"
    with pytest.raises(ConfigError, match=r"no slot 99 \(slots 1, 2, "):
        find_slot(rig, incident, NM1, 99)
    path = edited(tmp_path, NM1, configuration={"cart": "cart-99"})
    with pytest.raises(ConfigError, match=r"configuration\.cart: no slot of rig .* holds cart-99"):
        find_slot(rig, load_incident(path), path)


@pytest.mark.parametrize(("changes", "extra", "message"), [
    pytest.param({"expect": {"outcome": "fine"}}, [], "expect.outcome: Input should be", id="bad-field"),
    pytest.param({"configuration": {"cart": "cart-99"}}, [], "configuration.cart: no slot of rig", id="no-such-cart"),
    pytest.param({"field_firmware": None}, ["--field"], "field_firmware: missing", id="field-without-stand-in"),
    pytest.param({}, ["--build", "Bad Name"], "--build Bad Name: 'Bad Name' is not a fault name", id="bad-build"),
])
def test_the_command_refuses_with_one_line_and_exit_2_before_anything_runs(tmp_path, changes, extra, message):
    path = edited(tmp_path, NM1, **changes)
    res = hil("repro", path, "--rig", RIG, "--out", tmp_path / "out", *extra)
    assert res.returncode == 2, res.stdout + res.stderr
    assert res.stdout == "" and res.stderr.count("\n") == 1, res.stdout + res.stderr
    assert message in res.stderr and res.stderr.startswith("hil: "), res.stderr
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- end to end on a private rack


@pytest.fixture
def private_rig(tmp_path):
    """rigs/virtual.yaml cut down to cart-07's slot, on free ports, everything it writes
    under tmp_path; its rack up for the test (so each replay uses this rig as it is). One test uses it: under
    xdist a second one could run at the same time on another worker."""
    from harness.rackctl import start_rack, stop_rack

    run = tmp_path / "run"
    rig = yaml.safe_load(RIG.read_text())
    slot = next(s for s in rig["slots"] if s["cart"] == "cart-07")
    supply = next(s for s in rig["supplies"] if s["name"] == slot["supply"])
    # free ports below the kernel's ephemeral range (a fixed port up there can be an outgoing connection's:
    # the image host once found its port taken in a CI run)
    ports = iter(choose_ports("127.0.0.1", 3))
    supply["resource"] = re.sub(r"::\d+::SOCKET$", f"::{next(ports)}::SOCKET", supply["resource"])
    rig.update(
        name="repro-test", configs=str(ROOT / "configs"), supplies=[supply],
        virtual={**rig["virtual"], "run_dir": str(run), "pki": str(tmp_path / "pki"),
                 "supply_rx_log": str(run / "supply-rx.log")},
        broker={**rig["broker"], "port": next(ports), "ca": str(run / "broker/ca.pem"),
                "cert": str(run / "broker/harness.pem"), "key": str(run / "broker/harness.key")},
        recovery={**rig["recovery"], "image": str(run / "factory/fw-{version}.img"),
                  "trust_store": str(run / "factory/trust-{cart}.bin")},
        image_host={**rig["image_host"], "port": next(ports)},
        slots=[{**slot, "console": str(run / "dev/serial/by-id/vcart-slot07")}])
    path = tmp_path / "rig.yaml"
    path.write_text(yaml.safe_dump(rig, sort_keys=False))
    pid = start_rack(Rig.load(path), owner_pid=os.getpid())
    try:
        yield path
    finally:
        stop_rack(pid)


def replay(out: Path, rig: Path, *extra: str) -> tuple[subprocess.CompletedProcess, str, dict]:
    res = hil("repro", NM2, "--rig", rig, "--out", out, *extra)
    last = (res.stdout.strip().splitlines() or [""])[-1]
    verdict = json.loads((out / "verdict.json").read_text()) if (out / "verdict.json").exists() else {}
    return res, last, verdict


def test_a_near_miss_is_not_reproduced_with_the_reference_firmware_and_is_with_the_field_build(tmp_path,
                                                                                                private_rig):
    res, last, verdict = replay(tmp_path / "reference", private_rig)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert last == ("not reproduced: cart-07 running 1.5.0: the update to 1.5.1 was confirmed (slot B, one trial "
                    "boot, no rollback), as a healthy cart does"), res.stdout[-3000:]
    assert verdict["verdict"] == "not reproduced" and verdict["line"] == last
    # the console went to the screen as it came, with the replay's steps between its lines
    assert "== update 1.5.0 -> 1.5.1; a healthy cart ends confirmed" in res.stdout
    assert "cart-07 | BOOT: bl=2.1.0 slot=B fw=1.5.1 cfg=cart-07 mode=trial" in res.stdout
    assert "cart-07 | FW: slot B confirmed" in res.stdout

    res, last, verdict = replay(tmp_path / "field", private_rig, "--field")
    assert res.returncode == 1, res.stdout[-3000:] + res.stderr[-2000:]
    assert re.fullmatch(r"REPRODUCED: cart-07 running 1\.5\.0: the update to 1\.5\.1\+crash_on_sensor=radar-iwr6843 "
                        r"was rolled back by the bootloader: its trial boot crashed \(TypeError: .+\) before marking "
                        r"itself good; expected confirmed", last), last
    assert verdict["verdict"] == "reproduced" and verdict["cart"] == "cart-07"
    assert "cart-07 | BL: rollback: slot B not confirmed, back to slot A" in res.stdout
