"""The virtual rack, driven only through its real interfaces (SCPI over TCP, the pty console)."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from harness.cart import Bench, BootError, Quarantined
from harness.config import Rig
from harness.rackctl import rack_state, start_rack, stop_rack


@pytest.fixture
def rack(rig_factory, tmp_path):
    """A two-slot virtual rack; yields (rig, pid). Stopped and checked clean afterwards."""
    rig = Rig.load(rig_factory(["cart-01", "cart-06"]))
    pid = start_rack(rig, owner_pid=os.getpid())
    yield rig, pid
    stop_rack(pid)
    assert rack_state(rig) is None
    assert not any(Path(s.console_url).exists() for s in rig.slots), "cables removed"


def _children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(d.name))
    return out


def test_power_on_boots_and_power_off_kills(rack, tmp_path):
    rig, pid = rack
    bench = Bench(rig, tmp_path / "consoles")
    try:
        cart = bench.cart("cart-06")
        banner = cart.power_on()
        assert banner.config == "cart-06" and banner.slot == "A"
        carts = [p for p in _children(pid) if "vrack.cart" in Path(f"/proc/{p}/cmdline").read_text()]
        assert len(carts) == 1
        cart.power_off()
        assert not Path(f"/proc/{carts[0]}").exists() or "Z" in Path(f"/proc/{carts[0]}/stat").read_text().split()[2]
        # the console stays usable: the next boot is seen on the same port
        assert cart.power_on().config == "cart-06"
    finally:
        bench.close()
    assert not bench._carts


def test_rack_stops_clean_and_leaves_no_cart(rig_factory, tmp_path):
    rig = Rig.load(rig_factory(["cart-02"]))
    pid = start_rack(rig, owner_pid=os.getpid())
    bench = Bench(rig, tmp_path / "consoles")
    cart = bench.cart("cart-02")
    cart.power_on()
    kids = _children(pid)
    assert kids
    bench.close()
    stop_rack(pid)
    for k in kids + [pid]:
        assert not Path(f"/proc/{k}").exists() or "Z" in Path(f"/proc/{k}/stat").read_text().split()[2]
    assert not (rig.run_dir / "rack.json").exists()


def test_rack_dies_with_its_owner(rig_factory, tmp_path):
    """A harness run killed outright (SIGKILL) does not leave its rack behind."""
    import subprocess
    import sys

    rig = Rig.load(rig_factory(["cart-03"]))
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        pid = start_rack(rig, owner_pid=owner.pid)
    finally:
        owner.send_signal(signal.SIGKILL)
        owner.wait()
    from harness.rackctl import _wait_gone

    assert _wait_gone(pid, 20.0), "rack still running after its owner died"
    assert rack_state(rig) is None


def test_second_rack_on_same_run_dir_refused(rack):
    rig, pid = rack
    from harness.rackctl import RackStartError

    with pytest.raises(RackStartError) as ei:
        start_rack(rig, timeout=30)
    assert "already up" in str(ei.value)
    assert json.loads((rig.run_dir / "rack.json").read_text())["pid"] == pid


def test_blank_cart_never_boots_and_is_quarantined(rig_factory, tmp_path):
    """A cart with nothing in its flash: boot fails with the console tail; the cart is latched."""
    rig = Rig.load(rig_factory(["cart-01", "cart-04"]))
    geo = rig.slot_for("cart-04").cart.flash
    flash = rig.run_dir / "flash" / "slot02.bin"
    flash.parent.mkdir(parents=True)
    flash.write_bytes(b"\xff" * (10 * geo.page_size + 2 * geo.slot_size))  # a blank part, as from the reel
    pid = start_rack(rig, owner_pid=os.getpid())
    bench = Bench(rig, tmp_path / "consoles")
    try:
        blank = bench.cart("cart-04")
        with pytest.raises(BootError) as ei:
            blank.power_on(timeout=4.0)
        msg = str(ei.value)
        # at once, the halt's line and the slots' reasons first, the console tail after them
        assert msg.startswith("cart-04: BL: no bootable image (BL: slot A invalid: erased; "
                              "BL: slot B invalid: erased)\n"), msg
        assert msg.rstrip().endswith("BL: no bootable image, halting"), msg
        with pytest.raises(Quarantined) as qi:
            blank.power_on()
        assert "quarantined" in str(qi.value) and "no boot" in str(qi.value)
        assert not blank.power.is_on(), "a quarantined cart is left powered off"
        assert bench.cart("cart-01").power_on().config == "cart-01", "the other carts go on"
    finally:
        bench.close()
        stop_rack(pid)


def test_factory_trust_store_needs_the_named_pki(rig_factory, tmp_path):
    """A rig that names a lab PKI without the roots its carts need: the rack says which file, starts nothing."""
    import yaml

    from vrack.rack import Rack, RackError, load_rig

    path = rig_factory(["cart-06"])
    data = yaml.safe_load(path.read_text())
    data["virtual"]["pki"] = str(tmp_path / "empty-pki")
    path.write_text(yaml.safe_dump(data))
    rack = Rack(load_rig(path))
    with pytest.raises(RackError) as ei:
        rack.up()
    msg = str(ei.value)
    assert "virtual.pki" in msg and "lab-root-2025.pem" in msg and "hil pki init" in msg
    assert not (rack.run_dir / "rack.json").exists() and not rack.supplies and rack.broker is None


def test_trust_list_shows_the_factory_roots(rig_factory, tmp_path):
    """With a lab PKI named, recovery provisions real root certificates; the firmware lists them."""
    import hashlib

    import yaml
    from cryptography.hazmat.primitives.serialization import Encoding

    from harness.pki import LabPki
    from harness.recovery import recover_factory

    path = rig_factory(["cart-07"])
    data = yaml.safe_load(path.read_text())
    data["virtual"]["pki"] = str(tmp_path / "pki")
    path.write_text(yaml.safe_dump(data))
    rig = Rig.load(path)
    pid = start_rack(rig, owner_pid=os.getpid())  # creates the lab PKI first
    bench = Bench(rig, tmp_path / "consoles")
    try:
        cart = bench.cart("cart-07")
        recover_factory(cart)
        pki = LabPki(tmp_path / "pki")
        want = {n: hashlib.sha256(pki.cert(n).public_bytes(Encoding.DER)).hexdigest()
                for n in ("lab-root-2025", "lab-root-2026")}
        assert cart.trust_store() == want
    finally:
        bench.close()
        stop_rack(pid)
