"""Power cuts on an event (harness/cut.py): arming, firing, the timing record, the refusals.

Unit tests run against the fake supply and the drivers over a recording link or an emulated
supply, with a real `Console` on pyserial's ``loop://``; the integration tests bring up a
virtual rack and cut a real cart process through its SCPI supply.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time

import pytest

from harness.cart import Bench
from harness.config import Rig
from harness.console import Console
from harness.cut import CutError, CutTimeout, cut_on_console, cut_on_mqtt
from harness.power import DIALECTS, FakeSupply, KeysightE36312A, RohdeNgx, SiglentSpd
from harness.rackctl import start_rack, stop_rack
from vrack.psu import EmulatedSupply, RxLog

# ------------------------------------------------------------------------------------ helpers


class RecordingLink:
    """A fake VISA session with no socket: writes recorded; OUTP?-style queries answer 'on'."""

    def __init__(self):
        self.log: list[str] = []

    def write(self, command: str) -> None:
        self.log.append(command)

    def query(self, command: str) -> str:
        self.log.append(command)
        if command == "SYST:STAT?":
            return "0x0034"
        if command.startswith(":OUTP?"):
            return "ON"
        return "1"

    def close(self) -> None:
        pass


@pytest.fixture
def console(tmp_path):
    """A real Console on pyserial's loop:// port: what is sent comes back as received lines."""
    c = Console("loop://", name="loop", log_path=tmp_path / "loop.log", line_ending="\n")
    c.open()
    yield c
    c.close()


def _say(console: Console, text: str, timeout: float = 5.0) -> None:
    """Send a line and wait until the console has published it (listeners have run by then)."""
    console.send(text)
    console.expect("^" + re.escape(text) + "$", timeout)


def _on(supply: FakeSupply, ch: int = 1) -> FakeSupply:
    supply.on(ch)
    return supply


# ------------------------------------------------------------------------ arming (no rack)

OFF_BYTES = {
    "keysight-e36312a": (b"OUTP OFF,(@2)\n", False),
    "rigol-dp800": (b":OUTP CH2,OFF\n", False),
    "rs-ngx": (b"INST:NSEL 2\nOUTP:SEL OFF\n", True),
    "rs-hmc": (b"INST:NSEL 2\nOUTP:CHAN OFF\n", True),
    "siglent-spd": (b"OUTP CH2,OFF\n", True),
    "aimtti": (b"OP2 0\n", False),
}


@pytest.mark.parametrize("dialect", sorted(DIALECTS))
def test_arming_pre_encodes_the_off_and_firing_sends_it(dialect, tmp_path):
    link = RecordingLink()
    supply = DIALECTS[dialect]("psu-t", "TCPIP0::127.0.0.1::5025::SOCKET", 3, open_link=lambda: link,
                               lock_dir=tmp_path)
    supply.command_interval_s = 0.0 if dialect != "siglent-spd" else supply.command_interval_s
    armed = supply.arm_off(2)
    data, locked = OFF_BYTES[dialect]
    assert armed.data == data and armed.locked is locked
    assert armed.commands == tuple(data.decode().splitlines())
    assert link.log == [], "arming opens the session, sends nothing"
    before = time.monotonic_ns()
    sent = armed.fire()
    assert before <= sent <= time.monotonic_ns()
    assert link.log == list(armed.commands)


def test_every_dialect_of_ours_switches_outputs_per_channel():
    assert all(cls.PER_CHANNEL_OUTPUT for cls in DIALECTS.values())


def test_a_supply_that_switches_all_outputs_at_once_is_refused(console):
    supply = _on(FakeSupply("e3631a", per_channel_output=False, model="E3631A"))
    with pytest.raises(CutError, match="switches every output at once") as ei:
        cut_on_console((supply, 1), console, "^EV: ")
    assert "e3631a ch1" in str(ei.value)
    assert console._listeners == (), "nothing attached"
    assert supply.state[1].output, "nothing switched"


def test_a_channel_already_off_is_refused(console):
    supply = FakeSupply("fake")
    with pytest.raises(CutError, match=r"already off \(nothing to cut"):
        cut_on_console((supply, 1), console, "^EV: ")
    assert console._listeners == ()
    assert ("fire", 1) not in supply.calls


