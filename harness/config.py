"""Rig, cart and console-profile configuration: load, validate, explain.

Every error is one line naming the file, the slot (where there is one) and the field, e.g.
``rigs/lab.yaml: slot 3 (cart-03): channel: 4 is beyond psu-a's 3 channels``.

What is read at the door is refused unless it is plainly sane (the same bounds as the virtual
rack's own reader, vrack/cartconfig.py): a regular UTF-8 file of at most 1 MiB, YAML without
duplicate keys, at most 32 levels deep and 100 000 values; keys are strings; numbers finite;
strings at most 256 characters without control, format or bidirectional characters (a console
profile's strings may hold the C0 controls a serial line needs, like "\\r\\n"); ids (cart, slot
cart, supply, rig, CA, firmware family, tags, sensors, hardware revision) match
``^[a-z0-9][a-z0-9-]*$`` and are at most 64 characters, so no id ever reaches the file system
as a path. A virtual rig listens on loopback only, on ports nobody else in the rig uses.
"""

from __future__ import annotations

import datetime as dt
import functools
import ipaddress
import math
import os
import re
import shlex
import stat
import string
import unicodedata
from collections.abc import Callable, Iterable
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

if TYPE_CHECKING:
    from harness.power.ratings import ModelRatings

# ---------------------------------------------------------------- bounds (shared with vrack/cartconfig.py)

