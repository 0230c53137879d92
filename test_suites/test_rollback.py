"""Observable rollback, on every cart: a release that cannot confirm itself is taken back by the
bootloader on its own, and every rollback shows up in `firmware_rollback_count` (by target
version) exactly once — a channel apart from job status, because the jobs protocol has no
"rolled back after SUCCEEDED".
"""

from __future__ import annotations

import re

import pytest

from harness.ota import ONLINE_METRIC, OtaError, bump, corrupt_before_signing


def crash_sensor(cart) -> dict:
    """A sensor driver that crashes at init: the sensor is one this cart's configuration has."""
    return {"crash_on_sensor": cart.config.sensors[-1]}


# (faults, how the trial must end: a console event of the profile, and a line that says why)
FAULT_BUILDS = [
    pytest.param(crash_sensor, "crash", r"BL: firmware crashed: TypeError", id="crash-on-own-sensor"),
    pytest.param({"crash_at_boot": True}, "crash", r"BL: firmware crashed: RuntimeError: fault build: crash at boot",
                 id="crash-at-boot"),
    pytest.param({"never_mark_good": True}, "watchdog", r"BL: watchdog reset", id="never-marks-good"),
    pytest.param({"no_broker": True}, "watchdog", r"OTA: broker unreachable: ", id="cannot-reach-broker"),
    pytest.param({"self_test_fail": True}, "self_test_failed", r"FW: self-test failed: fault build: ",
                 id="self-test-fails"),
]


@pytest.mark.parametrize(("faults", "symptom", "why"), FAULT_BUILDS)
def test_fault_build_is_rolled_back_and_counted_once(cart, ota, faults, symptom, why):
    running = cart.power_on().version
    target = bump(running, patch=1)
    faults = faults(cart) if callable(faults) else faults
    out = ota.update(ota.image(target, faults=faults)).expect_rolled_back()
    assert out.status == "FAILED" and out.details.get("rolled_back_version") == target, out.details
    assert out.events.get(symptom), f"expected the trial to end by {symptom}\n{out.describe()}"
    trial = out.console[out.console.index(f"fw={target} cfg={cart.id} mode=trial"):out.console.index("BL: rollback")]
    assert re.search(why, trial), f"the trial of {target} did not show {why!r}:\n{trial}"
    assert "marking slot" not in trial, "a fault build marked itself good"
    if "crash_on_sensor" in faults:  # it crashed in that sensor's init, not later
        assert f"FW: sensor {faults['crash_on_sensor']} ok" not in trial, trial
    boots = [b for b in out.boots if "mode=trial" in b]
    assert len(boots) == 1 and f"fw={target}" in boots[0], out.boots
    assert cart.version() == running


def test_succeeded_then_rolled_back_is_flagged(cart, ota):
    """The build reports SUCCEEDED before its self-test, then fails it: job status says success,
    the cart went back. The harness must call that a failure."""
    running = cart.power_on().version
    target = bump(running, patch=1)
    out = ota.update(ota.image(target, faults={"early_success": True, "self_test_fail": True}))
    assert out.status == "SUCCEEDED"
    with pytest.raises(OtaError, match="job SUCCEEDED but .* rolled back"):
        out.expect_confirmed()
    out.expect_rolled_back(succeeded_first=True)
    assert cart.version() == running


def test_image_corrupted_before_signing_boots_fails_self_test_and_rolls_back(cart, ota):
    running = cart.power_on().version
    target = bump(running, patch=1)
    out = ota.update(ota.image(target, payload_edit=corrupt_before_signing)).expect_rolled_back()
    reasons = [text for _, text in out.events.get("self_test_failed", [])]
    assert reasons and "build checksum mismatch" in reasons[0], reasons
    assert cart.version() == running


def test_plain_power_cycle_never_raises_the_metric(cart, fleet):
    rollback = cart.pattern("rollback")
    for _ in range(2):
        mark = fleet.telemetry.mark()
        start = cart.console.mark()
        cart.power_cycle()
        # the agent's "online" event comes after anything else the boot publishes
        online = fleet.telemetry.wait_metric(ONLINE_METRIC, thing=cart.id, since=mark, timeout=30)
        assert fleet.telemetry.rollback_count(thing=cart.id, since=mark) == 0, online
        assert not [x.text for x in cart.console.lines(start) if rollback.search(x.text)]
    status = cart.slot_status()
    assert status.pending is None and status.confirmed


@pytest.mark.hil_self_check("crash_after_confirm")
def test_crash_loop_after_mark_good_fails_at_once_naming_it(cart, ota, factory_reset, self_check):
    """A release that confirms itself, then crashes at every boot: no A/B rollback saves the cart, the job
    says SUCCEEDED. The update must fail at once, its first line naming the crash loop (not a timeout
    waiting for a ready line that never comes)."""
    target = bump(cart.power_on().version, patch=1)
    run = ota.start(ota.image(target, faults={"crash_after_confirm": True}))
    with pytest.raises(OtaError) as failed:
        run.wait()
    first = str(failed.value).splitlines()[0]
    assert re.match(rf"{cart.id}: crash loop: crashed [3-9] times in [\d.]+ s \(booting fw {re.escape(target)}; "
                    r"last: RuntimeError: fault build: crash after confirm\)", first), first
    self_check.caught(first)
