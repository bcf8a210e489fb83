"""The trainers' checkpoints, resume and signal handling (a mixin of :class:`~jacfast.trainers.Trainer`).

A checkpoint (``<out_dir>/checkpoint.pt``, written atomically) holds the model, extra modules,
optimizer, scheduler, GradScaler, step counters, metrics history, the data source's state
(stream position, or a DataLoader's pass and consumed batches) and every process's RNGs.
It also holds ``config``; a checkpoint whose config differs is refused, except for the
lengths a resumed run may extend or shorten: ``epochs`` and ``steps_per_epoch``.
"""
from __future__ import annotations

import json
import os
import signal
from contextlib import contextmanager
from typing import Optional

import torch
import torch.distributed as dist

from jacfast.trainers.grad_scaling import unwrap
from jacfast.trainers.state import atomic_save, config_hash, restore_rng_state, rng_state

CKPT_NAME = "checkpoint.pt"
METRICS_NAME = "metrics.jsonl"
# Config entries a resumed run may change: a finished 2-epoch run resumed with epochs=3 trains a third.
RESUMABLE_CHANGES = ("epochs", "steps_per_epoch")


class CheckpointMismatchError(RuntimeError):
    """The checkpoint belongs to a different model or training configuration."""


class Checkpointing:
    """Checkpoint, resume and signal methods; the trainer provides the attributes they read."""

    @property
    def checkpoint_path(self) -> Optional[str]:
        return os.path.join(self.out_dir, CKPT_NAME) if self.out_dir else None

    def state_dict(self) -> dict:
        return {
            "format": 1, "config": self.config, "config_hash": config_hash(self.config),
            "model": unwrap(self.model).state_dict(), "extra": [m.state_dict() for m in self.extra_modules],
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
            "step": self.step, "epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
            "skipped_steps": self.skipped_steps, "history": self.history, "epoch_sums": dict(self._epoch_sums),
            "stream": self._gather(self.source.state_dict()), "rng": self._gather(rng_state()),
        }

    def _gather(self, state) -> list:
        """One entry per process (each has its own RNGs, and its own DataLoader position)."""
        if not self.ddp:
            return [state]
        out = [None] * self.world
        dist.all_gather_object(out, state)
        return out

    def load_state_dict(self, state: dict) -> None:
        self.check_compatible(state)
        unwrap(self.model).load_state_dict(state["model"])
        for m, sd in zip(self.extra_modules, state["extra"]):
            m.load_state_dict(sd)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self._default_schedule is not None:  # the cosine's length may have changed (epochs=)
            for g, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs):
                g["lr"] = base * self._default_schedule(self.scheduler.last_epoch)
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.epoch, self.step_in_epoch = state["step"], state["epoch"], state["step_in_epoch"]
        self.skipped_steps, self.history = state["skipped_steps"], list(state["history"])
        self._epoch_sums = dict(state["epoch_sums"])
        stream = state["stream"]
        # Checkpoints written before the data sources kept one stream state (the same on every rank).
        self.source.load_state_dict(stream[self.rank] if isinstance(stream, list) else stream)
        restore_rng_state(state["rng"][self.rank])

    def check_compatible(self, state: dict) -> None:
        """Raise CheckpointMismatchError unless ``state`` was written with this config
        (``epochs`` and ``steps_per_epoch`` may differ)."""
        theirs = state.get("config")
        if not isinstance(theirs, dict):
            raise CheckpointMismatchError("not a jacfast trainer checkpoint (no 'config' entry)")
        ours = json.loads(json.dumps(self.config, default=str))
        theirs = json.loads(json.dumps(theirs, default=str))
        diff = sorted(k for k in set(ours) | set(theirs)
                      if ours.get(k) != theirs.get(k) and k not in RESUMABLE_CHANGES)
        if diff:
            detail = "; ".join(f"{k}: checkpoint={str(theirs.get(k))[:80]} vs now={str(ours.get(k))[:80]}" for k in diff)
            raise CheckpointMismatchError(
                f"refusing to resume from a checkpoint of a different model/config ({detail}). "
                "Use another --out directory, delete the checkpoint, or pass the original settings.")

    def save_checkpoint(self) -> Optional[str]:
        """Write ``<out_dir>/checkpoint.pt`` atomically (rank 0). Collective under DDP."""
        if not self.out_dir:
            return None
        state = self.state_dict()
        if self.rank == 0:
            os.makedirs(self.out_dir, exist_ok=True)
            atomic_save(state, self.checkpoint_path)
        return self.checkpoint_path

    def try_resume(self) -> bool:
        """Load ``<out_dir>/checkpoint.pt`` if it exists. Returns whether it resumed."""
        path = self.checkpoint_path
        if not path or not os.path.exists(path):
            return False
        self.load_state_dict(torch.load(path, map_location="cpu", weights_only=False))
        if self.rank == 0:  # the metrics file is rebuilt from the checkpoint: lines after it are dropped
            self._write_metrics_file()
        return True

    def _write_metrics_file(self) -> None:
        path = os.path.join(self.out_dir, METRICS_NAME)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(json.dumps(h) + "\n" for h in self.history)
        os.replace(tmp, path)

    # ---- signals --------------------------------------------------------------------------------
    @contextmanager
    def _signals(self):
        import threading

        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum, _frame):
            self._stop_signal = signum

        old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    def _should_stop(self) -> int:
        flag = self._stop_signal or 0
        if self.ddp:  # every process must stop at the same step (collectives below)
            t = torch.tensor([flag], dtype=torch.int64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = int(t.item())
        return flag
