"""Reference cart firmware.

This file is the program that runs on the virtual cart. `vrack.factory.build_image()` takes
this source, replaces the build-constants block below with the build's values, pads it with
a comment block and wraps it in an image; the bootloader compiles and runs the payload and
calls `main(hal)`. It talks to the board only through `hal` (see docs/flash-layout.md and
vrack/bootloader.py for the HAL) and may import the standard library and installed
third-party libraries (a linked library), never the rack's own code.

Fault builds (FAULTS) reproduce field defects on purpose:
  crash_at_boot: true            raise during start-up, before sensors
  crash_on_sensor: "<name>"      the driver of that sensor dereferences a missing calibration
                                 at init: crashes only on carts whose sensor set has it
  never_mark_good: true          a trial boot never confirms itself (watchdog rolls it back)
  self_test_fail: true           the self-test fails; a trial boot resets for rollback
"""

import hashlib
import json
import math
import re
import struct
import time
from datetime import UTC, datetime

# --- build constants: replaced by vrack.factory.build_image ---
FW_VERSION = "0.0.0-dev"
FW_FAMILY = "reference"
FAULTS = {}
BUILD_ID = "dev"
# --- end build constants ---

PROMPT = "cart> "
STATE_IDLE = 2
BENCH_PERIOD_NS = 1_000_000
BENCH_MAX_LINES = 100_000
RTC_FORMAT = "%Y-%m-%dT%H:%M:%SZ"


def main(hal):
    Firmware(hal).run()


