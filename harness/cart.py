"""A cart on a rig, seen the way a bench engineer sees it: a console, a supply channel, a profile.

`Cart` has an explicit state (off, bootloader, running, recovery) and a quarantine latch: an
infrastructure failure (no banner, a supply that stops answering) latches the cart as
quarantined with the original error, and every later step on it fails at once with that
reason instead of hammering a broken cart. The other carts go on.
"""

from __future__ import annotations

import datetime as dt
import enum
import re
import time
from dataclasses import dataclass
from pathlib import Path

from harness.config import Rig, Slot
from harness.console import Console, ConsoleError, Shell
from harness.power import ChannelPower, SupplyError, open_supply

CONSOLE_UP_S = 10.0  # s, power-on waits this long for a lost console port to be reopened
RTC_FORMAT = "%Y-%m-%dT%H:%M:%SZ"  # what `rtc get` prints and `rtc set` takes (UTC, whole seconds)
RTC_TOLERANCE_S = 2.0  # an RTC just set reads back within this of what was sent
TIME_SYNC_S = 15.0  # `time sync`: the device's tries (3 x 2 s) with headroom


class CartState(enum.Enum):
    OFF = "off"
    BOOTLOADER = "bootloader"
    RUNNING = "running"
    RECOVERY = "recovery"
    QUARANTINED = "quarantined"


class CartError(Exception):
    """A step on a cart failed; the message names the cart and carries the console tail."""


class BootError(CartError):
    pass


class Quarantined(CartError):
    pass


@dataclass(frozen=True)
class Banner:
    bl_version: str
    slot: str
    version: str
    config: str
    mode: str
    line: str


@dataclass(frozen=True)
class SlotStatus:
    active: str
    booted: str
    pending: str | None
    tries: int
    confirmed: bool
    slots: dict[str, dict[str, str]]
    boots: int  # the bootloader's boot count (a profile that cannot read it is refused: harness/config.py)
    rollbacks: int  # rollbacks ever (the BCB's count): what an update that changed nothing must leave as it was

    def brief(self) -> str:
        fw = " ".join(f"{s}={v.get('fw', '?')}" for s, v in sorted(self.slots.items()))
        return (f"active={self.active} booted={self.booted} pending={self.pending or '-'} tries={self.tries} "
                f"confirmed={'yes' if self.confirmed else 'no'} boots={self.boots} rollbacks={self.rollbacks} {fw}")


@dataclass(frozen=True)
class SlotHash:
    """What `slot hash` says of one slot: SHA-256 of the whole slot region (any write shows in it) and of the
    image as the slot holds it, as long as its header declares (None: no readable header)."""

    region: str
    image: str | None


@dataclass(frozen=True)
class DeviceState:
    """The device state region as the firmware reads it: the security counter (the lowest image
    counter it still accepts) and the time floor (the latest server time it accepted, epoch s)."""

    counter: int
    floor: int


@dataclass(frozen=True)
class TimeSync:
    """One `time sync` on the device: result ok (with the server time `t` it accepted), rejected
    (with the reason) or unreachable."""

    result: str
    t: int | None
    reason: str


class Bench:
    """What one process holds open on a rig: one driver per supply, one console per cart.

    Supplies are shared by the carts on them (the driver's per-instrument lock serialises
    select-then-command sequences across processes too).
    """

    def __init__(self, rig: Rig, log_dir: Path):
        self.rig = rig
        self.log_dir = log_dir
        self._supplies: dict[str, object] = {}
        self._carts: dict[str, Cart] = {}

    def supply(self, name: str):
        if name not in self._supplies:
            spec = self.rig.supply(name)
            self._supplies[name] = open_supply(spec.name, spec.resource, spec.dialect, spec.channels,
                                               timeout_ms=spec.timeout_ms, model=spec.model)
        return self._supplies[name]

    def cart(self, cart_id: str) -> Cart:
        if cart_id not in self._carts:
            self._carts[cart_id] = Cart(self, self.rig.slot_for(cart_id))
        return self._carts[cart_id]

    def close(self) -> None:
        """Safe state for every cart this process touched, then close consoles and supplies."""
        errors = []
        for cart in self._carts.values():
            try:
                cart.safe_state()
            except Exception as exc:  # keep going: every output must be tried
                errors.append(exc)
            cart.console.close()
        for sup in self._supplies.values():
            try:
                sup.close()
            except Exception as exc:
                errors.append(exc)
        self._carts.clear()
        self._supplies.clear()
        if errors:
            raise errors[0]


