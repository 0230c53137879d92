"""Rig and cart configuration: the real files load; every kind of bad input is one clear line."""

from __future__ import annotations

import shutil
import subprocess
import sys
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


# ---------------------------------------------------------------- channel ratings (hil rig check)
def _refusal(tmp_path, mutate) -> tuple[Path, str]:
    data = dict(_rig_data(), configs=str(ROOT / "configs"))
    mutate(data)
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(ConfigError) as ei:
        Rig.load(p)
    return p, str(ei.value)


def _move(slot: int, supply: str, channel: int):
    def mutate(d):
        d["slots"][slot - 1]["supply"], d["slots"][slot - 1]["channel"] = supply, channel
    return mutate


def test_cart_voltage_above_the_channel_rating_is_refused(tmp_path):
    p, msg = _refusal(tmp_path, _move(2, "psu-a", 1))  # cart-02 is a 12 V cart; E36313A channel 1 gives 6 V
    assert msg == f"{p}: slot 2 (cart-02): supply.voltage: 12 V exceeds psu-a (E36313A) channel 1 rating 6 V"
    p, msg = _refusal(tmp_path, _move(5, "psu-b", 3))  # a 24 V cart on the DP832's 5 V channel
    assert msg == f"{p}: slot 5 (cart-05): supply.voltage: 24 V exceeds psu-b (DP832) channel 3 rating 5 V"


def test_cart_current_limit_above_the_channel_rating_is_refused(tmp_path):
    def swap(d):  # cart-06 (24 V, 2.5 A) onto the E36313A's 25 V / 2 A channel 2, cart-02 onto its channel
        d["slots"][1]["cart"], d["slots"][5]["cart"] = "cart-06", "cart-02"

    p, msg = _refusal(tmp_path, swap)
    assert msg == (f"{p}: slot 2 (cart-06): supply.current_limit: 2.5 A exceeds psu-a (E36313A) channel 2 "
                   "rating 2 A")


def test_max_voltage_is_the_carts_limit_not_a_setting(tmp_path):
    """max_voltage caps what the harness may ask for (ChannelPower); only the nominal voltage is set,
    so a cart allowed 26 V still fits the 25 V channel that gives it its 12 V."""
    configs = tmp_path / "configs"
    shutil.copytree(ROOT / "configs", configs)
    cart = configs / "carts/cart-02.yaml"
    cart.write_text(cart.read_text().replace("max_voltage: 13.2", "max_voltage: 26.0"))
    data = dict(_rig_data(), configs=str(configs))
    slot = Rig.load(_write(tmp_path, data)).slot_for("cart-02")
    assert (slot.supply.model, slot.channel, slot.cart.supply.max_voltage) == ("E36313A", 2, 26.0)


def _write(tmp_path, data) -> Path:
    p = tmp_path / "rig.yaml"
    p.write_text(yaml.safe_dump(data, sort_keys=False))
    return p


def test_every_slot_of_the_shipped_rigs_is_within_its_channel_rating():
    from harness.power.ratings import ratings_for

    for name in ("virtual", "lab-example"):
        rig = Rig.load(ROOT / f"rigs/{name}.yaml")
        for s in rig.slots:
            rated = ratings_for(s.supply.model).channel(s.channel)
            assert s.cart.supply.voltage <= rated.volts and s.cart.supply.current_limit <= rated.amps, (name, s)
    assert len(Rig.load(ROOT / "rigs/virtual.yaml").slots) == 10


def test_unknown_supply_model_is_refused(tmp_path):
    p, msg = _refusal(tmp_path, lambda d: d["supplies"][0].__setitem__("model", "E36999Z"))
    assert msg.startswith(f"{p}: supply psu-a: model: 'E36999Z': no channel ratings known for this model (known: ")
    assert "E36313A" in msg and "harness/power/ratings.py" in msg


def test_model_spelled_in_lower_case_is_known(tmp_path):
    data = dict(_rig_data(), configs=str(ROOT / "configs"))
    data["supplies"][0]["model"] = "e36313a"
    assert len(Rig.load(_write(tmp_path, data)).slots) == 10


def test_model_and_dialect_must_agree(tmp_path):
    p, msg = _refusal(tmp_path, lambda d: d["supplies"][1].__setitem__("dialect", "keysight-e36312a"))
    assert msg == f"{p}: supply psu-b: dialect: keysight-e36312a does not speak to a DP832 (its dialect is rigol-dp800)"


def test_more_channels_than_the_model_has_outputs(tmp_path):
    p, msg = _refusal(tmp_path, lambda d: d["supplies"][3].__setitem__("channels", 4))
    assert msg == f"{p}: supply psu-d: channels: 4, but a SPD3303X has 3 outputs"


