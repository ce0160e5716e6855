"""DHT entries and their ownership: who may write a slot, and how that is proven.

A record under a key is a plain value or a dictionary of entries. Each entry lives in a
*slot*: ``(subkey, owner)``. An unowned slot (``owner`` empty) is open to anyone and the later
expiration wins, as in plain Kademlia. An owned slot can only be written by its owner: the
entry carries the owner's ed25519 public key and its signature over
``(key id, subkey, value, expiration)``, so
- nobody can overwrite, shadow or remove another owner's entry (each owner has its own slot:
  many expert servers can declare the same uid side by side),
- a replay of an older signed entry loses to the newer one (later expiration wins per slot),
- a signature cannot be moved to another key or subkey (both are signed).
Only dictionary entries can be owned (a plain value has one slot per key, which would let the
first owner squat the key), and a plain value never replaces a dictionary holding owned
entries; see :mod:`services.dht.storage` for the rules, shared by storage and merge.

The key id (SHA-1 of the key) is signed rather than the key because storing peers only ever
see key ids. Signatures are checked by every node that stores an entry, by a node merging the
answers of a lookup (a forged entry would otherwise shadow a real one), and again by the
client that reads it (:class:`services.dht.client.DHTClient`).
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from services.common.identity import PUBLIC_KEY_BYTES, SIGNATURE_BYTES, Identity, verify

_TAG = b"dmoe.dht.record.v1\x00"

Slot = tuple[bytes | None, bytes]


class Entry(NamedTuple):
    """One value: ``subkey`` None for a plain value; ``owner`` empty when unowned."""

    subkey: bytes | None
    value: bytes
    expiration: float
    owner: bytes = b""
    signature: bytes = b""

    @property
    def slot(self) -> Slot:
        return (self.subkey, self.owner)


def record_message(key_id: bytes, subkey: bytes | None, value: bytes, expiration: float) -> bytes:
    """The bytes an owner signs: every field, length-prefixed, so no two records share them."""
    sub = b"\x00" if subkey is None else b"\x01" + struct.pack(">I", len(subkey)) + subkey
    return b"".join(
        (_TAG, key_id, sub, struct.pack(">I", len(value)), value, struct.pack(">d", expiration))
    )


def sign_entry(
    identity: Identity, key_id: bytes, subkey: bytes, value: bytes, expiration: float
) -> Entry:
    """An entry in ``identity``'s own slot under ``subkey``."""
    signature = identity.sign(record_message(key_id, subkey, value, expiration))
    return Entry(subkey, value, expiration, identity.public_key, signature)


def ownership_problem(key_id: bytes, entry: Entry, trusted: frozenset[bytes] | None) -> str:
    """Why ``entry`` may not be stored or believed ('' when it may): a rejection reason.

    ``trusted``: when given, only entries owned by one of these keys are acceptable (a
    private swarm); unowned entries are refused too.
    """
    if not entry.owner:
        if entry.signature:
            return "signature_without_owner"
        return "untrusted" if trusted is not None else ""
    if len(entry.owner) != PUBLIC_KEY_BYTES:
        return "bad_owner"
    if entry.subkey is None:
        return "owned_plain_value"
    if len(entry.signature) != SIGNATURE_BYTES:
        return "bad_signature"
    if trusted is not None and entry.owner not in trusted:
        return "untrusted"
    message = record_message(key_id, entry.subkey, entry.value, entry.expiration)
    if not verify(entry.owner, entry.signature, message):
        return "bad_signature"
    return ""


PROBLEMS = {
    "signature_without_owner": "a signature without an owner",
    "bad_owner": f"owner must be a {PUBLIC_KEY_BYTES}-byte ed25519 public key",
    "owned_plain_value": "only dictionary entries (with a subkey) can be owned",
    "bad_signature": "the owner's signature does not match (key id, subkey, value, expiration)",
    "untrusted": "not owned by a trusted key (--trusted-keys)",
}
