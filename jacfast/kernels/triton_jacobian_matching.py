"""Triton kernels for the Jacobian-matching loss head (contract: csrc/README.md).

forward          : 2 launches. Stage 1, grid (row blocks, SPLITS), writes float64 partial dot
                   products per (row, split) to a workspace; a tiny finishing kernel combines the
                   splits in a fixed order, computes loss and coef, and for reduction 1 sums
                   the rows in one program (fixed lane layout + pairwise tree).
backward         : 1 elementwise launch, float64 math, rounded once to the input dtype.
forward_backward : (triton_jacobian_matching_fused, looked up from here by __getattr__)
                   reads each row once (3 passes) where it can. Rows of up to 4096 elements
                   in one split: one fused launch holds them in registers and writes their
                   gradient, then the finishing kernel. Split rows (splits of one block):
                   of the squared and norm kinds, stage 1 writes the gradient too (2 launches);
                   of the normalized kind, at most one split per SM, the splits of a row meet
                   at a barrier (_barrier_kernel), then the finishing kernel and a kernel for
                   the splits that gave up waiting (nearly always none: 3 launches and a
                   memset); rows of more splits: forward then backward (5 passes).
topk_seeds       : re-exported from triton_topk_seeds (where the registry looks for it).

Determinism: every reduction is a sequential loop or a pairwise halving tree whose shape is
fixed by block sizes chosen from (R, D, splits), never by num_warps, the autotuned tile height
or scheduling, so autotuning cannot change the bits of the result. The split count depends on
the SM count, so results are bit-reproducible per GPU model, not across models. Atomics only
hand out the barrier's tickets and count arrivals; no sum goes through one.

Outputs are rounded once from float64, fp16/bf16 included (see _rounded), as in the C++ and
CUDA kernels; torch's ``tensor.to(dtype)`` from float64 may differ by 1 ulp (double rounding).
"""
import os
import struct

import torch
import triton
import triton.language as tl

from .device_guard import on_tensors_device
from .triton_topk_seeds import topk_seeds  # noqa: F401  (also exported here)

# triton.jit decides interpreted vs compiled at decoration time from the same variable.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")

_MAX_BLOCK = 2048  # longest per-row accumulator (fp64 lanes); also fixes the reduction tree
_BWD_MAX_BD = 1024  # backward tile width
_FIN_TILE = 1024  # workspace elements per step of the finishing kernel (rows x splits)
# Every loss-head launch compiles without multiply-add contraction: with it the compiler fuses
# `acc + s * s` or `c0 * s - c1 * t` into an FMA where it sees one, and whether it does
# depends on the block shape (the tuned config), so float64 row sums would differ in their
# last bit between forward and forward_backward and between configs. The interpreter never
# fuses (so its tests check these bits); the CUDA backend writes its FMAs out (__fma_rn).
EXACT = dict(enable_fp_fusion=False)
_CPU_SMS = 4  # pretend SM count under the interpreter: small, but makes long rows split
# Unsplit rows of up to 2 blocks (4096 elements), which _fused_kernel holds in registers; more
# would need a sequential sum over the chunks, which a register tile does not give cheaply.
_FUSED_MAX_BLOCKS = 2
_MAX_SPLITS = 65535  # CUDA's limit on a grid's second dimension


def _f64_bits(x: float) -> int:
    # Triton passes Python floats as fp32; ship eps/scale as their exact float64 bit pattern.
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _rnd(dtype) -> int:
    # output rounding mode for _rounded: 0 plain cast (fp32/fp64), 1 fp16, 2 bf16
    return {torch.float16: 1, torch.bfloat16: 2}.get(dtype, 0)


_SM_CACHE = {}


