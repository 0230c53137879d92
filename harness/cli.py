"""`hil`: the cart-hil command.

    hil gate [--firmware IMAGE | --build VERSION] [--rig R] [--cart ID]... [--tag T]... [-n N]
                                                             the release gate of a candidate (default: the reference
                                                             firmware's next release): smoke, the candidate from every
                                                             field version and on to the next release, its negative
                                                             matrix and rollback, signed update, rollback, flash faults,
                                                             power cuts (reduced sweep), clock skew, CA rotation,
                                                             rollout preflight; reports/<run-id>/ (verdict.json, HTML)
    hil gate --quick | --self-check | --nightly              the fast gate | the gate against each seeded fault build |
                                                             everything, with the full sweep and the self-check
    hil sweep [--rig R] [--cart ID]... [-n N] [--sweep M]     the power-cut suite alone, full sweep by default
    hil smoke [--rig R] [--cart ID]... [--tag T]... [-n N]   the rack smoke suite
    hil test [PYTEST ARGS]                                     lint + the project's own tests + the suites
    hil rig check RIG                                          validate a rig file and its carts
    hil rollout check IMAGE --fleet INVENTORY                  can every configuration take this signed image?
    hil rack up [RIG] [--foreground] | down [RIG] | status [RIG]   the rig's rack: start/stop a virtual one; outputs,
                                                                 V/I per slot
    hil console SLOT [--rig R]                                 a cart's console, interactive (Ctrl-] exits), logged
    hil power SLOT on|off|cycle|measure [--rig R] [--off-s S]  a slot's supply output
    hil repro INCIDENT.yaml [--rig R] [--slot N] [--field]     replay a field incident on one slot (docs/incidents.md)
    hil bench [--rig R] [--out FILE]                           latency and timing figures
    hil pki init|show [--dir D]                                the lab PKI (root CAs, signers)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from harness.config import ConfigError, Rig

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RIG = ROOT / "rigs" / "virtual.yaml"


WRAP_UP_S = 120.0   # how long an interrupted pytest may take to end its tests and write its reports
STOP_S = 10.0       # how long a pytest stopped at once may take to go after SIGTERM, before SIGKILL


@dataclasses.dataclass
class PytestRun:
    status: int                 # pytest's exit status; 128 + the signal's number when a signal ended the run
    signal: int | None = None   # SIGINT or SIGTERM, if one interrupted the run
    forced: bool = False        # stopped at once (a second signal, or WRAP_UP_S over): no teardown ran

    @property
    def signal_name(self) -> str | None:
        return signal.Signals(self.signal).name if self.signal else None


def _pytest(args: list[str], *, progress: bool = False) -> PytestRun:
    """Run pytest in a process group of its own, and wait for it.

    Ctrl-C (SIGINT) and SIGTERM — a CI runner cancelling the job, `timeout` — are `hil`'s to handle: it passes
    SIGINT to pytest's group, and pytest ends the test in progress, writes its reports and powers down the rack
    it started. A second signal, or WRAP_UP_S without an end, stops it at once (SIGTERM, then SIGKILL). One line
    says so when the signal comes — from `hil`, or, on a terminal with the live progress block, as the block's
    last line (a line from here would land inside the block being redrawn)."""
    cmd = [sys.executable, "-m", "pytest", *args]
    print("+", " ".join(cmd), flush=True)
    wake = threading.Event()
    signals: list[int] = []

    def on_signal(signum: int, _frame) -> None:
        signals.append(signum)
        wake.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        proc = subprocess.Popen(cmd, cwd=ROOT, process_group=0)
        threading.Thread(target=lambda: (proc.wait(), wake.set()), daemon=True).start()
        seen, deadline, forced = 0, None, False
        while proc.poll() is None:
            wake.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
            wake.clear()
            if proc.poll() is not None:
                break
            if len(signals) > seen:
                seen = len(signals)
                if seen == 1:
                    name = signal.Signals(signals[0]).name
                    if not (progress and sys.stdout.isatty()):
                        again = "Ctrl-C" if signals[0] == signal.SIGINT else name
                        print(f"\nhil: {name} — ending the tests in progress, powering the rack down, writing the "
                              f"reports ({again} again to stop at once)", file=sys.stderr, flush=True)
                    _signal_group(proc, signal.SIGINT)
                    deadline = time.monotonic() + WRAP_UP_S
                    continue
            elif deadline is None or time.monotonic() < deadline:
                continue
            forced = True
            _stop_at_once(proc)
        return PytestRun(128 + signals[0] if signals else proc.returncode, signals[0] if signals else None, forced)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)


def _stop_at_once(proc: subprocess.Popen) -> None:
    _signal_group(proc, signal.SIGTERM)
    try:
        proc.wait(timeout=STOP_S)
    except subprocess.TimeoutExpired:
        _signal_group(proc, signal.SIGKILL)
        proc.wait()


SUITES = {
    "smoke": ["test_suites/test_rack_smoke.py"],
    "gate": ["test_suites/test_rack_smoke.py", "test_suites/test_release.py", "test_suites/test_signed_update.py",
             "test_suites/test_rollback.py", "test_suites/test_flash_faults.py", "test_suites/test_power_cut.py",
             "test_suites/test_clock_skew.py", "test_suites/test_ca_rotation.py"],
    # `hil gate --quick`: may this candidate go to canary, fast — every cart from its field versions to the
    # candidate and on to the next release, the negative matrix and the rollback of a broken build, and a power
    # cut at every boot-control write
    "quick": ["test_suites/test_rack_smoke.py", "test_suites/test_release.py", "test_suites/test_power_cut.py"],
    "sweep": ["test_suites/test_power_cut.py"],
}


INTERRUPTED_STATUS = (130, 143)  # a run ended by Ctrl-C or SIGTERM


def cmd_smoke(a: argparse.Namespace) -> int:
    """`hil gate|smoke|sweep`, once or `--repeat N` times in a row (the flake check: N runs on good firmware, each
    its own reports; non-zero if any run did not pass; an interrupted run ends the series)."""
    repeat = getattr(a, "repeat", 1)
    if repeat <= 1:
        return _run_once(a)
    runs: list[tuple[int, float]] = []
    for i in range(1, repeat + 1):
        print(f"hil {a.cmd}: run {i} of {repeat}", flush=True)
        t0 = time.monotonic()
        rc = _run_once(a)
        runs.append((rc, time.monotonic() - t0))
        if rc in INTERRUPTED_STATUS:
            break
    passed = sum(rc == 0 for rc, _ in runs)
    walls = ", ".join(f"{w:.0f} s" for _, w in runs)
    print(f"hil {a.cmd} --repeat {repeat}: {passed} of {len(runs)} run(s) passed"
          + (f" ({repeat - len(runs)} not run: interrupted)" if len(runs) < repeat else "") + f"; wall {walls}")
    last = runs[-1][0]
    return last if last in INTERRUPTED_STATUS else (0 if passed == repeat else 1)


def _candidate_problem(a: argparse.Namespace, slots) -> str | None:
    """Why the candidate named on the command line cannot be gated on these carts (an unreadable image, a
    version not above their field versions), or None. The build itself is made by the run."""
    from harness import candidate as hc

    if not getattr(a, "firmware", None) and not getattr(a, "build", None):
        return None
    try:
        c = hc.from_file(a.firmware) if a.firmware else hc.Candidate(a.build, b"", "rig build")
        hc.check_above_field(c, {s.cart_id: s.cart.firmware.versions_in_field for s in slots})
    except ConfigError as exc:
        return str(exc)
    return None


def _run_once(a: argparse.Namespace) -> int:
    """One `hil gate|smoke|sweep`: one directory per run, reports/<run-id>/ (reports/latest points at it), with
    verdict.json, junit.xml and matrix.svg written as results happen (harness.report), the Allure results,
    results.jsonl, the consoles, preflight.json (the gate) and the HTML report; live progress per cart while it
    runs (harness.progress); the matrix and the verdict at the end."""
    from harness import report
    from harness.plugin import dir_write_problem, new_run_id

    rig = Rig.load(a.rig or DEFAULT_RIG)
    slots = rig.select(a.cart, a.tag)
    why = _candidate_problem(a, slots)
    if why:  # before anything runs: a candidate no cart could take would fail every release scenario
        return _refuse(why)
    n = a.workers or max(1, len(slots))
    out = ROOT / "reports" / new_run_id(f"{a.cmd}-")
    why = dir_write_problem(out)
    if why:  # before anything runs: a gate whose reports cannot be written has no verdict to give
        return _refuse(f"cannot write reports in {out}: {why}")
    _point_latest(out)
    self_check, nightly = getattr(a, "self_check", False), getattr(a, "nightly", False)
    quick = getattr(a, "quick", False)
    sweep = "full" if nightly else ("quick" if quick and a.sweep == "reduced" else a.sweep)
    # --rig only when given: the default virtual rig is then private to this run (its own rack and ports), so two
    # gates run at once; a named rig whose rack an engineer keeps up is shared, its slots locked
    rig_args = ["--rig", str(rig.path)] if a.rig else []
    args = [*SUITES["quick" if quick else a.cmd], *rig_args, "-n", str(n), f"--hil-run-dir={out}",
            f"--alluredir={out / 'allure-results'}", "-p", "harness.report", "-p", "harness.progress",
            "-q", "-o", "console_output_style=classic",  # the progress lines say per cart what pytest's dots say
            "-p", "no:hypothesispytest",  # a dev-only plugin the suites never use
            "--sweep", sweep]
    if a.cmd == "gate" and not nightly:
        # the fault builds test the gate, not the release: the release's gate leaves them out
        args += ["-m", "hil_self_check" if self_check else
                 "not hil_self_check and not hil_full" if quick else "not hil_self_check"]
    if getattr(a, "firmware", None):
        args += ["--hil-firmware", str(a.firmware.absolute())]
    if getattr(a, "build", None):
        args += ["--hil-build", a.build]
    for c in a.cart:
        args += ["--cart", c]
    for t in a.tag:
        args += ["--tag", t]
    run = _pytest(args + a.pytest_args, progress=True)
    if run.forced:
        _outputs_off(rig, slots)
    v = report.load(out)
    if v is None:
        print(f"hil {a.cmd}: {'INTERRUPTED' if run.signal else 'FAIL'} — no verdict.json was written "
              f"(pytest exit status {run.status}): no verdict; reports in {out}")
        return run.status or 1
    command = {"command": shlex.join(["hil", *a.argv])}
    if run.signal and v.get("status") != "finished":
        v = report.finalize(out, v, signal=run.signal_name, extra=command)
        print(f"hil {a.cmd}: INTERRUPTED — {v['why']}; reports in {out}")
        return run.status
    with _signals_interrupt() as caught:
        try:
            if run.signal:  # it came as the tests ended by themselves
                caught.name, caught.number = run.signal_name, run.signal
                raise KeyboardInterrupt
            return _conclude(a, rig, slots, out, dict(v, **command), run, self_check or nightly)
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM after the tests: the gate's own checks were cut short
            v = dict(v, status="interrupted", interrupted={"tests": [], "during": "the checks after the tests"})
            v = report.finalize(out, v, signal=caught.name, extra=command)
            print(f"\nhil {a.cmd}: INTERRUPTED — {v['why']}; reports in {out}")
            return 128 + caught.number


def _conclude(a: argparse.Namespace, rig: Rig, slots, out: Path, v: dict, run: PytestRun, checks: bool) -> int:
    """After the tests: the gate's own checks, the verdict, the matrix, the HTML report and the verdict line."""
    from harness import report

    v = _gate_verdict(a, rig, slots, out, v, checks)
    print()
    print(report.Matrix(v).text())
    bad = report.failing_lines(v)
    if bad:
        print("\n".join(["", "not passed:", *(f"  {line}" for line in bad)]))
    skipped_checks = report.checks_not_run(v)
    if skipped_checks:
        print("\n".join(["", "checks not run on this rig:", *(f"  {line}" for line in skipped_checks)]))
    print()
    print(f"verdict.json, junit.xml, matrix.svg: {out}")
    print(report.generate_html(out, v)[1])
    if v["verdict"] != "PASS":
        print(f"hil {a.cmd}: {v['why']}")
    print(f"hil {a.cmd}: {v['verdict']} ({len(slots)} carts on {rig.name}; {report.summary(v)}); reports in {out}")
    return 0 if v["verdict"] == "PASS" else run.status or 1


