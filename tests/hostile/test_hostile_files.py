"""Hostile files at the door: every rig, cart and profile the harness reads is refused, unless
plainly sane, with ONE line naming the file, the slot or supply, and the field; `hil rig check`,
`hil gate` and `pytest --rig` turn that line into exit status 2 with no traceback.

The bounds are the same as the virtual rack's own reader (vrack/cartconfig.py)."""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness.config import ConfigError, Rig, _zones, load_cart, load_profile

ROOT = Path(__file__).resolve().parents[2]
HIL = Path(sys.executable).parent / "hil"
NOT_AN_ID = "is not an id (a-z, 0-9 and '-', not starting with '-', at most 64 characters)"


def _yaml(path: Path, data) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
    return path


def _virtual() -> dict:
    data = yaml.safe_load((ROOT / "rigs/virtual.yaml").read_text())
    data["configs"] = str(ROOT / "configs")
    return data


def _lab() -> dict:
    data = yaml.safe_load((ROOT / "rigs/lab-example.yaml").read_text())
    data["configs"] = str(ROOT / "configs")
    return data


def _cart() -> dict:
    return yaml.safe_load((ROOT / "configs/carts/cart-01.yaml").read_text())


def _profile() -> dict:
    return yaml.safe_load((ROOT / "configs/profiles/reference.yaml").read_text())


def _set(*keys_and_value):
    """A mutation: set data[k1][k2]... = value."""
    *keys, value = keys_and_value

    def mutate(d):
        for k in keys[:-1]:
            d = d[k]
        d[keys[-1]] = value
    return mutate


def _refused(load: Callable[[Path], object], path: Path) -> str:
    with pytest.raises(ConfigError) as ei:
        load(path)
    msg = str(ei.value)
    assert "\n" not in msg and msg.isprintable(), repr(msg)
    return msg


# ---------------------------------------------------------------- the rig file

def _many_slots(d):
    d["slots"] = [dict(d["slots"][0], slot=i + 1, channel=1) for i in range(65)]


def _many_supplies(d):
    d["supplies"] = [dict(d["supplies"][0], name=f"p{i}", resource=f"TCPIP0::127.0.0.1::{40000 + i}::SOCKET")
                     for i in range(33)]


def _key_with_bidi(d):
    d["slots"][0]["ch\u202eannel"] = 1


