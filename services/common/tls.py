"""Optional TLS and mutual TLS on every gRPC port, servers and clients alike.

Trust model (a private swarm, one certificate authority):

- The swarm has one CA (``deploy/tls/make_certs.py`` makes it). Every process holds a
  certificate and key signed by it, usable both as a server and as a client certificate.
- ``--tls-cert/--tls-key`` alone: the server speaks TLS; clients are not authenticated
  (server-only TLS, for certificates from a public CA that clients already trust).
- ``--tls-ca`` as well: **mutual TLS**. The server refuses every client that does not
  present a certificate signed by that CA, during the handshake, before any RPC runs
  (the caller sees UNAVAILABLE), and every client of the process (DHT peer calls, the DHT
  client, expert clients) presents its own certificate and trusts only that CA. A process
  that serves TLS therefore dials its peers over TLS too: a swarm is all TLS or none.
- Membership is the only identity: any holder of a CA-signed certificate may call any
  method of any service, as any plaintext peer could before (per-caller authorization is
  not checked). The CA key is what must be kept safe; a leaked member key is revoked by
  making a new CA (there is no revocation list).
- Peers dial each other by IP address (DHT contacts, expert declarations), which no
  certificate names. ``--tls-server-name dmoe`` verifies that swarm-wide name, present in
  every certificate, instead of the dialled host: it proves "a member of this swarm", not
  "the process that owns this IP". Empty (the default) verifies the dialled host.

Files are read and checked once at start-up: a missing, unreadable or non-PEM file, an
encrypted key or a key that does not match its certificate stops the process with a clear
message (exit code 2, like any bad flag) instead of failing every handshake later.
"""

from __future__ import annotations

import argparse
import os
import re
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----")
_KEY = re.compile(rb"-----BEGIN ((?:RSA |EC |ENCRYPTED )?)PRIVATE KEY-----")

FLAGS = ("--tls-cert", "--tls-key", "--tls-ca", "--tls-server-name")


class TLSError(ValueError):
    """A TLS setting or file that cannot work; the message names the flag and the file."""


def _read(flag: str, path: str) -> bytes:
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError as exc:
        raise TLSError(f"{flag} {path}: cannot read: {exc.strerror or exc}") from None


def _no_password() -> bytes:
    raise TLSError("encrypted private keys are not supported")


