"""ChannelPower: the cart's view of its supply channel, with the cart's limits enforced."""

from __future__ import annotations

import math

from .base import Identity, PowerLimitError, Supply


class ChannelPower:
    """One channel of one supply, for one cart. Values above the limits are refused before
    anything is sent (`PowerLimitError` naming the label, the value and the limit)."""

    def __init__(self, supply: Supply, channel: int, *, max_voltage: float, current_limit: float, label: str):
        if not isinstance(channel, int) or not 1 <= channel <= supply.channels:
            raise ValueError(f"{label}: channel {channel!r} not in 1..{supply.channels} of supply {supply.name}")
        self.supply = supply
        self.channel = channel
        self.max_voltage = float(max_voltage)
        self.current_limit = float(current_limit)
        self.label = label

    def __repr__(self) -> str:
        return f"ChannelPower({self.label!r}, {self.supply.name} ch{self.channel})"

    @staticmethod
    def _check(label: str, what: str, value: float, unit: str, limit: float, limit_name: str) -> float:
        value = float(value)
        if not math.isfinite(value) or value < 0:
            raise PowerLimitError(f"{label}: refusing {what} {value!r} {unit}: not a finite value >= 0")
        if value > limit:
            raise PowerLimitError(
                f"{label}: refusing {what} {value:g} {unit}: above the cart's {limit_name} {limit:g} {unit}"
            )
        return value

    def set_voltage(self, volts: float) -> None:
        volts = self._check(self.label, "voltage", volts, "V", self.max_voltage, "max_voltage")
        self.supply.set_voltage(self.channel, volts)

    def set_current_limit(self, amps: float) -> None:
        amps = self._check(self.label, "current limit", amps, "A", self.current_limit, "current_limit")
        self.supply.set_current_limit(self.channel, amps)

    def on(self) -> None:
        self.supply.on(self.channel)

    def off(self) -> None:
        self.supply.off(self.channel)

    def is_on(self) -> bool:
        return self.supply.is_on(self.channel)

    def voltage_setpoint(self) -> float:
        return self.supply.voltage_setpoint(self.channel)

    def current_limit_setpoint(self) -> float:
        return self.supply.current_limit_setpoint(self.channel)

    def measure_voltage(self) -> float:
        return self.supply.measure_voltage(self.channel)

    def measure_current(self) -> float:
        return self.supply.measure_current(self.channel)

    def identify(self) -> Identity:
        return self.supply.identify()

    def safe_state(self) -> None:
        self.supply.safe_state([self.channel])

    def arm_off(self):
        """The channel's OFF, pre-encoded on an open session (see harness/cut.py for cuts on an event)."""
        return self.supply.arm_off(self.channel)
