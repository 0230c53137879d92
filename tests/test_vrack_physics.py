"""Power cuts and flash faults on the virtual rack: torn pages at a real SIGKILL, boot control that
survives them, the reset-cause register, and flash faults set through the rack's control interface
(real HTTP). docs/flash-layout.md and docs/interfaces.md ("Rack control interface")."""

from __future__ import annotations

import base64
import contextlib
import ctypes
import hashlib
import http.client
import json
import os
import random
import re
import select
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest
import yaml
from test_vrack_cart import make_vcart  # noqa: F401 (the fixture)

from conftest import ROOT, write_rig
from harness.cart import Bench
from harness.config import Rig
from harness.rackctl import start_rack, stop_rack
from harness.recovery import _enter_recovery
from vrack import factory
from vrack.flash import Layout, decode_bcb, read_open_write, tear_point, torn_page
from vrack.image import build_image

SEED = "physics-42"
SLOW_PAGE_MS = 300.0  # cart-01 in this rig: a page program takes 0.3 s, so a cut lands inside it


def call(method: str, url: str, body: bytes | str | None = None, headers: dict | None = None):
    """(status, parsed JSON body) of one request to the rack's control interface."""
    data = body.encode() if isinstance(body, str) else body
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.fixture(scope="module")
def rack(tmp_path_factory):
    """One rack: slot 1 cart-01 with slow flash (300 ms a page), slot 2 cart-06 as configured.
    VRACK_SEED makes the tears reproducible; VRACK_RESET_CAUSE=crash in the rack's own environment
    proves that the rack itself says power-on when it powers a cart."""
    tmp = tmp_path_factory.mktemp("physics")
    configs = tmp / "configs"
    shutil.copytree(ROOT / "configs", configs)
    cart01 = configs / "carts" / "cart-01.yaml"
    data = yaml.safe_load(cart01.read_text())
    data["flash"]["page_program_ms"] = SLOW_PAGE_MS
    cart01.write_text(yaml.safe_dump(data))
    path = write_rig(tmp, ["cart-01", "cart-06"], configs=str(configs),
                     virtual={"run_dir": str(tmp / "run"), "flash_time_scale": 1.0})
    rig = Rig.load(path)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VRACK_SEED", SEED)
        mp.setenv("VRACK_RESET_CAUSE", "crash")
        pid = start_rack(rig, owner_pid=os.getpid())
    bench = Bench(rig, tmp / "consoles")
    state = json.loads((rig.run_dir / "rack.json").read_text())
    try:
        yield rig, bench, state["control"]
    finally:
        bench.close()
        stop_rack(pid)


def tears(rig) -> list[tuple[int, int, int]]:
    """(slot, page, cut) of every tear the rack reported in its log."""
    log = (rig.run_dir / "vrack.log").read_text(errors="replace")
    return [(int(m[1]), int(m[2]), int(m[3]))
            for m in re.finditer(r"slot (\d+) \(\S+\): power cut during a write of page (\d+): "
                                 r"torn at byte (\d+)", log)]


def power_off(cart) -> None:
    """Output off, then a query on the same supply connection: by its answer the rack has handled
    the off (killed the cart, torn its page)."""
    cart.power_off()
    assert not cart.power.is_on()


def wait_open_record(rig, slot: int, page: int, timeout: float = 5.0) -> None:
    """Wait (inotify on the cart's state file, bounded) until the cart has recorded that it is
    programming `page`: from then on, for the program time, a cut tears that page."""
    path = rig.run_dir / "state" / f"slot{slot:02d}"
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
    assert fd >= 0, os.strerror(ctypes.get_errno())
    try:
        assert libc.inotify_add_watch(fd, os.fsencode(path), 0x2) >= 0  # IN_MODIFY
        deadline = time.monotonic() + timeout
        while True:
            op = read_open_write(path.read_bytes())
            if op is not None and op.page == page:
                return
            left = deadline - time.monotonic()
            assert left > 0, f"slot {slot} never recorded a write of page {page} within {timeout} s (state {op})"
            if select.select([fd], [], [], left)[0]:
                try:
                    os.read(fd, 4096)
                except BlockingIOError:
                    pass
    finally:
        os.close(fd)


