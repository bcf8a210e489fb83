"""``python -m jacfast bench``: time every available backend against eager autograd, torch.compile,
a public re-implementation and the memory-pass floor (loss_head); the top-k seeds op and the
input-Jacobian strategies (selection); one distillation training step against the naive
per-class loop and a plain KD step (training_step). Writes tables and one JSON result file
per benchmark."""
from __future__ import annotations

import json
import os
import time
from typing import Optional

import torch

from jacfast.bench import loss_head, selection, training_step
from jacfast.bench.report import slug
from jacfast.bench.timing import SYSTEM_ALLOCATOR, TimeBudget, environment, keep_freed_memory

DEFAULT_OUT = os.path.join("benchmarks", "results")
BENCHMARKS = ("loss_head", "selection", "training_step")


def register(subparsers) -> None:
    parser = subparsers.add_parser("bench", help="benchmark the kernels, selection and a training step (tables + JSON under --out)", description=__doc__)
    parser.add_argument("--suite", choices=("quick", "full", "smoke"), default="quick",
                        help="quick: the two issue sizes (default); full: the whole sweep; smoke: tiny sizes for CI")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--kinds", nargs="+", default=None, choices=("normalized", "squared", "norm"),
                        help="loss kinds (quick: normalized; full: all three)")
    parser.add_argument("--dtypes", nargs="+", default=None, choices=tuple(loss_head.DTYPES),
                        help="input dtypes (quick: float32; full: float32 bfloat16 float16)")
    parser.add_argument("--modes", nargs="+", default=None, choices=tuple(loss_head.PASSES),
                        help="what to time (quick: fwd+bwd; full and smoke: fwd bwd fwd+bwd)")
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"folder for the JSON results (default {DEFAULT_OUT})")
    parser.add_argument("--only", nargs="+", choices=BENCHMARKS, default=None, metavar="BENCHMARK",
                        help=f"run only these benchmarks, in this order, of {', '.join(BENCHMARKS)} (default: all, "
                        "in that order)")
    parser.add_argument("--allocator", choices=("keep", "system"), default="keep",
                        help="CPU runs: 'keep' (default) makes glibc keep freed blocks < 32 MiB for reuse, so "
                        "timings do not depend on page faults of fresh allocations; 'system' leaves the allocator "
                        "as it is, as in a training script that does not tune it")
    parser.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                        help="stop starting new configurations once SECONDS have passed since the command started "
                        "(for a lent device); what was measured is written, the file marked incomplete")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads for CPU runs (default: torch's); on a shared, loaded machine "
                        "1 avoids OpenMP barrier stalls; the thread count is part of the recorded device name")
    parser.set_defaults(run=run)


