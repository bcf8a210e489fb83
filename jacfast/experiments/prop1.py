"""Proposition 1: squared-error distillation on noisy inputs vs. clean squared-error distillation
plus sigma^2 times squared Jacobian matching.

For inputs x + e, e ~ N(0, sigma^2 I):
    E_e ||f_s(x+e) - f_t(x+e)||^2 = ||f_s(x) - f_t(x)||^2 + sigma^2 ||J_s(x) - J_t(x)||_F^2 + O(sigma^4)
(J: the full (C, *input) input Jacobians). Two checks:

1. Training: at n examples per class and each sigma, ``sq-noise`` (CE + the noisy squared error)
   against ``sq+jac`` (CE + the clean squared error + sigma^2 * ||J_s - J_t||_F^2, no
   reweighting; the term from ``--jacobian-projections`` random projections, an unbiased estimate
   like the one noise draw per step of sq-noise, or exact with 0), with ``sq`` (CE + the clean
   squared error) as the reference; the same subsets
   and seeds for every method, paired differences with 95% paired-t intervals.
2. Monte-Carlo at trained pairs (the teacher and each seed's ``sq`` student): per test image,
   LHS = mean over noise draws of ||D(x+e)||^2 - ||D(x)||^2 (D = f_s - f_t; antithetic pairs e,
   -e, an unbiased estimate of the same expectation) and RHS = sigma^2 ||J_s(x) - J_t(x)||_F^2,
   each with its standard error over (student, image) units, and the paired difference LHS - RHS.
"""
from __future__ import annotations

import math
import os
import statistics

import torch

from jacfast import data as D
from jacfast.experiments import common as C
from jacfast.experiments import distill as dist
from jacfast.experiments.stats import mean_ci
from jacfast.models import build_model

DISTILL_TEACHER = os.path.join("experiments", "distill", "teacher.pt")


def _tag(method: str, sigma: float) -> str:
    return method if method == "sq" else f"{method}@{sigma:g}"


@torch.no_grad()
def _squared_gaps(teacher, student, x, sigma, pairs, generator):
    """Per image: (mean over 2*pairs antithetic draws of ||D(x+e)||^2) - ||D(x)||^2, D = student - teacher."""
    def gap(z):
        return (student(z).double() - teacher(z).double()).pow(2).sum(1)

    clean = gap(x)
    acc = torch.zeros_like(clean)
    for _ in range(pairs):
        e = sigma * torch.randn(x.shape, generator=generator, dtype=x.dtype)
        acc += gap(x + e) + gap(x - e)
    return acc / (2 * pairs) - clean


def monte_carlo(teacher, student, x, sigmas, pairs, seed=0) -> dict:
    """{sigma: (lhs (N,), rhs (N,))} float64 per image, see the module docstring."""
    from jacfast.jacobians import input_jacobians, select

    _, j_t, _ = input_jacobians(teacher, x, select.all())
    _, j_s, _ = input_jacobians(student, x, select.all())
    frob = (j_s.double() - j_t.double()).pow(2).flatten(1).sum(1)  # ||J_s - J_t||_F^2 per image
    out = {}
    for sigma in sigmas:
        g = torch.Generator().manual_seed(seed)
        out[sigma] = (_squared_gaps(teacher, student, x, sigma, pairs, g), sigma ** 2 * frob)
    return out


def run(args) -> int:
    C.setup(args)
    train, test = C.fashion(args)
    if args.teacher is None and os.path.exists(DISTILL_TEACHER) and not args.tiny:
        args.teacher = DISTILL_TEACHER
    teacher, t_acc = C.teacher(args, train, test)
    n = 2 if args.tiny else args.n
    steps = 4 if args.tiny else args.steps
    sigmas = sorted(args.sigmas)
    results = []
    for sigma in sigmas:
        methods = ["sq-noise", "sq+jac"] + (["sq"] if sigma == sigmas[0] else [])
        for r in dist.train_runs(args, teacher, train, test, [(n, methods)], steps,
                                 tag=lambda m, s=sigma: _tag(m, s), sigma=sigma):
            results.append({**r, "sigma": None if r["method"] == "sq" else sigma,
                            "base_method": r["method"].split("@")[0]})
    acc = {(r["method"], r["seed"]): r["test_acc"] for r in results}
    summ = C.summary(results, lambda r: r["method"])
    training = []
    for sigma in sigmas:
        noise, jac = _tag("sq-noise", sigma), _tag("sq+jac", sigma)
        row = {"sigma": sigma, "sq-noise": summ[noise], "sq+jac": summ[jac]}
        for name, a, b in (("sq-noise - sq+jac", noise, jac), ("sq-noise - sq", noise, "sq"), ("sq+jac - sq", jac, "sq")):
            row[name] = mean_ci([acc[(a, s)] - acc[(b, s)] for s in args.seeds])
        training.append(row)

    # Monte-Carlo at the trained (teacher, sq student) pairs
    xm, _ = D.subset_per_class(*test, 2 if args.tiny else args.mc_images_per_class, seed=0)
    per_sigma = {s: ([], []) for s in sigmas}
    for seed in args.seeds:
        ckpt = torch.load(os.path.join(args.out, "runs", f"sq_n{n}_s{seed}", "checkpoint.pt"), map_location="cpu",
                          weights_only=False)
        student = build_model("resnet", width=dist.student_width(args))
        student.load_state_dict(ckpt["model"])
        student.eval()
        for s, (lhs, rhs) in monte_carlo(teacher, student, xm, sigmas, 2 if args.tiny else args.mc_pairs,
                                         seed=seed).items():
            per_sigma[s][0].extend(lhs.tolist())
            per_sigma[s][1].extend(rhs.tolist())
    mc = []
    for s in sigmas:
        lhs, rhs = per_sigma[s]
        m_l, m_r = statistics.fmean(lhs), statistics.fmean(rhs)
        mc.append({"sigma": s, "units": len(lhs), "lhs_mean": m_l, "lhs_se": statistics.stdev(lhs) / math.sqrt(len(lhs)),
                   "rhs_mean": m_r, "rhs_se": statistics.stdev(rhs) / math.sqrt(len(rhs)),
                   "lhs_minus_rhs": mean_ci([a - b for a, b in zip(lhs, rhs)]), "ratio_of_means": m_l / m_r})
    md = [_training_table(training, summ, args.jacobian_projections) + f" Teacher: {100 * t_acc:.2f}%.", _mc_table(mc, len(args.seeds), len(xm))]
    C.write(args, "prop1", {"teacher_test_acc": t_acc, "n": n, "runs": results,
                            "summary": [{"method": m, **s} for m, s in summ.items()], "training": training,
                            "monte_carlo": mc},
            "\n\n".join(md), {"prop1_training": lambda ax: _plot_training(ax, training, summ),
                              "prop1_monte_carlo": lambda ax: _plot_mc(ax, mc)})
    return 0


