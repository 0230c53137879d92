"""The harness's OTA steps without a rack: builds through the rig's command, signing, versions,
and the outcome checks (each must fail on the evidence it exists to catch)."""

from __future__ import annotations

import re
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
    with pytest.raises(OtaError, match=r"^the cart rebooted although the update did not go through: boot count 5 -> 6, "
                                       r"0 banner\(s\)\n"):
        _outcome(after=_status(boots=6)).expect_rejected("unsigned")  # a reboot the console did not show
    with pytest.raises(OtaError, match=r"^the bootloader's rollback count went 0 -> 1 although the update did not"):
        _outcome(after=_status(rollbacks=1)).expect_rejected("unsigned")
    with pytest.raises(OtaError, match="boot control changed"):
        _outcome(after=_status(pending="B")).expect_rejected("unsigned")
    with pytest.raises(OtaError, match="rose"):
        _outcome(rollback_metric=1).expect_rejected("unsigned")


def test_a_reason_matches_exactly_never_by_prefix_unless_asked():
    """A prefix would pass a verifier crash ("malformed: internal error ...") for a malformed image: only an
    explicit trailing '*' (incident files) matches one."""
    truncated = _outcome(details={"reason": "malformed: bad size"})
    truncated.expect_rejected("malformed: bad size")
    truncated.expect_rejected("malformed: bad*")
    for want in ("malformed: internal error*", "malformed", "malformed: bad"):
        with pytest.raises(OtaError, match=re.escape(f"rejected for 'malformed: bad size', expected {want!r}")):
            truncated.expect_rejected(want)


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


SENT = "e" * 64  # sha256 of the image the job sent
CONFIRMED = dict(status="SUCCEEDED", details={}, outcome="confirmed",
                 after=_status(active="B", booted="B", b="1.6.0", boots=6),
                 hashes_after={"A": "a" * 64, "B": "c" * 64}, images_after={"A": "f" * 64, "B": SENT},
                 sent_sha256=SENT, boots=["BOOT: bl=2.1.0 slot=B fw=1.6.0 cfg=cart-x mode=trial"])


def test_confirmed_needs_the_new_slot_active_and_one_trial_boot():
    good = CONFIRMED
    _outcome(**good).expect_confirmed()
    with pytest.raises(OtaError, match="slot B active"):
        _outcome(**(good | {"after": _status(active="A", booted="B", b="1.6.0")})).expect_confirmed()
    with pytest.raises(OtaError, match="old slot A was written"):
        _outcome(**(good | {"hashes_after": {"A": "d" * 64, "B": "c" * 64}})).expect_confirmed()
    with pytest.raises(OtaError, match="exactly one boot"):
        _outcome(**(good | {"boots": good["boots"] * 2})).expect_confirmed()
    with pytest.raises(OtaError, match=r"^expected exactly one boot, the trial of 1\.6\.0: boot count 5 -> 7"):
        _outcome(**(good | {"after": _status(active="B", booted="B", b="1.6.0", boots=7)})).expect_confirmed()
    with pytest.raises(OtaError, match=r"^the bootloader's rollback count went 0 -> 1 on a confirmed update"):
        _outcome(**(good | {"after": _status(active="B", booted="B", b="1.6.0", boots=6, rollbacks=1)})) \
            .expect_confirmed()


def test_confirmed_matches_the_version_exactly():
    rc = "1.6.0-rc1"  # holds "1.6.0" as a prefix: still another version
    with pytest.raises(OtaError, match=r"^slot B holds 1\.6\.0-rc1, not 1\.6\.0\n"):
        _outcome(**(CONFIRMED | {"after": _status(active="B", booted="B", b=rc, boots=6)})).expect_confirmed()
    with pytest.raises(OtaError, match=r"^expected exactly one boot, the trial of 1\.6\.0"):
        _outcome(**(CONFIRMED | {"boots": [f"BOOT: bl=2.1.0 slot=B fw={rc} cfg=cart-x mode=trial"]})) \
            .expect_confirmed()


