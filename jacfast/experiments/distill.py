"""(a) Distillation with limited data, RQ5 (whose Jacobians to match, at what cost), and the losses
of Proposition 1's training comparison (used by :mod:`jacfast.experiments.prop1`).

A ResNet-style student learns from n Fashion-MNIST images per class (the same seeded subset for
every method at a given (n, seed)) with the methods of ``METHODS`` at every n, and the RQ5
selections ``RQ5_METHODS`` at one n. Results: test accuracy on the 10,000 test images, the paired
difference of each method against ``kd`` (same subset and seed), and for RQ5 the time per
training step of each method, measured interleaved in one process on one batch.
"""
from __future__ import annotations

import os
import statistics
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from jacfast import data as D
from jacfast.experiments import common as C
from jacfast.models import build_model

METHODS = ("ce", "kd", "kd+jac-norm", "kd+jac-norm-fd", "kd+jac-sq", "kd+jac-sq-fd")
# RQ5: squared Jacobian matching (beta-sq) of different outputs; kd+jac-sq is the teacher's top-1
RQ5_METHODS = ("kd+jac-sq-target", "kd+jac-sq", "kd+jac-sq-top5", "kd+jac-sq-all", "kd+jac-sq-proj1",
               "kd+jac-sq-proj4", "kd+jac-sq-noise")
PROP1_METHODS = ("sq", "sq-noise", "sq+jac")
ALL_METHODS = tuple(dict.fromkeys(METHODS + RQ5_METHODS + PROP1_METHODS))
_CACHE_SELECT = {"kd+jac-sq-target": ("target", 1), "kd+jac-sq-top5": ("topk", 5), "kd+jac-sq-all": ("all", 1),
                 "sq+jac": ("all", 1)}


