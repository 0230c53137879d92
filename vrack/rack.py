"""The virtual rack supervisor: supplies, cables, carts and the broker for one rig file.

`python -m vrack up rigs/virtual.yaml` runs this in the foreground. It reads the rig file
with its own loader (vrack never imports the harness): the two sides meet on the file format
documented in docs/interfaces.md.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import secrets
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from stat import S_ISDIR

from vrack.broker import Broker, BrokerError, PortInUseError, ensure_client_cert
from vrack.cable import Cable, CableError
from vrack.cartconfig import (
    ID_RE,
    MAX_ID_CHARS,
    CartConfigError,
    check_tree,
    field_name,
    load_cart,
    one_line,
    printable,
    read_yaml_file,
)
from vrack.control import ControlServer, SlotFaults
from vrack.factory import provision_flash, settings_blob, write_factory, write_settings
from vrack.flash import FlashError, Layout, SettingsError, tear_open_write
from vrack.psu import DIALECTS, EmulatedSupply, RxLog


class RackError(Exception):
    """The rack cannot come up: one line naming the file, the slot or supply, and the field."""


_STAMP_RE = re.compile(r"[0-9a-f]{64}")


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
    image_hosts: tuple[str, ...] = ("127.0.0.1",)  # where the carts may download images (fleet settings)
    supply_rx_log: Path | None = None  # virtual.supply_rx_log: every line the supplies receive (psu.RxLog)


MAX_SUPPLIES = 32
MAX_CHANNELS = 8
MAX_SLOTS = 64
MAX_SLOT_NUMBER = 9999
LOOPBACK_HOSTS = ("127.0.0.1", "localhost")  # where the rack's supplies and broker listen
_RESOURCE_RE = re.compile(r"TCPIP\d*::([^:]+)::(\d{1,5})::SOCKET")


def _check_rig(path: Path, data) -> None:
    """Validate, at the door, the parts of a rig file the rack reads (one-line RackError naming the
    file, the slot or supply, and the field). The harness validates the whole file its own way."""

    def label(loc: tuple) -> str:
        if len(loc) >= 2 and loc[0] in ("slots", "supplies") and isinstance(loc[1], int):
            items = data.get(loc[0]) if isinstance(data, dict) else None
            item = items[loc[1]] if isinstance(items, list) and loc[1] < len(items) else None
            item = item if isinstance(item, dict) else {}
            if loc[0] == "slots":
                num, cart = item.get("slot"), item.get("cart")
                who = f"slot {num}" if isinstance(num, int) and not isinstance(num, bool) else f"slot #{loc[1] + 1}"
                if isinstance(cart, str) and ID_RE.fullmatch(cart) and len(cart) <= MAX_ID_CHARS:
                    who += f" ({cart})"
            else:
                name = item.get("name")
                ok = isinstance(name, str) and ID_RE.fullmatch(name) and len(name) <= MAX_ID_CHARS
                who = f"supply {name}" if ok else f"supply #{loc[1] + 1}"
            return f"{who}: {field_name(loc[2:])}"
        return field_name(loc)

    def fail(loc: tuple, msg: str) -> RackError:
        return RackError(one_line(f"{path}: {label(loc)}: {msg}"))

    if not isinstance(data, dict):
        raise fail((), f"expected a mapping of fields, got {type(data).__name__}")
    check_tree(data, fail)

    def need(loc: tuple, kind: str):
        node = data
        for part in loc[:-1]:
            node = node[part]
        if not isinstance(node, dict):
            raise fail(loc[:-1], f"expected a mapping, got {type(node).__name__}")
        if loc[-1] not in node:
            raise fail(loc, "missing")
        value = node[loc[-1]]
        if kind == "mapping" and not isinstance(value, dict):
            raise fail(loc, f"expected a mapping, got {type(value).__name__}")
        if kind == "list" and not isinstance(value, list):
            raise fail(loc, f"expected a list, got {type(value).__name__}")
        if kind == "string" and (not isinstance(value, str) or not value):
            raise fail(loc, f"expected a non-empty string, got {printable(value)}")
        if kind == "id" and (not isinstance(value, str) or not ID_RE.fullmatch(value) or len(value) > MAX_ID_CHARS):
            raise fail(loc, f"expected an id (^[a-z0-9][a-z0-9-]*$, at most {MAX_ID_CHARS} characters), "
                            f"got {printable(value)}")
        if kind == "int" and (isinstance(value, bool) or not isinstance(value, int)):
            raise fail(loc, f"expected an integer, got {printable(value)}")
        return value

    def in_range(loc: tuple, lo: int, hi: int) -> int:
        value = need(loc, "int")
        if not lo <= value <= hi:
            raise fail(loc, f"expected {lo}..{hi}, got {value}")
        return value

    if need(("kind",), "string") != "virtual":
        raise fail(("kind",), "the virtual rack only runs rigs of kind 'virtual'")
    if "name" in data and (not isinstance(data["name"], str) or not data["name"]):
        raise fail(("name",), f"expected a non-empty string, got {printable(data['name'])}")
    need(("configs",), "string")
    need(("virtual",), "mapping")
    need(("virtual", "run_dir"), "string")
    virt = data["virtual"]
    if "flash_time_scale" in virt:
        scale = virt["flash_time_scale"]
        if isinstance(scale, bool) or not isinstance(scale, int | float) or not 0 < scale <= 10:
            raise fail(("virtual", "flash_time_scale"), f"expected a number in (0, 10], got {printable(scale)}")
    if virt.get("pki") is not None:
        need(("virtual", "pki"), "string")
    if virt.get("supply_rx_log") is not None:
        need(("virtual", "supply_rx_log"), "string")
    need(("broker",), "mapping")
    ports: dict[int, str] = {in_range(("broker", "port"), 1, 65535): "the broker"}
    host = data["broker"].get("host")
    if host is not None and host not in LOOPBACK_HOSTS:
        raise fail(("broker", "host"), f"{printable(host)} is not loopback ({' or '.join(LOOPBACK_HOSTS)}): "
                                       "a virtual rig's broker listens on loopback only")

    supplies = need(("supplies",), "list")
    if not 1 <= len(supplies) <= MAX_SUPPLIES:
        raise fail(("supplies",), f"expected 1..{MAX_SUPPLIES} supplies, got {len(supplies)}")
    channels: dict[str, int] = {}
    for i, sup in enumerate(supplies):
        if not isinstance(sup, dict):
            raise fail(("supplies", i), f"expected a mapping, got {type(sup).__name__}")
        name = need(("supplies", i, "name"), "id")
        if name in channels:
            raise fail(("supplies", i, "name"), f"{name} is used twice")
        res = need(("supplies", i, "resource"), "string")
        m = _RESOURCE_RE.fullmatch(res)
        if not m:
            raise fail(("supplies", i, "resource"), f"{printable(res)} is not a SOCKET resource like "
                                                    "TCPIP0::127.0.0.1::5025::SOCKET")
        if m.group(1) not in LOOPBACK_HOSTS:
            raise fail(("supplies", i, "resource"), f"host {printable(m.group(1))} is not loopback "
                                                    f"({' or '.join(LOOPBACK_HOSTS)}): a virtual rig's supplies "
                                                    "listen on loopback only")
        port = int(m.group(2))
        if not 1 <= port <= 65535:
            raise fail(("supplies", i, "resource"), f"port {port} is not in 1..65535")
        if port in ports:
            raise fail(("supplies", i, "resource"), f"port {port} is already {ports[port]}'s")
        ports[port] = f"supply {name}"
        dialect = need(("supplies", i, "dialect"), "string")
        if dialect not in DIALECTS:
            raise fail(("supplies", i, "dialect"), f"unknown dialect {printable(dialect)}; known: "
                                                   f"{', '.join(DIALECTS)}")
        need(("supplies", i, "model"), "string")
        channels[name] = in_range(("supplies", i, "channels"), 1, MAX_CHANNELS)

    slots = need(("slots",), "list")
    if not 1 <= len(slots) <= MAX_SLOTS:
        raise fail(("slots",), f"expected 1..{MAX_SLOTS} slots, got {len(slots)}")
    numbers: set[int] = set()
    carts: dict[str, int] = {}
    powered: dict[tuple[str, int], int] = {}
    for i, slot in enumerate(slots):
        if not isinstance(slot, dict):
            raise fail(("slots", i), f"expected a mapping, got {type(slot).__name__}")
        num = in_range(("slots", i, "slot"), 1, MAX_SLOT_NUMBER)
        if num in numbers:
            raise fail(("slots", i, "slot"), f"number {num} is used twice")
        numbers.add(num)
        cart = need(("slots", i, "cart"), "id")
        if cart in carts:
            raise fail(("slots", i, "cart"), f"{cart} is already in slot {carts[cart]}")
        carts[cart] = num
        console = need(("slots", i, "console"), "string")
        if "://" in console:
            raise fail(("slots", i, "console"), f"{printable(console)} is a URL: the virtual rack makes its "
                                                "consoles as files (a path)")
        supply = need(("slots", i, "supply"), "id")
        if supply not in channels:
            raise fail(("slots", i, "supply"), f"unknown supply {supply}; known: {', '.join(channels)}")
        ch = in_range(("slots", i, "channel"), 1, channels[supply])
        if (supply, ch) in powered:
            raise fail(("slots", i, "channel"), f"{supply} channel {ch} already powers slot {powered[supply, ch]}")
        powered[supply, ch] = num


def load_rig(path: Path | str) -> RigDef:
    """The rack's reading of a rig file: just what it needs to emulate it."""
    path = Path(path).resolve()
    data = read_yaml_file(path, lambda msg: RackError(one_line(msg)))
    _check_rig(path, data)

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
    rx_log = (base / virt["supply_rx_log"]).resolve() if virt.get("supply_rx_log") else None
    return RigDef(path, str(data.get("name", path.stem)), run_dir, float(virt.get("flash_time_scale", 1.0)),
                  int(need(broker, "port", "broker.")), pki, supplies, slots, image_hosts=_image_hosts(path, data),
                  supply_rx_log=rx_log)


