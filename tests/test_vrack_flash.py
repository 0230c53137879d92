"""Flash file, layout, redundant boot control block, trust store (two copies), device state (two
copies), factory provisioning."""

from __future__ import annotations

import json
import os
import random
import re
import time
from dataclasses import replace

import pytest

from vrack import factory
from vrack.cartconfig import FlashGeometry
from vrack.flash import (
    BCB_SIZE,
    STATE_IDLE,
    STATE_SIZE,
    STATE_WRITING,
    Bcb,
    BootControl,
    DeviceState,
    Flash,
    FlashError,
    FlashFault,
    Layout,
    OpenWrite,
    StateByte,
    TrustError,
    TrustStore,
    decode_bcb,
    decode_state,
    decode_trust,
    decode_trust_copy,
    encode_bcb,
    encode_state,
    encode_trust,
    parse_faults,
    read_open_write,
    read_state,
    read_trust,
    tear_open_write,
    tear_point,
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
    assert [lay.trust_copy_offset(c) for c in (0, 1)] == [lay.trust_offset, lay.trust_offset + 2 * page]
    assert lay.trust_copy_size == 2 * page and lay.trust_copy_first_page(1) == lay.trust_first_page + 2
    assert lay.settings_offset == 6 * page + 2 * slot
    assert lay.state_offset == 8 * page + 2 * slot and lay.state_size == 2 * page
    assert lay.state_first_page == lay.settings_first_page + 2 and lay.page_count == lay.state_first_page + 2
    assert lay.total_size == 10 * page + 2 * slot


def test_new_flash_is_erased_and_sized(flash):
    assert flash.path.stat().st_size == 10 * 4096 + 2 * 524288
    assert flash.read(0, flash.layout.total_size) == b"\xff" * flash.layout.total_size


def test_wrong_geometry_is_refused(tmp_path):
    Flash.create(tmp_path / "f.bin", GEOMETRY)
    with pytest.raises(FlashError, match="needs"):
        Flash(tmp_path / "f.bin", replace(GEOMETRY, page_size=2048))


def test_a_flash_file_of_the_layout_before_the_device_state_is_refused_clearly(tmp_path):
    path = tmp_path / "old.bin"
    path.write_bytes(b"\xff" * (8 * 4096 + 2 * 524288))
    with pytest.raises(FlashError) as exc:
        Flash(path, GEOMETRY)
    assert str(exc.value) == (f"{path}: 1081344 bytes, but page_size=4096 slot_size=524288 needs 1089536 (the "
                              "layout before the device-state region: provision it again)")


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
        raw = (tmp_path / "state").read_bytes()
        seen.append((raw[:1], read_open_write(raw), seconds))
        real_sleep(seconds)

    monkeypatch.setattr(time, "sleep", sleep)
    with Flash(tmp_path / "flash.bin", GEOMETRY, time_scale=0.5, state=state) as f:
        f.write_page(3, b"x")
        f.erase_page(4)
    page = b"x" + b"\xff" * 4095
    assert seen == [(bytes([STATE_WRITING]), OpenWrite(b"P", 3, page), pytest.approx(0.00125)),
                    (bytes([STATE_WRITING]), OpenWrite(b"E", 4, b"\xff" * 4096), pytest.approx(0.00125))]
    raw = (tmp_path / "state").read_bytes()
    assert raw[:1] == bytes([STATE_IDLE]) and read_open_write(raw) is None  # the record is closed
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


def test_bcb_decoder_never_raises_nor_takes_a_damaged_copy():
    rng = random.Random(7)
    raw = encode_bcb(Bcb(seq=3))
    for _ in range(2000):
        data = bytearray(raw)
        data[rng.randrange(len(data))] = rng.randrange(256)
        damaged = bytes(data[: rng.randrange(len(data) + 1)])
        # a changed byte (CRC-32 catches every one) or a cut copy is no boot control; an untouched one is itself
        assert decode_bcb(damaged) == (Bcb(seq=3) if damaged == raw else None), damaged.hex()
        noise = rng.randbytes(rng.randrange(100))
        assert decode_bcb(noise) is None, noise.hex()


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


def test_trust_copies_carry_seq_and_retirement():
    cas = [{"name": "lab-root-2025", "pem": "P1", "until": 1790000000}, {"name": "lab-root-2026", "pem": "P2"}]
    blob = encode_trust(cas, seq=7)
    assert json.loads(blob[16:]) == {"cas": cas, "seq": 7}
    assert decode_trust_copy(blob) == (cas, 7) and decode_trust(blob) == cas
    assert factory.trust_blob(cas[1:]) == encode_trust(cas[1:], seq=0)  # the factory's store: seq 0
    old = b"TRST" + (1).to_bytes(2, "little") + (1).to_bytes(2, "little")  # a store written before seq existed
    body = b'{"cas":[{"name":"a","pem":""}]}'
    import zlib
    old += len(body).to_bytes(4, "little") + zlib.crc32(body).to_bytes(4, "little") + body
    assert decode_trust_copy(old) == ([{"name": "a", "pem": ""}], 0)
    for bad in ({"cas": [{"name": "a", "pem": "", "until": -1}], "seq": 0},
                {"cas": [{"name": "a", "pem": "", "until": True}], "seq": 0},
                {"cas": [{"name": "a", "pem": ""}], "seq": "1"}):
        raw = json.dumps(bad, sort_keys=True, separators=(",", ":")).encode()
        framed = b"TRST\x01\x00\x01\x00" + len(raw).to_bytes(4, "little") + zlib.crc32(raw).to_bytes(4, "little") + raw
        with pytest.raises(TrustError, match="bad body"):
            decode_trust_copy(framed)
    with pytest.raises(TrustError, match="until"):
        encode_trust([{"name": "a", "pem": "", "until": -5}])


def region(copy0: bytes | None, copy1: bytes | None, page: int = 2048) -> bytes:
    """A trust-store region of two copies (None: erased)."""
    def pad(b):
        return (b or b"").ljust(2 * page, b"\xff")
    return pad(copy0) + pad(copy1)


def test_the_trust_store_is_the_valid_copy_with_the_highest_seq():
    a, b = [{"name": "a", "pem": ""}], [{"name": "b", "pem": ""}]
    assert read_trust(region(encode_trust(a, 0), None), 2048) == TrustStore(a, 0, 0)
    assert read_trust(region(encode_trust(a, 3), encode_trust(b, 4)), 2048) == TrustStore(b, 4, 1)
    assert read_trust(region(encode_trust(a, 5), encode_trust(b, 4)), 2048) == TrustStore(a, 5, 0)
    assert read_trust(region(encode_trust(a, 4), encode_trust(b, 4)), 2048) == TrustStore(a, 4, 0)  # tie: copy 0
    torn = encode_trust(b, 9)[:-2] + b"\x00\x00"
    assert read_trust(region(encode_trust(a, 2), torn), 2048) == TrustStore(a, 2, 0)
    assert read_trust(region(None, encode_trust(b, 1)), 2048) == TrustStore(b, 1, 1)
    with pytest.raises(TrustError, match="^erased$"):
        read_trust(region(None, None), 2048)
    with pytest.raises(TrustError, match="^bad crc$"):  # neither valid: copy 0's reason
        read_trust(region(encode_trust(a, 1)[:-1] + b"\x00", None), 2048)


def test_device_state_records_and_the_winner():
    raw = encode_state(3, 7, 1790000000)
    assert len(raw) == STATE_SIZE == 32 and raw[:4] == b"CDST"
    assert decode_state(raw + b"\xff" * 100) == DeviceState(7, 1790000000, 3)
    assert decode_state(b"\xff" * 32) is None and decode_state(raw[:31]) is None
    assert decode_state(raw[:-1] + bytes([raw[-1] ^ 1])) is None
    page = 4096

    def reg(c0, c1):
        return (c0 or b"").ljust(page, b"\xff") + (c1 or b"").ljust(page, b"\xff")

    assert read_state(reg(None, None), page) == DeviceState(0, 0, 0, None)
    assert read_state(reg(encode_state(1, 1, 10), None), page) == DeviceState(1, 10, 1, 0)
    assert read_state(reg(encode_state(1, 1, 10), encode_state(2, 2, 20)), page) == DeviceState(2, 20, 2, 1)
    assert read_state(reg(encode_state(3, 1, 30), encode_state(2, 2, 20)), page) == DeviceState(1, 30, 3, 0)
    assert read_state(reg(encode_state(1, 1, 10), encode_state(2, 2, 20)[:20]), page) == DeviceState(1, 10, 1, 0)
    rng = random.Random(4)
    for _ in range(2000):  # never raises on damage
        data = bytearray(raw)
        data[rng.randrange(32)] = rng.randrange(256)
        decode_state(bytes(data[:rng.randrange(33)]))


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
        assert read_trust(trust_store, 4096) == TrustStore([{"name": "lab-root-2025", "pem": ""}], 0, 0)
        assert trust_store[2 * 4096:] == b"\xff" * 8192, "copy 1 erased"
        assert f.read(f.layout.settings_offset, 2 * 4096) == b"\xff" * 8192
        assert f.read(f.layout.state_offset, f.layout.state_size) == b"\xff" * 8192, "device state erased"
    with pytest.raises(ValueError, match="not bootable"):
        factory.provision_flash(tmp_path / "bad.bin", CART, img[:100], trust)
    with pytest.raises(ValueError, match=r"^cart-t1: trust store of 8193 bytes does not fit one trust-store copy "
                                         r"\(2 pages of 4096 bytes = 8192\)$"):
        factory.provision_flash(tmp_path / "bad.bin", CART, img, b"x" * 8193)


def test_trust_blob_must_fit_one_copy_of_the_carts_page_size():
    big = [{"name": f"r{i}", "pem": "x" * 1000} for i in range(4)]
    assert len(factory.trust_blob(big, page_size=4096)) < 8192
    with pytest.raises(ValueError, match=r"^trust store of \d+ bytes does not fit one trust-store copy \(2 pages "
                                         r"of 2048 bytes = 4096\)$"):
        factory.trust_blob(big, page_size=2048)


def test_write_factory(tmp_path):
    written = factory.write_factory(tmp_path / "factory", ["1.4.2", "1.5.0"], [CART])
    assert sorted(p.name for p in (tmp_path / "factory").iterdir()) == [
        "fw-1.4.2.img", "fw-1.5.0.img", "trust-cart-t1.bin"]
    assert check_image(written["images"]["1.5.0"].read_bytes())[0].version == "1.5.0"
    assert decode_trust(written["trust"]["cart-t1"].read_bytes()) == [
        {"name": "lab-root-2025", "pem": ""}, {"name": "lab-root-2026", "pem": ""}]


# --- torn pages: the open-operation record and the rack's tear ---------------------------------

SMALL = FlashGeometry(page_size=2048, slot_size=4 * 2048, page_program_ms=1.0)


class PowerCut(BaseException):
    """The power went: raised from inside the page-program time."""


class FixedCut(random.Random):
    """An RNG whose tear point is chosen by the test (the garbage stays random)."""

    def __init__(self, cut: int):
        super().__init__(cut)
        self.cut = cut

    def randrange(self, *args):
        return self.cut


def cut_while_programming(monkeypatch, state_path, op) -> bytes:
    """Run `op` and cut the power while its page is being programmed: returns the state file as a
    SIGKILL would leave it (the page itself is not written yet: the kill lands in the program time)."""
    snap = {}

    def sleep(_seconds):
        snap["state"] = state_path.read_bytes()
        raise PowerCut

    with monkeypatch.context() as m:
        m.setattr(time, "sleep", sleep)
        with pytest.raises(PowerCut):
            op()
    return snap["state"]


@pytest.mark.parametrize("next_copy", [0, 1])
def test_bcb_write_torn_at_every_point_reads_the_previous_state(tmp_path, monkeypatch, next_copy):
    path, state_path = tmp_path / "flash.bin", tmp_path / "state"
    Flash.create(path, SMALL)
    state = StateByte(state_path)
    with Flash(path, SMALL, time_scale=1, state=state) as f:
        ctl = BootControl(f)
        previous = ctl.write(Bcb(active="A"), "boot")  # copy 0
        if next_copy == 0:
            previous = ctl.write(replace(previous, boot_count=7), "boot")  # copy 1: the next goes to copy 0
        wanted = replace(previous, pending="B", tries=1)
        cut_state = cut_while_programming(monkeypatch, state_path, lambda: ctl.write(wanted, "set-pending"))
    new = replace(wanted, seq=previous.seq + 1)
    op = read_open_write(cut_state)
    assert op == OpenWrite(b"P", next_copy, encode_bcb(new) + b"\xff" * (2048 - BCB_SIZE))
    flash_before = path.read_bytes()
    outcomes = {}
    for cut in range(2048):
        path.write_bytes(flash_before)
        state_path.write_bytes(cut_state)
        assert tear_open_write(state_path, path, 2048, FixedCut(cut)) == (next_copy, cut)
        assert read_open_write(state_path.read_bytes()) is None  # the record is closed
        with Flash(path, SMALL, time_scale=0) as f:
            torn = f.read_page(next_copy)
            assert torn[:cut] == op.data[:cut] and torn != op.data
            got = BootControl(f).read_valid()
        assert got == (new if decode_bcb(torn) == new else previous), f"cut at byte {cut}"
        outcomes[cut] = got.seq
    assert all(outcomes[c] == previous.seq for c in range(BCB_SIZE))  # the record was cut: the old state
    assert all(outcomes[c] == new.seq for c in range(BCB_SIZE, 2048))  # the record made it: the new one


def test_tear_point_lands_within_the_data_programmed(tmp_path):
    rng = random.Random(5)
    bcb_page = encode_bcb(Bcb(seq=3)) + b"\xff" * 4032
    assert {tear_point(bcb_page, rng) for _ in range(2000)} == set(range(BCB_SIZE + 1))
    erase = b"\xff" * 4096
    assert max(tear_point(erase, rng) for _ in range(2000)) > 3000


def test_a_torn_slot_page_fails_verification_and_the_other_slot_stays_valid(tmp_path, monkeypatch):
    img = factory.build_image("1.4.2")
    path = factory.provision_flash(tmp_path / "flash.bin", CART, img, factory.trust_blob([]))
    new = factory.build_image("1.5.0")
    state_path = tmp_path / "state"
    with Flash(path, GEOMETRY, time_scale=0, state=StateByte(state_path)) as f:
        first = f.layout.slot_first_page("B")
        for i in range(3):
            f.write_page(first + i, new[i * 4096:(i + 1) * 4096])
        f.page_delay_s = 0.001
        cut_state = cut_while_programming(monkeypatch, state_path,
                                          lambda: f.write_page(first + 3, new[3 * 4096:4 * 4096]))
    state_path.write_bytes(cut_state)
    page, cut = tear_open_write(state_path, path, 4096, random.Random(11))
    assert page == first + 3
    with Flash(path, GEOMETRY, time_scale=0) as f:
        torn = f.read_page(page)
        assert torn[:cut] == new[3 * 4096:3 * 4096 + cut] and torn != new[3 * 4096:4 * 4096]
        assert check_image(f.read_slot("B"))[0] is None
        assert check_image(f.read_slot("A"))[0].version == "1.4.2"


def test_no_open_record_no_tear(tmp_path):
    path, state_path = tmp_path / "flash.bin", tmp_path / "state"
    Flash.create(path, SMALL)
    state = StateByte(state_path)
    with Flash(path, SMALL, time_scale=0, state=state) as f:
        f.write_page(3, b"done")
    before = path.read_bytes()
    assert tear_open_write(state_path, path, 2048, random.Random(1)) is None  # closed
    raw = bytearray(state_path.read_bytes())
    raw[1] = 1  # reopened by hand, but the record is of the finished write... with a damaged CRC:
    raw[20] ^= 0xFF
    state_path.write_bytes(bytes(raw))
    assert tear_open_write(state_path, path, 2048, random.Random(1)) is None  # a record cut short
    state_path.write_bytes(b"\x02")
    assert tear_open_write(state_path, path, 2048, random.Random(1)) is None
    assert path.read_bytes() == before


# --- flash faults ------------------------------------------------------------------------------


def set_faults(path, doc) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc))
    os.replace(tmp, path)


