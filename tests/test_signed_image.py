"""Signed images: the harness's PKI and signer, the device's verifier, the published vectors, fuzzing.

The harness builds and signs (harness.pki, harness.image); the device verifies with its own
code (vrack.ota_verify); both are held to tests/vectors/signed-v1/.
"""

from __future__ import annotations

import argparse
import ast
import datetime as dt
import hashlib
import json
import logging
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness import image as himage
from harness import pki
from vrack import factory, ota_verify
from vrack import image as vimage

ROOT = Path(__file__).resolve().parent.parent
VECTORS = ROOT / "tests" / "vectors" / "signed-v1"
V1_VECTORS = ROOT / "tests" / "vectors" / "image-v1"
NOW = himage.VECTOR_NOW
OLD_SIGNER = pki.signer_of(pki.ROOT_OLD)


def _doc() -> dict:
    return json.loads((VECTORS / "vectors.json").read_text())


def _root_pems() -> dict[str, str]:
    return {name: (VECTORS / f).read_text() for name, f in _doc()["roots"].items()}


def _verify_vector(entry: dict, data: bytes | None = None) -> ota_verify.Verdict:
    ctx = entry["context"]
    pems = _root_pems()
    return ota_verify.verify_update(
        (VECTORS / entry["file"]).read_bytes() if data is None else data,
        trust_store_pems={n: pems[n] for n in ctx["trust_store"]}, hardware_revision=ctx["hardware_revision"],
        running_version=ctx["running_version"], now=ctx["now"], security_counter=ctx["security_counter"],
        ca_until=ctx.get("ca_until"))


def _strict(data, **kw) -> ota_verify.Verdict:
    """The verifier without its catch-all: any exception other than a verdict fails the test."""
    args = dict(trust_store_pems=_root_pems(), hardware_revision="rev-c", running_version="1.4.2", now=NOW,
                security_counter=0)
    args.update(kw)
    verdict = ota_verify._verify(data, **args)
    assert isinstance(verdict, ota_verify.Verdict)
    base = verdict.reason.split(":", 1)[0]
    assert base in ota_verify.REASONS or verdict.reason == "ok", verdict.reason
    if base == "malformed":
        assert verdict.reason.split(": ", 1)[1] in ota_verify.MALFORMED_DETAILS, verdict.reason
    assert verdict.ok == (verdict.reason == "ok")
    return verdict


# --- the published vectors -----------------------------------------------------------------------


def test_vectors_are_generated_deterministically(tmp_path):
    doc = himage.write_test_vectors(tmp_path)
    assert doc == _doc()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in VECTORS.iterdir())
    for p in tmp_path.iterdir():
        assert p.read_bytes() == (VECTORS / p.name).read_bytes(), p.name


def test_vectors_cover_every_reason_and_defect():
    doc = _doc()
    assert doc["reasons"] == list(ota_verify.REASONS) == list(himage.REASONS)
    seen = {v["reason"].split(":", 1)[0] for v in doc["vectors"] if not v["ok"]}
    assert seen == set(ota_verify.REASONS)
    files = {v["file"] for v in doc["vectors"]}
    for required in ("valid.img", "unsigned.img", "untrusted-signer.img", "bad-signature.img", "payload-changed.img",
                     "manifest-changed.img", "wrong-hardware.img", "same-version.img", "lower-version.img",
                     "size-mismatch.img", "hash-mismatch.img", "truncated.img", "expired.img", "not-yet-valid.img",
                     "missing-ca.img", "no-codesigning-eku.img", "ca-retired.img", "signer-not-yet-valid.img",
                     "signer-expired.img"):
        assert required in files
    for v in doc["vectors"]:
        assert v["ok"] == (v["reason"] == "ok")
        assert set(v["context"]["trust_store"]) <= set(doc["roots"])
        assert set(v["context"].get("ca_until", {})) <= set(v["context"]["trust_store"])


