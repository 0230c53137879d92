"""Cart firmware image format v1 (docs/image-format.md): device-side parser and the builder.

    header (32 bytes, little-endian)  magic b"CIMG", u16 format_version=1, u16 header_size=32,
                                      u32 payload_size, u32 tlv_size, 16 reserved bytes (zero)
    payload                           payload_size bytes: the program
    TLV area                          tlv_size bytes of entries: u16 type, u16 flags, u32 length, value

`parse_image()` is what the bootloader runs on a slot: every offset is bounds-checked, so
no input of any size or content raises anything but `ImageError` (whose `reason` is one of
REASONS). `build_image()` is used by the factory; `write_test_vectors()` regenerates the
published vectors in tests/vectors/image-v1/ (`python -m vrack.image vectors DIR`).
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

MAGIC = b"CIMG"
FORMAT_VERSION = 1
HEADER = struct.Struct("<4sHHII16s")
HEADER_SIZE = HEADER.size  # 32
TLV_HEAD = struct.Struct("<HHI")

TLV_FW_VERSION = 0x0001
TLV_PAYLOAD_SHA256 = 0x0002
TLV_BUILD_INFO = 0x0003
TLV_SIGNED_RESERVED = range(0x0010, 0x0020)  # signed manifest, signature, signer chain
KNOWN_TLVS = (TLV_FW_VERSION, TLV_PAYLOAD_SHA256, TLV_BUILD_INFO)

VERSION_RE = re.compile(r"[0-9]{1,5}\.[0-9]{1,5}\.[0-9]{1,5}(-[0-9A-Za-z.-]{1,12})?")
VERSION_MAX = 32

REASONS = (
    "erased",
    "bad magic",
    "bad size",
    "bad format version",
    "bad tlv",
    "missing version",
    "missing hash",
    "bad fw version",
    "bad build info",
    "hash mismatch",
)


class ImageError(ValueError):
    """The image is not bootable; `reason` is a short fixed string (see REASONS)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Tlv:
    type: int
    flags: int
    value: bytes


@dataclass(frozen=True)
class Image:
    version: str
    payload: bytes
    payload_sha256: bytes
    build_info: dict | None
    tlvs: tuple[Tlv, ...]
    total_size: int

    def tlv(self, type_: int) -> bytes | None:
        for t in self.tlvs:
            if t.type == type_:
                return t.value
        return None


