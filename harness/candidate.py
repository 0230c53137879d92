"""The release candidate the gate judges: an image handed to it, or a version the rig's build makes.

`hil gate --firmware IMAGE` gates a build artifact (an unsigned image as the rig's `firmware.build`
command writes it; a signed image is accepted too: its payload is what is gated). `hil gate --build
VERSION` has the rig build that version. With neither, a rig that can build gates its reference
firmware's next release: one minor above the newest field version of the selected carts.

The lab signs the candidate for each cart under the root that cart was provisioned with, as a
release would be; the signed artifact itself is `hil rollout check`'s business.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from harness.config import MAX_SLOT_SIZE, ConfigError, read_regular_file, version_key
from harness.image import ImageFormatError, parse_image


class CandidateError(ConfigError):
    """The candidate cannot be gated (one line: which file or version, and why)."""


@dataclass(frozen=True)
class Candidate:
    version: str
    unsigned: bytes   # the build as handed over (or made): what the lab signs for each cart
    origin: str       # where it came from, for the verdict: a path, or "rig build"

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.unsigned).hexdigest()

    def describe(self) -> str:
        return f"{self.version} ({self.origin}, sha256 {self.sha256[:16]})"


def default_version(field_versions: list[str]) -> str:
    """The reference firmware's next release: one minor above the newest field version."""
    from harness.ota import bump

    return bump(max(field_versions, key=version_key), minor=1)


def from_file(path: Path) -> Candidate:
    data = read_regular_file(path, MAX_SLOT_SIZE, "an image (one slot)", CandidateError)
    try:
        parsed = parse_image(data)
    except ImageFormatError as exc:
        raise CandidateError(f"{path}: not a firmware image: {exc}") from None
    if not parsed.version:
        raise CandidateError(f"{path}: the image carries no version (FW_VERSION TLV)")
    try:
        version_key(parsed.version)
    except ValueError:
        raise CandidateError(f"{path}: version {parsed.version!r} is not like 1.6.0") from None
    return Candidate(parsed.version, data, str(path))


def from_build(builds, version: str) -> Candidate:
    """`builds`: harness.ota.FirmwareBuilds of the rig."""
    return Candidate(version, builds.build(version), "rig build")


def check_above_field(candidate: Candidate, field: dict[str, list[str]]) -> None:
    """Refuse a candidate that is not above every field version of the selected carts: the carts would
    refuse it as a downgrade, and the gate would say nothing about the release."""
    for cart, versions in sorted(field.items()):
        top = max(versions, key=version_key)
        if version_key(candidate.version) <= version_key(top):
            raise CandidateError(f"candidate {candidate.version} is not above {cart}'s field version {top}: "
                                 "a cart takes only a higher version")
