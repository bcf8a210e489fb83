"""forward_backward of the Triton loss head: the kernels that read each row once.

Rows of up to 4096 elements in one split: one fused launch holds them in registers and writes
their gradient, then the finishing kernel. Split rows (splits of one block): of the squared and
norm kinds, stage 1 writes the gradient too (2 launches); of the normalized kind, at most one
split per SM, the splits of a row meet at a barrier (_barrier_kernel), then the finishing
kernel and a kernel for the splits that gave up waiting (nearly always none: 3 launches and a
memset); rows of more splits: forward then backward (5 passes). Each kernel here repeats
forward's sums in forward's order, so forward_backward has the bits of forward then
backward(grad_loss = 1).
"""
import os

import torch
import triton
import triton.language as tl

from ..device_guard import on_tensors_device
from .common import (AUTOTUNE, BWD_MAX_BD, EXACT, FIXED, INTERPRET, f64_bits, next_pow2, num_sms, plan,
                     rnd_code, rounded, row_sums, row_terms, student_grad, tree_sum, unit_upstream)
from .two_pass import backward, finish, forward


@triton.jit
def _chunk_sum(x, RB: tl.constexpr, BLOCK: tl.constexpr, NB: tl.constexpr):
    # x [RB, NB * BLOCK] -> [RB, BLOCK]: the lane sums 0 + chunk 0 (+ chunk 1) that
    # _partials_kernel's loop forms over a row of NB <= 2 blocks. (c0 + c1) + 0 has the bits
    # of (0 + c0) + c1, signed zeros included.
    if NB == 1:
        acc = x + 0.0
    else:
        acc = tl.sum(tl.reshape(x, [RB, 2, BLOCK]), axis=1) + 0.0
    return acc


@triton.jit(do_not_specialize=["eps_bits", "scale_bits"])
def _fused_kernel(s_ptr, t_ptr, ws_ptr, gs_ptr, R, D, eps_bits, scale_bits,
                  KIND: tl.constexpr, HAS_T: tl.constexpr, REDUCTION: tl.constexpr, RND: tl.constexpr,
                  BLOCK: tl.constexpr, LOG2_BLOCK: tl.constexpr, NB: tl.constexpr, RB: tl.constexpr):
    # forward_backward for rows of at most NB * BLOCK elements (one split): each program reads
    # its RB whole rows once, forms the row sums exactly as _partials_kernel does (same lanes,
    # same chunk order, same tree), writes them to the workspace for _finish_kernel (loss),
    # and writes the gradient (grad_loss = 1) from the rows it holds in registers.
    rows = tl.program_id(0).to(tl.int64) * RB + tl.arange(0, RB)
    cols = tl.arange(0, NB * BLOCK)
    rmask = rows < R
    m = rmask[:, None] & (cols < D)[None, :]
    offs = rows[:, None] * D + cols[None, :]
    s = tl.load(s_ptr + offs, mask=m, other=0.0).to(tl.float64)
    if HAS_T:
        t = tl.load(t_ptr + offs, mask=m, other=0.0).to(tl.float64)
    else:
        t = tl.zeros([RB, NB * BLOCK], dtype=tl.float64)
    zero = tl.zeros([RB], dtype=tl.float64)
    if KIND == 0:
        a = tree_sum(_chunk_sum(s * s, RB, BLOCK, NB), RB, BLOCK, LOG2_BLOCK)
        b = tree_sum(_chunk_sum(t * t, RB, BLOCK, NB), RB, BLOCK, LOG2_BLOCK)
        c = tree_sum(_chunk_sum(s * t, RB, BLOCK, NB), RB, BLOCK, LOG2_BLOCK)
        tl.store(ws_ptr + R + rows, b, mask=rmask)
        tl.store(ws_ptr + R + (R + rows), c, mask=rmask)
    else:
        if KIND == 1:  # squared: (s - t)^2 directly, never ss + tt - 2st
            d = s - t
        else:  # norm: s^2
            d = s
        a = tree_sum(_chunk_sum(d * d, RB, BLOCK, NB), RB, BLOCK, LOG2_BLOCK)
        b = zero
        c = zero
    tl.store(ws_ptr + rows, a, mask=rmask)
    # _finish_kernel with one split adds each sum to 0.0; so does this, for the same bits.
    _, c0, c1, c2 = row_terms(zero + a, zero + b, zero + c, eps_bits.to(tl.int64).to(tl.float64, bitcast=True),
                               KIND)
    g = unit_upstream(scale_bits, REDUCTION)
    grad = student_grad(g, c0[:, None], c1[:, None], s, t)
    tl.store(gs_ptr + offs, rounded(grad, gs_ptr, RND), mask=m)


