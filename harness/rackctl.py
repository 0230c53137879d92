"""Start and stop the virtual rack of a virtual rig, as an outside program.

The harness never imports vrack: it runs ``python -m vrack up RIG`` the way a lab engineer
would in another terminal, waits for its ready line, and stops it with SIGTERM. The rack
watches its owner's pid, so a harness killed outright does not leave a rack behind.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

from harness.config import Rig


class RackStartError(Exception):
    pass


def rack_state(rig: Rig) -> dict | None:
    """The rack.json of a live rack for this rig's run dir, or None."""
    if rig.run_dir is None:
        return None
    try:
        state = json.loads((rig.run_dir / "rack.json").read_text())
        os.kill(int(state["pid"]), 0)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return state if state.get("status") == "ready" else None


def start_rack(rig: Rig, *, owner_pid: int | None = None, timeout: float = 60.0) -> int:
    """Start the virtual rack in its own session; return its pid once it says it is ready."""
    assert rig.run_dir is not None and rig.spec.virtual is not None
    rig.run_dir.mkdir(parents=True, exist_ok=True)
    if rig.spec.virtual.pki is not None:
        # the lab's CA admin work, done once: the rack's factory reads the root certificates
        from harness.pki import LabPki

        LabPki(rig.resolve(rig.spec.virtual.pki)).init()
    log_path = rig.run_dir / "vrack.log"
    cmd = [sys.executable, "-m", "vrack", "up", str(rig.path)]
    if owner_pid:
        cmd += ["--owner-pid", str(owner_pid)]
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    buf = b""
    try:
        while b"\n" not in buf:
            left = deadline - time.monotonic()
            if left <= 0:
                proc.kill()
                raise RackStartError(f"virtual rack for {rig.path} not ready after {timeout:.0f} s; "
                                     f"log {log_path}:\n{_tail(log_path)}")
            ready, _, _ = select.select([proc.stdout], [], [], left)
            if ready:
                chunk = os.read(proc.stdout.fileno(), 4096)
                if not chunk:
                    proc.wait(timeout=5)
                    raise RackStartError(f"virtual rack for {rig.path} exited with {proc.returncode} before it "
                                         f"was ready; log {log_path}:\n{_tail(log_path)}")
                buf += chunk
    finally:
        proc.stdout.close()
    line = buf.split(b"\n", 1)[0]
    try:
        if json.loads(line).get("status") != "ready":
            raise ValueError
    except ValueError:
        proc.kill()
        raise RackStartError(f"virtual rack said {line!r} instead of ready; log {log_path}") from None
    return proc.pid


def stop_rack(pid: int, timeout: float = 20.0) -> None:
    """SIGTERM, wait for it to clean up (carts, outputs, broker, ptys), SIGKILL if it will not."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    if not _wait_gone(pid, timeout):
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        _wait_gone(pid, 5.0)


def _wait_gone(pid: int, timeout: float) -> bool:
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        ready, _, _ = select.select([fd], [], [], timeout)
        if ready:
            try:
                os.waitpid(pid, os.WNOHANG)  # reap if it is our child
            except ChildProcessError:
                pass
        return bool(ready)
    finally:
        os.close(fd)


def _tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"
