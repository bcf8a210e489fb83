"""Public API of the Jacobian-matching loss head.

Shapes
------
``student_jac`` and ``teacher_jac`` hold Jacobian rows: (B, K, *input_dims), one row per
sample b and selected output k, or (B, D) with one row per sample (K = 1). Each row is
flattened to length D = prod(input_dims). A (B, *input_dims) tensor with two or more input
dims is ambiguous with (B, K, *input_dims): pass ``outputs_dim=False`` for it.

Per row (s: student row, t: teacher row):

- ``kind="normalized"`` (the paper's practical loss):
  ``|| s / max(||s||, eps) - t / max(||t||, eps) ||^2``
- ``kind="squared"`` (Proposition 1; distillation with Gaussian input noise): ``|| s - t ||^2``
- ``kind="norm"`` (Jacobian-norm penalty; no teacher): ``|| s ||^2``

Reductions: ``"none"`` returns (B, K) (or (B,) when K is implicit); ``"sum"`` adds all
B*K rows; ``"mean"`` sums over the K outputs and averages over the B samples, i.e.
``sum / B`` (the paper sums over outputs and averages over the batch).

``weight`` multiplies a reduced loss inside the kernel (one rounding, with the 1/B of
``"mean"``). Pass the loss's weight in the total here rather than multiplying the result:
the fused backends compute the gradient in the forward, and an incoming gradient other than 1
costs an extra pass over it (scaled in place) that ``weight`` avoids.

Empty inputs: B = 0 with ``"sum"`` gives 0 and with ``"none"`` an empty tensor; B = 0 with
``"mean"`` raises ValueError (there is no sample to average over); K = 0 gives 0 for both
``"sum"`` and ``"mean"``; rows of length D = 0 raise ValueError.

Non-finite inputs: a NaN in a row gives NaN for that row's loss; an Inf gives NaN for the
normalized loss and Inf for the squared and norm losses (never a finite number).

Inputs that are not contiguous (or expanded) are copied into contiguous rows once before
the kernel runs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from jacfast import reference, registry
from jacfast.dtypes import FLOAT_DTYPES
from jacfast.ops import jacobian_matching as ops

REDUCTIONS = ("none", "sum", "mean")


@dataclass(frozen=True)
class _Call:
    """A validated call: the row layout and the backend that serves it."""

    batch: int
    outputs: int
    row_len: int
    has_k: bool
    backend: str

    @property
    def rows(self) -> int:
        return self.batch * self.outputs


def _check_tensor(name: str, value) -> None:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must have a floating dtype (float32, float64, float16, bfloat16), got {value.dtype}")


def _validate(student_jac, teacher_jac, kind, reduction, eps, backend, outputs_dim) -> _Call:
    _check_tensor("student_jac", student_jac)
    if not isinstance(kind, str) or kind not in ops.KINDS:
        raise ValueError(f"kind must be one of {tuple(ops.KINDS)}, got {kind!r}")
    if not isinstance(reduction, str) or reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"eps must be a positive number, got {eps!r}")
    if kind == "norm":
        if teacher_jac is not None:
            raise ValueError("teacher_jac must be None for kind='norm' (the Jacobian-norm penalty has no teacher)")
    else:
        if teacher_jac is None:
            raise ValueError(f"teacher_jac is required for kind={kind!r}")
        _check_tensor("teacher_jac", teacher_jac)
        if teacher_jac.shape != student_jac.shape:
            raise ValueError(
                f"teacher_jac shape {tuple(teacher_jac.shape)} must equal student_jac shape {tuple(student_jac.shape)}"
            )
        if teacher_jac.dtype != student_jac.dtype:
            raise TypeError(f"teacher_jac dtype {teacher_jac.dtype} must equal student_jac dtype {student_jac.dtype}")
        if teacher_jac.device != student_jac.device:
            raise ValueError(f"teacher_jac is on {teacher_jac.device} but student_jac on {student_jac.device}")
    if outputs_dim is None:
        outputs_dim = student_jac.ndim >= 3
    if student_jac.ndim < (3 if outputs_dim else 2):
        raise ValueError(
            f"student_jac must have shape (B, K, *input_dims) or (B, D); got {tuple(student_jac.shape)}"
            f" with outputs_dim={outputs_dim}"
        )
    batch = student_jac.shape[0]
    outputs = student_jac.shape[1] if outputs_dim else 1
    row_len = 1
    for size in student_jac.shape[(2 if outputs_dim else 1):]:
        row_len *= size
    if row_len == 0:
        raise ValueError(f"student_jac rows are empty (shape {tuple(student_jac.shape)}): no input elements to match")
    if batch == 0 and reduction == "mean":
        raise ValueError("reduction='mean' over an empty batch (B = 0) is undefined; use 'sum' or 'none'")
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    resolved = registry.resolve_in_graph(backend, student_jac.device.type)
    return _Call(batch, outputs, row_len, outputs_dim, resolved)


def _check_weight(weight, reduction: str) -> float:
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
        raise ValueError(f"weight must be a finite number, got {weight!r}")
    if reduction == "none" and weight != 1:
        raise ValueError("weight scales a reduced loss (reduction 'sum' or 'mean'); with reduction='none' "
                         "multiply the per-row losses instead")
    return float(weight)


def _as_rows(jac: Optional[Tensor], call: _Call) -> Optional[Tensor]:
    return None if jac is None else jac.reshape(call.rows, call.row_len).contiguous()


def _reduction_args(reduction: str, call: _Call, weight: float) -> tuple[int, float]:
    if reduction == "none":
        return ops.REDUCTION_NONE, 1.0
    return ops.REDUCTION_SCALED_SUM, (weight / call.batch if reduction == "mean" else weight)


def _weighted(loss: Tensor, weight: float) -> Tensor:
    """The torch fallback's weighting (the kernels fold weight into their scale)."""
    return loss if weight == 1 else loss * weight