@triton.jit(do_not_specialize=["eps_bits", "scale_bits", "max_polls"])
def _barrier_kernel(s_ptr, t_ptr, ws_ptr, gs_ptr, sync_ptr, R, D, S, RS, eps_bits, scale_bits, max_polls,
                    HAS_T: tl.constexpr, REDUCTION: tl.constexpr, RND: tl.constexpr, BLOCK: tl.constexpr,
                    LOG2_BLOCK: tl.constexpr, SB: tl.constexpr, LOG2_SB: tl.constexpr):
    # forward_backward of the normalized kind for rows split into S splits of one BLOCK, one
    # program each. A program sums its split as _partials_kernel does, publishes
    # the 3 sums, and waits (at most max_polls reads) until the row's S splits have arrived;
    # then it sums the row's partials as _finish_kernel does and writes its split's gradient
    # from the registers that hold it (3 passes over memory). A program that gives up waiting
    # leaves its split to _pending_backward_kernel, which reads it again: the same bits, slower.
    # sync = [ticket, arrived per row (R), done per split (RS)], zeroed. Splits go by ticket,
    # not program id, so only the newest row can wait on programs not yet started: with S at
    # most the SM count (one resident program each) every row completes, whatever the order
    # programs are scheduled in. Atomics order the exchange only; no sum depends on them.
    ticket = tl.atomic_add(sync_ptr, 1).to(tl.int64)
    if ticket < RS:
        row = ticket // S
        sp = ticket % S
        cols = sp * BLOCK + tl.arange(0, BLOCK)
        m = (cols < D)[None, :]
        offs = row * D + cols[None, :]
        s = tl.load(s_ptr + offs, mask=m, other=0.0).to(tl.float64)
        if HAS_T:
            t = tl.load(t_ptr + offs, mask=m, other=0.0).to(tl.float64)
        else:
            t = tl.zeros([1, BLOCK], dtype=tl.float64)
        q = row * S + sp + tl.arange(0, 1)  # workspace layout [quantity, row, split]
        tl.store(ws_ptr + q, tree_sum(_chunk_sum(s * s, 1, BLOCK, 1), 1, BLOCK, LOG2_BLOCK))
        tl.store(ws_ptr + RS + q, tree_sum(_chunk_sum(t * t, 1, BLOCK, 1), 1, BLOCK, LOG2_BLOCK))
        tl.store(ws_ptr + RS + (RS + q), tree_sum(_chunk_sum(s * t, 1, BLOCK, 1), 1, BLOCK, LOG2_BLOCK))
        tl.debug_barrier()  # every thread's stores before the release below
        arrived = tl.atomic_add(sync_ptr + 1 + row, 1, sem="acq_rel", scope="gpu") + 1
        polls = 0
        while (arrived < S) & (polls < max_polls):
            arrived = tl.atomic_add(sync_ptr + 1 + row, 0, sem="acquire", scope="gpu")
            polls += 1
        if arrived >= S:
            # _finish_kernel's sums of this row; its mask a constant (row < R costs registers, spills)
            valid = tl.arange(0, 1) < 1
            a, b, c = row_sums(ws_ptr, row + tl.arange(0, 1), valid, S, RS, 0, 1, SB, LOG2_SB, True)
            _, c0, c1, _ = row_terms(a, b, c, eps_bits.to(tl.int64).to(tl.float64, bitcast=True), 0)
            g = unit_upstream(scale_bits, REDUCTION)
            grad = student_grad(g, c0[:, None], c1[:, None], s, t)
            tl.store(gs_ptr + offs, rounded(grad, gs_ptr, RND), mask=m)
            tl.store(sync_ptr + 1 + R + ticket, 1)


@triton.jit(do_not_specialize=["scale_bits"])
def _pending_backward_kernel(s_ptr, t_ptr, coef_ptr, gs_ptr, done_ptr, D, CHUNK, S, RS, scale_bits,
                             HAS_T: tl.constexpr, REDUCTION: tl.constexpr, RND: tl.constexpr,
                             PB: tl.constexpr, BD: tl.constexpr):
    # The gradient of the splits whose _barrier_kernel program gave up waiting (done == 0),
    # as _backward_kernel writes it (grad_loss = 1). One vector load of PB flags per program:
    # nearly free when every split is done, the usual case on a GPU.
    base = tl.program_id(0).to(tl.int64) * PB
    idx = base + tl.arange(0, PB)
    flags = tl.load(done_ptr + idx, mask=idx < RS, other=1)
    if tl.sum(tl.where(flags == 0, 1, 0), axis=0) > 0:
        for k in range(base, tl.minimum(base + PB, RS)):
            if tl.load(done_ptr + k) == 0:
                row = k // S
                start = (k % S) * CHUNK
                end = tl.minimum(start + CHUNK, D)
                c0 = tl.load(coef_ptr + row * 3)
                c1 = tl.load(coef_ptr + row * 3 + 1)
                g = unit_upstream(scale_bits, REDUCTION)
                for k0 in range(start, end, BD):
                    cols = k0 + tl.arange(0, BD)
                    m = cols < end
                    s = tl.load(s_ptr + row * D + cols, mask=m, other=0.0).to(tl.float64)
                    if HAS_T:
                        t = tl.load(t_ptr + row * D + cols, mask=m, other=0.0).to(tl.float64)
                    else:
                        t = tl.zeros([BD], dtype=tl.float64)
                    grad = student_grad(g, c0, c1, s, t)
                    tl.store(gs_ptr + row * D + cols, rounded(grad, gs_ptr, RND), mask=m)


