"""What expert servers and trainers announce about themselves in the DHT, for whoever looks
at the swarm (the explorer, ``services/explorer``), and how a reader checks it.

Two well-known keys (docs/contracts.md), each a dictionary of *owned* entries, so every
announcer writes its own slot and nobody can overwrite or remove another's:

- ``_dmoe.grids``, subkey = a grid's uid prefix (``ffn``): an expert server hosting experts of
  that grid, with the grid's shape and the server's address, version, queue and load figures.
- ``_dmoe.trainers``, subkey = the run id: a trainer, with its address and what it trains.

The value is a small JSON object. The names start with ``_`` followed by a word, so they can
never be an expert uid (``name.int...``) or a uid prefix key (ending in ``.``).

Everything here is read from strangers: :func:`parse_grid` and :func:`parse_trainer` accept
only a bounded JSON object of the expected shape (sizes, string lengths, finite numbers,
``host:port`` addresses) and return ``None`` with a reason otherwise. Writers and readers
share this module so the format has one definition.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from services.common.addresses import is_peer_address
from services.common.expert_keys import GRID_NAME_RE, MAX_COORDINATE

GRIDS_KEY = "_dmoe.grids"
TRAINERS_KEY = "_dmoe.trainers"
FORMAT = 1

MAX_VALUE_BYTES = 4096  # an announcement is a few hundred bytes; more is someone else's junk
MAX_TEXT = 64  # characters kept of a free-text field (version, model, dataset)
MAX_RUN_ID = 128
MAX_DIMS = 8
MAX_DIM_SIZE = MAX_COORDINATE  # every reader's bound on a coordinate
PREFIX_RE = GRID_NAME_RE  # an expert uid's name part, at most 64 characters
_RUN_ID_RE = re.compile(r"^[\x21-\x7e]{1,128}$")  # printable ASCII, no spaces


def _text(value: Any, limit: int = MAX_TEXT) -> str:
    """A string field, cut to ``limit`` characters; anything else is empty. Not escaped:
    whoever renders it escapes it."""
    return value[:limit] if isinstance(value, str) else ""


def _number(value: Any, default: float | None = None) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return default
    value = float(value)
    return value if math.isfinite(value) and value >= 0 else default


def _count(value: Any) -> int | None:
    number = _number(value)
    return int(min(number, 1 << 62)) if number is not None else None


def parse_shape(value: Any) -> tuple[int, ...] | None:
    """``[4, 4]`` -> ``(4, 4)``; None unless 1..MAX_DIMS integers in 1..MAX_DIM_SIZE."""
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_DIMS:
        return None
    if not all(type(d) is int and 1 <= d <= MAX_DIM_SIZE for d in value):
        return None
    return tuple(value)


def _load(value: bytes, limit: int = MAX_VALUE_BYTES) -> tuple[dict[str, Any] | None, str]:
    if len(value) > limit:
        return None, "too_large"
    try:
        data = json.loads(value.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None, "not_json"
    if not isinstance(data, dict):
        return None, "not_an_object"
    return data, ""


def _dump(data: dict[str, Any]) -> bytes:
    value = json.dumps(data, separators=(",", ":"), allow_nan=False).encode()
    if len(value) > MAX_VALUE_BYTES:
        raise ValueError(f"announcement of {len(value)} bytes exceeds {MAX_VALUE_BYTES}")
    return value


@dataclass(frozen=True)
class GridAnnouncement:
    """An expert server's announcement for one grid it hosts experts of."""

    prefix: str
    shape: tuple[int, ...]
    address: str
    version: str = ""
    tls: bool = False
    experts: int | None = None  # experts of this grid the server hosts
    expert_cls: str = ""
    max_batch_size: int | None = None
    max_queue_samples: int | None = None  # per expert and method
    queued: int | None = None  # samples queued on the server when it announced
    samples_per_s: float | None = None  # processed over the last period, all experts

    def encode(self) -> bytes:
        data: dict[str, Any] = {
            "v": FORMAT,
            "prefix": self.prefix,
            "shape": list(self.shape),
            "address": self.address,
            "version": self.version,
            "tls": self.tls,
            "expert_cls": self.expert_cls,
        }
        for name in ("experts", "max_batch_size", "max_queue_samples", "queued"):
            if getattr(self, name) is not None:
                data[name] = getattr(self, name)
        if self.samples_per_s is not None:
            data["samples_per_s"] = round(self.samples_per_s, 3)
        return _dump(data)


