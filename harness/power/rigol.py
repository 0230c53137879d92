"""Rigol DP800 (DP811/DP821/DP831/DP832): channel-addressed forms, so no selection state is used."""

from __future__ import annotations

from .base import ScpiSupply


class RigolDP800(ScpiSupply):
    """``:SOUR1:VOLT 5``, ``:OUTP CH1,ON``, ``:OUTP? CH1`` -> ``ON``/``OFF``, ``:MEAS:CURR? CH1``.

    The DP800 also has ``:INST:NSEL n``; the ``SOURn``/``CHn`` forms make it unnecessary, which
    keeps every operation a single command that cannot interleave with another process.
    """

    dialect = "rigol-dp800"
    ERROR_QUERY = ":SYST:ERR?"  # -> -222,"Data out of range" after a setting above the channel's rating
    ON = (":OUTP CH{ch},ON",)
    OFF = (":OUTP CH{ch},OFF",)
    IS_ON = (":OUTP? CH{ch}",)
    SET_VOLTAGE = (":SOUR{ch}:VOLT {value:.3f}",)
    SET_CURRENT_LIMIT = (":SOUR{ch}:CURR {value:.3f}",)
    VOLTAGE_SETPOINT = (":SOUR{ch}:VOLT?",)
    CURRENT_LIMIT_SETPOINT = (":SOUR{ch}:CURR?",)
    MEASURE_VOLTAGE = (":MEAS:VOLT? CH{ch}",)
    MEASURE_CURRENT = (":MEAS:CURR? CH{ch}",)