MAX_FILE_BYTES = 1 << 20          # a configuration file
MAX_DEPTH = 32                    # nesting levels
MAX_VALUES = 100_000              # values in one file, an alias counted each time it is used
MAX_TEXT = 256                    # characters in any string
MAX_ID = 64                       # characters in an id
MAX_SLOTS = 64
MAX_SLOT_NUMBER = 9999
MAX_SUPPLIES = 32
MAX_CHANNELS = 8
MAX_SENSORS = 32
MAX_CAS = 16
MAX_TAGS = 32
PAGE_SIZE_MIN, PAGE_SIZE_MAX = 256, 65536
MAX_SLOT_SIZE = 64 << 20
MAX_VOLTAGE = 60.0                # what the rack's supplies (and vrack's emulated ones) can set
MAX_CURRENT = 10.0
MAX_CLOCK_DRIFT_S = 100 * 365 * 86400  # a cart's configured RTC error: at most 100 years either way
ID_RE = re.compile(r"[a-z0-9][a-z0-9-]*")
NAME_RE = re.compile(r"[a-z][a-z0-9_]*")  # keys of a profile's patterns and commands
VIRTUAL_HOSTS = ("127.0.0.1", "localhost")  # where a virtual rack's supplies and broker listen
_BIDI = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def _printable(text: str) -> str:
    """`text` as one printable line: control, format, separator and surrogate characters escaped."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() or c == " " else c.encode("unicode_escape").decode("ascii") for c in text)


class ConfigError(Exception):
    """A configuration file is wrong; the message is one line naming file, slot and field."""

    def __init__(self, message: str):
        super().__init__(_printable(str(message)))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def _id(v: str) -> str:
    if len(v) > MAX_ID or not ID_RE.fullmatch(v):
        raise ValueError(f"{v!r} is not an id (a-z, 0-9 and '-', not starting with '-', "
                         f"at most {MAX_ID} characters)")
    return v


Id = Annotated[str, AfterValidator(_id)]


def _unique(items: list[str]) -> list[str]:
    seen: set[str] = set()
    for x in items:
        if x in seen:
            raise ValueError(f"{x!r} is listed twice")
        seen.add(x)
    return items


def _template(text: str, allowed: Iterable[str], what: str = "") -> set[str]:
    """The {placeholders} of a str.format template, each one a plain name out of `allowed`."""
    allowed = set(allowed)
    names: set[str] = set()
    try:
        parsed = list(string.Formatter().parse(text))
    except ValueError as exc:
        raise ValueError(f"{what}{text!r} is not a valid template: {exc}") from None
    for _, name, spec, conv in parsed:
        if name is None:
            continue
        if not name.isidentifier() or spec or conv:
            raise ValueError(f"{what}{text!r}: a placeholder is a plain {{name}}, not {{{name}"
                             f"{'!' + conv if conv else ''}{':' + spec if spec else ''}}}")
        if name not in allowed:
            known = ", ".join(f"{{{n}}}" for n in sorted(allowed)) or "none"
            raise ValueError(f"{what}{text!r}: unknown placeholder {{{name}}}; known: {known}")
        names.add(name)
    return names


def _host(v: str) -> str:
    """A host name or an IP address literal."""
    try:
        ipaddress.ip_address(v)
        return v
    except ValueError:
        pass
    label = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    if len(v) > 253 or not re.fullmatch(rf"{label}(?:\.{label})*", v):
        raise ValueError(f"{v!r} is not a host name or an IP address")
    return v


Host = Annotated[str, AfterValidator(_host)]


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# ---------------------------------------------------------------- cart configuration


class FlashGeometry(_Strict):
    page_size: int = Field(ge=PAGE_SIZE_MIN, le=PAGE_SIZE_MAX)
    slot_size: int = Field(gt=0, le=MAX_SLOT_SIZE)
    page_program_ms: float = Field(gt=0, le=1000)

    @model_validator(mode="after")
    def _slot_whole_pages(self) -> FlashGeometry:
        if self.page_size & (self.page_size - 1):
            raise ValueError(f"page_size {self.page_size} is not a power of two")
        if self.slot_size % self.page_size:
            raise ValueError(f"slot_size {self.slot_size} is not a multiple of page_size {self.page_size}")
        return self


class Connectivity(_Strict):
    primary: str
    fallback: str | None = None


def version_key(v: str) -> tuple[int, ...]:
    """A version like 1.4.2 as a sortable tuple (a suffix after '-' is ignored)."""
    return tuple(int(x) for x in v.split("-", 1)[0].split("."))


class FirmwareInfo(_Strict):
    family: Id
    initial_version: str
    #: the versions carts of this configuration run in the field: the release gate updates the candidate
    #: from each (a cart reaches one from the factory version by OTA). Default: the factory version alone.
    field_versions: list[str] = Field(default_factory=list, max_length=8)

    @field_validator("initial_version")
    @classmethod
    def _semver(cls, v: str) -> str:
        if not re.fullmatch(r"\d{1,9}\.\d{1,9}\.\d{1,9}", v):
            raise ValueError(f"{v!r} is not a version like 1.4.2")
        return v

    @field_validator("field_versions")
    @classmethod
    def _semvers(cls, vs: list[str]) -> list[str]:
        for v in vs:
            cls._semver(v)
        if len(set(vs)) != len(vs):
            raise ValueError(f"a version is listed twice: {vs}")
        return vs

    @model_validator(mode="after")
    def _reachable(self) -> FirmwareInfo:
        low = [v for v in self.field_versions if version_key(v) < version_key(self.initial_version)]
        if low:
            raise ValueError(f"field version {low[0]} is below initial_version {self.initial_version}: a cart "
                             "cannot reach it (no downgrade)")
        return self

    @property
    def versions_in_field(self) -> list[str]:
        """The field versions, oldest first (the factory version when none are listed)."""
        return sorted(self.field_versions or [self.initial_version], key=version_key)


class SupplyLimits(_Strict):
    voltage: float = Field(gt=0, le=MAX_VOLTAGE)
    max_voltage: float = Field(gt=0, le=MAX_VOLTAGE)
    current_limit: float = Field(gt=0, le=MAX_CURRENT)

    @model_validator(mode="after")
    def _nominal_within_max(self) -> SupplyLimits:
        if self.voltage > self.max_voltage:
            raise ValueError(f"voltage {self.voltage} exceeds max_voltage {self.max_voltage}")
        return self


class Draw(_Strict):
    booting: float = Field(ge=0, le=MAX_CURRENT)
    idle: float = Field(ge=0, le=MAX_CURRENT)
    flash_write: float = Field(ge=0, le=MAX_CURRENT)


class BootTiming(_Strict):
    expected_s: float = Field(gt=0, le=3600)
    autoboot_window_s: float = Field(gt=0, le=3600)
    mark_good_window_s: float = Field(gt=0, le=86400)


@functools.cache
def _zones() -> frozenset[str]:
    import zoneinfo

    try:
        return frozenset(zoneinfo.available_timezones())
    except Exception:  # noqa: BLE001 - no time zone database here: names are checked by their form only
        return frozenset()


def _zone_offsets(name: str) -> set[float]:
    """The UTC offsets (hours) of a zone this year, winter and summer; empty without a tz database."""
    if name not in _zones():
        return set()
    import zoneinfo

    z = zoneinfo.ZoneInfo(name)
    year = dt.date.today().year
    return {dt.datetime(year, m, 15, tzinfo=z).utcoffset().total_seconds() / 3600 for m in (1, 7)}


class ClockSpec(_Strict):
    """How far the cart's RTC is off true UTC as deployed (seconds, + ahead): the plugin sets the RTC so
    before the cart's first test of a session (drift 0 included). Updates must not depend on it: the device
    asks the time service."""

    drift_s: float = 0.0

    @field_validator("drift_s", mode="before")
    @classmethod
    def _bounded(cls, v: Any) -> float:
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise ValueError(f"expected a number of seconds, got {v!r}")
        if abs(v) > MAX_CLOCK_DRIFT_S:
            raise ValueError(f"{v:g} s is more than 100 years ({MAX_CLOCK_DRIFT_S} s) either way")
        return float(v)


class CartConfig(_Strict):
    id: Id
    hardware_revision: Id
    flash: FlashGeometry
    sensors: Annotated[list[Id], AfterValidator(_unique)] = Field(min_length=1, max_length=MAX_SENSORS)
    region: str
    timezone: str
    utc_offset_hours: float = Field(ge=-12, le=14)
    connectivity: Connectivity
    provisioned_cas: Annotated[list[Id], AfterValidator(_unique)] = Field(min_length=1, max_length=MAX_CAS)
    firmware: FirmwareInfo
    supply: SupplyLimits
    draw: Draw
    boot: BootTiming
    tags: Annotated[list[Id], AfterValidator(_unique)] = Field(default_factory=list, max_length=MAX_TAGS)
    clock: ClockSpec = ClockSpec()

    @field_validator("timezone")
    @classmethod
    def _zone(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_+-]*(?:/[A-Za-z0-9_+-]+)*", v) or (_zones() and v not in _zones()):
            raise ValueError(f"{v!r} is not a time zone name like Europe/Berlin")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> CartConfig:
        offsets = _zone_offsets(self.timezone)
        if offsets and self.utc_offset_hours not in offsets:
            shown = " or ".join(f"{o:g}" for o in sorted(offsets))
            raise ValueError(f"utc_offset_hours: {self.utc_offset_hours:g} is not an offset of "
                             f"{self.timezone} ({shown})")
        for state in ("booting", "idle", "flash_write"):
            amps = getattr(self.draw, state)
            if amps > self.supply.current_limit:
                raise ValueError(f"draw.{state}: {amps:g} A exceeds supply.current_limit "
                                 f"{self.supply.current_limit:g} A")
        return self


# ---------------------------------------------------------------- console profile


class CommandSpec(_Strict):
    send: str
    parse: str | None = None


class RecoveryStep(_Strict):
    send: str
    ready: str | None = None
    done: str | None = None
    parse: str | None = None


class RecoveryProfile(_Strict):
    enter: str
    prompt: str
    mode: str
    info: RecoveryStep
    load: RecoveryStep
    trust: RecoveryStep
    bcb_reset: RecoveryStep
    erase: RecoveryStep
    boot: RecoveryStep
    error: str
    chunk: int = Field(gt=0, le=4096)
    end: str
    state_reset: RecoveryStep | None = None  # a family with a device state region (security counter, time floor)

    #: what the harness formats each step's `send` with, and which reply patterns it waits for
    STEPS: ClassVar[tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...]] = (
        ("info", (), ("done|parse",)),
        ("load", ("slot", "size", "sha256"), ("ready", "done")),
        ("trust", ("size", "sha256"), ("ready", "done")),
        ("state_reset", (), ("done|parse",)),
        ("bcb_reset", ("slot",), ("done|parse",)),
        ("erase", ("slot",), ("done|parse",)),
        ("boot", (), ()),
    )

    def steps(self) -> list[tuple[str, RecoveryStep]]:
        """(name, step) of every step this profile has, in STEPS order."""
        return [(name, getattr(self, name)) for name, _, _ in self.STEPS if getattr(self, name) is not None]

    @model_validator(mode="after")
    def _steps_usable(self) -> RecoveryProfile:
        for name, fields, needs in self.STEPS:
            step: RecoveryStep | None = getattr(self, name)
            if step is None:  # an optional step this family does not have
                continue
            _template(step.send, fields, f"{name}.send: ")
            for need in needs:
                if not any(getattr(step, k) for k in need.split("|")):
                    raise ValueError(f"{name}.{need.split('|')[0]}: missing (the harness waits for it)")
        return self


class ConsoleProfile(_Strict):
    family: Id
    line_ending: Literal["\n", "\r\n", "\r"]
    prompt: str = Field(min_length=1)
    echo: bool
    error: str
    patterns: dict[str, str] = Field(max_length=256)
    commands: dict[str, CommandSpec] = Field(max_length=256)
    recovery: RecoveryProfile

    REQUIRED_PATTERNS: ClassVar[tuple[str, ...]] = ("bootloader", "autoboot", "banner", "ready")
    REQUIRED_COMMANDS: ClassVar[tuple[str, ...]] = ("version", "slot_status", "slot_hash", "rtc_get", "rtc_set",
                                                    "sensors", "reboot")
    #: what the harness reads out of a boot banner
    BANNER_GROUPS: ClassVar[tuple[str, ...]] = ("bl_version", "slot", "version", "config", "mode")
    #: placeholders the harness fills in when it sends a required command
    COMMAND_FIELDS: ClassVar[dict[str, tuple[str, ...]]] = {"rtc_set": ("time",)}
    #: groups the harness reads from a command's reply (harness/cart.py), where the profile has the command.
    #: None of them is optional: an update's checks compare the boot and rollback counts before and after
    #: (slot_status) and the new slot's stored image with the image sent (slot_hash `image`); a profile
    #: that cannot read one is refused rather than the check skipped.
    COMMAND_GROUPS: ClassVar[dict[str, tuple[str, ...]]] = {
        "slot_status": ("active", "booted", "pending", "tries", "confirmed", "boots", "rollbacks"),
        "slot_hash": ("slot", "sha256", "image"),
        "rtc_get": ("time",), "trust_list": ("name", "fp"), "time_sync": ("result", "t", "reason"),
        "device_state": ("counter", "floor"),
    }

    @field_validator("patterns", "commands")
    @classmethod
    def _names(cls, v: dict) -> dict:
        for k in v:
            if not NAME_RE.fullmatch(k) or len(k) > MAX_ID:
                raise ValueError(f"{k!r} is not a name (a-z, 0-9 and '_', starting with a letter)")
        return v

    @model_validator(mode="after")
    def _complete_and_compilable(self) -> ConsoleProfile:
        for key in self.REQUIRED_PATTERNS:
            if key not in self.patterns:
                raise ValueError(f"patterns.{key}: missing")
        for key in self.REQUIRED_COMMANDS:
            if key not in self.commands:
                raise ValueError(f"commands.{key}: missing")
        regexes = {f"patterns.{k}": v for k, v in self.patterns.items()}
        regexes |= {f"commands.{k}.parse": c.parse for k, c in self.commands.items() if c.parse}
        regexes["error"] = self.error
        rec = self.recovery
        regexes |= {"recovery.mode": rec.mode, "recovery.error": rec.error}
        for name, step in rec.steps():
            regexes |= {f"recovery.{name}.{k}": getattr(step, k) for k in ("ready", "done", "parse")
                        if getattr(step, k)}
        compiled = {}
        for where, rx in regexes.items():
            try:
                compiled[where] = re.compile(rx)
            except (re.error, RecursionError, OverflowError) as exc:
                raise ValueError(f"{where}: bad regex {rx!r}: {exc}") from None
        missing = [g for g in self.BANNER_GROUPS if g not in compiled["patterns.banner"].groupindex]
        if missing:
            raise ValueError(f"patterns.banner: no group {', '.join(f'(?P<{g}>...)' for g in missing)}")
        for key, groups in self.COMMAND_GROUPS.items():
            if key not in self.commands:
                continue
            rx = compiled.get(f"commands.{key}.parse")
            missing = [g for g in groups if rx is None or g not in rx.groupindex]
            if missing:
                raise ValueError(f"commands.{key}.parse: no group {', '.join(f'(?P<{g}>...)' for g in missing)} "
                                 "(the harness reads it)")
        for key, c in self.commands.items():
            fields = self.COMMAND_FIELDS.get(key, () if key in self.REQUIRED_COMMANDS else None)
            if fields is None:  # a command only suites send: any plain placeholder, their call fills it
                names = {n for _, n, _, _ in _safe_parse(c.send) if n}
                fields = tuple(names)
            _template(c.send, fields, f"commands.{key}.send: ")
        return self

    def pattern(self, key: str) -> re.Pattern[str]:
        return re.compile(self.patterns[key])


def _safe_parse(text: str) -> list:
    try:
        return list(string.Formatter().parse(text))
    except ValueError:
        return [("", "?", "", None)]  # _template reports it


# ---------------------------------------------------------------- rig

VISA_RE = re.compile(
    r"^(TCPIP\d*::[^:]+::(\d+::SOCKET|inst\d+::INSTR|hislip\d+::INSTR)|USB\d*::.+::INSTR|ASRL.+::INSTR)$"
)
_TCPIP_RE = re.compile(r"^TCPIP\d*::([^:]+)::(?:(\d+)::SOCKET|[^:]+::INSTR)$")


class SupplySpec(_Strict):
    name: Id
    resource: str
    dialect: str
    model: str
    channels: int = Field(ge=1, le=MAX_CHANNELS)
    timeout_ms: int = Field(default=1000, ge=10, le=60000)

    @field_validator("resource")
    @classmethod
    def _visa(cls, v: str) -> str:
        if not VISA_RE.match(v):
            raise ValueError(f"{v!r} is not a VISA resource string (e.g. TCPIP0::host::5025::SOCKET)")
        m = _TCPIP_RE.match(v)
        if m:
            _host(m.group(1))
            if m.group(2) is not None and not 1 <= int(m.group(2)) <= 65535:
                raise ValueError(f"{v!r}: port {int(m.group(2))} is not in 1..65535")
        return v

    @field_validator("dialect")
    @classmethod
    def _known_dialect(cls, v: str) -> str:
        from harness.power import DIALECTS

        if v not in DIALECTS:
            raise ValueError(f"unknown dialect {v!r}; known: {', '.join(sorted(DIALECTS))}")
        return v

    @property
    def host(self) -> str | None:
        m = _TCPIP_RE.match(self.resource)
        return m.group(1) if m else None

    @property
    def port(self) -> int | None:
        m = re.match(r"^TCPIP\d*::[^:]+::(\d+)::SOCKET$", self.resource)
        return int(m.group(1)) if m else None


class BrokerSpec(_Strict):
    host: Host
    port: int = Field(ge=1, le=65535)
    ca: Path
    cert: Path
    key: Path


class VirtualSpec(_Strict):
    run_dir: Path
    flash_time_scale: float = Field(gt=0, le=10)
    pki: Path | None = None  # the lab PKI whose root certificates the rack's factory provisions
    supply_rx_log: Path | None = None  # the supplies log every received line here (cut latency, harness/bench.py)


#: what the harness formats recovery file names and the recovery command with (harness/recovery.py)
RECOVERY_FILE_FIELDS = ("version", "cart", "slot")
RECOVERY_COMMAND_FIELDS = ("image", "trust_store", "probe", "cart", "slot")
#: what the harness formats each word of the firmware build command with (harness/ota.py)
BUILD_FIELDS = ("python", "version", "out")


class RecoverySpec(_Strict):
    method: Literal["serial", "command"]
    image: str
    trust_store: str
    command: str | None = None

    @field_validator("image", "trust_store")
    @classmethod
    def _file_template(cls, v: str) -> str:
        _template(v, RECOVERY_FILE_FIELDS)
        return v

    @field_validator("command")
    @classmethod
    def _command_template(cls, v: str | None) -> str | None:
        if v is None:
            return v
        try:
            words = shlex.split(v)
        except ValueError as exc:
            raise ValueError(f"{v!r} is not a command line: {exc}") from None
        if not words:
            raise ValueError("is empty")
        names: set[str] = set()
        for w in words:
            names |= _template(w, RECOVERY_COMMAND_FIELDS)
        if "image" not in names:
            raise ValueError(f"{v!r} does not use {{image}} (the factory image to flash)")
        return v

    @model_validator(mode="after")
    def _command_given(self) -> RecoverySpec:
        if self.method == "command" and not self.command:
            raise ValueError("method 'command' needs a command")
        if self.method == "serial" and self.command:
            raise ValueError("command is only used by method 'command' (method is 'serial')")
        return self


class FirmwareSpec(_Strict):
    """How the lab gets a firmware image of a version (and of a fault build): a command, run
    without a shell. Each word is formatted with {python} (this interpreter), {version}, {out}
    (the file to write); the word "{faults}" becomes "--fault NAME=VALUE" per fault."""

    build: list[str] = Field(min_length=1, max_length=64)

    @field_validator("build")
    @classmethod
    def _placeholders(cls, v: list[str]) -> list[str]:
        used: set[str] = set()
        for i, word in enumerate(v):
            if word == "{faults}":
                continue
            if "{faults}" in word:
                raise ValueError(f"word {i + 1} {word!r}: {{faults}} must be a word of its own")
            used |= _template(word, BUILD_FIELDS, f"word {i + 1} ")
        if v[0] == "{faults}" or not v[0]:
            raise ValueError("the first word must be the program to run")
        for need, what in (("version", "the version to build"), ("out", "the file to write")):
            if need not in used:
                raise ValueError(f"no word uses {{{need}}} ({what})")
        return v


class ImageHostSpec(_Strict):
    """Where the harness's image host listens, and the host name carts use in its URLs."""

    bind: Host = "127.0.0.1"
    port: int = Field(default=0, ge=0, le=65535)
    url_host: Host | None = None