@pytest.mark.parametrize("entry", _doc()["vectors"], ids=lambda e: e["file"])
def test_device_verifier_matches_vector(entry):
    data = (VECTORS / entry["file"]).read_bytes()
    assert len(data) == entry["size"] and hashlib.sha256(data).hexdigest() == entry["sha256"]
    verdict = _verify_vector(entry)
    assert (verdict.ok, verdict.reason) == (entry["ok"], entry["reason"])
    # the manifest is handed out only once it is authenticated
    late = ota_verify.REASONS.index("wrong hardware")
    authenticated = verdict.ok or ota_verify.REASONS.index(verdict.reason.split(":")[0]) >= late
    assert (verdict.manifest is not None) == authenticated
    assert _strict(data, trust_store_pems={n: _root_pems()[n] for n in entry["context"]["trust_store"]},
                   hardware_revision=entry["context"]["hardware_revision"],
                   running_version=entry["context"]["running_version"],
                   security_counter=entry["context"]["security_counter"],
                   ca_until=entry["context"].get("ca_until")) == verdict


_UNREADABLE = {"malformed: bad size", "malformed: bad magic", "malformed: bad tlv"}


@pytest.mark.parametrize("entry", _doc()["vectors"], ids=lambda e: e["file"])
def test_harness_reader_reads_vector(entry):
    data = (VECTORS / entry["file"]).read_bytes()
    if entry["reason"] in _UNREADABLE:
        with pytest.raises(himage.ImageFormatError):
            himage.parse_image(data)
        return
    parsed = himage.parse_image(data)
    assert parsed.payload.startswith(b"# signed-v1 test vector payload")
    if entry["ok"]:
        assert parsed.signed and parsed.hash_ok
        assert parsed.manifest == _verify_vector(entry).manifest
        assert parsed.version == parsed.manifest["firmware_version"]
        leaf, inter = parsed.certificates()
        assert leaf.issuer == inter.subject
        cn = inter.issuer.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value
        assert cn == parsed.manifest["required_ca"]
    if entry["reason"] == "unsigned":
        assert not parsed.signed


def test_signed_vectors_still_boot_on_a_v1_bootloader():
    """Signed TLVs live in the reserved range: the v1 bootloader skips them."""
    for entry in _doc()["vectors"]:
        if entry["ok"]:
            parsed, reason = vimage.check_image((VECTORS / entry["file"]).read_bytes())
            assert reason is None, entry["file"]
            assert parsed.version == "1.5.0"


def test_image_v1_vectors_through_the_signed_verifier():
    """Everything the bootloader refuses, the OTA verifier refuses for the same reason."""
    doc = json.loads((V1_VECTORS / "vectors.json").read_text())
    special = {"trailing-bytes.img": "malformed: trailing bytes",  # a download must be exactly the image
               "unknown-tlvs.img": "malformed: cert"}  # carries 64 zero bytes as a CERT TLV (0x0012)
    for entry in doc["vectors"]:
        verdict = _strict((V1_VECTORS / entry["file"]).read_bytes())
        if entry["file"] in special:
            want = special[entry["file"]]
        elif entry["verdict"] == "accept" or entry["reason"] == "hash mismatch":
            want = "unsigned"  # no manifest (the payload hash is checked after "unsigned")
        else:
            want = f"malformed: {entry['reason']}"
        assert verdict.reason == want, entry["file"]


# --- harness builds, device verifies -------------------------------------------------------------


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    lab = pki.LabPki(tmp_path_factory.mktemp("pki") / "pki")
    lab.init()
    return lab


def _build(lab, signer=OLD_SIGNER, payload=b"def main(hal):\n    pass\n", **kw):
    args = dict(version="1.5.0", hardware=["rev-c"], required_ca=lab.root_of(signer), issued=NOW - 60,
                expires=NOW + 86400, security_counter=3, signer_key=lab.key(signer), chain=lab.chain(signer))
    args.update(kw)
    return himage.build_signed_image(payload, **args)


def _check(lab, data, roots=pki.TRUSTED_ROOTS, **kw):
    args = dict(trust_store_pems=lab.trust_store(roots), hardware_revision="rev-c", running_version="1.4.2", now=NOW,
                security_counter=0)
    args.update(kw)
    return _strict(data, **args)


