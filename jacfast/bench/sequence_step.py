"""Benchmark of one distillation step of a transformer language model (issue 23's sequence row).

The models of ``python -m jacfast text``: a character-level causal teacher
(:class:`jacfast.models.TransformerLM`, width 96, depth 3), eval mode, parameters frozen,
and a student of width 32, depth 2 on the teacher's embedding table (``input_dim=96``), in
train mode; inputs ``inputs_embeds`` (B, L, 96) = the teacher's embeddings of random ids,
B = 16, L = 32, 97 characters. Loss: CE + KD (T = 2, T^2 factor, per position) + beta *
normalized Jacobian matching (beta = 1) of the teacher's top-k next characters at P random
positions per sequence (K' = P * k rows (B, K', L, 96)); AdamW. Providers, timed round-robin:

- ``kd-floor``: the plain KD step (teacher under no_grad).
- ``naive-loop``: what a user writes by hand: teacher and student forwards on embeddings that
  require grad, then per row one ``autograd.grad`` for the teacher (``create_graph=True``,
  rows detached afterwards) and one for the student (``create_graph=True``), the eager
  reference loss, KD and CE. It needs the student's attention twice differentiable: the
  student runs ``attention="math"`` (matmuls and a softmax; SDPA's fused kernels have no
  double backward).
- ``jacfast-exact``: ``DistillationLoss(estimator="exact")`` on the same math-attention student.
- ``jacfast-fd``: ``DistillationLoss(estimator="finite_difference")`` (central, 2K' perturbed
  forwards) on the student with ``F.scaled_dot_product_attention`` (same weights).
- ``jacfast-fd-forward``: the same with ``fd_scheme="forward"`` (K' perturbed forwards).

All losses select the same positions (one ``select.sample(P, seed=0)`` draw per step, the
naive loop drawing them from an identical sampler). Rows have the fields of
:mod:`jacfast.bench.training_step` (``k`` = K'), plus ``op="sequence_step"``, ``positions``
and ``k_per_position``; peak memory as there (:func:`jacfast.bench.timing.peak_bytes`).
"""
from __future__ import annotations

import copy
import time
import warnings

import torch
import torch.nn.functional as F

from jacfast import reference
from jacfast.bench.selection import _sync, _timing_fields, timing_for
from jacfast.bench.timing import TimeBudget, measure_interleaved, paired_ratio, paired_ratio_interval, peak_bytes
from jacfast.losses import DistillationLoss
from jacfast.models import TransformerLM
from jacfast.selection import select

SETUPS = {  # rows: (positions P, top-k per position)
    "quick": {"batch": 16, "length": 32, "vocab": 97, "teacher": (96, 3), "student": (32, 2), "rows": ((4, 1),)},
    "full": {"batch": 16, "length": 32, "vocab": 97, "teacher": (96, 3), "student": (32, 2), "rows": ((4, 1), (8, 2))},
    "smoke": {"batch": 2, "length": 6, "vocab": 11, "teacher": (8, 1), "student": (4, 1), "rows": ((2, 1),)},
}
PROVIDERS = ("kd-floor", "naive-loop", "jacfast-exact", "jacfast-fd", "jacfast-fd-forward")
BETA, TEMPERATURE, LR, HEADS = 1.0, 2.0, 1e-3, 2


def _kd(s_logits, t_logits, y):
    """CE + KD (T^2 factor) over every position: (B, L, V) logits flattened to (B * L, V)."""
    T = TEMPERATURE
    s, t = s_logits.flatten(0, 1), t_logits.flatten(0, 1)
    kd = F.kl_div(F.log_softmax(s / T, 1), F.log_softmax(t / T, 1), reduction="batchmean", log_target=True) * T * T
    return F.cross_entropy(s, y.flatten()) + kd


def naive_loss(student, teacher, e, y, pos, k):
    """The per-row loop by hand; pos (B, P) the selected positions."""
    e = e.detach().requires_grad_(True)
    t_logits = teacher(inputs_embeds=e).logits
    s_logits = student(inputs_embeds=e).logits
    B, P = pos.shape
    t_at = t_logits.detach().gather(1, pos[:, :, None].expand(B, P, t_logits.shape[2]))
    idx = torch.sort(t_at, dim=2, descending=True, stable=True).indices[:, :, :k]  # (B, P, k)
    b = torch.arange(B)
    t_rows, s_rows = [], []
    for p in range(P):
        for j in range(k):
            (t_row,) = torch.autograd.grad(t_logits[b, pos[:, p], idx[:, p, j]].sum(), e, create_graph=True,
                                           retain_graph=True)
            (s_row,) = torch.autograd.grad(s_logits[b, pos[:, p], idx[:, p, j]].sum(), e, create_graph=True,
                                           retain_graph=True)
            t_rows.append(t_row.detach())
            s_rows.append(s_row)
    jac = reference.jacobian_matching_loss(torch.stack(s_rows, 1), torch.stack(t_rows, 1), kind="normalized")
    return _kd(s_logits, t_logits.detach(), y) + BETA * jac


