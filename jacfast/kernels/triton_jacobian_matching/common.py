"""What the Triton loss-head kernels share: the split plan, the launch options and the jit helpers
whose one definition makes every kernel add and round alike (contract: csrc/README.md).

Determinism: every reduction is a sequential loop or a pairwise halving tree whose shape is
fixed by block sizes chosen from (R, D, splits), never by num_warps, the autotuned tile height
or scheduling, so autotuning cannot change the bits of the result. The split count depends on
the SM count, so results are bit-reproducible per GPU model, not across models. Atomics only
hand out the barrier's tickets and count arrivals; no sum goes through one.

Outputs are rounded once from float64, fp16/bf16 included (see rounded), as in the C++ and
CUDA kernels; torch's ``tensor.to(dtype)`` from float64 may differ by 1 ulp (double rounding).
"""
import os
import struct

import torch
import triton
import triton.language as tl

# triton.jit decides interpreted vs compiled at decoration time from the same variable.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")

_MAX_BLOCK = 2048  # longest per-row accumulator (fp64 lanes); also fixes the reduction tree
BWD_MAX_BD = 1024  # backward tile width
# Every loss-head launch compiles without multiply-add contraction: with it the compiler fuses
# `acc + s * s` or `c0 * s - c1 * t` into an FMA where it sees one, and whether it does
# depends on the block shape (the tuned config), so float64 row sums would differ in their
# last bit between forward and forward_backward and between configs. The interpreter never
# fuses (so its tests check these bits); the CUDA backend writes its FMAs out (__fma_rn).
EXACT = dict(enable_fp_fusion=False)
# One config each where nothing is tuned: under the interpreter, and with
# JACFAST_TRITON_AUTOTUNE=0 (the test suite: hundreds of shapes, each tuned over 4-5 compiled
# configs, would spend minutes tuning; the benchmarks tune, and check the results). Partials
# take 8 warps: at 4 their tile spills registers.
FIXED = {"partials": ({"TILE": 4096}, 8), "backward": ({"TILE": 4096}, 4), "fused": ({"RB": 1}, 8)}
AUTOTUNE = not INTERPRET and os.environ.get("JACFAST_TRITON_AUTOTUNE", "1").strip() != "0"
_CPU_SMS = 4  # pretend SM count under the interpreter: small, but makes long rows split
# Unsplit rows of up to 2 blocks (4096 elements), which _fused_kernel holds in registers; more
# would need a sequential sum over the chunks, which a register tile does not give cheaply.
_FUSED_MAX_BLOCKS = 2
_MAX_SPLITS = 65535  # CUDA's limit on a grid's second dimension


def f64_bits(x: float) -> int:
    # Triton passes Python floats as fp32; ship eps/scale as their exact float64 bit pattern.
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def rnd_code(dtype) -> int:
    # output rounding mode for rounded: 0 plain cast (fp32/fp64), 1 fp16, 2 bf16
    return {torch.float16: 1, torch.bfloat16: 2}.get(dtype, 0)


_SM_CACHE = {}


