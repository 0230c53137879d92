"""The factory: firmware images, trust-store blobs and provisioned flash files.

    build_image(version, *, faults=None, size=196608) -> bytes     a reference firmware image
    trust_blob(cas, *, page_size=None) -> bytes                    a trust-store copy (seq 0)
    settings_blob(thing, host, port, ca, cert, key, *, image_hosts, defer_s=None) -> bytes   a fleet-settings blob
    provision_flash(path, cart_cfg, image, trust, settings=None)   a new flash file, as shipped (trust in
                                                                   copy 0, copy 1 erased, device state erased)
    write_settings(path, cart_cfg, settings) -> None               rewrite only the settings region
    write_factory(out_dir, versions, carts) -> dict                fw-<version>.img, trust-<cart>.bin

A firmware payload is the reference source (vrack/firmware/reference.py) with the build
constants injected, the device-side verifier (vrack/ota_verify.py) linked in as source text,
padding, and a last line `# build-sha256 <hex>` over everything before it.

    python -m vrack.factory OUT_DIR --version 1.4.2 [--version ...] --cart configs/carts/x.yaml ...
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from vrack.cartconfig import CartConfig, as_cart_config
from vrack.flash import SETTINGS_PAGES, TRUST_COPY_PAGES, Bcb, BootControl, Flash, encode_settings, encode_trust
from vrack.image import build_image as assemble_image
from vrack.image import canonical_json, check_image

FIRMWARE_SOURCE = Path(__file__).with_name("firmware") / "reference.py"
OTA_VERIFY_SOURCE = Path(__file__).with_name("ota_verify.py")
FAMILY = "reference"
DEFAULT_PAYLOAD_SIZE = 192 * 1024
DEFER_MAX_S = 900  # the firmware's longest back-off of a deferred job: a settings defer_s above it is ignored
CONSTANTS_BEGIN = "# --- build constants: replaced by vrack.factory.build_image ---\n"
CONSTANTS_END = "# --- end build constants ---\n"
LINKED_BEGIN = "# --- linked: replaced by vrack.factory.firmware_payload ---\n"
LINKED_END = "# --- end linked ---\n"
CHECKSUM_PREFIX = b"# build-sha256 "
CHECKSUM_LINE_SIZE = len(CHECKSUM_PREFIX) + 64 + 1
KNOWN_FAULTS: dict[str, type] = {  # what the reference firmware's fault builds understand
    "crash_at_boot": bool,
    "crash_on_sensor": str,
    "never_mark_good": bool,
    "self_test_fail": bool,
    "no_broker": bool,
    "early_success": bool,
    "bcb_single_copy": bool,              # boot control written by the firmware as one copy, in place
    "write_running_on_erase_fail": bool,  # the running slot written when the inactive one fails to erase
    "local_clock": bool,                  # images and trust bundles verified at the RTC's time, not the server's
    "drop_old_ca": bool,                  # a CA update replaces the trust store with the added roots only
    "ignore_nonce": bool,                 # a time answer to another nonce is accepted
    "ignore_security_counter": bool,      # images verified against security counter 0
    "crash_after_confirm": bool,          # confirms its trial, restarts, then crashes at every normal boot
}


_FLAG_WORDS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False,
               "off": False}


def _check_faults(faults: Mapping[str, Any] | None) -> dict[str, Any]:
    """Validate a fault set; flag faults also take "1"/"true"/"yes"/"on" (and the negatives)
    as given on a command line. Faults that are off are dropped."""
    checked: dict[str, Any] = {}
    for key, value in (faults or {}).items():
        if key not in KNOWN_FAULTS:
            raise ValueError(f"unknown fault {key!r}; known: {', '.join(sorted(KNOWN_FAULTS))}")
        kind = KNOWN_FAULTS[key]
        if kind is bool and isinstance(value, str) and value.lower() in _FLAG_WORDS:
            value = _FLAG_WORDS[value.lower()]
        if not isinstance(value, kind) or (kind is str and not value):
            raise ValueError(f"fault {key!r} wants a {kind.__name__}, got {value!r}")
        if value is not False:
            checked[key] = value
    return checked


def build_id(version: str, faults: Mapping[str, Any]) -> str:
    return hashlib.sha256(canonical_json({"family": FAMILY, "version": version, "faults": faults})).hexdigest()[:16]


def _replace_block(source: str, begin: str, end: str, block: str) -> str:
    start, stop = source.find(begin), source.find(end)
    if start < 0 or stop < start or source.count(begin) != 1:
        raise RuntimeError(f"{FIRMWARE_SOURCE}: block {begin.strip()!r} not found")
    return source[:start] + begin + block + end + source[stop + len(end):]


def linked_verifier_source() -> str:
    """vrack/ota_verify.py as text, to be carried by the payload (it must not import the rack)."""
    text = OTA_VERIFY_SOURCE.read_text(encoding="utf-8")
    for line in text.splitlines():
        words = line.split()
        if words[:1] in (["import"], ["from"]) and len(words) > 1 and words[1].split(".")[0] in ("vrack", "harness"):
            raise RuntimeError(f"{OTA_VERIFY_SOURCE}: the linked verifier imports {words[1]}")
    return text


def firmware_payload(version: str, *, faults: Mapping[str, Any] | None = None,
                     size: int = DEFAULT_PAYLOAD_SIZE) -> bytes:
    """The reference firmware source with the build constants injected and the verifier linked
    in, padded to `size` bytes; the last line is `# build-sha256 <sha256 of the bytes before it>`."""
    faults = _check_faults(faults)
    source = FIRMWARE_SOURCE.read_text(encoding="utf-8")
    constants = (f"FW_VERSION = {version!r}\nFW_FAMILY = {FAMILY!r}\n"
                 f"FAULTS = {faults!r}\nBUILD_ID = {build_id(version, faults)!r}\n")
    source = _replace_block(source, CONSTANTS_BEGIN, CONSTANTS_END, constants)
    source = _replace_block(source, LINKED_BEGIN, LINKED_END, f"OTA_VERIFY_SOURCE = {linked_verifier_source()!r}\n")
    body = source.encode("utf-8")
    if not body.endswith(b"\n"):
        body += b"\n"
    if len(body) + CHECKSUM_LINE_SIZE > size:
        raise ValueError(f"firmware source is {len(body)} bytes (+{CHECKSUM_LINE_SIZE} for the build checksum), "
                         f"more than the payload size {size}")
    head = body + _filler(size - len(body) - CHECKSUM_LINE_SIZE, version)
    return head + CHECKSUM_PREFIX + hashlib.sha256(head).hexdigest().encode("ascii") + b"\n"


def _filler(n: int, seed: str) -> bytes:
    """n bytes of comment lines, deterministic for a seed, ending in a newline."""
    out = bytearray()
    i = 0
    while len(out) < n:
        out += f"# pad {i:06d} {hashlib.sha256(f'{seed}:{i}'.encode()).hexdigest()}\n".encode()
        i += 1
    del out[n:]
    if n:
        out[-1:] = b"\n"
    return bytes(out)


def build_image(version: str, *, faults: Mapping[str, Any] | None = None,
                size: int = DEFAULT_PAYLOAD_SIZE) -> bytes:
    """A reference firmware image at `version`; `faults` makes a fault build; `size` is the payload size."""
    faults = _check_faults(faults)
    info = {"family": FAMILY, "version": version, "faults": faults, "build_id": build_id(version, faults)}
    return assemble_image(firmware_payload(version, faults=faults, size=size), version, build_info=info)


def trust_blob(cas: Iterable[Mapping[str, Any]], *, page_size: int | None = None) -> bytes:
    """A trust-store copy of CA entries {"name", "pem", "until"?}, seq 0, as the factory ships it.
    `page_size`: the cart's; ValueError if the blob does not fit one copy (2 pages of it)."""
    blob = encode_trust([dict(ca) for ca in cas])
    if page_size is not None:
        _check_trust_fits(blob, page_size)
    return blob


