"""Reference cart firmware.

This file is the program that runs on the virtual cart. `vrack.factory.build_image()` takes
this source, replaces the build-constants block below with the build's values, links the
device-side verifier in (the `linked` block: vrack/ota_verify.py as source text), pads it with
a comment block, ends it with a `# build-sha256` line and wraps it in an image; the bootloader
compiles and runs the payload and calls `main(hal)`. It talks to the board only through `hal`
(see docs/flash-layout.md and vrack/bootloader.py for the HAL) and may import the standard
library and installed third-party libraries (paho-mqtt, cryptography), never the rack's own code.

The OTA agent (class Agent) is the contract of docs/interfaces.md, "OTA agent of the reference
firmware": fleet settings from the settings region, MQTT over TLS to the broker, the AWS IoT
Jobs MQTT API, the signed time exchange before every decision that depends on the date (a job is
deferred, with back-off, while no valid time answer comes), download over HTTP with Range resume
(only from the image hosts the fleet settings list), verification at the server's time (stored as the
time floor only once the verification accepts), the inactive slot erased and written page by page and
read back, the trial boot reported before it is marked good, rollbacks reported, CA updates written
into the trust store's other copy. Before each step a power cut can be aimed at it prints an event
line `EV: <name>[ <key>=<value> ...] t=<time.monotonic_ns()>`.

Device state (docs/flash-layout.md): the security counter (raised when an image is confirmed, never
lowered) and the time floor (the latest server time accepted) live in two copies of their own region;
the firmware is their only writer, always into the other copy.

Fault builds (FAULTS) reproduce field defects on purpose:
  crash_at_boot: true            raise during start-up, before sensors
  crash_on_sensor: "<name>"      the driver of that sensor dereferences a missing calibration
                                 at init: crashes only on carts whose sensor set has it
  never_mark_good: true          a trial boot never confirms itself (nor reports its job):
                                 the watchdog rolls it back
  self_test_fail: true           the self-test fails; a trial boot resets for rollback
  no_broker: true                the endpoint is looked up under a renamed settings key: the
                                 agent never reaches the broker, a trial boot never confirms
  early_success: true            a trial boot starts its agent before sensor init and reports
                                 SUCCEEDED as soon as it connects (before the self-test)
  bcb_single_copy: true          the firmware writes boot control itself (set-pending, mark-good)
                                 as ONE copy in place: both copy pages erased, copy 0 programmed;
                                 a power cut in that write leaves no valid boot control
  crash_after_confirm: true      a trial boot confirms itself (its job reported SUCCEEDED), restarts,
                                 and then crashes at the start of every normal boot: a crash loop
                                 after mark-good, which no A/B rollback can catch
  write_running_on_erase_fail: true   when a page of the inactive slot fails to erase, the agent
                                 writes the image over the running slot instead (and reports the
                                 erase failure as the reference does)
  local_clock: true              images and trust bundles are verified at the RTC's time, not the
                                 server's (the time exchange still runs)
  drop_old_ca: true              a CA update replaces the trust store with the added roots only (no
                                 overlap for the roots it had)
  ignore_nonce: true             a time answer to another nonce (a replay) is accepted
  ignore_security_counter: true  images are verified against security counter 0 (anti-rollback off)
"""

import hashlib
import itertools
import json
import math
import os
import queue
import re
import struct
import sys
import threading
import time
import traceback
import unicodedata
from datetime import UTC, datetime

# --- build constants: replaced by vrack.factory.build_image ---
FW_VERSION = "0.0.0-dev"
FW_FAMILY = "reference"
FAULTS = {}
BUILD_ID = "dev"
# --- end build constants ---

# --- linked: replaced by vrack.factory.firmware_payload ---
OTA_VERIFY_SOURCE = None
# --- end linked ---

PROMPT = "cart> "
STATE_IDLE = 2
BENCH_PERIOD_NS = 1_000_000
BENCH_MAX_LINES = 100_000
BENCH_MQTT_PERIOD_S = 0.005
BENCH_MQTT_MAX = 10_000
RTC_FORMAT = "%Y-%m-%dT%H:%M:%SZ"

# the OTA agent
ENDPOINT_KEY = "mqtt_endpoint" if FAULTS.get("no_broker") else "mqtt"
REQUEST_TIMEOUT_S = 5.0          # a jobs request waits this long for accepted/rejected
PROGRESS_TIMEOUT_S = 2.0         # ... a progress report (not worth holding a download for)
REPORT_TRIES = 3                 # an important report is sent up to this many times without a reply
SUBACK_TIMEOUT_S = 5.0
PUBACK_TIMEOUT_S = 10.0
RECONNECT_MIN_S, RECONNECT_MAX_S = 0.1, 2.0
KEEPALIVE_S = 30
EARLY_REPORT_WAIT_S = 5.0        # early_success: how long the boot waits for the premature report
UNREACHABLE_REPEAT_S = 10.0      # the same "broker unreachable" reason is not repeated more often
DOWNLOAD_READ_TIMEOUT_S = 6.0    # per read: a silent link counts as dropped after this
DOWNLOAD_CHUNK = 16384           # per read: about ten progress lines for an image of ~200 KB
DOWNLOAD_MAX_STALE = 8           # attempts in a row without a byte of progress, then FAILED
DOWNLOAD_BACKOFF_S = (0.1, 0.2, 0.4, 0.8, 1.0)
URL_MAX = 2048
JOB_ID_RE = re.compile(r"[a-zA-Z0-9_-]{1,64}")
THING_RE = re.compile(r"[a-zA-Z0-9:_-]{1,128}")
SHA256_HEX_RE = re.compile(r"[0-9a-fA-F]{64}")
ROLLBACK_METRIC = "firmware_rollback_count"
ONLINE_METRIC = "agent_online"
TERMINAL = ("SUCCEEDED", "FAILED", "REJECTED", "REMOVED", "CANCELED", "TIMED_OUT")
EV_GROUP_PAGES = 8               # an erase/write event line before each group of this many pages
EV_VALUE_RE = re.compile(r"[^\x21-\x7e]")  # an event line's values are single printable words
BCB_PAGES = (0, 1)               # boot control: copy 0 at page 0, copy 1 at page 1 (docs/flash-layout.md)
ENDED_CODES = ("InvalidStateTransition", "TerminalStateReached", "ResourceNotFound")

# time and trust (docs/interfaces.md, "Time exchange" and "CA updates")
TIME_TRIES = 3                   # time requests per exchange, each with a fresh nonce
TIME_TIMEOUT_S = 2.0             # ... each waiting this long for a valid answer
TIME_MAX_AHEAD_S = 10 * 365 * 86400  # an answer further ahead of the floor is "from the future"
DEFER_S = 30.0                   # a job without a valid time is retried after this, doubling ...
DEFER_MAX_S = 900.0              # ... up to this (the fleet settings' "defer_s" replaces DEFER_S)
TRUST_MAX_CAS = 4                # roots a trust store holds at most
TRUST_COPY_PAGES = 2             # the trust store: two copies of 2 pages in its 4-page region


def main(hal):
    Firmware(hal).run()


