"""Benchmark of input-Jacobian selection, all providers of a row measured in the same run:

(a) the fused top-k seeds op (every available jacfast backend) against what users write,
    ``torch.topk`` then ``zeros + scatter_`` into one-hot seeds (K, B, C);
(b) the strategies of :func:`jacfast.input_jacobians` (loop, batched, replicate, auto) for
    K rows on a small CNN, for teacher rows (``create_graph=False``, eval mode) and student
    rows (``create_graph=True``, train mode, timed with the double backward of a scalar of
    the rows to the parameters, as a training step runs it).

"auto" is warmed up first: its first call on a new key times the candidates, a one-off
cost reported as ``auto_first_call_ms``; the timed calls then run the cached choice, and
``vs_best_fixed`` is each strategy's median over the best fixed strategy's median.

Providers are timed round-robin (:func:`measure_interleaved`), so that a load change on a
shared machine hits them alike and their ratios stay meaningful.
"""
from __future__ import annotations

import math
import time
from typing import Optional

import torch
from torch import nn

from jacfast import registry
from jacfast.bench.timing import TimeBudget, Timing, measure_interleaved, paired_ratio, rotation_count
from jacfast.jacobians import STRATEGIES, input_jacobians, strategy_cache
from jacfast.ops.topk_seeds import topk_seeds
from jacfast.selection import select

# (B, C, K) of the top-k seeds op.
TOPK_SIZES = {
    "quick": [(64, 10, 1), (64, 10, 5), (256, 1000, 5), (64, 10000, 10)],
    "full": [(64, 10, 1), (64, 10, 5), (256, 10, 5), (256, 1000, 5), (1024, 1000, 10), (64, 10000, 10),
             (256, 10000, 10)],
    "smoke": [(4, 10, 1), (4, 10, 3)],
}
# The CNN of the strategy comparison: batch, input shape, width, the K values.
STRATEGY_SETUPS = {
    "quick": {"batch": 64, "shape": (3, 32, 32), "width": 16, "ks": (1, 5, 10)},
    "full": {"batch": 64, "shape": (3, 32, 32), "width": 16, "ks": (1, 5, 10)},
    "smoke": {"batch": 4, "shape": (3, 8, 8), "width": 2, "ks": (1, 2)},
}
# measure_interleaved settings per suite (smoke: just enough to exercise the code).
TIMING = {
    "quick": {"min_time": 0.5, "min_repeats": 20, "warmup": 2},  # 20: p20-p80 spans ~10% under load
    "full": {"min_time": 2.0, "min_repeats": 30, "warmup": 3},
    "smoke": {"min_time": 0.0, "min_repeats": 2, "warmup": 1},
}
# On a GPU, CUDA events time each call on the device, without the host's jitter: 0.5 s per
# provider (hundreds of calls at these sizes) keeps the full suite inside a device lease.
TIMING_CUDA = {**TIMING, "full": {"min_time": 0.5, "min_repeats": 30, "warmup": 3}}
NAIVE = "torch.topk+scatter"


def timing_for(suite: str, device: torch.device) -> dict:
    """measure_interleaved settings of ``suite`` on ``device`` (also used by the training step)."""
    return (TIMING_CUDA if device.type == "cuda" else TIMING)[suite]


def _timing_fields(timing: Timing) -> dict:
    return {**{f"{k}_ms": v * 1e3 for k, v in timing.as_dict().items() if k != "repeats"}, "repeats": timing.repeats}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def small_cnn(width: int, classes: int = 10, channels: int = 3) -> nn.Module:
    """Three conv + BatchNorm + ReLU blocks (widths w, 2w, 4w; two stride-2), pooled, linear."""
    w = width
    return nn.Sequential(
        nn.Conv2d(channels, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(),
        nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(),
        nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1), nn.BatchNorm2d(4 * w), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * w, classes),
    )


