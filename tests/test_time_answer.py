"""Signed time answers: the harness's writer (harness.image.make_time_answer), the device's verifier
(vrack.ota_verify.verify_time_answer), the published vectors in tests/vectors/time-v1/, fuzzing.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness import image as himage
from harness import pki
from vrack import ota_verify

ROOT = Path(__file__).resolve().parent.parent
VECTORS = ROOT / "tests" / "vectors" / "time-v1"
NOW = himage.VECTOR_NOW
TEN_YEARS = 10 * 365 * 86400


def _doc() -> dict:
    return json.loads((VECTORS / "vectors.json").read_text())


def _root_pems() -> dict[str, str]:
    return {name: (VECTORS / f).read_text() for name, f in _doc()["roots"].items()}


def _strict(data, **kw) -> ota_verify.TimeVerdict:
    """The verifier without its catch-all (any exception fails the test), its verdict checked for shape."""
    args = dict(nonce=himage.VECTOR_NONCE, thing=himage.VECTOR_THING, trust_store_pems=_root_pems(),
                floor=himage.VECTOR_FLOOR, max_ahead_s=TEN_YEARS)
    args.update(kw)
    verdict = ota_verify._verify_time(data, **args)
    assert isinstance(verdict, ota_verify.TimeVerdict)
    base = verdict.reason.split(":", 1)[0]
    assert base in ota_verify.TIME_REASONS or verdict.reason == "ok", verdict.reason
    if base == "malformed":
        assert verdict.reason.split(": ", 1)[1] in ota_verify.MALFORMED_DETAILS, verdict.reason
    assert verdict.ok == (verdict.reason == "ok")
    assert (verdict.time is not None) == verdict.ok
    return verdict


def _context(entry: dict) -> dict:
    ctx = entry["context"]
    pems = _root_pems()
    return dict(nonce=ctx["nonce"], thing=ctx["thing"], trust_store_pems={n: pems[n] for n in ctx["trust_store"]},
                ca_until=ctx.get("ca_until"), floor=ctx["floor"], max_ahead_s=ctx["max_ahead_s"])


# --- the published vectors -----------------------------------------------------------------------


def test_vectors_are_generated_deterministically(tmp_path):
    doc = himage.write_time_vectors(tmp_path)
    assert doc == _doc()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in VECTORS.iterdir())
    for p in tmp_path.iterdir():
        assert p.read_bytes() == (VECTORS / p.name).read_bytes(), p.name


def test_the_command_writes_every_set(tmp_path):
    assert himage.main(["vectors", "--set", "all", str(tmp_path)]) == 0
    for name in ("signed-v1", "time-v1", "trust-v1"):
        committed = ROOT / "tests" / "vectors" / name
        assert sorted(p.name for p in (tmp_path / name).iterdir()) == sorted(p.name for p in committed.iterdir())
        assert (tmp_path / name / "vectors.json").read_bytes() == (committed / "vectors.json").read_bytes()
    assert himage.main(["vectors", str(tmp_path / "plain")]) == 0  # the old spelling: signed-v1
    assert (tmp_path / "plain" / "vectors.json").read_bytes() == (
        ROOT / "tests" / "vectors" / "signed-v1" / "vectors.json").read_bytes()


def test_vectors_cover_every_reason():
    doc = _doc()
    assert doc["format"] == "cart-time-answer-v1"
    assert doc["reasons"] == list(ota_verify.TIME_REASONS) == list(himage.TIME_REASONS)
    assert {v["reason"].split(":", 1)[0] for v in doc["vectors"] if not v["ok"]} == set(ota_verify.TIME_REASONS)
    for v in doc["vectors"]:
        assert v["ok"] == (v["reason"] == "ok") == (v["time"] is not None)
        assert set(v["context"]["trust_store"]) <= set(doc["roots"])


def test_the_constants_agree():
    assert himage.TIME_FLOOR_MIN == ota_verify.TIME_FLOOR_MIN == 1767225600
    assert himage.TIME_ANSWER_MAX == ota_verify.TIME_ANSWER_MAX == 8192
    assert himage.MAX_SIGNATURES == ota_verify.MAX_SIGNATURES


@pytest.mark.parametrize("entry", _doc()["vectors"], ids=lambda e: e["file"])
def test_device_verifier_matches_vector(entry):
    data = (VECTORS / entry["file"]).read_bytes()
    assert len(data) == entry["size"] and hashlib.sha256(data).hexdigest() == entry["sha256"]
    verdict = ota_verify.verify_time_answer(data, **_context(entry))
    assert (verdict.ok, verdict.reason, verdict.time) == (entry["ok"], entry["reason"], entry["time"])
    assert _strict(data, **_context(entry)) == verdict


# --- harness builds, device verifies --------------------------------------------------------------


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    lab = pki.LabPki(tmp_path_factory.mktemp("pki") / "pki")
    lab.init()
    return lab


def _signers(lab, roots=pki.TRUSTED_ROOTS):
    return [(r, lab.key(pki.time_signer_of(r)), lab.chain(pki.time_signer_of(r))) for r in roots]


def _answer(lab, nonce, t=NOW, thing="cart-07", roots=pki.TRUSTED_ROOTS):
    return himage.make_time_answer(nonce=nonce, thing=thing, time=t, signers=_signers(lab, roots))


def _check(lab, data, nonce, *, roots=pki.TRUSTED_ROOTS, thing="cart-07", floor=NOW - 60, **kw):
    return _strict(data, nonce=nonce, thing=thing, trust_store_pems=lab.trust_store(roots), floor=floor, **kw)


def test_lab_pki_answer_verifies_on_the_device(lab):
    nonce = os.urandom(16).hex()
    answer = _answer(lab, nonce)
    assert _check(lab, answer, nonce) == ota_verify.TimeVerdict(True, "ok", NOW)
    for roots in ([pki.ROOT_OLD], [pki.ROOT_NEW]):  # either root alone: a cart mid-rotation
        assert _check(lab, answer, nonce, roots=roots).ok
    # the body is canonical and says what was asked
    body = json.loads(base64.b64decode(json.loads(answer)["signed"]))
    assert body == {"format": 1, "nonce": nonce, "thing": "cart-07", "time": NOW}
    assert himage.canonical_json(body) == base64.b64decode(json.loads(answer)["signed"])
    assert answer == _answer(lab, nonce), "answers are deterministic"


def test_lab_pki_negative_cases(lab):
    nonce = os.urandom(16).hex()
    answer = _answer(lab, nonce)
    assert _check(lab, answer, os.urandom(16).hex()).reason == "nonce mismatch"
    assert _check(lab, answer, nonce, thing="cart-08").reason == "wrong thing"
    assert _check(lab, answer, nonce, floor=NOW).ok
    assert _check(lab, answer, nonce, floor=NOW + 1).reason == "earlier than last accepted"
    assert _check(lab, answer, nonce, floor=NOW - 3600, max_ahead_s=3600).ok
    assert _check(lab, answer, nonce, floor=NOW - 3600, max_ahead_s=3599).reason == "from the future"
    assert _check(lab, answer, nonce, floor=0, max_ahead_s=NOW - ota_verify.TIME_FLOOR_MIN).ok
    assert _check(lab, answer, nonce, floor=0, max_ahead_s=NOW - ota_verify.TIME_FLOOR_MIN - 1).reason == \
        "from the future"
    # rogue-root's time leaf, the code-signing leaf, a retired root: nobody vouches
    rogue = himage.make_time_answer(nonce=nonce, thing="cart-07", time=NOW, signers=_signers(lab, [pki.ROGUE_ROOT]))
    assert _check(lab, rogue, nonce).reason == "untrusted signer"
    signer = pki.signer_of(pki.ROOT_OLD)
    coder = himage.make_time_answer(nonce=nonce, thing="cart-07", time=NOW,
                                    signers=[(pki.ROOT_OLD, lab.key(signer), lab.chain(signer))])
    assert _check(lab, coder, nonce).reason == "untrusted signer"
    assert _check(lab, answer, nonce, ca_until={pki.ROOT_OLD: NOW, pki.ROOT_NEW: NOW}).reason == "untrusted signer"
    assert _check(lab, answer, nonce, ca_until={pki.ROOT_OLD: NOW}).ok  # the other root still vouches
    assert _check(lab, answer, nonce, ca_until={pki.ROOT_OLD: NOW + 1, pki.ROOT_NEW: NOW + 1}).ok
    assert _check(lab, answer, nonce, roots=[pki.ROGUE_ROOT]).reason == "untrusted signer"
    # a forged signature: the real chain, another key
    forged = himage.make_time_answer(nonce=nonce, thing="cart-07", time=NOW, signers=[
        (pki.ROOT_OLD, ec.generate_private_key(ec.SECP256R1()), lab.chain(pki.time_signer_of(pki.ROOT_OLD)))])
    assert _check(lab, forged, nonce).reason == "bad signature"
    # the time leaves expire with the lab PKI (2049-12-31): a later time is not vouched for
    late = int(pki.NOT_AFTER.timestamp()) + 1
    assert _check(lab, _answer(lab, nonce, late), nonce, floor=late).reason == "untrusted signer"
    assert _check(lab, _answer(lab, nonce, late - 1), nonce, floor=late - 1).ok


def test_context_errors_are_malformed(lab):
    nonce = os.urandom(16).hex()
    answer = _answer(lab, nonce)
    assert _check(lab, answer, nonce, floor=-1).reason == "malformed: floor"
    assert _check(lab, answer, nonce, floor="0").reason == "malformed: floor"
    assert _check(lab, answer, nonce, max_ahead_s=-1).reason == "malformed: max ahead"
    assert _check(lab, answer, nonce, max_ahead_s=1.5).reason == "malformed: max ahead"
    assert _check(lab, answer, nonce, ca_until={pki.ROOT_OLD: "never"}).reason == "malformed: ca until"
    assert _strict(answer, nonce=nonce, thing="cart-07", trust_store_pems=None, floor=0).reason == "untrusted signer"
    assert _check(lab, answer, None).reason == "nonce mismatch"
    assert ota_verify.verify_time_answer(None, nonce=nonce, thing="x", trust_store_pems={}, floor=0,
                                         max_ahead_s=0).reason == "malformed: not bytes"
    assert _check(lab, bytearray(answer), nonce).ok and _check(lab, memoryview(answer), nonce).ok


@pytest.mark.parametrize("bad", [
    dict(nonce="ABCDEF0123456789ABCDEF0123456789"), dict(nonce="00" * 15), dict(nonce=None), dict(thing=""),
    dict(thing="cart 07"), dict(thing="x" * 129), dict(time=-1), dict(time=2**63), dict(time=1.5), dict(time=True),
    dict(signers=[]), dict(signers="x"), dict(ca="../root"), dict(chain=[]), dict(chain="leaf"), dict(key="p384"),
    dict(five=True)])
def test_writer_refuses_what_a_device_would_refuse(lab, bad):
    ca, key, chain = _signers(lab, [pki.ROOT_OLD])[0]
    bad = dict(bad)
    ca, chain = bad.pop("ca", ca), bad.pop("chain", chain)
    if bad.pop("key", None):
        key = ec.generate_private_key(ec.SECP384R1())
    signers = [(ca, key, chain)] * (5 if bad.pop("five", False) else 1)
    args = dict(nonce="0" * 32, thing="cart-07", time=NOW, signers=signers)
    args.update(bad)
    with pytest.raises(ValueError):
        himage.make_time_answer(**args)


# --- fuzzing: no input raises ------------------------------------------------------------------------

VALID = (VECTORS / "valid-old-ca-only.json").read_bytes()
VALID_CTX = dict(trust_store_pems={pki.ROOT_OLD: _root_pems()[pki.ROOT_OLD]})


def _meaning(data: bytes):
    """What an answer says, up to encodings that carry no meaning: the BODY bytes, and per signature
    the ca, the signature bytes and each certificate's signed content and signature (a certificate's
    outer DER is malleable, e.g. the unused-bits byte of its signature; so is base64's padding)."""
    obj = json.loads(data)
    entries = []
    for e in obj["signatures"]:
        certs = [x509.load_der_x509_certificate(base64.b64decode(c)) for c in e["chain"]]
        entries.append((e["ca"], base64.b64decode(e["sig"]), [(c.tbs_certificate_bytes, c.signature) for c in certs]))
    return base64.b64decode(obj["signed"]), entries