def test_lab_pki_signed_image_verifies_on_the_device(lab):
    verdict = _check(lab, _build(lab))
    assert verdict.ok and verdict.reason == "ok" and verdict.ca == pki.ROOT_OLD
    assert verdict.manifest["security_counter"] == 3
    new = _check(lab, _build(lab, pki.signer_of(pki.ROOT_NEW)))
    assert new.ok and new.ca == pki.ROOT_NEW


def test_lab_pki_negative_cases(lab):
    assert _check(lab, _build(lab, pki.signer_of(pki.ROGUE_ROOT), required_ca=pki.ROOT_OLD)).reason == \
        "untrusted signer"
    assert _check(lab, _build(lab, pki.signer_of(pki.ROOT_NEW)), roots=[pki.ROOT_OLD]).reason == "missing ca"
    assert _check(lab, _build(lab, required_ca=pki.ROOT_NEW)).reason == "untrusted signer"
    # an intermediate (a CA, no codeSigning) signing directly is not a signer
    inter = pki.intermediate_of(pki.ROOT_OLD)
    rogue_leaf = _build(lab, signer_key=lab.key(inter), chain=[lab.cert(inter)])
    assert _check(lab, rogue_leaf).reason == "untrusted signer"
    # the rogue root in a trust store under the required name is trusted: trust is the store's
    assert _check(lab, _build(lab, pki.signer_of(pki.ROGUE_ROOT), required_ca=pki.ROGUE_ROOT),
                  roots=[pki.ROGUE_ROOT]).ok


_TAMPER_REASONS = {
    "unsigned": "unsigned",
    "bad-signature": "bad signature",
    "payload-after-signing": "payload hash mismatch",
    "manifest-after-signing": "bad signature",
    "size-mismatch": "size mismatch",
    "hash-mismatch": "payload hash mismatch",
    "version-mismatch": "manifest mismatch",
    "no-certs": "untrusted signer",
    "truncated": "malformed: bad size",
}


@pytest.mark.parametrize("tamper", list(himage.TAMPERS))
def test_every_tamper_gives_its_reason(lab, tamper):
    assert _check(lab, _build(lab, tamper=tamper)).reason == _TAMPER_REASONS[tamper]


def test_policy_checks_and_boundaries(lab):
    img = _build(lab, version="1.5.0-rc.2")
    assert _check(lab, img).ok
    assert _check(lab, img, running_version="1.5.0-rc.10").reason == "lower version"
    assert _check(lab, img, running_version="1.5.0-rc.2").reason == "same version"
    assert _check(lab, img, running_version="1.5.0").reason == "lower version"
    assert _check(lab, img, hardware_revision="rev-a").reason == "wrong hardware"
    assert _check(lab, img, now=NOW - 60).ok  # issued is inclusive
    assert _check(lab, img, now=NOW - 61).reason == "not yet valid"
    assert _check(lab, img, now=NOW + 86399).ok
    assert _check(lab, img, now=NOW + 86400).reason == "expired"  # expires is exclusive
    assert _check(lab, img, security_counter=3).ok
    assert _check(lab, img, security_counter=4).reason == "security counter"
    # the chain is validated at `now`: outside the certificates' validity the signer is refused, and
    # the verdict says which way the clock is off
    assert _check(lab, img, now=int(pki.NOT_AFTER.timestamp())).reason == "expired"  # the manifest's
    assert _check(lab, img, now=int(pki.NOT_AFTER.timestamp()) + 1).reason == "signer expired"
    assert _check(lab, img, now=int(pki.NOT_BEFORE.timestamp()) - 1).reason == "signer not yet valid"


def test_retired_roots(lab):
    img = _build(lab)
    assert _check(lab, img, ca_until={pki.ROOT_OLD: NOW + 1}).ok
    assert _check(lab, img, ca_until={pki.ROOT_OLD: NOW}).reason == "ca retired"  # from `until` on
    assert _check(lab, img, ca_until={pki.ROOT_OLD: 0}).reason == "ca retired"
    assert _check(lab, img, ca_until={pki.ROOT_NEW: 0}).ok  # another root's retirement changes nothing
    # "missing ca" still comes first: a retired root that is not in the store is missing
    assert _check(lab, img, roots=[pki.ROOT_NEW], ca_until={pki.ROOT_OLD: 0}).reason == "missing ca"
    # a retirement that is not an epoch second is refused, not read as "never"
    for bad in ({pki.ROOT_OLD: "soon"}, {pki.ROOT_OLD: -1}, {pki.ROOT_OLD: True}, {pki.ROOT_OLD: 1.5}, [1], "x"):
        assert _check(lab, img, ca_until=bad).reason == "malformed: ca until", bad


