"""The cart's NOR flash: a file written page by page, the partition layout, the boot control
block (BCB), the trust store (two copies), the fleet-settings blob and the device state (security
counter and time floor, two copies). Layout and encodings: docs/flash-layout.md.

Every write to flash goes through `Flash.write_page()` (erase included): the one place where
page-program time is spent, where the open operation is recorded for the rack to tear the page at a
power cut, and where the erase/program faults set through the rack's control interface strike.
"""

from __future__ import annotations

import json
import os
import random
import struct
import sys
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from vrack.cartconfig import FlashGeometry

ERASED = 0xFF
READ_CHUNK = 64 * 1024  # bytes read before the host CPU is offered to others (see Flash._pread)
SLOTS = ("A", "B")
TRUST_PAGES = 4
TRUST_COPY_PAGES = 2  # the trust store is two copies of 2 pages each, never written in place
SETTINGS_PAGES = 2
STATE_PAGES = 2  # the device state: copy 0 on the first page, copy 1 on the second

STATE_OFF, STATE_BOOTING, STATE_IDLE, STATE_WRITING = 0, 1, 2, 3


class FlashError(RuntimeError):
    pass


class FlashFault(FlashError):
    """The part reported an erase or program failure (its status register): `kind` is "erase" or
    "program", `page` the absolute page index. The page is left partly erased / programmed."""

    def __init__(self, kind: str, page: int):
        super().__init__(f"{kind} failed: page {page}")
        self.kind = kind
        self.page = page


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

    def trust_copy_first_page(self, copy: int) -> int:
        return self.trust_first_page + copy * TRUST_COPY_PAGES

    def trust_copy_offset(self, copy: int) -> int:
        return self.trust_copy_first_page(copy) * self.page_size

    @property
    def trust_copy_size(self) -> int:
        """Bytes of one trust-store copy: the most a trust-store blob may take."""
        return TRUST_COPY_PAGES * self.page_size

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
    def state_first_page(self) -> int:
        return self.settings_first_page + SETTINGS_PAGES

    @property
    def state_offset(self) -> int:
        return self.state_first_page * self.page_size

    @property
    def state_size(self) -> int:
        return STATE_PAGES * self.page_size

    @property
    def page_count(self) -> int:
        return self.state_first_page + STATE_PAGES

    @property
    def total_size(self) -> int:
        return self.page_count * self.page_size  # 10P + 2S

    @property
    def old_total_size(self) -> int:
        """The size of a flash file of the layout before the device-state region (8P + 2S)."""
        return self.total_size - STATE_PAGES * self.page_size


# The open-operation record, after the state byte in the state file (docs/flash-layout.md):
#   0 state (1)  1 open (1: a page operation is in progress, 0: none)  2 kind (b"P" program, b"E" erase)
#   3 reserved (0)  4 page index (u32 LE)  8 data length (u32 LE, = page size)
#   12 CRC-32 of bytes 2..11 followed by the data (u32 LE)  16 the page's new data
# Written in one pwrite (state byte 3 + record) before the program time, closed by one 2-byte pwrite
# (state byte + open=0) after it. A record cut short by the kill fails its CRC: nothing was programmed.
RECORD = struct.Struct("<BBcxIII")  # state, open, kind, page, length, crc
RECORD_OPEN = 1
KIND_PROGRAM, KIND_ERASE = b"P", b"E"


def record_crc(kind: bytes, page: int, data: bytes) -> int:
    return zlib.crc32(data, zlib.crc32(struct.pack("<cxII", kind, page, len(data))))


@dataclass(frozen=True)
class OpenWrite:
    """A page operation that was in progress when the cart lost power."""

    kind: bytes
    page: int
    data: bytes


