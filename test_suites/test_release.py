"""The release candidate, on every cart: may it go to canary?

The candidate (`hil gate --firmware IMAGE | --build VERSION`; by default the reference firmware's
next release) is signed by the lab for each cart as a release would be. Each cart:

- starts from each version its configuration runs in the field and is updated to the candidate,
  confirmed, the new slot byte for byte the image that was sent;
- running the candidate, takes the next update (candidate -> candidate+1, made by the rig's build):
  a release that cannot take the next update is the worst failure there is;
- running the candidate, refuses the negative matrix with the candidate's own verifier, each for
  its own reason, slots and boot control unchanged, no reboot;
- given the candidate corrupted before signing (a good signature over a broken build), boots it,
  fails its self-test and is taken back by the bootloader, the rollback counted once.
"""

from __future__ import annotations

import pytest

from harness.config import version_key
from harness.negatives import IMAGE_DEFECTS, lower
from harness.ota import bump, corrupt_before_signing
from harness.recovery import recover_factory


def running_candidate(cart, ota, candidate) -> None:
    """The cart runs the candidate, confirmed: from the factory image when it runs anything else. (The tests
    run in this file's order on a cart; each leaves it where the next can start without a reset when it can:
    the candidate, or something from which a factory recovery is the way back.)"""
    if cart.power_on().version == candidate.version and cart.slot_status().confirmed:
        return
    recover_factory(cart)
    ota.update(ota.sign(candidate.unsigned)).expect_confirmed()


def test_candidate_installs_from_every_field_version(cart, ota, candidate):
    for field in cart.config.firmware.versions_in_field:
        recover_factory(cart)
        if field != cart.config.firmware.initial_version:  # how a field cart got there: an OTA release
            ota.update(ota.image(field)).expect_confirmed()
        assert cart.version() == field
        out = ota.update(ota.sign(candidate.unsigned)).expect_confirmed()
        assert cart.version() == candidate.version, f"from {field}: {out.describe()}"


# `hil gate --quick` delivers one defect per thing the verifier checks (signature, chain, payload, hardware,
# validity, version); the full gate all of them
QUICK = {"unsigned", "untrusted-signer", "payload-changed-after-signing", "wrong-hardware", "expired", "downgrade"}
NEGATIVE_MATRIX = [
    pytest.param(s, r, id=i, marks=() if i in QUICK else pytest.mark.hil_full)
    for i, s, r in [*IMAGE_DEFECTS, ("same-version", {"version": "same"}, "same version"),
                    ("downgrade", {"version": "lower"}, "lower version")]]


@pytest.mark.parametrize(("sign", "reason"), NEGATIVE_MATRIX)
def test_candidate_refuses_the_negative_matrix(cart, ota, candidate, sign, reason):
    """The candidate's own payload, signed with each defect (as a higher version unless the case is
    about the version): refused by the candidate's verifier for that reason, nothing changed (so the
    next case finds the candidate running)."""
    running_candidate(cart, ota, candidate)
    sign = dict(sign)
    version = {"same": candidate.version, "lower": lower(candidate.version)}.get(
        sign.pop("version", None), bump(candidate.version, patch=1))
    image = ota.sign(candidate.unsigned, version=version, **sign)
    out = ota.update(image, target_version=version).expect_rejected(reason)
    assert cart.version() == candidate.version, out.describe()


def test_candidate_takes_the_next_update(cart, ota, candidate):
    running_candidate(cart, ota, candidate)
    nxt = bump(candidate.version, patch=1)
    out = ota.update(ota.image(nxt)).expect_confirmed()
    assert out.after.active != out.before.active, out.describe()
    assert cart.version() == nxt


def test_candidate_corrupted_before_signing_is_taken_back(cart, ota, candidate):
    running = cart.power_on().version
    if version_key(running) >= version_key(candidate.version) or cart.slot_status().pending is not None:
        recover_factory(cart)
        running = cart.version()
    out = ota.update(ota.sign(candidate.unsigned, payload_edit=corrupt_before_signing)).expect_rolled_back()
    reasons = [text for _, text in out.events.get("self_test_failed", [])]
    assert reasons and "build checksum mismatch" in reasons[0], reasons
    assert cart.version() == running