def flash_page(rig, slot: int, page: int, page_size: int) -> bytes:
    with open(rig.run_dir / "flash" / f"slot{slot:02d}.bin", "rb") as f:
        f.seek(page * page_size)
        return f.read(page_size)


# --- torn pages at a real power cut ------------------------------------------------------------


def test_a_cut_during_a_page_program_leaves_the_page_torn(rack):
    """Recovery `load B` of three pages; the power goes once page 1 is reported, i.e. while page 2
    is being programmed (0.3 s): the rack tears that page, reproducibly from VRACK_SEED."""
    rig, bench, _ = rack
    cart = bench.cart("cart-01")
    page_size = cart.config.flash.page_size
    first_b = Layout(page_size, cart.config.flash.slot_size).slot_first_page("B")
    before = flash_page(rig, 1, first_b + 1, page_size)
    data = random.Random(1).randbytes(3 * page_size)
    rec = _enter_recovery(cart)
    assert not tears(rig)
    cart.console.send(f"load B {len(data)} {hashlib.sha256(data).hexdigest()}")
    rec.expect(rec.prof.load.ready, 5.0, "load ready")
    b64 = base64.b64encode(data).decode()
    cart.console.send("\r\n".join(b64[i:i + 76] for i in range(0, len(b64), 76)))
    cart.console.send(".")
    cart.console.expect(r"^load: page 1/3$", 10, what="first page programmed")
    wait_open_record(rig, 1, first_b + 1)
    power_off(cart)
    ((slot, page, cut),) = tears(rig)
    assert (slot, page) == (1, first_b + 1)
    new = data[page_size:2 * page_size]
    torn = flash_page(rig, 1, page, page_size)
    assert torn[:cut] == new[:cut] and torn != new and torn != before
    rng = random.Random(f"{SEED}:1")  # the rack's generator for slot 1: this was its first tear
    assert torn_page(new, tear_point(new, rng), rng) == torn  # byte for byte what the seed says
    # the cart comes back: power-on, the old slot boots, slot B does not verify
    banner = cart.power_on()
    assert banner.slot == "A"
    assert cart.command("slot_status")[-1] == "slot B fw=- valid=no"


def test_a_cut_during_each_boot_control_write_reads_a_valid_state(rack):
    """Cut at `EV: bcb-write` (the bootloader's own write at boot) again and again: every tear lands
    in the page being written; the next boot reads the previous BCB (or the new one, when the tear
    missed its 64 bytes), never a blank one, and boots."""
    rig, bench, _ = rack
    cart = bench.cart("cart-01")
    cart.power_off()
    seen = len(tears(rig))
    cart.console.mark()
    cart.power_on(wait=False)
    m = cart.console.expect(r"^BL: bcb seq=(\d+) ", 10, what="bcb line")
    previous = int(m[1])
    cuts = []
    for _ in range(4):
        m = cart.console.expect(r"^EV: bcb-write copy=([01]) seq=(\d+) why=boot t=\d+$", 10, what="bcb write")
        copy, seq = int(m[1]), int(m[2])
        assert seq == previous + 1
        wait_open_record(rig, 1, copy)
        power_off(cart)
        found = tears(rig)[seen:]
        assert [(s, p) for s, p, _ in found] == [(1, copy)], "the kill landed in the program time"
        seen += 1
        cut = found[0][2]
        cuts.append(cut)
        cart.power_on(wait=False)
        cart.console.expect(r"^BL: reset cause=power-on$", 10, what="reset cause")
        m = cart.console.expect(r"^BL: bcb (?:blank|seq=(\d+) )", 10, what="bcb line")
        assert m[1] is not None, "boot control lost"
        assert int(m[1]) == (previous if cut < 64 else seq), f"tear at byte {cut}"
        previous = int(m[1])
    assert len(set(cuts)) > 1 and min(cuts) < 60, cuts  # several tear points, inside the record
    assert cart.wait_boot().slot == "A"


