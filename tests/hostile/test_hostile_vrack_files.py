"""Hostile rig and cart files, read by the virtual rack's own loaders (vrack.rack.load_rig,
vrack.cartconfig.load_cart): every refusal is one line naming the file, the slot or supply, and
the field; nothing else ever comes out of them (hypothesis)."""

from __future__ import annotations

import copy
import json
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vrack.cartconfig import CartConfigError, load_cart
from vrack.rack import RackError, load_rig

ROOT = Path(__file__).resolve().parents[2]
CART_01 = yaml.safe_load((ROOT / "configs/carts/cart-01.yaml").read_text())


# ------------------------------------------------------------------------------------------ rig


@pytest.fixture
def rig(rig_factory) -> tuple[Path, dict]:
    path = rig_factory(["cart-01", "cart-02"])
    return path, yaml.safe_load(path.read_text())


def _port(data: dict, i: int) -> int:
    return int(data["supplies"][i]["resource"].split("::")[2])


def _set(data: dict, dotted: str, value) -> None:
    node = data
    parts = [int(p) if p.isdigit() else p for p in dotted.split(".")]
    for p in parts[:-1]:
        node = node[p]
    node[parts[-1]] = value


def _supplies(n: int) -> list[dict]:
    return [{"name": f"psu-{i}", "resource": f"TCPIP0::127.0.0.1::{20000 + i}::SOCKET", "dialect": "aimtti",
             "model": "QL355TP", "channels": 2} for i in range(n)]


