"""Teacher cache: the teacher's logits, selected outputs and Jacobian rows, computed once.

For a fixed data set (no augmentation) the teacher's part of a distillation step is the same
every epoch. :meth:`TeacherCache.build` computes it once, sample by sample in data-set order,
into one memory-mapped file; :meth:`TeacherCache.open` maps it back and ``cache[idx]`` gives
the :class:`~jacfast.losses.TeacherOutputs` of a batch (pass it to
``DistillationLoss(...)(student, x, y, teacher_outputs=cache[idx])``)::

    logits  (N, C)            float32
    indices (N, K)            int64     (the selected outputs: teacher top-k, target, or all)
    jac     (N, K, *input)    float32 | bfloat16 | float16   (``dtype=``; bf16 halves the file)

File layout: 8-byte magic, 8-byte little-endian header length, a JSON header (in a 64 KiB
region), then the three arrays, each aligned to 4096 bytes. The file is written under a
temporary name in the same directory and renamed into place (atomic), so a crash never leaves
a half-written cache under the real name.

The cache is keyed by fingerprints (BLAKE2b) of (1) the data set (every sample's bytes,
labels included), (2) the teacher's state_dict and class, and (3) the settings (selection,
K, storage dtype, input shape). Opening with a different data set, teacher or settings raises
:class:`CacheMismatchError` saying which changed. ``verify="sample"`` checks only N and 64
evenly spaced samples (fast on big data sets, but misses changes elsewhere).

Data: a tensor X (N, *input), a pair (X, Y) of tensors, or a map-style dataset whose items
are ``x`` or ``(x, y, ...)`` tensors. Batches need their sample indices: wrap a dataset in
:class:`WithIndices` so that a DataLoader yields ``(idx, x, y)``.

Models called with several inputs (``inputs=``, ``outputs=``: :class:`jacfast.ModelCall`):
X may also be a dict of (N, ...) tensors (``{"inputs_embeds": E, "attention_mask": M}``) or
a dataset whose ``x`` is such a dict (of per-sample tensors); ``inputs`` names the
differentiated entry, whose shape is the rows' ``*input``. Sequence teachers (B, L, C) store
logits (N, L, C) and, per sample, the K' = L * Kp rows of every position (indices: position
* C + class, -1 for an ignored target).

The teacher runs in eval mode while the cache is built (its mode is restored afterwards):
cached rows must not depend on the rest of the batch.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from typing import Optional, Union

import numpy as np
import torch
from torch import Tensor, nn

from jacfast.losses.distillation import TeacherOutputs

MAGIC = b"JFTCACH1"
HEADER_REGION = 65536
ALIGN = 4096
FORMAT = 1
_STORE = {torch.float32: ("float32", np.float32), torch.bfloat16: ("bfloat16", np.uint16),
          torch.float16: ("float16", np.float16)}
_SAMPLE_POINTS = 64


class CacheMismatchError(RuntimeError):
    """The cache was built for a different data set, teacher or settings."""


class WithIndices(torch.utils.data.Dataset):
    """Dataset wrapper whose items are ``(index, *item)``, to look batches up in the cache."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        item = self.dataset[i]
        return (i, *item) if isinstance(item, (tuple, list)) else (i, item)