# --- reset cause -------------------------------------------------------------------------------


def test_reset_cause_at_power_on_reboot_and_after_a_cut(rack):
    """The rack's own environment says crash: a power-on from the rack is still a power-on."""
    rig, bench, _ = rack
    cart = bench.cart("cart-06")
    power_off(cart)
    for how in ("power-on", "reboot", "cut"):
        cart.console.mark()
        if how == "reboot":
            cart.console.send("reboot")
        else:
            if how == "cut":
                power_off(cart)
            cart.power_on(wait=False)
        cause = "software" if how == "reboot" else "power-on"
        cart.console.expect(r"^CART-BL ", 10)
        cart.console.expect(rf"^BL: reset cause={cause}$", 1)
        cart.console.expect(rf"^EV: boot cause={cause} slot=A mode=normal t=\d+$", 10)
        cart.console.expect(r"^FW: ready$", 10)


CHAIN = b'''
import time

def main(hal):
    hal.console.write_line(f"T: cause={hal.reset_cause} slot={hal.booted_slot} mode={hal.mode} "
                           f"fault={hal.FlashFault.__name__}")
    if hal.mode == "trial":
        time.sleep(60)  # never marks good: the watchdog resets
    if hal.reset_cause == "power-on":
        hal.reset()
    if hal.reset_cause == "software":
        raise RuntimeError("on purpose")
    if hal.reset_cause == "crash":
        hal.bcb.set_pending("B")
        hal.reset()
    hal.set_state(hal.STATE_IDLE)
    while True:
        hal.console.read_line(None)
'''


def test_hal_reset_cause_through_every_kind_of_reset(make_vcart):  # noqa: F811
    """power-on -> hal.reset() (software) -> crash -> trial never marked good (watchdog) -> power cut."""
    cart = make_vcart(mark_good_window_s=0.5)
    cart.provision()
    image = build_image(CHAIN, "9.9.9")
    cart.put_image("A", image)
    cart.put_image("B", image)
    cart.power_on()
    cart.expect(r"BL: reset cause=power-on\r\n.*EV: boot cause=power-on slot=A mode=normal t=\d+\r\n"
                r"T: cause=power-on slot=A mode=normal fault=FlashFault\r\n")
    cart.expect(r"BL: reset cause=software\r\n.*T: cause=software slot=A mode=normal")
    cart.expect(r"BL: firmware crashed: RuntimeError: on purpose\r\n")
    cart.expect(r"BL: reset cause=crash\r\n.*T: cause=crash slot=A mode=normal")
    cart.expect(r"EV: bcb-write copy=\d seq=\d+ why=set-pending t=\d+\r\n")
    cart.expect(r"BL: reset cause=software\r\n.*EV: bcb-write copy=\d seq=\d+ why=trial t=\d+\r\n.*"
                r"EV: boot cause=software slot=B mode=trial t=\d+\r\nT: cause=software slot=B mode=trial")
    cart.expect(r"BL: watchdog reset\r\nCART-BL [^\r]*\r\nBL: reset cause=watchdog\r\n.*"
                r"BL: rollback: slot B not confirmed, back to slot A\r\n"
                r"EV: bcb-write copy=\d seq=\d+ why=rollback t=\d+\r\n.*T: cause=watchdog slot=A mode=normal", 5)
    cart.power_off()
    cart.power_on()
    cart.expect(r"BL: reset cause=power-on\r\n.*T: cause=power-on slot=A")


# --- flash faults through the control interface ------------------------------------------------