def test_every_truncation_is_rejected():
    assert _strict(VALID, **VALID_CTX).ok
    for n in range(len(VALID)):
        assert _strict(VALID[:n], **VALID_CTX).reason.startswith("malformed: "), n


def test_every_single_bit_flip_is_rejected_or_means_the_same():
    meaning = _meaning(VALID)
    for i in range(len(VALID)):
        for bit in range(8):
            flipped = bytearray(VALID)
            flipped[i] ^= 1 << bit
            if _strict(bytes(flipped), **VALID_CTX).ok:
                assert _meaning(bytes(flipped)) == meaning, (i, bit)


@settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=9000))
def test_random_bytes(data):
    assert not _strict(data).ok
    assert not _strict(b'{"format":1,' + data).ok


@settings(max_examples=300, deadline=None, database=None)
@given(st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255)), min_size=1, max_size=8),
       st.integers(0, len(VALID)))
def test_mutations_of_a_valid_answer(edits, cut):
    data = bytearray(VALID)
    for i, b in edits:
        data[i] = b
    _strict(bytes(data), **VALID_CTX)
    _strict(bytes(data[:cut]), **VALID_CTX)


_JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
                     lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                     max_leaves=12)


@settings(max_examples=200, deadline=None, database=None)
@given(st.sampled_from(["answer", "entry", "body"]), st.data())
def test_fields_of_any_type(where, data):
    """One field of the answer, of its signature entry or of its (correctly signed) body, of any JSON
    value: a verdict, never a crash; the same value gives ok."""
    certs, keys = himage.vector_pki()
    leaf = pki.time_signer_of(pki.ROOT_OLD)
    answer = json.loads(VALID)
    body = json.loads(base64.b64decode(answer["signed"]))
    fields = {"answer": answer, "entry": answer["signatures"][0], "body": body}[where]
    field = data.draw(st.sampled_from(sorted(fields)))
    value = data.draw(_JSON)
    original = fields[field]
    fields[field] = value
    if where == "body":
        raw = himage.canonical_json(body)
        answer["signed"] = himage._b64(raw)
        answer["signatures"][0]["sig"] = himage._b64(himage.sign_manifest(raw, keys[leaf]))
    verdict = _strict(himage.canonical_json(answer), **VALID_CTX)
    if value == original and type(value) is type(original):
        assert verdict.ok