@dataclass(frozen=True)
class TLSConfig:
    """Paths of a PEM certificate chain, its key and the CA to trust; read at construction.

    ``cert``/``key`` together, and/or ``ca``; ``server_name`` overrides the name verified
    in servers' certificates. Raises :class:`TLSError` for anything that cannot work.
    """

    cert: str | None = None
    key: str | None = None
    ca: str | None = None
    server_name: str | None = None
    _cert_pem: bytes | None = field(default=None, init=False, repr=False, compare=False)
    _key_pem: bytes | None = field(default=None, init=False, repr=False, compare=False)
    _ca_pem: bytes | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if bool(self.cert) != bool(self.key):
            raise TLSError("give --tls-cert and --tls-key together")
        if not self.cert and not self.ca:
            raise TLSError("TLS needs --tls-cert and --tls-key, or --tls-ca")
        if self.server_name and not re.fullmatch(r"[A-Za-z0-9.:*-]+", self.server_name):
            raise TLSError(f"--tls-server-name {self.server_name!r} is not a host name")
        if self.cert and self.key:
            cert, key = _read("--tls-cert", self.cert), _read("--tls-key", self.key)
            if not _CERT.search(cert):
                raise TLSError(f"--tls-cert {self.cert}: not a PEM certificate")
            kind = _KEY.search(key)
            if kind is None:
                raise TLSError(f"--tls-key {self.key}: not a PEM private key")
            if kind.group(1) == b"ENCRYPTED ":
                raise TLSError(f"--tls-key {self.key}: encrypted private keys are not supported")
            try:  # parses both and checks that the key belongs to the certificate
                ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(
                    self.cert, self.key, password=_no_password
                )
            except (ssl.SSLError, TLSError) as exc:
                raise TLSError(
                    f"--tls-cert {self.cert} / --tls-key {self.key}: unusable or not a pair ({exc})"
                ) from None
            object.__setattr__(self, "_cert_pem", cert)
            object.__setattr__(self, "_key_pem", key)
        if self.ca:
            ca = _read("--tls-ca", self.ca)
            if not _CERT.search(ca):
                raise TLSError(f"--tls-ca {self.ca}: not a PEM certificate")
            try:
                ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(
                    cadata=ca.decode("ascii")
                )
            except (ssl.SSLError, UnicodeDecodeError) as exc:
                raise TLSError(f"--tls-ca {self.ca}: unusable certificate ({exc})") from None
            object.__setattr__(self, "_ca_pem", ca)

    @property
    def mutual(self) -> bool:
        """Servers require client certificates signed by the CA."""
        return self._ca_pem is not None

    def server_credentials(self) -> grpc.ServerCredentials:
        """TLS with this certificate; with a CA, clients must present one it signed (mTLS)."""
        if self._cert_pem is None or self._key_pem is None:
            raise TLSError("a TLS server needs --tls-cert and --tls-key")
        return grpc.ssl_server_credentials(
            [(self._key_pem, self._cert_pem)],
            root_certificates=self._ca_pem,
            require_client_auth=self._ca_pem is not None,
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """Trust the CA (the system's roots without one); present cert/key when given."""
        return grpc.ssl_channel_credentials(
            root_certificates=self._ca_pem,
            private_key=self._key_pem,
            certificate_chain=self._cert_pem,
        )

    def with_server_name(self, options: Sequence[tuple[str, Any]]) -> list[tuple[str, Any]]:
        if not self.server_name:
            return list(options)
        return [*options, ("grpc.ssl_target_name_override", self.server_name)]


def add_tls_flags(parser: argparse.ArgumentParser, *, from_env: bool = False) -> None:
    """``--tls-cert/--tls-key/--tls-ca/--tls-server-name``. A ``service_parser`` reads their
    ``DMOE_TLS_*`` variables itself; ``from_env`` does it for a plain ``ArgumentParser``."""
    group = parser.add_argument_group(
        "tls", "TLS on the gRPC port and on every call this process makes (off by default)"
    )
    helps = {
        "--tls-cert": "PEM certificate (chain) this process presents, as server and as client",
        "--tls-key": "PEM private key of --tls-cert (unencrypted)",
        "--tls-ca": "PEM CA certificate to trust; when given, clients must present a "
        "certificate it signed (mutual TLS)",
        "--tls-server-name": "name to verify in servers' certificates instead of the dialled "
        "host (e.g. the swarm-wide name 'dmoe': peers dial each other by IP)",
    }
    for flag in FLAGS:
        default, text = None, helps[flag]
        if from_env:
            from services.common.flags import env_name

            default, text = os.environ.get(env_name(flag)) or None, f"{text} [env {env_name(flag)}]"
        metavar = "NAME" if flag == "--tls-server-name" else "PATH"
        group.add_argument(flag, default=default, metavar=metavar, help=text)


def tls_from_args(
    args: argparse.Namespace, parser: argparse.ArgumentParser, *, server: bool = True
) -> TLSConfig | None:
    """The process's TLSConfig (None: plaintext), or ``parser.error`` (exit 2) with why not.

    ``server``: the process serves gRPC, so TLS needs its own certificate and key (a CA
    alone only makes sense for a client such as the healthcheck).
    """
    cert, key, ca, name = (getattr(args, f[2:].replace("-", "_")) or None for f in FLAGS)
    if not (cert or key or ca):
        if name:
            parser.error("--tls-server-name needs TLS: give --tls-cert/--tls-key/--tls-ca")
        return None
    if server and not (cert and key):
        parser.error("serving TLS needs --tls-cert and --tls-key (--tls-ca alone is for clients)")
    try:
        return TLSConfig(cert, key, ca, name)
    except TLSError as exc:
        parser.error(str(exc))
