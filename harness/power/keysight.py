"""Keysight E36312A (and the E3631xA/E36xxx family): every command names its channel list."""

from __future__ import annotations

from .base import ScpiSupply


class KeysightE36312A(ScpiSupply):
    """``VOLT 5,(@1)``, ``OUTP ON,(@1)``, ``OUTP? (@1)`` -> ``1``; no channel selection state."""

    dialect = "keysight-e36312a"
    ON = ("OUTP ON,(@{ch})",)
    OFF = ("OUTP OFF,(@{ch})",)
    IS_ON = ("OUTP? (@{ch})",)
    SET_VOLTAGE = ("VOLT {value:.3f},(@{ch})",)
    SET_CURRENT_LIMIT = ("CURR {value:.3f},(@{ch})",)
    VOLTAGE_SETPOINT = ("VOLT? (@{ch})",)
    CURRENT_LIMIT_SETPOINT = ("CURR? (@{ch})",)
    MEASURE_VOLTAGE = ("MEAS:VOLT? (@{ch})",)
    MEASURE_CURRENT = ("MEAS:CURR? (@{ch})",)

    def safe_state_commands(self, channels: list[int]) -> list[str]:
        return [f"OUTP OFF,(@{','.join(map(str, channels))})"]
