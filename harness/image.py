"""Signed firmware images, time answers and trust bundles (docs/image-format.md): the harness's writers.

    build_signed_image(payload, version=..., hardware=[...], required_ca=..., issued=..., expires=...,
                       security_counter=..., signer_key=..., chain=[leaf, intermediate], tamper=None)
    sign_image(unsigned_v1_image, hardware=..., ...)   re-wrap a factory image with a signed manifest
    parse_image(data) -> SignedImage                   inspection (raises ImageFormatError)
    make_time_answer(nonce=..., thing=..., time=..., signers=[(ca, key, chain)])  -> bytes
    build_trust_bundle({name: pem}, required_ca=..., issued=..., expires=..., overlap_s=...,
                       signer_key=..., chain=[leaf, intermediate])              -> bytes
    write_test_vectors(dir), write_time_vectors(dir), write_trust_vectors(dir)
                                                       the published vectors (deterministic)

    python -m harness.image vectors [--set signed-v1|time-v1|trust-v1|all] DIR | show FILE

This is the harness's own implementation of the formats (it never imports vrack): the
device side parses and verifies with its own code (vrack/ota_verify.py), and both are held
to the vectors in tests/vectors/{signed-v1,time-v1,trust-v1}/. Signatures are deterministic
ECDSA (RFC 6979), so a build from the same inputs is byte-for-byte the same.

`tamper` makes a defective image on purpose, for the negative scenarios; see TAMPERS.
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import hashlib
import json
import re
import struct
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from harness import pki

MAGIC = b"CIMG"
FORMAT_VERSION = 1
HEADER = struct.Struct("<4sHHII16s")
HEADER_SIZE = HEADER.size  # 32
TLV_HEAD = struct.Struct("<HHI")

TLV_FW_VERSION = 0x0001
TLV_PAYLOAD_SHA256 = 0x0002
TLV_BUILD_INFO = 0x0003
TLV_MANIFEST = 0x0010
TLV_SIGNATURE = 0x0011
TLV_CERT = 0x0012

MANIFEST_FORMAT = 1
MANIFEST_MAX = 4096
MAX_CERTS = 4
CERT_MAX = 4096
SIGNATURE_MAX = 128

VERSION_RE = re.compile(r"[0-9]{1,5}\.[0-9]{1,5}\.[0-9]{1,5}(-[0-9A-Za-z.-]{1,12})?")
HARDWARE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,31}")
CA_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
MAX_HARDWARE = 32

TIME_FORMAT = 1
TIME_ANSWER_MAX = 8192
MAX_SIGNATURES = 4
NONCE_RE = re.compile(r"[0-9a-f]{32}")
THING_RE = re.compile(r"[A-Za-z0-9:_-]{1,128}")
BUNDLE_FORMAT = 1
BUNDLE_KIND = "cart-trust-bundle"
BUNDLE_MAX = 16384
MAX_ADD = 2
OVERLAP_MAX = 315360000
PEM_MAX = 8192

# The device's verdicts (vrack/ota_verify.py), in check order; "malformed" carries ": <detail>".
_CHAIN_REASONS = ("missing ca", "ca retired", "signer not yet valid", "signer expired", "untrusted signer")
REASONS = ("malformed", "unsigned", "size mismatch", "payload hash mismatch", "manifest mismatch", *_CHAIN_REASONS,
           "bad signature", "wrong hardware", "same version", "lower version", "not yet valid", "expired",
           "security counter")
TIME_REASONS = ("malformed", "unsigned", "untrusted signer", "bad signature", "nonce mismatch", "wrong thing",
                "earlier than last accepted", "from the future")
BUNDLE_REASONS = ("malformed", *_CHAIN_REASONS, "bad signature", "not yet valid", "expired", "not a ca")

# Defects made on purpose (after a correct signature unless said otherwise):
TAMPERS = {
    "unsigned": "no manifest, signature or certificates: a plain v1 image",
    "bad-signature": "one bit of the signature flipped",
    "payload-after-signing": "one payload bit flipped after the TLVs and the manifest were made",
    "manifest-after-signing": "the manifest's expires moved a year later after signing (still canonical)",
    "size-mismatch": "bytes appended to the payload after signing; header and PAYLOAD_SHA256 TLV fixed up",
    "hash-mismatch": "the PAYLOAD_SHA256 TLV altered (payload and manifest intact)",
    "version-mismatch": "the FW_VERSION TLV names another version than the signed manifest",
    "no-certs": "the CERT TLVs left out",
    "truncated": "the image cut in the middle of the payload (an interrupted download)",
}


class ImageFormatError(ValueError):
    """The bytes are not a v1 image container; the message says where."""


# --- writer ------------------------------------------------------------------------------------


def canonical_json(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode("utf-8")


def encode_tlv(type_: int, value: bytes, flags: int = 0) -> bytes:
    return TLV_HEAD.pack(type_, flags, len(value)) + value


def assemble(payload: bytes, tlvs: Iterable[tuple[int, bytes]]) -> bytes:
    """Header, payload, then the TLVs in the order given. No checks: vectors need bad ones too."""
    area = b"".join(encode_tlv(t, v) for t, v in tlvs)
    return HEADER.pack(MAGIC, FORMAT_VERSION, HEADER_SIZE, len(payload), len(area), bytes(16)) + payload + area


def make_manifest(payload: bytes, *, version: str, hardware: Sequence[str], required_ca: str, issued: int,
                  expires: int, security_counter: int) -> dict:
    """The manifest for `payload`, checked against what a device accepts (ValueError otherwise)."""
    if not payload:
        raise ValueError("empty payload")
    if not isinstance(version, str) or len(version) > 32 or not VERSION_RE.fullmatch(version):
        raise ValueError(f"version {version!r} is not MAJOR.MINOR.PATCH[-suffix]")
    if isinstance(hardware, str) or not hardware or len(hardware) > MAX_HARDWARE or not all(
            isinstance(h, str) and HARDWARE_RE.fullmatch(h) for h in hardware):
        raise ValueError(f"hardware {hardware!r}: 1 to {MAX_HARDWARE} revision names like 'rev-c'")
    if not isinstance(required_ca, str) or not CA_NAME_RE.fullmatch(required_ca):
        raise ValueError(f"required_ca {required_ca!r} is not a CA name")
    for name, value, hi in (("issued", issued, 2**63), ("expires", expires, 2**63),
                            ("security_counter", security_counter, 2**32)):
        if type(value) is not int or not 0 <= value < hi:
            raise ValueError(f"{name} {value!r}: an integer in [0, {hi})")
    if expires <= issued:
        raise ValueError(f"expires {expires} is not after issued {issued}")
    if len(payload) >= 2**32:
        raise ValueError("payload of 4 GiB or more")
    manifest = {
        "format": MANIFEST_FORMAT,
        "firmware_version": version,
        "hardware": list(hardware),
        "payload_size": len(payload),
        "payload_sha256": hashlib.sha256(payload).hexdigest(),
        "issued": issued,
        "expires": expires,
        "required_ca": required_ca,
        "security_counter": security_counter,
    }
    if len(canonical_json(manifest)) > MANIFEST_MAX:
        raise ValueError(f"manifest longer than {MANIFEST_MAX} bytes")
    return manifest


def sign_manifest(manifest_bytes: bytes, signer_key: ec.EllipticCurvePrivateKey) -> bytes:
    """DER ECDSA P-256 signature over SHA-256 of the manifest bytes (deterministic, RFC 6979)."""
    if not isinstance(signer_key, ec.EllipticCurvePrivateKey) or not isinstance(signer_key.curve, ec.SECP256R1):
        raise ValueError("the signer key must be an ECDSA P-256 private key")
    return signer_key.sign(manifest_bytes, ec.ECDSA(hashes.SHA256(), deterministic_signing=True))


def _check_chain(chain: Sequence[x509.Certificate]) -> list[str]:
    """The chain as base64 DER, leaf first (1 to MAX_CERTS certificates, the root excluded)."""
    if isinstance(chain, x509.Certificate) or not chain or len(chain) > MAX_CERTS or not all(
            isinstance(c, x509.Certificate) for c in chain):
        raise ValueError(f"chain: 1 to {MAX_CERTS} certificates, leaf first, root excluded")
    return [_b64(c.public_bytes(serialization.Encoding.DER)) for c in chain]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _epoch(name: str, value: int) -> int:
    if type(value) is not int or not 0 <= value < 2**63:
        raise ValueError(f"{name} {value!r}: an integer in [0, 2**63)")
    return value


# --- time answers (docs/image-format.md, "Time answers") -------------------------------------------


def time_body(*, nonce: str, thing: str, time: int) -> bytes:
    """The signed BODY of a time answer: canonical JSON of format, nonce, thing, time."""
    if not isinstance(nonce, str) or not NONCE_RE.fullmatch(nonce):
        raise ValueError(f"nonce {nonce!r}: 32 lowercase hex digits")
    if not isinstance(thing, str) or not THING_RE.fullmatch(thing):
        raise ValueError(f"thing {thing!r}: 1 to 128 of [A-Za-z0-9:_-]")
    return canonical_json({"format": TIME_FORMAT, "nonce": nonce, "thing": thing, "time": _epoch("time", time)})


def time_signature(body: bytes, ca: str, key: ec.EllipticCurvePrivateKey,
                   chain: Sequence[x509.Certificate]) -> dict:
    """One entry of a time answer's `signatures`: `ca` names the trust-store root the chain ends at."""
    if not isinstance(ca, str) or not CA_NAME_RE.fullmatch(ca):
        raise ValueError(f"ca {ca!r} is not a CA name")
    certs = _check_chain(chain)
    return {"ca": ca, "sig": _b64(sign_manifest(body, key)), "chain": certs}


