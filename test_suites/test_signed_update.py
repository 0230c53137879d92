"""Signed OTA update, on every cart: a release travels as a job, is verified on the cart before
anything is written, lands in the inactive slot, is tried once and confirms itself.

Every negative case asserts the specific reason the cart gave, that both slots are byte for byte
what they were (`slot hash`), that boot control is unchanged and that the cart did not reboot.
Versions are relative to what the cart runs when the test starts, so the tests do not depend on
each other's order.
"""

from __future__ import annotations

import time
from urllib.parse import parse_qs, urlparse

import pytest

from harness.cut import cut_on_console
from harness.fleet import ImageHost
from harness.negatives import IMAGE_DEFECTS, lower
from harness.ota import DELETE, OtaError, bump
from harness.sweep import name_pattern

OTHER_HOST = "127.0.0.2"  # another loopback address: Linux routes all of 127/8 to this machine


def range_start(r) -> int:
    """Where a served request began in the image (0 without a Range header)."""
    if not r.range or not r.range.startswith("bytes=") or r.range.startswith("bytes=-"):
        return 0
    return int(r.range[6:].split("-", 1)[0] or 0)


def test_happy_path(cart, ota):
    running = cart.power_on().version
    target = bump(running, patch=1)
    out = ota.update(ota.image(target)).expect_confirmed()
    assert cart.version() == target
    assert out.statuses == ["QUEUED", "IN_PROGRESS", "SUCCEEDED"], out.describe()
    assert out.rollback_metric == 0  # also checked by expect_confirmed: the update counted no rollback


def test_three_updates_back_to_back(cart, ota):
    running = cart.power_on().version
    slots = []
    for _ in range(3):
        target = bump(running, patch=1)
        out = ota.update(ota.image(target)).expect_confirmed()
        slots.append(out.after.active)
        running = target
    assert cart.version() == running
    assert slots[0] != slots[1] != slots[2], f"each update goes to the other slot: {slots}"


@pytest.mark.parametrize(("sign", "reason"), [pytest.param(s, r, id=i) for i, s, r in IMAGE_DEFECTS])
def test_defective_image_is_rejected(cart, ota, sign, reason):
    target = bump(cart.power_on().version, patch=1)
    ota.update(ota.image(target, **sign), target_version=target).expect_rejected(reason)


def test_same_version_is_rejected(cart, ota):
    running = cart.power_on().version
    ota.update(ota.image(running)).expect_rejected("same version")


def test_lower_version_is_rejected(cart, ota):
    running = cart.power_on().version
    ota.update(ota.image(lower(running))).expect_rejected("lower version")


def test_job_naming_another_version_than_the_signed_image_is_rejected(cart, ota):
    """The job document says one version, the signed manifest another: the cart must not install what
    the release record does not say it installs."""
    running = cart.power_on().version
    image = ota.image(bump(running, patch=1))
    ota.update(image, target_version=bump(running, patch=2)).expect_rejected("target version mismatch")


@pytest.mark.parametrize(("field", "value", "reason"), [
    pytest.param("size", "+1", "download size mismatch", id="size-mismatch"),
    pytest.param("sha256", "0" * 64, "download hash mismatch", id="hash-mismatch"),
])
def test_document_disagrees_with_download(cart, ota, field, value, reason):
    target = bump(cart.power_on().version, patch=1)
    image = ota.image(target)
    doc = {field: len(image) + 1 if value == "+1" else value}
    ota.update(image, document=doc).expect_rejected(reason)


MALFORMED_DOCUMENTS = [
    ("no-url", {"image_id": DELETE, "sha256": "ab" * 32, "size": 1000}, "malformed job document: url"),
    ("url-not-http", {"url": "file:///etc/passwd"}, "malformed job document: url"),
    ("version-not-a-string", {"target_version": 160}, "malformed job document: target_version"),
    ("version-huge", {"target_version": "1." * 3000 + "0"}, "malformed job document: target_version"),
    ("sha256-not-hex", {"sha256": "xyz"}, "malformed job document: sha256"),
    ("size-negative", {"size": -5}, "malformed job document: size"),
    ("size-not-a-number", {"size": "lots"}, "malformed job document: size"),
    ("unknown-operation", {"operation": "format-flash"}, "malformed job document: operation"),
]


@pytest.mark.parametrize(("doc", "reason"), [pytest.param(d, r, id=i) for i, d, r in MALFORMED_DOCUMENTS])
def test_malformed_job_document_is_rejected(cart, ota, doc, reason):
    target = bump(cart.power_on().version, patch=1)
    ota.update(ota.image(target), document=doc, target_version=target).expect_rejected(reason)


def test_image_from_a_host_not_in_the_fleet_settings_is_rejected(cart, ota, fleet):
    """Defense in depth: the cart downloads only from the image hosts its fleet settings list, whatever
    the job document says. A valid, signed image on another host is refused before a byte is fetched."""
    target = bump(cart.power_on().version, patch=1)
    image = ota.image(target)
    with ImageHost(OTHER_HOST, 0) as other:
        other.add("elsewhere", image)
        url = other.presign("elsewhere", 600)
        out = ota.update(image, document={"url": url}).expect_rejected(f"image host not allowed: {OTHER_HOST}")
        assert other.requests() == [], [r.as_dict() for r in other.requests()]
    assert fleet.images.requests(out.job_id) == []