def test_confirmed_needs_the_new_slot_to_hold_the_image_sent():
    """The version string is the image's own claim: the bytes stored must be the bytes sent."""
    other = "d" * 64
    with pytest.raises(OtaError, match=r"^slot B holds an image whose hash differs from the one sent: sha256 "
                                       r"dddddddddddddddd… as stored, eeeeeeeeeeeeeeee… sent\n"):
        _outcome(**(CONFIRMED | {"images_after": {"A": "f" * 64, "B": other}})).expect_confirmed()
    with pytest.raises(OtaError, match=r"^slot B holds an image whose hash differs from the one sent: sha256 none "
                                       r"\(no readable image header\) as stored"):
        _outcome(**(CONFIRMED | {"images_after": {"A": "f" * 64, "B": None}})).expect_confirmed()
    with pytest.raises(OtaError, match=r"^no image was sent: nothing to compare slot B with"):
        _outcome(**(CONFIRMED | {"sent_sha256": None})).expect_confirmed()


def test_a_hidden_rollback_is_reported_unless_the_test_expected_it():
    from harness.ota import CartOta

    steps = CartOta(None, None, None, None, ["rev-c"])
    rolled = _outcome(status="SUCCEEDED", details={}, outcome="succeeded-but-rolled-back", rollback_metric=1,
                      after=_status(b="1.6.0", boots=8, rollbacks=1), events={"rollback": [(1.0, "BL")]},
                      hashes_after={"A": "a" * 64, "B": "c" * 64})
    from types import SimpleNamespace

    steps.runs += [SimpleNamespace(result=_outcome()), SimpleNamespace(result=rolled), SimpleNamespace(result=None)]
    assert steps.hidden_rollbacks() == [rolled]  # what the ota fixture fails the test with
    rolled.expect_rolled_back(succeeded_first=True)
    assert steps.hidden_rollbacks() == []


def test_a_run_keeps_how_it_ended_for_the_hidden_rollback_guard():
    """An update through start()/wait() must reach the `ota` fixture's guard as one through update() does:
    the run keeps its outcome (`result`), with the hashes the checks compare."""
    import threading
    from types import SimpleNamespace

    from harness.ota import UpdateRun

    run = UpdateRun.__new__(UpdateRun)
    run.cart = SimpleNamespace(id="cart-x", console=SimpleNamespace(slice_text=lambda start: ""))
    run.fleet = SimpleNamespace(telemetry=SimpleNamespace(rollback_count=lambda version, thing, since: 1),
                                jobs=SimpleNamespace(history=lambda job, thing: []),
                                images=SimpleNamespace(requests=lambda job: []))
    run.job_id, run.target_version, run.document, run.tele_mark, run.console_start = "j1", "1.6.0", {}, 0, 0
    run.before, run.hashes_before, run.t_created = _status(), {"A": "a" * 64, "B": "b" * 64}, 0.0
    run._cond, run._seen = threading.Condition(), {"rollback": [(7, 1.0, "BL: rollback")]}
    run.images_after, run.sent_sha256, run.result = {"A": "f" * 64, "B": SENT}, SENT, None
    told = []
    run.on_result = told.append  # how CartOta records every update of a test for the verdict
    out = run._outcome("SUCCEEDED", {}, "succeeded-but-rolled-back", _status(b="1.6.0", boots=8, rollbacks=1),
                       {"A": "a" * 64, "B": "c" * 64}, 2.0)
    assert run.result is out and out.hidden_rollback and told == [out]
    assert (out.images_after, out.sent_sha256) == ({"A": "f" * 64, "B": SENT}, SENT)


def test_the_run_listens_for_a_reboot_until_the_state_after_is_read():
    """A banner up to the moment the state after the job is read counts as a reboot: the console listeners
    go only after that read (and after `wait_deferred`'s too)."""
    import threading
    from types import SimpleNamespace

    from harness.ota import UpdateRun

    order: list[str] = []
    run = UpdateRun.__new__(UpdateRun)
    run.cart = SimpleNamespace(id="cart-x", boot_timeout=5.0, config=SimpleNamespace(
        boot=SimpleNamespace(mark_good_window_s=8)))
    ended = SimpleNamespace(new="REJECTED", status_details={"reason": "unsigned"},
                            as_dict=lambda: {"status": "REJECTED"})
    run.fleet = SimpleNamespace(jobs=SimpleNamespace(
        wait_status=lambda *a, **kw: {"status": "REJECTED", "statusDetails": {"reason": "unsigned"}}),
        wait_job_change=lambda *a: ended)
    run.job_id, run._seen, run._cond = "j1", {}, threading.Condition()
    run._state_after = lambda: order.append("state read") or (_status(), {})
    run.close = lambda: order.append("listeners removed")
    run._outcome = lambda *a: order.append("outcome")
    for wait in (run.wait, run.wait_deferred):
        order.clear()
        wait()
        assert order == ["state read", "listeners removed", "outcome"], (wait.__name__, order)