def _image_hosts(path: Path, data: dict) -> tuple[str, ...]:
    """The host the carts see in image URLs, as the harness's image host puts it there: the rig's
    `image_host.url_host`, else its `bind` address (a wildcard bind: 127.0.0.1), else 127.0.0.1."""
    section = data.get("image_host")
    if section is None:
        return ("127.0.0.1",)
    if not isinstance(section, dict):
        raise RackError(f"{path}: image_host: expected a mapping, got {type(section).__name__}")
    for key in ("url_host", "bind"):
        host = section.get(key)
        if host is None or host == "":
            continue
        if key == "bind" and host in ("0.0.0.0", "::"):
            break
        if not isinstance(host, str) or len(host) > 253 or any(
                c.isspace() or c in "/@[]?#" or not c.isprintable() for c in host):
            raise RackError(f"{path}: image_host: {key}: expected a host name or IP address, got {host!r:.80}")
        return (host.lower(),)
    return ("127.0.0.1",)


BIND_HOST = "127.0.0.1"  # the supplies and the broker listen here

#: The file that makes a directory a rack run dir: the rack writes into a run dir only if it carries
#: this marker, or is new or empty, or holds nothing but the names of the rack's own layout below
#: (a run dir of an older rack, or one the harness has just made to start the rack in).
RUN_DIR_MARKER = ".vrack-run-dir"
RUN_DIR_DIRS = ("flash", "rtc", "state", "logs", "carts", "factory", "broker", "dev", "faults")
RUN_DIR_FILES = (RUN_DIR_MARKER, "rack.json", "rack.tmp", "vrack.log", ".rack.lock", "rack.owner")