PROBE = b'''
def main(hal):
    hal.set_state(hal.STATE_IDLE)
    hal.console.write_line("T: probe ready")
    while True:
        line = hal.console.read_line(None)
        if not line or not line.strip():
            continue
        op, page = line.split()
        page = int(page)
        try:
            if op == "erase":
                hal.flash.erase_page(page)
            else:
                hal.flash.write_page(page, bytes([0x5A]) * hal.flash.page_size)
            hal.console.write_line(f"T: {op} {page} ok")
        except hal.FlashFault as exc:
            hal.console.write_line(f"T: {op} {page} fault kind={exc.kind} page={exc.page}: {exc}")
'''


def test_control_interface_document_roundtrip(rack):
    rig, _, control = rack
    url = f"{control}/slots/2/flash-faults"
    assert call("GET", url) == (200, {"erase_fail": [], "program_fail": [], "bitflip": []})
    doc = {"erase_fail": [900, 12], "bitflip": [{"page": 3, "offset": 7, "mask": 128}]}
    want = {"erase_fail": [12, 900], "program_fail": [], "bitflip": [{"page": 3, "offset": 7, "mask": 128}]}
    assert call("PUT", url, json.dumps(doc), {"Content-Type": "application/json"}) == (200, want)
    assert call("GET", url) == (200, want)
    assert json.loads((rig.run_dir / "faults" / "slot02.json").read_text()) == want
    assert not [p for p in (rig.run_dir / "faults").iterdir() if p.name != "slot02.json"], "no temporary left"
    assert call("DELETE", url) == (200, {"erase_fail": [], "program_fail": [], "bitflip": []})
    assert not (rig.run_dir / "faults" / "slot02.json").exists()
    assert call("GET", url)[1]["erase_fail"] == []


def test_control_interface_refuses_bad_requests(rack):
    rig, _, control = rack
    pages = Layout(2048, 1048576).page_count  # cart-06
    url = f"{control}/slots/2/flash-faults"
    put = {"Content-Type": "application/json"}
    cases = [
        ("GET", f"{control}/slots/9/flash-faults", None, 404, r"^no slot 9: .* slots 1, 2$"),
        ("PUT", f"{control}/slots/9/flash-faults", "{}", 404, r"no slot 9"),
        ("GET", f"{control}/slots/2", None, 404, r"no such path"),
        ("GET", f"{control}/slots/x/flash-faults", None, 404, r"no such path"),
        ("POST", url, "{}", 405, r"POST: use GET, PUT or DELETE"),
        ("PUT", url, "{not json", 400, r"^bad JSON: "),
        ("PUT", url, b"\xff\xfe", 400, r"^bad JSON: "),
        ("PUT", url, "[1, 2]", 400, r"expected a JSON object"),
        ("PUT", url, '{"erase_fail": "12"}', 400, r"^erase_fail: expected a list, got str$"),
        ("PUT", url, '{"erase_fail": [1.5]}', 400, r"expected a page index \(integer\), got float"),
        ("PUT", url, '{"program_fail": [true]}', 400, r"got bool"),
        ("PUT", url, json.dumps({"erase_fail": [pages]}), 400,
         rf"^erase_fail\[0\]: page {pages} is outside the device \(pages 0\.\.{pages - 1}\)$"),
        ("PUT", url, '{"program_fail": [-3]}', 400, r"page -3 is outside the device"),
        ("PUT", url, '{"bitflip": [{"page": 1, "offset": 2048, "mask": 1}]}', 400,
         r"offset: expected an integer 0\.\.2047"),
        ("PUT", url, '{"bitflip": [{"page": 1, "offset": 0, "mask": 0}]}', 400, r"mask: expected an integer 1\.\.255"),
        ("PUT", url, '{"bitflip": [{"page": 1}]}', 400, r"exactly page, offset, mask"),
        ("PUT", url, '{"erase_fail": [], "stuck": [1]}', 400, r"unknown key 'stuck'"),
        ("PUT", url, json.dumps({"erase_fail": list(range(1025))}), 400, r"^1025 entries: at most 1024$"),
    ]
    call("PUT", url, '{"erase_fail": [5]}', put)
    for method, target, body, status, reason in cases:
        got_status, got = call(method, target, body, put if body is not None else None)
        assert got_status == status, (method, target, body, got)
        assert "\n" not in got["error"] and re.search(reason, got["error"]), (body, got)
    assert call("GET", url) == (200, {"erase_fail": [5], "program_fail": [], "bitflip": []}), "refusals change nothing"
    assert call("PUT", url, json.dumps({"erase_fail": list(range(1024))}), put)[0] == 200
    host, port = urllib.parse.urlsplit(control).netloc.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.putrequest("PUT", "/slots/2/flash-faults")  # no Content-Length
    conn.endheaders()
    resp = conn.getresponse()
    assert resp.status == 400 and "Content-Length" in json.loads(resp.read())["error"]
    conn.close()
    assert call("DELETE", url)[0] == 200