class Firmware:
    def __init__(self, hal):
        self.hal = hal
        self.console = hal.console
        self.calibration = {}
        self.out_lock = threading.RLock()  # all console output of the firmware
        self.at_prompt = False
        self.settings = None
        self.settings_reason = "not read"
        self.agent = None
        self._trial_lock = threading.Lock()
        self._trial = {"self_test": False, "reported": False, "done": False}

    def say(self, line, reprompt=True):
        """One console line. While the prompt shows, the line goes after a line break and the
        prompt is written again (`reprompt=False`: not, because a reset follows)."""
        with self.out_lock:
            if self.at_prompt:
                self.console.write("\r\n" + line + "\r\n" + (PROMPT if reprompt else ""))
                self.at_prompt = reprompt
            else:
                self.console.write_line(line)

    def ev(self, name, reprompt=True, **detail):
        """The event line of a step, printed BEFORE the step's work starts (a power cut can be aimed
        at it): `EV: <name>[ <key>=<value> ...] t=<time.monotonic_ns()>`, the stamp taken right before
        the line is written."""
        words = "".join(f" {key}={EV_VALUE_RE.sub('-', str(value)) or '-'}" for key, value in detail.items())
        with self.out_lock:
            self.say(f"EV: {name}{words} t={time.monotonic_ns()}", reprompt)

    # --- boot --------------------------------------------------------------------------------

    def run(self):
        hal = self.hal
        self.say(f"FW: {FW_FAMILY} {FW_VERSION} starting slot={hal.booted_slot}")
        if FAULTS.get("crash_at_boot"):
            raise RuntimeError("fault build: crash at boot")
        if FAULTS.get("crash_after_confirm") and hal.mode == "normal":
            raise RuntimeError("fault build: crash after confirm")
        self.settings, self.settings_reason = read_settings(hal)
        if self.settings is not None and hal.mode == "trial" and FAULTS.get("early_success"):
            self.start_agent()  # the defect: the agent reports before the cart has shown it works
            self.agent.trial_reported.wait(EARLY_REPORT_WAIT_S)
        for sensor in hal.sensors:
            self.init_sensor(sensor)
        self.ev("self-test")
        failure = self.self_test()
        if failure:
            self.say(f"FW: self-test failed: {failure}")
            if hal.mode == "trial":
                self.say("FW: trial not confirmed, resetting")
                hal.reset()
        else:
            self.say("FW: self-test ok")
            if hal.mode == "trial":
                if self.settings is None:
                    confirm_trial(hal, self.say, self.ev)  # nothing to phone home to
                else:
                    self.trial_step(self_test=True, from_main=True)
        if hal.mode == "normal":
            bcb = hal.bcb.read()
            if bcb.confirmed and bcb.active == hal.booted_slot:  # repair: a cut after mark-good, before the counter
                raise_security_counter(hal, self.say, self.ev)
        if self.settings is None:
            self.say(f"OTA: no fleet settings ({self.settings_reason})")
        else:
            self.start_agent()
        hal.set_state(STATE_IDLE)
        self.say("FW: ready")
        self.shell()

    def start_agent(self):
        if self.agent is None:
            self.agent = Agent(self, self.settings)
            self.agent.start()

    def trial_step(self, self_test=False, reported=False, from_main=False):
        """A trial boot is marked good once its self-test passed AND its job was reported."""
        with self._trial_lock:
            t = self._trial
            t["self_test"] = t["self_test"] or self_test
            t["reported"] = t["reported"] or reported
            go = t["self_test"] and t["reported"] and not t["done"]
            if go:
                t["done"] = True
        if go:
            confirm_trial(self.hal, self.say, self.ev)
            if from_main and self.agent is not None:
                self.agent.kick()

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
        own = self.read_slot(self.hal.booted_slot)
        image = parse_image_or_none(own)
        if image is None:
            return f"own slot {self.hal.booted_slot} does not verify"
        failure = check_build_checksum(own[IMG_HEADER.size:IMG_HEADER.size + image["payload_size"]])
        if failure:
            return failure
        if self.hal.clock.now().tzinfo is None:
            return "rtc has no timezone"
        return None

    # --- shell -------------------------------------------------------------------------------

    def shell(self):
        while True:
            with self.out_lock:
                if not self.at_prompt:
                    self.console.write(PROMPT)
                    self.at_prompt = True
            line = self.console.read_line(None)
            if line is None:
                continue
            with self.out_lock:
                self.at_prompt = False
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
        elif words == ["slot", "hash"]:
            self.slot_hash()
        elif words == ["ota", "status"]:
            self.ota_status()
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
        elif words[:2] == ["time", "sync"] and len(words) <= 3:
            self.time_sync(words[2] if len(words) == 3 else str(TIME_TRIES))
        elif words == ["state"]:
            state = read_device_state(self.hal)
            self.say(f"state counter={state['counter']} floor={state['floor']} seq={state['seq']}")
        elif len(words) == 3 and words[:2] == ["bench", "lines"]:
            self.bench_lines(words[2])
        elif len(words) == 3 and words[:2] == ["bench", "mqtt"]:
            self.bench_mqtt(words[2])
        else:
            self.say(f"error: unknown command '{line}'")

    def slot_status(self):
        hal = self.hal
        bcb = hal.bcb.read()
        confirmed = "yes" if bcb.confirmed and hal.booted_slot == bcb.active else "no"
        self.say(f"slot active={bcb.active} booted={hal.booted_slot} pending={bcb.pending or '-'} "
                 f"tries={bcb.tries} confirmed={confirmed} boots={bcb.boot_count} rollbacks={bcb.rollback_count}")
        for slot in ("A", "B"):
            image = parse_image_or_none(self.read_slot(slot))
            version = image["version"] if image else "-"
            self.say(f"slot {slot} fw={version} valid={'yes' if image else 'no'}")

    def slot_hash(self):
        """Two SHA-256 per slot: of the whole slot region (`sha256`: every page, leftovers of an older image
        beyond this one's end included, so any write shows), and of the image as the slot holds it
        (`image`: header, payload and TLVs, as long as its header declares; what the harness compares with
        the image it sent). `image=-`: no readable header (erased, another magic or format, sizes beyond
        the slot). Neither verifies anything: a damaged image still has a hash."""
        for slot in ("A", "B"):
            data = self.read_slot(slot)
            self.say(f"slot {slot} sha256={hashlib.sha256(data).hexdigest()} image={stored_image_hash(data)}")

    def ota_status(self):
        agent = self.agent
        if agent is None:
            self.say("ota state=idle broker=none thing=-")
            return
        broker = "connected" if agent.connected.is_set() else "disconnected"
        self.say(f"ota state={agent.state} broker={broker} thing={agent.thing}")

    def trust_list(self):
        """The CAs in the trust store, each with the SHA-256 of its certificate (DER), or '-' if empty,
        and the epoch second it is retired from, if it is."""
        store, reason = read_trust_store(self.hal)
        if store is None:
            self.say(f"error: trust store {reason}")
            return
        self.say(f"trust count={len(store['cas'])}")
        for ca in store["cas"]:
            until = f" until={ca['until']}" if "until" in ca else ""
            self.say(f"trust {ca['name']} fp={pem_fingerprint(ca['pem'])}{until}")

    def time_sync(self, tries):
        """One time exchange, as an update runs it (`time sync N`: N requests, 1..TIME_TRIES, default
        all): the time accepted, stored as the floor at once (an explicit sync: nothing else to wait
        for), the last answer's reason if every answer was rejected, or no answer at all."""
        if not tries.isdigit() or not 1 <= int(tries) <= TIME_TRIES:
            self.say(f"error: bad count '{tries}' (want 1..{TIME_TRIES})")
            return
        if self.agent is None:
            self.say(f"error: no fleet settings ({self.settings_reason})")
            return
        try:
            t = self.agent.server_time(int(tries))
            raise_time_floor(self.hal, self.ev, t)
        except TimeFailure as failure:
            self.say(f"time rejected: {failure.rejected}" if failure.rejected else "time unreachable")
        except StateWriteFailed as exc:
            self.say(f"error: state write failed: {exc}")
        else:
            self.say(f"time ok t={t}")

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

    def bench_mqtt(self, text):
        """N telemetry messages 5 ms apart, each stamped with time.monotonic_ns() when published."""
        if not text.isdigit() or not 0 < int(text) <= BENCH_MQTT_MAX:
            self.say(f"error: bad count '{text}' (want 1..{BENCH_MQTT_MAX})")
            return
        agent = self.agent
        if agent is None:
            self.say(f"error: no fleet settings ({self.settings_reason})")
            return
        if not agent.connected.is_set():
            self.say("error: not connected to the broker")
            return
        n = int(text)
        start = time.monotonic()
        for i in range(n):
            delay = start + i * BENCH_MQTT_PERIOD_S - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            agent.publish_metric({"metric": "bench", "value": 1, "i": i, "t_ns": time.monotonic_ns()})
        self.say(f"bench mqtt done {n}")

    def read_slot(self, slot):
        flash = self.hal.flash
        return flash.read(flash.layout.slot_offset(slot), flash.slot_size)


def confirm_trial(hal, say, ev):
    """Mark the trial slot good: the one place the firmware confirms an update."""
    if FAULTS.get("never_mark_good"):
        return
    say(f"FW: marking slot {hal.booted_slot} good")
    ev("mark-good")
    if FAULTS.get("bcb_single_copy"):
        slot = hal.booted_slot
        write_boot_control(hal, ev, "mark-good", active=slot, pending=None, tries=0, confirmed=True)
        hal.bcb.mark_good()  # finds nothing left to change (no write): only stops the trial watchdog
    else:
        hal.bcb.mark_good()
    raise_security_counter(hal, say, ev)
    say(f"FW: slot {hal.booted_slot} confirmed")
    if FAULTS.get("crash_after_confirm"):
        say("FW: restarting after the update")
        hal.reset()  # ... into a normal boot, which this build cannot survive: a crash loop after mark-good


# --- boot control written by the firmware itself: the bcb_single_copy fault build only -----------
# The reference firmware changes boot control only through hal.bcb (two copies, sequence numbers,
# the write always into the other copy). This writer is the defect of the fault build: ONE copy,
# rewritten in place, so a power cut while it is written leaves no valid boot control at all.

BCB_MAGIC = b"CBCB"
BCB_BODY = struct.Struct("<4sHHIBBBBIBB2x32sI")  # docs/flash-layout.md: 60 bytes, then CRC-32 of them
BCB_NO_SLOT = 0xFF


def encode_boot_control(seq, active, pending, tries, confirmed, boot_count, rollback_slot, rollback_version,
                        rollback_count):
    """One 64-byte BCB copy (layout version 1), this firmware's own encoder."""
    import zlib

    def code(slot):
        return BCB_NO_SLOT if slot is None else "AB".index(slot)

    body = BCB_BODY.pack(BCB_MAGIC, 1, BCB_BODY.size + 4, seq & 0xFFFFFFFF, code(active), code(pending), tries,
                         int(bool(confirmed)), boot_count & 0xFFFFFFFF, code(rollback_slot), 0,
                         rollback_version.encode("ascii")[:32], rollback_count & 0xFFFFFFFF)
    return body + struct.pack("<I", zlib.crc32(body))