# ---------------------------------------------------------------- signing at the cart's server time

YEAR = 365 * 86400


def test_release_signed_at_a_shifted_server_time_is_valid_at_that_time_only(tmp_path, lab):
    """A cart whose server time a test moved a year on judges the release at that time: the release must be
    signed around it, or it would be refused as expired."""
    unsigned = FirmwareBuilds(Rig.load(RIG), tmp_path).build("1.6.0")
    now = int(time.time())
    later = Signer(lab).sign(unsigned, hardware=["rev-c"], now=now + YEAR)
    manifest = himage.parse_image(later).manifest
    assert manifest["issued"] == now + YEAR - 3600 and manifest["expires"] == now + YEAR + 30 * 86400

    def at(t):
        return ota_verify.verify_update(later, trust_store_pems=lab.trust_store(), hardware_revision="rev-c",
                                        running_version="1.5.0", now=t)
    assert at(now + YEAR).ok
    assert at(now).reason == "not yet valid"


def test_release_signed_by_an_ephemeral_leaf(tmp_path, lab):
    unsigned = FirmwareBuilds(Rig.load(RIG), tmp_path).build("1.6.0")
    now = int(time.time())
    leaf = lab.issue_signer(ROOT_OLD, now - 400 * 86400, now - 86400)  # expired yesterday
    signed = Signer(lab).sign(unsigned, hardware=["rev-c"], leaf=leaf, now=now)
    assert himage.parse_image(signed).certificates()[0] == leaf[1][0]
    assert _verify(signed, lab).reason == "signer expired"
    with pytest.raises(ValueError, match="not both"):
        Signer(lab).sign(unsigned, hardware=["rev-c"], leaf=leaf, signer="lab-root-2025-signer")


# ---------------------------------------------------------------- CA updates as the device judges them


def _bundle_ota(lab, server_time: int, cas=("lab-root-2025",)):
    """CartOta for a stand-in cart provisioned with `cas`, whose server time is `server_time`."""
    from types import SimpleNamespace

    from harness.ota import CartOta

    cart = SimpleNamespace(id="cart-x", config=SimpleNamespace(provisioned_cas=list(cas)))
    fleet = SimpleNamespace(server_time=lambda thing: server_time)
    ota = CartOta(cart, None, None, Signer(lab), ["rev-c"])
    ota.fleet = fleet
    return ota


def _judge(bundle: bytes, lab, now: int, store=("lab-root-2025",)):
    return ota_verify.verify_trust_bundle(bundle, trust_store_pems=lab.trust_store(store), now=now)


@pytest.mark.parametrize(("defect", "reason"), [
    ({}, None),
    ({"tamper": "truncated"}, "malformed: bundle not json"),
    ({"tamper": "bad-signature"}, "bad signature"),
    ({"add_leaf": True}, "not a ca"),
    ({"signer": "rogue-root-signer"}, "untrusted signer"),
    ({"required_ca": "rogue-root"}, "missing ca"),
])
def test_trust_bundle_and_its_defects_as_the_device_judges_them(lab, defect, reason):
    server = int(time.time()) + 2 * YEAR  # a test moved the cart's server time: the bundle must follow it
    bundle = _bundle_ota(lab, server).trust_bundle(["lab-root-2026"], **defect)
    v = _judge(bundle, lab, server)
    if reason is None:
        assert v.ok, v
        assert v.body["required_ca"] == "lab-root-2025" and v.body["overlap_s"] == 90 * 86400
        assert [a["name"] for a in v.body["add"]] == ["lab-root-2026"]
        assert v.body["issued"] <= server < v.body["expires"]
        assert _judge(bundle, lab, int(time.time())).reason == "not yet valid"
    else:
        assert v.reason == reason, v


# ---------------------------------------------------------------- deferred updates and CA-update outcomes


def _deferred(**kw) -> UpdateOutcome:
    base = dict(status="IN_PROGRESS", details={"step": "deferred", "reason": "time service unreachable"},
                outcome="deferred", events={"ota_deferred": [(1.0, "OTA: deferred job=j1: time service unreachable")]})
    return _outcome(**(base | kw))


