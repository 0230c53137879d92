"""Flash faults, on every cart: the inactive slot will not erase, a page will not program, the written
image reads back with flipped bits. Each update must FAIL for that exact reason, naming the page, before
boot control is touched: the running slot byte for byte what it was (`slot hash`), nothing pending (so
nothing boots from the partial slot), no reboot, no rollback counted. Once the fault is gone, the same
release goes through: the cart is not left stuck by a failed write.

A firmware that reacts by writing anywhere else than the inactive slot must fail the gate: the fault
build `write_running_on_erase_fail` goes through the very same erase-fail check, and the check catches it.

The fault goes on one page in the middle of where the image goes in the inactive slot, set through the
rack's control interface (the `flash_faults` fixture, which clears it afterwards; a rig that cannot
inject flash faults skips these tests, saying so). Two updates per case (the failed one, the one after);
versions are relative to what the cart runs when the test starts.
"""

from __future__ import annotations

import pytest

from harness.flashfaults import BitFlip
from harness.ota import OtaError, bump


def erase_fails(page: int, page_size: int) -> dict:
    return {"erase_fail": [page]}


def program_fails(page: int, page_size: int) -> dict:
    return {"program_fail": [page]}


def bits_flip(page: int, page_size: int) -> dict:
    return {"bitflip": [BitFlip(page, offset=page_size // 2, mask=0x10)]}


ERASE_FAILS = (erase_fails, "erase failed: page {page}")

# (id, the fault on a page in the middle of the image's place in the inactive slot, the reason the cart must give)
FLASH_FAULTS = [
    pytest.param(*ERASE_FAILS, id="inactive-slot-will-not-erase"),
    pytest.param(program_fails, "write failed: program failed: page {page}", id="program-fails-mid-write"),
    pytest.param(bits_flip, "write failed: readback mismatch at page {page}", id="bits-flip-in-written-image"),
]


def update_against_flash_fault(cart, ota, flash_faults, fault, reason) -> bytes:
    """Deliver the running version + 1 with `fault` on the page in the middle of where the image goes in
    the inactive slot; check it FAILED for `reason` (with that page) leaving all but that slot as it was.
    Returns the image, for delivering it again."""
    banner = cart.power_on()
    image = ota.image(bump(banner.version, patch=1))
    page = flash_faults.inactive_page(flash_faults.image_pages(image) // 2, running=banner.slot)
    flash_faults.set(**fault(page, flash_faults.layout.page_size))
    ota.update(image).expect_failed_writing(reason.format(page=page))
    return image


@pytest.mark.parametrize(("fault", "reason"), FLASH_FAULTS)
def test_flash_fault_fails_the_update_then_the_cart_recovers(cart, ota, flash_faults, fault, reason):
    image = update_against_flash_fault(cart, ota, flash_faults, fault, reason)
    flash_faults.clear()  # the part works again: the same release goes through
    ota.update(image).expect_confirmed()


@pytest.mark.hil_self_check("write_running_on_erase_fail")
def test_gate_catches_firmware_that_writes_the_running_slot_when_an_erase_fails(cart, ota, factory_reset, flash_faults,
                                                                              self_check):
    """The erase-fail check proven able to fail: the fault build reports the same FAILED reason as the
    reference, but wrote the image over the slot it runs from. Only that slot's hash tells. (`factory_reset`
    comes before `flash_faults`: the faults are cleared before the recovery erases and writes.)"""
    defect = bump(cart.power_on().version, patch=1)
    ota.update(ota.image(defect, faults={"write_running_on_erase_fail": True})).expect_confirmed()
    cart.power_off()  # the fault build now runs; the erase-fail update starts from its fresh boot
    with pytest.raises(OtaError, match=r"the running slot [AB] was written: its sha256 went ") as caught:
        update_against_flash_fault(cart, ota, flash_faults, *ERASE_FAILS)
    self_check.caught(caught.value)
