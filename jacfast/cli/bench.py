"""``python -m jacfast bench``: time every available backend against eager autograd, torch.compile,
a public re-implementation and the memory-pass floor; write a table and a JSON result file."""
from __future__ import annotations

import json
import os
import re

import torch

from jacfast.bench import loss_head
from jacfast.bench.timing import environment

DEFAULT_OUT = os.path.join("benchmarks", "results")


def register(subparsers) -> None:
    parser = subparsers.add_parser("bench", help="benchmark the kernels (table + JSON under --out)", description=__doc__)
    parser.add_argument("--suite", choices=("quick", "full", "smoke"), default="quick",
                        help="quick: the two issue sizes (default); full: the whole sweep; smoke: tiny sizes for CI")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--kinds", nargs="+", default=None, choices=("normalized", "squared", "norm"),
                        help="loss kinds (quick: normalized; full: all three)")
    parser.add_argument("--dtypes", nargs="+", default=None, choices=tuple(loss_head.DTYPES),
                        help="input dtypes (quick: float32; full: float32 bfloat16, plus float16 on cuda)")
    parser.add_argument("--modes", nargs="+", default=None, choices=tuple(loss_head.PASSES),
                        help="what to time (quick: fwd+bwd; full: fwd bwd fwd+bwd)")
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"folder for the JSON result (default {DEFAULT_OUT})")
    parser.set_defaults(run=run)


def _table(rows: list[dict]) -> str:
    head = ("| kind | dtype | mode | R | D | provider | median ms | GB/s | x floor | x eager | x compile | rel err |\n"
            "|---|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|")
    lines = [head]
    for r in rows:
        err = "" if r["max_rel_err"] is None else f"{r['max_rel_err']:.1e}"
        lines.append(f"| {r['kind']} | {r['dtype']} | {r['mode']} | {r['rows']} | {r['dim']} | {r['provider']} | "
                     f"{r['median_ms']:.3f} | {r['gbps']:.1f} | {r['vs_floor']:.2f} | {r['speedup_vs_eager']:.2f} | "
                     f"{r['speedup_vs_compile']:.2f} | {err} |")
    return "\n".join(lines)


def run(args) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU is visible to torch")
    full = args.suite == "full"
    sizes = loss_head.SIZES["full-cuda" if full and device.type == "cuda" else args.suite]
    kinds = args.kinds or (["normalized", "squared", "norm"] if full else ["normalized"])
    dtypes = args.dtypes or ((["float32", "bfloat16"] + (["float16"] if device.type == "cuda" else [])) if full else ["float32"])
    modes = args.modes or (["fwd", "bwd", "fwd+bwd"] if full else ["fwd+bwd"])
    env = environment(device)
    print(f"jacfast bench: suite={args.suite} on {env['device']} (torch {env['torch']}, triton {env['triton']})", flush=True)
    print(f"  the floor is the traffic of each mode at the copy bandwidth measured in this run\n", flush=True)

    def progress(row):
        print(f"  {row['kind']:10s} {row['dtype']:8s} {row['mode']:7s} R={row['rows']:<5d} D={row['dim']:<7d} "
              f"{row['provider']:15s} {row['median_ms']:9.3f} ms  {row['gbps']:7.1f} GB/s  "
              f"x eager {row['speedup_vs_eager']:6.2f}  x compile {row['speedup_vs_compile']:5.2f}", flush=True)

    rows = loss_head.run(sizes, device, kinds=kinds, dtypes=dtypes, modes=modes, progress=progress)
    print("\n" + _table(rows))
    os.makedirs(args.out, exist_ok=True)
    slug = re.sub(r"[^a-z0-9]+", "-", env["device"].lower()).strip("-")[:40]
    path = os.path.join(args.out, f"loss_head-{args.suite}-{slug}-{env['timestamp'].replace(':', '')}.json")
    with open(path + ".tmp", "w") as handle:
        json.dump({"benchmark": "loss_head", "suite": args.suite, "environment": env, "rows": rows}, handle, indent=1)
    os.replace(path + ".tmp", path)
    print(f"\nwrote {path}")
    return 0