def test_bitflip_shows_in_the_slot_hash(rack):
    rig, bench, control = rack
    cart = bench.cart("cart-06")
    cart.power_off()
    cart.power_on()
    clean = cart.slot_hashes()
    first_a = Layout(2048, 1048576).slot_first_page("A")
    url = f"{control}/slots/2/flash-faults"
    assert call("PUT", url, json.dumps({"bitflip": [{"page": first_a + 40, "offset": 100, "mask": 4}]}))[0] == 200
    flipped = cart.slot_hashes()
    assert flipped["A"] != clean["A"] and flipped["B"] == clean["B"]
    call("DELETE", url)
    assert cart.slot_hashes() == clean


def test_erase_and_program_faults_reach_the_firmware_and_the_bootloader(rack):
    """A probe firmware in slot B calls hal.flash.erase_page / write_page on pages of slot A while the
    control interface sets faults; recovery's own erase and load hit them too; a BCB write that fails
    goes to the other copy."""
    rig, bench, control = rack
    cart = bench.cart("cart-06")
    url = f"{control}/slots/2/flash-faults"
    lay = Layout(2048, 1048576)
    a, b = lay.slot_first_page("A"), lay.slot_first_page("B")
    image = build_image(PROBE, "9.9.9")
    rec = _enter_recovery(cart)
    rec.transfer(rec.prof.load, "load B", image, slot="B")
    rec.command(rec.prof.bcb_reset, "bcb reset B", slot="B")
    try:
        # the bootloader's own writes: erase and load refuse with the part's error
        call("PUT", url, json.dumps({"erase_fail": [b + 300], "program_fail": [b + 301]}))
        cart.console.send("erase A")  # slot A is not faulted: fine
        cart.console.expect(r"^ok erase A$", 30)
        fw = factory.build_image("1.5.0")
        rec.transfer(rec.prof.load, "load A", fw, slot="A")  # back to a bootable A
        cart.console.send("erase B")
        m = cart.console.expect(r"^error erase: (.*)$", 30)
        assert m[1] == f"erase failed: page {b + 300}"
        call("PUT", url, json.dumps({"program_fail": [b]}))
        with pytest.raises(Exception, match=rf"error load: program failed: page {b}$"):
            rec.transfer(rec.prof.load, "load B", image, slot="B")
        call("DELETE", url)
        rec.transfer(rec.prof.load, "load B", image, slot="B")
        # boot control: the copy the boot writes (not the current one) fails; the other copy takes it
        copies = [decode_bcb(flash_page(rig, 2, c, 2048)) for c in (0, 1)]
        current = max((c for c in (0, 1) if copies[c]), key=lambda c: copies[c].seq)
        target, seq = 1 - current, copies[current].seq + 1
        call("PUT", url, json.dumps({"program_fail": [target, a + 10], "erase_fail": [a + 11]}))
        cart.console.send("boot")
        cart.console.expect(rf"^EV: bcb-write copy={target} seq={seq} why=boot t=\d+$", 10)
        cart.console.expect(rf"^BL: bcb write failed: page {target}$", 5)
        cart.console.expect(rf"^EV: bcb-write copy={current} seq={seq} why=boot t=\d+$", 5)
        cart.console.expect(r"^EV: boot cause=\S+ slot=B mode=normal", 10)
        cart.console.expect(r"^T: probe ready$", 10)
        assert decode_bcb(flash_page(rig, 2, current, 2048)).seq == seq
        before = flash_page(rig, 2, a + 11, 2048)
        cart.console.send(f"erase {a + 11}")
        cart.console.expect(rf"^T: erase {a + 11} fault kind=erase page={a + 11}: erase failed: page {a + 11}$", 5)
        partly = flash_page(rig, 2, a + 11, 2048)
        cut = len(partly) - len(partly.lstrip(b"\xff"))
        assert before.count(b"\xff") < 2048 and 0 < cut < 2048 and partly[cut:] == before[cut:]
        cart.console.send(f"write {a + 10}")
        cart.console.expect(rf"^T: write {a + 10} fault kind=program page={a + 10}: program failed: page {a + 10}$", 5)
        partly = flash_page(rig, 2, a + 10, 2048)
        n = len(partly.rstrip(b"\xff"))
        assert 0 < n < 2048 and partly[:n] == b"\x5a" * n
        cart.console.send(f"erase {a + 12}")
        cart.console.expect(rf"^T: erase {a + 12} ok$", 5)
        call("DELETE", url)  # takes effect at the next operation
        cart.console.send(f"write {a + 10}")
        cart.console.expect(rf"^T: write {a + 10} ok$", 5)
    finally:
        call("DELETE", url)
        rec = _enter_recovery(cart)
        rec.transfer(rec.prof.load, "load A", factory.build_image("1.5.0"), slot="A")
        rec.command(rec.prof.bcb_reset, "bcb reset A", slot="A")
        cart.console.send("boot")
        cart.wait_boot()