def _check_trust_fits(blob: bytes, page_size: int, who: str = "") -> None:
    room = TRUST_COPY_PAGES * page_size
    if len(blob) > room:
        raise ValueError(f"{who}trust store of {len(blob)} bytes does not fit one trust-store copy "
                         f"({TRUST_COPY_PAGES} pages of {page_size} bytes = {room})")


def settings_blob(thing: str, host: str, port: int, ca: str, cert: str, key: str, *,
                  image_hosts: Iterable[str], defer_s: float | None = None) -> bytes:
    """A fleet-settings blob: the cart's thing name, its MQTT endpoint with the broker's CA and the
    cart's client certificate and key (PEM), and the image hosts it may download from (host names or
    IP addresses, any port; stored lower-case). `defer_s`: the first back-off of a job deferred for
    want of a valid time (absent: the firmware's 30 s; a lab or a test that cannot wait that long).
    SettingsError if it does not fit the region; ValueError for an unusable image host or defer_s."""
    hosts: list[str] = []
    for h in image_hosts:
        if not isinstance(h, str) or not 0 < len(h) <= 253 or any(c.isspace() or c in "/@[]?#" for c in h):
            raise ValueError(f"image host {h!r}: a host name or IP address, without port or brackets")
        if h.lower() not in hosts:
            hosts.append(h.lower())
    settings: dict[str, Any] = {"thing": thing, "mqtt": {"host": host, "port": int(port), "ca": ca, "cert": cert,
                                                         "key": key}, "image_hosts": hosts}
    if defer_s is not None:
        if isinstance(defer_s, bool) or not isinstance(defer_s, int | float) or not 0 < defer_s <= DEFER_MAX_S:
            raise ValueError(f"defer_s {defer_s!r}: seconds, more than 0 and at most {DEFER_MAX_S:g}")
        settings["defer_s"] = defer_s
    return encode_settings(settings)


