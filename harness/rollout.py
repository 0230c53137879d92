"""Release preflight: can every configuration of the fleet take this signed image?

    hil rollout check IMAGE --fleet INVENTORY
    verdict = preflight(image_bytes, inventory)       the same check for the gate (a path, a Rig or configurations)

A release needs three things of each configuration it goes to, all written in its signed manifest:
the root CA it requires (`required_ca`) in the configuration's trust store, a security counter at
least the configuration's (a device refuses an image below its counter), and the configuration's
hardware revision among the image's. A configuration that lacks one rejects the release in the
field and stays on firmware that may not be able to take the next one either (the near-miss: a
release needed a CA part of the fleet had not received). The check refuses such a release before
it is rolled out, naming each configuration and what it lacks.

An inventory is a rig file (its slots' cart configurations), a directory of cart configurations
(`configs/carts`), or an inventory YAML listing what is deployed:

    configurations:
      - {id: cart-01, hardware_revision: rev-b, cas: [lab-root-2025], security_counter: 0}

Cart configurations describe carts as provisioned: security counter 0. Exit status: 0 every
configuration can take the image, 1 some cannot (one line each, then the verdict), 2 the image or
the inventory cannot be read (one line).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from harness import image as himage
from harness.config import MAX_SLOT_SIZE, ConfigError, Rig, _read_mapping, load_cart, load_inventory, read_regular_file

MAX_IMAGE_BYTES = MAX_SLOT_SIZE  # an image fills at most one slot


class RolloutInputError(ConfigError):
    """The image or the inventory cannot be read; the message is one line naming the file."""


@dataclass(frozen=True)
class Configuration:
    """What the preflight needs of one deployed configuration."""

    id: str
    hardware_revision: str
    cas: tuple[str, ...]
    security_counter: int = 0


@dataclass(frozen=True)
class Release:
    """What the preflight reads from a signed image's manifest."""

    version: str
    required_ca: str
    security_counter: int
    hardware: tuple[str, ...]


@dataclass(frozen=True)
class Refusal:
    configuration: str
    lacks: tuple[str, ...]  # one phrase per missing thing

    def line(self) -> str:
        return f"REFUSED {self.configuration}: {'; '.join(self.lacks)}"


@dataclass(frozen=True)
class RolloutVerdict:
    release: Release
    configurations: int
    refused: tuple[Refusal, ...]

    @property
    def ok(self) -> bool:
        return not self.refused

    def summary(self) -> str:
        r = self.release
        needs = f"{r.required_ca}, security counter {r.security_counter}, hardware {', '.join(r.hardware)}"
        if self.ok:
            return f"OK: all {self.configurations} configurations can take {r.version} ({needs})"
        names = ", ".join(x.configuration for x in self.refused)
        return (f"REFUSED: {len(self.refused)} of {self.configurations} configurations cannot take {r.version} "
                f"({needs}): {names}")

    def lines(self) -> list[str]:
        """One line per refused configuration, then the verdict."""
        return [x.line() for x in self.refused] + [self.summary()]


# ---------------------------------------------------------------- reading


def read_image(path: Path) -> bytes:
    """A regular file of at most MAX_IMAGE_BYTES (a slot)."""
    return read_regular_file(path, MAX_IMAGE_BYTES, "an image (one slot)", RolloutInputError)


def release_of(data: bytes, source: str = "image") -> Release:
    """The manifest fields the preflight checks; RolloutInputError if the image is not a signed v1 image."""
    try:
        parsed = himage.parse_image(data)
    except himage.ImageFormatError as exc:
        raise RolloutInputError(f"{source}: not an image: {exc}") from None
    m = parsed.manifest
    if parsed.manifest_bytes is None:
        raise RolloutInputError(f"{source}: no manifest: the image is not signed")
    if m is None:
        raise RolloutInputError(f"{source}: manifest: not a JSON object")
    ca, counter, hardware = m.get("required_ca"), m.get("security_counter"), m.get("hardware")
    if not isinstance(ca, str) or not himage.CA_NAME_RE.fullmatch(ca):
        raise RolloutInputError(f"{source}: manifest: required_ca {ca!r} is not a CA name")
    if type(counter) is not int or not 0 <= counter < 2**32:
        raise RolloutInputError(f"{source}: manifest: security_counter {counter!r} is not an integer in [0, 2**32)")
    if not isinstance(hardware, list) or not hardware or not all(
            isinstance(h, str) and himage.HARDWARE_RE.fullmatch(h) for h in hardware):
        raise RolloutInputError(f"{source}: manifest: hardware {hardware!r} is not a list of revision names")
    version = m.get("firmware_version")
    return Release(version if isinstance(version, str) else (parsed.version or "?"), ca, counter, tuple(hardware))


