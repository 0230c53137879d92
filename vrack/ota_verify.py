"""Device-side verification of a signed update image (docs/image-format.md, "Signed manifest").

    verify_update(image, trust_store_pems={name: pem}, hardware_revision="rev-c",
                  running_version="1.4.2", now=<epoch s>, security_counter=0) -> Verdict

The OTA agent runs this on a downloaded image *before* it writes anything to the inactive
slot. Checks run in a fixed order and the first failure is the verdict (REASONS, in order):

     1 malformed: <detail>   the container, a TLV, the manifest JSON or a certificate is
                             structurally wrong (details in MALFORMED_DETAILS)
     2 unsigned              no MANIFEST or no SIGNATURE TLV
     3 size mismatch         manifest payload_size != the payload's size
     4 payload hash mismatch SHA-256(payload) != PAYLOAD_SHA256 TLV, or != manifest payload_sha256
     5 manifest mismatch     FW_VERSION TLV != manifest firmware_version
     6 missing ca            manifest required_ca is not (usable) in the trust store
     7 untrusted signer      no chain, the chain does not validate at `now` to a trust-store root
                             (codeSigning EKU on the leaf; webpki CA rules), it ends at another
                             root than required_ca, or the leaf key is not ECDSA P-256
     8 bad signature         the leaf's signature over the MANIFEST bytes does not verify
     9 wrong hardware        hardware_revision not in manifest hardware
    10 same version          manifest firmware_version == running_version (semver precedence)
    11 lower version         manifest firmware_version < running_version
    12 not yet valid         now < issued
    13 expired               now >= expires
    14 security counter      manifest security_counter < the device's security_counter

Steps 1-7 look at a manifest nobody has vouched for yet; that is fine because each of them
can only reject. Everything from 9 on is decided on the authenticated manifest. "missing ca"
comes before the chain check on purpose: a cart lacking the CA an image needs (the CA
rotation case) must say so, not "untrusted signer".

The parser is written for this file and bounds-checks every offset; no input of any size or
content raises (the tests fuzz it). It imports only the standard library and `cryptography`
— never `vrack` or `harness` — so the firmware can carry it the way it carries its own image
parser (a firmware payload may not import the rack's code).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import re
import struct
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.utils import CryptographyDeprecationWarning
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import (
    Criticality,
    ExtensionPolicy,
    PolicyBuilder,
    Store,
    VerificationError,
)

MAGIC = b"CIMG"
FORMAT_VERSION = 1
HEADER = struct.Struct("<4sHHII16s")
HEADER_SIZE = 32
TLV_HEAD = struct.Struct("<HHI")

TLV_FW_VERSION = 0x0001
TLV_PAYLOAD_SHA256 = 0x0002
TLV_BUILD_INFO = 0x0003
TLV_MANIFEST = 0x0010
TLV_SIGNATURE = 0x0011
TLV_CERT = 0x0012
_SINGLE_TLVS = (TLV_FW_VERSION, TLV_PAYLOAD_SHA256, TLV_BUILD_INFO, TLV_MANIFEST, TLV_SIGNATURE)

MANIFEST_FORMAT = 1
MANIFEST_MAX = 4096
MAX_CERTS = 4  # leaf + up to 3 intermediates
CERT_MAX = 4096
SIGNATURE_MIN, SIGNATURE_MAX = 8, 128
MAX_HARDWARE = 32

VERSION_RE = re.compile(r"([0-9]{1,5})\.([0-9]{1,5})\.([0-9]{1,5})(?:-([0-9A-Za-z.-]{1,12}))?")
VERSION_MAX = 32
HARDWARE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,31}")
CA_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
SHA256_HEX_RE = re.compile(r"[0-9a-f]{64}")

MANIFEST_FIELDS = ("format", "firmware_version", "hardware", "payload_size", "payload_sha256", "issued",
                   "expires", "required_ca", "security_counter")

REASONS = (
    "malformed",
    "unsigned",
    "size mismatch",
    "payload hash mismatch",
    "manifest mismatch",
    "missing ca",
    "untrusted signer",
    "bad signature",
    "wrong hardware",
    "same version",
    "lower version",
    "not yet valid",
    "expired",
    "security counter",
)

# "malformed: <detail>": fixed strings, never bytes from the image.
MALFORMED_DETAILS = (
    "not bytes", "erased", "bad magic", "bad size", "bad format version", "bad tlv",
    "trailing bytes", "missing version", "missing hash", "bad fw version", "bad build info", "signature size",
    "cert size", "too many certs", "cert", "manifest too large", "manifest not utf-8", "manifest not json",
    "manifest not an object", "manifest missing field", "manifest unknown field", "manifest format",
    "manifest firmware_version", "manifest hardware", "manifest payload_size", "manifest payload_sha256",
    "manifest issued", "manifest expires", "manifest required_ca", "manifest security_counter",
    "manifest expires before issued", "manifest not canonical", "running version", "now",
    "device security counter",
)


@dataclass(frozen=True)
class Verdict:
    """ok, or the first failed check's reason. `manifest` is set only once the signature has
    verified (reasons "wrong hardware" onwards, and ok): a manifest here is authenticated.
    `ca` is the trust-store root the chain validated to (same condition)."""

    ok: bool
    reason: str
    manifest: dict | None = None
    ca: str | None = None


class _Reject(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _malformed(detail: str) -> _Reject:
    return _Reject(f"malformed: {detail}")


def verify_update(image: bytes, *, trust_store_pems: Mapping[str, str], hardware_revision: str,
                  running_version: str, now: int, security_counter: int = 0) -> Verdict:
    """Verify a downloaded update image on the device; never raises (see the module docstring)."""
    try:
        return _verify(image, trust_store_pems=trust_store_pems, hardware_revision=hardware_revision,
                       running_version=running_version, now=now, security_counter=security_counter)
    except Exception as exc:  # last line of defence: a verifier bug must reject, not crash the agent
        return Verdict(False, f"malformed: internal error {type(exc).__name__}")


def _verify(image, *, trust_store_pems, hardware_revision, running_version, now, security_counter) -> Verdict:
    try:
        return _checks(image, trust_store_pems, hardware_revision, running_version, now, security_counter)
    except _Reject as rej:
        return Verdict(False, rej.reason)


def _checks(image, trust_store_pems, hardware_revision, running_version, now, security_counter) -> Verdict:
    # 1. structure: container, TLVs, manifest, certificates
    data = _as_bytes(image)
    payload, tlvs = _parse_container(data)
    single: dict[int, bytes] = {}
    cert_ders: list[bytes] = []
    for type_, value in tlvs:
        if type_ == TLV_CERT:
            cert_ders.append(value)
        elif type_ in _SINGLE_TLVS:
            if type_ in single:
                raise _malformed("bad tlv")
            single[type_] = value
    if TLV_FW_VERSION not in single:
        raise _malformed("missing version")
    if TLV_PAYLOAD_SHA256 not in single:
        raise _malformed("missing hash")
    tlv_digest = single[TLV_PAYLOAD_SHA256]
    if len(tlv_digest) != 32:
        raise _malformed("bad tlv")
    fw_version = _decode_version(single[TLV_FW_VERSION])
    if TLV_BUILD_INFO in single and not _is_json_object(single[TLV_BUILD_INFO]):
        raise _malformed("bad build info")  # the bootloader would refuse the slot: refuse the download
    manifest_raw = single.get(TLV_MANIFEST)
    signature = single.get(TLV_SIGNATURE)
    manifest = _parse_manifest(manifest_raw) if manifest_raw is not None else None
    if signature is not None and not SIGNATURE_MIN <= len(signature) <= SIGNATURE_MAX:
        raise _malformed("signature size")
    certs = _load_certs(cert_ders)
    running = _version_key(running_version)
    if running is None:
        raise _malformed("running version")
    when = _as_time(now)
    if type(security_counter) is not int:
        raise _malformed("device security counter")

    # 2. unsigned
    if manifest is None or signature is None:
        raise _Reject("unsigned")
    # 3.-5. the payload and the TLVs are the ones the manifest names
    if manifest["payload_size"] != len(payload):
        raise _Reject("size mismatch")
    digest = hashlib.sha256(payload).digest()
    if digest != tlv_digest or digest.hex() != manifest["payload_sha256"]:
        raise _Reject("payload hash mismatch")
    if fw_version != manifest["firmware_version"]:
        raise _Reject("manifest mismatch")
    # 6.-8. trust: the required CA, the chain to it, the signature
    roots = _load_trust_store(trust_store_pems)
    required = manifest["required_ca"]
    if required not in roots:
        raise _Reject("missing ca")
    leaf_key = _validate_chain(certs, roots, required, when)
    try:
        leaf_key.verify(signature, manifest_raw, ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, ValueError, TypeError):
        raise _Reject("bad signature") from None
    # 9.-14. policy, on the authenticated manifest
    reject = _policy(manifest, hardware_revision, running, int(now), security_counter)
    if reject:
        return Verdict(False, reject, manifest, required)
    return Verdict(True, "ok", manifest, required)


def _policy(manifest: dict, hardware_revision, running: tuple, now: int, security_counter: int) -> str | None:
    if not isinstance(hardware_revision, str) or hardware_revision not in manifest["hardware"]:
        return "wrong hardware"
    offered = _version_key(manifest["firmware_version"])
    if offered == running:
        return "same version"
    if offered < running:
        return "lower version"
    if now < manifest["issued"]:
        return "not yet valid"
    if now >= manifest["expires"]:
        return "expired"
    if manifest["security_counter"] < security_counter:
        return "security counter"
    return None


# --- container ---------------------------------------------------------------------------------


def _as_bytes(image) -> bytes:
    if isinstance(image, bytes):
        return image
    if isinstance(image, bytearray | memoryview):
        try:
            return bytes(memoryview(image).cast("B"))
        except (TypeError, ValueError):
            raise _malformed("not bytes") from None
    raise _malformed("not bytes")


def _parse_container(data: bytes) -> tuple[bytes, list[tuple[int, bytes]]]:
    """(payload, [(type, value)]) of a v1 container that fills `data` exactly."""
    n = len(data)
    if n >= 4 and data[:4] == b"\xff\xff\xff\xff":
        raise _malformed("erased")
    if data[:4] != MAGIC:
        raise _malformed("bad magic")
    if n < HEADER_SIZE:
        raise _malformed("bad size")
    _, fmt, header_size, payload_size, tlv_size, _ = HEADER.unpack_from(data, 0)
    if fmt != FORMAT_VERSION:
        raise _malformed("bad format version")
    if header_size != HEADER_SIZE or payload_size == 0:
        raise _malformed("bad size")
    total = HEADER_SIZE + payload_size + tlv_size
    if total > n:
        raise _malformed("bad size")
    if total < n:
        raise _malformed("trailing bytes")
    tlvs = []
    pos = HEADER_SIZE + payload_size
    while pos < total:
        if total - pos < TLV_HEAD.size:
            raise _malformed("bad tlv")
        type_, _flags, length = TLV_HEAD.unpack_from(data, pos)
        pos += TLV_HEAD.size
        if length > total - pos:
            raise _malformed("bad tlv")
        tlvs.append((type_, data[pos:pos + length]))
        pos += length
    return data[HEADER_SIZE:HEADER_SIZE + payload_size], tlvs


def _decode_version(raw: bytes) -> str:
    if len(raw) > VERSION_MAX:
        raise _malformed("bad fw version")
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise _malformed("bad fw version") from None
    if not VERSION_RE.fullmatch(text):
        raise _malformed("bad fw version")
    return text


def _is_json_object(raw: bytes) -> bool:
    try:
        return isinstance(json.loads(raw.decode("utf-8")), dict)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return False


# --- manifest ----------------------------------------------------------------------------------


def _no_duplicate_keys(pairs):
    obj = {}
    for k, v in pairs:
        if k in obj:
            raise ValueError("duplicate key")
        obj[k] = v
    return obj


def _no_constants(name):
    raise ValueError(f"non-finite number {name}")


def _int_in(value, lo: int, hi: int) -> bool:
    return type(value) is int and lo <= value < hi


def _parse_manifest(raw: bytes) -> dict:
    if len(raw) > MANIFEST_MAX:
        raise _malformed("manifest too large")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _malformed("manifest not utf-8") from None
    try:
        obj = json.loads(text, object_pairs_hook=_no_duplicate_keys, parse_constant=_no_constants)
    except (ValueError, RecursionError):
        raise _malformed("manifest not json") from None
    if not isinstance(obj, dict):
        raise _malformed("manifest not an object")
    for key in MANIFEST_FIELDS:
        if key not in obj:
            raise _malformed("manifest missing field")
    if len(obj) != len(MANIFEST_FIELDS):
        raise _malformed("manifest unknown field")
    if obj["format"] != MANIFEST_FORMAT or type(obj["format"]) is not int:
        raise _malformed("manifest format")
    v = obj["firmware_version"]
    if not isinstance(v, str) or len(v) > VERSION_MAX or not VERSION_RE.fullmatch(v):
        raise _malformed("manifest firmware_version")
    hw = obj["hardware"]
    if not isinstance(hw, list) or not 1 <= len(hw) <= MAX_HARDWARE or not all(
            isinstance(h, str) and HARDWARE_RE.fullmatch(h) for h in hw):
        raise _malformed("manifest hardware")
    if not _int_in(obj["payload_size"], 1, 2**32):
        raise _malformed("manifest payload_size")
    if not isinstance(obj["payload_sha256"], str) or not SHA256_HEX_RE.fullmatch(obj["payload_sha256"]):
        raise _malformed("manifest payload_sha256")
    if not _int_in(obj["issued"], 0, 2**63):
        raise _malformed("manifest issued")
    if not _int_in(obj["expires"], 0, 2**63):
        raise _malformed("manifest expires")
    if obj["expires"] <= obj["issued"]:
        raise _malformed("manifest expires before issued")
    if not isinstance(obj["required_ca"], str) or not CA_NAME_RE.fullmatch(obj["required_ca"]):
        raise _malformed("manifest required_ca")
    if not _int_in(obj["security_counter"], 0, 2**32):
        raise _malformed("manifest security_counter")
    if json.dumps(obj, sort_keys=True, separators=(",", ":")).encode("utf-8") != raw:
        raise _malformed("manifest not canonical")
    return obj


# --- versions ----------------------------------------------------------------------------------


def _version_key(text) -> tuple | None:
    """Semantic-version precedence key of MAJOR.MINOR.PATCH[-pre], or None if not a version."""
    if not isinstance(text, str) or len(text) > VERSION_MAX:
        return None
    m = VERSION_RE.fullmatch(text)
    if not m:
        return None
    core = (int(m.group(1)), int(m.group(2)), int(m.group(3)))
    if m.group(4) is None:
        return (*core, (1,))  # a release sorts after all of its pre-releases
    ids = tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in m.group(4).split("."))
    return (*core, (0, *ids))


# --- trust -------------------------------------------------------------------------------------


def _as_time(now) -> _dt.datetime:
    """`now` (epoch seconds, int or float) as an aware UTC datetime, whole seconds."""
    if isinstance(now, bool) or not isinstance(now, int | float) or not 0 <= now < 253402300800:  # to 9999
        raise _malformed("now")
    return _dt.datetime.fromtimestamp(int(now), _dt.UTC)


_CERT_ERRORS = (ValueError, TypeError, x509.InvalidVersion)  # InvalidVersion is not a ValueError


def _load_certs(ders: list[bytes]) -> list[x509.Certificate]:
    if len(ders) > MAX_CERTS:
        raise _malformed("too many certs")
    certs = []
    for der in ders:
        if not 0 < len(der) <= CERT_MAX:
            raise _malformed("cert size")
        try:
            # what cryptography only warns about today (a non-positive serial, RFC 5280) it will refuse
            # tomorrow: refuse it now, so the verdict does not change with a library upgrade
            with warnings.catch_warnings():
                warnings.simplefilter("error", CryptographyDeprecationWarning)
                certs.append(x509.load_der_x509_certificate(der))
        except (*_CERT_ERRORS, CryptographyDeprecationWarning):
            raise _malformed("cert") from None
    return certs


def _load_trust_store(pems) -> dict[str, x509.Certificate]:
    """{name: root} for every entry whose PEM loads; an unusable entry counts as absent."""
    roots: dict[str, x509.Certificate] = {}
    if not isinstance(pems, Mapping):
        return roots
    for name, pem in pems.items():
        if not isinstance(name, str):
            continue
        if isinstance(pem, str):
            pem = pem.encode("ascii", "ignore")
        if not isinstance(pem, bytes) or not pem:
            continue
        try:
            roots[name] = x509.load_pem_x509_certificate(pem)
        except _CERT_ERRORS:
            continue
    return roots


def _require_code_signing(_policy, _cert, eku) -> None:
    if ExtendedKeyUsageOID.CODE_SIGNING not in eku:
        raise ValueError("the leaf's extended key usage lacks codeSigning")


def _require_digital_signature(_policy, _cert, ku) -> None:
    if not ku.digital_signature:
        raise ValueError("the leaf's key usage lacks digitalSignature")


def _forbid_ca(_policy, _cert, bc) -> None:
    if bc is not None and bc.ca:
        raise ValueError("the leaf is a CA")


_EE_POLICY = (ExtensionPolicy.permit_all()
              .require_present(x509.ExtendedKeyUsage, Criticality.AGNOSTIC, _require_code_signing)
              .require_present(x509.KeyUsage, Criticality.AGNOSTIC, _require_digital_signature)
              .may_be_present(x509.BasicConstraints, Criticality.AGNOSTIC, _forbid_ca))


def _validate_chain(certs: list[x509.Certificate], roots: dict[str, x509.Certificate], required: str,
                    when: _dt.datetime) -> ec.EllipticCurvePublicKey:
    """The leaf's public key, if [leaf, intermediates...] validates at `when` to the required root."""
    if not certs:
        raise _Reject("untrusted signer")
    leaf, intermediates = certs[0], certs[1:]
    try:
        verifier = (PolicyBuilder().store(Store(list(roots.values()))).time(when)
                    .extension_policies(ca_policy=ExtensionPolicy.webpki_defaults_ca(), ee_policy=_EE_POLICY)
                    .build_client_verifier())
        chain = verifier.verify(leaf, intermediates).chain
        if chain[-1] != roots[required]:
            raise _Reject("untrusted signer")
        key = leaf.public_key()
    except (VerificationError, UnsupportedAlgorithm, *_CERT_ERRORS):
        raise _Reject("untrusted signer") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise _Reject("untrusted signer")
    return key
