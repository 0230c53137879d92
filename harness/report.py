"""The run's record, and every report written from it as results happen.

One record per configuration (cart) × scenario (the test without its cart parameter): outcome, one-line
cause, duration, the firmware and images the test recorded, the rollbacks it saw. From it, and only from
it, come ``verdict.json``, ``junit.xml`` and the matrix (``matrix.svg``; the text table `hil gate`
prints). A teardown error is part of its test's record, never a second test case.

A pytest plugin: ``-p harness.report`` (`hil gate|smoke|sweep` load it), active in the controller only
under xdist (the workers report to it). After every finished test it rewrites verdict.json, junit.xml and
matrix.svg in the run's directory (temp file + rename), so a run that is stopped, interrupted or even
killed keeps every result it had. At the end the record says how the run ended: ``finished``,
``interrupted`` (Ctrl-C, or SIGTERM through `hil`; the tests cut short are named) or ``stopped`` (the
harness ended the run: a rig that cannot be used, reports that cannot be written).

What tests may add to their record (``record_property(name, value)``), read when present, never invented:

    firmware_from   str  the version the cart ran before the test's first update, e.g. "1.4.2"
    firmware_to     str  a version the test delivered (a candidate), once per update, in order
    image_sha256    str  sha256 (64 hex digits) of the signed image file delivered, once per update,
                         in the same order as firmware_to
    rollbacks       int  rollbacks the cart counted during an update (firmware_rollback_count rose by);
                         recorded once per update, summed
    supply_idn      str  "<supply>:<channel> <*IDN? answer>": the instrument that powered the cart
    not_run         str  "<check>: <why>": a check this rig cannot run (listed, never dropped)

(``cart`` and ``fault_build`` are recorded by harness.plugin, ``caught`` by the ``self_check`` fixture.)

What `hil gate` adds when it judges the finished run (`finalize`): ``preflight``, the rollout preflight of
the candidate (harness.cli), and ``checks_failed``, the gate's own checks after the tests that failed, one
line each (the preflight's among them); a check that failed makes the verdict FAIL.
"""

from __future__ import annotations

import contextlib
import html
import json
import os
import platform
import re
import shutil
import subprocess
import tempfile
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = 1
VERDICT, JUNIT, MATRIX_SVG, HTML_DIR = "verdict.json", "junit.xml", "matrix.svg", "allure-report"

#: how a configuration × scenario ended, worst first: a matrix cell shows the worst of its cases
OUTCOMES = ("failed", "error", "interrupted", "not-run", "skipped", "passed")
SYMBOL = {"failed": "F", "error": "E", "interrupted": "!", "not-run": "-", "skipped": "s", "passed": "."}
WORD = {"failed": "FAIL", "error": "error", "interrupted": "cut short", "not-run": "not run", "skipped": "skip",
        "passed": "pass"}
COLOUR = {"failed": "#d64545", "error": "#ef8a3c", "interrupted": "#9b59b6", "not-run": "#c8c8c8",
          "skipped": "#f2c14e", "passed": "#6dbf73"}
RIG_LEVEL = "rig"            # the configuration of a test that runs on no cart
SECTION_TAIL = 200_000       # characters of a console slice kept in junit.xml (the console log has all of it)
RECORD = pytest.StashKey["RunRecord"]()


# ------------------------------------------------------------------ naming


def split_cart(nodeid: str, cart_ids: Iterable[str]) -> tuple[str | None, str]:
    """(the cart a test runs on, the scenario: the test id without the cart parameter).

    `test_x[cart-01-unsigned]` -> ("cart-01", "test_x[unsigned]"); `test_x[cart-01]` -> ("cart-01", "test_x")."""
    if not nodeid.endswith("]") or "[" not in nodeid:
        return None, nodeid
    base, params = nodeid[:-1].split("[", 1)
    for cid in sorted(cart_ids, key=len, reverse=True):
        if params == cid:
            rest = ""
        elif params.startswith(cid + "-"):
            rest = params[len(cid) + 1:]
        elif params.endswith("-" + cid):
            rest = params[: -len(cid) - 1]
        elif f"-{cid}-" in params:
            rest = params.replace(f"-{cid}-", "-", 1)
        else:
            continue
        return cid, f"{base}[{rest}]" if rest else base
    return None, nodeid


def suite_of(scenario: str) -> str:
    """`test_suites/test_signed_update.py::...` -> `signed_update`."""
    stem = Path(scenario.split("::", 1)[0]).stem
    return stem.removeprefix("test_")


def function_of(scenario: str) -> str:
    """The scenario's test function (its parametrized cases share a matrix row), `test_` left off."""
    parts = scenario.split("[", 1)[0].split("::")[1:] or [scenario]
    return ".".join(p.removeprefix("test_") for p in parts)


def short(scenario: str) -> str:
    """`suite::function[case]`, the way lines and the matrix name a scenario."""
    case = scenario[scenario.index("["):] if scenario.endswith("]") and "[" in scenario else ""
    return f"{suite_of(scenario)}::{function_of(scenario)}{case}"


