"""harness.console against a pty (the virtual rack's cable) and a TCP server (ser2net-style socket://).

The test plays the cart: it writes into the pty master (raw) and the Console opens the slave.
"""

from __future__ import annotations

import os
import pickle
import re
import select
import socket
import subprocess
import sys
import threading
import time
import tty

import pytest

import harness.console
from harness.console import (
    Console,
    ConsoleError,
    ConsoleTimeout,
    Line,
    Shell,
    ShellError,
    port_options,
    serial_url,
    strip_control,
)

ISO_LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}[+-]\d\d:\d\d (.*)$")


class Pty:
    """A pty standing in for a USB-UART cable: the test writes the master, the Console opens the slave."""

    def __init__(self) -> None:
        self.master, self.slave = os.openpty()
        tty.setraw(self.master)
        self.path = os.ttyname(self.slave)

    def write(self, data: str | bytes) -> None:
        os.write(self.master, data.encode() if isinstance(data, str) else data)

    def read_until(self, marker: bytes, timeout: float = 2.0) -> bytes:
        buf = b""
        deadline = time.monotonic() + timeout
        while marker not in buf:
            left = deadline - time.monotonic()
            assert left > 0, f"waited {timeout} s for {marker!r} from the console, got {buf!r}"
            ready, _, _ = select.select([self.master], [], [], left)
            if ready:
                buf += os.read(self.master, 4096)
        return buf

    def release_slave(self) -> None:
        """Close the test's own slave fd once the Console holds the port."""
        if self.slave >= 0:
            os.close(self.slave)
            self.slave = -1

    def close(self) -> None:
        for fd in (self.master, self.slave):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.master = self.slave = -1


@pytest.fixture
def pty():
    p = Pty()
    yield p
    p.close()


@pytest.fixture
def make_console(tmp_path):
    made: list[Console] = []

    def make(url: str, **kw) -> Console:
        kw.setdefault("name", "cart-01")
        kw.setdefault("log_path", tmp_path / "logs" / f"{kw['name']}.log")
        console = Console(url, **kw)
        console.open()
        made.append(console)
        return console

    yield make
    for console in made:
        console.close()


@pytest.fixture
def console(pty, make_console):
    c = make_console(pty.path)
    pty.release_slave()
    return c


def arrived(console: Console, pattern: str) -> threading.Event:
    """An event set when a line matching ``pattern`` arrives (without moving the expect cursor)."""
    event = threading.Event()
    console.add_listener(pattern, lambda line, m: event.set())
    return event


_BASELINE: set[threading.Thread] = set()


@pytest.fixture(autouse=True)
def _other_consoles():
    """Consoles that other tests in this process hold open (a suite's carts) are not ours to count."""
    _BASELINE.clear()
    _BASELINE.update(threading.enumerate())


def console_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("console-") and t not in _BASELINE]


# ---- lines -------------------------------------------------------------------------------------

def test_lines_are_timestamped_stripped_and_in_order(pty, console):
    t0, w0 = time.monotonic(), time.time()
    sent = [
        "CART-BL 2.1.0 hw=rev-c cfg=cart-01\r\n",
        "\x1b[32mBL: slot A ok\x1b[0m fw=1.4.2 size=262144\r\n",
        "BOOT: bl=2.1.0 slot=A fw=1.4.2 cfg=cart-01 mode=normal\n",
        "FW: ready\r\n",
    ]
    for text in sent:
        pty.write(text)
        console.expect("^" + re.escape(strip_control(text)) + "$", 2)
    lines = console.lines()
    assert [line.text for line in lines] == [
        "CART-BL 2.1.0 hw=rev-c cfg=cart-01",
        "BL: slot A ok fw=1.4.2 size=262144",
        "BOOT: bl=2.1.0 slot=A fw=1.4.2 cfg=cart-01 mode=normal",
        "FW: ready",
    ]
    assert [line.index for line in lines] == [0, 1, 2, 3]
    monos = [line.t_mono for line in lines]
    assert monos == sorted(monos) and len(set(monos)) == 4
    assert t0 <= monos[0] and monos[-1] <= time.monotonic()
    assert all(w0 - 0.5 <= line.t_wall <= time.time() + 0.5 for line in lines)
    assert console.lines(1, 3) == lines[1:3]
    assert console.slice_text(2) == "BOOT: bl=2.1.0 slot=A fw=1.4.2 cfg=cart-01 mode=normal\nFW: ready"
    assert isinstance(lines[0], Line)