# ----------------------------------------------------------------------------------------------
# Data access and fingerprints
# ----------------------------------------------------------------------------------------------
class _Data:
    """Uniform access to a tensor, an (X, Y) pair or a map-style dataset."""

    def __init__(self, data):
        self.x = self.y = self.dataset = None
        if isinstance(data, Tensor) or (isinstance(data, dict) and all(isinstance(t, Tensor) for t in data.values())):
            self.x = data
        elif (isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[1], Tensor)
              and (isinstance(data[0], Tensor) or (isinstance(data[0], dict)
                                                    and all(isinstance(t, Tensor) for t in data[0].values())))):
            self.x, self.y = data
            if self.y.shape[0] != _len(self.x):
                raise ValueError(f"X and Y must have the same length, got {_len(self.x)} and {tuple(self.y.shape)}")
        elif hasattr(data, "__getitem__") and hasattr(data, "__len__"):
            self.dataset = data
        else:
            raise TypeError("data must be a tensor X, a pair (X, Y) of tensors or a map-style dataset")
        if isinstance(self.x, Tensor) and self.x.ndim < 2:
            raise ValueError(f"X must have shape (N, *input_dims), got {tuple(self.x.shape)}")
        if len(self) == 0:
            raise ValueError("the data set is empty")

    def __len__(self):
        return _len(self.x) if self.x is not None else len(self.dataset)

    def item(self, i: int):
        if self.x is not None:
            return _index(self.x, i), (None if self.y is None else self.y[i])
        item = self.dataset[i]
        x, y = (item[0], item[1] if len(item) > 1 else None) if isinstance(item, (tuple, list)) else (item, None)
        if not (isinstance(x, Tensor) or (isinstance(x, dict) and all(isinstance(v, Tensor) for v in x.values()))):
            raise TypeError(f"dataset items must be tensors (or dicts of tensors) or (x, y, ...) tuples of them, got "
                            f"{type(x).__name__}")
        return x, (None if y is None else torch.as_tensor(y))

    def batch(self, start: int, stop: int):
        if self.x is not None:
            return _index(self.x, slice(start, stop)), (None if self.y is None else self.y[start:stop])
        items = [self.item(i) for i in range(start, stop)]
        ys = [y for _, y in items]
        xs = [x for x, _ in items]
        xb = {k: torch.stack([x[k] for x in xs]) for k in xs[0]} if isinstance(xs[0], dict) else torch.stack(xs)
        return xb, (None if any(y is None for y in ys) else torch.stack(ys))

    def sample_positions(self) -> list:
        n = len(self)
        return sorted({round(i * (n - 1) / max(_SAMPLE_POINTS - 1, 1)) for i in range(min(n, _SAMPLE_POINTS))})


def _len(x) -> int:
    return len(next(iter(x.values()))) if isinstance(x, dict) else len(x)


def _index(x, i):
    return {k: v[i] for k, v in x.items()} if isinstance(x, dict) else x[i]


def _to(x, device):
    return {k: v.to(device) for k, v in x.items()} if isinstance(x, dict) else x.to(device)


def _entry(x, inputs) -> Tensor:
    """The differentiated entry of one sample or batch ``x``."""
    if isinstance(x, dict):
        if inputs not in x:
            raise ValueError(f"inputs={inputs!r} is not a key of the data's x; keys: {list(x)}")
        return x[inputs]
    return x


def _update(h, t: Optional[Tensor]) -> None:
    if isinstance(t, dict):
        for key in sorted(t):
            h.update(str(key).encode())
            _update(h, t[key])
        return
    if t is None:
        h.update(b"none")
        return
    t = t.detach().cpu().contiguous()
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def _data_fingerprint(data: _Data, full: bool) -> str:
    """Hash of N and of every sample (full) or of the sampled positions (sample)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"n={len(data)};full={full}".encode())
    positions = range(len(data)) if full else data.sample_positions()
    for i in positions:
        x, y = data.item(i)
        _update(h, x)
        _update(h, y)
    return h.hexdigest()


def _teacher_fingerprint(teacher) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(type(teacher).__qualname__.encode())
    if isinstance(teacher, nn.Module):
        for name, t in teacher.state_dict().items():
            h.update(name.encode())
            _update(h, t)
    return h.hexdigest()


def _dtype(dtype) -> torch.dtype:
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    if dtype not in _STORE:
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")
    return dtype


def _settings(select: str, k: int, dtype: torch.dtype, input_shape, outputs=None, inputs=None) -> dict:
    if select not in ("topk", "target", "all"):
        raise ValueError(f"select must be 'topk', 'target' or 'all', got {select!r}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    settings = {"select": select, "k": k if select == "topk" else None, "dtype": _STORE[dtype][0],
                "input_shape": list(input_shape)}
    if outputs is not None or inputs is not None:  # (absent from caches built without them)
        settings["outputs"] = outputs if isinstance(outputs, (str, int)) else "callable" if callable(outputs) else None
        settings["inputs"] = inputs
    return settings


def _fsync_dir(directory: str) -> None:
    """Make the rename durable (best effort: not every platform can open a directory)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