def abbreviate(text: str, width: int) -> str:
    """`text` in at most `width` characters: the middle gives way (a scenario's end often says what it checks)."""
    if len(text) <= width:
        return text
    head = (width - 1) * 3 // 5
    return text[:head] + "…" + text[len(text) - (width - 1 - head):]


def first_line(text: str, limit: int = 300) -> str:
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    line = lines[0] if lines else ""
    for prefix in ("AssertionError: ", "Failed: ", "Skipped: "):
        line = line.removeprefix(prefix)
    return line[:limit]


def _cause(report: pytest.TestReport) -> str:
    lr = report.longrepr
    if isinstance(lr, tuple):  # a skip: (file, line, reason)
        return first_line(lr[2])
    crash = getattr(lr, "reprcrash", None)
    return first_line(crash.message if crash is not None else str(lr or report.outcome))


# ------------------------------------------------------------------ the record


@dataclass
class Case:
    """One configuration × scenario of this run."""

    test: str
    configuration: str
    scenario: str
    outcome: str = "not-run"
    cause: str | None = None
    started: float | None = None
    finished: float | None = None
    duration_s: float = 0.0
    location: tuple[str, int | None] | None = None
    properties: list[tuple[str, str]] = field(default_factory=list)
    details: str = ""              # failure / error / skip text (junit.xml)
    teardown: str | None = None    # a teardown error after the test had already failed (its first line)
    output: str = ""               # console slices and captured output of a test that did not pass
    junit: bytes | None = None     # its <testcase>, once finished

    @property
    def running(self) -> bool:
        return self.started is not None and self.finished is None

    def prop_values(self, name: str) -> list[str]:
        return [v for k, v in self.properties if k == name]

    def entry(self) -> dict:
        """The case in verdict.json: only what the run saw (nothing recorded, nothing written)."""
        e: dict = {"configuration": self.configuration, "scenario": self.scenario, "test": self.test,
                   "outcome": self.outcome}
        if self.cause:
            e["cause"] = self.cause
        if self.teardown:
            e["teardown_error"] = self.teardown
        if self.started is not None:
            e["duration_s"] = round(self.duration_s, 3)
        first = self.prop_values("firmware_from")
        if first:
            e["firmware_from"] = first[0]
        for name in ("firmware_to", "image_sha256"):
            if self.prop_values(name):
                e[name] = self.prop_values(name)
        rollbacks = self.prop_values("rollbacks")
        if rollbacks:
            try:
                e["rollbacks"] = sum(int(v) for v in rollbacks)
            except ValueError:
                e["rollbacks"] = rollbacks
        for name in ("fault_build", "caught", "supply_idn"):  # supply_idn: what the cart's supply said to *IDN?
            if self.prop_values(name):
                e[name] = self.prop_values(name)[0]
        if self.prop_values("not_run"):  # checks the rig could not run: said, never silently dropped
            e["checks_not_run"] = self.prop_values("not_run")
        return e