def _num_sms(device) -> int:
    if device.type != "cuda":
        return _CPU_SMS
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_CACHE:
        _SM_CACHE[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_CACHE[idx]


def _plan(R: int, D: int, device):
    """Block width, split count and split length (a multiple of BLOCK) for stage 1.

    Aim for ~4 programs per SM: split rows when R alone cannot provide that. Rows longer than
    _FUSED_MAX_BLOCKS blocks, or split, are cut into splits of one block, which
    forward_backward holds in registers (_barrier_kernel: 80 registers at 8 warps on sm_90,
    3 programs per SM) while keeping forward's bits (D=150528 -> 74 splits of 2048; R=8192,
    D=784 -> 1 split).
    """
    block = min(_next_pow2(D), _MAX_BLOCK)
    target = 4 * _num_sms(device)
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
def _tree_sum(x, RB: tl.constexpr, N: tl.constexpr, LOG2N: tl.constexpr):
    # Sum each row of x [RB, N] by pairwise halving (x[:, i] + x[:, i + N/2], ...). Every step
    # adds exactly two values, so the result does not depend on the thread/warp layout.
    for i in tl.static_range(LOG2N):
        x = tl.sum(tl.reshape(x, [RB, 2, N >> (i + 1)]), axis=1)
    return tl.reshape(x, [RB])


@triton.jit
def _rounded(x, out_ptr, RND: tl.constexpr):
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
def _unit_upstream(scale_bits, REDUCTION: tl.constexpr):
    # The gradient factor when grad_loss = 1 (forward_backward): 1 per row for reduction 0,
    # else the mean's or sum's scale, shipped as its float64 bits.
    if REDUCTION == 0:
        g = 1.0
    else:
        g = scale_bits.to(tl.int64).to(tl.float64, bitcast=True)
    return g


@triton.jit(do_not_specialize=["scale_bits"])
def _partials_kernel(s_ptr, t_ptr, ws_ptr, gs_ptr, R, D, CHUNK, S, RS, scale_bits,
                     KIND: tl.constexpr, HAS_T: tl.constexpr, WRITE_GRAD: tl.constexpr,
                     REDUCTION: tl.constexpr, RND: tl.constexpr,
                     BLOCK: tl.constexpr, LOG2_BLOCK: tl.constexpr, TILE: tl.constexpr):
    # Stage 1: program (row block, split) accumulates its [RB, CHUNK] slab in fp64 lanes.
    # WRITE_GRAD (forward_backward of the squared and norm kinds, whose coefficients are the
    # constants _row_terms gives, 2 and 2 or 0): also writes grad_s = g (c0 s - c1 t) as
    # _backward_kernel does, from the same loads. Products by 2 and 0 are exact, so the bits
    # are _backward_kernel's however the compiler contracts.
    RB: tl.constexpr = TILE // BLOCK  # tile height: changes speed only, never the bits
    rows = tl.program_id(0).to(tl.int64) * RB + tl.arange(0, RB)
    sp = tl.program_id(1).to(tl.int64)
    rmask = rows < R
    row_off = rows * D  # int64: R*D may exceed 2^31
    start = sp * CHUNK
    end = tl.minimum(start + CHUNK, D)
    acc_a = tl.zeros([RB, BLOCK], dtype=tl.float64)
    acc_b = tl.zeros([RB, BLOCK], dtype=tl.float64)
    acc_c = tl.zeros([RB, BLOCK], dtype=tl.float64)
    g = _unit_upstream(scale_bits, REDUCTION)
    for k in range(start, end, BLOCK):
        cols = k + tl.arange(0, BLOCK)
        m = rmask[:, None] & (cols < end)[None, :]
        offs = row_off[:, None] + cols[None, :]
        s = tl.load(s_ptr + offs, mask=m, other=0.0).to(tl.float64)
        if KIND == 2:  # norm: ss
            acc_a += s * s
            if WRITE_GRAD:
                tl.store(gs_ptr + offs, _rounded(g * (2.0 * s), gs_ptr, RND), mask=m)
        elif KIND == 1:  # squared: dd = sum (s - t)^2 directly, never ss + tt - 2st
            if HAS_T:
                t = tl.load(t_ptr + offs, mask=m, other=0.0).to(tl.float64)
                if WRITE_GRAD:
                    tl.store(gs_ptr + offs, _rounded(g * (2.0 * s - 2.0 * t), gs_ptr, RND), mask=m)
                s = s - t
            elif WRITE_GRAD:
                tl.store(gs_ptr + offs, _rounded(g * (2.0 * s), gs_ptr, RND), mask=m)
            acc_a += s * s
        else:  # normalized: ss, tt, st
            acc_a += s * s
            if HAS_T:
                t = tl.load(t_ptr + offs, mask=m, other=0.0).to(tl.float64)
                acc_b += t * t
                acc_c += s * t
    q = rows * S + sp  # workspace layout [quantity, row, split]
    tl.store(ws_ptr + q, _tree_sum(acc_a, RB, BLOCK, LOG2_BLOCK), mask=rmask)
    if KIND == 0:
        tl.store(ws_ptr + RS + q, _tree_sum(acc_b, RB, BLOCK, LOG2_BLOCK), mask=rmask)
        tl.store(ws_ptr + RS + (RS + q), _tree_sum(acc_c, RB, BLOCK, LOG2_BLOCK), mask=rmask)


@triton.jit
def _row_terms(a, b, c, eps, KIND: tl.constexpr):
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
def _row_sums(ws_ptr, rows, rmask, S, RS, KIND: tl.constexpr, RB: tl.constexpr, SB: tl.constexpr,
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
        a += _tree_sum(_workspace_load(ws_ptr + q, m, L2_ONLY), RB, SB, LOG2_SB)
        if KIND == 0:
            b += _tree_sum(_workspace_load(ws_ptr + RS + q, m, L2_ONLY), RB, SB, LOG2_SB)
            c += _tree_sum(_workspace_load(ws_ptr + RS + (RS + q), m, L2_ONLY), RB, SB, LOG2_SB)
    return a, b, c


@triton.jit
def _student_grad(g, c0, c1, s, t):
    # grad_s = g (c0 s - c1 t): one expression for every kernel that writes it, so that they
    # round (and contract) alike
    return g * (c0 * s - c1 * t)


@triton.jit(do_not_specialize=["eps_bits", "scale_bits"])
def _finish_kernel(ws_ptr, loss_ptr, coef_ptr, R, S, RS, rows_per_prog, eps_bits, scale_bits,
                   KIND: tl.constexpr, REDUCTION: tl.constexpr, RND: tl.constexpr,
                   FIN_RB: tl.constexpr, LOG2_FIN_RB: tl.constexpr,
                   SB: tl.constexpr, LOG2_SB: tl.constexpr):
    # Reduction 0: one program per FIN_RB rows. Reduction 1: a single program walks all rows
    # in FIN_RB blocks (lane i sums rows i, i+FIN_RB, ... in order), then a pairwise tree.
    eps = eps_bits.to(tl.int64).to(tl.float64, bitcast=True)
    scale = scale_bits.to(tl.int64).to(tl.float64, bitcast=True)
    r_begin = tl.program_id(0).to(tl.int64) * rows_per_prog
    r_end = tl.minimum(r_begin + rows_per_prog, R)
    total = tl.zeros([FIN_RB], dtype=tl.float64)
    for r0 in range(r_begin, r_end, FIN_RB):
        rows = r0 + tl.arange(0, FIN_RB)
        rmask = rows < r_end
        a, b, c = _row_sums(ws_ptr, rows, rmask, S, RS, KIND, FIN_RB, SB, LOG2_SB, False)
        loss, c0, c1, c2 = _row_terms(a, b, c, eps, KIND)
        tl.store(coef_ptr + rows * 3, c0, mask=rmask)
        tl.store(coef_ptr + rows * 3 + 1, c1, mask=rmask)
        tl.store(coef_ptr + rows * 3 + 2, c2, mask=rmask)
        if REDUCTION == 0:
            tl.store(loss_ptr + rows, _rounded(loss, loss_ptr, RND), mask=rmask)
        else:
            total += tl.where(rmask, loss, 0.0)
    if REDUCTION == 1:
        tot = tl.sum(_tree_sum(tl.reshape(total, [1, FIN_RB]), 1, FIN_RB, LOG2_FIN_RB), axis=0)
        tl.store(loss_ptr, _rounded(tot * scale, loss_ptr, RND))


@triton.jit(do_not_specialize=["scale_bits"])
def _backward_kernel(s_ptr, t_ptr, coef_ptr, g_ptr, g_stride, gs_ptr, gt_ptr, R, D, scale_bits,
                     REDUCTION: tl.constexpr, HAS_T: tl.constexpr, NEED_S: tl.constexpr,
                     NEED_T: tl.constexpr, RND: tl.constexpr, G_ONE: tl.constexpr,
                     BD: tl.constexpr, TILE: tl.constexpr):
    RB: tl.constexpr = TILE // BD
    # one grid dimension (CUDA's second takes at most 65535 column tiles: rows of 2^26 elements)
    pid = tl.program_id(0).to(tl.int64)
    col_tiles = tl.cdiv(D, BD)
    rows = (pid // col_tiles) * RB + tl.arange(0, RB)
    cols = (pid % col_tiles) * BD + tl.arange(0, BD)
    rmask = rows < R
    m = rmask[:, None] & (cols < D)[None, :]
    offs = rows[:, None] * D + cols[None, :]
    c0 = tl.load(coef_ptr + rows * 3, mask=rmask, other=0.0)[:, None]
    c1 = tl.load(coef_ptr + rows * 3 + 1, mask=rmask, other=0.0)[:, None]
    c2 = tl.load(coef_ptr + rows * 3 + 2, mask=rmask, other=0.0)[:, None]
    if G_ONE:  # forward_backward: grad_loss = 1 without materializing it
        g = _unit_upstream(scale_bits, REDUCTION)
    elif REDUCTION == 0:  # per-row grad_loss; g_stride may be 0 (expanded grad)
        g = tl.load(g_ptr + rows * g_stride, mask=rmask, other=0.0).to(tl.float64)[:, None]
    else:
        g = tl.load(g_ptr).to(tl.float64) * scale_bits.to(tl.int64).to(tl.float64, bitcast=True)
    s = tl.load(s_ptr + offs, mask=m, other=0.0).to(tl.float64)
    if HAS_T:
        t = tl.load(t_ptr + offs, mask=m, other=0.0).to(tl.float64)
    else:
        t = tl.zeros([RB, BD], dtype=tl.float64)
    if NEED_S:
        tl.store(gs_ptr + offs, _rounded(_student_grad(g, c0, c1, s, t), gs_ptr, RND), mask=m)
    if NEED_T:
        tl.store(gt_ptr + offs, _rounded(g * (c2 * t - c1 * s), gt_ptr, RND), mask=m)


# Configs only vary the tile height (TILE // block width, or RB) and num_warps, which never
# change the result (see module docstring); TILE >= the largest block width so TILE // width
# >= 1. The fused kernels' configs: triton_jacobian_matching_fused.
PARTIALS_CONFIGS = [triton.Config({"TILE": tile}, num_warps=w)
                    for tile, w in ((2048, 4), (2048, 8), (2048, 16), (4096, 8), (4096, 16))]
BACKWARD_CONFIGS = [triton.Config({"TILE": tile}, num_warps=w) for tile, w in ((1024, 4), (2048, 4), (2048, 8), (4096, 8))]
# One config each where nothing is tuned: under the interpreter, and with
# JACFAST_TRITON_AUTOTUNE=0 (the test suite: hundreds of shapes, each tuned over 4-5 compiled
# configs, would take a GPU lease's minutes; the benchmarks tune, and check the results).
# (partials at 4 warps would hold 32 elements per thread: 255 registers, and a 176-byte spill
# for fp32 under triton 3.6.)
FIXED = {"partials": ({"TILE": 4096}, 8), "backward": ({"TILE": 4096}, 4), "fused": ({"RB": 1}, 8)}
AUTOTUNE = not _INTERPRET and os.environ.get("JACFAST_TRITON_AUTOTUNE", "1").strip() != "0"
if AUTOTUNE:
    _partials_tuned = triton.autotune(configs=PARTIALS_CONFIGS,
                                      key=["D", "CHUNK", "KIND", "HAS_T", "WRITE_GRAD"])(_partials_kernel)
    _backward_tuned = triton.autotune(configs=BACKWARD_CONFIGS,
                                      key=["D", "REDUCTION", "HAS_T", "NEED_S", "NEED_T", "G_ONE"])(_backward_kernel)
else:
    _partials_tuned = _backward_tuned = None


@on_tensors_device
def forward(student, teacher, kind: int, reduction: int, eps: float, scale: float, grad_student=None):
    """Loss and coef; with ``grad_student`` (squared and norm kinds only) stage 1 also writes
    the gradient of forward_backward into it (see _partials_kernel)."""
    R, D = student.shape
    dev = student.device
    has_t = teacher is not None and kind != 2
    t = teacher if has_t else student  # dummy pointer, never read when HAS_T is False
    block, splits, chunk = _plan(R, D, dev)
    nq = 3 if kind == 0 else 1
    ws = torch.empty((nq, R, splits), dtype=torch.float64, device=dev)
    write_grad = grad_student is not None
    args = (student, t, ws, grad_student if write_grad else student, R, D, chunk, splits, R * splits,
            _f64_bits(scale))
    meta = dict(KIND=kind, HAS_T=has_t, WRITE_GRAD=write_grad, REDUCTION=reduction, RND=_rnd(student.dtype),
                BLOCK=block, LOG2_BLOCK=block.bit_length() - 1)
    if _partials_tuned is None:
        cfg, warps = FIXED["partials"]
        grid = (triton.cdiv(R, cfg["TILE"] // block), splits)
        _partials_kernel[grid](*args, **meta, **cfg, num_warps=warps, **EXACT)
    else:
        _partials_tuned[lambda m: (triton.cdiv(R, m["TILE"] // block), splits)](*args, **meta, **EXACT)

    return _finish(ws, R, splits, kind, reduction, eps, scale, student)


def _finish(ws, R: int, splits: int, kind: int, reduction: int, eps: float, scale: float, student):
    """Loss and coef from the workspace of row sums (nq, R, splits)."""
    dev = student.device
    coef = torch.empty((R, 3), dtype=torch.float64, device=dev)
    loss = torch.empty((R,) if reduction == 0 else (), dtype=student.dtype, device=dev)
    # Fixed (untuned) shapes: they define the summation tree. Reduction 1 runs as a single
    # program, so give it a whole 16-warp block and 2x the rows per step.
    sb = min(_next_pow2(splits), 64)
    fin_rb = max(1, (_FIN_TILE if reduction == 0 else 2 * _FIN_TILE) // sb)
    if reduction == 0:
        grid, rows_per_prog, nw = (triton.cdiv(R, fin_rb),), fin_rb, 4
    else:
        grid, rows_per_prog, nw = (1,), R, 16
    _finish_kernel[grid](ws, loss, coef, R, splits, R * splits, rows_per_prog, _f64_bits(eps),
                         _f64_bits(scale), KIND=kind, REDUCTION=reduction,
                         RND=_rnd(student.dtype), FIN_RB=fin_rb,
                         LOG2_FIN_RB=fin_rb.bit_length() - 1, SB=sb,
                         LOG2_SB=sb.bit_length() - 1, num_warps=nw, **EXACT)
    return loss, coef


@on_tensors_device
def backward(grad_loss, student, teacher, coef, reduction: int, scale: float,
             need_student: bool, need_teacher: bool):
    R, D = student.shape
    dev, dtype = student.device, student.dtype
    has_t = teacher is not None
    need_t = bool(need_teacher) and has_t
    need_s = bool(need_student)
    gs = torch.empty((R, D) if need_s else (0,), dtype=dtype, device=dev)
    gt = torch.empty((R, D) if need_t else (0,), dtype=dtype, device=dev)
    if not (need_s or need_t):
        return gs, gt
    g_one = grad_loss is None  # only from forward_backward
    if g_one:
        grad_loss, g_stride = coef, 0  # dummy pointer, never read
    elif reduction == 0:
        grad_loss = grad_loss.reshape(R)  # keeps stride 0 of an expanded grad
        g_stride = grad_loss.stride(0)
    else:
        g_stride = 0
    t = teacher if has_t else student
    bd = min(_next_pow2(D), _BWD_MAX_BD)
    args = (student, t, coef, grad_loss, g_stride, gs if need_s else student,
            gt if need_t else student, R, D, _f64_bits(scale))
    meta = dict(REDUCTION=reduction, HAS_T=has_t, NEED_S=need_s, NEED_T=need_t,
                RND=_rnd(dtype), G_ONE=g_one, BD=bd)
    if _backward_tuned is None:
        cfg, warps = FIXED["backward"]
        grid = (triton.cdiv(R, cfg["TILE"] // bd) * triton.cdiv(D, bd),)
        _backward_kernel[grid](*args, **meta, **cfg, num_warps=warps, **EXACT)
    else:
        _backward_tuned[lambda m: (triton.cdiv(R, m["TILE"] // bd) * triton.cdiv(D, bd),)](
            *args, **meta, **EXACT)
    return gs, gt


_FUSED_NAMES = ("forward_backward", "fused_path", "scale_unless_one_")


def __getattr__(name: str):
    """forward_backward and its kernels live in triton_jacobian_matching_fused, which imports
    the helpers above: looked up there on first use (no import cycle, whichever loads first)."""
    if name in _FUSED_NAMES:
        from . import triton_jacobian_matching_fused

        return getattr(triton_jacobian_matching_fused, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
