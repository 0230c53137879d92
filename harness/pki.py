"""The lab PKI: root CAs, intermediates, code-signing keys (images, trust bundles), time-stamping keys.

    LabPki(dir).init()          create what is missing, keep what is there (idempotent)
    LabPki(dir).cert(name)      an x509.Certificate
    LabPki(dir).chain(signer)   [leaf, intermediate]: what goes into an image (never the root)
    LabPki(dir).key(name)       a private key, refused if its file is open to group or others
    LabPki(dir).root_pem(name)  a root's PEM, for a cart's trust store
    LabPki(dir).issue_signer(root, not_before, not_after)
                                (key, [leaf, intermediate]): a throw-away code-signing leaf with
                                that validity (clock scenarios), never written to the directory

Layout (all ECDSA P-256): the roots "lab-root-2025" (old), "lab-root-2026" (new),
"lab-root-2027" (the next rotation, which no cart configuration has) and the untrusted
"rogue-root"; under each an intermediate "<root>-int" and under that a code-signing leaf
"<root>-signer" (EKU codeSigning, key usage digitalSignature) and a time-stamping leaf
"<root>-time" (EKU timeStamping, key usage digitalSignature) that signs the time service's answers.
`init()` adds what a newer layout has to an existing directory.

Files in the directory: `<name>.pem` (certificate) and `<name>.key` (PKCS#8 private key,
unencrypted, created with mode 0600 through os.open so it is never readable by others even
for an instant). Key material is never printed or logged: `hil pki show` prints
certificates and key-file modes only, and errors name the file, never its contents.

Every certificate is valid from NOT_BEFORE to NOT_AFTER (2024-01-01 .. 2049-12-31): the
lab moves cart clocks around freely, and images carry their own issued/expires window.
`issue()` is also used, with fixed keys and deterministic ECDSA, for the published vectors.
"""

from __future__ import annotations

import argparse
import datetime as dt
import fcntl
import os
import re
import stat
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DIR = ROOT / "reports" / "pki"

ROOT_OLD = "lab-root-2025"
ROOT_NEW = "lab-root-2026"
ROOT_NEXT = "lab-root-2027"  # the next rotation: no cart configuration has it; the CA-rotation suite delivers it
ROGUE_ROOT = "rogue-root"
TRUSTED_ROOTS = (ROOT_OLD, ROOT_NEW)
SERVICE_ROOTS = (ROOT_OLD, ROOT_NEW, ROOT_NEXT)  # the lab's services (time) sign under each of these
ROOTS = (ROOT_OLD, ROOT_NEW, ROOT_NEXT, ROGUE_ROOT)
VECTOR_ROOTS = (ROOT_OLD, ROOT_NEW, ROGUE_ROOT)  # the published vectors' fixed PKI (serials follow this order)

NOT_BEFORE = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
NOT_AFTER = dt.datetime(2049, 12, 31, 23, 59, 59, tzinfo=dt.UTC)
ORGANIZATION = "cart-hil lab"
KEY_MODE = 0o600
_NAME_RE = re.compile(r"[a-z0-9][a-z0-9.-]{0,63}")


def intermediate_of(root: str) -> str:
    return f"{root}-int"


def signer_of(root: str) -> str:
    return f"{root}-signer"


def time_signer_of(root: str) -> str:
    return f"{root}-time"


class PkiError(Exception):
    """Something in the PKI directory is missing or wrong; the message names the file."""


class KeyPermissionError(PkiError, PermissionError):
    """A private-key file is open to group or others."""


@dataclass(frozen=True)
class CertSpec:
    name: str
    kind: str  # root | intermediate | signer | time
    issuer: str | None  # None for a root (self-signed)
    eku: tuple[x509.ObjectIdentifier, ...] = ()


def layout(roots: Iterable[str] = ROOTS) -> list[CertSpec]:
    """Every certificate of the lab PKI, parents before children."""
    roots = list(roots)
    specs = [CertSpec(r, "root", None) for r in roots]
    specs += [CertSpec(intermediate_of(r), "intermediate", r) for r in roots]
    specs += [CertSpec(signer_of(r), "signer", intermediate_of(r), (ExtendedKeyUsageOID.CODE_SIGNING,))
              for r in roots]
    specs += [CertSpec(time_signer_of(r), "time", intermediate_of(r), (ExtendedKeyUsageOID.TIME_STAMPING,))
              for r in roots]
    return specs