def test_bad_nth_and_delay_are_refused(console):
    supply = _on(FakeSupply())
    for kw in ({"nth": 0}, {"nth": True}, {"delay_s": -0.1}):
        with pytest.raises(ValueError):
            cut_on_console((supply, 1), console, "^EV: ", **kw)
    assert console._listeners == ()


# ----------------------------------------------------------------- firing on a console line


def test_cut_on_a_console_line_records_when(console):
    supply = _on(FakeSupply())
    cut = cut_on_console((supply, 1), console, r"^EV: verify")
    assert console._listeners and cut.state == "armed" and cut.off_bytes == b"OFF 1\n"
    _say(console, "EV: download off=0 t=111")
    assert supply.state[1].output, "another event does not fire"
    _say(console, "EV: verify t=123456789")
    assert cut.wait(5.0) is cut and cut.state == "fired"
    line = console.lines()[-1]
    assert cut.event == "EV: verify t=123456789" and cut.event_index == line.index
    assert cut.event_t_ns == round(line.t_mono * 1e9)
    assert cut.device_t_ns == 123456789
    assert cut.event_t_ns <= cut.sent_t_ns <= cut.confirm_t_ns
    assert cut.confirmed_off is True and not supply.state[1].output
    fire, check = supply.calls.index(("fire", 1)), supply.calls.index(("is_on", 1), supply.calls.index(("fire", 1)))
    assert fire < check, "fired first, confirmed with the normal query after"
    assert console._listeners == () and not cut.attached, "the listener is gone once fired"
    assert cut.as_dict()["seen_to_sent_us"] == cut.seen_to_sent_us >= 0


def test_cut_on_the_nth_occurrence(console):
    supply = _on(FakeSupply())
    cut = cut_on_console((supply, 1), console, r"^EV: write slot=B page=(?P<page>\d+)", nth=3)
    for page in (0, 8):
        _say(console, f"EV: write slot=B page={page}/64 t={page}")
    assert cut.matches == 2 and cut.state == "armed" and supply.state[1].output
    _say(console, "EV: write slot=B page=16/64 t=16")
    cut.wait(5.0)
    assert cut.event.startswith("EV: write slot=B page=16/") and cut.device_t_ns == 16
    assert not supply.state[1].output


def test_cut_a_delay_after_the_event(console):
    supply = _on(FakeSupply())
    cut = cut_on_console((supply, 1), console, r"^EV: verify", delay_s=0.05)
    _say(console, "EV: verify t=1")
    cut.wait(5.0)
    assert cut.due_t_ns == cut.event_t_ns + 50_000_000
    assert cut.sent_t_ns >= cut.due_t_ns, "never before it is due"
    assert not supply.state[1].output


def test_a_delayed_cut_disarmed_before_it_is_due_does_not_fire(console):
    supply = _on(FakeSupply())
    cut = cut_on_console((supply, 1), console, r"^EV: verify", delay_s=5.0)
    _say(console, "EV: verify t=1")
    cut.disarm()
    assert ("fire", 1) not in supply.calls and supply.state[1].output
    with pytest.raises(CutError, match="disarmed"):
        cut.wait(1.0)


def test_a_pattern_that_never_comes_times_out_with_the_evidence(console):
    supply = _on(FakeSupply())
    cut = cut_on_console((supply, 1), console, r"^EV: mark-good", nth=2)
    _say(console, "EV: mark-good t=5")
    _say(console, "FW: something else entirely")
    with pytest.raises(CutTimeout) as ei:
        cut.wait(0.3)
    msg = str(ei.value)
    assert "'^EV: mark-good'" in msg and "occurrence 2 (seen 1 since arming)" in msg, msg
    assert "| FW: something else entirely" in msg and str(console.log_path) in msg, msg
    assert "switched off (safe state)" in msg and not supply.state[1].output
    assert console._listeners == () and cut.state == "disarmed"
    assert ("fire", 1) not in supply.calls