def read_open_write(raw: bytes) -> OpenWrite | None:
    """The open-operation record in the bytes of a state file, or None (none open, or cut short)."""
    if len(raw) < RECORD.size:
        return None
    _state, is_open, kind, page, length, crc = RECORD.unpack_from(raw, 0)
    data = raw[RECORD.size : RECORD.size + length]
    if is_open != RECORD_OPEN or kind not in (KIND_PROGRAM, KIND_ERASE) or len(data) != length:
        return None
    if record_crc(kind, page, data) != crc:
        return None
    return OpenWrite(kind, page, bytes(data))


class StateByte:
    """The state file the rack reads for the supply's current draw: byte 0 the state, then the
    record of the page operation in progress (what the rack tears at a power cut)."""

    def __init__(self, path: str | Path | None):
        self.value = STATE_OFF
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644) if path is not None else None

    def set(self, value: int) -> None:
        self.value = value
        if self._fd is not None:
            os.pwrite(self._fd, bytes([value]), 0)

    def open_write(self, kind: bytes, page: int, data: bytes) -> None:
        """State 'writing flash' and the record of the operation, in one pwrite."""
        self.value = STATE_WRITING
        if self._fd is not None:
            head = RECORD.pack(STATE_WRITING, RECORD_OPEN, kind, page, len(data), record_crc(kind, page, data))
            os.pwrite(self._fd, head + data, 0)

    def close_write(self, value: int) -> None:
        """The operation is over: state `value`, record closed, in one pwrite."""
        self.value = value
        if self._fd is not None:
            os.pwrite(self._fd, bytes([value, 0]), 0)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def tear_open_write(state_path: str | Path, flash_path: str | Path, page_size: int,
                    rng: random.Random) -> tuple[int, int] | None:
    """After a power cut: if the state file records a page operation in progress, leave that page of
    the flash file torn (the new data up to a random point, random garbage beyond it) and close the
    record. Returns (page, cut) or None. Used by the rack (the cart is dead by then)."""
    try:
        with open(state_path, "r+b") as f:
            op = read_open_write(f.read(RECORD.size + page_size))
            if op is None or len(op.data) != page_size:
                return None
            fd = os.open(flash_path, os.O_RDWR)
            try:
                if (op.page + 1) * page_size > os.fstat(fd).st_size:
                    return None
                cut = tear_point(op.data, rng)
                os.pwrite(fd, torn_page(op.data, cut, rng), op.page * page_size)
            finally:
                os.close(fd)
            f.seek(1)
            f.write(b"\x00")
            return op.page, cut
    except OSError:
        return None


def tear_point(data: bytes, rng: random.Random) -> int:
    """Where the cut stops a page operation: programming spends its time on the bytes that are not
    0xFF (an erased byte needs no programming), so a program is cut within its data, 0..n where n is
    the length up to the last byte that is not 0xFF (n itself: the data made it, the tail did not);
    an erase (all 0xFF) anywhere in the page."""
    significant = len(data.rstrip(b"\xff"))
    return rng.randrange(significant + 1) if significant else rng.randrange(len(data))


def torn_page(data: bytes, cut: int, rng: random.Random) -> bytes:
    """`data` up to byte `cut`, random bytes beyond: a page whose program or erase was cut short."""
    return bytes(data[:cut]) + rng.randbytes(len(data) - cut)


# --- flash faults ------------------------------------------------------------------------------

MAX_FAULT_ENTRIES = 1024
FAULT_KEYS = ("erase_fail", "program_fail", "bitflip")


@dataclass(frozen=True)
class FlashFaults:
    """Faults set on one cart's flash (docs/interfaces.md, rack control interface)."""

    erase_fail: frozenset[int] = frozenset()
    program_fail: frozenset[int] = frozenset()
    bitflip: tuple[tuple[int, int, int], ...] = ()  # (page, offset, mask)

    def __bool__(self) -> bool:
        return bool(self.erase_fail or self.program_fail or self.bitflip)

    def to_json(self) -> dict:
        return {"erase_fail": sorted(self.erase_fail), "program_fail": sorted(self.program_fail),
                "bitflip": [{"page": p, "offset": o, "mask": m} for p, o, m in self.bitflip]}


