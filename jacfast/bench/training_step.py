"""Benchmark of one end-to-end step of Jacobian-matching distillation (issues 3 and 5).

Teacher: :func:`jacfast.bench.selection.small_cnn` 4x wider than the student, eval mode,
parameters frozen; student in train mode (BatchNorm batch statistics); inputs 3x32x32,
B = 64, 10 classes; K = the teacher's top-K outputs; SGD with momentum. Loss:
CE + KD (T = 4, T^2 factor) + beta * normalized Jacobian matching (beta = 1). Providers,
each with its own copy of the same initial student and optimizer, timed round-robin:

- ``kd-floor``: the plain KD step (CE + KD, teacher under no_grad): the floor.
- ``naive-loop``: what public code writes: teacher and student forwards on an x that
  requires grad, then per selected class one ``autograd.grad`` for the teacher (with
  ``create_graph=True``, its double-backward graph built for nothing, rows detached
  afterwards) and one for the student (``create_graph=True``), the eager reference loss
  (``jacfast.reference.jacobian_matching_loss``), KD and CE.
- ``jacfast-exact``: ``DistillationLoss(estimator="exact", strategy="auto")``.
- ``jacfast-fd``: ``DistillationLoss(estimator="finite_difference", strategy="auto")``
  (central differences: 2K perturbed forward and backward passes of the student).
- ``jacfast-fd-forward``: the same with ``fd_scheme="forward"`` (K passes; O(step) bias).
- ``jacfast-cache``: the exact estimator with the teacher's logits, indices and rows read
  from a :class:`jacfast.TeacherCache` built once beforehand over the rotated batches (a
  small fixed data set); its build time is reported as ``cache_build_ms``, not in the step.

``speedup_vs_naive_paired`` is the median over rounds of the naive loop's time over the
provider's in the same round, with a bootstrap 95% interval (``..._ci95``). The step
allocates and frees 100-260 MB, so its time depends on the CPU allocator: ``python -m
jacfast bench --allocator keep`` (default; glibc keeps freed blocks) or ``system`` (untuned,
every large tensor page-faults again each step); the result file records which.

Peak memory (``peak_mb``) is what one warm step allocates above what is already allocated
when it starts (parameters, inputs, momentum buffers): ``torch.cuda.max_memory_allocated``
on a GPU; on a CPU the allocations and frees of the torch CPU allocator recorded by
``torch.profiler`` (``profile_memory=True``) over one step, replayed in time order. The
teacher cache's batch is read into numpy-owned memory the CPU allocator never sees; its
bytes are added, since they live for the whole step.
"""
from __future__ import annotations

import copy
import os
import tempfile
import time
import warnings

import torch
import torch.nn.functional as F

from jacfast import reference
from jacfast.bench.selection import _sync, _timing_fields, small_cnn, timing_for
from jacfast.bench.timing import (TimeBudget, device_name, measure_interleaved, paired_ratio, paired_ratio_interval, peak_bytes,
                                  rotation_count)
from jacfast.fast_rows import layout_cache
from jacfast.jacobians import strategy_cache
from jacfast.losses import DistillationLoss
from jacfast.teacher_cache import TeacherCache

SETUPS = {
    "quick": {"batch": 64, "shape": (3, 32, 32), "width": 16, "ks": (1, 5), "classes": 10},
    "full": {"batch": 64, "shape": (3, 32, 32), "width": 16, "ks": (1, 5), "classes": 10},
    "smoke": {"batch": 4, "shape": (3, 8, 8), "width": 2, "ks": (2,), "classes": 10},
}
TEACHER_WIDTH = 4  # teacher width / student width
PROVIDERS = ("kd-floor", "naive-loop", "jacfast-exact", "jacfast-fd", "jacfast-fd-forward", "jacfast-cache",
             "jacfast-proj1", "jacfast-every4")
# Estimators of another loss (one random projection; the term every 4th step at 4x beta): their
# gradient error is reported, their loss is not the naive loop's.
OTHER_LOSS = ("kd-floor", "jacfast-proj1", "jacfast-every4")
BETA, TEMPERATURE, LR = 1.0, 4.0, 0.01