def test_disarm_leaves_no_listener_and_nothing_fires(console):
    supply = _on(FakeSupply())
    other = console.add_listener("^x", lambda line, m: None)
    with cut_on_console((supply, 1), console, r"^EV: verify") as cut:
        assert len(console._listeners) == 2
    assert console._listeners == (other,) and cut.state == "disarmed"
    _say(console, "EV: verify t=1")
    assert supply.state[1].output and ("fire", 1) not in supply.calls
    cut.disarm()  # idempotent


class _Msg:
    def __init__(self, topic: str, payload: dict, t: float | None = None):
        self.topic, self.payload, self.t = topic, json.dumps(payload).encode(), t


def test_cut_on_an_mqtt_message_hooked_by_hand():
    supply = _on(FakeSupply())
    cut = cut_on_mqtt((supply, 1), "$aws/things/cart-01/jobs/+/update",
                      lambda m: json.loads(m.payload)["status"] == "IN_PROGRESS")
    cut.mqtt_handler(_Msg("$aws/things/cart-01/jobs/j1/update", {"status": "QUEUED"}, time.monotonic()))
    cut.mqtt_handler(_Msg("$aws/things/cart-02/jobs/j1/update", {"status": "IN_PROGRESS"}, time.monotonic()))
    assert supply.state[1].output and cut.matches == 0
    t = time.monotonic()
    cut.on_message(None, None, _Msg("$aws/things/cart-01/jobs/j1/update", {"status": "IN_PROGRESS", "t_ns": 42}, t))
    cut.wait(5.0)
    assert cut.event_t_ns == round(t * 1e9) and cut.device_t_ns == 42 and not supply.state[1].output


def test_mqtt_timeout_shows_the_messages_seen():
    supply = _on(FakeSupply())
    cut = cut_on_mqtt((supply, 1), "$aws/things/cart-01/jobs/+/update", lambda m: False)
    cut.mqtt_handler(_Msg("$aws/things/cart-01/jobs/j1/update", {"status": "QUEUED"}))
    with pytest.raises(CutTimeout, match=r'(?s)MQTT \$aws/things/cart-01/jobs/\+/update where <lambda>.*QUEUED'):
        cut.wait(0.2)


# ---------------------------------------------------------- a real driver, an emulated supply


@pytest.fixture
def psu(tmp_path):
    outputs: list[tuple[int, bool]] = []
    log = RxLog(tmp_path / "rx.log")
    p = EmulatedSupply("psu-e", "keysight-e36312a", "E36313A", 3, 0, on_output=lambda ch, on: outputs.append((ch, on)),
                       rx_log=log)
    p.start()
    p.outputs = outputs
    yield p
    p.stop()
    log.close()


def _driver(psu, tmp_path, cls=KeysightE36312A):
    return cls("psu-e", psu.resource, 3, timeout_ms=300, attempts=2, lock_dir=tmp_path / "locks")


def test_the_armed_off_goes_straight_to_the_socket_and_is_logged_on_arrival(psu, tmp_path, console):
    drv = _driver(psu, tmp_path)
    try:
        drv.on(1)
        cut = cut_on_console((drv, 1), console, r"^EV: verify")
        assert cut._armed.path == "socket"
        _say(console, "EV: verify t=1")
        cut.wait(5.0)
        assert cut.path == "socket" and cut.confirmed_off and psu.outputs == [(1, True), (1, False)]
        lines = (tmp_path / "rx.log").read_text().splitlines()
        rx = [ln.split(" ", 3) for ln in lines]
        assert all(r[1] == "RX" and r[2] == "psu-e" for r in rx), lines
        off = next(r for r in rx if r[3] == "OUTP OFF,(@1)")
        # the stamp is on CLOCK_MONOTONIC: after the line was seen, not later than the confirmation
        assert cut.event_t_ns <= int(off[0]) <= cut.confirm_t_ns
        assert [r[3] for r in rx][-2:] == ["OUTP OFF,(@1)", "OUTP? (@1)"], "no *OPC? after the armed OFF"
    finally:
        drv.close()