def claim_run_dir(rig_path: Path, run_dir: Path) -> None:
    """Make `run_dir` the rack's, or refuse (RackError) to write into a directory the rack did not make."""
    where = f"{rig_path}: virtual.run_dir: {run_dir}"
    try:
        st = os.stat(run_dir)
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise RackError(one_line(f"{where}: {exc.strerror or exc}")) from None
    try:
        if st is None:
            run_dir.mkdir(parents=True)
        elif not S_ISDIR(st.st_mode):
            raise RackError(f"{where}: exists and is not a directory: refusing to touch it")
        marker = run_dir / RUN_DIR_MARKER
        if not marker.is_file() or marker.is_symlink():
            foreign = sorted(set(os.listdir(run_dir)) - set(RUN_DIR_DIRS) - set(RUN_DIR_FILES))
            if foreign or os.path.lexists(marker):
                what = printable(foreign[0]) if foreign else f"{RUN_DIR_MARKER} that is not a regular file"
                raise RackError(one_line(f"{where}: holds {what} and has no {RUN_DIR_MARKER}: not a rack run dir, "
                                         "refusing to write into it (use an empty or new directory)"))
            with open(marker, "x") as f:
                f.write("cart-hil virtual rack run dir: flash files, consoles, broker, factory artifacts, logs\n")
        for name in RUN_DIR_DIRS:
            p = run_dir / name
            if os.path.lexists(p) and not p.is_dir():
                raise RackError(f"{where}: {name} is not a directory: refusing to touch it")
        for name in RUN_DIR_FILES[1:]:
            p = run_dir / name
            if os.path.lexists(p) and (p.is_symlink() or not p.is_file()):
                raise RackError(f"{where}: {name} is not a regular file: refusing to touch it")
    except FileExistsError:
        raise RackError(f"{where}: changed while the rack claimed it: try again") from None
    except OSError as exc:
        raise RackError(one_line(f"{where}: {exc.strerror or exc}")) from None


