"""Atomic writes (services/common/files.py): the old file or the new one, never a torn one and
never a temporary file left behind; the mode a key needs from the moment it exists."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from services.common.files import atomic_write
from services.common.identity import Identity


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_writes_bytes_text_and_a_writer_function(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "state.json"  # missing parents are made
    assert atomic_write(target, b"one") == target
    assert target.read_bytes() == b"one"
    atomic_write(target, "twö")
    assert target.read_text(encoding="utf-8") == "twö"
    atomic_write(target, lambda file: file.write(b"three"))
    assert target.read_bytes() == b"three"
    assert os.listdir(target.parent) == ["state.json"]


def test_a_failure_mid_write_leaves_the_old_file_and_no_temporary_file(tmp_path: Path) -> None:
    target = tmp_path / "checkpoint.pt"
    atomic_write(target, b"old contents")

    def torn(file) -> None:  # type: ignore[no-untyped-def]
        file.write(b"half of the new")
        file.flush()
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, torn)
    assert target.read_bytes() == b"old contents"
    assert os.listdir(tmp_path) == ["checkpoint.pt"]


def test_mode_is_set_from_creation_and_replace_false_never_replaces(tmp_path: Path) -> None:
    key = tmp_path / "key.pem"
    atomic_write(key, b"secret", mode=0o600)
    assert _mode(key) == 0o600
    with pytest.raises(FileExistsError):
        atomic_write(key, b"another", mode=0o600, replace=False)
    assert key.read_bytes() == b"secret"
    assert os.listdir(tmp_path) == ["key.pem"]


def test_identity_file_is_created_0600_and_loaded_again(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "identity.pem"
    created = Identity.load_or_create(path)
    assert _mode(path) == 0o600
    assert Identity.load_or_create(path).public_key == created.public_key
    assert os.listdir(path.parent) == ["identity.pem"]
