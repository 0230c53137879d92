"""What each channel of the supplies cart-hil knows can be set to: the models' data-sheet ratings.

A real supply refuses a setting above its channel's rating quietly (it queues an error and keeps
the old setting; the drivers read the queue after every setting, see base.py). `hil rig check`
refuses earlier: a cart whose nominal voltage or current limit exceeds the rating of the channel
that powers it, and a supply whose model is not here. To use another model, add its row.

The virtual rack keeps its own copy (vrack/psu.py RATINGS: the two packages may not import each
other); tests/test_power_emulated.py holds both to the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ChannelRating:
    volts: float
    amps: float


@dataclass(frozen=True)
class ModelRatings:
    model: str
    dialect: str                            # the driver that speaks to it (harness.power.DIALECTS)
    channels: tuple[ChannelRating, ...]     # output 1, 2, ...
    source: str                             # where the numbers come from

    def channel(self, ch: int) -> ChannelRating:
        return self.channels[ch - 1]


def _model(model: str, dialect: str, source: str, *channels: tuple[float, float]) -> ModelRatings:
    return ModelRatings(model, dialect, tuple(ChannelRating(v, a) for v, a in channels), source)


_E363XX = "Keysight E36300 Series data sheet"
_DP800 = "Rigol DP800 Series data sheet"
_NGP800 = "R&S NGP800 data sheet: 32 V / 20 A, at most 200 W per channel"
_SPD = "Siglent SPD3303X/X-E data sheet: CH3 is fixed 2.5/3.3/5 V"
_QL = "Aim-TTi QL series data sheet: ranges 15 V/5 A, 35 V/3 A, 35 V/500 mA; output 3 is the 1-6 V aux"

RATINGS: dict[str, ModelRatings] = {r.model: r for r in (
    _model("E36312A", "keysight-e36312a", _E363XX, (6, 5), (25, 1), (25, 1)),
    _model("E36313A", "keysight-e36312a", _E363XX, (6, 10), (25, 2), (25, 2)),
    _model("DP832", "rigol-dp800", _DP800, (30, 3), (30, 3), (5, 3)),
    _model("DP832A", "rigol-dp800", _DP800, (30, 3), (30, 3), (5, 3)),
    _model("NGP802", "rs-ngx", _NGP800, (32, 20), (32, 20)),
    _model("NGP804", "rs-ngx", _NGP800, (32, 20), (32, 20), (32, 20), (32, 20)),
    _model("NGE103B", "rs-ngx", "R&S NGE100B data sheet", (32, 3), (32, 3), (32, 3)),
    _model("HMC8043", "rs-hmc", "R&S HMC804x data sheet", (32, 3), (32, 3), (32, 3)),
    _model("SPD3303X", "siglent-spd", _SPD, (32, 3.2), (32, 3.2), (5, 3.2)),
    _model("SPD3303X-E", "siglent-spd", _SPD, (32, 3.2), (32, 3.2), (5, 3.2)),
    _model("QL355TP", "aimtti", _QL, (35, 5), (35, 5), (6, 3)),
)}


def ratings_for(model: str) -> ModelRatings | None:
    """The ratings of a model as a rig spells it (case does not matter), or None if unknown."""
    return RATINGS.get(model.strip().upper())