def test_deferred_checks_reason_console_line_and_that_nothing_was_written():
    _deferred().expect_deferred("time service unreachable")
    with pytest.raises(OtaError, match="deferred for 'time service unreachable', expected 'time service'"):
        _deferred().expect_deferred("time service")
    _deferred().expect_deferred("time service*")
    with pytest.raises(OtaError, match="expected 'time answer rejected: nonce mismatch'"):
        _deferred().expect_deferred("time answer rejected: nonce mismatch")
    with pytest.raises(OtaError, match="expected the update to be deferred .*, got rejected"):
        _outcome().expect_deferred("time service unreachable")
    with pytest.raises(OtaError, match="no console line saying the agent deferred"):
        _deferred(events={"ota_deferred": [(1.0, "OTA: deferred job=other: time service unreachable")]}) \
            .expect_deferred("time service unreachable")
    with pytest.raises(OtaError, match="slot.* B changed"):
        _deferred(hashes_after={"A": "a" * 64, "B": "c" * 64}).expect_deferred("time service unreachable")
    with pytest.raises(OtaError, match="rebooted"):
        _deferred(after=_status(boots=6)).expect_deferred("time service unreachable")


def _trust(**kw):
    from harness.ota import TrustOutcome

    old, new = ("lab-root-2025", ("a" * 64, 1800000000)), ("lab-root-2027", ("b" * 64, None))
    base = dict(cart="cart-x", job_id="j1", target_version="trust bundle", status="SUCCEEDED",
                details={"step": "done", "cas": "lab-root-2025,lab-root-2027"}, outcome="applied", before=_status(),
                after=_status(), hashes_before={"A": "a" * 64, "B": "b" * 64},
                hashes_after={"A": "a" * 64, "B": "b" * 64}, boots=[], rollback_metric=0,
                events={"ota_trust_updated": [(1.0, "OTA: trust updated cas=lab-root-2027,lab-root-2025")]},
                trust_before=dict([(old[0], ("a" * 64, None))]), trust_after=dict([old, new]))
    return TrustOutcome(**(base | kw))


def test_ca_update_applied_means_exactly_those_roots_and_nothing_else_touched():
    want = ["lab-root-2027", "lab-root-2025"]
    _trust().expect_applied(want)
    # a firmware that dropped the old root at once: the store, not only the job, must show both
    dropped = _trust(trust_after={"lab-root-2027": ("b" * 64, None)}, details={"cas": "lab-root-2027"})
    with pytest.raises(OtaError, match=re.escape("expected ['lab-root-2025', 'lab-root-2027']")):
        dropped.expect_applied(want)
    with pytest.raises(OtaError, match="the job reported cas"):
        _trust(details={"cas": "lab-root-2027"}).expect_applied(want)
    with pytest.raises(OtaError, match="no console line saying the trust store was updated"):
        _trust(events={}).expect_applied(want)
    with pytest.raises(OtaError, match="expected the CA update to be applied, got rejected"):
        _trust(status="REJECTED", outcome="rejected", details={"reason": "bad signature"}).expect_applied(want)
    with pytest.raises(OtaError, match="rebooted by a CA update"):
        _trust(boots=["BOOT: bl=2.1.0 slot=A fw=1.5.0 cfg=cart-x mode=normal"]).expect_applied(want)
    with pytest.raises(OtaError, match="slot.* A changed by a CA update"):
        _trust(hashes_after={"A": "c" * 64, "B": "b" * 64}).expect_applied(want)


def test_ca_update_rejected_leaves_the_store_entry_for_entry():
    rejected = dict(status="REJECTED", outcome="rejected", details={"reason": "not a ca"}, events={})
    same = _trust(**rejected, trust_after=_trust().trust_before)
    same.expect_rejected("not a ca")
    with pytest.raises(OtaError, match="rejected for 'not a ca', expected 'bad signature'"):
        same.expect_rejected("bad signature")
    with pytest.raises(OtaError, match="the trust store changed although the CA update was rejected"):
        _trust(**rejected).expect_rejected("not a ca")
    retired = {"lab-root-2025": ("a" * 64, 1800000000)}  # same roots, but an end of overlap was written
    with pytest.raises(OtaError, match="the trust store changed"):
        _trust(**rejected, trust_after=retired).expect_rejected("not a ca")