def _shape_loss(loss: Tensor, reduction: str, call: _Call) -> Tensor:
    if reduction != "none":
        return loss
    return loss.view(call.batch, call.outputs) if call.has_k else loss.view(call.batch)


def jacobian_matching_loss(
    student_jac: Tensor,
    teacher_jac: Optional[Tensor] = None,
    *,
    kind: str = "normalized",
    reduction: str = "mean",
    eps: float = 1e-12,
    backend: str = "auto",
    outputs_dim: Optional[bool] = None,
    weight: float = 1.0,
) -> Tensor:
    """Jacobian-matching loss between student and teacher Jacobian rows (see module docs).

    Args:
        student_jac: (B, K, *input_dims) or (B, D), floating. Differentiable; may carry a
            ``create_graph=True`` graph (the gradient flows on into the network's double backward).
        teacher_jac: same shape, dtype and device; None for ``kind="norm"``. May require grad too.
        kind: "normalized" | "squared" | "norm".
        reduction: "mean" (sum over K, mean over B) | "sum" | "none" ((B, K) or (B,)).
        eps: floor of the row norms in the normalized loss.
        backend: "auto" | "cuda" | "triton" | "cpu" | "torch" (see ``jacfast.backends()``).
        outputs_dim: whether dim 1 indexes outputs (default: True when ndim >= 3).
        weight: factor of a reduced loss ("sum", "mean"), applied in the kernel: pass the
            term's weight in a total loss here (see module docs); must be 1 for "none".

    Returns:
        The loss in the input dtype: a scalar, or (B, K) / (B,) for reduction "none".
    """
    call = _validate(student_jac, teacher_jac, kind, reduction, eps, backend, outputs_dim)
    weight = _check_weight(weight, reduction)
    if call.backend == "torch" or call.rows == 0:
        return _weighted(reference.jacobian_matching_loss(
            student_jac, teacher_jac, kind=kind, reduction=reduction, eps=eps, has_k=call.has_k
        ), weight)
    red, scale = _reduction_args(reduction, call, weight)
    args = (_as_rows(student_jac, call), _as_rows(teacher_jac, call), ops.KINDS[kind], red, float(eps), scale, call.backend)
    if torch.compiler.is_compiling():  # graphs see the registered op
        loss, _ = ops.jacobian_matching_fwd(*args)
    else:  # eager: the same kernels without custom-op dispatch (see JacobianMatchingFunction)
        loss = ops.JacobianMatchingFunction.apply(*args, torch.is_grad_enabled())
    return _shape_loss(loss, reduction, call)


