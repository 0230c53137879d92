"""Siglent SPD3303X / SPD3303X-E.

The SPD3303X loses a command that arrives less than about 20 ms after the previous one
(it is still busy with it) and says nothing. The driver keeps the instruments's pace: before
each command it sleeps only what remains of the interval since the last command sent to
this instrument by any process (the time is kept in the instrument lock file).

It has no ``OUTP?`` and no ``*OPC?``: output state comes from the ``SYST:STAT?`` status
word (bit 4: CH1 on, bit 5: CH2 on; CH3 has no bit), which is also the confirmation query.
"""

from __future__ import annotations

import re

from .base import ScpiSupply, SupplyError

#: The instrument's own need (physics) plus 2 ms for delivery jitter between our clock and its.
COMMAND_INTERVAL_S = 0.020 + 0.002

STATUS_OUTPUT_BIT = {1: 0x0010, 2: 0x0020}
#: what the queue says of a command that came too soon: lost, never executed (so it can be sent again)
_LOST = re.compile(r'-363\s*,\s*"Input buffer overrun; command lost: (.*)"')


class SiglentSpd(ScpiSupply):
    """``CH1:VOLT 5``, ``OUTP CH1,ON``, ``MEAS:VOLT? CH1``, ``SYST:STAT?`` -> ``0x0010``."""

    dialect = "siglent-spd"
    confirm = "SYST:STAT?"
    command_interval_s = COMMAND_INTERVAL_S
    ON = ("OUTP CH{ch},ON",)
    OFF = ("OUTP CH{ch},OFF",)
    IS_ON = ("SYST:STAT?",)
    SET_VOLTAGE = ("CH{ch}:VOLT {value:.3f}",)
    SET_CURRENT_LIMIT = ("CH{ch}:CURR {value:.3f}",)
    VOLTAGE_SETPOINT = ("CH{ch}:VOLT?",)
    CURRENT_LIMIT_SETPOINT = ("CH{ch}:CURR?",)
    MEASURE_VOLTAGE = ("MEAS:VOLT? CH{ch}",)
    MEASURE_CURRENT = ("MEAS:CURR? CH{ch}",)

    def lost_command(self, entry: str) -> str | None:
        m = _LOST.fullmatch(entry.strip())
        return m.group(1).strip() if m else None

    def confirmed(self, reply: str) -> bool:
        try:
            self.parse_status(reply)
        except SupplyError:
            return False
        return True

    def parse_status(self, reply: str) -> int:
        try:
            return int(reply.strip(), 16)
        except ValueError:
            raise self._bad_reply("SYST:STAT?", reply, "a hex status word like 0x0010") from None

    def parse_output_state(self, replies: list[str], ch: int) -> bool:
        return bool(self.parse_status(replies[-1]) & STATUS_OUTPUT_BIT[ch])

    def is_on(self, ch: int) -> bool:
        if self._channel(ch) not in STATUS_OUTPUT_BIT:
            raise SupplyError(
                f"supply {self.name} ({self.resource}): the SPD3303X reports no output state for CH{ch}"
            )
        return super().is_on(ch)

    def on(self, ch: int) -> None:
        self._switch(ch, True)

    def off(self, ch: int) -> None:
        self._switch(ch, False)

    def _switch(self, ch: int, on: bool) -> None:
        """Switch, then read the status word back: a lost command is sent again, not assumed."""
        command = (self.ON if on else self.OFF)[0].format(ch=self._channel(ch))
        if ch not in STATUS_OUTPUT_BIT:
            self.transact([command])
            return
        for _ in range(self.attempts):
            status = self.parse_status(self.transact([command, "SYST:STAT?"])[-1])
            if bool(status & STATUS_OUTPUT_BIT[ch]) == on:
                return
        raise SupplyError(
            f"supply {self.name} ({self.resource}): sent {command!r} {self.attempts} time(s) but SYST:STAT? "
            f"still says 0x{status:04X} (CH{ch} {'off' if on else 'on'}): the instrument loses the command"
        )