RIG_CASES = [
    # ids: no path reaches the file system through an id
    ("cart-id-is-a-path", _set("slots", 1, "cart", "../etc/passwd"), f"slot 2: cart: '../etc/passwd' {NOT_AN_ID}"),
    ("cart-id-absolute", _set("slots", 1, "cart", "/etc/passwd"), f"slot 2: cart: '/etc/passwd' {NOT_AN_ID}"),
    ("rig-name", _set("name", "Virtual Rig"), f"name: 'Virtual Rig' {NOT_AN_ID}"),
    ("supply-name", _set("supplies", 0, "name", "PSU_A"), f"supply #1: name: 'PSU_A' {NOT_AN_ID}"),
    ("supply-name-65-chars", _set("supplies", 0, "name", "p" * 65), f"supply #1: name: '{'p' * 65}' {NOT_AN_ID}"),
    ("slot-supply-ref", _set("slots", 0, "supply", "psu-a/.."), f"slot 1 (cart-01): supply: 'psu-a/..' {NOT_AN_ID}"),
    # addresses
    ("two-supplies-one-port", _set("supplies", 1, "resource", "TCPIP0::localhost::47101::SOCKET"),
     "supply psu-b: resource: localhost:47101 is already supply psu-a's"),
    ("same-resource-twice", _set("supplies", 1, "resource", "TCPIP0::127.0.0.1::47101::SOCKET"),
     "supply psu-b: resource: TCPIP0::127.0.0.1::47101::SOCKET is already supply psu-a"),
    ("supply-on-broker-port", _set("broker", "port", 47103),
     "supply psu-c: resource: port 47103 is the broker's (127.0.0.1:47103)"),
    ("virtual-broker-not-loopback", _set("broker", "host", "10.0.0.5"),
     "broker.host: '10.0.0.5' is not loopback (127.0.0.1 or localhost): a virtual rig's broker listens on "
     "loopback only"),
    ("virtual-supply-not-loopback", _set("supplies", 2, "resource", "TCPIP0::10.1.1.1::47103::SOCKET"),
     "supply psu-c: resource: host '10.1.1.1' is not loopback (127.0.0.1 or localhost): a virtual rig's "
     "supplies listen on loopback only"),
    ("virtual-supply-usb", _set("supplies", 2, "resource", "USB0::0x0AAD::0x0197::1::INSTR"),
     "supply psu-c: resource: 'USB0::0x0AAD::0x0197::1::INSTR': a virtual rig's supplies are SCPI servers on "
     "loopback TCP (TCPIP0::127.0.0.1::PORT::SOCKET)"),
    ("virtual-image-host-bind", _set("image_host", "bind", "0.0.0.0"),
     "image_host.bind: '0.0.0.0' is not a loopback address: a virtual rig's image host serves its carts on this "
     "machine only"),
    ("virtual-image-url-host", _set("image_host", "url_host", "hil.lab.example"),
     "image_host.url_host: 'hil.lab.example' is not a loopback address: a virtual rig's image host serves its "
     "carts on this machine only"),
    ("image-host-on-broker-port", _set("image_host", "port", 47883), "image_host.port: 47883 is the broker's port"),
    ("supply-port-zero", _set("supplies", 0, "resource", "TCPIP0::127.0.0.1::0::SOCKET"),
     "supply psu-a: resource: 'TCPIP0::127.0.0.1::0::SOCKET': port 0 is not in 1..65535"),
    ("host-with-slash", _set("broker", "host", "a/b"), "broker.host: 'a/b' is not a host name or an IP address"),
    ("virtual-console-url", _set("slots", 0, "console", "rfc2217://x:4000"),
     "slot 1 (cart-01): console: 'rfc2217://x:4000' is a URL: the virtual rack makes its consoles as files "
     "(a path)"),
    # numbers
    ("nan", _set("power_off_s", float("nan")), "power_off_s: nan is not a finite number"),
    ("inf", _set("virtual", "flash_time_scale", float("inf")), "virtual.flash_time_scale: inf is not a finite number"),
    ("nan-as-text", _set("virtual", "flash_time_scale", "nan"),
     "virtual.flash_time_scale: Input should be a finite number"),
    # bounds
    ("65-slots", _many_slots, "slots: List should have at most 64 items after validation, not 65"),
    ("33-supplies", _many_supplies, "supplies: List should have at most 32 items after validation, not 33"),
    ("9-channels", _set("supplies", 0, "channels", 9),
     "supply psu-a: channels: Input should be less than or equal to 8"),
    ("channel-9", _set("slots", 0, "channel", 9),
     "slot 1 (cart-01): channel: Input should be less than or equal to 8"),
    ("slot-number", _set("slots", 0, "slot", 10000),
     "slot #1 (cart-01): slot: Input should be less than or equal to 9999"),
    ("257-chars", _set("supplies", 0, "model", "x" * 257), "supply psu-a: model: 257 characters; at most 256"),
    # characters
    ("bidi-override", _set("slots", 3, "console", "/dev/tty\u202eUSB0"),
     "slot 4 (cart-04): console: '/dev/tty\\u202eUSB0': bidirectional-override character U+202E is not allowed"),
    ("bidi-isolate", _set("name", "virtual\u2066"),
     "name: 'virtual\\u2066': bidirectional-override character U+2066 is not allowed"),
    ("lrm", _set("supplies", 0, "model", "E\u200e36313A"),
     "supply psu-a: model: 'E\\u200e36313A': bidirectional-override character U+200E is not allowed"),
    ("zero-width", _set("supplies", 0, "model", "E36\u200b313A"),
     "supply psu-a: model: 'E36\\u200b313A': format character U+200B is not allowed"),
    ("bell", _set("supplies", 0, "model", "E36\x07313A"),
     "supply psu-a: model: 'E36\\x07313A': control character U+0007 is not allowed"),
    ("newline", _set("slots", 0, "probe", "a\nb"),
     "slot 1 (cart-01): probe: 'a\\nb': control character U+000A is not allowed"),
    ("line-separator", _set("supplies", 0, "model", "E36\u2028313A"),
     "supply psu-a: model: 'E36\\u2028313A': line separator U+2028 is not allowed"),
    ("key-with-bidi", _key_with_bidi,
     "slot 1 (cart-01): key 'ch\\u202eannel': bidirectional-override character U+202E is not allowed"),
    # templates: what the harness formats later must be right now
    ("build-unknown-placeholder", _set("firmware", "build", ["{python}", "--version", "{vers}", "-o", "{out}"]),
     "firmware.build: word 3 '{vers}': unknown placeholder {vers}; known: {out}, {python}, {version}"),
    ("build-faults-inside-word", _set("firmware", "build", ["{python}", "{version}", "{out}", "--x{faults}"]),
     "firmware.build: word 4 '--x{faults}': {faults} must be a word of its own"),
    ("build-no-version", _set("firmware", "build", ["{python}", "-o", "{out}"]),
     "firmware.build: no word uses {version} (the version to build)"),
    ("build-no-out", _set("firmware", "build", ["{python}", "{version}"]),
     "firmware.build: no word uses {out} (the file to write)"),
    ("build-attribute", _set("firmware", "build", ["{python}", "{version.__class__}", "{out}"]),
     "firmware.build: word 2 '{version.__class__}': a placeholder is a plain {name}, not {version.__class__}"),
    ("recovery-image-placeholder", _set("recovery", "image", "fw-{versoin}.img"),
     "recovery.image: 'fw-{versoin}.img': unknown placeholder {versoin}; known: {cart}, {slot}, {version}"),
    ("recovery-image-brace", _set("recovery", "image", "fw-{version.img"),
     "recovery.image: 'fw-{version.img' is not a valid template: expected '}' before end of string"),
    ("recovery-one-trust-store", _set("recovery", "trust_store", "trust.bin"),
     "recovery.trust_store: cart-01 and cart-06 need different factory files but both get 'trust.bin' "
     "(use {cart})"),
    ("recovery-command-unused", _set("recovery", "command", "flash {image}"),
     "recovery: command is only used by method 'command' (method is 'serial')"),
]


