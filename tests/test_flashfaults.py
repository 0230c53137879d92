"""harness.flashfaults: the harness's client of the rack's control interface, against a real rack over
real HTTP; its page arithmetic against the rack's own layout; the `expect_failed_writing` outcome check;
the `flash_faults` fixture on a rig that cannot inject flash faults."""

from __future__ import annotations

import json
import os
import re

import pytest
import yaml

from conftest import ROOT, free_ports, write_rig
from harness.cart import Bench, SlotStatus
from harness.config import Rig, load_cart
from harness.flashfaults import BitFlip, FlashFaultError, FlashFaults, FlashLayout, RackControl
from harness.ota import OtaError, UpdateOutcome
from harness.rackctl import start_rack, stop_rack
from vrack.flash import Layout

CARTS = sorted((ROOT / "configs" / "carts").glob("cart-*.yaml"))


# --- the layout, re-derived from docs/flash-layout.md, agrees with the rack's ----------------------


@pytest.mark.parametrize("path", CARTS, ids=[p.stem for p in CARTS])
def test_layout_agrees_with_the_rack_for_every_cart(path):
    geo = load_cart(path).flash
    ours, racks = FlashLayout.of(geo), Layout(geo.page_size, geo.slot_size)
    assert ours.page_count == racks.page_count
    assert ours.page_count * geo.page_size == 10 * geo.page_size + 2 * geo.slot_size  # the flash file's size
    for slot in "AB":
        assert ours.slot_first_page(slot) == racks.slot_first_page(slot)
        assert ours.slot_page(slot, ours.slot_pages - 1) == racks.slot_first_page(slot) + racks.slot_pages - 1
    assert ours.trust_first_page == racks.trust_first_page
    assert ours.settings_first_page == racks.settings_first_page
    assert ours.state_first_page == racks.state_first_page


def test_pages_of_a_slot_and_what_a_page_is():
    lay = FlashLayout(2048, 1048576)  # cart-06: 512 pages a slot, 1034 in all
    assert (lay.slot_page("A", 0), lay.slot_page("B", 0), lay.slot_page("B", 511)) == (2, 514, 1025)
    assert lay.pages_for(192 * 1024) == 96 and lay.pages_for(192 * 1024 + 1) == 97
    assert [lay.region_of(p) for p in (1, 40, 600, 1027, 1031, 1032, 1033, 1034)] == [
        "boot control copy 1", "page 38 of slot A", "page 86 of slot B", "page 1 of the trust store",
        "page 1 of the fleet settings", "page 0 of the device state", "page 1 of the device state",
        "outside the device (pages 0..1033)"]
    with pytest.raises(ValueError, match=r"^page 512 of slot B: a slot has pages 0\.\.511$"):
        lay.slot_page("B", 512)
    with pytest.raises(ValueError, match=r"page -1 of slot A"):
        lay.slot_page("A", -1)
    with pytest.raises(ValueError, match=r"slot 'C': the slots are A and B"):
        lay.slot_page("C", 0)


def test_fault_document_roundtrip_and_malformed_answers():
    f = FlashFaults((12,), (), (BitFlip(3, 7, 128),))
    assert FlashFaults.from_json(f.to_json()) == f and f and not FlashFaults()
    assert FlashFaults.from_json({}) == FlashFaults()
    for bad in ([], {"stuck": []}, {"erase_fail": ["1"]}, {"bitflip": [{"page": 1}]}, {"bitflip": 3}):
        with pytest.raises(ValueError):
            FlashFaults.from_json(bad)


# --- against a real rack -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rack(tmp_path_factory):
    """A two-slot rack: slot 1 cart-01 (4 KiB pages), slot 2 cart-06 (2 KiB pages)."""
    tmp = tmp_path_factory.mktemp("flashfaults")
    rig = Rig.load(write_rig(tmp, ["cart-01", "cart-06"]))
    pid = start_rack(rig, owner_pid=os.getpid())
    bench = Bench(rig, tmp / "consoles")
    try:
        yield rig, bench
    finally:
        bench.close()
        stop_rack(pid)


def _on_disk(rig, slot: int) -> dict | None:
    path = rig.run_dir / "faults" / f"slot{slot:02d}.json"
    return json.loads(path.read_text()) if path.exists() else None


