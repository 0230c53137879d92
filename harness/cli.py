"""`hil`: the cart-hil command.

    hil gate [--rig R] [--cart ID]... [--tag T]... [-n N]    release gate: smoke, signed update, rollback, flash faults,
                                                             power cuts (reduced sweep; --sweep full: all of it),
                                                             clock skew, CA rotation, rollout preflight
    hil gate --self-check | --nightly                        the gate against each seeded fault build | everything,
                                                             clock skew, CA rotation
    hil sweep [--rig R] [--cart ID]... [-n N] [--sweep M]     the power-cut suite alone, full sweep by default
    hil smoke [--rig R] [--cart ID]... [--tag T]... [-n N]   the rack smoke suite
    hil test [PYTEST ARGS]                                     lint + the project's own tests + the suites
    hil rig check RIG                                          validate a rig file and its carts
    hil rollout check IMAGE --fleet INVENTORY                  can every configuration take this signed image?
    hil rack up [RIG] [--foreground] | down [RIG] | status [RIG]   the rig's rack: start/stop a virtual one; outputs,
                                                                 V/I per slot
    hil console SLOT [--rig R]                                 a cart's console, interactive (Ctrl-] exits), logged
    hil power SLOT on|off|cycle|measure [--rig R] [--off-s S]  a slot's supply output
    hil bench [--rig R] [--out FILE]                           latency and timing figures
    hil pki init|show [--dir D]                                the lab PKI (root CAs, signers)
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
import time
from pathlib import Path

from harness.config import ConfigError, Rig

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RIG = ROOT / "rigs" / "virtual.yaml"


INTERRUPTED = 130  # the shell's status for a run ended by Ctrl-C (128 + SIGINT)
WRAP_UP_S = 120.0   # how long an interrupted pytest may take to end its tests and write its reports


def _pytest(args: list[str]) -> int:
    """Run pytest; its exit status. Ctrl-C reaches pytest too (same process group): it ends the test in
    progress, writes what it has (JUnit XML, results.jsonl) and stops the rack it started. Here we wait
    for that, without a traceback, and a second Ctrl-C (or WRAP_UP_S) ends it for good."""
    cmd = [sys.executable, "-m", "pytest", *args]
    print("+", " ".join(cmd), flush=True)
    proc = subprocess.Popen(cmd, cwd=ROOT)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        print("\nhil: interrupted — letting the run write its reports and power the rack down "
              "(Ctrl-C again to stop at once)", file=sys.stderr, flush=True)
        try:
            proc.wait(timeout=WRAP_UP_S)
        except (KeyboardInterrupt, subprocess.TimeoutExpired):
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return INTERRUPTED


SUITES = {
    "smoke": ["test_suites/test_rack_smoke.py"],
    "gate": ["test_suites/test_rack_smoke.py", "test_suites/test_signed_update.py", "test_suites/test_rollback.py",
             "test_suites/test_flash_faults.py", "test_suites/test_power_cut.py", "test_suites/test_clock_skew.py",
             "test_suites/test_ca_rotation.py"],
    "sweep": ["test_suites/test_power_cut.py"],
}


def cmd_smoke(a: argparse.Namespace) -> int:
    from harness.plugin import dir_write_problem

    rig = Rig.load(a.rig)
    slots = rig.select(a.cart, a.tag)
    n = a.workers or max(1, len(slots))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = ROOT / "reports" / a.cmd / stamp
    why = dir_write_problem(out)
    if why:  # before anything runs: a gate whose reports cannot be written has no verdict to give
        return _refuse(f"cannot write reports in {out}: {why}")
    self_check, nightly = getattr(a, "self_check", False), getattr(a, "nightly", False)
    sweep = "full" if nightly else a.sweep
    args = [*SUITES[a.cmd], "--rig", str(rig.path), "-n", str(n),
            f"--junitxml={out / 'junit.xml'}", f"--alluredir={out / 'allure-results'}", "-q",
            "-p", "no:hypothesispytest",  # a dev-only plugin the suites never use
            "--sweep", sweep]
    if a.cmd == "gate" and not nightly:
        # the fault builds test the gate, not the release: the release's gate leaves them out
        args += ["-m", "hil_self_check" if self_check else "not hil_self_check"]
    for c in a.cart:
        args += ["--cart", c]
    for t in a.tag:
        args += ["--tag", t]
    rc = _pytest(args + a.pytest_args)
    tally = junit_tally(out / "junit.xml")
    if rc == INTERRUPTED:
        so_far = "no JUnit XML written" if tally.missing else f"{tally.summary()} so far"
        print(f"hil {a.cmd}: INTERRUPTED — no verdict ({so_far}); reports in {out}")
        return rc
    unearned = tally.unearned()
    if unearned:  # a selection that ran nothing, or skipped a scenario, has not shown anything passes
        print(f"hil {a.cmd}: {unearned}")
        rc = rc or 1
    if self_check or nightly:
        print("self-check of the gate (each seeded fault build must be caught, for its own reason):")
        for line in tally.self_check_lines():
            print(f"  {line}")
        if not tally.checks:
            print("  (no self-check ran)")
            rc = rc or 1
    if a.cmd == "gate" and not self_check and not _gate_preflight(rig, slots, out):
        rc = rc or 1
    print(f"hil {a.cmd}: {'PASS' if rc == 0 else 'FAIL'} ({len(slots)} carts on {rig.name}; {tally.summary()}); "
          f"reports in {out}")
    return rc


@dataclasses.dataclass
class Tally:
    """What a run's JUnit XML says: scenarios per cart and how each ended."""

    per_cart: dict[str, int] = dataclasses.field(default_factory=dict)
    checks: list[tuple[str, str, bool, str]] = dataclasses.field(default_factory=list)  # build, cart, caught, why
    passed: int = 0
    failed: int = 0
    skipped: list[str] = dataclasses.field(default_factory=list)
    missing: bool = False

    def unearned(self) -> str | None:
        """Why a run without failures is still no PASS, or None."""
        if self.missing:
            return "no JUnit XML was written: no verdict"
        if not self.passed and not self.failed:
            return "nothing ran (no scenario matched the selection): no verdict"
        if self.skipped:
            more = f" and {len(self.skipped) - 3} more" if len(self.skipped) > 3 else ""
            return (f"{len(self.skipped)} scenario(s) skipped — a skipped scenario is not a pass: "
                    f"{', '.join(self.skipped[:3])}{more}")
        return None

    def self_check_lines(self) -> list[str]:
        """One line per seeded fault build and cart: caught (and the reason the gate gave) or MISSED."""
        return [f"{'caught' if ok else 'MISSED'}  {build:28s} {cart:10s} {why}"
                for build, cart, ok, why in sorted(self.checks)]

    def summary(self) -> str:
        carts = ", ".join(f"{c} {n}" for c, n in sorted(self.per_cart.items()))
        return (f"{self.passed} passed, {self.failed} failed, {len(self.skipped)} skipped"
                + (f"; scenarios per cart: {carts}" if carts else ""))


