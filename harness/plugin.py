"""The cart-hil pytest plugin (registered through the `pytest11` entry point).

Options: ``--rig PATH`` (default: the virtual rig), ``--cart ID`` and ``--tag TAG`` to select carts,
``--lock-wait S``. A run on a virtual rig gets a private copy of it: its own rack on free ports in
``<run dir>/rack``, started and stopped by the plugin; a physical rig, or a virtual rig named with
``--rig`` whose rack is already up, is shared: the run locks the slots it uses (docs/interfaces.md,
"Isolated runs").

Fixtures: ``rig`` (the validated rig, rack up), ``bench`` (supplies and consoles held by this
process), ``cart`` (one cart, parametrized over the selected slots; test ids are config ids).
Each test gets its own console slice, attached to its report and its Allure result, and the
cart is put in safe state (output off) after it. Under pytest-xdist every cart's tests go
to one worker (``--dist loadgroup`` with one group per cart).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import NoReturn

import pytest

from harness.config import ConfigError, Rig

DEFAULT_RIG = "rigs/virtual.yaml"


def pytest_addoption(parser: pytest.Parser) -> None:
    g = parser.getgroup("cart-hil", "cart-hil hardware-in-the-loop")
    g.addoption("--rig", default=None, help=f"rig file (default: {DEFAULT_RIG} under the rootdir)")
    g.addoption("--cart", action="append", default=[], metavar="ID", help="run on this cart (repeatable)")
    g.addoption("--tag", action="append", default=[], metavar="TAG", help="run on carts with this tag (repeatable)")
    g.addoption("--hil-reports", default=None, metavar="DIR",
                help="where runs write consoles and results (default: reports/ under the rootdir)")
    g.addoption("--hil-run-dir", default=None, metavar="DIR",
                help="this run's own directory (its name is the run id); default <reports>/runs/<new run id>. "
                     "`hil gate` passes reports/<run-id>")
    g.addoption("--lock-wait", type=float, default=0.0, metavar="S",
                help="a slot of a shared rig (physical, or a virtual rack kept up) that another run holds: wait up "
                     "to S seconds for it, then refuse naming the holder (default 0: refuse at once)")
    g.addoption("--hil-firmware", default=None, metavar="IMAGE",
                help="the release candidate: a firmware image (a build, unsigned; a signed one's payload is gated)")
    g.addoption("--hil-build", default=None, metavar="VERSION",
                help="the release candidate: this version, made by the rig's firmware.build command "
                     "(default: the reference firmware's next release, one minor above the newest field version)")
    g.addoption("--sweep", default=os.environ.get("HIL_SWEEP", "reduced"), choices=("quick", "reduced", "full"),
                help="power-cut sweep (test_suites/test_power_cut.py): 'quick' (every boot-control write), "
                     "'reduced' (the gate: every 5th event, every write of a two-copy store, 2 random cuts) or "
                     "'full' (every event, 10 random cuts); default $HIL_SWEEP or reduced")


def _is_worker(config: pytest.Config) -> bool:
    return hasattr(config, "workerinput")


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "xdist_group(name): keep tests of one cart on one worker")
    config.addinivalue_line("markers", "hil_full: a scenario the full gate runs and `hil gate --quick` leaves out")
    config.addinivalue_line("markers", "hil_self_check(build): a check of the gate itself — the seeded fault build "
                                       "`build` must be caught (for its own reason). Runs on the first selected cart "
                                       "of each hardware revision; `hil gate --self-check` runs these alone, the "
                                       "per-release gate leaves them out")
    root = Path(config.rootpath)
    rig_opt = config.getoption("--rig")
    rig_path = Path(rig_opt) if rig_opt else root / DEFAULT_RIG
    if _is_worker(config):
        wi = config.workerinput
        run_id, run_dir = wi["hil_run_id"], Path(wi["hil_run_dir"])
        owner = int(wi["hil_owner_pid"])
        mode = wi["hil_rig_mode"]
        # a worker re-parses the command line and would not know the controller chose loadgroup
        if wi.get("hil_loadgroup"):
            config.option.loadgroup = True
    else:
        explicit = config.getoption("--hil-run-dir")
        if explicit:
            run_dir = Path(explicit).absolute()
            run_id = run_dir.name
        else:
            run_id = new_run_id()
            # (absolute: builds run in the rig's dir)
            reports = Path(config.getoption("--hil-reports") or root / "reports").absolute()
            run_dir = reports / "runs" / run_id
        owner = os.getpid()
        mode = PRIVATE  # until the named rig is read (below): shared if it is physical or its rack is up
        # every slot's tests on one worker: group by cart
        if getattr(config.option, "dist", "no") == "load":
            config.option.dist = "loadgroup"
    state = HilState(config, rig_path, run_id, run_dir, owner, mode)
    config.stash[STATE] = state
    if rig_opt:  # an explicitly named rig (and the selection on it) is validated before anything runs
        try:
            state.selected()
        except ConfigError as exc:
            _abort(config, str(exc))
    if not _is_worker(config):
        if not getattr(config.option, "help", False):
            _check_reports(config, run_dir)
        config.pluginmanager.register(ResultWriter(state), "cart-hil-results")
        if rig_opt and not getattr(config.option, "help", False) and not config.option.collectonly:
            from harness.isolation import SlotLockError

            try:  # before any instrument is opened, before any worker starts
                state.claim_rig(config.getoption("--lock-wait"))
            except SlotLockError as exc:
                _abort(config, str(exc))


def new_run_id(prefix: str = "") -> str:
    """A run id: sortable by start time, unique across runs started in the same second."""
    return prefix + time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]


def _abort(config: pytest.Config, message: str) -> NoReturn:
    """End the whole run now with one line and exit status 2 (a rig or rack that cannot be used,
    reports that cannot be written). In an xdist worker the line goes to the controller, which
    ends the run with it (see pytest_testnodedown): a worker's own exit would only say "crashed"."""
    line = "hil: " + (message.splitlines() or [""])[0]
    if _is_worker(config):
        config.workeroutput["hil_abort"] = line
    pytest.exit(line, returncode=2)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error) -> None:  # xdist hook, controller side
    line = getattr(node, "workeroutput", {}).get("hil_abort")
    if line:
        pytest.exit(line, returncode=2)