def _gate_verdict(a: argparse.Namespace, rig: Rig, slots, out: Path, v: dict, checks: bool) -> dict:
    """The gate's own checks after the tests — the self-check's lines, the rollout preflight of the candidate
    (a finished gate's, not the self-check's) — then the verdict, judged and written: verdict.json carries the
    preflight and the checks that failed, one line each."""
    from harness import report

    also = []
    if checks:
        print("self-check of the gate (each seeded fault build must be caught, for its own reason):")
        lines = report.self_check_lines(v)
        for line in lines:
            print(f"  {line}")
        if not lines:
            print("  (no self-check ran)")
            also.append("no self-check ran")
    if a.cmd == "gate" and not getattr(a, "self_check", False) and v.get("status") == "finished":
        from harness.ota import FirmwareBuildError
        from harness.pki import PkiError

        try:
            preflight = _gate_preflight(rig, slots, out, a)
        except (ConfigError, FirmwareBuildError, PkiError) as exc:  # no candidate to check, or nothing to sign with
            said = (str(exc).splitlines() or [""])[0]
            preflight = {"ok": False, "cause": f"rollout preflight: could not run: {said}"}
            print(preflight["cause"])
        v = dict(v, preflight=preflight)
        if not preflight["ok"]:
            also.append(preflight["cause"])
    return report.finalize(out, v, also=also)