def jacobian_norm_penalty(jac: Tensor, *, reduction: str = "mean", backend: str = "auto",
                          outputs_dim: Optional[bool] = None, weight: float = 1.0) -> Tensor:
    """Jacobian-norm penalty ``||J||^2`` per row: ``jacobian_matching_loss(jac, kind="norm")``."""
    return jacobian_matching_loss(jac, None, kind="norm", reduction=reduction, backend=backend, outputs_dim=outputs_dim,
                                  weight=weight)


def jacobian_matching_loss_and_grad(
    student_jac: Tensor,
    teacher_jac: Optional[Tensor] = None,
    *,
    kind: str = "normalized",
    reduction: str = "mean",
    eps: float = 1e-12,
    backend: str = "auto",
    outputs_dim: Optional[bool] = None,
    weight: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Loss and its gradient wrt ``student_jac``, without autograd.

    The gradient is that of the reduced loss (for ``reduction="none"``, of its sum), shaped
    like ``student_jac``; ``weight`` as in :func:`jacobian_matching_loss` (both outputs are of
    the weighted loss). The native backends compute both in one fused pass over the rows;
    neither output carries an autograd graph.
    """
    call = _validate(student_jac, teacher_jac, kind, reduction, eps, backend, outputs_dim)
    weight = _check_weight(weight, reduction)
    if call.backend == "torch" or call.rows == 0:
        with torch.enable_grad():
            leaf = student_jac.detach().requires_grad_(True)
            teacher = None if teacher_jac is None else teacher_jac.detach()
            loss = _weighted(reference.jacobian_matching_loss(leaf, teacher, kind=kind, reduction=reduction, eps=eps,
                                                              has_k=call.has_k), weight)
            (grad,) = torch.autograd.grad(loss.sum(), leaf)
        return loss.detach(), grad
    red, scale = _reduction_args(reduction, call, weight)
    teacher_rows = None if teacher_jac is None else _as_rows(teacher_jac.detach(), call)
    loss, grad = ops.jacobian_matching_fwd_bwd(
        _as_rows(student_jac.detach(), call), teacher_rows, ops.KINDS[kind], red, float(eps), scale, call.backend
    )
    return _shape_loss(loss, reduction, call), grad.view(student_jac.shape)


class JacobianMatchingLoss(nn.Module):
    """``nn.Module`` form of :func:`jacobian_matching_loss`, in the style of ``nn.MSELoss``.

    ``forward(student_jac, teacher_jac=None)``; shapes, reductions and ``weight`` as the function.
    """

    def __init__(self, kind: str = "normalized", reduction: str = "mean", eps: float = 1e-12, backend: str = "auto",
                 weight: float = 1.0):
        super().__init__()
        if kind not in ops.KINDS:
            raise ValueError(f"kind must be one of {tuple(ops.KINDS)}, got {kind!r}")
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        self.kind, self.reduction, self.eps, self.backend = kind, reduction, eps, backend
        self.weight = _check_weight(weight, reduction)

    def forward(self, student_jac: Tensor, teacher_jac: Optional[Tensor] = None, outputs_dim: Optional[bool] = None) -> Tensor:
        return jacobian_matching_loss(
            student_jac, teacher_jac, kind=self.kind, reduction=self.reduction, eps=self.eps,
            backend=self.backend, outputs_dim=outputs_dim, weight=self.weight,
        )

    def extra_repr(self) -> str:
        weight = "" if self.weight == 1 else f", weight={self.weight}"
        return f"kind={self.kind!r}, reduction={self.reduction!r}, eps={self.eps}, backend={self.backend!r}{weight}"