def test_expect_matches_across_chunk_boundaries(pty, console):
    chunks = [b"BOOT: bl=2.1.0 sl", b"ot=A fw=1.4", b".2 cfg=cart-01 mode=nor", b"mal\r",
              b"\nsensor temp-tmp117 ok value=21.5\xc2", b"\xb0C\r\nFW: ready\r\n"]

    def trickle():
        for chunk in chunks:
            pty.write(chunk)
            time.sleep(0.03)

    writer = threading.Thread(target=trickle)
    writer.start()
    try:
        m = console.expect(r"^BOOT: bl=\S+ slot=(\w) fw=([\d.]+) cfg=(\S+) mode=normal$", 3)
        assert m.groups() == ("A", "1.4.2", "cart-01")
        console.expect(r"^FW: ready$", 3)
    finally:
        writer.join()
    assert [line.text for line in console.lines()] == [
        "BOOT: bl=2.1.0 slot=A fw=1.4.2 cfg=cart-01 mode=normal",
        "sensor temp-tmp117 ok value=21.5°C",
        "FW: ready",
    ]


def test_expect_matches_a_prompt_without_newline(pty, console):
    pty.write("FW: ready\r\ncart> ")
    m = console.expect(r"cart> $", 2)
    assert m.group(0) == "cart> "
    assert console.partial == "cart> " and console.lines()[-1].text == "FW: ready"
    # typing at the prompt continues the same line; only the new part can match
    pty.write("version\r\n")
    assert console.expect(r"^version$", 2).group(0) == "version"
    assert console.lines()[-1].text == "cart> version"


def test_expect_any_returns_the_earliest_line(pty, console):
    pty.write("BL: slot B invalid: bad signature\r\nBL: slot A ok fw=1.4.2\r\nFW: ready\r\n")
    key, m = console.expect_any({"ready": r"^FW: ready$", "invalid": r"^BL: slot (\w) invalid: (.*)$"}, 2)
    assert key == "invalid" and m.groups() == ("B", "bad signature")
    key, _ = console.expect_any({"ready": r"^FW: ready$", "invalid": r"invalid"}, 2)
    assert key == "ready"


def test_mark_makes_stale_lines_unmatchable(pty, console):
    pty.write("FW: ready\r\nstale-end\r\nFW: rea")
    console.expect(r"^FW: rea$", 2)          # the unterminated tail has arrived too
    assert console.mark() == 2
    with pytest.raises(ConsoleTimeout):
        console.expect(r"FW: ready", 0.1)
    # the stale half-line is completed after the mark: its old part still cannot match
    done = arrived(console, r"^FW: ready$")
    pty.write("dy\r\n")
    assert done.wait(2)
    with pytest.raises(ConsoleTimeout):
        console.expect(r"FW: ready", 0.05)
    pty.write("FW: ready\r\n")
    console.expect(r"^FW: ready$", 2)
    assert [line.text for line in console.lines(2)] == ["FW: ready", "FW: ready"]


def test_timeout_error_names_pattern_wait_tail_and_log(pty, make_console, tmp_path):
    c = make_console(pty.path, tail_lines=5)
    pty.release_slave()
    for i in range(12):
        pty.write(f"\x1b[33mBL: line {i}\x1b[0m\r\n")
    pty.write("cart> ")
    c.expect(r"cart> $", 2)
    t0 = time.monotonic()
    with pytest.raises(ConsoleTimeout) as info:
        c.expect(r"FW: ready", 0.3, what="firmware ready")
    elapsed = time.monotonic() - t0
    e = info.value
    assert e.pattern == "FW: ready"
    assert 0.3 <= e.waited <= elapsed < 1.0
    assert e.log_path == tmp_path / "logs" / "cart-01.log"
    assert e.tail.splitlines() == ["BL: line 8", "BL: line 9", "BL: line 10", "BL: line 11", "cart> "]
    msg = str(e)
    for needle in ("'FW: ready'", "firmware ready", "0.30 s", "BL: line 11", "cart> ", str(e.log_path)):
        assert needle in msg, needle
    assert "BL: line 7" not in msg and "\x1b" not in msg
    print("\n" + msg)
    again = pickle.loads(pickle.dumps(e))
    assert str(again) == msg and isinstance(again, ConsoleTimeout)

    with pytest.raises(ConsoleTimeout) as info:
        c.expect_any({"ready": "FW: ready", "crash": "BL: firmware crashed"}, 0.05)
    assert "ready: FW: ready | crash: BL: firmware crashed" in str(info.value)