def test_waiting_for_a_job_change_wakes_on_the_change_and_gives_up_at_the_deadline():
    """Fleet.wait_job_change is woken by the jobs service's listener (which runs under the service's own
    lock: the wait must never hold its condition while it reads the history)."""
    import threading
    from types import SimpleNamespace

    from harness.ota import Fleet

    history: list = []
    fleet = Fleet.__new__(Fleet)
    fleet._changes, fleet._change_seq = threading.Condition(), 0
    fleet.jobs = SimpleNamespace(history=lambda job_id, thing: list(history))
    deferred = SimpleNamespace(new="IN_PROGRESS", status_details={"step": "deferred"})

    def later():
        time.sleep(0.2)
        history.append(SimpleNamespace(new="IN_PROGRESS", status_details={"step": "download"}))
        fleet._job_changed(history[-1])
        time.sleep(0.1)
        history.append(deferred)
        fleet._job_changed(deferred)

    t = threading.Thread(target=later)
    t0 = time.monotonic()
    t.start()
    got = fleet.wait_job_change("j1", "cart-x", lambda c: c.status_details.get("step") == "deferred", 5.0)
    t.join()
    assert got is deferred and time.monotonic() - t0 < 2.0
    t0 = time.monotonic()
    assert fleet.wait_job_change("j1", "cart-x", lambda c: c.new == "SUCCEEDED", 0.3) is None
    assert 0.3 <= time.monotonic() - t0 < 1.5


# ---------------------------------------------------------------- the cart's clock, time exchange and device state


class _Console:
    def tail(self) -> str:
        return ""


def _cart(replies: dict[str, list[str]], *, drop: tuple[str, ...] = (), drift_s: float = 0.0):
    """A Cart of the reference profile whose shell answers from `replies` (command sent -> reply lines);
    `drop`: commands its firmware family does not have."""
    from harness.cart import Cart, CartState
    from harness.config import ClockSpec, load_cart, load_profile

    prof = load_profile(ROOT / "configs/profiles/reference.yaml")
    prof = prof.model_copy(update={"commands": {k: v for k, v in prof.commands.items() if k not in drop}})
    cart = Cart.__new__(Cart)
    cart.id, cart.profile, cart.state, cart.console = "cart-x", prof, CartState.RUNNING, _Console()
    config = load_cart(ROOT / "configs/carts/cart-01.yaml")
    cart.config = config.model_copy(update={"clock": ClockSpec(drift_s=drift_s)})
    cart.sent = []

    def command(key, timeout=5.0, **fmt):
        text = prof.commands[key].send.format(**fmt)
        cart.sent.append(text)
        if text.startswith("rtc set "):
            return [f"rtc {text.split()[-1]}"]
        return replies[text]
    cart.command = command
    return cart


def test_trust_entries_read_the_end_of_overlap_and_the_store_stays_name_to_fingerprint():
    cart = _cart({"trust list": ["trust count=2", f"trust lab-root-2025 fp={'a' * 64} until=1800000000",
                                 f"trust lab-root-2027 fp={'b' * 64}"]})
    assert cart.trust_entries() == {"lab-root-2025": ("a" * 64, 1800000000), "lab-root-2027": ("b" * 64, None)}
    assert cart.trust_store() == {"lab-root-2025": "a" * 64, "lab-root-2027": "b" * 64}


def test_time_sync_and_device_state_are_parsed():
    from harness.cart import DeviceState, TimeSync

    replies = {"state": ["state counter=3 floor=1790000000 seq=7"], "time sync 3": ["time ok t=1790000100"]}
    cart = _cart(replies)
    assert cart.device_state() == DeviceState(3, 1790000000)
    assert cart.time_sync() == TimeSync("ok", 1790000100, "")
    replies["time sync 1"] = ["time rejected: nonce mismatch"]
    assert cart.time_sync(tries=1) == TimeSync("rejected", None, "nonce mismatch")
    replies["time sync 3"] = ["time unreachable"]
    assert cart.time_sync() == TimeSync("unreachable", None, "")


def test_a_family_without_the_commands_says_the_check_cannot_run_on_it():
    from harness.cart import CartError

    cart = _cart({}, drop=("device_state", "time_sync"))
    with pytest.raises(CartError, match="cart-x: cannot read the device state: .* no 'device_state' command "
                                        r"\(the check cannot run on this family\)"):
        cart.device_state()
    with pytest.raises(CartError, match="no 'time_sync' command"):
        cart.time_sync()