@triton.jit
def _scale_unless_one_kernel(x_ptr, g_ptr, g_stride, R, D, RND: tl.constexpr, BD: tl.constexpr,
                             RB: tl.constexpr):
    # x[r, :] *= g[r * g_stride] in place, rounded once; a tile whose rows all have g == 1
    # reads and writes nothing. Lets a fused forward's gradient be scaled without first
    # asking the host whether the upstream gradient is 1 (a device sync).
    # one grid dimension (CUDA's second takes at most 65535 column tiles: rows of 2^26 elements)
    pid = tl.program_id(0).to(tl.int64)
    col_tiles = tl.cdiv(D, BD)
    rows = (pid // col_tiles) * RB + tl.arange(0, RB)
    cols = (pid % col_tiles) * BD + tl.arange(0, BD)
    rmask = rows < R
    g = tl.load(g_ptr + rows * g_stride, mask=rmask, other=1.0).to(tl.float64)
    if tl.sum(tl.where(g == 1.0, 0, 1), axis=0) > 0:  # NaN counts as != 1
        m = rmask[:, None] & (cols < D)[None, :]
        offs = rows[:, None] * D + cols[None, :]
        x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float64)
        tl.store(x_ptr + offs, rounded(x * g[:, None], x_ptr, RND), mask=m)


# The last config spills registers for fp16/bf16 rows, so 16-bit rows tune over the first two
# (tests/test_triton_compiles.py checks every config for spills). _barrier_kernel has one
# fixed config, never tuned: a rerun would find its counters spent.
FUSED_CONFIGS = [triton.Config({"RB": rb}, num_warps=w) for rb, w in ((1, 8), (1, 16), (2, 16))]


def fused_configs(configs, named_args, **kwargs):
    """The FUSED_CONFIGS a launch of _fused_kernel tunes over (the autotuner's early prune)."""
    rnd = kwargs.get("RND", named_args.get("RND", 0))
    return [c for c in configs if rnd == 0 or c.kwargs["RB"] == 1]


_fused_tuned = (triton.autotune(configs=FUSED_CONFIGS, key=["D", "KIND", "HAS_T", "REDUCTION", "RND"],
                                prune_configs_by={"early_config_prune": fused_configs})(_fused_kernel)
                if AUTOTUNE else None)


@on_tensors_device
def forward_backward(student, teacher, kind: int, reduction: int, eps: float, scale: float):
    """forward + backward(grad_loss = 1), the same bits as the two, reading each row once
    (3 passes over memory) wherever it can:

    - rows forward sums in one split (at most 2 blocks): _fused_kernel, then
      the finishing kernel;
    - split rows of the squared and norm kinds: stage 1 writes their gradient (its
      coefficients are constants);
    - split rows of the normalized kind, of at most one split per SM: _barrier_kernel (the
      splits of a row exchange their sums), the finishing kernel, _pending_backward_kernel;
    - rows of more splits: forward, then backward, which reads the inputs again (5 passes).
    """
    R, D = student.shape
    dev = student.device
    block, splits, _ = plan(R, D, dev)
    path = fused_path(R, D, kind, dev)
    if path == 2 and kind != 0:
        gs = torch.empty((R, D), dtype=student.dtype, device=dev)
        loss, _ = forward(student, teacher, kind, reduction, eps, scale, grad_student=gs)
        return loss, gs
    if path == 2:
        return _forward_backward_split(student, teacher, reduction, eps, scale, block, splits)
    if path == 0:
        loss, coef = forward(student, teacher, kind, reduction, eps, scale)
        grad_student, _ = backward(None, student, teacher, coef, reduction, scale, True, False)
        return loss, grad_student
    has_t = teacher is not None and kind != 2
    t = teacher if has_t else student  # dummy pointer, never read when HAS_T is False
    ws = torch.empty((3 if kind == 0 else 1, R, 1), dtype=torch.float64, device=dev)
    gs = torch.empty((R, D), dtype=student.dtype, device=dev)
    args = (student, t, ws, gs, R, D, f64_bits(eps), f64_bits(scale))
    meta = dict(KIND=kind, HAS_T=has_t, REDUCTION=reduction, RND=rnd_code(student.dtype), BLOCK=block,
                LOG2_BLOCK=block.bit_length() - 1, NB=next_pow2(triton.cdiv(D, block)))
    if _fused_tuned is None:
        cfg, warps = FIXED["fused"]
        _fused_kernel[(triton.cdiv(R, cfg["RB"]),)](*args, **meta, **cfg, num_warps=warps, **EXACT)
    else:
        _fused_tuned[lambda m: (triton.cdiv(R, m["RB"]),)](*args, **meta, **EXACT)
    loss, _ = finish(ws, R, 1, kind, reduction, eps, scale, student)
    return loss, gs