def test_a_log_write_that_fails_is_kept_and_the_console_goes_on(pty, tmp_path, make_console):
    """Disk full while logging (a log that is /dev/full: a real ENOSPC): the console keeps reading and
    matching, the port is not "lost", and log_error says why the log stopped (the plugin ends the run)."""
    log_path = tmp_path / "slot01.log"
    log_path.symlink_to("/dev/full")
    c = make_console(pty.path, name="slot01", log_path=log_path)
    pty.release_slave()
    pty.write("BL: first line\r\n")
    c.expect("first line", 2)
    assert c.log_error == f"cannot write {log_path}: No space left on device"
    pty.write("FW: ready\r\n")
    c.expect("FW: ready", 2)
    c.send("version")
    assert b"version" in pty.read_until(b"\n")
    assert c.connected


def test_log_file_has_one_flushed_line_per_received_line(pty, tmp_path, make_console):
    log_path = tmp_path / "deep" / "er" / "slot01.log"
    c = make_console(pty.path, name="slot01", log_path=log_path)
    pty.release_slave()
    pty.write("CART-BL 2.1.0\r\n\x1b[31mBL: watchdog reset\x1b[0m\r\n")
    c.expect("watchdog", 2)
    pty.write("FW: ready\r\n")
    c.expect("FW: ready", 2)
    # flushed as received: the earlier lines are on disk before close
    assert "BL: watchdog reset" in log_path.read_text()
    c.send("version")
    pty.write("cart> ")
    c.expect("cart> ", 2)
    c.close()
    entries = log_path.read_text().splitlines()
    texts = []
    for entry in entries:
        m = ISO_LINE.match(entry)
        assert m, entry
        texts.append(m.group(1))
    received = [t for t in texts if not t.startswith("[console] ")]
    assert received == ["CART-BL 2.1.0", "BL: watchdog reset", "FW: ready"]
    notes = [t for t in texts if t.startswith("[console] ")]
    assert notes[0] == f"[console] open {pty.path}"
    assert "[console] >> version" in notes
    assert "[console] unterminated at close: 'cart> '" in notes
    assert notes[-1] == "[console] closed"


# ---- writing -----------------------------------------------------------------------------------

def test_send_writes_text_and_line_ending(pty, console):
    console.send("slot status")
    assert pty.read_until(b"\n") == b"slot status\r\n"
    console.send_raw(b"\x03x")
    assert pty.read_until(b"x") == b"\x03x"


def test_send_uses_the_configured_line_ending(pty, make_console):
    c = make_console(pty.path, line_ending="\n")
    c.send("info")
    assert pty.read_until(b"\n") == b"info\n"


class FakeShellFirmware(threading.Thread):
    """Just enough of the reference firmware's shell, on the pty master."""

    REPLIES = {
        "version": ["version 1.4.2"],
        "slot status": ["slot active=A booted=A pending=- tries=0 confirmed=yes",
                        "slot A fw=1.4.2 valid=yes", "slot B fw=- valid=no"],
        "quiet": [],
    }

    def __init__(self, master: int, echo: bool = True):
        super().__init__(daemon=True)
        self.master = master
        self.echo = echo
        self.stop_r, self.stop_w = os.pipe()

    def out(self, data: bytes) -> None:
        os.write(self.master, data)

    def run(self) -> None:
        self.out(b"FW: ready\r\ncart> ")
        command = b""
        while True:
            ready, _, _ = select.select([self.master, self.stop_r], [], [])
            if self.stop_r in ready:
                return
            for byte in os.read(self.master, 4096):
                ch = bytes([byte])
                if ch == b"\n":
                    continue
                if ch != b"\r":
                    command += ch
                    if self.echo:
                        self.out(ch)         # character echo, as a UART shell does
                    continue
                if self.echo:
                    self.out(b"\r\n")
                cmd, command = command.decode(), b""
                replies = self.REPLIES.get(cmd, [f"error: unknown command '{cmd}'"])
                self.out(b"".join(r.encode() + b"\r\n" for r in replies) + b"cart> ")

    def stop(self) -> None:
        os.write(self.stop_w, b"x")
        self.join(2)
        os.close(self.stop_r)
        os.close(self.stop_w)