def test_signer_validity_against_the_clock(lab):
    """issue_signer: a leaf valid for one window; the verdict says where `now` is against it."""
    key, chain = lab.issue_signer(pki.ROOT_OLD, NOW - 3600, NOW + 3600)
    img = _build(lab, signer_key=key, chain=chain, issued=NOW - 7200, expires=NOW + 7200)
    assert _check(lab, img).ok
    assert _check(lab, img, now=NOW - 3601).reason == "signer not yet valid"
    assert _check(lab, img, now=NOW - 3600).ok and _check(lab, img, now=NOW + 3600).ok  # inclusive both ends
    assert _check(lab, img, now=NOW + 3601).reason == "signer expired"
    # the leaf is not stored: the directory still has exactly the layout's files
    assert {p.stem for p in lab.dir.glob("*.pem")} == {s.name for s in pki.layout()}
    # a leaf outside its issuer's validity never validates: that is not the clock, it is the chain
    far = int(pki.NOT_AFTER.timestamp()) + 86400
    key, chain = lab.issue_signer(pki.ROOT_OLD, far, far + 3600)
    img = _build(lab, signer_key=key, chain=chain, issued=far, expires=far + 3600)
    assert _check(lab, img, now=far + 60).reason == "untrusted signer"
    assert _check(lab, img).reason == "untrusted signer"
    # a rogue-root leaf stays untrusted whatever the clock
    key, chain = lab.issue_signer(pki.ROGUE_ROOT, NOW + 3600, NOW + 7200)
    assert _check(lab, _build(lab, signer_key=key, chain=chain)).reason == "untrusted signer"


def test_issue_signer_refuses_bad_input(lab):
    with pytest.raises(pki.PkiError):
        lab.issue_signer(pki.signer_of(pki.ROOT_OLD), NOW, NOW + 1)
    with pytest.raises(pki.PkiError):
        lab.issue_signer("no-such-root", NOW, NOW + 1)
    for start, end in ((NOW, NOW), (NOW, NOW - 1), ("today", NOW), (NOW, -1),
                       (dt.datetime(2026, 1, 1), NOW)):  # naive datetime
        with pytest.raises(ValueError):
            lab.issue_signer(pki.ROOT_OLD, start, end)
    key, (leaf, inter) = lab.issue_signer(pki.ROOT_NEW, dt.datetime(2026, 1, 1, tzinfo=dt.UTC), NOW)
    assert leaf.not_valid_before_utc == dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    assert int(leaf.not_valid_after_utc.timestamp()) == NOW
    assert inter == lab.cert(pki.intermediate_of(pki.ROOT_NEW))
    assert list(leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.CODE_SIGNING]


def test_version_precedence():
    order = ["0.9.9", "1.4.2-alpha", "1.4.2-alpha.1", "1.4.2-beta", "1.4.2-rc.2", "1.4.2-rc.10", "1.4.2", "1.4.10",
             "1.10.0", "10.0.0"]
    keys = [ota_verify._version_key(v) for v in order]
    assert keys == sorted(keys) and len(set(keys)) == len(keys)
    assert ota_verify._version_key("1.4") is None and ota_verify._version_key(None) is None


def test_unusable_inputs_are_verdicts_not_exceptions(lab):
    img = _build(lab)
    assert ota_verify.verify_update(None, trust_store_pems={}, hardware_revision="rev-c", running_version="1.4.2",
                                    now=NOW).reason == "malformed: not bytes"
    assert _check(lab, img, trust_store_pems={pki.ROOT_OLD: ""}).reason == "missing ca"
    assert _check(lab, img, trust_store_pems={pki.ROOT_OLD: "-----BEGIN CERTIFICATE-----\nxx"}).reason == "missing ca"
    assert _check(lab, img, trust_store_pems=None).reason == "missing ca"
    assert _check(lab, img, running_version="garbage").reason == "malformed: running version"
    assert _check(lab, img, now=-5).reason == "malformed: now"
    assert _check(lab, img, now="today").reason == "malformed: now"
    assert _check(lab, bytearray(img)).ok and _check(lab, memoryview(img)).ok


