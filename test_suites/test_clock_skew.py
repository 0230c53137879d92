"""Clock skew, on every cart: the device decides "is this release valid now?" on a time it got from
the lab's time service (its nonce, signed by a key chained to the lab PKI), never on its own clock.

The field near-miss this suite exists for: carts whose clocks drifted about 12 hours rejected a valid
image as "not yet valid", rolled back and retried in a loop. Here a cart's clock is put hours or years
off and the update must go through with one time exchange and no rollback; a release that really is
outside its signed window (or whose signer certificate is) is refused for exactly that reason, by
server time, while the cart's own clock says otherwise; a time service that does not answer defers
the update without a retry storm; a bad time answer never moves the cart's clock state.

Every test leaves the cart's clock as its configuration has it (`clock.drift_s`) and the time service
answering normally (the `ota` fixture resets it).
"""

from __future__ import annotations

import pytest

from harness.ota import DEFER_BUDGET_S, ONLINE_METRIC, OtaError, bump

HOUR = 3600
DAY = 86400
YEAR = 365 * DAY


@pytest.fixture
def own_clock(cart):
    """The test moves the cart's clock; afterwards it is back at its configured drift."""
    yield
    cart.apply_drift()


def time_requests(fleet, cart, since: int = 0) -> list:
    return fleet.time.requests(cart.id)[since:]


# ---------------------------------------------------------------- the near-miss: a skewed clock must not matter


@pytest.mark.parametrize("skew", [pytest.param(12 * HOUR, id="ahead-12h"), pytest.param(-12 * HOUR, id="behind-12h"),
                                  pytest.param(3 * YEAR, id="ahead-3y"), pytest.param(-3 * YEAR, id="behind-3y")])
def test_skewed_cart_clock_updates_with_one_time_exchange_and_no_rollback(cart, ota, fleet, own_clock, skew):
    running = cart.power_on().version
    cart.skew_clock(skew)
    mark = len(time_requests(fleet, cart))
    out = ota.update(ota.image(bump(running, patch=1))).expect_confirmed()
    asked = time_requests(fleet, cart, mark)
    assert len(asked) == 1, (f"{cart.id}: {len(asked)} time requests for one update with the clock {skew:+d} s off "
                             f"(expected exactly one: a valid answer ends the exchange)\n{out.describe()}")
    assert out.rollback_metric == 0 and out.after.rollbacks == out.before.rollbacks, out.describe()


# ---------------------------------------------------------------- validity decided by server time


@pytest.mark.parametrize(("window", "cart_clock", "reason"), [
    pytest.param((-60 * DAY, -30 * DAY), -45 * DAY, "expired", id="manifest-expired"),
    pytest.param((30 * DAY, 60 * DAY), 45 * DAY, "not yet valid", id="manifest-not-yet-valid"),
])
def test_manifest_outside_its_window_by_server_time_is_rejected(cart, ota, fleet, own_clock, window, cart_clock,
                                                                reason):
    """The cart's own clock is put inside the signed window: only server time can say it is outside."""
    target = bump(cart.power_on().version, patch=1)
    now = fleet.server_time(cart.id)
    image = ota.image(target, issued=now + window[0], expires=now + window[1])
    cart.skew_clock(cart_clock)
    ota.update(image).expect_rejected(reason)


@pytest.mark.parametrize(("validity", "cart_clock", "reason"), [
    pytest.param((-400 * DAY, -DAY), -200 * DAY, "signer expired", id="signer-expired"),
    pytest.param((DAY, 400 * DAY), 200 * DAY, "signer not yet valid", id="signer-not-yet-valid"),
])
def test_signer_certificate_outside_its_validity_is_rejected(cart, ota, fleet, lab_pki, own_clock, validity,
                                                             cart_clock, reason):
    """The manifest is valid; the code-signing certificate is not, at server time (the cart's clock is
    put inside the certificate's validity, so a cart that asked its own clock would accept it)."""
    import datetime as dt

    target = bump(cart.power_on().version, patch=1)
    now = fleet.server_time(cart.id)
    at = lambda s: dt.datetime.fromtimestamp(now + s, dt.UTC)  # noqa: E731
    leaf = lab_pki.issue_signer(ota.ca, at(validity[0]), at(validity[1]))
    image = ota.image(target, leaf=leaf)
    cart.skew_clock(cart_clock)
    ota.update(image).expect_rejected(reason)