def _kd(s_logits, t_logits, y):
    """CE + KD with the T^2 factor (the same terms as DistillationLoss with unit weights)."""
    T = TEMPERATURE
    kd = F.kl_div(F.log_softmax(s_logits / T, 1), F.log_softmax(t_logits / T, 1), reduction="batchmean",
                  log_target=True) * (T * T)
    return F.cross_entropy(s_logits, y) + kd


def naive_loss(student, teacher, x, y, k):
    """The per-class loop of public re-implementations (see the module docstring)."""
    x = x.detach().requires_grad_(True)
    t_logits, s_logits = teacher(x), student(x)
    idx = t_logits.detach().topk(k, dim=1).indices
    t_rows, s_rows = [], []
    for j in range(k):
        (t_row,) = torch.autograd.grad(t_logits.gather(1, idx[:, j:j + 1]).sum(), x, create_graph=True,
                                       retain_graph=True)
        (s_row,) = torch.autograd.grad(s_logits.gather(1, idx[:, j:j + 1]).sum(), x, create_graph=True,
                                       retain_graph=True)
        t_rows.append(t_row.detach())
        s_rows.append(s_row)
    jac = reference.jacobian_matching_loss(torch.stack(s_rows, 1), torch.stack(t_rows, 1), kind="normalized")
    return _kd(s_logits, t_logits.detach(), y) + BETA * jac


EVERY = 4  # the every-n-th-step provider's n


def projected_loss(student, teacher, x, y, projections: int, generator: torch.Generator):
    """CE + KD + beta * normalized matching of ``projections`` random Rademacher projections
    v^T J of the teacher's and the student's Jacobians, the same v for both (two generators
    seeded alike); cost independent of K."""
    from jacfast.fast_rows import fast_input_jacobians
    from jacfast.jacobians import select
    from jacfast.loss import jacobian_matching_loss

    seed = int(torch.randint(0, 2**62, (1,), generator=generator))

    def probe():
        return select.projections(projections, generator=torch.Generator(x.device).manual_seed(seed))
    t_logits, t_jac, _ = fast_input_jacobians(teacher, x, probe())
    s_logits, s_jac, _ = fast_input_jacobians(student, x, probe(), create_graph=True)
    jac = jacobian_matching_loss(s_jac, t_jac.to(s_jac.dtype), kind="normalized", weight=BETA)
    return _kd(s_logits, t_logits, y) + jac


def _loss_fn(name, student, teacher, data, k, cache=None):
    """loss(i): provider ``name``'s differentiable step loss on rotated batch i, and a dict
    ``extra`` whose "bytes" are the numpy-owned bytes of the last cache lookup."""
    xs, ys = data
    sets = len(xs)
    est = {"jacfast-exact": "exact", "jacfast-fd": "finite_difference", "jacfast-fd-forward": "finite_difference",
           "jacfast-cache": "exact", f"jacfast-every{EVERY}": "exact"}.get(name)
    scheme = "forward" if name == "jacfast-fd-forward" else "central"
    loss_fn = DistillationLoss(teacher, k=k, beta=BETA, temperature=TEMPERATURE, estimator=est, fd_scheme=scheme,
                               strategy="auto") if est else None
    # every-n: beta * n on every n-th step, plain KD between: the gradient averaged over n steps is the exact one
    sparse = DistillationLoss(teacher, k=k, beta=BETA * EVERY, temperature=TEMPERATURE, strategy="auto")
    kd_only = DistillationLoss(teacher, k=k, beta=0.0, temperature=TEMPERATURE)
    gen = torch.Generator(device=xs[0].device).manual_seed(0)
    batch = xs[0].shape[0]
    extra = {"bytes": 0}

    def loss(i):
        x, y = xs[i % sets], ys[i % sets]
        if name == "kd-floor":
            with torch.no_grad():
                t_logits = teacher(x)
            return _kd(student(x), t_logits, y)
        if name == "naive-loop":
            return naive_loss(student, teacher, x, y, k)
        if name == "jacfast-cache":
            start = (i % sets) * batch
            t = cache[torch.arange(start, start + batch)]  # what a loader over WithIndices gives
            extra["bytes"] = sum(v.nbytes for v in t if v is not None) if x.device.type == "cpu" else 0
            return loss_fn(student, x, y, teacher_outputs=t).total
        if name == "jacfast-proj1":
            return projected_loss(student, teacher, x, y, 1, gen)
        if name == f"jacfast-every{EVERY}":
            return (sparse if i % EVERY == 0 else kd_only)(student, x, y).total
        return loss_fn(student, x, y).total
    return loss, extra