def test_set_get_clear_through_the_rack(rack):
    rig, bench = rack
    control = RackControl.for_rig(rig)
    assert control is not None and re.fullmatch(r"http://127\.0\.0\.1:\d+", control.url)
    faults = control.cart(bench.cart("cart-06"))
    assert faults.slot == 2 and faults.layout == FlashLayout(2048, 1048576)
    assert faults.get() == FlashFaults()
    b40 = faults.page("B", 40)
    now = faults.set(erase_fail=[b40, faults.page("B", 3)], bitflip=[BitFlip(b40, offset=9, mask=0x80)])
    assert now == FlashFaults((517, 554), (), (BitFlip(554, 9, 0x80),))  # the rack sorts the pages
    assert faults.get() == now
    assert _on_disk(rig, 2) == now.to_json(), "the rack wrote what it answered"
    assert _on_disk(rig, 1) is None, "another cart's faults are untouched"
    assert faults.set(program_fail=[faults.page("A", 0)]) == FlashFaults((), (2,), ()), "a set replaces"
    assert faults.clear() == FlashFaults() and faults.get() == FlashFaults()
    assert _on_disk(rig, 2) is None


def test_refusals_name_the_slot_and_give_the_racks_reason(rack):
    rig, bench = rack
    control = RackControl.for_rig(rig)
    faults = control.cart(bench.cart("cart-06"))
    faults.set(erase_fail=[600])
    with pytest.raises(FlashFaultError) as exc:
        faults.set(erase_fail=[1034])
    assert str(exc.value) == (f"rack control {control.url}: slot 2 (cart-06): setting flash faults refused "
                              f"(HTTP 400): erase_fail[0]: page 1034 is outside the device (pages 0..1033)")
    with pytest.raises(FlashFaultError, match=r"slot 2 \(cart-06\): .* \(HTTP 400\): bitflip\[0\]\.mask: "):
        faults.set(bitflip=[BitFlip(600, offset=0, mask=0)])
    assert faults.get() == FlashFaults((600,)), "a refusal changes nothing"
    with pytest.raises(FlashFaultError, match=r"^rack control \S+: slot 9: reading flash faults refused \(HTTP 404\): "
                                              r"no slot 9: /slots/<n>/flash-faults, slots 1, 2$"):
        control.get(9)
    faults.clear()


def test_the_inactive_slot_is_asked_of_the_cart_and_its_pages_are_the_ones_that_flip(rack):
    """A bit flip on page 40 of the inactive slot changes that slot's hash as the firmware reads it,
    and nothing else: the translation hits the slot it names. Cleared, the hash is back."""
    rig, bench = rack
    cart = bench.cart("cart-01")
    try:
        running = cart.power_on().slot
        faults = RackControl.for_rig(rig).cart(cart)
        clean = cart.slot_hashes()
        inactive = faults.inactive_slot()
        assert inactive != running and inactive in "AB"
        faults.set(bitflip=[BitFlip(faults.inactive_page(40), offset=100, mask=0x04)])
        flipped = cart.slot_hashes()
        assert flipped[inactive] != clean[inactive] and flipped[running] == clean[running]
        faults.set(bitflip=[BitFlip(faults.page(running, 40), offset=100, mask=0x04)])
        flipped = cart.slot_hashes()
        assert flipped[running] != clean[running] and flipped[inactive] == clean[inactive]
        assert faults.inactive_page(40, running=running) == faults.page(inactive, 40)
        faults.clear()
        assert cart.slot_hashes() == clean
    finally:
        cart.power_off()


def test_a_rack_that_is_gone_is_one_line(tmp_path):
    rig = Rig.load(write_rig(tmp_path, ["cart-02"]))
    pid = start_rack(rig, owner_pid=os.getpid())
    try:
        control = RackControl.for_rig(rig, timeout=5)
    finally:
        stop_rack(pid)
    with pytest.raises(FlashFaultError) as exc:
        control.put(1, FlashFaults((5,)), label="cart-02")
    msg = str(exc.value)
    assert msg.startswith(f"rack control {control.url}: slot 1 (cart-02): setting flash faults: the rack's control "
                          "interface cannot be reached: ") and "\n" not in msg
    with pytest.raises(FlashFaultError, match=r"no live rack in .*: its control interface cannot be reached"):
        RackControl.for_rig(rig)


