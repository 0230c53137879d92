"""Image format v1: the published vectors, the builder, and parsers that never crash."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import pytest

from vrack import factory, image
from vrack.firmware import reference

VECTORS = Path(__file__).parent / "vectors" / "image-v1"


def _vector_doc() -> dict:
    return json.loads((VECTORS / "vectors.json").read_text())


def _firmware_verdict(data: bytes) -> tuple[str | None, str | None]:
    try:
        return reference.parse_image(data)["version"], None
    except reference.ImageInvalid as exc:
        return None, exc.reason


def test_vectors_are_generated_deterministically(tmp_path):
    doc = image.write_test_vectors(tmp_path)
    assert doc == _vector_doc()
    for entry in doc["vectors"]:
        assert (tmp_path / entry["file"]).read_bytes() == (VECTORS / entry["file"]).read_bytes(), entry["file"]


def test_vectors_cover_every_reason_and_accepts():
    doc = _vector_doc()
    reasons = {v["reason"] for v in doc["vectors"] if v["verdict"] == "reject"}
    assert reasons == set(image.REASONS)
    assert sum(v["verdict"] == "accept" for v in doc["vectors"]) >= 4


@pytest.mark.parametrize("entry", _vector_doc()["vectors"], ids=lambda e: e["file"])
def test_bootloader_parser_matches_vector(entry):
    data = (VECTORS / entry["file"]).read_bytes()
    assert hashlib.sha256(data).hexdigest() == entry["sha256"]
    parsed, reason = image.check_image(data)
    if entry["verdict"] == "accept":
        assert reason is None
        assert parsed.version == entry["version"]
    else:
        assert parsed is None
        assert reason == entry["reason"]


@pytest.mark.parametrize("entry", _vector_doc()["vectors"], ids=lambda e: e["file"])
def test_firmware_parser_matches_vector(entry):
    version, reason = _firmware_verdict((VECTORS / entry["file"]).read_bytes())
    assert (version, reason) == (entry["version"], entry["reason"])


def test_factory_image_layout_and_determinism():
    img = factory.build_image("1.4.2")
    assert img == factory.build_image("1.4.2")
    parsed = image.parse_image(img)
    assert parsed.version == "1.4.2"
    assert len(parsed.payload) == factory.DEFAULT_PAYLOAD_SIZE == 196608
    assert parsed.build_info["family"] == "reference"
    assert parsed.build_info["version"] == "1.4.2"
    assert parsed.build_info["faults"] == {}
    assert img[:4] == b"CIMG" and img[4:8] == b"\x01\x00\x20\x00"
    source = parsed.payload.decode("utf-8")
    assert "FW_VERSION = '1.4.2'\n" in source and "FAULTS = {}\n" in source
    compile(parsed.payload, "payload", "exec")
    assert reference.parse_image(img)["version"] == "1.4.2"


def test_fault_build_and_sizes():
    faulty = image.parse_image(factory.build_image("1.5.0", faults={"crash_on_sensor": "lidar-tfmini"}, size=131072))
    assert len(faulty.payload) == 131072
    assert faulty.build_info["faults"] == {"crash_on_sensor": "lidar-tfmini"}
    assert "FAULTS = {'crash_on_sensor': 'lidar-tfmini'}" in faulty.payload.decode()
    with pytest.raises(ValueError, match="unknown fault"):
        factory.build_image("1.5.0", faults={"crash_at_sensor": "x"})
    with pytest.raises(ValueError, match="wants a bool"):
        factory.build_image("1.5.0", faults={"never_mark_good": "maybe"})
    flagged = image.parse_image(factory.build_image("1.5.0", faults={"never_mark_good": "1", "self_test_fail": "no"}))
    assert flagged.build_info["faults"] == {"never_mark_good": True}
    with pytest.raises(ValueError, match="more than the payload size"):
        factory.build_image("1.5.0", size=1024)
    with pytest.raises(image.ImageError):
        factory.build_image("1.5")


def test_extra_tlvs_are_carried_and_skipped():
    extra = [(0x0010, b"manifest"), (0x0011, b"sig")]
    img = image.build_image(b"def main(hal):\n    pass\n", "2.0.0", extra_tlvs=extra)
    parsed = image.parse_image(img)
    assert parsed.tlv(0x0010) == b"manifest" and parsed.tlv(0x0011) == b"sig"
    assert reference.parse_image(img)["version"] == "2.0.0"


def _assert_parsers_survive(data: bytes) -> None:
    parsed, reason = image.check_image(data)
    assert (parsed is None) != (reason is None)
    assert reason is None or reason in image.REASONS
    version, fw_reason = _firmware_verdict(data)
    assert fw_reason == reason
    assert version == (parsed.version if parsed else None)


def test_parsers_survive_mutations_and_truncations():
    valid = (VECTORS / "valid.img").read_bytes()
    rng = random.Random(1234)
    for _ in range(3000):
        data = bytearray(valid)
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(len(data))
            data[i] = rng.randrange(256)
        if rng.random() < 0.3:
            data = data[: rng.randrange(len(data) + 1)]
        _assert_parsers_survive(bytes(data))
    for n in range(len(valid) + 1):
        _assert_parsers_survive(valid[:n])


def test_parsers_survive_arbitrary_bytes():
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies
    valid = (VECTORS / "valid.img").read_bytes()

    @hypothesis.settings(max_examples=400, deadline=None)
    @hypothesis.given(st.one_of(
        st.binary(max_size=512),
        st.builds(lambda head, tail: image.MAGIC + head + tail, st.binary(max_size=40), st.binary(max_size=300)),
        st.builds(lambda cut, junk: valid[:cut] + junk, st.integers(0, len(valid)), st.binary(max_size=64)),
    ))
    def check(data):
        _assert_parsers_survive(data)

    check()
