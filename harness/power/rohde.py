"""Rohde & Schwarz supplies: select a channel (``INST:NSEL n``), then command it.

A channel delivers power only when its own output switch and the master switch are both on:
- rs-ngx (NGE100, NGP800): ``OUTP:SEL ON`` per channel, master ``OUTP:GEN ON``;
- rs-hmc (HMC804x): ``OUTP:CHAN ON`` per channel, master ``OUTP:MAST ON``.

``on`` switches the channel and the master on; ``off`` switches only the channel off, so
the other carts on the same supply keep their power. Selection is instrument state: every
sequence below runs under the instrument lock (see base.py).
"""

from __future__ import annotations

from typing import ClassVar

from .base import ScpiSupply

SELECT = "INST:NSEL {ch}"


class _RohdeSupply(ScpiSupply):
    CHANNEL_SWITCH: ClassVar[str] = ""
    MASTER_SWITCH: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        chan, master = cls.CHANNEL_SWITCH, cls.MASTER_SWITCH
        cls.ON = (SELECT, f"{chan} ON", f"{master} ON")
        cls.OFF = (SELECT, f"{chan} OFF")
        cls.IS_ON = (SELECT, f"{chan}?", f"{master}?")
        cls.SET_VOLTAGE = (SELECT, "VOLT {value:.3f}")
        cls.SET_CURRENT_LIMIT = (SELECT, "CURR {value:.3f}")
        cls.VOLTAGE_SETPOINT = (SELECT, "VOLT?")
        cls.CURRENT_LIMIT_SETPOINT = (SELECT, "CURR?")
        cls.MEASURE_VOLTAGE = (SELECT, "MEAS:VOLT?")
        cls.MEASURE_CURRENT = (SELECT, "MEAS:CURR?")

    def parse_output_state(self, replies: list[str], ch: int) -> bool:
        channel, master = replies[-2:]
        return self.parse_bool(self.IS_ON[1], channel) and self.parse_bool(self.IS_ON[2], master)


class RohdeNgx(_RohdeSupply):
    """R&S NGE100 / NGP800."""

    dialect = "rs-ngx"
    CHANNEL_SWITCH = "OUTP:SEL"
    MASTER_SWITCH = "OUTP:GEN"


class RohdeHmc(_RohdeSupply):
    """R&S (Hameg) HMC8041/8042/8043."""

    dialect = "rs-hmc"
    CHANNEL_SWITCH = "OUTP:CHAN"
    MASTER_SWITCH = "OUTP:MAST"
