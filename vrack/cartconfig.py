"""The virtual rack's own reader of a cart configuration (`configs/carts/<id>.yaml`).

The format is written down in docs/interfaces.md. This reader takes what the virtual rack
needs (identity, flash geometry, sensors, boot timing, firmware, supply draw, trust) and
keeps the whole mapping in `raw` for the firmware's `hal.config`. Every error is one line naming
the file and the field, e.g. `configs/carts/cart-01.yaml: flash.page_size: expected 2048 or 4096, got 1000`.

It also holds the rack's reading of configuration files at the door (`read_yaml_file`, `check_tree`),
shared with the rig loader in vrack.rack: at most 1 MiB of UTF-8, YAML without duplicate keys, only
JSON-like values (mappings with string keys, lists, strings, finite numbers, booleans, null), no
control or bidirectional-override characters, strings of at most 256 characters, ids of at most 64
matching `^[a-z0-9][a-z0-9-]*$` (an id becomes part of a file name: no path ever comes from one).
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PAGE_SIZES = (2048, 4096)  # the emulated part; the harness accepts any power of two 256..65536

# bounds shared with the harness's reading of the same files (harness/config.py)
MAX_FILE_BYTES = 1 << 20
MAX_ID_CHARS = 64
MAX_STRING_CHARS = 256
MAX_SLOT_SIZE = 64 << 20
MAX_SENSORS = 32
MAX_PROVISIONED_CAS = 16
MAX_VALUES = 100_000  # values in one file, aliases counted each time they are used
MAX_DEPTH = 32
MAX_CLOCK_DRIFT_S = 100 * 365 * 86400  # `clock.drift_s`: a cart's RTC error as deployed, at most 100 years either way

ID_RE = re.compile(r"[a-z0-9][a-z0-9-]*")
VERSION_RE = re.compile(r"\d{1,9}\.\d{1,9}\.\d{1,9}")
#: bidirectional marks, embeddings, overrides and isolates: text that displays other than it reads
BIDI_CHARS = frozenset(chr(c) for c in (0x061C, 0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x2066, 0x206A)))


def bad_char(text: str) -> str | None:
    """The first control, bidirectional-override or surrogate character of `text`, as U+XXXX, or None."""
    for ch in text:
        o = ord(ch)
        if o < 0x20 or 0x7F <= o <= 0x9F or ch in BIDI_CHARS or 0xD800 <= o <= 0xDFFF:
            return f"U+{o:04X}"
    return None


def printable(value: Any, limit: int = 80) -> str:
    """`value` for an error message: repr (which escapes control and format characters), one line, short."""
    text = repr(value)
    for ch in BIDI_CHARS:
        text = text.replace(ch, f"\\u{ord(ch):04x}")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def one_line(text: str) -> str:
    """An error message as exactly one line: controls, line and paragraph separators and bidi marks escaped."""
    out = []
    for ch in text:
        o = ord(ch)
        if o < 0x20 or 0x7F <= o <= 0x9F or ch in BIDI_CHARS or ch in "\u2028\u2029\x85" or 0xD800 <= o <= 0xDFFF:
            out.append(f"\\x{o:02x}" if o < 0x100 else f"\\u{o:04x}")
        else:
            out.append(ch)
    return "".join(out)


@functools.cache
def _unique_key_loader() -> type:
    """yaml.SafeLoader that refuses a mapping with the same key twice (PyYAML keeps the last one
    silently). Made on first use: a cart boots from the JSON copy without importing yaml."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            if isinstance(node, yaml.MappingNode):
                seen: set[Any] = set()
                for key_node, _ in node.value:
                    if key_node.tag == "tag:yaml.org,2002:merge":
                        continue  # `<<: *base`: explicit keys may override merged ones
                    key = self.construct_object(key_node, deep=True)
                    try:
                        dup = key in seen
                        seen.add(key)
                    except TypeError:
                        continue  # unhashable: the base constructor says so
                    if dup:
                        raise yaml.constructor.ConstructorError(
                            "while constructing a mapping", node.start_mark,
                            f"duplicate key {printable(key)}", key_node.start_mark)
            return super().construct_mapping(node, deep=deep)

    return UniqueKeyLoader