def _step_fn(name, student, teacher, data, k, cache=None):
    """fn(i): one SGD step of provider ``name`` on rotated batch i; returns the loss value."""
    opt = torch.optim.SGD(student.parameters(), lr=LR, momentum=0.9)
    loss_fn, extra = _loss_fn(name, student, teacher, data, k, cache)

    def step(i):
        loss = loss_fn(i)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.detach()
    return step, extra


def _flat_grad(student) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).double()
                      for p in student.parameters()])


def gradient_errors(base_student, teacher, data, k, cache=None) -> dict:
    """{provider: ||g - g64|| / ||g64||}: each provider's parameter gradient of its step loss on
    batch 0 (fresh copy of the initial student) against the float64 exact gradient of the
    naive loop's loss on the same batch and weights. every-n: the RMS over the n steps of a
    cycle (same weights, batch 0), each step's own gradient against the exact one."""
    xs, ys = data
    s64, t64 = copy.deepcopy(base_student).double(), copy.deepcopy(teacher).double()
    naive_loss(s64, t64, xs[0].double(), ys[0], k).backward()
    ref = _flat_grad(s64)
    out = {}
    for name in PROVIDERS:
        errs = []
        for step in range(EVERY if name == f"jacfast-every{EVERY}" else 1):
            student = copy.deepcopy(base_student)
            loss_fn, _ = _loss_fn(name, student, teacher, ([xs[0]], [ys[0]]), k, cache)
            loss_fn(step).backward()
            errs.append(float((_flat_grad(student) - ref).norm() / ref.norm()))
        out[name] = (sum(e * e for e in errs) / len(errs)) ** 0.5
    return out


