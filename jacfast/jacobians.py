"""Selective input Jacobians: rows of d logits / d x for chosen outputs, in one call.

Models as users write them: ``input_jacobians(model, x, select, outputs=..., inputs=...)``
with x a Tensor, tuple or dict and the logits a Tensor, dict entry, attribute or tuple item
(:mod:`jacfast.model_io`); sequence logits (B, L, C) with ``positions=`` take K' = P * Kp rows
per sample (:mod:`jacfast.sequence`). The strategies below differentiate the model as a
function of the differentiated input alone. ``create_graph=True`` runs the forward with the
SDPA math kernel (the fused CPU/GPU attention kernels have no double backward) and refuses a
``torch.compile``'d model (aot_autograd has no double backward) with a message; on meeting a
compiled model jacfast turns ``torch._functorch.config.donated_buffer`` off for the process
(the K retained backward passes need the saved tensors that it would free).

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

import inspect
import time
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor, nn

from jacfast.jacobian_strategies import _STRATEGIES, STRATEGIES, Rows, _compiled, _no_donated_buffers, _replicate_blocker
from jacfast.model_io import FLOAT_DTYPES, ModelCall, as_call  # noqa: F401  (ModelCall: re-exported)
from jacfast.selection import ByFunction, as_selection, select  # noqa: F401  (select: re-exported)


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
    def key(model, x: Tensor, rows, create_graph: bool, spec=None, call=None):
        """Everything that changes the choice: the bound method, x's shape, K (None when only
        the forward pass tells it), device, dtype, create_graph, training mode, the kind of
        selection and positions, and how the model is called (outputs=, inputs=, the other
        inputs' shapes, an input adapter)."""
        training = model.training if isinstance(model, nn.Module) else None
        fn = StrategyCache._owner(model)[1]
        return (fn, tuple(x.shape), rows, str(x.device), x.dtype, bool(create_graph), training,
                None if spec is None else spec.key(), None if call is None else call.key())

    def get(self, model, key) -> Optional[StrategyChoice]:
        table = self._table(model, create=False)
        return None if table is None else table.get(key)

    def put(self, model, key, choice: StrategyChoice) -> None:
        self._table(model, create=True)[key] = choice

    def choices(self, model) -> dict:
        """{key: StrategyChoice} for ``model``; key = (method, x shape, K, device, dtype,
        create_graph, training, (selection kind, positions kind), call)."""
        return dict(self._table(model, create=False) or {})

    def clear(self) -> None:
        self._tables = weakref.WeakKeyDictionary()
        self._strong.clear()


strategy_cache = StrategyCache()


class _State:
    """Buffers of ``model`` and the RNG states a call may consume, to undo timing trials."""

    def __init__(self, model, sel, device):
        sel = getattr(sel, "sel", sel)
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


def _time_once(name, call, x, spec, create_graph, rows, state) -> tuple[float, int]:
    """Seconds of one run of strategy ``name`` (from the restored state), and K."""
    state.restore()
    _sync(x.device)
    start = time.perf_counter()
    logits, jac, _, _ = _STRATEGIES[name](call, x, spec, create_graph, rows)
    if create_graph:  # the double backward the caller will run is part of the cost
        model = call.module
        params = [p for p in model.parameters() if p.requires_grad] if isinstance(model, nn.Module) else []
        loss = jac.square().sum() + logits.sum()
        if params and loss.requires_grad:
            torch.autograd.grad(loss, params, allow_unused=True)
    _sync(x.device)
    strategy_cache.trials += 1
    return time.perf_counter() - start, jac.shape[1]


def _choose(call, x, spec, create_graph, rows) -> StrategyChoice:
    """Time the candidate strategies round-robin (so that a load change on the machine hits
    them alike), keep each one's fastest run, and pick the fastest strategy."""
    model = call.module
    candidates = ["loop", "batched"]  # loop first: it tells K for select.all()
    # Only modules are replicated unasked: inside a plain callable, BatchNorm cannot be seen.
    if (isinstance(model, nn.Module) and _replicate_blocker(model) is None and not isinstance(spec.sel, ByFunction)
            and not call.passthrough):
        candidates.append("replicate")
    choice = StrategyChoice("", rows, {n: float("inf") for n in candidates})
    state = _State(model, spec.sel, x.device)
    first_error, dropped = None, set()
    try:
        for _ in range(AUTO_ROUNDS):
            for name in candidates:
                if choice.timings[name] is None or name in dropped:
                    continue
                try:
                    with warnings.catch_warnings():  # e.g. vmap's slow-fallback notices
                        warnings.simplefilter("ignore")
                        seconds, choice.rows = _time_once(name, call, x, spec, create_graph, choice.rows, state)
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


def _auto(call, x, spec, create_graph):
    rows = spec.rows()
    model = call.module
    key = StrategyCache.key(model, x, rows, create_graph, spec, call)
    choice = strategy_cache.get(model, key)
    if choice is None:
        # K = 1: every strategy is one backward; the plain loop has no overhead.
        choice = StrategyChoice("loop", 1) if rows == 1 else _choose(call, x, spec, create_graph, rows)
        strategy_cache.put(model, key, choice)
    # The K measured while timing (select.all()) is used only for the selection kind it was keyed on.
    return _STRATEGIES[choice.strategy](call, x, spec, create_graph, rows or choice.rows)


# ----------------------------------------------------------------------------- public
def _check_compiled(model, create_graph: bool) -> None:
    if create_graph and _compiled(model):
        raise ValueError(
            "a torch.compile'd model has no double backward (aot_autograd does not support it), which "
            "create_graph=True / estimator='exact' needs: pass the uncompiled model (model._orig_mod for an "
            "nn.Module) or use estimator='finite_difference' (first-order backprop only, which compiled models "
            "support)"
        )


def jacobians_of(call, x: Tensor, spec: Rows, *, create_graph: bool = False, strategy: str = "auto"):
    """:func:`input_jacobians` on a bound call and a :class:`Rows` spec; also returns what
    replays the same rows (see :mod:`jacfast.jacobian_strategies`). For the losses."""
    _check_compiled(call.module, create_graph)
    with torch.enable_grad():
        if create_graph and x.requires_grad:
            xg = x  # keep the caller's graph upstream of x
        else:
            xg = (x.clone() if x.is_inference() else x.detach()).requires_grad_(True)
        with _no_donated_buffers(call.module):
            if strategy == "auto":
                logits, jac, indices, resolved = _auto(call, xg, spec, create_graph)
            else:
                logits, jac, indices, resolved = _STRATEGIES[strategy](call, xg, spec, create_graph, spec.rows())
    if not create_graph:
        logits, jac = logits.detach(), jac.detach()
    return logits, jac, indices, resolved




def input_jacobians(model, x, select, *, outputs=None, inputs=None, positions=None, create_graph: bool = False,
                    strategy: str = "auto"):
    """Logits and selected input-Jacobian rows of ``model`` at ``x``.

    Args:
        model: a callable (e.g. an ``nn.Module``) returning logits (B, C) or sequence logits
            (B, L, C), or something that holds them (see ``outputs``).
        x: the model's input: a Tensor (B, *input_dims) (``model(x)``), a tuple/list
            (``model(*x)``) or a dict (``model(**x)``); see ``inputs``.
        select: a ``jacfast.select.*`` selection: ``topk(k, logits=None)``, ``target(y)``,
            ``all()``, ``indices(idx)``, ``projections(k)``; or an index tensor (B, K) / (K,);
            or a callable ``logits (B, C) -> indices (B, K)``. For sequence outputs each
            applies per selected position (``target(y)`` with y (B, L) and ``ignore_index``).
        outputs: where the logits are in the model's return value: None (a Tensor), a str key
            or attribute (``"logits"``), an int index, or a callable (:class:`jacfast.ModelCall`).
        inputs: which entry of a tuple (int) / dict (str) ``x`` is differentiated (e.g.
            ``"inputs_embeds"``); the other entries are passed through, never differentiated.
        positions: sequence outputs only: None (all L positions), a bool mask (B, L), an integer
            tensor of positions (B, P) / (P,), or ``select.sample(m, seed=0)``.
        create_graph: True to differentiate the result (student rows); False computes teacher
            rows with no graph retained and no parameter ``.grad`` touched.
        strategy: "auto", "loop", "batched" or "replicate" (see the module docstring).

    Returns:
        logits: (B, C) or (B, L, C), the model's output (detached unless ``create_graph``).
        jac: (B, K, *input_dims) in x's dtype (the differentiated entry's), ``jac[b, k]`` the
            input gradient of output ``indices[b, k]`` of sample b (of projection k for
            ``select.projections``). Sequence outputs: K' = P * Kp rows, position-major (row
            p * Kp + j is output j at the p-th selected position); ignored positions give
            all-zero rows.
        indices: (B, K) int64, the selected outputs (-1 for projections); for sequence outputs
            position * C + class, -1 for zero rows and projection rows.

    Cost: one forward, then K backward passes ("loop") or one vmapped backward ("batched"),
    K = K' for sequence outputs (P positions x Kp outputs each: bound it with ``positions``).
    """
    call = as_call(model, outputs, inputs)
    if isinstance(x, Tensor):
        if x.dim() < 2:
            raise ValueError(
                f"x must have a batch dimension, shape (B, *input_dims), got shape {tuple(x.shape)}; "
                "use x.unsqueeze(0) for a single sample"
            )
        if x.dtype not in FLOAT_DTYPES:
            raise TypeError(f"x must have a floating dtype (float32, float64, float16, bfloat16), got {x.dtype}")
    bound = call.bind(x)
    sel = as_selection(select)
    if not isinstance(create_graph, bool):
        raise TypeError(f"create_graph must be a bool, got {type(create_graph).__name__}")
    if not isinstance(strategy, str) or strategy not in ("auto",) + STRATEGIES:
        raise ValueError(f"strategy must be one of {('auto',) + STRATEGIES}, got {strategy!r}")
    logits, jac, indices, _ = jacobians_of(bound, bound.xd, Rows(sel, positions), create_graph=create_graph,
                                           strategy=strategy)
    return logits, jac, indices