class SquaredErrorDistillation(nn.Module):
    """Proposition 1's two sides as training losses (no reweighting), with CE on clean inputs.

    ``CE(S(x), y) + mean_b ||T(x_b + xi_b) - S(x_b + xi_b)||^2 + jacobian_weight * mean_b ||J_S(x_b) - J_T(x_b)||_F^2``

    with xi ~ N(0, noise_sigma^2 I) (no noise when noise_sigma = 0) and J the full (C, *input)
    input Jacobians (all outputs). Proposition 1: the noisy squared error's expectation is the
    clean one + sigma^2 ||J_S - J_T||_F^2 + O(sigma^4), so ``sq-noise`` (noise sigma, weight 0)
    and ``sq+jac`` (no noise, weight sigma^2) should train alike.
    ``projections=K`` replaces ||J_S - J_T||_F^2 by (1/K) sum_k ||v_k^T (J_S - J_T)||^2 with fresh
    Rademacher v_k (entries +-1) per sample and call, the same for teacher and student: an unbiased
    single-draw estimate, as the noisy side is of its expectation, at the cost of K rows per
    network instead of C (the teacher then runs live). None: all C rows, exact.
    Call: ``loss(student, x (B, ...), y (B,), teacher_outputs=None) -> (total, {"ce", "sq", "jacobian", "logits"})``;
    teacher_outputs (a cache's, select "all" for the exact Jacobian term) replaces the clean teacher pass.
    """

    def __init__(self, teacher, *, noise_sigma: float = 0.0, jacobian_weight: float = 0.0, projections=None):
        super().__init__()
        if not noise_sigma >= 0 or not jacobian_weight >= 0:
            raise ValueError(f"noise_sigma and jacobian_weight must be >= 0, got {noise_sigma!r}, {jacobian_weight!r}")
        if projections is not None and (isinstance(projections, bool) or not isinstance(projections, int)
                                        or projections < 1):
            raise ValueError(f"projections must be a positive int or None (all outputs), got {projections!r}")
        self.__dict__["teacher"] = teacher  # not a submodule (the trainer may swap in a wrapper)
        self.noise_sigma, self.jacobian_weight, self.projections = float(noise_sigma), float(jacobian_weight), projections

    def extra_repr(self) -> str:
        return f"noise_sigma={self.noise_sigma}, jacobian_weight={self.jacobian_weight}, projections={self.projections}"

    def forward(self, student, x, y, teacher_outputs=None):
        from jacfast import loss as jm
        from jacfast.jacobians import input_jacobians, select

        B, zero = x.shape[0], x.new_zeros(())
        jac = zero
        if self.jacobian_weight > 0 and self.projections is not None:
            with torch.no_grad():
                classes = self.teacher(x[:1]).shape[1]
            v = torch.randint(0, 2, (self.projections, B, classes), device=x.device).to(x.dtype).mul_(2).sub_(1)
            t_logits, t_jac, _ = input_jacobians(self.teacher, x, select.projections(self.projections, vectors=v))
            logits, s_jac, _ = input_jacobians(student, x, select.projections(self.projections, vectors=v),
                                               create_graph=True)
            jac = jm.jacobian_matching_loss(s_jac, t_jac.to(s_jac.dtype), kind="squared") / self.projections
        elif self.jacobian_weight > 0:
            if teacher_outputs is not None:
                t_logits, t_jac = teacher_outputs.logits, teacher_outputs.jac
            else:
                t_logits, t_jac, _ = input_jacobians(self.teacher, x, select.all())
            logits, s_jac, _ = input_jacobians(student, x, select.all(), create_graph=True)
            jac = jm.jacobian_matching_loss(s_jac, t_jac.to(s_jac.dtype), kind="squared")  # sum over C, mean over B
        if self.noise_sigma > 0:
            xn = x + self.noise_sigma * torch.randn_like(x)
            if self.jacobian_weight > 0:
                s_dist = student(xn)
            else:  # one forward for clean + noisy
                out = student(torch.cat([x, xn]))
                logits, s_dist = out[:B], out[B:]
            with torch.no_grad():
                t_dist = self.teacher(xn)
        else:
            if self.jacobian_weight == 0:
                logits = student(x)
                if teacher_outputs is not None:
                    t_logits = teacher_outputs.logits
                else:
                    with torch.no_grad():
                        t_logits = self.teacher(x)
            s_dist, t_dist = logits, t_logits
        wide = torch.promote_types(logits.dtype, torch.float32)  # at least fp32 under autocast
        ce = F.cross_entropy(logits.to(wide), y)
        sq = (s_dist.to(wide) - t_dist.to(wide).detach()).pow(2).sum(1).mean()
        total = ce + sq + (self.jacobian_weight * jac.to(wide) if self.jacobian_weight > 0 else 0.0)
        return total, {"ce": ce, "sq": sq, "jacobian": jac, "logits": logits}


class ProjectedJacobianDistillation(nn.Module):
    """CE + KD + beta * (1/K) sum_k mean_b ||v_bk^T (J_S(x_b) - J_T(x_b))||^2, v_bk Rademacher (+-1).

    K random output projections drawn anew each call, the same for teacher and student; the
    average over K is a Hutchinson estimate of ||J_S - J_T||_F^2 (the all-outputs squared term).
    Costs K backward passes per network instead of C. The teacher runs live (random directions
    cannot be cached). Call: ``loss(student, x, y, teacher_outputs=None) -> DistillationOutput``.
    """

    def __init__(self, teacher, k: int, beta: float, temperature: float = 4.0):
        super().__init__()
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        self.__dict__["teacher"] = teacher
        self.k, self.beta, self.temperature = k, float(beta), float(temperature)

    def extra_repr(self) -> str:
        return f"k={self.k}, beta={self.beta}, T={self.temperature}"

    def forward(self, student, x, y, teacher_outputs=None):
        from jacfast import loss as jm
        from jacfast.jacobians import input_jacobians, select
        from jacfast.losses.distillation import DistillationOutput

        with torch.no_grad():
            classes = self.teacher(x[:1]).shape[1]
        v = torch.randint(0, 2, (self.k, x.shape[0], classes), device=x.device).to(x.dtype).mul_(2).sub_(1)
        t_logits, t_jac, _ = input_jacobians(self.teacher, x, select.projections(self.k, vectors=v))
        logits, s_jac, _ = input_jacobians(student, x, select.projections(self.k, vectors=v), create_graph=True)
        jac = jm.jacobian_matching_loss(s_jac, t_jac.to(s_jac.dtype), kind="squared") / self.k
        T, wide = self.temperature, torch.promote_types(logits.dtype, torch.float32)
        ce = F.cross_entropy(logits.to(wide), y)
        kd = F.kl_div(F.log_softmax(logits.to(wide) / T, 1), F.log_softmax(t_logits.to(wide) / T, 1),
                      reduction="batchmean", log_target=True) * T * T
        return DistillationOutput(ce + kd + self.beta * jac.to(wide), ce, kd, jac, logits)