def write_boot_control(hal, ev, why, **changes):
    """The bcb_single_copy defect: the current BCB with `changes`, seq + 1, written as a single copy in
    place: erase copy 1, then (event line) erase copy 0 and program the one copy there."""
    cur = hal.bcb.read()
    fields = {"active": cur.active, "pending": cur.pending, "tries": cur.tries, "confirmed": cur.confirmed,
              "boot_count": cur.boot_count, "rollback_slot": cur.rollback_slot,
              "rollback_version": cur.rollback_version, "rollback_count": cur.rollback_count}
    fields.update(changes)
    seq = cur.seq + 1
    raw = encode_boot_control(seq, **fields)
    flash = hal.flash
    flash.erase_page(BCB_PAGES[1])
    ev("bcb-write", copy=0, seq=seq, why=why)
    flash.erase_page(BCB_PAGES[0])
    flash.write_page(BCB_PAGES[0], raw)


def check_build_checksum(payload):
    """None if the payload's last line `# build-sha256 <hex>` is the SHA-256 of the bytes before
    it, else "no build checksum" or "build checksum mismatch"."""
    payload = bytes(payload)
    if not payload.endswith(b"\n"):
        return "no build checksum"
    start = payload.rfind(b"\n", 0, len(payload) - 1) + 1
    m = re.fullmatch(rb"# build-sha256 ([0-9a-f]{64})", payload[start:-1])
    if m is None:
        return "no build checksum"
    if hashlib.sha256(payload[:start]).hexdigest().encode("ascii") != m.group(1):
        return "build checksum mismatch"
    return None


# --- fleet settings (docs/interfaces.md, "Fleet settings") -------------------------------------

SETTINGS_MAGIC = b"CSET"
BLOB_HEAD = struct.Struct("<4sHHII")  # magic, version, count (trust) or 0 (settings), body length, crc32(body)


def read_settings(hal):
    """(settings, None) or (None, reason), from the settings region of the flash."""
    layout = hal.flash.layout
    try:
        raw = hal.flash.read(layout.settings_offset, layout.settings_size)
    except Exception as exc:
        return None, f"unreadable: {type(exc).__name__}"
    return parse_settings(raw)


def unframe(raw, magic):
    """(16-bit field, decoded JSON body, None) or (None, None, reason): this firmware's own
    bounds-checked reader of the framed blobs in flash (trust store, fleet settings)."""
    import zlib

    raw = bytes(raw)
    if len(raw) < BLOB_HEAD.size:
        return None, None, "too short"
    found, version, field, length, crc = BLOB_HEAD.unpack_from(raw, 0)
    if found == b"\xff\xff\xff\xff":
        return None, None, "erased"
    if found != magic:
        return None, None, "bad magic"
    if version != 1:
        return None, None, "bad version"
    body = raw[BLOB_HEAD.size:BLOB_HEAD.size + length]
    if len(body) != length:
        return None, None, "bad size"
    if zlib.crc32(body) != crc:
        return None, None, "bad crc"
    try:
        return field, json.loads(body.decode("utf-8")), None
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None, None, "bad body"


def parse_settings(raw):
    """(settings, None) or (None, reason)."""
    _, settings, reason = unframe(raw, SETTINGS_MAGIC)
    if reason:
        return None, reason
    if not isinstance(settings, dict):
        return None, "bad body"
    thing = settings.get("thing")
    if not isinstance(thing, str) or not THING_RE.fullmatch(thing):
        return None, "bad thing"
    if endpoint_of(settings, "mqtt") is None:
        return None, "bad mqtt"
    return settings, None


def endpoint_of(settings, key):
    """settings[key] if it is a usable MQTT endpoint {host, port, ca, cert, key}, else None."""
    ep = settings.get(key)
    if not isinstance(ep, dict):
        return None
    host, port = ep.get("host"), ep.get("port")
    if not isinstance(host, str) or not 0 < len(host) <= 253 or any(c.isspace() or c in "/@" for c in host):
        return None
    if type(port) is not int or not 0 < port < 65536:
        return None
    if not all(isinstance(ep.get(k), str) and ep.get(k) for k in ("ca", "cert", "key")):
        return None
    return ep


def image_hosts_of(settings):
    """The image hosts the fleet settings allow downloads from (lower-case host names or IP addresses,
    any port), or None when the settings carry no usable list: then no download is allowed."""
    hosts = settings.get("image_hosts")
    if not isinstance(hosts, list) or not 0 < len(hosts) <= 16:
        return None
    if not all(isinstance(h, str) and 0 < len(h) <= 253 and h.isascii() and h.isprintable() for h in hosts):
        return None
    return frozenset(h.lower() for h in hosts)


def defer_s_of(settings):
    """The first back-off of a deferred job: the fleet settings' "defer_s" (a number of seconds,
    0 < defer_s <= DEFER_MAX_S: a lab or a test that cannot wait 30 s), else DEFER_S."""
    value = settings.get("defer_s")
    if type(value) in (int, float) and 0 < value <= DEFER_MAX_S:
        return float(value)
    return DEFER_S


def answer_nonce(payload):
    """The nonce a time answer's signed body carries, or None (the ignore_nonce fault build only)."""
    import base64

    try:
        body = json.loads(base64.b64decode(json.loads(bytes(payload))["signed"], validate=True))
        return body["nonce"] if isinstance(body["nonce"], str) else None
    except Exception:
        return None


def image_host_refusal(url, allowed):
    """None if `url` (already checked by check_job_document) is on an allowed image host, else the
    reason to reject the job: defense in depth, a job document never makes the cart fetch from
    anywhere else, whatever the jobs service or the broker was made to say."""
    from urllib.parse import urlsplit

    try:
        host = urlsplit(url).hostname
    except ValueError:
        host = None
    if not host:
        return "malformed job document: url"
    if allowed is None:
        return "no image hosts in the fleet settings"
    if host.lower() not in allowed:
        return f"image host not allowed: {clean_text(host, 253)}"
    return None


# --- the job document --------------------------------------------------------------------------


def check_job_document(doc):
    """(the document's fields, None) or (None, the first malformed field). `operation` "ota" (a
    firmware update: target_version, url, sha256, size) or "trust" (a CA update: url, sha256, size)."""
    from urllib.parse import urlsplit

    if not isinstance(doc, dict):
        return None, "operation"
    operation = doc.get("operation")
    if not isinstance(operation, str) or operation not in ("ota", "trust"):
        return None, "operation"
    checked = {"operation": operation}
    if operation == "ota":
        version = doc.get("target_version")
        if not isinstance(version, str) or len(version) > 32 or not IMG_VERSION_RE.fullmatch(version):
            return None, "target_version"
        checked["target_version"] = version
    url = doc.get("url")
    if not isinstance(url, str) or not 0 < len(url) <= URL_MAX or not url.isascii() or any(
            c <= " " or c == "\x7f" for c in url):
        return None, "url"
    try:
        parts = urlsplit(url)
        _ = parts.port  # raises on a bad port
    except ValueError:
        return None, "url"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None, "url"
    sha = doc.get("sha256")
    if not isinstance(sha, str) or not SHA256_HEX_RE.fullmatch(sha):
        return None, "sha256"
    size = doc.get("size")
    if type(size) is not int or not 0 < size < 2**32:
        return None, "size"
    return {**checked, "url": url, "sha256": sha.lower(), "size": size}, None


def job_id_of(execution):
    if not isinstance(execution, dict):
        return None
    job_id = execution.get("jobId")
    return job_id if isinstance(job_id, str) and JOB_ID_RE.fullmatch(job_id) else None


def clean_text(text, limit):
    """Printable text for a console line or a statusDetails value (no control characters)."""
    text = "".join("?" if unicodedata.category(c)[0] == "C" else c for c in str(text)[:limit])
    return text


def describe(exc):
    text = str(exc)
    return clean_text(f"{type(exc).__name__}: {text}" if text else type(exc).__name__, 200)


def fault_page(exc, default):
    """The flash page a hal.FlashFault names (absolute page index), else the page that was being written."""
    page = getattr(exc, "page", None)
    return page if type(page) is int and page >= 0 else default


def reason_word(reason):
    """A failure reason as one word for an event line: its head before the first ':', e.g.
    "erase failed: page 7" -> "erase-failed", "rolled back" -> "rolled-back"."""
    head = re.sub(r"[^a-z0-9]+", "-", str(reason).split(":", 1)[0].lower()).strip("-")
    return head[:40] or "unknown"


# --- the device-side verifier, linked in as source ---------------------------------------------

_VERIFIER = []
_VERIFIER_MODULE = "_cart_fw_ota_verify"


def load_verifier():
    """The linked verifier (vrack/ota_verify.py) as a module of its own (dataclasses need one)."""
    if _VERIFIER:
        return _VERIFIER[0]
    if OTA_VERIFY_SOURCE is None:
        raise RuntimeError("no verifier linked into this build")
    import types

    module = types.ModuleType(_VERIFIER_MODULE)
    module.__file__ = "<linked ota_verify>"
    sys.modules[_VERIFIER_MODULE] = module
    try:
        exec(compile(OTA_VERIFY_SOURCE, "<linked ota_verify>", "exec"), module.__dict__)
    except BaseException:
        sys.modules.pop(_VERIFIER_MODULE, None)
        raise
    _VERIFIER.append(module)
    return module


# --- the OTA agent -----------------------------------------------------------------------------


