"""The power drivers' exact command strings and reply parsing, through a recording fake link."""

from __future__ import annotations

import fcntl
import importlib
import os
import threading
import time

import pytest

import vrack.psu
from harness.power import (
    DIALECTS,
    ChannelPower,
    FakeSupply,
    Identity,
    PowerLimitError,
    ScpiSupply,
    SupplyError,
    lock_path,
    open_supply,
)
from harness.power.base import LinkError, is_query

RESOURCE = "TCPIP0::127.0.0.1::5025::SOCKET"


class RecordingLink:
    """A fake VISA session: records every command; answers queries from `replies` (or a callable)."""

    def __init__(self, replies=None, fail_on: str | None = None, log: list | None = None):
        self.replies = replies or {}
        self.fail_on = fail_on
        self.log = [] if log is None else log
        self.times: list[float] = []
        self.closed = False

    def _record(self, command: str) -> None:
        self.log.append(command)
        self.times.append(time.monotonic())
        if self.fail_on is not None and command == self.fail_on:
            raise TimeoutError(f"fake: no answer to {command!r}")

    def write(self, command: str) -> None:
        self._record(command)

    def query(self, command: str) -> str:
        self._record(command)
        if callable(self.replies):
            return self.replies(command)
        if command in self.replies:
            return self.replies[command]
        if command == "*OPC?":
            return "1"
        if command == "SYST:STAT?":
            return "0x0004"
        if command in ("SYST:ERR?", ":SYST:ERR?"):
            return '+0,"No error"'
        if command == "EER?":
            return "0"
        raise AssertionError(f"unexpected query {command!r}")

    def close(self) -> None:
        self.closed = True


def make(dialect: str, tmp_path, replies=None, channels: int = 3, **kwargs) -> tuple[ScpiSupply, RecordingLink]:
    link = RecordingLink(replies)
    supply = DIALECTS[dialect]("psu-t", RESOURCE, channels, open_link=lambda: link, lock_dir=tmp_path, **kwargs)
    supply.command_interval_s = 0.0  # pacing has its own test; keep transcripts fast
    return supply, link


