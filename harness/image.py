"""Signed firmware images (docs/image-format.md, "Signed manifest"): the harness's writer and reader.

    build_signed_image(payload, version=..., hardware=[...], required_ca=..., issued=..., expires=...,
                       security_counter=..., signer_key=..., chain=[leaf, intermediate], tamper=None)
    sign_image(unsigned_v1_image, hardware=..., ...)   re-wrap a factory image with a signed manifest
    parse_image(data) -> SignedImage                   inspection (raises ImageFormatError)
    write_test_vectors(dir)                            the published vectors (deterministic)

    python -m harness.image vectors DIR | show FILE

This is the harness's own implementation of the container (it never imports vrack): the
device side parses and verifies with its own code, and both are held to the vectors in
tests/vectors/signed-v1/. Signatures are deterministic ECDSA (RFC 6979), so a build from
the same inputs is byte-for-byte the same image.

`tamper` makes a defective image on purpose, for the negative scenarios; see TAMPERS.
"""

from __future__ import annotations

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

# The device's verdicts (vrack/ota_verify.py), in check order; "malformed" carries ": <detail>".
REASONS = ("malformed", "unsigned", "size mismatch", "payload hash mismatch", "manifest mismatch", "missing ca",
           "untrusted signer", "bad signature", "wrong hardware", "same version", "lower version", "not yet valid",
           "expired", "security counter")

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
    specs = pki.layout() + [pki.CertSpec(NOEKU_SIGNER, "signer", pki.intermediate_of(pki.ROOT_OLD),
                                         (ExtendedKeyUsageOID.SERVER_AUTH,))]
    certs: dict[str, x509.Certificate] = {}
    keys: dict[str, ec.EllipticCurvePrivateKey] = {}
    for i, spec in enumerate(specs):
        keys[spec.name] = key = _vector_key(spec.name)
        issuer_key = keys[spec.issuer] if spec.issuer else key
        certs[spec.name] = pki.issue(spec, key.public_key(), issuer_key=issuer_key,
                                     issuer_cert=certs.get(spec.issuer) if spec.issuer else None,
                                     serial=0x5EC0_0000 + i, deterministic=True)
    return certs, keys


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
    return v


_DROP = object()


def write_test_vectors(out_dir: str | Path) -> dict:
    """Write the vectors, the trusted roots' PEMs and vectors.json into out_dir; deterministic."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    certs, _ = vector_pki()
    roots = {}
    for name in pki.TRUSTED_ROOTS:
        roots[name] = f"{name}.pem"
        (out / roots[name]).write_bytes(certs[name].public_bytes(serialization.Encoding.PEM))
    entries = []
    for vec in _vectors():
        data = vec.pop("data")
        (out / vec["file"]).write_bytes(data)
        entries.append({"file": vec["file"], "ok": vec["reason"] == "ok", "reason": vec["reason"],
                        "context": vec["context"], "size": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                        "description": vec["description"]})
    doc = {"format": "cart-image-signed-v1", "reasons": list(REASONS),
           "now_utc": dt.datetime.fromtimestamp(VECTOR_NOW, dt.UTC).isoformat(),
           "roots": roots, "vectors": entries}
    (out / "vectors.json").write_text(json.dumps(doc, indent=2) + "\n")
    return doc


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) == 2 and args[0] == "vectors":
        doc = write_test_vectors(args[1])
        print(f"wrote {len(doc['vectors'])} vectors to {args[1]}")
        return 0
    if len(args) == 2 and args[0] == "show":
        try:
            img = parse_image(Path(args[1]).read_bytes())
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
    print("usage: python -m harness.image vectors OUT_DIR | show IMAGE", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