def _training_table(training, summ, k) -> str:
    from jacfast.experiments.stats import fmt

    lines = ["| sigma | sq-noise | sq+jac (beta = sigma^2) | sq-noise - sq+jac | sq-noise - sq | sq+jac - sq |",
             "|---:|---:|---:|---:|---:|---:|"]
    for r in training:
        lines.append(f"| {r['sigma']:g} | {C.pm(r['sq-noise'])} | {C.pm(r['sq+jac'])} | " + " | ".join(
            fmt(r[k]) for k in ("sq-noise - sq+jac", "sq-noise - sq", "sq+jac - sq")) + " |")
    return ("## Training: noisy squared-error distillation vs. clean + sigma^2 Jacobian matching\n\n"
            + "\n".join(lines) + f"\n\nTest accuracy in % (mean +- std over seeds); ||J_s - J_t||_F^2 of sq+jac: "
            + (f"{k} random Rademacher projection(s) per sample and step (unbiased)" if k else "all 10 outputs (exact)")
            + f"; sq (clean squared error, no "
            f"Jacobian term): {C.pm(summ['sq'])}. Differences: mean paired difference in points over the same "
            "subsets and seeds [95% CI, paired t].")


def _mc_table(mc, students, images) -> str:
    from jacfast.experiments.stats import fmt

    lines = ["| sigma | E||D(x+e)||^2 - ||D(x)||^2 | sigma^2 ||J_s - J_t||_F^2 | difference [95% CI] | ratio |",
             "|---:|---:|---:|---:|---:|"]
    for r in mc:
        lines.append(f"| {r['sigma']:g} | {r['lhs_mean']:.4g} +- {r['lhs_se']:.2g} | {r['rhs_mean']:.4g} +- "
                     f"{r['rhs_se']:.2g} | {fmt(r['lhs_minus_rhs'], scale=1.0, digits=4)} | {r['ratio_of_means']:.3f} |")
    return (f"## Monte-Carlo check at trained pairs\n\n" + "\n".join(lines) + f"\n\nD = f_s - f_t (logits, all "
            f"outputs), {students} (teacher, sq student) pairs x {images} test images; values: mean +- standard "
            "error over those units; difference: paired per unit, [95% CI, paired t]; ratio: LHS mean / RHS mean.")


def _plot_training(ax, training, summ):
    xs = [r["sigma"] for r in training]
    for k in ("sq-noise", "sq+jac"):
        ax.errorbar(xs, [100 * r[k]["mean"] for r in training], yerr=[100 * r[k]["std"] for r in training],
                    marker="o", capsize=3, label=k)
    ax.axhline(100 * summ["sq"]["mean"], color="k", ls=":", label="sq (no noise, no Jacobian)")
    ax.set_xscale("log")
    ax.minorticks_off()
    ax.set_xticks(xs, [f"{x:g}" for x in xs])
    ax.set_xlabel("sigma")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Proposition 1 in training")


def _plot_mc(ax, mc):
    xs = [r["sigma"] for r in mc]
    ax.errorbar(xs, [r["lhs_mean"] for r in mc], yerr=[1.96 * r["lhs_se"] for r in mc], marker="o", capsize=3,
                label="E||D(x+e)||^2 - ||D(x)||^2 (Monte-Carlo)")
    ax.errorbar(xs, [r["rhs_mean"] for r in mc], yerr=[1.96 * r["rhs_se"] for r in mc], marker="s", capsize=3,
                ls="--", label="sigma^2 ||J_s - J_t||_F^2")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("sigma")
    ax.set_ylabel("squared logit error increase")
    ax.set_title("Proposition 1, Monte-Carlo at trained pairs (95% intervals)")