# (operation, args, commands sent, replies given, result)
TRANSCRIPTS = {
    "keysight-e36312a": [
        ("identify", (), ["*IDN?"], {"*IDN?": "Keysight Technologies,E36312A,MY1,2.1.0"}, None),
        ("on", (2,), ["OUTP ON,(@2)", "*OPC?"], {}, None),
        ("off", (2,), ["OUTP OFF,(@2)", "*OPC?"], {}, None),
        ("is_on", (2,), ["OUTP? (@2)"], {"OUTP? (@2)": "1"}, True),
        ("is_on", (2,), ["OUTP? (@2)"], {"OUTP? (@2)": "0"}, False),
        ("set_voltage", (2, 12), ["VOLT 12.000,(@2)", "SYST:ERR?"], {}, None),
        ("set_current_limit", (2, 1.5), ["CURR 1.500,(@2)", "SYST:ERR?"], {}, None),
        ("voltage_setpoint", (2,), ["VOLT? (@2)"], {"VOLT? (@2)": "+1.20000000E+01"}, 12.0),
        ("current_limit_setpoint", (2,), ["CURR? (@2)"], {"CURR? (@2)": "+1.50000000E+00"}, 1.5),
        ("measure_voltage", (2,), ["MEAS:VOLT? (@2)"], {"MEAS:VOLT? (@2)": "+1.20010000E+01"}, 12.001),
        ("measure_current", (2,), ["MEAS:CURR? (@2)"], {"MEAS:CURR? (@2)": "+2.10000000E-01"}, 0.21),
        ("safe_state", ([3, 1],), ["OUTP OFF,(@1,3)", "*OPC?"], {}, None),
    ],
    "rigol-dp800": [
        ("identify", (), ["*IDN?"], {"*IDN?": "RIGOL TECHNOLOGIES,DP832,DP8C1,00.01.14"}, None),
        ("on", (2,), [":OUTP CH2,ON", "*OPC?"], {}, None),
        ("off", (2,), [":OUTP CH2,OFF", "*OPC?"], {}, None),
        ("is_on", (2,), [":OUTP? CH2"], {":OUTP? CH2": "ON"}, True),
        ("is_on", (2,), [":OUTP? CH2"], {":OUTP? CH2": "OFF"}, False),
        ("set_voltage", (2, 12), [":SOUR2:VOLT 12.000", ":SYST:ERR?"], {}, None),
        ("set_current_limit", (2, 1.5), [":SOUR2:CURR 1.500", ":SYST:ERR?"], {}, None),
        ("voltage_setpoint", (2,), [":SOUR2:VOLT?"], {":SOUR2:VOLT?": "12.0000"}, 12.0),
        ("current_limit_setpoint", (2,), [":SOUR2:CURR?"], {":SOUR2:CURR?": "1.5000"}, 1.5),
        ("measure_voltage", (2,), [":MEAS:VOLT? CH2"], {":MEAS:VOLT? CH2": "12.0010"}, 12.001),
        ("measure_current", (2,), [":MEAS:CURR? CH2"], {":MEAS:CURR? CH2": "0.2100"}, 0.21),
        ("safe_state", ([3, 1],), [":OUTP CH1,OFF", ":OUTP CH3,OFF", "*OPC?"], {}, None),
    ],
    "rs-ngx": [
        ("identify", (), ["*IDN?"], {"*IDN?": "Rohde&Schwarz,NGE103B,5601/101,02.067"}, None),
        ("on", (2,), ["INST:NSEL 2", "OUTP:SEL ON", "OUTP:GEN ON", "*OPC?"], {}, None),
        ("off", (2,), ["INST:NSEL 2", "OUTP:SEL OFF", "*OPC?"], {}, None),
        ("is_on", (2,), ["INST:NSEL 2", "OUTP:SEL?", "OUTP:GEN?"], {"OUTP:SEL?": "1", "OUTP:GEN?": "1"}, True),
        ("is_on", (2,), ["INST:NSEL 2", "OUTP:SEL?", "OUTP:GEN?"], {"OUTP:SEL?": "1", "OUTP:GEN?": "0"}, False),
        ("set_voltage", (2, 12), ["INST:NSEL 2", "VOLT 12.000", "SYST:ERR?"], {}, None),
        ("set_current_limit", (2, 1.5), ["INST:NSEL 2", "CURR 1.500", "SYST:ERR?"], {}, None),
        ("voltage_setpoint", (2,), ["INST:NSEL 2", "VOLT?"], {"VOLT?": "12.000"}, 12.0),
        ("current_limit_setpoint", (2,), ["INST:NSEL 2", "CURR?"], {"CURR?": "1.500"}, 1.5),
        ("measure_voltage", (2,), ["INST:NSEL 2", "MEAS:VOLT?"], {"MEAS:VOLT?": "12.001"}, 12.001),
        ("measure_current", (2,), ["INST:NSEL 2", "MEAS:CURR?"], {"MEAS:CURR?": "0.210"}, 0.21),
        ("safe_state", ([3, 1],), ["INST:NSEL 1", "OUTP:SEL OFF", "INST:NSEL 3", "OUTP:SEL OFF", "*OPC?"], {},
         None),
    ],
    "rs-hmc": [
        ("identify", (), ["*IDN?"], {"*IDN?": "Rohde&Schwarz,HMC8043,0145,HW5/SW2"}, None),
        ("on", (2,), ["INST:NSEL 2", "OUTP:CHAN ON", "OUTP:MAST ON", "*OPC?"], {}, None),
        ("off", (2,), ["INST:NSEL 2", "OUTP:CHAN OFF", "*OPC?"], {}, None),
        ("is_on", (2,), ["INST:NSEL 2", "OUTP:CHAN?", "OUTP:MAST?"], {"OUTP:CHAN?": "1", "OUTP:MAST?": "1"},
         True),
        ("is_on", (2,), ["INST:NSEL 2", "OUTP:CHAN?", "OUTP:MAST?"], {"OUTP:CHAN?": "0", "OUTP:MAST?": "1"},
         False),
        ("set_voltage", (2, 12), ["INST:NSEL 2", "VOLT 12.000", "SYST:ERR?"], {}, None),
        ("set_current_limit", (2, 1.5), ["INST:NSEL 2", "CURR 1.500", "SYST:ERR?"], {}, None),
        ("voltage_setpoint", (2,), ["INST:NSEL 2", "VOLT?"], {"VOLT?": "12.000"}, 12.0),
        ("current_limit_setpoint", (2,), ["INST:NSEL 2", "CURR?"], {"CURR?": "1.500"}, 1.5),
        ("measure_voltage", (2,), ["INST:NSEL 2", "MEAS:VOLT?"], {"MEAS:VOLT?": "12.001"}, 12.001),
        ("measure_current", (2,), ["INST:NSEL 2", "MEAS:CURR?"], {"MEAS:CURR?": "0.210"}, 0.21),
        ("safe_state", ([3, 1],), ["INST:NSEL 1", "OUTP:CHAN OFF", "INST:NSEL 3", "OUTP:CHAN OFF", "*OPC?"], {},
         None),
    ],
    "siglent-spd": [
        ("identify", (), ["*IDN?"], {"*IDN?": "Siglent Technologies,SPD3303X,SPD3X1,1.01.01.02.05,V3.0"}, None),
        ("on", (2,), ["OUTP CH2,ON", "SYST:STAT?"], {"SYST:STAT?": "0x0024"}, None),
        ("off", (2,), ["OUTP CH2,OFF", "SYST:STAT?"], {"SYST:STAT?": "0x0014"}, None),
        ("on", (3,), ["OUTP CH3,ON", "SYST:STAT?"], {}, None),  # CH3 has no status bit: plain confirm
        ("is_on", (1,), ["SYST:STAT?"], {"SYST:STAT?": "0x0010"}, True),
        ("is_on", (2,), ["SYST:STAT?"], {"SYST:STAT?": "0x0010"}, False),
        ("set_voltage", (2, 12), ["CH2:VOLT 12.000", "SYST:ERR?"], {}, None),
        ("set_current_limit", (2, 1.5), ["CH2:CURR 1.500", "SYST:ERR?"], {}, None),
        ("voltage_setpoint", (2,), ["CH2:VOLT?"], {"CH2:VOLT?": "12.000"}, 12.0),
        ("current_limit_setpoint", (2,), ["CH2:CURR?"], {"CH2:CURR?": "1.500"}, 1.5),
        ("measure_voltage", (2,), ["MEAS:VOLT? CH2"], {"MEAS:VOLT? CH2": "12.001"}, 12.001),
        ("measure_current", (2,), ["MEAS:CURR? CH2"], {"MEAS:CURR? CH2": "0.210"}, 0.21),
        ("safe_state", ([3, 1],), ["OUTP CH1,OFF", "OUTP CH3,OFF", "SYST:STAT?"], {}, None),
    ],
    "aimtti": [
        ("identify", (), ["*IDN?"], {"*IDN?": "THURLBY THANDAR, CPX400DP, 491523, 1.00-1.00"}, None),
        ("on", (2,), ["OP2 1", "*OPC?"], {}, None),
        ("off", (2,), ["OP2 0", "*OPC?"], {}, None),
        ("is_on", (2,), ["OP2?"], {"OP2?": "1"}, True),
        ("is_on", (2,), ["OP2?"], {"OP2?": "0"}, False),
        ("set_voltage", (2, 12), ["V2 12.000", "EER?"], {}, None),
        ("set_current_limit", (2, 1.5), ["I2 1.500", "EER?"], {}, None),
        ("voltage_setpoint", (2,), ["V2?"], {"V2?": "V2 12.000"}, 12.0),
        ("current_limit_setpoint", (2,), ["I2?"], {"I2?": "I2 1.500"}, 1.5),
        ("measure_voltage", (2,), ["V2O?"], {"V2O?": "12.001V"}, 12.001),
        ("measure_current", (2,), ["I2O?"], {"I2O?": "0.210A"}, 0.21),
        ("safe_state", ([3, 1],), ["OP1 0", "OP3 0", "*OPC?"], {}, None),
    ],
}