@dataclasses.dataclass
class _Caught:
    name: str = "SIGINT"
    number: int = signal.SIGINT


@contextlib.contextmanager
def _signals_interrupt():
    """SIGTERM as well as Ctrl-C raises KeyboardInterrupt in here; which one came is in the value yielded."""
    caught = _Caught()

    def on_signal(signum: int, _frame) -> None:
        caught.name, caught.number = signal.Signals(signum).name, signum
        raise KeyboardInterrupt

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield caught
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _point_latest(run_dir: Path) -> None:
    """reports/latest -> the newest run (replaced in one rename; a `latest` that is not a link is left alone)."""
    latest = run_dir.parent / "latest"
    if os.path.lexists(latest) and not latest.is_symlink():
        return
    tmp = run_dir.parent / f".latest-{os.getpid()}"
    with contextlib.suppress(OSError):
        os.symlink(run_dir.name, tmp)
        os.replace(tmp, latest)


def _outputs_off(rig: Rig, slots) -> None:
    """After a run stopped at once (its teardowns did not run): the selected slots' supply outputs off, as the
    teardowns would have left them. A virtual rig's rack that the run started itself goes with the run."""
    if rig.is_virtual:
        from harness.rackctl import rack_state

        if rack_state(rig) is None:
            return
    from harness.power import open_supply

    channels: dict[str, list[int]] = {}
    for s in slots:
        channels.setdefault(s.supply.name, []).append(s.channel)
    for name, chans in channels.items():
        spec = rig.supply(name)
        try:
            supply = open_supply(spec.name, spec.resource, spec.dialect, spec.channels, timeout_ms=spec.timeout_ms,
                                 model=spec.model)
            try:
                supply.safe_state(chans)
            finally:
                supply.close()
        except Exception as exc:  # every supply is tried; the one that failed is named
            print(f"hil: {name} ({spec.resource}): channels {chans} may still be on: "
                  f"{(str(exc).splitlines() or [''])[0]}", file=sys.stderr)