# (id, edit of the parsed rig -> None, or of its text -> str, expected message parts after the file name)
RIG_CASES = [
    ("cart-id-path", lambda d: _set(d, "slots.0.cart", "../../etc/passwd"),
     ["slot 1:", "cart: expected an id", "'../../etc/passwd'"]),
    ("cart-id-upper", lambda d: _set(d, "slots.1.cart", "Cart-02"), ["slot 2:", "cart: expected an id"]),
    ("cart-id-too-long", lambda d: _set(d, "slots.0.cart", "c" * 65), ["slot 1:", "cart: expected an id",
                                                                       "at most 64"]),
    ("supply-name-path", lambda d: _set(d, "supplies.0.name", "psu/../x"), ["supply #1: name: expected an id"]),
    ("supply-name-twice", lambda d: _set(d, "supplies.1.name", "psu-k"), ["supply psu-k: name: psu-k is used twice"]),
    ("two-supplies-one-port", lambda d: _set(d, "supplies.1.resource", d["supplies"][0]["resource"]),
     ["supply psu-r: resource: port", "is already supply psu-k's"]),
    ("supply-on-broker-port",
     lambda d: _set(d, "supplies.0.resource", f"TCPIP0::127.0.0.1::{d['broker']['port']}::SOCKET"),
     ["supply psu-k: resource: port", "is already the broker's"]),
    ("supply-not-loopback", lambda d: _set(d, "supplies.0.resource", "TCPIP0::10.0.0.5::5025::SOCKET"),
     ["supply psu-k: resource: host '10.0.0.5' is not loopback"]),
    ("supply-not-socket", lambda d: _set(d, "supplies.1.resource", "USB0::0x1AB1::0x0E11::DP8::INSTR"),
     ["supply psu-r: resource:", "is not a SOCKET resource"]),
    ("supply-port-zero", lambda d: _set(d, "supplies.0.resource", "TCPIP0::127.0.0.1::0::SOCKET"),
     ["supply psu-k: resource: port 0 is not in 1..65535"]),
    ("supply-port-too-big", lambda d: _set(d, "supplies.0.resource", "TCPIP0::127.0.0.1::70000::SOCKET"),
     ["supply psu-k: resource: port 70000 is not in 1..65535"]),
    ("broker-not-loopback", lambda d: _set(d, "broker.host", "192.168.1.10"),
     ["broker.host: '192.168.1.10' is not loopback"]),
    ("broker-port-too-big", lambda d: _set(d, "broker.port", 65536), ["broker.port: expected 1..65535, got 65536"]),
    ("broker-port-bool", lambda d: _set(d, "broker.port", True), ["broker.port: expected an integer, got True"]),
    ("too-many-slots", lambda d: _set(d, "slots", [dict(d["slots"][0], slot=i + 1) for i in range(65)]),
     ["slots: expected 1..64 slots, got 65"]),
    ("too-many-supplies", lambda d: _set(d, "supplies", _supplies(33)), ["supplies: expected 1..32 supplies, got 33"]),
    ("too-many-channels", lambda d: _set(d, "supplies.0.channels", 9),
     ["supply psu-k: channels: expected 1..8, got 9"]),
    ("channel-beyond-supply", lambda d: _set(d, "slots.1.channel", 4), ["slot 2 (cart-02): channel: expected 1..3"]),
    ("channel-twice", lambda d: _set(d, "slots.1.supply", "psu-k"),
     ["slot 2 (cart-02): channel: psu-k channel 1 already powers slot 1"]),
    ("unknown-supply", lambda d: _set(d, "slots.0.supply", "psu-z"),
     ["slot 1 (cart-01): supply: unknown supply psu-z"]),
    ("slot-number-twice", lambda d: _set(d, "slots.1.slot", 1), ["slot 1 (cart-02): slot: number 1 is used twice"]),
    ("cart-twice", lambda d: _set(d, "slots.1.cart", "cart-01"),
     ["slot 2 (cart-01): cart: cart-01 is already in slot 1"]),
    ("unknown-dialect", lambda d: _set(d, "supplies.1.dialect", "rigol-dp9000"),
     ["supply psu-r: dialect: unknown dialect 'rigol-dp9000'"]),
    ("console-url", lambda d: _set(d, "slots.0.console", "rfc2217://lab:4001"),
     ["slot 1 (cart-01): console: 'rfc2217://lab:4001' is a URL"]),
    ("string-too-long", lambda d: _set(d, "name", "n" * 257), ["name: 257 characters, more than 256"]),
    ("console-escape", lambda d: _set(d, "slots.0.console", "/tmp/a\x1b[2Jb"),
     ["slot 1 (cart-01): console: control or bidirectional-override character U+001B"]),
    ("console-newline", lambda d: _set(d, "slots.0.console", "/tmp/a\nb"),
     ["slot 1 (cart-01): console: control or bidirectional-override character U+000A"]),
    ("model-rlo", lambda d: _set(d, "supplies.0.model", "E36313A\u202egnp.exe"),
     ["supply psu-k: model: control or bidirectional-override character U+202E"]),
    ("name-isolate", lambda d: _set(d, "name", "rig\u2066x"),
     ["name: control or bidirectional-override character U+2066"]),
    ("name-rlm", lambda d: _set(d, "name", "rig\u200f"), ["name: control or bidirectional-override character U+200F"]),
    ("key-rlo", lambda d: _set(d, "virtual.run\u202edir", "x"), ["virtual: key: control or bidirectional-override",
                                                                   "U+202E"]),
    ("key-not-string", lambda d: _set(d, "broker.7", "x"), ["broker: key 7: keys must be strings"]),
    ("flash-scale-nan", lambda t: t.replace("flash_time_scale: 0.05", "flash_time_scale: .nan"),
     ["virtual.flash_time_scale: nan is not a finite number"]),
    ("channel-inf", lambda t: t.replace("channel: 1\n", "channel: .inf\n", 1),
     ["slot 1 (cart-01): channel: inf is not a finite number"]),
    ("flash-scale-too-big", lambda d: _set(d, "virtual.flash_time_scale", 11),
     ["virtual.flash_time_scale: expected a number in (0, 10], got 11"]),
    ("duplicate-key", lambda t: t.replace("kind: virtual\n", "kind: virtual\nkind: physical\n"),
     ["line", "not valid YAML: duplicate key 'kind'"]),
    ("duplicate-nested-key", lambda t: t.replace("  flash_time_scale: 0.05\n",
                                                 "  flash_time_scale: 0.05\n  flash_time_scale: 5\n"),
     ["not valid YAML: duplicate key 'flash_time_scale'"]),
    ("not-utf8", lambda t: t.encode() + b"# caf\xe9\n", ["not UTF-8 text (byte 0xe9 at offset"]),
    ("too-big", lambda t: t + "#" + "x" * (1 << 20) + "\n", ["more than the 1048576 a configuration file may have"]),
    ("alias-bomb", lambda t: t + "bomb:\n  a: &a [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]\n"
     + "".join(f"  {n}: &{n} [{', '.join([f'*{p}'] * 10)}]\n" for p, n in zip("abcde", "bcdef", strict=True)),
     ["more than 100000 values"]),
    ("recursive-alias", lambda t: t + "loop: &l [*l]\n", ["loop[0]: refers to itself"]),
    ("timestamp", lambda t: t + "when: 2024-01-01\n", ["when: a value of type date is not allowed here"]),
    ("bad-date", lambda t: t + "when: 2024-13-01\n", ["not valid YAML: ValueError: month must be in 1..12"]),
    ("not-a-mapping", lambda t: "- just\n- a list\n", ["(top level): expected a mapping of fields, got list"]),
    ("kind-physical", lambda d: _set(d, "kind", "physical"), ["kind: the virtual rack only runs rigs of kind"]),
    ("run-dir-missing", lambda d: d["virtual"].pop("run_dir"), ["virtual.run_dir: missing"]),
]


