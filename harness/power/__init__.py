"""Bench power supplies: drivers per dialect, a fake, and the cart's view of its channel.

    supply = open_supply("psu-a", "TCPIP0::127.0.0.1::47101::SOCKET", "keysight-e36312a", 3)
    power = ChannelPower(supply, 1, max_voltage=13.2, current_limit=1.5, label="slot 1 cart-01")
    power.set_voltage(12.0); power.on(); power.measure_current()
"""

from __future__ import annotations

from .aimtti import AimTti
from .base import (
    Identity,
    InstrumentLock,
    Link,
    PowerError,
    PowerLimitError,
    ScpiSupply,
    Supply,
    SupplyError,
    VisaLink,
    lock_path,
)
from .channel import ChannelPower
from .fake import FakeSupply
from .keysight import KeysightE36312A
from .rigol import RigolDP800
from .rohde import RohdeHmc, RohdeNgx
from .siglent import SiglentSpd

#: dialect name (as in the rig file) -> driver class
DIALECTS: dict[str, type[ScpiSupply]] = {
    cls.dialect: cls for cls in (KeysightE36312A, RigolDP800, RohdeNgx, RohdeHmc, SiglentSpd, AimTti)
}


def open_supply(name: str, resource: str, dialect: str, channels: int, timeout_ms: int = 1000,
                model: str | None = None) -> ScpiSupply:
    """The driver for a rig's supply entry. The session opens on the first command.
    ``model`` (the rig's) names the instrument in errors until identify() reads it from *IDN?."""
    try:
        cls = DIALECTS[dialect]
    except KeyError:
        raise ValueError(
            f"supply {name}: unknown dialect {dialect!r}; known: {', '.join(sorted(DIALECTS))}"
        ) from None
    supply = cls(name, resource, channels, timeout_ms=timeout_ms)
    if model:
        supply.model = model
    return supply


__all__ = [
    "DIALECTS",
    "AimTti",
    "ChannelPower",
    "FakeSupply",
    "Identity",
    "InstrumentLock",
    "KeysightE36312A",
    "Link",
    "PowerError",
    "PowerLimitError",
    "RigolDP800",
    "RohdeHmc",
    "RohdeNgx",
    "ScpiSupply",
    "SiglentSpd",
    "Supply",
    "SupplyError",
    "VisaLink",
    "lock_path",
    "open_supply",
]