def _write_settings_region(flash: Flash, settings: bytes) -> None:
    layout = flash.layout
    if len(settings) > layout.settings_size:
        raise ValueError(f"settings blob of {len(settings)} bytes exceeds the {layout.settings_size}-byte region")
    page = flash.page_size
    for i in range(SETTINGS_PAGES):  # every page of the region: an unused one is erased
        flash.write_page(layout.settings_first_page + i, settings[i * page:(i + 1) * page])


def write_settings(path: str | Path, cart_cfg: CartConfig | Mapping[str, Any] | str | Path, settings: bytes) -> None:
    """Rewrite only the settings region of an existing flash file (no page timing)."""
    cfg = as_cart_config(cart_cfg)
    with Flash(path, cfg.flash, time_scale=0) as flash:
        _write_settings_region(flash, settings)


def provision_flash(path: str | Path, cart_cfg: CartConfig | Mapping[str, Any] | str | Path, image: bytes,
                    trust: bytes, settings: bytes | None = None, *, exclusive: bool = False) -> Path:
    """Create the cart's flash file as it leaves the factory: erased, `image` in slot A, the
    BCB saying active A confirmed, `trust` in trust-store copy 0 (copy 1 erased), `settings` (if
    given) in the settings region, the device state erased (counter 0, no time floor). No page
    timing. `exclusive`: FileExistsError rather than replace a file."""
    cfg = as_cart_config(cart_cfg)
    path = Path(path)
    if len(image) > cfg.flash.slot_size:
        raise ValueError(f"{cfg.id}: image of {len(image)} bytes exceeds slot_size {cfg.flash.slot_size}")
    _, reason = check_image(image)
    if reason:
        raise ValueError(f"{cfg.id}: factory image is not bootable: {reason}")
    _check_trust_fits(trust, cfg.flash.page_size, f"{cfg.id}: ")
    path.parent.mkdir(parents=True, exist_ok=True)
    Flash.create(path, cfg.flash, exclusive=exclusive)
    with Flash(path, cfg.flash, time_scale=0) as flash:
        layout = flash.layout
        flash.write_pages(layout.slot_first_page("A"), image)
        flash.write_pages(layout.trust_copy_first_page(0), trust)
        if settings is not None:
            _write_settings_region(flash, settings)
        BootControl(flash).write(Bcb(active="A", confirmed=True))
    return path


_FILE_PART_RE = re.compile(r"[0-9A-Za-z][0-9A-Za-z.+-]{0,63}")


def _writable(target: Path) -> Path:
    """`target` if writing it replaces at most a regular file (never writes through a symlink)."""
    if os.path.lexists(target) and (target.is_symlink() or not target.is_file()):
        raise ValueError(f"{target}: not a regular file: refusing to overwrite it")
    return target


def write_factory(out_dir: str | Path, versions: Iterable[str],
                  carts: Iterable[CartConfig | Mapping[str, Any] | str | Path],
                  ca_pems: Mapping[str, str] | None = None) -> dict[str, dict[str, Path]]:
    """Write fw-<version>.img for each version and trust-<cart id>.bin for each cart: its
    provisioned_cas, each with its root certificate from `ca_pems` (empty where none is given)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, dict[str, Path]] = {"images": {}, "trust": {}}
    for version in versions:
        if not _FILE_PART_RE.fullmatch(version):
            raise ValueError(f"version {version!r}: not usable in a file name (fw-<version>.img)")
        target = _writable(out / f"fw-{version}.img")
        target.write_bytes(build_image(version))
        written["images"][version] = target
    for cart in carts:
        cfg = as_cart_config(cart)
        target = _writable(out / f"trust-{cfg.id}.bin")
        pems = ca_pems or {}
        target.write_bytes(trust_blob(({"name": name, "pem": pems.get(name, "")} for name in cfg.provisioned_cas),
                                      page_size=cfg.flash.page_size))
        written["trust"][cfg.id] = target
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vrack.factory", description="Write factory artifacts.")
    p.add_argument("out_dir")
    p.add_argument("--version", action="append", default=[], help="firmware version (repeatable)")
    p.add_argument("--cart", action="append", default=[], help="cart config YAML (repeatable)")
    args = p.parse_args(argv)
    written = write_factory(args.out_dir, args.version, args.cart)
    for kind in written.values():
        for path in kind.values():
            print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