# ----------------------------------------------------------------------------- (a) top-k seeds
def naive_topk_seeds(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What public code writes: torch.topk, then one-hot seeds (K, B, C) by zeros + scatter_."""
    _, indices = torch.topk(logits, k, dim=1)
    seeds = torch.zeros((k, *logits.shape), dtype=logits.dtype, device=logits.device)
    seeds.scatter_(2, indices.t().unsqueeze(-1), 1)
    return indices, seeds


def topk_providers(device: torch.device) -> dict:
    """name -> fn(logits, k) for every jacfast backend that runs on ``device``, and the naive way."""
    found = {}
    for name in ("cuda", "triton", "cpu", "torch"):
        interpreted = name == "triton" and device.type == "cpu"  # the interpreter is for tests, not timing
        if registry.status_for(name, device.type).available and not interpreted:
            found[f"jacfast-{name}"] = lambda logits, k, _b=name: topk_seeds(logits, k, backend=_b)
    found[NAIVE] = naive_topk_seeds
    return found


def run_topk(sizes, device: torch.device, *, timing: dict, progress=None,
             budget: Optional[TimeBudget] = None) -> list[dict]:
    rows_out = []
    for batch, classes, k in sizes:
        if budget is not None and budget.expired():
            break
        funcs = topk_providers(device)
        sets = rotation_count(batch * classes * 4, device)
        inputs = [torch.randn(batch, classes, device=device) for _ in range(sets)]
        # Random normal logits have no ties, so every provider must pick the same outputs.
        ref_idx, ref_seeds = naive_topk_seeds(inputs[0], k)
        matches = {}
        for name, fn in funcs.items():
            idx, seeds = fn(inputs[0], k)
            matches[name] = bool(torch.equal(idx, ref_idx) and torch.equal(seeds, ref_seeds))
        timings = measure_interleaved({n: (lambda i, _f=f: _f(inputs[i % sets], k)) for n, f in funcs.items()},
                                      device, **timing)
        moved = batch * classes * 4 + k * batch * classes * 4 + batch * k * 8  # read logits, write seeds + indices
        for name, t in timings.items():
            row = {"op": "topk_seeds", "batch": batch, "classes": classes, "k": k, "dtype": "float32",
                   "provider": name, **_timing_fields(t), "bytes": moved, "gbps": moved / t.median / 1e9,
                   "speedup_vs_naive": timings[NAIVE].median / t.median, "matches_naive": matches[name]}
            rows_out.append(row)
            if progress is not None:
                progress(row)
    return rows_out


# ----------------------------------------------------------------------------- (b) strategies
def _jacobian_call(model, xs, k: int, create_graph: bool, strategy: str, params):
    sets = len(xs)

    def call(i):
        logits, jac, _ = input_jacobians(model, xs[i % sets], select.topk(k), create_graph=create_graph,
                                         strategy=strategy)
        if create_graph:  # what a training step does next; the same scalar auto times its trials with
            torch.autograd.grad(jac.square().sum() + logits.sum(), params)
        return jac
    return call


def run_strategies(setup: dict, device: torch.device, *, timing: dict, progress=None,
                   budget: Optional[TimeBudget] = None) -> list[dict]:
    batch, shape, width = setup["batch"], tuple(setup["shape"]), setup["width"]
    sets = rotation_count(batch * math.prod(shape) * 4, device)
    rows_out = []
    for k in setup["ks"]:
        for create_graph in (False, True):
            if budget is not None and budget.expired():
                return rows_out
            torch.manual_seed(0)
            # A fresh model per row: a new key for auto, so its first call really times the candidates.
            model = small_cnn(width, channels=shape[0]).to(device).train(create_graph)
            params = list(model.parameters())
            xs = [torch.randn(batch, *shape, device=device) for _ in range(sets)]
            fns, errors = {}, {}
            for name in STRATEGIES:
                fn = _jacobian_call(model, xs, k, create_graph, name, params)
                try:
                    fn(0)  # warms it up before auto's first call, so that call pays auto's own cost only
                    fns[name] = fn
                except Exception as exc:  # noqa: BLE001  (e.g. a missing vmap rule: reported, not timed)
                    errors[name] = f"{type(exc).__name__}: {exc}".splitlines()[0]
            auto = _jacobian_call(model, xs, k, create_graph, "auto", params)
            _sync(device)
            t0 = time.perf_counter()
            auto(0)
            _sync(device)
            first_call = time.perf_counter() - t0
            # the entry auto just made for this x shape, K and create_graph (its key also holds
            # the selection and call kinds, which the bench does not build itself)
            made = [c for key, c in strategy_cache.choices(model).items()
                    if key[1] == tuple(xs[0].shape) and key[2] == k and key[5] == bool(create_graph)]
            choice = made[-1] if made else None
            raw: dict = {}
            timings = measure_interleaved({**fns, "auto": auto}, device, raw=raw, **timing)
            best = min(fns, key=lambda n: timings[n].median) if fns else None
            common = {"op": "input_jacobians", "batch": batch, "input": "x".join(map(str, shape)), "width": width,
                      "k": k, "create_graph": create_graph, "mode": "train" if create_graph else "eval",
                      "best_fixed": best, "auto_choice": choice.strategy if choice else None}
            for name in (*STRATEGIES, "auto"):
                t = timings.get(name)
                row = {**common, "strategy": name,
                       **(_timing_fields(t) if t else dict.fromkeys(("median_ms", "p20_ms", "p80_ms"))),
                       "repeats": t.repeats if t else 0,
                       "vs_best_fixed": t.median / timings[best].median if t and best else None,
                       "vs_best_fixed_paired": paired_ratio(raw, name, best) if t and best else None,
                       "auto_first_call_ms": first_call * 1e3 if name == "auto" else None,
                       # auto's own trial timings (fastest of its rounds), None for a strategy that raised
                       "auto_trials_ms": ({n: (None if s is None else s * 1e3) for n, s in choice.timings.items()}
                                          if name == "auto" and choice else None),
                       "error": errors.get(name)}
                rows_out.append(row)
                if progress is not None:
                    progress(row)
    return rows_out


def run(suite: str, device: torch.device, *, progress=None, budget: Optional[TimeBudget] = None) -> list[dict]:
    timing = timing_for(suite, device)
    return (run_topk(TOPK_SIZES[suite], device, timing=timing, progress=progress, budget=budget)
            + run_strategies(STRATEGY_SETUPS[suite], device, timing=timing, progress=progress, budget=budget))


# ----------------------------------------------------------------------------- tables
def _ms(v) -> str:
    return "" if v is None else f"{v:.3f}"


def _ratio(v) -> str:
    return "" if v is None else f"{v:.3f}"


def topk_table(rows: list[dict]) -> str:
    lines = ["| B | C | K | provider | median ms | p20-p80 ms | GB/s | x torch.topk+scatter | same result |",
             "|---:|---:|---:|---|---:|---:|---:|---:|---|"]
    for r in rows:
        if r["op"] == "topk_seeds":
            lines.append(f"| {r['batch']} | {r['classes']} | {r['k']} | {r['provider']} | {r['median_ms']:.4f} | "
                         f"{r['p20_ms']:.4f}-{r['p80_ms']:.4f} | {r['gbps']:.2f} | {r['speedup_vs_naive']:.2f} | "
                         f"{'yes' if r['matches_naive'] else 'NO'} |")
    return "\n".join(lines)


def strategy_table(rows: list[dict]) -> str:
    """One line per (K, create_graph): each strategy's median, auto's pick and its ratio to the best."""
    lines = ["| B | input | K | create_graph | loop ms | batched ms | replicate ms | auto ms | auto picks | best fixed "
             "| auto / best fixed | same, paired by round | auto first call ms |",
             "|---:|---|---:|---|---:|---:|---:|---:|---|---|---:|---:|---:|"]
    groups: dict = {}
    for r in rows:
        if r["op"] == "input_jacobians":
            groups.setdefault((r["batch"], r["input"], r["k"], r["create_graph"]), {})[r["strategy"]] = r
    for (batch, shape, k, cg), by in groups.items():
        auto = by["auto"]
        cells = [_ms(by[s]["median_ms"]) if by.get(s) and not by[s]["error"] else "raises" for s in STRATEGIES]
        lines.append(f"| {batch} | {shape} | {k} | {cg} | {' | '.join(cells)} | {_ms(auto['median_ms'])} | "
                     f"{auto['auto_choice']} | {auto['best_fixed']} | {_ratio(auto['vs_best_fixed'])} | "
                     f"{_ratio(auto.get('vs_best_fixed_paired'))} | "
                     f"{auto['auto_first_call_ms']:.1f} |")
    return "\n".join(lines)