@pytest.mark.parametrize("echo", [True, False], ids=["echo", "no-echo"])
def test_shell_run_skips_echo_stops_at_prompt_and_raises_on_error(pty, console, echo):
    firmware = FakeShellFirmware(pty.master, echo=echo)
    firmware.start()
    try:
        console.expect(r"^cart> $", 2)
        shell = Shell(console, echo=echo)
        assert shell.run("version") == ["version 1.4.2"]
        assert shell.run("slot status") == FakeShellFirmware.REPLIES["slot status"]
        assert shell.run("quiet") == []
        with pytest.raises(ShellError) as info:
            shell.run("bogus")
        assert info.value.line == "error: unknown command 'bogus'"
        assert info.value.command == "bogus"
        assert shell.run("version") == ["version 1.4.2"]      # still in step after an error
        assert console.partial == "cart> "
    finally:
        firmware.stop()


def test_shell_echo_is_the_command_line_not_an_async_line_ending_with_its_words(pty, console):
    """An agent's line that ends with the command's word ("... same version") comes out while the command
    is typed: taken for the echo, the echo line ("cart> version") then passed for the prompt: no reply."""
    pty.write("cart> ")
    console.expect(r"^cart> $", 2)
    shell = Shell(console)

    def firmware():  # as the reference firmware's console printed it in a CI run
        assert pty.read_until(b"version\r\n")
        pty.write("\r\nOTA: rejected job=j-7: same version\r\ncart> version\r\nversion 1.4.22\r\ncart> ")

    t = threading.Thread(target=firmware)
    t.start()
    try:
        assert shell.run("version", timeout=2) == ["version 1.4.22"]
    finally:
        t.join()


def test_shell_run_times_out_with_evidence(pty, console):
    pty.write("FW: ready\r\ncart> ")
    console.expect(r"^cart> $", 2)
    with pytest.raises(ConsoleTimeout) as info:
        Shell(console).run("version", timeout=0.2)
    assert "echo of 'version'" in str(info.value)


# ---- listeners ---------------------------------------------------------------------------------

def test_listener_fires_on_its_line_on_the_reader_thread(pty, console, tmp_path):
    hits = []

    def on_page(line: Line, m: re.Match) -> None:
        hits.append((line, m.group(1), threading.current_thread().name, time.monotonic()))

    handle = console.add_listener(r"^FW: writing page (\d+)/4$", on_page)
    console.add_listener(r"page 2/", lambda line, m: 1 / 0)      # a broken listener must not stop the reader
    pty.write("".join(f"FW: writing page {i}/4\r\n" for i in range(1, 5)) + "FW: done\r\n")
    console.expect(r"^FW: done$", 2)
    assert [h[1] for h in hits] == ["1", "2", "3", "4"]
    assert all(h[2] == "console-cart-01" for h in hits)
    assert all(0 <= h[3] - h[0].t_mono < 0.1 for h in hits)
    assert [h[0].text for h in hits] == [f"FW: writing page {i}/4" for i in range(1, 5)]
    console.remove_listener(handle)
    console.remove_listener(handle)                              # idempotent
    pty.write("FW: writing page 1/4\r\nFW: done\r\n")
    console.expect(r"^FW: done$", 2)
    assert len(hits) == 4
    assert "ZeroDivisionError" in (tmp_path / "logs" / "cart-01.log").read_text()


# ---- power loss and a lost port ------------------------------------------------------------------

CART_SCRIPT = r"""
import os, sys, time
fd = int(sys.argv[1])
os.write(fd, sys.argv[2].encode().decode("unicode_escape").encode())
time.sleep(60)
"""


def start_cart(pty: Pty, output: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", CART_SCRIPT, str(pty.master), output],
                            pass_fds=(pty.master,))


def test_cart_losing_power_mid_line_does_not_break_the_console(pty, console):
    cart = start_cart(pty, r"CART-BL 2.1.0 hw=rev-c cfg=cart-01\r\nFW: ready\r\nFW: writing pag")
    try:
        console.expect(r"^FW: ready$", 5)
        console.expect(r"FW: writing pag$", 2)
    finally:
        cart.kill()                                  # power off: SIGKILL, as the rack does
        cart.wait()
    console.mark()                                   # the harness marks before power on
    console.send("x")                                # bytes to an unpowered cart are lost, not an error
    with pytest.raises(ConsoleTimeout):
        console.expect(r"^CART-BL", 0.1)
    cart = start_cart(pty, r"CART-BL 2.1.0 hw=rev-c cfg=cart-01\r\nFW: ready\r\n")
    try:
        m = console.expect(r"^CART-BL (\S+)", 5)     # the new boot, though glued to the half line
        assert m.group(1) == "2.1.0"
        console.expect(r"^FW: ready$", 2)
    finally:
        cart.kill()
        cart.wait()
    assert console.lines()[2].text == "FW: writing pagCART-BL 2.1.0 hw=rev-c cfg=cart-01"
    assert len(console_threads()) == 1