def test_sign_a_factory_image(lab):
    unsigned = factory.build_image("1.5.0")
    signed = himage.sign_image(unsigned, hardware=["rev-c"], required_ca=pki.ROOT_OLD, issued=NOW - 60,
                               expires=NOW + 86400, security_counter=0,
                               signer_key=lab.key(pki.signer_of(pki.ROOT_OLD)),
                               chain=lab.chain(pki.signer_of(pki.ROOT_OLD)))
    assert _check(lab, signed).ok
    boot = vimage.parse_image(signed)
    assert boot.payload == vimage.parse_image(unsigned).payload and boot.build_info["family"] == "reference"
    assert signed == himage.sign_image(unsigned, hardware=["rev-c"], required_ca=pki.ROOT_OLD, issued=NOW - 60,
                                       expires=NOW + 86400, security_counter=0,
                                       signer_key=lab.key(pki.signer_of(pki.ROOT_OLD)),
                                       chain=lab.chain(pki.signer_of(pki.ROOT_OLD))), "signing is reproducible"
    with pytest.raises(himage.ImageFormatError):
        himage.sign_image(signed, hardware=["rev-c"], required_ca=pki.ROOT_OLD, issued=0, expires=1,
                          security_counter=0, signer_key=lab.key(pki.signer_of(pki.ROOT_OLD)),
                          chain=lab.chain(pki.signer_of(pki.ROOT_OLD)))


@pytest.mark.parametrize("bad", [dict(version="1.5"), dict(hardware=[]), dict(hardware="rev-c"),
                                 dict(required_ca=""), dict(issued=10, expires=10), dict(security_counter=-1),
                                 dict(tamper="nope"), dict(chain=[])])
def test_builder_refuses_what_a_device_would_refuse(lab, bad):
    with pytest.raises(ValueError):
        _build(lab, **bad)


def test_leaf_without_any_eku_is_untrusted(lab):
    certs, keys = himage.vector_pki()
    spec = pki.CertSpec("plain-leaf", "signer", pki.intermediate_of(pki.ROOT_OLD), ())
    inter = pki.intermediate_of(pki.ROOT_OLD)
    leaf = pki.issue(spec, keys[inter].public_key(), issuer_key=keys[inter], issuer_cert=certs[inter])
    with pytest.raises(x509.ExtensionNotFound):
        leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage)
    img = _build(lab, signer_key=keys[inter], chain=[leaf, certs[inter]])
    pems = {pki.ROOT_OLD: certs[pki.ROOT_OLD].public_bytes(serialization.Encoding.PEM).decode()}
    assert _strict(img, trust_store_pems=pems).reason == "untrusted signer"
    # the same leaf with codeSigning is fine: the EKU is what made the difference
    good = pki.CertSpec("plain-leaf", "signer", inter, (ExtendedKeyUsageOID.CODE_SIGNING,))
    leaf = pki.issue(good, keys[inter].public_key(), issuer_key=keys[inter], issuer_cert=certs[inter])
    assert _strict(_build(lab, signer_key=keys[inter], chain=[leaf, certs[inter]]), trust_store_pems=pems).ok


# --- fuzzing: no input of any size raises ---------------------------------------------------------

VALID = (VECTORS / "valid.img").read_bytes()


def _unauthenticated_bytes(data: bytes) -> set[int]:
    """Offsets a v1 reader ignores or that no signature covers: reserved header bytes, TLV
    flags, the (informational) BUILD_INFO TLV's type and value, and one byte of each cert."""
    parsed = himage.parse_image(data)
    free = set(range(16, 32))
    pos = himage.HEADER_SIZE + len(parsed.payload)
    for type_, _flags, value in parsed.tlvs:
        free |= {pos + 2, pos + 3}
        if type_ == himage.TLV_BUILD_INFO:  # its type too: turned into an unknown TLV, it is skipped
            free |= {pos, pos + 1} | set(range(pos + 8, pos + 8 + len(value)))
        if type_ == himage.TLV_CERT:
            # the unused-bits byte of the certificate's signature BIT STRING: with a zero last bit,
            # 0 -> 1 is still valid DER and cryptography reads the same signature over the same
            # TBS bytes: the certificate's outer encoding is malleable, its signed content is not
            sig = x509.load_der_x509_certificate(value).signature
            free.add(pos + 8 + len(value) - len(sig) - 1)
        pos += 8 + len(value)
    return free


