"""Flash file, layout, redundant boot control block, trust-store blob, factory provisioning."""

from __future__ import annotations

import random
import time
from dataclasses import replace

import pytest

from vrack import factory
from vrack.cartconfig import FlashGeometry
from vrack.flash import (
    BCB_SIZE,
    STATE_IDLE,
    STATE_WRITING,
    Bcb,
    BootControl,
    Flash,
    FlashError,
    Layout,
    StateByte,
    TrustError,
    decode_bcb,
    decode_trust,
    encode_bcb,
    encode_trust,
)
from vrack.image import check_image

GEOMETRY = FlashGeometry(page_size=4096, slot_size=524288, page_program_ms=2.5)
CART = {
    "id": "cart-t1", "hardware_revision": "rev-c",
    "flash": {"page_size": 4096, "slot_size": 524288, "page_program_ms": 2.5},
    "sensors": ["imu-bmi088"], "provisioned_cas": ["lab-root-2025", "lab-root-2026"],
    "firmware": {"family": "reference", "initial_version": "1.4.2"},
    "boot": {"expected_s": 1.5, "autoboot_window_s": 0.6, "mark_good_window_s": 8},
    "draw": {"booting": 0.42, "idle": 0.21, "flash_write": 0.55},
}


@pytest.fixture
def flash(tmp_path):
    Flash.create(tmp_path / "flash.bin", GEOMETRY)
    with Flash(tmp_path / "flash.bin", GEOMETRY, time_scale=0) as f:
        yield f


@pytest.mark.parametrize("page,slot", [(4096, 524288), (2048, 524288), (4096, 1048576)])
def test_layout(page, slot):
    lay = Layout(page, slot)
    assert lay.bcb_page(0) == 0 and lay.bcb_page(1) == 1
    assert lay.slot_offset("A") == 2 * page
    assert lay.slot_offset("B") == 2 * page + slot
    assert lay.trust_offset == 2 * page + 2 * slot
    assert lay.settings_offset == 6 * page + 2 * slot
    assert lay.total_size == 8 * page + 2 * slot


def test_new_flash_is_erased_and_sized(flash):
    assert flash.path.stat().st_size == 8 * 4096 + 2 * 524288
    assert flash.read(0, flash.layout.total_size) == b"\xff" * flash.layout.total_size


def test_wrong_geometry_is_refused(tmp_path):
    Flash.create(tmp_path / "f.bin", GEOMETRY)
    with pytest.raises(FlashError, match="needs"):
        Flash(tmp_path / "f.bin", replace(GEOMETRY, page_size=2048))


def test_write_page_pads_and_bounds(flash):
    flash.write_page(5, b"abc")
    assert flash.read_page(5) == b"abc" + b"\xff" * 4093
    with pytest.raises(FlashError):
        flash.write_page(flash.layout.page_count, b"")
    with pytest.raises(FlashError):
        flash.write_page(0, b"x" * 4097)
    with pytest.raises(FlashError):
        flash.read(flash.layout.total_size - 1, 2)


def test_write_page_takes_program_time_in_writing_state(tmp_path, monkeypatch):
    Flash.create(tmp_path / "flash.bin", GEOMETRY)
    state = StateByte(tmp_path / "state")
    state.set(STATE_IDLE)
    seen = []
    real_sleep = time.sleep

    def sleep(seconds):
        seen.append(((tmp_path / "state").read_bytes(), seconds))
        real_sleep(seconds)

    monkeypatch.setattr(time, "sleep", sleep)
    with Flash(tmp_path / "flash.bin", GEOMETRY, time_scale=0.5, state=state) as f:
        f.write_page(3, b"x")
    assert seen == [(bytes([STATE_WRITING]), pytest.approx(0.00125))]
    assert (tmp_path / "state").read_bytes() == bytes([STATE_IDLE])
    state.close()


def test_bcb_roundtrip_and_rejects():
    bcb = Bcb(seq=7, active="B", pending="A", tries=2, confirmed=False, boot_count=99, rollback_slot="A",
              rollback_version="1.5.0-rc.1", rollback_count=3)
    raw = encode_bcb(bcb)
    assert len(raw) == BCB_SIZE == 64
    assert decode_bcb(raw + b"\xff" * 100) == bcb
    assert decode_bcb(b"\xff" * 4096) is None
    torn = raw[:30] + b"\xff" * 34
    assert decode_bcb(torn) is None
    flipped = bytearray(raw)
    flipped[12] ^= 1
    assert decode_bcb(bytes(flipped)) is None


