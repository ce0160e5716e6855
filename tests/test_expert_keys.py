"""The expert key scheme (services/common/expert_keys.py) is a wire format: pinned here.

The expert server writes these keys, the trainer's beam search and the explorer read them;
servers and trainers of different versions share one swarm, so any change to the items below
must be deliberate (and documented in docs/contracts.md), never a side effect of a refactor.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from services.common import expert_keys as keys

ROOT = Path(__file__).resolve().parent.parent
ADDRESS = "10.0.0.5:31340"
VALUE = b"10.0.0.5:31340"


def test_declaration_items_of_a_small_grid_are_pinned() -> None:
    items = keys.declaration_items(["ffn.0.0", "ffn.0.1", "ffn.1.1", "att.2"], ADDRESS, 1234.5)
    assert items == [
        ("ffn.0.0", "", VALUE, 1234.5),
        ("ffn.", "0", VALUE, 1234.5),
        ("ffn.0.", "0", VALUE, 1234.5),
        ("ffn.0.1", "", VALUE, 1234.5),
        ("ffn.0.", "1", VALUE, 1234.5),
        ("ffn.1.1", "", VALUE, 1234.5),
        ("ffn.", "1", VALUE, 1234.5),
        ("ffn.1.", "1", VALUE, 1234.5),
        ("att.2", "", VALUE, 1234.5),
        ("att.", "2", VALUE, 1234.5),
    ]
    deep = keys.declaration_items(["e.3.14.0"], "h:1", 9.0)
    assert [(k, s) for k, s, _, _ in deep] == [
        ("e.3.14.0", ""), ("e.", "3"), ("e.3.", "14"), ("e.3.14.", "0")
    ]  # fmt: skip


def test_what_readers_ask_for_is_what_servers_declare() -> None:
    """Beam search asks ``prefix_key(name, coords[:t])`` and reads the subkey as the next
    coordinate: for every uid declared, every level finds it."""
    uids = ["ffn.0.0", "ffn.7.12", "big.1048575", "x_y-z.0.1.2"]
    declared = {(k, s) for k, s, _, _ in keys.declaration_items(uids, ADDRESS, 1.0)}
    for uid in uids:
        name, coords = keys.split_uid(uid)
        assert keys.make_uid(name, coords) == uid == keys.make_uid(name + ".", coords)
        assert keys.parse_uid(name, uid) == coords
        assert (uid, "") in declared
        for t, coord in enumerate(coords):
            key = keys.prefix_key(name, coords[:t])
            assert (key, str(coord)) in declared
            assert keys.parse_coordinate(str(coord).encode()) == coord
    assert keys.prefix_key("ffn") == keys.prefix_key("ffn.") == "ffn."
    assert keys.prefix_key("ffn", [3, 14]) == "ffn.3.14."
    assert keys.parse_uid("ffn.", "att.1") is None and keys.parse_uid("ffn", "ffn.x") is None


def test_uid_grammar_and_coordinates_refuse_what_a_stranger_may_write() -> None:
    assert keys.is_valid_uid("ffn.3.14") and keys.is_valid_uid("my_block.0")
    for bad in ("ffn", "ffn.", "ffn.03", "ffn.3.", ".3", "ffn.-1", "ffn.a", "3.4", "f f.1"):
        assert not keys.is_valid_uid(bad), bad
        with pytest.raises(ValueError, match="not an expert uid"):
            keys.split_uid(bad)
    arabic_one = "\u0661".encode()  # a digit to str.isdigit, not to bytes.isdigit
    for bad in (b"", b"01", b"-1", b"+1", b"1.0", b" 1", b"1048576", b"99999999", arabic_one):
        assert keys.parse_coordinate(bad) is None, bad
    assert keys.parse_coordinate(b"0") == 0 and keys.parse_coordinate(b"1048575") == 1048575
    for name in ("ffn", "_x", "a" * 64):
        assert keys.GRID_NAME_RE.match(name)
    for name in ("", "a" * 65, "3ffn", "ffn.", "f f", "_dmoe.grids"):
        assert not keys.GRID_NAME_RE.match(name), name
    for bad in ("", "."):
        with pytest.raises(ValueError, match="uid_prefix"):
            keys.normalize_prefix(bad)


def test_the_key_scheme_imports_nothing_heavy() -> None:
    """The DHT and the explorer use it and must not import torch (nor numpy, nor grpc)."""
    code = (
        "import sys; import services.common.expert_keys; "
        "heavy = {'torch', 'numpy', 'grpc'} & set(sys.modules); assert not heavy, heavy"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