class Cart:
    def __init__(self, bench: Bench, slot: Slot):
        self.bench = bench
        self.slot = slot
        self.config = slot.cart
        self.profile = slot.profile
        self.id = slot.cart_id
        self.state = CartState.OFF
        self.quarantine_reason: str | None = None
        self.test: str | None = None             # the test using the cart now (set by the pytest plugin)
        self.quarantined_in: str | None = None   # the test during which it was quarantined
        self.console = Console(slot.console_url, name=self.id, log_path=bench.log_dir / f"{self.id}.log",
                               line_ending=self.profile.line_ending)
        self.console.open()
        self._power: ChannelPower | None = None
        self.boots: list[Banner] = []  # every banner seen through power_on/wait_boot, in order
        self._rx = {k: re.compile(v) for k, v in self.profile.patterns.items()}

    # ------------------------------------------------------------ quarantine
    def ensure_usable(self) -> None:
        """Raise Quarantined (with the original reason) if this cart is latched out of the run."""
        if self.state is CartState.QUARANTINED:
            raise Quarantined(f"{self.id} is quarantined for this run: {self.quarantine_reason}")

    def quarantine(self, reason: str) -> None:
        self.state = CartState.QUARANTINED
        self.quarantine_reason = reason.splitlines()[0] if reason else "unknown"
        self.quarantined_in = self.test
        try:
            if self._power is not None:
                self._power.off()
        except Exception:
            pass

    def pattern(self, key: str) -> re.Pattern[str]:
        """A console pattern of the cart's firmware profile (banner, ready, rollback ...)."""
        return self._rx[key]

    # ------------------------------------------------------------ power
    @property
    def power(self) -> ChannelPower:
        if self._power is None:
            lim = self.config.supply
            self._power = ChannelPower(self.bench.supply(self.slot.supply.name), self.slot.channel,
                                       max_voltage=lim.max_voltage, current_limit=lim.current_limit,
                                       label=f"{self.id} ({self.slot.supply.name} ch{self.slot.channel})")
        return self._power

    def _infra(self, fn, *args, **kw):
        """Run a supply operation; a supply that does not answer quarantines the cart."""
        self.ensure_usable()
        try:
            return fn(*args, **kw)
        except SupplyError as exc:
            self.quarantine(str(exc))
            raise

    def power_off(self) -> None:
        self._infra(self.power.off)
        self.state = CartState.OFF

    def power_on(self, *, wait: bool = True, timeout: float | None = None) -> Banner | None:
        """Output on at the cart's nominal voltage and current limit; by default wait for the banner
        and the firmware's ready line. The console cursor is moved to "now" first, so nothing from
        an earlier boot can match."""
        self.ensure_usable()
        lim = self.config.supply
        self._infra(self.power.set_voltage, lim.voltage)
        self._infra(self.power.set_current_limit, lim.current_limit)
        self.console.mark()
        self._console_up()
        self._infra(self.power.on)
        self.state = CartState.BOOTLOADER
        return self.wait_boot(timeout=timeout) if wait else None

    def _console_up(self) -> None:
        """A console whose port was lost (a dropped ser2net connection, an unplugged adapter) is
        reopened by its reader; power on only once it is back, or the boot log goes to nobody."""
        try:
            self.console.wait_port(CONSOLE_UP_S, what=f"{self.id} console before power on")
        except ConsoleError as exc:
            self.quarantine(f"console down: {exc}")
            raise CartError(f"{self.id}: {exc}") from None

    def power_cycle(self, *, off_time: float | None = None, wait: bool = True,
                    timeout: float | None = None) -> Banner | None:
        self.power_off()
        # physics: let the rail fall and the cart's capacitors drain before power returns
        time.sleep(self.off_time if off_time is None else off_time)
        return self.power_on(wait=wait, timeout=timeout)

    @property
    def off_time(self) -> float:
        return self.bench.rig.spec.power_off_s

    @property
    def boot_timeout(self) -> float:
        """Deadline for power-on to ready: the configuration's expected boot time with headroom."""
        return 3.0 * self.config.boot.expected_s + self.config.boot.autoboot_window_s + 2.0

    def safe_state(self) -> None:
        if self._power is not None:
            self._power.safe_state()
        if self.state is not CartState.QUARANTINED:
            self.state = CartState.OFF

    # ------------------------------------------------------------ boot
    def wait_boot(self, timeout: float | None = None, *, ready: bool = True) -> Banner:
        """Wait for the boot banner (and the firmware's ready line). A cart that never shows
        them is quarantined and the error carries the console tail."""
        self.ensure_usable()
        timeout = self.boot_timeout if timeout is None else timeout
        t0 = time.monotonic()
        try:
            m = self._expect_or_halt("banner", timeout, f"{self.id} boot banner")
            banner = Banner(m["bl_version"], m["slot"], m["version"], m["config"], m["mode"], m.group(0))
            self.boots.append(banner)
            self.state = CartState.BOOTLOADER
            if ready:
                left = max(0.1, timeout - (time.monotonic() - t0))
                self._expect_or_halt("ready", left, f"{self.id} firmware ready")
                self.state = CartState.RUNNING
        except ConsoleError as exc:
            self.quarantine(f"no boot: {exc}")
            raise BootError(f"{self.id}: {exc}") from None
        return banner

    def _expect_or_halt(self, key: str, timeout: float, what: str) -> re.Match[str]:
        """The profile's `key` line; a bootloader that says it halts (the profile's `no_image`) ends the wait at
        once, the cause in the first line: nothing else will come from a halted cart."""
        if "no_image" not in self._rx:
            return self.console.expect(self._rx[key], timeout, what=what)
        got, m = self.console.expect_any({key: self._rx[key], "no_image": self._rx["no_image"]}, timeout, what=what)
        if got == key:
            return m
        tail = self.console.tail()
        invalid = self._rx.get("slot_invalid")
        why = [x for x in tail.splitlines() if invalid is not None and invalid.search(x)][-2:]  # this boot's
        raise ConsoleError(f"{m.group(0)}" + (f" ({'; '.join(why)})" if why else "") + f"\n{tail}")

    # ------------------------------------------------------------ shell
    @property
    def shell(self) -> Shell:
        return Shell(self.console, prompt=self.profile.prompt, echo=self.profile.echo,
                     error_pattern=self.profile.error)

    def command(self, key: str, timeout: float = 5.0, **fmt) -> list[str]:
        """Send one of the profile's commands; returns the reply lines."""
        self.ensure_usable()
        spec = self.profile.commands[key]
        return self.shell.run(spec.send.format(**fmt), timeout=timeout)

    def query(self, key: str, timeout: float = 5.0, **fmt) -> re.Match:
        """Send a profile command and parse the first reply line matching its `parse` pattern."""
        lines = self.command(key, timeout=timeout, **fmt)
        rx = re.compile(self.profile.commands[key].parse or ".*")
        for line in lines:
            m = rx.search(line)
            if m:
                return m
        raise CartError(f"{self.id}: {key}: no reply matching {rx.pattern!r} in {lines!r}\n{self.console.tail()}")

    def version(self) -> str:
        return self.query("version")["version"]

    def _optional(self, key: str, what: str) -> None:
        """A check that needs a command not every firmware family has: a clear error without it."""
        if key not in self.profile.commands:
            raise CartError(f"{self.id}: cannot {what}: the console profile of firmware family "
                            f"{self.profile.family!r} has no {key!r} command (the check cannot run on this family)")

    def trust_store(self) -> dict[str, str]:
        """CA name -> SHA-256 of its certificate (DER) as the firmware reads its trust store ('-': no cert)."""
        return {name: fp for name, (fp, _) in self.trust_entries().items()}

    def trust_entries(self) -> dict[str, tuple[str, int | None]]:
        """CA name -> (fingerprint, retired-from epoch second or None): the store with each root's end of
        overlap (`until`), where the firmware reports one."""
        rx = re.compile(self.profile.commands["trust_list"].parse or "")
        out: dict[str, tuple[str, int | None]] = {}
        for m in map(rx.search, self.command("trust_list")):
            if m:
                until = m.groupdict().get("until")
                out[m["name"]] = (m["fp"], int(until) if until else None)
        return out

    # ------------------------------------------------------------ clock, time, device state
    def clock(self) -> dt.datetime:
        """The cart's RTC (aware, UTC)."""
        return self._rtc(self.query("rtc_get"), "rtc get")

    def set_clock(self, when: dt.datetime) -> dt.datetime:
        """Set the RTC to `when` (an aware datetime, whole seconds); returns what it reads back."""
        if when.tzinfo is None:
            raise ValueError(f"{self.id}: set_clock needs an aware datetime, got {when!r}")
        text = when.astimezone(dt.UTC).strftime(RTC_FORMAT)
        got = self._rtc(self.query("rtc_set", time=text), f"rtc set {text}")
        if abs((got - when).total_seconds()) > RTC_TOLERANCE_S:
            raise CartError(f"{self.id}: rtc set {text}: the RTC reads back {got.strftime(RTC_FORMAT)}")
        return got

    def skew_clock(self, seconds: float) -> dt.datetime:
        """Put the RTC `seconds` off true UTC (+ ahead, - behind)."""
        return self.set_clock(dt.datetime.now(dt.UTC) + dt.timedelta(seconds=round(seconds)))

    def apply_drift(self) -> dt.datetime:
        """Put the RTC where the configuration says this cart's clock is (`clock.drift_s` off UTC)."""
        return self.skew_clock(self.config.clock.drift_s)

    def _rtc(self, m: re.Match, what: str) -> dt.datetime:
        try:
            return dt.datetime.strptime(m["time"], RTC_FORMAT).replace(tzinfo=dt.UTC)
        except ValueError:
            raise CartError(f"{self.id}: {what}: {m['time']!r} is not a time like 2026-03-01T12:00:00Z") from None

    def device_state(self) -> DeviceState:
        """The security counter and time floor the firmware keeps in its device state region."""
        self._optional("device_state", "read the device state")
        m = self.query("device_state")
        return DeviceState(int(m["counter"]), int(m["floor"]))

    def time_sync(self, tries: int = 3) -> TimeSync:
        """Ask the device to run one signed time exchange with the time service now, of up to `tries`
        requests (an update's exchange makes 3; one is enough to see how a single answer is judged)."""
        self._optional("time_sync", "run a time exchange")
        m = self.query("time_sync", timeout=TIME_SYNC_S, tries=tries)
        return TimeSync(m["result"], int(m["t"]) if m["t"] else None, m["reason"] or "")

    def slot_status(self) -> SlotStatus:
        lines = self.command("slot_status")
        rx = re.compile(self.profile.commands["slot_status"].parse or "")
        head = next((rx.search(x) for x in lines if rx.search(x)), None)
        if head is None:
            raise CartError(f"{self.id}: slot status: unexpected reply {lines!r}")
        slots = {}
        for x in lines:
            m = re.match(r"^slot ([AB]) (.*)$", x)
            if m:
                slots[m.group(1)] = dict(kv.split("=", 1) for kv in m.group(2).split() if "=" in kv)
        pending = head["pending"]
        counts = {k: head[k] for k in ("boots", "rollbacks")}
        lacking = [k for k, v in counts.items() if v is None]
        if lacking:  # the profile's pattern has the groups (config.py) but this reply did not fill them
            raise CartError(f"{self.id}: slot status: no {' or '.join(lacking)} count in {head.group(0)!r}: an "
                            "update's checks compare them before and after")
        return SlotStatus(head["active"], head["booted"], None if pending == "-" else pending,
                          int(head["tries"]), head["confirmed"] == "yes", slots, int(counts["boots"]),
                          int(counts["rollbacks"]))

    def slot_hashes(self) -> dict[str, str]:
        """Slot -> SHA-256 of the whole slot region, as the firmware reads its flash: the proof that
        nothing was written (a version string can stay the same while pages change)."""
        return {slot: h.region for slot, h in self.slot_digests().items()}

    def slot_digests(self) -> dict[str, SlotHash]:
        """Slot -> both hashes `slot hash` reports: the whole region's and the stored image's (what an
        update's image is compared with)."""
        rx = re.compile(self.profile.commands["slot_hash"].parse or "")
        found = {m["slot"]: SlotHash(m["sha256"], None if m["image"] in (None, "-") else m["image"])
                 for m in map(rx.search, self.command("slot_hash")) if m}
        if set(found) != {"A", "B"}:
            raise CartError(f"{self.id}: slot hash: expected both slots, got {sorted(found)!r}\n{self.console.tail()}")
        return found

    def __repr__(self) -> str:
        return f"<Cart {self.id} slot {self.slot.number} {self.state.value}>"