# ---------------------------------------------------------------- no time, no update — and no storm


DEFER_S = 30.0  # the agent's first back-off of a deferred job, doubling for each deferral of the same job
                # (docs/interfaces.md, "Deferral"); the fleet settings' defer_s would shorten it, but the factory
                # writes those, not the harness: the watch covers the back-off as the cart has it
TIME_TRIES = 3  # requests of one time exchange (docs/interfaces.md, "Time exchange")
TIMER_SLACK = 0.95  # a back-off is timed by the cart's own oscillator: not a storm if within 5 % of it
BACKOFFS = (DEFER_S,)  # watched on the cart: the first back-off (its doubling, per deferral of the same job, is
                       # tested on the firmware with a short defer_s: tests/test_vrack_trust.py)


def deferrals(fleet, cart, job_id: str) -> list[float]:
    """When the service took each report deferring the job (harness monotonic time), in order."""
    return [c.t for c in fleet.jobs.history(job_id, cart.id)
            if c.new == "IN_PROGRESS" and c.status_details.get("step") == "deferred"]


def wait_deferred_again(fleet, cart, job_id: str, after: float, backoff: float) -> float:
    """The job's next deferral after the one at `after`: the agent takes the job up again once its back-off has
    run, finds no time again and defers it again."""
    budget = backoff + DEFER_BUDGET_S
    again = fleet.wait_job_change(job_id, cart.id, lambda c: c.new == "IN_PROGRESS" and c.t > after
                                  and c.status_details.get("step") == "deferred", budget)
    assert again is not None, (f"{cart.id}: the deferred job {job_id} was not deferred again within {budget:.0f} s "
                               f"(its back-off: {backoff:g} s): the agent did not take it up again\n"
                               f"{cart.console.tail()}")
    return again.t


def test_time_service_unreachable_defers_the_update_without_a_retry_storm(cart, ota, fleet):
    """Three requests, then the job is deferred: nothing written, nothing rebooted, the device state as it
    was. The agent takes it up again only after its back-off: three requests at the next attempt and none
    in between."""
    running = cart.power_on().version
    image = ota.image(bump(running, patch=1))
    mark = len(time_requests(fleet, cart))
    fleet.time.set_mode(cart.id, "silent")
    run = ota.start(image)
    try:
        out = run.wait_deferred()
        out.expect_deferred("time service unreachable")  # + slots, boot control, boot count, device state
        at = deferrals(fleet, cart, run.job_id)
        assert len(at) == 1, f"{cart.id}: {len(at)} deferrals of job {run.job_id} where the first was awaited"
        for backoff in BACKOFFS:
            at.append(wait_deferred_again(fleet, cart, run.job_id, at[-1], backoff))
        asked = [r.t for r in time_requests(fleet, cart, mark)]
        boots, state = cart.slot_status().boots, cart.device_state()  # the watch over
    finally:
        run.close()
    first = [t for t in asked if t < at[0]]
    retries = [[t for t in asked if a < t < b] for a, b in zip(at[:-1], at[1:], strict=True)]
    print(f"{cart.id}: time requests under an unreachable time service: {len(first)} before the deferral, then "
          + ", ".join(f"{len(r)} from {r[0] - a:.1f} s after deferral {k}" if r else f"none after deferral {k}"
                      for k, (a, r) in enumerate(zip(at[:-1], retries, strict=True), 1)))
    assert len(first) == TIME_TRIES, (
        f"{cart.id}: {len(first)} time requests before deferring (expected the agent's {TIME_TRIES} tries)")
    for k, (a, backoff, got) in enumerate(zip(at[:-1], BACKOFFS, retries, strict=True), 1):
        assert len(got) == TIME_TRIES, (f"{cart.id}: {len(got)} time requests between deferral {k} and {k + 1} "
                                        f"(expected {TIME_TRIES}: one exchange per attempt)")
        assert got[0] - a >= TIMER_SLACK * backoff, (
            f"{cart.id}: retry storm: the job was taken up again {got[0] - a:.1f} s after deferral {k}, before its "
            f"back-off of {backoff:g} s")
    assert (boots, state) == (out.after.boots, out.state_before), (
        f"{cart.id}: while the job stayed deferred the cart rebooted or its device state moved: boot count "
        f"{out.after.boots} -> {boots}, device state {out.state_before} -> {state}")
    # the service back: the next job goes through, with one exchange
    fleet.time.set_mode(cart.id, "normal")
    mark = len(time_requests(fleet, cart))
    ota.update(ota.image(bump(running, patch=1))).expect_confirmed()
    assert len(time_requests(fleet, cart, mark)) == 1