def _gate_preflight(rig: Rig, slots, out: Path, a: argparse.Namespace) -> dict:
    """The rollout preflight of the candidate the gate tested, signed under each root the lab releases under
    (harness.pki.TRUSTED_ROOTS — not under whatever root a cart holds: a cart provisioned only with a root no
    release is signed under is what this is for), against the selected configurations as provisioned.
    Printed, and returned as verdict.json's `preflight` (also `preflight.json`): per root the configurations
    that signing reaches and those it refuses, with why; `ok` false, and `cause` one line, when some
    configuration no signing reaches (no release could ever update it: the CA-rotation deadlock)."""
    import json

    from harness import candidate as hc
    from harness import pki as hpki
    from harness.ota import FirmwareBuilds, Signer, open_lab_pki, release_hardware
    from harness.rollout import configurations_of, rollout_plan

    configs = configurations_of(rig, slots)
    if a.firmware:
        cand = hc.from_file(a.firmware)
    else:
        field = [v for s in slots for v in s.cart.firmware.versions_in_field]
        cand = hc.from_build(FirmwareBuilds(rig, out / "preflight"), a.build or hc.default_version(field))
    signer = Signer(open_lab_pki(rig))
    images = {root: signer.sign(cand.unsigned, hardware=release_hardware(rig), ca=root)
              for root in hpki.TRUSTED_ROOTS}
    verdicts, unreachable = rollout_plan(images, configs)
    print(f"rollout preflight of {cand.version}, signed under each root the lab releases under:")
    for root, v in verdicts.items():
        for line in v.lines():
            print(f"  {root}: {line}")
    entry: dict = {"version": cand.version, "ok": not unreachable, "unreachable": unreachable, "roots": {
        root: {"reaches": [c.id for c in configs if c.id not in {r.configuration for r in v.refused}],
               "refuses": {r.configuration: list(r.lacks) for r in v.refused}}
        for root, v in verdicts.items()}}
    if unreachable:
        stranded = ", ".join(f"{c.id} (trusts {', '.join(c.cas)})" for c in configs if c.id in unreachable)
        entry["cause"] = (f"rollout preflight: no release of {cand.version} signed under "
                          f"{' or '.join(verdicts)} reaches {stranded}")
        print(f"  {entry['cause']}")
    else:
        print(f"  OK: each of the {len(configs)} configurations is reached by one of these signings")
    (out / "preflight.json").write_text(json.dumps(entry, indent=2))
    return entry