@pytest.fixture
def faulty(tmp_path):
    Flash.create(tmp_path / "flash.bin", GEOMETRY)
    faults = tmp_path / "faults.json"
    with Flash(tmp_path / "flash.bin", GEOMETRY, time_scale=0, faults=faults, rng=random.Random(3)) as f:
        yield f, faults


def test_erase_fail_leaves_the_page_partly_erased(faulty):
    f, faults = faulty
    old = bytes(range(256)) * 16
    f.write_page(40, old)
    set_faults(faults, {"erase_fail": [40]})
    with pytest.raises(FlashFault, match=r"^erase failed: page 40$") as exc:
        f.erase_page(40)
    assert (exc.value.kind, exc.value.page) == ("erase", 40) and isinstance(exc.value, FlashError)
    page = f.read_page(40)
    cut = len(page) - len(page.lstrip(b"\xff"))
    assert 0 < cut < 4096 and page[cut:] == old[cut:]  # erased up to a point, the old data beyond
    with pytest.raises(FlashFault) as exc:
        f.write_page(40, b"new")  # an erase-and-program: its erase fails, nothing is programmed
    assert exc.value.kind == "erase"
    f.write_page(41, b"other pages work")
    assert f.read_page(41).startswith(b"other pages work")
    os.unlink(faults)
    f.erase_page(40)
    assert f.read_page(40) == b"\xff" * 4096