# ----------------------------------------------------------------------------------------------
# The cache
# ----------------------------------------------------------------------------------------------
class TeacherCache:
    """A built cache, memory-mapped read-only. Create with :meth:`build`, :meth:`open` or
    :meth:`open_or_build`; ``cache[idx]`` -> :class:`TeacherOutputs` for batch indices ``idx``
    (a 1-D int tensor / array / list, or a slice): logits (B, C) float32, jac
    (B, K, *input_dims) in the stored dtype, indices (B, K) int64, all on the CPU."""

    def __init__(self, path: str, header: dict):
        self.path, self.header = path, header
        self._arrays = {}
        for name, spec in header["arrays"].items():
            self._arrays[name] = np.memmap(path, dtype=np.dtype(spec["numpy"]), mode="r", offset=spec["offset"],
                                           shape=tuple(spec["shape"]))

    def __len__(self) -> int:
        return self.header["n"]

    @property
    def num_classes(self) -> int:
        return self.header["num_classes"]

    @property
    def k(self) -> int:
        return self.header["arrays"]["indices"]["shape"][1]

    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, self.header["settings"]["dtype"])

    def __repr__(self) -> str:
        s = self.header["settings"]
        return (f"TeacherCache({self.path!r}, n={len(self)}, C={self.num_classes}, select={s['select']!r}, "
                f"K={self.k}, dtype={s['dtype']}, input_shape={tuple(s['input_shape'])})")

    def __getitem__(self, index) -> TeacherOutputs:
        if isinstance(index, slice):
            index = range(*index.indices(len(self)))
        idx = np.asarray(index.cpu() if isinstance(index, Tensor) else index, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < -len(self) or idx.max() >= len(self)):
            raise IndexError(f"cache index out of range for {len(self)} samples")
        jac = torch.from_numpy(np.ascontiguousarray(self._arrays["jac"][idx]))  # fancy indexing copies
        if self.dtype == torch.bfloat16:
            jac = jac.view(torch.bfloat16)
        return TeacherOutputs(torch.from_numpy(np.ascontiguousarray(self._arrays["logits"][idx])), jac,
                              torch.from_numpy(np.ascontiguousarray(self._arrays["indices"][idx])))

    # -- opening ---------------------------------------------------------------------------------
    @staticmethod
    def read_header(path: str) -> dict:
        with open(path, "rb") as f:
            head = f.read(16)
            if len(head) < 16 or head[:8] != MAGIC:
                raise CacheMismatchError(f"{path} is not a jacfast teacher cache (bad magic)")
            n = int.from_bytes(head[8:16], "little")
            if n > HEADER_REGION - 16:
                raise CacheMismatchError(f"{path}: corrupt header length {n}")
            header = json.loads(f.read(n).decode())
        if header.get("format") != FORMAT:
            raise CacheMismatchError(f"{path}: cache format {header.get('format')} (this jacfast reads {FORMAT})")
        return header

    @classmethod
    def open(cls, path: str, teacher, data, *, select: str = "topk", k: int = 1, dtype=torch.float32,
             verify: str = "full", outputs=None, inputs=None) -> "TeacherCache":
        """Map an existing cache after checking that it belongs to this data set, teacher and
        settings (``verify="full"`` re-hashes every sample, ``"sample"`` N and 64 of them).
        Raises :class:`CacheMismatchError` naming what changed, FileNotFoundError if absent."""
        if verify not in ("full", "sample"):
            raise ValueError(f"verify must be 'full' or 'sample', got {verify!r}")
        d = _Data(data)
        header = cls.read_header(path)
        want = _settings(select, k, _dtype(dtype), _entry(d.item(0)[0], inputs).shape, outputs, inputs)
        have = header["settings"]
        changed = [f"{key}: cache {have.get(key)!r}, requested {want[key]!r}"
                   for key in want if have.get(key) != want[key]]
        if changed:
            raise CacheMismatchError(f"teacher cache {path} was built with other settings ({'; '.join(changed)}); "
                                     "rebuild it (TeacherCache.build(..., overwrite=True)) or use another path")
        if header["n"] != len(d):
            raise CacheMismatchError(f"the data set changed: the cache {path} holds {header['n']} samples, the data "
                                     f"set has {len(d)}; rebuild the cache")
        key = "data_fingerprint" if verify == "full" else "data_sample_fingerprint"
        if _data_fingerprint(d, full=verify == "full") != header[key]:
            raise CacheMismatchError(f"the data set changed since the teacher cache {path} was built (its samples or "
                                     "labels differ; random augmentation also does this); rebuild the cache")
        if _teacher_fingerprint(teacher) != header["teacher_fingerprint"]:
            raise CacheMismatchError(f"the teacher changed (class or weights) since the teacher cache {path} was "
                                     "built; rebuild the cache")
        return cls(path, header)

    @classmethod
    def open_or_build(cls, path: str, teacher, data, **kwargs) -> "TeacherCache":
        """:meth:`open` if ``path`` exists (a mismatch still raises), else :meth:`build`."""
        open_kw = {k: kwargs[k] for k in ("select", "k", "dtype", "verify", "outputs", "inputs") if k in kwargs}
        if os.path.exists(path):
            return cls.open(path, teacher, data, **open_kw)
        kwargs.pop("verify", None)
        return cls.build(path, teacher, data, **kwargs)

    # -- building --------------------------------------------------------------------------------
    @classmethod
    def build(cls, path: str, teacher, data, *, select: str = "topk", k: int = 1, dtype=torch.float32,
              batch_size: int = 64, device: Optional[Union[str, torch.device]] = None, strategy: str = "auto",
              progress: bool = True, overwrite: bool = False, outputs=None, inputs=None) -> "TeacherCache":
        """Compute and write the cache (see the module docstring), then open it.

        Args:
            path: file to write; an existing one raises FileExistsError unless ``overwrite``.
            teacher: x (B, *input) -> logits (B, C).
            data: tensor X, pair (X, Y) or dataset (labels required for ``select="target"``).
            select, k: which outputs' rows: "topk" (k largest teacher outputs), "target", "all".
            dtype: storage of the rows: float32, bfloat16 or float16.
            batch_size, device, strategy: how the teacher runs (device: the teacher's by default).
            progress: tqdm progress bar.
            outputs, inputs: how the teacher is called (:class:`jacfast.ModelCall`); ``inputs``
                names the differentiated entry of a dict x.
        """
        from tqdm.auto import tqdm

        from jacfast.jacobians import input_jacobians, select as sel

        dtype = _dtype(dtype)
        if os.path.exists(path) and not overwrite:
            raise FileExistsError(f"{path} exists; open it with TeacherCache.open or pass overwrite=True")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        d = _Data(data)
        n, x0 = len(d), d.item(0)[0]
        settings = _settings(select, k, dtype, _entry(x0, inputs).shape, outputs, inputs)
        if select == "target" and d.item(0)[1] is None:
            raise ValueError("select='target' needs labels: pass (X, Y) or a dataset of (x, y) items")
        if device is None:
            p = next(iter(teacher.parameters()), None) if isinstance(teacher, nn.Module) else None
            device = p.device if p is not None else torch.device("cpu")
        was_training = teacher.training if isinstance(teacher, nn.Module) else None
        full, sample = hashlib.blake2b(digest_size=16), hashlib.blake2b(digest_size=16)
        full.update(f"n={n};full=True".encode())
        sample.update(f"n={n};full=False".encode())
        sample_at = set(d.sample_positions())
        directory = os.path.dirname(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=directory)
        os.close(fd)
        arrays, header = {}, None
        try:
            if isinstance(teacher, nn.Module):
                teacher.eval()
            bar = tqdm(total=n, unit="sample", desc="teacher cache", disable=not progress)
            for start in range(0, n, batch_size):
                stop = min(n, start + batch_size)
                xb, yb = d.batch(start, stop)
                for i in range(start, stop):  # fingerprints, from the very samples cached
                    xi, yi = (_index(xb, i - start), None if yb is None else yb[i - start])
                    for h in (full, sample) if i in sample_at else (full,):
                        _update(h, xi)
                        _update(h, yi)
                choice = {"topk": lambda: sel.topk(k), "all": lambda: sel.all(),
                          "target": lambda: sel.target(yb.to(device).long())}[select]()
                logits, jac, idx = input_jacobians(teacher, _to(xb, device), choice, strategy=strategy, outputs=outputs,
                                                   inputs=inputs)
                if not arrays:
                    header = cls._layout(n, list(logits.shape[1:]), jac.shape[1], jac.shape[2:], dtype)
                    with open(tmp, "wb") as f:
                        f.truncate(header["size"])
                    arrays = {name: np.memmap(tmp, dtype=np.dtype(s["numpy"]), mode="r+", offset=s["offset"],
                                              shape=tuple(s["shape"])) for name, s in header["arrays"].items()}
                arrays["logits"][start:stop] = logits.float().cpu().numpy()
                arrays["indices"][start:stop] = idx.cpu().numpy()
                j = jac.to(dtype).cpu()
                arrays["jac"][start:stop] = (j.view(torch.int16).numpy().view(np.uint16) if dtype == torch.bfloat16
                                             else j.numpy())
                bar.update(stop - start)
            bar.close()
            for a in arrays.values():
                a.flush()
            header.update(settings=settings, data_fingerprint=full.hexdigest(),
                          data_sample_fingerprint=sample.hexdigest(), teacher_fingerprint=_teacher_fingerprint(teacher))
            arrays.clear()
            blob = json.dumps(header).encode()
            if len(blob) > HEADER_REGION - 16:
                raise ValueError("teacher cache header too large")
            with open(tmp, "r+b") as f:
                f.write(MAGIC + len(blob).to_bytes(8, "little") + blob)
                f.flush()
                os.fsync(f.fileno())
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the cache the usual mode
            os.replace(tmp, path)  # atomic: readers see the old file or the complete new one
            _fsync_dir(directory)
        except BaseException:
            arrays.clear()
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        finally:
            if was_training is not None:
                teacher.train(was_training)
        return cls(path, cls.read_header(path))

    @staticmethod
    def _layout(n: int, logits_shape: list, rows: int, input_shape, dtype: torch.dtype) -> dict:
        store_name, store_np = _STORE[dtype]
        classes = logits_shape[-1]
        specs = {"logits": ("float32", [n, *logits_shape]), "indices": ("int64", [n, rows]),
                 "jac": (np.dtype(store_np).name, [n, rows, *input_shape])}
        offset, arrays = HEADER_REGION, {}
        for name, (np_name, shape) in specs.items():
            arrays[name] = {"numpy": np_name, "shape": shape, "offset": offset}
            offset = _align(offset + int(np.prod(shape)) * np.dtype(np_name).itemsize)
        return {"format": FORMAT, "n": n, "num_classes": classes, "arrays": arrays, "size": offset,
                "jac_dtype": store_name}