@pytest.mark.parametrize("edit,parts", [pytest.param(e, p, id=i) for i, e, p in RIG_CASES])
def test_rig_refusals_name_file_slot_and_field(tmp_path, rig, edit, parts):
    path, data = rig
    text = path.read_text()
    if edit.__code__.co_varnames[:1] == ("t",):
        out = edit(text)
        path.write_bytes(out if isinstance(out, bytes) else out.encode())
    else:
        edit(data)
        path.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
    with pytest.raises(RackError) as ei:
        load_rig(path)
    msg = str(ei.value)
    assert "\n" not in msg and "\r" not in msg, msg
    assert msg.startswith(f"{path.resolve()}:"), msg
    for part in parts:
        assert part in msg, (part, msg)
    assert not (tmp_path / "run").exists(), "loading a rig writes nothing"


def test_valid_rig_loads(rig):
    path, data = rig
    rig = load_rig(path)
    assert [s.name for s in rig.supplies] == ["psu-k", "psu-r"]
    assert [s.port for s in rig.supplies] == [_port(data, 0), _port(data, 1)]
    assert rig.broker_port == data["broker"]["port"] and rig.flash_time_scale == 0.05
    assert [s.cart_file.name for s in rig.slots] == ["cart-01.yaml", "cart-02.yaml"]


def test_repo_rig_loads():
    rig = load_rig(ROOT / "rigs/virtual.yaml")
    assert len(rig.slots) == 10 and len(rig.supplies) == 5


def test_rig_that_is_not_a_regular_file(tmp_path):
    with pytest.raises(RackError) as ei:
        load_rig(tmp_path)
    assert str(ei.value) == f"{tmp_path.resolve()}: cannot read: not a regular file"


# ----------------------------------------------------------------------------------------- cart


def _cart_set(dotted: str, value):
    return lambda d: _set(d, dotted, value)


CART_CASES = [
    ("id-path", _cart_set("id", "../cart-01"), "id: expected an id"),
    ("id-upper", _cart_set("id", "CART-01"), "id: expected an id"),
    ("id-number", _cart_set("id", 101), "id: expected an id"),
    ("family-path", _cart_set("firmware.family", "../../profiles/x"), "firmware.family: expected an id"),
    ("version-path", _cart_set("firmware.initial_version", "../../1.4.2"),
     "firmware.initial_version: expected a version like 1.4.2"),
    ("ca-path", _cart_set("provisioned_cas", ["lab-root-2025", "../../etc/ssl/key"]),
     "provisioned_cas[1]: expected an id"),
    ("too-many-cas", _cart_set("provisioned_cas", [f"ca-{i}" for i in range(17)]),
     "provisioned_cas: 17 entries, more than 16"),
    ("too-many-sensors", _cart_set("sensors", [f"s-{i}" for i in range(33)]), "sensors: 33 entries, more than 32"),
    ("page-size", _cart_set("flash.page_size", 65536), "flash.page_size: expected 2048 or 4096, got 65536"),
    ("slot-too-big", _cart_set("flash.slot_size", 128 << 20),
     "flash.slot_size: expected a positive multiple of page_size (4096) of at most 67108864, got 134217728"),
    ("slot-not-multiple", _cart_set("flash.slot_size", 524289), "flash.slot_size: expected a positive multiple"),
    ("draw-nan", _cart_set("draw.idle", float("nan")), "draw.idle: nan is not a finite number"),
    ("boot-inf", _cart_set("boot.expected_s", float("inf")), "boot.expected_s: inf is not a finite number"),
    ("nested-nan", _cart_set("connectivity.weight", float("-inf")), "connectivity.weight: -inf is not a finite number"),
    ("rev-bidi", _cart_set("hardware_revision", "rev-\u202db"),
     "hardware_revision: control or bidirectional-override character U+202D"),
    ("sensor-control", _cart_set("sensors", ["imu\x07"]),
     "sensors[0]: control or bidirectional-override character U+0007"),
    ("region-too-long", _cart_set("region", "r" * 300), "region: 300 characters, more than 256"),
    ("tags-lre", _cart_set("tags", ["a\u202a"]), "tags[0]: control or bidirectional-override character U+202A"),
    ("key-lrm", _cart_set("tags\u200e", ["x"]), "(top level): key: control or bidirectional-override character U+200E"),
]