# --- issuing -----------------------------------------------------------------------------------


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def issue(spec: CertSpec, public_key: ec.EllipticCurvePublicKey, *, issuer_key: ec.EllipticCurvePrivateKey,
          issuer_cert: x509.Certificate | None = None, serial: int | None = None,
          not_before: dt.datetime = NOT_BEFORE, not_after: dt.datetime = NOT_AFTER,
          deterministic: bool = False) -> x509.Certificate:
    """One certificate of `spec` for `public_key`, signed by `issuer_key` (a root: its own key).

    Roots and intermediates are CAs (basicConstraints critical, keyCertSign|cRLSign, no EKU);
    a signer or time leaf is an end entity with digitalSignature and `spec.eku`. `deterministic` uses
    RFC 6979 signatures, so fixed keys and serials give byte-identical certificates."""
    org = "rogue" if ROGUE_ROOT in spec.name else ORGANIZATION
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, org),
                         x509.NameAttribute(NameOID.COMMON_NAME, spec.name)])
    if spec.kind == "root":
        issuer_name = subject
        issuer_public = public_key
    else:
        if issuer_cert is None:
            raise ValueError(f"{spec.name}: a {spec.kind} needs its issuer's certificate")
        issuer_name = issuer_cert.subject
        issuer_public = issuer_cert.public_key()
    b = (x509.CertificateBuilder()
         .subject_name(subject).issuer_name(issuer_name).public_key(public_key)
         .serial_number(serial if serial is not None else x509.random_serial_number())
         .not_valid_before(not_before).not_valid_after(not_after)
         .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False))
    if spec.kind != "root":
        b = b.add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_public), critical=False)
    if spec.kind in ("root", "intermediate"):
        b = b.add_extension(x509.BasicConstraints(ca=True, path_length=1 if spec.kind == "root" else 0),
                            critical=True)
        b = b.add_extension(_key_usage(cert_sign=True), critical=True)
    else:
        b = b.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        b = b.add_extension(_key_usage(cert_sign=False), critical=True)
        if spec.eku:
            b = b.add_extension(x509.ExtendedKeyUsage(list(spec.eku)), critical=False)
    return b.sign(issuer_key, hashes.SHA256(), ecdsa_deterministic=deterministic or None)


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=not cert_sign, content_commitment=False, key_encipherment=False,
                         data_encipherment=False, key_agreement=False, key_cert_sign=cert_sign,
                         crl_sign=cert_sign, encipher_only=False, decipher_only=False)


# --- files -------------------------------------------------------------------------------------


def write_key_file(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    """Write a private key with mode 0600 from the first byte (os.open, O_EXCL), atomically."""
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), KEY_MODE)
    try:
        os.fchmod(fd, KEY_MODE)  # whatever the umask did
        with os.fdopen(fd, "wb") as f:
            fd = -1
            f.write(pem)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if fd >= 0:
            os.close(fd)
        if tmp.exists():
            tmp.unlink()


