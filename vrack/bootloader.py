"""Cart bootloader 2.1.0: fixed, not updatable. Picks the slot, counts trial boots, rolls back,
offers serial recovery, and runs the firmware that is in the slot.

Console lines and the recovery command set are the contract of docs/interfaces.md.
Boot selection, in order:

1. a pending trial slot with tries left: tries-1 is written to the BCB, then it boots with
   mode=trial (a watchdog resets the cart unless the firmware marks it good in time);
2. a pending slot with no tries left (or whose image is invalid): `BL: rollback: ...`, the
   rollback (slot and its target version) is recorded in the BCB and pending is cleared;
3. the active slot; if it is invalid, the other slot; if neither, `BL: no bootable image,
   halting` and the bootloader waits for a byte, which enters recovery.

The firmware gets a `Hal` (below) and runs in this process: compile() and exec() of the
payload, then `main(hal)`. An exception out of it is a crash: `BL: firmware crashed: ...`, a
short delay and a reset.

Cut targets: `EV: boot cause=.. slot=.. mode=.. t=..` right before the image runs, and
`EV: bcb-write copy=.. seq=.. why=.. t=..` before each BCB copy is written (vrack.flash.BootControl).
"""

from __future__ import annotations

import base64
import binascii
import copy
import hashlib
import re
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

from vrack.flash import (
    SLOTS,
    STATE_BOOTING,
    STATE_IDLE,
    STATE_PAGES,
    STATE_WRITING,
    TRUST_COPY_PAGES,
    Bcb,
    BootControl,
    FlashFault,
    other_slot,
)
from vrack.image import Image, check_image, peek_version

if TYPE_CHECKING:
    from vrack.cart import Board

BL_VERSION = "2.1.0"
CRASH_RESET_DELAY_S = 0.1  # a crashed core spins in its fault handler until the reset lands
RECOVERY_SETTLE_S = 0.05  # keys that follow the first one are dropped before the prompt
LOAD_LINE_TIMEOUT_S = 10.0
SHA256_HEX = re.compile(r"[0-9a-fA-F]{64}")