CASES = [
    pytest.param(dialect, *case, id=f"{dialect}-{case[0]}{case[1]}-{i}")
    for dialect, cases in TRANSCRIPTS.items()
    for i, case in enumerate(cases)
]


def test_every_dialect_has_transcripts():
    assert set(TRANSCRIPTS) == set(DIALECTS)
    operations = {"identify", "on", "off", "is_on", "set_voltage", "set_current_limit", "voltage_setpoint",
                  "current_limit_setpoint", "measure_voltage", "measure_current", "safe_state"}
    for dialect, cases in TRANSCRIPTS.items():
        assert {case[0] for case in cases} == operations, dialect


@pytest.mark.parametrize(("dialect", "operation", "args", "sent", "replies", "result"), CASES)
def test_transcript(tmp_path, dialect, operation, args, sent, replies, result):
    supply, link = make(dialect, tmp_path, replies)
    value = getattr(supply, operation)(*args)
    assert link.log == sent
    if operation == "identify":
        assert value == Identity.parse(replies["*IDN?"])
        assert value.model and value.manufacturer and value.serial
    elif result is not None:
        assert value == pytest.approx(result)


def test_every_dialect_imports_and_has_every_template():
    for name, cls in DIALECTS.items():
        module = importlib.import_module(cls.__module__)
        assert getattr(module, cls.__name__) is cls
        assert cls.dialect == name and issubclass(cls, ScpiSupply)
        for template in ("ON", "OFF", "IS_ON", "SET_VOLTAGE", "SET_CURRENT_LIMIT", "VOLTAGE_SETPOINT",
                         "CURRENT_LIMIT_SETPOINT", "MEASURE_VOLTAGE", "MEASURE_CURRENT"):
            assert getattr(cls, template), f"{name}.{template} is empty"
    # the rack emulates exactly the dialects the harness drives
    assert set(DIALECTS) == set(vrack.psu.DIALECTS)