def load_key_file(path: str | Path) -> ec.EllipticCurvePrivateKey:
    """Load a private key, refusing a file that group or others may access (KeyPermissionError)."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        raise PkiError(f"{path}: private key file does not exist (run `hil pki init`)") from None
    except OSError as exc:
        raise PkiError(f"{path}: cannot open private key file: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        mode = stat.S_IMODE(os.fstat(f.fileno()).st_mode)
        if mode & 0o077:
            raise KeyPermissionError(
                f"{path}: private key file has mode {mode:04o}, open to group/others; refusing to use it "
                f"(it must be 0600: chmod 600 {path}, and consider the key exposed)")
        data = f.read()
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise PkiError(f"{path}: not an unencrypted PEM private key") from None
    finally:
        del data
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise PkiError(f"{path}: not an ECDSA P-256 private key")
    return key


def _public_der(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
        return True
    except (ValueError, TypeError, InvalidSignature):
        return False


class LabPki:
    """The lab PKI in one directory (see the module docstring)."""

    def __init__(self, directory: str | Path = DEFAULT_DIR, *, specs: Iterable[CertSpec] | None = None):
        self.dir = Path(directory)
        self.specs = {s.name: s for s in (specs if specs is not None else layout())}

    def __repr__(self) -> str:
        return f"LabPki({str(self.dir)!r})"

    def _check_name(self, name: str) -> CertSpec:
        if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or name not in self.specs:
            raise PkiError(f"{self.dir}: no certificate named {name!r} in the lab PKI "
                           f"(known: {', '.join(self.specs)})")
        return self.specs[name]

    def cert_path(self, name: str) -> Path:
        self._check_name(name)
        return self.dir / f"{name}.pem"

    def key_path(self, name: str) -> Path:
        self._check_name(name)
        return self.dir / f"{name}.key"

    def names(self) -> list[str]:
        return list(self.specs)

    def init(self) -> dict[str, str]:
        """Create what is missing, keep what is consistent; {name: "created" | "kept" | "reissued"}.

        A certificate is reissued when its key was missing, its issuer was (re)issued, or it no
        longer matches its key or its issuer. Existing keys are loaded (and so refused if loose)."""
        if not self.dir.exists():
            self.dir.mkdir(parents=True, mode=0o700, exist_ok=True)  # two runs may both find it missing
        # one init at a time (parallel test workers share a PKI directory)
        with open(self.dir / ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            return self._init_locked()

    def _init_locked(self) -> dict[str, str]:
        status: dict[str, str] = {}
        certs: dict[str, x509.Certificate] = {}
        keys: dict[str, ec.EllipticCurvePrivateKey] = {}
        for spec in self.specs.values():
            kpath, cpath = self.dir / f"{spec.name}.key", self.dir / f"{spec.name}.pem"
            cert = self._read_cert(cpath) if cpath.exists() else None
            if kpath.exists():
                key = load_key_file(kpath)
            else:
                key = new_key()
                write_key_file(kpath, key)
                cert = None
            keys[spec.name] = key
            parent = certs.get(spec.issuer) if spec.issuer else None
            fresh = (cert is not None
                     and status.get(spec.issuer or "", "kept") == "kept"
                     and _public_der(cert.public_key()) == _public_der(key.public_key())
                     and _issued_by(cert, parent or cert))
            if fresh:
                status[spec.name] = "kept"
            else:
                issuer_key = keys[spec.issuer] if spec.issuer else key
                cert = issue(spec, key.public_key(), issuer_key=issuer_key, issuer_cert=parent)
                status[spec.name] = "reissued" if cpath.exists() else "created"
                _write_text(cpath, cert.public_bytes(serialization.Encoding.PEM).decode("ascii"))
            certs[spec.name] = cert
        return status

    def _read_cert(self, path: Path) -> x509.Certificate | None:
        try:
            return x509.load_pem_x509_certificate(path.read_bytes())
        except (ValueError, x509.InvalidVersion):
            return None

    def cert(self, name: str) -> x509.Certificate:
        path = self.cert_path(name)
        if not path.exists():
            raise PkiError(f"{path}: certificate does not exist (run `hil pki init`)")
        cert = self._read_cert(path)
        if cert is None:
            raise PkiError(f"{path}: not a PEM certificate")
        return cert

    def key(self, name: str) -> ec.EllipticCurvePrivateKey:
        return load_key_file(self.key_path(name))

    def chain(self, signer: str) -> list[x509.Certificate]:
        """[leaf, intermediates...] up to, not including, the self-signed root."""
        spec = self._check_name(signer)
        out = [self.cert(signer)]
        while spec.issuer is not None and self.specs[spec.issuer].issuer is not None:
            spec = self.specs[spec.issuer]
            out.append(self.cert(spec.name))
        return out

    def root_of(self, name: str) -> str:
        spec = self._check_name(name)
        while spec.issuer is not None:
            spec = self.specs[spec.issuer]
        return spec.name

    def root_pem(self, name: str) -> str:
        if self._check_name(name).kind != "root":
            raise PkiError(f"{name} is not a root CA")
        return self.cert(name).public_bytes(serialization.Encoding.PEM).decode("ascii")

    def issue_signer(self, root: str, not_before: dt.datetime | int, not_after: dt.datetime | int,
                     ) -> tuple[ec.EllipticCurvePrivateKey, list[x509.Certificate]]:
        """(key, [leaf, intermediate]): a fresh code-signing leaf under `<root>-int`, valid from
        `not_before` to `not_after` (aware datetimes or epoch seconds), for images and bundles
        whose *signer* is not yet or no longer valid. Kept in memory only, never stored."""
        if self._check_name(root).kind != "root":
            raise PkiError(f"{root} is not a root CA")
        start, end = _as_datetime(not_before, "not_before"), _as_datetime(not_after, "not_after")
        if end <= start:
            raise ValueError(f"not_after {end.isoformat()} is not after not_before {start.isoformat()}")
        inter = intermediate_of(root)
        key = new_key()
        spec = CertSpec(f"{signer_of(root)}-ephemeral", "signer", inter, (ExtendedKeyUsageOID.CODE_SIGNING,))
        inter_cert = self.cert(inter)
        leaf = issue(spec, key.public_key(), issuer_key=self.key(inter), issuer_cert=inter_cert,
                     not_before=start, not_after=end)
        return key, [leaf, inter_cert]

    def trust_store(self, roots: Iterable[str] = TRUSTED_ROOTS) -> dict[str, str]:
        """{root name: PEM}: the shape of a cart's trust store."""
        return {r: self.root_pem(r) for r in roots}

    def describe(self) -> list[dict]:
        """What `hil pki show` prints: certificates and key-file modes, never key material."""
        rows = []
        for spec in self.specs.values():
            cpath, kpath = self.dir / f"{spec.name}.pem", self.dir / f"{spec.name}.key"
            row = {"name": spec.name, "kind": spec.kind, "cert": str(cpath), "key": str(kpath)}
            cert = self._read_cert(cpath) if cpath.exists() else None
            if cert is not None:
                try:
                    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
                    ekus = [getattr(o, "_name", o.dotted_string) for o in eku]
                except x509.ExtensionNotFound:
                    ekus = []
                row.update(subject=cert.subject.rfc4514_string(), issuer=cert.issuer.rfc4514_string(),
                           serial=f"{cert.serial_number:x}",
                           not_before=cert.not_valid_before_utc.isoformat(),
                           not_after=cert.not_valid_after_utc.isoformat(),
                           sha256=cert.fingerprint(hashes.SHA256()).hex(), eku=ekus)
            row["key_mode"] = f"{stat.S_IMODE(kpath.stat().st_mode):04o}" if kpath.exists() else None
            rows.append(row)
        return rows