@pytest.mark.parametrize(("mutate", "expected"), [c[1:] for c in RIG_CASES], ids=[c[0] for c in RIG_CASES])
def test_rig_refusal_is_one_line_naming_file_slot_field(tmp_path, mutate, expected):
    data = _virtual()
    mutate(data)
    path = _yaml(tmp_path / "bad.yaml", data)
    assert _refused(Rig.load, path) == f"{path}: {expected}"


LAB_CASES = [
    ("two-supplies-one-host-port", _set("supplies", 3, "resource", "TCPIP1::PSU-B.lab.example::5025::SOCKET"),
     "supply psu-d: resource: PSU-B.lab.example:5025 is already supply psu-b's"),
    ("same-resource-twice", _set("supplies", 3, "resource", "TCPIP0::psu-a.lab.example::inst0::INSTR"),
     "supply psu-d: resource: TCPIP0::psu-a.lab.example::inst0::INSTR is already supply psu-a"),
    ("supply-on-broker-host-port", _set("supplies", 1, "resource", "TCPIP0::mqtt.lab.example::8883::SOCKET"),
     "supply psu-b: resource: port 8883 is the broker's (mqtt.lab.example:8883)"),
    ("recovery-command-without-image", _set("recovery", "command", "probe-rs download --probe {probe}"),
     "recovery.command: 'probe-rs download --probe {probe}' does not use {image} (the factory image to flash)"),
    ("recovery-command-quotes", _set("recovery", "command", "flash '{image}"),
     "recovery.command: \"flash '{image}\" is not a command line: No closing quotation"),
    ("physical-with-virtual", _set("virtual", {"run_dir": "x", "flash_time_scale": 1}),
     "virtual: only a rig of kind virtual has a virtual section"),
]


@pytest.mark.parametrize(("mutate", "expected"), [c[1:] for c in LAB_CASES], ids=[c[0] for c in LAB_CASES])
def test_physical_rig_refusals(tmp_path, mutate, expected):
    data = _lab()
    mutate(data)
    path = _yaml(tmp_path / "lab.yaml", data)
    assert _refused(Rig.load, path) == f"{path}: {expected}"


def test_physical_rig_may_use_the_same_port_on_other_hosts(tmp_path):
    data = _lab()
    data["supplies"][3]["resource"] = "TCPIP0::psu-c.lab.example::5025::SOCKET"  # psu-b is on 5025 too
    rig = Rig.load(_yaml(tmp_path / "lab.yaml", data))
    assert sorted(s.resource for s in rig.spec.supplies if s.port == 5025) == [
        "TCPIP0::psu-b.lab.example::5025::SOCKET", "TCPIP0::psu-c.lab.example::5025::SOCKET"]


