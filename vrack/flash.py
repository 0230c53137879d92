"""The cart's NOR flash: a file written page by page, the partition layout, the boot control
block (BCB), the trust-store blob and the fleet-settings blob. Layout and encodings: docs/flash-layout.md.

Every write to flash goes through `Flash.write_page()`: the one place where page-program time
is spent and where a later issue injects power cuts and torn pages.
"""

from __future__ import annotations

import json
import os
import struct
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from vrack.cartconfig import FlashGeometry

ERASED = 0xFF
SLOTS = ("A", "B")
TRUST_PAGES = 4
SETTINGS_PAGES = 2

STATE_OFF, STATE_BOOTING, STATE_IDLE, STATE_WRITING = 0, 1, 2, 3


class FlashError(RuntimeError):
    pass


def slot_index(slot: str) -> int:
    try:
        return SLOTS.index(slot)
    except ValueError:
        raise ValueError(f"no slot {slot!r}; slots are A and B") from None


def other_slot(slot: str) -> str:
    return SLOTS[1 - slot_index(slot)]


@dataclass(frozen=True)
class Layout:
    """Partition offsets for a page size P and slot size S (all in bytes)."""

    page_size: int
    slot_size: int

    @property
    def slot_pages(self) -> int:
        return self.slot_size // self.page_size

    def bcb_page(self, copy: int) -> int:
        return copy  # copy 0 @0, copy 1 @P

    def slot_first_page(self, slot: str) -> int:
        return 2 + slot_index(slot) * self.slot_pages

    def slot_offset(self, slot: str) -> int:
        return self.slot_first_page(slot) * self.page_size

    @property
    def trust_first_page(self) -> int:
        return 2 + 2 * self.slot_pages

    @property
    def trust_offset(self) -> int:
        return self.trust_first_page * self.page_size

    @property
    def trust_size(self) -> int:
        return TRUST_PAGES * self.page_size

    @property
    def settings_first_page(self) -> int:
        return self.trust_first_page + TRUST_PAGES

    @property
    def settings_offset(self) -> int:
        return self.settings_first_page * self.page_size

    @property
    def settings_size(self) -> int:
        return SETTINGS_PAGES * self.page_size

    @property
    def page_count(self) -> int:
        return self.settings_first_page + SETTINGS_PAGES

    @property
    def total_size(self) -> int:
        return self.page_count * self.page_size  # 8P + 2S