@settings(max_examples=200, deadline=None, database=None)
@given(nonce=_JSON, thing=_JSON, floor=_JSON, max_ahead_s=_JSON,
       ca_until=st.none() | _JSON | st.dictionaries(st.text(max_size=16), _JSON, max_size=3),
       store=st.none() | _JSON | st.dictionaries(st.text(max_size=16), st.text(max_size=64), max_size=3))
def test_a_context_of_any_type(nonce, thing, floor, max_ahead_s, ca_until, store):
    _strict(VALID, nonce=nonce, thing=thing, floor=floor, max_ahead_s=max_ahead_s, ca_until=ca_until,
            trust_store_pems=store)


def test_huge_and_deep_inputs():
    assert _strict(b"[" * 4000 + b"]" * 4000).reason == "malformed: answer not json"
    assert _strict(b" " * 8193).reason == "malformed: answer too large"
    assert _strict(b'{"format":1,"signed":"' + b"A" * 8000 + b'","signatures":[]}').reason == \
        "malformed: time body not json"
    deep = himage.time_answer(b"[" * 3000 + b"]" * 3000, [])
    assert _strict(deep).reason == "malformed: time body not json"
    big_int = b'{"format":1,"signed":"","signatures":[]}'.replace(b"1", b"1" + b"0" * 5000)
    assert _strict(big_int).reason == "malformed: answer not json"