def test_every_truncation_is_rejected():
    for n in range(len(VALID)):
        assert _strict(VALID[:n]).reason.startswith("malformed: "), n


def test_every_single_bit_flip_is_rejected_or_harmless():
    free = _unauthenticated_bytes(VALID)
    for i in range(len(VALID)):
        for bit in range(8):
            flipped = bytearray(VALID)
            flipped[i] ^= 1 << bit
            verdict = _strict(bytes(flipped))
            if i not in free:
                assert not verdict.ok, (i, bit)


@settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=4096))
def test_random_bytes(data):
    assert not _strict(data).ok
    assert not _strict(b"CIMG" + data).ok


@settings(max_examples=300, deadline=None, database=None)
@given(st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255)), min_size=1, max_size=8),
       st.integers(0, len(VALID)))
def test_mutations_of_a_valid_image(edits, cut):
    data = bytearray(VALID)
    for i, b in edits:
        data[i] = b
    _strict(bytes(data))
    _strict(bytes(data[:cut]))


_JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
                     lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                     max_leaves=12)


@settings(max_examples=200, deadline=None, database=None)
@given(st.sampled_from(ota_verify.MANIFEST_FIELDS), _JSON)
def test_signed_manifest_fields_of_any_type(field, value):
    """A correctly signed manifest with one field of any JSON value: a verdict, never a crash."""
    certs, keys = himage.vector_pki()
    signer = pki.signer_of(pki.ROOT_OLD)
    parsed = himage.parse_image(VALID)
    manifest = dict(parsed.manifest, **{field: value})
    raw = himage.canonical_json(manifest)
    img = himage.assemble(parsed.payload, [
        (himage.TLV_FW_VERSION, b"1.5.0"), (himage.TLV_PAYLOAD_SHA256, parsed.payload_sha256),
        (himage.TLV_MANIFEST, raw), (himage.TLV_SIGNATURE, himage.sign_manifest(raw, keys[signer])),
        *[(himage.TLV_CERT, d) for d in parsed.cert_ders]])
    verdict = _strict(img)
    if value == parsed.manifest[field] and type(value) is type(parsed.manifest[field]):
        assert verdict.ok


@settings(max_examples=200, deadline=None, database=None)
@given(st.lists(st.tuples(st.sampled_from([0x0001, 0x0002, 0x0003, 0x0010, 0x0011, 0x0012, 0x0013, 0x7F00]),
                          st.binary(max_size=300)), max_size=8),
       st.binary(min_size=1, max_size=64))
def test_random_tlvs(tlvs, payload):
    _strict(himage.assemble(payload, tlvs))


def test_huge_sizes_and_many_certs():
    hdr = himage.HEADER.pack(b"CIMG", 1, 32, 0xFFFFFFFF, 0xFFFFFFFF, bytes(16))
    assert _strict(hdr + b"x" * 100).reason == "malformed: bad size"
    parsed = himage.parse_image(VALID)
    tlvs = [(t, v) for t, _, v in parsed.tlvs]
    many = himage.assemble(parsed.payload, tlvs + [(himage.TLV_CERT, parsed.cert_ders[1])] * 3)
    assert _strict(many).reason == "malformed: too many certs"
    big = himage.assemble(parsed.payload, tlvs + [(himage.TLV_CERT, b"\x30" * 5000)])
    assert _strict(big).reason == "malformed: cert size"
    deep = himage.assemble(parsed.payload, [(t, v) for t, _, v in parsed.tlvs if t != himage.TLV_MANIFEST]
                           + [(himage.TLV_MANIFEST, b"[" * 2000 + b"]" * 2000)])
    assert _strict(deep).reason == "malformed: manifest not json"