def test_program_fail_leaves_the_page_partly_programmed(faulty):
    f, faults = faulty
    set_faults(faults, {"program_fail": [7]})
    data = bytes(range(1, 256)) * 16
    with pytest.raises(FlashFault, match=r"^program failed: page 7$") as exc:
        f.write_page(7, data[:4096])
    assert exc.value.kind == "program"
    page = f.read_page(7)
    cut = len(page.rstrip(b"\xff"))
    assert 0 < cut < 4096 and page[:cut] == data[:cut]
    f.erase_page(7)  # erasing works on a page that fails to program
    assert f.read_page(7) == b"\xff" * 4096


def test_bitflip_on_read_only(faulty, tmp_path):
    f, faults = faulty
    first = f.layout.slot_first_page("B")
    f.write_page(first + 1, b"\x00" * 4096)
    set_faults(faults, {"bitflip": [{"page": first + 1, "offset": 5, "mask": 0x81},
                                    {"page": first + 1, "offset": 4095, "mask": 1}]})
    assert f.read_page(first + 1)[:8] == b"\x00" * 5 + b"\x81\x00\x00"
    assert f.read(f.layout.slot_offset("B") + 4096 + 4095, 2) == b"\x01\xff"
    slot = f.read_slot("B")
    assert slot[4096 + 5] == 0x81 and slot[2 * 4096 - 1] == 1 and slot.count(b"\x81") == 1
    assert f.read(0, 10) == b"\xff" * 10
    raw = (tmp_path / "flash.bin").read_bytes()  # the stored bytes are untouched
    assert raw[(first + 1) * 4096:(first + 2) * 4096] == b"\x00" * 4096
    set_faults(faults, {})
    assert f.read_page(first + 1) == b"\x00" * 4096


