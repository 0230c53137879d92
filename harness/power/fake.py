"""FakeSupply: an in-memory supply with the same protocol, recording every call (unit tests)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from .base import Identity, SupplyError


@dataclass
class FakeChannel:
    voltage: float = 0.0
    current_limit: float = 1.0
    output: bool = False


class FakeSupply:
    """Implements `Supply`. ``calls`` lists every call as (method, args...).

    ``draw(ch)`` gives the current a powered channel draws (default 0.0 A);
    ``fail`` set to an exception makes the next calls raise it (a dead instrument).
    ``per_channel_output=False`` models an instrument whose output command switches every
    output at once (a Keysight E3631A): arming a cut on it is refused.
    """

    def __init__(
        self,
        name: str = "fake",
        channels: int = 3,
        *,
        model: str = "FakeSupply",
        draw: Callable[[int], float] | None = None,
        resource: str | None = None,
        per_channel_output: bool = True,
    ):
        self.PER_CHANNEL_OUTPUT = per_channel_output
        self.name = name
        self.channels = channels
        self.model = model
        self.resource = resource or f"fake://{name}"
        self.draw = draw
        self.calls: list[tuple] = []
        self.state = {ch: FakeChannel() for ch in range(1, channels + 1)}
        self.fail: Exception | None = None
        self.closed = False

    def _call(self, method: str, *args: object) -> None:
        self.calls.append((method, *args))
        if self.fail is not None:
            raise self.fail
        if self.closed:
            raise SupplyError(f"supply {self.name} ({self.resource}): {method} after close()")

    def _ch(self, ch: int) -> FakeChannel:
        if not isinstance(ch, int) or not 1 <= ch <= self.channels:
            raise ValueError(f"supply {self.name}: channel {ch!r} not in 1..{self.channels}")
        return self.state[ch]

    @staticmethod
    def _level(what: str, value: float) -> float:
        value = float(value)
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{what} {value!r} must be a finite number >= 0")
        return value

    def identify(self) -> Identity:
        self._call("identify")
        return Identity("cart-hil", self.model, self.name, "0", f"cart-hil,{self.model},{self.name},0")

    def on(self, ch: int) -> None:
        self._call("on", ch)
        self._ch(ch).output = True

    def off(self, ch: int) -> None:
        self._call("off", ch)
        self._ch(ch).output = False

    def is_on(self, ch: int) -> bool:
        self._call("is_on", ch)
        return self._ch(ch).output

    def set_voltage(self, ch: int, volts: float) -> None:
        self._call("set_voltage", ch, volts)
        self._ch(ch).voltage = self._level("voltage", volts)

    def set_current_limit(self, ch: int, amps: float) -> None:
        self._call("set_current_limit", ch, amps)
        self._ch(ch).current_limit = self._level("current limit", amps)

    def voltage_setpoint(self, ch: int) -> float:
        self._call("voltage_setpoint", ch)
        return self._ch(ch).voltage

    def current_limit_setpoint(self, ch: int) -> float:
        self._call("current_limit_setpoint", ch)
        return self._ch(ch).current_limit

    def measure_voltage(self, ch: int) -> float:
        self._call("measure_voltage", ch)
        c = self._ch(ch)
        return c.voltage if c.output else 0.0

    def measure_current(self, ch: int) -> float:
        self._call("measure_current", ch)
        c = self._ch(ch)
        if not c.output:
            return 0.0
        return min(self.draw(ch) if self.draw else 0.0, c.current_limit)

    def safe_state(self, channels: Iterable[int]) -> None:
        chans = sorted(set(channels))
        self._call("safe_state", chans)
        for ch in chans:
            self._ch(ch).output = False

    def arm_off(self, ch: int) -> FakeArmedOff:
        self._call("arm_off", ch)
        self._ch(ch)
        if not self.PER_CHANNEL_OUTPUT:
            raise SupplyError(f"supply {self.name} ({self.resource}): the {self.model} output command switches "
                              f"every output at once: a cut on channel {ch} would cut the others too")
        return FakeArmedOff(self, ch)

    def close(self) -> None:
        self.calls.append(("close",))
        self.closed = True


class FakeArmedOff:
    """`ArmedOff` for the fake: ``fire()`` switches the channel off and records ("fire", ch)."""

    path = "fake"

    def __init__(self, supply: FakeSupply, ch: int):
        self.supply = supply
        self.channel = ch
        self.commands = (f"OFF {ch}",)
        self.data = f"OFF {ch}\n".encode("ascii")

    def fire(self) -> int:
        self.supply._call("fire", self.channel)
        self.supply.state[self.channel].output = False
        return time.monotonic_ns()
