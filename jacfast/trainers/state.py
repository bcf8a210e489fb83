"""What a checkpoint holds besides modules: atomic writes, config hashes, RNG states, data order."""
from __future__ import annotations

import hashlib
import json
import os
import random
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor


def config_hash(config: dict) -> str:
    return hashlib.sha1(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def atomic_save(obj: Any, path: str) -> None:
    """torch.save to a temp file in the same directory, fsync, then os.replace (atomic on POSIX)."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_state(cuda: bool = True) -> dict:
    """The torch (CPU, and CUDA when initialized and ``cuda``), numpy and python RNG states."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if cuda and torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class BatchStream:
    """Endless stream of batch indices over ``n`` examples: seeded permutations, one after another.

    ``next()`` returns a (batch,) int64 index tensor; batches may straddle two permutations.
    Its state (the generator state before the current permutation + the position in it) is
    enough to reproduce the remaining stream exactly. ``count`` is the number of batches drawn.
    """

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.batch_size = n, min(batch_size, n)
        self.gen = torch.Generator().manual_seed(int(seed))
        self.perm: Optional[Tensor] = None
        self.pos, self._state_at_perm, self.count = 0, None, 0

    def _new_perm(self) -> None:
        self._state_at_perm = self.gen.get_state()
        self.perm, self.pos = torch.randperm(self.n, generator=self.gen), 0

    def next(self) -> Tensor:
        parts, need = [], self.batch_size
        while need:
            if self.perm is None or self.pos == self.n:
                self._new_perm()
            take = min(need, self.n - self.pos)
            parts.append(self.perm[self.pos:self.pos + take])
            self.pos, need = self.pos + take, need - take
        self.count += 1
        return torch.cat(parts)

    def state_dict(self) -> dict:
        return {"gen": self.gen.get_state(), "state_at_perm": self._state_at_perm, "pos": self.pos,
                "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.count = state.get("count", 0)  # absent from checkpoints that predate it (tensor data)
        if state["state_at_perm"] is None:
            self.gen.set_state(state["gen"])
            self.perm, self.pos = None, 0
            return
        self.gen.set_state(state["state_at_perm"])
        self._new_perm()  # regenerates the same permutation and leaves gen where it was
        self.pos = state["pos"]