# --- the lab PKI on disk ---------------------------------------------------------------------------


def test_pki_init_layout_modes_and_idempotence(tmp_path):
    old_umask = os.umask(0)  # the key mode must not depend on the umask
    try:
        lab = pki.LabPki(tmp_path / "pki")
        status = lab.init()
    finally:
        os.umask(old_umask)
    names = [s.name for s in pki.layout()]
    assert set(status) == set(names) and set(status.values()) == {"created"}
    for name in names:
        assert stat.S_IMODE((tmp_path / "pki" / f"{name}.key").stat().st_mode) == 0o600, name
        assert (tmp_path / "pki" / f"{name}.pem").read_text().startswith("-----BEGIN CERTIFICATE-----")
    assert {p.name for p in (tmp_path / "pki").iterdir()} == {f"{n}.{e}" for n in names for e in ("key", "pem")} | {
        ".lock"}
    before = {p.name: p.read_bytes() for p in (tmp_path / "pki").iterdir()}
    assert set(lab.init().values()) == {"kept"}
    assert before == {p.name: p.read_bytes() for p in (tmp_path / "pki").iterdir()}
    # a lost intermediate key: that intermediate and its signer are reissued, the roots kept
    (tmp_path / "pki" / "lab-root-2026-int.key").unlink()
    again = lab.init()
    assert again["lab-root-2026-int"] == "reissued" and again["lab-root-2026-signer"] == "reissued"
    assert again["lab-root-2026"] == "kept" and again["lab-root-2025-signer"] == "kept"
    assert again["lab-root-2026-time"] == "reissued"
    leaf, inter = lab.chain("lab-root-2026-signer")
    leaf.verify_directly_issued_by(inter)
    inter.verify_directly_issued_by(lab.cert("lab-root-2026"))
    lab.chain("lab-root-2026-time")[0].verify_directly_issued_by(inter)


def test_pki_init_adds_the_time_leaves_to_an_older_directory(tmp_path):
    d = tmp_path / "pki"
    older = pki.LabPki(d, specs=[s for s in pki.layout() if s.kind != "time"])  # the layout before time leaves
    assert set(older.init().values()) == {"created"}
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    status = pki.LabPki(d).init()
    added = {pki.time_signer_of(r) for r in pki.ROOTS}
    assert {n for n, what in status.items() if what == "created"} == added
    assert {n for n, what in status.items() if what == "kept"} == set(status) - added
    assert all(d.joinpath(name).read_bytes() == data for name, data in before.items())  # nothing else touched
    for root in pki.ROOTS:
        leaf, inter = pki.LabPki(d).chain(pki.time_signer_of(root))
        leaf.verify_directly_issued_by(inter)
        assert stat.S_IMODE((d / f"{pki.time_signer_of(root)}.key").stat().st_mode) == 0o600
    assert set(pki.LabPki(d).init().values()) == {"kept"}


def test_pki_certificates(lab):
    for root in pki.ROOTS:
        for name, usage in ((pki.signer_of(root), ExtendedKeyUsageOID.CODE_SIGNING),
                            (pki.time_signer_of(root), ExtendedKeyUsageOID.TIME_STAMPING)):
            leaf, inter = lab.chain(name)
            assert lab.root_of(leaf.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value) == root
            eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
            assert list(eku) == [usage]
            assert leaf.extensions.get_extension_for_class(x509.KeyUsage).value.digital_signature
            assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
            assert inter.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
            assert inter == lab.cert(pki.intermediate_of(root))
        assert lab.root_pem(root).startswith("-----BEGIN CERTIFICATE-----")
    with pytest.raises(pki.PkiError):
        lab.root_pem(pki.signer_of(pki.ROOT_OLD))
    with pytest.raises(pki.PkiError):
        lab.cert("../etc/passwd")