def test_open_supply_picks_the_driver():
    supply = open_supply("psu-a", RESOURCE, "rs-hmc", 3, timeout_ms=250)
    assert type(supply).__name__ == "RohdeHmc"
    assert (supply.name, supply.resource, supply.channels, supply.timeout_ms) == ("psu-a", RESOURCE, 3, 250)


def test_unknown_dialect_lists_the_known_ones():
    with pytest.raises(ValueError) as err:
        open_supply("psu-z", RESOURCE, "hp-6632b", 1)
    message = str(err.value)
    assert "psu-z" in message and "hp-6632b" in message
    for name in DIALECTS:
        assert name in message


# ----------------------------------------------------------------- reply parsing
@pytest.mark.parametrize(("reply", "unit", "value"), [
    ("12.000V", "V", 12.0), ("0.210A", "A", 0.21), ("V1 12.000", "V", 12.0), ("I2 1.500", "A", 1.5),
    (" 5.5 V ", "V", 5.5), ("0.000A", "A", 0.0),
])
def test_aimtti_units_parsed(tmp_path, reply, unit, value):
    supply, _ = make("aimtti", tmp_path)
    assert supply.parse_number("V1O?", reply, unit) == value


@pytest.mark.parametrize(("reply", "unit"), [("12.000A", "V"), ("0.21V", "A"), ("I1 1.5", "V"), ("twelve", "V"),
                                             ("", "A")])
def test_aimtti_wrong_unit_or_garbage_refused(tmp_path, reply, unit):
    supply, _ = make("aimtti", tmp_path)
    with pytest.raises(SupplyError, match="psu-t"):
        supply.parse_number("V1O?", reply, unit)


@pytest.mark.parametrize(("status", "ch1", "ch2"), [
    ("0x0004", False, False), ("0x0014", True, False), ("0x0024", False, True), ("0x34", True, True),
    ("0x0224", False, True),  # the programming guide's example: independent, CH2 on, CH2 waveform display
    ("0x0011", True, False),  # CH1 on in CC mode
])
def test_siglent_status_bits(tmp_path, status, ch1, ch2):
    supply, link = make("siglent-spd", tmp_path, {"SYST:STAT?": status})
    assert supply.is_on(1) is ch1
    assert supply.is_on(2) is ch2
    assert link.log == ["SYST:STAT?", "SYST:STAT?"]


def test_siglent_ch3_state_is_not_guessed(tmp_path):
    supply, link = make("siglent-spd", tmp_path)
    with pytest.raises(SupplyError, match="CH3"):
        supply.is_on(3)
    assert link.log == []


def test_siglent_garbled_status_is_an_error(tmp_path):
    supply, _ = make("siglent-spd", tmp_path, {"SYST:STAT?": "busy"})
    with pytest.raises(SupplyError, match="SYST:STAT"):
        supply.is_on(1)


def test_siglent_lost_output_command_is_sent_again(tmp_path):
    answers = iter(["0x0004", "0x0014"])  # the first OUTP was lost, the second took
    supply, link = make("siglent-spd", tmp_path, lambda command: next(answers))
    supply.on(1)
    assert link.log == ["OUTP CH1,ON", "SYST:STAT?", "OUTP CH1,ON", "SYST:STAT?"]


def test_siglent_setting_lost_by_the_instrument_is_sent_again(tmp_path):
    """-363 "command lost" is not a refusal: the setting never ran (it came too soon after another
    process's command), so it is sent again; a refusal in the same queue still raises."""
    queue = iter(['-363,"Input buffer overrun; command lost: CH1:VOLT 12.000"', '+0,"No error"', '+0,"No error"'])
    supply, link = make("siglent-spd", tmp_path, lambda command: next(queue))
    supply.set_voltage(1, 12)
    assert link.log == ["CH1:VOLT 12.000", "SYST:ERR?", "SYST:ERR?", "CH1:VOLT 12.000", "SYST:ERR?"]