def dir_write_problem(d: Path, min_free: int = 1 << 20) -> str | None:
    """Why files cannot be written in directory `d` (made if missing), or None: the directory
    cannot be made or written, or its file system has less than `min_free` bytes left."""
    try:
        if d.exists() and not d.is_dir():
            return os.strerror(errno.ENOTDIR)
        d.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".hil-write-check-", dir=d)
        try:
            os.write(fd, b"x")
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as exc:
        return exc.strerror or str(exc)
    try:
        fs = os.statvfs(d)
    except OSError:
        return None
    free = fs.f_bavail * fs.f_frsize
    if fs.f_blocks and free < min_free:  # (a pseudo file system reports no blocks at all)
        return f"only {free // 1024} KiB free on its file system"
    return None


def _check_reports(config: pytest.Config, run_dir: Path) -> None:
    """Before anything runs: every place this run writes reports to can be written."""
    targets = [(f"the run's results and consoles in {run_dir}", run_dir)]
    xml = getattr(config.option, "xmlpath", None)
    if xml:  # junitxml writes it at the very end: an error then would lose the whole run's report
        xml_path = Path(os.path.abspath(os.path.expanduser(os.path.expandvars(xml))))
        targets.append((f"--junitxml {xml_path}", xml_path.parent))
    allure = getattr(config.option, "allure_report_dir", None)
    if allure:
        d = Path(os.path.abspath(os.path.expanduser(allure)))
        targets.append((f"--alluredir {d}", d))
    for what, d in targets:
        why = dir_write_problem(d)
        if why:
            _abort(config, f"cannot write {what}: {why}")