def read_text_file(path: Path, error: Callable[[str], Exception]) -> str:
    """The UTF-8 text of a configuration file of at most MAX_FILE_BYTES; `error(msg)` otherwise."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        raise error(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise error(f"{path}: cannot read: not a regular file")
        if st.st_size > MAX_FILE_BYTES:
            raise error(f"{path}: {st.st_size} bytes, more than the {MAX_FILE_BYTES} a configuration file may have")
        with os.fdopen(os.dup(fd), "rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise error(f"{path}: cannot read: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    if len(raw) > MAX_FILE_BYTES:
        raise error(f"{path}: more than the {MAX_FILE_BYTES} bytes a configuration file may have")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{path}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start})") from None


def parse_yaml(text: str, source: str, error: Callable[[str], Exception]) -> Any:
    """YAML (safe subset, no duplicate keys) to Python; one-line `error` naming `source` and the line."""
    import yaml

    try:
        return yaml.load(text, Loader=_unique_key_loader())  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" line {mark.line + 1}:" if mark else ""
        raise error(one_line(f"{source}:{where} not valid YAML: {exc.problem or exc.context}")) from None
    except RecursionError:
        raise error(f"{source}: not valid YAML: nested too deeply") from None
    except Exception as exc:  # noqa: BLE001 - PyYAML's constructors raise ValueError, OverflowError, ...
        raise error(one_line(f"{source}: not valid YAML: {type(exc).__name__}: {exc}")[:300]) from None


def parse_json(text: str, source: str, error: Callable[[str], Exception]) -> Any:
    """JSON to Python, refusing duplicate keys and NaN/Infinity; one-line `error` naming `source`."""

    def pairs(items):
        out = {}
        for k, v in items:
            if k in out:
                raise ValueError(f"duplicate key {printable(k)}")
            out[k] = v
        return out

    def constant(name):
        raise ValueError(f"{name} is not a finite number")

    try:
        return json.loads(text, object_pairs_hook=pairs, parse_constant=constant)
    except RecursionError:
        raise error(f"{source}: not valid JSON: nested too deeply") from None
    except ValueError as exc:
        raise error(one_line(f"{source}: not valid JSON: {exc}")[:300]) from None


def read_yaml_file(path: Path, error: Callable[[str], Exception]) -> Any:
    """read_text_file + parse_yaml."""
    return parse_yaml(read_text_file(path, error), str(path), error)


def field_name(loc: tuple) -> str:
    """('slots', 2, 'console') -> 'slots[2].console'."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def check_text(text: str, limit: int = MAX_STRING_CHARS) -> str | None:
    """Why `text` may not be a configuration string, or None."""
    ch = bad_char(text)
    if ch:
        return f"control or bidirectional-override character {ch} in {printable(text)}"
    if len(text) > limit:
        return f"{len(text)} characters, more than {limit}"
    return None


def check_tree(data: Any, fail: Callable[[tuple, str], Exception]) -> None:
    """Refuse what no field of a rig or cart file may hold, wherever it is: non-JSON values, keys that
    are not strings, non-finite numbers, bad characters, over-long strings, recursion, alias bombs.
    `fail(loc, msg)` makes the exception for the field at `loc` (a tuple of keys and indexes)."""
    count = 0
    stack: set[int] = set()

    def walk(node: Any, loc: tuple) -> None:
        nonlocal count
        count += 1
        if count > MAX_VALUES:
            raise fail((), f"more than {MAX_VALUES} values (aliases counted each time they are used)")
        if len(loc) > MAX_DEPTH:
            raise fail(loc, f"nested deeper than {MAX_DEPTH} levels")
        if node is None or isinstance(node, bool | int):
            return
        if isinstance(node, float):
            if not math.isfinite(node):
                raise fail(loc, f"{node!r} is not a finite number")
            return
        if isinstance(node, str):
            why = check_text(node)
            if why:
                raise fail(loc, why)
            return
        if isinstance(node, dict | list):
            if id(node) in stack:
                raise fail(loc, "refers to itself (a recursive alias)")
            stack.add(id(node))
            if isinstance(node, dict):
                for k, v in node.items():
                    if not isinstance(k, str):
                        raise fail(loc, f"key {printable(k)}: keys must be strings")
                    why = check_text(k)
                    if why:
                        raise fail(loc, f"key: {why}")
                    walk(v, (*loc, k))
            else:
                for i, v in enumerate(node):
                    walk(v, (*loc, i))
            stack.discard(id(node))
            return
        raise fail(loc, f"a value of type {type(node).__name__} is not allowed here")

    walk(data, ())