def parse_image(data: bytes | bytearray | memoryview, *, verify_hash: bool = True) -> Image:
    """Parse (and by default verify) an image at the start of `data`.

    `data` may be longer than the image (a whole slot); bytes after the image are ignored.
    Raises ImageError(reason) for anything that is not a bootable v1 image.
    """
    data = memoryview(data).cast("B")
    n = len(data)
    if n >= 4 and bytes(data[:4]) == b"\xff\xff\xff\xff":
        raise ImageError("erased")
    if bytes(data[:4]) != MAGIC:
        raise ImageError("bad magic")
    if n < HEADER_SIZE:
        raise ImageError("bad size")
    _, fmt, header_size, payload_size, tlv_size, _reserved = HEADER.unpack_from(data, 0)
    if fmt != FORMAT_VERSION:
        raise ImageError("bad format version")
    if header_size != HEADER_SIZE or payload_size == 0:
        raise ImageError("bad size")
    total = HEADER_SIZE + payload_size + tlv_size
    if total > n:
        raise ImageError("bad size")
    payload = bytes(data[HEADER_SIZE : HEADER_SIZE + payload_size])
    tlvs = _parse_tlvs(data[HEADER_SIZE + payload_size : total])

    found: dict[int, bytes] = {}
    for t in tlvs:
        if t.type in KNOWN_TLVS:
            if t.type in found:
                raise ImageError("bad tlv")
            found[t.type] = t.value
    if TLV_FW_VERSION not in found:
        raise ImageError("missing version")
    if TLV_PAYLOAD_SHA256 not in found:
        raise ImageError("missing hash")
    digest = found[TLV_PAYLOAD_SHA256]
    if len(digest) != 32:
        raise ImageError("bad tlv")
    version = _decode_version(found[TLV_FW_VERSION])
    build_info = None
    if TLV_BUILD_INFO in found:
        try:
            build_info = json.loads(found[TLV_BUILD_INFO].decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise ImageError("bad build info") from None
        if not isinstance(build_info, dict):
            raise ImageError("bad build info")
    if verify_hash and hashlib.sha256(payload).digest() != digest:
        raise ImageError("hash mismatch")
    return Image(version, payload, digest, build_info, tuple(tlvs), total)


def _parse_tlvs(area: memoryview) -> list[Tlv]:
    tlvs = []
    pos, end = 0, len(area)
    while pos < end:
        if end - pos < TLV_HEAD.size:
            raise ImageError("bad tlv")
        type_, flags, length = TLV_HEAD.unpack_from(area, pos)
        pos += TLV_HEAD.size
        if length > end - pos:
            raise ImageError("bad tlv")
        tlvs.append(Tlv(type_, flags, bytes(area[pos : pos + length])))
        pos += length
    return tlvs


def _decode_version(raw: bytes) -> str:
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise ImageError("bad fw version") from None
    if len(text) > VERSION_MAX or not VERSION_RE.fullmatch(text):
        raise ImageError("bad fw version")
    return text


def check_image(data: bytes | bytearray | memoryview) -> tuple[Image | None, str | None]:
    """(image, None) if bootable, else (None, reason)."""
    try:
        return parse_image(data), None
    except ImageError as exc:
        return None, exc.reason


def peek_version(data: bytes | bytearray | memoryview) -> str | None:
    """The FW_VERSION of an image without checking its hash (None if it does not parse)."""
    try:
        return parse_image(data, verify_hash=False).version
    except ImageError:
        return None


# --- builder -------------------------------------------------------------------------------


def encode_tlv(type_: int, value: bytes, flags: int = 0) -> bytes:
    return TLV_HEAD.pack(type_, flags, len(value)) + value


def build_image(
    payload: bytes,
    version: str,
    *,
    build_info: dict | None = None,
    extra_tlvs: Iterable[tuple[int, bytes]] = (),
) -> bytes:
    """Assemble a v1 image: header, payload, TLVs (version, payload SHA-256, build info, extras).

    `extra_tlvs` are appended as given: the hook for the signed manifest (0x0010-0x001F).
    """
    if not payload:
        raise ValueError("empty payload")
    _decode_version(version.encode("ascii"))  # refuse what the bootloader would refuse
    tlvs = encode_tlv(TLV_FW_VERSION, version.encode("ascii"))
    tlvs += encode_tlv(TLV_PAYLOAD_SHA256, hashlib.sha256(payload).digest())
    if build_info is not None:
        tlvs += encode_tlv(TLV_BUILD_INFO, canonical_json(build_info))
    for type_, value in extra_tlvs:
        tlvs += encode_tlv(type_, value)
    header = HEADER.pack(MAGIC, FORMAT_VERSION, HEADER_SIZE, len(payload), len(tlvs), bytes(16))
    return header + payload + tlvs


def canonical_json(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode("utf-8")


# --- published test vectors ------------------------------------------------------------------

VECTOR_PAYLOAD = b'# image-v1 test vector payload\ndef main(hal):\n    hal.console.write_line("FW: vector")\n'
VECTOR_VERSION = "1.4.2"
VECTOR_BUILD_INFO = {"family": "vector", "version": VECTOR_VERSION, "faults": {}, "build_id": "vector-0001"}


def _header(payload_size: int, tlv_size: int, *, magic=MAGIC, fmt=FORMAT_VERSION, hsize=HEADER_SIZE,
            reserved=bytes(16)) -> bytes:
    return HEADER.pack(magic, fmt, hsize, payload_size, tlv_size, reserved)


def _image(payload: bytes = VECTOR_PAYLOAD, tlvs: bytes | None = None, **header) -> bytes:
    if tlvs is None:
        tlvs = (encode_tlv(TLV_FW_VERSION, VECTOR_VERSION.encode())
                + encode_tlv(TLV_PAYLOAD_SHA256, hashlib.sha256(payload).digest())
                + encode_tlv(TLV_BUILD_INFO, canonical_json(VECTOR_BUILD_INFO)))
    return _header(len(payload), len(tlvs), **header) + payload + tlvs


def _vectors() -> list[tuple[str, bytes, str | None, str]]:
    """(file, bytes, reason or None for accept, description)."""
    p = VECTOR_PAYLOAD
    sha = hashlib.sha256(p).digest()
    ver = encode_tlv(TLV_FW_VERSION, VECTOR_VERSION.encode())
    digest = encode_tlv(TLV_PAYLOAD_SHA256, sha)
    info = encode_tlv(TLV_BUILD_INFO, canonical_json(VECTOR_BUILD_INFO))
    valid = _image()
    flipped = bytearray(valid)
    flipped[HEADER_SIZE + 40] ^= 0x01
    bad_digest = bytearray(valid)
    bad_digest[HEADER_SIZE + len(p) + len(ver) + TLV_HEAD.size] ^= 0x80
    garbled = p.replace(b"def main(hal):", b"def main(hal)\x00")
    return [
        ("valid.img", valid, None, "a valid v1 image"),
        ("unknown-tlvs.img", _image(tlvs=encode_tlv(0x7F01, b"future") + ver + encode_tlv(0x0012, b"\x00" * 64)
                                    + digest + encode_tlv(0x0100, b"", flags=0x8001)),
         None, "unknown and reserved TLV types (and non-zero flags) are skipped"),
        ("reserved-nonzero.img", _image(reserved=b"\xaa" * 16), None, "reserved header bytes are ignored"),
        ("no-build-info.img", _image(tlvs=ver + digest), None, "BUILD_INFO is optional"),
        ("trailing-bytes.img", valid + b"\xff" * 100 + b"old slot contents", None,
         "bytes after the image (rest of a slot) are ignored"),
        ("corrupted-before-hashing.img", _image(payload=garbled), None,
         "payload corrupted before hashing: the image is valid, the program is not"),
        ("empty.img", b"", "bad magic", "zero bytes"),
        ("one-byte.img", b"C", "bad magic", "a single byte"),
        ("erased.img", b"\xff" * 4096, "erased", "an erased page"),
        ("bad-magic.img", _image(magic=b"CIMH"), "bad magic", "wrong magic"),
        ("bad-format-version.img", _image(fmt=2), "bad format version", "format_version 2"),
        ("bad-header-size.img", _image(hsize=64), "bad size", "header_size is not 32"),
        ("truncated-header.img", valid[:20], "bad size", "shorter than the header"),
        ("truncated-payload.img", valid[: HEADER_SIZE + len(p) // 2], "bad size", "cut inside the payload"),
        ("truncated-tlv.img", valid[:-5], "bad size", "cut inside the TLV area"),
        ("huge-payload-size.img", _header(0xFFFFFFFF, len(ver + digest)) + p + ver + digest, "bad size",
         "payload_size far beyond the data"),
        ("huge-tlv-size.img", _header(len(p), 0xFFFFFFF0) + p + ver + digest, "bad size",
         "tlv_size far beyond the data"),
        ("zero-payload.img", _header(0, len(ver) + len(digest)) + ver + digest, "bad size", "empty payload"),
        ("tlv-overrun.img", _image(tlvs=ver + digest + TLV_HEAD.pack(0x7F02, 0, 1000) + b"xx"), "bad tlv",
         "a TLV length runs past the TLV area"),
        ("tlv-fragment.img", _image(tlvs=ver + digest + b"\x01\x00\x00"), "bad tlv",
         "leftover bytes shorter than a TLV header"),
        ("duplicate-version.img", _image(tlvs=ver + digest + encode_tlv(TLV_FW_VERSION, b"9.9.9")), "bad tlv",
         "FW_VERSION twice"),
        ("bad-hash-length.img", _image(tlvs=ver + encode_tlv(TLV_PAYLOAD_SHA256, sha[:31])), "bad tlv",
         "PAYLOAD_SHA256 of 31 bytes"),
        ("missing-version.img", _image(tlvs=digest + info), "missing version", "no FW_VERSION"),
        ("missing-hash.img", _image(tlvs=ver + info), "missing hash", "no PAYLOAD_SHA256"),
        ("bad-fw-version.img", _image(tlvs=encode_tlv(TLV_FW_VERSION, b"1.4") + digest), "bad fw version",
         "FW_VERSION not x.y.z"),
        ("non-ascii-fw-version.img", _image(tlvs=encode_tlv(TLV_FW_VERSION, b"1.4.\xff") + digest),
         "bad fw version", "FW_VERSION not ASCII"),
        ("bad-build-info.img", _image(tlvs=ver + digest + encode_tlv(TLV_BUILD_INFO, b"{not json")),
         "bad build info", "BUILD_INFO is not a JSON object"),
        ("hash-mismatch.img", bytes(flipped), "hash mismatch", "one payload bit flipped after hashing"),
        ("hash-tlv-altered.img", bytes(bad_digest), "hash mismatch", "the PAYLOAD_SHA256 value altered"),
    ]


def write_test_vectors(out_dir: str | Path) -> dict:
    """Write every vector file and `vectors.json` into out_dir; deterministic."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    for name, blob, reason, description in _vectors():
        (out / name).write_bytes(blob)
        entry = {
            "file": name,
            "verdict": "accept" if reason is None else "reject",
            "reason": reason,
            "version": VECTOR_VERSION if reason is None else None,
            "size": len(blob),
            "sha256": hashlib.sha256(blob).hexdigest(),
            "description": description,
        }
        entries.append(entry)
    doc = {"format": "cart-image-v1", "reasons": list(REASONS), "vectors": entries}
    (out / "vectors.json").write_text(json.dumps(doc, indent=2) + "\n")
    return doc


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) == 2 and args[0] == "vectors":
        doc = write_test_vectors(args[1])
        print(f"wrote {len(doc['vectors'])} vectors to {args[1]}")
        return 0
    if len(args) == 2 and args[0] == "check":
        image, reason = check_image(Path(args[1]).read_bytes())
        print(f"ok fw={image.version} size={image.total_size}" if image else f"invalid: {reason}")
        return 0 if image else 1
    print("usage: python -m vrack.image vectors OUT_DIR | check IMAGE", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