def parse_faults(doc: object, page_count: int, page_size: int) -> FlashFaults:
    """Validate a faults document; ValueError with a one-line reason on anything wrong."""

    def is_int(v: object) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    def page_ok(where: str, v: object) -> int:
        if not is_int(v):
            raise ValueError(f"{where}: expected a page index (integer), got {type(v).__name__}")
        if not 0 <= v < page_count:
            raise ValueError(f"{where}: page {v} is outside the device (pages 0..{page_count - 1})")
        return v

    if not isinstance(doc, dict):
        raise ValueError(f"expected a JSON object with {', '.join(FAULT_KEYS)}, got {type(doc).__name__}")
    unknown = sorted(str(k) for k in doc if k not in FAULT_KEYS)
    if unknown:
        raise ValueError(f"unknown key {unknown[0][:40]!r}; known: {', '.join(FAULT_KEYS)}")
    lists = {}
    for key in FAULT_KEYS:
        value = doc.get(key, [])
        if not isinstance(value, list):
            raise ValueError(f"{key}: expected a list, got {type(value).__name__}")
        lists[key] = value
    total = sum(len(v) for v in lists.values())
    if total > MAX_FAULT_ENTRIES:
        raise ValueError(f"{total} entries: at most {MAX_FAULT_ENTRIES}")
    sets = {}
    for key in ("erase_fail", "program_fail"):
        pages = [page_ok(f"{key}[{i}]", v) for i, v in enumerate(lists[key])]
        if len(set(pages)) != len(pages):
            raise ValueError(f"{key}: page {next(p for p in pages if pages.count(p) > 1)} is listed twice")
        sets[key] = frozenset(pages)
    flips = []
    for i, entry in enumerate(lists["bitflip"]):
        where = f"bitflip[{i}]"
        if not isinstance(entry, dict) or set(entry) != {"page", "offset", "mask"}:
            raise ValueError(f"{where}: expected an object with exactly page, offset, mask")
        page = page_ok(f"{where}.page", entry["page"])
        offset, mask = entry["offset"], entry["mask"]
        if not is_int(offset) or not 0 <= offset < page_size:
            raise ValueError(f"{where}.offset: expected an integer 0..{page_size - 1}, got {offset!r:.40}")
        if not is_int(mask) or not 1 <= mask <= 255:
            raise ValueError(f"{where}.mask: expected an integer 1..255, got {mask!r:.40}")
        flips.append((page, offset, mask))
    if len({(p, o) for p, o, _ in flips}) != len(flips):
        raise ValueError("bitflip: the same page and offset is listed twice")
    return FlashFaults(sets["erase_fail"], sets["program_fail"], tuple(flips))


