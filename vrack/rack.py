"""The virtual rack supervisor: supplies, cables, carts and the broker for one rig file.

`python -m vrack up rigs/virtual.yaml` runs this in the foreground. It reads the rig file
with its own loader (vrack never imports the harness): the two sides meet on the file format
documented in docs/interfaces.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from vrack.broker import Broker, ensure_client_cert
from vrack.cable import Cable
from vrack.cartconfig import load_cart
from vrack.factory import provision_flash, settings_blob, write_factory, write_settings
from vrack.flash import FlashError, SettingsError
from vrack.psu import EmulatedSupply


class RackError(Exception):
    pass


STATE_OFF, STATE_BOOTING, STATE_IDLE, STATE_FLASH = 0, 1, 2, 3


@dataclass
class SupplyDef:
    name: str
    dialect: str
    model: str
    channels: int
    port: int


@dataclass
class SlotDef:
    number: int
    cart_file: Path
    console: Path
    supply: str
    channel: int


@dataclass
class RigDef:
    path: Path
    name: str
    run_dir: Path
    flash_time_scale: float
    broker_port: int
    pki: Path | None
    supplies: list[SupplyDef]
    slots: list[SlotDef]


def load_rig(path: Path | str) -> RigDef:
    """The rack's reading of a rig file: just what it needs to emulate it."""
    path = Path(path).resolve()
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise RackError(f"{path}: cannot read rig: {exc}") from None

    def need(d: dict, key: str, where: str):
        if not isinstance(d, dict) or key not in d:
            raise RackError(f"{path}: {where}{key}: missing")
        return d[key]

    base = path.parent
    if need(data, "kind", "") != "virtual":
        raise RackError(f"{path}: kind: the virtual rack only runs rigs of kind 'virtual'")
    virt = need(data, "virtual", "")
    run_dir = (base / need(virt, "run_dir", "virtual.")).resolve()
    configs = (base / need(data, "configs", "")).resolve()
    supplies = []
    for i, s in enumerate(need(data, "supplies", "")):
        res = need(s, "resource", f"supplies[{i}].")
        m = re.match(r"^TCPIP\d*::(127\.0\.0\.1|localhost)::(\d+)::SOCKET$", res)
        if not m:
            raise RackError(f"{path}: supply {s.get('name', i)}: resource: {res!r} is not a loopback SOCKET")
        supplies.append(SupplyDef(need(s, "name", f"supplies[{i}]."), need(s, "dialect", f"supplies[{i}]."),
                                  str(need(s, "model", f"supplies[{i}].")), int(need(s, "channels", f"supplies[{i}].")),
                                  int(m.group(2))))
    slots = []
    for i, s in enumerate(need(data, "slots", "")):
        num = int(need(s, "slot", f"slots[{i}]."))
        where = f"slots[{i}]."
        slots.append(SlotDef(num, configs / "carts" / f"{need(s, 'cart', where)}.yaml",
                             Path(os.path.abspath(base / need(s, "console", where))),
                             need(s, "supply", where), int(need(s, "channel", where))))
    broker = need(data, "broker", "")
    pki = (base / virt["pki"]).resolve() if virt.get("pki") else None
    return RigDef(path, str(data.get("name", path.stem)), run_dir, float(virt.get("flash_time_scale", 1.0)),
                  int(need(broker, "port", "broker.")), pki, supplies, slots)


