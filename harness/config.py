"""Rig, cart and console-profile configuration: load, validate, explain.

Every error is one line naming the file, the slot (where there is one) and the field, e.g.
``rigs/lab.yaml: slot 3 (cart-03): channel: 4 is beyond psu-a's 3 channels``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(Exception):
    """A configuration file is wrong; the message is one line naming file, slot and field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ---------------------------------------------------------------- cart configuration


class FlashGeometry(_Strict):
    page_size: int = Field(gt=0)
    slot_size: int = Field(gt=0)
    page_program_ms: float = Field(gt=0)

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


class FirmwareInfo(_Strict):
    family: str
    initial_version: str

    @field_validator("initial_version")
    @classmethod
    def _semver(cls, v: str) -> str:
        if not re.fullmatch(r"\d+\.\d+\.\d+", v):
            raise ValueError(f"{v!r} is not a version like 1.4.2")
        return v


class SupplyLimits(_Strict):
    voltage: float = Field(gt=0)
    max_voltage: float = Field(gt=0)
    current_limit: float = Field(gt=0)

    @model_validator(mode="after")
    def _nominal_within_max(self) -> SupplyLimits:
        if self.voltage > self.max_voltage:
            raise ValueError(f"voltage {self.voltage} exceeds max_voltage {self.max_voltage}")
        return self


class Draw(_Strict):
    booting: float = Field(ge=0)
    idle: float = Field(ge=0)
    flash_write: float = Field(ge=0)


class BootTiming(_Strict):
    expected_s: float = Field(gt=0)
    autoboot_window_s: float = Field(gt=0)
    mark_good_window_s: float = Field(gt=0)


class CartConfig(_Strict):
    id: str = Field(pattern=r"^[a-z0-9][a-z0-9-]*$")
    hardware_revision: str
    flash: FlashGeometry
    sensors: list[str] = Field(min_length=1)
    region: str
    timezone: str
    utc_offset_hours: float = Field(ge=-12, le=14)
    connectivity: Connectivity
    provisioned_cas: list[str] = Field(min_length=1)
    firmware: FirmwareInfo
    supply: SupplyLimits
    draw: Draw
    boot: BootTiming
    tags: list[str] = Field(default_factory=list)


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


class ConsoleProfile(_Strict):
    family: str
    line_ending: str
    prompt: str
    echo: bool
    error: str
    patterns: dict[str, str]
    commands: dict[str, CommandSpec]
    recovery: RecoveryProfile

    REQUIRED_PATTERNS: tuple[str, ...] = ("bootloader", "autoboot", "banner", "ready")
    REQUIRED_COMMANDS: tuple[str, ...] = ("version", "slot_status", "rtc_get", "rtc_set", "sensors", "reboot")

    @model_validator(mode="after")
    def _complete_and_compilable(self) -> ConsoleProfile:
        for key in self.REQUIRED_PATTERNS:
            if key not in self.patterns:
                raise ValueError(f"patterns.{key} is missing")
        for key in self.REQUIRED_COMMANDS:
            if key not in self.commands:
                raise ValueError(f"commands.{key} is missing")
        regexes = {f"patterns.{k}": v for k, v in self.patterns.items()}
        regexes |= {f"commands.{k}.parse": c.parse for k, c in self.commands.items() if c.parse}
        regexes["error"] = self.error
        for where, rx in regexes.items():
            try:
                re.compile(rx)
            except re.error as exc:
                raise ValueError(f"{where}: bad regex {rx!r}: {exc}") from None
        return self

    def pattern(self, key: str) -> re.Pattern[str]:
        return re.compile(self.patterns[key])


# ---------------------------------------------------------------- rig

VISA_RE = re.compile(
    r"^(TCPIP\d*::[^:]+::(\d+::SOCKET|inst\d+::INSTR|hislip\d+::INSTR)|USB\d*::.+::INSTR|ASRL.+::INSTR)$"
)


class SupplySpec(_Strict):
    name: str
    resource: str
    dialect: str
    model: str
    channels: int = Field(ge=1, le=8)
    timeout_ms: int = Field(default=1000, ge=10, le=60000)

    @field_validator("resource")
    @classmethod
    def _visa(cls, v: str) -> str:
        if not VISA_RE.match(v):
            raise ValueError(f"{v!r} is not a VISA resource string (e.g. TCPIP0::host::5025::SOCKET)")
        return v

    @field_validator("dialect")
    @classmethod
    def _known_dialect(cls, v: str) -> str:
        from harness.power import DIALECTS

        if v not in DIALECTS:
            raise ValueError(f"unknown dialect {v!r}; known: {', '.join(sorted(DIALECTS))}")
        return v

    @property
    def port(self) -> int | None:
        m = re.match(r"^TCPIP\d*::[^:]+::(\d+)::SOCKET$", self.resource)
        return int(m.group(1)) if m else None


class BrokerSpec(_Strict):
    host: str
    port: int = Field(ge=1, le=65535)
    ca: Path
    cert: Path
    key: Path


class VirtualSpec(_Strict):
    run_dir: Path
    flash_time_scale: float = Field(gt=0, le=10)
    pki: Path | None = None  # the lab PKI whose root certificates the rack's factory provisions


class RecoverySpec(_Strict):
    method: Literal["serial", "command"]
    image: str
    trust_store: str
    command: str | None = None

    @model_validator(mode="after")
    def _command_given(self) -> RecoverySpec:
        if self.method == "command" and not self.command:
            raise ValueError("method 'command' needs a command")
        return self


