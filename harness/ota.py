"""OTA scenario steps: firmware builds, signing, the fleet services of one test process, and
`update` — send a cart an image as a job and wait for what happened, with the evidence.

    builds = FirmwareBuilds(rig, cache_dir)      images of a version / fault build (the rig's build command)
    signer = Signer(LabPki(...))                 the lab's release signing (harness.image)
    fleet = Fleet(rig, log_dir)                  MQTT client, jobs service, image host, telemetry
    ota = CartOta(cart, fleet, builds, signer, hardware)   the `ota` fixture: one cart's steps in a test
    run = ota.start(ota.image("1.6.0"))          queue the job; act on the cart or the network meanwhile
    outcome = run.wait()                         confirmed / rejected / failed / rolled-back / ...
    outcome = ota.update(image)                  both at once
    outcome.expect_confirmed() / expect_rejected("unsigned") / expect_rolled_back()
    outcome.expect_failed_writing("erase failed: page 140")   a flash fault: only the inactive slot changed
    run.wait_deferred().expect_deferred("time service unreachable")   no usable time: the job waits, nothing written
    ota.deliver_trust(ota.trust_bundle(["lab-root-2027"])).expect_applied([...])   a CA update, its own job
    fleet.time.set_mode(cart, "silent") / fleet.server_time(cart)   the time service the cart asks before verifying

A cart is reached only through its console (the profile's lines and commands), MQTT on the
rig's broker and HTTP from the image host: the same steps run on a physical rig.

A cart decides whether a release (or a CA update) is valid at the time the lab's time service signs
for it, never by its own clock. Images and bundles are therefore signed around that server time for
the cart (`fleet.server_time`), which a test may shift (`fleet.time.set_mode(..., offset_s=...)`).

Outcomes (`UpdateOutcome.outcome`):
  confirmed                 job SUCCEEDED and the cart marked the new slot good
  rejected                  job REJECTED by the device (reason in statusDetails), nothing written
  failed                    job FAILED for another reason than a rollback
  rolled-back               the trial was not confirmed; the bootloader went back; job FAILED "rolled back"
  succeeded-but-rolled-back job SUCCEEDED, yet the cart rolled back: the case the jobs protocol
                            cannot express, seen through the console and firmware_rollback_count
  timed-out / canceled      the service ended the execution
  deferred                  (wait_deferred) the agent got no usable time answer: the job stays IN_PROGRESS,
                            statusDetails step "deferred", nothing written; the agent retries it later
CA updates (`TrustOutcome.outcome`): applied (SUCCEEDED), rejected, failed, timed-out, canceled.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import itertools
import json
import os
import re
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives import serialization

from harness import image as himage
from harness import pki as hpki
from harness.fleet import ImageHost, JobsService, MqttClient, StatusChange, Telemetry, TimeService
from harness.fleet.telemetry import ROLLBACK_METRIC

if TYPE_CHECKING:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

    from harness.cart import Cart, DeviceState, SlotStatus
    from harness.config import Rig
    from harness.console import Line

    Leaf = tuple[ec.EllipticCurvePrivateKey, list[x509.Certificate]]

TERMINAL = ("SUCCEEDED", "FAILED", "REJECTED", "TIMED_OUT", "CANCELED", "REMOVED")
_ENDED = {"REJECTED": "rejected", "TIMED_OUT": "timed-out", "CANCELED": "canceled", "REMOVED": "canceled"}
ONLINE_METRIC = "agent_online"
TIME_CHALLENGE_S = 3 * 2.0  # the agent's time challenge at worst: 3 tries of 2 s (docs/interfaces.md)
DEFER_BUDGET_S = 20.0 + TIME_CHALLENGE_S  # job queued to deferral: pickup, document checks, the challenge
CONSOLE_LAG_S = 5.0  # a console line that follows a job report the service already has
SIGN_ISSUED_BEFORE_S = 3600  # a release is signed as issued an hour before "now" (server time) ...
SIGN_VALID_S = 30 * 86400  # ... and valid for 30 days from it
TRUST_OVERLAP_S = 90 * 86400  # a CA update keeps the roots it replaces this long (the bundle's overlap_s)
BUNDLE_TAMPERS = ("truncated", "bad-signature")
# an update's waits end at once, with the cause on the first line, when the cart shows it cannot end well
CRASH_LOOP = 3          # crashes during one update: the same image failing again and again
RETRY_STORM = 3         # the same job started this many times, again after each rollback: handed back
BROKER_GONE_S = 5.0     # the harness without a broker connection this long
CART_SILENT_S = 30.0    # no console line at all this long while a job is open (the agent's longest quiet
                        # stretch is a 6 s download read timeout; a deferral is waited for by wait_deferred)
CAUSE_RECHECK_S = 1.0   # causes are asked at every event and at least this often (a silence has no event)
DELETE = object()  # a document override that removes the key
_VERSION = re.compile(r"^(\d+)\.(\d+)\.(\d+)$")


class OtaError(AssertionError):
    """An update did not end as the scenario expected; the message carries the evidence."""


class FirmwareBuildError(RuntimeError):
    pass


# ---------------------------------------------------------------- versions


def bump(version: str, *, major: int = 0, minor: int = 0, patch: int = 0) -> str:
    m = _VERSION.match(version)
    if not m:
        raise ValueError(f"not a plain version: {version!r}")
    a, b, c = (int(x) for x in m.groups())
    if major:
        return f"{a + major}.0.0"
    if minor:
        return f"{a}.{b + minor}.0"
    if c + patch < 0:
        raise ValueError(f"no version {patch} patch levels below {version}")
    return f"{a}.{b}.{c + patch}"


# ---------------------------------------------------------------- builds and signing


class FirmwareBuilds:
    """Images of a version, or of a fault build, made by the rig's `firmware.build` command and
    kept in `cache_dir` (one file per version and fault set; safe across processes)."""

    def __init__(self, rig: Rig, cache_dir: Path):
        if rig.spec.firmware is None:
            raise FirmwareBuildError(f"{rig.path}: no 'firmware' section: the rig does not say how images are built")
        self.rig = rig
        self.argv = list(rig.spec.firmware.build)
        self.cache_dir = cache_dir
        self._memo: dict[str, bytes] = {}

    @staticmethod
    def _slug(version: str, faults: Mapping[str, Any]) -> str:
        if not faults:
            return f"fw-{version}"
        text = ",".join(f"{k}={v}" for k, v in sorted(faults.items()))
        safe = re.sub(r"[^A-Za-z0-9_.=-]", "_", text)[:60]
        return f"fw-{version}+{safe}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"

    def build(self, version: str, faults: Mapping[str, Any] | None = None) -> bytes:
        faults = dict(faults or {})
        slug = self._slug(version, faults)
        if slug in self._memo:
            return self._memo[slug]
        out = self.cache_dir / f"{slug}.img"
        if not out.exists():
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            tmp = out.with_name(f".{out.name}.{os.getpid()}-{threading.get_ident()}.tmp")
            argv: list[str] = []
            for word in self.argv:
                if word == "{faults}":
                    for k, v in faults.items():
                        argv += ["--fault", k if v is True else f"{k}={v}"]
                else:
                    argv.append(word.format(python=sys.executable, version=version, out=str(tmp)))
            try:
                proc = subprocess.run(argv, capture_output=True, text=True, timeout=120,
                                      cwd=self.rig.path.parent, check=False)
            except (OSError, subprocess.TimeoutExpired) as exc:
                raise FirmwareBuildError(f"firmware build {slug}: {shlex.join(argv)}: {exc}") from None
            if proc.returncode != 0 or not tmp.exists():
                tmp.unlink(missing_ok=True)
                tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-8:])
                raise FirmwareBuildError(f"firmware build {slug}: {shlex.join(argv)} exited {proc.returncode}:\n{tail}")
            tmp.replace(out)
        data = out.read_bytes()
        self._memo[slug] = data
        return data


def corrupt_before_signing(payload: bytes) -> bytes:
    """The payload with one character of a comment line near its middle changed: what a bad
    build machine or a flipped bit in the artifact store does before the release is signed.
    The code still compiles; only the build's own checksum can tell."""
    start = payload.find(b"\n#", len(payload) // 2)
    if start < 0:
        raise ValueError("no comment line in the second half of the payload to corrupt")
    i = start + 6
    ch = payload[i]
    new = ord("x") if ch != ord("x") else ord("y")
    return payload[:i] + bytes([new]) + payload[i + 1:]


class Signer:
    """The lab's release signing: an unsigned image in, a signed one out (harness.image); and CA
    updates (trust bundles) signed the same way."""

    def __init__(self, lab_pki: hpki.LabPki):
        self.pki = lab_pki

    def _key_chain(self, ca: str, signer: str | None, leaf: Leaf | None) -> Leaf:
        """The signing key and [leaf, intermediate]: `leaf` (an ephemeral one, LabPki.issue_signer), else
        the lab's `signer` leaf (default: the code-signing leaf under `ca`)."""
        if leaf is not None:
            if signer is not None:
                raise ValueError("give a signer name or an ephemeral leaf, not both")
            key, chain = leaf
            return key, list(chain)
        name = signer or hpki.signer_of(ca)
        return self.pki.key(name), self.pki.chain(name)

    @staticmethod
    def _window(now: int | None, issued: int | None, expires: int | None) -> tuple[int, int]:
        """issued/expires, by default an hour before `now` and 30 days after it (`now`: the server time the
        device will judge it at; default this machine's clock)."""
        now = int(time.time()) if now is None else now
        return (now - SIGN_ISSUED_BEFORE_S if issued is None else issued,
                now + SIGN_VALID_S if expires is None else expires)

    def sign(self, unsigned: bytes, *, hardware: list[str], ca: str = hpki.ROOT_OLD, signer: str | None = None,
             leaf: Leaf | None = None, version: str | None = None, tamper: str | None = None,
             issued: int | None = None, expires: int | None = None, now: int | None = None,
             security_counter: int = 0, payload_edit: Callable[[bytes], bytes] | None = None) -> bytes:
        """`ca`: the root the manifest requires; `signer`: the code-signing leaf (default: the one
        under `ca`) or `leaf`: (key, chain) of an ephemeral one; `issued`/`expires` default around `now`
        (the cart's server time: the time it will verify at); `payload_edit` changes the payload before
        signing."""
        parsed = himage.parse_image(unsigned)
        key, chain = self._key_chain(ca, signer, leaf)
        issued, expires = self._window(now, issued, expires)
        payload = payload_edit(parsed.payload) if payload_edit else parsed.payload
        return himage.build_signed_image(
            payload, version=version or parsed.version, hardware=hardware, required_ca=ca, issued=issued,
            expires=expires, security_counter=security_counter, signer_key=key, chain=chain, tamper=tamper,
            build_info=parsed.build_info)

    def trust_bundle(self, add: Mapping[str, str], *, required_ca: str, overlap_s: int = TRUST_OVERLAP_S,
                     signer: str | None = None, leaf: Leaf | None = None, issued: int | None = None,
                     expires: int | None = None, now: int | None = None) -> bytes:
        """A CA update adding `add` ({name: PEM}), signed under `required_ca` (a root the carts already
        trust) by its code-signing leaf (or `signer` / `leaf` as for `sign`), valid around `now`."""
        key, chain = self._key_chain(required_ca, signer, leaf)
        issued, expires = self._window(now, issued, expires)
        return himage.build_trust_bundle(dict(add), required_ca=required_ca, issued=issued, expires=expires,
                                         overlap_s=overlap_s, signer_key=key, chain=chain)


def tamper_bundle(bundle: bytes, tamper: str) -> bytes:
    """A defective CA update on purpose: `truncated` (the file cut in half) or `bad-signature` (the
    signature's last byte changed: still DER, no longer valid)."""
    if tamper == "truncated":
        return bundle[: len(bundle) // 2]
    if tamper == "bad-signature":
        doc = json.loads(bundle)
        sig = bytearray(base64.b64decode(doc["signature"]))
        sig[-1] ^= 0x01
        doc["signature"] = base64.b64encode(bytes(sig)).decode("ascii")
        return himage.canonical_json(doc)
    raise ValueError(f"unknown bundle tamper {tamper!r}; one of {', '.join(BUNDLE_TAMPERS)}")


def open_lab_pki(rig: Rig) -> hpki.LabPki:
    """The rig's lab PKI (a virtual rig names it; a physical lab uses reports/pki), created if missing."""
    virtual = rig.spec.virtual
    lab = hpki.LabPki(rig.resolve(virtual.pki) if virtual is not None and virtual.pki is not None
                      else hpki.DEFAULT_DIR)
    lab.init()
    return lab


def release_hardware(rig: Rig) -> list[str]:
    """What a release is signed for: every hardware revision on the rig."""
    return sorted({s.cart.hardware_revision for s in rig.slots})


# ---------------------------------------------------------------- fleet services of one process


class Fleet:
    """What one test process runs in the lab: an MQTT client on the rig's broker, the jobs service
    and the time service for the carts this process drives, the image host, the telemetry collector."""

    def __init__(self, rig: Rig, log_dir: Path, *, worker: int = 0):
        log_dir.mkdir(parents=True, exist_ok=True)
        self.rig = rig
        self.mqtt = self._client(f"cart-hil-fleet-{os.getpid()}")
        self.mqtt.connect()
        ih = rig.spec.image_host
        self.images = None
        try:
            self.pki = open_lab_pki(rig)
            self.images = ImageHost(ih.bind, ih.port + worker if ih.port else 0, url_host=ih.url_host,
                                    allow_short_ttl_for_tests=True, log_path=log_dir / f"imagehost-{os.getpid()}.log")
            self.jobs = JobsService(self.mqtt, self.images, things=())
            self.telemetry = Telemetry(self.mqtt)
            self.time = TimeService.for_pki(self.mqtt, self.pki)
        except BaseException:
            if self.images is not None:
                self.images.close()
            self.mqtt.close()
            raise
        self.jobs.add_listener(self.telemetry.record_job_status)
        self._changes = threading.Condition()  # notified on every job status change (wait_job_change)
        self._change_seq = 0
        self.jobs.add_listener(self._job_changed)
        self._ids = itertools.count(1)

    def serve(self, thing: str) -> None:
        """Answer `thing`'s job requests and time challenges (idempotent)."""
        self.jobs.serve(thing)
        self.time.serve(thing)

    def server_time(self, thing: str) -> int:
        """The time the time service signs for `thing` now (epoch s): true time plus the offset a test
        set for it. What the cart will judge an image or a CA update at."""
        offset = self.time.mode(thing)[1] if thing in self.time.things else 0
        return int(self.time.clock()) + offset

    def _job_changed(self, _change: StatusChange) -> None:
        # called by the jobs service under its own lock: only count and notify here, never call back into it
        with self._changes:
            self._change_seq += 1
            self._changes.notify_all()

    def wait_job_change(self, job_id: str, thing: str, predicate: Callable[[StatusChange], bool],
                        timeout: float) -> StatusChange | None:
        """The first status change of the execution for which `predicate` holds, waiting for it (woken by
        each change); None at the deadline."""
        deadline = time.monotonic() + timeout
        while True:
            with self._changes:
                seq = self._change_seq
            hit = next((c for c in self.jobs.history(job_id, thing) if predicate(c)), None)
            if hit is not None:
                return hit
            with self._changes:
                while self._change_seq == seq:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return None
                    self._changes.wait(left)

    def kick(self, thing: str, timeout: float = 10.0) -> None:
        """Take over `thing`'s MQTT session (same client id): the broker disconnects the cart, as a
        lost link or a duplicate client does in the field. The cart is expected to reconnect."""
        intruder = self._client(thing)
        intruder.connect(timeout)
        intruder.close()

    def _client(self, client_id: str) -> MqttClient:
        """An MQTT client on the rig's broker with the harness's certificate."""
        b, r = self.rig.spec.broker, self.rig
        return MqttClient(b.host, b.port, r.resolve(b.ca), r.resolve(b.cert), r.resolve(b.key), client_id=client_id)

    def new_job_id(self, label: str) -> str:
        text = re.sub(r"[^a-zA-Z0-9_-]", "-", label)[:40].strip("-") or "job"
        return f"{text}-{os.getpid()}-{next(self._ids)}"

    def close(self) -> None:
        for closer in (self.time.close, self.jobs.close, self.telemetry.close, self.images.close, self.mqtt.close):
            with contextlib.suppress(Exception):
                closer()


# ---------------------------------------------------------------- evidence


def step(title: str):
    """An Allure step (a plain context when allure is not installed)."""
    try:
        import allure

        return allure.step(title)
    except Exception:
        return contextlib.nullcontext()


def attach(name: str, body: str | dict | list) -> None:
    text = body if isinstance(body, str) else json.dumps(body, indent=2, default=str)
    with contextlib.suppress(Exception):
        import allure

        allure.attach(text, name=name, attachment_type=allure.attachment_type.TEXT
                      if isinstance(body, str) else allure.attachment_type.JSON)


# ---------------------------------------------------------------- the update step


def _checked(title: str):
    """Run an outcome check as an Allure step named by `title` (formatted with the arguments)."""
    def deco(fn):
        def wrapper(self, *args, **kw):
            with step(f"{self.cart}: check {title.format(*args, **kw)}"):
                return fn(self, *args, **kw)
        wrapper.__name__, wrapper.__doc__ = fn.__name__, fn.__doc__
        return wrapper
    return deco


@dataclass
class UpdateOutcome:
    cart: str
    job_id: str
    target_version: str
    status: str
    details: dict
    outcome: str
    before: SlotStatus
    after: SlotStatus
    hashes_before: dict[str, str]
    hashes_after: dict[str, str]
    boots: list[str]                 # banner lines seen during the update, in order
    rollback_metric: float           # firmware_rollback_count for the target version, from this cart, during it
    events: dict[str, list[tuple[float, str]]] = field(default_factory=dict)  # console events (t_mono, line)
    images_after: dict[str, str | None] = field(default_factory=dict)  # slot -> sha256 of its stored image
    sent_sha256: str | None = None   # sha256 of the image the job sent
    timings: dict[str, float] = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    console: str = ""
    acknowledged: bool = False  # a test that meant to produce "succeeded-but-rolled-back" said so
    state_before: DeviceState | None = None  # security counter and time floor, where the family reports them
    state_after: DeviceState | None = None

    @property
    def hidden_rollback(self) -> bool:
        """Job SUCCEEDED while the cart rolled back, and no test said it expected that."""
        return self.outcome == "succeeded-but-rolled-back" and not self.acknowledged

    @property
    def statuses(self) -> list[str]:
        """The execution's statuses in order, repeats (progress reports) folded."""
        out: list[str] = []
        for h in self.history:
            if not out or out[-1] != h["new"]:
                out.append(h["new"])
        return out

    @property
    def reason(self) -> str:
        return self.details.get("reason", "")

    def describe(self) -> str:
        hist = " -> ".join(self.statuses) or "(no status change)"
        return (f"{self.cart}: job {self.job_id} to {self.target_version}: {self.outcome} (status {self.status}, "
                f"details {self.details})\n  statuses: {hist}\n  before: {self.before.brief()}\n"
                f"  after:  {self.after.brief()}\n" + self._state_brief()
                + f"  boots during the update: {self.boots or 'none'}\n"
                f"  {ROLLBACK_METRIC} +{self.rollback_metric:g}\n  console:\n"
                + "\n".join(f"    | {x}" for x in self.console.splitlines()[-25:]))

    def _state_brief(self) -> str:
        b, a = self.state_before, self.state_after
        if b is None:
            return ""
        return (f"  device state: counter {b.counter} -> {a.counter if a else '?'}, "
                f"floor {b.floor} -> {a.floor if a else '?'}\n")

    def _fail(self, what: str) -> None:
        raise OtaError(f"{what}\n{self.describe()}")

    def _unchanged(self, slots: str = "AB", why: str = "although the update did not go through") -> None:
        """`slots` byte for byte as they were, boot control as it was, and the bootloader's boot and rollback
        counts too: no reboot (not one banner while the run listened, which was until the state after had
        been read) and no rollback."""
        changed = [s for s in slots if self.hashes_after.get(s) != self.hashes_before.get(s)]
        if changed:
            self._fail(f"slot(s) {', '.join(changed)} changed {why}")
        b, a = self.before, self.after
        if (a.active, a.booted, a.pending, a.tries, a.confirmed) != (b.active, b.booted, b.pending, b.tries,
                                                                     b.confirmed):
            self._fail(f"boot control changed {why}")
        if self.boots or a.boots != b.boots:
            self._fail(f"the cart rebooted {why}: boot count {b.boots} -> {a.boots}, {len(self.boots)} banner(s)")
        if a.rollbacks != b.rollbacks:
            self._fail(f"the bootloader's rollback count went {b.rollbacks} -> {a.rollbacks} {why}")
        if self.rollback_metric:
            self._fail(f"{ROLLBACK_METRIC} rose although no firmware was tried")

    @_checked("confirmed: SUCCEEDED, the new slot active and confirmed and holding the image sent, one trial boot, "
              "no rollback")
    def expect_confirmed(self) -> UpdateOutcome:
        """SUCCEEDED, exactly the target version running from the other slot, active and confirmed, that
        slot holding byte for byte the image sent (its stored image's SHA-256), one trial boot and no other,
        no rollback counted."""
        if self.outcome == "succeeded-but-rolled-back":
            self._fail(f"job SUCCEEDED but {self.cart} rolled back from {self.target_version}: the release would "
                       f"have looked good in the jobs console while the fleet went back")
        if self.outcome != "confirmed":
            why = f" for {self.reason!r}" if self.reason else ""
            self._fail(f"expected the update to be confirmed, got {self.outcome}{why}")
        a, b = self.after, self.before
        new_slot = "B" if b.booted == "A" else "A"
        if (a.active, a.booted, a.pending, a.confirmed) != (new_slot, new_slot, None, True):
            self._fail(f"expected slot {new_slot} active, booted, confirmed, nothing pending")
        held_fw = a.slots.get(new_slot, {}).get("fw")
        if held_fw != self.target_version:
            self._fail(f"slot {new_slot} holds {held_fw}, not {self.target_version}")
        self._holds_the_image_sent(new_slot)
        if a.slots.get(b.booted, {}).get("fw") != b.slots.get(b.booted, {}).get("fw"):
            self._fail(f"the old slot {b.booted} changed: the previous firmware must stay as the way back")
        if self.hashes_after.get(b.booted) != self.hashes_before.get(b.booted):
            self._fail(f"the old slot {b.booted} was written")
        trial = _fields(self.boots[0]) if len(self.boots) == 1 else {}
        if (trial.get("mode"), trial.get("fw")) != ("trial", self.target_version) or a.boots != b.boots + 1:
            self._fail(f"expected exactly one boot, the trial of {self.target_version}: boot count {b.boots} -> "
                       f"{a.boots}, banners {self.boots}")
        if a.rollbacks != b.rollbacks:
            self._fail(f"the bootloader's rollback count went {b.rollbacks} -> {a.rollbacks} on a confirmed update")
        if self.rollback_metric:
            self._fail(f"{ROLLBACK_METRIC} rose on a confirmed update")
        return self

    def _holds_the_image_sent(self, slot: str) -> None:
        """The image `slot` holds (SHA-256 of header, payload and TLVs as stored) is the one the job sent: a
        version string proves nothing about the bytes."""
        held = self.images_after.get(slot)
        if self.sent_sha256 is None:
            self._fail(f"no image was sent: nothing to compare slot {slot} with")
        if held != self.sent_sha256:
            self._fail(f"slot {slot} holds an image whose hash differs from the one sent: sha256 "
                       f"{held[:16] + '…' if held else 'none (no readable image header)'} as stored, "
                       f"{self.sent_sha256[:16]}… sent")

    @_checked("rejected for {0!r}: nothing written (slots, boot control, device state), no reboot, no rollback "
              "counted")
    def expect_rejected(self, reason: str) -> UpdateOutcome:
        """REJECTED for exactly `reason` (a trailing '*' matches a prefix), nothing written — not even the
        time floor or the security counter: a rejected image decides nothing — no reboot."""
        self._ended_without_trying("rejected", reason)
        self._state_unchanged(why="although the update was rejected")
        return self

    @_checked("failed for {0!r}: nothing written, boot control unchanged, no reboot, no rollback counted")
    def expect_failed(self, reason: str) -> UpdateOutcome:
        """FAILED (not a rollback) for exactly `reason` ('*' as above), nothing written, no reboot."""
        return self._ended_without_trying("failed", reason)

    @_checked("failed for {0!r} writing the inactive slot: the running slot byte for byte unchanged, boot control "
              "unchanged, no reboot, no rollback counted")
    def expect_failed_writing(self, reason: str) -> UpdateOutcome:
        """FAILED for exactly `reason` ('*' as above) once the agent had begun on the inactive slot (a flash
        fault): that slot may be partly erased or written, but the running slot is byte for byte what it
        was, boot control is unchanged (nothing pending: nothing boots from the partial slot), the cart did
        not reboot and no rollback was counted."""
        self._ended_as("failed", reason)
        running = self.before.booted
        was, now = self.hashes_before.get(running, "?"), self.hashes_after.get(running, "?")
        if was != now:
            # evidence: the first line of the update in which the cart itself names the running slot
            named = next((x.strip() for x in self.console.splitlines() if re.search(rf"\bslot={running}\b", x)), None)
            self._fail(f"{self.cart}: the running slot {running} was written: its sha256 went {was[:16]}… -> "
                       f"{now[:16]}… although the update failed (only the inactive slot may change)"
                       + (f"; first line naming slot {running}: {named!r}" if named else ""))
        self._unchanged(slots=running)
        return self

    def _ended_without_trying(self, outcome: str, reason: str) -> UpdateOutcome:
        self._ended_as(outcome, reason)
        self._unchanged()
        return self

    def _ended_as(self, outcome: str, reason: str) -> None:
        if self.outcome != outcome:
            why = f" for {self.reason!r}" if self.reason else ""
            self._fail(f"expected the update to be {outcome} ({reason}), got {self.outcome}{why}")
        if not reason_matches(self.reason, reason):
            self._fail(f"{outcome} for {self.reason!r}, expected {reason!r}")

    @_checked("deferred for {0!r}: IN_PROGRESS (step deferred), nothing written, boot control and device state "
              "unchanged, no reboot")
    def expect_deferred(self, reason: str) -> UpdateOutcome:
        """The agent deferred the job for exactly `reason` ('*' as above; no usable time answer): still
        IN_PROGRESS with statusDetails step "deferred", its console line, nothing written, no reboot, and the
        device state (security counter, time floor) as it was: a job without a time it accepted decides nothing."""
        if self.outcome != "deferred":
            self._fail(f"expected the update to be deferred ({reason}), got {self.outcome}")
        if self.status != "IN_PROGRESS" or self.details.get("step") != "deferred":
            self._fail(f"deferred, but the execution is {self.status} {self.details}")
        if not reason_matches(self.reason, reason):
            self._fail(f"deferred for {self.reason!r}, expected {reason!r}")
        said = f"job={self.job_id}: {self.reason}"
        if not any(text.endswith(said) for _, text in self.events.get("ota_deferred", [])):
            self._fail(f"no console line saying the agent deferred {said!r}")
        self._unchanged()
        self._state_unchanged(why="although the job was deferred")
        return self

    def _state_unchanged(self, why: str) -> None:
        """The device state (security counter, time floor) as it was before the job, where the cart's
        firmware family reports it (`state_before` is None otherwise)."""
        b, a = self.state_before, self.state_after
        if b is not None and a != b:
            self._fail(f"the device state changed {why}: counter {b.counter} -> {a.counter if a else '?'}, "
                       f"time floor {b.floor} -> {a.floor if a else '?'}")

    @_checked("rolled back by the bootloader, previous version running, counted once for the target version")
    def expect_rolled_back(self, *, succeeded_first: bool = False) -> UpdateOutcome:
        """The trial was not confirmed, the bootloader went back to the previous slot, the cart runs
        its previous version, and the rollback was counted exactly once for the target version."""
        want = "succeeded-but-rolled-back" if succeeded_first else "rolled-back"
        if self.outcome != want:
            self._fail(f"expected {want}, got {self.outcome}")
        self.acknowledged = succeeded_first
        a, b = self.after, self.before
        if (a.active, a.booted, a.pending, a.confirmed) != (b.active, b.active, None, True):
            self._fail(f"expected the cart back on slot {b.active}, confirmed, nothing pending")
        if a.slots.get(b.active, {}).get("fw") != b.slots.get(b.active, {}).get("fw"):
            self._fail("the previous firmware is not what runs after the rollback")
        if self.hashes_after.get(b.active) != self.hashes_before.get(b.active):
            self._fail(f"the previous slot {b.active} was written")
        if self.rollback_metric != 1:
            self._fail(f"{ROLLBACK_METRIC} for {self.target_version} rose by {self.rollback_metric:g}, expected 1")
        if a.rollbacks != b.rollbacks + 1:
            self._fail(f"the bootloader's rollback count went {b.rollbacks} -> {a.rollbacks}, expected +1")
        if not self.events.get("rollback"):
            self._fail("no bootloader rollback line on the console")
        return self


def _deferred_or_ended(change: StatusChange) -> bool:
    return change.new in TERMINAL or (change.new == "IN_PROGRESS" and change.status_details.get("step") == "deferred")


def reason_matches(got: str, want: str) -> bool:
    """`got` is exactly `want`, or starts with it when `want` ends in '*'. The suites give exact reasons (a
    prefix like "malformed*" also passes a verifier crash); the '*' is for incident files (harness/repro.py)."""
    return got.startswith(want[:-1]) if want.endswith("*") else got == want


def device_state(cart: Cart) -> DeviceState | None:
    """The cart's security counter and time floor, where its firmware family reports them (its profile's
    `device_state` command); None where it does not."""
    return cart.device_state() if "device_state" in cart.profile.commands else None


def _fields(line: str) -> dict[str, str]:
    """The key=value words of a console line (a banner's slot, fw, mode)."""
    return dict(w.split("=", 1) for w in line.split() if "=" in w)


class UpdateRun:
    """One update in flight: the job is queued at construction; `wait()` gives the outcome (or
    `wait_deferred()`, when the agent is expected to put the job off for want of a usable time)."""

    WATCH = ("banner", "ready", "rollback", "crash", "watchdog", "confirmed", "self_test_failed", "ota_job_started",
             "ota_download_done", "ota_download_resumed", "ota_url_expired", "ota_verify_ok", "ota_write_done",
             "ota_armed", "ota_rejected", "ota_failed", "ota_trial_reported", "ota_connected", "ota_time_ok",
             "ota_time_rejected", "ota_deferred", "ota_trust_updated", "security_counter")
    # the device state (security counter, time floor) before the job and after it, where the cart's firmware
    # family reports it (`Cart.device_state`); None otherwise
    state_before: DeviceState | None = None
    state_after: DeviceState | None = None

    def __init__(self, fleet: Fleet, cart: Cart, image: bytes | None, *, target_version: str,
                 document: Mapping[str, Any] | None = None, url_ttl_s: float | None = None, label: str = "update"):
        self.fleet = fleet
        self.cart = cart
        self.target_version = target_version
        self.sent_sha256 = hashlib.sha256(image).hexdigest() if image is not None else None
        self.result: UpdateOutcome | None = None  # how it ended, once `wait` (or `wait_deferred`) has said
        self.on_result: Callable[[UpdateOutcome], None] | None = None  # told how it ended (CartOta records it)
        cart.ensure_usable()
        fleet.serve(cart.id)
        self.job_id = fleet.new_job_id(f"{label}-{cart.id}")
        with step(f"{cart.id}: state before the job"):
            self._capture_before()
        self.tele_mark = fleet.telemetry.mark()
        self.console_start = cart.console.mark()
        self._seen: dict[str, list[tuple[int, float, str]]] = {}  # key -> (line index, t_mono, text)
        self._mqtt_down_since: float | None = None
        self._cond = threading.Condition()
        self._listeners = []
        profile = cart.profile.patterns
        for key in self.WATCH:
            if key in profile:
                self._listeners.append(cart.console.add_listener(profile[key], self._on_line(key)))
        doc = self._template()
        if image is not None:
            fleet.images.add(self.job_id, image)
            doc |= {"image_id": self.job_id, "sha256": self.sent_sha256, "size": len(image)}
        for k, v in (document or {}).items():
            if v is DELETE:
                doc.pop(k, None)
            else:
                doc[k] = v
        if "url" in doc:
            doc.pop("image_id", None)
        self.document = doc
        with step(f"{cart.id}: job {self.job_id} queued ({doc.get('operation')}, target {target_version})"):
            attach("job document (template)", doc)
            self.t_created = time.monotonic()
            fleet.jobs.create_job(self.job_id, [cart.id], doc, url_ttl_s=url_ttl_s)

    def _capture_before(self) -> None:
        self.before = self.cart.slot_status()
        self.hashes_before = self.cart.slot_hashes()
        self.state_before = device_state(self.cart)
        attach("slot status before", self.before.brief())

    def _template(self) -> dict[str, Any]:
        """The job document before the image fields and the test's overrides."""
        return {"operation": "ota", "target_version": self.target_version}

    def _on_line(self, key: str) -> Callable[[Line, re.Match], None]:
        def cb(line: Line, _m: re.Match) -> None:
            with self._cond:
                self._seen.setdefault(key, []).append((line.index, line.t_mono, line.text))
                self._cond.notify_all()
            if key in ("crash", "ota_job_started", "rollback"):  # a cause may have appeared: ask now
                self.fleet.jobs.wake()
        return cb

    def cause(self) -> str | None:
        """Why this run can no longer end well, as a field engineer would name it, or None: a crash loop
        (the cart crashed CRASH_LOOP times, in trial or after mark-good), a retry storm (the job handed back
        and started again after each rollback), the broker gone, the cart silent. Asked by every wait of
        the run, so a defective build fails at once with its cause on the first line instead of timing out."""
        with self._cond:
            seen = {k: list(v) for k, v in self._seen.items()}
        cid = self.cart.id
        crashes = seen.get("crash", [])
        if len(crashes) >= CRASH_LOOP:
            booted = sorted({m.group(1) for _, _, t in seen.get("banner", []) if (m := re.search(r"fw=(\S+)", t))})
            why = re.sub(r"^.*?crashed: ", "", crashes[-1][2])
            return (f"{cid}: crash loop: crashed {len(crashes)} times in {crashes[-1][1] - crashes[0][1]:.1f} s "
                    f"(booting fw {', '.join(booted) or '?'}; last: {why})")
        started = [t for _, t, text in seen.get("ota_job_started", []) if self.job_id in text]
        rollbacks = [t for _, t, _ in seen.get("rollback", [])]
        again = [t for t in started if rollbacks and t > rollbacks[0]]  # a power cut may restart a job once
        if len(rollbacks) >= RETRY_STORM - 1 and len(again) >= RETRY_STORM - 1:
            span = started[-1] - started[0]
            return (f"{cid}: retry storm: job {self.job_id} started {len(started)} times in {span:.1f} s "
                    f"({len(started) / max(span, 1e-3) * 60:.0f}/min), rolled back {len(rollbacks)} times: the job "
                    "is handed back after every rollback")
        now = time.monotonic()
        if not self.fleet.mqtt.is_connected():
            self._mqtt_down_since = self._mqtt_down_since or now
            if now - self._mqtt_down_since >= BROKER_GONE_S:
                b = self.fleet.rig.spec.broker
                return (f"{cid}: broker gone: the harness has had no connection to {b.host}:{b.port} for "
                        f"{now - self._mqtt_down_since:.0f} s")
        else:
            self._mqtt_down_since = None
        last = self.cart.console.last_line()
        quiet = now - max(last.t_mono if last else 0.0, self.t_created)
        if quiet >= CART_SILENT_S:
            return (f"{cid}: cart silent: no console line for {quiet:.0f} s"
                    + (f" (last: {last.text[:120]!r})" if last else ""))
        return None

    def _raise_if_cause(self) -> None:
        cause = self.cause()
        if cause:
            raise OtaError(f"{cause} (job {self.job_id})\n{self.cart.console.tail()}")

    @property
    def events(self) -> dict[str, list[tuple[float, str]]]:
        """Console events of this run so far: profile pattern key -> [(t_mono, line)]."""
        with self._cond:
            return {k: [(t, text) for _, t, text in v] for k, v in self._seen.items()}

    def wait_event(self, key: str, timeout: float, *, after: float = 0.0, after_line: int = -1,
                   what: str | None = None) -> tuple[float, str]:
        """Wait for a console event of this run (a profile pattern key) received later than `after`
        (monotonic time) and on a later console line than `after_line`."""
        return self._wait(key, timeout, after, after_line, what)[1:]

    def _wait(self, key: str, timeout: float, after: float, after_line: int, what: str | None):
        def find():
            return next(((i, t, text) for i, t, text in self._seen.get(key, ()) if t > after and i > after_line),
                        None)
        return self._await(find, timeout, lambda: f"{self.cart.id}: no {what or key!r} line within {timeout:.1f} s "
                                                  f"(job {self.job_id})")

    def _first_of(self, keys: tuple[str, ...], timeout: float, after: float) -> tuple[str, float, str]:
        def find():
            hits = [(i, t, k, text) for k in keys for i, t, text in self._seen.get(k, ()) if t > after]
            return min(hits)[1:] if hits else None
        found = self._await(find, timeout, lambda: f"{self.cart.id}: none of {keys} within {timeout:.1f} s after "
                                                   f"the job {self.job_id} ended")
        t, k, text = found
        return k, t, text

    def _await(self, find: Callable[[], Any], timeout: float, timed_out: Callable[[], str]) -> Any:
        """What `find()` (called under the run's lock) returns once it is not None; between console
        events, and at least every CAUSE_RECHECK_S, the run's `cause()` ends the wait at once."""
        deadline = time.monotonic() + timeout
        while True:
            with self._cond:
                found = find()
                if found is None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise OtaError(f"{timed_out()}\n{self.cart.console.tail()}")
                    self._cond.wait(min(left, CAUSE_RECHECK_S))
                    found = find()
            if found is not None:
                return found
            self._raise_if_cause()

    @property
    def budget(self) -> float:
        """Job queued to outcome: the time challenge, download, write, two boots and the mark-good window,
        with headroom."""
        cfg = self.cart.config
        return 30.0 + TIME_CHALLENGE_S + 3 * self.cart.boot_timeout + 2 * cfg.boot.mark_good_window_s

    def wait(self, timeout: float | None = None) -> UpdateOutcome:
        cart, fleet = self.cart, self.fleet
        timeout = self.budget if timeout is None else timeout
        deadline = time.monotonic() + timeout
        left = lambda: max(0.5, deadline - time.monotonic())  # noqa: E731
        try:
            with step(f"{cart.id}: wait for the job to end"):
                try:
                    ex = fleet.jobs.wait_status(self.job_id, cart.id, TERMINAL, timeout, abort=self.cause,
                                                recheck_s=CAUSE_RECHECK_S)
                except Exception as exc:
                    raise OtaError(f"{exc}\nconsole of {cart.id}:\n{cart.console.tail()}") from None
                status = ex["status"]
                details = dict(ex.get("statusDetails") or {})
                t_end = time.monotonic()
                attach("job execution", ex)
            outcome = self._settle(status, details, left)
            if self.events.get("banner"):
                # the cart rebooted during the update: it must be at its shell again before we ask it anything
                self._wait("ready", left(), 0.0, self._last_line("banner"), "firmware ready after the last boot")
            after, hashes_after = self._state_after()
        finally:
            self.close()
        return self._outcome(status, details, outcome, after, hashes_after, t_end)

    def wait_deferred(self, timeout: float | None = None) -> UpdateOutcome:
        """Wait for the agent to defer the job instead of ending it (no usable time answer): the execution
        IN_PROGRESS with statusDetails step "deferred" (the jobs history), then its console line. Outcome
        "deferred" (or how the job ended, if it did). The execution stays IN_PROGRESS, as the agent left
        it, so a test can watch what the cart does next (it retries after its back-off): `close()` then
        cancels it, as after every run."""
        cart, fleet = self.cart, self.fleet
        timeout = DEFER_BUDGET_S if timeout is None else timeout
        keep_open = False
        try:
            with step(f"{cart.id}: wait for the job to be deferred"):
                change = fleet.wait_job_change(self.job_id, cart.id, _deferred_or_ended, timeout)
                if change is None:
                    hist = " -> ".join(c.new for c in fleet.jobs.history(self.job_id, cart.id))
                    raise OtaError(f"{cart.id}: job {self.job_id} neither deferred nor ended within {timeout:.1f} s "
                                   f"(statuses {hist})\n{cart.console.tail()}")
                status, details, t_end = change.new, dict(change.status_details), time.monotonic()
                attach("job status change", change.as_dict())
            if status in TERMINAL:
                outcome = self._settle(status, details, lambda: max(0.5, self.budget - (time.monotonic() - t_end)))
            else:
                outcome = "deferred"
                with contextlib.suppress(OtaError):  # expect_deferred names it if it never comes
                    self._wait("ota_deferred", CONSOLE_LAG_S, 0.0, -1, "the agent's deferral line")
            after, hashes_after = self._state_after()
            keep_open = outcome == "deferred"
        finally:
            if not keep_open:
                self.close()
        return self._outcome(status, details, outcome, after, hashes_after, t_end)

    def _settle(self, status: str, details: dict, left: Callable[[], float]) -> str:
        """The outcome of an ended job, once what follows its status has been seen: after SUCCEEDED the
        mark-good (or a rollback), after a rollback the old firmware's report of it."""
        cart, fleet = self.cart, self.fleet
        outcome = _ENDED.get(status, "failed")
        if status == "SUCCEEDED":
            with step(f"{cart.id}: job SUCCEEDED: wait for mark-good or rollback"):
                kind, _, _ = self._first_of(("confirmed", "rollback"), left(), after=self.t_created)
            outcome = "confirmed" if kind == "confirmed" else "succeeded-but-rolled-back"
        elif status == "FAILED" and details.get("reason") == "rolled back":
            outcome = "rolled-back"
        if outcome in ("rolled-back", "succeeded-but-rolled-back"):
            with step(f"{cart.id}: rollback: wait for the old firmware to report it"):
                i_rb, _, _ = self._wait("rollback", left(), 0.0, -1, "the bootloader's rollback line")
                _, t_boot, _ = self._wait("banner", left(), 0.0, i_rb, "the boot after the rollback")
                # the agent's "online" event of that boot comes after anything else the boot publishes
                fleet.telemetry.wait_metric(ONLINE_METRIC, thing=cart.id, since=self.tele_mark,
                                            predicate=lambda e: e.t > t_boot, timeout=left())
        return outcome

    def _state_after(self) -> tuple[SlotStatus, dict[str, str]]:
        """Boot control and both hashes of each slot (also kept: `images_after`), read while the run's console
        listeners are still registered: a reboot up to the moment they are read is seen."""
        from harness.cart import CartError
        from harness.console import ConsoleError

        with step(f"{self.cart.id}: state after the job"):
            try:
                after = self.cart.slot_status()
                digests = self.cart.slot_digests()
                self.state_after = device_state(self.cart)
            except (CartError, ConsoleError) as exc:
                self._raise_if_cause()  # a crash loop, a silent cart: that is the news, not the unanswered query
                raise OtaError(f"{self.cart.id}: cannot read its state after the job {self.job_id}: "
                               f"{(str(exc).splitlines() or [''])[0]}\n{self.cart.console.tail()}") from None
            attach("slot status after", after.brief())
        self.images_after = {slot: d.image for slot, d in digests.items()}
        return after, {slot: d.region for slot, d in digests.items()}

    def _rollback_metric(self) -> float:
        return self.fleet.telemetry.rollback_count(self.target_version, self.cart.id, since=self.tele_mark)

    def _outcome(self, status: str, details: dict, outcome: str, after: SlotStatus, hashes_after: dict[str, str],
                 t_end: float, cls: type[UpdateOutcome] | None = None, **extra) -> UpdateOutcome:
        cart, fleet = self.cart, self.fleet
        metric = self._rollback_metric()
        history = [c.as_dict() for c in fleet.jobs.history(self.job_id, cart.id)]
        result = (cls or UpdateOutcome)(
            cart=cart.id, job_id=self.job_id, target_version=self.target_version, status=status, details=details,
            outcome=outcome, before=self.before, after=after, hashes_before=self.hashes_before,
            hashes_after=hashes_after, boots=[text for _, text in self.events.get("banner", [])],
            rollback_metric=metric, events=self.events, timings=self._timings(t_end), history=history,
            console=cart.console.slice_text(self.console_start), images_after=self.images_after,
            sent_sha256=self.sent_sha256, state_before=self.state_before, state_after=self.state_after, **extra)
        self.result = result
        if self.on_result is not None:
            self.on_result(result)
        attach(f"{self.document.get('operation')} outcome",
               {"outcome": outcome, "status": status, "details": details, "timings_s": result.timings,
                "rollback_metric": metric, "history": history,
                "image_requests": [r.as_dict() for r in fleet.images.requests(self.job_id)]})
        return result

    def _last_line(self, key: str) -> int:
        with self._cond:
            ev = self._seen.get(key)
            return ev[-1][0] if ev else -1

    def _first(self, key: str) -> float | None:
        with self._cond:
            ev = self._seen.get(key)
            return ev[0][1] if ev else None

    def _timings(self, t_end: float) -> dict[str, float]:
        """Phases from console timestamps: queued→started, download, verify, write, trial boot, confirm."""
        t = {k: self._first(k) for k in ("ota_job_started", "ota_time_ok", "ota_download_done", "ota_verify_ok",
                                         "ota_write_done", "ota_armed", "banner", "ota_trial_reported", "confirmed")}
        out: dict[str, float] = {}

        def span(name: str, a: float | None, b: float | None) -> None:
            if a is not None and b is not None and b >= a:
                out[name] = round(b - a, 4)

        span("pickup", self.t_created, t["ota_job_started"])
        span("time", t["ota_job_started"], t["ota_time_ok"])
        span("download", t["ota_time_ok"] or t["ota_job_started"], t["ota_download_done"])
        span("verify", t["ota_download_done"], t["ota_verify_ok"])
        span("write", t["ota_verify_ok"], t["ota_write_done"])
        span("trial_boot", t["ota_armed"], t["ota_trial_reported"])
        span("confirm", t["ota_trial_reported"], t["confirmed"])
        span("total", self.t_created, t["confirmed"] or t_end)
        return out

    def close(self) -> None:
        """For a run whose `wait` is not called (a power-cut sweep watches the cart itself): remove the
        console listeners and end the execution if it is still pending. Idempotent."""
        for h in self._listeners:
            self.cart.console.remove_listener(h)
        self._listeners = []
        self._cleanup()

    def _cleanup(self) -> None:
        """Never leave an execution pending: it would queue the next test's job behind it."""
        with contextlib.suppress(Exception):
            ex = self.fleet.jobs.execution(self.job_id, self.cart.id)
            if ex.get("status") not in TERMINAL:
                self.fleet.jobs.cancel(self.job_id, force=True)


# ---------------------------------------------------------------- a CA update (trust bundle) as its own job


@dataclass
class TrustOutcome(UpdateOutcome):
    """How a CA-update job ended, with the cart's trust store before and after (name -> (fp, until))."""

    trust_before: dict[str, tuple[str, int | None]] = field(default_factory=dict)
    trust_after: dict[str, tuple[str, int | None]] = field(default_factory=dict)
    t_end_server: int = 0  # the cart's server time once the job had ended (what `until` is measured against)

    def describe(self) -> str:
        def names(store: dict) -> str:
            return ", ".join(f"{n}" + (f" until={u}" if u is not None else "") for n, (_, u) in sorted(store.items()))
        return (super().describe().replace(f" to {self.target_version}:", ":", 1)
                + f"\n  trust store before: {names(self.trust_before) or '(empty)'}"
                + f"\n  trust store after:  {names(self.trust_after) or '(empty)'}")

    @_checked("CA update applied: SUCCEEDED, the trust store holds exactly {0}, no reboot, slots unchanged")
    def expect_applied(self, cas: list[str]) -> TrustOutcome:
        """SUCCEEDED, `trust list` shows exactly the roots `cas` (the added ones and those kept through
        their overlap), the job and the console say the same, no reboot, slots and boot control unchanged."""
        want = sorted(cas)
        if self.outcome != "applied":
            self._fail(f"expected the CA update to be applied, got {self.outcome} ({self.reason or self.details})")
        found = sorted(self.trust_after)
        if found != want:
            self._fail(f"{self.cart}: the trust store holds {found}, expected {want}")
        reported = sorted(x for x in str(self.details.get("cas", "")).split(",") if x)
        if reported != want:
            self._fail(f"{self.cart}: the job reported cas {reported}, expected {want}")
        lines = [text for _, text in self.events.get("ota_trust_updated", [])]
        if not any(sorted(x.rsplit("cas=", 1)[-1].split(",")) == want for x in lines):
            self._fail(f"{self.cart}: no console line saying the trust store was updated to {want} (saw {lines})")
        self._unchanged(why="by a CA update")
        return self

    @_checked("CA update rejected for {0!r}: trust store, slots and device state unchanged, no reboot")
    def expect_rejected(self, reason: str) -> TrustOutcome:
        """REJECTED for exactly `reason` ('*' matches a prefix), the trust store entry for entry as it was
        (names, certificates, ends of overlap), slots and boot control unchanged, no reboot."""
        self._ended_as("rejected", reason)
        if self.trust_after != self.trust_before:
            self._fail(f"{self.cart}: the trust store changed although the CA update was rejected")
        self._unchanged(why="although the CA update was rejected")
        self._state_unchanged(why="although the CA update was rejected")
        return self


class TrustRun(UpdateRun):
    """One CA update in flight: the bundle goes through the image host, the job document is
    {"operation": "trust", "url", "sha256", "size"}; `wait()` gives a TrustOutcome."""

    def __init__(self, fleet: Fleet, cart: Cart, bundle: bytes, *, document: Mapping[str, Any] | None = None,
                 url_ttl_s: float | None = None, label: str = "trust"):
        super().__init__(fleet, cart, bundle, target_version="trust bundle", document=document, url_ttl_s=url_ttl_s,
                         label=label)

    def _capture_before(self) -> None:
        super()._capture_before()
        self.trust_before = self.cart.trust_entries()
        attach("trust store before", {n: {"fp": fp, "until": u} for n, (fp, u) in self.trust_before.items()})

    def _template(self) -> dict[str, Any]:
        return {"operation": "trust"}

    @property
    def budget(self) -> float:
        """Job queued to outcome: pickup, download of a small file, the time challenge, one flash write."""
        return 30.0 + TIME_CHALLENGE_S

    def _settle(self, status: str, details: dict, left: Callable[[], float]) -> str:
        if status != "SUCCEEDED":
            return _ENDED.get(status, "failed")
        with contextlib.suppress(OtaError):  # expect_applied names it if it never comes
            self._wait("ota_trust_updated", min(CONSOLE_LAG_S, left()), 0.0, -1, "the agent's trust-updated line")
        return "applied"

    def _rollback_metric(self) -> float:
        """Any rollback at all during a CA update (there is no target version to count it for)."""
        return self.fleet.telemetry.rollback_count(None, self.cart.id, since=self.tele_mark)

    def _state_after(self) -> tuple[SlotStatus, dict[str, str]]:
        after = super()._state_after()
        self.trust_after = self.cart.trust_entries()
        attach("trust store after", {n: {"fp": fp, "until": u} for n, (fp, u) in self.trust_after.items()})
        return after

    def _outcome(self, status, details, outcome, after, hashes_after, t_end, cls=None, **extra) -> TrustOutcome:
        return super()._outcome(status, details, outcome, after, hashes_after, t_end, cls=TrustOutcome,
                                trust_before=self.trust_before, trust_after=self.trust_after,
                                t_end_server=self.fleet.server_time(self.cart.id), **extra)


# ---------------------------------------------------------------- one cart's OTA steps in a test


class CartOta:
    """The OTA steps of a test on one cart (the `ota` fixture): images for it, updates of it, CA updates."""

    def __init__(self, cart: Cart, fleet: Fleet, builds: FirmwareBuilds, signer: Signer, hardware: list[str]):
        self.cart = cart
        self.fleet = fleet
        self.builds = builds
        self.signer = signer
        self.hardware = hardware  # what a release is signed for: every hardware revision of the rig
        self.runs: list[UpdateRun] = []
        self.on_outcome: Callable[[UpdateOutcome, bytes | None], None] | None = None  # the plugin records it
        if fleet is not None:  # the cart's job requests and time challenges are answered from now on
            fleet.serve(cart.id)

    @property
    def ca(self) -> str:
        """The root the cart was provisioned with first: what a release for it requires."""
        return self.cart.config.provisioned_cas[0]

    def server_time(self) -> int:
        """The time the time service signs for this cart now: what it judges validity at."""
        return self.fleet.server_time(self.cart.id)

    def unsigned(self, version: str, faults: Mapping[str, Any] | None = None) -> bytes:
        with step(f"build firmware {version}" + (f" with faults {dict(faults)}" if faults else "")):
            return self.builds.build(version, faults)

    def image(self, version: str, *, faults: Mapping[str, Any] | None = None, **sign) -> bytes:
        """A signed release image of `version` (a fault build with `faults`); `sign` as Signer.sign, its
        validity by default around the cart's server time."""
        return self.sign(self.unsigned(version, faults), **sign)

    def sign(self, unsigned: bytes, **sign) -> bytes:
        """`unsigned` (a build) signed as a release for this cart: for every hardware revision of the rig,
        under the root the cart was provisioned with, valid around its server time (`sign` overrides,
        as Signer.sign)."""
        sign.setdefault("hardware", self.hardware)
        sign.setdefault("ca", self.ca)
        sign.setdefault("now", self.server_time())
        version = sign.get("version") or himage.parse_image(unsigned).version
        with step(f"sign {version} (ca {sign['ca']}" + (f", tamper {sign['tamper']}" if sign.get("tamper") else "")
                  + ")"):
            return self.signer.sign(unsigned, **sign)

    def trust_bundle(self, add_roots: list[str], *, required_ca: str | None = None, overlap_s: int = TRUST_OVERLAP_S,
                     add_leaf: bool = False, tamper: str | None = None, **sign) -> bytes:
        """A CA update adding the lab roots `add_roots`, signed under `required_ca` (default: the root the
        cart was provisioned with) by `<required_ca>-signer`, valid around the cart's server time; `sign`
        as Signer.trust_bundle (signer, leaf, issued, expires, now). Defects on purpose: `add_leaf` (each
        added "root" is a code-signing leaf certificate: not a CA), `tamper` (one of BUNDLE_TAMPERS)."""
        required_ca = required_ca or self.ca
        sign.setdefault("now", self.server_time())
        pki = self.signer.pki
        leaf_pem = pki.cert(hpki.signer_of(required_ca)).public_bytes(serialization.Encoding.PEM).decode("ascii")
        add = {name: leaf_pem if add_leaf else pki.root_pem(name) for name in add_roots}
        with step(f"CA update adding {', '.join(add_roots)} under {required_ca}"
                  + (" (leaf certificates)" if add_leaf else "") + (f", tamper {tamper}" if tamper else "")):
            bundle = self.signer.trust_bundle(add, required_ca=required_ca, overlap_s=overlap_s, **sign)
            return tamper_bundle(bundle, tamper) if tamper else bundle

    def start(self, image: bytes | None, *, target_version: str | None = None, **kw) -> UpdateRun:
        if target_version is None:
            target_version = _image_version(image)
        run = UpdateRun(self.fleet, self.cart, image, target_version=target_version, **kw)
        if self.on_outcome is not None:
            on_outcome = self.on_outcome
            run.on_result = lambda out: on_outcome(out, image)
        self.runs.append(run)
        return run

    def update(self, image: bytes | None, *, target_version: str | None = None, timeout: float | None = None,
               **kw) -> UpdateOutcome:
        return self.start(image, target_version=target_version, **kw).wait(timeout)

    def start_trust(self, bundle: bytes, **kw) -> TrustRun:
        """Queue a CA update (`kw` as TrustRun: document overrides, url_ttl_s)."""
        run = TrustRun(self.fleet, self.cart, bundle, **kw)
        self.runs.append(run)
        return run

    def deliver_trust(self, bundle: bytes, *, timeout: float | None = None, **kw) -> TrustOutcome:
        """Send the cart a CA update as its own job and wait for how it ended."""
        return self.start_trust(bundle, **kw).wait(timeout)

    def close(self) -> None:
        """End every run of this test that is still open (a deferred job left IN_PROGRESS, a run whose
        `wait` was never called): its execution canceled, its console listeners removed. Idempotent."""
        for run in self.runs:
            run.close()

    def hidden_rollbacks(self) -> list[UpdateOutcome]:
        """Updates of this test whose job SUCCEEDED while the cart rolled back, unless the test said it
        expected that (`expect_rolled_back(succeeded_first=True)`): the `ota` fixture fails the test."""
        return [r.result for r in self.runs if r.result is not None and r.result.hidden_rollback]


def _image_version(image: bytes | None) -> str:
    try:
        return himage.parse_image(image).version or "unknown"
    except Exception:
        return "unknown"
