"""Where a trainer's micro-batches come from, and how their order survives a resume.

Three sources, chosen by the type of ``train_data``:

- :class:`TensorSource`, ``(x, y)`` tensors in memory: an endless stream of seeded
  permutations (:class:`~jacfast.trainers.state.BatchStream`), rows gathered by index.
- :class:`DatasetSource`, any map-style ``torch.utils.data.Dataset`` (augmenting transforms,
  ``num_workers``): the same seeded index stream feeds a DataLoader as its batch sampler. Before
  each item is loaded, the torch (CPU), numpy and python RNGs are seeded from (seed, the item's
  position in the stream), so an item's random augmentation depends on nothing else: not on
  the worker that loads it, not on the number of workers, not on whether the run was resumed.
  In the main process (``num_workers=0``) the RNG states are restored after each batch, so
  loading never disturbs the training RNG. A resumed run sees exactly the same batches.
- :class:`LoaderSource`, a user's ``DataLoader`` (its sampler, collate and workers are its
  own): passes over the loader, one after another. The checkpoint holds the pass number, the
  batches consumed in the pass and the RNG states from just before the pass's iterator was
  created (torch's global RNG and ``loader.generator``). A resume recreates the iterator
  from those states and loads and drops the consumed batches (it skips at the step boundary,
  no model compute). The remaining batches are then the same when the loader's randomness
  comes from those RNGs (``shuffle=True``, worker seeds, main-process augmentation) and
  ``num_workers`` is unchanged; with ``persistent_workers=True`` the batch order is the same
  but worker-side augmentation may differ. Samplers with ``set_epoch`` (DistributedSampler)
  get the pass number.

Each source yields ``(indices or None, batch)``: indices are the sample indices of this
process's share (None for a user's DataLoader, which does not say).
"""
from __future__ import annotations

import math
import random
from typing import Callable, Optional

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset

from jacfast.trainers.state import BatchStream, restore_rng_state, rng_state

_MASK64 = (1 << 64) - 1
RESERVED_LOADER_KEYS = ("batch_size", "shuffle", "sampler", "batch_sampler", "drop_last", "generator")


def item_seed(seed: int, position: int) -> int:
    """A 63-bit seed for the item at ``position`` of the stream (splitmix64 of both)."""
    z = (int(seed) * 0x9E3779B97F4A7C15 + int(position) + 1) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 1


def _local(idx: Tensor, rank: int, world: int) -> slice:
    """The slice of a global batch this process takes: ``idx.tensor_split(world)[rank]``."""
    q, r = divmod(len(idx), world)
    start = rank * q + min(rank, r)
    return slice(start, start + q + (rank < r))