# ---------------------------------------------------------------- the file itself

def _deep(n: int) -> str:
    return "a: " + "[" * n + "]" * n + "\n"


FILE_CASES = [
    ("not-utf8", b"name: virtual\nkind: \xff\n", "line 2: not UTF-8 (byte 0xff at offset 20)"),
    ("latin1", "name: caf\u00e9\n".encode("latin-1"), "line 1: not UTF-8 (byte 0xe9 at offset 9)"),
    ("duplicate-key", b"name: a\nkind: virtual\nname: b\n", "line 3: duplicate key 'name'"),
    ("duplicate-key-in-slot", b"slots:\n  - slot: 1\n    cart: cart-01\n    cart: cart-02\n",
     "line 4: duplicate key 'cart'"),
    ("too-deep", _deep(40).encode(), "line 1: nested deeper than 32 levels"),
    ("too-big", b"#" * (1 << 20) + b"\n", "1048577 bytes; a configuration file is at most 1048576 bytes (1 MiB)"),
    ("not-a-mapping", b"- a\n- b\n", "(top level): expected a mapping of fields"),
    ("empty", b"", "(top level): expected a mapping of fields"),
    ("int-key", b"1: a\n", "(top level): key 1 is not a name (keys are strings)"),
    ("binary-value", b"name: !!binary aGVsbG8=\n", "name: a bytes value is not allowed"),
    ("recursive-alias", b"a: &x [*x]\n", "a.0: refers to itself (a recursive alias)"),
    ("alias-bomb", ("a: &a [x, x, x, x, x, x, x, x, x, x]\n"
                    + "".join(f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
                              for p, c in zip("abcde", "bcdef", strict=True))).encode(),
     "(top level): more than 100000 values (an alias counts each time it is used)"),
    ("nan-literal", b"power_off_s: .nan\n", "power_off_s: nan is not a finite number"),
    ("escaped-bidi", b'name: "a\\u202eb"\n',
     "name: 'a\\u202eb': bidirectional-override character U+202E is not allowed"),
    ("escaped-surrogate", b'name: "a\\ud800"\n', "name: 'a\\ud800': lone surrogate U+D800 is not allowed"),
    ("escaped-nul", b'name: "a\\0"\n', "name: 'a\\x00': control character U+0000 is not allowed"),
    ("huge-int", b"power_off_s: " + b"9" * 5000 + b"\n",
     "not valid YAML: ValueError: Exceeds the limit (4300 digits) for integer string conversion: value has "
     "5000 digits; use sys.set_int_max_str_digits() to increase the limit"),
    ("bad-yaml", b"name: x\nslots: [\n", "line 3: not valid YAML: expected the node content, but found '<stream end>'"),
]


@pytest.mark.parametrize(("content", "expected"), [c[1:] for c in FILE_CASES], ids=[c[0] for c in FILE_CASES])
@pytest.mark.parametrize("loader", [Rig.load, load_cart, load_profile], ids=["rig", "cart", "profile"])
def test_file_refusal_is_one_line_naming_the_file(tmp_path, loader, content, expected):
    path = tmp_path / "cart-01.yaml"
    path.write_bytes(content)
    assert _refused(loader, path) == f"{path}: {expected}"


def test_a_directory_or_fifo_is_not_a_config_file(tmp_path):
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    for path in (tmp_path, fifo):
        assert _refused(Rig.load, path) == f"{path}: cannot read: not a regular file"


def test_a_missing_file(tmp_path):
    path = tmp_path / "nope.yaml"
    assert _refused(load_cart, path) == f"{path}: cannot read: No such file or directory"


def test_a_byte_order_mark_is_fine(tmp_path):
    path = tmp_path / "cart-01.yaml"
    path.write_bytes(b"\xef\xbb\xbf" + (ROOT / "configs/carts/cart-01.yaml").read_bytes())
    assert load_cart(path).id == "cart-01"


def test_yaml_merge_keys_are_not_duplicates(tmp_path):
    text = (ROOT / "configs/carts/cart-01.yaml").read_text().replace(
        "supply:\n", "base: &base {voltage: 5.0, max_voltage: 6.0, current_limit: 1.5}\nsupply:\n  <<: *base\n", 1)
    path = tmp_path / "cart-01.yaml"
    path.write_text(text)
    # the merge itself is fine (no duplicate key); the helper key is then an unknown field
    assert _refused(load_cart, path) == f"{path}: base: unknown field"


