"""Trust bundles (CA updates): the harness's writer (harness.image.build_trust_bundle), the device's
verifier (vrack.ota_verify.verify_trust_bundle), the published vectors in tests/vectors/trust-v1/, fuzzing.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness import image as himage
from harness import pki
from vrack import ota_verify

ROOT = Path(__file__).resolve().parent.parent
VECTORS = ROOT / "tests" / "vectors" / "trust-v1"
NOW = himage.VECTOR_NOW
OLD_SIGNER = pki.signer_of(pki.ROOT_OLD)


def _doc() -> dict:
    return json.loads((VECTORS / "vectors.json").read_text())


def _root_pems() -> dict[str, str]:
    return {name: (VECTORS / f).read_text() for name, f in _doc()["roots"].items()}


def _strict(data, **kw) -> ota_verify.BundleVerdict:
    """The verifier without its catch-all (any exception fails the test), its verdict checked for shape."""
    args = dict(trust_store_pems={pki.ROOT_OLD: _root_pems()[pki.ROOT_OLD]}, now=NOW)
    args.update(kw)
    verdict = ota_verify._verify_bundle(data, **args)
    assert isinstance(verdict, ota_verify.BundleVerdict)
    base = verdict.reason.split(":", 1)[0]
    assert base in ota_verify.BUNDLE_REASONS or verdict.reason == "ok", verdict.reason
    if base == "malformed":
        assert verdict.reason.split(": ", 1)[1] in ota_verify.MALFORMED_DETAILS, verdict.reason
    assert verdict.ok == (verdict.reason == "ok")
    # the body is handed out only once its signature has verified
    authenticated = verdict.ok or ota_verify.BUNDLE_REASONS.index(base) > ota_verify.BUNDLE_REASONS.index(
        "bad signature")
    assert (verdict.body is not None) == (verdict.ca is not None) == authenticated
    return verdict


def _context(entry: dict) -> dict:
    ctx = entry["context"]
    pems = _root_pems()
    return dict(trust_store_pems={n: pems[n] for n in ctx["trust_store"]}, ca_until=ctx.get("ca_until"),
                now=ctx["now"])


# --- the published vectors -----------------------------------------------------------------------


def test_vectors_are_generated_deterministically(tmp_path):
    doc = himage.write_trust_vectors(tmp_path)
    assert doc == _doc()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in VECTORS.iterdir())
    for p in tmp_path.iterdir():
        assert p.read_bytes() == (VECTORS / p.name).read_bytes(), p.name


def test_vectors_cover_every_reason():
    doc = _doc()
    assert doc["format"] == "cart-trust-bundle-v1"
    assert doc["reasons"] == list(ota_verify.BUNDLE_REASONS) == list(himage.BUNDLE_REASONS)
    assert {v["reason"].split(":", 1)[0] for v in doc["vectors"] if not v["ok"]} == set(ota_verify.BUNDLE_REASONS)
    for v in doc["vectors"]:
        assert v["ok"] == (v["reason"] == "ok")
        assert set(v["context"]["trust_store"]) <= set(doc["roots"])
    assert himage.BUNDLE_MAX == ota_verify.BUNDLE_MAX and himage.OVERLAP_MAX == ota_verify.OVERLAP_MAX


@pytest.mark.parametrize("entry", _doc()["vectors"], ids=lambda e: e["file"])
def test_device_verifier_matches_vector(entry):
    data = (VECTORS / entry["file"]).read_bytes()
    assert len(data) == entry["size"] and hashlib.sha256(data).hexdigest() == entry["sha256"]
    verdict = ota_verify.verify_trust_bundle(data, **_context(entry))
    assert (verdict.ok, verdict.reason) == (entry["ok"], entry["reason"])
    assert _strict(data, **_context(entry)) == verdict
    if verdict.ok:
        assert verdict.ca == verdict.body["required_ca"]
        assert [a["name"] for a in verdict.body["add"]]


# --- harness builds, device verifies --------------------------------------------------------------


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    lab = pki.LabPki(tmp_path_factory.mktemp("pki") / "pki")
    lab.init()
    return lab


def _bundle(lab, add=None, signer=OLD_SIGNER, **kw):
    args = dict(required_ca=lab.root_of(signer), issued=NOW - 60, expires=NOW + 86400, overlap_s=7776000,
                signer_key=lab.key(signer), chain=lab.chain(signer))
    args.update(kw)
    return himage.build_trust_bundle({pki.ROOT_NEW: lab.root_pem(pki.ROOT_NEW)} if add is None else add, **args)


def _check(lab, data, roots=(pki.ROOT_OLD,), **kw):
    args = dict(trust_store_pems=lab.trust_store(roots), now=NOW)
    args.update(kw)
    return _strict(data, **args)


def test_lab_pki_bundle_verifies_on_the_device(lab):
    data = _bundle(lab)
    verdict = _check(lab, data)
    assert verdict.ok and verdict.ca == pki.ROOT_OLD
    assert verdict.body == {"add": [{"name": pki.ROOT_NEW, "pem": lab.root_pem(pki.ROOT_NEW)}], "expires": NOW + 86400,
                            "format": 1, "issued": NOW - 60, "overlap_s": 7776000, "required_ca": pki.ROOT_OLD}
    assert json.loads(data)["kind"] == "cart-trust-bundle"
    assert data == _bundle(lab), "bundles are deterministic"
    both = _bundle(lab, {pki.ROOT_OLD: lab.root_pem(pki.ROOT_OLD), pki.ROOT_NEW: lab.root_pem(pki.ROOT_NEW)})
    assert [a["name"] for a in _check(lab, both).body["add"]] == [pki.ROOT_OLD, pki.ROOT_NEW]


def test_lab_pki_negative_cases(lab):
    data = _bundle(lab)
    assert _check(lab, data, now=NOW - 60).ok and _check(lab, data, now=NOW + 86399).ok
    assert _check(lab, data, now=NOW - 61).reason == "not yet valid"
    assert _check(lab, data, now=NOW + 86400).reason == "expired"
    assert _check(lab, data, roots=[pki.ROOT_NEW]).reason == "missing ca"
    assert _check(lab, data, ca_until={pki.ROOT_OLD: NOW}).reason == "ca retired"
    assert _check(lab, data, ca_until={pki.ROOT_OLD: NOW + 1}).ok
    assert _check(lab, _bundle(lab, signer=pki.signer_of(pki.ROGUE_ROOT), required_ca=pki.ROOT_OLD)).reason == \
        "untrusted signer"
    assert _check(lab, _bundle(lab, signer=pki.time_signer_of(pki.ROOT_OLD))).reason == "untrusted signer"
    assert _check(lab, _bundle(lab, required_ca=pki.ROOT_NEW), roots=pki.TRUSTED_ROOTS).reason == \
        "untrusted signer"
    # the signer's own validity against the server's time
    key, chain = lab.issue_signer(pki.ROOT_OLD, NOW + 3600, NOW + 7200)
    assert _check(lab, _bundle(lab, signer_key=key, chain=chain)).reason == "signer not yet valid"
    key, chain = lab.issue_signer(pki.ROOT_OLD, NOW - 7200, NOW - 3600)
    assert _check(lab, _bundle(lab, signer_key=key, chain=chain)).reason == "signer expired"
    # what may be added: a self-signed P-256 CA with keyCertSign, valid now
    for name in (pki.intermediate_of(pki.ROOT_NEW), pki.signer_of(pki.ROOT_NEW), pki.time_signer_of(pki.ROOT_NEW)):
        pem = lab.cert(name).public_bytes(serialization.Encoding.PEM).decode()
        assert _check(lab, _bundle(lab, {"x": pem})).reason == "not a ca", name
    assert _check(lab, data, now=int(pki.NOT_AFTER.timestamp()) + 1).reason == "signer expired"


def _root(name: str, key, *, ca=True, cert_sign=True, not_after=pki.NOT_AFTER) -> str:
    subject = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, name)])
    ku = x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                       data_encipherment=False, key_agreement=False, key_cert_sign=cert_sign, crl_sign=cert_sign,
                       encipher_only=False, decipher_only=False)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(1).not_valid_before(pki.NOT_BEFORE).not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            .add_extension(ku, critical=True).sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def test_what_counts_as_a_root(lab):
    key = ec.generate_private_key(ec.SECP256R1())
    assert _check(lab, _bundle(lab, {"mine": _root("mine", key)})).ok
    assert _check(lab, _bundle(lab, {"mine": _root("mine", key, ca=False)})).reason == "not a ca"
    assert _check(lab, _bundle(lab, {"mine": _root("mine", key, cert_sign=False)})).reason == "not a ca"
    expired = _root("mine", key, not_after=dt.datetime.fromtimestamp(NOW - 1, dt.UTC))
    assert _check(lab, _bundle(lab, {"mine": expired})).reason == "not a ca"
    assert _check(lab, _bundle(lab, {"mine": _root("mine", ec.generate_private_key(ec.SECP384R1()))})).reason == \
        "not a ca"
    # self-issued in name only: signed by another key
    other = ec.generate_private_key(ec.SECP256R1())
    forged = x509.load_pem_x509_certificate(_root("mine", other).encode())
    spoof = (x509.CertificateBuilder().subject_name(forged.subject).issuer_name(forged.subject)
             .public_key(key.public_key()).serial_number(2).not_valid_before(pki.NOT_BEFORE)
             .not_valid_after(pki.NOT_AFTER).add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
             .add_extension(forged.extensions.get_extension_for_class(x509.KeyUsage).value, True)
             .sign(other, hashes.SHA256()))
    assert _check(lab, _bundle(lab, {"mine": spoof.public_bytes(serialization.Encoding.PEM).decode()})).reason == \
        "not a ca"


@pytest.mark.parametrize("bad", [
    dict(add={}), dict(add={"a": "x", "b": "y", "c": "z"}), dict(add={"../x": "pem"}), dict(add={"x": ""}),
    dict(add={"x": 5}), dict(add={"x": "é"}), dict(add=[("x", "pem")]), dict(required_ca=""),
    dict(issued=10, expires=10), dict(issued=-1), dict(expires=2**63), dict(overlap_s=-1),
    dict(overlap_s=315360001), dict(overlap_s=1.5), dict(chain=[]), dict(chain="leaf"),
    dict(signer_key=ec.generate_private_key(ec.SECP384R1()))])
def test_writer_refuses_what_a_device_would_refuse(lab, bad):
    with pytest.raises(ValueError):
        _bundle(lab, **bad)


# --- fuzzing: no input raises ------------------------------------------------------------------------

VALID = (VECTORS / "valid.json").read_bytes()


def _meaning(data: bytes):
    """What a bundle says, up to encodings that carry no meaning (see test_time_answer._meaning)."""
    obj = json.loads(data)
    certs = [x509.load_der_x509_certificate(base64.b64decode(c)) for c in obj["chain"]]
    return (base64.b64decode(obj["body"]), base64.b64decode(obj["signature"]),
            [(c.tbs_certificate_bytes, c.signature) for c in certs])


def test_every_truncation_is_rejected():
    assert _strict(VALID).ok
    for n in range(len(VALID)):
        assert _strict(VALID[:n]).reason.startswith("malformed: "), n


def test_every_single_bit_flip_is_rejected_or_means_the_same():
    meaning = _meaning(VALID)
    for i in range(len(VALID)):
        for bit in range(8):
            flipped = bytearray(VALID)
            flipped[i] ^= 1 << bit
            if _strict(bytes(flipped)).ok:
                assert _meaning(bytes(flipped)) == meaning, (i, bit)


@settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=17000))
def test_random_bytes(data):
    assert not _strict(data).ok
    assert not _strict(b'{"format":1,' + data).ok


@settings(max_examples=300, deadline=None, database=None)
@given(st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255)), min_size=1, max_size=8),
       st.integers(0, len(VALID)))
def test_mutations_of_a_valid_bundle(edits, cut):
    data = bytearray(VALID)
    for i, b in edits:
        data[i] = b
    _strict(bytes(data))
    _strict(bytes(data[:cut]))


_JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
                     lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                     max_leaves=12)


@settings(max_examples=200, deadline=None, database=None)
@given(st.sampled_from(["bundle", "body", "add"]), st.data())
def test_fields_of_any_type(where, data):
    """One field of the bundle, of its (correctly signed) body or of an add entry, of any JSON value:
    a verdict, never a crash; the same value gives ok."""
    _, keys = himage.vector_pki()
    bundle = json.loads(VALID)
    body = json.loads(base64.b64decode(bundle["body"]))
    fields = {"bundle": bundle, "body": body, "add": body["add"][0]}[where]
    field = data.draw(st.sampled_from(sorted(fields)))
    value = data.draw(_JSON)
    original = fields[field]
    fields[field] = value
    if where != "bundle":
        raw = himage.canonical_json(body)
        bundle["body"] = himage._b64(raw)
        bundle["signature"] = himage._b64(himage.sign_manifest(raw, keys[OLD_SIGNER]))
    verdict = _strict(himage.canonical_json(bundle))
    if value == original and type(value) is type(original):
        assert verdict.ok


@settings(max_examples=200, deadline=None, database=None)
@given(now=_JSON, ca_until=st.none() | _JSON | st.dictionaries(st.text(max_size=16), _JSON, max_size=3),
       store=st.none() | _JSON | st.dictionaries(st.text(max_size=16), st.text(max_size=64), max_size=3))
def test_a_context_of_any_type(now, ca_until, store):
    _strict(VALID, now=now, ca_until=ca_until, trust_store_pems=store)


def test_context_errors_and_huge_inputs():
    assert _strict(VALID, now=-1).reason == "malformed: now"
    assert _strict(VALID, ca_until={pki.ROOT_OLD: None}).reason == "malformed: ca until"
    assert _strict(VALID, trust_store_pems=None).reason == "missing ca"
    assert ota_verify.verify_trust_bundle(None, trust_store_pems={}, now=NOW).reason == "malformed: not bytes"
    assert _strict(b"[" * 8000 + b"]" * 8000).reason == "malformed: bundle not json"
    assert _strict(b" " * 16385).reason == "malformed: bundle too large"
