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
    """The virtual rack did not come up. The first line of the message is the cause (the rack's own
    one-line error when it gave one); the log path follows."""


#: docs/interfaces.md "What the rack creates and refuses": a directory with this file is a rack run
#: dir; one without it is used only if it is empty or holds nothing but names of the rack's layout.
RUN_DIR_MARKER = ".vrack-run-dir"
RUN_DIR_NAMES = frozenset({RUN_DIR_MARKER, "rack.json", "rack.tmp", "vrack.log", ".rack.lock", "rack.owner",
                           "flash", "rtc", "state", "logs", "carts", "factory", "broker", "dev", "faults"})


def check_run_dir(rig: Rig) -> None:
    """Refuse (RackStartError, one line) a run dir the rack would not use: the harness writes the rack's
    log there, so it checks first rather than drop a file into somebody's directory."""
    d = rig.run_dir
    assert d is not None
    where = f"{rig.path}: virtual.run_dir: {d}"
    if os.path.lexists(d) and not d.is_dir():
        raise RackStartError(f"{where}: exists and is not a directory: refusing to touch it")
    if d.is_dir() and not (d / RUN_DIR_MARKER).is_file():
        try:
            foreign = sorted(set(os.listdir(d)) - RUN_DIR_NAMES)
        except OSError as exc:
            raise RackStartError(f"{where}: {exc.strerror or exc}") from None
        if foreign:
            raise RackStartError(f"{where}: holds {foreign[0]!r} and has no {RUN_DIR_MARKER}: not a rack run dir, "
                                 "refusing to write into it (use an empty or new directory)")


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
    check_run_dir(rig)
    rig.run_dir.mkdir(parents=True, exist_ok=True)
    if rig.spec.virtual.pki is not None:
        # the lab's CA admin work, done once: the rack's factory reads the root certificates. The PKI is
        # shared by every run (LabPki.init locks it); made here first, so two runs' first inits cannot
        # both find it missing and race to make it
        from harness.pki import LabPki

        pki_dir = rig.resolve(rig.spec.virtual.pki)
        pki_dir.mkdir(parents=True, mode=0o700, exist_ok=True)
        LabPki(pki_dir).init()
    log_path = rig.run_dir / "vrack.log"
    cmd = [sys.executable, "-m", "vrack", "up", str(rig.path)]
    if owner_pid:
        cmd += ["--owner-pid", str(owner_pid)]
    with open(log_path, "ab") as log:
        log_start = log.tell()
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
                    raise RackStartError(_exit_cause(rig, proc.returncode, log_path, log_start))
                buf += chunk
    except BaseException:  # a timeout, or Ctrl-C / SIGTERM while it starts: no half-started rack left behind
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        raise
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


def _exit_cause(rig: Rig, status: int, log_path: Path, log_start: int) -> str:
    """The message of a rack that exited before it was ready: its own one-line error first."""
    try:
        with open(log_path, "rb") as f:
            f.seek(log_start)
            lines = [x.strip() for x in f.read().decode(errors="replace").splitlines() if x.strip()]
    except OSError:
        lines = []
    said = [x for x in lines if x.startswith("vrack: ")]
    if status == 2 and said:  # a start-up error: one line, the rack's own words
        return f"{said[-1][len('vrack: '):]} (virtual rack exited with 2; log {log_path})"
    cause = lines[-1] if lines else f"virtual rack for {rig.path} exited with {status} and said nothing"
    return (f"{cause}\nvirtual rack for {rig.path} exited with {status} before it was ready; log {log_path}:\n"
            + "\n".join(lines[-15:]))


def _tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"