def _port_free(host: str, port: int) -> bool:
    """Can a listener bind host:port now? (SO_REUSEADDR as the listeners use it: TIME_WAIT does not count.)"""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


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
        self.faults = SlotFaults(rack.run_dir / "faults" / f"{tag}.json",
                                 Layout(cart.flash.page_size, cart.flash.slot_size).page_count, cart.flash.page_size)
        self.seed = f"{rack.seed}:{slot.number}"
        self.rng = random.Random(self.seed)  # where a cut tears a page: reproducible with VRACK_SEED

    def prepare(self, factory_dir: Path, broker: Broker) -> None:
        stamp = self.flash.with_suffix(".factory")
        who = f"{self.rack.rig.path}: slot {self.slot.number} ({self.cart.id})"
        for p, what in ((self.flash, "flash"), (stamp, "flash stamp"), (self.rtc, "rtc"), (self.state, "state"),
                        (self.log, "log"), (self.config_copy, "cart config copy"), (self.faults.path, "flash faults")):
            p.parent.mkdir(parents=True, exist_ok=True)
            # the rack writes these files: never through a symlink, never over a directory or device
            if os.path.lexists(p) and (p.is_symlink() or not p.is_file()):
                raise RackError(f"{who}: {what}: {p} is not a regular file: refusing to touch it")
        self.faults.clear()  # faults are set per rack run, through its control interface
        if self.flash.is_file() and self.state.is_file():
            self.tear()  # power was lost mid-write while no rack watched (a rack killed outright)
        # what the cart reads at every power-on: its configuration, as JSON (no YAML parser at boot)
        self.config_copy.write_text(json.dumps(self.cart.raw))
        settings = self.fleet_settings(broker)
        image = (factory_dir / f"fw-{self.cart.firmware.initial_version}.img").read_bytes()
        # which factory build this flash was provisioned from: when the factory firmware itself
        # changes (a new checkout of this project), the rack ships new carts instead of old ones.
        # Only a flash with the rack's stamp is ever replaced; one without is kept as is (a blank
        # part or a field dump put there on purpose: only its settings region is rewritten).
        build = hashlib.sha256(image).hexdigest()
        old = stamp.read_text(errors="replace").strip() if stamp.exists() else None
        if old is not None and not _STAMP_RE.fullmatch(old):
            if not self.flash.exists():
                raise RackError(f"{who}: flash stamp: {stamp} is not a stamp the rack wrote: refusing to overwrite it")
            old = None  # not ours: the flash counts as unstamped
        if self.flash.exists() and old is not None and old != build:
            print(f"vrack: slot {self.slot.number} ({self.cart.id}): the factory firmware changed since its flash "
                  "was provisioned: re-provisioned", file=sys.stderr, flush=True)
            self.flash.unlink()
        if not self.flash.exists():
            trust = (factory_dir / f"trust-{self.cart.id}.bin").read_bytes()
            try:
                provision_flash(self.flash, self.cart, image, trust, settings, exclusive=True)
            except FileExistsError:
                raise RackError(f"{who}: flash: {self.flash} appeared while the rack provisioned it: "
                                "left as it is") from None
            except (ValueError, SettingsError) as exc:
                self.flash.unlink(missing_ok=True)  # made just now, exclusively: ours
                raise RackError(one_line(f"{who}: flash: {exc}")) from None
            stamp.write_text(build + "\n")
        else:  # the broker's port or certificates may have changed since the last rack up
            try:
                write_settings(self.flash, self.cart, settings)
            except (FlashError, ValueError) as exc:
                raise RackError(one_line(f"{who}: flash: cannot write its fleet settings: {exc}")) from None
        self.state.write_bytes(bytes([STATE_OFF]))

    def fleet_settings(self, broker: Broker) -> bytes:
        """The cart's settings blob: thing = cart id, the rack's broker, the cart's client certificate
        (issued by the broker for every cart id; the broker must have been started or prepared) and
        the image hosts it may download from (the rig's image host)."""
        ca, cert, key = ensure_client_cert(broker.run_dir, self.cart.id)
        try:
            return settings_blob(self.cart.id, broker.host, broker.port, ca.read_text(), cert.read_text(),
                                 key.read_text(), image_hosts=self.rack.rig.image_hosts)
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
                       "--flash-time-scale", str(self.rack.rig.flash_time_scale), "--faults", str(self.faults.path)]
                # a cold start: the reset-cause register reads power-on
                env = {**os.environ, "VRACK_RESET_CAUSE": "power-on", "VRACK_SEED": self.seed}
                with open(self.log, "ab") as log:
                    self.proc = subprocess.Popen(cmd, pass_fds=(self.cable.master_fd,), stdin=subprocess.DEVNULL,
                                                 stdout=log, stderr=log, start_new_session=True, env=env)
            elif not on and self.proc is not None:
                self.proc.kill()  # the power cut: no warning, no cleanup
                self.proc.wait()
                self.proc = None
                self.tear()
                self.state.write_bytes(bytes([STATE_OFF]))

    def tear(self) -> None:
        """The page the cart was programming or erasing when power went is left torn (vrack.flash)."""
        torn = tear_open_write(self.state, self.flash, self.cart.flash.page_size, self.rng)
        if torn is not None:
            print(f"vrack: slot {self.slot.number} ({self.cart.id}): power cut during a write of page {torn[0]}: "
                  f"torn at byte {torn[1]}", file=sys.stderr, flush=True)

    def draw(self) -> float:
        """What the cart draws from the supply right now."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return 0.0
        try:
            with open(self.state, "rb") as f:
                st = f.read(1)
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
        self.rx_log: RxLog | None = None
        self.broker: Broker | None = None
        self.control: ControlServer | None = None
        self.seed = os.environ.get("VRACK_SEED") or secrets.token_hex(8)  # torn pages, failing writes

    def _check_not_running(self) -> None:
        if self.state_file.exists():
            try:
                pid = json.loads(self.state_file.read_text())["pid"]
                os.kill(pid, 0)
            except (OSError, ValueError, KeyError):
                self.state_file.unlink(missing_ok=True)  # stale: a rack that died without cleaning up
                return
            raise RackError(f"{self.rig.path}: virtual.run_dir: a rack is already up for {self.run_dir} (pid {pid}); "
                            "stop it first")

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

    def _load_carts(self) -> dict:
        carts = {}
        for s in self.rig.slots:
            who = f"{self.rig.path}: slot {s.number} ({s.cart_file.stem}): cart"
            try:
                cart = load_cart(s.cart_file)
            except CartConfigError as exc:
                raise RackError(one_line(f"{who}: {exc}")) from None
            if cart.id != s.cart_file.stem:
                raise RackError(one_line(f"{who}: {s.cart_file}: id: {cart.id!r} does not match the file name"))
            carts[s.number] = cart
        return carts

    def _check_ports(self) -> None:
        """Every port the rack listens on is free now: else one line naming who wanted it (a quick
        answer before anything starts; the listeners themselves say the same if they lose a race)."""
        for who, port in [*((f"supply {sd.name}", sd.port) for sd in self.rig.supplies),
                          ("broker", self.rig.broker_port)]:
            if not _port_free(BIND_HOST, port):
                raise RackError(f"{self.rig.path}: {who}: port {port} on {BIND_HOST} is in use")

    def up(self) -> None:
        claim_run_dir(self.rig.path, self.run_dir)
        self._check_not_running()
        carts = self._load_carts()
        self._check_ports()
        for s in self.rig.slots:  # before anything starts; Cable.open checks again
            try:
                Cable(s.console).check()
            except CableError as exc:
                raise RackError(one_line(f"{self.rig.path}: slot {s.number} ({carts[s.number].id}): "
                                         f"console: {exc}")) from None
        factory_dir = self.run_dir / "factory"
        try:
            write_factory(factory_dir, sorted({c.firmware.initial_version for c in carts.values()}),
                          list(carts.values()), self._root_pems(carts.values()))
        except (OSError, ValueError) as exc:
            raise RackError(one_line(f"{self.rig.path}: virtual.run_dir: factory: {exc}")) from None
        try:
            self.broker = Broker(self.run_dir, self.rig.broker_port,
                                 ["harness", *(c.id for c in carts.values())])
            try:
                self.broker.start()
            except PortInUseError:
                raise RackError(f"{self.rig.path}: broker: port {self.rig.broker_port} on {BIND_HOST} "
                                "is in use") from None
            except BrokerError as exc:
                raise RackError(one_line(f"{self.rig.path}: broker: {exc}")[:500]) from None
            by_supply: dict[str, dict[int, CartSocket]] = {}
            for s in self.rig.slots:
                cable = Cable(s.console)
                try:
                    cable.open()
                except CableError as exc:
                    raise RackError(one_line(f"{self.rig.path}: slot {s.number} ({carts[s.number].id}): "
                                             f"console: {exc}")) from None
                self.cables.append(cable)
                sock = CartSocket(self, s, carts[s.number], cable)
                sock.prepare(factory_dir, self.broker)
                self.sockets[(s.supply, s.channel)] = sock
                by_supply.setdefault(s.supply, {})[s.channel] = sock
            if self.rig.supply_rx_log is not None:
                self.rx_log = RxLog(self.rig.supply_rx_log)
            for sd in self.rig.supplies:
                chans = by_supply.get(sd.name, {})

                def on_output(ch: int, on: bool, chans=chans) -> None:
                    if ch in chans:
                        chans[ch].power(on)

                def draw(ch: int, chans=chans) -> float:
                    return chans[ch].draw() if ch in chans else 0.0

                psu = EmulatedSupply(sd.name, sd.dialect, sd.model, sd.channels, sd.port,
                                     on_output=on_output, draw=draw, rx_log=self.rx_log)
                try:
                    psu.start()
                except OSError as exc:
                    if exc.errno == errno.EADDRINUSE:
                        raise RackError(f"{self.rig.path}: supply {sd.name}: port {sd.port} on {BIND_HOST} "
                                        "is in use") from None
                    raise RackError(one_line(f"{self.rig.path}: {exc.strerror or exc}")) from None  # names the supply
                self.supplies.append(psu)
            self.control = ControlServer({s.slot.number: s.faults for s in self.sockets.values()}, BIND_HOST, 0)
            self.control.start()
        except OSError as exc:
            self.down()
            raise RackError(one_line(f"{self.rig.path}: virtual.run_dir: {exc}")) from None
        except BaseException:
            self.down()
            raise
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"pid": os.getpid(), "rig": str(self.rig.path), "status": "ready",
                                   "control": self.control.url, "seed": self.seed,
                                   "started": time.time()}))
        tmp.replace(self.state_file)

    def down(self) -> None:
        """Stop everything the rack started. Every step runs even when an earlier one failed (the failure
        is reported on stderr), so no cart, pty or broker outlives the rack."""
        def step(what: str, fn) -> None:
            try:
                fn()
            except Exception as exc:  # noqa: BLE001 - reported, and the next steps still run
                print(f"vrack: stopping {what} failed: {exc!r}", file=sys.stderr, flush=True)

        control, self.control = self.control, None
        if control is not None:
            step("the control interface", control.stop)
        for psu in self.supplies:
            step(f"supply {psu.name}", psu.stop)
        self.supplies.clear()
        rx_log, self.rx_log = self.rx_log, None
        if rx_log is not None:
            step("the supply RX log", rx_log.close)
        for (supply, channel), sock in self.sockets.items():
            step(f"the cart on {supply} channel {channel}", lambda sock=sock: sock.power(False))
        self.sockets.clear()
        for cable in self.cables:
            step(f"console {cable.link}", cable.close)
        self.cables.clear()
        broker, self.broker = self.broker, None
        if broker:
            step("the broker", broker.stop)
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