class TensorSource:
    """``(x (N, *input_dims), y (N, ...))`` in memory; global micro-batches of ``batch_size``."""

    kind = "tensors"

    def __init__(self, x: Tensor, y: Tensor, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        self.x, self.y, self.rank, self.world = x, y, rank, world
        self.stream = BatchStream(x.shape[0], batch_size, seed)
        self.batch_size = self.stream.batch_size

    def __len__(self) -> int:
        return self.x.shape[0]

    def next(self) -> tuple[Tensor, tuple, int]:
        """-> (this process's indices, (x, y) rows, global micro-batch size)."""
        idx = self.stream.next()
        local = idx[_local(idx, self.rank, self.world)]
        return local, (self.x[local], self.y[local]), len(idx)

    def state_dict(self) -> dict:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.stream.load_state_dict(state)

    def close(self) -> None:
        pass


class _SeededItems(Dataset):
    """Items ``(index, dataset[index])`` loaded under RNGs seeded by (seed, stream position)."""

    def __init__(self, dataset, seed: int):
        self.dataset, self.seed = dataset, int(seed)

    def __len__(self):
        return len(self.dataset)

    def _load(self, key):
        position, index = key
        s = item_seed(self.seed, position)
        torch.default_generator.manual_seed(s)  # CPU only: CUDA generators stay the trainer's
        np.random.seed(s % 2**32)
        random.seed(s)
        return index, self.dataset[index]

    def __getitem__(self, key):
        return self.__getitems__([key])[0]

    def __getitems__(self, keys):  # the DataLoader's fetcher calls this once per batch
        saved = rng_state(cuda=False)
        try:
            return [self._load(k) for k in keys]
        finally:
            restore_rng_state(saved)


class _StreamBatches:
    """Batch sampler: this process's share of each global batch of a copy of the trainer's
    stream, as ``(stream position, index)`` keys for :class:`_SeededItems`."""

    def __init__(self, stream: BatchStream, rank: int, world: int):
        self.stream, self.rank, self.world = stream, rank, world

    def __iter__(self):
        while True:
            first = self.stream.count * self.stream.batch_size
            idx = self.stream.next()
            part = _local(idx, self.rank, self.world)
            yield [(first + p, int(idx[p])) for p in range(part.start, part.stop)]


class _KeyedCollate:
    """``[(index, item), ...]`` -> (indices (b,) int64, ``collate_fn(items)``)."""

    def __init__(self, collate_fn: Callable):
        self.collate_fn = collate_fn

    def __call__(self, pairs):
        return torch.tensor([i for i, _ in pairs], dtype=torch.int64), self.collate_fn([it for _, it in pairs])


class DatasetSource:
    """A map-style Dataset read through a DataLoader fed by the seeded stream (see the module)."""

    kind = "dataset"

    def __init__(self, dataset, batch_size: int, seed: int, rank: int = 0, world: int = 1, *,
                 num_workers: int = 0, collate_fn: Optional[Callable] = None, loader_kwargs: Optional[dict] = None):
        n = len(dataset)
        if n == 0:
            raise ValueError("train_data: the dataset is empty")
        kw = dict(loader_kwargs or {})
        bad = sorted(set(kw) & set(RESERVED_LOADER_KEYS))
        if bad:
            raise ValueError(f"loader_kwargs may not set {bad}: the trainer draws the batches (batch_size=, seed=)")
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"num_workers must be an int >= 0, got {num_workers!r}")
        from torch.utils.data import default_collate

        self.dataset, self.rank, self.world, self.seed = dataset, rank, world, int(seed)
        self.stream = BatchStream(n, batch_size, seed)
        self.batch_size = self.stream.batch_size
        self.num_workers, self.collate_fn, self.loader_kwargs = num_workers, collate_fn or default_collate, kw
        self._it = None

    def __len__(self) -> int:
        return len(self.dataset)

    def _start(self) -> None:
        ahead = BatchStream(len(self.dataset), self.batch_size, 0)
        ahead.load_state_dict(self.stream.state_dict())  # the loader may run ahead (prefetch): a copy
        loader = DataLoader(_SeededItems(self.dataset, self.seed),
                            batch_sampler=_StreamBatches(ahead, self.rank, self.world),
                            num_workers=self.num_workers, collate_fn=_KeyedCollate(self.collate_fn),
                            generator=torch.Generator().manual_seed(self.seed),  # not the training RNG
                            **self.loader_kwargs)
        self._it = iter(loader)

    def next(self) -> tuple[Tensor, object, int]:
        if self._it is None:
            self._start()
        idx = self.stream.next()
        want = idx[_local(idx, self.rank, self.world)]
        got, batch = next(self._it)
        if not torch.equal(got, want):  # the loader reads a copy of the stream: they must agree
            raise RuntimeError("internal error: the data loader's batch is not the trainer's")
        return got, batch, len(idx)

    def state_dict(self) -> dict:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.close()
        self.stream.load_state_dict(state)

    def close(self) -> None:
        self._it = None  # drops the iterator: its workers shut down