def time_answer(body: bytes, signatures: Sequence[dict]) -> bytes:
    """Wrap a BODY and its signature entries (no checks: the time service's faults need bad ones)."""
    return canonical_json({"format": TIME_FORMAT, "signed": _b64(body), "signatures": list(signatures)})


def make_time_answer(*, nonce: str, thing: str, time: int,
                     signers: Sequence[tuple[str, ec.EllipticCurvePrivateKey, Sequence[x509.Certificate]]]) -> bytes:
    """The time service's answer to `nonce` from `thing`: `time` signed by every (ca, key, chain)
    of `signers` (1 to 4; one per root, so a cart with either root during a rotation accepts it).
    ValueError for anything a device would refuse as malformed."""
    signers = list(signers)
    if not 1 <= len(signers) <= MAX_SIGNATURES or not all(
            isinstance(s, tuple | list) and len(s) == 3 and isinstance(s[0], str) for s in signers):
        raise ValueError(f"signers: a list of 1 to {MAX_SIGNATURES} (ca, key, chain)")
    body = time_body(nonce=nonce, thing=thing, time=time)
    answer = time_answer(body, [time_signature(body, ca, key, chain) for ca, key, chain in signers])
    if len(answer) > TIME_ANSWER_MAX:
        raise ValueError(f"answer of {len(answer)} bytes, over {TIME_ANSWER_MAX}")
    return answer


# --- trust bundles (docs/image-format.md, "Trust bundles") -----------------------------------------


def trust_bundle_body(add: dict[str, str], *, required_ca: str, issued: int, expires: int, overlap_s: int) -> bytes:
    """The signed BODY of a trust bundle (canonical JSON), checked as a device checks it."""
    if not isinstance(add, dict) or not 1 <= len(add) <= MAX_ADD:
        raise ValueError(f"add: 1 to {MAX_ADD} roots as {{name: pem}}")
    for name, pem in add.items():
        if not isinstance(name, str) or not CA_NAME_RE.fullmatch(name):
            raise ValueError(f"add: {name!r} is not a CA name")
        if not isinstance(pem, str) or not 0 < len(pem) <= PEM_MAX or not pem.isascii():
            raise ValueError(f"add[{name!r}]: a PEM certificate of at most {PEM_MAX} ASCII characters")
    if not isinstance(required_ca, str) or not CA_NAME_RE.fullmatch(required_ca):
        raise ValueError(f"required_ca {required_ca!r} is not a CA name")
    if _epoch("expires", expires) <= _epoch("issued", issued):
        raise ValueError(f"expires {expires} is not after issued {issued}")
    if type(overlap_s) is not int or not 0 <= overlap_s <= OVERLAP_MAX:
        raise ValueError(f"overlap_s {overlap_s!r}: an integer in [0, {OVERLAP_MAX}]")
    return canonical_json({"add": [{"name": n, "pem": p} for n, p in add.items()], "expires": expires,
                           "format": BUNDLE_FORMAT, "issued": issued, "overlap_s": overlap_s,
                           "required_ca": required_ca})


def trust_bundle(body: bytes, signature: bytes, chain_b64: Sequence[str]) -> bytes:
    """Wrap a BODY, its signature and chain (no checks: vectors need bad ones)."""
    return canonical_json({"body": _b64(body), "chain": list(chain_b64), "format": BUNDLE_FORMAT,
                           "kind": BUNDLE_KIND, "signature": _b64(signature)})


def build_trust_bundle(add: dict[str, str], *, required_ca: str, issued: int, expires: int, overlap_s: int,
                       signer_key: ec.EllipticCurvePrivateKey, chain: Sequence[x509.Certificate]) -> bytes:
    """A CA-update file: roots to `add` ({name: PEM}), signed by a code-signing leaf (`chain`:
    [leaf, intermediates...]) under `required_ca`, a root the carts already trust. Roots not
    re-added stay trusted for `overlap_s` more seconds. ValueError for anything a device would
    refuse as malformed."""
    body = trust_bundle_body(add, required_ca=required_ca, issued=issued, expires=expires, overlap_s=overlap_s)
    bundle = trust_bundle(body, sign_manifest(body, signer_key), _check_chain(chain))
    if len(bundle) > BUNDLE_MAX:
        raise ValueError(f"bundle of {len(bundle)} bytes, over {BUNDLE_MAX}")
    return bundle


def _flip(data: bytes, index: int, mask: int = 0x01) -> bytes:
    b = bytearray(data)
    b[index] ^= mask
    return bytes(b)


def _other_version(version: str) -> str:
    return "9.9.9" if version != "9.9.9" else "9.9.8"


