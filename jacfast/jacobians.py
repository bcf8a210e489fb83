"""Selective input Jacobians: rows of d logits / d x for chosen outputs, in one call.

``input_jacobians(model, x, select)`` runs ``model`` on ``x`` (B, *input_dims) once, picks
K outputs per sample with ``select`` and returns

- ``logits``  (B, C): the model's output (detached unless ``create_graph=True``),
- ``jac``     (B, K, *input_dims): ``jac[b, k] = d <seed_k[b], logits[b]> / d x[b]``, i.e. the
  input gradient of output ``indices[b, k]`` of sample b (of a random projection of the
  outputs for :meth:`select.projections`),
- ``indices`` (B, K) int64: the selected outputs; -1 for projections, which select none.

Selections (``jacfast.select``): ``topk(k, logits=None)`` (the teacher's k largest outputs;
pass the teacher's logits so that the student uses the SAME outputs), ``target(y)``,
``all()``, ``indices(idx)``, ``projections(k)`` (Hutchinson), or any callable mapping the
detached logits (B, C) to an int64 index tensor (B, K). Ties break toward the lower index.

BatchNorm in training mode makes every sample's output depend on the whole batch through
the batch statistics. ``jac`` is then what autograd defines for the batch:
``jac[b, k] = d/dx[b] sum_b' <seed_k[b'], logits[b']>`` (the cross-sample terms that flow
through the statistics included), which is also what a finite difference of the batch
forward measures. Every strategy returns exactly that; for models whose samples do not
interact (eval mode, LayerNorm, GroupNorm...) it is the per-sample Jacobian.

Strategies (all give the same result, they differ in speed and memory):

- ``"loop"``: one forward, K backward passes (graph retained between them).
- ``"batched"``: one forward, one vmapped backward (``autograd.grad(is_grads_batched=True)``);
  raises where an op lacks a vmap batching rule.
- ``"replicate"``: the batch repeated K times, one forward and one backward. Each
  ``torch.nn`` BatchNorm in batch-statistics mode normalizes every replica with that
  replica's own statistics (equal to those of the unreplicated batch, gradients included)
  and updates its running statistics once, from one replica, as a plain forward would.
  Refuses models with dropout in training mode (replicas would draw different masks).
  It cannot see cross-sample ops other than ``torch.nn`` BatchNorm modules of an (eager)
  ``nn.Module`` ``model``; ``"auto"`` considers it only when ``model`` is an ``nn.Module``.
- ``"auto"``: on the first call for a (model, input shape, K, device, dtype, create_graph,
  training mode) key, times the strategies (3 round-robin rounds, each one's fastest run;
  with ``create_graph=True`` including a double backward to the parameters, where they
  differ most), skips those that raise, caches the fastest in :data:`strategy_cache` (like
  ``cudnn.benchmark``) and reruns it for the result. Buffers (BatchNorm running statistics)
  and RNG states are restored around the trials: the call has the effects of one run.
  K = 1 needs no timing: it uses ``"loop"``.

``create_graph=False`` (teacher rows): the gradient is taken with respect to a detached copy
of ``x`` only, so no parameter ``.grad`` is touched, no graph is retained and the outputs
carry no graph. ``create_graph=True`` (student rows, exact estimator): ``logits`` and
``jac`` are differentiable with respect to the parameters (and to ``x`` if it requires grad).
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import time
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from jacfast.ops.topk_seeds import FLOAT_DTYPES
from jacfast.selection import ByFunction, as_selection, select  # noqa: F401  (select: re-exported)

STRATEGIES = ("loop", "batched", "replicate")


# ----------------------------------------------------------------------------- strategies
def _forward(model, xin: Tensor, replicas: int = 1) -> Tensor:
    out = model(xin)
    if not isinstance(out, Tensor):
        raise TypeError(f"model must return a logits tensor of shape (B, C), got {type(out).__name__}")
    if out.dim() != 2 or out.shape[0] != xin.shape[0]:
        note = f" for x repeated {replicas} times (strategy='replicate')" if replicas > 1 else ""
        raise ValueError(
            f"model must return logits of shape (B, C) with B = {xin.shape[0]}, got {tuple(out.shape)}{note}"
        )
    if out.dtype not in FLOAT_DTYPES:
        raise TypeError(f"model must return floating logits, got {out.dtype}")
    if not out.requires_grad:
        raise ValueError("model output does not depend on x (no autograd graph); is it run under torch.no_grad()?")
    return out


def _vjp(out, xin, seeds, create_graph, retain, batched=False) -> Tensor:
    (g,) = torch.autograd.grad(
        out, xin, seeds, retain_graph=retain, create_graph=create_graph, allow_unused=True, is_grads_batched=batched
    )
    if g is None:  # the output does not depend on x at all: the Jacobian is zero
        g = xin.new_zeros(((seeds.shape[0],) if batched else ()) + tuple(xin.shape))
    return g


def _loop(model, x, sel, create_graph, rows):
    out = _forward(model, x)
    indices, seeds = sel.resolve(out.detach())
    k = seeds.shape[0]
    jac = [_vjp(out, x, seeds[j], create_graph, retain=create_graph or j < k - 1) for j in range(k)]
    return out, torch.stack(jac, 1), indices


def _batched(model, x, sel, create_graph, rows):
    out = _forward(model, x)
    indices, seeds = sel.resolve(out.detach())
    jac = _vjp(out, x, seeds, create_graph, retain=create_graph, batched=True)  # (K, B, ...)
    return out, jac.transpose(0, 1).contiguous(), indices


def _bn_forward_per_replica(m: nn.modules.batchnorm._BatchNorm, replicas: int, inp: Tensor) -> Tensor:
    """BatchNorm forward on a batch of ``replicas`` stacked copies, each copy normalized with
    its own batch statistics; running statistics updated once, as for one copy."""
    if not (m.training or (m.running_mean is None and m.running_var is None)):
        return type(m).forward(m, inp)  # running statistics: per sample already
    m._check_input_dim(inp)
    n, c, rest = inp.shape[0], inp.shape[1], tuple(inp.shape[2:])
    b = n // replicas
    if m.training and m.track_running_stats:
        # Same momentum bookkeeping as _BatchNorm.forward; the update reads one replica, so
        # the unbiased variance (n / (n - 1)) is that of the unreplicated batch.
        factor = 0.0 if m.momentum is None else m.momentum
        if m.num_batches_tracked is not None:
            m.num_batches_tracked.add_(1)
            factor = 1.0 / float(m.num_batches_tracked) if m.momentum is None else m.momentum
        if m.running_mean is not None:
            with torch.no_grad():
                F.batch_norm(inp[:b], m.running_mean, m.running_var, None, None, True, factor, m.eps)
    # Fold the replicas into channels, (R*B, C, ...) -> (B, R*C, ...): every (replica, channel)
    # is normalized over its own B samples, so values and gradients match the plain batch.
    folded = inp.reshape(replicas, b, c, *rest).transpose(0, 1).reshape(b, replicas * c, *rest)
    weight = m.weight.repeat(replicas) if m.weight is not None else None
    bias = m.bias.repeat(replicas) if m.bias is not None else None
    y = F.batch_norm(folded, None, None, weight, bias, True, 0.0, m.eps)
    return y.reshape(b, replicas, c, *rest).transpose(0, 1).reshape(n, c, *rest)


def _replicate_blocker(model) -> Optional[str]:
    """Why ``model`` cannot be replicated exactly, or None."""
    if not isinstance(model, nn.Module):
        return None
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.training and m.p > 0:
            return f"dropout {name!r} is in training mode: the replicas would draw different masks"
        if isinstance(m, nn.SyncBatchNorm) and m.training:
            return f"SyncBatchNorm {name!r} in training mode is not supported"
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and "forward" in m.__dict__:
            return f"BatchNorm {name!r} has an instance-level forward override"
    return None


@contextlib.contextmanager
def _per_replica_batchnorm(model, replicas: int):
    patched = []
    if isinstance(model, nn.Module) and replicas > 1:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.forward = functools.partial(_bn_forward_per_replica, m, replicas)
                patched.append(m)
    try:
        yield
    finally:
        for m in patched:
            del m.forward


def _replicate(model, x, sel, create_graph, rows):
    if rows is None:
        raise ValueError(
            "select: strategy='replicate' needs K before the forward pass; use select.all(num_outputs=C) "
            "or explicit indices, or another strategy"
        )
    why = _replicate_blocker(model)
    if why:
        raise ValueError(f"strategy='replicate' cannot be used: {why}; use 'loop' or 'batched'")
    b = x.shape[0]
    xr = x.unsqueeze(0).expand(rows, *x.shape).reshape(rows * b, *x.shape[1:])
    with _per_replica_batchnorm(model, rows):
        out = _forward(model, xr, rows)
    logits = out[:b]
    indices, seeds = sel.resolve(logits.detach())
    if seeds.shape[0] != rows:
        raise ValueError(f"select gave K = {seeds.shape[0]} rows, expected {rows}")
    g = _vjp(out, xr, seeds.reshape(rows * b, -1), create_graph, retain=create_graph)
    return logits, g.reshape(rows, *x.shape).transpose(0, 1).contiguous(), indices


_STRATEGIES = {"loop": _loop, "batched": _batched, "replicate": _replicate}


# ----------------------------------------------------------------------------- auto
@dataclass
class StrategyChoice:
    """What ``strategy="auto"`` picked for one key, with the measured seconds per strategy
    (None for one that raised; ``errors`` says why)."""

    strategy: str
    rows: Optional[int]
    timings: dict = field(default_factory=dict)
    errors: dict = field(default_factory=dict)


class StrategyCache:
    """Choices of ``strategy="auto"``, per model (held weakly) and call key."""

    def __init__(self):
        self._tables = weakref.WeakKeyDictionary()
        self._strong = {}  # callables that cannot be weakly referenced, by id
        self.trials = 0  # strategy runs spent on timing so far

    @staticmethod
    def _owner(model):
        # A bound method is a new object at every attribute access: key on its instance.
        if inspect.ismethod(model):
            return model.__self__, model.__func__
        return model, None

    def _table(self, model, create: bool):
        owner, _ = self._owner(model)
        try:
            table = self._tables.get(owner)
            if table is None and create:
                table = self._tables[owner] = {}
        except TypeError:
            table = self._strong.get(id(owner))
            if table is None and create:
                table = self._strong[id(owner)] = {}
        return table

    @staticmethod
    def key(model, x: Tensor, rows, create_graph: bool):
        training = model.training if isinstance(model, nn.Module) else None
        fn = StrategyCache._owner(model)[1]
        return (fn, tuple(x.shape), rows, str(x.device), x.dtype, bool(create_graph), training)

    def get(self, model, key) -> Optional[StrategyChoice]:
        table = self._table(model, create=False)
        return None if table is None else table.get(key)

    def put(self, model, key, choice: StrategyChoice) -> None:
        self._table(model, create=True)[key] = choice

    def choices(self, model) -> dict:
        """{key: StrategyChoice} for ``model``; key = (method, x shape, K, device, dtype,
        create_graph, training)."""
        return dict(self._table(model, create=False) or {})

    def clear(self) -> None:
        self._tables = weakref.WeakKeyDictionary()
        self._strong.clear()


strategy_cache = StrategyCache()


class _State:
    """Buffers of ``model`` and the RNG states a call may consume, to undo timing trials."""

    def __init__(self, model, sel, device):
        self.buffers = [(b, b.detach().clone()) for b in model.buffers()] if isinstance(model, nn.Module) else []
        self.cpu_rng = torch.get_rng_state()
        self.cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        self.device = device
        self.gen = getattr(sel, "generator", None)
        self.gen_state = self.gen.get_state() if self.gen is not None else None

    def restore(self):
        with torch.no_grad():
            for buf, saved in self.buffers:
                buf.copy_(saved)
        torch.set_rng_state(self.cpu_rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state(self.cuda_rng, self.device)
        if self.gen is not None:
            self.gen.set_state(self.gen_state)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


AUTO_ROUNDS = 3  # timing rounds per new key; the first one also pays one-off costs


def _time_once(name, model, x, sel, create_graph, rows, state) -> tuple[float, int]:
    """Seconds of one run of strategy ``name`` (from the restored state), and K."""
    state.restore()
    _sync(x.device)
    start = time.perf_counter()
    logits, jac, _ = _STRATEGIES[name](model, x, sel, create_graph, rows)
    if create_graph:  # the double backward the caller will run is part of the cost
        params = [p for p in model.parameters() if p.requires_grad] if isinstance(model, nn.Module) else []
        loss = jac.square().sum() + logits.sum()
        if params and loss.requires_grad:
            torch.autograd.grad(loss, params, allow_unused=True)
    _sync(x.device)
    strategy_cache.trials += 1
    return time.perf_counter() - start, jac.shape[1]


def _choose(model, x, sel, create_graph, rows) -> StrategyChoice:
    """Time the candidate strategies round-robin (so that a load change on the machine hits
    them alike), keep each one's fastest run, and pick the fastest strategy."""
    candidates = ["loop", "batched"]  # loop first: it tells K for select.all()
    # Only modules are replicated unasked: inside a plain callable, BatchNorm cannot be seen.
    if isinstance(model, nn.Module) and _replicate_blocker(model) is None and not isinstance(sel, ByFunction):
        candidates.append("replicate")
    choice = StrategyChoice("", rows, {n: float("inf") for n in candidates})
    state = _State(model, sel, x.device)
    first_error, dropped = None, set()
    try:
        for _ in range(AUTO_ROUNDS):
            for name in candidates:
                if choice.timings[name] is None or name in dropped:
                    continue
                try:
                    with warnings.catch_warnings():  # e.g. vmap's slow-fallback notices
                        warnings.simplefilter("ignore")
                        seconds, choice.rows = _time_once(name, model, x, sel, create_graph, choice.rows, state)
                    choice.timings[name] = min(choice.timings[name], seconds)
                except Exception as exc:  # noqa: BLE001  (a strategy that raises is skipped)
                    first_error = first_error or exc
                    choice.timings[name] = None
                    choice.errors[name] = f"{type(exc).__name__}: {exc}"
            ok = [t for t in choice.timings.values() if t is not None]
            # Not worth more runs: already over twice the best (first-run costs included).
            dropped.update(n for n, t in choice.timings.items() if ok and t is not None and t > 2 * min(ok))
    finally:
        state.restore()  # the trials leave no trace (running statistics, RNG)
    ok = {n: t for n, t in choice.timings.items() if t is not None}
    if not ok:
        raise first_error
    choice.strategy = min(ok, key=ok.get)
    return choice