def _table(rows: list[dict]) -> str:
    head = ("| kind | dtype | mode | R | D | provider | median ms | GB/s | x floor | x eager | x compile | peak MB | rel err |\n"
            "|---|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    lines = [head]
    for r in rows:
        err = "" if r["max_rel_err"] is None else f"{r['max_rel_err']:.1e}"
        lines.append(f"| {r['kind']} | {r['dtype']} | {r['mode']} | {r['rows']} | {r['dim']} | {r['provider']} | "
                     f"{r['median_ms']:.3f} | {r['gbps']:.1f} | {r['vs_floor']:.2f} | {r['speedup_vs_eager']:.2f} | "
                     f"{r['speedup_vs_compile']:.2f} | {r['peak_mb']:.1f} | {err} |")
    return "\n".join(lines)


class ResultFile:
    """One benchmark's JSON result file, rewritten (atomically) as rows arrive.

    Rows are written at most every ``every`` seconds while the benchmark runs, with
    ``"complete": false``, so a run killed at a device's time limit still leaves the rows
    it measured; ``finish`` writes them all and ``"complete"``: whether every configuration
    ran (``"stopped"`` says why not).
    """

    def __init__(self, out: str, benchmark: str, suite: str, env: dict, *, every: float = 5.0):
        os.makedirs(out, exist_ok=True)
        device = slug(env["device"])[:64]
        self.path = os.path.join(out, f"{benchmark}-{suite}-{device}-{env['timestamp'].replace(':', '')}.json")
        self.head = {"benchmark": benchmark, "suite": suite, "environment": env}
        self.rows: list[dict] = []
        self.every, self._written = every, time.monotonic()

    def add(self, row: dict) -> None:
        self.rows.append(row)
        if time.monotonic() - self._written >= self.every:
            self._write(complete=False, stopped="the run ended before the benchmark finished")

    def finish(self, stopped: Optional[str] = None) -> str:
        self._write(complete=stopped is None, stopped=stopped)
        return self.path

    def _write(self, *, complete: bool, stopped: Optional[str]) -> None:
        with open(self.path + ".tmp", "w") as handle:
            json.dump({**self.head, "complete": complete, "stopped": stopped, "rows": self.rows}, handle, indent=1)
        os.replace(self.path + ".tmp", self.path)
        self._written = time.monotonic()


def _finish(result: ResultFile, budget: TimeBudget) -> None:
    stopped = f"time budget of {budget.seconds:g} s reached" if budget.skipped else None
    print(f"\nwrote {result.finish(stopped)}" + (f" (incomplete: {stopped})" if stopped else ""))


def _run_loss_head(args, device, env, budget: TimeBudget) -> None:
    full = args.suite == "full"
    sizes = loss_head.SIZES["full-cuda" if full and device.type == "cuda" else args.suite]
    kinds = args.kinds or (["normalized", "squared", "norm"] if full else ["normalized"])
    dtypes = args.dtypes or (["float32", "bfloat16", "float16"] if full else ["float32"])
    modes = args.modes or (["fwd+bwd"] if args.suite == "quick" else ["fwd", "bwd", "fwd+bwd"])
    print(f"  the floor is the traffic of each mode at the copy bandwidth measured in this run\n", flush=True)
    result = ResultFile(args.out, "loss_head", args.suite, env)

    def progress(row):
        result.add(row)
        print(f"  {row['kind']:10s} {row['dtype']:8s} {row['mode']:7s} R={row['rows']:<5d} D={row['dim']:<7d} "
              f"{row['provider']:15s} {row['median_ms']:9.3f} ms  {row['gbps']:7.1f} GB/s  "
              f"x eager {row['speedup_vs_eager']:6.2f}  x compile {row['speedup_vs_compile']:5.2f}  "
              f"peak {row['peak_mb']:7.1f} MB", flush=True)

    rows = loss_head.run(sizes, device, kinds=kinds, dtypes=dtypes, modes=modes, progress=progress, budget=budget)
    print("\n" + _table(rows))
    _finish(result, budget)


def _run_selection(args, device, env, budget: TimeBudget) -> None:
    print("\nselection: top-k seeds vs torch.topk + scatter; input_jacobians strategies (auto warmed up)", flush=True)
    result = ResultFile(args.out, "selection", args.suite, env)

    def progress(row):
        result.add(row)
        if row["op"] == "topk_seeds":
            print(f"  topk_seeds B={row['batch']:<5d} C={row['classes']:<6d} K={row['k']:<3d} {row['provider']:20s} "
                  f"{row['median_ms']:9.4f} ms  x naive {row['speedup_vs_naive']:5.2f}", flush=True)
        elif row["median_ms"] is None:
            print(f"  input_jacobians K={row['k']:<3d} create_graph={row['create_graph']!s:5s} {row['strategy']:9s} "
                  f"raises: {row['error']}", flush=True)
        else:
            first = f"  (first call {row['auto_first_call_ms']:.1f} ms, picks {row['auto_choice']})" \
                if row["strategy"] == "auto" else ""
            print(f"  input_jacobians K={row['k']:<3d} create_graph={row['create_graph']!s:5s} {row['strategy']:9s} "
                  f"{row['median_ms']:9.3f} ms  / best fixed {row['vs_best_fixed']:5.3f} "
                  f"(paired {row['vs_best_fixed_paired']:5.3f}){first}", flush=True)

    rows = selection.run(args.suite, device, progress=progress, budget=budget)
    print("\n" + selection.topk_table(rows) + "\n\n" + selection.strategy_table(rows))
    _finish(result, budget)


def _run_training_step(args, device, env, budget: TimeBudget) -> None:
    print("\ntraining_step: distillation step (teacher 4x wider) vs the naive per-class loop and a KD step", flush=True)
    result = ResultFile(args.out, "training_step", args.suite, env)

    def progress(row):
        result.add(row)
        mb = "    n/a" if row["peak_mb"] is None else f"{row['peak_mb']:7.1f}"
        print(f"  K={row['k']:<3d} {row['provider']:14s} {row['median_ms']:9.1f} ms  x naive "
              f"{row['speedup_vs_naive']:5.2f} (paired {row['speedup_vs_naive_paired']:5.2f})  "
              f"x floor {row['vs_floor']:5.2f}  peak {mb} MB", flush=True)

    rows = training_step.run(args.suite, device, progress=progress, budget=budget)
    print("\n" + training_step.table(rows))
    _finish(result, budget)


def run(args) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU is visible to torch")
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    try:
        budget = TimeBudget(args.time_budget)
    except ValueError as exc:
        raise SystemExit(f"--time-budget: {exc}") from None
    if device.type == "cuda":
        allocator = "torch CUDA caching allocator"
    else:
        allocator = keep_freed_memory() if args.allocator == "keep" else SYSTEM_ALLOCATOR
    only = list(dict.fromkeys(args.only or BENCHMARKS))
    env = environment(device)
    print(f"jacfast bench: suite={args.suite} on {env['device']} (torch {env['torch']}, triton {env['triton']}; "
          f"allocator: {allocator})", flush=True)
    runners = {"loss_head": _run_loss_head, "selection": _run_selection, "training_step": _run_training_step}
    for name in only:
        if budget.expired():
            print(f"\n{name}: not started, the time budget of {budget.seconds:g} s is spent", flush=True)
            continue
        # each file: when its own benchmark started
        runners[name](args, device, {**environment(device), "allocator": allocator}, budget)
    return 0