def _from_cart(cfg) -> Configuration:
    return Configuration(cfg.id, cfg.hardware_revision, tuple(cfg.provisioned_cas))


def load_fleet(path: Path) -> list[Configuration]:
    """The configurations of an inventory file, a rig file, or a directory of cart configurations."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.yaml"))
        if not files:
            raise RolloutInputError(f"{path}: no cart configurations (*.yaml) in this directory")
        return [_from_cart(load_cart(p)) for p in files]
    data = _read_mapping(path)  # door checks first: what kind of file it is decides the reader
    if "configurations" in data:
        return [Configuration(c.id, c.hardware_revision, tuple(c.cas), c.security_counter)
                for c in load_inventory(path).configurations]
    if "slots" in data:
        return [_from_cart(s.cart) for s in Rig.load(path).slots]
    if "provisioned_cas" in data:
        return [_from_cart(load_cart(path))]
    raise RolloutInputError(f"{path}: not an inventory (configurations:), a rig (slots:) or a cart configuration")


# ---------------------------------------------------------------- the check


def refusal(release: Release, cfg: Configuration) -> Refusal | None:
    """What `cfg` lacks to take `release`, or None."""
    lacks = []
    if release.required_ca not in cfg.cas:
        lacks.append(f"lacks CA {release.required_ca} (has {', '.join(cfg.cas)})")
    if cfg.security_counter > release.security_counter:
        lacks.append(f"security counter {cfg.security_counter} is above the image's {release.security_counter}")
    if cfg.hardware_revision not in release.hardware:
        lacks.append(f"hardware {cfg.hardware_revision} is not among the image's ({', '.join(release.hardware)})")
    return Refusal(cfg.id, tuple(lacks)) if lacks else None


def preflight(image_bytes: bytes, inventory: Path | str | Rig | Iterable[Configuration], *,
              source: str = "image") -> RolloutVerdict:
    """Check a signed image against every configuration of `inventory` (a path as `hil rollout check
    --fleet` takes, a loaded Rig, or Configurations); `source` names the image in errors.
    RolloutInputError (a ConfigError) for input that cannot be read."""
    release = release_of(image_bytes, source)
    if isinstance(inventory, str | Path):
        configs = load_fleet(Path(inventory))
    elif isinstance(inventory, Rig):
        configs = [_from_cart(s.cart) for s in inventory.slots]
    else:
        configs = list(inventory)
    refused = tuple(r for r in (refusal(release, c) for c in configs) if r is not None)
    return RolloutVerdict(release, len(configs), refused)


def configurations_of(rig: Rig, slots=None) -> list[Configuration]:
    """The configurations on `rig` (or on its `slots`, a selection), as provisioned."""
    return [_from_cart(s.cart) for s in (rig.slots if slots is None else slots)]


def rollout_plan(images: dict[str, bytes], configs: Iterable[Configuration]) -> tuple[dict[str, RolloutVerdict],
                                                                                     list[str]]:
    """The same release signed under each root in `images` ({root: signed image}), checked against
    `configs`: {root: verdict}, and the configurations none of them can reach (a deadlock: no signed
    release could ever update them)."""
    configs = list(configs)
    verdicts = {root: preflight(image, configs, source=f"release signed under {root}")
                for root, image in images.items()}
    unreachable = [c.id for c in configs
                   if all(any(r.configuration == c.id for r in v.refused) for v in verdicts.values())]
    return verdicts, unreachable


def check_command(image: Path, fleet: Path) -> int:
    """`hil rollout check`: the lines, exit 0 (OK) or 1 (refused); unreadable input raises (exit 2 in the CLI)."""
    verdict = preflight(read_image(image), fleet, source=str(image))
    for line in verdict.lines():
        print(line)
    sys.stdout.flush()
    return 0 if verdict.ok else 1
