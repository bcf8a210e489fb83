"""Shared pieces of the losses: input and output checks, the rows a teacher selected, first-order rows."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from jacfast.jacobian_strategies import Rows
from jacfast.sequence import RowPlan, plan_from_indices


def _check_input(x) -> None:
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating torch.Tensor, got {type(x).__name__}"
                        + (f" of dtype {x.dtype}" if isinstance(x, Tensor) else ""))
    if x.ndim < 2 or x.shape[0] == 0:
        raise ValueError(f"x must have a non-empty batch dimension, shape (B, *input_dims); got {tuple(x.shape)}")


def _check_logits(out, batch: int, who: str) -> Tensor:
    if not isinstance(out, Tensor) or out.ndim not in (2, 3) or out.shape[0] != batch:
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"the {who}'s output must be logits of shape (B={batch}, C) or (B={batch}, L, C); got {shape}")
    return out


def _check_target(target, batch: int, classes: Optional[int] = None, length: Optional[int] = None,
                  ignore_index: Optional[int] = None) -> Tensor:
    """(B,) class indices, or (B, L) per position (values ``ignore_index`` allowed) for sequence outputs."""
    ok = isinstance(target, Tensor) and target.dtype in (torch.int64, torch.int32) and target.ndim in (1, 2) \
        and target.shape[0] == batch and (length is None or tuple(target.shape) == (batch, length))
    if not ok:
        want = f"(B={batch},)" if length is None else f"(B={batch}, L={length})"
        raise ValueError(f"target must be an integer tensor of shape {want}" + (" or (B, L)" if length is None else "")
                         + f"; got {tuple(target.shape) if isinstance(target, Tensor) else type(target).__name__}"
                         + (f" of dtype {target.dtype}" if isinstance(target, Tensor) else ""))
    if classes is not None and target.numel():
        t = target if ignore_index is None else target[target != ignore_index]
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= classes):
            raise ValueError(f"target holds class indices outside [0, {classes})"
                             + ("" if ignore_index is None else f" (other than ignore_index = {ignore_index})"))
    return target.long()


def _first_order_rows(values: Tensor, x_in: Tensor) -> Tensor:
    """Rows grad_x values[:, k].sum() for each k, (B, K, *x.shape[1:]), no graph; keeps the forward graph."""
    rows = []
    for k in range(values.shape[1]):
        (g,) = torch.autograd.grad(values[:, k].sum(), x_in, retain_graph=True, allow_unused=True)
        rows.append(torch.zeros_like(x_in) if g is None else g)  # an output that ignores x: zero row
    return torch.stack(rows, 1)


def _attach(value: Tensor, surrogate: Tensor) -> Tensor:
    """``value`` in the forward, ``surrogate``'s gradient in the backward, in the wider of their
    dtypes (under autocast the surrogate comes out in bf16/fp16, the value in float32)."""
    wide = torch.promote_types(value.dtype, surrogate.dtype)
    return value.detach().to(wide) + (surrogate - surrogate.detach()).to(wide)


def _jm():
    from jacfast import loss  # the core loss API, imported lazily

    return loss


class Selected:
    """The rows a teacher (or a cache) selected, replayed on the student.

    ``spec``: a :class:`jacfast.jacobian_strategies.Rows` for ``input_jacobians`` (exact rows);
    ``pick(out)``: the selected scalars (N, K) of outputs (N, C) / (N, L, C), row n of sample
    n % B (finite differences, noise).
    """

    def __init__(self, indices: Tensor, resolved=None, projections: bool = False):
        from jacfast.selection import Indices, Projections

        self.indices = indices
        self.plan = resolved if isinstance(resolved, RowPlan) else None
        self.proj = None
        if self.plan is not None:
            self.spec = Rows(None, plan=self.plan)
        elif projections:  # resolved: the seeds (K, B, C), the projection directions
            self.proj = resolved.transpose(0, 1)
            self.spec = Rows(Projections(resolved.shape[0], vectors=resolved), flat=True)
        else:
            self.spec = Rows(Indices(indices), flat=True)

    @classmethod
    def from_cache(cls, indices: Tensor, logits: Tensor) -> "Selected":
        if logits.ndim == 3:
            return cls(indices, plan_from_indices(indices, logits.shape[1], logits.shape[2]))
        return cls(indices)

    def pick(self, out: Tensor) -> Tensor:
        if self.plan is not None:
            self.plan.check(out)
            return self.plan.pick(out)
        if out.ndim != 2:
            raise ValueError(f"the rows were selected for logits (B, C), but the model returned {tuple(out.shape)}")
        reps = out.shape[0] // self.indices.shape[0]
        if self.proj is None:
            return out.gather(1, self.indices.repeat(reps, 1))
        return torch.einsum("nc,nkc->nk", out, self.proj.to(out.dtype).repeat(reps, 1, 1))
