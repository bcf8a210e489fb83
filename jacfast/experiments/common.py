"""Machinery shared by the experiment commands: data, teacher, one resumable run, result files.

Every command writes into ``--out``: ``results.json`` (the command, every setting, the git
revision, every run and the summaries), ``results.md`` (tables) and PNG plots; runs live in
``OUT/runs/NAME`` and a finished one (``result.json``) is reused, not retrained.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

import torch

from jacfast import data as D
from jacfast.experiments import stats
from jacfast.models import build_model
from jacfast.trainers import CheckpointMismatchError, SupervisedTrainer, TrainingInterrupted

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def clean_errors(fn):
    """Missing/corrupt data -> a one-line error naming the package or path, not a traceback."""
    def run(args):
        try:
            return fn(args)
        except D.DataError as e:
            raise SystemExit(f"error: {e}")
    return run


def git_revision() -> dict:
    """{"commit": HEAD's sha or None, "dirty": whether tracked files under jacfast/ differ from it}."""
    def git(*a):
        return subprocess.run(["git", "-C", ROOT, *a], capture_output=True, text=True, timeout=30)
    try:
        head = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", "jacfast")
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    if head.returncode != 0:
        return {"commit": None, "dirty": None}
    return {"commit": head.stdout.strip(), "dirty": bool(dirty.stdout.strip())}


def setup(args) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.tiny:
        args.seeds = args.seeds[:2]
    os.makedirs(args.out, exist_ok=True)


def fashion(args):
    """((x_train, y_train), (x_test, y_test)) of Fashion-MNIST; a small test slice under --tiny."""
    xtr, ytr = D.load_fashion_mnist("train", args.fashion_dir)
    xte, yte = D.load_fashion_mnist("test", args.fashion_dir)
    if args.tiny:  # a fixed small slice keeps the smoke run in seconds
        xte, yte = D.subset_per_class(xte, yte, min(20, int(torch.bincount(yte).min())), seed=0)
    return (xtr, ytr), (xte, yte)


def trainer_kw(args, run_dir: str, steps: int, batch: int = 64) -> dict:
    epochs = 1 if args.tiny else 2
    return dict(batch_size=batch, epochs=epochs, steps_per_epoch=max(1, steps // epochs), out_dir=run_dir,
                amp=args.amp, device=args.device, progress=not args.no_progress)


def fit(trainer, run_dir: str) -> None:
    """fit(), turning interruption and config mismatch into clean exits with a message."""
    try:
        trainer.fit()
    except TrainingInterrupted as e:
        print(f"\n{e}\nRerun the same command to resume.", file=sys.stderr)
        raise SystemExit(128 + e.signum)
    except CheckpointMismatchError as e:
        raise SystemExit(f"{run_dir}: {e}")


def seconds_per_step(history) -> float:
    steps = history[-1]["step"] if history else 0
    return sum(h["seconds"] for h in history) / steps if steps else float("nan")


def run_one(args, name: str, make_trainer, x_test, y_test, sigmas=(0.0,)) -> dict:
    """One run in OUT/runs/NAME: skipped when its result.json exists, else (re)trained + evaluated."""
    run_dir = os.path.join(args.out, "runs", name)
    done = os.path.join(run_dir, "result.json")
    if os.path.exists(done):
        with open(done) as f:
            return json.load(f)
    os.makedirs(run_dir, exist_ok=True)
    t0 = time.time()
    trainer = make_trainer(run_dir)
    fit(trainer, run_dir)
    accs = trainer.evaluate(x_test, y_test, sigmas=sigmas)
    res = {"name": name, "test_acc": accs[0.0], "acc_by_sigma": {f"{s:g}": a for s, a in accs.items()},
           "seconds": round(time.time() - t0, 2), "seconds_per_step": seconds_per_step(trainer.history),
           "final": trainer.history[-1] if trainer.history else {}}
    with open(done + ".tmp", "w") as f:
        json.dump(res, f, indent=1)
    os.replace(done + ".tmp", done)
    print(f"  {name}: test acc {accs[0.0]:.4f} ({res['seconds']:.1f}s)", flush=True)
    return res


def load_teacher(path: str):
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    spec = dict(ckpt["spec"])
    teacher = build_model(spec.pop("name"), **spec)
    teacher.load_state_dict(ckpt["state_dict"])
    return teacher.eval(), ckpt


def teacher(args, train, test, *, path=None, seed=1000, what="Fashion-MNIST"):
    """Load --teacher (or ``path``, default OUT/teacher.pt), else train a VGG teacher on ``train``."""
    path = path or args.teacher or os.path.join(args.out, "teacher.pt")
    if not os.path.exists(path):
        if args.teacher:
            raise SystemExit(f"--teacher {path}: no such file (a teacher.pt written by an earlier run)")
        torch.manual_seed(seed)
        classes = int(train[1].max()) + 1
        model = build_model("vgg", width=4 if args.tiny else 16, num_classes=classes)
        x, y = (D.subset_per_class(*train, 20, seed=0) if args.tiny else train)
        kw = trainer_kw(args, os.path.splitext(path)[0], 10 if args.tiny else 0, batch=128)
        if not args.tiny:
            kw.update(epochs=args.teacher_epochs, steps_per_epoch=None)
        trainer = SupervisedTrainer(model, (x, y), **kw)
        print(f"training the teacher (VGG width {model.spec['width']}) on {len(x)} {what} images", flush=True)
        fit(trainer, kw["out_dir"])
        acc = trainer.evaluate(*test)[0.0]
        torch.save({"spec": model.spec, "state_dict": model.state_dict(), "test_acc": acc}, path + ".tmp")
        os.replace(path + ".tmp", path)
    model, ckpt = load_teacher(path)
    print(f"teacher {path}: {what} test acc {ckpt['test_acc']:.4f}", flush=True)
    return model, ckpt["test_acc"]


def summary(results: list[dict], key_fn, value="test_acc") -> dict:
    groups: dict = {}
    for r in results:
        groups.setdefault(key_fn(r), []).append(r[value] if isinstance(value, str) else value(r))
    return {k: {"mean": statistics.fmean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0, "n_seeds": len(v)}
            for k, v in groups.items()}


def paired_by(results: list[dict], baseline: str, col_key: str, value="test_acc", method_key="method",
              unit_key="seed") -> dict:
    """{(method, col): paired diff vs ``baseline`` over the units (seeds) of that column}."""
    cols = sorted({r[col_key] for r in results})
    out = {}
    for c in cols:
        vals: dict = {}
        for r in results:
            if r[col_key] == c:
                vals.setdefault(r[method_key], {})[r[unit_key]] = r[value]
        if baseline in vals:
            for m, s in stats.paired(vals, baseline).items():
                out[(m, c)] = s
    return out


def paired_list(paired: dict, row_key="method", col_key="n") -> list:
    return [{row_key: m, col_key: c, **s} for (m, c), s in paired.items()]


def paired_table(rows, cols, paired: dict, row_name, col_name, baseline: str) -> str:
    """Markdown: mean paired difference vs ``baseline`` [95% CI] (wins/units), in points."""
    head = f"| {row_name} - {baseline} | " + " | ".join(f"{col_name}={c}" for c in cols) + " |"
    lines = [head, "|---|" + "---:|" * len(cols)]
    for r in rows:
        if r == baseline:
            continue
        cells = []
        for c in cols:
            s = paired.get((r, c))
            cells.append("" if s is None else f"{stats.fmt(s)} ({s['wins']}/{s['pairs']})"
                         + (" *" if stats.significant(s) else ""))
        lines.append(f"| {r} | " + " | ".join(cells) + " |")
    return ("\n".join(lines) + f"\n\nMean paired difference against {baseline} in accuracy points, same subset "
            "and seed for every method, [95% CI, paired t with n - 1 degrees of freedom] (seeds where the method "
            "is ahead / seeds); * where the CI excludes 0.")


def write(args, command: str, payload: dict, markdown: str, plots: dict) -> None:
    """results.json (command, settings, git revision, payload), results.md, and one PNG per plot.

    plots: {file stem: fn(ax)}.
    """
    payload = {"command": getattr(args, "command_line", f"python -m jacfast {command}"),
               "settings": {k: v for k, v in vars(args).items() if k not in ("run", "command_line")},
               "git": git_revision(),
               "torch": torch.__version__, "threads": torch.get_num_threads(), **payload}
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(payload, f, indent=1, default=str)
    rev = payload["git"]
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(f"# {command}\n\nCommand: `{payload['command']}`\n\nRevision: {rev['commit']}"
                + (" (with uncommitted changes)" if rev["dirty"] else "") + f"\n\n{markdown}\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for stem, plot in plots.items():
        fig, ax = plt.subplots(figsize=(7, 4.5))
        plot(ax)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(args.out, f"{stem}.png"), dpi=120)
        plt.close(fig)
    print(f"wrote {args.out}/results.json, results.md, " + ", ".join(f"{s}.png" for s in plots)
          + f"\n{markdown}", flush=True)


def pm(s: dict) -> str:
    return f"{100 * s['mean']:.2f} +- {100 * s['std']:.2f}"


def table(rows, cols, summ, row_name, col_name) -> str:
    head = f"| {row_name} | " + " | ".join(f"{col_name}={c}" for c in cols) + " |"
    lines = [head, "|---|" + "---:|" * len(cols)]
    for r in rows:
        lines.append(f"| {r} | " + " | ".join(pm(summ[(r, c)]) if (r, c) in summ else "" for c in cols) + " |")
    return "\n".join(lines) + "\n\nTest accuracy in %, mean +- std over seeds."


def lines(ax, rows, cols, summ, xlabel, logx=False):
    for r in rows:
        xs = [c for c in cols if (r, c) in summ]
        if not xs:
            continue
        ax.errorbar(xs, [100 * summ[(r, c)]["mean"] for c in xs], yerr=[100 * summ[(r, c)]["std"] for c in xs],
                    marker="o", capsize=3, label=r)
    if logx:
        ax.set_xscale("log")
        ax.minorticks_off()
    ax.set_xticks(list(cols), [f"{c:g}" for c in cols])
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test accuracy (%)")
