"""Datasets: fixed splits, resumable batches, MNIST IDX parsing, character LM windows."""

import gzip
import struct

import numpy as np
import pytest
import torch

from services.trainer.data import load_dataset, load_digits, load_mnist, load_text, read_idx


def test_digits_split_is_fixed_by_seed_and_disjoint() -> None:
    a, b, c = load_digits(0), load_digits(0), load_digits(1)
    assert a.train_x.shape == (1438, 64) and a.test_x.shape == (359, 64)
    assert torch.equal(a.test_x, b.test_x) and torch.equal(a.train_y, b.train_y)
    assert not torch.equal(a.test_x, c.test_x)
    assert float(a.train_x.max()) <= 1.0 and a.num_classes == 10
    train = {tuple(r) for r in a.train_x.tolist()}
    overlap = sum(tuple(r) in train for r in a.test_x.tolist())
    assert overlap < 5  # the digits set has a few duplicate images, not more


def test_batches_resume_where_they_left_off() -> None:
    data = load_digits(3)
    first = [data.batch_at(i * 100, 100) for i in range(30)]  # two epochs
    again = data.batch_at(1000, 100)
    assert torch.equal(first[10][0], again[0]) and torch.equal(first[10][1], again[1])
    seen = torch.cat([y for _x, y in first[:14]] + [data.batch_at(1400, 38)[1]])
    assert torch.equal(
        torch.bincount(seen, minlength=10), torch.bincount(data.train_y, minlength=10)
    )
    wrapped = data.batch_at(1400, 100)  # crosses the epoch boundary
    assert wrapped[0].shape == (100, 64)


def write_idx(path, array: np.ndarray, code: int, compress: bool = False) -> None:
    body = struct.pack(">BBBB", 0, 0, code, array.ndim) + struct.pack(
        f">{array.ndim}I", *array.shape
    )
    body += array.astype(array.dtype.newbyteorder(">")).tobytes()
    path.write_bytes(gzip.compress(body) if compress else body)


def test_mnist_idx_files(tmp_path) -> None:
    rng = np.random.default_rng(0)
    for prefix, n, gz in (("train", 12, True), ("t10k", 5, False)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=(n,), dtype=np.uint8)
        suffix = ".gz" if gz else ""
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte{suffix}", images, 0x08, gz)
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte{suffix}", labels, 0x08, gz)
        if prefix == "t10k":
            expected_images, expected_labels = images, labels
    data = load_mnist(tmp_path)
    assert data.train_x.shape == (12, 784) and data.test_x.shape == (5, 784)
    assert torch.allclose(
        data.test_x[2], torch.tensor(expected_images[2].reshape(-1) / 255.0, dtype=torch.float32)
    )
    assert data.test_y.tolist() == expected_labels.tolist()
    floats = np.arange(6, dtype=np.float32).reshape(2, 3)
    write_idx(tmp_path / "floats", floats, 0x0D)
    assert np.array_equal(read_idx(tmp_path / "floats"), floats)
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "bad")
    write_idx(tmp_path / "short", floats, 0x0D)
    (tmp_path / "short").write_bytes((tmp_path / "short").read_bytes()[:-4])
    with pytest.raises(ValueError, match="data bytes"):
        read_idx(tmp_path / "short")


def test_text_windows_predict_the_next_character(tmp_path) -> None:
    text = "the quick brown fox jumps over the lazy dog. " * 40
    path = tmp_path / "corpus.txt"
    path.write_text(text)
    data = load_text(path, seq_len=16)
    assert data.task == "lm" and data.num_classes == len(set(text))
    assert data.train_x.shape[1] == 16 and torch.equal(data.train_x[0, 1:], data.train_y[0, :-1])
    vocab = sorted(set(text))
    assert "".join(vocab[i] for i in data.train_x[0].tolist()) == text[:16]
    with pytest.raises(ValueError, match="too short"):
        path.write_text("abc")
        load_text(path, seq_len=16)
    with pytest.raises(ValueError, match="needs --data-path"):
        load_dataset("mnist")
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("cifar")


def test_order_seed_changes_batches_not_the_split() -> None:
    a = load_dataset("digits", seed=0, order_seed=1)
    b = load_dataset("digits", seed=0, order_seed=2)
    assert torch.equal(a.test_x, b.test_x) and torch.equal(a.train_y, b.train_y)
    assert not torch.equal(a.batch_at(0, 64)[0], b.batch_at(0, 64)[0])
    small = load_dataset("digits", seed=0, test_samples=50, train_samples=100)
    assert small.test_x.shape == (50, 64) and small.train_x.shape == (100, 64)
    assert torch.equal(small.test_x, a.test_x[:50])