@dataclass(frozen=True)
class TrainerAnnouncement:
    """A trainer's announcement: where its ``Trainer/Status`` is and what it trains."""

    run_id: str
    address: str
    model: str = ""
    dataset: str = ""
    uid_prefix: str = ""
    grid: tuple[int, ...] = ()
    version: str = ""
    extra: dict[str, str] = field(default_factory=dict)  # other short text fields, if any

    def encode(self) -> bytes:
        data: dict[str, Any] = {
            "v": FORMAT,
            "run_id": self.run_id,
            "address": self.address,
            "model": self.model,
            "dataset": self.dataset,
            "uid_prefix": self.uid_prefix,
            "grid": list(self.grid),
            "version": self.version,
        }
        for key, value in self.extra.items():
            data.setdefault(key, value)
        return _dump(data)


def parse_grid(subkey: bytes, value: bytes) -> tuple[GridAnnouncement | None, str]:
    """The announcement in a ``_dmoe.grids`` entry, or None and why not."""
    data, problem = _load(value)
    if data is None:
        return None, problem
    prefix = data.get("prefix")
    if not isinstance(prefix, str) or not PREFIX_RE.match(prefix):
        return None, "bad_prefix"
    if subkey != prefix.encode():
        return None, "prefix_not_subkey"
    shape = parse_shape(data.get("shape"))
    if shape is None:
        return None, "bad_shape"
    address = data.get("address")
    if not isinstance(address, str) or not is_peer_address(address):
        return None, "bad_address"
    return GridAnnouncement(
        prefix=prefix,
        shape=shape,
        address=address,
        version=_text(data.get("version")),
        tls=data.get("tls") is True,
        experts=_count(data.get("experts")),
        expert_cls=_text(data.get("expert_cls")),
        max_batch_size=_count(data.get("max_batch_size")),
        max_queue_samples=_count(data.get("max_queue_samples")),
        queued=_count(data.get("queued")),
        samples_per_s=_number(data.get("samples_per_s")),
    ), ""


def parse_trainer(subkey: bytes, value: bytes) -> tuple[TrainerAnnouncement | None, str]:
    """The announcement in a ``_dmoe.trainers`` entry, or None and why not."""
    data, problem = _load(value)
    if data is None:
        return None, problem
    run_id = data.get("run_id")
    if not isinstance(run_id, str) or not _RUN_ID_RE.match(run_id):
        return None, "bad_run_id"
    if subkey != run_id.encode():
        return None, "run_id_not_subkey"
    address = data.get("address")
    if not isinstance(address, str) or not is_peer_address(address):
        return None, "bad_address"
    grid = parse_shape(data.get("grid")) or ()
    known = {"v", "run_id", "address", "model", "dataset", "uid_prefix", "grid", "version"}
    extra: dict[str, str] = {}
    for key, item in list(data.items())[:32]:
        if key in known or isinstance(item, bool) or not isinstance(item, str | int | float):
            continue
        extra[key[:32]] = _text(item if isinstance(item, str) else str(item))
        if len(extra) == 8:
            break
    return TrainerAnnouncement(
        run_id=run_id,
        address=address,
        model=_text(data.get("model")),
        dataset=_text(data.get("dataset")),
        uid_prefix=_text(data.get("uid_prefix")),
        grid=grid,
        version=_text(data.get("version")),
        extra=extra,
    ), ""
