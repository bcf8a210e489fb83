"""Fused top-k selection + one-hot backward seeds: ``torch.ops.jacfast.topk_seeds``.

Given logits (B, C) and k, one pass per row returns

- ``indices`` (B, k) int64: the k largest outputs of each row, largest first, and
- ``seeds``   (k, B, C) in the logits' dtype: ``seeds[j, b] = one_hot(indices[b, j], C)``,
  the cotangents whose vector-Jacobian products are the selected Jacobian rows (row j of
  every sample in one backward pass; the leading k axis is what ``is_grads_batched`` and
  the loop / replicate strategies of :func:`jacfast.jacobians.input_jacobians` consume).

Order, identical on every backend: larger values first; ties toward the lower index (so
the result is deterministic, unlike ``torch.topk``); NaN counts as larger than every
number, +inf included, and NaNs tie among themselves (lower index first); -0.0 == +0.0.

Kernel contract (``torch.ops.jacfast_cpu.topk_seeds``, ``torch.ops.jacfast_cuda.topk_seeds``,
``jacfast.kernels.triton_topk_seeds.topk_seeds``): ``topk_seeds(logits, k) -> (indices,
seeds)`` on a 2-D **contiguous** tensor with B >= 1, 1 <= k <= C, dtype in {float32,
float64, float16, bfloat16}; outputs as above, freshly allocated, on the logits' device.
The Python layer below validates, detaches, makes contiguous and handles B = 0.

The op is not differentiable: indices are integers and the seeds are constants.
"""
from __future__ import annotations

import operator

import torch
from torch import Tensor

from jacfast import registry
from jacfast.dtypes import FLOAT_DTYPES


def topk_seeds_torch(logits: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Plain-torch implementation (the "torch" backend, for devices without kernels).

    ``torch.topk`` finds the k-th largest value of each row (NaN counts as the largest, as in
    the contract), but promises no order among ties. The selection is made unique by a key:
    values ranking before the k-th all get the top key (there are fewer than k of them), ties
    with it get one decreasing with the index, the rest -1; a second ``topk`` of the keys then
    takes the k-th value's lowest-index ties. A stable sort of the k chosen values, in index
    order, gives the contract's order. Rows of up to 64 outputs sort outright (as fast there).
    """
    batch, classes = logits.shape
    if classes <= 64:
        indices = torch.sort(logits, dim=1, descending=True, stable=True).indices[:, :k].contiguous()
    else:
        kth = torch.topk(logits, k, dim=1).values[:, k - 1:]
        isnan, kth_nan = logits.isnan(), kth.isnan()
        ahead = ((logits > kth) | isnan) & ~kth_nan  # nothing ranks before a NaN k-th value
        tie = (logits == kth) | (isnan & kth_nan)  # -0.0 == +0.0; NaNs tie among themselves
        lower_first = torch.arange(classes - 1, -1, -1, device=logits.device)
        key = torch.where(ahead, classes, torch.where(tie, lower_first, -1))
        chosen = torch.topk(key, k, dim=1).indices.sort(dim=1).values  # index order
        order = torch.sort(logits.gather(1, chosen), dim=1, descending=True, stable=True).indices
        indices = chosen.gather(1, order)
    seeds = logits.new_zeros((k, batch, classes))
    seeds.scatter_(2, indices.t().unsqueeze(-1), 1)  # seeds[j, b, indices[b, j]] = 1
    return indices, seeds


def _run_backend(logits: Tensor, k: int, backend: str) -> tuple[Tensor, Tensor]:
    if backend == "torch":
        return topk_seeds_torch(logits, k)
    # cuda -> torch.ops.jacfast_cuda, cpu -> torch.ops.jacfast_cpu,
    # triton -> jacfast.kernels.triton_topk_seeds (all expose topk_seeds(logits, k)).
    return registry.kernels(backend, "topk_seeds").topk_seeds(logits, k)


@torch.library.custom_op("jacfast::topk_seeds", mutates_args=())
def topk_seeds_op(logits: Tensor, k: int, backend: str) -> tuple[Tensor, Tensor]:
    """indices (B, k) int64 and one-hot seeds (k, B, C); ``backend`` is already resolved."""
    return _run_backend(logits, k, backend)


@topk_seeds_op.register_fake
def _(logits, k, backend):
    batch, classes = logits.shape
    return logits.new_empty((batch, k), dtype=torch.int64), logits.new_empty((k, batch, classes))


def _check_k(k, classes: int, name: str = "k") -> int:
    if isinstance(k, bool):
        raise TypeError(f"{name} must be an int, got bool")
    try:
        k = operator.index(k)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(k).__name__}") from None
    if not 1 <= k <= classes:
        raise ValueError(f"{name} must satisfy 1 <= {name} <= C = {classes} (the number of outputs), got {k}")
    return k


def topk_seeds(logits: Tensor, k: int, *, backend: str = "auto") -> tuple[Tensor, Tensor]:
    """Top-k output indices and their one-hot backward seeds, in one fused pass.

    Args:
        logits: (B, C) floating tensor (float32, float64, float16 or bfloat16). It is
            detached: nothing flows back through the selection.
        k: number of outputs per sample, 1 <= k <= C.
        backend: "auto", "cuda", "triton", "cpu" or "torch" (see ``jacfast.backends()``).

    Returns:
        indices: (B, k) int64, per row the k largest outputs, largest first; ties go to
            the lower index and NaN counts as the largest value.
        seeds: (k, B, C) in the logits' dtype, ``seeds[j, b] = one_hot(indices[b, j], C)``.
    """
    if not isinstance(logits, Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dim() != 2:
        raise ValueError(f"logits must be 2-D (B, C), got shape {tuple(logits.shape)}")
    if logits.dtype not in FLOAT_DTYPES:
        raise TypeError(f"logits must have a floating dtype (float32, float64, float16, bfloat16), got {logits.dtype}")
    k = _check_k(k, logits.shape[1])
    name = registry.resolve_in_graph(backend, logits.device.type)
    logits = logits.detach().contiguous()
    if logits.shape[0] == 0:
        name = "torch"  # empty batch: nothing to launch, spare the kernels the corner case
    if torch.compiler.is_compiling():  # graphs see the registered op
        return topk_seeds_op(logits, k, name)
    return _run_backend(logits, k, name)  # eager: the same kernel without custom-op dispatch