class RunRecord:
    """The run's cases by test id, and where its reports go. Fed by the plugin's hooks below."""

    def __init__(self, run_id: str, run_dir: Path, facts: dict, cart_ids: Sequence[str]):
        self.run_id = run_id
        self.run_dir = run_dir
        self.facts = facts            # rig, supplies, configurations, harness revision
        self.cart_ids = list(cart_ids)
        self.cases: dict[str, Case] = {}
        self.started = time.time()
        self.finished: float | None = None
        self.status = "running"
        self.stopped: str | None = None    # why the harness ended the run
        self.cut_short: list[str] = []

    def case(self, nodeid: str, cart: str | None = None) -> Case:
        c = self.cases.get(nodeid)
        if c is None:
            parsed, scenario = split_cart(nodeid, self.cart_ids or ([cart] if cart else []))
            c = self.cases[nodeid] = Case(nodeid, cart or parsed or RIG_LEVEL, scenario)
        return c

    def collected(self, nodeids: Iterable[str]) -> None:
        for n in nodeids:
            self.case(n)

    def start(self, nodeid: str) -> Case:
        c = self.case(nodeid)
        c.started, c.finished = time.time(), None
        return c

    def add(self, report: pytest.TestReport) -> Case | None:
        """One phase's report; the case when it is finished (its teardown, or a worker that crashed in it)."""
        props = [(str(k), str(v)) for k, v in report.user_properties]
        cart = dict(props).get("cart")
        c = self.case(report.nodeid, cart)
        if c.started is None:
            c.started = time.time() - report.duration
        c.duration_s += report.duration
        c.location = (report.location[0], report.location[1]) if report.location else c.location
        if props:
            c.properties = props
        when = report.when
        if report.failed:
            cause = _cause(report)
            if when == "call":
                c.outcome, c.cause = "failed", cause
            elif when == "teardown" and c.outcome in ("failed", "error"):
                c.teardown = cause  # already failed: one case, the teardown error added to it
            else:
                c.outcome = "error"
                c.cause = f"{when}: {cause}" if when in ("setup", "teardown") else cause
            c.details += ("\n\n--- teardown ---\n" if c.details else "") + str(report.longrepr)
        elif report.skipped and when != "teardown":
            c.outcome, c.cause = "skipped", _cause(report)
            if hasattr(report, "wasxfail"):
                c.cause = f"xfail: {report.wasxfail or c.cause}"
            lr = report.longrepr
            c.details = f"{lr[0]}:{lr[1]}: {lr[2]}" if isinstance(lr, tuple) else str(lr)
        elif report.passed and when == "call":
            c.outcome = "passed"
        if when in ("teardown", "???"):  # "???": xdist's report of a worker that crashed in the test
            c.finished = time.time()
            if c.outcome in ("failed", "error"):  # the teardown report holds every phase's sections (consoles)
                c.output = "".join(f"--- {title} ---\n{_tail(text)}\n" for title, text in report.sections)
            return c
        return None

    def end(self, status: str, stopped: str | None = None) -> None:
        """How the run ended; the tests still running when it did are the ones cut short."""
        self.status, self.stopped, self.finished = status, stopped, time.time()
        for c in self.cases.values():
            if c.running:
                c.outcome, c.finished = "interrupted", self.finished
                c.duration_s = self.finished - c.started
                c.cause = ("interrupted: the run was stopped during this test" if status == "interrupted"
                           else f"the run was stopped during this test: {stopped}")
                self.cut_short.append(c.test)

    # -------------------------------------------------------------- reports

    def as_dict(self) -> dict:
        results = [c.entry() for c in self.cases.values()]
        v = {"schema": SCHEMA, "run_id": self.run_id, "status": self.status, "verdict": "RUNNING",
             "why": "the run is in progress", "started": _iso(self.started),
             "finished": _iso(self.finished) if self.finished else None,
             "duration_s": round((self.finished or time.time()) - self.started, 1),
             **self.facts,
             "interrupted": {"tests": self.cut_short} if self.status == "interrupted" else None,
             "stopped": self.stopped,
             "running": [c.test for c in self.cases.values() if c.running],
             "results": results,
             "reports": {"verdict": VERDICT, "junit": JUNIT, "matrix": MATRIX_SVG, "results": "results.jsonl",
                         "allure_results": "allure-results"}}
        v["configurations"] = _configurations(v.get("configurations", []), results)
        v["totals"] = totals(v)
        if self.status != "running":
            v["verdict"], v["why"] = judge(v)
        return v

    def junit(self) -> bytes:
        """JUnit XML: one test case per test that ran (a teardown error inside its case), the ones cut short
        as errors saying so; the run's identity as suite properties."""
        ran = [c for c in self.cases.values() if c.finished is not None]
        count = {k: sum(c.outcome == k for c in ran) for k in OUTCOMES}
        suite = ET.Element("testsuite", name=self.run_id, tests=str(len(ran)), failures=str(count["failed"]),
                           errors=str(count["error"] + count["interrupted"]), skipped=str(count["skipped"]),
                           time=f"{(self.finished or time.time()) - self.started:.3f}",
                           timestamp=_iso(self.started), hostname=platform.node())
        props = ET.SubElement(suite, "properties")
        rig = self.facts.get("rig", {})
        harness = self.facts.get("harness", {})
        revision = f"{harness.get('revision')}{' (dirty)' if harness.get('dirty') else ''}"
        for name, value in (("run_id", self.run_id), ("status", self.status),
                            ("rig", f"{rig.get('name')} ({rig.get('kind')}) {rig.get('path')}"),
                            ("harness_revision", revision),
                            ("interrupted_during", " ".join(self.cut_short) if self.cut_short else None),
                            ("stopped", self.stopped),
                            ("not_run", str(sum(c.outcome == "not-run" for c in self.cases.values())))):
            if value:
                ET.SubElement(props, "property", name=name, value=value)
        cases = b"".join(self._testcase(c) for c in ran)
        head = ET.tostring(suite, encoding="utf-8", xml_declaration=False)
        return (b'<?xml version="1.0" encoding="utf-8"?>\n<testsuites name="cart-hil">'
                + head.removesuffix(b"</testsuite>") + cases + b"</testsuite></testsuites>\n")

    def _testcase(self, c: Case) -> bytes:
        """A case's <testcase>, serialized once it is finished (rewriting junit.xml stays cheap)."""
        if c.junit is not None:
            return c.junit
        path, line = c.location or (c.test.split("::", 1)[0], None)
        parts = c.test.split("::")
        attrs = {"classname": ".".join([parts[0].removesuffix(".py").replace("/", "."), *parts[1:-1]]),
                 "name": parts[-1], "file": path, "time": f"{c.duration_s:.3f}"}
        if line is not None:
            attrs["line"] = str(line)
        tc = ET.Element("testcase", attrs)
        if c.properties:
            tp = ET.SubElement(tc, "properties")
            for k, v in c.properties:
                ET.SubElement(tp, "property", name=k, value=_xml_text(v))
        if c.outcome in ("failed", "error", "interrupted", "skipped"):
            tag = {"failed": "failure", "skipped": "skipped"}.get(c.outcome, "error")
            message = c.cause or c.outcome
            if c.teardown:
                message += f" (then teardown: {c.teardown})"
            el = ET.SubElement(tc, tag, message=_xml_text(message), type=c.outcome)
            el.text = _xml_text(c.details or message)
        if c.output:
            ET.SubElement(tc, "system-out").text = _xml_text(c.output)
        data = ET.tostring(tc, encoding="utf-8", xml_declaration=False)
        if c.finished is not None:
            c.junit = data
        return data

    def write(self) -> dict:
        """verdict.json, junit.xml and matrix.svg, each replaced whole."""
        v = self.as_dict()
        write_atomic(self.run_dir / VERDICT, dump(v))
        write_atomic(self.run_dir / JUNIT, self.junit())
        write_atomic(self.run_dir / MATRIX_SVG, Matrix(v).svg().encode())
        return v


