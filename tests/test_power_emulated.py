"""The harness power drivers against the virtual rack's emulated supplies, over real TCP."""

from __future__ import annotations

import multiprocessing
import os
import re
import socket
import threading
import time

import pytest

import vrack.psu
from harness.power import DIALECTS, ChannelPower, ScpiSupply, SupplyError, open_supply
from harness.power.ratings import RATINGS
from vrack.psu import EmulatedSupply

MODELS = {
    "keysight-e36312a": "E36313A",  # channel 2: 25 V / 2 A (an E36312A's is 25 V / 1 A)
    "rigol-dp800": "DP832",
    "rs-ngx": "NGE103B",
    "rs-hmc": "HMC8043",
    "siglent-spd": "SPD3303X",
    "aimtti": "QL355TP",
}
MANUFACTURERS = {
    "keysight-e36312a": "Keysight Technologies",
    "rigol-dp800": "RIGOL TECHNOLOGIES",
    "rs-ngx": "Rohde&Schwarz",
    "rs-hmc": "Rohde&Schwarz",
    "siglent-spd": "Siglent Technologies",
    "aimtti": "THURLBY THANDAR",
}
DRAW = {1: 0.21, 2: 0.42, 3: 0.05}


@pytest.fixture(autouse=True)
def lock_dir(tmp_path, monkeypatch):
    path = tmp_path / "locks"
    monkeypatch.setenv("CART_HIL_LOCK_DIR", str(path))
    return path


class Busy:
    """Once armed, the next on_output or draw callback keeps the instrument busy (a cart's process being
    killed, a slow measurement) until released; meanwhile the test makes lines arrive in a known order."""

    def __init__(self):
        self.armed = False
        self.entered, self.release = threading.Event(), threading.Event()

    def __call__(self) -> None:
        if self.armed:
            self.armed = False
            self.entered.set()
            self.release.wait(timeout=5)


class Rack:
    """Emulated supplies and drivers made by a test, all stopped and closed at teardown."""

    def __init__(self):
        self.emulators: list[EmulatedSupply] = []
        self.supplies: list[ScpiSupply] = []
        self.events: list[tuple[int, bool]] = []

    def emulator(self, dialect: str, channels: int = 3, port: int = 0, model: str | None = None,
                 busy: Busy | None = None) -> EmulatedSupply:
        def on_output(ch: int, on: bool) -> None:
            self.events.append((ch, on))
            if busy is not None:
                busy()

        def draw(ch: int) -> float:
            if busy is not None:
                busy()
            return DRAW[ch]

        emu = EmulatedSupply(f"psu-{dialect}", dialect, model or MODELS[dialect], channels, port,
                             on_output=on_output, draw=draw)
        emu.start()
        self.emulators.append(emu)
        return emu

    def supply(self, emu: EmulatedSupply, timeout_ms: int = 1000, model: str | None = None) -> ScpiSupply:
        supply = open_supply(emu.name, emu.resource, emu.dialect, emu._n, timeout_ms=timeout_ms, model=model)
        self.supplies.append(supply)
        return supply

    def close(self) -> None:
        for supply in self.supplies:
            supply.close()
        for emu in self.emulators:
            emu.stop()


@pytest.fixture
def rack():
    r = Rack()
    yield r
    r.close()


def ask(emu: EmulatedSupply, *lines: str, pause: float = 0.0) -> list[str]:
    """Talk to an emulator over a raw socket; one reply line per query. Ends with *OPC? so
    that every line has been executed when it returns."""
    with socket.create_connection(("127.0.0.1", emu.port), timeout=2) as s:
        reader = s.makefile("r", newline="\n")
        replies = []
        for line in (*lines, "*OPC?"):
            if pause:
                time.sleep(pause)  # test-side pacing for the Siglent
            s.sendall(line.encode() + b"\n")
            if "?" in line.split(" ")[0]:
                replies.append(reader.readline().rstrip("\n"))
        assert replies.pop() == "1"
        return replies


