"""Plain-PyTorch oracles: the Jacobian-matching loss head and the top-k seeds.

The loss is the ``"torch"`` backend of the loss head and the reference every loss kernel
is tested against. It shares no code with the kernels: it is ordinary differentiable
PyTorch (any dtype, any device, twice differentiable), written for clarity, not speed.

Shapes: ``student_jac`` and ``teacher_jac`` are (B, K, *input_dims) or (B, *input_dims);
rows are flattened to (B, K, D). Per row, with s the student row and t the teacher row:

- normalized: ``|| s / max(||s||, eps) - t / max(||t||, eps) ||^2``
- squared:    ``|| s - t ||^2``
- norm:       ``|| s ||^2``

Reductions: ``"none"`` keeps (B, K) (or (B,) when K was implicit), ``"sum"`` adds every
row, ``"mean"`` sums over the K outputs and averages over the B samples.

:func:`topk_seeds` is the oracle of the top-k seeds op (contract in
``jacfast/ops/topk_seeds.py``): a full stable sort, simple rather than fast.
"""
from __future__ import annotations

import torch


def _rows(jac: torch.Tensor, has_k: bool) -> torch.Tensor:
    """(B, K, D) view of a (B, K, *dims) or (B, *dims) tensor."""
    batch, outputs = jac.shape[0], (jac.shape[1] if has_k else 1)
    row_len = 1
    for size in jac.shape[(2 if has_k else 1):]:
        row_len *= size
    return jac.reshape(batch, outputs, row_len)


def _normalize(rows: torch.Tensor, eps: float) -> torch.Tensor:
    norm = torch.linalg.vector_norm(rows, dim=-1, keepdim=True)
    # clamp_min maps NaN to NaN in PyTorch, so NaN rows stay NaN.
    return rows / norm.clamp_min(eps)


def row_losses(student_jac, teacher_jac=None, *, kind="normalized", eps=1e-12, has_k=True):
    """Per-row losses, shape (B, K) (K = 1 when ``has_k`` is False)."""
    s = _rows(student_jac, has_k)
    if kind == "norm":
        return (s * s).sum(-1)
    t = _rows(teacher_jac, has_k)
    if kind == "squared":
        diff = s - t
    elif kind == "normalized":
        diff = _normalize(s, eps) - _normalize(t, eps)
    else:
        raise ValueError(f"kind must be 'normalized', 'squared' or 'norm', got {kind!r}")
    return (diff * diff).sum(-1)


def jacobian_matching_loss(student_jac, teacher_jac=None, *, kind="normalized", reduction="mean", eps=1e-12, has_k=True):
    """Reference loss; see the module docstring for the contract."""
    rows = row_losses(student_jac, teacher_jac, kind=kind, eps=eps, has_k=has_k)
    if reduction == "none":
        return rows if has_k else rows[:, 0]
    if reduction == "sum":
        return rows.sum()
    if reduction == "mean":
        return rows.sum() / rows.shape[0]
    raise ValueError(f"reduction must be 'none', 'sum' or 'mean', got {reduction!r}")


def topk_seeds(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """indices (B, k) and one-hot seeds (k, B, C) of the k largest outputs per row.

    ``torch.topk`` promises no order among ties, so this sorts each whole row with a stable
    descending sort, which keeps ties in index order and puts NaN first (torch sorts NaN as
    the largest; -0.0 and +0.0 compare equal).
    """
    batch, classes = logits.shape
    indices = torch.sort(logits, dim=1, descending=True, stable=True).indices[:, :k].contiguous()
    seeds = logits.new_zeros((k, batch, classes))
    seeds.scatter_(2, indices.t().unsqueeze(-1), 1)  # seeds[j, b, indices[b, j]] = 1
    return indices, seeds