class Firmware:
    def __init__(self, hal):
        self.hal = hal
        self.console = hal.console
        self.calibration = {}

    def say(self, line):
        self.console.write_line(line)

    # --- boot --------------------------------------------------------------------------------

    def run(self):
        hal = self.hal
        self.say(f"FW: {FW_FAMILY} {FW_VERSION} starting slot={hal.booted_slot}")
        if FAULTS.get("crash_at_boot"):
            raise RuntimeError("fault build: crash at boot")
        for sensor in hal.sensors:
            self.init_sensor(sensor)
        failure = self.self_test()
        if failure:
            self.say(f"FW: self-test failed: {failure}")
            if hal.mode == "trial":
                self.say("FW: trial not confirmed, resetting")
                hal.reset()
        else:
            self.say("FW: self-test ok")
            if hal.mode == "trial":
                confirm_trial(hal)
        hal.set_state(STATE_IDLE)
        self.say("FW: ready")
        self.shell()

    def init_sensor(self, sensor):
        calibration = None if FAULTS.get("crash_on_sensor") == sensor.name else {"offset": 0.0, "gain": 1.0}
        sensor.init()
        self.calibration[sensor.name] = calibration["offset"]  # the defect of the fault build: no calibration, no check
        self.say(f"FW: sensor {sensor.name} ok")

    def self_test(self):
        """None if the cart is fit to run, else what failed."""
        if FAULTS.get("self_test_fail"):
            return "fault build: self-test forced to fail"
        for sensor in self.hal.sensors:
            if not math.isfinite(sensor.read()):
                return f"sensor {sensor.name} reads non-finite"
        if parse_image_or_none(self.read_slot(self.hal.booted_slot)) is None:
            return f"own slot {self.hal.booted_slot} does not verify"
        if self.hal.clock.now().tzinfo is None:
            return "rtc has no timezone"
        return None

    # --- shell -------------------------------------------------------------------------------

    def shell(self):
        while True:
            self.console.write(PROMPT)
            line = self.console.read_line(None)
            if line is None:
                continue
            self.console.write_line(line)  # echo
            self.handle(line.strip())

    def handle(self, line):
        words = line.split()
        if not words:
            return
        if words == ["version"]:
            self.say(f"version {FW_VERSION}")
        elif words == ["slot", "status"]:
            self.slot_status()
        elif words == ["rtc", "get"]:
            self.say("rtc " + self.hal.clock.now().strftime(RTC_FORMAT))
        elif len(words) == 3 and words[:2] == ["rtc", "set"]:
            self.rtc_set(words[2])
        elif words == ["sensors"]:
            for sensor in self.hal.sensors:
                self.say(f"sensor {sensor.name} ok value={sensor.read():.3f}")
        elif words == ["reboot"]:
            self.say("FW: rebooting")
            self.hal.reset()
        elif words == ["trust", "list"]:
            self.trust_list()
        elif len(words) == 3 and words[:2] == ["bench", "lines"]:
            self.bench_lines(words[2])
        else:
            self.say(f"error: unknown command '{line}'")

    def slot_status(self):
        hal = self.hal
        bcb = hal.bcb.read()
        confirmed = "yes" if bcb.confirmed and hal.booted_slot == bcb.active else "no"
        self.say(f"slot active={bcb.active} booted={hal.booted_slot} pending={bcb.pending or '-'} "
                 f"tries={bcb.tries} confirmed={confirmed}")
        for slot in ("A", "B"):
            image = parse_image_or_none(self.read_slot(slot))
            version = image["version"] if image else "-"
            self.say(f"slot {slot} fw={version} valid={'yes' if image else 'no'}")

    def trust_list(self):
        """The CAs in the trust store, each with the SHA-256 of its certificate (DER), or '-' if empty."""
        layout = self.hal.flash.layout
        cas, reason = parse_trust(self.hal.flash.read(layout.trust_offset, layout.trust_size))
        if cas is None:
            self.say(f"error: trust store {reason}")
            return
        self.say(f"trust count={len(cas)}")
        for ca in cas:
            self.say(f"trust {ca['name']} fp={pem_fingerprint(ca['pem'])}")

    def rtc_set(self, text):
        try:
            when = datetime.strptime(text, RTC_FORMAT).replace(tzinfo=UTC)
        except ValueError:
            self.say(f"error: bad time '{text}' (want YYYY-MM-DDTHH:MM:SSZ)")
            return
        self.hal.clock.set(when)
        self.say("rtc " + self.hal.clock.now().strftime(RTC_FORMAT))

    def bench_lines(self, text):
        if not text.isdigit() or not 0 < int(text) <= BENCH_MAX_LINES:
            self.say(f"error: bad count '{text}' (want 1..{BENCH_MAX_LINES})")
            return
        start = time.monotonic_ns()
        for i in range(int(text)):
            delay = start + i * BENCH_PERIOD_NS - time.monotonic_ns()
            if delay > 0:
                time.sleep(delay / 1e9)
            self.say(f"bench {i} {time.monotonic_ns()}")

    def read_slot(self, slot):
        flash = self.hal.flash
        return flash.read(flash.layout.slot_offset(slot), flash.slot_size)


def confirm_trial(hal):
    """Mark the trial slot good: the one place the firmware confirms an update."""
    if FAULTS.get("never_mark_good"):
        return
    hal.console.write_line(f"FW: marking slot {hal.booted_slot} good")
    hal.bcb.mark_good()
    hal.console.write_line(f"FW: slot {hal.booted_slot} confirmed")


# --- the firmware's own image parser (image format v1, docs/image-format.md) -----------------
# Independent of the bootloader's; both are held to tests/vectors/image-v1.

IMG_MAGIC = b"CIMG"
IMG_HEADER = struct.Struct("<4sHHII16s")
IMG_TLV = struct.Struct("<HHI")
IMG_VERSION_RE = re.compile(r"[0-9]{1,5}\.[0-9]{1,5}\.[0-9]{1,5}(-[0-9A-Za-z.-]{1,12})?")


class ImageInvalid(Exception):
    def __init__(self, reason):
        super().__init__(reason)
        self.reason = reason