class CartSocket:
    """One slot's power socket: output on starts the cart process, output off kills it (SIGKILL)."""

    def __init__(self, rack: Rack, slot: SlotDef, cart, cable: Cable):
        self.rack = rack
        self.slot = slot
        self.cart = cart
        self.cable = cable
        self.proc: subprocess.Popen | None = None
        self.lock = threading.Lock()
        tag = f"slot{slot.number:02d}"
        self.flash = rack.run_dir / "flash" / f"{tag}.bin"
        self.rtc = rack.run_dir / "rtc" / tag
        self.state = rack.run_dir / "state" / tag
        self.log = rack.run_dir / "logs" / f"{tag}-process.log"
        self.config_copy = rack.run_dir / "carts" / f"{cart.id}.json"

    def prepare(self, factory_dir: Path, broker: Broker) -> None:
        for p in (self.flash, self.rtc, self.state, self.log, self.config_copy):
            p.parent.mkdir(parents=True, exist_ok=True)
        # what the cart reads at every power-on: its configuration, as JSON (no YAML parser at boot)
        self.config_copy.write_text(json.dumps(yaml.safe_load(self.slot.cart_file.read_text())))
        settings = self.fleet_settings(broker)
        image = (factory_dir / f"fw-{self.cart.firmware.initial_version}.img").read_bytes()
        # which factory build this flash was provisioned from: when the factory firmware itself
        # changes (a new checkout of this project), the rack ships new carts instead of old ones
        stamp = self.flash.with_suffix(".factory")
        build = hashlib.sha256(image).hexdigest()
        old = stamp.read_text().strip() if stamp.exists() else None
        if self.flash.exists() and old is not None and old != build:  # a flash without a stamp is kept as is
            print(f"vrack: slot {self.slot.number} ({self.cart.id}): the factory firmware changed since its flash "
                  "was provisioned: re-provisioned", file=sys.stderr, flush=True)
            self.flash.unlink()
        if not self.flash.exists():
            trust = (factory_dir / f"trust-{self.cart.id}.bin").read_bytes()
            provision_flash(self.flash, self.cart, image, trust, settings)
            stamp.write_text(build + "\n")
        else:  # the broker's port or certificates may have changed since the last rack up
            try:
                write_settings(self.flash, self.cart, settings)
            except FlashError as exc:
                raise RackError(f"{self.cart.id}: cannot write its fleet settings: {exc}") from None
        self.state.write_bytes(bytes([STATE_OFF]))

    def fleet_settings(self, broker: Broker) -> bytes:
        """The cart's settings blob: thing = cart id, the rack's broker, the cart's client certificate
        (issued by the broker for every cart id; the broker must have been started or prepared)."""
        ca, cert, key = ensure_client_cert(broker.run_dir, self.cart.id)
        try:
            return settings_blob(self.cart.id, broker.host, broker.port, ca.read_text(), cert.read_text(),
                                 key.read_text())
        except SettingsError as exc:
            raise RackError(f"{self.cart.id}: {exc}") from None

    def power(self, on: bool) -> None:
        with self.lock:
            if on and self.proc is None:
                self.state.write_bytes(bytes([STATE_BOOTING]))
                cmd = [sys.executable, "-m", "vrack.cart", "--slot", str(self.slot.number),
                       "--cart-config", str(self.config_copy), "--flash", str(self.flash),
                       "--rtc", str(self.rtc), "--state", str(self.state),
                       "--console-fd", str(self.cable.master_fd),
                       "--flash-time-scale", str(self.rack.rig.flash_time_scale)]
                with open(self.log, "ab") as log:
                    self.proc = subprocess.Popen(cmd, pass_fds=(self.cable.master_fd,), stdin=subprocess.DEVNULL,
                                                 stdout=log, stderr=log, start_new_session=True)
            elif not on and self.proc is not None:
                self.proc.kill()  # the power cut: no warning, no cleanup
                self.proc.wait()
                self.proc = None
                self.state.write_bytes(bytes([STATE_OFF]))

    def draw(self) -> float:
        """What the cart draws from the supply right now."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return 0.0
        try:
            st = self.state.read_bytes()[:1]
        except OSError:
            st = b""
        d = self.cart.draw
        return {STATE_BOOTING: d.booting, STATE_IDLE: d.idle, STATE_FLASH: d.flash_write}.get(
            st[0] if st else STATE_BOOTING, d.booting)


class Rack:
    def __init__(self, rig: RigDef):
        self.rig = rig
        self.run_dir = rig.run_dir
        self.state_file = self.run_dir / "rack.json"
        self.cables: list[Cable] = []
        self.sockets: dict[tuple[str, int], CartSocket] = {}
        self.supplies: list[EmulatedSupply] = []
        self.broker: Broker | None = None

    def _check_not_running(self) -> None:
        if self.state_file.exists():
            try:
                pid = json.loads(self.state_file.read_text())["pid"]
                os.kill(pid, 0)
            except (OSError, ValueError, KeyError):
                self.state_file.unlink(missing_ok=True)  # stale: a rack that died without cleaning up
                return
            raise RackError(f"a rack is already up for {self.run_dir} (pid {pid}); stop it first")

    def _root_pems(self, carts) -> dict[str, str]:
        """The root certificates the factory puts in trust stores: `<name>.pem` in the rig's PKI dir."""
        if self.rig.pki is None:
            return {}
        pems = {}
        for name in sorted({ca for c in carts for ca in c.provisioned_cas}):
            f = self.rig.pki / f"{name}.pem"
            try:
                pems[name] = f.read_text()
            except OSError:
                raise RackError(f"{self.rig.path}: virtual.pki: no root certificate {f} "
                                f"(create the lab PKI: hil pki init --dir {self.rig.pki})") from None
        return pems

    def up(self) -> None:
        self._check_not_running()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        carts = {s.number: load_cart(s.cart_file) for s in self.rig.slots}
        factory_dir = self.run_dir / "factory"
        write_factory(factory_dir, sorted({c.firmware.initial_version for c in carts.values()}), list(carts.values()),
                      self._root_pems(carts.values()))
        try:
            self.broker = Broker(self.run_dir, self.rig.broker_port,
                                 ["harness", *(c.id for c in carts.values())])
            self.broker.start()
            by_supply: dict[str, dict[int, CartSocket]] = {}
            for s in self.rig.slots:
                cable = Cable(s.console)
                cable.open()
                self.cables.append(cable)
                sock = CartSocket(self, s, carts[s.number], cable)
                sock.prepare(factory_dir, self.broker)
                self.sockets[(s.supply, s.channel)] = sock
                by_supply.setdefault(s.supply, {})[s.channel] = sock
            for sd in self.rig.supplies:
                chans = by_supply.get(sd.name, {})

                def on_output(ch: int, on: bool, chans=chans) -> None:
                    if ch in chans:
                        chans[ch].power(on)

                def draw(ch: int, chans=chans) -> float:
                    return chans[ch].draw() if ch in chans else 0.0

                psu = EmulatedSupply(sd.name, sd.dialect, sd.model, sd.channels, sd.port,
                                     on_output=on_output, draw=draw)
                psu.start()
                self.supplies.append(psu)
        except BaseException:
            self.down()
            raise
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"pid": os.getpid(), "rig": str(self.rig.path), "status": "ready",
                                   "started": time.time()}))
        tmp.replace(self.state_file)

    def down(self) -> None:
        for psu in self.supplies:
            psu.stop()
        self.supplies.clear()
        for sock in self.sockets.values():
            sock.power(False)
        self.sockets.clear()
        for cable in self.cables:
            cable.close()
        self.cables.clear()
        if self.broker:
            self.broker.stop()
            self.broker = None
        try:
            if json.loads(self.state_file.read_text()).get("pid") == os.getpid():
                self.state_file.unlink()
        except (OSError, ValueError):
            pass

    def serve_forever(self, owner_pid: int | None = None) -> None:
        stop = threading.Event()

        def _stop(signum, frame):
            stop.set()

        signal.signal(signal.SIGTERM, _stop)
        signal.signal(signal.SIGINT, _stop)
        signal.signal(signal.SIGHUP, _stop)
        if owner_pid:
            threading.Thread(target=self._watch_owner, args=(owner_pid, stop), daemon=True).start()
        try:
            stop.wait()
        finally:
            self.down()

    @staticmethod
    def _watch_owner(pid: int, stop: threading.Event) -> None:
        """The harness run that started this rack is gone (even by SIGKILL): shut down."""
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            stop.set()
            return
        select.select([fd], [], [])
        os.close(fd)
        stop.set()