def test_control_interface_is_published_and_closed_with_the_rack(tmp_path):
    rig = Rig.load(write_rig(tmp_path, ["cart-06"]))
    pid = start_rack(rig, owner_pid=os.getpid())
    try:
        state = json.loads((rig.run_dir / "rack.json").read_text())
        control = state["control"]
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+", control) and state["seed"]
        assert call("GET", f"{control}/slots/1/flash-faults")[0] == 200
    finally:
        stop_rack(pid)
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"{control}/slots/1/flash-faults", timeout=5)


def test_carts_lose_power_when_the_rack_is_killed_outright(rig_factory):
    """SIGKILL of the rack (its supplies) is a power loss: no cart process outlives it."""
    import select
    import signal

    from harness.cart import Bench
    from harness.config import Rig
    from harness.power.base import PowerError
    from harness.rackctl import start_rack, stop_rack

    rig = Rig.load(rig_factory(["cart-01", "cart-02"]))
    pid = start_rack(rig, owner_pid=os.getpid())
    bench = Bench(rig, rig.run_dir / "consoles")
    try:
        for cart_id in ("cart-01", "cart-02"):
            bench.cart(cart_id).power_on()
        carts = [int(p) for p in os.listdir("/proc") if p.isdigit() and _is_cart_of(int(p), rig.run_dir)]
        assert len(carts) == 2, carts
        fds = [os.pidfd_open(p) for p in carts]
        os.kill(pid, signal.SIGKILL)
        gone = set()
        deadline = time.monotonic() + 10
        while len(gone) < len(fds) and time.monotonic() < deadline:
            ready, _, _ = select.select([f for f in fds if f not in gone], [], [], deadline - time.monotonic())
            gone.update(ready)
        assert len(gone) == len(fds), "a cart process still runs 10 s after its rack was SIGKILLed"
        for f in fds:
            os.close(f)
    finally:
        with contextlib.suppress(PowerError):  # its supplies are gone with the rack: nothing to switch off
            bench.close()
        stop_rack(pid)


def _is_cart_of(pid: int, run_dir) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().split(b"\0")
    except OSError:
        return False
    return b"vrack.cart" in cmd and any(str(run_dir).encode() in part for part in cmd)