# ----------------------------------------------------------------- every dialect
@pytest.mark.parametrize("dialect", sorted(DIALECTS))
def test_driver_against_emulator(rack, dialect):
    emu = rack.emulator(dialect)
    supply = rack.supply(emu)
    identity = supply.identify()
    assert identity.model == MODELS[dialect]
    assert identity.manufacturer == MANUFACTURERS[dialect]
    assert identity.serial == "VRACK0001"

    supply.set_voltage(2, 12.0)
    supply.set_current_limit(2, 1.5)
    assert supply.voltage_setpoint(2) == pytest.approx(12.0)
    assert supply.current_limit_setpoint(2) == pytest.approx(1.5)
    assert emu.channel(2) == {"voltage": 12.0, "current_limit": 1.5, "output": False}
    assert supply.measure_current(2) <= 0.002 and supply.measure_voltage(2) <= 0.002

    supply.on(2)
    assert rack.events == [(2, True)]  # the cart started before on() returned
    assert supply.is_on(2) and not supply.is_on(1)
    assert supply.measure_voltage(2) == pytest.approx(12.0, abs=0.002)
    assert supply.measure_current(2) == pytest.approx(DRAW[2], abs=0.002)

    supply.set_current_limit(2, 0.3)  # the load wants 0.42 A: the supply limits it
    assert supply.measure_current(2) == pytest.approx(0.3, abs=0.002)

    supply.off(2)
    assert rack.events == [(2, True), (2, False)]
    assert not supply.is_on(2)
    assert supply.measure_current(2) <= 0.002 and supply.measure_voltage(2) <= 0.002

    supply.on(1)
    supply.on(2)
    supply.safe_state([1, 2])
    assert rack.events[-2:] == [(1, False), (2, False)]
    assert not emu.channel(1)["output"] and not emu.channel(2)["output"]
    assert supply.errors() == []
    assert emu.dropped == 0


def test_channel_power_over_tcp(rack):
    emu = rack.emulator("rs-ngx")
    power = ChannelPower(rack.supply(emu), 3, max_voltage=13.2, current_limit=1.5, label="slot 5 cart-05")
    power.set_voltage(12.0)
    power.set_current_limit(1.5)
    power.on()
    assert power.is_on() and power.measure_current() == pytest.approx(DRAW[3], abs=0.002)
    power.safe_state()
    assert rack.events == [(3, True), (3, False)]


# ----------------------------------------------------------------- emulator behaviour
def test_emulator_errors_and_master_switch(rack):
    emu = rack.emulator("rs-hmc")
    assert ask(emu, "FOO:BAR 1", "SYST:ERR?", "SYST:ERR?") == ['-113,"Undefined header"', '0,"No error"']
    ask(emu, "INST:NSEL 1", "OUTP:CHAN ON", "INST:NSEL 2", "OUTP:CHAN ON")
    assert rack.events == []  # master still off: nothing powered
    ask(emu, "OUTP:MAST ON")
    assert sorted(rack.events) == [(1, True), (2, True)]
    ask(emu, "OUTP:MAST OFF")
    assert sorted(rack.events[2:]) == [(1, False), (2, False)]
    ask(emu, "OUTP:MAST ON", "*RST")
    assert rack.events[4:] == [(1, True), (2, True), (1, False), (2, False)]
    assert not emu.channel(1)["output"]


def test_emulator_aimtti_language(rack):
    emu = rack.emulator("aimtti")
    replies = ask(emu, "V1 12.5", "I1 0.5", "V1?", "I1?", "OP1 1", "OP1?", "V1O?", "I1O?", "OPALL 0", "OP1?")
    assert replies[:3] == ["V1 12.500", "I1 0.500", "1"] and replies[-1] == "0"
    assert re.fullmatch(r"12\.\d{3}V", replies[3]) and abs(float(replies[3][:-1]) - 12.5) <= 0.001
    assert re.fullmatch(r"0\.\d{3}A", replies[4]) and abs(float(replies[4][:-1]) - 0.21) <= 0.001
    assert ask(emu, "*IDN?") == ["THURLBY THANDAR, QL355TP, VRACK0001, 1.00-1.00"]
    assert rack.events == [(1, True), (1, False)]


