"""One field incident replayed on one cart: `hil repro INCIDENT.yaml` runs this test with
``-p harness.repro --incident FILE --cart ID`` (harness/repro.py; the incident format: docs/incidents.md).

Not a suite of the gate, nor collected by `hil test` (the name is not test_*.py: pytest runs it only when
named). Without an incident it is skipped, before any fixture touches the rack. It fails when the
incident's failure reproduces, its message the cause, one line.
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.skipif("not config.getoption('--incident', None)",
                                reason="an incident replay: `hil repro INCIDENT.yaml` runs it")


def test_incident_replay(incident_replay):
    verdict = incident_replay.run()
    if verdict.reproduced:
        pytest.fail(verdict.line(), pytrace=False)