class JobEnd(Exception):
    """The job ends here: status REJECTED or FAILED with a reason (status None: the service ended it)."""

    def __init__(self, status, reason):
        super().__init__(reason)
        self.status = status
        self.reason = reason


class JobDeferred(Exception):
    """No valid server time for the job now: it stays IN_PROGRESS and is taken up again later."""


class TimeFailure(Exception):
    """The time exchange gave no valid answer: str() is why ("time service unreachable" or "time answer
    rejected: <reason>"), `rejected` the last rejected answer's reason (None: no answer came)."""

    def __init__(self, rejected):
        super().__init__(f"time answer rejected: {rejected}" if rejected else "time service unreachable")
        self.rejected = rejected


class UrlExpired(Exception):
    pass


class HttpStatus(Exception):
    def __init__(self, code):
        super().__init__(f"HTTP {code}")
        self.code = code


class Agent:
    """The OTA agent: one worker thread (jobs, downloads, writes) and paho's network thread."""

    def __init__(self, fw, settings):
        self.fw = fw
        self.hal = fw.hal
        self.say = fw.say
        self.ev = fw.ev
        self.thing = settings["thing"]
        self.endpoint = endpoint_of(settings, ENDPOINT_KEY)
        self.image_hosts = image_hosts_of(settings)
        self.base = f"$aws/things/{self.thing}/jobs/"
        self.telemetry_topic = f"cart-hil/telemetry/{self.thing}"
        self.time_request_topic = f"cart-hil/time/{self.thing}/request"
        self.time_answer_topic = f"cart-hil/time/{self.thing}/answer"
        self.defer_s = defer_s_of(settings)
        self.boot_id = f"{self.thing}-{self.hal.bcb.read().boot_count}"
        self.state = "idle"
        self.client = None
        self.connected = threading.Event()
        self.events = queue.Queue()
        self._cond = threading.Condition()
        self._replies = {}   # clientToken -> None while waiting, then (accepted|rejected, payload)
        self._notified = 0   # notify-next messages with an execution received so far
        self._subacks = set()
        self._tokens = itertools.count(1)
        self._token_prefix = os.urandom(4).hex()
        self._last_connect_error = None
        self._unreachable_said = (None, 0.0)
        self.boot_tasks_done = False
        self.record_said = False
        self.metric_said = False
        self.rollback_info = None
        self.trial_done = self.hal.mode != "trial"
        self.trial_reported = threading.Event()
        self._time_lock = threading.Lock()  # one time exchange at a time (the shell's, the agent's)
        self._time_inbox = None             # the running exchange's queue of answers (under _cond)
        self._deferred = None               # {"job", "delay", "due"}: the job waiting for a valid time
        self._defer_timer = None

    # --- lifecycle -------------------------------------------------------------------------------

    def start(self):
        threading.Thread(target=self._main, name="ota-agent", daemon=True).start()

    def kick(self):
        self.events.put(("kick", None))

    def _main(self):
        if self.endpoint is None:
            self.say(f"OTA: broker unreachable: no endpoint in the fleet settings (key {ENDPOINT_KEY!r})")
            return
        try:
            self.client = self._make_client()
            self.client.connect_async(self.endpoint["host"], self.endpoint["port"], keepalive=KEEPALIVE_S)
            self.client.loop_start()
        except Exception as exc:
            traceback.print_exc(file=sys.stderr)
            self.say(f"OTA: broker unreachable: {describe(exc)}")
            return
        while True:
            kind, data = self.events.get()
            try:
                if kind == "connected":
                    self._on_connected(data)
                elif kind == "notify-next":
                    if isinstance(data.get("execution"), dict) and self._may_take_jobs():
                        self._take_jobs()
                elif kind == "kick" and self._may_take_jobs():
                    self._take_jobs()
                elif kind == "retry":
                    self._retry_deferred(data)
            except Exception:  # the agent must outlive its own bugs: the shell keeps working
                traceback.print_exc(file=sys.stderr)
                self.state = "idle"

    def _make_client(self):
        import ssl
        import tempfile

        import paho.mqtt.client as mqtt

        agent = self

        class Client(mqtt.Client):
            def reconnect(self):
                try:
                    return super().reconnect()
                except Exception as exc:
                    agent._last_connect_error = exc
                    raise

        ep = self.endpoint
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(cadata=ep["ca"])
        fd, path = tempfile.mkstemp(prefix="cart-tls-", suffix=".pem")  # mode 0600
        try:
            with os.fdopen(fd, "w") as f:
                f.write(ep["cert"].rstrip("\n") + "\n" + ep["key"])
            ctx.load_cert_chain(path)
        finally:
            os.unlink(path)
        client = Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.thing, protocol=mqtt.MQTTv311,
                        clean_session=True)
        client.tls_set_context(ctx)
        client.suppress_exceptions = True  # a bug in a callback must not end the network thread
        client.reconnect_delay_set(RECONNECT_MIN_S, RECONNECT_MAX_S)
        client.connect_timeout = REQUEST_TIMEOUT_S
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        return client

    # --- paho callbacks (network thread) ---------------------------------------------------------

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            self._unreachable(f"refused: {reason_code}")
            return
        self._unreachable_said = (None, 0.0)
        self.say(f"OTA: connected broker={self.endpoint['host']}:{self.endpoint['port']} thing={self.thing}")
        b = self.base
        topics = [b + "notify-next", b + "start-next/accepted", b + "start-next/rejected", b + "+/get/accepted",
                  b + "+/get/rejected", b + "+/update/accepted", b + "+/update/rejected", self.time_answer_topic]
        _, mid = client.subscribe([(t, 1) for t in topics])
        self.connected.set()
        self.events.put(("connected", mid))

    def _on_connect_fail(self, client, userdata):
        exc = self._last_connect_error
        self._unreachable(describe(exc) if exc is not None else "connection failed")

    def _on_disconnect(self, client, userdata, flags, reason_code, properties):
        if self.connected.is_set():
            self.connected.clear()
            with self._cond:
                self._cond.notify_all()
            self.say(f"OTA: connection lost: {reason_code}")
        else:
            self._unreachable(f"dropped before CONNACK: {reason_code}")

    def _unreachable(self, why):
        last, when = self._unreachable_said
        now = time.monotonic()
        if why != last or now - when >= UNREACHABLE_REPEAT_S:
            self._unreachable_said = (why, now)
            self.say(f"OTA: broker unreachable: {why}")

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties):
        with self._cond:
            self._subacks.add(mid)
            self._cond.notify_all()

    def _on_message(self, client, userdata, msg):
        if msg.topic == self.time_answer_topic:
            with self._cond:  # to the exchange that is waiting, if one is (else dropped)
                if self._time_inbox is not None:
                    self._time_inbox.put(bytes(msg.payload))
            return
        if not msg.topic.startswith(self.base):
            return
        try:
            payload = json.loads(msg.payload.decode("utf-8"))
        except Exception:  # not JSON: ignored
            return
        if not isinstance(payload, dict):
            return
        rest = msg.topic[len(self.base):]
        if rest == "notify-next":
            self.events.put(("notify-next", payload))
            if isinstance(payload.get("execution"), dict):
                with self._cond:  # wakes a start-next that nobody may ever answer (see request)
                    self._notified += 1
                    self._cond.notify_all()
            return
        outcome = rest.rsplit("/", 1)[-1]
        token = payload.get("clientToken")
        if outcome in ("accepted", "rejected") and isinstance(token, str):
            with self._cond:
                if token in self._replies and self._replies[token] is None:
                    self._replies[token] = (outcome, payload)
                    self._cond.notify_all()

    # --- requests --------------------------------------------------------------------------------

    def request(self, suffix, body=None, timeout=REQUEST_TIMEOUT_S, until_notified=False):
        """Publish a jobs request with a fresh clientToken; (accepted|rejected, reply) or (None, None).
        until_notified: give up as soon as a notify-next with an execution arrives (a start-next sent
        before the service listened for this thing is never answered; the notification is the news)."""
        deadline = time.monotonic() + timeout
        if not self.connected.wait(timeout):
            return None, None
        token = f"{self._token_prefix}-{next(self._tokens)}"
        with self._cond:
            self._replies[token] = None
            notified = self._notified
        try:
            payload = json.dumps({**(body or {}), "clientToken": token}, separators=(",", ":"))
            self.client.publish(self.base + suffix, payload, qos=1)
            with self._cond:
                while self._replies.get(token) is None:
                    left = deadline - time.monotonic()
                    if left <= 0 or not self.connected.is_set():  # a lost connection loses the reply
                        return None, None
                    if until_notified and self._notified != notified:
                        return None, None
                    self._cond.wait(left)
                return self._replies[token]
        finally:
            with self._cond:
                self._replies.pop(token, None)

    def request_retry(self, suffix, body=None, tries=REPORT_TRIES, timeout=REQUEST_TIMEOUT_S):
        for _ in range(tries):
            outcome, reply = self.request(suffix, body, timeout)
            if outcome is not None:
                return outcome, reply
        return None, None

    def update(self, job_id, status, details, tries=REPORT_TRIES, timeout=REQUEST_TIMEOUT_S):
        """`{job_id}/update`; a rejection that shows the execution already at `status` (a retried
        report whose first reply was lost) counts as accepted."""
        clean = {}
        for k, v in details.items():
            v = clean_text(v, 1024)
            if v:
                clean[k] = v
        outcome, reply = self.request_retry(f"{job_id}/update", {"status": status, "statusDetails": clean}, tries,
                                            timeout)
        if outcome == "rejected":
            state = reply.get("executionState")
            if isinstance(state, dict) and state.get("status") == status:
                return "accepted", reply
        return outcome, reply

    def publish_metric(self, fields):
        """Publish one telemetry event (QoS 1); its message info, or None when not connected.
        paho resends an unacknowledged one after a reconnect (same message, same info)."""
        if not self.connected.is_set():
            return None
        body = {"thing": self.thing, **fields}
        info = self.client.publish(self.telemetry_topic, json.dumps(body, separators=(",", ":")), qos=1)
        return info if info.rc == 0 else None

    @staticmethod
    def wait_puback(info, timeout):
        try:
            info.wait_for_publish(timeout)
            return info.is_published()
        except (RuntimeError, ValueError):
            return False

    # --- the time exchange (docs/interfaces.md, "Time exchange") ---------------------------------

    def server_time(self, tries=TIME_TRIES):
        """The server's time, from a signed answer to a fresh nonce: up to `tries` requests, each
        waiting TIME_TIMEOUT_S. A rejected answer is said and the wait goes on (an attacker's answer
        must not stop the real one). TimeFailure when no valid answer came. The time is returned, not
        stored: its caller stores it as the floor once it has decided on it (`time sync` at once, a job
        only when its verification accepts), so a job that is rejected leaves the device state as it was."""
        with self._time_lock:
            inbox = queue.Queue()
            with self._cond:
                self._time_inbox = inbox
            try:
                return self._exchange(inbox, tries)
            finally:
                with self._cond:
                    self._time_inbox = None

    def _exchange(self, inbox, tries):
        rejected = None
        for k in range(1, tries + 1):
            deadline = time.monotonic() + TIME_TIMEOUT_S
            if not self.connected.wait(TIME_TIMEOUT_S):
                continue  # no broker this try: nothing sent, nothing to wait for
            nonce = os.urandom(16).hex()
            self.ev("time-request", **{"try": k})
            self.client.publish(self.time_request_topic, json.dumps({"nonce": nonce}, separators=(",", ":")), qos=1)
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    payload = inbox.get(timeout=left)
                except queue.Empty:
                    break
                verdict = self._check_time(payload, nonce)
                if verdict.ok:
                    self.say(f"OTA: time ok t={verdict.time}")
                    return verdict.time
                rejected = clean_text(verdict.reason, 200)
                self.say(f"OTA: time rejected: {rejected}")
        raise TimeFailure(rejected)

    def _check_time(self, payload, nonce):
        """The verifier's verdict on one answer: the trust store in flash (with its retirements), the
        stored floor, at most TIME_MAX_AHEAD_S ahead of it."""
        pems, until = trust_maps(read_trust_store(self.hal)[0])
        if FAULTS.get("ignore_nonce"):
            nonce = answer_nonce(payload) or nonce  # the defect: whatever nonce the answer carries
        return load_verifier().verify_time_answer(
            payload, nonce=nonce, thing=self.thing, trust_store_pems=pems, ca_until=until,
            floor=read_device_state(self.hal)["floor"], max_ahead_s=TIME_MAX_AHEAD_S)

    def _job_time(self):
        """(server, now): the server time of a job's exchange and the time it verifies at, the same
        but in the local_clock fault build, which verifies at its RTC all the same. JobDeferred without
        a valid server time. Nothing is stored yet (`_store_floor`, once the job's verification accepts)."""
        try:
            server = self.server_time()
        except TimeFailure as failure:
            raise JobDeferred(str(failure)) from None
        if FAULTS.get("local_clock"):
            return server, int(self.hal.clock.now().timestamp())
        return server, server

    def _store_floor(self, server):
        """The job's verification accepted: its server time becomes the floor (if above it), before the
        job writes anything else. JobEnd FAILED if the part fails."""
        try:
            raise_time_floor(self.hal, self.ev, server)
        except StateWriteFailed as exc:
            raise JobEnd("FAILED", f"state write failed: {exc}") from None

    # --- deferred jobs -----------------------------------------------------------------------------

    def _defer(self, job_id, why):
        """Report the job IN_PROGRESS {"step": "deferred", "reason": why} and take it up again after
        the back-off: DEFER_S (or the settings' defer_s) for a new job, doubling for the same job, at
        most DEFER_MAX_S."""
        outcome, reply = self.update(job_id, "IN_PROGRESS", {"step": "deferred", "reason": why})
        if outcome == "rejected" and reply.get("code") in ENDED_CODES:
            self._cancel_deferral()
            self.say(f"OTA: job {job_id} ended by the service: {clean_text(reply.get('code'), 64)}")
            return
        last = self._deferred
        delay = min(last["delay"] * 2, DEFER_MAX_S) if last and last["job"] == job_id else self.defer_s
        self._schedule_retry(job_id, delay)
        self.say(f"OTA: deferred job={job_id}: {why}")

    def _schedule_retry(self, job_id, delay):
        if self._defer_timer is not None:
            self._defer_timer.cancel()
        self._deferred = {"job": job_id, "delay": delay, "due": time.monotonic() + delay}
        self._defer_timer = threading.Timer(delay, self.events.put, args=(("retry", job_id),))
        self._defer_timer.daemon = True
        self._defer_timer.start()

    def _cancel_deferral(self):
        if self._defer_timer is not None:
            self._defer_timer.cancel()
        self._deferred = self._defer_timer = None

    def _retry_deferred(self, job_id):
        """The back-off is over: if the execution is still IN_PROGRESS ({id}/get), run it again."""
        if self._deferred is None or self._deferred["job"] != job_id or not self._may_take_jobs():
            return  # another job ended it, or the next connection's start-next takes it up
        outcome, reply = self.request_retry(f"{job_id}/get", {"includeJobDocument": True}, tries=2)
        if outcome is None:
            self._schedule_retry(job_id, self._deferred["delay"])  # no answer: the same wait again
            return
        ex = reply.get("execution") if outcome == "accepted" else None
        status = ex.get("status") if isinstance(ex, dict) else reply.get("code")
        if status != "IN_PROGRESS":
            self._cancel_deferral()
            self.say(f"OTA: job {job_id} ended by the service: {clean_text(status, 64)}")
        else:
            self.run_job(job_id, ex.get("jobDocument"))
            self._drain_notifications()
        self._take_jobs()

    # --- after each connection -------------------------------------------------------------------

    def _on_connected(self, mid):
        deadline = time.monotonic() + SUBACK_TIMEOUT_S
        with self._cond:
            while mid not in self._subacks and self.connected.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
        if not self.connected.is_set():
            return
        if not self.boot_tasks_done:
            if not self._rollback_record():
                return  # again on the next connection
            info = self.publish_metric({"metric": ONLINE_METRIC, "value": 1, "boot_id": self.boot_id,
                                        "fw_version": FW_VERSION})
            if info is None or not self.wait_puback(info, PUBACK_TIMEOUT_S):
                return
            self.boot_tasks_done = True
        if not self.trial_done and not self._report_trial():
            return
        if self._may_take_jobs():
            self._take_jobs()

    def _rollback_record(self):
        """Publish the rollback the bootloader recorded, report its job FAILED, clear the record."""
        bcb = self.hal.bcb.read()
        if bcb.rollback_slot is None and not bcb.rollback_version:
            if not self.record_said:
                self.record_said = True
                self.say("OTA: rollback record none")
            return True
        version = bcb.rollback_version
        if not self.record_said:
            self.record_said = True
            self.say(f"OTA: rollback record slot={bcb.rollback_slot or '-'} fw={version or '-'}")
        if self.rollback_info is None:  # once per boot: an unacknowledged one is resent by paho
            self.ev("metric-publish", target=version or "-")
            self.rollback_info = self.publish_metric({"metric": ROLLBACK_METRIC, "target_version": version,
                                                      "value": 1, "boot_id": self.boot_id})
            if self.rollback_info is None:
                return False
        if not self.wait_puback(self.rollback_info, PUBACK_TIMEOUT_S):
            return False
        if not self.metric_said:
            self.metric_said = True
            self.say(f"OTA: metric {ROLLBACK_METRIC} target={version or '-'} published")
        if version:
            self._report_rolled_back(version)
        self.hal.bcb.clear_rollback()
        return True

    def _report_rolled_back(self, version):
        outcome, reply = self.request_retry("$next/get", {"includeJobDocument": True})
        if outcome != "accepted":
            return
        ex = reply.get("execution")
        job_id = job_id_of(ex)
        if job_id is None or ex.get("status") != "IN_PROGRESS":
            return
        doc = ex.get("jobDocument")
        if not isinstance(doc, dict) or doc.get("target_version") != version:
            return
        self.ev("report-failed", reason=reason_word("rolled back"))
        outcome, _ = self.update(job_id, "FAILED", {"reason": "rolled back", "rolled_back_version": version,
                                                    "version": FW_VERSION})
        if outcome == "accepted":
            self.say(f"OTA: job {job_id} reported FAILED: rolled back from {version}")

    def _report_trial(self):
        """In a trial boot: report the job that brought this version SUCCEEDED, then mark good."""
        while True:
            if not self.connected.is_set():
                return False
            outcome, reply = self.request("$next/get", {"includeJobDocument": True})
            if outcome is not None:
                break
        ex = reply.get("execution") if outcome == "accepted" else None
        job_id = job_id_of(ex)
        doc = ex.get("jobDocument") if job_id else None
        if job_id and ex.get("status") == "IN_PROGRESS" and isinstance(doc, dict) and \
                doc.get("target_version") == FW_VERSION:
            if FAULTS.get("never_mark_good") and not FAULTS.get("early_success"):
                self.trial_done = True  # the defect: it never reports, so it never confirms
                return True
            self.ev("report-succeeded")
            while True:
                outcome, reply = self.update(job_id, "SUCCEEDED", {"step": "done", "version": FW_VERSION}, tries=1)
                if outcome is not None:
                    break
                if not self.connected.is_set():
                    return False
            if outcome == "accepted":
                self.say(f"OTA: trial fw={FW_VERSION} reported SUCCEEDED job={job_id}")
            else:
                code = clean_text(reply.get("code", "?"), 64)
                self.say(f"OTA: trial fw={FW_VERSION} report rejected job={job_id}: {code}")
        else:
            self.say(f"OTA: trial fw={FW_VERSION} no job to report")
        self.trial_done = True
        self.trial_reported.set()
        self.fw.trial_step(reported=True)
        return True

    def _may_take_jobs(self):
        if self.state != "idle" or not self.trial_done or not self.connected.is_set():
            return False
        if self.hal.mode != "trial":
            return True
        bcb = self.hal.bcb.read()  # a trial boot takes new jobs only once it is confirmed
        return bcb.confirmed and bcb.active == self.hal.booted_slot and bcb.pending is None

    def _take_jobs(self):
        last = None
        while self.connected.is_set():
            outcome, reply = self.request("start-next", {}, until_notified=True)
            if outcome != "accepted":
                return
            ex = reply.get("execution")
            job_id = job_id_of(ex)
            if job_id is None or job_id == last:
                return
            deferred = self._deferred
            if deferred is not None and job_id == deferred["job"] and time.monotonic() < deferred["due"]:
                return  # its back-off runs: the timer takes it up
            last = job_id
            self.run_job(job_id, ex.get("jobDocument"))
            self._drain_notifications()

    def _drain_notifications(self):
        keep = []
        while True:
            try:
                item = self.events.get_nowait()
            except queue.Empty:
                break
            if item[0] != "notify-next":
                keep.append(item)
        for item in keep:
            self.events.put(item)

    # --- one job ---------------------------------------------------------------------------------

    def run_job(self, job_id, document):
        """Handle one execution to its end (REJECTED/FAILED reported, a CA update SUCCEEDED, or a reset
        into the trial), or defer it while there is no valid server time."""
        deferred = None
        try:
            self._job(job_id, document)
        except JobDeferred as exc:
            deferred = str(exc)
        except JobEnd as end:
            self._finish(job_id, end.status, end.reason)
        except Exception as exc:
            traceback.print_exc(file=sys.stderr)
            self._finish(job_id, "FAILED", f"internal error: {describe(exc)}")
        finally:
            self.state = "idle"
        if deferred is None:
            self._cancel_deferral()  # this job ended, or the service moved on from the deferred one
        else:
            self._defer(job_id, deferred)

    def _finish(self, job_id, status, reason):
        reason = clean_text(reason, 1024) or "unknown"
        if status is None:
            self.say(f"OTA: job {job_id} ended by the service: {reason[:200]}")
            return
        if status == "FAILED":
            self.ev("report-failed", reason=reason_word(reason))
        else:
            self.ev("job-report", status=status)
        self.update(job_id, status, {"reason": reason})
        word = "rejected" if status == "REJECTED" else "failed"
        self.say(f"OTA: {word} job={job_id}: {reason[:200]}")

    def _progress(self, job_id, step, progress):
        outcome, reply = self.update(job_id, "IN_PROGRESS", {"step": step, "progress": progress}, tries=1,
                                     timeout=PROGRESS_TIMEOUT_S)
        if outcome == "rejected" and reply.get("code") in ENDED_CODES:
            state = reply.get("executionState")
            status = state.get("status") if isinstance(state, dict) else None
            raise JobEnd(None, clean_text(status or reply.get("code"), 64))

    def _job(self, job_id, document):
        hal = self.hal
        doc, field = check_job_document(document)
        if doc is None:
            raise JobEnd("REJECTED", f"malformed job document: {field}")
        refusal = image_host_refusal(doc["url"], self.image_hosts)
        if refusal:
            raise JobEnd("REJECTED", refusal)
        if doc["operation"] == "trust":
            self._trust_job(job_id, doc)
            return
        size, version = doc["size"], doc["target_version"]
        if size > hal.flash.slot_size:
            raise JobEnd("REJECTED", f"image too large: {size} > slot {hal.flash.slot_size}")
        self.say(f"OTA: job {job_id} started target={version}")
        server, now = self._job_time()  # before anything is fetched: no valid time, no download
        self.state = "downloading"
        self._progress(job_id, "download", "0%")
        image = self._download(job_id, doc)
        self.state = "verifying"
        self._progress(job_id, "verify", "0%")
        self.ev("verify")
        verdict = self._verify(image, now)
        if not verdict.ok:
            raise JobEnd("REJECTED", verdict.reason)
        if verdict.manifest["firmware_version"] != version:
            raise JobEnd("REJECTED", "target version mismatch")
        self.say(f"OTA: verify ok fw={version} ca={verdict.ca}")
        self._store_floor(server)
        self.state = "writing"
        self._progress(job_id, "write", "0%")
        slot = self._write(image)
        self.ev("set-pending", slot=slot)
        try:
            if FAULTS.get("bcb_single_copy"):
                write_boot_control(hal, self.ev, "set-pending", pending=slot, tries=1)
            else:
                hal.bcb.set_pending(slot, tries=1)
        except Exception as exc:
            raise JobEnd("FAILED", f"write failed: {describe(exc)}") from None
        self.ev("job-report", status="IN_PROGRESS")
        self.update(job_id, "IN_PROGRESS", {"step": "self-test", "target_version": version})
        self.state = "rebooting"
        self.say(f"OTA: trial armed slot={slot} fw={version}, rebooting", reprompt=False)
        self.ev("reset-for-trial", reprompt=False)
        hal.reset()

    def _verify(self, image, now):
        """The verifier's verdict at `now` (the server's time), against the trust store in flash with its
        retirements and the stored security counter."""
        hal = self.hal
        pems, until = trust_maps(read_trust_store(hal)[0])
        counter = 0 if FAULTS.get("ignore_security_counter") else read_device_state(hal)["counter"]
        return load_verifier().verify_update(
            bytes(image), trust_store_pems=pems, hardware_revision=str(hal.config.get("hardware_revision", "")),
            running_version=FW_VERSION, now=now, security_counter=counter, ca_until=until)

    def _trust_job(self, job_id, doc):
        """A CA update: download the bundle, get the server time, verify the bundle at it, store the time
        as the floor, write the new trust store into the other copy, report SUCCEEDED. No reset."""
        if doc["size"] > load_verifier().BUNDLE_MAX:  # not fetched at all: no bundle is that large
            raise JobEnd("REJECTED", "malformed: bundle too large")
        self.say(f"OTA: job {job_id} started trust")
        self.state = "downloading"
        self._progress(job_id, "download", "0%")
        bundle = self._download(job_id, doc)
        server, now = self._job_time()
        self.state = "verifying"
        self._progress(job_id, "verify", "0%")
        store, _ = read_trust_store(self.hal)
        pems, until = trust_maps(store)
        self.ev("verify")
        verdict = load_verifier().verify_trust_bundle(bundle, trust_store_pems=pems, ca_until=until, now=now)
        if not verdict.ok:
            raise JobEnd("REJECTED", verdict.reason)
        cas = updated_trust(store["cas"], verdict.body, now)
        room = TRUST_COPY_PAGES * self.hal.flash.page_size
        if len(cas) > TRUST_MAX_CAS or len(encode_trust_copy(cas, 0xFFFFFFFF)) > room:
            raise JobEnd("REJECTED", "trust store full")
        self._store_floor(server)
        self.state = "writing"
        self._progress(job_id, "write", "0%")
        try:
            write_trust_store(self.hal, self.ev, cas, store)
        except TrustWriteFailed as exc:
            raise JobEnd("FAILED", f"trust write failed: {exc}") from None
        names = ",".join(ca["name"] for ca in cas)
        self.say(f"OTA: trust updated cas={names}")
        self.ev("job-report", status="SUCCEEDED")
        self.update(job_id, "SUCCEEDED", {"step": "done", "cas": names})

    def _write(self, image):
        """The image into the inactive slot: its pages erased, programmed, read back; returns the slot.
        JobEnd FAILED on a flash fault. Nothing outside the inactive slot is touched (except by the
        write_running_on_erase_fail fault build)."""
        hal = self.hal
        slot = "B" if hal.booted_slot == "A" else "A"
        n = -(-len(image) // hal.flash.page_size)
        try:
            self._erase_slot(slot, n)
        except JobEnd as failed:
            if not FAULTS.get("write_running_on_erase_fail"):
                raise
            # the defect: the running slot gets the image instead; the job says what the reference says
            running = hal.booted_slot
            self._erase_slot(running, n)
            self._program_slot(running, image)
            raise failed from None
        return self._program_slot(slot, image)

    def _erase_slot(self, slot, n):
        """Erase the first n pages of `slot`, page by page (an event line before each group)."""
        hal = self.hal
        first = hal.flash.layout.slot_first_page(slot)
        for i in range(n):
            if i % EV_GROUP_PAGES == 0:
                self.ev("erase", slot=slot, page=f"{i}/{n}")
            try:
                hal.flash.erase_page(first + i)
            except hal.FlashFault as exc:
                raise JobEnd("FAILED", f"erase failed: page {fault_page(exc, first + i)}") from None
            except Exception as exc:
                raise JobEnd("FAILED", f"erase failed: page {first + i}: {describe(exc)}") from None

    def _program_slot(self, slot, image):
        """Program the image into the erased pages of `slot`, page by page, and read it back."""
        hal = self.hal
        flash = hal.flash
        page = flash.page_size
        first = flash.layout.slot_first_page(slot)
        n = -(-len(image) // page)
        marks = {-(-n * k // 10) for k in range(1, 11)}
        for i in range(n):
            if i % EV_GROUP_PAGES == 0:
                self.ev("write", slot=slot, page=f"{i}/{n}")
            try:
                flash.write_page(first + i, bytes(image[i * page:(i + 1) * page]))
            except hal.FlashFault as exc:
                raise JobEnd("FAILED", f"write failed: program failed: page {fault_page(exc, first + i)}") from None
            except Exception as exc:
                raise JobEnd("FAILED", f"write failed: {describe(exc)}") from None
            if i + 1 in marks:
                self.say(f"OTA: write {i + 1}/{n} pages slot={slot}")
        self.ev("readback", slot=slot)
        try:
            readback = flash.read(flash.layout.slot_offset(slot), len(image))
        except Exception as exc:
            raise JobEnd("FAILED", f"write failed: {describe(exc)}") from None
        for i in range(n):
            if readback[i * page:(i + 1) * page] != image[i * page:(i + 1) * page]:
                raise JobEnd("FAILED", f"write failed: readback mismatch at page {first + i}")
        digest = hashlib.sha256(readback).hexdigest()
        self.say(f"OTA: write done slot={slot} sha256={digest}")
        return slot

    # --- download --------------------------------------------------------------------------------

    def _download(self, job_id, doc):
        """The image at the document's URL, resumed with Range after a drop; checked against the
        document's size and SHA-256."""
        import urllib.request

        allowed = self.image_hosts

        class Redirects(urllib.request.HTTPRedirectHandler):
            """A redirect is followed only to an allowed image host (the same rule as the document's URL)."""

            def redirect_request(self, req, fp, code, msg, headers, newurl):
                refusal = image_host_refusal(newurl, allowed)
                if refusal:
                    fp.close()
                    raise JobEnd("REJECTED", f"redirected: {refusal}")
                return super().redirect_request(req, fp, code, msg, headers, newurl)

        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), Redirects())
        size = doc["size"]
        url = doc["url"]
        buf = bytearray()
        stale = 0
        shown = [0]  # tenths of the size already shown on the console
        while len(buf) < size:
            before = len(buf)
            why = None
            try:
                self._fetch(opener, url, buf, size, shown, job_id)
                if len(buf) < size:
                    why = f"connection closed at {len(buf)} of {size} bytes"
            except UrlExpired:
                self.say(f"OTA: url expired at {len(buf)}, fetching the job document again")
                url = self._fresh_url(job_id) or url
            except HttpStatus as exc:
                if exc.code == 416:
                    raise JobEnd("REJECTED", "download size mismatch") from None
                if exc.code < 500:
                    raise JobEnd("FAILED", f"download failed: HTTP {exc.code}") from None
                why = f"HTTP {exc.code}"
            except JobEnd:
                raise
            except Exception as exc:  # dropped, reset, timed out, a broken response
                why = describe(exc)
            stale = 0 if len(buf) > before else stale + 1
            if stale >= DOWNLOAD_MAX_STALE:
                raise JobEnd("FAILED", f"download incomplete: {len(buf)} of {size} bytes")
            if why is not None:
                time.sleep(DOWNLOAD_BACKOFF_S[min(stale, len(DOWNLOAD_BACKOFF_S) - 1)])
                self.say(f"OTA: download resumed at {len(buf)}: {why}")
        digest = hashlib.sha256(buf).hexdigest()
        if digest != doc["sha256"]:
            raise JobEnd("REJECTED", "download hash mismatch")
        self.say(f"OTA: download done {size} bytes sha256={digest}")
        return bytes(buf)

    def _fetch(self, opener, url, buf, size, shown, job_id):
        """One GET from len(buf) on (Range), appending to buf until the response ends."""
        import urllib.error
        import urllib.request

        headers = {"Range": f"bytes={len(buf)}-"} if buf else {}
        self.ev("download", off=len(buf))
        try:
            resp = opener.open(urllib.request.Request(url, headers=headers),
                               timeout=DOWNLOAD_READ_TIMEOUT_S)
        except urllib.error.HTTPError as exc:
            exc.close()
            if exc.code == 403:
                raise UrlExpired() from None
            raise HttpStatus(exc.code) from None
        with resp:
            if resp.status == 206:
                m = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+|\*)", resp.headers.get("Content-Range", "").strip())
                if m is None or int(m.group(1)) != len(buf):
                    raise ValueError("unexpected Content-Range")
            elif resp.status == 200:
                del buf[:]  # the server ignored the range: from the start
            else:
                raise HttpStatus(resp.status)
            while True:
                chunk = resp.read1(min(DOWNLOAD_CHUNK, size + 1 - len(buf)))
                if not chunk:
                    return
                buf += chunk
                if len(buf) > size:
                    raise JobEnd("REJECTED", "download size mismatch")
                tenth = len(buf) * 10 // size
                if tenth > shown[0]:
                    half = shown[0] < 5 <= tenth
                    shown[0] = tenth
                    self.say(f"OTA: download {len(buf)}/{size}")
                    if half:
                        self._progress(job_id, "download", "50%")
                    if len(buf) < size:
                        self.ev("download", off=len(buf))  # the next block group

    def _fresh_url(self, job_id):
        outcome, reply = self.request_retry(f"{job_id}/get", {"includeJobDocument": True}, tries=2)
        if outcome != "accepted":
            return None
        ex = reply.get("execution")
        if isinstance(ex, dict) and ex.get("status") in TERMINAL:
            raise JobEnd(None, clean_text(ex["status"], 64))
        doc, field = check_job_document(ex.get("jobDocument") if isinstance(ex, dict) else None)
        if doc is None:
            raise JobEnd("REJECTED", f"malformed job document: {field}")
        refusal = image_host_refusal(doc["url"], self.image_hosts)
        if refusal:
            raise JobEnd("REJECTED", refusal)
        return doc["url"]


# --- the firmware's own image parser (image format v1, docs/image-format.md) -----------------
# Independent of the bootloader's; both are held to tests/vectors/image-v1.

IMG_MAGIC = b"CIMG"
IMG_HEADER = struct.Struct("<4sHHII16s")
IMG_TLV = struct.Struct("<HHI")
IMG_TLV_MANIFEST = 0x0010
IMG_VERSION_RE = re.compile(r"[0-9]{1,5}\.[0-9]{1,5}\.[0-9]{1,5}(-[0-9A-Za-z.-]{1,12})?")


class ImageInvalid(Exception):
    def __init__(self, reason):
        super().__init__(reason)
        self.reason = reason


def stored_image_hash(data):
    """SHA-256 (hex) of the image at the start of `data` (a slot), as long as its header declares: header,
    payload and TLVs; '-' when the header cannot say (not an image of format 1, or sizes beyond `data`)."""
    if len(data) < IMG_HEADER.size:
        return "-"
    magic, fmt, header_size, payload_size, tlv_size, _ = IMG_HEADER.unpack_from(data)
    end = header_size + payload_size + tlv_size
    if magic != IMG_MAGIC or fmt != 1 or header_size != IMG_HEADER.size or end > len(data):
        return "-"
    return hashlib.sha256(bytes(data[:end])).hexdigest()


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


# --- the trust store: two copies, never written in place (docs/flash-layout.md) -----------------

TRUST_MAGIC = b"TRST"


def is_uint(value):
    return type(value) is int and value >= 0


def parse_trust(raw):
    """One trust-store copy: ({"cas": [{"name", "pem", "until"?}], "seq": n}, None) or (None, reason)."""
    count, body, reason = unframe(raw, TRUST_MAGIC)
    if reason:
        return None, reason
    cas = body.get("cas") if isinstance(body, dict) else None
    seq = body.get("seq", 0) if isinstance(body, dict) else None
    if not isinstance(cas, list) or len(cas) != count or not is_uint(seq) or not all(
            isinstance(c, dict) and isinstance(c.get("name"), str) and isinstance(c.get("pem"), str)
            and ("until" not in c or is_uint(c["until"])) for c in cas):
        return None, "bad body"
    return {"cas": cas, "seq": seq}, None


def read_trust_store(hal):
    """({"cas", "seq", "copy"}, None): the valid copy with the highest seq (a tie: copy 0); or
    (None, copy 0's reason) when neither is valid."""
    flash = hal.flash
    size = TRUST_COPY_PAGES * flash.page_size
    best, first_reason = None, None
    for copy in (0, 1):
        try:
            raw = flash.read(flash.layout.trust_offset + copy * size, size)
        except Exception as exc:
            store, reason = None, f"unreadable: {type(exc).__name__}"
        else:
            store, reason = parse_trust(raw)
        if store is None:
            first_reason = first_reason or reason
        elif best is None or store["seq"] > best["seq"]:
            best = {**store, "copy": copy}
    return (best, None) if best is not None else (None, first_reason)


def trust_maps(store):
    """({name: pem}, {name: until}) of a trust store (empty for none): what the verifier takes."""
    cas = store["cas"] if store else []
    return {ca["name"]: ca["pem"] for ca in cas}, {ca["name"]: ca["until"] for ca in cas if "until" in ca}


def encode_trust_copy(cas, seq):
    """One trust-store copy (the framed blob), this firmware's own encoder."""
    import zlib

    entries = []
    for ca in cas:
        entry = {"name": ca["name"], "pem": ca["pem"]}
        if ca.get("until") is not None:
            entry["until"] = ca["until"]
        entries.append(entry)
    body = json.dumps({"cas": entries, "seq": seq}, sort_keys=True, separators=(",", ":")).encode("utf-8")
    return BLOB_HEAD.pack(TRUST_MAGIC, 1, len(entries), len(body), zlib.crc32(body)) + body


class TrustWriteFailed(Exception):
    pass


def write_trust_store(hal, ev, cas, current):
    """Write `cas` as a new trust store into the copy that is not `current` (copy 0 when there is
    none), seq = current's + 1: event line, both pages of the copy (the unused one erased), read back
    and compared. TrustWriteFailed(detail) if the part fails: the copy is then erased again (as far
    as the part lets it), so `current` stays the store even where the failed write left a whole blob."""
    flash = hal.flash
    first = flash.layout.trust_first_page + (0 if current is None else 1 - current["copy"]) * TRUST_COPY_PAGES
    try:
        _write_trust_copy(hal, ev, cas, current, first)
    except TrustWriteFailed:
        for i in range(TRUST_COPY_PAGES):
            try:
                flash.erase_page(first + i)
            except Exception:
                pass  # the part refuses: a blob it left half-written fails its CRC anyway
        raise


def _write_trust_copy(hal, ev, cas, current, first):
    flash = hal.flash
    page = flash.page_size
    copy = 0 if current is None else 1 - current["copy"]
    seq = (current["seq"] + 1) & 0xFFFFFFFF if current is not None else 1
    blob = encode_trust_copy(cas, seq)
    ev("trust-write", copy=copy, seq=seq)
    for i in range(TRUST_COPY_PAGES):
        part = blob[i * page:(i + 1) * page]
        try:
            if part:
                flash.write_page(first + i, part)
            else:
                flash.erase_page(first + i)
        except hal.FlashFault as exc:
            raise TrustWriteFailed(str(exc)) from None
        except Exception as exc:
            raise TrustWriteFailed(describe(exc)) from None
    try:
        readback = flash.read(first * page, TRUST_COPY_PAGES * page)
    except Exception as exc:
        raise TrustWriteFailed(describe(exc)) from None
    expected = blob + b"\xff" * (TRUST_COPY_PAGES * page - len(blob))
    for i in range(TRUST_COPY_PAGES):
        if readback[i * page:(i + 1) * page] != expected[i * page:(i + 1) * page]:
            raise TrustWriteFailed(f"readback mismatch at page {first + i}")


def updated_trust(cas, body, now):
    """The trust store after a verified CA update `body` at server time `now`: the roots it adds (no
    end), then every root it had that was not re-added, kept until min(its end, now + overlap_s);
    roots whose end is not after `now` are gone. The drop_old_ca fault build keeps none of them."""
    added = [{"name": e["name"], "pem": e["pem"]} for e in body["add"]]
    if FAULTS.get("drop_old_ca"):
        return added
    names = {e["name"] for e in added}
    kept = []
    for ca in cas:
        if ca["name"] in names:
            continue
        until = now + body["overlap_s"]
        if "until" in ca:
            until = min(until, ca["until"])
        if until > now:
            kept.append({"name": ca["name"], "pem": ca["pem"], "until": until})
    return kept + added


# --- the device state: security counter and time floor, two copies (docs/flash-layout.md) -------
# The reader takes the valid copy with the highest seq; the writer, this firmware only, writes seq + 1
# into the other copy, so a torn write leaves the previous state. One writer at a time (a lock): the
# shell's `time sync`, the agent's jobs and the boot's counter repair run in different threads.

STATE_MAGIC = b"CDST"
STATE_BODY = struct.Struct("<4sHHIIQI")  # magic, version, size, seq, security counter, time floor, reserved
STATE_SIZE = STATE_BODY.size + 4         # then the CRC-32 of the 28 bytes before it
STATE_LOCK = threading.Lock()


class StateWriteFailed(Exception):
    pass


def encode_state(seq, counter, floor):
    import zlib

    body = STATE_BODY.pack(STATE_MAGIC, 1, STATE_SIZE, seq & 0xFFFFFFFF, counter, floor, 0)
    return body + struct.pack("<I", zlib.crc32(body))


def parse_state(raw):
    """(seq, counter, floor) of one device-state copy, or None (erased, torn, another version)."""
    import zlib

    raw = bytes(raw)
    if len(raw) < STATE_SIZE:
        return None
    (crc,) = struct.unpack_from("<I", raw, STATE_BODY.size)
    if zlib.crc32(raw[:STATE_BODY.size]) != crc:
        return None
    magic, version, size, seq, counter, floor, _ = STATE_BODY.unpack_from(raw)
    if magic != STATE_MAGIC or version != 1 or size != STATE_SIZE:
        return None
    return seq, counter, floor


def read_device_state(hal):
    """{"counter", "floor", "seq", "copy"}: the valid copy with the highest seq (a tie: copy 0), or
    counter 0, floor 0, seq 0, copy None when neither is valid."""
    flash = hal.flash
    best = {"counter": 0, "floor": 0, "seq": 0, "copy": None}
    for copy in (0, 1):
        found = parse_state(flash.read(flash.layout.state_offset + copy * flash.page_size, STATE_SIZE))
        if found is not None and (best["copy"] is None or found[0] > best["seq"]):
            best = {"seq": found[0], "counter": found[1], "floor": found[2], "copy": copy}
    return best


def update_device_state(hal, ev, change):
    """Under the lock: `change(current)` gives (counter, floor) to store, or None for no change; the
    record goes into the other copy with seq + 1, after `EV: state-write copy=<c> seq=<s>`, and is read
    back. The new state, or None when nothing changed; StateWriteFailed(detail) if the part fails."""
    flash = hal.flash
    with STATE_LOCK:
        current = read_device_state(hal)
        wanted = change(current)
        if wanted is None:
            return None
        counter, floor = wanted
        copy = 0 if current["copy"] is None else 1 - current["copy"]
        seq = (current["seq"] + 1) & 0xFFFFFFFF
        page = flash.layout.state_first_page + copy
        record = encode_state(seq, counter, floor)
        ev("state-write", copy=copy, seq=seq)
        try:
            flash.write_page(page, record)
            readback = flash.read(page * flash.page_size, STATE_SIZE)
        except hal.FlashFault as exc:
            raise StateWriteFailed(str(exc)) from None
        except Exception as exc:
            raise StateWriteFailed(describe(exc)) from None
        if readback != record:
            raise StateWriteFailed(f"readback mismatch at page {page}")
        return {"counter": counter, "floor": floor, "seq": seq, "copy": copy}


def raise_time_floor(hal, ev, t):
    """An accepted server time `t` becomes the floor if it is above it (an answer is never earlier
    than the floor: the verifier refuses those). StateWriteFailed if the part fails."""
    update_device_state(hal, ev, lambda cur: (cur["counter"], t) if t > cur["floor"] else None)


def image_security_counter(data):
    """The security counter the manifest of an image declares (0 for an image without one)."""
    image = parse_image_or_none(data)
    for kind, _flags, value in (image["tlvs"] if image else ()):
        if kind == IMG_TLV_MANIFEST:
            try:
                counter = json.loads(value.decode("utf-8")).get("security_counter")
            except (UnicodeDecodeError, ValueError, RecursionError, AttributeError):
                return 0
            return counter if is_uint(counter) and counter < 2**32 else 0
    return 0


def raise_security_counter(hal, say, ev):
    """The running image is confirmed: the stored security counter goes up to its manifest's (never
    down), so an image under it is refused from now on. A failed write is said and left to the next
    normal boot, which repairs it."""
    flash = hal.flash
    counter = image_security_counter(flash.read(flash.layout.slot_offset(hal.booted_slot), flash.slot_size))
    try:
        done = update_device_state(hal, ev, lambda cur: (counter, cur["floor"]) if counter > cur["counter"] else None)
    except StateWriteFailed as exc:
        say(f"FW: security counter write failed: {exc}")
        return
    if done is not None:
        say(f"FW: security counter {counter}")


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
