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
  (console timestamps), and ten carts updating in parallel against the slowest cart alone.

Figures are printed and written as JSON; nothing here asserts a time.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
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


def run_bench(rig_path: Path, *, out: Path, quick: bool = False) -> int:
    from harness.cart import Bench
    from harness.rackctl import rack_state, start_rack, stop_rack

    rig = Rig.load(rig_path)
    started = None
    if rig.is_virtual and rack_state(rig) is None:
        started = start_rack(rig, owner_pid=os.getpid())
    results: dict = {"rig": str(rig.path), "when": time.strftime("%Y-%m-%dT%H:%M:%S")}
    try:
        rig.preflight()
        bench = Bench(rig, out.parent / "consoles")
        try:
            first = bench.cart(rig.slots[0].cart_id)
            results["console_line_latency"] = console_latency(first, 500 if quick else 2000)
            results["scpi_query_latency"] = scpi_latency(bench, rig, 200 if quick else 1000)
            results["power_on_to_banner"] = boot_times(bench, rig)
            from harness.ota import Fleet

            fleet = Fleet(rig, out.parent / "fleet")
            try:
                results["device_event_to_harness"] = mqtt_latency(first, fleet, 300 if quick else 1000)
                results["ota_update"] = update_timings(bench, rig, fleet, out.parent)
            finally:
                fleet.close()
        finally:
            bench.close()
    finally:
        if started:
            stop_rack(started)
    if not quick:
        results["smoke_suite"] = smoke_scaling(rig.path)
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
    if "smoke_suite" in r:
        s = r["smoke_suite"]
        print(f"smoke suite: one cart ({s['one_cart']}, the slowest to boot) {s['one_cart_s']} s, "
              f"ten carts in parallel {s['ten_carts_s']} s "
              f"(ratio {s['ratio']}, target <= 2)")