class Bootloader:
    def __init__(self, board: Board):
        self.board = board
        self.console = board.console
        self.flash = board.flash
        self.config = board.config
        self.bootctl = BootControl(board.flash, say=board.console.write_line_fresh)

    def say(self, line: str) -> None:
        self.console.write_line(line)

    def run(self) -> None:
        """From power-on to the firmware. Does not return: every way out is a reset (execv)."""
        cfg = self.config
        self.say(f"CART-BL {BL_VERSION} hw={cfg.hardware_revision} cfg={cfg.id}")
        self.say(f"BL: reset cause={self.board.reset_cause}")
        bcb = self.bootctl.read_valid()
        if bcb is None:
            self.say("BL: bcb blank, using defaults")
        self.say(f"BL: bcb {(bcb or Bcb()).line()}")
        window = cfg.boot.autoboot_window_s
        self.say(f"BL: press any key for recovery ({window:g} s)")
        if self.console.read_byte(window) is not None:
            self.recovery()
        while True:
            chosen = self.select()
            if chosen is not None:
                self.start(*chosen)
                return
            self.board.state.set(STATE_IDLE)
            self.say("BL: no bootable image, halting")
            self.console.read_byte(None)  # halted, but the UART still listens for recovery
            self.recovery()
            self.board.state.set(STATE_BOOTING)

    # --- slot selection --------------------------------------------------------------------

    def check(self, slot: str) -> Image | None:
        image, reason = check_image(self.flash.read_slot(slot))
        if image is None:
            self.say(f"BL: slot {slot} invalid: {reason}")
        else:
            self.say(f"BL: slot {slot} ok fw={image.version} size={image.total_size}")
        return image

    def write_bcb(self, bcb: Bcb, why: str) -> None:
        """Write the BCB; if the part fails both copies (each failure is reported on the console by
        BootControl), boot on with the state in memory: the next boot reads what the flash kept."""
        try:
            self.bootctl.write(bcb, why)
        except FlashFault:
            pass

    def select(self) -> tuple[str, Image, str] | None:
        bcb = self.bootctl.read()
        bcb = replace(bcb, boot_count=bcb.boot_count + 1)
        why = "boot"
        if bcb.pending is not None:
            if bcb.tries > 0:
                bcb = replace(bcb, tries=bcb.tries - 1)
                image = self.check(bcb.pending)
                if image is not None:
                    self.write_bcb(bcb, "trial")
                    return bcb.pending, image, "trial"
            bcb = self.rollback(bcb)
            why = "rollback"
        self.write_bcb(bcb, why)
        for slot in (bcb.active, other_slot(bcb.active)):
            image = self.check(slot)
            if image is not None:
                return slot, image, "normal"
        return None

    def rollback(self, bcb: Bcb) -> Bcb:
        slot = bcb.pending
        self.say(f"BL: rollback: slot {slot} not confirmed, back to slot {bcb.active}")
        version = peek_version(self.flash.read_slot(slot)) or ""
        return replace(bcb, pending=None, tries=0, rollback_slot=slot, rollback_version=version,
                       rollback_count=bcb.rollback_count + 1)

    # --- running the firmware --------------------------------------------------------------

    def start(self, slot: str, image: Image, mode: str) -> None:
        cfg = self.config
        self.say(f"BOOT: bl={BL_VERSION} slot={slot} fw={image.version} cfg={cfg.id} mode={mode}")
        hal = Hal(self.board, self.bootctl, slot, mode, image)
        if mode == "trial":
            hal.start_watchdog(cfg.boot.mark_good_window_s)
        entry = self.load(image, slot)
        self.say(f"EV: boot cause={self.board.reset_cause} slot={slot} mode={mode} t={time.monotonic_ns()}")
        try:
            if isinstance(entry, BaseException):
                raise entry
            entry(hal)
            raise RuntimeError("main(hal) returned")
        except (Exception, SystemExit) as exc:
            traceback.print_exc(file=sys.stderr)
            message = (str(exc).splitlines() or [""])[0]
            self.console.write_line_fresh(f"BL: firmware crashed: {type(exc).__name__}: {message}")
            time.sleep(CRASH_RESET_DELAY_S)
            self.board.reset("crash")

    @staticmethod
    def load(image: Image, slot: str) -> Callable | BaseException:
        """The firmware's entry point, or why there is none. Compiling the payload and running its module
        level (about 12 ms and 1 ms of host CPU) is the emulator's cost, not the device's: a real MCU
        jumps into the slot. It is done before the boot event, so a cut aimed at that event lands as
        the firmware starts and the event line is not held up behind it in the pty. A payload that does
        not load crashes after the event, as one that jumps into garbage would."""
        try:
            code = compile(image.payload, f"<slot {slot} fw {image.version}>", "exec")
            namespace: dict = {"__name__": "firmware"}
            exec(code, namespace)
            entry = namespace.get("main")
            if not callable(entry):
                raise RuntimeError("payload defines no main(hal)")
            return entry
        except (Exception, SystemExit) as exc:
            return exc

    # --- recovery ----------------------------------------------------------------------------

    def recovery(self) -> None:
        """Serial recovery until `boot`. Command lines are echoed; data lines are not."""
        self.say("BL: recovery mode")
        self.console.discard_input(RECOVERY_SETTLE_S)
        self.board.state.set(STATE_IDLE)
        while True:
            self.console.write("recovery> ")
            line = self.console.read_line(None)
            if line is None:
                continue
            self.say(line)
            words = line.split()
            if not words:
                continue
            if words == ["boot"]:
                self.board.state.set(STATE_BOOTING)
                return
            if words == ["info"]:
                g = self.flash.geometry
                self.say(f"info bl={BL_VERSION} cfg={self.config.id} page={g.page_size} slot_size={g.slot_size}")
            elif words[0] == "load" and len(words) == 4 and words[1] in SLOTS:
                layout = self.flash.layout
                self.receive("load", words[1], layout.slot_first_page(words[1]), layout.slot_size,
                             words[2], words[3])
            elif words[0] == "trust" and len(words) == 3:
                layout = self.flash.layout
                self.receive("trust", None, layout.trust_copy_first_page(0), layout.trust_copy_size, words[1],
                             words[2], finish=self.erase_trust_copy_1)
            elif words == ["state", "reset"]:
                layout = self.flash.layout
                try:
                    self.flash.erase_pages(layout.state_first_page, STATE_PAGES)
                except FlashFault as exc:
                    self.say(f"error state: {exc}")
                else:
                    self.say("ok state reset")
            elif words[:2] == ["bcb", "reset"] and len(words) == 3 and words[2] in SLOTS:
                current = self.bootctl.read()
                try:
                    self.bootctl.write(Bcb(active=words[2], confirmed=True, boot_count=current.boot_count,
                                           rollback_count=current.rollback_count), "recovery")
                except FlashFault as exc:
                    self.say(f"error bcb: {exc}")
                else:
                    self.say(f"ok bcb active={words[2]}")
            elif words[0] == "erase" and len(words) == 2 and words[1] in SLOTS:
                layout = self.flash.layout
                try:
                    self.flash.erase_pages(layout.slot_first_page(words[1]), layout.slot_pages,
                                           lambda i, n: self.say(f"erase: page {i}/{n}"))
                except FlashFault as exc:
                    self.say(f"error erase: {exc}")
                else:
                    self.say(f"ok erase {words[1]}")
            else:
                self.say(f"error: unknown command '{line.strip()}'")

    def erase_trust_copy_1(self) -> str | None:
        """After `trust` wrote copy 0: erase copy 1, so the store just loaded is the one read (whatever
        seq either copy had). The reason if the part fails, else None."""
        layout = self.flash.layout
        try:
            self.flash.erase_pages(layout.trust_copy_first_page(1), TRUST_COPY_PAGES)
        except FlashFault as exc:
            return str(exc)
        return None

    def receive(self, what: str, slot: str | None, first_page: int, capacity: int, size_text: str,
                sha_text: str, finish: Callable[[], str | None] | None = None) -> None:
        """Take base64 lines up to `.`, program them page by page, verify by reading back; then
        `finish()` (a reason if it failed, else None) before the `ok` line."""
        label = f"{what} {slot}" if slot else what
        if not size_text.isdigit() or not 0 < int(size_text) <= capacity:
            self.say(f"error {what}: bad size {size_text} (1..{capacity})")
            return
        if not SHA256_HEX.fullmatch(sha_text):
            self.say(f"error {what}: bad sha256")
            return
        size, want = int(size_text), sha_text.lower()
        page = self.flash.page_size
        total_pages = -(-size // page)
        self.say("ready")
        buf = bytearray()
        written = received = 0
        digest = hashlib.sha256()
        error = None

        def program(data: bytes) -> None:
            nonlocal written, error
            if error:
                return
            try:
                self.flash.write_page(first_page + written, data)
            except FlashFault as exc:
                error = str(exc)  # the part failed: no more pages, drain to the terminator
                return
            written += 1
            self.say(f"{what}: page {written}/{total_pages}")

        while True:
            line = self.console.read_line(LOAD_LINE_TIMEOUT_S)
            if line is None:
                error = error or "timeout"
                break
            line = line.strip()
            if line == ".":
                break
            if error or not line:
                continue  # after an error, drain to the terminator
            try:
                chunk = base64.b64decode(line, validate=True)
            except (binascii.Error, ValueError):
                error = "bad base64"
                continue
            received += len(chunk)
            if received > size:
                error = f"more than {size} bytes"
                continue
            digest.update(chunk)
            buf += chunk
            while len(buf) >= page:
                program(bytes(buf[:page]))
                del buf[:page]
                if error:
                    break
        if error is None and received != size:
            error = f"short data ({received} of {size} bytes)"
        if error is None and buf:
            program(bytes(buf))
        if error is None and digest.hexdigest() != want:
            error = "hash mismatch"
        if error is None:
            readback = self.flash.read(first_page * page, size)
            if hashlib.sha256(readback).hexdigest() != want:
                error = "readback mismatch"
        if error is None and finish is not None:
            error = finish()
        if error:
            self.say(f"error {what}: {error}")
        else:
            self.say(f"ok {label} {size} {want}")


class BcbService:
    """The firmware's view of the boot control block (through the bootloader's code)."""

    def __init__(self, bootctl: BootControl, hal: Hal):
        self._bootctl = bootctl
        self._hal = hal

    def read(self) -> Bcb:
        return self._bootctl.read()

    def mark_good(self) -> Bcb:
        """Confirm the running slot: it becomes active, confirmed, nothing pending."""
        bcb = self._bootctl.read()
        slot = self._hal.booted_slot
        pending = None if bcb.pending == slot else bcb.pending
        new = replace(bcb, active=slot, pending=pending, tries=0 if pending is None else bcb.tries,
                      confirmed=True)
        if new != bcb:
            bcb = self._bootctl.write(new, "mark-good")
        self._hal._confirmed.set()
        return bcb

    def set_pending(self, slot: str, tries: int = 1) -> Bcb:
        """Ask for `tries` trial boots of `slot` (not the running one) from the next reset on."""
        bcb = self._bootctl.read()
        if slot not in SLOTS or slot == self._hal.booted_slot:
            raise ValueError(f"pending slot must be the slot not running, not {slot!r}")
        if not 1 <= tries <= 255:
            raise ValueError(f"tries must be 1..255, not {tries}")
        return self._bootctl.write(replace(bcb, pending=slot, tries=tries), "set-pending")

    def clear_rollback(self) -> Bcb:
        """Forget the last rollback record (slot, version); rollback_count stays."""
        bcb = self._bootctl.read()
        if bcb.rollback_slot is None and not bcb.rollback_version:
            return bcb
        return self._bootctl.write(replace(bcb, rollback_slot=None, rollback_version=""), "clear-rollback")


class Hal:
    """What the firmware gets: the board, seen through the bootloader.

    console  write(text), write_line(text), read_line(timeout|None) -> str|None
    flash    read(offset, n), write_page(index, data), erase_page(index), read_slot(slot),
             layout.slot_offset(slot), page_size, slot_size (write_page/erase_page raise FlashFault)
    bcb      read() -> Bcb, mark_good(), set_pending(slot, tries=1), clear_rollback()
    clock    now() -> aware UTC datetime, set(datetime)
    sensors  [Sensor(name, kind, init(), read() -> float)]
    config   the cart configuration mapping (a copy)
    booted_slot "A"|"B", mode "normal"|"trial", fw_version, bootloader_version
    set_state(n) / state, reset()
    reset_cause "power-on"|"watchdog"|"software"|"crash" (why this image started)
    FlashFault  the exception of a failed erase/program (kind "erase"|"program", page)
    """

    STATE_BOOTING = STATE_BOOTING
    STATE_IDLE = STATE_IDLE
    STATE_WRITING = STATE_WRITING
    FlashFault = FlashFault

    def __init__(self, board: Board, bootctl: BootControl, slot: str, mode: str, image: Image):
        self._board = board
        self.console = board.console
        self.flash = board.flash
        self.clock = board.clock
        self.sensors = board.sensors
        self.config = copy.deepcopy(board.config.raw)
        self.booted_slot = slot
        self.mode = mode
        self.fw_version = image.version
        self.bootloader_version = BL_VERSION
        self.reset_cause = board.reset_cause
        self.bcb = BcbService(bootctl, self)
        self._confirmed = threading.Event()

    @property
    def state(self) -> int:
        return self._board.state.value

    def set_state(self, value: int) -> None:
        self._board.state.set(value)

    def reset(self) -> None:
        self._board.reset("software")

    def start_watchdog(self, window_s: float) -> None:
        def watch() -> None:
            if not self._confirmed.wait(window_s):
                self.console.write_line_fresh("BL: watchdog reset")
                self._board.reset("watchdog")

        threading.Thread(target=watch, name="trial-watchdog", daemon=True).start()
