"""The rack never destroys what it did not create, and says why it cannot start in one line.

Console paths, run dirs, flash files that are not the rack's: refused, left intact. Ports in use:
`python -m vrack up` prints one line naming the supply (or broker) and the port, exits 2; the
harness's start_rack raises RackStartError whose first line is that cause."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from vrack.cable import is_rack_link
from vrack.rack import RUN_DIR_MARKER, Rack, RackError, claim_run_dir, load_rig

ROOT = Path(__file__).resolve().parents[2]


def _data(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _console(path: Path, i: int) -> Path:
    return Path(_data(path)["slots"][i]["console"])


def _supply_port(path: Path, name: str) -> int:
    sup = next(s for s in _data(path)["supplies"] if s["name"] == name)
    return int(sup["resource"].split("::")[2])


@contextlib.contextmanager
def _listening(port: int):
    """Somebody else's listener on 127.0.0.1:port."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.bind(("127.0.0.1", port))
        s.listen(1)
        yield s
    finally:
        s.close()


def _vrack_up(rig: Path) -> subprocess.CompletedProcess:
    """`python -m vrack up RIG` that is expected to fail at start-up (bounded: it must exit by itself)."""
    return subprocess.run([sys.executable, "-m", "vrack", "up", str(rig)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def _one_line_exit_2(res: subprocess.CompletedProcess) -> str:
    assert res.returncode == 2, (res.returncode, res.stderr)
    assert res.stdout == "", res.stdout
    assert "Traceback" not in res.stderr, res.stderr
    lines = res.stderr.splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("vrack: "), lines
    return lines[0][len("vrack: "):]


def _assert_nothing_running(rack: Rack) -> None:
    assert rack.broker is None and not rack.supplies and not rack.cables and not rack.sockets
    assert not (rack.run_dir / "rack.json").exists()


# --------------------------------------------------------------------------------- console links


def test_regular_file_at_console_path_is_refused_and_kept(rig_factory):
    rig = rig_factory(["cart-01", "cart-02"])
    console = _console(rig, 1)
    console.parent.mkdir(parents=True)
    console.write_text("an engineer's capture\n")
    msg = _one_line_exit_2(_vrack_up(rig))
    assert msg == (f"{rig.resolve()}: slot 2 (cart-02): console: {console} is a regular file, not a console link "
                   "of the rack: refusing to replace it")
    assert console.read_text() == "an engineer's capture\n", "the file is intact"
    assert not os.path.lexists(_console(rig, 0)), "no other cable was made either"


def test_symlink_to_a_user_file_is_refused_and_kept(rig_factory, tmp_path):
    rig = rig_factory(["cart-01"])
    target = tmp_path / "notes.txt"
    target.write_text("keep me\n")
    console = _console(rig, 0)
    console.parent.mkdir(parents=True)
    console.symlink_to(target)
    rack = Rack(load_rig(rig))
    with pytest.raises(RackError) as ei:
        rack.up()
    assert str(ei.value) == (f"{rig.resolve()}: slot 1 (cart-01): console: {console} is a symlink to "
                             f"{str(target)!r}, not a console link of the rack: refusing to replace it")
    assert os.readlink(console) == str(target) and target.read_text() == "keep me\n"
    _assert_nothing_running(rack)


def test_directory_at_console_path_is_refused(rig_factory):
    rig = rig_factory(["cart-01"])
    console = _console(rig, 0)
    (console / "inside").mkdir(parents=True)
    rack = Rack(load_rig(rig))
    with pytest.raises(RackError) as ei:
        rack.up()
    assert f"slot 1 (cart-01): console: {console} is a directory, not a console link of the rack" in str(ei.value)
    assert (console / "inside").is_dir()
    _assert_nothing_running(rack)


def test_stale_link_of_a_killed_rack_is_reused_and_removed_at_shutdown(rig_factory):
    rig = rig_factory(["cart-01"])
    console = _console(rig, 0)
    console.parent.mkdir(parents=True)
    stale = "/dev/pts/987654"  # the pty of a rack that was killed: gone
    assert not os.path.exists(stale)
    console.symlink_to(stale)
    assert is_rack_link(console)
    rack = Rack(load_rig(rig))
    try:
        rack.up()
        now = os.readlink(console)
        assert now != stale and now == rack.cables[0].tty and is_rack_link(console)
    finally:
        rack.down()
    assert not os.path.lexists(console), "its own link is removed at shutdown"


def test_shutdown_removes_only_its_own_links(rig_factory, tmp_path):
    rig = rig_factory(["cart-01", "cart-02"])
    c1, c2 = _console(rig, 0), _console(rig, 1)
    user = tmp_path / "user.log"
    user.write_text("mine\n")
    rack = Rack(load_rig(rig))
    try:
        rack.up()
        assert is_rack_link(c1) and is_rack_link(c2)
        c1.unlink()
        c1.symlink_to(user)  # somebody put their own link there while the rack ran
    finally:
        rack.down()
    assert os.readlink(c1) == str(user) and user.read_text() == "mine\n"
    assert not os.path.lexists(c2)


# -------------------------------------------------------------------------------------- run dir


def test_run_dir_that_is_a_file_is_refused(rig_factory, tmp_path):
    rig = rig_factory(["cart-01"])
    run = tmp_path / "run"
    run.write_text("not a directory\n")
    rack = Rack(load_rig(rig))
    with pytest.raises(RackError) as ei:
        rack.up()
    assert str(ei.value) == (f"{rig.resolve()}: virtual.run_dir: {run}: exists and is not a directory: "
                             "refusing to touch it")
    assert run.read_text() == "not a directory\n"


def test_foreign_non_empty_run_dir_is_refused_and_left_alone(rig_factory, tmp_path):
    rig = rig_factory(["cart-01"])
    run = tmp_path / "run"
    run.mkdir()
    (run / "thesis.tex").write_text("\\section{}\n")
    (run / "flash").mkdir()
    rack = Rack(load_rig(rig))
    with pytest.raises(RackError) as ei:
        rack.up()
    assert str(ei.value) == (f"{rig.resolve()}: virtual.run_dir: {run}: holds 'thesis.tex' and has no "
                             f"{RUN_DIR_MARKER}: not a rack run dir, refusing to write into it "
                             "(use an empty or new directory)")
    assert sorted(p.name for p in run.iterdir()) == ["flash", "thesis.tex"], "nothing written"
    assert not any((run / "flash").iterdir())


@pytest.mark.parametrize("layout", [[], ["flash/", "logs/", "vrack.log", ".rack.lock"]])
def test_new_empty_or_older_rack_run_dir_is_claimed(tmp_path, layout):
    run = tmp_path / "run"
    run.mkdir()
    for name in layout:
        (run / name.rstrip("/")).mkdir() if name.endswith("/") else (run / name).write_text("")
    claim_run_dir(tmp_path / "rig.yaml", run)
    assert (run / RUN_DIR_MARKER).is_file()
    (run / "anything-else").write_text("")
    claim_run_dir(tmp_path / "rig.yaml", run)  # marked: the rack's own


def test_new_run_dir_is_made_and_marked(tmp_path):
    run = tmp_path / "a" / "run"
    claim_run_dir(tmp_path / "rig.yaml", run)
    assert sorted(p.name for p in run.iterdir()) == [RUN_DIR_MARKER]


@pytest.mark.parametrize("name,make,why", [
    ("flash", lambda p: p.write_text("x"), "flash is not a directory"),
    ("rack.json", lambda p: p.mkdir(), "rack.json is not a regular file"),
    ("rack.json", lambda p: p.symlink_to("/etc/hostname"), "rack.json is not a regular file"),
    (RUN_DIR_MARKER, lambda p: p.mkdir(), f"holds {RUN_DIR_MARKER} that is not a regular file"),
])
def test_layout_names_of_the_wrong_kind_are_refused(tmp_path, name, make, why):
    run = tmp_path / "run"
    run.mkdir()
    make(run / name)
    with pytest.raises(RackError) as ei:
        claim_run_dir(tmp_path / "rig.yaml", run)
    assert str(ei.value).startswith(f"{tmp_path / 'rig.yaml'}: virtual.run_dir: {run}: {why}"), str(ei.value)
    assert os.path.lexists(run / name)


def test_harness_checks_the_run_dir_before_it_writes_the_rack_log(rig_factory, tmp_path):
    from harness.config import Rig
    from harness.rackctl import RackStartError, start_rack

    rig = Rig.load(rig_factory(["cart-01"]))
    run = tmp_path / "run"
    run.mkdir()
    (run / "photos").mkdir()
    with pytest.raises(RackStartError) as ei:
        start_rack(rig, timeout=30)
    assert str(ei.value) == (f"{rig.path}: virtual.run_dir: {run}: holds 'photos' and has no {RUN_DIR_MARKER}: "
                             "not a rack run dir, refusing to write into it (use an empty or new directory)")
    assert [p.name for p in run.iterdir()] == ["photos"], "no vrack.log dropped there"


# ---------------------------------------------------------------------------------- flash files


@pytest.mark.parametrize("rel,what", [("flash/slot01.bin", "flash"), ("logs/slot01-process.log", "log"),
                                      ("carts/cart-01.json", "cart config copy"), ("state/slot01", "state")])
def test_rack_file_that_is_a_symlink_is_refused(rig_factory, tmp_path, rel, what):
    rig = rig_factory(["cart-01"])
    dump = tmp_path / "field-dump.bin"
    dump.write_bytes(b"\x00" * 100)
    flash = tmp_path / "run" / rel
    flash.parent.mkdir(parents=True)
    flash.symlink_to(dump)
    rack = Rack(load_rig(rig))
    with pytest.raises(RackError) as ei:
        rack.up()
    assert str(ei.value) == (f"{rig.resolve()}: slot 1 (cart-01): {what}: {flash} is not a regular file: "
                             "refusing to touch it")
    assert dump.read_bytes() == b"\x00" * 100 and os.readlink(flash) == str(dump)
    _assert_nothing_running(rack)
    assert not os.path.lexists(_console(rig, 0)), "the cable it made is gone again"


def test_foreign_stamp_is_not_overwritten(rig_factory, tmp_path):
    rig = rig_factory(["cart-01"])
    stamp = tmp_path / "run" / "flash" / "slot01.factory"
    stamp.parent.mkdir(parents=True)
    stamp.write_text("my notes about slot 1\n")
    rack = Rack(load_rig(rig))
    with pytest.raises(RackError) as ei:
        rack.up()
    assert str(ei.value) == (f"{rig.resolve()}: slot 1 (cart-01): flash stamp: {stamp} is not a stamp the rack "
                             "wrote: refusing to overwrite it")
    assert stamp.read_text() == "my notes about slot 1\n"
    assert not (stamp.parent / "slot01.bin").exists()
    _assert_nothing_running(rack)


def test_stamped_flash_is_reprovisioned_but_unstamped_is_kept(rig_factory, tmp_path):
    rig = rig_factory(["cart-01", "cart-02"])
    rack = Rack(load_rig(rig))
    try:
        rack.up()
    finally:
        rack.down()
    flash_dir = tmp_path / "run" / "flash"
    f1, f2 = flash_dir / "slot01.bin", flash_dir / "slot02.bin"
    (flash_dir / "slot01.factory").write_text("0" * 64 + "\n")  # provisioned from another factory build
    (flash_dir / "slot02.factory").unlink()  # a flash put there on purpose
    marked1, marked2 = bytearray(f1.read_bytes()), bytearray(f2.read_bytes())
    marked1[-1:] = marked2[-1:] = b"\x42"  # the last page (settings region, unused tail) marked by hand
    f1.write_bytes(marked1)
    f2.write_bytes(marked2)
    slot_a = slice(2 * 4096, 2 * 4096 + 65536)
    rack = Rack(load_rig(rig))
    try:
        rack.up()
    finally:
        rack.down()
    assert f1.read_bytes()[-1:] == b"\xff", "the stamped flash was provisioned again"
    assert (flash_dir / "slot01.factory").read_text() != "0" * 64 + "\n"
    assert f2.read_bytes()[slot_a] == bytes(marked2[slot_a]), "the unstamped flash kept its slot A"
    assert not (flash_dir / "slot02.factory").exists(), "and no stamp was made up for it"


# ---------------------------------------------------------------------- start-up errors: one line


def test_supply_port_in_use_is_one_line_exit_2(rig_factory):
    rig = rig_factory(["cart-01", "cart-02"])
    port = _supply_port(rig, "psu-r")
    with _listening(port):
        msg = _one_line_exit_2(_vrack_up(rig))
    assert msg == f"{rig.resolve()}: supply psu-r: port {port} on 127.0.0.1 is in use"
    assert not os.path.lexists(_console(rig, 0)) and not (rig.parent / "run" / "rack.json").exists()


def test_broker_port_in_use_is_one_line_exit_2(rig_factory):
    rig = rig_factory(["cart-01"])
    port = _data(rig)["broker"]["port"]
    with _listening(port):
        msg = _one_line_exit_2(_vrack_up(rig))
    assert msg == f"{rig.resolve()}: broker: port {port} on 127.0.0.1 is in use"


@pytest.mark.parametrize("who", ["psu-k", "broker"])
def test_port_taken_after_the_check_is_the_same_line_and_rolls_back(rig_factory, monkeypatch, who):
    """The listener itself loses the race (the quick check said free): same one line, nothing left running."""
    import vrack.rack

    rig = rig_factory(["cart-01", "cart-02"])
    port = _data(rig)["broker"]["port"] if who == "broker" else _supply_port(rig, who)
    monkeypatch.setattr(vrack.rack, "_port_free", lambda host, port: True)
    rack = Rack(load_rig(rig))
    with _listening(port), pytest.raises(RackError) as ei:
        rack.up()
    label = "broker" if who == "broker" else f"supply {who}"
    assert str(ei.value) == f"{rig.resolve()}: {label}: port {port} on 127.0.0.1 is in use"
    _assert_nothing_running(rack)
    assert not os.path.lexists(_console(rig, 0)) and not os.path.lexists(_console(rig, 1))


def test_start_rack_says_the_cause_first(rig_factory):
    from harness.config import Rig
    from harness.rackctl import RackStartError, start_rack

    path = rig_factory(["cart-01", "cart-02"])
    rig = Rig.load(path)
    port = _supply_port(path, "psu-k")
    with _listening(port), pytest.raises(RackStartError) as ei:
        start_rack(rig, timeout=60)
    first = str(ei.value).splitlines()[0]
    assert first.startswith(f"{path.resolve()}: supply psu-k: port {port} on 127.0.0.1 is in use"), str(ei.value)
    assert str(rig.run_dir / "vrack.log") in str(ei.value)


def test_bad_cart_config_is_one_line_exit_2(rig_factory, tmp_path):
    configs = tmp_path / "configs"
    shutil.copytree(ROOT / "configs", configs)
    cart = configs / "carts" / "cart-02.yaml"
    cart.write_text(cart.read_text().replace("page_size: 4096", "page_size: 1000"))
    rig = rig_factory(["cart-01", "cart-02"], configs=str(configs))
    msg = _one_line_exit_2(_vrack_up(rig))
    assert msg == (f"{rig.resolve()}: slot 2 (cart-02): cart: {cart}: flash.page_size: expected 2048 or 4096, "
                   "got 1000")


def test_cart_whose_id_is_not_its_file_name_is_refused(rig_factory, tmp_path):
    configs = tmp_path / "configs"
    shutil.copytree(ROOT / "configs", configs)
    cart = configs / "carts" / "cart-01.yaml"
    cart.write_text(cart.read_text().replace("id: cart-01", "id: cart-09"))
    rig = rig_factory(["cart-01"], configs=str(configs))
    msg = _one_line_exit_2(_vrack_up(rig))
    assert msg == f"{rig.resolve()}: slot 1 (cart-01): cart: {cart}: id: 'cart-09' does not match the file name"


@pytest.mark.parametrize("text,part", [
    ("kind: virtual\nkind: virtual\n", "line 2: not valid YAML: duplicate key 'kind'"),
    ("name: \"a\\u202eb\"\n", "name: control or bidirectional-override character U+202E"),
])
def test_bad_rig_file_is_one_line_exit_2(tmp_path, text, part):
    rig = tmp_path / "rig.yaml"
    rig.write_text(text)
    msg = _one_line_exit_2(_vrack_up(rig))
    assert msg.startswith(f"{rig.resolve()}: ") and part in msg, msg