def num_sms(device) -> int:
    if device.type != "cuda":
        return _CPU_SMS
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_CACHE:
        _SM_CACHE[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_CACHE[idx]


def plan(R: int, D: int, device):
    """Block width, split count and split length (a multiple of BLOCK) for stage 1.

    Aim for ~4 programs per SM: split rows when R alone cannot provide that. Rows longer than
    _FUSED_MAX_BLOCKS blocks, or split, are cut into splits of one block, which
    forward_backward holds in registers (_barrier_kernel) while keeping forward's bits
    (D=150528 -> 74 splits of 2048; R=8192, D=784 -> 1 split).
    """
    block = min(next_pow2(D), _MAX_BLOCK)
    target = 4 * num_sms(device)
    splits = 1
    if R < target:
        splits = max(1, min(triton.cdiv(target, R), triton.cdiv(D, block), 1024))
    if splits > 1 or D > _FUSED_MAX_BLOCKS * block:
        # splits are stage 1's second grid dimension, at most 65535 on CUDA: rows longer than
        # that many blocks (~2^27 elements) take longer splits (and forward then backward)
        chunk = triton.cdiv(triton.cdiv(D, block), _MAX_SPLITS) * block
        return block, triton.cdiv(D, chunk), chunk
    return block, 1, triton.cdiv(D, block) * block


@triton.jit
def tree_sum(x, RB: tl.constexpr, N: tl.constexpr, LOG2N: tl.constexpr):
    # Sum each row of x [RB, N] by pairwise halving (x[:, i] + x[:, i + N/2], ...). Every step
    # adds exactly two values, so the result does not depend on the thread/warp layout.
    for i in tl.static_range(LOG2N):
        x = tl.sum(tl.reshape(x, [RB, 2, N >> (i + 1)]), axis=1)
    return tl.reshape(x, [RB])


@triton.jit
def rounded(x, out_ptr, RND: tl.constexpr):
    # float64 -> output dtype with ONE rounding, like the C++/CUDA kernels (torch's .to()
    # rounds double -> float -> half twice). fp16/bf16: double -> float rounded to odd, then
    # float -> half/bf16 to nearest even, which equals direct rounding (24 >= 11 + 2 bits).
    if RND == 0:
        y = x.to(out_ptr.dtype.element_ty)
    else:
        f = x.to(tl.float32)
        b = f.to(tl.uint32, bitcast=True)
        back = f.to(tl.float64)
        step = tl.where(tl.abs(back) > tl.abs(x), b - 1, b + 1)  # to the odd neighbour
        b = tl.where((back != x) & ((b & 1) == 0), step, b)
        f = b.to(tl.float32, bitcast=True)
        if RND == 1:
            y = f.to(tl.float16)
        else:
            # RNE by hand: the GPU's cvt.rn does the same, but TRITON_INTERPRET truncates
            # fp32 -> bf16; this keeps both bit-identical.
            b = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
            b = tl.where(f != f, 0x7FC0, b).to(tl.uint16)
            y = b.to(tl.bfloat16, bitcast=True)
    return y


@triton.jit
def unit_upstream(scale_bits, REDUCTION: tl.constexpr):
    # The gradient factor when grad_loss = 1 (forward_backward): 1 per row for reduction 0,
    # else the mean's or sum's scale, shipped as its float64 bits.
    if REDUCTION == 0:
        g = 1.0
    else:
        g = scale_bits.to(tl.int64).to(tl.float64, bitcast=True)
    return g



@triton.jit
def row_terms(a, b, c, eps, KIND: tl.constexpr):
    # Per-row loss and backward coefficients from the float64 sums (csrc/README.md): one
    # definition for the finishing and the fused kernel, so both round alike.
    if KIND == 0:
        ns = tl.sqrt(a)
        nt = tl.sqrt(b)
        # max(n, eps) that keeps NaN (a plain maximum may return eps for NaN)
        as_ = tl.where(ns > eps, ns, tl.where(ns != ns, ns, eps))
        at_ = tl.where(nt > eps, nt, tl.where(nt != nt, nt, eps))
        cos = c / (as_ * at_)
        loss = a / (as_ * as_) + b / (at_ * at_) - 2.0 * cos
        c0 = 2.0 * tl.where(ns > eps, cos, 1.0) / (as_ * as_)
        c1 = 2.0 / (as_ * at_)
        c2 = 2.0 * tl.where(nt > eps, cos, 1.0) / (at_ * at_)
    elif KIND == 1:
        loss = a
        c0 = tl.zeros_like(a) + 2.0
        c1 = c0
        c2 = c0
    else:
        loss = a
        c0 = tl.zeros_like(a) + 2.0
        c1 = tl.zeros_like(a)
        c2 = c1
    return loss, c0, c1, c2


@triton.jit
def _workspace_load(ptr, mask, L2_ONLY: tl.constexpr):
    if L2_ONLY:  # bypass L1: partials that programs on other SMs wrote
        x = tl.load(ptr, mask=mask, other=0.0, cache_modifier=".cg")
    else:
        x = tl.load(ptr, mask=mask, other=0.0)
    return x


@triton.jit
def row_sums(ws_ptr, rows, rmask, S, RS, KIND: tl.constexpr, RB: tl.constexpr, SB: tl.constexpr,
              LOG2_SB: tl.constexpr, L2_ONLY: tl.constexpr):
    # The sums of rows [RB] over their S splits in the workspace [quantity, row, split], from
    # 0.0, SB splits at a time (a tree within a group, groups in order: no long chain of
    # dependent loads when a row has hundreds of splits). One definition for the finishing
    # and the barrier kernel, so both add alike.
    a = tl.zeros([RB], dtype=tl.float64)
    b = tl.zeros([RB], dtype=tl.float64)
    c = tl.zeros([RB], dtype=tl.float64)
    for sp0 in range(0, S, SB):
        sp = sp0 + tl.arange(0, SB)
        m = rmask[:, None] & (sp < S)[None, :]
        q = rows[:, None] * S + sp[None, :]
        a += tree_sum(_workspace_load(ws_ptr + q, m, L2_ONLY), RB, SB, LOG2_SB)
        if KIND == 0:
            b += tree_sum(_workspace_load(ws_ptr + RS + q, m, L2_ONLY), RB, SB, LOG2_SB)
            c += tree_sum(_workspace_load(ws_ptr + RS + (RS + q), m, L2_ONLY), RB, SB, LOG2_SB)
    return a, b, c


@triton.jit
def student_grad(g, c0, c1, s, t):
    # grad_s = g (c0 s - c1 t): one expression for every kernel that writes it, so that they
    # round (and contract) alike
    return g * (c0 * s - c1 * t)