class Flash:
    """A flash file of the cart's geometry, opened unbuffered (os.pread / os.pwrite).

    `faults`: the cart's fault file (`<run_dir>/faults/slotNN.json`, written by the rack's control
    interface), re-read whenever its inode, mtime or size changes (one os.stat per operation).
    """

    def __init__(self, path: str | Path, geometry: FlashGeometry, *, time_scale: float = 1.0,
                 state: StateByte | None = None, faults: str | Path | None = None,
                 rng: random.Random | None = None):
        self.path = Path(path)
        self.geometry = geometry
        self.layout = Layout(geometry.page_size, geometry.slot_size)
        self.page_size = geometry.page_size
        self.slot_size = geometry.slot_size
        self.page_delay_s = geometry.page_program_ms * time_scale / 1000.0
        self.state = state
        self.pages_written = 0
        self.faults_path = None if faults is None else os.fspath(faults)
        self.faults = FlashFaults()
        self._faults_key: tuple | None = None
        self._flips: dict[int, list[tuple[int, int]]] = {}  # page -> [(offset, mask)]
        self._rng = rng or random.Random()
        self._op_lock = threading.Lock()  # the part runs one erase/program at a time
        self._fd = os.open(self.path, os.O_RDWR)
        size = os.fstat(self._fd).st_size
        if size != self.layout.total_size:
            os.close(self._fd)
            older = (" (the layout before the device-state region: provision it again)"
                     if size == self.layout.old_total_size else "")
            raise FlashError(f"{self.path}: {size} bytes, but page_size={self.page_size} "
                             f"slot_size={self.slot_size} needs {self.layout.total_size}{older}")

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

    # faults

    def _check_faults(self) -> FlashFaults:
        """The faults in force now: the fault file is re-read when it changed (or went)."""
        if self.faults_path is None:
            return self.faults
        try:
            st = os.stat(self.faults_path)
            key = (st.st_ino, st.st_mtime_ns, st.st_size)
        except OSError:
            key = None
        if key != self._faults_key:
            self._faults_key = key
            faults = FlashFaults()
            if key is not None:
                try:
                    with open(self.faults_path, "rb") as f:
                        faults = parse_faults(json.loads(f.read(1 << 20)), self.layout.page_count, self.page_size)
                except (OSError, ValueError, RecursionError) as exc:
                    print(f"vrack flash: {self.faults_path}: ignored: {exc}", file=sys.stderr, flush=True)
            self.faults = faults
            self._flips = {}
            for page, offset, mask in faults.bitflip:
                self._flips.setdefault(page, []).append((offset, mask))
        return self.faults

    # reads

    def read(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0 or offset + length > self.layout.total_size:
            raise FlashError(f"read {offset}+{length} outside flash of {self.layout.total_size} bytes")
        self._check_faults()
        data = self._pread(offset, length)
        if not self._flips or not length:
            return data
        first, last = offset // self.page_size, (offset + length - 1) // self.page_size
        flipped = None
        for page, flips in self._flips.items():
            if first <= page <= last:
                for off, mask in flips:
                    at = page * self.page_size + off - offset
                    if 0 <= at < length:
                        flipped = flipped if flipped is not None else bytearray(data)
                        flipped[at] ^= mask
        return data if flipped is None else bytes(flipped)

    def _pread(self, offset: int, length: int) -> bytes:
        """A long read goes in READ_CHUNK pieces, the host CPU offered to others between them. A real
        MCU reading a slot waits on its flash bus (megabytes per second) while its UART goes on sending;
        here the copy is a fraction of a millisecond of CPU, during which the host's kernel could not
        hand the cart's last console line to the harness (the line sat in the pty for a scheduler slice:
        a cut on that line's event landed ms late). The step has begun when the first chunk is read."""
        if length <= READ_CHUNK:
            return os.pread(self._fd, length, offset)
        parts = []
        for at in range(offset, offset + length, READ_CHUNK):
            if parts:
                os.sched_yield()
            parts.append(os.pread(self._fd, min(READ_CHUNK, offset + length - at), at))
        return b"".join(parts)

    def read_page(self, index: int) -> bytes:
        return self.read(index * self.page_size, self.page_size)

    # the one write path

    def write_page(self, index: int, data: bytes) -> None:
        """Erase and program one page: THE single write path of the flash.

        Spends the page-program time (physics, scaled) with the state byte at 'writing flash' and the
        operation recorded in the state file (a power cut then leaves the page torn: the rack tears
        it), then stores the page. Data shorter than a page is padded with erased bytes. A fault set
        on the page leaves it partly erased / programmed and raises FlashFault.
        """
        self._operate(index, data, KIND_PROGRAM)

    def erase_page(self, index: int) -> None:
        """Erase one page (all 0xFF): the same write path, recorded as an erase."""
        self._operate(index, b"", KIND_ERASE)

    def _operate(self, index: int, data: bytes, kind: bytes) -> None:
        if not 0 <= index < self.layout.page_count:
            raise FlashError(f"page {index} outside flash of {self.layout.page_count} pages")
        if len(data) > self.page_size:
            raise FlashError(f"page {index}: {len(data)} bytes do not fit a {self.page_size}-byte page")
        page = bytes(data) + bytes([ERASED]) * (self.page_size - len(data))
        with self._op_lock:
            faults = self._check_faults()
            previous = self.state.value if self.state else None
            if self.state:
                self.state.open_write(kind, index, page)
            try:
                if self.page_delay_s > 0:
                    time.sleep(self.page_delay_s)
                at = index * self.page_size
                if index in faults.erase_fail:  # the erase step fails: partly erased, nothing programmed
                    cut = self._rng.randrange(1, self.page_size)
                    os.pwrite(self._fd, bytes([ERASED]) * cut, at)
                    raise FlashFault("erase", index)
                if kind == KIND_PROGRAM and index in faults.program_fail:  # erased, then partly programmed
                    cut = self._rng.randrange(1, self.page_size)
                    os.pwrite(self._fd, page[:cut] + bytes([ERASED]) * (self.page_size - cut), at)
                    raise FlashFault("program", index)
                os.pwrite(self._fd, page, at)
                self.pages_written += 1
            finally:
                if self.state and previous is not None:
                    self.state.close_write(previous)

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
            self.erase_page(first_page + i)
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
    stores seq+1 into the other copy, so a torn write leaves the previous state readable.

    `say(line)`: where the cut-target line `EV: bcb-write copy=<c> seq=<n> why=<why> t=<ns>` goes
    before each copy is written (and `BL: bcb write failed: page N` when the part reports a failure:
    the write then goes to the other copy). None (the factory, tools): no lines.
    """

    def __init__(self, flash: Flash, say: Callable[[str], None] | None = None):
        self.flash = flash
        self.say = say

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

    def write(self, bcb: Bcb, why: str | None = None) -> Bcb:
        """Store `bcb` with seq = current + 1 in the copy that is not current. If the part fails that
        write (FlashFault), the same record goes to the other copy; FlashFault if both fail."""
        copy, current = self._current()
        new = replace(bcb, seq=(current.seq + 1) if current else max(bcb.seq, 0) + 1)
        target = 0 if copy is None else 1 - copy
        raw = encode_bcb(new)
        for attempt in (target, 1 - target):
            page = self.flash.layout.bcb_page(attempt)
            if self.say:
                self.say(f"EV: bcb-write copy={attempt} seq={new.seq} why={why or '-'} t={time.monotonic_ns()}")
            try:
                self.flash.write_page(page, raw)
                return new
            except FlashFault as exc:
                if self.say:
                    self.say(f"BL: bcb write failed: page {exc.page}")
                if attempt != target:
                    raise
        raise AssertionError("unreachable")


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
# Two copies in the trust-store region (copy 0: its pages 0-1, copy 1: pages 2-3), each a framed blob
# with body {"cas": [{"name", "pem", "until"?}], "seq": n}. The valid copy with the highest seq is the
# store (a tie: copy 0); a new store is written into the other copy, so a torn write leaves the old one.

TRUST_MAGIC = b"TRST"
TRUST_VERSION = 1


class TrustError(ValueError):
    pass


@dataclass(frozen=True)
class TrustStore:
    """The trust store as read from flash: CA entries {"name", "pem", "until"?}, the copy's seq, and
    which copy it came from."""

    cas: list[dict]
    seq: int = 0
    copy: int = 0


def _is_uint(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def encode_trust(cas: list[dict], seq: int = 0) -> bytes:
    """One trust-store copy: entries {"name", "pem", "until"?} (until: epoch second from which the
    root is retired; absent = never) and the copy's sequence number."""
    entries = []
    for ca in cas:
        entry = {"name": str(ca["name"]), "pem": str(ca.get("pem", ""))}
        if ca.get("until") is not None:
            if not _is_uint(ca["until"]):
                raise TrustError(f"until of {entry['name']!r}: an epoch second, not {ca['until']!r}")
            entry["until"] = ca["until"]
        entries.append(entry)
    if not _is_uint(seq) or seq >= 2**32:
        raise TrustError(f"seq {seq!r}: 0..2**32-1")
    return _frame(TRUST_MAGIC, TRUST_VERSION, len(entries), {"cas": entries, "seq": seq})


def decode_trust_copy(raw: bytes) -> tuple[list[dict], int]:
    """(CA entries, seq) of one trust-store copy (bounds-checked; TrustError on anything wrong).
    A body without `seq` is seq 0 (a store written before the copies had one)."""
    count, body = _unframe(raw, TRUST_MAGIC, TRUST_VERSION, TrustError)
    cas = body.get("cas") if isinstance(body, dict) else None
    seq = body.get("seq", 0) if isinstance(body, dict) else None
    if not isinstance(cas, list) or len(cas) != count or not _is_uint(seq) or not all(
            isinstance(c, dict) and isinstance(c.get("name"), str) and isinstance(c.get("pem"), str)
            and ("until" not in c or _is_uint(c["until"])) for c in cas):
        raise TrustError("bad body")
    return cas, seq


def decode_trust(raw: bytes) -> list[dict]:
    """The CA entries of one trust-store copy (bounds-checked; TrustError on anything wrong)."""
    return decode_trust_copy(raw)[0]


def read_trust(region: bytes, page_size: int) -> TrustStore:
    """The trust store in the bytes of the whole trust-store region: the valid copy with the highest
    seq (a tie: copy 0). Neither valid: TrustError with copy 0's reason."""
    size = TRUST_COPY_PAGES * page_size
    found: list[TrustStore] = []
    first_error = None
    for copy in (0, 1):
        try:
            cas, seq = decode_trust_copy(region[copy * size:(copy + 1) * size])
        except TrustError as exc:
            first_error = first_error or exc
            continue
        found.append(TrustStore(cas, seq, copy))
    if not found:
        raise first_error or TrustError("erased")
    return max(found, key=lambda store: (store.seq, -store.copy))


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


# --- device state --------------------------------------------------------------------------------
# Two 32-byte records, one per page of the device-state region (copy 0, copy 1), the rest of the page
# 0xFF: the security counter (anti-rollback) and the time floor (the latest server time accepted).
# Written by the firmware only (the other copy, seq + 1); the bootloader's recovery erases both.

STATE_MAGIC = b"CDST"
STATE_VERSION = 1
_STATE_BODY = struct.Struct("<4sHHIIQI")  # magic, version, size, seq, security counter, time floor, reserved
STATE_SIZE = _STATE_BODY.size + 4  # then the CRC-32 of the 28 bytes before it


@dataclass(frozen=True)
class DeviceState:
    """Security counter and time floor (epoch s); `seq` 0 and `copy` None when neither copy is valid."""

    counter: int = 0
    floor: int = 0
    seq: int = 0
    copy: int | None = None


def encode_state(seq: int, counter: int, floor: int) -> bytes:
    body = _STATE_BODY.pack(STATE_MAGIC, STATE_VERSION, STATE_SIZE, seq, counter, floor, 0)
    return body + struct.pack("<I", zlib.crc32(body))


def decode_state(raw: bytes) -> DeviceState | None:
    """The record at the start of one device-state page, or None (erased, torn, another version)."""
    if len(raw) < STATE_SIZE:
        return None
    body = bytes(raw[:_STATE_BODY.size])
    (crc,) = struct.unpack_from("<I", raw, _STATE_BODY.size)
    if zlib.crc32(body) != crc:
        return None
    magic, version, size, seq, counter, floor, _ = _STATE_BODY.unpack(body)
    if magic != STATE_MAGIC or version != STATE_VERSION or size != STATE_SIZE:
        return None
    return DeviceState(counter, floor, seq)


def read_state(region: bytes, page_size: int) -> DeviceState:
    """The device state in the bytes of the whole region: the valid copy with the highest seq (a tie:
    copy 0); neither valid: counter 0, floor 0, seq 0."""
    best = DeviceState()
    for copy in (0, 1):
        found = decode_state(region[copy * page_size:(copy + 1) * page_size])
        if found is not None and (best.copy is None or found.seq > best.seq):
            best = replace(found, copy=copy)
    return best
