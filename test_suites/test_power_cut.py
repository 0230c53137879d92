"""Power cuts, on every cart: the sweep records an uninterrupted update's event lines, then cuts the
supply at them (and at seeded random moments, once again during the recovery boot, once during a
rollback) in fresh updates, and after each cut checks that the cart boots the old or the new release,
that slots and boot control agree with what runs, that the job ends or resumes, that delivering again
converges, and that every rollback is counted once (harness/sweep.py).

`--sweep reduced` (the gate's default): every 5th event, every boot-control write, 2 random cuts.
`--sweep full` (or HIL_SWEEP=full; `hil gate --sweep full`, `hil sweep`): every event, 10 random cuts.

A sweep that cannot fail proves nothing: each seeded fault build must fail it, the failure naming the
event at which the invariant broke. The sweep's table and image go to the Allure result and to
<run dir>/sweep/.
"""

from __future__ import annotations

import re

import pytest

from harness.ota import bump
from harness.plugin import STATE
from harness.sweep import PowerCutSweep, SweepReport

SEED = 8                                  # the random cuts: the same seed, the same points
ROLLS_BACK = {"self_test_fail": True}     # the release of the "cut during a rollback" point

# (id, fault build, what the first broken invariant must say, at an event whose name matches)
SEEDED_FAULTS = [
    pytest.param({"bcb_single_copy": True}, r"boot control lost", r"bcb", id="bcb-single-copy"),
]


def publish(report: SweepReport, request) -> None:
    report.attach()
    report.write(request.config.stash[STATE].run_dir / "sweep")
    print(report.summary())


def test_every_cut_leaves_the_cart_safe(cart, ota, fleet, request):
    report = PowerCutSweep(cart, ota, fleet).sweep(request.config.getoption("--sweep"), seed=SEED,
                                                   rollback_faults=ROLLS_BACK)
    publish(report, request)
    assert not report.failures(), report.summary() + "\n" + "\n".join(report.failures())


@pytest.mark.hil_self_check("bcb_single_copy")
@pytest.mark.parametrize(("faults", "cause", "event"), SEEDED_FAULTS)
def test_seeded_fault_build_fails_the_sweep_at_its_event(cart, ota, fleet, request, faults, cause, event, self_check):
    sweep = PowerCutSweep(cart, ota, fleet, faults=faults, label="+".join(faults))
    report = sweep.catch_fault_build()
    publish(report, request)
    caught = [r for r in report.results if not r.passed]
    assert caught, f"the sweep did not catch the fault build {faults}:\n{report.table()}"
    line = caught[0].line()
    assert re.search(cause, line) and re.search(rf"cut at {event}\S*#\d+", line), line
    self_check.caught(line)
    # leave the cart on a reference release (the fault build would weaken every later test's boot control)
    ota.update(ota.image(bump(cart.version(), patch=1))).expect_confirmed()
