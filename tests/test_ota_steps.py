"""The harness's OTA steps without a rack: builds through the rig's command, signing, versions,
and the outcome checks (each must fail on the evidence it exists to catch)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from harness import image as himage
from harness.cart import SlotStatus
from harness.config import Rig
from harness.ota import (
    FirmwareBuildError,
    FirmwareBuilds,
    OtaError,
    Signer,
    UpdateOutcome,
    bump,
    corrupt_before_signing,
)
from harness.pki import ROOT_OLD, LabPki
from vrack import ota_verify

ROOT = Path(__file__).resolve().parent.parent
RIG = ROOT / "rigs" / "virtual.yaml"


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    p = LabPki(tmp_path_factory.mktemp("pki"))
    p.init()
    return p


def test_bump():
    assert bump("1.4.2", patch=1) == "1.4.3"
    assert bump("1.4.2", minor=1) == "1.5.0"
    assert bump("1.4.2", major=1) == "2.0.0"
    assert bump("1.4.2", patch=-2) == "1.4.0"
    with pytest.raises(ValueError):
        bump("1.4.0", patch=-1)
    with pytest.raises(ValueError):
        bump("1.4", patch=1)


def test_builds_come_from_the_rigs_command_and_are_cached(tmp_path):
    builds = FirmwareBuilds(Rig.load(RIG), tmp_path)
    plain = builds.build("1.6.0")
    fault = builds.build("1.6.0", {"never_mark_good": True})
    assert himage.parse_image(plain).version == "1.6.0"
    assert himage.parse_image(fault).build_info["faults"] == {"never_mark_good": True}
    assert plain != fault
    assert len(list(tmp_path.glob("*.img"))) == 2
    assert FirmwareBuilds(Rig.load(RIG), tmp_path).build("1.6.0") == plain  # from the cache


def test_a_failing_build_says_what_and_why(tmp_path):
    with pytest.raises(FirmwareBuildError, match="no_such_fault"):
        FirmwareBuilds(Rig.load(RIG), tmp_path).build("1.6.0", {"no_such_fault": True})


def _verify(img: bytes, lab: LabPki, running: str = "1.5.0"):
    return ota_verify.verify_update(img, trust_store_pems=lab.trust_store(), hardware_revision="rev-c",
                                    running_version=running, now=int(time.time()))


def test_signed_release_verifies_on_the_device_side(tmp_path, lab):
    unsigned = FirmwareBuilds(Rig.load(RIG), tmp_path).build("1.6.0")
    signed = Signer(lab).sign(unsigned, hardware=["rev-c"], ca=ROOT_OLD)
    v = _verify(signed, lab)
    assert v.ok and v.ca == ROOT_OLD, v
    assert _verify(Signer(lab).sign(unsigned, hardware=["rev-z"]), lab).reason == "wrong hardware"
    assert _verify(Signer(lab).sign(unsigned, hardware=["rev-c"], tamper="unsigned"), lab).reason == "unsigned"


def test_corruption_before_signing_passes_verification_but_changes_the_payload(tmp_path, lab):
    unsigned = FirmwareBuilds(Rig.load(RIG), tmp_path).build("1.6.0")
    payload = himage.parse_image(unsigned).payload
    bad = corrupt_before_signing(payload)
    assert len(bad) == len(payload) and sum(a != b for a, b in zip(bad, payload, strict=True)) == 1
    compile(bad, "corrupted", "exec")  # still a program: only the build checksum can tell
    signed = Signer(lab).sign(unsigned, hardware=["rev-c"], payload_edit=corrupt_before_signing)
    assert _verify(signed, lab).ok


def _status(active="A", booted="A", pending=None, confirmed=True, a="1.5.0", b="-", boots=5, rollbacks=0):
    return SlotStatus(active, booted, pending, 0, confirmed, {"A": {"fw": a}, "B": {"fw": b}}, boots, rollbacks)


def _outcome(**kw) -> UpdateOutcome:
    base = dict(cart="cart-x", job_id="j1", target_version="1.6.0", status="REJECTED",
                details={"reason": "unsigned"}, outcome="rejected", before=_status(), after=_status(),
                hashes_before={"A": "a" * 64, "B": "b" * 64}, hashes_after={"A": "a" * 64, "B": "b" * 64},
                boots=[], rollback_metric=0)
    base.update(kw)
    return UpdateOutcome(**base)


def test_rejection_checks_reason_slots_boots_and_metric():
    _outcome().expect_rejected("unsigned")
    with pytest.raises(OtaError, match="expected 'bad signature'"):
        _outcome().expect_rejected("bad signature")
    with pytest.raises(OtaError, match="slot.* B changed"):
        _outcome(hashes_after={"A": "a" * 64, "B": "c" * 64}).expect_rejected("unsigned")
    with pytest.raises(OtaError, match="rebooted"):
        _outcome(boots=["BOOT: bl=2.1.0 slot=A fw=1.5.0 cfg=cart-x mode=normal"]).expect_rejected("unsigned")
    with pytest.raises(OtaError, match="rebooted"):
        _outcome(after=_status(boots=6)).expect_rejected("unsigned")
    with pytest.raises(OtaError, match="boot control changed"):
        _outcome(after=_status(pending="B")).expect_rejected("unsigned")
    with pytest.raises(OtaError, match="rose"):
        _outcome(rollback_metric=1).expect_rejected("unsigned")
    _outcome(details={"reason": "malformed: truncated"}).expect_rejected("malformed*")


def test_success_then_rollback_is_a_failure():
    rolled = _outcome(status="SUCCEEDED", details={}, outcome="succeeded-but-rolled-back", rollback_metric=1,
                      hashes_after={"A": "a" * 64, "B": "c" * 64}, after=_status(b="1.6.0", boots=8, rollbacks=1),
                      boots=["BOOT: ... mode=trial", "BOOT: ... mode=normal"], events={"rollback": [(1.0, "BL")]})
    with pytest.raises(OtaError, match="job SUCCEEDED but cart-x rolled back"):
        rolled.expect_confirmed()
    rolled.expect_rolled_back(succeeded_first=True)
    with pytest.raises(OtaError, match="expected rolled-back"):
        rolled.expect_rolled_back()


def test_rollback_must_be_counted_exactly_once():
    common = dict(status="FAILED", details={"reason": "rolled back"}, outcome="rolled-back",
                  after=_status(b="1.6.0", boots=8, rollbacks=1), events={"rollback": [(1.0, "BL")]},
                  hashes_after={"A": "a" * 64, "B": "c" * 64})
    _outcome(rollback_metric=1, **common).expect_rolled_back()
    for n in (0, 2):
        with pytest.raises(OtaError, match=f"rose by {n}, expected 1"):
            _outcome(rollback_metric=n, **common).expect_rolled_back()


def test_confirmed_needs_the_new_slot_active_and_one_trial_boot():
    good = dict(status="SUCCEEDED", details={}, outcome="confirmed",
                after=_status(active="B", booted="B", b="1.6.0", boots=6),
                hashes_after={"A": "a" * 64, "B": "c" * 64},
                boots=["BOOT: bl=2.1.0 slot=B fw=1.6.0 cfg=cart-x mode=trial"])
    _outcome(**good).expect_confirmed()
    with pytest.raises(OtaError, match="slot B active"):
        _outcome(**(good | {"after": _status(active="A", booted="B", b="1.6.0")})).expect_confirmed()
    with pytest.raises(OtaError, match="old slot A was written"):
        _outcome(**(good | {"hashes_after": {"A": "d" * 64, "B": "c" * 64}})).expect_confirmed()
    with pytest.raises(OtaError, match="exactly one boot"):
        _outcome(**(good | {"boots": good["boots"] * 2})).expect_confirmed()


def test_a_hidden_rollback_is_reported_unless_the_test_expected_it():
    from harness.ota import CartOta

    steps = CartOta(None, None, None, None, ["rev-c"])
    rolled = _outcome(status="SUCCEEDED", details={}, outcome="succeeded-but-rolled-back", rollback_metric=1,
                      after=_status(b="1.6.0", boots=8, rollbacks=1), events={"rollback": [(1.0, "BL")]},
                      hashes_after={"A": "a" * 64, "B": "c" * 64})
    steps.outcomes += [_outcome(), rolled]
    assert steps.hidden_rollbacks() == [rolled]  # what the ota fixture fails the test with
    rolled.expect_rolled_back(succeeded_first=True)
    assert steps.hidden_rollbacks() == []
