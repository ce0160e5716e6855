"""The expert key scheme: uid grammar, prefix keys, coordinates and declaration items.

One place for how an expert is named and found in the DHT (docs/contracts.md, "Key scheme
for experts"), because four parties must agree on it byte for byte: the expert server writes
the declarations (:func:`declaration_items`), the trainer's beam search asks for prefix keys
(:func:`prefix_key`) and believes only coordinate subkeys (:func:`parse_coordinate`), and the
swarm explorer walks the same keys. A change here changes the wire format; the items for a
small grid are pinned in ``tests/test_expert_keys.py``.

A uid is a name followed by one or more integer coordinates without leading zeros
(``ffn.3.14``). Uid ``ffn.3.14`` at ``host:port`` is declared as key ``ffn.3.14`` subkey
``""``, key ``ffn.3.`` subkey ``14`` and key ``ffn.`` subkey ``3``, each with value
``host:port``. Pure string work, no torch and nothing heavy: the DHT and the explorer
import it too.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

_NAME_START = "[A-Za-z_]"
_NAME_REST = "[A-Za-z0-9_-]"
NAME = rf"{_NAME_START}{_NAME_REST}*"  # a grid's name (the uid prefix without its dot)
INT = r"(?:0|[1-9][0-9]*)"  # a coordinate: no sign, no leading zeros
UID_RE = re.compile(rf"^{NAME}(?:\.{INT})+$")
MAX_NAME = 64  # longest grid name an announcement or the explorer accepts
GRID_NAME_RE = re.compile(rf"^{_NAME_START}{_NAME_REST}{{0,{MAX_NAME - 1}}}$")
MAX_COORDINATE = 1 << 20  # no grid is that wide: a larger subkey is garbage
_MAX_COORDINATE_DIGITS = len(str(MAX_COORDINATE))

# (key, subkey, value, expiration): one entry of a DHT put
Item = tuple[str, str, bytes, float]


def is_valid_uid(uid: str) -> bool:
    return bool(UID_RE.match(uid))


def split_uid(uid: str) -> tuple[str, tuple[int, ...]]:
    """``ffn.3.14`` -> ``("ffn", (3, 14))``; ValueError when ``uid`` is not a valid uid."""
    if not is_valid_uid(uid):
        raise ValueError(f"not an expert uid: {uid[:100]!r}")
    name, *coords = uid.split(".")
    return name, tuple(int(c) for c in coords)


def normalize_prefix(uid_prefix: str) -> str:
    """``"ffn"`` and ``"ffn."`` both name the grid whose uids look like ``ffn.3.14``."""
    if not uid_prefix or uid_prefix == ".":
        raise ValueError("uid_prefix must name the grid, e.g. 'ffn.'")
    return uid_prefix if uid_prefix.endswith(".") else uid_prefix + "."


def make_uid(uid_prefix: str, coords: Sequence[int]) -> str:
    """``("ffn", (3, 14))`` -> ``ffn.3.14``."""
    return normalize_prefix(uid_prefix) + ".".join(str(int(c)) for c in coords)


def parse_uid(uid_prefix: str, uid: str) -> tuple[int, ...] | None:
    """``ffn.3.14`` -> ``(3, 14)``; None when ``uid`` is not under ``uid_prefix``."""
    prefix = normalize_prefix(uid_prefix)
    if not uid.startswith(prefix):
        return None
    try:
        return tuple(int(part) for part in uid[len(prefix) :].split("."))
    except ValueError:
        return None


def prefix_key(uid_prefix: str, coords: Sequence[int] = ()) -> str:
    """The key whose subkeys are the live next coordinates: ``("ffn", (3,))`` -> ``ffn.3.``."""
    return normalize_prefix(uid_prefix) + "".join(f"{int(c)}." for c in coords)


def parse_coordinate(subkey: bytes) -> int | None:
    """``b"14"`` -> 14; None for anything that is not a grid coordinate (non-ASCII, sign,
    leading zeros, too large), which a stranger may have written."""
    if not subkey or len(subkey) > _MAX_COORDINATE_DIGITS or not subkey.isdigit():
        return None  # (bytes.isdigit is ASCII-only)
    if len(subkey) > 1 and subkey[:1] == b"0":
        return None
    coord = int(subkey)
    return coord if coord < MAX_COORDINATE else None


def declaration_items(uids: Iterable[str], address: str, expiration: float) -> list[Item]:
    """The DHT entries announcing ``uids`` at ``address``: per uid the uid itself (subkey
    ``""``) and every prefix key with the next coordinate as subkey; an entry shared by
    several uids (``ffn.`` / ``3``) appears once, at its first place."""
    value = address.encode()
    items: dict[tuple[str, str], Item] = {}
    for uid in uids:
        items[(uid, "")] = (uid, "", value, expiration)
        parts = uid.split(".")
        for depth in range(1, len(parts)):
            key = ".".join(parts[:depth]) + "."
            subkey = parts[depth]
            items[(key, subkey)] = (key, subkey, value, expiration)
    return list(items.values())