def dump(v: dict) -> bytes:
    """verdict.json: indented, one line per result (json's indented encoder is slow at a thousand results)."""
    head = json.dumps({k: x for k, x in v.items() if k != "results"}, indent=1, ensure_ascii=False)
    results = ",\n  ".join(json.dumps(r, ensure_ascii=False) for r in v.get("results", []))
    return (head.removesuffix("\n}") + ',\n "results": [\n  ' + results + "\n ]\n}\n").encode()


def _configurations(configs: list[dict], results: list[dict]) -> list[dict]:
    """The selected configurations (rig order), then any other a result named; each with the candidate
    images its tests recorded, its counts and its test time."""
    out = [dict(c) for c in configs]
    known = {c["id"] for c in out}
    for r in results:
        if r["configuration"] not in known:
            known.add(r["configuration"])
            out.append({"id": r["configuration"]})
    for c in out:
        mine = [r for r in results if r["configuration"] == c["id"]]
        images: dict[tuple, dict] = {}
        for r in mine:
            versions, hashes = r.get("firmware_to", []), r.get("image_sha256", [])
            for i in range(max(len(versions), len(hashes))):
                img = {"version": versions[i] if i < len(versions) else None,
                       "image_sha256": hashes[i] if i < len(hashes) else None}
                images.setdefault((img["version"], img["image_sha256"]), img)
        if images:
            c["firmware"] = {**c.get("firmware", {}), "candidates": list(images.values())}
        rollbacks = [r["rollbacks"] for r in mine if isinstance(r.get("rollbacks"), int)]
        if rollbacks:
            c["rollbacks"] = sum(rollbacks)
        c["counts"] = {k: n for k in OUTCOMES if (n := sum(r["outcome"] == k for r in mine))}
        c["duration_s"] = round(sum(r.get("duration_s", 0.0) for r in mine), 1)
    return out


def _tail(text: str) -> str:
    return text if len(text) <= SECTION_TAIL else f"(… {len(text) - SECTION_TAIL} characters before)\n" + \
        text[-SECTION_TAIL:]


_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def _xml_text(text: str) -> str:
    """Characters XML 1.0 cannot carry (console control codes) as \\xNN."""
    return _NOT_XML.sub(lambda m: f"\\x{ord(m.group()):02x}", str(text))


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t).astimezone().isoformat(timespec="seconds")