def _auto(model, x, sel, create_graph):
    rows = sel.rows()
    key = StrategyCache.key(model, x, rows, create_graph)
    choice = strategy_cache.get(model, key)
    if choice is None:
        # K = 1: every strategy is one backward; the plain loop has no overhead.
        choice = StrategyChoice("loop", 1) if rows == 1 else _choose(model, x, sel, create_graph, rows)
        strategy_cache.put(model, key, choice)
    return _STRATEGIES[choice.strategy](model, x, sel, create_graph, rows or choice.rows)


# ----------------------------------------------------------------------------- public
def input_jacobians(model, x: Tensor, select, *, create_graph: bool = False, strategy: str = "auto"):
    """Logits and selected input-Jacobian rows of ``model`` at ``x``.

    Args:
        model: callable mapping x (B, *input_dims) to logits (B, C), e.g. an ``nn.Module``.
        x: (B, *input_dims) floating tensor (a batch dimension is required).
        select: a ``jacfast.select.*`` selection: ``topk(k, logits=None)``, ``target(y)``,
            ``all()``, ``indices(idx)``, ``projections(k)``; or an index tensor (B, K) / (K,);
            or a callable ``logits (B, C) -> indices (B, K)``.
        create_graph: True to differentiate the result (student rows); False computes teacher
            rows with no graph retained and no parameter ``.grad`` touched.
        strategy: "auto", "loop", "batched" or "replicate" (see the module docstring).

    Returns:
        logits: (B, C), the model's output (detached unless ``create_graph``).
        jac: (B, K, *input_dims) in x's dtype, ``jac[b, k]`` the input gradient of output
            ``indices[b, k]`` of sample b (of projection k for ``select.projections``).
        indices: (B, K) int64, the selected outputs (-1 for projections).
    """
    if not callable(model):
        raise TypeError(f"model must be callable (an nn.Module or a function), got {type(model).__name__}")
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 2:
        raise ValueError(
            f"x must have a batch dimension, shape (B, *input_dims), got shape {tuple(x.shape)}; "
            "use x.unsqueeze(0) for a single sample"
        )
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"x must have a floating dtype (float32, float64, float16, bfloat16), got {x.dtype}")
    sel = as_selection(select)
    if not isinstance(create_graph, bool):
        raise TypeError(f"create_graph must be a bool, got {type(create_graph).__name__}")
    if not isinstance(strategy, str) or strategy not in ("auto",) + STRATEGIES:
        raise ValueError(f"strategy must be one of {('auto',) + STRATEGIES}, got {strategy!r}")
    with torch.enable_grad():
        if create_graph and x.requires_grad:
            xg = x  # keep the caller's graph upstream of x
        else:
            xg = (x.clone() if x.is_inference() else x.detach()).requires_grad_(True)
        if strategy == "auto":
            logits, jac, indices = _auto(model, xg, sel, create_graph)
        else:
            logits, jac, indices = _STRATEGIES[strategy](model, xg, sel, create_graph, sel.rows())
    if not create_graph:
        logits, jac = logits.detach(), jac.detach()
    return logits, jac, indices
