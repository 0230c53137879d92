"""The virtual rack's own command line.

    python -m vrack up rigs/virtual.yaml          # run the rack in the foreground until SIGTERM/SIGINT
    python -m vrack build --version 1.6.0 -o fw.img [--fault crash_on_sensor=lidar-tfmini] [--fault bcb_single_copy]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _parse_faults(items: list[str]) -> dict[str, str]:
    faults = {}
    for item in items:
        key, _, value = item.partition("=")
        faults[key] = value or "1"
    return faults


def main(argv: list[str] | None = None) -> int:
    from vrack.factory import KNOWN_FAULTS

    ap = argparse.ArgumentParser(prog="python -m vrack", description="the cart-hil virtual rack")
    sub = ap.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="bring the rack of a virtual rig up, in the foreground")
    up.add_argument("rig", type=Path)
    up.add_argument("--owner-pid", type=int, default=None,
                    help="shut the rack down when this process ends (the harness run that started it)")
    b = sub.add_parser("build", help="build a reference-firmware image")
    b.add_argument("--version", required=True)
    b.add_argument("--fault", action="append", default=[],
                   help="fault build: NAME or NAME=VALUE (repeatable); NAME one of: "
                        f"{', '.join(KNOWN_FAULTS)} (docs/interfaces.md, \"Fault builds\")")
    b.add_argument("--size", type=int, default=None, help="pad the payload to this many bytes")
    b.add_argument("-o", "--output", type=Path, required=True)
    args = ap.parse_args(argv)

    if args.cmd == "up":
        from vrack.cartconfig import CartConfigError, one_line
        from vrack.rack import Rack, RackError, load_rig

        try:
            rack = Rack(load_rig(args.rig))
            rack.up()
        except (RackError, CartConfigError) as exc:
            # a start-up error is one line (file, slot or supply, field), exit status 2, no traceback
            print(f"vrack: {one_line(str(exc))}", file=sys.stderr, flush=True)
            return 2
        print(json.dumps({"status": "ready", "rig": str(rack.rig.path), "run_dir": str(rack.run_dir)}),
              flush=True)
        rack.serve_forever(owner_pid=args.owner_pid)
        return 0
    if args.cmd == "build":
        from vrack.factory import build_image

        kw = {"faults": _parse_faults(args.fault)}
        if args.size:
            kw["size"] = args.size
        data = build_image(args.version, **kw)
        args.output.write_bytes(data)
        print(f"{args.output}: {len(data)} bytes, version {args.version}")
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
