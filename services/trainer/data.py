"""Datasets that need no download: scikit-learn's digits, MNIST IDX files, a text file.

Every dataset is held in memory as tensors with a train/test split fixed by the split seed, so
trainers with the same split seed see the same test set. Training batches come from a
per-epoch permutation seeded by ``(order_seed, epoch)`` (the trainer's own seed, so trainers of
one swarm see different batches), so a resumed trainer with the same seed continues exactly
where its checkpoint's ``samples_seen`` left off.
"""

from __future__ import annotations

import gzip
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

_IDX_DTYPES: dict[int, type | str] = {
    0x08: np.uint8,
    0x09: np.int8,
    0x0B: ">i2",
    0x0C: ">i4",
    0x0D: ">f4",
    0x0E: ">f8",
}


@dataclass
class Dataset:
    """``task`` is ``classification`` (x ``[n, features]``) or ``lm`` (x, y ``[n, seq]`` ids)."""

    name: str
    task: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int  # classes, or the vocabulary size of a character LM
    seed: int = 0  # the split's
    order_seed: int | None = None  # the batch order's; None: ``seed``
    _cached: tuple[int, torch.Tensor] | None = field(default=None, repr=False, compare=False)

    @property
    def batch_seed(self) -> int:
        """The seed of the training batches' order."""
        return self.seed if self.order_seed is None else self.order_seed

    @property
    def input_dim(self) -> int:
        return int(self.train_x.shape[1])

    def batch_at(self, samples_seen: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The training batch that starts after ``samples_seen`` samples (epochs wrap)."""
        n = len(self.train_x)
        parts, position, need = [], samples_seen, batch_size
        while need > 0:
            epoch, offset = divmod(position, n)
            take = self._order(epoch)[offset : offset + need]
            parts.append(take)
            position, need = position + len(take), need - len(take)
        index = torch.cat(parts)
        return self.train_x[index], self.train_y[index]

    def _order(self, epoch: int) -> torch.Tensor:
        """The epoch's sample order, kept while the epoch lasts (recomputing a permutation of
        60,000 at every step cost ~1 ms, 3% of a small model's trainer)."""
        seed = self.batch_seed * 7919 + epoch
        if self._cached is None or self._cached[0] != seed:
            generator = torch.Generator().manual_seed(seed)
            self._cached = (seed, torch.randperm(len(self.train_x), generator=generator))
        return self._cached[1]

    def test_batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for start in range(0, len(self.test_x), batch_size):
            yield self.test_x[start : start + batch_size], self.test_y[start : start + batch_size]


def _split(n: int, test_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_test = max(1, round(n * test_fraction))
    return order[n_test:], order[:n_test]


def load_digits(seed: int = 0, test_fraction: float = 0.2) -> Dataset:
    """scikit-learn's 8x8 handwritten digits (1,797 images, shipped with the package)."""
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    x = torch.tensor(bunch.data, dtype=torch.float32) / 16.0
    y = torch.tensor(bunch.target, dtype=torch.long)
    train, test = _split(len(x), test_fraction, seed)
    return Dataset("digits", "classification", x[train], y[train], x[test], y[test], 10, seed)


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (MNIST's format), plain or gzipped."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an IDX file")
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    count = int(np.prod(dims)) if dims else 1
    body = raw[4 + 4 * ndim :]
    if len(body) != count * dtype.itemsize:
        raise ValueError(
            f"{path}: {len(body)} data bytes, dims {list(dims)} need {count * dtype.itemsize}"
        )
    return np.frombuffer(body, dtype=dtype).reshape(dims)


def _find(directory: Path, stem: str) -> Path:
    for name in (
        stem,
        stem + ".gz",
        stem.replace("-idx", ".idx"),
        stem.replace("-idx", ".idx") + ".gz",
    ):
        if (directory / name).exists():
            return directory / name
    raise FileNotFoundError(f"no {stem}[.gz] in {directory}")


def load_mnist(directory: str | Path, seed: int = 0) -> Dataset:
    """MNIST from its four IDX files in ``directory`` (the official train/test split)."""
    root = Path(directory)
    parts = []
    for prefix in ("train", "t10k"):
        images = read_idx(_find(root, f"{prefix}-images-idx3-ubyte"))
        labels = read_idx(_find(root, f"{prefix}-labels-idx1-ubyte"))
        if len(images) != len(labels):
            raise ValueError(f"{prefix}: {len(images)} images but {len(labels)} labels")
        x = torch.tensor(images.reshape(len(images), -1), dtype=torch.float32) / 255.0
        parts.append((x, torch.tensor(labels.astype(np.int64))))
    (train_x, train_y), (test_x, test_y) = parts
    return Dataset("mnist", "classification", train_x, train_y, test_x, test_y, 10, seed)


def load_text(
    path: str | Path, seq_len: int = 64, seed: int = 0, test_fraction: float = 0.1
) -> Dataset:
    """A character LM over a plain text file: windows of ``seq_len`` predicting the next char.

    The last ``test_fraction`` of the file is the test text (a split by position keeps test
    windows from overlapping training ones); training windows start every ``seq_len // 2``.
    """
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    vocab = sorted(set(text))
    if len(text) < 4 * (seq_len + 1):
        raise ValueError(f"{path}: {len(text)} characters is too short for seq_len={seq_len}")
    table = {c: i for i, c in enumerate(vocab)}
    ids = torch.tensor([table[c] for c in text], dtype=torch.long)
    cut = int(len(ids) * (1 - test_fraction))
    cut = min(cut, len(ids) - seq_len - 1)

    def windows(part: torch.Tensor, stride: int) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.arange(0, len(part) - seq_len - 1 + 1, stride)
        chunk = torch.stack([part[s : s + seq_len + 1] for s in starts.tolist()])
        return chunk[:, :-1], chunk[:, 1:]

    train_x, train_y = windows(ids[:cut], max(1, seq_len // 2))
    test_x, test_y = windows(ids[cut:], seq_len)
    return Dataset("text", "lm", train_x, train_y, test_x, test_y, len(vocab), seed)


def load_dataset(
    name: str,
    path: str | None = None,
    *,
    seed: int = 0,
    seq_len: int = 64,
    order_seed: int | None = None,
    test_samples: int = 0,
    train_samples: int = 0,
) -> Dataset:
    """``seed`` fixes the split, ``order_seed`` (default: ``seed``) the batch order;
    ``test_samples > 0`` keeps only the first that many test samples (cheaper evaluations),
    ``train_samples > 0`` the first that many training samples (less memory per trainer)."""
    if name == "digits":
        data = load_digits(seed)
    elif name in ("mnist", "text"):
        if not path:
            raise ValueError(f"dataset {name!r} needs --data-path")
        if name == "mnist":
            data = load_mnist(path, seed)
        else:
            data = load_text(path, seq_len=seq_len, seed=seed)
    else:
        raise ValueError(f"unknown dataset {name!r} (digits, mnist, text)")
    data.order_seed = order_seed
    if test_samples > 0:
        data.test_x, data.test_y = data.test_x[:test_samples], data.test_y[:test_samples]
    if train_samples > 0:
        data.train_x = data.train_x[:train_samples].clone()
        data.train_y = data.train_y[:train_samples].clone()
    return data