def pytest_configure_node(node) -> None:  # xdist hook, controller side
    st: HilState = node.config.stash[STATE]
    node.workerinput["hil_run_id"] = st.run_id
    node.workerinput["hil_run_dir"] = str(st.run_dir)
    node.workerinput["hil_owner_pid"] = str(st.owner_pid)
    node.workerinput["hil_rig_mode"] = st.mode
    node.workerinput["hil_loadgroup"] = node.config.getoption("dist", "no") == "loadgroup"


def pytest_xdist_make_scheduler(config, log):  # xdist hook, controller side
    """Every cart's tests on one worker, in collection order: a cart is one bench, one console.

    (xdist's own loadgroup keys on a nodeid suffix that pytest 9 no longer lets it add.)"""
    if config.getoption("dist", "no") not in ("load", "loadgroup"):
        return None
    from xdist.scheduler import LoadScopeScheduling

    st: HilState = config.stash[STATE]
    try:
        cart_ids = sorted((s.cart_id for s in st.rig.slots), key=len, reverse=True)
    except ConfigError:
        return None

    class CartScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            params = nodeid[nodeid.find("[") + 1 : nodeid.rfind("]")] if "[" in nodeid else ""
            for cid in cart_ids:
                if params == cid or params.startswith(cid + "-") or params.endswith("-" + cid) \
                        or f"-{cid}-" in params:
                    return f"cart:{cid}"
            return nodeid

    return CartScheduling(config, log)


def pytest_unconfigure(config: pytest.Config) -> None:
    st: HilState | None = config.stash.get(STATE, None)
    if st is not None and not _is_worker(config):
        try:
            st.stop_rack_if_ours()
        finally:
            st.release_slots()


PRIVATE, SHARED = "private", "shared"  # how a run uses its rig (HilState.mode)