# ---------------------------------------------------------------- bad answers change nothing

# (the time service's mode, the offset of the time it signs, the reason the cart must give, whether the cart is
# power-cycled between the good exchange and the bad answer: the floor it is judged against is in flash)
BAD_ANSWERS = [
    pytest.param("replay", 0, "nonce mismatch", False, id="replayed-old-nonce"),
    pytest.param("forged", 0, "bad signature", False, id="forged-wrong-key"),
    pytest.param("rogue", 0, "untrusted signer", False, id="signed-under-unknown-root"),
    pytest.param("normal", -HOUR, "earlier than last accepted", True, id="earlier-than-last-accepted"),
    pytest.param("normal", 20 * YEAR, "from the future", False, id="from-the-far-future"),
    pytest.param("unsigned", 0, "unsigned", False, id="unsigned"),
    pytest.param("malformed", 0, "malformed: answer not json", False, id="malformed"),
    pytest.param("oversized", 0, "malformed: answer too large", False, id="oversized"),
]


def check_bad_answer_rejected(cart, fleet, mode: str, offset_s: int, reason: str, *, power_cycle: bool = False) -> None:
    """A good exchange first (so there is an answer to replay and a time to be earlier than), then the
    bad answer: `time sync` must say rejected for exactly `reason`, the device state (time floor,
    security counter) must be what the good exchange left, and the cart must not have rebooted. With
    `power_cycle`, the cart is power-cycled in between: the floor must survive it and still hold."""
    good = cart.time_sync()
    assert good.result == "ok", f"{cart.id}: the first, good exchange failed: {good}"
    before = cart.device_state()
    assert before.floor == good.t, f"{cart.id}: accepted time {good.t} but the stored floor is {before.floor}"
    if power_cycle:
        online = fleet.telemetry.mark()
        cart.power_cycle()
        # the agent on the broker again, or the one request of the bad exchange might find no connection
        fleet.telemetry.wait_metric(ONLINE_METRIC, thing=cart.id, since=online, timeout=cart.boot_timeout + 30.0)
        kept = cart.device_state()
        assert kept == before, f"{cart.id}: the device state did not survive a power cycle: {before} -> {kept}"
    boots = cart.slot_status().boots
    fleet.time.set_mode(cart.id, mode, offset_s=offset_s)
    bad = cart.time_sync(tries=1)  # one request: how the cart judges that one answer
    fleet.time.set_mode(cart.id, "normal")
    assert (bad.result, bad.reason) == ("rejected", reason), (
        f"{cart.id}: time answer ({mode}, offset {offset_s:+d} s) gave {bad.result} {bad.reason!r}, expected "
        f"rejected {reason!r}")
    after = cart.device_state()
    assert after == before, f"{cart.id}: a rejected time answer changed the device state: {before} -> {after}"
    now = cart.slot_status().boots
    assert now == boots, f"{cart.id}: the cart rebooted over a rejected time answer: boot count {boots} -> {now}"


@pytest.mark.parametrize(("mode", "offset_s", "reason", "power_cycle"), BAD_ANSWERS)
def test_bad_time_answer_is_rejected_and_changes_nothing(cart, ota, fleet, mode, offset_s, reason, power_cycle):
    cart.power_on()
    check_bad_answer_rejected(cart, fleet, mode, offset_s, reason, power_cycle=power_cycle)


