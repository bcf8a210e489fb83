"""Triton top-k + one-hot seeds (contract: jacfast/ops/topk_seeds.py).

One launch, one program per row: k argmax rounds over the row in tiles. Order: value
descending, ties toward the lower index, NaN above +inf (NaNs tie by index), -0.0 == +0.0.
"""
import torch
import triton
import triton.language as tl

from .device_guard import on_tensors_device

_I64_MAX = tl.constexpr(0x7FFFFFFFFFFFFFFF)
_I64_LOW = tl.constexpr(-0x7FFFFFFFFFFFFFFF)  # below every key (-inf maps higher)
_MAX_BLOCK_C = 4096


@triton.jit
def _order_key(x):
    # Monotone int64 key of a float64 value: NaN above +inf (all NaNs equal), -0.0 == +0.0.
    x = tl.where(x == 0.0, 0.0, x)
    bits = x.to(tl.int64, bitcast=True)
    key = bits ^ ((bits >> 63) & _I64_MAX)  # flip magnitude bits of negatives
    return tl.where(x != x, _I64_MAX, key)


@triton.jit
def _topk_seeds_kernel(x_ptr, idx_ptr, seeds_ptr, B, C, K, BLOCK_C: tl.constexpr):
    # Round j picks the first element, in the order (key desc, index asc), that comes after
    # the round j-1 pick: no set of chosen indices has to be kept.
    b = tl.program_id(0).to(tl.int64)
    planes = b * 0 + B  # B as int64: j * B * C passes 2^31 for seeds of 8 GiB and more
    row = x_ptr + b * C
    lanes = tl.arange(0, BLOCK_C).to(tl.int64)
    pk = tl.full([], _I64_MAX, tl.int64)
    pi = tl.full([], -1, tl.int64)
    for j in range(0, K):
        bk = tl.full([], _I64_LOW, tl.int64)
        bi = tl.full([], 0, tl.int64)
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + lanes
            m = cols < C
            key = _order_key(tl.load(row + cols, mask=m, other=0.0).to(tl.float64))
            cand = m & ((key < pk) | ((key == pk) & (cols > pi)))
            tk = tl.max(tl.where(cand, key, _I64_LOW), axis=0)
            ti = tl.min(tl.where(cand & (key == tk), cols, _I64_MAX), axis=0)
            bi = tl.where(tk > bk, ti, bi)  # strict: earlier tiles hold lower indices
            bk = tl.maximum(bk, tk)
        tl.store(idx_ptr + b * K + j, bi)
        pk = bk
        pi = bi
        out = seeds_ptr + (j * planes + b) * C
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + lanes
            one_hot = tl.where(cols == bi, 1.0, 0.0).to(seeds_ptr.dtype.element_ty)
            tl.store(out + cols, one_hot, mask=cols < C)


@on_tensors_device
def topk_seeds(logits, k: int):
    """indices (B, k) int64 (descending, ties -> lower index, NaN largest) and one-hot
    seeds (k, B, C) in logits dtype. One launch, one program per row."""
    B, C = logits.shape
    k = int(k)
    if not 0 <= k <= C:
        raise ValueError(f"topk_seeds: k={k} out of range for {C} classes")
    idx = torch.empty((B, k), dtype=torch.int64, device=logits.device)
    seeds = torch.empty((k, B, C), dtype=logits.dtype, device=logits.device)
    if k == 0 or B == 0:
        return idx, seeds
    block_c = min(1 << max(0, C - 1).bit_length(), _MAX_BLOCK_C)
    _topk_seeds_kernel[(B,)](logits, idx, seeds, B, C, k, BLOCK_C=block_c,
                             num_warps=8 if block_c >= 2048 else 4)
    return idx, seeds