def test_bcb_writes_alternate_and_newest_wins(flash):
    ctl = BootControl(flash)
    assert ctl.read_valid() is None and ctl.read() == Bcb()
    first = ctl.write(Bcb(active="A"))
    assert first.seq == 1 and ctl.copies() == [first, None]
    second = ctl.write(replace(first, pending="B", tries=1))
    assert second.seq == 2 and ctl.copies() == [first, second]
    third = ctl.write(replace(second, tries=0))
    assert ctl.copies() == [third, second] and ctl.read() == third


def test_bcb_survives_a_corrupted_or_torn_copy(flash):
    ctl = BootControl(flash)
    a = ctl.write(Bcb(active="A"))
    ctl.write(replace(a, pending="B", tries=1))  # copy 1, newest
    page = bytearray(flash.read_page(1))
    page[20] ^= 0xFF
    flash.write_page(1, bytes(page))
    assert ctl.read() == a  # the older, valid copy
    c = ctl.write(replace(a, boot_count=5))  # goes to the copy that is not current: copy 1
    assert c.seq == a.seq + 1 and ctl.copies()[1] == c
    flash.write_page(0, b"\x00" * 10)  # torn write of copy 0
    assert ctl.read() == c


def test_bcb_highest_seq_wins_in_either_copy(flash):
    flash.write_page(0, encode_bcb(Bcb(seq=41, active="B")))
    flash.write_page(1, encode_bcb(Bcb(seq=40, active="A")))
    ctl = BootControl(flash)
    assert ctl.read().active == "B"
    assert ctl.write(Bcb(active="A")).seq == 42
    assert ctl.copies()[1].seq == 42 and ctl.read().active == "A"


def test_bcb_decoder_never_raises():
    rng = random.Random(7)
    raw = encode_bcb(Bcb(seq=3))
    for _ in range(2000):
        data = bytearray(raw)
        data[rng.randrange(len(data))] = rng.randrange(256)
        decode_bcb(bytes(data[: rng.randrange(len(data) + 1)]))
        decode_bcb(rng.randbytes(rng.randrange(100)))


def test_trust_blob_roundtrip_and_damage():
    cas = [{"name": "lab-root-2025", "pem": "-----BEGIN CERTIFICATE-----\n..."}, {"name": "lab-root-2026", "pem": ""}]
    blob = factory.trust_blob(cas)
    assert blob[:4] == b"TRST"
    assert decode_trust(blob + b"\xff" * 50) == cas
    with pytest.raises(TrustError, match="erased"):
        decode_trust(b"\xff" * 64)
    with pytest.raises(TrustError, match="bad crc"):
        decode_trust(blob[:-1] + bytes([blob[-1] ^ 1]))
    with pytest.raises(TrustError, match="bad size"):
        decode_trust(blob[:-3])
    rng = random.Random(3)
    for _ in range(2000):
        data = bytearray(blob)
        data[rng.randrange(len(data))] = rng.randrange(256)
        try:
            decode_trust(bytes(data[: rng.randrange(len(data) + 1)]))
        except TrustError:
            pass
    assert encode_trust(cas) == blob


def test_provision_flash(tmp_path):
    img = factory.build_image("1.4.2")
    trust = factory.trust_blob([{"name": "lab-root-2025", "pem": ""}])
    path = factory.provision_flash(tmp_path / "flash" / "slot01.bin", CART, img, trust)
    with Flash(path, GEOMETRY, time_scale=0) as f:
        parsed, reason = check_image(f.read_slot("A"))
        assert reason is None and parsed.version == "1.4.2"
        assert f.read_slot("B") == b"\xff" * GEOMETRY.slot_size
        assert BootControl(f).read() == Bcb(seq=1, active="A", confirmed=True)
        trust_store = f.read(f.layout.trust_offset, f.layout.trust_size)
        assert decode_trust(trust_store) == [{"name": "lab-root-2025", "pem": ""}]
        assert f.read(f.layout.settings_offset, 2 * 4096) == b"\xff" * 8192
    with pytest.raises(ValueError, match="not bootable"):
        factory.provision_flash(tmp_path / "bad.bin", CART, img[:100], trust)
    with pytest.raises(ValueError, match="exceeds the"):
        factory.provision_flash(tmp_path / "bad.bin", CART, img, b"x" * 20000)


def test_write_factory(tmp_path):
    written = factory.write_factory(tmp_path / "factory", ["1.4.2", "1.5.0"], [CART])
    assert sorted(p.name for p in (tmp_path / "factory").iterdir()) == [
        "fw-1.4.2.img", "fw-1.5.0.img", "trust-cart-t1.bin"]
    assert check_image(written["images"]["1.5.0"].read_bytes())[0].version == "1.5.0"
    assert decode_trust(written["trust"]["cart-t1"].read_bytes()) == [
        {"name": "lab-root-2025", "pem": ""}, {"name": "lab-root-2026", "pem": ""}]