def make_loss(method: str, teacher, args, sigma: float = None):
    """The loss of one method (every name in ALL_METHODS, matched exactly) and its cache selection.

    Returns (loss, cache): cache is None (teacher live) or (select, k) for ``TeacherCache``.
    ``sigma``: Proposition 1's noise level (default ``args.noise_sigma``).
    """
    from jacfast.losses import DistillationLoss

    sigma = args.noise_sigma if sigma is None else sigma

    def sq():
        return dict(beta=args.beta_sq, kind="squared")

    if method == "ce":
        return DistillationLoss(teacher, kd_weight=0.0, beta=0.0), ("topk", 1)
    if method == "kd":
        return DistillationLoss(teacher, beta=0.0), ("topk", 1)
    if method in ("kd+jac-norm", "kd+jac-norm-fd", "kd+jac-sq", "kd+jac-sq-fd"):
        normalized = method.startswith("kd+jac-norm")
        return DistillationLoss(teacher, beta=args.beta_norm if normalized else args.beta_sq,
                                kind="normalized" if normalized else "squared",
                                estimator="finite_difference" if method.endswith("-fd") else "exact"), ("topk", 1)
    if method == "kd+jac-sq-target":
        return DistillationLoss(teacher, select="target", **sq()), _CACHE_SELECT[method]
    if method == "kd+jac-sq-top5":
        return DistillationLoss(teacher, select="topk", k=5, **sq()), _CACHE_SELECT[method]
    if method == "kd+jac-sq-all":
        return DistillationLoss(teacher, select="all", **sq()), _CACHE_SELECT[method]
    if method in ("kd+jac-sq-proj1", "kd+jac-sq-proj4"):
        return ProjectedJacobianDistillation(teacher, int(method[-1]), args.beta_sq), None
    if method == "kd+jac-sq-noise":
        return DistillationLoss(teacher, estimator="noise", noise_sigma=sigma, **sq()), None
    if method == "sq":
        return SquaredErrorDistillation(teacher), ("topk", 1)
    if method == "sq-noise":
        return SquaredErrorDistillation(teacher, noise_sigma=sigma), None
    if method == "sq+jac":
        k = getattr(args, "jacobian_projections", 0) or None
        return (SquaredErrorDistillation(teacher, jacobian_weight=sigma ** 2, projections=k),
                _CACHE_SELECT[method] if k is None else None)
    raise ValueError(f"unknown distillation method {method!r}; expected one of {ALL_METHODS}")


def student_width(args) -> int:
    return 4 if args.tiny else 8


def train_runs(args, teacher, train, test, grid, steps, tag=lambda method: method, sigma=None) -> list:
    """Train every (n, seed, method) of ``grid`` ([(n, [methods])]); the same subset per (n, seed)."""
    from jacfast.teacher_cache import TeacherCache
    from jacfast.trainers import Distiller

    results = []
    for n, methods in grid:
        for seed in args.seeds:
            xs, ys = D.subset_per_class(*train, n, seed=seed)
            for method in methods:
                def make(run_dir, method=method, seed=seed, xs=xs, ys=ys, n=n):
                    torch.manual_seed(seed)
                    student = build_model("resnet", width=student_width(args))
                    loss, cache_sel = make_loss(method, teacher, args, sigma)
                    cache = None
                    if cache_sel is not None:  # the teacher's logits and rows, once per subset
                        cache = TeacherCache.open_or_build(os.path.join(run_dir, "teacher.cache"), teacher, (xs, ys),
                                                           select=cache_sel[0], k=cache_sel[1], progress=False)
                    return Distiller(teacher, student, loss, (xs, ys), teacher_cache=cache, seed=seed,
                                     config={"n": n, "method": method, "sigma": sigma},
                                     **C.trainer_kw(args, run_dir, steps))
                with warnings.catch_warnings():  # the -fd estimator warns about ReLU kinks (reported as is)
                    warnings.simplefilter("ignore", UserWarning)
                    r = C.run_one(args, f"{tag(method)}_n{n}_s{seed}", make, *test)
                results.append({**r, "method": tag(method), "n": n, "seed": seed})
    return results