# ---------------------------------------------------------------- cart configurations

CART_CASES = [
    ("page-too-small", _set("flash", "page_size", 128),
     "flash.page_size: Input should be greater than or equal to 256"),
    ("page-too-big", _set("flash", "page_size", 131072),
     "flash.page_size: Input should be less than or equal to 65536"),
    ("page-not-power-of-two", _set("flash", "page_size", 3000), "flash: page_size 3000 is not a power of two"),
    ("slot-too-big", _set("flash", "slot_size", 128 << 20),
     "flash.slot_size: Input should be less than or equal to 67108864"),
    ("slot-not-whole-pages", _set("flash", "slot_size", 1000),
     "flash: slot_size 1000 is not a multiple of page_size 4096"),
    ("33-sensors", _set("sensors", [f"s{i}" for i in range(33)]),
     "sensors: List should have at most 32 items after validation, not 33"),
    ("sensor-twice", _set("sensors", ["imu", "imu"]), "sensors: 'imu' is listed twice"),
    ("17-cas", _set("provisioned_cas", [f"ca-{i}" for i in range(17)]),
     "provisioned_cas: List should have at most 16 items after validation, not 17"),
    ("ca-name-is-a-path", _set("provisioned_cas", ["lab-root-2025", "../../root"]),
     f"provisioned_cas.1: '../../root' {NOT_AN_ID}"),
    ("family-is-a-path", _set("firmware", "family", "../reference"), f"firmware.family: '../reference' {NOT_AN_ID}"),
    ("tag", _set("tags", ["North America"]), f"tags.0: 'North America' {NOT_AN_ID}"),
    ("hardware-revision", _set("hardware_revision", "rev b"), f"hardware_revision: 'rev b' {NOT_AN_ID}"),
    ("id", _set("id", "Cart-01"), f"id: 'Cart-01' {NOT_AN_ID}"),
    ("nan-voltage", _set("supply", "voltage", float("nan")), "supply.voltage: nan is not a finite number"),
    ("inf-offset", _set("utc_offset_hours", float("-inf")), "utc_offset_hours: -inf is not a finite number"),
    ("volts", _set("supply", "max_voltage", 120), "supply.max_voltage: Input should be less than or equal to 60"),
    ("draw-over-limit", _set("draw", "idle", 2.0), "draw.idle: 2 A exceeds supply.current_limit 1.5 A"),
    ("time-zone-path", _set("timezone", "../../etc/passwd"),
     "timezone: '../../etc/passwd' is not a time zone name like Europe/Berlin"),
    ("version", _set("firmware", "initial_version", "1.4"),
     "firmware.initial_version: '1.4' is not a version like 1.4.2"),
    ("control-in-region", _set("region", "us\x1b[31m-west"),
     "region: 'us\\x1b[31m-west': control character U+001B is not allowed"),
]


@pytest.mark.parametrize(("mutate", "expected"), [c[1:] for c in CART_CASES], ids=[c[0] for c in CART_CASES])
def test_cart_refusal(tmp_path, mutate, expected):
    data = _cart()
    mutate(data)
    path = _yaml(tmp_path / "cart-01.yaml", data)
    assert _refused(load_cart, path) == f"{path}: {expected}"


@pytest.mark.skipif(not _zones(), reason="no time zone database on this machine")
def test_cart_offset_must_be_its_time_zones(tmp_path):
    data = _cart()
    data["utc_offset_hours"] = 3
    path = _yaml(tmp_path / "cart-01.yaml", data)
    assert _refused(load_cart, path) == (f"{path}: utc_offset_hours: 3 is not an offset of America/Los_Angeles "
                                         "(-8 or -7)")


def test_a_rig_names_the_bad_cart_file(tmp_path):
    configs = tmp_path / "configs"
    (configs / "carts").mkdir(parents=True)
    (configs / "profiles").mkdir()
    (configs / "profiles/reference.yaml").write_bytes((ROOT / "configs/profiles/reference.yaml").read_bytes())
    cart = _cart()
    cart["sensors"] = ["imu", "gnss\u202e"]
    cart_file = _yaml(configs / "carts/cart-01.yaml", cart)
    data = _virtual()
    data["configs"] = str(configs)
    data["slots"] = data["slots"][:1]
    rig = _yaml(tmp_path / "rig.yaml", data)
    assert _refused(Rig.load, rig) == (f"{cart_file}: sensors.1: 'gnss\\u202e': bidirectional-override character "
                                       "U+202E is not allowed")


