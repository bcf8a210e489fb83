"""The two-pass Triton loss head: forward (the row sums, then loss and coef) and backward.

forward  : 2 launches. Stage 1, grid (row blocks, SPLITS), writes float64 partial dot
           products per (row, split) to a workspace; a tiny finishing kernel combines the
           splits in a fixed order, computes loss and coef, and for reduction 1 sums the rows
           in one program (fixed lane layout + pairwise tree).
backward : 1 elementwise launch, float64 math, rounded once to the input dtype.

The plan and the jit helpers are in common; forward_backward (fused) builds on these.
"""
import torch
import triton
import triton.language as tl

from ..device_guard import on_tensors_device
from .common import (AUTOTUNE, BWD_MAX_BD, EXACT, FIXED, f64_bits, next_pow2, plan, rnd_code, rounded,
                     row_sums, row_terms, student_grad, tree_sum, unit_upstream)

_FIN_TILE = 1024  # workspace elements per step of the finishing kernel (rows x splits)


@triton.jit(do_not_specialize=["scale_bits"])
def _partials_kernel(s_ptr, t_ptr, ws_ptr, gs_ptr, R, D, CHUNK, S, RS, scale_bits,
                     KIND: tl.constexpr, HAS_T: tl.constexpr, WRITE_GRAD: tl.constexpr,
                     REDUCTION: tl.constexpr, RND: tl.constexpr,
                     BLOCK: tl.constexpr, LOG2_BLOCK: tl.constexpr, TILE: tl.constexpr):
    # Stage 1: program (row block, split) accumulates its [RB, CHUNK] slab in fp64 lanes.
    # WRITE_GRAD (forward_backward of the squared and norm kinds, whose coefficients are the
    # constants row_terms gives, 2 and 2 or 0): also writes grad_s = g (c0 s - c1 t) as
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
    g = unit_upstream(scale_bits, REDUCTION)
    for k in range(start, end, BLOCK):
        cols = k + tl.arange(0, BLOCK)
        m = rmask[:, None] & (cols < end)[None, :]
        offs = row_off[:, None] + cols[None, :]
        s = tl.load(s_ptr + offs, mask=m, other=0.0).to(tl.float64)
        if KIND == 2:  # norm: ss
            acc_a += s * s
            if WRITE_GRAD:
                tl.store(gs_ptr + offs, rounded(g * (2.0 * s), gs_ptr, RND), mask=m)
        elif KIND == 1:  # squared: dd = sum (s - t)^2 directly, never ss + tt - 2st
            if HAS_T:
                t = tl.load(t_ptr + offs, mask=m, other=0.0).to(tl.float64)
                if WRITE_GRAD:
                    tl.store(gs_ptr + offs, rounded(g * (2.0 * s - 2.0 * t), gs_ptr, RND), mask=m)
                s = s - t
            elif WRITE_GRAD:
                tl.store(gs_ptr + offs, rounded(g * (2.0 * s), gs_ptr, RND), mask=m)
            acc_a += s * s
        else:  # normalized: ss, tt, st
            acc_a += s * s
            if HAS_T:
                t = tl.load(t_ptr + offs, mask=m, other=0.0).to(tl.float64)
                acc_b += t * t
                acc_c += s * t
    q = rows * S + sp  # workspace layout [quantity, row, split]
    tl.store(ws_ptr + q, tree_sum(acc_a, RB, BLOCK, LOG2_BLOCK), mask=rmask)
    if KIND == 0:
        tl.store(ws_ptr + RS + q, tree_sum(acc_b, RB, BLOCK, LOG2_BLOCK), mask=rmask)
        tl.store(ws_ptr + RS + (RS + q), tree_sum(acc_c, RB, BLOCK, LOG2_BLOCK), mask=rmask)



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
        a, b, c = row_sums(ws_ptr, rows, rmask, S, RS, KIND, FIN_RB, SB, LOG2_SB, False)
        loss, c0, c1, c2 = row_terms(a, b, c, eps, KIND)
        tl.store(coef_ptr + rows * 3, c0, mask=rmask)
        tl.store(coef_ptr + rows * 3 + 1, c1, mask=rmask)
        tl.store(coef_ptr + rows * 3 + 2, c2, mask=rmask)
        if REDUCTION == 0:
            tl.store(loss_ptr + rows, rounded(loss, loss_ptr, RND), mask=rmask)
        else:
            total += tl.where(rmask, loss, 0.0)
    if REDUCTION == 1:
        tot = tl.sum(tree_sum(tl.reshape(total, [1, FIN_RB]), 1, FIN_RB, LOG2_FIN_RB), axis=0)
        tl.store(loss_ptr, rounded(tot * scale, loss_ptr, RND))


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
        g = unit_upstream(scale_bits, REDUCTION)
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
        tl.store(gs_ptr + offs, rounded(student_grad(g, c0, c1, s, t), gs_ptr, RND), mask=m)
    if NEED_T:
        tl.store(gt_ptr + offs, rounded(g * (c2 * t - c1 * s), gt_ptr, RND), mask=m)


