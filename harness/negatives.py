"""The gate's negative matrix: defective release images and the exact reason a cart must give.

Each entry is (id, signing options for harness.ota.Signer.sign / CartOta.image, expected reason). The
signed-update suite delivers them to the firmware a cart runs in the field; the release suite to the
candidate, so that the candidate's own verifier is what refuses them.
"""

from __future__ import annotations

import time

from harness import pki

_NOW = int(time.time())

IMAGE_DEFECTS: list[tuple[str, dict, str]] = [
    ("unsigned", {"tamper": "unsigned"}, "unsigned"),
    ("untrusted-signer", {"signer": pki.signer_of(pki.ROGUE_ROOT)}, "untrusted signer"),
    ("corrupted-signature", {"tamper": "bad-signature"}, "bad signature"),
    ("payload-changed-after-signing", {"tamper": "payload-after-signing"}, "payload hash mismatch"),
    ("manifest-changed-after-signing", {"tamper": "manifest-after-signing"}, "bad signature"),
    ("payload-size-mismatch", {"tamper": "size-mismatch"}, "size mismatch"),
    ("payload-hash-tlv-mismatch", {"tamper": "hash-mismatch"}, "payload hash mismatch"),
    ("version-tlv-mismatch", {"tamper": "version-mismatch"}, "manifest mismatch"),
    ("no-signer-chain", {"tamper": "no-certs"}, "untrusted signer"),
    ("truncated-image", {"tamper": "truncated"}, "malformed: bad size"),
    ("wrong-hardware", {"hardware": ["rev-z"]}, "wrong hardware"),
    ("expired", {"issued": 1_600_000_000, "expires": 1_700_000_000}, "expired"),
    ("not-yet-valid", {"issued": _NOW + 30 * 86400, "expires": _NOW + 60 * 86400}, "not yet valid"),
]


def lower(version: str) -> str:
    """A version just below `version` (a downgrade)."""
    major, minor, patch = (int(x) for x in version.split("."))
    return f"{major}.{minor}.{patch - 1}" if patch else f"{major}.{minor - 1}.9"