class HilState:
    """What the processes of one run share: the rig the user named, the run's id and directory, and
    how the run uses the rig (docs/interfaces.md, "Isolated runs"):

    - PRIVATE (a virtual rig): the run's own copy, `<run dir>/rig.yaml`, its rack in `<run dir>/rack`
      on free ports, started by the first process of the run that needs it and stopped by the controller
      at the end (and by itself when the controller dies: it watches the controller's pid);
    - SHARED (a physical rig, or a virtual rig named with --rig whose rack somebody keeps up): the rig as
      named, its selected slots locked by the controller for the whole run (harness.isolation.SlotLocks).

    `rig` is the rig as the user named it (selection, scheduling; its errors name the user's file);
    `ensure_rack()` gives the rig the run's tests use."""

    def __init__(self, config, rig_path: Path, run_id: str, run_dir: Path, owner_pid: int, mode: str = PRIVATE):
        self.config = config
        self.rig_path = rig_path
        self.run_id = run_id
        self.run_dir = run_dir
        self.owner_pid = owner_pid
        self.mode = mode
        self._rig: Rig | None = None
        self._run_rig: Rig | None = None
        self._locks = None  # harness.isolation.SlotLocks held by the controller of a SHARED run
        self.unusable: str | None = None  # why the rig cannot be used, found while collecting

    @property
    def rig(self) -> Rig:
        if self._rig is None:
            self._rig = Rig.load(self.rig_path)
        return self._rig

    def selected(self):
        return self.rig.select(self.config.getoption("--cart"), self.config.getoption("--tag"))

    def claim_rig(self, lock_wait: float) -> None:
        """Controller, a rig named with --rig: PRIVATE for a virtual rig whose rack is not up; else SHARED,
        and the selected slots locked (waiting up to `lock_wait` s for a busy one; SlotLockError)."""
        from harness.isolation import SlotLocks
        from harness.rackctl import rack_state

        rig = self.rig
        if rig.is_virtual and rack_state(rig) is None:
            return
        self.mode = SHARED
        locks = SlotLocks(rig, self.selected(), run_id=self.run_id)
        locks.acquire(lock_wait, announce=lambda line: print(f"hil: {line}", file=sys.stderr, flush=True))
        self._locks = locks

    def release_slots(self) -> None:
        if self._locks is not None:
            self._locks.release()
            self._locks = None

    @property
    def rack_dir(self) -> Path:
        """The run's private rack dir (PRIVATE on a virtual rig)."""
        from harness.isolation import PRIVATE_RACK_DIR

        return self.run_dir / PRIVATE_RACK_DIR

    def ensure_rack(self) -> Rig:
        """The rig this run's tests use, its rack up. PRIVATE: the run's copy of the virtual rig, whose rack
        the first process of the run to get here starts (under a lock in the run's rack dir; the others
        then load the copy it wrote). SHARED: the rig as named (a shared virtual rack must still be up)."""
        from harness.rackctl import RackStartError, rack_state

        user = self.rig
        if self.mode == SHARED:
            if user.is_virtual and rack_state(user) is None:
                raise RackStartError(f"{user.path}: virtual.run_dir: the rack this run shares in {user.run_dir} "
                                     "is no longer up")
            return user
        if not user.is_virtual:
            raise ConfigError(f"{user.path}: kind: physical: name a physical rig with --rig (a run locks the "
                              "slots it uses)")
        if self._run_rig is None:
            try:
                self._run_rig = self._private_rack(user)
            except OSError as exc:  # the run's rack dir cannot be made or locked
                raise RackStartError(f"{user.path}: cannot use this run's rack dir {self.rack_dir}: "
                                     f"{exc.strerror or exc}") from None
        return self._run_rig

    def _private_rack(self, user: Rig) -> Rig:
        import fcntl

        from harness.isolation import PRIVATE_RIG_FILE, start_private_rack
        from harness.rackctl import RackStartError, rack_state

        self.rack_dir.mkdir(parents=True, exist_ok=True)
        with open(self.rack_dir / ".rack.lock", "w") as lk:
            fcntl.flock(lk, fcntl.LOCK_EX)
            rig_file = self.run_dir / PRIVATE_RIG_FILE
            if rig_file.exists():
                private = Rig.load(rig_file)
                live = rack_state(private)
                if live is not None:
                    if self._rack_owner().get("owner_pid") != self.owner_pid:
                        raise RackStartError(f"{self.run_dir}: holds the private rack of another run (pid "
                                             f"{live['pid']}): give each run its own run dir (--hil-run-dir)")
                    return private
            private, pid = start_private_rack(user, self.run_dir, owner_pid=self.owner_pid, note=f"run {self.run_id}")
            (self.rack_dir / "rack.owner").write_text(json.dumps({"pid": pid, "run_id": self.run_id,
                                                                   "owner_pid": self.owner_pid}))
            return private

    def _rack_owner(self) -> dict:
        try:
            owner = json.loads((self.rack_dir / "rack.owner").read_text())
        except (OSError, ValueError):
            return {}
        return owner if isinstance(owner, dict) else {}

    def stop_rack_if_ours(self) -> None:
        """Stop the run's private rack, if a process of this run started one (whichever it was)."""
        owner = self._rack_owner()
        if owner.get("run_id") == self.run_id and owner.get("owner_pid") == self.owner_pid:
            from harness.rackctl import stop_rack

            stop_rack(int(owner["pid"]))
            (self.rack_dir / "rack.owner").unlink(missing_ok=True)


STATE = pytest.StashKey[HilState]()