# Configs only vary the tile height (TILE // block width, or RB) and num_warps, which never
# change the result (see common's docstring); TILE >= the largest block width so TILE // width
# >= 1. The fused kernels' configs: fused.FUSED_CONFIGS.
PARTIALS_CONFIGS = [triton.Config({"TILE": tile}, num_warps=w)
                    for tile, w in ((2048, 4), (2048, 8), (2048, 16), (4096, 8), (4096, 16))]
BACKWARD_CONFIGS = [triton.Config({"TILE": tile}, num_warps=w) for tile, w in ((1024, 4), (2048, 4), (2048, 8), (4096, 8))]
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
    block, splits, chunk = plan(R, D, dev)
    nq = 3 if kind == 0 else 1
    ws = torch.empty((nq, R, splits), dtype=torch.float64, device=dev)
    write_grad = grad_student is not None
    args = (student, t, ws, grad_student if write_grad else student, R, D, chunk, splits, R * splits,
            f64_bits(scale))
    meta = dict(KIND=kind, HAS_T=has_t, WRITE_GRAD=write_grad, REDUCTION=reduction, RND=rnd_code(student.dtype),
                BLOCK=block, LOG2_BLOCK=block.bit_length() - 1)
    if _partials_tuned is None:
        cfg, warps = FIXED["partials"]
        grid = (triton.cdiv(R, cfg["TILE"] // block), splits)
        _partials_kernel[grid](*args, **meta, **cfg, num_warps=warps, **EXACT)
    else:
        _partials_tuned[lambda m: (triton.cdiv(R, m["TILE"] // block), splits)](*args, **meta, **EXACT)

    return finish(ws, R, splits, kind, reduction, eps, scale, student)


def finish(ws, R: int, splits: int, kind: int, reduction: int, eps: float, scale: float, student):
    """Loss and coef from the workspace of row sums (nq, R, splits)."""
    dev = student.device
    coef = torch.empty((R, 3), dtype=torch.float64, device=dev)
    loss = torch.empty((R,) if reduction == 0 else (), dtype=student.dtype, device=dev)
    # Fixed (untuned) shapes: they define the summation tree. Reduction 1 runs as a single
    # program, so give it a whole 16-warp block and 2x the rows per step.
    sb = min(next_pow2(splits), 64)
    fin_rb = max(1, (_FIN_TILE if reduction == 0 else 2 * _FIN_TILE) // sb)
    if reduction == 0:
        grid, rows_per_prog, nw = (triton.cdiv(R, fin_rb),), fin_rb, 4
    else:
        grid, rows_per_prog, nw = (1,), R, 16
    _finish_kernel[grid](ws, loss, coef, R, splits, R * splits, rows_per_prog, f64_bits(eps),
                         f64_bits(scale), KIND=kind, REDUCTION=reduction,
                         RND=rnd_code(student.dtype), FIN_RB=fin_rb,
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
    bd = min(next_pow2(D), BWD_MAX_BD)
    args = (student, t, coef, grad_loss, g_stride, gs if need_s else student,
            gt if need_t else student, R, D, f64_bits(scale))
    meta = dict(REDUCTION=reduction, HAS_T=has_t, NEED_S=need_s, NEED_T=need_t,
                RND=rnd_code(dtype), G_ONE=g_one, BD=bd)
    if _backward_tuned is None:
        cfg, warps = FIXED["backward"]
        grid = (triton.cdiv(R, cfg["TILE"] // bd) * triton.cdiv(D, bd),)
        _backward_kernel[grid](*args, **meta, **cfg, num_warps=warps, **EXACT)
    else:
        _backward_tuned[lambda m: (triton.cdiv(R, m["TILE"] // bd) * triton.cdiv(D, bd),)](
            *args, **meta, **EXACT)
    return gs, gt