class StateByte:
    """The one-byte state file the rack reads for the supply's current draw."""

    def __init__(self, path: str | Path | None):
        self.value = STATE_OFF
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644) if path is not None else None

    def set(self, value: int) -> None:
        self.value = value
        if self._fd is not None:
            os.pwrite(self._fd, bytes([value]), 0)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class Flash:
    """A flash file of the cart's geometry, opened unbuffered (os.pread / os.pwrite)."""

    def __init__(self, path: str | Path, geometry: FlashGeometry, *, time_scale: float = 1.0,
                 state: StateByte | None = None):
        self.path = Path(path)
        self.geometry = geometry
        self.layout = Layout(geometry.page_size, geometry.slot_size)
        self.page_size = geometry.page_size
        self.slot_size = geometry.slot_size
        self.page_delay_s = geometry.page_program_ms * time_scale / 1000.0
        self.state = state
        self.pages_written = 0
        self._fd = os.open(self.path, os.O_RDWR)
        size = os.fstat(self._fd).st_size
        if size != self.layout.total_size:
            os.close(self._fd)
            raise FlashError(f"{self.path}: {size} bytes, but page_size={self.page_size} "
                             f"slot_size={self.slot_size} needs {self.layout.total_size}")

    @classmethod
    def create(cls, path: str | Path, geometry: FlashGeometry, *, exclusive: bool = False) -> None:
        """Make a new, fully erased flash file (factory; no page timing). `exclusive`: never replace an
        existing file (FileExistsError), as the rack does: it overwrites nothing it did not create."""
        total = Layout(geometry.page_size, geometry.slot_size).total_size
        with open(path, "xb" if exclusive else "wb") as f:
            f.write(bytes([ERASED]) * total)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> Flash:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def read(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0 or offset + length > self.layout.total_size:
            raise FlashError(f"read {offset}+{length} outside flash of {self.layout.total_size} bytes")
        return os.pread(self._fd, length, offset)

    def read_page(self, index: int) -> bytes:
        return self.read(index * self.page_size, self.page_size)

    def write_page(self, index: int, data: bytes) -> None:
        """Erase and program one page: THE single write path of the flash.

        Spends the page-program time (physics, scaled) with the state byte at 'writing flash',
        then stores the page. Data shorter than a page is padded with erased bytes.
        """
        if not 0 <= index < self.layout.page_count:
            raise FlashError(f"page {index} outside flash of {self.layout.page_count} pages")
        if len(data) > self.page_size:
            raise FlashError(f"page {index}: {len(data)} bytes do not fit a {self.page_size}-byte page")
        page = bytes(data) + bytes([ERASED]) * (self.page_size - len(data))
        previous = self.state.value if self.state else None
        if self.state:
            self.state.set(STATE_WRITING)
        if self.page_delay_s > 0:
            time.sleep(self.page_delay_s)
        os.pwrite(self._fd, page, index * self.page_size)
        self.pages_written += 1
        if self.state and previous is not None:
            self.state.set(previous)

    def write_pages(self, first_page: int, data: bytes,
                    progress: Callable[[int, int], None] | None = None) -> None:
        """Write data page by page from first_page; progress(i, n) after each page (1-based)."""
        n = -(-len(data) // self.page_size)
        for i in range(n):
            self.write_page(first_page + i, data[i * self.page_size : (i + 1) * self.page_size])
            if progress:
                progress(i + 1, n)

    def erase_pages(self, first_page: int, count: int,
                    progress: Callable[[int, int], None] | None = None) -> None:
        for i in range(count):
            self.write_page(first_page + i, b"")
            if progress:
                progress(i + 1, count)

    def read_slot(self, slot: str) -> bytes:
        return self.read(self.layout.slot_offset(slot), self.slot_size)


# --- boot control block ------------------------------------------------------------------------

BCB_MAGIC = b"CBCB"
BCB_LAYOUT_VERSION = 1
_BCB_BODY = struct.Struct("<4sHHIBBBBIBB2x32sI")  # 60 bytes, then u32 crc32
BCB_SIZE = _BCB_BODY.size + 4
NO_SLOT = 0xFF


@dataclass(frozen=True)
class Bcb:
    """Boot control block. Slots are "A"/"B"; pending/rollback_slot None when unset."""

    seq: int = 0
    active: str = "A"
    pending: str | None = None
    tries: int = 0
    confirmed: bool = True
    boot_count: int = 0
    rollback_slot: str | None = None
    rollback_version: str = ""
    rollback_count: int = 0

    def line(self) -> str:
        return f"seq={self.seq} active={self.active} pending={self.pending or '-'} tries={self.tries}"


def encode_bcb(bcb: Bcb) -> bytes:
    def code(slot: str | None) -> int:
        return NO_SLOT if slot is None else slot_index(slot)

    body = _BCB_BODY.pack(
        BCB_MAGIC, BCB_LAYOUT_VERSION, BCB_SIZE, bcb.seq & 0xFFFFFFFF, slot_index(bcb.active),
        code(bcb.pending), bcb.tries, int(bcb.confirmed), bcb.boot_count & 0xFFFFFFFF,
        code(bcb.rollback_slot), 0, bcb.rollback_version.encode("ascii")[:32], bcb.rollback_count & 0xFFFFFFFF,
    )
    return body + struct.pack("<I", zlib.crc32(body))


def decode_bcb(raw: bytes) -> Bcb | None:
    """The BCB in `raw`, or None if the copy is erased, torn or inconsistent."""
    if len(raw) < BCB_SIZE:
        return None
    body = raw[: _BCB_BODY.size]
    (crc,) = struct.unpack_from("<I", raw, _BCB_BODY.size)
    if zlib.crc32(body) != crc:
        return None
    (magic, layout, size, seq, active, pending, tries, confirmed, boots, rb_slot, _res, rb_version,
     rb_count) = _BCB_BODY.unpack(body)
    if magic != BCB_MAGIC or layout != BCB_LAYOUT_VERSION or size != BCB_SIZE:
        return None
    if active > 1 or pending not in (0, 1, NO_SLOT) or rb_slot not in (0, 1, NO_SLOT) or confirmed > 1:
        return None
    try:
        version = rb_version.rstrip(b"\x00").decode("ascii")
    except UnicodeDecodeError:
        return None

    def name(code: int) -> str | None:
        return None if code == NO_SLOT else SLOTS[code]

    return Bcb(seq, SLOTS[active], name(pending), tries, bool(confirmed), boots, name(rb_slot), version, rb_count)


class BootControl:
    """The two redundant BCB copies: read picks the valid copy with the highest seq; write
    stores seq+1 into the other copy, so a torn write leaves the previous state readable."""

    def __init__(self, flash: Flash):
        self.flash = flash

    def copies(self) -> list[Bcb | None]:
        return [decode_bcb(self.flash.read_page(self.flash.layout.bcb_page(c))) for c in (0, 1)]

    def _current(self) -> tuple[int | None, Bcb | None]:
        best: tuple[int | None, Bcb | None] = (None, None)
        for copy, bcb in enumerate(self.copies()):
            if bcb is not None and (best[1] is None or bcb.seq > best[1].seq):
                best = (copy, bcb)
        return best

    def read_valid(self) -> Bcb | None:
        """The current BCB, or None if neither copy is valid."""
        return self._current()[1]

    def read(self) -> Bcb:
        """The current BCB; defaults (seq 0, active A, confirmed) if neither copy is valid."""
        return self.read_valid() or Bcb()

    def write(self, bcb: Bcb) -> Bcb:
        copy, current = self._current()
        new = replace(bcb, seq=(current.seq + 1) if current else max(bcb.seq, 0) + 1)
        target = 0 if copy is None else 1 - copy
        self.flash.write_page(self.flash.layout.bcb_page(target), encode_bcb(new))
        return new


# --- framed blobs: the trust store and the fleet settings --------------------------------------
# Both regions hold: magic (4), version (2), a 16-bit field (trust: CA count; settings: 0), body
# length (4), CRC-32 of the body (4), then the body, UTF-8 JSON (sorted keys, compact).

_BLOB_HEAD = struct.Struct("<4sHHII")


def _frame(magic: bytes, version: int, field: int, obj: object) -> bytes:
    body = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode("utf-8")
    return _BLOB_HEAD.pack(magic, version, field, len(body), zlib.crc32(body)) + body


def _unframe(raw: bytes, magic: bytes, version: int, error: type[Exception]) -> tuple[int, object]:
    """(the 16-bit field, the decoded JSON body) of a framed blob; `error(reason)` on anything wrong."""
    if len(raw) >= 4 and raw[:4] == b"\xff\xff\xff\xff":
        raise error("erased")
    if len(raw) < _BLOB_HEAD.size or raw[:4] != magic:
        raise error("bad magic")
    _, found_version, field, length, crc = _BLOB_HEAD.unpack_from(raw, 0)
    if found_version != version:
        raise error("bad version")
    body = raw[_BLOB_HEAD.size : _BLOB_HEAD.size + length]
    if len(body) != length:
        raise error("bad size")
    if zlib.crc32(body) != crc:
        raise error("bad crc")
    try:
        return field, json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise error("bad body") from None


# --- trust store -------------------------------------------------------------------------------

TRUST_MAGIC = b"TRST"
TRUST_VERSION = 1


class TrustError(ValueError):
    pass


def encode_trust(cas: list[dict]) -> bytes:
    entries = [{"name": str(ca["name"]), "pem": str(ca.get("pem", ""))} for ca in cas]
    return _frame(TRUST_MAGIC, TRUST_VERSION, len(entries), {"cas": entries})


def decode_trust(raw: bytes) -> list[dict]:
    """The CA entries of a trust-store blob (bounds-checked; TrustError on anything wrong)."""
    count, body = _unframe(raw, TRUST_MAGIC, TRUST_VERSION, TrustError)
    cas = body.get("cas") if isinstance(body, dict) else None
    if not isinstance(cas, list) or len(cas) != count or not all(
            isinstance(c, dict) and isinstance(c.get("name"), str) and isinstance(c.get("pem"), str) for c in cas):
        raise TrustError("bad body")
    return cas


# --- fleet settings ----------------------------------------------------------------------------

SETTINGS_MAGIC = b"CSET"
SETTINGS_VERSION = 1
SETTINGS_MAX = SETTINGS_PAGES * 2048  # the settings region of the smallest page size: the blob must fit any cart


class SettingsError(ValueError):
    pass


def encode_settings(settings: dict) -> bytes:
    """The settings-region blob of `settings`; SettingsError if it would not fit the settings
    region of the smallest page size (SETTINGS_MAX bytes)."""
    blob = _frame(SETTINGS_MAGIC, SETTINGS_VERSION, 0, settings)
    if len(blob) > SETTINGS_MAX:
        raise SettingsError(f"fleet settings of {len(blob)} bytes do not fit the {SETTINGS_MAX}-byte settings region "
                            f"({SETTINGS_PAGES} pages of the smallest page size, 2048)")
    return blob


def decode_settings(raw: bytes) -> dict:
    """The settings in a settings-region blob (bounds-checked; SettingsError on anything wrong)."""
    _, settings = _unframe(raw, SETTINGS_MAGIC, SETTINGS_VERSION, SettingsError)
    if not isinstance(settings, dict):
        raise SettingsError("bad body")
    return settings
