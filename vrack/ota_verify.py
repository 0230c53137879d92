"""Device-side verification: signed update images, signed time answers, trust bundles.

    verify_update(image, trust_store_pems={name: pem}, hardware_revision="rev-c",
                  running_version="1.4.2", now=<epoch s>, security_counter=0, ca_until=None) -> Verdict
    verify_time_answer(payload, nonce=<hex>, thing="cart-01", trust_store_pems={...}, ca_until=None,
                       floor=<epoch s>, max_ahead_s=<s>) -> TimeVerdict
    verify_trust_bundle(data, trust_store_pems={...}, ca_until=None, now=<epoch s>) -> BundleVerdict

(docs/image-format.md: "Signed manifest", "Time answers", "Trust bundles".) `ca_until` maps a
trust-store root to the epoch second from which it is retired (absent: never): a retired root
is left out of every chain validation.

The OTA agent runs verify_update on a downloaded image *before* it writes anything to the
inactive slot. Checks run in a fixed order and the first failure is the verdict (REASONS):

     1 malformed: <detail>   the container, a TLV, the manifest JSON or a certificate is
                             structurally wrong (details in MALFORMED_DETAILS)
     2 unsigned              no MANIFEST or no SIGNATURE TLV
     3 size mismatch         manifest payload_size != the payload's size
     4 payload hash mismatch SHA-256(payload) != PAYLOAD_SHA256 TLV, or != manifest payload_sha256
     5 manifest mismatch     FW_VERSION TLV != manifest firmware_version
     6 missing ca            manifest required_ca is not (usable) in the trust store
     7 ca retired            required_ca is in the store but retired (ca_until <= now)
     8 signer not yet valid  the chain validates to required_ca at some instant, but at `now` one
     9 signer expired        of its certificates (root included) is not yet / no longer valid
    10 untrusted signer      anything else wrong with the chain: it does not validate to a
                             trust-store root (codeSigning EKU on the leaf; webpki CA rules), it
                             ends at another root than required_ca, or the leaf key is not P-256
    11 bad signature         the leaf's signature over the MANIFEST bytes does not verify
    12 wrong hardware        hardware_revision not in manifest hardware
    13 same version          manifest firmware_version == running_version (semver precedence)
    14 lower version         manifest firmware_version < running_version
    15 not yet valid         now < issued
    16 expired               now >= expires
    17 security counter      manifest security_counter < the device's security_counter

Steps 1-10 look at a manifest nobody has vouched for yet; that is fine because each of them
can only reject. Everything from 12 on is decided on the authenticated manifest. "missing ca"
comes before the chain check on purpose: a cart lacking the CA an image needs (the CA
rotation case) must say so, not "untrusted signer"; likewise a chain that is fine except for
a certificate's validity at `now` says which way the clock is off.

A time answer (TIME_REASONS) is the server's signed reply to the device's nonce: the only
time the agent validates anything at. A trust bundle (BUNDLE_REASONS) adds roots to the trust
store, signed under a root the cart already trusts.

The parsers are written for this file and bound-check every offset and size; no input of any
size or content raises (the tests fuzz them). It imports only the standard library and
`cryptography` — never `vrack` or `harness` — so the firmware can carry it the way it carries
its own image parser (a firmware payload may not import the rack's code).
"""

from __future__ import annotations

import base64
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
NONCE_RE = re.compile(r"[0-9a-f]{32}")
THING_RE = re.compile(r"[A-Za-z0-9:_-]{1,128}")  # an AWS IoT thing name

MANIFEST_FIELDS = ("format", "firmware_version", "hardware", "payload_size", "payload_sha256", "issued",
                   "expires", "required_ca", "security_counter")

# time answers and trust bundles
TIME_FORMAT = 1
TIME_ANSWER_MAX = 8192  # bytes of the MQTT payload
MAX_SIGNATURES = 4
TIME_FLOOR_MIN = 1767225600  # 2026-01-01T00:00:00Z: "from the future" counts from here at least
TIME_ANSWER_FIELDS = ("format", "signed", "signatures")
TIME_SIGNATURE_FIELDS = ("ca", "sig", "chain")
TIME_BODY_FIELDS = ("format", "nonce", "thing", "time")
BUNDLE_FORMAT = 1
BUNDLE_KIND = "cart-trust-bundle"
BUNDLE_MAX = 16384  # bytes of the file
BUNDLE_FIELDS = ("format", "kind", "body", "signature", "chain")
BUNDLE_BODY_FIELDS = ("add", "expires", "format", "issued", "overlap_s", "required_ca")
BUNDLE_ADD_FIELDS = ("name", "pem")
MAX_ADD = 2
OVERLAP_MAX = 315360000  # 10 years
PEM_MAX = 8192
_EPOCH_MAX = 2**63
_DATETIME_MAX = 253402300800  # 10000-01-01: a later instant is no datetime

