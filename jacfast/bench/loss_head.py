"""Benchmark of the loss head: jacfast backends vs eager autograd, torch.compile, a public
re-implementation, and the memory-pass floor, all measured in one run.

Bytes each mode must move at least (teacher without grad; without a teacher for "norm"):
fwd reads s and t (2 passes of R * D * itemsize); bwd, recomputing from the inputs, reads s
and t and writes grad_s (3); fwd+bwd reads s and t once and writes grad_s (3: what a fused
implementation moves when the incoming gradient is 1, as here; a forward kernel plus a
backward kernel move 5). The floor is that traffic at the bandwidth of a plain copy measured
in the same run, in turns with the providers (one timing before them let a load spike during
the copy alone move a row's "x floor" by 2x or more); GB/s is that traffic over the time.

Providers are timed in blocks of back-to-back calls that take turns, five rounds, each block
after one untimed call (:func:`jacfast.bench.timing.measure_blocks`): load that drifts over
seconds falls on every provider alike. Not round-robin calls (as the selection and
training-step benchmarks do): on a small VM a call that follows another provider's pays a
constant wake-up that swamps millisecond kernels; nor one block per provider, which leaves
the ratios at the mercy of load changes between blocks (docs/performance.md). jacfast-cpu's bwd is almost free when its forward already computed the
gradient (the fused path of JacobianMatchingFunction).

On a GPU, fwd+bwd of the normalized loss also times ``jacfast-<backend>-unfused``: the same
autograd path with forward_backward's fusion off (forward, then backward: 5 passes), so the
fused kernels, the row barriers among them, are compared with what they replace in the same
run.

Peak memory (``peak_mb``) is what one call of the timed mode allocates above what is
allocated when it starts (:func:`jacfast.bench.timing.peak_bytes`); the inputs are not
counted, the gradient is.
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.nn.functional as F

from jacfast import loss as jloss
from jacfast import reference, registry
from jacfast.ops import jacobian_matching as ops
from jacfast.bench.timing import TimeBudget, measure_blocks, peak_bytes, rotation_count

SIZES = {
    "quick": [(256, 3072), (16, 3 * 224 * 224)],
    "full": [(8192, 784), (2048, 3072), (256, 3072), (64, 3 * 64 * 64), (16, 3 * 224 * 224)],
    "full-cuda": [(8192, 784), (16384, 3072), (1024, 150528), (16, 150528), (6644, 150528)],
    "smoke": [(8, 50), (2, 1000)],
}
# measure_blocks settings: timed seconds per provider and mode. CUDA events time each call on
# the device, without the host's jitter; 0.15 s there (triton.testing.do_bench times 0.1 s)
# keeps the full sweep inside a device lease.
BLOCK_TIMING = {"cpu": {"min_time": 0.5, "min_repeats": 10}, "cuda": {"min_time": 0.15, "min_repeats": 10}}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Full-tensor passes each mode must make: (with a teacher, without one for kind="norm").
PASSES = {"fwd": (2, 1), "bwd": (3, 2), "fwd+bwd": (3, 2)}


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    den = torch.linalg.vector_norm(ref.double())
    return (torch.linalg.vector_norm(out.double() - ref.double()) / den).item() if den > 0 else 0.0


def _public_reimplementation(student, teacher, kind):
    """What public code typically writes: F.normalize + MSE, summed over outputs, mean over batch."""
    batch = student.shape[0]
    s, t = student.flatten(2), teacher.flatten(2) if teacher is not None else None
    if kind == "normalized":
        return F.mse_loss(F.normalize(s, dim=-1), F.normalize(t, dim=-1), reduction="sum") / batch
    if kind == "squared":
        return F.mse_loss(s, t, reduction="sum") / batch
    return s.pow(2).sum() / batch


def providers(device: torch.device, kind: str) -> dict:
    """name -> loss function (student, teacher) for every provider that runs on ``device``."""
    found = {}
    # The fourth backend, "torch", runs jacfast/reference.py through autograd: it is the
    # "eager" provider below, so it is not timed twice.
    for name in ("cuda", "triton", "cpu"):
        status = registry.status_for(name, device.type)
        interpreted = name == "triton" and device.type == "cpu"  # the interpreter is for tests, not timing
        if status.available and not interpreted:
            found[f"jacfast-{name}"] = lambda s, t, _b=name: jloss.jacobian_matching_loss(s, t, kind=kind, backend=_b)
            if device.type == "cuda" and kind == "normalized":  # the kind whose split rows meet at a barrier
                found[f"jacfast-{name}-unfused"] = _unfused(name, kind)
    eager = lambda s, t: reference.jacobian_matching_loss(s, t, kind=kind)  # noqa: E731
    found["eager"] = eager
    found["compile"] = torch.compile(eager, dynamic=False)
    found["public"] = lambda s, t: _public_reimplementation(s, t, kind)
    return found


def _unfused(backend: str, kind: str):
    """The loss of jacobian_matching_loss (mean over the batch) through JacobianMatchingFunction
    with grad_mode=False, which runs its unfused branch: forward, then backward. Inputs are
    (B, K, D) contiguous, so the rows are a view, as jacobian_matching_loss makes them."""
    code = ops.KINDS[kind]

    def loss(student, teacher):
        rows = student.reshape(-1, student.shape[-1])
        teacher_rows = None if teacher is None else teacher.reshape(rows.shape)
        return ops.JacobianMatchingFunction.apply(rows, teacher_rows, code, ops.REDUCTION_SCALED_SUM, 1e-12,
                                                  1.0 / student.shape[0], backend, False)
    return loss


COPY = "copy"  # the floor's reference, timed in turns with the providers (not one of them)


def _copy_call(numel: int, dtype, device, sources: int):
    """(call, bytes per call) of a plain copy (read + write) of ``numel`` elements from
    ``sources`` rotating buffers into one destination (which, like the loss's gradient
    buffer, a caching allocator hands out again and again)."""
    srcs = [torch.randn(numel, device=device).to(dtype) for _ in range(sources)]
    dst = torch.empty(numel, device=device, dtype=dtype)
    return (lambda i: dst.copy_(srcs[i % sources])), 2 * numel * dst.element_size()


def run(sizes: Iterable[tuple[int, int]], device: torch.device, *, kinds=("normalized",), dtypes=("float32",),
        modes=("fwd+bwd",), progress=None, budget: Optional[TimeBudget] = None) -> list[dict]:
    """Rows of every (kind, dtype, size, mode, provider); stops early when ``budget`` expires."""
    rows_out = []
    for dtype_name in dtypes:  # dtype outermost: a run cut short by its budget has whole dtypes
        dtype = DTYPES[dtype_name]
        for kind in kinds:
            for rows, dim in sizes:
                if budget is not None and budget.expired():
                    return rows_out
                torch._dynamo.reset()  # a fresh compile per shape: no recompile limits, no stale guards
                funcs = providers(device, kind)
                itemsize = torch.empty((), dtype=dtype).element_size()
                sets = rotation_count(2 * rows * dim * itemsize, device)
                pairs = [(torch.randn(rows, 1, dim, device=device).to(dtype),
                          None if kind == "norm" else torch.randn(rows, 1, dim, device=device).to(dtype))
                         for _ in range(sets)]
                # as many source bytes as the inputs rotate through: the copy reads from memory too
                copy, copy_bytes = _copy_call(rows * dim, dtype, device, 2 * sets)
                errors = _errors(funcs, pairs[0], kind)
                for mode in modes:
                    moved = PASSES[mode][kind == "norm"] * rows * dim * itemsize
                    calls = {name: _calls(fn, pairs, mode) for name, fn in funcs.items()
                             if mode == "fwd+bwd" or not name.endswith("-unfused")}  # fwd, bwd: the same kernels
                    # the copy takes its turns with the providers, so load drift reaches the floor too
                    timings = measure_blocks({**{n: c for n, (c, _) in calls.items()}, COPY: copy}, device,
                                             setups={n: s for n, (_, s) in calls.items() if s},
                                             **BLOCK_TIMING[device.type])
                    copy_bw = copy_bytes / timings.pop(COPY).median
                    peaks = {n: peak_bytes(c, s(0) if s else 0, device) for n, (c, s) in calls.items()}
                    others = [t.median for n, t in timings.items() if not n.startswith("jacfast-")]
                    for name, timing in timings.items():
                        peak = peaks[name]
                        row = {
                            "op": "loss_head", "kind": kind, "dtype": dtype_name, "mode": mode, "rows": rows, "dim": dim,
                            "provider": name, **{f"{k}_ms": v * 1e3 for k, v in timing.as_dict().items() if k != "repeats"},
                            "repeats": timing.repeats, "bytes": moved, "gbps": moved / timing.median / 1e9,
                            "copy_gbps": copy_bw / 1e9, "floor_ms": moved / copy_bw * 1e3,
                            "vs_floor": timing.median / (moved / copy_bw),
                            "speedup_vs_eager": timings["eager"].median / timing.median,
                            "speedup_vs_compile": timings["compile"].median / timing.median,
                            "speedup_vs_best_other": min(others) / timing.median,
                            "max_rel_err": errors.get(name), "peak_mb": peak / 2**20,
                        }
                        if name in ("jacfast-cuda", "jacfast-triton") and mode == "fwd+bwd":
                            row["kernel_path"] = _kernel_path(name[8:], rows, dim, dtype, kind, device)
                        elif name.endswith("-unfused"):
                            row["kernel_path"] = _KERNEL_PATHS[0]
                        rows_out.append(row)
                        if progress is not None:
                            progress(row)
    return rows_out


_KERNEL_PATHS = {0: "forward then backward", 1: "fused rows", 2: "fused split rows"}


def _kernel_path(backend: str, rows: int, dim: int, dtype: torch.dtype, kind: str, device) -> str:
    """Which kernels the GPU backend's forward_backward runs here (csrc/cuda/jacobian_matching.cu,
    fused_path in jacfast/kernels/triton_jacobian_matching/fused.py: the same codes)."""
    code = ("normalized", "squared", "norm").index(kind)
    if backend == "cuda":
        path = torch.ops.jacfast_cuda._fused_path(rows, dim, dtype, code)
    else:
        path = registry.kernels("triton", "jacobian_matching").fused_path(rows, dim, code, device)
    return _KERNEL_PATHS[path]


def _calls(fn, pairs, mode):
    """(call, setup or None) timing ``mode`` of the loss function ``fn`` (see timing.measure_blocks).

    bwd times the backward of a fresh forward, run untimed just before it.
    """
    sets = len(pairs)
    leaves = [(s.clone().requires_grad_(True), t) for s, t in pairs]
    if mode == "fwd":
        def call(i):
            with torch.no_grad():
                return fn(*pairs[i % sets])
        return call, None
    if mode == "bwd":
        def setup(i):
            s, t = leaves[i % sets]
            return fn(s, t), s
        return (lambda prepared: torch.autograd.grad(*prepared)), setup

    def call(i):
        s, t = leaves[i % sets]
        return torch.autograd.grad(fn(s, t), s)
    return call, None


def _errors(funcs, pair, kind) -> dict:
    """Largest of the loss and gradient relative errors of each provider against float64."""
    student, teacher = pair
    s64 = student.double().requires_grad_(True)
    ref = reference.jacobian_matching_loss(s64, None if teacher is None else teacher.double(), kind=kind)
    (ref_grad,) = torch.autograd.grad(ref, s64)
    errors = {}
    for name, fn in funcs.items():
        s = student.clone().requires_grad_(True)
        loss = fn(s, teacher)
        (grad,) = torch.autograd.grad(loss, s)
        errors[name] = max(_rel_err(loss.detach(), ref.detach()), _rel_err(grad, ref_grad))
    return errors