def cmd_test(a: argparse.Namespace) -> int:
    print("+ ruff check .", flush=True)
    rc = subprocess.call([sys.executable, "-m", "ruff", "check", "."], cwd=ROOT)
    if rc != 0:
        return rc
    # one worker per cart of the virtual rig: the suites wait on devices (boots, flash, the trial window),
    # not on the CPU, and every cart's tests run in order on one worker
    workers = os.environ.get("HIL_TEST_WORKERS", "10")
    run = _pytest(["tests", "test_suites", "-n", workers, "-q", "--timeout=600", *a.pytest_args])
    if run.signal:
        print(f"hil test: INTERRUPTED by {run.signal_name}")
    return run.status


def cmd_rig_check(a: argparse.Namespace) -> int:
    rig = Rig.load(a.rig)
    print(f"{rig.path}: {rig.name} ({rig.spec.kind}), {len(rig.slots)} slots, {len(rig.spec.supplies)} supplies")
    for s in rig.slots:
        c = s.cart
        print(f"  slot {s.number:2d} {c.id:8s} {c.hardware_revision:6s} {s.supply.name}:{s.channel} "
              f"({s.supply.dialect}) fw {c.firmware.initial_version} {s.spec.console}")
    return 0


def cmd_rollout_check(a: argparse.Namespace) -> int:
    from harness.rollout import check_command

    return check_command(a.image, a.fleet)