# ---------------------------------------------------------------- console profiles

PROFILE_CASES = [
    ("line-ending", _set("line_ending", "\n\n"), "line_ending: Input should be '\\n', '\\r\\n' or '\\r'"),
    ("bidi-in-prompt", _set("prompt", "cart\u202e> "),
     "prompt: 'cart\\u202e> ': bidirectional-override character U+202E is not allowed"),
    ("nul-in-send", _set("commands", "reboot", "send", "\x00reboot"),
     "commands.reboot.send: '\\x00reboot': control character U+0000 is not allowed"),
    ("c1-control", _set("prompt", "cart\x9b> "), "prompt: 'cart\\x9b> ': control character U+009B is not allowed"),
    ("control-in-family", _set("family", "reference\r"),
     "family: 'reference\\r': control character U+000D is not allowed"),
    ("family-not-the-file", _set("family", "other"), "family: 'other' does not match the file name 'reference'"),
    ("banner-groups", _set("patterns", "banner", "^BOOT: (?P<slot>.)"),
     "patterns.banner: no group (?P<bl_version>...), (?P<version>...), (?P<config>...), (?P<mode>...)"),
    ("recovery-regex", _set("recovery", "load", "done", "^ok ("),
     "recovery.load.done: bad regex '^ok (': missing ), unterminated subpattern at position 4"),
    ("recovery-ready-missing", lambda d: d["recovery"]["load"].pop("ready"),
     "recovery: load.ready: missing (the harness waits for it)"),
    ("recovery-send-placeholder", _set("recovery", "erase", "send", "erase {slto}"),
     "recovery: erase.send: 'erase {slto}': unknown placeholder {slto}; known: {slot}"),
    ("required-command-placeholder", _set("commands", "version", "send", "version {x}"),
     "commands.version.send: 'version {x}': unknown placeholder {x}; known: none"),
    ("conversion", _set("commands", "bench_mqtt", "send", "bench {count!r}"),
     "commands.bench_mqtt.send: 'bench {count!r}': a placeholder is a plain {name}, not {count!r}"),
    ("pattern-name", _set("patterns", "Bad Key", "x"),
     "patterns: 'Bad Key' is not a name (a-z, 0-9 and '_', starting with a letter)"),
    ("class-constant-injection", _set("REQUIRED_PATTERNS", []), "REQUIRED_PATTERNS: unknown field"),
]


@pytest.mark.parametrize(("mutate", "expected"), [c[1:] for c in PROFILE_CASES], ids=[c[0] for c in PROFILE_CASES])
def test_profile_refusal(tmp_path, mutate, expected):
    data = _profile()
    mutate(data)
    path = _yaml(tmp_path / "reference.yaml", data)
    assert _refused(load_profile, path) == f"{path}: {expected}"


def test_profile_strings_may_hold_what_a_serial_console_needs(tmp_path):
    data = _profile()
    data["commands"]["reboot"]["send"] = "\x03reboot"   # Ctrl-C first
    data["recovery"]["enter"] = "\x1b\r"                # ESC, CR
    path = _yaml(tmp_path / "reference.yaml", data)
    prof = load_profile(path)
    assert prof.line_ending == "\r\n" and prof.commands["reboot"].send == "\x03reboot"


def test_selection_by_a_tag_no_cart_has_is_refused():
    rig = Rig.load(ROOT / "rigs/virtual.yaml")
    with pytest.raises(ConfigError) as ei:
        rig.select(tags=["rev-z"])
    assert str(ei.value) == f"{rig.path}: no cart of the rig has tag 'rev-z'"