def fused_path(R: int, D: int, kind: int, device) -> int:
    """Which kernels forward_backward runs, in the codes of the CUDA backend's _fused_path:
    0 forward then backward (5 passes), 1 rows in one split (_fused_kernel), 2 split rows read
    once (stage 1 writing the gradient, or _barrier_kernel for the normalized kind)."""
    _, splits, _ = plan(R, D, device)
    if splits == 1:
        return 1
    # the barrier: at most one split per SM (so a row's splits are resident together), and
    # tickets that fit its int32 counter
    barrier = FUSE_SPLIT_ROWS and splits <= num_sms(device) and R * splits < 2**31
    return 2 if kind != 0 or barrier else 0


# JACFAST_TRITON_FUSE_SPLIT_ROWS=0: normalized split rows run forward then backward (the same
# bits), for GPUs shared with an SM limit (MPS), where a row's splits may not all be resident
# and its programs would wait out _BARRIER_POLLS.
FUSE_SPLIT_ROWS = os.environ.get("JACFAST_TRITON_FUSE_SPLIT_ROWS", "1").strip() != "0"
# Reads of a row's arrival counter before a _barrier_kernel program gives up (~1 us each on a
# GPU, where the wait is a few us); under the interpreter, which runs programs one after
# another, the row's last split is the only one that never waits.
_BARRIER_POLLS = 2 if INTERPRET else 1 << 16
_PENDING_FLAGS = 1024  # splits per program of _pending_backward_kernel


def _forward_backward_split(student, teacher, reduction: int, eps: float, scale: float, block: int, splits: int):
    """forward_backward of the normalized kind for rows of ``splits`` splits (see _barrier_kernel)."""
    R, D = student.shape
    dev, dtype = student.device, student.dtype
    has_t = teacher is not None
    t = teacher if has_t else student
    RS = R * splits
    ws = torch.empty((3, R, splits), dtype=torch.float64, device=dev)
    sync = torch.zeros(1 + R + RS, dtype=torch.int32, device=dev)
    gs = torch.empty((R, D), dtype=dtype, device=dev)
    sb = min(next_pow2(splits), 64)  # as finish's, whose sums the programs repeat
    _barrier_kernel[(RS,)](student, t, ws, gs, sync, R, D, splits, RS, f64_bits(eps), f64_bits(scale),
                           _BARRIER_POLLS, HAS_T=has_t, REDUCTION=reduction, RND=rnd_code(dtype), BLOCK=block,
                           LOG2_BLOCK=block.bit_length() - 1, SB=sb, LOG2_SB=sb.bit_length() - 1,
                           num_warps=8, **EXACT)
    loss, coef = finish(ws, R, splits, 0, reduction, eps, scale, student)
    _pending_backward_kernel[(triton.cdiv(RS, _PENDING_FLAGS),)](
        student, t, coef, gs, sync[1 + R:], D, block, splits, RS, f64_bits(scale), HAS_T=has_t,
        REDUCTION=reduction, RND=rnd_code(dtype), PB=_PENDING_FLAGS, BD=BWD_MAX_BD, num_warps=4, **EXACT)
    return loss, gs


@on_tensors_device
def scale_unless_one_(grad, grad_loss, reduction: int):
    """grad (R, D) *= grad_loss (per row for reduction 0, else the scalar), in place, rounded
    once; skipped on the device for rows whose grad_loss is 1, so no device sync is needed."""
    R, D = grad.shape
    g = grad_loss.reshape(R) if reduction == 0 else grad_loss.reshape(())
    g_stride = g.stride(0) if reduction == 0 else 0
    bd = min(next_pow2(D), BWD_MAX_BD)
    rb = max(1, FIXED["backward"][0]["TILE"] // bd)
    _scale_unless_one_kernel[(triton.cdiv(R, rb) * triton.cdiv(D, bd),)](
        grad, g, g_stride, R, D, RND=rnd_code(grad.dtype), BD=bd, RB=rb, num_warps=4, **EXACT)
    return grad