def test_loose_key_permissions_are_refused(tmp_path):
    lab = pki.LabPki(tmp_path / "pki")
    lab.init()
    path = lab.key_path(pki.signer_of(pki.ROOT_OLD))
    for mode in (0o644, 0o640, 0o604, 0o660):
        os.chmod(path, mode)
        with pytest.raises(pki.KeyPermissionError) as err:
            lab.key(pki.signer_of(pki.ROOT_OLD))
        assert str(path) in str(err.value) and f"{mode:04o}" in str(err.value)
        assert "PRIVATE KEY" not in str(err.value)
        with pytest.raises(pki.KeyPermissionError):
            lab.init()
    os.chmod(path, 0o600)
    assert lab.key(pki.signer_of(pki.ROOT_OLD)) is not None
    assert set(lab.init().values()) == {"kept"}


def _secrets(directory: Path) -> list[str]:
    """Strings that would betray a private key: PEM lines and the private value in dec and hex."""
    out = []
    for p in directory.glob("*.key"):
        text = p.read_text()
        out += [line for line in text.splitlines() if line and not line.startswith("-----")]
        value = pki.load_key_file(p).private_numbers().private_value
        out += [str(value), f"{value:x}", f"{value:X}"]
    return out


def test_hil_pki_never_prints_a_private_key(tmp_path, capsys, caplog):
    caplog.set_level(logging.DEBUG)
    ap = argparse.ArgumentParser(prog="hil")
    pki.add_cli(ap.add_subparsers(dest="cmd", required=True))
    d = tmp_path / "pki"
    outputs = []
    for argv in (["pki", "init", "--dir", str(d)], ["pki", "init", "--dir", str(d)], ["pki", "show", "--dir", str(d)]):
        a = ap.parse_args(argv)
        assert a.fn(a) == 0
        cap = capsys.readouterr()
        outputs += [cap.out, cap.err]
    assert "lab-root-2025-signer" in outputs[4] and "key=0600" in outputs[4]
    time_rows = [line for line in outputs[4].splitlines() if line.startswith("lab-root-2026-time ")]
    assert len(time_rows) == 1 and " time " in time_rows[0] and "eku=timeStamping" in time_rows[0], outputs[4]
    os.chmod(d / "rogue-root.key", 0o644)
    a = ap.parse_args(["pki", "init", "--dir", str(d)])
    assert a.fn(a) == 2
    cap = capsys.readouterr()
    assert "rogue-root.key" in cap.err and "0644" in cap.err
    outputs += [cap.out, cap.err]
    a = ap.parse_args(["pki", "show", "--dir", str(d)])
    assert a.fn(a) == 1  # a loose key is flagged
    cap = capsys.readouterr()
    outputs += [cap.out, cap.err]
    os.chmod(d / "rogue-root.key", 0o600)
    proc = subprocess.run([sys.executable, "-m", "harness.pki", "show", "--dir", str(d)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    outputs += [proc.stdout, proc.stderr, caplog.text]
    blob = "\n".join(outputs)
    assert "PRIVATE KEY" not in blob
    for secret in _secrets(d):
        assert secret not in blob


# --- the sides stay apart ------------------------------------------------------------------------------


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    mods = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            mods |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            mods.add(node.module.split(".")[0])
    return mods


def test_harness_and_device_code_do_not_import_each_other():
    assert "vrack" not in (_imports(ROOT / "harness" / "pki.py") | _imports(ROOT / "harness" / "image.py")
                           | _imports(ROOT / "harness" / "fleet" / "timesvc.py"))
    # the verifier can be carried by a firmware payload: standard library and cryptography only
    device = _imports(ROOT / "vrack" / "ota_verify.py")
    assert not device & {"vrack", "harness"}
    assert device - set(sys.stdlib_module_names) == {"cryptography"}


def test_pki_init_from_parallel_processes(tmp_path):
    d = tmp_path / "pki"
    procs = [subprocess.Popen([sys.executable, "-m", "harness.pki", "init", "--dir", str(d)], cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for _ in range(4)]
    for p in procs:
        assert p.wait(timeout=120) == 0, p.stderr.read()
        p.stderr.close()
    lab = pki.LabPki(d)
    for spec in pki.layout():
        pub = lab.key(spec.name).public_key().public_bytes(serialization.Encoding.DER,
                                                           serialization.PublicFormat.SubjectPublicKeyInfo)
        assert lab.cert(spec.name).public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo) == pub, spec.name
    assert set(lab.init().values()) == {"kept"}