def test_update_with_a_replayed_time_answer_is_deferred_and_writes_nothing(cart, ota, fleet):
    """Every answer the job gets is a replay: deferred, nothing written, no reboot, and the device state (time
    floor, security counter) what the good exchange before it left (`expect_deferred` compares them)."""
    target = bump(cart.power_on().version, patch=1)
    assert cart.time_sync().result == "ok"  # an answer the service can replay
    fleet.time.set_mode(cart.id, "replay")
    run = ota.start(ota.image(target))
    try:
        run.wait_deferred().expect_deferred("time answer rejected: nonce mismatch")
    finally:
        run.close()


# ---------------------------------------------------------------- the trial window runs on monotonic time


def _trial_started(run, target: str) -> float:
    """When the trial boot of `target` reached its shell (harness monotonic time)."""
    t_banner, text = run.wait_event("banner", run.budget, what=f"the trial boot of {target}")
    assert "mode=trial" in text and f"fw={target}" in text, text
    run.wait_event("ready", run.budget, after=t_banner, what="the trial boot's shell")
    return t_banner


@pytest.mark.parametrize("jump", [pytest.param(12 * HOUR, id="ahead-12h"), pytest.param(-12 * HOUR, id="behind-12h")])
def test_wall_clock_jump_in_the_trial_window_does_not_end_a_good_trial(cart, ota, own_clock, jump):
    target = bump(cart.power_on().version, patch=1)
    run = ota.start(ota.image(target))
    _trial_started(run, target)
    cart.skew_clock(jump)
    out = run.wait()
    out.expect_confirmed()


@pytest.mark.parametrize("jump", [pytest.param(-12 * HOUR, id="behind-12h")])
def test_wall_clock_jump_in_the_trial_window_does_not_move_the_mark_good_deadline(cart, ota, own_clock, jump):
    """A build that never marks itself good is rolled back when its window ends by the board's monotonic
    clock: a clock set back 12 h does not give it 12 more hours. (Set forward, it does not end a good
    trial at once: the test before.)"""
    running = cart.power_on().version
    target = bump(running, patch=1)
    window = cart.config.boot.mark_good_window_s
    run = ota.start(ota.image(target, faults={"never_mark_good": True}))
    t_trial = _trial_started(run, target)
    cart.skew_clock(jump)
    out = run.wait()
    out.expect_rolled_back()
    t_reset = out.events["watchdog"][0][0]
    lasted = t_reset - t_trial
    assert window * 0.9 <= lasted <= window + cart.boot_timeout, (
        f"{cart.id}: the trial of {target} ended {lasted:.1f} s after its boot with the clock moved {jump:+d} s; "
        f"its mark-good window is {window} s")
    assert cart.version() == running


# ---------------------------------------------------------------- the seeded fault builds these checks exist for

# They test the gate, not the release: `hil gate --self-check` runs them, on one cart per hardware revision.


def install(ota, cart, faults: dict) -> str:
    """Put a fault build on the cart as its running, confirmed firmware; its version."""
    target = bump(cart.power_on().version, patch=1)
    ota.update(ota.image(target, faults=faults)).expect_confirmed()
    return target


@pytest.mark.hil_self_check("local_clock")
def test_fault_build_validating_against_its_own_clock_is_caught(cart, ota, own_clock, factory_reset, self_check):
    """Near-miss 1 itself: the fault build checks the signed window against its RTC, 12 h behind."""
    running = install(ota, cart, {"local_clock": True})
    cart.skew_clock(-12 * HOUR)
    out = ota.update(ota.image(bump(running, patch=1)))
    with pytest.raises(OtaError, match="expected the update to be confirmed, got rejected") as caught:
        out.expect_confirmed()
    assert out.reason == "not yet valid", out.describe()
    self_check.caught(f"{str(caught.value).splitlines()[0]} (its clock 12 h behind)")


@pytest.mark.hil_self_check("ignore_nonce")
def test_fault_build_accepting_a_time_answer_for_another_nonce_is_caught(cart, ota, fleet, factory_reset,
                                                                         self_check):
    install(ota, cart, {"ignore_nonce": True})
    with pytest.raises(AssertionError, match="gave ok") as caught:
        check_bad_answer_rejected(cart, fleet, "replay", 0, "nonce mismatch")
    self_check.caught(caught.value)