def parse_image(data):
    """dict(version, payload_size, sha256, build_info, tlvs, size) or ImageInvalid(reason)."""
    data = bytes(data)
    if data[:4] == b"\xff\xff\xff\xff":
        raise ImageInvalid("erased")
    if data[:4] != IMG_MAGIC:
        raise ImageInvalid("bad magic")
    if len(data) < IMG_HEADER.size:
        raise ImageInvalid("bad size")
    _, fmt, header_size, payload_size, tlv_size, _ = IMG_HEADER.unpack_from(data)
    if fmt != 1:
        raise ImageInvalid("bad format version")
    if header_size != IMG_HEADER.size or payload_size == 0 or header_size + payload_size + tlv_size > len(data):
        raise ImageInvalid("bad size")
    tlv_start = header_size + payload_size
    end = tlv_start + tlv_size
    tlvs = []
    pos = tlv_start
    while pos < end:
        if end - pos < IMG_TLV.size:
            raise ImageInvalid("bad tlv")
        kind, flags, length = IMG_TLV.unpack_from(data, pos)
        pos += IMG_TLV.size
        if length > end - pos:
            raise ImageInvalid("bad tlv")
        tlvs.append((kind, flags, data[pos:pos + length]))
        pos += length
    known = {}
    for kind, _flags, value in tlvs:
        if kind in (1, 2, 3):
            if kind in known:
                raise ImageInvalid("bad tlv")
            known[kind] = value
    if 1 not in known:
        raise ImageInvalid("missing version")
    if 2 not in known:
        raise ImageInvalid("missing hash")
    if len(known[2]) != 32:
        raise ImageInvalid("bad tlv")
    try:
        version = known[1].decode("ascii")
    except UnicodeDecodeError:
        raise ImageInvalid("bad fw version") from None
    if len(version) > 32 or not IMG_VERSION_RE.fullmatch(version):
        raise ImageInvalid("bad fw version")
    build_info = None
    if 3 in known:
        try:
            build_info = json.loads(known[3].decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise ImageInvalid("bad build info") from None
        if not isinstance(build_info, dict):
            raise ImageInvalid("bad build info")
    if hashlib.sha256(data[header_size:tlv_start]).digest() != known[2]:
        raise ImageInvalid("hash mismatch")
    return {"version": version, "payload_size": payload_size, "sha256": known[2].hex(),
            "build_info": build_info, "tlvs": tlvs, "size": end}


TRUST_MAGIC = b"TRST"
TRUST_HEAD = struct.Struct("<4sHHII")  # magic, version, count, body length, crc32(body)


def parse_trust(raw):
    """(list of {"name", "pem"}, None) or (None, reason): this firmware's own bounds-checked reader."""
    import zlib

    if len(raw) < TRUST_HEAD.size:
        return None, "too short"
    magic, version, count, length, crc = TRUST_HEAD.unpack_from(raw, 0)
    if magic == b"\xff\xff\xff\xff":
        return None, "erased"
    if magic != TRUST_MAGIC or version != 1:
        return None, "bad magic"
    body = raw[TRUST_HEAD.size:TRUST_HEAD.size + length]
    if len(body) != length or zlib.crc32(body) != crc:
        return None, "bad crc"
    try:
        cas = json.loads(body.decode("utf-8"))["cas"]
    except (UnicodeDecodeError, ValueError, KeyError, TypeError, RecursionError):
        return None, "bad body"
    if not isinstance(cas, list) or len(cas) != count or not all(
            isinstance(c, dict) and isinstance(c.get("name"), str) and isinstance(c.get("pem"), str) for c in cas):
        return None, "bad body"
    return cas, None


def pem_fingerprint(pem):
    """SHA-256 (hex) of the certificate's DER bytes; '-' for an entry without a certificate."""
    import base64
    import binascii

    lines = [x.strip() for x in pem.strip().splitlines()]
    if len(lines) < 3 or not lines[0].startswith("-----BEGIN CERTIFICATE") or not lines[-1].startswith("-----END"):
        return "-"
    try:
        der = base64.b64decode("".join(lines[1:-1]), validate=True)
    except (binascii.Error, ValueError):
        return "-"
    return hashlib.sha256(der).hexdigest()


def parse_image_or_none(data):
    try:
        return parse_image(data)
    except ImageInvalid:
        return None