def run(suite: str, device: torch.device, *, progress=None, cache_dir: str | None = None,
        budget: TimeBudget | None = None) -> list[dict]:
    setup, timing = SETUPS[suite], timing_for(suite, device)
    batch, shape, width, classes = setup["batch"], tuple(setup["shape"]), setup["width"], setup["classes"]
    rows_out = []
    for k in setup["ks"]:
        if budget is not None and budget.expired():
            break
        torch.manual_seed(0)
        teacher = small_cnn(TEACHER_WIDTH * width, classes, shape[0]).to(device).eval().requires_grad_(False)
        base_student = small_cnn(width, classes, shape[0]).to(device).train()
        sets = rotation_count(batch * int(torch.Size(shape).numel()) * 4, device)
        xs = [torch.randn(batch, *shape, device=device) for _ in range(sets)]
        ys = [torch.randint(0, classes, (batch,), device=device) for _ in range(sets)]
        with tempfile.TemporaryDirectory(dir=cache_dir) as tmp, warnings.catch_warnings():
            # Timing only: the kink warning of the finite-difference estimator is about accuracy.
            warnings.filterwarnings("ignore", message="estimator='finite_difference' on a network")
            t0 = time.perf_counter()
            cache = TeacherCache.build(os.path.join(tmp, "teacher.cache"), teacher, (torch.cat(xs).cpu(),
                                       torch.cat(ys).cpu()), select="topk", k=k, batch_size=batch, device=device,
                                       progress=False)
            cache_build = time.perf_counter() - t0
            grad_err = gradient_errors(base_student, teacher, (xs, ys), k, cache)
            students = {name: copy.deepcopy(base_student) for name in PROVIDERS}
            steps, extras, first = {}, {}, {}
            for name in PROVIDERS:
                steps[name], extras[name] = _step_fn(name, students[name], teacher, (xs, ys), k, cache)
                _sync(device)
                t0 = time.perf_counter()
                # Every provider's first step sees the same weights and batch: the losses must agree.
                first[name] = (float(steps[name](0)), time.perf_counter() - t0)
            raw: dict = {}
            timings = measure_interleaved(steps, device, raw=raw, **{**timing, "warmup": max(0, timing["warmup"] - 1)})
            peaks = {}
            for name in PROVIDERS:  # after timing: every one-off cost (auto's trials) is behind
                try:
                    peaks[name] = peak_bytes(steps[name], 1, device) + extras[name]["bytes"]
                except Exception as exc:  # noqa: BLE001  (no memory figure rather than no timing)
                    warnings.warn(f"peak memory of {name} not measured: {exc}")
                    peaks[name] = None
            chosen = {role: sorted({f"{c.strategy}/{c.layout}" for c in layout_cache.choices(m).values()}
                                   | {c.strategy for c in strategy_cache.choices(m).values()})
                      for role, m in (("teacher", teacher), ("student", students["jacfast-exact"]))}
            del cache
        naive, floor = timings["naive-loop"].median, timings["kd-floor"].median
        naive_loss_value, naive_peak = first["naive-loop"][0], peaks["naive-loop"]
        strategies = f"teacher={','.join(chosen['teacher']) or '-'} student={','.join(chosen['student']) or '-'}"
        for name in PROVIDERS:
            t, peak = timings[name], peaks[name]
            row = {"op": "training_step", "device": device_name(device), "threads": torch.get_num_threads(),
                   "batch": batch, "input": "x".join(map(str, shape)), "student_width": width,
                   "teacher_width": TEACHER_WIDTH * width, "k": k, "provider": name, **_timing_fields(t),
                   "speedup_vs_naive": naive / t.median,
                   "speedup_vs_naive_paired": paired_ratio(raw, "naive-loop", name),
                   "speedup_vs_naive_paired_ci95": list(paired_ratio_interval(raw, "naive-loop", name)),
                   "vs_floor": t.median / floor,
                   "peak_mb": None if peak is None else peak / 2**20,
                   "memory_vs_naive": None if peak is None or not naive_peak else peak / naive_peak,
                   "memory_method": "cuda max_memory_allocated" if device.type == "cuda" else
                   "torch.profiler CPU allocator events",
                   "grad_rel_err": grad_err[name], "grad_reference": "float64 exact (naive loop's loss)",
                   "first_step_ms": first[name][1] * 1e3, "first_loss": first[name][0],
                   "loss_rel_diff_vs_naive": (None if name in OTHER_LOSS else
                                              abs(first[name][0] - naive_loss_value) / abs(naive_loss_value)),
                   "auto_strategies": strategies if name == "jacfast-exact" else None,
                   "cache_build_ms": cache_build * 1e3 if name == "jacfast-cache" else None}
            rows_out.append(row)
            if progress is not None:
                progress(row)
    from jacfast.bench import sequence_step  # the transformer language model's rows (issue 23)

    return rows_out + sequence_step.run(suite, device, progress=progress, budget=budget)


def table(rows: list[dict]) -> str:
    lines = ["| B | input | K | threads | provider | median ms | p20-p80 ms | x naive loop | same, paired by round [95% CI] "
             "| x KD floor | peak MB | memory / naive | grad rel. err |",
             "|---:|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        mb = "" if r["peak_mb"] is None else f"{r['peak_mb']:.1f}"
        mem = "" if r["memory_vs_naive"] is None else f"{r['memory_vs_naive']:.2f}"
        paired = "" if r.get("speedup_vs_naive_paired") is None else f"{r['speedup_vs_naive_paired']:.2f}"
        if r.get("speedup_vs_naive_paired_ci95"):
            lo, hi = r["speedup_vs_naive_paired_ci95"]
            paired += f" [{lo:.2f}, {hi:.2f}]"
        err = "" if r.get("grad_rel_err") is None else f"{r['grad_rel_err']:.1e}"
        lines.append(f"| {r['batch']} | {r['input']} | {r['k']} | {r.get('threads', '')} | {r['provider']} | "
                     f"{r['median_ms']:.1f} | {r['p20_ms']:.1f}-{r['p80_ms']:.1f} | {r['speedup_vs_naive']:.2f} | "
                     f"{paired} | {r['vs_floor']:.2f} | {mb} | {mem} | {err} |")
    return "\n".join(lines)