def write_atomic(path: Path, data: bytes) -> None:
    """Write `path` whole or not at all: a temp file in its directory, then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)  # (mkstemp's 0600 would hide the reports from a CI user or a web server)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# ------------------------------------------------------------------ judging a record


def totals(v: dict) -> dict[str, int]:
    return {k: n for k in OUTCOMES if (n := sum(r["outcome"] == k for r in v.get("results", [])))}


def judge(v: dict, also: Sequence[str] = ()) -> tuple[str, str]:
    """(PASS | FAIL | INTERRUPTED, why in one line). A PASS is earned: something ran, nothing failed, nothing
    was skipped or left unrun, and nothing in `also` (the gate's own checks that failed) stands against it."""
    results = v.get("results", [])
    status = v.get("status")
    if status == "interrupted":
        info = v.get("interrupted") or {}
        cut = info.get("tests") or []
        during = f" during {info['during']}" if info.get("during") else ""
        if cut:
            r = next((x for x in results if x["test"] == cut[0]), None)
            during = f" during {r['configuration']} {short(r['scenario'])}" if r else f" during {cut[0]}"
            during += f" (and {len(cut) - 1} more test(s) in progress)" if len(cut) > 1 else ""
        by = f" by {v['signal']}" if v.get("signal") else ""
        return "INTERRUPTED", f"no verdict: interrupted{by}{during} ({counts_line(v)} so far)"
    bad = [r for r in results if r["outcome"] in ("failed", "error")]
    failed = ""
    if bad:
        r = bad[0]
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        failed = f"{len(bad)} failed: {r['configuration']} {short(r['scenario'])}: {r.get('cause', '')}{more}"
    if status == "stopped":
        return "FAIL", f"the run was stopped: {v.get('stopped')}" + (f"; {failed}" if failed else "")
    if status != "finished":
        return "FAIL", "the test run ended without recording its end (crashed or killed): no verdict"
    if failed:
        return "FAIL", failed
    ran = [r for r in results if r["outcome"] != "not-run"]
    if not ran:
        return "FAIL", "nothing ran (no scenario matched the selection): no verdict"
    skipped = [r["test"].rsplit("::", 1)[-1] for r in results if r["outcome"] == "skipped"]
    if skipped:
        more = f" and {len(skipped) - 3} more" if len(skipped) > 3 else ""
        return "FAIL", (f"{len(skipped)} scenario(s) skipped — a skipped scenario is not a pass: "
                        f"{', '.join(skipped[:3])}{more}")
    unrun = [r for r in results if r["outcome"] == "not-run"]
    if unrun:
        return "FAIL", f"{len(unrun)} scenario(s) not run: {', '.join(r['test'] for r in unrun[:3])}"
    if also:
        return "FAIL", "; ".join(also)
    carts = {r["configuration"] for r in ran}
    return "PASS", f"{len(ran)} scenario run(s) passed on {len(carts)} configuration(s)"


def counts_line(v: dict) -> str:
    t = totals(v)
    words = {"failed": "failed", "error": "error(s)", "interrupted": "interrupted", "not-run": "not run",
             "skipped": "skipped", "passed": "passed"}
    parts = [f"{t.get(k, 0)} {words[k]}" for k in ("passed", "failed", "skipped")]
    parts += [f"{t[k]} {words[k]}" for k in ("error", "interrupted", "not-run") if t.get(k)]
    return ", ".join(parts)


def summary(v: dict) -> str:
    """`12 passed, 1 failed, 0 skipped; scenarios per cart: cart-01 7, cart-02 6` (the tests that ran)."""
    per: dict[str, int] = {}
    for r in v.get("results", []):
        if r["outcome"] != "not-run" and r["configuration"] != RIG_LEVEL:
            per[r["configuration"]] = per.get(r["configuration"], 0) + 1
    carts = ", ".join(f"{c} {n}" for c, n in sorted(per.items()))
    return counts_line(v) + (f"; scenarios per cart: {carts}" if carts else "")


def self_check_lines(v: dict) -> list[str]:
    """One line per seeded fault build and cart: caught (and the reason the gate gave) or MISSED."""
    rows = sorted((r["fault_build"], r["configuration"], r["outcome"] == "passed",
                   r.get("caught", "") if r["outcome"] == "passed" else r.get("cause", ""))
                  for r in v.get("results", [])
                  if r.get("fault_build") and r["outcome"] in ("passed", "failed", "error"))
    return [f"{'caught' if ok else 'MISSED'}  {build:28s} {cart:10s} {why}" for build, cart, ok, why in rows]


def failing_lines(v: dict, limit: int = 20) -> list[str]:
    """The gate's own checks that failed, then the cases that did not pass, worst first, one line each:
    symbol, configuration (`gate` for a check), scenario, cause."""
    bad = [r for r in v.get("results", []) if r["outcome"] not in ("passed", "not-run")]
    bad.sort(key=lambda r: OUTCOMES.index(r["outcome"]))
    lines = [f"{SYMBOL['failed']} {'gate':9s} {line}" for line in v.get("checks_failed", [])]
    lines += [abbreviate(f"{SYMBOL[r['outcome']]} {r['configuration']:9s} {short(r['scenario'])}: "
                         f"{r.get('cause', r['outcome'])}", 180) for r in bad[:limit]]
    if len(bad) > limit:
        lines.append(f"… and {len(bad) - limit} more (verdict.json)")
    return lines


def checks_not_run(v: dict) -> list[str]:
    """One line per check a scenario could not run on this rig (a test's `not_run` property)."""
    return [f"{r['configuration']:9s} {short(r['scenario'])}: {why}"
            for r in v.get("results", []) for why in r.get("checks_not_run", [])]


def load(run_dir: Path) -> dict | None:
    try:
        return json.loads((run_dir / VERDICT).read_text())
    except (OSError, ValueError):
        return None


# ------------------------------------------------------------------ the matrix


class Matrix:
    """Configuration × scenario. One row per scenario — a test function; its parametrized cases share the
    row and the cell shows the worst of them (with how many, when they differ) — one column per configuration,
    in rig order. A blank cell: the scenario does not run on that configuration."""

    def __init__(self, v: dict):
        self.v = v
        self.columns = [c["id"] for c in v.get("configurations", [])]
        self.rows: dict[str, dict[str, list[dict]]] = {}
        for r in v.get("results", []):
            key = r["scenario"].split("[", 1)[0]
            self.rows.setdefault(key, {}).setdefault(r["configuration"], []).append(r)
            if r["configuration"] not in self.columns:
                self.columns.append(r["configuration"])

    def cell(self, row: str, column: str) -> tuple[str | None, int, int]:
        """(the worst outcome of the cell's cases or None, how many cases had it, how many cases)."""
        cases = self.rows[row].get(column, [])
        if not cases:
            return None, 0, 0
        worst = min((r["outcome"] for r in cases), key=OUTCOMES.index)
        return worst, sum(r["outcome"] == worst for r in cases), len(cases)

    def _symbol(self, row: str, column: str) -> str:
        """The text table's cell: the symbol of the worst outcome, and how many had it when the cases differ."""
        worst, n, of = self.cell(row, column)
        return "" if worst is None else SYMBOL[worst] + (str(n) if n < of else "")

    def _cases(self, row: str) -> int:
        return max(len(cs) for cs in self.rows[row].values())

    def text(self, name_width: int = 52) -> str:
        """The table `hil gate` prints, under 100 columns wide for ten carts."""
        prefix = os.path.commonprefix(self.columns) if len(self.columns) > 1 else ""
        prefix = prefix[: max(prefix.rfind("-"), prefix.rfind("_")) + 1]  # cart-01, cart-02: "cart-", not "cart-0"
        labels = [c[len(prefix):] for c in self.columns]
        w = max([3, *(len(x) for x in labels)])
        legend = "  ".join(f"{SYMBOL[k]} {WORD[k].lower()}" for k in ("passed", "failed", "error", "skipped",
                                                                      "interrupted", "not-run"))
        out = [f"configuration × scenario:  {legend}  (blank: does not run there)"]
        if prefix:
            out.append(" " * (name_width + 2) + prefix)
        out.append(" " * (name_width + 2) + " ".join(x.ljust(w) for x in labels).rstrip())
        suite = None
        for row in self.rows:
            if suite_of(row) != suite:
                suite = suite_of(row)
                out.append(suite)
            n = self._cases(row)
            count = f" ({n})" if n > 1 else ""
            name = abbreviate(function_of(row), name_width - 2 - len(count)) + count
            cells = " ".join(self._symbol(row, c).ljust(w) for c in self.columns)
            out.append(f"  {name:{name_width}s}{cells}".rstrip())
        return "\n".join(out)

    def svg(self) -> str:
        """The same table as an image: cells coloured by outcome, each cell's cases and causes on hover."""
        v = self.v
        row_h, col_w, top = 20, 76, 96
        names = [abbreviate(function_of(r), 70) + (f" ({self._cases(r)})" if self._cases(r) > 1 else "")
                 for r in self.rows]
        label_w = 24 + int(6.8 * max([24, *(len(n) for n in names)]))
        suites = len({suite_of(r) for r in self.rows})
        width = label_w + col_w * max(1, len(self.columns)) + 16
        height = top + row_h * (len(self.rows) + suites) + 24
        harness = v.get("harness") or {}
        rig = v.get("rig") or {}
        sub = (f"rig {rig.get('name')} ({rig.get('kind')}) · harness {str(harness.get('revision', 'unknown'))[:12]}"
               f"{' (dirty)' if harness.get('dirty') else ''} · {v.get('started', '')} · "
               f"{v.get('duration_s', 0):.0f} s · {counts_line(v)}")
        why = abbreviate(v.get("why", ""), 150)
        width = max(width, 16 + int(6.5 * max(len(sub), len(why))))
        e = html.escape
        out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
               f'font-family="sans-serif" font-size="12">',
               f'<rect width="{width}" height="{height}" fill="white"/>',
               f'<text x="8" y="20" font-size="15" font-weight="bold">{e(v.get("run_id", ""))}: '
               f'{e(v.get("verdict", ""))}</text>',
               f'<text x="8" y="38">{e(why)}</text>',
               f'<text x="8" y="55" fill="#555">{e(sub)}</text>']
        x = 8
        for k in reversed(OUTCOMES):
            out.append(f'<rect x="{x}" y="63" width="12" height="12" fill="{COLOUR[k]}"/>'
                       f'<text x="{x + 16}" y="73">{e(k)}</text>')
            x += 30 + 7 * len(k)
        for i, c in enumerate(self.columns):
            out.append(f'<text x="{label_w + i * col_w + col_w / 2}" y="{top - 6}" text-anchor="middle" '
                       f'font-weight="bold">{e(c)}</text>')
        y, suite = top, None
        for row, name in zip(self.rows, names, strict=True):
            if suite_of(row) != suite:
                suite = suite_of(row)
                out.append(f'<text x="8" y="{y + 14}" font-weight="bold" fill="#333">{e(suite)}</text>')
                y += row_h
            out.append(f'<text x="20" y="{y + 14}">{e(name)}</text>')
            for i, c in enumerate(self.columns):
                worst, n, of = self.cell(row, c)
                label = WORD.get(worst, "") + (f" {n}/{of}" if n < of else "")
                cx = label_w + i * col_w
                if worst is None:
                    out.append(f'<rect x="{cx + 2}" y="{y + 2}" width="{col_w - 4}" height="{row_h - 4}" '
                               f'fill="none" stroke="#eee"/>')
                    continue
                tip = "\n".join(f"{r['test']}: {r['outcome']}" + (f" — {r['cause']}" if r.get("cause") else "")
                                for r in self.rows[row][c])
                out.append(f'<rect x="{cx + 2}" y="{y + 2}" width="{col_w - 4}" height="{row_h - 4}" '
                           f'fill="{COLOUR[worst]}"><title>{e(tip)}</title></rect>'
                           f'<text x="{cx + col_w / 2}" y="{y + 14}" text-anchor="middle">{e(label)}</text>')
            y += row_h
        out.append("</svg>")
        return "\n".join(out) + "\n"