class LoaderSource:
    """A user's DataLoader, pass after pass (see the module docstring for what resume keeps)."""

    kind = "loader"

    def __init__(self, loader: DataLoader):
        self.loader = loader
        self.passes, self.consumed, self.rng_at_pass = 0, 0, None
        self._it = None
        self.batch_size = loader.batch_size  # None with a batch_sampler

    def __len__(self) -> int:
        return len(self.loader)

    def has_len(self) -> bool:
        if isinstance(self.loader.dataset, IterableDataset):
            try:
                len(self.loader)
            except TypeError:
                return False
        return True

    def _set_epoch(self) -> None:
        for s in (self.loader.sampler, self.loader.batch_sampler, getattr(self.loader.batch_sampler, "sampler", None)):
            if s is not None and callable(getattr(s, "set_epoch", None)):
                s.set_epoch(self.passes)

    def _rng(self) -> dict:
        g = self.loader.generator
        return {"torch": torch.get_rng_state(), "generator": None if g is None else g.get_state()}

    def _set_rng(self, state: dict) -> None:
        torch.set_rng_state(state["torch"])
        if state["generator"] is not None and self.loader.generator is not None:
            self.loader.generator.set_state(state["generator"])

    def _start_pass(self) -> None:
        self._set_epoch()
        self.rng_at_pass = self._rng()
        self._it = iter(self.loader)

    def next(self) -> tuple[None, object, Optional[int]]:
        if self._it is None:
            self._start_pass()
        try:
            batch = next(self._it)
        except StopIteration:
            if self.consumed == 0:
                raise ValueError("train_data: the DataLoader yields no batches") from None
            self.passes, self.consumed = self.passes + 1, 0
            self._start_pass()
            try:
                batch = next(self._it)
            except StopIteration:
                raise ValueError("train_data: the DataLoader yielded no batches in a new pass") from None
        self.consumed += 1
        return None, batch, None

    def state_dict(self) -> dict:
        return {"passes": self.passes, "consumed": self.consumed, "rng_at_pass": self.rng_at_pass}

    def load_state_dict(self, state: dict) -> None:
        self.close()
        self.passes, self.consumed = state["passes"], 0
        if not state["consumed"]:
            return  # the next pass starts fresh from the restored RNGs, as it did the first time
        now = rng_state(cuda=False)
        try:
            self._set_rng(state["rng_at_pass"])
            self._set_epoch()
            self.rng_at_pass = state["rng_at_pass"]
            self._it = iter(self.loader)
            for _ in range(state["consumed"]):
                try:
                    next(self._it)
                except StopIteration:
                    raise ValueError(f"train_data: the DataLoader has fewer batches than the {state['consumed']} "
                                     "the checkpoint consumed in this pass; it changed since") from None
                self.consumed += 1
        finally:
            restore_rng_state(now)

    def close(self) -> None:
        self._it = None


def make_source(train_data, *, batch_size: Optional[int], seed: int, rank: int, world: int, num_workers: int,
                collate_fn, loader_kwargs):
    """``train_data`` -> a source. Bad types and shapes raise TypeError/ValueError naming it."""
    if isinstance(train_data, DataLoader):
        if batch_size is not None and train_data.batch_size != batch_size:
            raise ValueError(f"batch_size={batch_size} but the DataLoader batches {train_data.batch_size}: "
                             "leave batch_size unset with a DataLoader")
        if num_workers or collate_fn is not None or loader_kwargs:
            raise ValueError("num_workers, collate_fn and loader_kwargs are for a Dataset; a DataLoader has its own")
        return LoaderSource(train_data)
    if isinstance(train_data, (tuple, list)) and len(train_data) == 2 and all(isinstance(t, Tensor) for t in train_data):
        x, y = train_data
        if x.ndim == 0 or y.ndim == 0 or x.shape[0] != y.shape[0] or x.shape[0] == 0:
            raise ValueError(f"train_data: x {tuple(x.shape)} and y {tuple(y.shape)} need the same number of "
                             "rows, > 0")
        if num_workers or collate_fn is not None or loader_kwargs:
            raise ValueError("num_workers, collate_fn and loader_kwargs are for a Dataset, not (x, y) tensors")
        return TensorSource(x, y, min(batch_size or 64, x.shape[0]), seed, rank, world)
    if isinstance(train_data, IterableDataset):
        raise TypeError("train_data: an IterableDataset has no indices to draw: wrap it in a DataLoader")
    if isinstance(train_data, Dataset) or (hasattr(train_data, "__getitem__") and hasattr(train_data, "__len__")
                                           and not isinstance(train_data, (str, bytes, Tensor))):
        n = len(train_data)
        return DatasetSource(train_data, min(batch_size or 64, max(n, 1)), seed, rank, world, num_workers=num_workers,
                             collate_fn=collate_fn, loader_kwargs=loader_kwargs)
    raise TypeError(f"train_data must be (x, y) tensors, a map-style Dataset or a DataLoader, got "
                    f"{type(train_data).__name__}")


def default_steps_per_epoch(source, accumulate: int) -> int:
    """One pass over the data: ceil(N / (batch * accumulate)), or the loader's len // accumulate."""
    if isinstance(source, LoaderSource):
        if not source.has_len():
            raise ValueError("steps_per_epoch is required: the DataLoader has no len()")
        return max(len(source) // accumulate, 1)
    return math.ceil(len(source) / (source.batch_size * accumulate))