class CartConfigError(ValueError):
    """A cart configuration is missing a field or has a bad value."""


@dataclass(frozen=True)
class FlashGeometry:
    page_size: int
    slot_size: int
    page_program_ms: float


@dataclass(frozen=True)
class BootTiming:
    expected_s: float
    autoboot_window_s: float
    mark_good_window_s: float


@dataclass(frozen=True)
class FirmwareInfo:
    family: str
    initial_version: str


@dataclass(frozen=True)
class Draw:
    """Plausible supply current per cart state, amps (read by the rack's supplies)."""

    booting: float
    idle: float
    flash_write: float


@dataclass(frozen=True)
class CartConfig:
    id: str
    hardware_revision: str
    flash: FlashGeometry
    sensors: tuple[str, ...]
    boot: BootTiming
    firmware: FirmwareInfo
    draw: Draw
    provisioned_cas: tuple[str, ...]
    clock_drift_s: float = 0.0  # `clock.drift_s` (optional): how far the RTC is off UTC as deployed, + ahead
    source: str = "<mapping>"
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)


class _Reader:
    def __init__(self, data: Any, source: str):
        self.source = source
        if not isinstance(data, Mapping):
            raise CartConfigError(one_line(f"{source}: expected a mapping at the top level, got {type(data).__name__}"))
        self.data = data

    def fail(self, name: str, msg: str) -> CartConfigError:
        return CartConfigError(one_line(f"{self.source}: {name}: {msg}"))

    def get(self, name: str) -> Any:
        node: Any = self.data
        walked = []
        for part in name.split("."):
            if not isinstance(node, Mapping):
                raise self.fail(".".join(walked), f"expected a mapping, got {type(node).__name__}")
            if part not in node:
                raise self.fail(name, "missing")
            node = node[part]
            walked.append(part)
        return node

    def string(self, name: str) -> str:
        value = self.get(name)
        if isinstance(value, bool) or not isinstance(value, str | int | float) or str(value) == "":
            raise self.fail(name, f"expected a non-empty string, got {printable(value)}")
        return str(value)

    def ident(self, name: str) -> str:
        """An id: it becomes part of file names, so only `^[a-z0-9][a-z0-9-]*$`, at most 64 characters."""
        value = self.get(name)
        if not isinstance(value, str) or not ID_RE.fullmatch(value) or len(value) > MAX_ID_CHARS:
            raise self.fail(name, f"expected an id (^[a-z0-9][a-z0-9-]*$, at most {MAX_ID_CHARS} characters), "
                                  f"got {printable(value)}")
        return value

    def integer(self, name: str) -> int:
        value = self.get(name)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(name, f"expected an integer, got {printable(value)}")
        return value

    def number(self, name: str, *, positive: bool = False) -> float:
        value = self.get(name)
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise self.fail(name, f"expected a number, got {printable(value)}")
        if value < 0 or (positive and value == 0):
            raise self.fail(name, f"expected a {'positive' if positive else 'non-negative'} number, "
                                  f"got {printable(value)}")
        return float(value)

    def drift(self) -> float:
        """`clock.drift_s`: optional (0 when it or `clock` is absent), finite, within ±MAX_CLOCK_DRIFT_S seconds."""
        if "clock" not in self.data:
            return 0.0
        clock = self.data["clock"]
        if not isinstance(clock, Mapping):
            raise self.fail("clock", f"expected a mapping, got {printable(clock)}")
        if "drift_s" not in clock:
            return 0.0
        value = clock["drift_s"]
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise self.fail("clock.drift_s", f"expected a number of seconds, got {printable(value)}")
        if abs(value) > MAX_CLOCK_DRIFT_S:
            raise self.fail("clock.drift_s", f"{value:g} s is more than 100 years ({MAX_CLOCK_DRIFT_S} s) either way")
        return float(value)

    def strings(self, name: str, limit: int, *, ids: bool = False) -> tuple[str, ...]:
        value = self.get(name)
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise self.fail(name, f"expected a list of names, got {printable(value)}")
        if len(value) > limit:
            raise self.fail(name, f"{len(value)} entries, more than {limit}")
        if ids:
            for i, v in enumerate(value):
                if not ID_RE.fullmatch(v) or len(v) > MAX_ID_CHARS:
                    raise self.fail(f"{name}[{i}]", f"expected an id (^[a-z0-9][a-z0-9-]*$, at most "
                                                    f"{MAX_ID_CHARS} characters), got {printable(v)}")
        return tuple(value)