# ------------------------------------------------------------------ parametrization


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "cart" not in metafunc.fixturenames:
        return
    st: HilState = metafunc.config.stash[STATE]
    try:
        slots = st.selected()
    except ConfigError as exc:  # ended once collection is done (an exit in here is just a collection error)
        st.unusable = st.unusable or str(exc)
        slots = []
    if metafunc.definition.get_closest_marker("hil_self_check") is not None:
        # a check of the gate (a fault build must be caught) depends on the firmware, not on the sensor set:
        # one cart per hardware revision is enough, and the release's own tests still run on every cart
        firsts: dict[str, object] = {}
        for s in slots:
            firsts.setdefault(s.cart.hardware_revision, s)
        slots = list(firsts.values())
    # one xdist group per cart: under loadgroup all of a cart's tests run on one worker, in order
    params = [pytest.param(s.cart_id, id=s.cart_id, marks=pytest.mark.xdist_group(s.cart_id)) for s in slots]
    metafunc.parametrize("cart", params, indirect=True)


def pytest_collection_finish(session: pytest.Session) -> None:
    st: HilState | None = session.config.stash.get(STATE, None)
    if st is not None and st.unusable:
        _abort(session.config, st.unusable)


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="session")
def rig(request: pytest.FixtureRequest) -> Rig:
    from harness.rackctl import RackStartError

    st: HilState = request.config.stash[STATE]
    try:
        r = st.ensure_rack()  # a virtual rig: the run's private copy (or a shared rack that is up)
        r.preflight()
    except (ConfigError, RackStartError) as exc:
        _abort(request.config, str(exc))
    return r


@pytest.fixture(scope="session")
def bench(rig: Rig, request: pytest.FixtureRequest):
    from harness.cart import Bench

    st: HilState = request.config.stash[STATE]
    b = Bench(rig, st.run_dir / "consoles")
    yield b
    b.close()


@pytest.fixture
def cart(request: pytest.FixtureRequest, bench):
    """One cart of the rig, its console slice recorded for this test, safe state afterwards."""
    c = bench.cart(request.param)
    if c.quarantine_reason is not None:
        # The cause was reported once, by the test during which it happened: the cart's later tests are
        # not run, and say why in one line (a skip: the gate counts it as no pass).
        pytest.skip(f"not run: {c.id} was quarantined during {c.quarantined_in or 'an earlier test'}: "
                    f"{c.quarantine_reason}")
    c.test = request.node.nodeid
    start = c.console.mark()
    request.node.stash[CART_KEY] = (c, start)
    yield c
    try:
        c.safe_state()
    finally:
        _attach_console(request.node, c, start)
        if c.console.log_error:  # the console log could not be written: this run keeps no evidence
            _abort(request.config, f"{c.console.log_error} — run stopped")


CART_KEY = pytest.StashKey[tuple]()
_DRIFTED: set[str] = set()  # carts whose clock this process has set to their configured drift


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_call(item: pytest.Item) -> None:
    """The configuration's RTC error, as deployed (`clock.drift_s`), set on each cart once per session before
    the first test body that has the cart: a drift of 0 too, since a clock an earlier run left skewed must not
    stay so. After the test's fixtures, so one that skips the test (a rig that cannot inject flash faults)
    leaves the cart untouched; a cart that cannot boot fails the test that first needs it."""
    got = item.stash.get(CART_KEY, None)
    if got is None or got[0].id in _DRIFTED:
        return
    c = got[0]
    _DRIFTED.add(c.id)
    c.power_on()
    c.apply_drift()
    c.power_off()


@pytest.fixture(scope="session")
def lab_pki(rig: Rig):
    """The lab PKI (roots, intermediates, code-signing leaves); created if missing."""
    from harness.ota import open_lab_pki

    return open_lab_pki(rig)


@pytest.fixture(scope="session")
def fleet(rig: Rig, request: pytest.FixtureRequest):
    """This process's fleet services: MQTT on the rig's broker, jobs, image host, telemetry."""
    from harness.ota import Fleet

    st: HilState = request.config.stash[STATE]
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0")[2:] or 0)
    f = Fleet(rig, st.run_dir / "fleet", worker=worker)
    yield f
    try:
        f.telemetry.write(st.run_dir / "fleet" / f"telemetry-{os.getpid()}.json")
    finally:
        f.close()