def test_a_lab_rig_has_no_control_interface():
    assert RackControl.for_rig(Rig.load(ROOT / "rigs" / "lab-example.yaml")) is None
    with pytest.raises(FlashFaultError, match="not an http://host:port URL"):
        RackControl("file:///etc/passwd")


# --- the outcome check of a flash fault -----------------------------------------------------------


def _status(pending=None, boots=5, rollbacks=0) -> SlotStatus:
    return SlotStatus("A", "A", pending, 0, True, {"A": {"fw": "1.5.0"}, "B": {"fw": "-"}}, boots, rollbacks)


def _failed(**kw) -> UpdateOutcome:
    base = dict(cart="cart-x", job_id="j1", target_version="1.5.1", status="FAILED",
                details={"reason": "erase failed: page 140"}, outcome="failed", before=_status(), after=_status(),
                hashes_before={"A": "a" * 64, "B": "b" * 64}, hashes_after={"A": "a" * 64, "B": "c" * 64},
                boots=[], rollback_metric=0)
    base.update(kw)
    return UpdateOutcome(**base)


def test_failed_writing_lets_the_inactive_slot_change_and_nothing_else():
    _failed().expect_failed_writing("erase failed: page 140")
    _failed(hashes_after={"A": "a" * 64, "B": "b" * 64}).expect_failed_writing("erase failed: *")
    with pytest.raises(OtaError, match=r"^cart-x: the running slot A was written: its sha256 went aaaa"):
        _failed(hashes_after={"A": "d" * 64, "B": "c" * 64}).expect_failed_writing("erase failed: page 140")
    console = "EV: erase slot=B page=0/96 t=1\nslot active=A booted=A\nEV: erase slot=A page=0/96 t=2\n"
    with pytest.raises(OtaError, match=r"first line naming slot A: 'EV: erase slot=A page=0/96 t=2'\n"):
        _failed(hashes_after={"A": "d" * 64, "B": "c" * 64}, console=console).expect_failed_writing("erase failed: *")
    with pytest.raises(OtaError, match=r"failed for 'erase failed: page 140', expected 'erase failed: page 141'"):
        _failed().expect_failed_writing("erase failed: page 141")
    with pytest.raises(OtaError, match="expected the update to be failed"):
        _failed(outcome="confirmed", status="SUCCEEDED").expect_failed_writing("erase failed: page 140")
    with pytest.raises(OtaError, match="boot control changed"):
        _failed(after=_status(pending="B")).expect_failed_writing("erase failed: page 140")
    with pytest.raises(OtaError, match="rebooted"):
        _failed(after=_status(boots=6)).expect_failed_writing("erase failed: page 140")
    with pytest.raises(OtaError, match="rose"):
        _failed(rollback_metric=1).expect_failed_writing("erase failed: page 140")


# --- the fixture on a rig that cannot inject flash faults -----------------------------------------


def test_fixture_skips_on_a_rig_without_a_control_interface(pytester, tmp_path):
    """A physical rig: the test is skipped, and the reason says the rig cannot inject flash faults."""
    data = yaml.safe_load(write_rig(tmp_path, ["cart-03"]).read_text())
    data.pop("virtual")
    data["kind"] = "physical"
    data["slots"][0]["console"] = "loop://"
    data["supplies"][0]["resource"] = f"TCPIP0::127.0.0.1::{free_ports(1)[0]}::SOCKET"
    rig = pytester.path / "lab.yaml"
    rig.write_text(yaml.safe_dump(data, sort_keys=False))
    pytester.makepyfile(test_faults="""
def test_needs_faults(cart, flash_faults):
    raise AssertionError("must not run")
""")
    res = pytester.runpytest_subprocess("--rig", str(rig), "--hil-reports", str(pytester.path / "reports"), "-rs",
                                        "-p", "no:cacheprovider")
    res.assert_outcomes(skipped=1)
    res.stdout.fnmatch_lines([f"*{rig}: rig test-rig cannot inject flash faults (no rack control interface)*"])

