"""CA rotation, on every cart: a new root CA reaches the carts as its own signed job, signed under trust
they already have; through an overlap window (90 days by default) a cart holds the old and the new
root and accepts releases chained to either; after the window, by server time, the old root is retired.
The trust store is written into its other copy, never in place, so a power cut leaves the old store
or the new one.

The field near-miss this suite exists for: a release needed a CA part of the fleet had not received;
those carts rejected it and stayed on a firmware that could not be updated — a deadlock. On the bench
the rotation under test is to the lab's next root (`lab-root-2027`), which no configuration has yet,
so every configuration goes through the same steps from the roots it was provisioned with.

A test that changes a cart's trust store or moves its server time ends with a factory recovery
(`factory_reset`: firmware, trust store and device state as shipped), so the next test finds the cart
as configured.
"""

from __future__ import annotations

import re

import pytest

from harness import pki
from harness.cut import cut_on_console
from harness.ota import bump

DAY = 86400
OVERLAP_S = 90 * DAY
QUIET_S = 5.0  # watched after a rejection: a cart that loops would fetch or ask again within it
NEW = pki.ROOT_NEXT


def store_names(cart) -> list[str]:
    return sorted(cart.trust_store())


def rotate(cart, ota, fleet, *, overlap_s: int = OVERLAP_S) -> tuple[list[str], int]:
    """Deliver the next root, signed under the cart's own; (the store before, the old roots' end of overlap)."""
    before = store_names(cart)
    assert NEW not in before, f"{cart.id} already trusts {NEW}: the bench's next root must be new to every cart"
    t0 = fleet.server_time(cart.id)
    out = ota.deliver_trust(ota.trust_bundle([NEW], overlap_s=overlap_s)).expect_applied(sorted([*before, NEW]))
    entries = cart.trust_entries()
    for name in before:
        until = entries[name][1]
        assert until is not None and t0 + overlap_s <= until <= out.t_end_server + overlap_s, (
            f"{cart.id}: {name} should be kept until about {t0 + overlap_s} (server time + overlap), has {until}")
    assert entries[NEW][1] is None, f"{cart.id}: the new root {NEW} got an end date {entries[NEW][1]}"
    return before, t0 + overlap_s


def test_image_needing_a_ca_the_cart_lacks_is_rejected_once(cart, ota, fleet):
    """Before the rotation: a release chained to the new root is refused for the missing CA, the cart stays
    on its firmware and does not fetch or ask again (no loop)."""
    target = bump(cart.power_on().version, patch=1)
    out = ota.update(ota.image(target, ca=NEW)).expect_rejected("missing ca")
    since = len(fleet.images.requests())
    asked = len(fleet.time.requests(cart.id))
    more_time = fleet.time.wait_quiet(cart.id, since=asked, quiet_s=QUIET_S)  # watched for the whole window
    again = [r.as_dict() for r in fleet.images.requests()[since:] if r.image_id == out.job_id]
    assert not again, f"{cart.id}: fetched the rejected image again: {again}"
    assert more_time == 0, f"{cart.id}: asked for the time {more_time} more times after rejecting the image"
    assert out.statuses[-1] == "REJECTED" and fleet.jobs.execution(out.job_id, cart.id)["status"] == "REJECTED"


def test_after_the_ca_arrives_images_of_either_chain_update(cart, ota, fleet, factory_reset):
    running = cart.power_on().version
    before, _ = rotate(cart, ota, fleet)
    new_version = bump(running, patch=1)
    ota.update(ota.image(new_version, ca=NEW)).expect_confirmed()
    old_version = bump(new_version, patch=1)
    ota.update(ota.image(old_version, ca=before[0])).expect_confirmed()
    assert cart.version() == old_version


def test_old_ca_is_kept_through_the_overlap_and_retired_after_it(cart, ota, fleet, factory_reset):
    running = cart.power_on().version
    before, until = rotate(cart, ota, fleet)
    old = before[0]
    # the day after the new root arrived: the old one is still there and still good
    fleet.time.set_mode(cart.id, "normal", offset_s=DAY)
    version = bump(running, patch=1)
    ota.update(ota.image(version, ca=old)).expect_confirmed()
    assert old in cart.trust_store(), f"{cart.id}: {old} is gone the day after {NEW} arrived"
    # the overlap is over by server time: releases chained to the old root are refused
    now = fleet.server_time(cart.id)
    fleet.time.set_mode(cart.id, "normal", offset_s=DAY + (until - now) + DAY)
    ota.update(ota.image(bump(version, patch=1), ca=old)).expect_rejected("ca retired")
    version = bump(version, patch=1)
    ota.update(ota.image(version, ca=NEW)).expect_confirmed()
    assert cart.version() == version


@pytest.mark.parametrize("delay_s", [pytest.param(0.0, id="at-the-write"), pytest.param(0.003, id="mid-write")])
def test_cut_during_the_trust_store_write_leaves_the_old_or_the_new_store(cart, ota, fleet, factory_reset,
                                                                          delay_s):
    cart.power_on()
    before = store_names(cart)
    after = sorted([*before, NEW])
    bundle = ota.trust_bundle([NEW])
    cut = cut_on_console(cart.power, cart.console, cart.pattern("event").pattern.replace(
        "(?P<name>[a-z][a-z-]*)", "(?P<name>trust-write)"), delay_s=delay_s)
    run = ota.start_trust(bundle)
    try:
        cut.wait(run.budget)
    finally:
        run.close()
        cut.disarm()
    cart.power_on()
    found = store_names(cart)
    assert found in (before, after), (f"{cart.id}: after a cut {delay_s * 1000:g} ms into the trust-store write the "
                                      f"store holds {found}: neither the old {before} nor the new {after}")
    # whatever survived, the cart still takes the CA, then a release chained to it
    if found == before:
        ota.deliver_trust(ota.trust_bundle([NEW])).expect_applied(after)
    ota.update(ota.image(bump(cart.version(), patch=1), ca=NEW)).expect_confirmed()


BAD_BUNDLES = [
    pytest.param({"tamper": "truncated"}, "malformed: bundle not json", id="malformed"),
    pytest.param({"add_leaf": True}, "not a ca", id="not-a-ca"),
    pytest.param({"signer": pki.signer_of(pki.ROGUE_ROOT)}, "untrusted signer", id="signed-by-unknown-key"),
    pytest.param({"required_ca": pki.ROGUE_ROOT}, "missing ca", id="under-a-root-the-cart-lacks"),
    pytest.param({"tamper": "bad-signature"}, "bad signature", id="bad-signature"),
]


@pytest.mark.parametrize(("defect", "reason"), BAD_BUNDLES)
def test_bad_ca_bundle_is_rejected_and_the_store_is_untouched(cart, ota, defect, reason):
    """Rejected for its reason, the trust store entry for entry as it was, and the device state too: the
    server time the job's exchange accepted is not stored as the floor for a bundle the cart refused."""
    cart.power_on()
    ota.deliver_trust(ota.trust_bundle([NEW], **defect)).expect_rejected(reason)  # + the device state as it was


@pytest.mark.hil_self_check("drop_old_ca")
def test_fault_build_dropping_the_old_ca_at_once_is_caught(cart, ota, fleet, factory_reset, self_check):
    running = bump(cart.power_on().version, patch=1)
    ota.update(ota.image(running, faults={"drop_old_ca": True})).expect_confirmed()
    before = store_names(cart)
    with pytest.raises(AssertionError, match=re.escape(f"expected {sorted([*before, NEW])}")) as caught:
        rotate(cart, ota, fleet)
    self_check.caught(caught.value)