@pytest.fixture(scope="session")
def firmware_builds(rig: Rig, request: pytest.FixtureRequest):
    """Firmware images by version and fault set, made by the rig's build command (cached per run)."""
    from harness.ota import FirmwareBuilds

    st: HilState = request.config.stash[STATE]
    return FirmwareBuilds(rig, st.run_dir / "firmware")


@pytest.fixture(scope="session")
def candidate(rig: Rig, firmware_builds, request: pytest.FixtureRequest):
    """The release candidate the gate judges (harness.candidate): `--hil-firmware IMAGE`, `--hil-build
    VERSION`, or the reference firmware's next release. Refused (the run ends, one line) if it is not
    above every selected cart's field versions."""
    from harness import candidate as hc
    from harness.ota import FirmwareBuildError

    st: HilState = request.config.stash[STATE]
    slots = st.selected()
    field = {s.cart_id: s.cart.firmware.versions_in_field for s in slots}
    path, version = request.config.getoption("--hil-firmware"), request.config.getoption("--hil-build")
    try:
        if path:
            c = hc.from_file(Path(path))
        else:
            c = hc.from_build(firmware_builds, version or hc.default_version([v for vs in field.values() for v in vs]))
        hc.check_above_field(c, field)
    except (ConfigError, FirmwareBuildError) as exc:
        _abort(request.config, str(exc))
    return c


def _record_update(node: pytest.Item):
    """Every update of a test, as the verdict reports it (harness.report): the version the cart ran before
    the first one, and per update the version sent, the SHA-256 of the image sent and the rollbacks the
    bootloader counted during it."""
    def record(out, image: bytes | None) -> None:
        props = node.user_properties
        if not any(k == "firmware_from" for k, _ in props):
            props.append(("firmware_from", out.before.slots.get(out.before.booted, {}).get("fw", "?")))
        props.append(("firmware_to", out.target_version))
        props.append(("image_sha256", hashlib.sha256(image).hexdigest() if image is not None else "-"))
        if out.before.rollbacks is not None and out.after.rollbacks is not None:
            props.append(("rollbacks", out.after.rollbacks - out.before.rollbacks))
    return record


@pytest.fixture
def ota(cart, fleet, firmware_builds, lab_pki, rig: Rig, request: pytest.FixtureRequest):
    """The OTA steps on this test's cart: `ota.image(version, faults=..., tamper=...)`, `ota.update(image)`."""
    from harness.ota import CartOta, Signer, release_hardware

    steps = CartOta(cart, fleet, firmware_builds, Signer(lab_pki), release_hardware(rig))
    steps.on_outcome = _record_update(request.node)
    yield steps
    steps.close()  # a run the test left open (a deferred job): its execution canceled
    fleet.time.set_mode(cart.id, "normal")  # a test that made the time service misbehave for this cart
    hidden = steps.hidden_rollbacks()
    if hidden:  # job status said success while the cart went back: never a pass, checked or not
        pytest.fail("job SUCCEEDED but the cart rolled back:\n" + "\n".join(o.describe() for o in hidden),
                    pytrace=False)


class SelfCheck:
    """What a self-check of the gate records: the reason the gate gave when it caught the fault build."""

    def __init__(self, node: pytest.Item):
        self.node = node

    def caught(self, reason: object) -> None:
        line = (str(reason).splitlines() or [""])[0][:300]
        self.node.user_properties.append(("caught", line))


@pytest.fixture
def self_check(request: pytest.FixtureRequest) -> SelfCheck:
    """`self_check.caught(exc)`: the reason the gate gave for a seeded fault build (its first line goes to
    the JUnit XML, where `hil gate --self-check` reads it)."""
    return SelfCheck(request.node)