def test_siglent_another_sequences_lost_command_is_not_blamed_on_this_setting(tmp_path):
    queue = iter(['-363,"Input buffer overrun; command lost: SYST:STAT?"', '+0,"No error"'])
    supply, link = make("siglent-spd", tmp_path, lambda command: next(queue))
    supply.set_voltage(1, 12)  # someone else's status query was lost: theirs to notice and resend
    assert link.log == ["CH1:VOLT 12.000", "SYST:ERR?", "SYST:ERR?"]


def test_siglent_setting_lost_every_time_is_an_error(tmp_path):
    lost = '-363,"Input buffer overrun; command lost: CH1:VOLT 12.000"'
    supply, link = make("siglent-spd", tmp_path, lambda c: lost if link.log.count("SYST:ERR?") % 2 else '+0,"No error"')
    with pytest.raises(SupplyError, match=r"lost by the instrument \d+ time\(s\)"):
        supply.set_voltage(1, 12)


@pytest.mark.parametrize(("reply", "state"), [("ON", True), ("OFF", False), ("on", True)])
def test_rigol_on_off(tmp_path, reply, state):
    supply, _ = make("rigol-dp800", tmp_path, {":OUTP? CH1": reply})
    assert supply.is_on(1) is state


@pytest.mark.parametrize(("reply", "state"), [("1", True), ("0", False), ("+1", True)])
def test_keysight_one_zero(tmp_path, reply, state):
    supply, _ = make("keysight-e36312a", tmp_path, {"OUTP? (@1)": reply})
    assert supply.is_on(1) is state


@pytest.mark.parametrize("dialect", ["rigol-dp800", "keysight-e36312a"])
def test_unexpected_state_reply_is_an_error(tmp_path, dialect):
    supply, _ = make(dialect, tmp_path, lambda command: "maybe")
    with pytest.raises(SupplyError, match="maybe"):
        supply.is_on(1)


def test_non_number_measurement_is_an_error(tmp_path):
    supply, _ = make("keysight-e36312a", tmp_path, {"MEAS:VOLT? (@1)": "-222,Data out of range"})
    with pytest.raises(SupplyError, match="MEAS:VOLT"):
        supply.measure_voltage(1)


def test_error_queue_drained(tmp_path):
    answers = iter(['-113,"Undefined header"', '-222,"Data out of range"', '+0,"No error"'])
    supply, link = make("keysight-e36312a", tmp_path, lambda command: next(answers))
    assert supply.errors() == ['-113,"Undefined header"', '-222,"Data out of range"']
    assert link.log == ["SYST:ERR?"] * 3


def test_aimtti_errors_from_status_registers(tmp_path):
    supply, link = make("aimtti", tmp_path, {"*ESR?": "32", "EER?": "0", "QER?": "0"})
    assert supply.errors() == ["*ESR? 32: command error"]
    assert link.log == ["*ESR?", "EER?", "QER?"]


def test_bad_channel_and_value_refused_before_sending(tmp_path):
    supply, link = make("keysight-e36312a", tmp_path)
    for call in (lambda: supply.on(0), lambda: supply.on(4), lambda: supply.set_voltage(1, -1),
                 lambda: supply.set_voltage(1, float("nan")), lambda: supply.set_current_limit(1, float("inf"))):
        with pytest.raises(ValueError):
            call()
    assert link.log == []


def test_is_query():
    assert is_query("*IDN?") and is_query(":OUTP? CH1") and is_query("V1O?") and is_query("MEAS:VOLT? (@1)")
    assert not is_query("VOLT 5,(@1)") and not is_query("OP1 1")


# ----------------------------------------------------------------- cart limits
def test_limit_refusal_sends_nothing(tmp_path):
    opened = []

    def open_link():
        opened.append(1)
        return RecordingLink()

    supply = DIALECTS["rs-hmc"]("psu-a", RESOURCE, 3, open_link=open_link, lock_dir=tmp_path)
    power = ChannelPower(supply, 2, max_voltage=13.2, current_limit=1.5, label="slot 3 cart-03")
    with pytest.raises(PowerLimitError) as err:
        power.set_voltage(13.3)
    assert "slot 3 cart-03" in str(err.value) and "13.3" in str(err.value) and "13.2" in str(err.value)
    with pytest.raises(PowerLimitError) as err:
        power.set_current_limit(2.0)
    assert "slot 3 cart-03" in str(err.value) and "2" in str(err.value) and "1.5" in str(err.value)
    for bad in (-0.1, float("nan")):
        with pytest.raises(PowerLimitError):
            power.set_voltage(bad)
    assert opened == []  # not even a session was opened