_NON_FINITE = {"draw-nan", "boot-inf", "nested-nan"}  # JSON has no such numbers: see test_cart_json_refusals


@pytest.mark.parametrize("edit,part,suffix", [
    pytest.param(e, p, suffix, id=f"{i}{suffix}") for i, e, p in CART_CASES for suffix in (".yaml", ".json")
    if not (suffix == ".json" and i in _NON_FINITE)])
def test_cart_refusals_name_file_and_field(tmp_path, edit, part, suffix):
    data = copy.deepcopy(CART_01)
    edit(data)
    path = tmp_path / f"cart-01{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(data, allow_nan=False))
    else:
        path.write_text(yaml.safe_dump(data, allow_unicode=True))
    with pytest.raises(CartConfigError) as ei:
        load_cart(path)
    msg = str(ei.value)
    assert "\n" not in msg and msg.startswith(f"{path}: "), msg
    assert part in msg, msg


@pytest.mark.parametrize("raw,part", [
    (b"id: cart-01\nid: cart-02\n", "line 2: not valid YAML: duplicate key 'id'"),
    (b"flash: {page_size: 4096, page_size: 2048}\n", "not valid YAML: duplicate key 'page_size'"),
    (b"id: caf\xc3\n", "not UTF-8 text (byte 0xc3 at offset 7)"),
    (b"\xff\xfeid: cart-01\n", "not UTF-8 text (byte 0xff at offset 0)"),
    (b"a: [" * 2000, "not valid YAML"),
    (b"# " + b"x" * (1 << 20), "more than the 1048576"),
    (b"[1, 2]\n", "expected a mapping at the top level, got list"),
    (b"draw: {idle: .NaN}\n", "draw.idle: nan is not a finite number"),
    (b"a: !!binary aGVsbG8=\n", "a: a value of type bytes is not allowed here"),
    (b"a: !!python/object:os.system {}\n", "not valid YAML"),
])
def test_cart_yaml_refusals(tmp_path, raw, part):
    path = tmp_path / "cart-01.yaml"
    path.write_bytes(raw)
    with pytest.raises(CartConfigError) as ei:
        load_cart(path)
    msg = str(ei.value)
    assert "\n" not in msg and msg.startswith(f"{path}:") and part in msg, msg


@pytest.mark.parametrize("raw,part", [
    ('{"id": "cart-01", "id": "cart-02"}', "not valid JSON: duplicate key 'id'"),
    ('{"draw": {"idle": NaN}}', "not valid JSON: NaN is not a finite number"),
    ('{"draw": {"idle": -Infinity}}', "not valid JSON: -Infinity is not a finite number"),
    ('{"a": "\\ud800"}', "a: control or bidirectional-override character U+D800"),
    ("[" * 100000, "not valid JSON"),
])
def test_cart_json_refusals(tmp_path, raw, part):
    path = tmp_path / "cart-01.json"
    path.write_text(raw)
    with pytest.raises(CartConfigError) as ei:
        load_cart(path)
    msg = str(ei.value)
    assert "\n" not in msg and msg.startswith(f"{path}:") and part in msg, msg