def test_hil_rig_check_prints_the_rating_refusal(tmp_path):
    data = dict(_rig_data(), configs=str(ROOT / "configs"))
    _move(2, "psu-a", 1)(data)
    p = _write(tmp_path, data)
    hil = Path(sys.executable).parent / "hil"
    res = subprocess.run([str(hil), "rig", "check", str(p)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2
    assert f"{p}: slot 2 (cart-02): supply.voltage: 12 V exceeds psu-a (E36313A) channel 1 rating 6 V" in res.stderr


# ---------------------------------------------------------------- a cart's clock as deployed (`clock.drift_s`)


def test_clock_drift_is_optional_and_read_alike_by_both_readers():
    from vrack.cartconfig import load_cart as vrack_load_cart

    drifts = {p.stem: (load_cart(p).clock.drift_s, vrack_load_cart(p).clock_drift_s)
              for p in sorted((ROOT / "configs/carts").glob("*.yaml"))}
    assert drifts["cart-04"] == (-43200, -43200) and drifts["cart-09"] == (43200, 43200)
    assert drifts["cart-02"] == (95, 95)
    assert drifts["cart-01"] == (0, 0)  # not given: the RTC is right


@pytest.mark.parametrize(("clock", "says"), [
    ({"drift_s": 100 * 365 * 86400 + 1}, "more than 100 years"),
    ({"drift_s": -(100 * 365 * 86400 + 1)}, "more than 100 years"),
    ({"drift_s": "12h"}, "expected a number of seconds, got '12h'"),
    ({"drift_s": True}, "expected a number of seconds, got True"),
    ({"drift_s": float("inf")}, "not a finite number"),
    ({"drift_s": None}, "expected a number of seconds, got None"),
])
def test_bad_clock_drift_is_one_line_naming_file_and_field_in_both_readers(tmp_path, clock, says):
    from vrack.cartconfig import CartConfigError
    from vrack.cartconfig import load_cart as vrack_load_cart

    src = yaml.safe_load((ROOT / "configs/carts/cart-01.yaml").read_text())
    src["clock"] = clock
    p = tmp_path / "cart-01.yaml"
    p.write_text(yaml.safe_dump(src))
    for load, error in ((load_cart, ConfigError), (vrack_load_cart, CartConfigError)):
        with pytest.raises(error) as ei:
            load(p)
        msg = str(ei.value)
        assert "\n" not in msg and msg.startswith(f"{p}: clock.drift_s: ") and says in msg, (load.__module__, msg)


def test_clock_within_bounds_and_not_a_mapping(tmp_path):
    from vrack.cartconfig import CartConfigError
    from vrack.cartconfig import load_cart as vrack_load_cart

    src = yaml.safe_load((ROOT / "configs/carts/cart-01.yaml").read_text())
    p = tmp_path / "cart-01.yaml"
    src["clock"] = {"drift_s": -100 * 365 * 86400}  # exactly the bound
    p.write_text(yaml.safe_dump(src))
    assert load_cart(p).clock.drift_s == vrack_load_cart(p).clock_drift_s == -100 * 365 * 86400
    src["clock"] = {}
    p.write_text(yaml.safe_dump(src))
    assert load_cart(p).clock.drift_s == vrack_load_cart(p).clock_drift_s == 0
    src["clock"] = 95
    p.write_text(yaml.safe_dump(src))
    with pytest.raises(ConfigError, match=f"{p}: clock: "):
        load_cart(p)
    with pytest.raises(CartConfigError, match=f"{p}: clock: expected a mapping"):
        vrack_load_cart(p)


# ---------------------------------------------------------------- console profile: optional commands and steps


def _profile(tmp_path, mutate) -> Path:
    data = yaml.safe_load((ROOT / "configs/profiles/reference.yaml").read_text())
    mutate(data)
    p = tmp_path / "reference.yaml"
    p.write_text(yaml.safe_dump(data, sort_keys=False))
    return p


def test_state_reset_and_the_time_commands_are_optional(tmp_path):
    def without(d):
        del d["recovery"]["state_reset"], d["commands"]["time_sync"], d["commands"]["device_state"]
    prof = load_profile(_profile(tmp_path, without))
    assert prof.recovery.state_reset is None and "state_reset" not in [n for n, _ in prof.recovery.steps()]
    full = load_profile(ROOT / "configs/profiles/reference.yaml")
    assert full.recovery.state_reset.done == "^ok state reset"
    assert [n for n, _ in full.recovery.steps()][:4] == ["info", "load", "trust", "state_reset"]


@pytest.mark.parametrize(("mutate", "says"), [
    (lambda d: d["recovery"]["state_reset"].pop("done"), "recovery: state_reset.done: missing"),
    (lambda d: d["recovery"]["state_reset"].__setitem__("done", "(unclosed"), "recovery.state_reset.done: bad regex"),
    (lambda d: d["commands"]["device_state"].__setitem__("parse", r"^state counter=(?P<counter>\d+)"),
     "commands.device_state.parse: no group (?P<floor>...)"),
    (lambda d: d["commands"]["time_sync"].__setitem__("parse", r"^time (?P<result>\w+)"),
     "commands.time_sync.parse: no group (?P<t>...), (?P<reason>...)"),
    (lambda d: d["commands"]["trust_list"].__setitem__("parse", r"^trust (?P<name>\S+)"),
     "commands.trust_list.parse: no group (?P<fp>...)"),
    # what an update's checks compare: never skipped because a profile cannot read it
    (lambda d: d["commands"]["slot_status"].__setitem__(
        "parse", r"^slot active=(?P<active>[AB]) booted=(?P<booted>[AB]) pending=(?P<pending>[AB-]) "
                 r"tries=(?P<tries>\d+) confirmed=(?P<confirmed>yes|no)"),
     "commands.slot_status.parse: no group (?P<boots>...), (?P<rollbacks>...) (the harness reads it)"),
    (lambda d: d["commands"]["slot_hash"].__setitem__("parse", r"^slot (?P<slot>[AB]) sha256=(?P<sha256>[0-9a-f]{64})"),
     "commands.slot_hash.parse: no group (?P<image>...) (the harness reads it)"),
    (lambda d: d["commands"].pop("slot_hash"), "commands.slot_hash: missing"),
])
def test_a_profile_missing_what_the_harness_reads_is_refused(tmp_path, mutate, says):
    p = _profile(tmp_path, mutate)
    with pytest.raises(ConfigError) as ei:
        load_profile(p)
    assert str(ei.value).startswith(f"{p}: ") and says in str(ei.value), str(ei.value)