def test_channel_power_is_the_carts_view():
    supply = FakeSupply("psu-f", 3, draw=lambda ch: 0.3)
    power = ChannelPower(supply, 2, max_voltage=13.2, current_limit=1.5, label="slot 2 cart-02")
    power.set_voltage(13.2)
    power.set_current_limit(1.5)
    power.on()
    assert power.is_on() and power.measure_voltage() == 13.2 and power.measure_current() == 0.3
    assert power.voltage_setpoint() == 13.2 and power.current_limit_setpoint() == 1.5
    assert power.identify().model == "FakeSupply"
    power.safe_state()
    assert not power.is_on() and power.measure_current() == 0.0
    assert supply.calls[:3] == [("set_voltage", 2, 13.2), ("set_current_limit", 2, 1.5), ("on", 2)]
    assert ("safe_state", [2]) in supply.calls
    with pytest.raises(ValueError, match="slot 9"):
        ChannelPower(supply, 4, max_voltage=13.2, current_limit=1.5, label="slot 9")


def test_fake_supply_fails_like_a_dead_instrument():
    supply = FakeSupply("psu-f", 1)
    supply.fail = SupplyError("psu-f: no answer")
    with pytest.raises(SupplyError):
        supply.on(1)
    assert supply.calls == [("on", 1)]


# ----------------------------------------------------------------- reconnect and retry
def test_failed_sequence_is_resent_whole_on_a_new_session(tmp_path):
    log: list[str] = []
    links = [RecordingLink(fail_on="VOLT 5.000", log=log), RecordingLink(log=log)]
    supply = DIALECTS["rs-hmc"]("psu-a", RESOURCE, 3, open_link=lambda: links.pop(0), lock_dir=tmp_path,
                                backoff_s=0.001)
    supply.set_voltage(2, 5)
    # the selection is sent again: the instrument may have lost it with the session
    assert log == ["INST:NSEL 2", "VOLT 5.000", "INST:NSEL 2", "VOLT 5.000", "SYST:ERR?"]
    assert links == []


def test_bad_confirmation_means_reconnect(tmp_path):
    answers = iter(["stale reply", "1"])
    opened = []

    def open_link():
        opened.append(1)
        return RecordingLink(lambda command: next(answers))

    supply = DIALECTS["keysight-e36312a"]("psu-a", RESOURCE, 3, open_link=open_link, lock_dir=tmp_path,
                                          backoff_s=0.001)
    supply.on(1)
    assert len(opened) == 2


def test_gives_up_with_evidence_in_bounded_time(tmp_path):
    def open_link():
        raise ConnectionRefusedError(111, "cannot connect to TCPIP0::127.0.0.1::5025::SOCKET: refused")

    supply = DIALECTS["rigol-dp800"]("psu-b", RESOURCE, 3, open_link=open_link, lock_dir=tmp_path,
                                     timeout_ms=100, backoff_s=0.005)
    started = time.monotonic()
    with pytest.raises(SupplyError) as err:
        supply.on(1)
    assert time.monotonic() - started < 1.0
    message = str(err.value)
    for part in ("psu-b", RESOURCE, ":OUTP CH1,ON", "3 attempt(s)", " s ", "refused"):
        assert part in message, part


def test_link_error_is_an_oserror():
    assert issubclass(LinkError, OSError)


# ----------------------------------------------------------------- pacing and lock
def test_siglent_paces_commands_by_sleeping_only_the_remainder(tmp_path):
    link = RecordingLink({"MEAS:VOLT? CH1": "1.000", "SYST:STAT?": "0x0014"})
    supply = DIALECTS["siglent-spd"]("psu-s", RESOURCE, 3, open_link=lambda: link, lock_dir=tmp_path)
    supply.set_voltage(1, 1.0)
    supply.on(1)
    supply.measure_voltage(1)
    gaps = sorted(b - a for a, b in zip(link.times, link.times[1:], strict=False))
    assert len(gaps) == 4 and gaps[0] >= 0.020
    assert gaps[1] < 0.020 + 0.015  # only the remainder: a fixed sleep on top would make them >= 40 ms
    # a command long after the last one is not delayed
    time.sleep(0.05)
    before = time.monotonic()
    supply.measure_voltage(1)
    assert time.monotonic() - before < 0.020