def test_merge_keys_still_allowed(tmp_path):
    """`<<: *base` may be overridden by an explicit key: that is not a duplicate."""
    text = yaml.safe_dump(CART_01).replace("draw:\n", "base: &b {idle: 0.3, booting: 0.4, flash_write: 0.5}\n"
                                                      "draw:\n  <<: *b\n", 1)
    path = tmp_path / "cart-01.yaml"
    path.write_text(text)
    assert load_cart(path).draw.idle == CART_01["draw"]["idle"]


# ------------------------------------------------------------------------------------ hypothesis

_ERRORS = (RackError, CartConfigError)


def _one_line_or_loads(loader, path: Path, error: type[Exception]) -> None:
    try:
        loader(path)
    except error as exc:
        msg = str(exc)
        assert msg and "\n" not in msg and "\r" not in msg and "\u2028" not in msg, repr(msg)
        assert msg.startswith(str(path)), repr(msg)


_scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True)
            | st.text(max_size=40))
_values = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=4)
                       | st.dictionaries(st.text(max_size=12) | st.integers(0, 9), inner, max_size=4), max_leaves=20)
_HYP = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_HYP
@given(st.binary(max_size=2000))
def test_any_bytes_as_rig_or_cart(raw):
    with tempfile.TemporaryDirectory() as d:
        rig, cart, cart_json = Path(d) / "rig.yaml", Path(d) / "cart-01.yaml", Path(d) / "cart-01.json"
        for p in (rig, cart, cart_json):
            p.write_bytes(raw)
        _one_line_or_loads(load_rig, rig.resolve(), RackError)
        _one_line_or_loads(load_cart, cart, CartConfigError)
        _one_line_or_loads(load_cart, cart_json, CartConfigError)


@_HYP
@given(st.text(alphabet=st.sampled_from(list("ab:-[]{}&*!|>'\"#%@`,?\n\t ") + ["\u202e", "\x00", "\x85", "é"]),
               max_size=200))
def test_yamlish_text_as_rig_or_cart(text):
    with tempfile.TemporaryDirectory() as d:
        rig, cart = Path(d) / "rig.yaml", Path(d) / "cart-01.yaml"
        rig.write_text(text)
        cart.write_text(text)
        _one_line_or_loads(load_rig, rig.resolve(), RackError)
        _one_line_or_loads(load_cart, cart, CartConfigError)


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, (*prefix, i))


def _replace(data, path, value):
    if not path:
        return value
    node = data
    for p in path[:-1]:
        node = node[p]
    node[path[-1]] = value
    return data


_CART_PATHS = list(_paths(CART_01))


@pytest.fixture
def rig_template(rig_factory) -> dict:
    path = rig_factory(["cart-01", "cart-02"])
    load_rig(path)  # the mutations start from a rig that loads (else only refusals would be tested)
    cart = path.parent / "cart-01.yaml"
    cart.write_text(yaml.safe_dump(CART_01))
    assert load_cart(cart).id == "cart-01"
    return yaml.safe_load(path.read_text())


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_valid_files_with_one_field_replaced(rig_template, data):
    """A valid rig or cart with any one field (or the whole file) replaced by any YAML-able value:
    it loads, or it is refused in one line."""
    paths = list(_paths(rig_template))
    with tempfile.TemporaryDirectory() as d:
        rig_data = _replace(copy.deepcopy(rig_template), data.draw(st.sampled_from(paths)), data.draw(_values))
        cart_data = _replace(copy.deepcopy(CART_01), data.draw(st.sampled_from(_CART_PATHS)), data.draw(_values))
        rig, cart, cart_json = Path(d) / "rig.yaml", Path(d) / "cart-01.yaml", Path(d) / "cart-01.json"
        rig.write_text(yaml.safe_dump(rig_data, allow_unicode=True))
        cart.write_text(yaml.safe_dump(cart_data, allow_unicode=True))
        cart_json.write_text(json.dumps(cart_data))
        _one_line_or_loads(load_rig, rig.resolve(), RackError)
        _one_line_or_loads(load_cart, cart, CartConfigError)
        _one_line_or_loads(load_cart, cart_json, CartConfigError)
