"""Shared training loop: data sources, accumulation, clipping, checkpoint/resume, mixed precision, DDP.

A subclass implements :meth:`Trainer.compute_loss` ``(x, y) -> (loss, components, logits)``;
``x`` is this process's share of one micro-batch (a Tensor (b, *input_dims), or the tuple /
dict of model inputs that ``batch_fn`` made), ``y`` its targets, and ``loss`` a scalar
averaged over it. Everything else lives here:

- data (:mod:`jacfast.trainers.sources`): ``(x, y)`` tensors, any map-style ``Dataset``
  (read by a DataLoader with ``num_workers``, ``collate_fn``; order and augmentation seeded
  per item) or a user's ``DataLoader``. An epoch is ``steps_per_epoch`` optimizer steps
  (default: one pass over the data). ``batch_fn`` splits a batch into (model inputs, targets).
- accumulation: ``accumulate=n`` micro-batches per optimizer step; micro-batch i's loss is
  weighted by b_i / sum(b) (1/n when they are equal), so for losses that are means over
  samples the step's gradient is that of the one big batch (BatchNorm statistics and
  token-mean losses are per micro-batch, so those differ). Under DDP only the last
  micro-batch's backward syncs.
- clipping: ``clip_grad_norm=c`` rescales the (unscaled, DDP-averaged) gradient of the
  model and extra modules to total L2 norm <= c before the step; the norm before clipping is
  logged as ``grad_norm``.
- checkpoints (:mod:`jacfast.trainers.checkpointing`): ``<out_dir>/checkpoint.pt``, written to
  a temp file then ``os.replace``d. They hold model, optimizer, scheduler, GradScaler, step
  counters, the metrics history, the data source's position and every RNG, which makes a
  killed run resumed from its last checkpoint end with bit-identical weights on CPU (tensors
  and Datasets; a user's DataLoader: see :class:`~jacfast.trainers.sources.LoaderSource`).
  ``config`` is stored too; a checkpoint whose config differs is refused, except ``epochs``
  and ``steps_per_epoch``: a finished run resumed with more epochs trains on (the default
  cosine schedule is then stretched to the new total; a given scheduler is kept as is).
- SIGINT / SIGTERM: the current step finishes, a checkpoint is written and
  :class:`TrainingInterrupted` is raised (the CLI turns it into a clean exit).
- mixed precision: ``amp="bf16"`` autocasts; ``amp="fp16"`` adds a GradScaler. The backward
  seeds of input-gradient passes are scaled too, by the loss scale / local batch size
  (:class:`GradScaled` wraps the networks), so fp16 backward passes to the input do not
  underflow; the gradients are unscaled when they reach the fp32 input, so Jacobian norms
  and differences are taken in fp32, and a non-finite Jacobian term makes the scaler skip
  the step and lower the scale (both scales shrink together).
- DDP: under ``torchrun`` (WORLD_SIZE > 1) the student is wrapped in DistributedDataParallel
  (gloo on CPU, nccl on GPU). Each process takes a slice of the same global batch (tensors,
  Datasets; a user's DataLoader brings its own DistributedSampler), computes its
  input-gradient terms locally with ``autograd.grad`` and calls normal ``backward``s; the
  local loss is weighted by ``world * b_local / B`` so DDP's gradient average equals the
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
from contextlib import nullcontext
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from jacfast.trainers.batches import batch_len, hits, make_batch_fn, to_device, wide
from jacfast.trainers.checkpointing import METRICS_NAME, Checkpointing, CheckpointMismatchError
from jacfast.trainers.evaluation import Evaluation
from jacfast.trainers.distributed import dist_info, init_distributed
from jacfast.trainers.grad_scaling import GradScaled, unwrap
from jacfast.trainers.sources import LoaderSource, TensorSource, default_steps_per_epoch, make_source

AMP_MODES = ("none", "bf16", "fp16")
__all__ = ["AMP_MODES", "CheckpointMismatchError", "Trainer", "TrainingInterrupted"]


class TrainingInterrupted(Exception):
    """SIGINT/SIGTERM stopped ``fit``; a checkpoint was written first. Rerun to resume."""

    def __init__(self, signum: int, checkpoint: Optional[str]):
        self.signum, self.checkpoint = signum, checkpoint
        name = signal.Signals(signum).name
        super().__init__(f"training interrupted by {name}; checkpoint saved to {checkpoint} (rerun to resume)")


def _positive_int(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name} must be a positive int, got {v!r}")
    return v


def _name_of(fn) -> Optional[str]:
    """How a batch_fn / outputs choice is recorded in the checkpoint config."""
    if fn is None or isinstance(fn, (str, int)):
        return fn
    return getattr(fn, "__qualname__", type(fn).__name__)


# --------------------------------------------------------------------------------------------
# the trainer
# --------------------------------------------------------------------------------------------
class Trainer(Checkpointing, Evaluation):
    """Base trainer. Subclasses implement ``compute_loss(x, y) -> (loss, components, logits)``.

    Args:
        model: the network being trained (the student).
        train_data: ``(x, y)`` tensors (x (N, *input_dims) float, y (N,) int64 or (N, L) for
            sequence targets), a map-style ``torch.utils.data.Dataset`` or a ``DataLoader``
            (see :mod:`jacfast.trainers.sources` for what a resume guarantees with each).
        optimizer: "adam" (default: Adam(lr, weight_decay), robust for these BatchNorm-free
            networks), "sgd" (SGD(lr, momentum 0.9, Nesterov, weight_decay)) or an optimizer.
        lr: learning rate of the named optimizers (default 1e-3 for Adam, 0.05 for SGD).
        scheduler: a torch LR scheduler stepped once per optimizer step; default cosine to 0.
        batch_size: the GLOBAL micro-batch size (split across DDP processes); default 64.
            With a DataLoader leave it unset (the loader's own is used).
        accumulate: micro-batches per optimizer step (gradient accumulation), default 1.
        clip_grad_norm: max total L2 norm of the gradients (None: no clipping).
        epochs, steps_per_epoch: an epoch is ``steps_per_epoch`` optimizer steps (default one
            pass: ceil(N / (batch * accumulate)), or len(loader) // accumulate).
        batch_fn: batch -> (model inputs, targets); None: ``(x, y)`` pairs; a str: the key of
            the targets in a dict batch (the other entries are the model's keyword inputs).
        outputs, inputs: how the trainer's own calls of the model (evaluation, the supervised
            forward) pick the logits / the differentiated input, as in ``jacfast.model_io``.
        num_workers, collate_fn, loader_kwargs: the DataLoader that reads a Dataset.
        eval_data: ``(x, y)``, a Dataset or a DataLoader evaluated after every epoch (clean;
            tensors also at ``eval_sigmas``).
        out_dir: checkpoints and ``metrics.jsonl`` go here (None: no files).
        checkpoint_every: also checkpoint every this many steps (0: only at epoch ends).
        amp: "none" | "bf16" | "fp16".
        seed: seeds torch/numpy/python RNGs (plus the rank) and the data order.
        config: extra hyperparameters recorded in (and checked against) checkpoints.
        progress: show a tqdm bar (rank 0 only).
        step_callback: ``f(trainer)`` called after every step (tests, tooling); the step's
            gradients are still in ``p.grad`` then.
        extra_modules: modules trained along with the model (e.g. a TransferLoss's adapters):
            in the default optimizer and the checkpoints; gradients averaged by hand under DDP.
    """

    def __init__(self, model: nn.Module, train_data, *, optimizer="adam", scheduler=None,
                 lr: Optional[float] = None, weight_decay: float = 0.0, batch_size: Optional[int] = None,
                 epochs: int = 1, steps_per_epoch: Optional[int] = None, eval_data=None,
                 eval_sigmas: Sequence[float] = (), out_dir: Optional[str] = None, checkpoint_every: int = 0,
                 amp: str = "none", device: str | torch.device = "cpu", seed: int = 0,
                 config: Optional[dict] = None, progress: bool = True, step_callback=None,
                 extra_modules: Sequence[nn.Module] = (), accumulate: int = 1,
                 clip_grad_norm: Optional[float] = None, batch_fn: Union[None, str, Callable] = None,
                 outputs=None, inputs=None, num_workers: int = 0, collate_fn: Optional[Callable] = None,
                 loader_kwargs: Optional[dict] = None):
        if amp not in AMP_MODES:
            raise ValueError(f"amp must be one of {AMP_MODES}, got {amp!r}")
        if batch_size is not None:
            _positive_int("batch_size", batch_size)
        self.accumulate = _positive_int("accumulate", accumulate)
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
            raise ValueError(f"epochs must be an int >= 0, got {epochs!r}")
        if steps_per_epoch is not None:
            _positive_int("steps_per_epoch", steps_per_epoch)
        if clip_grad_norm is not None and (isinstance(clip_grad_norm, bool) or not float(clip_grad_norm) > 0):
            raise ValueError(f"clip_grad_norm must be > 0 (or None), got {clip_grad_norm!r}")
        self.clip_grad_norm = None if clip_grad_norm is None else float(clip_grad_norm)
        self.batch_fn = make_batch_fn(batch_fn)
        self.outputs, self.inputs = outputs, inputs
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None and "LOCAL_RANK" in os.environ:
            self.device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))  # one GPU per torchrun process
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.ddp = init_distributed(self.device)
        self.rank, self.world = dist_info()
        self.source = make_source(train_data, batch_size=batch_size, seed=int(seed), rank=self.rank,
                                  world=self.world, num_workers=num_workers, collate_fn=collate_fn,
                                  loader_kwargs=loader_kwargs)
        self.num_workers, self.collate_fn = num_workers, collate_fn
        self.model = model.to(self.device)
        self.batch_size = self.source.batch_size
        self.epochs = int(epochs)
        self.steps_per_epoch = int(steps_per_epoch or default_steps_per_epoch(self.source, self.accumulate))
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
        self._default_schedule = None
        if scheduler is None:
            total = self.epochs * self.steps_per_epoch
            self._default_schedule = lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / max(total, 1)))
            scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._default_schedule)
        self.scheduler = scheduler
        # Double backward through fp16 networks overflows at much smaller scales than plain
        # backward: start low and let the scaler grow (it backs off on overflow anyway).
        self.scaler = torch.amp.GradScaler(self.device.type, init_scale=2.0 ** 10, growth_interval=200,
                                           enabled=(amp == "fp16"))
        self._local_batch = 1
        self.stream = getattr(self.source, "stream", None)  # the index stream (tensors, Datasets)
        self.step, self.epoch, self.step_in_epoch, self.history = 0, 0, 0, []
        self.skipped_steps = 0
        self._epoch_sums: dict = {}  # this epoch's metric sums so far
        self.net = nn.parallel.DistributedDataParallel(self.model) if self.ddp else self.model

        self.config = {
            "trainer": type(self).__name__, "model": getattr(model, "spec", type(model).__name__),
            "params": [[k, list(v.shape)] for k, v in model.state_dict().items()],
            "data": self._describe_data(), "batch_size": self.batch_size, "epochs": self.epochs,
            "steps_per_epoch": self.steps_per_epoch, "amp": amp, "seed": self.seed, "world": self.world,
            "optimizer": type(self.optimizer).__name__, "lr": lr, "weight_decay": weight_decay,
            "extra": [[k, list(v.shape)] for m in extra_modules for k, v in m.state_dict().items()],
        }
        # Recorded only when set, so checkpoints written before these existed still resume.
        for key, value, default in (("accumulate", self.accumulate, 1), ("clip_grad_norm", self.clip_grad_norm, None),
                                    ("batch_fn", _name_of(batch_fn), None), ("outputs", _name_of(outputs), None),
                                    ("inputs", inputs, None)):
            if value != default:
                self.config[key] = value
        self.config.update(config or {})
        self._stop_signal: Optional[int] = None
        self._wrappers: dict = {}
        self.batch_indices: Optional[Tensor] = None  # this process's sample indices in the current micro-batch
        self._seed_everything()

    def _describe_data(self):
        src = self.source
        if isinstance(src, TensorSource):
            from jacfast.data import fingerprint  # local import: data.py needs nothing from here

            return fingerprint(src.x, src.y)
        if isinstance(src, LoaderSource):
            ld = src.loader
            n = len(ld.dataset) if hasattr(ld.dataset, "__len__") else None
            return {"loader": type(ld.dataset).__name__, "n": n, "drop_last": ld.drop_last,
                    "sampler": type(ld.batch_sampler.sampler if ld.batch_sampler is not None else ld.sampler).__name__}
        return {"dataset": type(src.dataset).__name__, "n": len(src)}

    # ---- to implement ------------------------------------------------------------------------
    def compute_loss(self, x: Tensor, y: Tensor) -> tuple[Tensor, dict, Optional[Tensor]]:
        """x: (b, *input_dims), y: (b,) -> (scalar loss, {name: float tensor}, logits (b, C) or None)."""
        raise NotImplementedError

    def model_io(self) -> dict:
        """``outputs=``/``inputs=`` for jacfast's functions, when set (the defaults need neither)."""
        return {k: v for k, v in (("outputs", self.outputs), ("inputs", self.inputs)) if v is not None}

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

    # ---- rng ---------------------------------------------------------------------------------
    def _seed_everything(self) -> None:
        s = self.seed * 1000 + self.rank
        torch.manual_seed(s)
        np.random.seed(s % 2**32)
        random.seed(s)

    # ---- the loop -------------------------------------------------------------------------------
    def local_slice(self, idx: Tensor) -> Tensor:
        """This process's share of a global batch of indices (contiguous, as even as possible)."""
        return idx.tensor_split(self.world)[self.rank] if self.ddp else idx

    def next_micro_batches(self) -> list:
        """The next ``accumulate`` micro-batches: ``(indices or None, inputs, targets, global size or None)``."""
        out = []
        for _ in range(self.accumulate):
            idx, batch, size = self.source.next()
            x, y = self.batch_fn(batch)
            out.append((idx, x, y, size))
        return out

    def _weights(self, micro: list) -> list:
        """Per micro-batch loss weights: world * b_local / (global samples in the step)."""
        local = [batch_len(x) for _, x, _, _ in micro]
        if all(size is not None for *_, size in micro):
            total = sum(size for *_, size in micro)
        else:  # a user's DataLoader: the global count is only known by summing over processes
            total = sum(local)
            if self.ddp:
                t = torch.tensor([total], dtype=torch.int64)
                dist.all_reduce(t)
                total = int(t.item())
        return [self.world * b / total for b in local]

    def train_step(self, micro: list) -> dict:
        """One optimizer step on ``micro`` (from :meth:`next_micro_batches`). Returns summed
        (not averaged) metrics."""
        self.model.train()
        for m in self.extra_modules:
            m.train()
        weights = self._weights(micro)
        self.optimizer.zero_grad(set_to_none=True)
        out, finite = {"n": 0}, True
        for i, ((idx, x, y, _), weight) in enumerate(zip(micro, weights)):
            self.batch_indices = idx
            b = self._local_batch = batch_len(x)
            x = to_device(x, self.device, non_blocking=True)
            y = to_device(y, self.device, non_blocking=True)
            last = i == len(micro) - 1
            # DDP averages gradients over processes in the last backward; the earlier ones only add up.
            with (self.net.no_sync() if self.ddp and not last else nullcontext()):
                with self.autocast():
                    loss, comps, logits = self.compute_loss(x, y)
                # weighted so the accumulated (and DDP-averaged) gradient is the global-batch mean
                self.scaler.scale(wide(loss) * weight).backward()
            finite = finite and bool(torch.isfinite(loss.detach()))
            for k, v in comps.items():
                out[k] = out.get(k, 0.0) + float(v.detach()) * b
            out["loss"] = out.get("loss", 0.0) + float(loss.detach()) * b
            h = hits(logits, y) if logits is not None else None
            if h is not None and h[1]:  # per sample; a sequence's positions share its weight
                out["train_acc"] = out.get("train_acc", 0.0) + h[0] * b / h[1]
            out["n"] += b
        params = [p for m in (self.model, *self.extra_modules) for p in m.parameters()]
        if self.ddp:  # DDP syncs the model; extra modules are averaged here, as DDP would
            for p in (p for m in self.extra_modules for p in m.parameters()):
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad)
                p.grad /= self.world
        if self.clip_grad_norm is not None:
            self.scaler.unscale_(self.optimizer)  # clip the true gradient, not the scaled one
            norm = torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], self.clip_grad_norm)
            out["grad_norm"] = float(norm) * out["n"]
        scale_before = self.loss_scale()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        skipped = self.scaler.is_enabled() and (self.loss_scale() < scale_before or not finite)
        self.skipped_steps += int(skipped)
        with warnings.catch_warnings():  # a step the scaler skipped still advances the schedule
            warnings.simplefilter("ignore", UserWarning)
            self.scheduler.step()
        if skipped:  # an overflowed step changes nothing; keep its non-finite values out of the averages
            return {"n": 0}
        return out

    def fit(self, resume: bool = True) -> list[dict]:
        """Train for ``epochs`` (resuming from ``out_dir`` when ``resume``). Returns the metrics history.

        Raises TrainingInterrupted after writing a checkpoint on SIGINT/SIGTERM.
        """
        if not (resume and self.try_resume()) and self.out_dir and self.rank == 0:
            os.makedirs(self.out_dir, exist_ok=True)
            self._write_metrics_file()  # start a fresh metrics file
        from tqdm.auto import tqdm

        try:
            with self._signals():
                if self.epoch < self.epochs and 0 < self.steps_per_epoch <= self.step_in_epoch:
                    # resumed with a shorter steps_per_epoch than the checkpoint's epoch had run
                    self._end_epoch(self._epoch_sums, time.time())
                    self.save_checkpoint()
                while self.epoch < self.epochs:
                    self._run_epoch(tqdm)
        finally:
            self.source.close()  # DataLoader workers shut down
        return self.history

    def _run_epoch(self, tqdm) -> None:
        sums = self._epoch_sums  # partial sums survive a resume mid-epoch (in the checkpoint)
        t0 = time.time()
        bar = tqdm(total=self.steps_per_epoch, initial=self.step_in_epoch, leave=False,
                   desc=f"{type(self).__name__} epoch {self.epoch + 1}/{self.epochs}",
                   disable=not (self.progress and self.rank == 0))
        try:
            while self.step_in_epoch < self.steps_per_epoch:
                m = self.train_step(self.next_micro_batches())
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
                if last:
                    self._end_epoch(sums, t0)
                if stop:
                    raise TrainingInterrupted(stop, self.save_checkpoint())
                if last:
                    self.save_checkpoint()
                    return  # _end_epoch reset step_in_epoch for the next epoch
                if self.checkpoint_every and self.step % self.checkpoint_every == 0:
                    self.save_checkpoint()
        finally:
            bar.close()

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
            for s, acc in self._evaluate_eval_data().items():
                rec["test_acc" if s == 0 else f"test_acc_sigma{s:g}"] = acc
        self.history.append(rec)
        self._epoch_sums = {}
        self.epoch += 1
        self.step_in_epoch = 0
        if self.out_dir and self.rank == 0:
            with open(os.path.join(self.out_dir, METRICS_NAME), "a") as f:
                f.write(json.dumps(rec) + "\n")