def test_a_bad_fault_file_is_ignored(faulty, capfd):
    f, faults = faulty
    faults.write_text("{not json")
    f.write_page(3, b"ok")
    set_faults(faults, {"erase_fail": [10 ** 9]})
    f.write_page(3, b"ok")
    assert "ignored" in capfd.readouterr().err


def test_fault_check_costs_one_stat(faulty):
    f, faults = faulty
    set_faults(faults, {"bitflip": [{"page": 2, "offset": 0, "mask": 1}]})
    f.read(0, 1)
    n = 20000
    start = time.perf_counter()
    for _ in range(n):
        f._check_faults()
    per_call = (time.perf_counter() - start) / n
    assert per_call < 50e-6, f"{per_call * 1e6:.1f} µs per check"


@pytest.mark.parametrize("doc,reason", [
    ([], r"expected a JSON object"),
    ({"erase_fail": [1], "bogus": []}, r"unknown key 'bogus'"),
    ({"erase_fail": 3}, r"erase_fail: expected a list"),
    ({"erase_fail": [300]}, r"erase_fail\[0\]: page 300 is outside the device \(pages 0\.\.265\)"),
    ({"program_fail": [-1]}, r"outside the device"),
    ({"program_fail": [True]}, r"expected a page index \(integer\), got bool"),
    ({"program_fail": [1.0]}, r"got float"),
    ({"erase_fail": [2, 2]}, r"page 2 is listed twice"),
    ({"bitflip": [{"page": 2, "offset": 0}]}, r"exactly page, offset, mask"),
    ({"bitflip": [{"page": 2, "offset": 4096, "mask": 1}]}, r"offset: expected an integer 0\.\.4095"),
    ({"bitflip": [{"page": 2, "offset": 0, "mask": 0}]}, r"mask: expected an integer 1\.\.255"),
    ({"bitflip": [{"page": 2, "offset": 0, "mask": 256}]}, r"mask"),
    ({"bitflip": [{"page": 266, "offset": 0, "mask": 1}]}, r"bitflip\[0\]\.page: page 266 is outside"),
    ({"bitflip": [{"page": 2, "offset": 9, "mask": 1}, {"page": 2, "offset": 9, "mask": 4}]},
     r"the same page and offset is listed twice"),
    ({"erase_fail": list(range(264)), "program_fail": list(range(264)),
      "bitflip": [{"page": p, "offset": o, "mask": 1} for p in range(5) for o in range(100)]},
     r"1028 entries: at most 1024"),
])
def test_fault_documents_are_validated(doc, reason):
    with pytest.raises(ValueError, match=reason):
        parse_faults(doc, Layout(4096, 524288).page_count, 4096)