def test_truncated_download_fails_and_writes_nothing(cart, ota, fleet):
    """The connection drops at the same offset on every attempt: the cart must give up with the
    bytes it has, not write a partial image."""
    target = bump(cart.power_on().version, patch=1)
    image = ota.image(target)
    fleet.images.stall_after(len(image) // 2, once=False, hold_s=0.05)
    try:
        ota.update(image).expect_failed(f"download incomplete: {len(image) // 2} of {len(image)} bytes")
    finally:
        fleet.images.stall_after(None)


def test_resumed_download_whose_later_bytes_changed_under_the_same_etag_is_rejected(cart, ota, fleet):
    """A mirror swaps the file behind an unchanged ETag while the cart's download is cut off: the resumed
    bytes come from another file. The agent hashes every byte it keeps, so the mix is refused as a download
    hash mismatch before anything is verified or written."""
    target = bump(cart.power_on().version, patch=1)
    image = ota.image(target)
    half = len(image) // 2
    swapped = image[:half] + bytes(b ^ 0x5A for b in image[half:half + 256]) + image[half + 256:]
    fleet.images.stall_after(half - 4096, hold_s=30)
    run = ota.start(image)
    try:
        fleet.images.wait_stalled(timeout=run.budget)
        fleet.images.add(run.job_id, swapped, etag_of=image)
        fleet.images.release()
    finally:
        fleet.images.stall_after(None)
    out = run.wait()
    out.expect_rejected("download hash mismatch")
    served = fleet.images.requests(run.job_id)
    assert any(r.status == 206 and range_start(r) > 0 for r in served), \
        f"the download did not resume with Range: {[r.as_dict() for r in served]}"


def _expires(url: str) -> int:
    return int(parse_qs(urlparse(url).query)["expires"][0])


def test_url_expired_mid_download_fetches_document_again(cart, ota, fleet):
    target = bump(cart.power_on().version, patch=1)
    image = ota.image(target)
    fleet.images.stall_after(len(image) // 2, hold_s=30)
    run = ota.start(image, url_ttl_s=2)
    try:
        fleet.images.wait_stalled(timeout=run.budget)
        first_url = fleet.jobs.document_fetches(run.job_id)[-1]["url"]
        # the URL's lifetime passing while the download hangs: wall time is the thing modelled here
        time.sleep(max(0.0, _expires(first_url) - time.time() + 0.05))
        fleet.images.release()
    finally:
        fleet.images.stall_after(None)
    out = run.wait().expect_confirmed()
    served = fleet.images.requests(run.job_id)
    assert any(r.status == 403 and r.reason == "expired" for r in served), [r.as_dict() for r in served]
    fetches = fleet.jobs.document_fetches(run.job_id, cart.id)
    assert [f["operation"] for f in fetches].count("describe") >= 1, fetches
    assert out.events.get("ota_url_expired"), "the cart did not say it fetched the document again"
    resumed = [r for r in served if r.status == 206 and range_start(r) > 0]
    assert resumed, f"no download resumed with Range after the new URL: {[r.as_dict() for r in served]}"


def test_broker_connection_lost_mid_download_resumes(cart, ota, fleet):
    target = bump(cart.power_on().version, patch=1)
    image = ota.image(target)
    fleet.images.stall_after(len(image) // 2, hold_s=30)
    run = ota.start(image)
    try:
        fleet.images.wait_stalled(timeout=run.budget)
        t_kick = time.monotonic()
        fleet.kick(cart.id)  # another client takes over the cart's MQTT session: the broker drops the cart
        run.wait_event("ota_connected", timeout=15, after=t_kick, what="the cart reconnecting to the broker")
        fleet.images.release()  # ... and the stalled HTTP connection drops too
    finally:
        fleet.images.stall_after(None)
    out = run.wait().expect_confirmed()
    served = fleet.images.requests(run.job_id)
    resumed = [r for r in served if range_start(r) > 0]
    assert resumed, f"the download started over instead of resuming: {[r.as_dict() for r in served]}"
    assert sum(r.bytes_sent for r in served if r.method == "GET") < 1.6 * len(image), [r.as_dict() for r in served]
    assert out.events.get("ota_download_resumed")


# ---------------------------------------------------------------- anti-rollback: the security counter


def test_image_below_the_security_counter_is_rejected_even_at_a_higher_version(cart, ota, factory_reset):
    """The counter rises only when an image carrying a higher one is confirmed; after that, a release
    signed with a lower counter is refused for that reason although its version is higher (a signed
    but vulnerable old build re-released under a new number). `factory_reset` puts the counter back."""
    running = cart.power_on().version
    counter = cart.device_state().counter
    raised = bump(running, patch=1)
    ota.update(ota.image(raised, security_counter=counter + 1)).expect_confirmed()
    after = cart.device_state().counter
    assert after == counter + 1, f"{cart.id}: security counter {counter} -> {after} after a confirmed {counter + 1}"
    ota.update(ota.image(bump(raised, patch=1), security_counter=counter)).expect_rejected("security counter")
    assert cart.device_state().counter == counter + 1
    ota.update(ota.image(bump(raised, patch=1), security_counter=counter + 1)).expect_confirmed()  # equal is fine


def test_a_rejected_or_rolled_back_image_never_raises_the_security_counter(cart, ota, factory_reset):
    running = cart.power_on().version
    counter = cart.device_state().counter
    target = bump(running, patch=1)
    ota.update(ota.image(target, security_counter=counter + 5, faults={"self_test_fail": True})).expect_rolled_back()
    ota.update(ota.image(target, security_counter=counter + 5, hardware=["rev-z"])).expect_rejected("wrong hardware")
    assert cart.device_state().counter == counter, f"{cart.id}: the counter moved without a confirmed image"


def test_security_counter_survives_a_cut_in_its_write(cart, ota, fleet, factory_reset):
    """The counter is raised right after mark-good, in a device-state write of its own (two copies). Power lost
    at that write must leave the old counter or the new one, never a lower one or the region's defaults; the
    confirmed normal boot that follows repairs it to the new one (docs/interfaces.md, "Security counter"), and
    the cart runs the new release, confirmed. The time floor meanwhile only rose, to at most the time answered."""
    running = cart.power_on().version
    before = cart.device_state()
    raised = before.counter + 1
    target = bump(running, patch=1)
    run = ota.start(ota.image(target, security_counter=raised))
    try:
        _, banner = run.wait_event("banner", run.budget, what=f"the trial boot of {target}")
        assert "mode=trial" in banner and f"fw={target}" in banner, f"{cart.id}: not the trial boot: {banner}"
        # armed once the trial boot is up: its first device-state write is the counter's, after mark-good
        cut = cut_on_console(cart.power, cart.console, name_pattern(cart.pattern("event").pattern, "state-write"))
        try:
            cut.wait(run.budget)
        finally:
            cut.disarm()
    finally:
        run.close()
    trial = [ln.text for ln in cart.console.lines(run.console_start, cut.event_index)]
    trial = trial[max(i for i, text in enumerate(trial) if cart.pattern("banner").search(text)):]
    steps = [m["name"] for m in map(cart.pattern("event").search, trial) if m]
    assert "mark-good" in steps, (f"{cart.id}: the cut landed at {cut.event!r}, not at the counter's write after "
                                  f"mark-good (the trial boot's events before it: {steps})")
    time.sleep(cart.off_time)  # physics: the rail falls, the capacitors drain
    boot = cart.console.mark()
    banner = cart.power_on()
    after = cart.device_state()
    repaired = any(cart.pattern("security_counter").search(ln.text) for ln in cart.console.lines(boot))
    print(f"{cart.id}: cut at {cut.event!r}; the next boot {'repaired' if repaired else 'found'} counter {raised}")
    answered = max(a.time or 0 for a in fleet.time.answers(cart.id))  # the job's time: the floor goes no further
    assert after.counter in (before.counter, raised) and before.floor <= after.floor <= answered, (
        f"{cart.id}: after a cut at the write raising the security counter {before.counter} -> {raised} the device "
        f"state reads counter {after.counter}, time floor {after.floor} (was {before.floor}, the service answered "
        f"{answered}): neither the old state nor the new one")
    assert (banner.version, banner.mode) == (target, "normal"), (
        f"{cart.id}: mark-good was written before the cut, yet the cart booted {banner.line!r}")
    status = cart.slot_status()
    assert (status.active, status.pending, status.confirmed) == (banner.slot, None, True), status.brief()
    assert status.rollbacks == run.before.rollbacks, f"{cart.id}: rolled back after the cut: {status.brief()}"
    assert fleet.jobs.execution(run.job_id, cart.id)["status"] == "SUCCEEDED"
    assert after.counter == raised, (f"{cart.id}: security counter {after.counter} after a confirmed normal boot "
                                     f"of {target}, whose manifest carries {raised}: the boot did not repair it")
    cart.power_cycle()
    assert cart.device_state().counter == raised, f"{cart.id}: the repaired counter did not hold across a boot"


@pytest.mark.hil_self_check("ignore_security_counter")
def test_fault_build_ignoring_the_security_counter_is_caught(cart, ota, factory_reset, self_check):
    running = bump(cart.power_on().version, patch=1)
    counter = cart.device_state().counter
    ota.update(ota.image(running, security_counter=counter + 1,
                         faults={"ignore_security_counter": True})).expect_confirmed()
    out = ota.update(ota.image(bump(running, patch=1), security_counter=counter))
    with pytest.raises(OtaError, match="expected the update to be rejected") as caught:
        out.expect_rejected("security counter")
    self_check.caught(caught.value)