def test_supply_connection_lost_while_armed_is_an_error_and_the_cart_is_left_off(psu, tmp_path, console):
    drv = _driver(psu, tmp_path)
    try:
        drv.on(2)
        cut = cut_on_console((drv, 2), console, r"^EV: verify")
        for conn in list(psu._conns.values()):   # the instrument drops the connection (a LAN glitch)
            conn.shutdown(socket.SHUT_RDWR)
        _say(console, "EV: verify t=1")
        with pytest.raises(CutError) as ei:
            cut.wait(5.0)
        msg = str(ei.value)
        assert "closed the connection while armed" in msg and "did not land at the event" in msg, msg
        assert cut.path == "fallback" and cut.confirmed_off and not psu.channel(2)["output"]
    finally:
        drv.close()


def test_supply_gone_while_armed_says_the_output_state_is_unknown(psu, tmp_path, console):
    drv = _driver(psu, tmp_path)
    try:
        drv.on(1)
        cut = cut_on_console((drv, 1), console, r"^EV: verify")
        psu.stop()
        _say(console, "EV: verify t=1")
        with pytest.raises(CutError, match="output state is unknown") as ei:
            cut.wait(5.0)
        assert "psu-e" in str(ei.value) and cut.state == "failed"
    finally:
        drv.close()


def test_select_then_command_supply_fires_under_the_lock(tmp_path, console):
    with EmulatedSupply("psu-r", "rs-ngx", "NGP804", 4, 0) as p:
        drv = _driver(p, tmp_path, RohdeNgx)
        try:
            drv.on(3)
            drv.on(1)
            cut = cut_on_console((drv, 3), console, r"^EV: verify")
            assert cut._armed.locked
            _say(console, "EV: verify t=1")
            cut.wait(5.0)
            assert not p.channel(3)["output"] and p.channel(1)["output"], "only its own channel"
        finally:
            drv.close()


def test_paced_supply_waits_its_interval_before_the_off(tmp_path, console):
    with EmulatedSupply("psu-s", "siglent-spd", "SPD3303X", 2, 0) as p:
        drv = _driver(p, tmp_path, SiglentSpd)
        try:
            drv.on(1)
            cut = cut_on_console((drv, 1), console, r"^EV: verify")
            _say(console, "EV: verify t=1")
            cut.wait(5.0)
            assert cut.state == "fired" and p.dropped == 0, "the OFF was not lost to the pacing"
        finally:
            drv.close()


def test_rx_log_stamps_are_monotonic_and_lines_whole(tmp_path):
    log = RxLog(tmp_path / "sub" / "rx.log")
    with EmulatedSupply("psu-x", "rigol-dp800", "DP832", 3, 0, rx_log=log) as p:
        before = time.monotonic_ns()
        with socket.create_connection(("127.0.0.1", p.port)) as s:
            s.sendall(b":SOUR1:VOLT 5\n*OPC?\n")
            assert s.recv(16) == b"1\n"
        after = time.monotonic_ns()
    log.close()
    rows = [ln.split(" ", 3) for ln in (tmp_path / "sub" / "rx.log").read_text().splitlines()]
    assert [r[1:] for r in rows] == [["RX", "psu-x", ":SOUR1:VOLT 5"], ["RX", "psu-x", "*OPC?"]]
    assert all(before <= int(r[0]) <= after for r in rows), (before, rows, after)


# -------------------------------------------------------------------- on a virtual rack


@pytest.fixture
def rack(rig_factory, tmp_path):
    run = tmp_path / "run"
    slots = [  # 12 V carts: on channels rated for them (the E36313A's channel 1 is a 6 V one)
        {"slot": i + 1, "cart": cart, "console": str(run / f"dev/serial/by-id/vcart-slot{i + 1:02d}"),
         "supply": supply, "channel": ch}
        for i, (cart, supply, ch) in enumerate([("cart-01", "psu-k", 2), ("cart-06", "psu-r", 1)])]
    rig = Rig.load(rig_factory(["cart-01", "cart-06"], slots=slots, virtual={
        "run_dir": str(run), "flash_time_scale": 0.05, "supply_rx_log": str(tmp_path / "supply-rx.log")}))
    pid = start_rack(rig, owner_pid=os.getpid())
    bench = Bench(rig, tmp_path / "consoles")
    yield rig, bench
    try:
        bench.close()
    finally:
        stop_rack(pid)