_CHAIN_REASONS = ("missing ca", "ca retired", "signer not yet valid", "signer expired", "untrusted signer")

REASONS = (
    "malformed",
    "unsigned",
    "size mismatch",
    "payload hash mismatch",
    "manifest mismatch",
    *_CHAIN_REASONS,
    "bad signature",
    "wrong hardware",
    "same version",
    "lower version",
    "not yet valid",
    "expired",
    "security counter",
)

TIME_REASONS = (
    "malformed",
    "unsigned",
    "untrusted signer",
    "bad signature",
    "nonce mismatch",
    "wrong thing",
    "earlier than last accepted",
    "from the future",
)

BUNDLE_REASONS = (
    "malformed",
    *_CHAIN_REASONS,
    "bad signature",
    "not yet valid",
    "expired",
    "not a ca",
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
    "device security counter", "ca until",
    # time answers
    "answer too large", "answer not json", "answer not an object", "answer missing field", "answer unknown field",
    "answer format", "answer signed", "answer signatures", "too many signatures", "signature entry",
    "signature ca", "signature chain", "time body not json", "time body not an object",
    "time body missing field", "time body unknown field", "time body format", "time body nonce",
    "time body thing", "time body time", "time body not canonical", "floor", "max ahead",
    # trust bundles
    "bundle too large", "bundle not json", "bundle not an object", "bundle missing field", "bundle unknown field",
    "bundle format", "bundle kind", "bundle body", "bundle signature", "bundle chain", "bundle body not json",
    "bundle body not an object", "bundle body missing field", "bundle body unknown field", "bundle body format",
    "bundle body add", "bundle body issued", "bundle body expires", "bundle body expires before issued",
    "bundle body overlap_s", "bundle body required_ca", "bundle body not canonical",
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


@dataclass(frozen=True)
class TimeVerdict:
    """ok, or the first failed check's reason (TIME_REASONS); `time` (epoch s) only when ok."""

    ok: bool
    reason: str
    time: int | None = None


@dataclass(frozen=True)
class BundleVerdict:
    """ok, or the first failed check's reason (BUNDLE_REASONS). `body` (the signed BODY as a
    dict) and `ca` (the root it validated to) are set only once the signature has verified."""

    ok: bool
    reason: str
    body: dict | None = None
    ca: str | None = None


class _Reject(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _malformed(detail: str) -> _Reject:
    return _Reject(f"malformed: {detail}")


def verify_update(image: bytes, *, trust_store_pems: Mapping[str, str], hardware_revision: str,
                  running_version: str, now: int, security_counter: int = 0,
                  ca_until: Mapping[str, int] | None = None) -> Verdict:
    """Verify a downloaded update image on the device; never raises (see the module docstring)."""
    try:
        return _verify(image, trust_store_pems=trust_store_pems, hardware_revision=hardware_revision,
                       running_version=running_version, now=now, security_counter=security_counter,
                       ca_until=ca_until)
    except Exception as exc:  # last line of defence: a verifier bug must reject, not crash the agent
        return Verdict(False, f"malformed: internal error {type(exc).__name__}")


def _verify(image, *, trust_store_pems, hardware_revision, running_version, now, security_counter,
            ca_until=None) -> Verdict:
    try:
        return _checks(image, trust_store_pems, hardware_revision, running_version, now, security_counter,
                       ca_until)
    except _Reject as rej:
        return Verdict(False, rej.reason)


def _checks(image, trust_store_pems, hardware_revision, running_version, now, security_counter,
            ca_until) -> Verdict:
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
    until = _ca_until(ca_until)

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
    # 6.-11. trust: the required CA, the chain to it, the signature
    required = manifest["required_ca"]
    leaf_key = _trusted_signer(certs, _load_trust_store(trust_store_pems), until, required, when, _CODE_SIGNING)
    _check_signature(leaf_key, signature, manifest_raw)
    # 12.-17. policy, on the authenticated manifest
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


def _ca_until(ca_until) -> dict[str, int]:
    """{root name: retired-from epoch second}; a value that is not such a second is malformed
    (read as "never retired" it would keep a retired root alive)."""
    if ca_until is None:
        return {}
    if not isinstance(ca_until, Mapping):
        raise _malformed("ca until")
    until = {}
    for name, value in ca_until.items():
        if not _int_in(value, 0, _EPOCH_MAX):
            raise _malformed("ca until")
        until[name] = value
    return until


def _require_eku(usage: x509.ObjectIdentifier):
    def check(_policy, _cert, eku) -> None:
        if usage not in eku:
            raise ValueError(f"the leaf's extended key usage lacks {usage.dotted_string}")
    return check


def _require_digital_signature(_policy, _cert, ku) -> None:
    if not ku.digital_signature:
        raise ValueError("the leaf's key usage lacks digitalSignature")


def _forbid_ca(_policy, _cert, bc) -> None:
    if bc is not None and bc.ca:
        raise ValueError("the leaf is a CA")


def _ee_policy(usage: x509.ObjectIdentifier) -> ExtensionPolicy:
    """The leaf: EKU `usage`, keyUsage digitalSignature, not a CA (permit_all alone checks no EKU)."""
    return (ExtensionPolicy.permit_all()
            .require_present(x509.ExtendedKeyUsage, Criticality.AGNOSTIC, _require_eku(usage))
            .require_present(x509.KeyUsage, Criticality.AGNOSTIC, _require_digital_signature)
            .may_be_present(x509.BasicConstraints, Criticality.AGNOSTIC, _forbid_ca))


_CODE_SIGNING = _ee_policy(ExtendedKeyUsageOID.CODE_SIGNING)  # images and trust bundles
_TIME_STAMPING = _ee_policy(ExtendedKeyUsageOID.TIME_STAMPING)  # time answers


def _validate_chain(certs: list[x509.Certificate], roots: dict[str, x509.Certificate], required: str,
                    when: _dt.datetime, ee_policy: ExtensionPolicy) -> ec.EllipticCurvePublicKey:
    """The leaf's public key, if [leaf, intermediates...] validates at `when` to the required root."""
    if not certs:
        raise _Reject("untrusted signer")
    leaf, intermediates = certs[0], certs[1:]
    try:
        verifier = (PolicyBuilder().store(Store(list(roots.values()))).time(when)
                    .extension_policies(ca_policy=ExtensionPolicy.webpki_defaults_ca(), ee_policy=ee_policy)
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


def _trusted_signer(certs: list[x509.Certificate], roots: dict[str, x509.Certificate], until: dict[str, int],
                    required: str, when: _dt.datetime, ee_policy: ExtensionPolicy) -> ec.EllipticCurvePublicKey:
    """The signer's key, or the chain verdict: missing ca, ca retired, signer not yet valid, signer
    expired, untrusted signer (in that order). Retired roots are out of the validation store."""
    if required not in roots:
        raise _Reject("missing ca")
    now = int(when.timestamp())
    if required in until and until[required] <= now:
        raise _Reject("ca retired")
    active = {name: root for name, root in roots.items() if name not in until or until[name] > now}
    try:
        return _validate_chain(certs, active, required, when, ee_policy)
    except _Reject:
        raise _Reject(_why_untrusted(certs, active, required, when, ee_policy)) from None


def _why_untrusted(certs, roots, required, when, ee_policy) -> str:
    """A chain refused at `when`: is it only the clock? If every certificate (leaf, intermediates,
    the required root) is valid at t* = the latest not-before, and the chain validates at t*, the
    certificates are fine and `when` is outside their common window: before or after it."""
    if not certs:
        return "untrusted signer"
    try:
        group = [*certs, roots[required]]
        start = max(c.not_valid_before_utc for c in group)
        end = min(c.not_valid_after_utc for c in group)
    except _CERT_ERRORS:
        return "untrusted signer"
    if start > end or start <= when <= end:
        return "untrusted signer"
    try:
        _validate_chain(certs, roots, required, start, ee_policy)
    except _Reject:
        return "untrusted signer"
    return "signer not yet valid" if when < start else "signer expired"


def _check_signature(key: ec.EllipticCurvePublicKey, signature: bytes, signed: bytes) -> None:
    try:
        key.verify(signature, signed, ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, ValueError, TypeError):
        raise _Reject("bad signature") from None


# --- signed JSON documents: time answers and trust bundles ---------------------------------------


def _json_fields(raw: bytes, what: str, fields: tuple[str, ...]) -> dict:
    """A UTF-8 JSON object with exactly `fields`; "<what> not json" etc. otherwise."""
    try:
        obj = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys, parse_constant=_no_constants)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise _malformed(f"{what} not json") from None
    return _fields(obj, what, fields)


def _fields(obj, what: str, fields: tuple[str, ...]) -> dict:
    if not isinstance(obj, dict):
        raise _malformed(f"{what} not an object")
    for key in fields:
        if key not in obj:
            raise _malformed(f"{what} missing field")
    if len(obj) != len(fields):
        raise _malformed(f"{what} unknown field")
    return obj


def _canonical(obj: dict, raw: bytes, detail: str) -> None:
    if json.dumps(obj, sort_keys=True, separators=(",", ":")).encode("utf-8") != raw:
        raise _malformed(detail)


def _is_format(value, expected: int) -> bool:
    return type(value) is int and value == expected


def _b64(value, detail: str, max_bytes: int) -> bytes:
    """Strict base64 of at most max_bytes decoded bytes (checked on the text first)."""
    if not isinstance(value, str) or len(value) > 4 * (max_bytes // 3 + 1):
        raise _malformed(detail)
    try:
        data = base64.b64decode(value, validate=True)
    except ValueError:  # binascii.Error, and non-ASCII text
        raise _malformed(detail) from None
    if len(data) > max_bytes:
        raise _malformed(detail)
    return data


def _chain(value, detail: str) -> list[x509.Certificate]:
    """A JSON list of 1..MAX_CERTS base64 DER certificates, leaf first."""
    if not isinstance(value, list) or not value:
        raise _malformed(detail)
    if len(value) > MAX_CERTS:
        raise _malformed("too many certs")
    return _load_certs([_b64(c, detail, CERT_MAX) for c in value])


def _signature(value, detail: str) -> bytes:
    sig = _b64(value, detail, SIGNATURE_MAX)
    if len(sig) < SIGNATURE_MIN:
        raise _malformed("signature size")
    return sig


def _epoch_time(value) -> _dt.datetime | None:
    """An epoch second as a datetime, or None when it is past what a datetime holds (year 9999)."""
    return _dt.datetime.fromtimestamp(value, _dt.UTC) if value < _DATETIME_MAX else None


# --- time answers ------------------------------------------------------------------------------


def verify_time_answer(payload: bytes, *, nonce: str, thing: str, trust_store_pems: Mapping[str, str],
                       ca_until: Mapping[str, int] | None = None, floor: int, max_ahead_s: int) -> TimeVerdict:
    """Verify the time service's answer to the device's `nonce`; never raises.

    TIME_REASONS in order: malformed: <detail>; unsigned (no signatures); untrusted signer (no
    entry whose `ca` is a non-retired trust-store root and whose chain validates to it at the
    answer's time, with a timeStamping leaf); bad signature (the first such entry's); nonce
    mismatch; wrong thing; earlier than last accepted (time < floor); from the future (time >
    max(floor, TIME_FLOOR_MIN) + max_ahead_s)."""
    try:
        return _verify_time(payload, nonce=nonce, thing=thing, trust_store_pems=trust_store_pems,
                            ca_until=ca_until, floor=floor, max_ahead_s=max_ahead_s)
    except Exception as exc:  # a verifier bug must reject, not crash the agent
        return TimeVerdict(False, f"malformed: internal error {type(exc).__name__}")


def _verify_time(payload, *, nonce, thing, trust_store_pems, ca_until=None, floor, max_ahead_s) -> TimeVerdict:
    try:
        return _time_checks(payload, nonce, thing, trust_store_pems, ca_until, floor, max_ahead_s)
    except _Reject as rej:
        return TimeVerdict(False, rej.reason)


def _time_checks(payload, nonce, thing, trust_store_pems, ca_until, floor, max_ahead_s) -> TimeVerdict:
    # 1. structure, and the device's own context
    data = _as_bytes(payload)
    if len(data) > TIME_ANSWER_MAX:
        raise _malformed("answer too large")
    answer = _json_fields(data, "answer", TIME_ANSWER_FIELDS)
    if not _is_format(answer["format"], TIME_FORMAT):
        raise _malformed("answer format")
    body_raw = _b64(answer["signed"], "answer signed", TIME_ANSWER_MAX)
    body = _time_body(body_raw)
    entries = answer["signatures"]
    if not isinstance(entries, list):
        raise _malformed("answer signatures")
    if len(entries) > MAX_SIGNATURES:
        raise _malformed("too many signatures")
    signatures = [_time_signature(e) for e in entries]
    until = _ca_until(ca_until)
    if not _int_in(floor, 0, _EPOCH_MAX):
        raise _malformed("floor")
    if not _int_in(max_ahead_s, 0, _EPOCH_MAX):
        raise _malformed("max ahead")
    # 2. unsigned
    if not signatures:
        raise _Reject("unsigned")
    # 3.-4. the first entry that a trusted root vouches for at the answer's time, and its signature
    key, sig = _time_signer(signatures, _load_trust_store(trust_store_pems), until, body["time"])
    _check_signature(key, sig, body_raw)
    # 5.-8. the answer is to this question, and moves time forward within reason
    if body["nonce"] != nonce:
        raise _Reject("nonce mismatch")
    if body["thing"] != thing:
        raise _Reject("wrong thing")
    if body["time"] < floor:
        raise _Reject("earlier than last accepted")
    if body["time"] > max(floor, TIME_FLOOR_MIN) + max_ahead_s:
        raise _Reject("from the future")
    return TimeVerdict(True, "ok", body["time"])


def _time_body(raw: bytes) -> dict:
    body = _json_fields(raw, "time body", TIME_BODY_FIELDS)
    if not _is_format(body["format"], TIME_FORMAT):
        raise _malformed("time body format")
    if not isinstance(body["nonce"], str) or not NONCE_RE.fullmatch(body["nonce"]):
        raise _malformed("time body nonce")
    if not isinstance(body["thing"], str) or not THING_RE.fullmatch(body["thing"]):
        raise _malformed("time body thing")
    if not _int_in(body["time"], 0, _EPOCH_MAX):
        raise _malformed("time body time")
    _canonical(body, raw, "time body not canonical")
    return body


def _time_signature(entry) -> tuple[str, bytes, list[x509.Certificate]]:
    if not isinstance(entry, dict) or set(entry) != set(TIME_SIGNATURE_FIELDS):
        raise _malformed("signature entry")
    if not isinstance(entry["ca"], str) or not CA_NAME_RE.fullmatch(entry["ca"]):
        raise _malformed("signature ca")
    sig = _signature(entry["sig"], "signature entry")
    return entry["ca"], sig, _chain(entry["chain"], "signature chain")


def _time_signer(signatures, roots, until, at: int) -> tuple[ec.EllipticCurvePublicKey, bytes]:
    when = _epoch_time(at)
    for ca, sig, certs in signatures:
        if when is None or ca not in roots or (ca in until and until[ca] <= at):
            continue
        try:
            return _validate_chain(certs, {ca: roots[ca]}, ca, when, _TIME_STAMPING), sig
        except _Reject:
            continue
    raise _Reject("untrusted signer")


# --- trust bundles -----------------------------------------------------------------------------


def verify_trust_bundle(data: bytes, *, trust_store_pems: Mapping[str, str], ca_until: Mapping[str, int] | None = None,
                        now: int) -> BundleVerdict:
    """Verify a trust bundle (roots to add) at `now` (the server's time); never raises.

    BUNDLE_REASONS in order: malformed: <detail>; missing ca, ca retired, signer not yet valid,
    signer expired, untrusted signer (the code-signing chain to BODY.required_ca, as for
    images); bad signature; not yet valid (now < issued); expired (now >= expires); not a ca (an
    added PEM is not a usable self-signed P-256 root valid at now)."""
    try:
        return _verify_bundle(data, trust_store_pems=trust_store_pems, ca_until=ca_until, now=now)
    except Exception as exc:  # a verifier bug must reject, not crash the agent
        return BundleVerdict(False, f"malformed: internal error {type(exc).__name__}")


def _verify_bundle(data, *, trust_store_pems, ca_until=None, now) -> BundleVerdict:
    try:
        return _bundle_checks(data, trust_store_pems, ca_until, now)
    except _Reject as rej:
        return BundleVerdict(False, rej.reason)


def _bundle_checks(data, trust_store_pems, ca_until, now) -> BundleVerdict:
    # 1. structure, and the device's own context
    data = _as_bytes(data)
    if len(data) > BUNDLE_MAX:
        raise _malformed("bundle too large")
    bundle = _json_fields(data, "bundle", BUNDLE_FIELDS)
    if not _is_format(bundle["format"], BUNDLE_FORMAT):
        raise _malformed("bundle format")
    if bundle["kind"] != BUNDLE_KIND:
        raise _malformed("bundle kind")
    body_raw = _b64(bundle["body"], "bundle body", BUNDLE_MAX)
    body = _bundle_body(body_raw)
    signature = _signature(bundle["signature"], "bundle signature")
    certs = _chain(bundle["chain"], "bundle chain")
    when = _as_time(now)
    until = _ca_until(ca_until)
    # 2.-7. the signer's chain to required_ca, and its signature
    required = body["required_ca"]
    key = _trusted_signer(certs, _load_trust_store(trust_store_pems), until, required, when, _CODE_SIGNING)
    _check_signature(key, signature, body_raw)
    # 8.-10. on the authenticated body
    now = int(now)
    if now < body["issued"]:
        return BundleVerdict(False, "not yet valid", body, required)
    if now >= body["expires"]:
        return BundleVerdict(False, "expired", body, required)
    if not all(_usable_root(entry["pem"], when) for entry in body["add"]):
        return BundleVerdict(False, "not a ca", body, required)
    return BundleVerdict(True, "ok", body, required)


def _bundle_body(raw: bytes) -> dict:
    body = _json_fields(raw, "bundle body", BUNDLE_BODY_FIELDS)
    if not _is_format(body["format"], BUNDLE_FORMAT):
        raise _malformed("bundle body format")
    add = body["add"]
    if not isinstance(add, list) or not 1 <= len(add) <= MAX_ADD:
        raise _malformed("bundle body add")
    for entry in add:
        if not isinstance(entry, dict) or set(entry) != set(BUNDLE_ADD_FIELDS):
            raise _malformed("bundle body add")
        if not isinstance(entry["name"], str) or not CA_NAME_RE.fullmatch(entry["name"]):
            raise _malformed("bundle body add")
        if not isinstance(entry["pem"], str) or not 0 < len(entry["pem"]) <= PEM_MAX:
            raise _malformed("bundle body add")
    if len({entry["name"] for entry in add}) != len(add):
        raise _malformed("bundle body add")
    if not _int_in(body["issued"], 0, _EPOCH_MAX):
        raise _malformed("bundle body issued")
    if not _int_in(body["expires"], 0, _EPOCH_MAX):
        raise _malformed("bundle body expires")
    if body["expires"] <= body["issued"]:
        raise _malformed("bundle body expires before issued")
    if not _int_in(body["overlap_s"], 0, OVERLAP_MAX + 1):
        raise _malformed("bundle body overlap_s")
    if not isinstance(body["required_ca"], str) or not CA_NAME_RE.fullmatch(body["required_ca"]):
        raise _malformed("bundle body required_ca")
    _canonical(body, raw, "bundle body not canonical")
    return body


def _usable_root(pem: str, when: _dt.datetime) -> bool:
    """A self-signed CA certificate (basicConstraints ca, keyUsage keyCertSign) with a P-256 key,
    valid at `when`: what may go into a trust store."""
    try:
        with warnings.catch_warnings():  # as in _load_certs: refuse today what a later release will
            warnings.simplefilter("error", CryptographyDeprecationWarning)
            cert = x509.load_pem_x509_certificate(pem.encode("ascii"))
        cert.verify_directly_issued_by(cert)
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
        key = cert.public_key()
        valid = cert.not_valid_before_utc <= when <= cert.not_valid_after_utc
    except (*_CERT_ERRORS, CryptographyDeprecationWarning, InvalidSignature, UnsupportedAlgorithm,
            x509.ExtensionNotFound):
        return False
    return (bc.ca and ku.key_cert_sign and valid and isinstance(key, ec.EllipticCurvePublicKey)
            and isinstance(key.curve, ec.SECP256R1))