def build_signed_image(payload: bytes, *, version: str, hardware: Sequence[str], required_ca: str, issued: int,
                       expires: int, security_counter: int, signer_key: ec.EllipticCurvePrivateKey,
                       chain: Sequence[x509.Certificate], tamper: str | None = None,
                       build_info: dict | None = None) -> bytes:
    """A v1 image with FW_VERSION, PAYLOAD_SHA256, [BUILD_INFO], MANIFEST, SIGNATURE, CERT...

    `chain` is [leaf, intermediates...] without the root (the device has the root in its trust
    store). `tamper` (a key of TAMPERS) makes a defective image on purpose."""
    if tamper is not None and tamper not in TAMPERS:
        raise ValueError(f"unknown tamper {tamper!r}; one of {', '.join(TAMPERS)}")
    if not chain or len(chain) > MAX_CERTS:
        raise ValueError(f"chain: 1 to {MAX_CERTS} certificates, leaf first, root excluded")
    manifest = make_manifest(payload, version=version, hardware=hardware, required_ca=required_ca, issued=issued,
                             expires=expires, security_counter=security_counter)
    manifest_bytes = canonical_json(manifest)
    signature = sign_manifest(manifest_bytes, signer_key)
    certs = [c.public_bytes(serialization.Encoding.DER) for c in chain]
    fw_version = version.encode("ascii")
    digest = hashlib.sha256(payload).digest()

    if tamper == "bad-signature":
        signature = _flip(signature, len(signature) - 1)
    elif tamper == "payload-after-signing":
        payload = _flip(payload, len(payload) // 2)
    elif tamper == "manifest-after-signing":
        manifest_bytes = canonical_json(dict(manifest, expires=manifest["expires"] + 365 * 86400))
    elif tamper == "size-mismatch":
        payload = payload + b"\n# appended after signing\n"
        digest = hashlib.sha256(payload).digest()
    elif tamper == "hash-mismatch":
        digest = _flip(digest, 0, 0x80)
    elif tamper == "version-mismatch":
        fw_version = _other_version(version).encode("ascii")
    elif tamper == "no-certs":
        certs = []

    tlvs = [(TLV_FW_VERSION, fw_version), (TLV_PAYLOAD_SHA256, digest)]
    if build_info is not None:
        tlvs.append((TLV_BUILD_INFO, canonical_json(build_info)))
    if tamper != "unsigned":
        tlvs += [(TLV_MANIFEST, manifest_bytes), (TLV_SIGNATURE, signature)]
        tlvs += [(TLV_CERT, der) for der in certs]
    image = assemble(payload, tlvs)
    if tamper == "truncated":
        image = image[: HEADER_SIZE + len(payload) // 2]
    return image


def sign_image(image: bytes, **kwargs) -> bytes:
    """Re-wrap an (unsigned) v1 image: same payload, version and BUILD_INFO, plus the signed
    manifest. `kwargs` are build_signed_image's (version defaults to the image's own)."""
    parsed = parse_image(image)
    if parsed.manifest_bytes is not None:
        raise ImageFormatError("the image is already signed")
    kwargs.setdefault("version", parsed.version)
    kwargs.setdefault("build_info", parsed.build_info)
    return build_signed_image(parsed.payload, **kwargs)


# --- reader (inspection) -----------------------------------------------------------------------


@dataclass(frozen=True)
class SignedImage:
    version: str | None
    payload: bytes
    payload_sha256: bytes | None
    build_info: dict | None
    manifest: dict | None  # the MANIFEST TLV as JSON, if it is a JSON object
    manifest_bytes: bytes | None
    signature: bytes | None
    cert_ders: tuple[bytes, ...]
    tlvs: tuple[tuple[int, int, bytes], ...] = field(repr=False)  # (type, flags, value)
    total_size: int

    @property
    def signed(self) -> bool:
        return self.manifest_bytes is not None and self.signature is not None

    @property
    def hash_ok(self) -> bool:
        return self.payload_sha256 == hashlib.sha256(self.payload).digest()

    def certificates(self) -> list[x509.Certificate]:
        """The CERT TLVs parsed (ImageFormatError if one is not DER X.509)."""
        try:
            return [x509.load_der_x509_certificate(der) for der in self.cert_ders]
        except (ValueError, x509.InvalidVersion) as exc:
            raise ImageFormatError(f"CERT TLV is not a DER certificate: {exc}") from None


def parse_image(data: bytes) -> SignedImage:
    """Read an image's container and TLVs (no signature or chain check: that is the device's
    job). Raises ImageFormatError when the container itself is broken."""
    data = bytes(data)
    if len(data) < HEADER_SIZE:
        raise ImageFormatError(f"{len(data)} bytes: shorter than the {HEADER_SIZE}-byte header")
    magic, fmt, header_size, payload_size, tlv_size, _ = HEADER.unpack_from(data, 0)
    if magic != MAGIC:
        raise ImageFormatError(f"magic {magic!r}, expected {MAGIC!r}")
    if fmt != FORMAT_VERSION or header_size != HEADER_SIZE:
        raise ImageFormatError(f"format_version {fmt}, header_size {header_size}: not a v1 image")
    total = HEADER_SIZE + payload_size + tlv_size
    if payload_size == 0 or total > len(data):
        raise ImageFormatError(f"header says {total} bytes (payload {payload_size}, TLVs {tlv_size}), "
                               f"have {len(data)}")
    payload = data[HEADER_SIZE:HEADER_SIZE + payload_size]
    tlvs = []
    pos, end = HEADER_SIZE + payload_size, total
    while pos < end:
        if end - pos < TLV_HEAD.size:
            raise ImageFormatError(f"TLV header cut at offset {pos}")
        t, flags, length = TLV_HEAD.unpack_from(data, pos)
        pos += TLV_HEAD.size
        if length > end - pos:
            raise ImageFormatError(f"TLV 0x{t:04x} at offset {pos - TLV_HEAD.size} runs past the TLV area")
        tlvs.append((t, flags, data[pos:pos + length]))
        pos += length

    def one(type_: int) -> bytes | None:
        values = [v for t, _, v in tlvs if t == type_]
        if len(values) > 1:
            raise ImageFormatError(f"TLV 0x{type_:04x} appears {len(values)} times")
        return values[0] if values else None

    raw_version, digest, raw_info = one(TLV_FW_VERSION), one(TLV_PAYLOAD_SHA256), one(TLV_BUILD_INFO)
    manifest_bytes, signature = one(TLV_MANIFEST), one(TLV_SIGNATURE)
    version = raw_version.decode("ascii", "replace") if raw_version is not None else None
    return SignedImage(version=version, payload=payload, payload_sha256=digest,
                       build_info=_json_object(raw_info), manifest=_json_object(manifest_bytes),
                       manifest_bytes=manifest_bytes, signature=signature,
                       cert_ders=tuple(v for t, _, v in tlvs if t == TLV_CERT), tlvs=tuple(tlvs),
                       total_size=total)


def _json_object(raw: bytes | None) -> dict | None:
    if raw is None:
        return None
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    return obj if isinstance(obj, dict) else None


# --- published test vectors --------------------------------------------------------------------

VECTOR_PAYLOAD = (b'# signed-v1 test vector payload\ndef main(hal):\n    hal.console.write_line("FW: signed vector")\n'
                  + b"# filler to make the payload a little less tiny\n" * 4)
VECTOR_NOW = 1795798800  # 2026-11-27T17:00:00Z
VECTOR_ISSUED = VECTOR_NOW - 86400
VECTOR_EXPIRES = VECTOR_NOW + 90 * 86400
VECTOR_HARDWARE = "rev-c"
VECTOR_RUNNING = "1.4.2"
VECTOR_VERSION = "1.5.0"
VECTOR_BUILD_INFO = {"family": "vector", "version": VECTOR_VERSION, "faults": {}, "build_id": "signed-vector-0001"}
NOEKU_SIGNER = "lab-root-2025-signer-noeku"


def _vector_key(name: str) -> ec.EllipticCurvePrivateKey:
    """A fixed key per name: derived from a hash of it, so vectors are reproducible. Test-only keys."""
    seed = int.from_bytes(hashlib.sha256(b"cart-hil signed-v1 vector key: " + name.encode()).digest(), "big")
    n = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551  # order of P-256
    return ec.derive_private_key(seed % (n - 1) + 1, ec.SECP256R1())


def vector_pki() -> tuple[dict[str, x509.Certificate], dict[str, ec.EllipticCurvePrivateKey]]:
    """The lab PKI's layout with fixed keys and serials, plus a leaf without codeSigning."""
    layout = pki.layout(pki.VECTOR_ROOTS)
    # serials follow this order: the time leaves come last, so the older certificates keep theirs
    specs = ([s for s in layout if s.kind != "time"]
             + [pki.CertSpec(NOEKU_SIGNER, "signer", pki.intermediate_of(pki.ROOT_OLD),
                             (ExtendedKeyUsageOID.SERVER_AUTH,))]
             + [s for s in layout if s.kind == "time"])
    certs: dict[str, x509.Certificate] = {}
    keys: dict[str, ec.EllipticCurvePrivateKey] = {}
    for i, spec in enumerate(specs):
        keys[spec.name] = key = _vector_key(spec.name)
        issuer_key = keys[spec.issuer] if spec.issuer else key
        certs[spec.name] = pki.issue(spec, key.public_key(), issuer_key=issuer_key,
                                     issuer_cert=certs.get(spec.issuer) if spec.issuer else None,
                                     serial=0x5EC0_0000 + i, deterministic=True)
    return certs, keys


def _dated_signer(root: str, not_before: int, not_after: int, serial: int,
                  ) -> tuple[ec.EllipticCurvePrivateKey, list[x509.Certificate]]:
    """A fixed-key code-signing leaf under `<root>-int` with its own validity (LabPki.issue_signer's
    deterministic twin, for the vectors)."""
    certs, keys = vector_pki()
    inter = pki.intermediate_of(root)
    name = f"{pki.signer_of(root)}-{not_before}-{not_after}"
    key = _vector_key(name)
    leaf = pki.issue(pki.CertSpec(name, "signer", inter, (ExtendedKeyUsageOID.CODE_SIGNING,)), key.public_key(),
                     issuer_key=keys[inter], issuer_cert=certs[inter], serial=serial,
                     not_before=dt.datetime.fromtimestamp(not_before, dt.UTC),
                     not_after=dt.datetime.fromtimestamp(not_after, dt.UTC), deterministic=True)
    return key, [leaf, certs[inter]]


_FUTURE_SIGNER = (VECTOR_NOW + 30 * 86400, int(pki.NOT_AFTER.timestamp()))  # not yet valid at VECTOR_NOW
_PAST_SIGNER = (int(pki.NOT_BEFORE.timestamp()), VECTOR_NOW - 30 * 86400)  # expired at VECTOR_NOW


def _vectors() -> list[dict]:
    certs, keys = vector_pki()
    both = list(pki.TRUSTED_ROOTS)
    ctx = {"trust_store": both, "hardware_revision": VECTOR_HARDWARE, "running_version": VECTOR_RUNNING,
           "now": VECTOR_NOW, "security_counter": 0}

    def chain(signer: str) -> list[x509.Certificate]:
        return [certs[signer], certs[signer.rsplit("-signer", 1)[0] + "-int"]]

    def build(signer: str = pki.signer_of(pki.ROOT_OLD), **kw) -> bytes:
        args = dict(version=VECTOR_VERSION, hardware=["rev-b", VECTOR_HARDWARE], required_ca=pki.ROOT_OLD,
                    issued=VECTOR_ISSUED, expires=VECTOR_EXPIRES, security_counter=1, signer_key=keys[signer],
                    chain=chain(signer), build_info=VECTOR_BUILD_INFO)
        args.update(kw)
        return build_signed_image(VECTOR_PAYLOAD, **args)

    # hand-made defects in the signed TLVs, each correctly signed unless said otherwise
    manifest = make_manifest(VECTOR_PAYLOAD, version=VECTOR_VERSION, hardware=["rev-b", VECTOR_HARDWARE],
                             required_ca=pki.ROOT_OLD, issued=VECTOR_ISSUED, expires=VECTOR_EXPIRES,
                             security_counter=1)
    signer = pki.signer_of(pki.ROOT_OLD)
    der = [c.public_bytes(serialization.Encoding.DER) for c in chain(signer)]
    base = [(TLV_FW_VERSION, VECTOR_VERSION.encode()), (TLV_PAYLOAD_SHA256, hashlib.sha256(VECTOR_PAYLOAD).digest())]

    def raw(manifest_bytes: bytes, *, head: Sequence[tuple[int, bytes]] = (), extra: Sequence[tuple[int, bytes]] = (),
            cert_ders: Sequence[bytes] = der) -> bytes:
        sig = sign_manifest(manifest_bytes, keys[signer])
        return assemble(VECTOR_PAYLOAD, [*base, *head, (TLV_MANIFEST, manifest_bytes), (TLV_SIGNATURE, sig),
                                         *[(TLV_CERT, d) for d in cert_ders], *extra])

    def edited(**changes) -> bytes:
        m = dict(manifest, **changes)
        return canonical_json({k: v for k, v in m.items() if v is not _DROP})

    good = canonical_json(manifest)
    v = []

    def add(file, data, reason, description, **context):
        v.append({"file": file, "data": data, "reason": reason, "description": description,
                  "context": dict(ctx, **context)})

    add("valid.img", build(), "ok", "signed by lab-root-2025's signer; device trusts old and new roots")
    add("valid-new-ca.img", build(pki.signer_of(pki.ROOT_NEW), required_ca=pki.ROOT_NEW), "ok",
        "signed under lab-root-2026 during the overlap window")
    add("valid-old-ca-only.img", build(), "ok", "a cart that has only the old root", trust_store=[pki.ROOT_OLD])
    add("unsigned.img", build(tamper="unsigned"), "unsigned", "a plain v1 image: no manifest, no signature")
    add("manifest-without-signature.img", assemble(VECTOR_PAYLOAD, [*base, (TLV_MANIFEST, good)]), "unsigned",
        "a manifest but no SIGNATURE TLV")
    add("untrusted-signer.img", build(pki.signer_of(pki.ROGUE_ROOT)), "untrusted signer",
        "signed by rogue-root's chain, claiming required_ca lab-root-2025")
    add("bad-signature.img", build(tamper="bad-signature"), "bad signature", "a corrupted signature")
    add("payload-changed.img", build(tamper="payload-after-signing"), "payload hash mismatch",
        "one payload bit flipped after signing")
    add("manifest-changed.img", build(tamper="manifest-after-signing"), "bad signature",
        "the manifest's expires moved after signing")
    add("wrong-hardware.img", build(hardware=["rev-a", "rev-b"]), "wrong hardware",
        "built for rev-a and rev-b, the cart is rev-c")
    add("same-version.img", build(version=VECTOR_RUNNING), "same version", "the version the cart runs")
    add("lower-version.img", build(version="1.3.9"), "lower version", "a downgrade")
    add("lower-prerelease.img", build(version="1.4.2-rc.1"), "lower version",
        "a pre-release of the running version is lower")
    add("size-mismatch.img", build(tamper="size-mismatch"), "size mismatch",
        "bytes appended to the payload after signing, header and hash TLV fixed up")
    add("hash-mismatch.img", build(tamper="hash-mismatch"), "payload hash mismatch",
        "PAYLOAD_SHA256 TLV altered")
    add("manifest-hash-mismatch.img", raw(edited(payload_sha256="00" * 32)), "payload hash mismatch",
        "a signed manifest naming another payload")
    add("version-mismatch.img", build(tamper="version-mismatch"), "manifest mismatch",
        "FW_VERSION TLV differs from the signed firmware_version")
    add("truncated.img", build(tamper="truncated"), "malformed: bad size", "a download cut in the payload")
    add("truncated-tlv.img", build()[:-10], "malformed: bad size", "cut inside the last certificate")
    add("empty.img", b"", "malformed: bad magic", "zero bytes")
    add("trailing-bytes.img", build() + b"\x00" * 16, "malformed: trailing bytes",
        "bytes after the image: a download must be exactly the image")
    add("expired.img", build(issued=VECTOR_NOW - 100 * 86400, expires=VECTOR_NOW - 86400), "expired",
        "expired a day before the cart's now")
    add("not-yet-valid.img", build(issued=VECTOR_NOW + 12 * 3600, expires=VECTOR_NOW + 90 * 86400),
        "not yet valid", "issued 12 h after the cart's now (a cart clock running behind)")
    add("missing-ca.img", build(pki.signer_of(pki.ROOT_NEW), required_ca=pki.ROOT_NEW), "missing ca",
        "needs lab-root-2026; the cart has only lab-root-2025", trust_store=[pki.ROOT_OLD])
    add("wrong-required-ca.img", build(required_ca=pki.ROOT_NEW), "untrusted signer",
        "chain ends at lab-root-2025 but the manifest requires lab-root-2026")
    add("no-codesigning-eku.img", build(NOEKU_SIGNER), "untrusted signer",
        "the leaf has serverAuth, not codeSigning")
    add("no-certs.img", build(tamper="no-certs"), "untrusted signer", "no CERT TLVs")
    add("leaf-only.img", raw(good, cert_ders=der[:1]), "untrusted signer", "the intermediate left out")
    add("security-counter.img", build(), "security counter", "manifest counter 1 below the cart's 2",
        security_counter=2)
    add("manifest-not-json.img", raw(b"{not json"), "malformed: manifest not json", "signed garbage")
    add("manifest-not-object.img", raw(b"[1,2,3]"), "malformed: manifest not an object", "a JSON array")
    add("manifest-oversize.img", raw(edited(hardware=["rev-c"] * 600)), "malformed: manifest too large",
        "a manifest over 4 KiB")
    add("manifest-missing-field.img", raw(edited(expires=_DROP)), "malformed: manifest missing field",
        "no expires")
    add("manifest-unknown-field.img", raw(edited(debug=True)), "malformed: manifest unknown field",
        "a field v1 does not know")
    add("manifest-bad-type.img", raw(edited(payload_size=str(len(VECTOR_PAYLOAD)))),
        "malformed: manifest payload_size", "payload_size as a string")
    add("manifest-bad-format.img", raw(edited(format=2)), "malformed: manifest format", "format 2")
    add("manifest-not-canonical.img", raw(json.dumps(manifest, sort_keys=True).encode()),
        "malformed: manifest not canonical", "spaces after separators")
    add("duplicate-signature.img", raw(good, extra=[(TLV_SIGNATURE, b"\x30\x06\x02\x01\x01\x02\x01\x01")]),
        "malformed: bad tlv", "two SIGNATURE TLVs (a known type twice)")
    add("bad-build-info.img", raw(good, head=[(TLV_BUILD_INFO, b"{not json")]), "malformed: bad build info",
        "BUILD_INFO (not signed) is not JSON: the bootloader would refuse the slot")
    add("cert-garbage.img", raw(good, cert_ders=[der[0], b"\x30\x03\x02\x01\x00"]), "malformed: cert",
        "a CERT TLV that is not a certificate")
    # retired roots and the signer's own validity
    add("ca-retired.img", build(), "ca retired", "lab-root-2025 retired from exactly the cart's now (until <= now)",
        ca_until={pki.ROOT_OLD: VECTOR_NOW})
    add("valid-ca-retires-later.img", build(), "ok", "lab-root-2025 retires one second after the cart's now",
        ca_until={pki.ROOT_OLD: VECTOR_NOW + 1})
    add("valid-other-ca-retired.img", build(), "ok", "lab-root-2026 is retired; the image needs lab-root-2025",
        ca_until={pki.ROOT_NEW: VECTOR_NOW - 1})
    key, dated = _dated_signer(pki.ROOT_OLD, *_FUTURE_SIGNER, serial=0x5EC0_1000)
    add("signer-not-yet-valid.img", build(signer_key=key, chain=dated), "signer not yet valid",
        "the code-signing leaf's validity starts 30 days after the cart's now")
    key, dated = _dated_signer(pki.ROOT_OLD, *_PAST_SIGNER, serial=0x5EC0_1001)
    add("signer-expired.img", build(signer_key=key, chain=dated), "signer expired",
        "the code-signing leaf expired 30 days before the cart's now")
    return v


_DROP = object()


def _edited(obj: dict, **changes) -> dict:
    return {k: v for k, v in dict(obj, **changes).items() if v is not _DROP}


# time-v1: answers to VECTOR_NONCE from VECTOR_THING; the cart last accepted a time an hour before VECTOR_NOW
VECTOR_NONCE = hashlib.sha256(b"cart-hil time-v1 vector nonce").hexdigest()[:32]
VECTOR_THING = "cart-01"
VECTOR_FLOOR = VECTOR_NOW - 3600
VECTOR_MAX_AHEAD = 10 * 365 * 86400  # what the firmware passes
TIME_FLOOR_MIN = 1767225600  # vrack.ota_verify.TIME_FLOOR_MIN (2026-01-01T00:00:00Z)


def _time_vectors() -> list[dict]:
    certs, keys = vector_pki()
    ctx = {"trust_store": list(pki.TRUSTED_ROOTS), "nonce": VECTOR_NONCE, "thing": VECTOR_THING,
           "floor": VECTOR_FLOOR, "max_ahead_s": VECTOR_MAX_AHEAD}

    def signer(root: str, ca: str | None = None, leaf: str | None = None) -> tuple:
        leaf = leaf or pki.time_signer_of(root)
        return (ca or root, keys[leaf], [certs[leaf], certs[pki.intermediate_of(root)]])

    old, new, rogue = signer(pki.ROOT_OLD), signer(pki.ROOT_NEW), signer(pki.ROGUE_ROOT)
    both = [old, new]

    def answer(signers=both, *, nonce=VECTOR_NONCE, thing=VECTOR_THING, time=VECTOR_NOW) -> bytes:
        return make_time_answer(nonce=nonce, thing=thing, time=time, signers=signers)

    body = time_body(nonce=VECTOR_NONCE, thing=VECTOR_THING, time=VECTOR_NOW)
    good = json.loads(answer([old]))
    entry = good["signatures"][0]

    def signed(raw_body: bytes) -> bytes:
        """`raw_body` signed correctly by lab-root-2025's time leaf: the defect is in the body."""
        return time_answer(raw_body, [time_signature(raw_body, *old)])

    def envelope(**changes) -> bytes:
        return canonical_json(_edited(good, **changes))

    def with_entry(**changes) -> bytes:
        return envelope(signatures=[_edited(entry, **changes)])

    body_obj = json.loads(body)
    v = []

    def add(file, data, reason, description, time=None, **context):
        v.append({"file": file, "data": data, "reason": reason, "time": time, "description": description,
                  "context": dict(ctx, **context)})

    add("valid.json", answer(), "ok", "signed by both lab roots' time leaves", time=VECTOR_NOW)
    add("valid-old-ca-only.json", answer([old]), "ok", "one signature; a cart with only lab-root-2025",
        time=VECTOR_NOW, trust_store=[pki.ROOT_OLD])
    add("valid-new-ca-only.json", answer([new]), "ok", "one signature, under lab-root-2026", time=VECTOR_NOW)
    add("valid-at-floor.json", answer(), "ok", "the time equals the last accepted one (not earlier)",
        time=VECTOR_NOW, floor=VECTOR_NOW)
    add("valid-after-untrusted-entry.json", answer([rogue, old]), "ok",
        "a rogue-root entry first, skipped: the lab-root-2025 entry vouches", time=VECTOR_NOW)
    add("valid-old-ca-retired.json", answer(), "ok",
        "lab-root-2025 retired before the answer's time; the lab-root-2026 entry vouches", time=VECTOR_NOW,
        ca_until={pki.ROOT_OLD: VECTOR_NOW - 1})
    far = TIME_FLOOR_MIN + VECTOR_MAX_AHEAD
    add("valid-far-ahead.json", answer(time=far), "ok",
        "a cart that never accepted a time: as far ahead as 2026-01-01 + 10 years", time=far, floor=0)
    add("unsigned.json", time_answer(body, []), "unsigned", "an empty signatures list")
    add("rogue.json", answer([rogue]), "untrusted signer", "signed under rogue-root, named as such")
    add("rogue-claims-lab-root.json", answer([signer(pki.ROGUE_ROOT, ca=pki.ROOT_OLD)]), "untrusted signer",
        "rogue-root's chain, naming lab-root-2025")
    add("code-signing-leaf.json", answer([signer(pki.ROOT_OLD, leaf=pki.signer_of(pki.ROOT_OLD))]),
        "untrusted signer", "signed by the code-signing leaf: a time answer needs timeStamping")
    add("retired-ca.json", answer([old]), "untrusted signer", "the only signature's root retired at the answer's time",
        ca_until={pki.ROOT_OLD: VECTOR_NOW})
    add("missing-ca.json", answer([new]), "untrusted signer", "signed under lab-root-2026; the cart has only 2025",
        trust_store=[pki.ROOT_OLD])
    add("leaf-only.json", with_entry(chain=entry["chain"][:1]), "untrusted signer", "the intermediate left out")
    late = int(dt.datetime(2050, 6, 1, tzinfo=dt.UTC).timestamp())
    add("beyond-certificates.json", answer(time=late), "untrusted signer",
        "a time after the time leaves expire (2049-12-31): the chain is validated at the answer's time",
        floor=late - 86400)
    forger = _vector_key("time-v1 forger")
    add("forged.json", answer([(pki.ROOT_OLD, forger, old[2])]), "bad signature",
        "lab-root-2025's real chain, signed by another key")
    add("bad-signature.json", with_entry(sig=_b64(_flip(base64.b64decode(entry["sig"]), -1))), "bad signature",
        "one bit of the signature flipped")
    bad_first = json.loads(answer())
    bad_first["signatures"][0]["sig"] = _b64(_flip(base64.b64decode(bad_first["signatures"][0]["sig"]), -1))
    add("first-trusted-entry-bad.json", canonical_json(bad_first), "bad signature",
        "the first entry a trusted root vouches for has a bad signature; a good second one does not help")
    add("nonce-mismatch.json", answer(nonce="0" * 32), "nonce mismatch", "an answer to another request (a replay)")
    add("wrong-thing.json", answer(thing="cart-02"), "wrong thing", "the answer to another cart's nonce")
    add("earlier-than-floor.json", answer(time=VECTOR_FLOOR - 1), "earlier than last accepted",
        "one second before the last accepted time")
    add("from-the-future.json", answer(time=VECTOR_FLOOR + VECTOR_MAX_AHEAD + 1), "from the future",
        "more than 10 years after the last accepted time")
    add("from-the-future-low-floor.json", answer(time=far + 1), "from the future",
        "floor 0: the limit counts from 2026-01-01", floor=0)
    add("empty.json", b"", "malformed: answer not json", "zero bytes")
    add("not-json.json", b"{not json", "malformed: answer not json", "not JSON")
    add("not-object.json", b"[1,2,3]", "malformed: answer not an object", "a JSON array")
    add("missing-field.json", envelope(signatures=_DROP), "malformed: answer missing field", "no signatures")
    add("unknown-field.json", envelope(debug=True), "malformed: answer unknown field", "a field v1 does not know")
    add("bad-format.json", envelope(format=2), "malformed: answer format", "format 2")
    add("signed-not-base64.json", envelope(signed="not base64!"), "malformed: answer signed", "signed is not base64")
    add("signatures-not-list.json", envelope(signatures=entry), "malformed: answer signatures",
        "signatures is an object")
    add("too-many-signatures.json", envelope(signatures=[entry] * 5), "malformed: too many signatures",
        "five signature entries")
    add("signature-entry-missing-chain.json", with_entry(chain=_DROP), "malformed: signature entry", "no chain")
    add("signature-bad-ca-name.json", with_entry(ca="../root"), "malformed: signature ca", "not a CA name")
    add("signature-too-short.json", with_entry(sig=_b64(b"\x30\x03\x02\x01")), "malformed: signature size",
        "a 4-byte signature")
    add("chain-empty.json", with_entry(chain=[]), "malformed: signature chain", "no certificates")
    add("too-many-certs.json", with_entry(chain=entry["chain"] + entry["chain"][1:] * 4), "malformed: too many certs",
        "five certificates")
    add("cert-garbage.json", with_entry(chain=[entry["chain"][0], _b64(b"\x30\x03\x02\x01\x00")]),
        "malformed: cert", "a chain entry that is not a certificate")
    add("body-not-json.json", signed(b"{not json"), "malformed: time body not json", "signed garbage")
    add("body-not-canonical.json", signed(json.dumps(body_obj, sort_keys=True).encode()),
        "malformed: time body not canonical", "spaces after separators")
    add("body-unknown-field.json", signed(canonical_json(_edited(body_obj, debug=1))),
        "malformed: time body unknown field", "a field v1 does not know")
    add("body-missing-field.json", signed(canonical_json(_edited(body_obj, thing=_DROP))),
        "malformed: time body missing field", "no thing")
    add("body-bad-format.json", signed(canonical_json(_edited(body_obj, format=2))), "malformed: time body format",
        "format 2")
    add("body-nonce-uppercase.json", signed(canonical_json(_edited(body_obj, nonce=VECTOR_NONCE.upper()))),
        "malformed: time body nonce", "the nonce in upper case")
    add("body-bad-thing.json", signed(canonical_json(_edited(body_obj, thing="cart 01"))),
        "malformed: time body thing", "a space in the thing name")
    add("body-time-float.json", signed(canonical_json(_edited(body_obj, time=VECTOR_NOW + 0.5))),
        "malformed: time body time", "a fractional time")
    add("body-time-negative.json", signed(canonical_json(_edited(body_obj, time=-1))), "malformed: time body time",
        "a negative time")
    padded = answer()
    add("oversized.json", padded + b" " * (TIME_ANSWER_MAX + 1 - len(padded)), "malformed: answer too large",
        "a valid answer padded with spaces to 8193 bytes")
    return v


# trust-v1: CA updates at VECTOR_NOW; a cart that trusts lab-root-2025 gets lab-root-2026
VECTOR_OVERLAP = 90 * 86400


def _trust_vectors() -> list[dict]:
    certs, keys = vector_pki()
    ctx = {"trust_store": [pki.ROOT_OLD], "now": VECTOR_NOW}

    def pem(name: str) -> str:
        return certs[name].public_bytes(serialization.Encoding.PEM).decode("ascii")

    def chain(leaf: str) -> list[x509.Certificate]:
        root = next(r for r in pki.ROOTS if leaf.startswith(f"{r}-"))
        return [certs[leaf], certs[pki.intermediate_of(root)]]

    old_signer = pki.signer_of(pki.ROOT_OLD)

    def bundle(add=None, *, signer=old_signer, signer_key=None, signer_chain=None, **kw) -> bytes:
        args = dict(required_ca=pki.ROOT_OLD, issued=VECTOR_ISSUED, expires=VECTOR_EXPIRES, overlap_s=VECTOR_OVERLAP,
                    signer_key=signer_key or keys[signer], chain=signer_chain or chain(signer))
        args.update(kw)
        return build_trust_bundle(add or {pki.ROOT_NEW: pem(pki.ROOT_NEW)}, **args)

    good = json.loads(bundle())
    body_obj = json.loads(base64.b64decode(good["body"]))

    def envelope(**changes) -> bytes:
        return canonical_json(_edited(good, **changes))

    def signed(raw_body: bytes) -> bytes:
        """`raw_body` signed correctly by lab-root-2025's code-signing leaf: the defect is in the body."""
        return trust_bundle(raw_body, sign_manifest(raw_body, keys[old_signer]), good["chain"])

    def body(**changes) -> bytes:
        return signed(canonical_json(_edited(body_obj, **changes)))

    new_entry = {"name": pki.ROOT_NEW, "pem": pem(pki.ROOT_NEW)}
    expired_root_key = _vector_key("trust-v1 expired root")
    expired_root = pki.issue(pki.CertSpec("lab-root-2019", "root", None), expired_root_key.public_key(),
                             issuer_key=expired_root_key, serial=0x5EC0_2000,
                             not_before=dt.datetime(2019, 1, 1, tzinfo=dt.UTC),
                             not_after=dt.datetime.fromtimestamp(VECTOR_NOW - 86400, dt.UTC), deterministic=True)
    v = []

    def add(file, data, reason, description, **context):
        v.append({"file": file, "data": data, "reason": reason, "description": description,
                  "context": dict(ctx, **context)})

    add("valid.json", bundle(), "ok", "adds lab-root-2026, signed under lab-root-2025 (the cart's only root)")
    add("valid-re-add-both.json", bundle({pki.ROOT_OLD: pem(pki.ROOT_OLD), pki.ROOT_NEW: pem(pki.ROOT_NEW)}), "ok",
        "re-adds lab-root-2025 (kept without retirement) and adds lab-root-2026")
    add("valid-signed-under-new.json", bundle(signer=pki.signer_of(pki.ROOT_NEW), required_ca=pki.ROOT_NEW), "ok",
        "signed under lab-root-2026 for a cart that already has both", trust_store=list(pki.TRUSTED_ROOTS))
    add("valid-other-ca-retired.json", bundle(), "ok", "lab-root-2026 retired in the store; the signer needs 2025",
        trust_store=list(pki.TRUSTED_ROOTS), ca_until={pki.ROOT_NEW: VECTOR_NOW - 1})
    add("missing-ca.json", bundle(signer=pki.signer_of(pki.ROOT_NEW), required_ca=pki.ROOT_NEW), "missing ca",
        "signed under lab-root-2026; the cart has only lab-root-2025")
    add("ca-retired.json", bundle(), "ca retired", "lab-root-2025 retired from exactly now",
        ca_until={pki.ROOT_OLD: VECTOR_NOW})
    key, dated = _dated_signer(pki.ROOT_OLD, *_FUTURE_SIGNER, serial=0x5EC0_1000)
    add("signer-not-yet-valid.json", bundle(signer_key=key, signer_chain=dated), "signer not yet valid",
        "the code-signing leaf's validity starts 30 days after now")
    key, dated = _dated_signer(pki.ROOT_OLD, *_PAST_SIGNER, serial=0x5EC0_1001)
    add("signer-expired.json", bundle(signer_key=key, signer_chain=dated), "signer expired",
        "the code-signing leaf expired 30 days before now")
    add("untrusted-signer.json", bundle(signer=pki.signer_of(pki.ROGUE_ROOT)), "untrusted signer",
        "rogue-root's chain, naming lab-root-2025")
    add("time-leaf-signer.json", bundle(signer=pki.time_signer_of(pki.ROOT_OLD)), "untrusted signer",
        "signed by the time-stamping leaf: a bundle needs codeSigning")
    add("wrong-required-ca.json", bundle(required_ca=pki.ROOT_NEW), "untrusted signer",
        "the chain ends at lab-root-2025 but the body requires lab-root-2026", trust_store=list(pki.TRUSTED_ROOTS))
    add("bad-signature.json", envelope(signature=_b64(_flip(base64.b64decode(good["signature"]), -1))),
        "bad signature", "one bit of the signature flipped")
    add("not-yet-valid.json", bundle(issued=VECTOR_NOW + 12 * 3600), "not yet valid", "issued 12 h after now")
    add("expired.json", bundle(issued=VECTOR_NOW - 86400, expires=VECTOR_NOW), "expired",
        "expires exactly now (exclusive)")
    add("not-a-ca-intermediate.json", bundle({"lab-root-2026-int": pem(pki.intermediate_of(pki.ROOT_NEW))}),
        "not a ca", "an intermediate: not self-signed")
    add("not-a-ca-leaf.json", bundle({"lab-root-2026-signer": pem(pki.signer_of(pki.ROOT_NEW))}), "not a ca",
        "a code-signing leaf")
    add("not-a-ca-garbage.json",
        bundle({"garbage": "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"}),
        "not a ca", "a PEM that does not load")
    add("not-a-ca-expired-root.json",
        bundle({"lab-root-2019": expired_root.public_bytes(serialization.Encoding.PEM).decode("ascii")}),
        "not a ca", "a self-signed root that expired a day before now")
    add("not-a-ca-second-entry.json", bundle({pki.ROOT_NEW: pem(pki.ROOT_NEW), "leaf": pem(old_signer)}),
        "not a ca", "the first entry is a root, the second a leaf")
    add("empty.json", b"", "malformed: bundle not json", "zero bytes")
    add("not-object.json", b"[]", "malformed: bundle not an object", "a JSON array")
    add("missing-field.json", envelope(chain=_DROP), "malformed: bundle missing field", "no chain")
    add("unknown-field.json", envelope(debug=True), "malformed: bundle unknown field", "a field v1 does not know")
    add("bad-format.json", envelope(format=2), "malformed: bundle format", "format 2")
    add("bad-kind.json", envelope(kind="cart-image"), "malformed: bundle kind", "another kind of file")
    add("body-not-base64.json", envelope(body="not base64!"), "malformed: bundle body", "body is not base64")
    add("signature-not-base64.json", envelope(signature=42), "malformed: bundle signature", "a number")
    add("signature-too-short.json", envelope(signature=_b64(b"\x30\x03\x02\x01")), "malformed: signature size",
        "a 4-byte signature")
    add("chain-empty.json", envelope(chain=[]), "malformed: bundle chain", "no certificates")
    add("cert-garbage.json", envelope(chain=[good["chain"][0], _b64(b"\x30\x03\x02\x01\x00")]), "malformed: cert",
        "a chain entry that is not a certificate")
    padded = bundle()
    add("too-large.json", padded + b" " * (BUNDLE_MAX + 1 - len(padded)), "malformed: bundle too large",
        "a valid bundle padded with spaces to 16385 bytes")
    add("body-not-json.json", signed(b"{not json"), "malformed: bundle body not json", "signed garbage")
    add("body-not-canonical.json", signed(json.dumps(body_obj, sort_keys=True).encode()),
        "malformed: bundle body not canonical", "spaces after separators")
    add("body-unknown-field.json", body(debug=1), "malformed: bundle body unknown field", "a field v1 does not know")
    add("body-missing-field.json", body(overlap_s=_DROP), "malformed: bundle body missing field", "no overlap_s")
    add("body-bad-format.json", body(format=2), "malformed: bundle body format", "format 2")
    add("add-empty.json", body(add=[]), "malformed: bundle body add", "nothing to add")
    add("add-three.json", body(add=[new_entry, dict(new_entry, name="b"), dict(new_entry, name="c")]),
        "malformed: bundle body add", "three roots (at most two)")
    add("add-duplicate-name.json", body(add=[new_entry, new_entry]), "malformed: bundle body add",
        "the same name twice")
    add("add-bad-name.json", body(add=[dict(new_entry, name="../root")]), "malformed: bundle body add",
        "not a CA name")
    add("expires-before-issued.json", body(expires=VECTOR_ISSUED), "malformed: bundle body expires before issued",
        "expires == issued")
    add("overlap-too-long.json", body(overlap_s=OVERLAP_MAX + 1), "malformed: bundle body overlap_s",
        "an overlap of more than 10 years")
    add("bad-required-ca.json", body(required_ca=""), "malformed: bundle body required_ca", "an empty name")
    return v


def _write_vector_set(out_dir: str | Path, fmt: str, reasons: Sequence[str], vectors: list[dict],
                      roots: Sequence[str], extra_fields: Sequence[str] = ()) -> dict:
    """One published set: a file per vector, the roots' PEMs (for the contexts' trust stores), and
    vectors.json. Deterministic: the same inputs give the same bytes."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    certs, _ = vector_pki()
    pems = {}
    for name in roots:
        pems[name] = f"{name}.pem"
        (out / pems[name]).write_bytes(certs[name].public_bytes(serialization.Encoding.PEM))
    entries = []
    for vec in vectors:
        data = vec["data"]
        (out / vec["file"]).write_bytes(data)
        entry = {"file": vec["file"], "ok": vec["reason"] == "ok", "reason": vec["reason"]}
        entry.update((k, vec[k]) for k in extra_fields)
        entry.update(context=vec["context"], size=len(data), sha256=hashlib.sha256(data).hexdigest(),
                     description=vec["description"])
        entries.append(entry)
    now_utc = dt.datetime.fromtimestamp(VECTOR_NOW, dt.UTC).isoformat()
    doc = {"format": fmt, "reasons": list(reasons), "now_utc": now_utc, "roots": pems, "vectors": entries}
    (out / "vectors.json").write_text(json.dumps(doc, indent=2) + "\n")
    return doc


def write_test_vectors(out_dir: str | Path) -> dict:
    """signed-v1: the images, the trusted roots' PEMs and vectors.json into out_dir; deterministic."""
    return _write_vector_set(out_dir, "cart-image-signed-v1", REASONS, _vectors(), pki.TRUSTED_ROOTS)


def write_time_vectors(out_dir: str | Path) -> dict:
    """time-v1: time answers (MQTT payloads); `time` is the accepted time of an ok vector."""
    return _write_vector_set(out_dir, "cart-time-answer-v1", TIME_REASONS, _time_vectors(), pki.TRUSTED_ROOTS,
                             extra_fields=("time",))


def write_trust_vectors(out_dir: str | Path) -> dict:
    """trust-v1: trust bundles (CA-update files)."""
    return _write_vector_set(out_dir, "cart-trust-bundle-v1", BUNDLE_REASONS, _trust_vectors(), pki.TRUSTED_ROOTS)


VECTOR_SETS = {"signed-v1": write_test_vectors, "time-v1": write_time_vectors, "trust-v1": write_trust_vectors}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m harness.image",
                                 description="signed images, time answers, trust bundles: vectors and inspection")
    sub = ap.add_subparsers(dest="cmd", required=True)
    vec = sub.add_parser("vectors", help="write the published test vectors (deterministic)")
    vec.add_argument("--set", choices=[*VECTOR_SETS, "all"], default="signed-v1",
                     help="which set (default signed-v1); 'all' writes every set into DIR/<set>/")
    vec.add_argument("dir", type=Path, help="output directory, e.g. tests/vectors/signed-v1 (or tests/vectors)")
    show = sub.add_parser("show", help="print one image's manifest and chain")
    show.add_argument("file", type=Path)
    a = ap.parse_args(sys.argv[1:] if argv is None else argv)
    if a.cmd == "vectors":
        sets = VECTOR_SETS if a.set == "all" else {a.set: VECTOR_SETS[a.set]}
        for name, write in sets.items():
            out = a.dir / name if a.set == "all" else a.dir
            print(f"wrote {len(write(out)['vectors'])} {name} vectors to {out}")
        return 0
    try:
        img = parse_image(a.file.read_bytes())
    except ImageFormatError as exc:
        print(f"not an image: {exc}")
        return 1
    print(f"fw={img.version} payload={len(img.payload)} hash={'ok' if img.hash_ok else 'MISMATCH'} "
          f"signed={'yes' if img.signed else 'no'} certs={len(img.cert_ders)} size={img.total_size}")
    if img.manifest is not None:
        print("manifest " + canonical_json(img.manifest).decode())
    try:
        for c in img.certificates():
            print(f"cert subject={c.subject.rfc4514_string()} issuer={c.issuer.rfc4514_string()}")
    except ImageFormatError as exc:
        print(str(exc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
