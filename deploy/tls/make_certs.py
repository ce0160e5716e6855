"""Make a private swarm's certificates: one CA, and a certificate + key per service or host.

    python deploy/tls/make_certs.py OUT_DIR [--names dht-bootstrap dht expert trainer client]

Writes ``ca.crt``, ``ca.key`` and ``<name>.crt``, ``<name>.key`` for each name. Every
certificate names (subjectAltName) its own name, the swarm-wide name (``--swarm-name``,
default ``dmoe``: what ``--tls-server-name`` verifies, since peers dial each other by IP),
``localhost``, ``127.0.0.1`` and ``::1``, and is valid both as a server and as a client
certificate (serverAuth + clientAuth), so one file pair serves a process's gRPC port and
its calls to others (mutual TLS). Keys are ECDSA P-256, unencrypted PEM, mode 0600.

Idempotent: an existing CA is kept unless ``--new-ca`` is given, and an existing
certificate is kept while it is signed by the current CA, has the same names and does not
expire within ``--renew-days``; anything else is (re)made. Keep ``ca.key`` off the
machines that run services: they only need ``ca.crt`` and their own pair.

Uses the ``cryptography`` package (``pip install cryptography``), not the openssl CLI.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import sys
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# run as a script from a checkout (``python deploy/tls/make_certs.py``): the repository's
# standard-library helpers are importable without installing the package
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from services.common.files import atomic_write

DEFAULT_NAMES = ["dht-bootstrap", "dht", "expert", "trainer", "client"]
ALWAYS = ["localhost", "127.0.0.1", "::1"]
SKEW = dt.timedelta(minutes=5)  # clocks of the swarm's machines may disagree a little


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _write(path: Path, data: bytes, mode: int) -> None:
    """Write atomically, the file created with ``mode`` (never briefly world-readable)."""
    atomic_write(path, data, mode=mode)
    os.chmod(path, mode)  # the umask may have narrowed it


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _key_usage(ca: bool) -> x509.KeyUsage:
    """Signatures only (ECDSA; ECDHE does the key exchange); a CA also signs certs and CRLs."""
    flags = dict.fromkeys(
        ("content_commitment", "key_encipherment", "data_encipherment", "key_agreement",
         "encipher_only", "decipher_only"),
        False,
    )  # fmt: skip
    return x509.KeyUsage(digital_signature=True, key_cert_sign=ca, crl_sign=ca, **flags)


def _san(names: list[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for name in dict.fromkeys(names):  # ordered, without duplicates
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


def make_ca(
    out: Path, days: int, swarm: str
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _new_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{swarm} swarm CA")])
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - SKEW)
        .not_valid_after(_now() + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write(out / "ca.key", _key_pem(key), 0o600)
    _write(out / "ca.crt", cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return cert, key


def make_leaf(
    out: Path,
    name: str,
    sans: list[str],
    ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
    days: int,
) -> None:
    ca_cert, ca_key = ca
    key = _new_key()
    public = key.public_key()
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - SKEW)
        .not_valid_after(min(_now() + dt.timedelta(days=days), ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(ca=False), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(_san(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    _write(out / f"{name}.key", _key_pem(key), 0o600)
    _write(out / f"{name}.crt", cert.public_bytes(serialization.Encoding.PEM), 0o644)


def _load_ca(out: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None:
    cert_path, key_path = out / "ca.crt", out / "ca.key"
    if not cert_path.exists() and not key_path.exists():
        return None
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
        raise SystemExit(f"{out}: ca.key does not belong to ca.crt (use --new-ca to replace both)")
    return cert, key


def _leaf_is_current(
    out: Path, name: str, sans: list[str], ca_cert: x509.Certificate, renew: dt.timedelta
) -> bool:
    """Kept: signed by this CA, the same names, not expiring soon, and its key is there (the
    key is not read: in a container deployment it may belong to the container's user)."""
    cert_path = out / f"{name}.crt"
    if not cert_path.exists() or not (out / f"{name}.key").exists():
        return False
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        cert.verify_directly_issued_by(ca_cert)
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, TypeError, InvalidSignature, x509.ExtensionNotFound):
        return False
    return names == _san(sans) and cert.not_valid_after_utc - _now() > renew


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out_dir", type=Path, help="folder for the files (made if missing)")
    parser.add_argument(
        "--names", nargs="+", default=DEFAULT_NAMES, help="one certificate per service or host"
    )
    parser.add_argument(
        "--swarm-name", default="dmoe", help="name in every certificate (--tls-server-name)"
    )
    parser.add_argument(
        "--extra-san", action="append", default=[], help="another name or IP in every cert"
    )
    parser.add_argument("--days", type=int, default=365, help="validity of service certificates")
    parser.add_argument("--ca-days", type=int, default=3650, help="validity of a new CA")
    parser.add_argument("--renew-days", type=int, default=30, help="remake certs expiring sooner")
    parser.add_argument("--new-ca", action="store_true", help="replace the CA (and every cert)")
    args = parser.parse_args(argv)
    for name in args.names:
        if not name or "/" in name or name.startswith(".") or name == "ca":
            parser.error(f"bad name {name!r}: a file name other than 'ca'")

    out: Path = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    ca = None if args.new_ca else _load_ca(out)
    if ca is None:
        ca = make_ca(out, args.ca_days, args.swarm_name)
        print(f"made CA {out / 'ca.crt'}")
    made, kept = [], []
    for name in args.names:
        sans = [name, args.swarm_name, *args.extra_san, *ALWAYS]
        renew = dt.timedelta(days=min(args.renew_days, args.days // 2))
        if _leaf_is_current(out, name, sans, ca[0], renew):
            kept.append(name)
        else:
            make_leaf(out, name, sans, ca, args.days)
            made.append(name)
    print(f"{out}: made {' '.join(made) or 'nothing'}; kept {' '.join(kept) or 'nothing'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