def test_shipped_rigs_pass_the_stricter_check():
    for name in ("virtual", "lab-example"):
        res = subprocess.run([str(HIL), "rig", "check", str(ROOT / f"rigs/{name}.yaml")],
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        assert res.stdout.startswith(f"{ROOT / 'rigs' / name}.yaml: ")


# ---------------------------------------------------------------- the real entry points

ENTRY_CASES = [
    ("bidi-name", lambda p: _yaml(p, _virtual() | {"name": "a\u202eb"}),
     "name: 'a\\u202eb': bidirectional-override character U+202E is not allowed"),
    ("duplicate-key", lambda p: p.write_text("name: a\nname: b\n"), "line 2: duplicate key 'name'"),
    ("not-utf8", lambda p: p.write_bytes(b"name: \xff\n"), "line 1: not UTF-8 (byte 0xff at offset 6)"),
]


@pytest.mark.parametrize(("write", "expected"), [c[1:] for c in ENTRY_CASES], ids=[c[0] for c in ENTRY_CASES])
@pytest.mark.parametrize("entry", ["rig-check", "gate", "pytest"])
def test_entry_points_print_one_line_and_exit_2(tmp_path, entry, write, expected):
    bad = tmp_path / "bad.yaml"
    write(bad)
    cmd = {
        "rig-check": [str(HIL), "rig", "check", str(bad)],
        "gate": [str(HIL), "gate", "--rig", str(bad)],
        "pytest": [sys.executable, "-m", "pytest", "--rig", str(bad), "test_suites",
                   "--hil-reports", str(tmp_path / "reports")],
    }[entry]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    out = res.stdout + res.stderr
    assert res.returncode == 2, out
    assert "Traceback" not in out and "INTERNALERROR" not in out, out
    line = f"hil: {bad}: {expected}"
    lines = [ln.removeprefix("Exit: ") for ln in out.splitlines() if ln.strip()]
    assert lines == [line], out
    assert not (tmp_path / "reports").exists(), "nothing ran, nothing was written"


# ---------------------------------------------------------------- anything at all: load, or one line

def _paths(node, loc=()):
    yield loc
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, (*loc, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, (*loc, i))


_TRICKY = ["", "..", "../x", "/etc/passwd", "\u202e", "\x00", "\r\n", "nan", ".inf", "{version}", "{0}", "{",
           "TCPIP0::127.0.0.1::47101::SOCKET", "cart-01", "psu-a", "x" * 300, "0.0.0.0", "rfc2217://h:1"]
_SCALARS = (st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
            | st.sampled_from(_TRICKY))
_KEYS = st.text(max_size=8) | st.sampled_from(["slot", "cart", "name"])
_VALUES = st.recursive(_SCALARS, lambda c: st.lists(c, max_size=4) | st.dictionaries(_KEYS, c, max_size=4),
                       max_leaves=12)


def _mutated(data, base: dict) -> dict:
    doc = copy.deepcopy(base)
    for _ in range(data.draw(st.integers(1, 3))):
        loc = data.draw(st.sampled_from(list(_paths(doc))))
        value = data.draw(_VALUES)
        if not loc:
            doc = value if data.draw(st.booleans()) else doc
            continue
        parent = doc
        for k in loc[:-1]:
            parent = parent[k]
        if isinstance(parent, dict) and data.draw(st.booleans()):
            parent.pop(loc[-1], None)
        else:
            parent[loc[-1]] = value
    return doc


def _loads_or_one_line(loader, path: Path) -> None:
    try:
        loader(path)
    except ConfigError as exc:
        msg = str(exc)
        assert "\n" not in msg and msg.isprintable(), repr(msg)
        assert re.match(r"/\S+\.yaml:", msg), msg  # names a file


LOADERS = {"rig": (Rig.load, _virtual, "rig.yaml"), "cart": (load_cart, _cart, "cart-01.yaml"),
           "profile": (load_profile, _profile, "reference.yaml")}
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize("kind", list(LOADERS))
@FUZZ
@given(data=st.data())
def test_any_mutation_loads_or_is_one_line(kind, data):
    loader, base, name = LOADERS[kind]
    doc = _mutated(data, base())
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / name
        path.write_text(yaml.safe_dump(doc, sort_keys=False, allow_unicode=False))
        _loads_or_one_line(loader, path)


@pytest.mark.parametrize("kind", list(LOADERS))
@FUZZ
@given(content=st.binary(max_size=400) | st.text(max_size=400).map(lambda t: t.encode("utf-8", "surrogatepass")))
def test_any_bytes_load_or_are_one_line(kind, content):
    loader, _, name = LOADERS[kind]
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / name
        path.write_bytes(content)
        _loads_or_one_line(loader, path)