def _as_datetime(value: dt.datetime | int, name: str) -> dt.datetime:
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            raise ValueError(f"{name} {value!r} has no time zone (give an aware datetime or epoch seconds)")
        return value.astimezone(dt.UTC)
    if type(value) is int and 0 <= value < 253402300800:
        return dt.datetime.fromtimestamp(value, dt.UTC)
    raise ValueError(f"{name} {value!r}: an aware datetime or epoch seconds")


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# --- command line ------------------------------------------------------------------------------


def cmd_init(a: argparse.Namespace) -> int:
    pki = LabPki(a.dir)
    try:
        status = pki.init()
    except PkiError as exc:
        print(f"hil: {exc}", file=sys.stderr)
        return 2
    for name, what in status.items():
        print(f"{what:8s} {name:22s} {pki.dir / (name + '.pem')}")
    print(f"lab PKI in {pki.dir}: {sum(v != 'kept' for v in status.values())} issued, "
          f"{sum(v == 'kept' for v in status.values())} kept; keys are mode 0600")
    return 0


def cmd_show(a: argparse.Namespace) -> int:
    pki = LabPki(a.dir)
    if not pki.dir.is_dir():
        print(f"hil: {pki.dir}: no lab PKI here (run `hil pki init --dir {pki.dir}`)", file=sys.stderr)
        return 2
    rc = 0
    for row in pki.describe():
        if "subject" not in row:
            print(f"{row['name']:22s} {row['kind']:12s} MISSING certificate {row['cert']}")
            rc = 1
            continue
        mode = row["key_mode"] or "missing"
        warn = "" if row["key_mode"] == "0600" else "  <- key file must be 0600"
        if warn:
            rc = 1
        eku = f" eku={','.join(row['eku'])}" if row["eku"] else ""
        print(f"{row['name']:22s} {row['kind']:12s} issuer={row['issuer']} serial={row['serial']} "
              f"valid={row['not_before'][:10]}..{row['not_after'][:10]}{eku} sha256={row['sha256'][:16]} "
              f"key={mode}{warn}")
    return rc


def add_cli(subparsers) -> None:
    """Register `hil pki init [--dir D]` and `hil pki show [--dir D]` on the `hil` subparsers."""
    p = subparsers.add_parser("pki", help="the lab PKI: root CAs, intermediates, code-signing keys")
    _add_commands(p.add_subparsers(dest="pkicmd", required=True))


def _add_commands(ps) -> None:
    i = ps.add_parser("init", help="create the lab PKI (idempotent: keeps what exists)")
    i.add_argument("--dir", type=Path, default=DEFAULT_DIR, help=f"PKI directory (default {DEFAULT_DIR})")
    i.set_defaults(fn=cmd_init)
    s = ps.add_parser("show", help="list certificates and key-file modes (never key material)")
    s.add_argument("--dir", type=Path, default=DEFAULT_DIR, help=f"PKI directory (default {DEFAULT_DIR})")
    s.set_defaults(fn=cmd_show)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m harness.pki", description="the lab PKI (same as `hil pki`)")
    _add_commands(ap.add_subparsers(dest="pkicmd", required=True))
    a = ap.parse_args(argv)
    return a.fn(a)


if __name__ == "__main__":
    sys.exit(main())