class SlotSpec(_Strict):
    slot: int = Field(ge=1, le=MAX_SLOT_NUMBER)
    cart: Id
    console: str = Field(min_length=1)
    supply: Id
    channel: int = Field(ge=1, le=MAX_CHANNELS)
    probe: str | None = None


class RigSpec(_Strict):
    name: Id
    kind: Literal["virtual", "physical"]
    configs: Path
    power_off_s: float = Field(default=2.0, ge=0, le=60)  # off time of a power cycle (rail fall, caps drain)
    virtual: VirtualSpec | None = None
    broker: BrokerSpec
    supplies: list[SupplySpec] = Field(min_length=1, max_length=MAX_SUPPLIES)
    recovery: RecoverySpec
    firmware: FirmwareSpec | None = None
    image_host: ImageHostSpec = ImageHostSpec()
    slots: list[SlotSpec] = Field(min_length=1, max_length=MAX_SLOTS)


# ---------------------------------------------------------------- fleet inventory (hil rollout check)

MAX_CONFIGURATIONS = 4096
MAX_SECURITY_COUNTER = 2**32 - 1  # an image manifest's security_counter is a u32


class FleetConfiguration(_Strict):
    """One configuration deployed in the field: what a release must suit."""

    id: Id
    hardware_revision: Id
    cas: Annotated[list[Id], AfterValidator(_unique)] = Field(min_length=1, max_length=MAX_CAS)
    security_counter: int = Field(default=0, ge=0, le=MAX_SECURITY_COUNTER)


