"""`hil rollout check`: a release some configuration of the fleet cannot take is refused before it is
rolled out, naming each such configuration and what it lacks; unreadable input is one line, exit 2."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from harness import image as himage
from harness import pki
from harness.cli import main
from harness.config import ConfigError, Rig
from harness.rollout import Configuration, preflight, rollout_plan

ROOT = Path(__file__).resolve().parent.parent
CARTS = ROOT / "configs" / "carts"
ALL_HW = ["rev-b", "rev-c", "rev-d", "rev-e"]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    p = pki.LabPki(tmp_path_factory.mktemp("pki"))
    p.init()
    return p


@pytest.fixture
def release(lab, tmp_path):
    """release(ca=..., hardware=..., counter=...) -> path of a signed image file."""
    def make(ca: str = pki.ROOT_OLD, hardware=ALL_HW, counter: int = 0, **kw) -> Path:
        now = int(time.time())
        data = himage.build_signed_image(b"# rollout test payload\n", version="1.6.0", hardware=list(hardware),
                                         required_ca=ca, issued=now - 60, expires=now + 86400,
                                         security_counter=counter, signer_key=lab.key(pki.signer_of(ca)),
                                         chain=lab.chain(pki.signer_of(ca)), **kw)
        path = tmp_path / f"release-{ca}-{'-'.join(hardware)}-{counter}{'-' + kw['tamper'] if kw else ''}.img"
        path.write_bytes(data)
        return path
    return make


def check(capsys, image: Path, fleet: Path) -> tuple[int, list[str], list[str]]:
    rc = main(["rollout", "check", str(image), "--fleet", str(fleet)])
    out, err = capsys.readouterr()
    return rc, out.splitlines(), err.splitlines()


def inventory(tmp_path: Path, configurations) -> Path:
    p = tmp_path / "inventory.yaml"
    p.write_text(yaml.safe_dump({"configurations": configurations}, sort_keys=False))
    return p


def test_image_for_the_old_root_is_refused_naming_the_carts_with_only_the_new_one(capsys, release):
    rc, out, err = check(capsys, release(pki.ROOT_OLD), CARTS)
    assert rc == 1 and err == []
    assert out[:-1] == ["REFUSED cart-08: lacks CA lab-root-2025 (has lab-root-2026)",
                        "REFUSED cart-10: lacks CA lab-root-2025 (has lab-root-2026)"]
    assert out[-1].startswith("REFUSED: 2 of 10 configurations cannot take 1.6.0") and "cart-08, cart-10" in out[-1]


def test_image_for_the_new_root_is_refused_naming_the_carts_with_only_the_old_one(capsys, release):
    rc, out, _ = check(capsys, release(pki.ROOT_NEW), CARTS)
    assert rc == 1
    assert [x.split(":")[0] for x in out[:-1]] == [f"REFUSED cart-0{i}" for i in range(1, 6)]
    assert all("lacks CA lab-root-2026" in x for x in out[:-1])
    assert out[-1].startswith("REFUSED: 5 of 10")


def test_a_rig_file_is_an_inventory_of_its_slots(capsys, release):
    image = release(pki.ROOT_OLD)
    rc, out, _ = check(capsys, image, ROOT / "rigs" / "virtual.yaml")
    assert rc == 1 and [x.split(":")[0] for x in out[:-1]] == ["REFUSED cart-08", "REFUSED cart-10"]
    # the gate's API takes the loaded rig
    verdict = preflight(image.read_bytes(), Rig.load(ROOT / "rigs" / "virtual.yaml"))
    assert not verdict.ok and [r.configuration for r in verdict.refused] == ["cart-08", "cart-10"]


def test_wrong_hardware_is_named(capsys, release):
    rc, out, _ = check(capsys, release(pki.ROOT_OLD, hardware=["rev-b", "rev-c"]), CARTS)
    assert rc == 1
    refused = {x.split(":")[0].split()[1]: x for x in out[:-1]}
    assert sorted(refused) == ["cart-06", "cart-07", "cart-08", "cart-09", "cart-10"]
    assert "hardware rev-d is not among the image's (rev-b, rev-c)" in refused["cart-06"]
    assert "lacks CA lab-root-2025" in refused["cart-08"] and "hardware rev-d" in refused["cart-08"]


def test_security_counter_above_the_images_is_refused(capsys, release, tmp_path):
    fleet = inventory(tmp_path, [
        {"id": "field-a", "hardware_revision": "rev-c", "cas": ["lab-root-2025"], "security_counter": 3},
        {"id": "field-b", "hardware_revision": "rev-c", "cas": ["lab-root-2025", "lab-root-2026"]},
    ])
    rc, out, _ = check(capsys, release(counter=2), fleet)
    assert rc == 1 and out[:-1] == ["REFUSED field-a: security counter 3 is above the image's 2"]
    rc, out, _ = check(capsys, release(counter=3), fleet)
    assert rc == 0 and out == [f"OK: all 2 configurations can take 1.6.0 (lab-root-2025, security counter 3, "
                               f"hardware {', '.join(ALL_HW)})"]


def test_every_configuration_suited_is_one_ok_line(capsys, release, tmp_path):
    fleet = inventory(tmp_path, [{"id": "c", "hardware_revision": "rev-e", "cas": ["lab-root-2026"]}])
    rc, out, err = check(capsys, release(pki.ROOT_NEW), fleet)
    assert rc == 0 and len(out) == 1 and out[0].startswith("OK: all 1 configurations") and err == []


def test_api_takes_configurations(release):
    image = release(pki.ROOT_NEW).read_bytes()
    verdict = preflight(image, [Configuration("x", "rev-c", ("lab-root-2025",), 0)])
    assert not verdict.ok and verdict.refused[0].lacks == ("lacks CA lab-root-2026 (has lab-root-2025)",)


def _one_line_refusal(capsys, argv) -> str:
    rc = main(argv)
    out, err = capsys.readouterr()
    assert rc == 2 and out == "", (rc, out, err)
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("hil: ") and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize(("configurations", "says"), [
    ([{"id": "a", "hardware_revision": "rev-c", "cas": []}], "configuration a: cas: List should have at least 1"),
    ([{"id": "a", "hardware_revision": "rev-c", "cas": ["lab-root-2025"], "security_counter": -1}],
     "configuration a: security_counter: Input should be greater than or equal to 0"),
    ([{"id": "a", "hardware_revision": "rev-c", "cas": ["lab-root-2025"], "colour": "red"}],
     "configuration a: colour: unknown field"),
    ([{"id": "a", "cas": ["lab-root-2025"]}], "configuration a: hardware_revision: missing"),
    ([{"id": "Bad Id", "hardware_revision": "rev-c", "cas": ["x"]}], "configuration #1: id: 'Bad Id' is not an id"),
    ([{"id": "a", "hardware_revision": "rev-c", "cas": ["x"]}] * 2, "configurations: id 'a' is listed twice"),
    ([], "configurations: List should have at least 1"),
])
def test_bad_inventory_is_one_line_naming_file_and_field(capsys, release, tmp_path, configurations, says):
    fleet = inventory(tmp_path, configurations)
    line = _one_line_refusal(capsys, ["rollout", "check", str(release()), "--fleet", str(fleet)])
    assert line.startswith(f"hil: {fleet}: ") and says in line, line


def test_unreadable_inputs_are_one_line(capsys, release, tmp_path):
    image = release()
    empty = tmp_path / "empty"
    empty.mkdir()
    other = tmp_path / "other.yaml"
    other.write_text("name: x\n")
    junk = tmp_path / "junk.img"
    junk.write_bytes(b"not an image at all, not even the magic")
    unsigned = release(tamper="unsigned")
    cases = [
        ([str(tmp_path / "missing.img"), "--fleet", str(CARTS)], f"{tmp_path / 'missing.img'}: cannot read"),
        ([str(tmp_path), "--fleet", str(CARTS)], "not a regular file"),
        ([str(junk), "--fleet", str(CARTS)], f"{junk}: not an image: magic"),
        ([str(unsigned), "--fleet", str(CARTS)], f"{unsigned}: no manifest: the image is not signed"),
        ([str(image), "--fleet", str(tmp_path / "none.yaml")], "none.yaml: cannot read"),
        ([str(image), "--fleet", str(empty)], f"{empty}: no cart configurations"),
        ([str(image), "--fleet", str(other)], f"{other}: not an inventory (configurations:), a rig (slots:)"),
    ]
    for args, says in cases:
        line = _one_line_refusal(capsys, ["rollout", "check", *args])
        assert says in line, (args, line)


def test_api_raises_a_config_error_for_unreadable_input(release, tmp_path):
    with pytest.raises(ConfigError, match="image: not an image"):
        preflight(b"\x00" * 64, CARTS)
    with pytest.raises(ConfigError, match="no cart configurations"):
        preflight(release().read_bytes(), tmp_path)


def test_the_command_exits_with_its_status_and_no_traceback(release, tmp_path):
    """The real process: exit 1 for a refusal, 2 for unreadable input, one line on stderr."""
    def run(*args):
        return subprocess.run([sys.executable, "-m", "harness.cli", "rollout", "check", *args],
                              capture_output=True, text=True, cwd=ROOT, timeout=60)
    refused = run(str(release()), "--fleet", str(CARTS))
    assert refused.returncode == 1 and refused.stderr == "" and "REFUSED cart-08" in refused.stdout
    bad = run(str(tmp_path / "missing.img"), "--fleet", str(CARTS))
    assert bad.returncode == 2 and bad.stdout == "" and len(bad.stderr.splitlines()) == 1, bad.stderr


def test_rollout_plan_names_a_configuration_no_signing_reaches(release):
    """The gate's preflight: the release signed under each root; a configuration none reaches is the
    CA-rotation deadlock (it holds only a root no release is signed under)."""
    images = {ca: release(ca).read_bytes() for ca in (pki.ROOT_OLD, pki.ROOT_NEW)}
    fleet = [Configuration("old-only", "rev-c", (pki.ROOT_OLD,)), Configuration("new-only", "rev-c", (pki.ROOT_NEW,)),
             Configuration("both", "rev-c", (pki.ROOT_OLD, pki.ROOT_NEW)),
             Configuration("stranded", "rev-c", (pki.ROOT_NEXT,))]
    verdicts, unreachable = rollout_plan(images, fleet)
    assert unreachable == ["stranded"]
    assert [r.configuration for r in verdicts[pki.ROOT_OLD].refused] == ["new-only", "stranded"]
    assert [r.configuration for r in verdicts[pki.ROOT_NEW].refused] == ["old-only", "stranded"]
    assert rollout_plan(images, fleet[:3])[1] == []
