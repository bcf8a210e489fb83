"""Jacobian rows with the input layout chosen alongside the strategy (the training step's fast path).

:func:`fast_input_jacobians` is :func:`jacfast.input_jacobians` with ``strategy="auto"``
extended to a second choice: the memory format the model sees its input in. For a 4-D input
(B, C, H, W) on a CPU or GPU, convolutions in ``torch.channels_last`` (NHWC) often run much
faster than in the default NCHW layout: oneDNN on a CPU reorders an NCHW activation at every
convolution and its grad-input kernels for strided convolutions are slow; cuDNN's tensor-core
kernels want NHWC. Measured on the training-step benchmark's teacher (3 conv + BN + ReLU
blocks, widths 64/128/256, 3x32x32, B = 64, eval mode; 1 thread, CPU time, on a loaded
2-core EPYC): one forward and 5 grad-input passes 1162 -> 880 ms; the stride-2 convolutions'
grad-input 74 -> 47 ms and 50 -> 44 ms. The student's double backward (BatchNorm's
double-backward composite) ran 0.68x as fast in NHWC on the same CPU, so the layout is
timed per model.

Only the input is converted (``x.contiguous(memory_format=torch.channels_last)``); the
model's parameters are untouched, and PyTorch propagates the format through convolutions,
BatchNorm and pointwise ops. Rows come back contiguous (NCHW), with the same values up to the
summation order of the convolutions (float32: ~1e-7 relative). A model that cannot run on a
channels-last input (``x.view(B, -1)`` on a non-contiguous activation raises) simply loses
that candidate: a candidate that raises is skipped.

Choice: on the first call for a key (model, input shape, K, device, dtype, create_graph,
training mode), every (strategy, layout) pair runs 3 round-robin rounds (each one's fastest
run; with ``create_graph=True`` including the double backward to the parameters), buffers and
RNG state restored around the trials as in :mod:`jacfast.jacobians`; the fastest pair is kept
in :data:`layout_cache`. Candidates: loop and batched in both layouts (4-D inputs on a CPU or
GPU; else contiguous only), replicate contiguous (its reshape of the repeated batch makes it
contiguous anyway); K = 1: the loop in both layouts.
"""
from __future__ import annotations

import time
import warnings
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from jacfast import jacobians as _jac

LAYOUTS = ("contiguous", "channels_last")
AUTO_ROUNDS = 3


def to_layout(x: Tensor, layout: str) -> Tensor:
    """``x`` in ``layout`` ("contiguous": as given; "channels_last": NHWC strides of a 4-D x)."""
    if layout == "contiguous":
        return x
    if layout == "channels_last":
        if x.dim() != 4:
            raise ValueError(f"layout 'channels_last' needs a 4-D input (B, C, H, W), got shape {tuple(x.shape)}")
        return x.contiguous(memory_format=torch.channels_last)
    raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def candidates(model, x: Tensor, rows: Optional[int]) -> list[tuple[str, str]]:
    """(strategy, layout) pairs worth timing for this call."""
    layouts = list(LAYOUTS) if isinstance(x, Tensor) and x.dim() == 4 and x.device.type in ("cpu", "cuda") \
        else ["contiguous"]
    pairs = [("loop", lay) for lay in layouts]
    if rows != 1:
        pairs += [("batched", lay) for lay in layouts]
    # replicate reshapes the repeated batch, which makes it contiguous again: one layout only
    if rows not in (None, 1) and isinstance(model, nn.Module) and _jac._replicate_blocker(model) is None:
        pairs.append(("replicate", "contiguous"))
    return pairs


class LayoutChoice(_jac.StrategyChoice):
    """What the layout-aware ``auto`` picked: ``strategy`` and ``layout``, with the seconds
    per ``"strategy/layout"`` candidate in ``timings`` (None for one that raised)."""

    def __init__(self, strategy: str, layout: str, rows, timings=None, errors=None):
        super().__init__(strategy, rows, dict(timings or {}), dict(errors or {}))
        self.layout = layout


layout_cache = _jac.StrategyCache()


def _double_backward(model, logits: Tensor, jac: Tensor) -> None:
    params = [p for p in model.parameters() if p.requires_grad] if isinstance(model, nn.Module) else []
    loss = jac.square().sum() + logits.sum()
    if params and loss.requires_grad:
        torch.autograd.grad(loss, params, allow_unused=True)


def _run(rows_fn: Callable, x: Tensor, strategy: str, layout: str):
    logits, jac, *rest = rows_fn(to_layout(x, layout), strategy)
    return (logits, jac.contiguous(), *rest)


def _choose(model, rows_fn, x, sel, create_graph, rows) -> LayoutChoice:
    pairs = candidates(model, x, rows)
    timings = {f"{s}/{lay}": float("inf") for s, lay in pairs}
    errors, dropped, first_error = {}, set(), None
    state = _jac._State(model, sel, x.device)
    try:
        for _ in range(AUTO_ROUNDS):
            for s, lay in pairs:
                name = f"{s}/{lay}"
                if timings[name] is None or name in dropped:
                    continue
                try:
                    state.restore()
                    _jac._sync(x.device)
                    start = time.perf_counter()
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        logits, jac, *_ = _run(rows_fn, x, s, lay)
                        if create_graph:  # the double backward the caller will run is part of the cost
                            _double_backward(model, logits, jac)
                    _jac._sync(x.device)
                    timings[name] = min(timings[name], time.perf_counter() - start)
                    rows = rows or jac.shape[1]
                except Exception as exc:  # noqa: BLE001  (a candidate that raises is skipped)
                    first_error = first_error or exc
                    timings[name], errors[name] = None, f"{type(exc).__name__}: {exc}"
            ok = [t for t in timings.values() if t is not None]
            dropped.update(n for n, t in timings.items() if ok and t is not None and t > 2 * min(ok))
    finally:
        state.restore()
    ok = {n: t for n, t in timings.items() if t is not None}
    if not ok:
        raise first_error
    best = min(ok, key=ok.get)
    strategy, layout = best.split("/")
    return LayoutChoice(strategy, layout, rows, timings, errors)


def fast_input_jacobians(model, x: Tensor, select, *, create_graph: bool = False,
                         rows_fn: Optional[Callable] = None):
    """:func:`jacfast.input_jacobians` (``strategy="auto"``) with the input layout chosen too.

    Args and returns as :func:`jacfast.input_jacobians`: logits (B, C), jac (B, K,
    *input_dims) contiguous, indices (B, K). ``rows_fn(x_in, strategy)``, if given, replaces
    ``input_jacobians(model, x_in, select, create_graph=create_graph, strategy=strategy)``
    (a caller with its own model interface).

    Cost: the chosen strategy's (one forward; K backward passes, or one batched), plus the
    layout conversion of x (one copy of B x D) and of the rows (one copy of B x K x D).
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    sel = _jac.as_selection(select)
    if rows_fn is None:
        def rows_fn(x_in, strategy):
            return _jac.input_jacobians(model, x_in, sel, create_graph=create_graph, strategy=strategy)
    rows = sel.rows()
    key = _jac.StrategyCache.key(model, x, rows, create_graph)
    choice = layout_cache.get(model, key)
    if choice is None:
        choice = _choose(model, rows_fn, x, sel, create_graph, rows)
        layout_cache.put(model, key, choice)
    return _run(rows_fn, x, choice.strategy, choice.layout)