def time_steps(args, teacher, train, methods, rounds, batch=64, steps_per_round=2) -> dict:
    """Seconds per training step (loss, backward, Adam step) of each method, teacher live and, where
    the method can use one, with the teacher's outputs precomputed (a cache), on one batch of
    ``batch`` training images (seed 0; the training batch of n >= 7 per class). Methods take turns
    (round-robin, ``rounds`` rounds); the median per-step time of the rounds is reported, so load
    from other processes hits all alike.
    """
    from jacfast.jacobians import input_jacobians, select
    from jacfast.losses.distillation import TeacherOutputs

    g = torch.Generator().manual_seed(0)
    pick = torch.randperm(train[0].shape[0], generator=g)[:batch]
    xs, ys = train[0][pick], train[1][pick]
    cases = []
    for method in methods:
        for cached in (False, True):
            torch.manual_seed(0)
            student = build_model("resnet", width=student_width(args))
            loss, cache_sel = make_loss(method, teacher, args)
            if cached and cache_sel is None:
                continue
            kw = {}
            if cached:
                s, k = cache_sel
                sel = select.topk(k) if s == "topk" else select.target(ys) if s == "target" else select.all()
                logits, jac, idx = input_jacobians(teacher, xs, sel)
                kw["teacher_outputs"] = TeacherOutputs(logits, jac, idx)
            cases.append((method, cached, student, loss, torch.optim.Adam(student.parameters(), 1e-3), kw))
    times = {(m, c): [] for m, c, *_ in cases}

    def step(student, loss, opt, kw):
        opt.zero_grad(set_to_none=True)
        out = loss(student, xs, ys, **kw)
        (out[0] if isinstance(out, tuple) and not hasattr(out, "total") else out.total).backward()
        opt.step()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for method, cached, student, loss, opt, kw in cases:  # warm-up (and the strategy choice)
            step(student, loss, opt, kw)
        for _ in range(rounds):
            for method, cached, student, loss, opt, kw in cases:
                t0 = time.perf_counter()
                for _ in range(steps_per_round):
                    step(student, loss, opt, kw)
                times[(method, cached)].append((time.perf_counter() - t0) / steps_per_round)
    return {k: {"median_s": statistics.median(v), "min_s": min(v), "rounds": len(v), "batch": int(xs.shape[0])}
            for k, v in times.items()}