class Inventory(_Strict):
    configurations: list[FleetConfiguration] = Field(min_length=1, max_length=MAX_CONFIGURATIONS)

    @model_validator(mode="after")
    def _ids_unique(self) -> Inventory:
        seen: set[str] = set()
        for c in self.configurations:
            if c.id in seen:
                raise ValueError(f"configurations: id {c.id!r} is listed twice")
            seen.add(c.id)
        return self


# ---------------------------------------------------------------- reading at the door


class _YamlRefusal(Exception):
    """Raised by the loader (duplicate key, too deep): message and 0-based line."""

    def __init__(self, line: int, message: str):
        super().__init__(message)
        self.line = line


class _DoorLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last one
    silently) and nesting deeper than MAX_DEPTH (PyYAML would recurse until Python gives up)."""

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise _YamlRefusal(self.peek_event().start_mark.line, f"nested deeper than {MAX_DEPTH} levels")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

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
                    raise _YamlRefusal(key_node.start_mark.line, f"duplicate key {key!r}")
        return super().construct_mapping(node, deep=deep)


def read_regular_file(path: Path, limit: int, what: str, error: type[ConfigError] | None = None, *,
                      limit_text: str | None = None) -> bytes:
    """The bytes of a regular file of at most `limit` bytes (`what` it is, for the refusal); opened without
    blocking (a FIFO is refused, not waited on) and read once, so a file growing meanwhile is still bounded.
    `error` (a ConfigError subclass) carries the one-line refusal."""
    error = error or ConfigError
    limit_text = limit_text or f"{limit} bytes"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        raise error(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise error(f"{path}: cannot read: not a regular file")
        if st.st_size > limit:
            raise error(f"{path}: {st.st_size} bytes; {what} is at most {limit_text}")
        with os.fdopen(os.dup(fd), "rb") as f:
            raw = f.read(limit + 1)
    except OSError as exc:
        raise error(f"{path}: cannot read: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    if len(raw) > limit:
        raise error(f"{path}: more than {limit} bytes; {what} is at most {limit_text}")
    return raw


def _read_yaml(path: Path) -> Any:
    """The YAML of a regular UTF-8 file of at most MAX_FILE_BYTES; ConfigError (one line) otherwise."""
    raw = read_regular_file(path, MAX_FILE_BYTES, "a configuration file",
                            limit_text=f"{MAX_FILE_BYTES} bytes (1 MiB)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise ConfigError(f"{path}: line {line}: not UTF-8 (byte 0x{raw[exc.start]:02x} at offset {exc.start})") \
            from None
    text = text.removeprefix("\ufeff")  # a byte-order mark is UTF-8 too
    try:
        return yaml.load(text, Loader=_DoorLoader)  # noqa: S506 - a SafeLoader subclass
    except _YamlRefusal as exc:
        raise ConfigError(f"{path}: line {exc.line + 1}: {exc}") from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" line {mark.line + 1}:" if mark else ""
        raise ConfigError(f"{path}:{where} not valid YAML: {exc.problem or exc.context}") from None
    except RecursionError:
        raise ConfigError(f"{path}: not valid YAML: nested too deeply") from None
    except Exception as exc:  # noqa: BLE001 - PyYAML's constructors raise ValueError, OverflowError, ...
        raise ConfigError(f"{path}: not valid YAML: {type(exc).__name__}: {str(exc)[:200]}") from None


def _label(path: Path, loc: list | tuple, data: Any) -> tuple[str, list]:
    """`path: slot 3 (cart-03):` or `path: supply psu-a:` or `path:`, and the rest of `loc`."""
    loc = list(loc)
    if len(loc) >= 2 and loc[0] == "configurations" and isinstance(loc[1], int):
        items = data.get(loc[0]) if isinstance(data, dict) else None
        item = items[loc[1]] if isinstance(items, list) and 0 <= loc[1] < len(items) else None
        cid = item.get("id") if isinstance(item, dict) else None
        ok = isinstance(cid, str) and len(cid) <= MAX_ID and ID_RE.fullmatch(cid)
        return f"{path}: {f'configuration {cid}' if ok else f'configuration #{loc[1] + 1}'}:", loc[2:]
    if len(loc) >= 2 and loc[0] in ("slots", "supplies") and isinstance(loc[1], int):
        items = data.get(loc[0]) if isinstance(data, dict) else None
        item = items[loc[1]] if isinstance(items, list) and 0 <= loc[1] < len(items) else None
        item = item if isinstance(item, dict) else {}
        if loc[0] == "slots":
            num, cart = item.get("slot"), item.get("cart")
            label = f"slot {num}" if isinstance(num, int) and not isinstance(num, bool) \
                and 0 < num <= MAX_SLOT_NUMBER else f"slot #{loc[1] + 1}"
            if isinstance(cart, str) and len(cart) <= MAX_ID and ID_RE.fullmatch(cart):
                label += f" ({cart})"
        else:
            name = item.get("name")
            ok = isinstance(name, str) and len(name) <= MAX_ID and ID_RE.fullmatch(name)
            label = f"supply {name}" if ok else f"supply #{loc[1] + 1}"
        return f"{path}: {label}:", loc[2:]
    return f"{path}:", loc


def _field(loc: Iterable) -> str:
    return ".".join(str(p) for p in loc) or "(top level)"


def _fail(path: Path, data: Any, loc: tuple | list, msg: str) -> ConfigError:
    where, rest = _label(path, loc, data)
    if not rest and len(loc) == 2:  # the slot or supply itself (a bad key in it): no field to name
        return ConfigError(f"{where} {msg}")
    return ConfigError(f"{where} {_field(rest)}: {msg}")


def _bad_char(text: str, controls_ok: bool) -> str | None:
    """Why a character of `text` is refused, or None."""
    if text.isascii() and text.isprintable():
        return None
    for ch in text:
        cat = unicodedata.category(ch)
        if cat == "Cc":
            if controls_ok and "\x01" <= ch < "\x20":
                continue
            return f"control character U+{ord(ch):04X}"
        if ch in _BIDI:
            return f"bidirectional-override character U+{ord(ch):04X}"
        if cat == "Cf":
            return f"format character U+{ord(ch):04X}"
        if cat in ("Zl", "Zp"):
            return f"line separator U+{ord(ch):04X}"
        if cat == "Cs":
            return f"lone surrogate U+{ord(ch):04X}"
    return None


def _check_tree(path: Path, data: Any, controls_ok: Callable[[tuple], bool] = lambda loc: False) -> None:
    """Refuse what no field may hold, wherever it is: keys that are not strings, values that are not
    plain YAML (binary, sets), non-finite numbers, over-long strings, control/format/bidi characters,
    a structure that refers to itself, and alias bombs (an alias counts each time it is used)."""
    count = 0
    active: set[int] = set()

    def text(s: str, loc: tuple, what: str = "") -> None:
        if len(s) > MAX_TEXT:
            raise _fail(path, data, loc, f"{what}{len(s)} characters; at most {MAX_TEXT}")
        why = _bad_char(s, controls_ok(loc) and not what)
        if why:
            shown = repr(s) if len(s) <= 60 else repr(s[:57]) + "..."
            raise _fail(path, data, loc, f"{what}{shown}: {why} is not allowed")

    def walk(node: Any, loc: tuple) -> None:
        nonlocal count
        count += 1
        if count > MAX_VALUES:
            raise _fail(path, data, (), f"more than {MAX_VALUES} values (an alias counts each time it is used)")
        if len(loc) > MAX_DEPTH:
            raise _fail(path, data, loc, f"nested deeper than {MAX_DEPTH} levels")
        if node is None or isinstance(node, bool | int | dt.date):
            return
        if isinstance(node, float):
            if not math.isfinite(node):
                raise _fail(path, data, loc, f"{node!r} is not a finite number")
            return
        if isinstance(node, str):
            text(node, loc)
            return
        if isinstance(node, dict | list):
            if id(node) in active:
                raise _fail(path, data, loc, "refers to itself (a recursive alias)")
            active.add(id(node))
            if isinstance(node, dict):
                for k, v in node.items():
                    if not isinstance(k, str):
                        raise _fail(path, data, loc, f"key {k!r} is not a name (keys are strings)")
                    text(k, loc, "key ")
                    walk(v, (*loc, k))
            else:
                for i, v in enumerate(node):
                    walk(v, (*loc, i))
            active.discard(id(node))
            return
        raise _fail(path, data, loc, f"a {type(node).__name__} value is not allowed")

    walk(data, ())


def _explain(path: Path, exc: ValidationError, data: Any) -> ConfigError:
    """One line for the first error: file, slot (if inside slots[]) or supply, and field path."""
    err = exc.errors()[0]
    msg = err["msg"]
    if err["type"] == "missing":
        msg = "missing"
    elif msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
        if not err["loc"]:  # a check across fields: its message starts with the field it blames
            return ConfigError(f"{path}: {msg}")
    elif err["type"] == "extra_forbidden":
        msg = "unknown field"
    return _fail(path, data, err["loc"], msg)


def _read_mapping(path: Path, controls_ok: Callable[[tuple], bool] = lambda loc: False) -> dict:
    data = _read_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: (top level): expected a mapping of fields")
    _check_tree(path, data, controls_ok)
    return data


def load_cart(path: Path) -> CartConfig:
    path = Path(path)
    data = _read_mapping(path)
    try:
        cfg = CartConfig.model_validate(data)
    except ValidationError as exc:
        raise _explain(path, exc, data) from None
    if cfg.id != path.stem:
        raise ConfigError(f"{path}: id: {cfg.id!r} does not match the file name {path.stem!r}")
    return cfg


def load_inventory(path: Path) -> Inventory:
    """A fleet inventory YAML: `{configurations: [{id, hardware_revision, cas, security_counter}]}`."""
    path = Path(path)
    data = _read_mapping(path)
    try:
        return Inventory.model_validate(data)
    except ValidationError as exc:
        raise _explain(path, exc, data) from None


def _profile_controls_ok(loc: tuple) -> bool:
    """A profile's strings are sent to or matched on a serial console: they may hold C0 controls
    ("\\r\\n", ESC, Ctrl-C); its family (an id, a file name) and its keys may not."""
    return bool(loc) and loc[0] != "family"


def load_profile(path: Path) -> ConsoleProfile:
    path = Path(path)
    data = _read_mapping(path, _profile_controls_ok)
    try:
        prof = ConsoleProfile.model_validate(data)
    except ValidationError as exc:
        raise _explain(path, exc, data) from None
    if prof.family != path.stem:
        raise ConfigError(f"{path}: family: {prof.family!r} does not match the file name {path.stem!r}")
    return prof


class Slot:
    """One slot of a rig: a cart configuration, its console URL and its supply channel."""

    def __init__(self, spec: SlotSpec, cart: CartConfig, profile: ConsoleProfile, supply: SupplySpec,
                 console_url: str):
        self.spec = spec
        self.cart = cart
        self.profile = profile
        self.supply = supply
        self.console_url = console_url

    @property
    def number(self) -> int:
        return self.spec.slot

    @property
    def cart_id(self) -> str:
        return self.cart.id

    @property
    def channel(self) -> int:
        return self.spec.channel

    def __repr__(self) -> str:
        return f"<Slot {self.number} {self.cart_id} {self.supply.name}:{self.channel}>"


def _resolve_url(base: Path, url: str) -> str:
    """Paths in a rig are relative to the rig file; pyserial URLs (scheme://) stay as they are."""
    if "://" in url:
        return url
    # keep the stable name (a by-id symlink), do not resolve it to the tty it points at today
    return os.path.abspath(base / url)


def _exists(p: Path, where: str) -> bool:
    try:
        os.stat(p)
    except FileNotFoundError:
        return False
    except OSError as exc:  # too long a name, a file where a directory should be, no permission, ...
        raise ConfigError(f"{where}: cannot look up {p}: {exc.strerror or exc}") from None
    return True


def _same_host(a: str, b: str) -> bool:
    norm = {"localhost": "127.0.0.1", "::1": "127.0.0.1"}
    a, b = a.lower(), b.lower()
    return norm.get(a, a) == norm.get(b, b)


def _check_addresses(path: Path, data: dict, spec: RigSpec) -> None:
    """Nothing in the rig on another's address; a virtual rig on loopback only."""
    virtual = spec.kind == "virtual"
    if virtual:
        if spec.broker.host not in VIRTUAL_HOSTS:
            raise _fail(path, data, ("broker", "host"), f"{spec.broker.host!r} is not loopback "
                        f"({' or '.join(VIRTUAL_HOSTS)}): a virtual rig's broker listens on loopback only")
        for i, s in enumerate(spec.supplies):
            if s.port is None:
                raise _fail(path, data, ("supplies", i, "resource"), f"{s.resource!r}: a virtual rig's supplies "
                            "are SCPI servers on loopback TCP (TCPIP0::127.0.0.1::PORT::SOCKET)")
            if s.host not in VIRTUAL_HOSTS:
                raise _fail(path, data, ("supplies", i, "resource"), f"host {s.host!r} is not loopback "
                            f"({' or '.join(VIRTUAL_HOSTS)}): a virtual rig's supplies listen on loopback only")
        ih = spec.image_host
        for key, host in (("bind", ih.bind), ("url_host", ih.url_host)):
            if host is not None and not _is_loopback(host):
                raise _fail(path, data, ("image_host", key), f"{host!r} is not a loopback address: "
                            "a virtual rig's image host serves its carts on this machine only")
    taken: dict[tuple[str, int], str] = {}
    resources: dict[str, str] = {}
    broker = (spec.broker.host, spec.broker.port)
    for i, s in enumerate(spec.supplies):
        same = resources.get(s.resource.lower())
        if same:
            raise _fail(path, data, ("supplies", i, "resource"), f"{s.resource} is already supply {same}")
        resources[s.resource.lower()] = s.name
        if s.port is None:
            continue
        if (virtual or _same_host(s.host, broker[0])) and s.port == broker[1]:
            raise _fail(path, data, ("supplies", i, "resource"),
                        f"port {s.port} is the broker's ({broker[0]}:{broker[1]})")
        for (h, p), other in taken.items():
            if p == s.port and (virtual or _same_host(h, s.host)):
                raise _fail(path, data, ("supplies", i, "resource"), f"{s.host}:{s.port} is already supply {other}'s")
        taken[(s.host, s.port)] = s.name
    ih = spec.image_host
    if ih.port:
        local = [("the broker's", broker[0], broker[1])] + [(f"supply {n}'s", h, p) for (h, p), n in taken.items()]
        for who, h, p in local:
            if p == ih.port and (virtual or _is_loopback(h)):
                raise _fail(path, data, ("image_host", "port"), f"{ih.port} is {who} port")


def _check_models(path: Path, data: dict, spec: RigSpec) -> dict[str, ModelRatings]:
    """Every supply is a model whose channel ratings the harness knows (harness/power/ratings.py),
    spoken to in its own dialect, with no more channels than it has outputs."""
    from harness.power.ratings import RATINGS, ratings_for

    found = {}
    for i, s in enumerate(spec.supplies):
        r = ratings_for(s.model)
        if r is None:
            raise _fail(path, data, ("supplies", i, "model"),
                        f"{s.model!r}: no channel ratings known for this model (known: {', '.join(RATINGS)}; "
                        "add its data-sheet ratings to harness/power/ratings.py)")
        if r.dialect != s.dialect:
            raise _fail(path, data, ("supplies", i, "dialect"), f"{s.dialect} does not speak to a {r.model} "
                        f"(its dialect is {r.dialect})")
        if s.channels > len(r.channels):
            raise _fail(path, data, ("supplies", i, "channels"), f"{s.channels}, but a {r.model} has "
                        f"{len(r.channels)} outputs")
        found[s.name] = r
    return found


def _check_rating(label: str, cart: CartConfig, sup: SupplySpec, channel: int, ratings: ModelRatings) -> None:
    """The cart's nominal voltage and current limit within the rating of the channel that powers it
    (a supply refuses a setting above it). max_voltage is the cart's own limit, never sent as a setting."""
    rated = ratings.channel(channel)
    where = f"{sup.name} ({ratings.model}) channel {channel} rating"
    if cart.supply.voltage > rated.volts:
        raise ConfigError(f"{label} supply.voltage: {cart.supply.voltage:g} V exceeds {where} {rated.volts:g} V")
    if cart.supply.current_limit > rated.amps:
        raise ConfigError(f"{label} supply.current_limit: {cart.supply.current_limit:g} A exceeds {where} "
                          f"{rated.amps:g} A")


class Rig:
    """A validated rack description. `Rig.load(path)` raises ConfigError with a one-line reason."""

    def __init__(self, path: Path, spec: RigSpec, slots: list[Slot]):
        self.path = path
        self.spec = spec
        self.slots = slots

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def is_virtual(self) -> bool:
        return self.spec.kind == "virtual"

    def resolve(self, p: Path | str) -> Path:
        p = Path(p)
        return p if p.is_absolute() else (self.path.parent / p).resolve()

    @cached_property
    def run_dir(self) -> Path | None:
        return self.resolve(self.spec.virtual.run_dir) if self.spec.virtual else None

    def supply(self, name: str) -> SupplySpec:
        return next(s for s in self.spec.supplies if s.name == name)

    def slot_for(self, cart_id: str) -> Slot:
        for s in self.slots:
            if s.cart_id == cart_id:
                return s
        raise KeyError(cart_id)

    def select(self, carts: Iterable[str] = (), tags: Iterable[str] = ()) -> list[Slot]:
        """Slots whose cart id is in `carts` or which carry one of `tags`; all slots when both are empty."""
        carts, tags = set(carts), set(tags)
        unknown = carts - {s.cart_id for s in self.slots}
        if unknown:
            raise ConfigError(f"{self.path}: no slot holds cart {', '.join(repr(c) for c in sorted(unknown))}")
        untagged = tags - {t for s in self.slots for t in s.cart.tags}
        if untagged:  # else a selection by a mistyped tag runs nothing, and passes
            raise ConfigError(f"{self.path}: no cart of the rig has tag {', '.join(repr(t) for t in sorted(untagged))}")
        if not carts and not tags:
            return list(self.slots)
        return [s for s in self.slots if s.cart_id in carts or tags & set(s.cart.tags)]

    def preflight(self) -> None:
        """Checks that need the rack to exist: every local console path is there."""
        for s in self.slots:
            url = s.console_url
            if "://" not in url and not _exists(Path(url), f"{self.path}: slot {s.number} ({s.cart_id}): console"):
                raise ConfigError(
                    f"{self.path}: slot {s.number} ({s.cart_id}): console: {s.spec.console} does not exist"
                )

    @classmethod
    def load(cls, path: Path | str) -> Rig:
        path = Path(path)
        data = _read_mapping(path)
        try:
            spec = RigSpec.model_validate(data)
        except ValidationError as exc:
            raise _explain(path, exc, data) from None
        base = path.parent
        if spec.kind == "virtual" and spec.virtual is None:
            raise ConfigError(f"{path}: virtual: missing (kind is virtual)")
        if spec.kind == "physical" and spec.virtual is not None:
            raise ConfigError(f"{path}: virtual: only a rig of kind virtual has a virtual section")
        configs = spec.configs if spec.configs.is_absolute() else (base / spec.configs).resolve()

        names = [s.name for s in spec.supplies]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ConfigError(f"{path}: supplies: name {sorted(dup)[0]!r} is used twice")
        _check_addresses(path, data, spec)
        ratings = _check_models(path, data, spec)
        supplies = {s.name: s for s in spec.supplies}
        seen_slot: set[int] = set()
        seen_channel: dict[tuple[str, int], int] = {}
        seen_cart: dict[str, int] = {}
        profiles: dict[str, ConsoleProfile] = {}
        slots: list[Slot] = []
        for s in spec.slots:
            label = f"{path}: slot {s.slot} ({s.cart}):"
            if s.slot in seen_slot:
                raise ConfigError(f"{label} slot: number {s.slot} is used twice")
            seen_slot.add(s.slot)
            if s.supply not in supplies:
                raise ConfigError(f"{label} supply: unknown supply {s.supply!r}; known: {', '.join(supplies)}")
            sup = supplies[s.supply]
            if s.channel > sup.channels:
                raise ConfigError(f"{label} channel: {s.channel} is beyond {sup.name}'s {sup.channels} channels")
            key = (s.supply, s.channel)
            if key in seen_channel:
                raise ConfigError(
                    f"{label} channel: {s.supply} channel {s.channel} already powers slot {seen_channel[key]}"
                )
            seen_channel[key] = s.slot
            if s.cart in seen_cart:
                raise ConfigError(f"{label} cart: {s.cart} is already in slot {seen_cart[s.cart]}")
            seen_cart[s.cart] = s.slot
            if spec.kind == "virtual" and "://" in s.console:
                raise ConfigError(f"{label} console: {s.console!r} is a URL: the virtual rack makes its consoles "
                                  "as files (a path)")
            cart_file = configs / "carts" / f"{s.cart}.yaml"  # s.cart is an id: no path gets in here
            if not _exists(cart_file, f"{label} cart"):
                raise ConfigError(f"{label} cart: no configuration {cart_file}")
            cart = load_cart(cart_file)
            fam = cart.firmware.family
            if fam not in profiles:
                prof_file = configs / "profiles" / f"{fam}.yaml"
                if not _exists(prof_file, f"{cart_file}: firmware.family"):
                    raise ConfigError(f"{cart_file}: firmware.family: no console profile {prof_file}")
                profiles[fam] = load_profile(prof_file)
            if spec.recovery.method == "command" and "{probe}" in (spec.recovery.command or "") and not s.probe:
                raise ConfigError(f"{label} probe: missing (the recovery command needs {{probe}})")
            _check_rating(label, cart, sup, s.channel, ratings[sup.name])
            slots.append(Slot(s, cart, profiles[fam], sup, _resolve_url(base, s.console)))
        _check_recovery_files(path, spec, slots)
        return cls(path.resolve(), spec, sorted(slots, key=lambda x: x.number))


def _check_recovery_files(path: Path, spec: RigSpec, slots: list[Slot]) -> None:
    """Carts that need different factory files must get different file names."""
    rec = spec.recovery
    for key, template, what in (("image", rec.image, lambda s: s.cart.firmware.initial_version),
                                ("trust_store", rec.trust_store, lambda s: tuple(s.cart.provisioned_cas))):
        by_name: dict[str, Slot] = {}
        for s in slots:
            name = template.format(version=s.cart.firmware.initial_version, cart=s.cart_id, slot=s.number)
            other = by_name.setdefault(name, s)
            if what(other) != what(s):
                need = "{version}" if key == "image" else "{cart}"
                raise ConfigError(f"{path}: recovery.{key}: {other.cart_id} and {s.cart_id} need different factory "
                                  f"files but both get {name!r} (use {need})")