def test_lost_port_is_reopened_and_expect_keeps_waiting(tmp_path, make_console):
    link = tmp_path / "dev" / "serial" / "by-id" / "vcart-slot01"
    link.parent.mkdir(parents=True)
    first = Pty()
    os.symlink(first.path, link)
    c = make_console(str(link))
    first.release_slave()
    first.write("FW: ready\r\n")
    c.expect(r"^FW: ready$", 2)

    second: list[Pty] = []
    stop = threading.Event()

    def replug_and_talk():
        time.sleep(0.2)
        p = Pty()                                    # a new adapter enumerates; udev moves the link
        second.append(p)
        tmp_link = link.with_name("tmp-link")
        os.symlink(p.path, tmp_link)
        os.replace(tmp_link, link)
        i = 0
        while not stop.wait(0.02):                   # Serial.open() flushes input: keep talking
            p.write(f"tick {i}\r\n")
            i += 1

    os.unlink(link)                                  # adapter unplugged: udev removes its by-id link,
    first.close()                                    # the port errors (its pts number is free for others:
                                                     # a link left dangling would let the console open
                                                     # another test's pty, as a parallel CI run showed)
    talker = threading.Thread(target=replug_and_talk)
    talker.start()
    try:
        t0 = time.monotonic()
        c.expect(r"^tick \d+$", 5)
        outage = time.monotonic() - t0
        c.send("version")
        assert second[0].read_until(b"version\r\n")
    finally:
        stop.set()
        talker.join()
    log_text = (tmp_path / "logs" / "cart-01.log").read_text()
    assert "[console] port lost: " in log_text
    assert "[console] port reopened" in log_text
    assert 0.2 <= outage < 2.5

    # unplugged again for good: close() must not wait for the backoff
    second[0].close()
    time.sleep(0.1)
    t0 = time.monotonic()
    c.close()
    assert time.monotonic() - t0 < 0.5
    assert not console_threads()


def test_socket_console_and_reconnect(tmp_path, make_console):
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(3)
    port = server.getsockname()[1]
    try:
        c = make_console(f"socket://127.0.0.1:{port}")
        conn, _ = server.accept()
        conn.sendall(b"CART-BL 2.1")
        time.sleep(0.02)
        conn.sendall(b".0 hw=rev-c\r\nFW: ready\r\ncart> ")
        c.expect(r"^CART-BL 2\.1\.0 hw=rev-c$", 2)
        c.expect(r"^cart> $", 2)
        c.send("version")
        got = b""
        conn.settimeout(2)
        while not got.endswith(b"\r\n"):
            got += conn.recv(100)
        assert got == b"version\r\n"

        conn.close()                                 # ser2net restarted: the connection drops
        conn, _ = server.accept()                    # the console reconnects by itself
        stop = threading.Event()

        def talk():
            while not stop.wait(0.02):
                try:
                    conn.sendall(b"FW: ready\r\n")
                except OSError:
                    return

        talker = threading.Thread(target=talk)
        talker.start()
        try:
            c.expect(r"^FW: ready$", 3)
        finally:
            stop.set()
            talker.join()
        conn.close()
        log_text = (tmp_path / "logs" / "cart-01.log").read_text()
        assert "[console] port lost: " in log_text and "socket disconnected" in log_text
        texts = [line.text for line in c.lines()]           # the half line ends at the break: no glue
        assert texts[texts.index("cart> ") + 1] == "FW: ready"
    finally:
        server.close()


@pytest.mark.parametrize(("url", "opened"), [
    ("rfc2217://ser2net.lab:4004", "rfc2217://ser2net.lab:4004?ign_set_control"),
    ("RFC2217://ser2net.lab:4004/", "rfc2217://ser2net.lab:4004/?ign_set_control"),
    ("rfc2217://ser2net.lab:4004?timeout=5", "rfc2217://ser2net.lab:4004?timeout=5&ign_set_control"),
    ("rfc2217://ser2net.lab:4004?ign_set_control", "rfc2217://ser2net.lab:4004?ign_set_control"),
    ("rfc2217://ser2net.lab:4004?logging=debug&ign_set_control=1",
     "rfc2217://ser2net.lab:4004?logging=debug&ign_set_control=1"),
    ("socket://ser2net.lab:4005", "socket://ser2net.lab:4005"),
    ("/dev/serial/by-id/usb-FTDI-if00-port0", "/dev/serial/by-id/usb-FTDI-if00-port0"),
])
def test_rfc2217_urls_get_ign_set_control_once_others_are_unchanged(url, opened):
    assert serial_url(url) == opened


