"""The Jacobian-norm penalty on one model: an estimate of mean_b ||d model(x_b) / d x_b||_F^2."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from jacfast.jacobian_strategies import Rows, _no_donated_buffers
from jacfast.jacobians import jacobians_of
from jacfast.losses.common import Selected, _attach, _check_input, _check_logits, _first_order_rows, _jm
from jacfast.losses.finite_difference import check_scheme, fd_directional, rng_state
from jacfast.model_io import ModelCall
from jacfast.selection import select
from jacfast.sequence import freeze


def jacobian_penalty(model, x, *, num_projections: Optional[int] = 1, estimator: str = "exact",
                     fd_step: Optional[float] = None, fd_scheme: str = "central", strategy: str = "auto",
                     backend: str = "auto", return_logits: bool = False, outputs=None, inputs=None, positions=None):
    """Jacobian-norm regularizer: an estimate of mean_b ||d model(x_b) / d x_b||_F^2.

    Args:
        model: x (B, *input_dims) -> (B, C) or (B, L, C) (see ``outputs``, ``inputs``).
        x: (B, *input_dims), or a tuple / dict of inputs with ``inputs=`` naming the differentiated one.
        num_projections: K random Rademacher output projections v (entries +-1, E[v v^T] = I)
            per sample (Hutchinson: E ||v^T J||^2 = ||J||_F^2; the estimate averages the K rows);
            None for all C outputs (exact, C backward passes).
        estimator: "exact" (double backward) | "finite_difference" (first-order only, as in
            :class:`DistillationLoss`; exact value, finite-difference parameter gradient).
        fd_step, fd_scheme: the finite-difference step and scheme, as in :class:`DistillationLoss`.
        return_logits: also return the model's logits from the same forward (with graph).
        outputs, inputs: how the model is called (:class:`jacfast.ModelCall`).
        positions: sequence outputs (B, L, C): which positions (as in :func:`jacfast.input_jacobians`);
            the penalty then sums ||J_p||_F^2 over the selected positions p (K projections each).

    Returns:
        A differentiable scalar (and the logits when ``return_logits``).

    Cost: K (or C) rows per sample and position: K' backward passes (loop) or one batched.
    """
    if isinstance(x, Tensor):
        _check_input(x)
    if estimator not in ("exact", "finite_difference"):
        raise ValueError(f"estimator must be 'exact' or 'finite_difference', got {estimator!r}")
    check_scheme(fd_scheme)
    if num_projections is not None and (isinstance(num_projections, bool) or not isinstance(num_projections, int)
                                        or num_projections < 1):
        raise ValueError(f"num_projections must be a positive int or None (all outputs), got {num_projections!r}")
    bound = ModelCall(model, outputs=outputs, inputs=inputs).bind(x)
    xd = bound.xd
    B, scale = xd.shape[0], 1.0 / (num_projections or 1)  # the K projected rows are averaged
    sel = select.all() if num_projections is None else select.projections(num_projections)
    positions = freeze(positions)
    if estimator == "exact":
        logits, rows, _, _ = jacobians_of(bound, xd, Rows(sel, positions), create_graph=True, strategy=strategy)
        if rows.dtype in (torch.float16, torch.bfloat16):
            rows = rows.float()
        with torch.autocast(rows.device.type, enabled=False):
            pen = _jm().jacobian_norm_penalty(rows, backend=backend, weight=scale)  # in the kernel's scale
        return (pen, logits) if return_logits else pen
    # finite_difference: own forward (its graph serves the logits), first-order rows only
    x_in = xd if xd.requires_grad else xd.detach().requires_grad_(True)
    state = rng_state(xd.device)
    with _no_donated_buffers(bound.module):  # K retained backward passes follow
        logits = _check_logits(bound.fn(x_in), B, "model")
    # Directions drawn after `state`, so the replayed passes do not repeat them.
    _, idx, _, resolved = Rows(sel, positions).head(logits, B)
    chosen = Selected(idx, resolved, projections=num_projections is not None)
    rows = _first_order_rows(chosen.pick(logits), x_in)
    if rows.dtype in (torch.float16, torch.bfloat16):
        rows = rows.float()
    with torch.autocast(rows.device.type, enabled=False):
        value, g = _jm().jacobian_matching_loss_and_grad(rows, kind="norm", backend=backend)
    base = chosen.pick(logits) if fd_scheme == "forward" else None
    surrogate = fd_directional(bound.module, lambda xp: chosen.pick(bound.fn(xp)), xd, (g * scale).to(xd.dtype),
                               rel_step=fd_step, state=state, base=base, separate=bound.passthrough)
    pen = _attach(value * scale, surrogate)
    return (pen, logits) if return_logits else pen