def test_siglent_pacing_holds_across_driver_instances(tmp_path):
    """Two driver objects (as in two processes) on one instrument share the pace via the lock file."""
    log: list[str] = []
    times: list[float] = []

    def open_link():
        link = RecordingLink(log=log)
        link.times = times
        return link

    a = DIALECTS["siglent-spd"]("psu-s", RESOURCE, 3, open_link=open_link, lock_dir=tmp_path)
    b = DIALECTS["siglent-spd"]("psu-s", RESOURCE, 3, open_link=open_link, lock_dir=tmp_path)
    threads = [threading.Thread(target=lambda s=s, ch=ch: [s.set_voltage(ch, 1.0) for _ in range(4)])
               for s, ch in ((a, 1), (b, 2))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(times) == 16
    gaps = [y - x for x, y in zip(times, times[1:], strict=False)]
    assert min(gaps) >= 0.020


def test_lock_file_named_from_resource(tmp_path, monkeypatch):
    monkeypatch.setenv("CART_HIL_LOCK_DIR", str(tmp_path / "env-locks"))
    path = lock_path("TCPIP::127.0.0.1::5025::SOCKET")
    assert path == tmp_path / "env-locks" / "TCPIP0_127.0.0.1_5025_SOCKET.lock"
    assert lock_path("TCPIP0::127.0.0.1::5025::SOCKET") == path  # same instrument, same lock
    assert lock_path(RESOURCE, tmp_path).parent == tmp_path


def test_lock_wait_is_bounded_and_names_the_holder(tmp_path):
    supply, link = make("keysight-e36312a", tmp_path, lock_timeout_s=0.2)
    path = lock_path(RESOURCE, tmp_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        os.pwrite(fd, b"424242 0\n", 0)
        fcntl.flock(fd, fcntl.LOCK_EX)
        started = time.monotonic()
        with pytest.raises(SupplyError) as err:
            supply.on(1)
        assert 0.2 <= time.monotonic() - started < 1.0
        assert "424242" in str(err.value) and str(path) in str(err.value) and "psu-t" in str(err.value)
        assert link.log == []
    finally:
        os.close(fd)
    supply.on(1)  # the holder is gone: works again
    assert link.log == ["OUTP ON,(@1)", "*OPC?"]


def test_lock_excludes_threads_during_a_sequence(tmp_path):
    """Select-then-command sequences from many threads never interleave."""
    log: list[str] = []
    link = RecordingLink(log=log, replies=lambda command: '0,"No error"')
    supply = DIALECTS["rs-ngx"]("psu-r", RESOURCE, 3, open_link=lambda: link, lock_dir=tmp_path)
    threads = [threading.Thread(target=lambda ch=ch: [supply.set_voltage(ch, ch) for _ in range(50)])
               for ch in (1, 2, 3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(log) == 3 * 50 * 3
    for i in range(0, len(log), 3):
        select, volt, error_query = log[i:i + 3]
        ch = int(select.split()[-1])
        assert volt == f"VOLT {ch:.3f}" and error_query == "SYST:ERR?"


# ----------------------------------------------------------------- refused settings
# (dialect, setting, commands sent, error query, the instrument's answers to it in order, text in the error)
REFUSALS = [
    ("keysight-e36312a", ("set_voltage", 1, 12), ["VOLT 12.000,(@1)"], "SYST:ERR?",
     ['-222,"Data out of range"', '+0,"No error"'], '-222,"Data out of range"'),
    ("rigol-dp800", ("set_voltage", 3, 12), [":SOUR3:VOLT 12.000"], ":SYST:ERR?",
     ['-222,"Data out of range"', '0,"No error"'], '-222,"Data out of range"'),
    ("rs-ngx", ("set_current_limit", 2, 25), ["INST:NSEL 2", "CURR 25.000"], "SYST:ERR?",
     ['-222,"Data out of range"', '0,"No error"'], '-222,"Data out of range"'),
    ("rs-hmc", ("set_voltage", 2, 40), ["INST:NSEL 2", "VOLT 40.000"], "SYST:ERR?",
     ['-222,"Data out of range"', '0,"No error"'], '-222,"Data out of range"'),
    ("siglent-spd", ("set_voltage", 1, 40), ["CH1:VOLT 40.000"], "SYST:ERR?",
     ['-222,"Data out of range"', '0,"No error"'], '-222,"Data out of range"'),
    ("aimtti", ("set_voltage", 1, 40), ["V1 40.000"], "EER?", ["100", "0"],
     "EER? 100 (range error: the numeric value sent is not allowed)"),
]


@pytest.mark.parametrize(("dialect", "call", "commands", "error_query", "answers", "text"), REFUSALS,
                         ids=[r[0] for r in REFUSALS])
def test_refused_setting_is_a_supply_error_naming_everything(tmp_path, dialect, call, commands, error_query,
                                                             answers, text):
    queue = iter(answers)
    supply, link = make(dialect, tmp_path, lambda command: next(queue) if command == error_query else "1")
    supply.model = "MODEL-X"  # as open_supply(model=...) or identify() sets it
    operation, ch, value = call
    with pytest.raises(SupplyError) as err:
        getattr(supply, operation)(ch, value)
    # the setting and the error query in one sequence, then the queue read until it says empty
    assert link.log == [*commands, error_query, error_query]
    message = str(err.value)
    for part in ("supply psu-t", "MODEL-X", RESOURCE, f"channel {ch}", repr("; ".join(commands)), text):
        assert part in message, (part, message)


def test_every_queued_error_is_read_and_reported(tmp_path):
    queue = iter(['-222,"Data out of range"', '-221,"Settings conflict"', '+0,"No error"', '+0,"No error"'])
    supply, link = make("keysight-e36312a", tmp_path, lambda command: next(queue))
    with pytest.raises(SupplyError) as err:
        supply.set_voltage(1, 12)
    assert '-222,"Data out of range"; -221,"Settings conflict"' in str(err.value)
    assert link.log == ["VOLT 12.000,(@1)"] + ["SYST:ERR?"] * 3
    assert supply.errors() == []  # nothing left behind for the next check


def test_error_queue_reading_is_bounded(tmp_path):
    supply, link = make("keysight-e36312a", tmp_path, lambda command: '-350,"Queue overflow"')
    with pytest.raises(SupplyError) as err:
        supply.set_current_limit(2, 5)
    assert link.log.count("SYST:ERR?") == ScpiSupply.MAX_ERRORS
    assert f"still held errors after {ScpiSupply.MAX_ERRORS} reads" in str(err.value)


def test_garbled_error_reply_means_reconnect_and_resend(tmp_path):
    answers = iter(["1", '+0,"No error"'])  # a stale *OPC? reply where the error entry should be
    opened: list[RecordingLink] = []

    def open_link():
        opened.append(RecordingLink(lambda command: next(answers)))
        return opened[-1]

    supply = DIALECTS["keysight-e36312a"]("psu-a", RESOURCE, 3, open_link=open_link, lock_dir=tmp_path,
                                          backoff_s=0.001)
    supply.set_voltage(2, 12)
    assert [link.log for link in opened] == [["VOLT 12.000,(@2)", "SYST:ERR?"]] * 2


@pytest.mark.parametrize("dialect", sorted(DIALECTS))
def test_switching_is_not_a_setting_no_error_query(tmp_path, dialect):
    """Power cuts stay one round trip: on, off and safe_state never read the error queue."""
    def replies(command: str) -> str:  # the Siglent reads its status word back after switching
        if command == "SYST:STAT?":
            return "0x0014" if link.log[-2] == "OUTP CH1,ON" else "0x0004"
        return "1" if command in ("*OPC?",) else ""

    supply, link = make(dialect, tmp_path, replies)
    supply.on(1)
    supply.off(1)
    supply.safe_state([1, 2])
    assert len(link.log) >= 5 and supply.ERROR_QUERY not in link.log, link.log


def test_open_supply_names_the_model_in_errors():
    supply = open_supply("psu-a", RESOURCE, "keysight-e36312a", 3, model="E36313A")
    assert supply.model == "E36313A"
    assert open_supply("psu-b", RESOURCE, "rigol-dp800", 3).model is None


def test_identify_learns_the_model(tmp_path):
    supply, _ = make("rigol-dp800", tmp_path, {"*IDN?": "RIGOL TECHNOLOGIES,DP832,DP8C1,00.01.14"})
    assert supply.model is None
    supply.identify()
    assert supply.model == "DP832"


@pytest.mark.parametrize(("reply", "parsed"), [
    ('-222,"Data out of range"', (-222, "Data out of range")), ('+0,"No error"', (0, "No error")),
    ('0,"No error"', (0, "No error")), ("0  No Error", (0, "No Error")),
    ('-222,"Data out of range;VOLT 40"', (-222, "Data out of range;VOLT 40")),
    ("1", None), ("", None), ("OFF", None), ('"No error"', None),
])
def test_scpi_error_entries_parsed(tmp_path, reply, parsed):
    supply, _ = make("keysight-e36312a", tmp_path)
    assert supply.parse_error(reply) == parsed


@pytest.mark.parametrize(("reply", "code"), [("0", 0), ("100", 100), (" 104 ", 104), ("x", None), ("", None),
                                             ('-222,"Data out of range"', None)])
def test_aimtti_execution_error_register_parsed(tmp_path, reply, code):
    supply, _ = make("aimtti", tmp_path)
    parsed = supply.parse_error(reply)
    assert (parsed[0] if parsed else None) == code
