"""Aim-TTi CPX / QL / MX series: Aim-TTi's own command language, not SCPI.

``V1 5.0``, ``I1 0.5``, ``OP1 1``, ``OP1?`` -> ``1``; read-backs carry units:
``V1O?`` -> ``12.000V``, ``I1O?`` -> ``0.210A``, ``V1?`` -> ``V1 12.000``.
Errors are in ``*ESR?`` (standard event status) and ``EER?`` / ``QER?``, not ``SYST:ERR?``.
After a setting the driver reads ``EER?``, the Execution Error Register: the number of the last
execution error (0: none), cleared by reading it; 100 is a value out of range, and the instrument
keeps its previous setting.
"""

from __future__ import annotations

import re

from .base import ScpiSupply

_NUMBER = re.compile(r"(?:([VI])\d+\s+)?([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*([VA]?)")
_PREFIX_UNIT = {"V": "V", "I": "A"}
_ESR_BITS = {0x20: "command error", 0x10: "execution error", 0x08: "device error", 0x04: "query error"}
#: Execution Error Register numbers (Aim-TTi programming manuals; 1-9: internal hardware errors)
EER_ERRORS = {
    100: "range error: the numeric value sent is not allowed",
    101: "recall error: the store holds corrupted data",
    102: "recall error: the store is empty",
    103: "the output addressed is not available",
    104: "command not valid with the output on",
    200: "read only: this interface may not change settings",
}


class AimTti(ScpiSupply):
    dialect = "aimtti"
    ERROR_QUERY = "EER?"
    ON = ("OP{ch} 1",)
    OFF = ("OP{ch} 0",)
    IS_ON = ("OP{ch}?",)
    SET_VOLTAGE = ("V{ch} {value:.3f}",)
    SET_CURRENT_LIMIT = ("I{ch} {value:.3f}",)
    VOLTAGE_SETPOINT = ("V{ch}?",)
    CURRENT_LIMIT_SETPOINT = ("I{ch}?",)
    MEASURE_VOLTAGE = ("V{ch}O?",)
    MEASURE_CURRENT = ("I{ch}O?",)

    def parse_number(self, command: str, reply: str, unit: str) -> float:
        """``12.000V``, ``0.210A``, ``V1 12.000``: the unit, when given, must be the one asked."""
        m = _NUMBER.fullmatch(reply.strip())
        if not m:
            raise self._bad_reply(command, reply, f"a number of {unit} like '12.000{unit}'")
        prefix, number, suffix = m.groups()
        if (suffix and suffix != unit) or (prefix and _PREFIX_UNIT[prefix] != unit):
            raise self._bad_reply(command, reply, f"a value in {unit}")
        return float(number)

    def parse_error(self, reply: str) -> tuple[int, str] | None:
        """``EER?`` answers a bare number: ``0`` (none) or ``100`` (range error), ..."""
        text = reply.strip()
        if not re.fullmatch(r"\d{1,4}", text):
            return None
        code = int(text)
        meaning = EER_ERRORS.get(code, "internal hardware error" if 1 <= code <= 9 else "")
        return code, meaning

    def describe_error(self, reply: str) -> str:
        code, meaning = self.parse_error(reply) or (reply.strip(), "")
        return f"EER? {code}" + (f" ({meaning})" if meaning else "")

    def errors(self, max_entries: int = 32) -> list[str]:
        esr, eer, qer = self.transact(["*ESR?", "EER?", "QER?"])
        found = []
        try:
            esr_bits = int(esr)
            if esr_bits:
                named = [text for bit, text in _ESR_BITS.items() if esr_bits & bit]
                found.append(f"*ESR? {esr_bits}: {', '.join(named) or 'other'}")
            found += [f"{name} {value}" for name, value in (("EER?", eer), ("QER?", qer)) if int(value)]
        except ValueError:
            raise self._bad_reply("*ESR?; EER?; QER?", f"{esr}; {eer}; {qer}", "numbers") from None
        return found[:max_entries]