# ------------------------------------------------------------------ the end of a run (hil)


def finalize(run_dir: Path, v: dict, *, signal: str | None = None, also: Sequence[str] = (),
             extra: dict | None = None) -> dict:
    """The verdict, judged once the run is over (with the signal that interrupted it and the gate's own
    failed checks, one line each: verdict.json's `checks_failed`), into verdict.json and matrix.svg; the matrix
    and the verdict go to the Allure results as global attachments (and a verdict other than PASS as a global
    error)."""
    v = dict(v, **(extra or {}))
    if signal:
        v["signal"] = signal
    if also:
        v["checks_failed"] = list(also)
    v["verdict"], v["why"] = judge(v, also)
    write_atomic(run_dir / VERDICT, dump(v))
    svg = Matrix(v).svg()
    write_atomic(run_dir / MATRIX_SVG, svg.encode())
    results = run_dir / "allure-results"
    if results.is_dir():
        now = int(time.time() * 1000)
        attachments = []
        for name, data, kind, ext in (("configuration × scenario matrix", svg.encode(), "image/svg+xml", "svg"),
                                      (VERDICT, dump(v), "application/json", "json")):
            source = f"{uuid.uuid4()}-attachment.{ext}"
            write_atomic(results / source, data)
            attachments.append({"name": name, "source": source, "type": kind, "timestamp": now})
        errors = [] if v["verdict"] == "PASS" else [{"message": f"{v['verdict']}: {v['why']}", "timestamp": now}]
        write_atomic(results / f"{uuid.uuid4()}-globals.json",
                     json.dumps({"attachments": attachments, "errors": errors}).encode())
    return v


