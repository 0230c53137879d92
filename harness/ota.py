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

A cart is reached only through its console (the profile's lines and commands), MQTT on the
rig's broker and HTTP from the image host: the same steps run on a physical rig.

Outcomes (`UpdateOutcome.outcome`):
  confirmed                 job SUCCEEDED and the cart marked the new slot good
  rejected                  job REJECTED by the device (reason in statusDetails), nothing written
  failed                    job FAILED for another reason than a rollback
  rolled-back               the trial was not confirmed; the bootloader went back; job FAILED "rolled back"
  succeeded-but-rolled-back job SUCCEEDED, yet the cart rolled back: the case the jobs protocol
                            cannot express, seen through the console and firmware_rollback_count
  timed-out / canceled      the service ended the execution
"""

from __future__ import annotations

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

from harness import image as himage
from harness import pki as hpki
from harness.fleet import ImageHost, JobsService, MqttClient, Telemetry
from harness.fleet.telemetry import ROLLBACK_METRIC

if TYPE_CHECKING:
    from harness.cart import Cart, SlotStatus
    from harness.config import Rig
    from harness.console import Line

TERMINAL = ("SUCCEEDED", "FAILED", "REJECTED", "TIMED_OUT", "CANCELED", "REMOVED")
ONLINE_METRIC = "agent_online"
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
    """The lab's release signing: an unsigned image in, a signed one out (harness.image)."""

    def __init__(self, lab_pki: hpki.LabPki):
        self.pki = lab_pki

    def sign(self, unsigned: bytes, *, hardware: list[str], ca: str = hpki.ROOT_OLD, signer: str | None = None,
             version: str | None = None, tamper: str | None = None, issued: int | None = None,
             expires: int | None = None, security_counter: int = 0,
             payload_edit: Callable[[bytes], bytes] | None = None) -> bytes:
        """`ca`: the root the manifest requires; `signer`: the code-signing leaf (default: the one
        under `ca`); `payload_edit` changes the payload before signing."""
        parsed = himage.parse_image(unsigned)
        signer = signer or hpki.signer_of(ca)
        now = int(time.time())
        payload = payload_edit(parsed.payload) if payload_edit else parsed.payload
        return himage.build_signed_image(
            payload, version=version or parsed.version, hardware=hardware, required_ca=ca,
            issued=now - 3600 if issued is None else issued, expires=now + 30 * 86400 if expires is None else expires,
            security_counter=security_counter, signer_key=self.pki.key(signer), chain=self.pki.chain(signer),
            tamper=tamper, build_info=parsed.build_info)


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
    for the carts this process drives, the image host, the telemetry collector."""

    def __init__(self, rig: Rig, log_dir: Path, *, worker: int = 0):
        log_dir.mkdir(parents=True, exist_ok=True)
        self.rig = rig
        self.mqtt = self._client(f"cart-hil-fleet-{os.getpid()}")
        self.mqtt.connect()
        ih = rig.spec.image_host
        try:
            self.images = ImageHost(ih.bind, ih.port + worker if ih.port else 0, url_host=ih.url_host,
                                    allow_short_ttl_for_tests=True, log_path=log_dir / f"imagehost-{os.getpid()}.log")
            self.jobs = JobsService(self.mqtt, self.images, things=())
            self.telemetry = Telemetry(self.mqtt)
        except BaseException:
            self.mqtt.close()
            raise
        self.jobs.add_listener(self.telemetry.record_job_status)
        self._ids = itertools.count(1)

    def serve(self, thing: str) -> None:
        self.jobs.serve(thing)

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
        for closer in (self.jobs.close, self.telemetry.close, self.images.close, self.mqtt.close):
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
    timings: dict[str, float] = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    console: str = ""
    acknowledged: bool = False  # a test that meant to produce "succeeded-but-rolled-back" said so

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
                f"  after:  {self.after.brief()}\n  boots during the update: {self.boots or 'none'}\n"
                f"  {ROLLBACK_METRIC} +{self.rollback_metric:g}\n  console:\n"
                + "\n".join(f"    | {x}" for x in self.console.splitlines()[-25:]))

    def _fail(self, what: str) -> None:
        raise OtaError(f"{what}\n{self.describe()}")

    def _unchanged(self, slots: str = "AB") -> None:
        changed = [s for s in slots if self.hashes_after.get(s) != self.hashes_before.get(s)]
        if changed:
            self._fail(f"slot(s) {', '.join(changed)} changed although the update did not go through")
        b, a = self.before, self.after
        if (a.active, a.booted, a.pending, a.tries, a.confirmed) != (b.active, b.booted, b.pending, b.tries,
                                                                     b.confirmed):
            self._fail("boot control changed although the update did not go through")
        if self.boots or (a.boots is not None and b.boots is not None and a.boots != b.boots):
            self._fail("the cart rebooted although the update did not go through")
        if self.rollback_metric:
            self._fail(f"{ROLLBACK_METRIC} rose although nothing was tried")

    @_checked("confirmed: SUCCEEDED, the new slot active and confirmed, one trial boot, no rollback")
    def expect_confirmed(self) -> UpdateOutcome:
        """SUCCEEDED, the new version running from the other slot, active and confirmed, one trial
        boot and no other, no rollback counted."""
        if self.outcome == "succeeded-but-rolled-back":
            self._fail(f"job SUCCEEDED but {self.cart} rolled back from {self.target_version}: the release would "
                       f"have looked good in the jobs console while the fleet went back")
        if self.outcome != "confirmed":
            self._fail(f"expected the update to be confirmed, got {self.outcome}")
        a, b = self.after, self.before
        new_slot = "B" if b.booted == "A" else "A"
        if (a.active, a.booted, a.pending, a.confirmed) != (new_slot, new_slot, None, True):
            self._fail(f"expected slot {new_slot} active, booted, confirmed, nothing pending")
        if a.slots.get(new_slot, {}).get("fw") != self.target_version:
            self._fail(f"slot {new_slot} does not hold {self.target_version}")
        if a.slots.get(b.booted, {}).get("fw") != b.slots.get(b.booted, {}).get("fw"):
            self._fail(f"the old slot {b.booted} changed: the previous firmware must stay as the way back")
        if self.hashes_after.get(b.booted) != self.hashes_before.get(b.booted):
            self._fail(f"the old slot {b.booted} was written")
        trial = self.boots[0] if len(self.boots) == 1 else ""
        if "mode=trial" not in trial or f"fw={self.target_version}" not in trial:
            self._fail(f"expected exactly one boot, the trial of {self.target_version}")
        if self.rollback_metric:
            self._fail(f"{ROLLBACK_METRIC} rose on a confirmed update")
        return self

    @_checked("rejected for {0!r}: nothing written, boot control unchanged, no reboot, no rollback counted")
    def expect_rejected(self, reason: str) -> UpdateOutcome:
        """REJECTED for exactly `reason` (a trailing '*' matches a prefix), nothing written, no reboot."""
        return self._ended_without_trying("rejected", reason)

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
            self._fail(f"expected the update to be {outcome} ({reason}), got {self.outcome}")
        ok = self.reason.startswith(reason[:-1]) if reason.endswith("*") else self.reason == reason
        if not ok:
            self._fail(f"{outcome} for {self.reason!r}, expected {reason!r}")

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
        if a.rollbacks is not None and b.rollbacks is not None and a.rollbacks != b.rollbacks + 1:
            self._fail(f"the bootloader's rollback count went {b.rollbacks} -> {a.rollbacks}, expected +1")
        if not self.events.get("rollback"):
            self._fail("no bootloader rollback line on the console")
        return self


class UpdateRun:
    """One update in flight: the job is queued at construction; `wait()` gives the outcome."""

    WATCH = ("banner", "ready", "rollback", "crash", "watchdog", "confirmed", "self_test_failed", "ota_job_started",
             "ota_download_done", "ota_download_resumed", "ota_url_expired", "ota_verify_ok", "ota_write_done",
             "ota_armed", "ota_rejected", "ota_failed", "ota_trial_reported", "ota_connected")

    def __init__(self, fleet: Fleet, cart: Cart, image: bytes | None, *, target_version: str,
                 document: Mapping[str, Any] | None = None, url_ttl_s: float | None = None, label: str = "update"):
        self.fleet = fleet
        self.cart = cart
        self.target_version = target_version
        cart.ensure_usable()
        fleet.serve(cart.id)
        self.job_id = fleet.new_job_id(f"{label}-{cart.id}")
        with step(f"{cart.id}: state before the update"):
            self.before = cart.slot_status()
            self.hashes_before = cart.slot_hashes()
            attach("slot status before", self.before.brief())
        self.tele_mark = fleet.telemetry.mark()
        self.console_start = cart.console.mark()
        self._seen: dict[str, list[tuple[int, float, str]]] = {}  # key -> (line index, t_mono, text)
        self._cond = threading.Condition()
        self._listeners = []
        profile = cart.profile.patterns
        for key in self.WATCH:
            if key in profile:
                self._listeners.append(cart.console.add_listener(profile[key], self._on_line(key)))
        doc: dict[str, Any] = {"operation": "ota", "target_version": target_version}
        if image is not None:
            fleet.images.add(self.job_id, image)
            doc |= {"image_id": self.job_id, "sha256": hashlib.sha256(image).hexdigest(), "size": len(image)}
        for k, v in (document or {}).items():
            if v is DELETE:
                doc.pop(k, None)
            else:
                doc[k] = v
        if "url" in doc:
            doc.pop("image_id", None)
        self.document = doc
        with step(f"{cart.id}: job {self.job_id} queued (target {target_version})"):
            attach("job document (template)", doc)
            self.t_created = time.monotonic()
            fleet.jobs.create_job(self.job_id, [cart.id], doc, url_ttl_s=url_ttl_s)

    def _on_line(self, key: str) -> Callable[[Line, re.Match], None]:
        def cb(line: Line, _m: re.Match) -> None:
            with self._cond:
                self._seen.setdefault(key, []).append((line.index, line.t_mono, line.text))
                self._cond.notify_all()
        return cb

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
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for i, t, text in self._seen.get(key, ()):
                    if t > after and i > after_line:
                        return i, t, text
                left = deadline - time.monotonic()
                if left <= 0:
                    raise OtaError(f"{self.cart.id}: no {what or key!r} line within {timeout:.1f} s "
                                   f"(job {self.job_id})\n{self.cart.console.tail()}")
                self._cond.wait(left)

    def _first_of(self, keys: tuple[str, ...], timeout: float, after: float) -> tuple[str, float, str]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                hits = [(i, t, k, text) for k in keys for i, t, text in self._seen.get(k, ()) if t > after]
                if hits:
                    _, t, k, text = min(hits)
                    return k, t, text
                left = deadline - time.monotonic()
                if left <= 0:
                    raise OtaError(f"{self.cart.id}: none of {keys} within {timeout:.1f} s after the job "
                                   f"{self.job_id} ended\n{self.cart.console.tail()}")
                self._cond.wait(left)

    @property
    def budget(self) -> float:
        """Job queued to outcome: download, write, two boots and the mark-good window, with headroom."""
        cfg = self.cart.config
        return 30.0 + 3 * self.cart.boot_timeout + 2 * cfg.boot.mark_good_window_s

    def wait(self, timeout: float | None = None) -> UpdateOutcome:
        cart, fleet = self.cart, self.fleet
        timeout = self.budget if timeout is None else timeout
        deadline = time.monotonic() + timeout
        try:
            with step(f"{cart.id}: wait for the job to end"):
                try:
                    ex = fleet.jobs.wait_status(self.job_id, cart.id, TERMINAL, timeout)
                except Exception as exc:
                    raise OtaError(f"{exc}\nconsole of {cart.id}:\n{cart.console.tail()}") from None
                status = ex["status"]
                details = dict(ex.get("statusDetails") or {})
                t_end = time.monotonic()
                attach("job execution", ex)
            outcome = {"REJECTED": "rejected", "TIMED_OUT": "timed-out", "CANCELED": "canceled",
                       "REMOVED": "canceled"}.get(status, "failed")
            left = lambda: max(0.5, deadline - time.monotonic())  # noqa: E731
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
            if self.events.get("banner"):
                # the cart rebooted during the update: it must be at its shell again before we ask it anything
                self._wait("ready", left(), 0.0, self._last_line("banner"), "firmware ready after the last boot")
            with step(f"{cart.id}: state after the update"):
                after = cart.slot_status()
                hashes_after = cart.slot_hashes()
                attach("slot status after", after.brief())
        finally:
            for h in self._listeners:
                cart.console.remove_listener(h)
            self._cleanup()
        metric = fleet.telemetry.rollback_count(self.target_version, cart.id, since=self.tele_mark)
        history = [c.as_dict() for c in fleet.jobs.history(self.job_id, cart.id)]
        result = UpdateOutcome(
            cart=cart.id, job_id=self.job_id, target_version=self.target_version, status=status, details=details,
            outcome=outcome, before=self.before, after=after, hashes_before=self.hashes_before,
            hashes_after=hashes_after, boots=[text for _, text in self.events.get("banner", [])],
            rollback_metric=metric, events=self.events, timings=self._timings(t_end), history=history,
            console=cart.console.slice_text(self.console_start))
        attach("update outcome", {"outcome": outcome, "status": status, "details": details,
                                  "timings_s": result.timings, "rollback_metric": metric, "history": history,
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
        t = {k: self._first(k) for k in ("ota_job_started", "ota_download_done", "ota_verify_ok", "ota_write_done",
                                         "ota_armed", "banner", "ota_trial_reported", "confirmed")}
        out: dict[str, float] = {}

        def span(name: str, a: float | None, b: float | None) -> None:
            if a is not None and b is not None and b >= a:
                out[name] = round(b - a, 4)

        span("pickup", self.t_created, t["ota_job_started"])
        span("download", t["ota_job_started"], t["ota_download_done"])
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


# ---------------------------------------------------------------- one cart's OTA steps in a test


class CartOta:
    """The OTA steps of a test on one cart (the `ota` fixture): images for it, updates of it."""

    def __init__(self, cart: Cart, fleet: Fleet, builds: FirmwareBuilds, signer: Signer, hardware: list[str]):
        self.cart = cart
        self.fleet = fleet
        self.builds = builds
        self.signer = signer
        self.hardware = hardware  # what a release is signed for: every hardware revision of the rig
        self.outcomes: list[UpdateOutcome] = []

    @property
    def ca(self) -> str:
        """The root the cart was provisioned with first: what a release for it requires."""
        return self.cart.config.provisioned_cas[0]

    def unsigned(self, version: str, faults: Mapping[str, Any] | None = None) -> bytes:
        with step(f"build firmware {version}" + (f" with faults {dict(faults)}" if faults else "")):
            return self.builds.build(version, faults)

    def image(self, version: str, *, faults: Mapping[str, Any] | None = None, **sign) -> bytes:
        """A signed release image of `version` (a fault build with `faults`); `sign` as Signer.sign."""
        sign.setdefault("hardware", self.hardware)
        sign.setdefault("ca", self.ca)
        unsigned = self.unsigned(version, faults)
        with step(f"sign {version} (ca {sign['ca']}" + (f", tamper {sign['tamper']}" if sign.get("tamper") else "")
                  + ")"):
            return self.signer.sign(unsigned, **sign)

    def start(self, image: bytes | None, *, target_version: str | None = None, **kw) -> UpdateRun:
        if target_version is None:
            target_version = _image_version(image)
        return UpdateRun(self.fleet, self.cart, image, target_version=target_version, **kw)

    def update(self, image: bytes | None, *, target_version: str | None = None, timeout: float | None = None,
               **kw) -> UpdateOutcome:
        out = self.start(image, target_version=target_version, **kw).wait(timeout)
        self.outcomes.append(out)
        return out

    def hidden_rollbacks(self) -> list[UpdateOutcome]:
        """Updates of this test whose job SUCCEEDED while the cart rolled back, unless the test said it
        expected that (`expect_rolled_back(succeeded_first=True)`): the `ota` fixture fails the test."""
        return [o for o in self.outcomes if o.hidden_rollback]


def _image_version(image: bytes | None) -> str:
    try:
        return himage.parse_image(image).version or "unknown"
    except Exception:
        return "unknown"
