"""A service's ed25519 identity: the key that signs what it owns and proves who it is.

Every dmoe service has one key pair. A DHT node's id is the SHA-1 of its public key, so an id
cannot be claimed without the private key (a node proves it by signing a peer's ping nonce);
an expert server owns its DHT declarations by signing them. The private key lives in a file
(``--identity-file``), created on first start with mode 0600, in PKCS#8 PEM (the format
``openssl pkey`` reads). A process with no place to keep it gets an ephemeral key and says so.

``python -m services.common.identity FILE`` creates the key when missing and prints the public
key in hex: the line to put in another node's ``--trusted-keys`` file.

Verifying costs about three signatures (figures: docs/security.md); :func:`verify` caches
answers, since the same record reaches a node again and again (republish, several replicas
answering one lookup).
"""

from __future__ import annotations

import argparse
import base64
import binascii
import contextlib
import hashlib
import logging
import os
import sys
from collections import OrderedDict
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from services.common.files import atomic_write

log = logging.getLogger(__name__)

PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64


class Identity:
    """An ed25519 key pair; ``public_key`` is the raw 32 bytes others verify with."""

    def __init__(self, private_key: Ed25519PrivateKey, path: Path | None = None) -> None:
        self._private = private_key
        self.path = path
        self.public_key = private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    @classmethod
    def generate(cls) -> Identity:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load_or_create(cls, path: str | Path) -> Identity:
        """Read the key at ``path``, or create it there (0600, atomically) when missing.

        Raises ``ValueError`` for a file that is not an ed25519 private key, ``OSError`` when
        the file cannot be read or written.
        """
        path = Path(path).expanduser()
        if path.exists():
            data = path.read_bytes()
            try:
                key = serialization.load_pem_private_key(data, password=None)
            except (ValueError, TypeError) as exc:
                raise ValueError(f"{path}: not an unencrypted PEM private key ({exc})") from None
            if not isinstance(key, Ed25519PrivateKey):
                raise ValueError(f"{path}: not an ed25519 key")
            if path.stat().st_mode & 0o077:
                log.warning("identity file is readable by others", extra={"path": str(path)})
            return cls(key, path)
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        try:  # never replaces a key another process just created
            atomic_write(path, pem, mode=0o600, replace=False)
        except FileExistsError:
            return cls.load_or_create(path)
        identity = cls(key, path)
        log.info("created identity", extra={"path": str(path), "public_key": identity.hex})
        return identity

    def sign(self, message: bytes) -> bytes:
        return self._private.sign(message)

    @property
    def hex(self) -> str:
        return self.public_key.hex()


_keys: OrderedDict[bytes, Ed25519PublicKey] = OrderedDict()
_answers: OrderedDict[bytes, bool] = OrderedDict()
_CACHE = 16384


def verify(public_key: bytes, signature: bytes, message: bytes) -> bool:
    """Whether ``signature`` is ``public_key``'s over ``message``; never raises.

    Answers are cached under a digest of all three, so a record seen before costs a hash.
    """
    if len(public_key) != PUBLIC_KEY_BYTES or len(signature) != SIGNATURE_BYTES:
        return False
    digest = hashlib.sha256(public_key + signature + message).digest()
    known = _answers.get(digest)
    if known is not None:
        return known
    key = _keys.get(public_key)
    try:
        if key is None:
            key = Ed25519PublicKey.from_public_bytes(public_key)
            _keys[public_key] = key
            if len(_keys) > _CACHE:
                _keys.popitem(last=False)
        key.verify(signature, message)
        ok = True
    except (InvalidSignature, ValueError):
        ok = False
    _answers[digest] = ok
    if len(_answers) > _CACHE:
        _answers.popitem(last=False)
    return ok


def parse_public_key(text: str) -> bytes:
    """A public key written as 64 hex digits or base64 (with or without padding)."""
    text = text.strip()
    raw = b""
    if len(text) == 2 * PUBLIC_KEY_BYTES:
        with contextlib.suppress(ValueError):
            raw = bytes.fromhex(text)
    if not raw:
        with contextlib.suppress(binascii.Error, ValueError):
            raw = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    if len(raw) != PUBLIC_KEY_BYTES:
        raise ValueError(f"not an ed25519 public key (64 hex digits or base64): {text[:80]!r}")
    return raw


def load_trusted_keys(path: str | Path) -> frozenset[bytes]:
    """One public key per line (hex or base64); ``#`` starts a comment; blank lines skipped."""
    keys = set()
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        try:
            keys.add(parse_public_key(text.split()[0]))
        except ValueError as exc:
            raise ValueError(f"{path}:{number}: {exc}") from None
    return frozenset(keys)


def default_identity_path(service: str, port: int) -> Path:
    """``$XDG_DATA_HOME/dmoe/<service>-<port>.key`` (``~/.local/share`` when unset)."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "dmoe" / f"{service}-{port}.key"


def resolve_identity(path: str | None, default: Path | None) -> Identity:
    """The identity a service runs with.

    An explicit ``path`` must work (errors propagate: the service refuses to start). Without
    one, the ``default`` file is used where it can be written; otherwise (``default`` None,
    e.g. a server on a random port, or an unwritable home) the key is ephemeral and logged.
    """
    if path:
        return Identity.load_or_create(path)
    if default is not None:
        try:
            return Identity.load_or_create(default)
        except (OSError, ValueError) as exc:
            log.warning(
                "cannot keep the identity, using an ephemeral one",
                extra={"path": str(default), "error": str(exc)},
            )
    identity = Identity.generate()
    log.info(
        "ephemeral identity (give --identity-file to keep it)", extra={"public_key": identity.hex}
    )
    return identity


def add_identity_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("identity")
    group.add_argument(
        "--identity-file",
        default=None,
        help="ed25519 private key (PEM), created with mode 0600 on first start; default "
        "$XDG_DATA_HOME/dmoe/<service>-<port>.key, ephemeral when --port is 0",
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m services.common.identity",
        description="Create an identity key file when missing; print its public key (hex).",
    )
    parser.add_argument("file", help="path of the private key file")
    args = parser.parse_args(argv)
    try:
        identity = Identity.load_or_create(args.file)
    except (OSError, ValueError) as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    sys.stdout.write(identity.hex + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
