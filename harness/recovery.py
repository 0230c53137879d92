"""Put a cart back to its factory image and trust store, the way a bench does.

Two methods, chosen by the rig's `recovery.method`:

- ``serial``: interrupt autoboot on the console, then send the image and the trust store to
  the bootloader's recovery mode and, where the profile has a ``state_reset`` step, clear the
  device state (security counter, time floor) as shipped (commands and replies from the console
  profile);
- ``command``: run the rig's recovery command (a debug-probe flash, say) with the image path.

Either way the cart then boots, and the banner must show slot A at the configuration's
initial firmware version. The harness never edits a flash file.
"""

from __future__ import annotations

import base64
import hashlib
import re
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path

from harness.cart import Banner, Cart, CartError, CartState
from harness.console import ConsoleError


class RecoveryError(CartError):
    pass


@dataclass(frozen=True)
class FactoryFiles:
    image: Path
    trust_store: Path


def factory_files(cart: Cart) -> FactoryFiles:
    rig = cart.bench.rig
    rec = rig.spec.recovery
    fields = {"version": cart.config.firmware.initial_version, "cart": cart.id, "slot": cart.slot.number}
    files = FactoryFiles(rig.resolve(rec.image.format(**fields)), rig.resolve(rec.trust_store.format(**fields)))
    for p in (files.image, files.trust_store):
        if not p.exists():
            raise RecoveryError(f"{cart.id}: factory file {p} does not exist (rig {rig.path}: recovery)")
    return files


def recover_factory(cart: Cart) -> Banner:
    """Factory image in slot A, factory trust store, device state reset (where the family has one),
    slot B erased, boot control reset; booted."""
    cart.ensure_usable()
    files = factory_files(cart)
    if cart.bench.rig.spec.recovery.method == "command":
        banner = _recover_by_command(cart, files)
    else:
        banner = _recover_by_serial(cart, files)
    want = cart.config.firmware.initial_version
    if banner.slot != "A" or banner.version != want:
        raise RecoveryError(f"{cart.id}: after recovery the cart booted slot {banner.slot} fw {banner.version}, "
                            f"expected slot A fw {want}: {banner.line}")
    return banner


class _Recovery:
    def __init__(self, cart: Cart):
        self.cart = cart
        self.prof = cart.profile.recovery
        self.console = cart.console
        self.error_rx = re.compile(self.prof.error)

    def expect(self, pattern: str, timeout: float, what: str) -> re.Match:
        key, m = self.console.expect_any({"ok": pattern, "error": self.prof.error}, timeout)
        if key == "error":
            raise RecoveryError(f"{self.cart.id}: recovery {what}: {m.group(0)}")
        return m

    def command(self, step, what: str, timeout: float = 5.0, **fmt) -> re.Match:
        self.console.send(step.send.format(**fmt))
        return self.expect(step.done or step.parse, timeout, what)

    def transfer(self, step, what: str, data: bytes, **fmt) -> None:
        digest = hashlib.sha256(data).hexdigest()
        self.console.send(step.send.format(size=len(data), sha256=digest, **fmt))
        self.expect(step.ready, 5.0, f"{what} ready")
        b64 = base64.b64encode(data).decode()
        n = self.prof.chunk
        block = self.cart.profile.line_ending.join(b64[i:i + n] for i in range(0, len(b64), n))
        self.console.send(block)
        self.console.send(self.prof.end)
        geo = self.cart.config.flash
        pages = -(-len(data) // geo.page_size)
        budget = 10.0 + pages * geo.page_program_ms / 1000.0 * 3  # real timing, with headroom
        m = self.expect(step.done, budget, what)
        if m.groupdict().get("sha256") not in (None, digest):
            raise RecoveryError(f"{self.cart.id}: recovery {what}: flash reads back {m['sha256']}, sent {digest}")


def _enter_recovery(cart: Cart) -> _Recovery:
    rec = _Recovery(cart)
    cart.power_off()
    cart.power_on(wait=False)  # the console cursor is at "now": only this boot's lines can match
    try:
        cart.console.expect(cart.profile.patterns["autoboot"], cart.boot_timeout, what=f"{cart.id} autoboot prompt")
        cart.console.send_raw(rec.prof.enter.encode())
        cart.console.expect(rec.prof.mode, 5.0, what=f"{cart.id} recovery mode")
        cart.console.expect(re.escape(rec.prof.prompt), 5.0, what=f"{cart.id} recovery prompt")
    except ConsoleError as exc:
        cart.quarantine(f"cannot enter recovery: {exc}")
        raise RecoveryError(f"{cart.id}: cannot enter recovery: {exc}") from None
    cart.state = CartState.RECOVERY
    return rec


def _recover_by_serial(cart: Cart, files: FactoryFiles) -> Banner:
    rec = _enter_recovery(cart)
    info = rec.command(rec.prof.info, "info")
    if info.groupdict().get("config") not in (None, cart.id):
        raise RecoveryError(f"{cart.id}: recovery: the bootloader says cfg={info['config']}: wrong cart in this slot?")
    rec.transfer(rec.prof.load, "load A", files.image.read_bytes(), slot="A")
    rec.transfer(rec.prof.trust, "trust", files.trust_store.read_bytes())
    if rec.prof.state_reset is not None:  # security counter and time floor back to the factory's (none)
        rec.command(rec.prof.state_reset, "state reset")
    rec.command(rec.prof.erase, "erase B", timeout=30.0, slot="B")
    rec.command(rec.prof.bcb_reset, "bcb reset A", slot="A")
    cart.console.mark()
    cart.console.send(rec.prof.boot.send)
    cart.state = CartState.BOOTLOADER
    return cart.wait_boot()


def _recover_by_command(cart: Cart, files: FactoryFiles) -> Banner:
    rec = cart.bench.rig.spec.recovery
    cart.power_off()
    fields = {"image": files.image, "trust_store": files.trust_store, "probe": cart.slot.spec.probe or "",
              "cart": cart.id, "slot": cart.slot.number}
    argv = [a.format(**fields) for a in shlex.split(rec.command or "")]
    # a probe flashes a powered target: power on without waiting, flash, then cycle
    cart.power_on(wait=False)
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RecoveryError(f"{cart.id}: recovery command {argv[0]!r} failed: {exc}") from None
    if res.returncode != 0:
        tail = (res.stderr or res.stdout).strip().splitlines()[-5:]
        raise RecoveryError(f"{cart.id}: recovery command exited {res.returncode}: {' | '.join(tail)}")
    return cart.power_cycle()