def test_writes_are_bounded_by_write_timeout_except_on_rfc2217():
    """pyserial's RFC 2217 client refuses write_timeout (its socket's timeout bounds writes there)."""
    assert "write_timeout" not in port_options("rfc2217://h:1?ign_set_control")
    for url in ("socket://h:1", "/dev/ttyUSB0", "loop://"):
        assert port_options(url)["write_timeout"] == harness.console._WRITE_TIMEOUT
    assert port_options("socket://h:1", 9600)["baudrate"] == 9600


def test_wait_port_says_why_a_lost_port_is_down_and_returns_once_it_is_back(tmp_path, make_console):
    link = tmp_path / "dev" / "serial" / "by-id" / "vcart-slot01"
    link.parent.mkdir(parents=True)
    first = Pty()
    os.symlink(first.path, link)
    c = make_console(str(link))
    first.release_slave()
    c.wait_port(0)                                   # a port that is up: at once
    assert c.connected
    first.close()                                    # unplugged: udev removes the by-id link too (a link left
    link.unlink()                                    # to the freed /dev/pts/N could reach another process's pty)
    c.wait_port(3, up=False, what="adapter unplugged")
    assert not c.connected
    t0 = time.monotonic()
    with pytest.raises(ConsoleError) as err:
        c.wait_port(0.2, what="before power on")
    assert 0.2 <= time.monotonic() - t0 < 1.0
    msg = str(err.value)
    assert f"port {link} not up (before power on) after 0.2" in msg and "down: " in msg
    assert "full log: " in msg

    second = Pty()                                   # plugged in again
    try:
        os.symlink(second.path, link)
        c.wait_port(5, what="adapter replugged")
        assert c.connected
    finally:
        c.close()
        second.close()
    with pytest.raises(ConsoleError, match="not open"):
        c.wait_port(1)


def test_port_without_a_file_descriptor_is_read_with_a_timeout(make_console):
    c = make_console("loop://")                      # like rfc2217://: no fileno(), read(in_waiting or 1)
    assert c._port is not None and c._port.timeout > 0
    c.send("FW: ready")
    c.expect(r"^FW: ready$", 2)
    t0 = time.monotonic()
    c.close()
    assert time.monotonic() - t0 < 0.5 and not console_threads()


# ---- lifecycle ---------------------------------------------------------------------------------

def test_close_is_idempotent_and_leaves_no_thread(pty, tmp_path):
    c = Console(pty.path, name="cart-02", log_path=tmp_path / "c.log")
    c.open()
    thread = c._thread
    c.open()
    assert c._thread is thread and len(console_threads()) == 1

    waiter_error: list[BaseException] = []

    def wait_forever():
        try:
            c.expect("never", 30)
        except BaseException as exc:  # noqa: BLE001
            waiter_error.append(exc)

    waiter = threading.Thread(target=wait_forever)
    waiter.start()
    time.sleep(0.05)
    t0 = time.monotonic()
    c.close()
    c.close()
    assert time.monotonic() - t0 < 0.5
    waiter.join(2)
    assert not waiter.is_alive() and type(waiter_error[0]) is ConsoleError
    assert not thread.is_alive() and not console_threads()
    assert not c.is_open
    with pytest.raises(ConsoleError):
        c.send("version")
    t0 = time.monotonic()
    with pytest.raises(ConsoleError):
        c.expect("anything", 5)
    assert time.monotonic() - t0 < 0.5

    with Console(pty.path, name="cart-03") as c3:
        assert c3.is_open and len(console_threads()) == 1
    assert not c3.is_open and not console_threads()


def test_open_failure_is_a_console_error(tmp_path):
    c = Console(str(tmp_path / "no-such-tty"), name="cart-09", log_path=tmp_path / "c.log")
    with pytest.raises(ConsoleError, match="cannot open"):
        c.open()
    assert not c.is_open and not console_threads()
    c.close()