class FirmwareSpec(_Strict):
    """How the lab gets a firmware image of a version (and of a fault build): a command, run
    without a shell. Each word is formatted with {python} (this interpreter), {version}, {out}
    (the file to write); the word "{faults}" becomes "--fault NAME=VALUE" per fault."""

    build: list[str] = Field(min_length=1)


class ImageHostSpec(_Strict):
    """Where the harness's image host listens, and the host name carts use in its URLs."""

    bind: str = "127.0.0.1"
    port: int = Field(default=0, ge=0, le=65535)
    url_host: str | None = None


class SlotSpec(_Strict):
    slot: int = Field(ge=1)
    cart: str
    console: str
    supply: str
    channel: int = Field(ge=1)
    probe: str | None = None


class RigSpec(_Strict):
    name: str
    kind: Literal["virtual", "physical"]
    configs: Path
    power_off_s: float = Field(default=2.0, ge=0, le=60)  # off time of a power cycle (rail fall, caps drain)
    virtual: VirtualSpec | None = None
    broker: BrokerSpec
    supplies: list[SupplySpec] = Field(min_length=1)
    recovery: RecoverySpec
    firmware: FirmwareSpec | None = None
    image_host: ImageHostSpec = ImageHostSpec()
    slots: list[SlotSpec] = Field(min_length=1)


# ---------------------------------------------------------------- loading


def _read_yaml(path: Path) -> Any:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{where}: not valid YAML: {getattr(exc, 'problem', exc)}") from None


def _explain(path: Path, exc: ValidationError, data: Any) -> ConfigError:
    """One line for the first error: file, slot (if inside slots[]) and field path."""
    err = exc.errors()[0]
    loc = list(err["loc"])
    where = ""
    if len(loc) >= 2 and loc[0] == "slots" and isinstance(loc[1], int):
        idx = loc[1]
        slot = data["slots"][idx] if isinstance(data, dict) and isinstance(data.get("slots"), list) else {}
        slot = slot if isinstance(slot, dict) else {}
        label = f"slot {slot.get('slot', f'#{idx + 1}')}"
        if slot.get("cart"):
            label += f" ({slot['cart']})"
        where = f" {label}:"
        loc = loc[2:]
    elif len(loc) >= 2 and loc[0] == "supplies" and isinstance(loc[1], int):
        sup = data["supplies"][loc[1]] if isinstance(data.get("supplies"), list) else {}
        name = sup.get("name", f"#{loc[1] + 1}") if isinstance(sup, dict) else f"#{loc[1] + 1}"
        where = f" supply {name}:"
        loc = loc[2:]
    field = ".".join(str(p) for p in loc) or "(top level)"
    msg = err["msg"]
    if err["type"] == "missing":
        msg = "missing"
    elif msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    elif err["type"] == "extra_forbidden":
        msg = "unknown field"
    return ConfigError(f"{path}:{where} {field}: {msg}")


def load_cart(path: Path) -> CartConfig:
    data = _read_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: (top level): expected a mapping of fields")
    try:
        cfg = CartConfig.model_validate(data)
    except ValidationError as exc:
        raise _explain(path, exc, data) from None
    if cfg.id != path.stem:
        raise ConfigError(f"{path}: id: {cfg.id!r} does not match the file name {path.stem!r}")
    return cfg


def load_profile(path: Path) -> ConsoleProfile:
    data = _read_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: (top level): expected a mapping of fields")
    try:
        return ConsoleProfile.model_validate(data)
    except ValidationError as exc:
        raise _explain(path, exc, data) from None


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
            raise ConfigError(f"{self.path}: no slot holds cart {', '.join(sorted(unknown))}")
        if not carts and not tags:
            return list(self.slots)
        return [s for s in self.slots if s.cart_id in carts or tags & set(s.cart.tags)]

    def preflight(self) -> None:
        """Checks that need the rack to exist: every local console path is there."""
        for s in self.slots:
            url = s.console_url
            if "://" not in url and not Path(url).exists():
                raise ConfigError(
                    f"{self.path}: slot {s.number} ({s.cart_id}): console: {s.spec.console} does not exist"
                )

    @classmethod
    def load(cls, path: Path | str) -> Rig:
        path = Path(path)
        data = _read_yaml(path)
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: (top level): expected a mapping of fields")
        try:
            spec = RigSpec.model_validate(data)
        except ValidationError as exc:
            raise _explain(path, exc, data) from None
        base = path.parent
        if spec.kind == "virtual" and spec.virtual is None:
            raise ConfigError(f"{path}: virtual: missing (kind is virtual)")
        configs = spec.configs if spec.configs.is_absolute() else (base / spec.configs).resolve()

        names = [s.name for s in spec.supplies]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ConfigError(f"{path}: supplies: name {sorted(dup)[0]!r} is used twice")
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
            cart_file = configs / "carts" / f"{s.cart}.yaml"
            if not cart_file.exists():
                raise ConfigError(f"{label} cart: no configuration {cart_file}")
            cart = load_cart(cart_file)
            fam = cart.firmware.family
            if fam not in profiles:
                prof_file = configs / "profiles" / f"{fam}.yaml"
                if not prof_file.exists():
                    raise ConfigError(f"{cart_file}: firmware.family: no console profile {prof_file}")
                profiles[fam] = load_profile(prof_file)
            if spec.recovery.method == "command" and "{probe}" in (spec.recovery.command or "") and not s.probe:
                raise ConfigError(f"{label} probe: missing (the recovery command needs {{probe}})")
            slots.append(Slot(s, cart, profiles[fam], sup, _resolve_url(base, s.console)))
        return cls(path.resolve(), spec, sorted(slots, key=lambda x: x.number))