def test_cut_on_the_console_kills_the_cart_at_the_line(rack):
    rig, bench = rack
    cart = bench.cart("cart-01")
    cart.power_on()
    cut = cut_on_console(cart.power, cart.console, r"^bench (?P<i>\d+) (?P<t_ns>\d+)$", nth=5)
    cart.console.send("bench lines 100000")
    cut.wait(10.0)
    assert cut.event.startswith("bench 4 ") and cut.device_t_ns and cut.confirmed_off
    assert not cart.power.is_on()
    # the cart's process is gone: its console goes quiet long before 100000 lines
    n = len(cart.console.lines())
    time.sleep(0.3)  # physics: give a live process time to write more
    assert len(cart.console.lines()) - n < 5
    assert not any(re.match(r"^bench 99999 ", ln.text) for ln in cart.console.lines())
    # the supply received the OFF (seen from outside, in the rig's RX log) after the device's stamp
    rx = [ln.split(" ", 3) for ln in rig.resolve(rig.spec.virtual.supply_rx_log).read_text().splitlines()]
    off = [int(r[0]) for r in rx if r[2] == "psu-k" and r[3] == cut.off_bytes.decode().splitlines()[-1]]
    assert off and cut.device_t_ns < off[-1] <= cut.confirm_t_ns
    # the next boot is a fresh one, from power-on
    banner = cart.power_on()
    assert banner.config == "cart-01"
    reset = [ln.text for ln in cart.console.lines() if ln.text.startswith("BL: reset cause=")]
    assert reset and reset[-1] == "BL: reset cause=power-on"


def test_cut_with_a_delay_and_errors_on_the_rack(rack):
    rig, bench = rack
    cart = bench.cart("cart-06")
    cart.power_on()
    cut = cut_on_console(cart.power, cart.console, r"^bench (?P<i>\d+) (?P<t_ns>\d+)$", delay_s=0.02)
    cart.console.send("bench lines 100000")
    cut.wait(10.0)
    assert cut.sent_t_ns >= cut.event_t_ns + 20_000_000 and not cart.power.is_on()
    # already off: refused, nothing attached
    with pytest.raises(CutError, match="already off"):
        cut_on_console(cart.power, cart.console, "^FW: ready")
    assert cart.console._listeners == ()
    # a pattern that never comes: the error names it, the tail, and the cart is left off
    cart.power_on()
    cut = cut_on_console(cart.power, cart.console, r"^EV: never-printed")
    cart.console.send("version")
    with pytest.raises(CutTimeout) as ei:
        cut.wait(1.0)
    msg = str(ei.value)
    assert "'^EV: never-printed'" in msg and "version" in msg and "switched off" in msg, msg
    assert not cart.power.is_on() and cart.console._listeners == ()


def test_cut_on_an_mqtt_message_published_by_the_harness(rack):
    from harness.fleet import MqttClient

    rig, bench = rack
    cart = bench.cart("cart-01")
    cart.power_on()
    b = rig.spec.broker
    topic = "$aws/things/cart-01/jobs/cut-test/progress"
    with MqttClient(b.host, b.port, rig.resolve(b.ca), rig.resolve(b.cert), rig.resolve(b.key)) as mq:
        cut = cut_on_mqtt(cart.power, mq, "$aws/things/cart-01/jobs/cut-test/#",
                          lambda m: m.json().get("step") == "write")
        mq.publish(topic, {"step": "download"})
        t_ns = time.monotonic_ns()
        mq.publish(topic, {"step": "write", "t_ns": t_ns})
        cut.wait(10.0)
        assert cut.device_t_ns == t_ns < cut.event_t_ns <= cut.sent_t_ns and cut.matches == 1
        assert not cart.power.is_on()
        # the cut's handler left with it: another such message does nothing
        cart.power_on()
        mq.publish(topic, {"step": "write"})
        mq.publish(topic, {"step": "marker"})   # handled after the one before it, on the same thread
        mq.log.wait_for(topic, lambda m: m.json().get("step") == "marker", 5.0)
        assert cart.power.is_on()
