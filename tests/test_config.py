"""Rig and cart configuration: the real files load; every kind of bad input is one clear line."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from harness.config import ConfigError, Rig, load_cart, load_profile

ROOT = Path(__file__).resolve().parent.parent


def test_virtual_rig_loads_ten_carts():
    rig = Rig.load(ROOT / "rigs/virtual.yaml")
    assert rig.is_virtual
    assert [s.cart_id for s in rig.slots] == [f"cart-{i:02d}" for i in range(1, 11)]
    dialects = {s.dialect for s in rig.spec.supplies}
    assert len(rig.spec.supplies) >= 3 and len(dialects) >= 3
    assert all(s.console_url.endswith(f"vcart-slot{s.number:02d}") for s in rig.slots)


def test_lab_example_rig_loads():
    rig = Rig.load(ROOT / "rigs/lab-example.yaml")
    assert not rig.is_virtual
    urls = [s.console_url for s in rig.slots]
    assert any(u.startswith("rfc2217://") for u in urls)
    assert any(u.startswith("/dev/serial/by-id/") for u in urls)
    res = [s.resource for s in rig.spec.supplies]
    assert any(r.startswith("USB0::") for r in res) and any(r.endswith("::INSTR") and "TCPIP" in r for r in res)


def test_fleet_spans_what_a_real_fleet_spans():
    carts = [load_cart(p) for p in sorted((ROOT / "configs/carts").glob("*.yaml"))]
    assert len(carts) == 10
    assert len({c.hardware_revision for c in carts}) >= 3
    assert len({(c.flash.page_size, c.flash.slot_size) for c in carts}) >= 2
    assert len({tuple(sorted(c.sensors)) for c in carts}) >= 5
    offsets = [c.utc_offset_hours for c in carts]
    assert min(offsets) <= -8 and max(offsets) >= 10


def test_reference_profile_loads():
    prof = load_profile(ROOT / "configs/profiles/reference.yaml")
    assert prof.pattern("banner").match("BOOT: bl=2.1.0 slot=A fw=1.4.2 cfg=cart-01 mode=normal")


def _rig_data() -> dict:
    return yaml.safe_load((ROOT / "rigs/virtual.yaml").read_text())


def _load(tmp_path: Path, data: dict) -> Rig:
    data = dict(data, configs=str(ROOT / "configs"))
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(data, sort_keys=False))
    return Rig.load(p)


def _err(tmp_path, mutate) -> str:
    data = _rig_data()
    mutate(data)
    with pytest.raises(ConfigError) as ei:
        _load(tmp_path, data)
    msg = str(ei.value)
    assert "\n" not in msg, "one line"
    assert "bad.yaml" in msg, "names the file"
    return msg


def test_missing_field_names_slot_and_field(tmp_path):
    msg = _err(tmp_path, lambda d: d["slots"][2].pop("channel"))
    assert "slot 3 (cart-03)" in msg and "channel" in msg and "missing" in msg


def test_wrong_type(tmp_path):
    msg = _err(tmp_path, lambda d: d["slots"][4].__setitem__("channel", "two"))
    assert "slot 5 (cart-05)" in msg and "channel" in msg and "integer" in msg


def test_two_slots_on_one_channel(tmp_path):
    def m(d):
        d["slots"][1]["supply"], d["slots"][1]["channel"] = d["slots"][0]["supply"], d["slots"][0]["channel"]

    msg = _err(tmp_path, m)
    assert "slot 2 (cart-02)" in msg and "channel" in msg and "already powers slot 1" in msg


def test_unknown_dialect(tmp_path):
    msg = _err(tmp_path, lambda d: d["supplies"][1].__setitem__("dialect", "hp-6632b"))
    assert "supply psu-b" in msg and "dialect" in msg and "hp-6632b" in msg and "keysight-e36312a" in msg


def test_channel_beyond_supply(tmp_path):
    msg = _err(tmp_path, lambda d: d["slots"][8].__setitem__("channel", 7))
    assert "slot 9 (cart-09)" in msg and "channel" in msg


def test_unknown_cart_config(tmp_path):
    msg = _err(tmp_path, lambda d: d["slots"][0].__setitem__("cart", "cart-99"))
    assert "slot 1 (cart-99)" in msg and "cart" in msg


def test_bad_resource_string(tmp_path):
    msg = _err(tmp_path, lambda d: d["supplies"][0].__setitem__("resource", "10.0.0.5:5025"))
    assert "supply psu-a" in msg and "resource" in msg


def test_unknown_field(tmp_path):
    msg = _err(tmp_path, lambda d: d["slots"][3].__setitem__("chanel", 1))
    assert "slot 4 (cart-04)" in msg and "chanel" in msg and "unknown field" in msg


def test_console_path_that_does_not_exist(tmp_path):
    data = _rig_data()
    data["slots"][6]["console"] = "/dev/serial/by-id/usb-FTDI-nothing-here"
    rig = _load(tmp_path, data)
    rig.slots = [s for s in rig.slots if s.number == 7]
    with pytest.raises(ConfigError) as ei:
        rig.preflight()
    msg = str(ei.value)
    assert "slot 7 (cart-07)" in msg and "console" in msg and "does not exist" in msg


def test_bad_cart_file_names_the_cart_file(tmp_path):
    src = yaml.safe_load((ROOT / "configs/carts/cart-01.yaml").read_text())
    src["flash"]["slot_size"] = 1000
    p = tmp_path / "cart-01.yaml"
    p.write_text(yaml.safe_dump(src))
    with pytest.raises(ConfigError) as ei:
        load_cart(p)
    assert "cart-01.yaml" in str(ei.value) and "flash" in str(ei.value) and "multiple" in str(ei.value)


def test_invalid_yaml(tmp_path):
    p = tmp_path / "broken.yaml"
    p.write_text("name: x\nslots: [\n")
    with pytest.raises(ConfigError) as ei:
        Rig.load(p)
    assert "broken.yaml" in str(ei.value) and "YAML" in str(ei.value)


def test_selection_by_id_and_tag():
    rig = Rig.load(ROOT / "rigs/virtual.yaml")
    assert [s.cart_id for s in rig.select(["cart-03"])] == ["cart-03"]
    assert {s.cart_id for s in rig.select(tags=["rev-d"])} == {"cart-06", "cart-07", "cart-08"}
    with pytest.raises(ConfigError):
        rig.select(["cart-42"])
