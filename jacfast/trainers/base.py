"""Shared training loop: checkpoint/resume, mixed precision, DDP, metrics, signal handling.

A subclass implements :meth:`Trainer.compute_loss` ``(x, y) -> (loss, components, logits)``;
``x`` is this process's share of the global batch, (b, *input_dims), and ``loss`` a scalar
averaged over it. Everything else lives here:

- data order: an endless stream of seeded permutations (:class:`BatchStream`); an epoch is
  ``steps_per_epoch`` global batches (default: one pass over the data).
- checkpoints: ``<out_dir>/checkpoint.pt``, written to a temp file then ``os.replace``d, so a
  crash mid-write never corrupts the last one. They hold model, optimizer, scheduler,
  GradScaler, step counters, the metrics history and every RNG (torch, numpy, python, the
  data-order generator), which makes a killed run resumed from its last checkpoint end with
  bit-identical weights on CPU. ``config`` (hyperparameters, model spec, data fingerprint,
  parameter shapes) is stored too, and a checkpoint whose config differs is refused.
- SIGINT / SIGTERM: the current step finishes, a checkpoint is written and
  :class:`TrainingInterrupted` is raised (the CLI turns it into a clean exit).
- mixed precision: ``amp="bf16"`` autocasts; ``amp="fp16"`` adds a GradScaler. The backward
  seeds of input-gradient passes are scaled too, by the loss scale / local batch size
  (:class:`GradScaled` wraps the networks), so fp16 backward passes to the input do not
  underflow; the gradients are unscaled when they reach the fp32 input, so Jacobian norms
  and differences are taken in fp32, and a non-finite Jacobian term makes the scaler skip
  the step and lower the scale (both scales shrink together).
- DDP: under ``torchrun`` (WORLD_SIZE > 1) the student is wrapped in DistributedDataParallel
  (gloo on CPU, nccl on GPU). Each process takes a slice of the same global batch, computes
  its input-gradient terms locally with ``autograd.grad`` and calls one normal ``backward``;
  the local loss is weighted by ``world * b_local / B`` so DDP's gradient average equals the
  1-process gradient of the global batch even when the slices are uneven.
"""
from __future__ import annotations

import json
import math
import os
import random
import signal
import time
import warnings
from contextlib import contextmanager, nullcontext
from typing import Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from jacfast.trainers.distributed import dist_info, init_distributed
from jacfast.trainers.grad_scaling import GradScaled, unwrap
from jacfast.trainers.state import BatchStream, atomic_save, config_hash, restore_rng_state, rng_state

CKPT_NAME = "checkpoint.pt"
METRICS_NAME = "metrics.jsonl"
AMP_MODES = ("none", "bf16", "fp16")


class TrainingInterrupted(Exception):
    """SIGINT/SIGTERM stopped ``fit``; a checkpoint was written first. Rerun to resume."""

    def __init__(self, signum: int, checkpoint: Optional[str]):
        self.signum, self.checkpoint = signum, checkpoint
        name = signal.Signals(signum).name
        super().__init__(f"training interrupted by {name}; checkpoint saved to {checkpoint} (rerun to resume)")


class CheckpointMismatchError(RuntimeError):
    """The checkpoint belongs to a different model or training configuration."""