def _step_fn(name, student, teacher, data, positions, k):
    """fn(i): one AdamW step of provider ``name`` on rotated batch i; returns the loss value."""
    es, ys = data
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=LR)
    est = {"jacfast-exact": "exact", "jacfast-fd": "finite_difference",
           "jacfast-fd-forward": "finite_difference"}.get(name)
    sampler = select.sample(positions, seed=0)
    loss_fn = None
    if est:
        loss_fn = DistillationLoss(teacher, k=k, beta=BETA, temperature=TEMPERATURE, estimator=est,
                                   fd_scheme="forward" if name == "jacfast-fd-forward" else "central",
                                   outputs="logits", inputs="inputs_embeds", positions=sampler)

    def step(i):
        e, y = es[i % len(es)], ys[i % len(ys)]
        if name == "kd-floor":
            with torch.no_grad():
                t_logits = teacher(inputs_embeds=e).logits
            loss = _kd(student(inputs_embeds=e).logits, t_logits, y)
        elif name == "naive-loop":
            pos, _ = sampler.draw().resolve(e.shape[0], e.shape[1], e.device)
            loss = naive_loss(student, teacher, e, y, pos, k)
        else:
            loss = loss_fn(student, {"inputs_embeds": e}, y).total
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.detach()
    return step


def run(suite: str, device: torch.device, *, progress=None, budget: TimeBudget | None = None) -> list[dict]:
    setup, timing = SETUPS[suite], timing_for(suite, device)
    B, L, V = setup["batch"], setup["length"], setup["vocab"]
    (tw, td), (sw, sd) = setup["teacher"], setup["student"]
    rows_out = []
    for positions, k in setup["rows"]:
        if budget is not None and budget.expired():
            break
        torch.manual_seed(0)
        teacher = TransformerLM(V, tw, td, HEADS, L).to(device).eval().requires_grad_(False)
        math_student = TransformerLM(V, sw, sd, HEADS, L, attention="math", input_dim=tw).to(device).train()
        math_student.embed.requires_grad_(False)
        sdpa_student = TransformerLM(V, sw, sd, HEADS, L, input_dim=tw).to(device).train()
        sdpa_student.load_state_dict(math_student.state_dict())
        sdpa_student.embed.requires_grad_(False)
        sets = 4
        with torch.no_grad():
            es = [teacher.embed(torch.randint(0, V, (B, L), device=device)) for _ in range(sets)]
        ys = [torch.randint(0, V, (B, L), device=device) for _ in range(sets)]
        students = {name: copy.deepcopy(sdpa_student if name.startswith("jacfast-fd") or name == "kd-floor"
                                        else math_student) for name in PROVIDERS}
        steps, first = {}, {}
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="estimator='finite_difference' on a network")
            for name in PROVIDERS:
                steps[name] = _step_fn(name, students[name], teacher, (es, ys), positions, k)
                _sync(device)
                t0 = time.perf_counter()
                first[name] = (float(steps[name](0)), time.perf_counter() - t0)
            raw: dict = {}
            timings = measure_interleaved(steps, device, raw=raw, **{**timing, "warmup": max(0, timing["warmup"] - 1)})
            peaks = {}
            for name in PROVIDERS:
                try:
                    peaks[name] = peak_bytes(steps[name], 1, device)
                except Exception as exc:  # noqa: BLE001  (no memory figure rather than no timing)
                    warnings.warn(f"peak memory of {name} not measured: {exc}")
                    peaks[name] = None
        naive, floor = timings["naive-loop"].median, timings["kd-floor"].median
        naive_loss_value, naive_peak = first["naive-loop"][0], peaks["naive-loop"]
        for name in PROVIDERS:
            t, peak = timings[name], peaks[name]
            row = {"op": "sequence_step", "batch": B, "input": f"{L}x{tw} embeds", "student_width": sw,
                   "teacher_width": tw, "k": positions * k, "positions": positions, "k_per_position": k,
                   "provider": name, **_timing_fields(t), "speedup_vs_naive": naive / t.median,
                   "speedup_vs_naive_paired": paired_ratio(raw, "naive-loop", name),
                   "speedup_vs_naive_paired_ci95": list(paired_ratio_interval(raw, "naive-loop", name)),
                   "vs_floor": t.median / floor, "peak_mb": None if peak is None else peak / 2**20,
                   "memory_vs_naive": None if peak is None or not naive_peak else peak / naive_peak,
                   "memory_method": "cuda max_memory_allocated" if device.type == "cuda" else
                   "torch.profiler CPU allocator events",
                   "first_step_ms": first[name][1] * 1e3, "first_loss": first[name][0],
                   "loss_rel_diff_vs_naive": (None if name == "kd-floor" else
                                              abs(first[name][0] - naive_loss_value) / abs(naive_loss_value)),
                   "student_attention": "math" if name in ("naive-loop", "jacfast-exact") else "sdpa",
                   "auto_strategies": None, "cache_build_ms": None}
            rows_out.append(row)
            if progress is not None:
                progress(row)
    return rows_out