def allure_command() -> Path:
    return ROOT / "node_modules" / ".bin" / "allure"


def _node_major() -> int | None:
    if shutil.which("node") is None:
        return None
    try:
        said = subprocess.run(["node", "--version"], capture_output=True, text=True, timeout=30).stdout
        return int(said.strip().lstrip("v").split(".")[0])
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return None


def generate_html(run_dir: Path, v: dict, timeout: float = 300.0) -> tuple[Path | None, str]:
    """The HTML report of the run (Allure 3, one self-contained index.html: it opens from disk) into
    run_dir/allure-report. (the page or None, one line saying what happened and how long it took)."""
    results = run_dir / "allure-results"
    node = _node_major()
    if node is None:
        return None, "no HTML report: Node.js is not installed (Allure 3 needs Node.js >= 20, with npm)"
    if node < 20:
        return None, f"no HTML report: Node.js {node} is too old for Allure 3 (it needs >= 20)"
    allure = allure_command()
    if not allure.exists():
        return None, (f"no HTML report: the allure package is not installed (npm ci in {ROOT}; ./hil does it "
                      "when npm is there)")
    if not results.is_dir():
        return None, f"no HTML report: no {results}"
    name = f"cart-hil {v.get('run_id', run_dir.name)}: {v.get('verdict', '')}"
    out = run_dir / HTML_DIR
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="hil-allure-") as tmp:
        config = Path(tmp) / "allurerc.json"
        config.write_text(json.dumps({"name": name, "plugins": {"awesome": {"options": {
            "singleFile": True, "reportName": name}}}}))
        try:
            proc = subprocess.run([str(allure), "generate", "--config", str(config), "-o", str(out), str(results)],
                                  cwd=tmp, capture_output=True, text=True, timeout=timeout,
                                  env={**os.environ, "NO_COLOR": "1", "ALLURE_NO_ANALYTICS": "true"})
        except (OSError, subprocess.TimeoutExpired) as exc:
            return None, f"no HTML report: allure generate failed: {exc}"
    page = out / "index.html"
    if proc.returncode != 0 or not page.exists():
        said = first_line((proc.stderr or proc.stdout).strip() or f"exit status {proc.returncode}")
        return None, f"no HTML report: allure generate: {said}"
    html_text = page.read_text(encoding="utf-8")
    kept = _ANALYTICS.sub("", html_text)
    if kept != html_text:
        write_atomic(page, kept.encode())
    return page, f"HTML report: {page} ({time.monotonic() - t0:.1f} s to generate)"