# --------------------------------------------------------------------------------------------
# the trainer
# --------------------------------------------------------------------------------------------
class Trainer:
    """Base trainer. Subclasses implement ``compute_loss(x, y) -> (loss, components, logits)``.

    Args:
        model: the network being trained (the student).
        train_data: (x, y): x (N, *input_dims) float, y (N,) int64.
        optimizer: "adam" (default: Adam(lr, weight_decay), robust for these BatchNorm-free
            networks), "sgd" (SGD(lr, momentum 0.9, Nesterov, weight_decay)) or an optimizer.
        lr: learning rate of the named optimizers (default 1e-3 for Adam, 0.05 for SGD).
        scheduler: a torch LR scheduler stepped once per optimizer step; default cosine to 0.
        batch_size: the GLOBAL batch size (split across DDP processes).
        epochs, steps_per_epoch: an epoch is ``steps_per_epoch`` steps (default ceil(N / batch)).
        eval_data: (x, y) evaluated after every epoch (clean and at ``eval_sigmas``).
        out_dir: checkpoints and ``metrics.jsonl`` go here (None: no files).
        checkpoint_every: also checkpoint every this many steps (0: only at epoch ends).
        amp: "none" | "bf16" | "fp16".
        seed: seeds torch/numpy/python RNGs (plus the rank) and the data order.
        config: extra hyperparameters recorded in (and checked against) checkpoints.
        progress: show a tqdm bar (rank 0 only).
        step_callback: ``f(trainer)`` called after every step (tests, tooling).
        extra_modules: modules trained along with the model (e.g. a TransferLoss's adapters):
            in the default optimizer and the checkpoints; gradients averaged by hand under DDP.
    """

    def __init__(self, model: nn.Module, train_data: tuple[Tensor, Tensor], *, optimizer="adam", scheduler=None,
                 lr: Optional[float] = None, weight_decay: float = 0.0, batch_size: int = 64, epochs: int = 1,
                 steps_per_epoch: Optional[int] = None, eval_data: Optional[tuple[Tensor, Tensor]] = None,
                 eval_sigmas: Sequence[float] = (), out_dir: Optional[str] = None, checkpoint_every: int = 0,
                 amp: str = "none", device: str | torch.device = "cpu", seed: int = 0,
                 config: Optional[dict] = None, progress: bool = True, step_callback=None,
                 extra_modules: Sequence[nn.Module] = ()):
        if amp not in AMP_MODES:
            raise ValueError(f"amp must be one of {AMP_MODES}, got {amp!r}")
        x, y = train_data
        if x.shape[0] != y.shape[0] or x.shape[0] == 0:
            raise ValueError(f"train_data: x has {x.shape[0]} rows and y {y.shape[0]}; need the same, > 0")
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None and "LOCAL_RANK" in os.environ:
            self.device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))  # one GPU per torchrun process
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.ddp = init_distributed(self.device)
        self.rank, self.world = dist_info()
        self.model = model.to(self.device)
        self.x, self.y = x, y
        self.batch_size = min(int(batch_size), x.shape[0])
        self.epochs = int(epochs)
        self.steps_per_epoch = int(steps_per_epoch or math.ceil(x.shape[0] / self.batch_size))
        self.eval_data, self.eval_sigmas = eval_data, tuple(float(s) for s in eval_sigmas)
        self.out_dir, self.checkpoint_every = out_dir, int(checkpoint_every)
        self.amp, self.seed, self.progress = amp, int(seed), progress
        self.step_callback = step_callback  # called as f(trainer) after each step (tests, tooling)
        self.extra_modules = [m.to(self.device) for m in extra_modules]
        params = list(model.parameters()) + [p for m in self.extra_modules for p in m.parameters()]
        if optimizer == "adam":
            lr = 1e-3 if lr is None else lr
            self.optimizer = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
        elif optimizer == "sgd":
            lr = 0.05 if lr is None else lr
            self.optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
        elif isinstance(optimizer, torch.optim.Optimizer):
            self.optimizer = optimizer
        else:
            raise ValueError(f"optimizer must be 'adam', 'sgd' or a torch.optim.Optimizer, got {optimizer!r}")
        total = self.epochs * self.steps_per_epoch
        self.scheduler = scheduler or torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / max(total, 1))))
        # Double backward through fp16 networks overflows at much smaller scales than plain
        # backward: start low and let the scaler grow (it backs off on overflow anyway).
        self.scaler = torch.amp.GradScaler(self.device.type, init_scale=2.0 ** 10, growth_interval=200,
                                           enabled=(amp == "fp16"))
        self._local_batch = 1
        self.stream = BatchStream(x.shape[0], self.batch_size, seed)
        self.step, self.epoch, self.step_in_epoch, self.history = 0, 0, 0, []
        self.skipped_steps = 0
        self._epoch_sums: dict = {}  # this epoch's metric sums so far
        self.net = nn.parallel.DistributedDataParallel(self.model) if self.ddp else self.model
        from jacfast.data import fingerprint  # local import: data.py needs nothing from here

        self.config = {
            "trainer": type(self).__name__, "model": getattr(model, "spec", type(model).__name__),
            "params": [[k, list(v.shape)] for k, v in model.state_dict().items()],
            "data": fingerprint(x, y), "batch_size": self.batch_size, "epochs": self.epochs,
            "steps_per_epoch": self.steps_per_epoch, "amp": amp, "seed": self.seed, "world": self.world,
            "optimizer": type(self.optimizer).__name__, "lr": lr, "weight_decay": weight_decay,
            "extra": [[k, list(v.shape)] for m in extra_modules for k, v in m.state_dict().items()],
            **(config or {}),
        }
        self._stop_signal: Optional[int] = None
        self._wrappers: dict = {}
        self.batch_indices: Optional[Tensor] = None  # this process's rows of train_data in the current step
        self._seed_everything()

    # ---- to implement ------------------------------------------------------------------------
    def compute_loss(self, x: Tensor, y: Tensor) -> tuple[Tensor, dict, Optional[Tensor]]:
        """x: (b, *input_dims), y: (b,) -> (scalar loss, {name: float tensor}, logits (b, C) or None)."""
        raise NotImplementedError

    # ---- amp ----------------------------------------------------------------------------------
    def autocast(self):
        """Autocast context for the forward passes and the loss (a no-op for amp='none')."""
        if self.amp == "none":
            return nullcontext()
        dtype = torch.bfloat16 if self.amp == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def loss_scale(self) -> float:
        """The GradScaler's current scale (1 unless amp='fp16')."""
        return float(self.scaler.get_scale()) if self.scaler.is_enabled() else 1.0

    def input_grad_scale(self) -> float:
        """Scale of the backward seeds of input-gradient (Jacobian) passes under fp16.

        The loss scale divided by the local batch size: each sample's one-hot seed then gets the
        scale its gradient has in the scaled batch-mean loss, which the GradScaler keeps in fp16
        range (an overflow makes the loss non-finite, the step is skipped and the scale backs off).
        """
        return self.loss_scale() / max(self._local_batch, 1)

    def scaled(self, net: nn.Module) -> nn.Module:
        """``net`` wrapped so input gradients are computed at :meth:`input_grad_scale` (identity otherwise)."""
        if net is None or not self.scaler.is_enabled():
            return net
        # One wrapper per network, kept: strategy caches (input_jacobians "auto") key on the module.
        w = self._wrappers.get(id(net))
        if w is None or w.net is not net:
            w = self._wrappers[id(net)] = GradScaled(net)
        w.scale, w.training = self.input_grad_scale(), net.training
        return w

    # ---- rng / checkpoints --------------------------------------------------------------------
    def _seed_everything(self) -> None:
        s = self.seed * 1000 + self.rank
        torch.manual_seed(s)
        np.random.seed(s % 2**32)
        random.seed(s)

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
            "skipped_steps": self.skipped_steps, "history": self.history, "epoch_sums": dict(self._epoch_sums), "stream": self.stream.state_dict(),
            "rng": self._gather_rng(),
        }

    def _gather_rng(self) -> list:
        state = rng_state()
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
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.epoch, self.step_in_epoch = state["step"], state["epoch"], state["step_in_epoch"]
        self.skipped_steps, self.history = state["skipped_steps"], list(state["history"])
        self._epoch_sums = dict(state["epoch_sums"])
        self.stream.load_state_dict(state["stream"])
        restore_rng_state(state["rng"][self.rank])

    def check_compatible(self, state: dict) -> None:
        """Raise CheckpointMismatchError unless ``state`` was written with this exact config."""
        theirs = state.get("config")
        if not isinstance(theirs, dict):
            raise CheckpointMismatchError("not a jacfast trainer checkpoint (no 'config' entry)")
        ours = json.loads(json.dumps(self.config, default=str))
        theirs = json.loads(json.dumps(theirs, default=str))
        if ours != theirs:
            diff = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
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

    # ---- the loop -------------------------------------------------------------------------------
    def local_slice(self, idx: Tensor) -> Tensor:
        """This process's share of a global batch of indices (contiguous, as even as possible)."""
        return idx.tensor_split(self.world)[self.rank] if self.ddp else idx

    def train_step(self, idx: Tensor) -> dict:
        """One optimizer step on global batch ``idx``. Returns summed (not averaged) metrics."""
        self.model.train()
        for m in self.extra_modules:
            m.train()
        local = self.batch_indices = self.local_slice(idx)
        self._local_batch = len(local)
        x = self.x[local].to(self.device, non_blocking=True)
        y = self.y[local].to(self.device, non_blocking=True)
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast():
            loss, comps, logits = self.compute_loss(x, y)
        # DDP averages gradients over processes; weight so that equals the global-batch mean.
        weight = self.world * len(local) / len(idx)
        self.scaler.scale(loss.float() * weight).backward()
        if self.ddp:  # DDP syncs the model; extra modules are averaged here, as DDP would
            for p in (p for m in self.extra_modules for p in m.parameters()):
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad)
                p.grad /= self.world
        scale_before = self.loss_scale()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        skipped = self.scaler.is_enabled() and (self.loss_scale() < scale_before or not torch.isfinite(loss))
        self.skipped_steps += int(skipped)
        with warnings.catch_warnings():  # a step the scaler skipped still advances the schedule
            warnings.simplefilter("ignore", UserWarning)
            self.scheduler.step()
        if skipped:  # an overflowed step changes nothing; keep its non-finite values out of the averages
            return {"n": 0}
        out = {k: float(v.detach()) * len(local) for k, v in comps.items()}
        out["loss"] = float(loss.detach()) * len(local)
        if logits is not None:
            out["train_acc"] = float((logits.detach().argmax(1) == y).sum())
        out["n"] = len(local)
        return out

    def fit(self, resume: bool = True) -> list[dict]:
        """Train for ``epochs`` (resuming from ``out_dir`` when ``resume``). Returns the metrics history.

        Raises TrainingInterrupted after writing a checkpoint on SIGINT/SIGTERM.
        """
        if not (resume and self.try_resume()) and self.out_dir and self.rank == 0:
            os.makedirs(self.out_dir, exist_ok=True)
            self._write_metrics_file()  # start a fresh metrics file
        from tqdm.auto import tqdm

        with self._signals():
            while self.epoch < self.epochs:
                sums = self._epoch_sums  # partial sums survive a resume mid-epoch (in the checkpoint)
                t0 = time.time()
                bar = tqdm(total=self.steps_per_epoch, initial=self.step_in_epoch, leave=False,
                           desc=f"{type(self).__name__} epoch {self.epoch + 1}/{self.epochs}",
                           disable=not (self.progress and self.rank == 0))
                while self.step_in_epoch < self.steps_per_epoch:
                    m = self.train_step(self.stream.next())
                    for k, v in m.items():
                        sums[k] = sums.get(k, 0.0) + v
                    self.step += 1
                    self.step_in_epoch += 1
                    bar.update(1)
                    if m["n"]:
                        bar.set_postfix(loss=f"{m['loss'] / m['n']:.4f}")
                    if self.step_callback is not None:
                        self.step_callback(self)
                    stop = self._should_stop()
                    last = self.step_in_epoch == self.steps_per_epoch
                    if stop:
                        if last:
                            self._end_epoch(sums, t0)
                        path = self.save_checkpoint()
                        bar.close()
                        raise TrainingInterrupted(stop, path)
                    if last:
                        self._end_epoch(sums, t0)
                        self.save_checkpoint()
                        break
                    if self.checkpoint_every and self.step % self.checkpoint_every == 0:
                        self.save_checkpoint()
                bar.close()
        return self.history

    def _end_epoch(self, sums: dict, t0: float) -> None:
        """Average the epoch's metrics over all processes, evaluate, log one JSON line."""
        keys = sorted(sums)
        vals = torch.tensor([sums[k] for k in keys], dtype=torch.float64)
        if self.ddp:
            dist.all_reduce(vals)
        tot = dict(zip(keys, vals.tolist()))
        n = tot.pop("n", 1.0) or 1.0
        rec = {"epoch": self.epoch + 1, "step": self.step, **{k: v / n for k, v in tot.items()},
               "lr": self.optimizer.param_groups[0]["lr"], "skipped_steps": self.skipped_steps,
               "seconds": round(time.time() - t0, 3)}
        if self.scaler.is_enabled():
            rec["grad_scale"] = self.loss_scale()
        if self.eval_data is not None:
            for s, acc in self.evaluate(*self.eval_data, sigmas=(0.0, *self.eval_sigmas)).items():
                rec["test_acc" if s == 0 else f"test_acc_sigma{s:g}"] = acc
        self.history.append(rec)
        self._epoch_sums = {}
        self.epoch += 1
        self.step_in_epoch = 0
        if self.out_dir and self.rank == 0:
            with open(os.path.join(self.out_dir, METRICS_NAME), "a") as f:
                f.write(json.dumps(rec) + "\n")

    @torch.no_grad()
    def evaluate(self, x: Tensor, y: Tensor, sigmas: Sequence[float] = (0.0,), batch_size: int = 1000,
                 seed: int = 1234) -> dict[float, float]:
        """Accuracy on (x (N, ...), y (N,)) clean (sigma 0) and under Gaussian input noise N(0, sigma^2).

        The noise comes from its own generator (``seed``), so every model sees the same noise and
        training RNG state is untouched. Inputs are not clipped after adding noise.
        """
        model = unwrap(self.model)
        was_training = model.training
        model.eval()
        out = {}
        for sigma in sigmas:
            g = torch.Generator().manual_seed(seed)
            correct = 0
            for i in range(0, x.shape[0], batch_size):
                xb = x[i:i + batch_size]
                if sigma > 0:
                    xb = xb + sigma * torch.randn(xb.shape, generator=g, dtype=xb.dtype)
                with self.autocast():
                    pred = model(xb.to(self.device)).argmax(1).cpu()
                correct += int((pred == y[i:i + batch_size]).sum())
            out[float(sigma)] = correct / max(x.shape[0], 1)
        model.train(was_training)
        return out