def test_clock_is_read_set_and_skewed_in_utc_and_drift_comes_from_the_configuration():
    import datetime as dt

    from harness.cart import CartError

    cart = _cart({"rtc get": ["rtc 2026-03-01T12:00:05Z"]}, drift_s=-43200)
    assert cart.clock() == dt.datetime(2026, 3, 1, 12, 0, 5, tzinfo=dt.UTC)
    assert cart.set_clock(dt.datetime(2031, 1, 2, 3, 4, 5, tzinfo=dt.UTC)).year == 2031
    assert cart.sent[-1] == "rtc set 2031-01-02T03:04:05Z"
    for move, expected in ((lambda: cart.skew_clock(3 * YEAR), 3 * YEAR), (cart.apply_drift, -43200)):
        before = time.time()
        got = move()
        assert abs(got.timestamp() - (before + expected)) <= 2.0, (got, expected)
    with pytest.raises(ValueError, match="aware datetime"):
        cart.set_clock(dt.datetime(2031, 1, 2))
    bad = _cart({"rtc get": ["rtc yesterday"]})
    with pytest.raises(CartError, match="'yesterday' is not a time"):
        bad.clock()
    stuck = _cart({})
    stuck.command = lambda key, timeout=5.0, **fmt: ["rtc 2020-01-01T00:00:00Z"]  # an RTC that does not take it
    with pytest.raises(CartError, match="rtc set 2031-01-02T03:04:05Z: the RTC reads back 2020-01-01T00:00:00Z"):
        stuck.set_clock(dt.datetime(2031, 1, 2, 3, 4, 5, tzinfo=dt.UTC))


def test_slot_status_and_slot_hash_give_the_counts_and_both_hashes_of_each_slot():
    from harness.cart import SlotHash

    head = "slot active=A booted=A pending=- tries=0 confirmed=yes boots=5 rollbacks=1"
    cart = _cart({"slot status": [head, "slot A fw=1.5.0 valid=yes", "slot B fw=- valid=no"],
                  "slot hash": [f"slot A sha256={'a' * 64} image={'c' * 64}", f"slot B sha256={'b' * 64} image=-"]})
    status = cart.slot_status()
    assert (status.boots, status.rollbacks, status.slots["A"]) == (5, 1, {"fw": "1.5.0", "valid": "yes"})
    assert cart.slot_digests() == {"A": SlotHash("a" * 64, "c" * 64), "B": SlotHash("b" * 64, None)}
    assert cart.slot_hashes() == {"A": "a" * 64, "B": "b" * 64}  # the whole regions: what "unchanged" compares


def test_a_slot_status_without_the_counts_fails_rather_than_skipping_the_check():
    """A profile whose pattern has the groups but lets a reply go without them (an older firmware): the read
    fails, naming what is missing, instead of an update's "unchanged" check quietly losing the counts."""
    from harness.cart import CartError

    cart = _cart({"slot status": ["slot active=A booted=A pending=- tries=0 confirmed=yes"]})
    spec = cart.profile.commands["slot_status"]
    lenient = spec.model_copy(update={"parse": spec.parse.replace(" boots=", "(?: boots=") + ")?"})
    cart.profile = cart.profile.model_copy(update={"commands": cart.profile.commands | {"slot_status": lenient}})
    with pytest.raises(CartError, match=r"^cart-x: slot status: no boots or rollbacks count in 'slot active=A "
                                        r"booted=A pending=- tries=0 confirmed=yes': an update's checks compare"):
        cart.slot_status()


def test_a_job_that_decided_nothing_leaves_the_device_state_as_it_was():
    """Rejected (image or CA bundle) or deferred: the security counter and the time floor as before the job.
    A family that does not report a device state (state_before None) is not judged on it."""
    from harness.cart import DeviceState

    was = DeviceState(counter=3, floor=1_800_000_000)
    same, floor_moved = DeviceState(counter=3, floor=1_800_000_000), DeviceState(counter=3, floor=1_800_000_100)
    _outcome(state_before=was, state_after=same).expect_rejected("unsigned")
    _outcome().expect_rejected("unsigned")
    with pytest.raises(OtaError, match="device state changed although the update was rejected: counter 3 -> 3, "
                                       "time floor 1800000000 -> 1800000100"):
        _outcome(state_before=was, state_after=floor_moved).expect_rejected("unsigned")
    with pytest.raises(OtaError, match="device state changed although the job was deferred"):
        _deferred(state_before=was, state_after=floor_moved).expect_deferred("time service unreachable")
    rejected = dict(status="REJECTED", outcome="rejected", details={"reason": "not a ca"}, events={},
                    trust_after=_trust().trust_before)
    _trust(**rejected, state_before=was, state_after=same).expect_rejected("not a ca")
    with pytest.raises(OtaError, match="device state changed although the CA update was rejected"):
        _trust(**rejected, state_before=was, state_after=floor_moved).expect_rejected("not a ca")