def test_fault_document_roundtrip():
    doc = {"erase_fail": [9, 3], "program_fail": [], "bitflip": [{"page": 4, "offset": 1, "mask": 2}]}
    faults = parse_faults(doc, 264, 4096)
    assert faults.to_json() == {"erase_fail": [3, 9], "program_fail": [],
                                "bitflip": [{"page": 4, "offset": 1, "mask": 2}]}
    assert parse_faults({}, 264, 4096).to_json() == {"erase_fail": [], "program_fail": [], "bitflip": []}


def test_bcb_write_that_fails_goes_to_the_other_copy(faulty):
    f, faults = faulty
    lines = []
    ctl = BootControl(f, say=lines.append)
    first = ctl.write(Bcb(active="A"), "boot")  # copy 0
    set_faults(faults, {"program_fail": [1]})
    second = ctl.write(replace(first, pending="B", tries=1), "set-pending")
    assert [re.sub(r" t=\d+$", "", line) for line in lines] == [
        "EV: bcb-write copy=0 seq=1 why=boot", "EV: bcb-write copy=1 seq=2 why=set-pending",
        "BL: bcb write failed: page 1", "EV: bcb-write copy=0 seq=2 why=set-pending"]
    assert ctl.read() == second and ctl.copies()[0] == second
    set_faults(faults, {"program_fail": [0], "erase_fail": [1]})
    with pytest.raises(FlashFault):
        ctl.write(replace(second, tries=0), "boot")
    assert [re.sub(r" t=\d+$", "", line) for line in lines[4:]] == [
        "EV: bcb-write copy=1 seq=3 why=boot", "BL: bcb write failed: page 1",
        "EV: bcb-write copy=0 seq=3 why=boot", "BL: bcb write failed: page 0"]
