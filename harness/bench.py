"""`hil bench`: the figures behind the rack's speed targets, measured through real interfaces.

- console line latency: the firmware writes `bench <i> <t_ns>` lines (its monotonic clock, which
  on one Linux host is the harness's too); latency = harness timestamp of the line - t_ns;
- SCPI query latency: `*IDN?` round trips per supply (Siglent paced at 20 ms by design: reported
  apart, not in the target);
- power-on to banner and to ready, per cart;
- wall time of the smoke suite on ten carts in parallel against one cart;
- device event to harness: the firmware publishes `bench` telemetry stamped with its monotonic
  clock (`bench mqtt N`); latency = the harness's receipt time - t_ns;
- OTA update per configuration, split into pickup, download, verify, write, trial boot, confirm
  (console timestamps), and ten carts updating in parallel against the slowest cart alone;
- cut latency, measured from outside the harness: the device's stamp on the event line (its
  monotonic clock) -> the supply's arrival stamp of the OFF line in the rig's
  ``virtual.supply_rx_log`` (the same clock); with the harness's own split (device -> line seen,
  seen -> OFF sent, sent -> supply received). Three figures: a cut on the boot event (the firmware
  starting), on the firmware's first step (its self-test), and on the Kth ``bench <i> <t_ns>`` line of
  ``bench lines`` (the firmware writes them back to back, as fast as it can: a flood no UART carries);
- the power-cut sweep (`harness/sweep.py`): the full sweep (every event + 10 random cuts) run as the
  suite runs it (`hil sweep`: test_suites/test_power_cut.py, one worker per cart), its wall time over
  the chosen carts (all ten by default) and cut points per second, read from the sweep's own reports.

Figures are printed and written as JSON; nothing here asserts a time.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness.config import Rig

ROOT = Path(__file__).resolve().parent.parent


def _pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))]


def _stats_us(xs: list[float]) -> dict:
    return {"n": len(xs), "median_us": round(statistics.median(xs) * 1e6, 1), "p99_us": round(_pct(xs, 99) * 1e6, 1),
            "max_us": round(max(xs) * 1e6, 1)}


def console_latency(cart, count: int) -> dict:
    cart.power_on()
    start = cart.console.mark()
    cart.command("bench_lines", timeout=30.0, count=count)
    rx = re.compile(cart.profile.commands["bench_lines"].parse)
    lat = []
    for ln in cart.console.lines(start):  # the console's own arrival timestamps of those lines
        m = rx.match(ln.text)
        if m:
            lat.append(ln.t_mono - int(m["t_ns"]) / 1e9)
    if len(lat) < count:
        raise RuntimeError(f"console bench: got {len(lat)} of {count} lines")
    cart.power_off()
    return _stats_us(lat)


def scpi_latency(bench, rig: Rig, count: int) -> dict:
    out = {}
    for spec in rig.spec.supplies:
        sup = bench.supply(spec.name)
        n = count if spec.dialect != "siglent-spd" else max(20, count // 20)
        xs = []
        for _ in range(n):
            t = time.perf_counter()
            sup.query("*IDN?")
            xs.append(time.perf_counter() - t)
        out[f"{spec.name} ({spec.dialect})"] = _stats_us(xs)
    return out


def boot_times(bench, rig: Rig) -> dict:
    """Power on every cart at once, then read each one's banner and ready times off its console."""
    carts = [bench.cart(s.cart_id) for s in rig.slots]
    t_on = {}
    for c in carts:
        c.power_off()
    time.sleep(rig.spec.power_off_s)  # physics: off time
    for c in carts:
        c.console.mark()
        c.power.set_voltage(c.config.supply.voltage)
        c.power.set_current_limit(c.config.supply.current_limit)
        t_on[c.id] = time.monotonic()
        c.power.on()
    res = {}
    for c in carts:
        c.wait_boot()
        start = c.console.mark()
        lines = c.console.lines(max(0, start - 60), start)
        banner = next(ln for ln in reversed(lines) if c.pattern("banner").search(ln.text))
        ready = next(ln for ln in reversed(lines) if c.pattern("ready").search(ln.text))
        res[c.id] = {"banner_s": round(banner.t_mono - t_on[c.id], 3), "ready_s": round(ready.t_mono - t_on[c.id], 3),
                     "expected_s": c.config.boot.expected_s}
    for c in carts:
        c.power_off()
    return res