def config_from_mapping(data: Any, source: str = "<mapping>") -> CartConfig:
    """Validate a parsed cart configuration; `source` names it in errors."""
    r = _Reader(data, source)
    check_tree(data, lambda loc, msg: CartConfigError(one_line(f"{source}: {field_name(loc)}: {msg}")))
    page_size = r.integer("flash.page_size")
    if page_size not in PAGE_SIZES:
        raise r.fail("flash.page_size", f"expected 2048 or 4096, got {page_size}")
    slot_size = r.integer("flash.slot_size")
    if slot_size <= 0 or slot_size % page_size or slot_size > MAX_SLOT_SIZE:
        raise r.fail("flash.slot_size", f"expected a positive multiple of page_size ({page_size}) of at most "
                                        f"{MAX_SLOT_SIZE}, got {slot_size}")
    version = r.string("firmware.initial_version")
    if not VERSION_RE.fullmatch(version):
        raise r.fail("firmware.initial_version", f"expected a version like 1.4.2, got {printable(version)}")
    boot = BootTiming(
        expected_s=r.number("boot.expected_s", positive=True),
        autoboot_window_s=r.number("boot.autoboot_window_s"),
        mark_good_window_s=r.number("boot.mark_good_window_s", positive=True),
    )
    return CartConfig(
        id=r.ident("id"),
        hardware_revision=r.string("hardware_revision"),
        flash=FlashGeometry(page_size, slot_size, r.number("flash.page_program_ms")),
        sensors=r.strings("sensors", MAX_SENSORS),
        boot=boot,
        firmware=FirmwareInfo(r.ident("firmware.family"), version),
        draw=Draw(r.number("draw.booting"), r.number("draw.idle"), r.number("draw.flash_write")),
        provisioned_cas=r.strings("provisioned_cas", MAX_PROVISIONED_CAS, ids=True),
        clock_drift_s=r.drift(),
        source=source,
        raw=dict(data),
    )


def load_cart(path: str | Path) -> CartConfig:
    """Read and validate `configs/carts/<id>.yaml` (or the rack's JSON copy of it)."""
    path = Path(path)
    text = read_text_file(path, lambda msg: CartConfigError(one_line(msg)))
    if path.suffix == ".json":  # the rack hands carts a JSON copy: a cart boots without loading YAML
        data = parse_json(text, str(path), CartConfigError)
    else:
        data = parse_yaml(text, str(path), CartConfigError)
    return config_from_mapping(data, str(path))


def as_cart_config(cfg: CartConfig | Mapping[str, Any] | str | Path) -> CartConfig:
    """Accept a CartConfig, a parsed mapping or a path to the YAML file."""
    if isinstance(cfg, CartConfig):
        return cfg
    if isinstance(cfg, Mapping):
        return config_from_mapping(cfg)
    return load_cart(cfg)