def test_emulator_keysight_channel_lists(rack):
    emu = rack.emulator("keysight-e36312a")
    ask(emu, "VOLT 5,(@1:3)", "OUTP ON,(@1,3)")
    assert [emu.channel(ch)["output"] for ch in (1, 2, 3)] == [True, False, True]
    assert ask(emu, "OUTP? (@1:3)", "VOLT? (@2)") == ["1,0,1", "+5.00000000E+00"]


def test_emulator_siglent_drops_unpaced_commands(rack):
    emu = rack.emulator("siglent-spd")
    with socket.create_connection(("127.0.0.1", emu.port), timeout=2) as s:
        s.sendall(b"CH1:VOLT 5\nCH1:VOLT 6\n")  # back to back: the second is lost
        time.sleep(0.03)
        s.sendall(b"CH1:VOLT?\n")
        assert s.makefile("r").readline().strip() == "5.000"
    assert emu.dropped == 1
    assert ask(emu, "SYST:ERR?", "SYST:ERR?", pause=0.03)[0].startswith("-363,")
    assert ask(emu, "OUTP CH2,ON", "SYST:STAT?", pause=0.03) == ["0x0024"]


# ----------------------------------------------------------------- pacing
def test_siglent_driver_loses_nothing(rack):
    emu = rack.emulator("siglent-spd")
    supply = rack.supply(emu)
    for i in range(8):
        supply.set_voltage(1, 1.0 + i)
        supply.on(1) if i % 2 == 0 else supply.off(1)
    assert emu.dropped == 0
    assert emu.channel(1)["voltage"] == 8.0 and not emu.channel(1)["output"]
    assert supply.errors() == []


