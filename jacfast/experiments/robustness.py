"""(b) Robustness to input noise: a LeNet-style network trained on Fashion-MNIST with the
Jacobian-norm penalty, L2 weight decay, dropout or none; test accuracy under Gaussian input noise,
and the paired difference of each method against ``none`` (same subset and seed) at each sigma.
"""
from __future__ import annotations

import torch

from jacfast import data as D
from jacfast.experiments import common as C
from jacfast.models import build_model
from jacfast.trainers import SupervisedTrainer

METHODS = ("none", "jacobian", "l2", "dropout")
SIGMAS = (0.0, 0.1, 0.2, 0.3, 0.5)


def run(args) -> int:
    C.setup(args)
    train, test = C.fashion(args)
    per_class = 20 if args.tiny else args.train_size
    steps = 4 if args.tiny else args.steps
    sigmas = tuple(sorted({0.0, *args.sigmas}))
    results = []
    for seed in args.seeds:
        xs, ys = D.subset_per_class(*train, per_class, seed=seed)
        for method in args.methods:
            def make(run_dir, method=method, seed=seed, xs=xs, ys=ys):
                torch.manual_seed(seed)
                model = build_model("lenet", width=4 if args.tiny else 8,
                                    dropout=args.dropout if method == "dropout" else 0.0)
                return SupervisedTrainer(model, (xs, ys), seed=seed, config={"method": method},
                                         jacobian_weight=args.jacobian_weight if method == "jacobian" else 0.0,
                                         weight_decay=args.weight_decay if method == "l2" else 0.0,
                                         **C.trainer_kw(args, run_dir, steps))
            r = C.run_one(args, f"{method}_s{seed}", make, *test, sigmas=sigmas)
            results.append({**r, "method": method, "seed": seed})
    flat = [{"method": r["method"], "seed": r["seed"], "sigma": float(s), "acc": a}
            for r in results for s, a in r["acc_by_sigma"].items()]
    summ = C.summary(flat, lambda r: (r["method"], r["sigma"]), value="acc")
    paired = C.paired_by(flat, "none", "sigma", value="acc") if "none" in args.methods else {}
    md = C.table(args.methods, list(sigmas), summ, "method", "sigma")
    if paired:
        md += "\n\n## Paired differences against none\n\n" + C.paired_table(args.methods, list(sigmas), paired,
                                                                           "method", "sigma", "none")
    C.write(args, "robustness", {"runs": results,
                                 "summary": [{"method": m, "sigma": s, **v} for (m, s), v in summ.items()],
                                 "paired_vs_none": C.paired_list(paired, col_key="sigma")},
            md, {"robustness": lambda ax: (C.lines(ax, args.methods, list(sigmas), summ, "input noise sigma"),
                                           ax.set_title("Robustness to Gaussian input noise (Fashion-MNIST)"))})
    return 0