def smoke_scaling(rig_path: Path) -> dict:
    def run(args: list[str]) -> float:
        t = time.monotonic()
        cmd = [sys.executable, "-m", "pytest", "test_suites/test_rack_smoke.py", "-q", "--rig", str(rig_path),
               "-p", "no:hypothesispytest", *args]  # as `hil smoke` runs it
        rc = subprocess.call(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if rc != 0:
            raise RuntimeError(f"smoke suite failed during the benchmark ({' '.join(args)}); run `hil smoke`")
        return time.monotonic() - t

    # ten carts in parallel take as long as the slowest of them: compare with that one alone
    # (carts differ: expected boot 1.4 s to 2.2 s, and every smoke test boots its cart)
    rig = Rig.load(rig_path)
    slowest = max(rig.slots, key=lambda s: s.cart.boot.expected_s).cart_id
    one = run(["--cart", slowest, "-n", "1"])
    ten = run(["-n", str(len(rig.slots))])
    return {"one_cart": slowest, "one_cart_s": round(one, 2), "ten_carts_s": round(ten, 2),
            "ratio": round(ten / one, 2)}


def mqtt_latency(cart, fleet, count: int) -> dict:
    """Device publish -> the harness's MQTT client has it (the moment a wait on it can return)."""
    cart.power_on()
    fleet.telemetry.wait_metric("agent_online", thing=cart.id, timeout=30)  # the agent is connected
    mark = fleet.telemetry.mark()
    cart.command("bench_mqtt", timeout=30.0 + count * 0.01, count=count)
    events = fleet.telemetry.wait_metric("bench", thing=cart.id, since=mark, at_least=count, timeout=30)
    lat = [e.t - int(e.fields["t_ns"]) / 1e9 for e in events]
    cart.power_off()
    return _stats_us(lat) | {"target_p99_us": 5000}


def _updater(rig: Rig, fleet, out_dir: Path):
    from harness.ota import CartOta, FirmwareBuilds, Signer, open_lab_pki, release_hardware

    signer, builds = Signer(open_lab_pki(rig)), FirmwareBuilds(rig, out_dir / "firmware")
    return lambda cart: CartOta(cart, fleet, builds, signer, release_hardware(rig))


def update_timings(bench, rig: Rig, fleet, out_dir: Path) -> dict:
    """One update per cart, all ten at once, then the slowest of them again alone."""
    import threading

    from harness.ota import bump

    make = _updater(rig, fleet, out_dir)
    carts = [bench.cart(s.cart_id) for s in rig.slots]
    per_cart: dict[str, dict] = {}
    errors: dict[str, str] = {}

    images: dict[str, tuple[object, bytes]] = {}

    def one(cart) -> None:
        try:
            ota, image = images[cart.id]
            t = time.monotonic()
            out = ota.update(image).expect_confirmed()
            per_cart[cart.id] = out.timings | {"wall_s": round(time.monotonic() - t, 3), "image_bytes": len(image)}
        except Exception as exc:  # reported, not hidden
            errors[cart.id] = str(exc).splitlines()[0]

    def parallel(cs) -> float:
        mark = fleet.telemetry.mark()
        for c in cs:  # boot first: the figure is the update of an idle, connected cart, not its power-on
            c.power_cycle()
        for c in cs:  # ... nor the build and the signing of its image
            fleet.serve(c.id)
            fleet.telemetry.wait_metric("agent_online", thing=c.id, since=mark, timeout=30)
            ota = make(c)
            images[c.id] = (ota, ota.image(bump(c.version(), patch=1)))
        t = time.monotonic()
        threads = [threading.Thread(target=one, args=(c,)) for c in cs]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        return time.monotonic() - t

    # each configuration alone (the figure per configuration), then all ten at once
    alone: dict[str, float] = {}
    for c in carts:
        alone[c.id] = parallel([c])
        c.power_off()
    one_cart = dict(per_cart)
    per_cart.clear()
    ten = parallel(carts)
    ten_cart = dict(per_cart)
    for c in carts:
        c.power_off()
    slowest = max(alone, key=alone.get)
    return {"per_cart_alone": one_cart, "per_cart_parallel": ten_cart, "ten_carts_s": round(ten, 2),
            "one_cart": slowest, "one_cart_s": round(alone[slowest], 2),
            "ratio": round(ten / alone[slowest], 2) if alone[slowest] else None, "errors": errors}


def sweep_figures(rig_path: Path, out_dir: Path, *, carts: list[str] | None = None, mode: str = "full") -> dict:
    """Run the power-cut sweep (not the fault-build check) on ``carts`` (default: every cart of the rig)
    in parallel, one worker per cart; wall time, cut points and cut points per second."""
    rig = Rig.load(rig_path)
    chosen = carts or [s.cart_id for s in rig.slots]
    reports = (out_dir / "sweep-run").resolve()   # absolute: the firmware build runs in the rig's directory
    cmd = [sys.executable, "-m", "pytest", "test_suites/test_power_cut.py::test_every_cut_leaves_the_cart_safe",
           "-q", "--rig", str(rig.path), "-p", "no:hypothesispytest", "--sweep", mode,
           "--hil-reports", str(reports), "-n", str(len(chosen))]
    for c in chosen:
        cmd += ["--cart", c]
    before = set((reports / "runs").glob("*")) if (reports / "runs").exists() else set()
    t = time.monotonic()
    rc = subprocess.call(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.monotonic() - t
    per_cart: dict[str, dict] = {}
    for run in sorted(set((reports / "runs").glob("*")) - before):
        for f in sorted(run.glob("sweep/sweep-*.json")):
            d = json.loads(f.read_text())
            per_cart[d["cart"]] = {"points": len(d["points"]), "failed": sum(not p["passed"] for p in d["points"]),
                                   "events": len(d["recorded"]), "coverage": d["coverage"], "wall_s": d["wall_s"]}
    points = sum(c["points"] for c in per_cart.values())
    return {"mode": mode, "carts": chosen, "wall_s": round(wall, 1), "points": points,
            "points_per_s": round(points / wall, 3) if wall else None, "passed": rc == 0,
            "failed_points": sum(c["failed"] for c in per_cart.values()), "per_cart": per_cart,
            "target_wall_s": 600, "reports": str(reports)}


def run_sweep_bench(rig_path: Path, *, out: Path, carts: list[str] | None = None, mode: str = "full") -> int:
    """Only the sweep figures (`hil bench --only sweep [--sweep-cart ID]...`)."""
    results = {"rig": str(rig_path), "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
               "power_cut_sweep": sweep_figures(rig_path, out.parent, carts=carts, mode=mode)}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    _print_sweep(results["power_cut_sweep"])
    print(f"\nwritten to {out}")
    return 0


def _print_sweep(s: dict) -> None:
    print(f"power-cut sweep ({s['mode']}) on {len(s['carts'])} cart(s): {s['wall_s']} s wall "
          f"(target <= {s['target_wall_s']} s for ten), {s['points']} cut points, {s['points_per_s']} points/s, "
          f"{s['failed_points']} failed point(s){'' if s['passed'] else ' - SUITE FAILED'}")
    for cid, c in sorted(s["per_cart"].items()):
        print(f"  {cid}: {c['points']} points over {c['events']} events ({c['coverage']:.0%} cut), {c['wall_s']} s, "
              f"{c['failed']} failed")


CUT_TARGET_MEDIAN_US = 500.0
CUT_TARGET_P99_US = 1000.0


def cut_latency(cart, rig: Rig, count: int, *, flood: bool = False, nth: int = 20, nth_event: int = 1) -> dict:
    """``count`` cuts on ``cart``, each on a fresh boot.

    Normally on the ``nth_event``-th event line (the profile's ``event`` pattern) after the boot
    banner: the cut is armed once the banner is seen; the 1st is the boot event (the firmware
    starting), the 2nd its first step (the self-test, which reads the slot). With ``flood`` (or a
    profile without event lines) on the ``nth`` line of ``bench lines``, written back to back: a cut
    under a console flood, at a line rate far beyond what a real cart's UART carries."""
    from harness.cut import cut_on_console

    virt = rig.spec.virtual
    if virt is None or virt.supply_rx_log is None:
        return {"skipped": "the rig has no virtual.supply_rx_log: the supply side cannot be seen from outside"}
    rx_log = rig.resolve(virt.supply_rx_log)
    event_rx = cart.profile.patterns.get("event")
    flood = flood or event_rx is None
    supply = cart.slot.supply.name
    device_to_rx, device_to_seen, seen_to_rx, seen_to_sent, sent_to_rx, paths = [], [], [], [], [], set()
    events: dict[str, int] = {}
    for _ in range(count):
        if flood:
            cart.power_on()
            cut = cut_on_console(cart.power, cart.console, cart.profile.commands["bench_lines"].parse, nth=nth)
            cart.console.send(f"bench lines {nth + 50_000}")
        else:
            cart.power_on(wait=False)
            cart.console.expect(cart.pattern("banner"), cart.boot_timeout, what=f"{cart.id} boot banner")
            cut = cut_on_console(cart.power, cart.console, event_rx, nth=nth_event)
        start = rx_log.stat().st_size if rx_log.exists() else 0
        off_line = cut.off_bytes.decode("ascii").splitlines()[-1]   # the line that switches the output
        cut.wait(30.0)
        paths.add(cut.path)
        name = cut.event.split(" ")[1] if not flood else "bench"
        events[name] = events.get(name, 0) + 1
        # the supply logs a line after executing it, before it reads the next one: the confirmation
        # query that cut.wait() waited for came after the OFF, so the OFF's line is in the log now
        with rx_log.open("rb") as f:
            f.seek(start)
            rows = [ln.decode("utf-8", "replace").rstrip("\n").split(" ", 3) for ln in f]
        got = [int(r[0]) for r in rows if len(r) == 4 and r[2] == supply and r[3] == off_line]
        if not got or cut.device_t_ns is None:
            raise RuntimeError(f"cut bench: no RX of {off_line!r} from {supply} in {rx_log} after byte {start}")
        rx_ns = got[0]
        device_to_rx.append((rx_ns - cut.device_t_ns) / 1e9)
        device_to_seen.append((cut.event_t_ns - cut.device_t_ns) / 1e9)
        seen_to_rx.append((rx_ns - cut.event_t_ns) / 1e9)
        seen_to_sent.append((cut.sent_t_ns - cut.event_t_ns) / 1e9)
        sent_to_rx.append((rx_ns - cut.sent_t_ns) / 1e9)
        time.sleep(rig.spec.power_off_s)  # physics: off time before the next power-on
    return {"cart": cart.id, "supply": f"{supply} ({cart.slot.supply.dialect}) ch{cart.slot.channel}",
            "event": f"bench line #{nth} (flood)" if flood else f"event line #{nth_event} after the banner",
            "events_cut": events, "paths": sorted(paths),
            # the target is for a device's events; a flood is a stress figure beside it, the count over 1 ms kept
            "device_event_to_supply_rx": _stats_us(device_to_rx)
            | ({} if flood else {"target_median_us": CUT_TARGET_MEDIAN_US, "target_p99_us": CUT_TARGET_P99_US})
            | {"over_target_p99": sum(x * 1e6 > CUT_TARGET_P99_US for x in device_to_rx),
               "samples_us": [round(x * 1e6, 1) for x in device_to_rx]},
            "device_to_line_seen": _stats_us(device_to_seen), "line_seen_to_supply_rx": _stats_us(seen_to_rx),
            "line_seen_to_off_sent": _stats_us(seen_to_sent),
            "off_sent_to_supply_rx": _stats_us(sent_to_rx)}


@contextlib.contextmanager
def _bench_on(rig: Rig, out: Path):
    """(the rig in use, its bench: supplies and consoles). A virtual rig whose rack is not up gets a private
    one, as a test run does (docs/interfaces.md, "Isolated runs"): its copy of the rig, free ports, its files
    in a new `rack-<time>-*` directory beside `out`. Everything closed (and that rack stopped) afterwards."""
    from harness.cart import Bench
    from harness.isolation import start_private_rack
    from harness.rackctl import rack_state, stop_rack

    started = None
    if rig.is_virtual and rack_state(rig) is None:
        out.parent.mkdir(parents=True, exist_ok=True)
        run_dir = Path(tempfile.mkdtemp(prefix=time.strftime("rack-%Y%m%d-%H%M%S-"), dir=out.parent))
        rig, started = start_private_rack(rig, run_dir, owner_pid=os.getpid(), note="hil bench")
    try:
        rig.preflight()
        bench = Bench(rig, out.parent / "consoles")
        try:
            yield rig, bench
        finally:
            bench.close()
    finally:
        if started:
            stop_rack(started)


def run_cut_bench(rig_path: Path, *, out: Path, cuts: int = 50, cart_id: str | None = None) -> int:
    """Only the cut latency (`hil bench --only cut`)."""
    rig = Rig.load(rig_path)
    results: dict = {"rig": str(rig.path), "when": time.strftime("%Y-%m-%dT%H:%M:%S")}
    with _bench_on(rig, out) as (live, bench):
        cart = bench.cart(cart_id or live.slots[0].cart_id)
        results["cut_latency"] = cut_latency(cart, live, cuts)
        results["cut_latency_step"] = cut_latency(cart, live, cuts, nth_event=2)
        results["cut_latency_flood"] = cut_latency(cart, live, cuts, flood=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    _print_cut(results["cut_latency"])
    _print_cut(results["cut_latency_step"])
    _print_cut(results["cut_latency_flood"])
    print(f"\nwritten to {out}")
    return 0


def run_bench(rig_path: Path, *, out: Path, quick: bool = False, cuts: int = 50) -> int:
    rig = Rig.load(rig_path)
    results: dict = {"rig": str(rig.path), "when": time.strftime("%Y-%m-%dT%H:%M:%S")}
    with _bench_on(rig, out) as (live, bench):
        first = bench.cart(live.slots[0].cart_id)
        results["console_line_latency"] = console_latency(first, 500 if quick else 2000)
        results["scpi_query_latency"] = scpi_latency(bench, live, 200 if quick else 1000)
        results["power_on_to_banner"] = boot_times(bench, live)
        results["cut_latency"] = cut_latency(first, live, min(cuts, 20) if quick else cuts)
        results["cut_latency_step"] = cut_latency(first, live, min(cuts, 20) if quick else cuts, nth_event=2)
        results["cut_latency_flood"] = cut_latency(first, live, min(cuts, 20) if quick else cuts, flood=True)
        from harness.ota import Fleet

        fleet = Fleet(live, out.parent / "fleet")
        try:
            results["device_event_to_harness"] = mqtt_latency(first, fleet, 300 if quick else 1000)
            results["ota_update"] = update_timings(bench, live, fleet, out.parent)
        finally:
            fleet.close()
    if not quick:
        results["smoke_suite"] = smoke_scaling(rig.path)
        results["power_cut_sweep"] = sweep_figures(rig.path, out.parent)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    _print(results)
    print(f"\nwritten to {out}")
    return 0


def _print(r: dict) -> None:
    c = r["console_line_latency"]
    print(f"console line latency   median {c['median_us']:8.1f} us   p99 {c['p99_us']:8.1f} us   (n={c['n']})")
    for name, s in r["scpi_query_latency"].items():
        print(f"SCPI *IDN? {name:32s} median {s['median_us']:8.1f} us   p99 {s['p99_us']:8.1f} us")
    print("power-on to banner / ready (s):")
    for cid, b in r["power_on_to_banner"].items():
        print(f"  {cid}: banner {b['banner_s']:.3f}  ready {b['ready_s']:.3f}  (expected {b['expected_s']})")
    for key in ("cut_latency", "cut_latency_step", "cut_latency_flood"):
        if key in r:
            _print_cut(r[key])
    if "device_event_to_harness" in r:
        m = r["device_event_to_harness"]
        print(f"device event -> harness median {m['median_us']:8.1f} us   p99 {m['p99_us']:8.1f} us   (n={m['n']}, "
              f"target p99 <= 5 ms)")
    if "ota_update" in r:
        u = r["ota_update"]
        for label, key in (("each cart alone", "per_cart_alone"), ("ten in parallel", "per_cart_parallel")):
            print(f"OTA update, {label} (s):  pickup download  verify   write trial_boot confirm  total")
            for cid, t in sorted(u[key].items()):
                cols = " ".join(f"{t.get(k, float('nan')):7.3f}" for k in
                                ("pickup", "download", "verify", "write", "trial_boot", "confirm", "total"))
                print(f"  {cid}:                {cols}   ({t['image_bytes']} bytes)")
        print(f"OTA update: ten carts in parallel {u['ten_carts_s']} s, the slowest alone ({u['one_cart']}) "
              f"{u['one_cart_s']} s (ratio {u['ratio']}, target <= 2)")
        for cid, err in u["errors"].items():
            print(f"  ERROR {cid}: {err}")
    if "power_cut_sweep" in r:
        _print_sweep(r["power_cut_sweep"])
    if "smoke_suite" in r:
        s = r["smoke_suite"]
        print(f"smoke suite: one cart ({s['one_cart']}, the slowest to boot) {s['one_cart_s']} s, "
              f"ten carts in parallel {s['ten_carts_s']} s "
              f"(ratio {s['ratio']}, target <= 2)")


def _print_cut(c: dict) -> None:
    if "skipped" in c:
        print(f"cut latency: not measured: {c['skipped']}")
        return
    e = c["device_event_to_supply_rx"]
    print(f"cut latency, {c['event']}: device event -> supply received OFF  (n={e['n']}, {c['cart']} on "
          f"{c['supply']}, sent via {'/'.join(c['paths'])}, events cut: {c['events_cut']})")
    over = f"{e['over_target_p99']} of {e['n']} over {CUT_TARGET_P99_US:.0f} us"
    target = (f"target median <= {e['target_median_us']:.0f} us, p99 <= {e['target_p99_us']:.0f} us; {over}"
              if "target_p99_us" in e else f"a stress figure, not a device event: {over}")
    print(f"  {'end to end (outside the harness)':32s} median {e['median_us']:8.1f} us   p99 {e['p99_us']:8.1f} us"
          f"   max {e['max_us']:8.1f} us   ({target})")
    for key, label in (("device_to_line_seen", "device -> console line seen"),
                       ("line_seen_to_supply_rx", "line seen -> supply RX (the cut)"),
                       ("line_seen_to_off_sent", "line seen -> send() returned"),
                       ("off_sent_to_supply_rx", "send() returned -> supply RX")):
        s = c[key]
        print(f"  {label:32s} median {s['median_us']:8.1f} us   p99 {s['p99_us']:8.1f} us")