def test_siglent_two_drivers_share_the_pace(rack):
    emu = rack.emulator("siglent-spd")
    a, b = rack.supply(emu), rack.supply(emu)
    threads = [threading.Thread(target=lambda s=s, ch=ch: [s.set_voltage(ch, v) for v in (1.0, 2.0, 3.0, 4.0)])
               for s, ch in ((a, 1), (b, 2))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert emu.dropped == 0
    assert emu.channel(1)["voltage"] == 4.0 and emu.channel(2)["voltage"] == 4.0


# ----------------------------------------------------------------- faults
def test_hung_supply_gives_supply_error_in_bounded_time(rack):
    emu = rack.emulator("keysight-e36312a")
    supply = rack.supply(emu, timeout_ms=200)
    supply.on(1)
    emu.hang()
    started = time.monotonic()
    with pytest.raises(SupplyError) as err:
        supply.measure_voltage(1)
    elapsed = time.monotonic() - started
    assert elapsed < 3.0
    message = str(err.value)
    for part in (emu.name, emu.resource, "MEAS:VOLT? (@1)", "3 attempt(s)", "200 ms", "VI_ERROR_TMO"):
        assert part in message, part
    emu.resume()
    assert supply.is_on(1)


def test_restarted_supply_is_reconnected(rack):
    emu = rack.emulator("rigol-dp800")
    supply = rack.supply(emu, timeout_ms=300)
    supply.on(1)
    emu.stop()
    started = time.monotonic()
    with pytest.raises(SupplyError) as err:
        supply.is_on(1)
    assert time.monotonic() - started < 2.0
    assert emu.resource in str(err.value) and "refused" in str(err.value).lower()
    emu.start()  # same port, same instrument: output still on
    assert supply.is_on(1)
    supply.off(1)
    assert rack.events == [(1, True), (1, False)]


def test_reconnects_while_the_supply_comes_back(rack):
    emu = rack.emulator("aimtti")
    supply = rack.supply(emu, timeout_ms=500)
    supply.on(1)
    emu.stop()
    threading.Timer(0.02, emu.start).start()
    supply.off(1)  # first attempt refused, a later one lands on the restarted server
    assert rack.events == [(1, True), (1, False)]


# ----------------------------------------------------------------- two processes, one supply
def _hammer(resource: str, lock_dir: str, ch: int, base: float, rounds: int, results, start) -> None:
    os.environ["CART_HIL_LOCK_DIR"] = lock_dir
    supply = open_supply(f"worker-ch{ch}", resource, "rs-hmc", 3, timeout_ms=2000)
    crossed = []
    try:
        supply.on(ch)
        start.wait(timeout=20)  # both workers up (spawn is slow): hammer at the same time
        for i in range(rounds):
            volts = base + (i % 10) / 10
            supply.set_voltage(ch, volts)
            setpoint = supply.voltage_setpoint(ch)
            measured = supply.measure_voltage(ch)
            if abs(setpoint - volts) > 1e-6 or abs(measured - volts) > 0.002:
                crossed.append((i, volts, setpoint, measured))
        results.put((ch, crossed, None))
    except Exception as exc:  # report, do not hang the parent
        results.put((ch, crossed, repr(exc)))
    finally:
        supply.close()


def test_two_processes_share_one_supply_without_crossing(rack, lock_dir):
    emu = rack.emulator("rs-hmc")
    ctx = multiprocessing.get_context("spawn")
    results, start = ctx.Queue(), ctx.Barrier(2)
    rounds = 150
    workers = [ctx.Process(target=_hammer, args=(emu.resource, str(lock_dir), ch, base, rounds, results, start))
               for ch, base in ((1, 3.0), (2, 9.0))]
    for w in workers:
        w.start()
    outcome = {}
    for _ in workers:
        ch, crossed, error = results.get(timeout=30)
        outcome[ch] = (crossed, error)
    for w in workers:
        w.join(timeout=10)
    assert outcome == {1: ([], None), 2: ([], None)}
    assert 3.0 <= emu.channel(1)["voltage"] < 4.0 and 9.0 <= emu.channel(2)["voltage"] < 10.0
    # the two sessions really did interleave on the instrument (how often is the host's scheduling: one input
    # queue runs a connection's queued lines together, and a loaded CI host gave 12 switches in 300 rounds)
    conns = [conn for conn, _ in emu.history]
    switches = sum(1 for a, b in zip(conns, conns[1:], strict=False) if a != b)
    assert switches >= 4


# ----------------------------------------------------------------- one input queue for all connections
def test_lines_of_all_connections_run_in_arrival_order(rack):
    """The gate-run flake on an NGP804 shared by three carts' workers: A cuts channel 1 (its cart's process
    is still being killed when) B's cut of channel 3 arrives, then A's confirmation. The instrument runs
    them as they came, so A's OUTP:SEL? reads channel 1, not the channel B selected in between."""
    busy = Busy()
    emu = rack.emulator("rs-ngx", channels=4, model="NGP804", busy=busy)
    ask(emu, "INST:NSEL 1", "OUTP:SEL ON", "INST:NSEL 3", "OUTP:SEL ON", "OUTP:GEN ON")
    with socket.create_connection(("127.0.0.1", emu.port), timeout=5) as a, \
            socket.create_connection(("127.0.0.1", emu.port), timeout=5) as b:
        busy.armed = True
        a.sendall(b"INST:NSEL 1\nOUTP:SEL OFF\n")
        assert busy.entered.wait(5), "A's OFF never reached the cart"
        b.sendall(b"INST:NSEL 3\nOUTP:SEL OFF\n")
        a.sendall(b"INST:NSEL 1\nOUTP:SEL?\n")
        busy.release.set()
        assert a.makefile("r").readline() == "0\n"
    assert [line for _, line in emu.history][-6:] == [
        "INST:NSEL 1", "OUTP:SEL OFF", "INST:NSEL 3", "OUTP:SEL OFF", "INST:NSEL 1", "OUTP:SEL?"]
    conns = [conn for conn, _ in emu.history][-6:]
    assert conns[0] != conns[2] and conns == [conns[0]] * 2 + [conns[2]] * 2 + [conns[0]] * 2
    assert rack.events[-2:] == [(1, False), (3, False)]


def test_a_long_query_does_not_let_later_lines_overtake(rack):
    """A slow measurement on connection A, A's next line queued behind it; B's lines arrive meanwhile, then
    A's OUTP:SEL?. As they arrived: A's INST:NSEL 2 before B's lines, A's query after them (channel 3,
    just switched off by B); each reply to the connection that asked."""
    busy = Busy()
    emu = rack.emulator("rs-ngx", channels=4, model="NGP804", busy=busy)
    ask(emu, "INST:NSEL 3", "OUTP:SEL ON", "INST:NSEL 2", "OUTP:SEL ON", "INST:NSEL 1", "OUTP:SEL ON", "OUTP:GEN ON")
    with socket.create_connection(("127.0.0.1", emu.port), timeout=5) as a, \
            socket.create_connection(("127.0.0.1", emu.port), timeout=5) as b:
        busy.armed = True
        a.sendall(b"MEAS:CURR?\nINST:NSEL 2\n")
        assert busy.entered.wait(5), "the measurement never asked the load"
        b.sendall(b"INST:NSEL 3\nOUTP:SEL OFF\nINST:NSEL?\n")
        a.sendall(b"OUTP:SEL?\n")
        busy.release.set()
        a_replies, b_replies = a.makefile("r"), b.makefile("r")
        assert float(a_replies.readline()) == pytest.approx(DRAW[1], abs=0.002)
        assert a_replies.readline() == "0\n"
        assert b_replies.readline() == "3\n"
    assert [line for _, line in emu.history][-6:] == [
        "MEAS:CURR?", "INST:NSEL 2", "INST:NSEL 3", "OUTP:SEL OFF", "INST:NSEL?", "OUTP:SEL?"]
    assert rack.events[-1:] == [(3, False)] and emu.channel(2)["output"]


def test_a_line_that_breaks_the_emulator_closes_only_its_connection(rack, caplog):
    emu = EmulatedSupply("psu-b", "keysight-e36312a", "E36313A", 3, 0, draw=lambda ch: 1 / 0)
    rack.emulators.append(emu)
    emu.start()
    with socket.create_connection(("127.0.0.1", emu.port), timeout=2) as a:
        assert ask(emu, "OUTP ON,(@1)", "INST (@3:1)", "SYST:ERR?") == ['-224,"Illegal parameter value"']
        a.sendall(b"MEAS:CURR? (@1)\n")
        assert a.recv(64) == b"", "the connection whose line failed is closed"
    assert "supply psu-b: line 'MEAS:CURR? (@1)' of connection" in caplog.text
    assert ask(emu, "OUTP? (@1)") == ["1"], "the instrument still serves the others"


# ----------------------------------------------------------------- supplies that say when they refuse
def test_both_rating_tables_agree():
    """vrack and the harness may not import each other: each keeps its own table, held equal here."""
    harness_side = {model: tuple((c.volts, c.amps) for c in r.channels) for model, r in RATINGS.items()}
    assert harness_side == vrack.psu.RATINGS
    assert all(r.dialect in DIALECTS and r.source for r in RATINGS.values())
    assert set(MODELS.values()) <= set(RATINGS)  # the emulators below are rated models


# (dialect, a setting within the channel's rating, the same setting above it, its read-back and what it
#  must still read, the error query, the vendor's error, the empty queue)
OVER_RATING = [
    ("keysight-e36312a", ["VOLT 5,(@1)"], "VOLT 12,(@1)", "VOLT? (@1)", "+5.00000000E+00",  # E36313A ch1: 6 V
     "SYST:ERR?", '-222,"Data out of range"', '0,"No error"'),
    ("rigol-dp800", [":SOUR3:VOLT 4"], ":SOUR3:VOLT 12", ":SOUR3:VOLT?", "4.0000",  # DP832 CH3: 5 V
     ":SYST:ERR?", '-222,"Data out of range"', '0,"No error"'),
    ("rs-ngx", ["INST:NSEL 2", "CURR 5"], "CURR 25", "CURR?", "5.0000",  # NGP804: 20 A
     "SYST:ERR?", '-222,"Data out of range"', '0,"No error"'),
    ("rs-hmc", ["INST:NSEL 2", "VOLT 5"], "VOLT 33", "VOLT?", "5.0000",  # HMC8043: 32 V
     "SYST:ERR?", '-222,"Data out of range"', '0,"No error"'),
    ("siglent-spd", ["CH2:CURR 3"], "CH2:CURR 3.3", "CH2:CURR?", "3.000",  # SPD3303X CH2: 3.2 A
     "SYST:ERR?", '-222,"Data out of range"', '0,"No error"'),
    ("aimtti", ["V1 5"], "V1 36", "V1?", "V1 5.000",  # QL355TP output 1: 35 V
     "EER?", "100", "0"),
]


@pytest.mark.parametrize(("dialect", "setup", "refused", "readback", "still", "error_query", "error", "empty"),
                         OVER_RATING, ids=[o[0] for o in OVER_RATING])
def test_emulator_refuses_above_the_rating_quietly(rack, dialect, setup, refused, readback, still, error_query,
                                                   error, empty):
    ngp = dialect == "rs-ngx"  # the NGP804 of the virtual rig: 20 A per channel
    emu = rack.emulator(dialect, channels=4 if ngp else 3, model="NGP804" if ngp else None)
    pause = 0.03 if dialect == "siglent-spd" else 0.0
    assert ask(emu, *setup, error_query, pause=pause) == [empty]
    # no reply to the setting itself: the refusal is only in the queue, and the setting is unchanged
    assert ask(emu, refused, readback, error_query, error_query, pause=pause) == [still, error, empty]


def test_emulator_keysight_channel_list_is_refused_whole(rack):
    emu = rack.emulator("keysight-e36312a")
    ask(emu, "VOLT 5,(@1:3)", "VOLT 12,(@1:3)")  # 12 V is fine on channels 2 and 3, not on channel 1
    assert [emu.channel(ch)["voltage"] for ch in (1, 2, 3)] == [5.0, 5.0, 5.0]
    assert ask(emu, "SYST:ERR?", "VOLT MAX,(@1:3)", "VOLT? (@1:3)", "CURR MAX,(@1)", "CURR? (@1)") == [
        '-222,"Data out of range"', "+6.00000000E+00,+2.50000000E+01,+2.50000000E+01", "+1.00000000E+01"]


def test_emulator_rigol_apply_is_refused_whole(rack):
    emu = rack.emulator("rigol-dp800")
    assert ask(emu, ":APPL CH1,12,5", ":SYST:ERR?", ":SOUR1:VOLT?") == ['-222,"Data out of range"', "0.0000"]
    assert emu.channel(1) == {"voltage": 0.0, "current_limit": 1.0, "output": False}


def test_emulator_aimtti_error_registers(rack):
    emu = rack.emulator("aimtti")
    assert ask(emu, "I2 6", "*ESR?", "EER?", "EER?", "I2?") == ["16", "100", "0", "I2 1.000"]
    assert ask(emu, "V2 99", "*CLS", "EER?", "QER?") == ["0", "0"]  # *CLS clears it too


def test_emulator_model_without_data_sheet_has_generic_limits(rack):
    emu = rack.emulator("keysight-e36312a", model="E9999Z")
    assert ask(emu, "VOLT 59,(@1)", "VOLT 61,(@1)", "SYST:ERR?", "VOLT? (@1)") == [
        '-222,"Data out of range"', "+5.90000000E+01"]


# dialect -> (channel, volts above its rating, amps above its rating)
DRIVER_OVER_RATING = {
    "keysight-e36312a": (1, 12.0, 10.5),   # E36313A channel 1: 6 V / 10 A
    "rigol-dp800": (3, 12.0, 3.5),         # DP832 CH3: 5 V / 3 A
    "rs-ngx": (2, 33.0, 3.5),              # NGE103B: 32 V / 3 A
    "rs-hmc": (2, 33.0, 3.5),              # HMC8043: 32 V / 3 A
    "siglent-spd": (2, 33.0, 3.3),         # SPD3303X CH2: 32 V / 3.2 A
    "aimtti": (1, 36.0, 5.5),              # QL355TP output 1: 35 V / 5 A
}
VENDOR_ERROR = {dialect: '-222,"Data out of range"' for dialect in DIALECTS} | {
    "aimtti": "EER? 100 (range error: the numeric value sent is not allowed)"}


@pytest.mark.parametrize("dialect", sorted(DIALECTS))
def test_driver_raises_what_the_supply_refused(rack, dialect):
    emu = rack.emulator(dialect)
    supply = rack.supply(emu, model=MODELS[dialect])
    ch, volts, amps = DRIVER_OVER_RATING[dialect]
    supply.set_voltage(ch, 5.0)
    supply.set_current_limit(ch, 0.5)
    for operation, template, value in (("set_voltage", supply.SET_VOLTAGE, volts),
                                       ("set_current_limit", supply.SET_CURRENT_LIMIT, amps)):
        with pytest.raises(SupplyError) as err:
            getattr(supply, operation)(ch, value)
        message = str(err.value)
        command = "; ".join(c.format(ch=ch, value=value) for c in template)
        for part in (f"supply {emu.name} ({MODELS[dialect]} at {emu.resource})", f"channel {ch}",
                     repr(command), VENDOR_ERROR[dialect]):
            assert part in message, (part, message)
    assert emu.channel(ch) == {"voltage": 5.0, "current_limit": 0.5, "output": False}  # unchanged, as real
    # the queue was read empty: the next setting is not blamed for the last one's error
    supply.set_voltage(ch, 4.0)
    supply.on(ch)
    assert emu.channel(ch) == {"voltage": 4.0, "current_limit": 0.5, "output": True}
    assert emu.dropped == 0


def test_driver_learns_the_model_from_idn(rack):
    emu = rack.emulator("rigol-dp800")
    supply = rack.supply(emu)
    supply.identify()
    with pytest.raises(SupplyError, match=r"supply psu-rigol-dp800 \(DP832 at .*\) channel 3: ':SOUR3:VOLT 6.000'"):
        supply.set_voltage(3, 6.0)


def test_cart_view_passes_the_carts_limit_but_not_the_channels_rating(rack):
    """The cart may take 13.2 V; channel 1 of an E36313A gives 6 V: the supply says no, the cart stays off."""
    emu = rack.emulator("keysight-e36312a")
    power = ChannelPower(rack.supply(emu, model="E36313A"), 1, max_voltage=13.2, current_limit=1.5,
                         label="slot 1 cart-01")
    with pytest.raises(SupplyError, match=r'channel 1: .*-222,"Data out of range"'):
        power.set_voltage(12.0)
    assert emu.channel(1)["voltage"] == 0.0 and rack.events == []


def test_a_setting_is_still_one_round_trip(rack):
    emu = rack.emulator("keysight-e36312a")
    supply = rack.supply(emu)
    supply.set_voltage(2, 1.0)
    for i in range(10):
        supply.set_voltage(2, 1.0 + i / 10)
    assert [line for _, line in emu.history][-2:] == ["VOLT 1.900,(@2)", "SYST:ERR?"]