def cmd_bench(a: argparse.Namespace) -> int:
    from harness.bench import run_bench, run_cut_bench, run_sweep_bench

    if a.only == "sweep":
        return run_sweep_bench(a.rig, out=a.out, carts=a.sweep_cart or None, mode=a.sweep)
    if a.only == "cut":
        return run_cut_bench(a.rig, out=a.out, cuts=a.cuts)
    return run_bench(a.rig, out=a.out, quick=a.quick, cuts=a.cuts)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="hil", description="cart-hil: hardware-in-the-loop OTA release gate")
    sub = ap.add_subparsers(dest="cmd", required=True)

    for name, text, sweep in (
            ("gate", "the release gate so far: smoke, signed update, rollback, flash-fault, power-cut, clock-skew "
                     "and CA-rotation suites", "reduced"),
            ("smoke", "run the rack smoke suite on the selected carts", "reduced"),
            ("sweep", "the power-cut suite alone (test_suites/test_power_cut.py): the full sweep by default",
             "full")):
        s = sub.add_parser(name, help=text)
        s.add_argument("--rig", type=Path, default=None,
                       help="rig file (default: rigs/virtual.yaml, with a rack private to this run)")
        s.add_argument("--cart", action="append", default=[])
        s.add_argument("--tag", action="append", default=[])
        s.add_argument("-n", "--workers", type=int, default=0, help="parallel workers (default: one per cart)")
        s.add_argument("--sweep", choices=["quick", "reduced", "full"], default=sweep,
                       help=f"power-cut sweep: quick (every boot-control write), reduced (every 5th event, every "
                            f"write of boot control, device state or trust store, 2 random cuts) "
                            f"or full (every event, 10 random cuts); default {sweep}")
        if name == "gate":
            cand = s.add_mutually_exclusive_group()
            cand.add_argument("--firmware", type=Path, metavar="IMAGE",
                              help="the release candidate: a firmware image (the build, before signing; the lab "
                                   "signs it for each cart)")
            cand.add_argument("--build", metavar="VERSION",
                              help="the release candidate: this version, made by the rig's firmware.build command "
                                   "(default on a rig that builds: the reference firmware's next release)")
            mode = s.add_mutually_exclusive_group()
            mode.add_argument("--self-check", action="store_true",
                              help="check the gate itself: run it against each seeded fault build and print "
                                   "caught / missed per build with the reason the gate gave (not the release's "
                                   "scenarios)")
            mode.add_argument("--nightly", action="store_true",
                              help="everything: the release's scenarios with the full sweep, and the self-check")
            mode.add_argument("--quick", action="store_true",
                              help="the fast gate: smoke, the candidate's release scenarios and a power cut at "
                                   "every boot-control write")
            s.add_argument("--repeat", type=int, default=1, metavar="N",
                           help="run the gate N times in a row (a flake check on good firmware); non-zero if any "
                                "run did not pass")
        s.add_argument("pytest_args", nargs=argparse.REMAINDER)
        s.set_defaults(fn=cmd_smoke)

    t = sub.add_parser("test", help="lint, then run the project's tests and suites")
    t.add_argument("pytest_args", nargs=argparse.REMAINDER)
    t.set_defaults(fn=cmd_test)

    r = sub.add_parser("rig", help="rig files")
    rs = r.add_subparsers(dest="rigcmd", required=True)
    rc = rs.add_parser("check", help="validate a rig file and the carts it names")
    rc.add_argument("rig", type=Path)
    rc.set_defaults(fn=cmd_rig_check)

    o = sub.add_parser("rollout", help="release preflight against a fleet inventory")
    os_ = o.add_subparsers(dest="rolloutcmd", required=True)
    oc = os_.add_parser("check", help="refuse a signed image some configuration of the fleet cannot take (a CA "
                                      "it lacks, a security counter above the image's, another hardware revision)")
    oc.add_argument("image", type=Path)
    oc.add_argument("--fleet", type=Path, required=True, metavar="INVENTORY",
                    help="a rig file, a directory of cart configurations, or an inventory YAML "
                         "({configurations: [{id, hardware_revision, cas, security_counter}]})")
    oc.set_defaults(fn=cmd_rollout_check)

    b = sub.add_parser("bench", help="measure console, SCPI and boot latencies and smoke-suite scaling")
    b.add_argument("--rig", type=Path, default=DEFAULT_RIG)
    b.add_argument("--out", type=Path, default=ROOT / "reports" / "bench" / "bench.json")
    b.add_argument("--quick", action="store_true", help="fewer samples, skip the smoke-suite scaling run")
    b.add_argument("--cuts", type=int, default=50, help="power cuts for the cut latency figure (default 50)")
    b.add_argument("--only", choices=["cut", "sweep"],
                   help="measure only this figure (cut: event -> supply received OFF; sweep: the power-cut sweep's "
                        "wall time and cut points per second)")
    b.add_argument("--sweep-cart", action="append", default=[], metavar="ID",
                   help="--only sweep: on this cart (repeatable; default every cart)")
    b.add_argument("--sweep", choices=["reduced", "full"], default="full", help="--only sweep: which sweep (full)")
    b.set_defaults(fn=cmd_bench)

    from harness.benchcmd import add_cli as add_bench_cli
    from harness.pki import add_cli as add_pki_cli
    from harness.repro import add_cli as add_repro_cli

    add_bench_cli(sub)   # hil rack up|down|status, hil console SLOT, hil power SLOT ...
    add_repro_cli(sub)   # hil repro INCIDENT.yaml
    add_pki_cli(sub)

    a = ap.parse_args(argv)
    a.argv = list(sys.argv[1:] if argv is None else argv)  # (verdict.json says what was run)
    if getattr(a, "pytest_args", None) and a.pytest_args[:1] == ["--"]:
        a.pytest_args = a.pytest_args[1:]
    from harness.rackctl import RackStartError

    try:
        return a.fn(a)
    except (ConfigError, RackStartError) as exc:  # a bad rig, cart or profile; a rack that will not start
        return _refuse(str(exc))


def _refuse(message: str) -> int:
    """One line on stderr (the first line of `message`: the cause), exit status 2."""
    print(f"hil: {(message.splitlines() or [''])[0]}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