def run(args) -> int:
    C.setup(args)
    train, test = C.fashion(args)
    teacher, t_acc = C.teacher(args, train, test)
    ns = [1, 2] if args.tiny else args.n
    rq5_n = 2 if args.tiny else args.rq5_n
    steps = 4 if args.tiny else args.steps
    methods = list(args.methods)
    grid = [(n, methods + ([m for m in args.rq5_methods if m not in methods] if n == rq5_n else [])) for n in ns]
    if rq5_n not in ns and args.rq5_methods:
        grid.append((rq5_n, list(dict.fromkeys(methods + list(args.rq5_methods)))))
    results = train_runs(args, teacher, train, test, grid, steps)
    rows = list(dict.fromkeys(methods + list(args.rq5_methods)))
    cols = sorted({r["n"] for r in results})
    summ = C.summary(results, lambda r: (r["method"], r["n"]))
    paired = C.paired_by(results, "kd", "n")
    rq5_rows = ["kd"] + [m for m in args.rq5_methods if m != "kd"]
    print("timing the RQ5 methods (interleaved)", flush=True)
    timing = time_steps(args, teacher, train, rq5_rows, rounds=1 if args.tiny else args.timing_rounds,
                        batch=16 if args.tiny else 64)
    rq5 = []
    for m in rq5_rows:
        s = summ.get((m, rq5_n))
        rq5.append({"method": m, "n": rq5_n, "acc_mean": s and s["mean"], "acc_std": s and s["std"],
                    "paired_vs_kd": paired.get((m, rq5_n)),
                    "s_per_step_live": timing[(m, False)]["median_s"],
                    "s_per_step_cached": timing[(m, True)]["median_s"] if (m, True) in timing else None,
                    "train_s_per_step": statistics.fmean(r["seconds_per_step"] for r in results
                                                         if r["method"] == m and r["n"] == rq5_n)})
    md = [C.table(rows, cols, summ, "method", "n") + f" Teacher: {100 * t_acc:.2f}%.",
          "## Paired differences against kd\n\n" + C.paired_table(rows, cols, paired, "method", "n", "kd"),
          f"## RQ5: which Jacobians, at what cost (n = {rq5_n})\n\n" + _rq5_table(rq5, 16 if args.tiny else 64)]
    plots = {"distill": lambda ax: (C.lines(ax, rows, cols, summ, "examples per class (n)", logx=True),
                                    ax.axhline(100 * t_acc, color="k", ls=":", label="teacher"),
                                    ax.set_title("Distillation with limited data (Fashion-MNIST)")),
             "rq5_cost": lambda ax: _rq5_plot(ax, rq5)}
    C.write(args, "distill", {"teacher_test_acc": t_acc, "runs": results,
                              "summary": [{"method": m, "n": n, **s} for (m, n), s in summ.items()],
                              "paired_vs_kd": C.paired_list(paired), "rq5": rq5,
                              "timing": [{"method": m, "cached": c, **v} for (m, c), v in timing.items()]},
            "\n\n".join(md), plots)
    return 0


def _rq5_table(rq5, batch) -> str:
    from jacfast.experiments.stats import fmt

    lines = ["| method | accuracy % | vs kd [95% CI] | ms/step, teacher live | ms/step, teacher cached | "
             "ms/step in training |", "|---|---:|---:|---:|---:|---:|"]
    for r in rq5:
        p = r["paired_vs_kd"]
        lines.append(f"| {r['method']} | {100 * r['acc_mean']:.2f} +- {100 * r['acc_std']:.2f} | "
                     f"{fmt(p) if p else ''} | {1e3 * r['s_per_step_live']:.1f} | "
                     + (f"{1e3 * r['s_per_step_cached']:.1f}" if r["s_per_step_cached"] else "-")
                     + f" | {1e3 * r['train_s_per_step']:.1f} |")
    return ("\n".join(lines) + "\n\nSquared Jacobian matching (beta-sq) of: the target class, the teacher's top-1 "
            "(kd+jac-sq), top-5, all 10 outputs, 1 or 4 random Rademacher projections (averaged over K, a "
            f"Hutchinson estimate of the all-outputs term), and the noise estimator of the top-1 term. Time per "
            f"step (loss, backward, Adam step) on one batch of {batch} images, median of interleaved rounds in one "
            "process; the machine's cores were shared with other jobs, so compare the ratios. 'in training': the "
            "runs' wall time per step at their own batch (n x 10 images; teacher cached where the method allows "
            "it; includes data handling).")


def _rq5_plot(ax, rq5):
    for r in rq5:
        x = 1e3 * r["s_per_step_live"]
        ax.errorbar([x], [100 * r["acc_mean"]], yerr=[100 * r["acc_std"]], marker="o", capsize=3, label=r["method"])
    ax.set_xscale("log")
    ax.set_xlabel("ms per training step (teacher live, log scale)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"RQ5: accuracy vs cost per step (n = {rq5[0]['n']} per class)")