@pytest.fixture
def factory_reset(ota, cart, fleet):
    """The cart as shipped after the test, whatever it did: factory firmware in slot A, the factory trust
    store, the device state erased (security counter and time floor back to zero). For tests that raise
    the counter, move the server time on, change the trust store or leave a fault build running — each
    would change what every later test on the cart finds."""
    from harness.recovery import recover_factory

    yield
    fleet.time.set_mode(cart.id, "normal")
    recover_factory(cart)


@pytest.fixture
def flash_faults(cart, rig: Rig):
    """This test's cart's flash faults, through the rack's control interface (harness.flashfaults):
    `flash_faults.set(erase_fail=[flash_faults.inactive_page(k)])`. Starts with none and clears them
    afterwards, before the cart is put in safe state. A rig without a control interface (a lab rig:
    nobody makes a real part fail on request) cannot inject flash faults: the test is skipped, saying so."""
    from harness.flashfaults import RackControl

    control = RackControl.for_rig(rig)
    if control is None:
        pytest.skip(f"{rig.path}: rig {rig.name} cannot inject flash faults (no rack control interface)")
    faults = control.cart(cart)
    faults.clear()
    yield faults
    faults.clear()


def _attach_console(item: pytest.Item, cart, start: int) -> None:
    text = cart.console.slice_text(start)
    item.add_report_section("call", f"console {cart.id}", text)
    try:
        import allure

        allure.attach(text, name=f"console {cart.id}", attachment_type=allure.attachment_type.TEXT)
    except Exception:
        pass


# ------------------------------------------------------------------ results as they happen


class ResultWriter:
    """One JSON line per test outcome, appended the moment it is known, so a killed run still
    leaves its results. Registered in the controller only (xdist workers report to it).

    A line that cannot be written (disk full, file system gone read-only) ends the run at once
    with one line and the verdict so far: a gate whose results are lost has no verdict."""

    def __init__(self, state: HilState):
        self.state = state
        self.path = state.run_dir / "results.jsonl"
        self.counts: Counter[str] = Counter()

    def _tally(self, report: pytest.TestReport) -> None:
        xfail = hasattr(report, "wasxfail")
        if report.failed:
            self.counts["failed" if report.when == "call" else "error"] += 1
        elif report.skipped:
            self.counts["xfailed" if xfail else "skipped"] += 1
        elif report.when == "call":
            self.counts["xpassed" if xfail else "passed"] += 1

    def verdict(self) -> str:
        order = ("passed", "failed", "error", "skipped", "xfailed", "xpassed")
        return ", ".join(f"{self.counts[k]} {k}" for k in order if self.counts[k]) or "no test finished"

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self._tally(report)
        if report.when != "call" and report.outcome == "passed":
            return
        if report.when == "teardown" and report.outcome == "skipped":
            return
        props = dict(report.user_properties)
        rec = {"run_id": self.state.run_id, "test": report.nodeid, "cart": props.get("cart"),
               "when": report.when, "outcome": report.outcome, "duration_s": round(report.duration, 3),
               "t": round(time.time(), 3)}
        if report.failed and report.longrepr:
            rec["reason"] = str(getattr(report.longrepr, "reprcrash", None) or report.longrepr).splitlines()[-1][:500]
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as f:
                f.write(json.dumps(rec) + "\n")
        except OSError as exc:
            _abort(self.state.config, f"cannot write {self.path}: {exc.strerror or exc} — run stopped; "
                                      f"so far {self.verdict()}")


def pytest_runtest_setup(item: pytest.Item) -> None:
    cs = getattr(item, "callspec", None)
    if cs is not None and "cart" in cs.params:
        item.user_properties.append(("cart", cs.params["cart"]))
    check = item.get_closest_marker("hil_self_check")
    if check is not None and check.args:
        item.user_properties.append(("fault_build", str(check.args[0])))