def junit_tally(path: Path) -> Tally:
    """Count a JUnit XML's test cases by outcome and by cart (the `cart` property the plugin records on
    every test of a cart). A teardown error is reported by pytest as a second entry of the same case: counted once."""
    import xml.etree.ElementTree as ET

    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return Tally(missing=True)
    tally = Tally()
    seen: set[str] = set()
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        if name in seen:
            continue
        seen.add(name)
        props = {p.get("name"): p.get("value", "") for p in case.iterfind("properties/property")}
        cart = props.get("cart")  # the plugin's user properties
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        if case.find("skipped") is not None:
            tally.skipped.append(case.get("name", name))
        elif bad is not None:
            tally.failed += 1
        else:
            tally.passed += 1
        if "fault_build" in props and case.find("skipped") is None:
            why = props.get("caught", "") if bad is None else ((bad.get("message") or "").splitlines() or [""])[0][:300]
            tally.checks.append((props["fault_build"], cart or "-", bad is None, why))
        if cart:
            tally.per_cart[cart] = tally.per_cart.get(cart, 0) + 1
    return tally


def _gate_preflight(rig: Rig, slots, out: Path) -> bool:
    """The rollout preflight of the release the gate tested, signed under each root the selected carts
    were provisioned with: which configurations each signing reaches (`preflight.json`). False if some
    configuration no signing reaches (no release could ever update it: the CA-rotation deadlock)."""
    import json

    from harness.ota import FirmwareBuilds, Signer, bump, open_lab_pki, release_hardware
    from harness.rollout import configurations_of, rollout_plan

    configs = configurations_of(rig, slots)
    version = bump(max((s.cart.firmware.initial_version for s in slots), key=_version_key), minor=1)
    unsigned = FirmwareBuilds(rig, out / "preflight").build(version)
    signer = Signer(open_lab_pki(rig))
    roots = sorted({ca for c in configs for ca in c.cas})
    images = {root: signer.sign(unsigned, hardware=release_hardware(rig), ca=root) for root in roots}
    verdicts, unreachable = rollout_plan(images, configs)
    print(f"rollout preflight of {version}, signed under each root the carts have:")
    for root, v in verdicts.items():
        for line in v.lines():
            print(f"  {root}: {line}")
    if unreachable:
        print(f"  REFUSED: no signed release reaches {', '.join(unreachable)}")
    (out / "preflight.json").write_text(json.dumps({
        "version": version, "unreachable": unreachable,
        "by_root": {root: {"ok": v.ok, "configurations": v.configurations,
                           "refused": {r.configuration: list(r.lacks) for r in v.refused}}
                    for root, v in verdicts.items()}}, indent=2))
    return not unreachable


def _version_key(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in v.split("-", 1)[0].split("."))


def cmd_test(a: argparse.Namespace) -> int:
    print("+ ruff check .", flush=True)
    rc = subprocess.call([sys.executable, "-m", "ruff", "check", "."], cwd=ROOT)
    if rc != 0:
        return rc
    # one worker per cart of the virtual rig: the suites wait on devices (boots, flash, the trial window),
    # not on the CPU, and every cart's tests run in order on one worker
    workers = os.environ.get("HIL_TEST_WORKERS", "10")
    return _pytest(["tests", "test_suites", "-n", workers, "-q", "--timeout=600", *a.pytest_args])


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
        s.add_argument("--rig", type=Path, default=DEFAULT_RIG)
        s.add_argument("--cart", action="append", default=[])
        s.add_argument("--tag", action="append", default=[])
        s.add_argument("-n", "--workers", type=int, default=0, help="parallel workers (default: one per cart)")
        s.add_argument("--sweep", choices=["reduced", "full"], default=sweep,
                       help=f"power-cut sweep: reduced (every 5th event, every write of boot control, device state "
                            f"or trust store, 2 random cuts) "
                            f"or full (every event, 10 random cuts); default {sweep}")
        if name == "gate":
            mode = s.add_mutually_exclusive_group()
            mode.add_argument("--self-check", action="store_true",
                              help="check the gate itself: run it against each seeded fault build and print "
                                   "caught / missed per build with the reason the gate gave (not the release's "
                                   "scenarios)")
            mode.add_argument("--nightly", action="store_true",
                              help="everything: the release's scenarios with the full sweep, and the self-check")
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

    add_bench_cli(sub)   # hil rack up|down|status, hil console SLOT, hil power SLOT ...
    add_pki_cli(sub)

    a = ap.parse_args(argv)
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
