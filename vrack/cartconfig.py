"""The virtual rack's own reader of a cart configuration (`configs/carts/<id>.yaml`).

The format is written down in docs/interfaces.md. This reader takes what the virtual rack
needs (identity, flash geometry, sensors, boot timing, firmware, supply draw, trust) and
keeps the whole mapping in `raw` for the firmware's `hal.config`. Every error names the file and the
field, e.g. `configs/carts/cart-01.yaml: flash.page_size: expected 2048 or 4096, got 1000`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PAGE_SIZES = (2048, 4096)


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
    source: str = "<mapping>"
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)


class _Reader:
    def __init__(self, data: Any, source: str):
        self.source = source
        if not isinstance(data, Mapping):
            raise CartConfigError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
        self.data = data

    def fail(self, name: str, msg: str) -> CartConfigError:
        return CartConfigError(f"{self.source}: {name}: {msg}")

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
            raise self.fail(name, f"expected a non-empty string, got {value!r}")
        return str(value)

    def integer(self, name: str) -> int:
        value = self.get(name)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(name, f"expected an integer, got {value!r}")
        return value

    def number(self, name: str, *, positive: bool = False) -> float:
        value = self.get(name)
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise self.fail(name, f"expected a number, got {value!r}")
        if value < 0 or (positive and value == 0):
            raise self.fail(name, f"expected a {'positive' if positive else 'non-negative'} number, got {value!r}")
        return float(value)

    def strings(self, name: str) -> tuple[str, ...]:
        value = self.get(name)
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise self.fail(name, f"expected a list of names, got {value!r}")
        return tuple(value)


def config_from_mapping(data: Any, source: str = "<mapping>") -> CartConfig:
    """Validate a parsed cart configuration; `source` names it in errors."""
    r = _Reader(data, source)
    page_size = r.integer("flash.page_size")
    if page_size not in PAGE_SIZES:
        raise r.fail("flash.page_size", f"expected 2048 or 4096, got {page_size}")
    slot_size = r.integer("flash.slot_size")
    if slot_size <= 0 or slot_size % page_size:
        raise r.fail("flash.slot_size", f"expected a positive multiple of page_size ({page_size}), got {slot_size}")
    boot = BootTiming(
        expected_s=r.number("boot.expected_s", positive=True),
        autoboot_window_s=r.number("boot.autoboot_window_s"),
        mark_good_window_s=r.number("boot.mark_good_window_s", positive=True),
    )
    return CartConfig(
        id=r.string("id"),
        hardware_revision=r.string("hardware_revision"),
        flash=FlashGeometry(page_size, slot_size, r.number("flash.page_program_ms")),
        sensors=r.strings("sensors"),
        boot=boot,
        firmware=FirmwareInfo(r.string("firmware.family"), r.string("firmware.initial_version")),
        draw=Draw(r.number("draw.booting"), r.number("draw.idle"), r.number("draw.flash_write")),
        provisioned_cas=r.strings("provisioned_cas"),
        source=source,
        raw=dict(data),
    )


def load_cart(path: str | Path) -> CartConfig:
    """Read and validate `configs/carts/<id>.yaml`."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise CartConfigError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    if path.suffix == ".json":  # the rack hands carts a JSON copy: a cart boots without loading YAML
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise CartConfigError(f"{path}: not valid JSON: {exc}") from exc
        return config_from_mapping(data, str(path))
    import yaml

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise CartConfigError(f"{path}: not valid YAML: {exc}") from exc
    return config_from_mapping(data, str(path))


def as_cart_config(cfg: CartConfig | Mapping[str, Any] | str | Path) -> CartConfig:
    """Accept a CartConfig, a parsed mapping or a path to the YAML file."""
    if isinstance(cfg, CartConfig):
        return cfg
    if isinstance(cfg, Mapping):
        return config_from_mapping(cfg)
    return load_cart(cfg)