#: the Awesome report's page loads Google Analytics (not switchable in Allure 3.18): a lab's report does not
_ANALYTICS = re.compile(r'<script async src="https://www\.googletagmanager\.com/gtag/js[^"]*"></script>\s*'
                        r"<script>\s*window\.dataLayer.*?</script>", re.S)


# ------------------------------------------------------------------ the plugin


def harness_revision(where: Path = ROOT) -> dict:
    """The harness's git commit and whether the checkout differs from it; "unknown" outside git."""
    try:
        rev = subprocess.run(["git", "-C", str(where), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10)
        if rev.returncode != 0:
            return {"revision": "unknown"}
        dirty = subprocess.run(["git", "-C", str(where), "status", "--porcelain"], capture_output=True,
                               text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return {"revision": "unknown"}
    return {"revision": rev.stdout.strip(), "dirty": bool(dirty.stdout.strip())}


def _facts(state) -> tuple[dict, list[str]]:
    """Rig, supplies, selected configurations and harness revision; the rig's cart ids."""
    from harness.config import ConfigError

    facts: dict = {"harness": harness_revision()}
    try:
        rig = state.rig
        slots = state.selected()
    except ConfigError:
        facts["rig"] = {"name": "unknown", "path": str(state.rig_path), "kind": "unknown"}
        return facts, []
    facts["rig"] = {"name": rig.name, "path": str(rig.path), "kind": rig.spec.kind}
    facts["supplies"] = [{"name": s.name, "model": s.model, "dialect": s.dialect, "resource": s.resource}
                         for s in rig.spec.supplies]
    facts["configurations"] = [{"id": s.cart_id, "slot": s.number, "hardware_revision": s.cart.hardware_revision,
                                "supply": f"{s.supply.name}:{s.channel}",
                                "firmware": {"field": s.cart.firmware.initial_version}} for s in slots]
    return facts, [s.cart_id for s in rig.slots]


def pytest_configure(config: pytest.Config) -> None:
    if hasattr(config, "workerinput") or getattr(config.option, "help", False):
        return
    from harness.plugin import STATE

    st = config.stash.get(STATE, None)
    if st is None:  # the cart_hil plugin is off: no run, no run dir
        return
    facts, cart_ids = _facts(st)
    record = RunRecord(st.run_id, st.run_dir, facts, cart_ids)
    config.stash[RECORD] = record
    config.pluginmanager.register(ReportPlugin(config, record), "cart-hil-report")


class ReportPlugin:
    def __init__(self, config: pytest.Config, record: RunRecord):
        self.config = config
        self.record = record
        self.how_it_ended: tuple[str, str | None] | None = None

    def _write(self) -> None:
        try:
            self.record.write()
        except OSError as exc:
            line = (f"hil: cannot write the run's reports in {self.record.run_dir}: {exc.strerror or exc} — "
                    f"run stopped; so far {counts_line(self.record.as_dict())}")
            if self.record.status != "running":  # at the end: say it, the run is over anyway
                print(line, flush=True)
            else:
                pytest.exit(line, returncode=2)

    @pytest.hookimpl(trylast=True)
    def pytest_sessionstart(self, session: pytest.Session) -> None:
        self._write()  # the run's identity is on disk before the first test

    def pytest_collection_finish(self, session: pytest.Session) -> None:  # without xdist
        self.record.collected(i.nodeid for i in session.items)

    @pytest.hookimpl(optionalhook=True)
    def pytest_xdist_node_collection_finished(self, node, ids) -> None:  # every worker collects the same
        self.record.collected(ids)

    def pytest_runtest_logstart(self, nodeid: str, location) -> None:
        self.record.start(nodeid)
        self._write()  # the test in progress is named on disk (the one a killed run was on)

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if self.record.add(report) is not None:
            self._write()

    def pytest_keyboard_interrupt(self, excinfo) -> None:
        if excinfo.type is KeyboardInterrupt:  # Ctrl-C, or SIGTERM passed on as SIGINT by `hil`
            self.how_it_ended = ("interrupted", None)
        else:  # pytest.exit (the harness ended the run, saying why) or a stop after --maxfail failures
            said = getattr(excinfo.value, "msg", None) or str(excinfo.value) or excinfo.typename
            self.how_it_ended = ("stopped", first_line(said).removeprefix("hil: "))

    @pytest.hookimpl(tryfirst=True)
    def pytest_sessionfinish(self, session: pytest.Session, exitstatus) -> None:
        status, stopped = self.how_it_ended or ("finished", None)
        self.record.end(status, stopped)
        self._write()
