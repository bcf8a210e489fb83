"""``python -m jacfast text``: distil a transformer LM into a smaller one, with Jacobian matching
with respect to the input embeddings, on real English text (the Debian package ``fortunes``).

A character-level causal teacher (:class:`jacfast.models.TransformerLM`) is trained on 90% of
the fortunes (or loaded, ``--teacher``). Students of a smaller width and depth then learn from
a small random subset of the training fortunes (``--train-chars``) with, per method:

- ``ce``: next-character cross-entropy only;
- ``kd``: CE + KD (temperature-softened KL to the teacher, per position, T^2 factor);
- ``kd+jac``: CE + KD + beta * normalized Jacobian matching of the teacher's top-k next
  characters at m random positions per window (``positions=select.sample(m)``), the rows
  taken with respect to the input embeddings (B, L, E), by the finite-difference estimator:
  the students' attention is ``F.scaled_dot_product_attention``, whose fused kernels have no
  double backward (``--estimator exact`` uses the math kernel instead).

Input space: teacher and student differ in width, so the student is given the teacher's
embedding table (frozen) and a learned linear ``in_proj`` to its own width
(``TransformerLM(input_dim=...)``); both are called with the same ``inputs_embeds`` and the
rows of both are Jacobians with respect to that one tensor.

Reported on the held-out 10% of the fortunes (consecutive windows): cross-entropy per
character (nats), perplexity exp(CE), bits per character and next-character accuracy, per
seed and as mean +- std over seeds. Writes ``--out``/results.json (command, settings, git
revision, every run), results.md and text.png; finished runs (``runs/NAME/result.json``) are
skipped on a rerun, and different settings in the same ``--out`` are refused.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from jacfast import corpus as C
from jacfast.models import TransformerLM

METHODS = ("ce", "kd", "kd+jac")
DEFAULTS = {  # full size; --tiny overrides (see TINY)
    "length": 32, "batch": 16, "teacher_dim": 96, "teacher_depth": 3, "teacher_heads": 4, "teacher_steps": 2000,
    "teacher_lr": 2e-3, "student_dim": 32, "student_depth": 2, "student_heads": 4, "steps": 400, "lr": 3e-3,
    "train_chars": 20000, "eval_windows": 2048, "temperature": 2.0, "beta": 1.0, "k": 1, "positions": 4,
    "estimator": "finite_difference", "curve_points": 5,
}
TINY = {"length": 12, "batch": 4, "teacher_dim": 16, "teacher_depth": 1, "teacher_heads": 2, "teacher_steps": 20,
        "student_dim": 8, "student_depth": 1, "student_heads": 2, "steps": 6, "train_chars": 3000,
        "eval_windows": 16, "positions": 2, "curve_points": 2}
_RUN_KEYS = ("length", "batch", "student_dim", "student_depth", "student_heads", "steps", "lr", "train_chars",
             "eval_windows", "temperature", "beta", "k", "positions", "estimator", "curve_points")


def register(subparsers) -> None:
    p = subparsers.add_parser("text", formatter_class=argparse.RawDescriptionHelpFormatter,
                              help="transformer LM distillation with Jacobian matching on real text",
                              description=__doc__.split("\n", 1)[1] + """
example:  python -m jacfast text --out experiments/text      (about 20 minutes on one core)
          python -m jacfast text --tiny --out /tmp/text      (seconds)""")
    p.add_argument("--out", default=os.path.join("experiments", "text"), help="output folder (default experiments/text)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="student seeds (default 0 1 2)")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS),
                   help="subset of: " + " ".join(METHODS) + " (default: all)")
    p.add_argument("--tiny", action="store_true", help="seconds-long smoke run (tiny models, few steps)")
    p.add_argument("--teacher", default=None, metavar="PATH", help="a teacher.pt of an earlier run with the same "
                   "teacher settings (default: train one into OUT/teacher.pt)")
    p.add_argument("--text-dir", default=None, metavar="DIR", help=f"fortune files (default $JACFAST_FORTUNES_DIR "
                   f"or {C.FORTUNES_DIR}, from the Debian package fortunes)")
    for key, value in DEFAULTS.items():
        p.add_argument("--" + key.replace("_", "-"), type=type(value), default=None, metavar=type(value).__name__.upper(),
                       help=f"(default {value}{'; --tiny: ' + str(TINY[key]) if key in TINY else ''})")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: the cores may be shared)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    p.set_defaults(run=run)


def settings_of(args) -> dict:
    s = {**DEFAULTS, **(TINY if args.tiny else {})}
    s.update({k: getattr(args, k) for k in DEFAULTS if getattr(args, k) is not None})
    if s["estimator"] not in ("finite_difference", "exact"):
        raise SystemExit(f"--estimator must be finite_difference or exact, got {s['estimator']!r}")
    if s["positions"] > s["length"]:
        raise SystemExit(f"--positions ({s['positions']}) must be <= --length ({s['length']})")
    return {**s, "tiny": bool(args.tiny), "corpus": "Debian package fortunes" if args.text_dir is None else args.text_dir}


def revision() -> str:
    """The git commit of the code (with "+dirty" when tracked files differ from it)."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        head = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# --------------------------------------------------------------------------------------------
# models, data, evaluation
# --------------------------------------------------------------------------------------------
def build_teacher(s: dict, vocab: int) -> TransformerLM:
    return TransformerLM(vocab, s["teacher_dim"], s["teacher_depth"], s["teacher_heads"], s["length"])


def build_student(s: dict, teacher: TransformerLM) -> TransformerLM:
    """A narrower, shallower LM on the teacher's (frozen) embedding table."""
    student = TransformerLM(teacher.vocab_size, s["student_dim"], s["student_depth"], s["student_heads"], s["length"],
                            input_dim=teacher.input_dim)
    student.embed.load_state_dict(teacher.embed.state_dict())
    student.embed.requires_grad_(False)
    return student


@torch.no_grad()
def evaluate(model, windows, batch: int = 256) -> dict:
    """Cross-entropy per character (nats), perplexity, bits per character, accuracy."""
    model.eval()
    ids, targets = windows
    nll, correct = 0.0, 0
    for i in range(0, ids.shape[0], batch):
        logits = model(ids[i:i + batch]).logits
        nll += float(F.cross_entropy(logits.flatten(0, 1), targets[i:i + batch].flatten(), reduction="sum"))
        correct += int((logits.argmax(-1) == targets[i:i + batch]).sum())
    n = targets.numel()
    ce = nll / n
    return {"ce": ce, "perplexity": math.exp(ce), "bpc": ce / math.log(2), "accuracy": correct / n}


def _schedule(opt, steps: int):
    """Linear warm-up over 5% of the steps, then cosine decay to 10% of the rate."""
    warm = max(1, steps // 20)
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(i, steps) / steps))))


def _bar(total: int, desc: str, quiet: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=quiet, leave=False, dynamic_ncols=True)


def train_teacher(s: dict, vocab: int, stream, quiet: bool) -> tuple[TransformerLM, float]:
    torch.manual_seed(1234)
    teacher = build_teacher(s, vocab)
    opt = torch.optim.AdamW(teacher.parameters(), lr=s["teacher_lr"], weight_decay=0.01)
    sched = _schedule(opt, s["teacher_steps"])
    gen = torch.Generator().manual_seed(1234)
    t0 = time.perf_counter()
    with _bar(s["teacher_steps"], "teacher", quiet) as bar:
        for _ in range(s["teacher_steps"]):
            ids, targets = C.random_windows(stream, s["batch"], s["length"], gen)
            loss = F.cross_entropy(teacher(ids).logits.flatten(0, 1), targets.flatten())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.set_postfix(ce=f"{float(loss.detach()):.3f}", refresh=False)
            bar.update()
    return teacher.eval().requires_grad_(False), time.perf_counter() - t0


def make_loss(method: str, s: dict, teacher, seed: int):
    """The student's loss: ``fn(student, embeds (B, L, E), targets (B, L)) -> (total, parts)``."""
    from jacfast.losses import DistillationLoss
    from jacfast.selection import select

    T = s["temperature"]
    if method == "ce":
        def ce_only(student, e, y):
            ce = F.cross_entropy(student(inputs_embeds=e).logits.flatten(0, 1), y.flatten())
            return ce, {"ce": float(ce)}
        return ce_only
    loss = DistillationLoss(teacher, temperature=T, k=s["k"], beta=s["beta"] if method == "kd+jac" else 0.0,
                            estimator=s["estimator"], outputs="logits", inputs="inputs_embeds",
                            positions=select.sample(s["positions"], seed=seed))

    def distill(student, e, y):
        out = loss(student, {"inputs_embeds": e}, y)
        return out.total, {"ce": float(out.ce), "kd": float(out.kd), "jac": float(out.jacobian)}
    return distill


def train_student(method: str, seed: int, s: dict, teacher, stream, test_windows, quiet: bool) -> dict:
    torch.manual_seed(seed)
    student = build_student(s, teacher)
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=s["lr"], weight_decay=0.01)
    sched = _schedule(opt, s["steps"])
    gen = torch.Generator().manual_seed(10_000 + seed)
    loss_fn = make_loss(method, s, teacher, seed)
    curve_at = {round(s["steps"] * (i + 1) / s["curve_points"]) for i in range(s["curve_points"])}
    curve_windows = (test_windows[0][:256], test_windows[1][:256])
    curve, parts_sum, t0 = [], {}, time.perf_counter()
    with _bar(s["steps"], f"{method} seed {seed}", quiet) as bar:
        for step in range(1, s["steps"] + 1):
            student.train()
            ids, targets = C.random_windows(stream, s["batch"], s["length"], gen)
            with torch.no_grad():
                e = teacher.embed(ids)
            total, parts = loss_fn(student, e, targets)
            opt.zero_grad(set_to_none=True)
            total.backward()
            opt.step()
            sched.step()
            for k, v in parts.items():
                parts_sum[k] = parts_sum.get(k, 0.0) + v
            if step in curve_at:
                curve.append({"step": step, **evaluate(student, curve_windows)})
            bar.set_postfix({k: f"{v:.3f}" for k, v in parts.items()}, refresh=False)
            bar.update()
    seconds = time.perf_counter() - t0
    return {"method": method, "seed": seed, "train_seconds": seconds, "ms_per_step": seconds / s["steps"] * 1e3,
            "train_loss_mean": {k: v / s["steps"] for k, v in parts_sum.items()}, "curve_256_windows": curve,
            "test": evaluate(student, test_windows),
            "params": sum(p.numel() for p in params)}


# --------------------------------------------------------------------------------------------
# the command
# --------------------------------------------------------------------------------------------
def _teacher_keys(s: dict) -> dict:
    return {k: v for k, v in s.items() if k.startswith("teacher_") or k in ("length", "batch", "corpus", "tiny")}


def summarize(runs: list[dict]) -> dict:
    """{method: {metric: {"mean", "std", "n"}}} over seeds (std: sample std, 0 for one seed)."""
    out = {}
    for method in dict.fromkeys(r["method"] for r in runs):
        rs = [r for r in runs if r["method"] == method]
        out[method] = {}
        for metric in ("ce", "perplexity", "bpc", "accuracy"):
            v = [r["test"][metric] for r in rs]
            out[method][metric] = {"mean": statistics.fmean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0,
                                   "n": len(v)}
        out[method]["ms_per_step"] = statistics.fmean(r["ms_per_step"] for r in rs)
    return out


def markdown(result: dict) -> str:
    s, t = result["settings"], result["teacher"]
    lines = [f"Command: `{result['command']}`  ", f"Revision: `{result['revision']}`  ",
             f"Corpus: {s['corpus']} ({result['corpus_chars']['train']} train / {result['corpus_chars']['test']} test "
             f"characters; students see {result['corpus_chars']['student']}), vocabulary {result['vocab']} characters",
             "", f"Teacher: dim {s['teacher_dim']}, depth {s['teacher_depth']}, {t['params']} parameters, "
             f"{s['teacher_steps']} steps ({t['train_seconds']:.0f} s); test perplexity {t['test']['perplexity']:.3f}, "
             f"accuracy {t['test']['accuracy']:.4f}.",
             f"Students: dim {s['student_dim']}, depth {s['student_depth']}, {result['runs'][0]['params']} trained "
             f"parameters, {s['steps']} steps of {s['batch']} x {s['length']} characters; kd+jac: beta {s['beta']}, "
             f"top-{s['k']} at {s['positions']} positions per window, {s['estimator']} estimator.", "",
             "| method | test perplexity | bits / char | next-char accuracy | seeds | ms / step |",
             "|---|---:|---:|---:|---:|---:|"]
    for method, m in result["summary"].items():
        lines.append(f"| {method} | {m['perplexity']['mean']:.3f} +- {m['perplexity']['std']:.3f} | "
                     f"{m['bpc']['mean']:.4f} +- {m['bpc']['std']:.4f} | {m['accuracy']['mean']:.4f} +- "
                     f"{m['accuracy']['std']:.4f} | {m['perplexity']['n']} | {m['ms_per_step']:.0f} |")
    lines += ["", "| method | seed | test perplexity | accuracy | train s |", "|---|---:|---:|---:|---:|"]
    for r in result["runs"]:
        lines.append(f"| {r['method']} | {r['seed']} | {r['test']['perplexity']:.3f} | {r['test']['accuracy']:.4f} | "
                     f"{r['train_seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    methods = list(result["summary"])
    means = [result["summary"][m]["perplexity"]["mean"] for m in methods]
    stds = [result["summary"][m]["perplexity"]["std"] for m in methods]
    ax1.bar(methods, means, yerr=stds, capsize=6, color=["C0", "C1", "C2"][:len(methods)])
    ax1.axhline(result["teacher"]["test"]["perplexity"], color="k", ls="--", label="teacher")
    lo = min(means + [result["teacher"]["test"]["perplexity"]])
    ax1.set_ylim(lo * 0.95, max(m + s for m, s in zip(means, stds)) * 1.02)
    ax1.set_ylabel("test perplexity (per character)")
    ax1.set_title(f"students, mean +- std over {result['summary'][methods[0]]['perplexity']['n']} seeds")
    ax1.legend()
    for i, m in enumerate(methods):
        for r in (r for r in result["runs"] if r["method"] == m):
            c = r["curve_256_windows"]
            ax2.plot([p["step"] for p in c], [p["perplexity"] for p in c], color=f"C{i}", alpha=0.7,
                     label=m if r["seed"] == result["settings"]["seeds"][0] else None)
    ax2.set_xlabel("student step")
    ax2.set_ylabel("perplexity, first 256 test windows")
    ax2.set_yscale("log")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _load_or_train_teacher(args, s, vocab, stream, quiet):
    path = args.teacher or os.path.join(args.out, "teacher.pt")
    if os.path.exists(path):
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if saved["settings"] != _teacher_keys(s):
            raise SystemExit(f"{path} was trained with other settings: {saved['settings']} (now {_teacher_keys(s)}); "
                             "use another --out or --teacher")
        teacher = build_teacher(s, vocab)
        teacher.load_state_dict(saved["state"])
        return teacher.eval().requires_grad_(False), saved["train_seconds"]
    teacher, seconds = train_teacher(s, vocab, stream, quiet)
    torch.save({"settings": _teacher_keys(s), "state": teacher.state_dict(), "train_seconds": seconds}, path)
    return teacher, seconds


def run(args) -> int:
    torch.set_num_threads(args.threads)
    s = settings_of(args)
    os.makedirs(os.path.join(args.out, "runs"), exist_ok=True)
    settings_path = os.path.join(args.out, "settings.json")
    if os.path.exists(settings_path):
        with open(settings_path) as f:
            old = json.load(f)
        if old != s:
            changed = sorted(k for k in set(old) | set(s) if old.get(k) != s.get(k))
            raise SystemExit(f"{args.out} holds runs with other settings (changed: {', '.join(changed)}); "
                             "use another --out or delete it")
    with open(settings_path, "w") as f:
        json.dump(s, f, indent=1)
    quiet = args.no_progress
    code = revision()  # once: the code that runs, even if the checkout moves on meanwhile
    docs = C.read_fortunes(args.text_dir)
    train_docs, test_docs = C.split_fortunes(docs)
    vocab = C.CharVocab()
    train_stream = vocab.encode(C.join_text(train_docs))
    test_stream = vocab.encode(C.join_text(test_docs))
    student_stream = vocab.encode(C.join_text(C.take_chars(train_docs, s["train_chars"])))
    test_windows = C.eval_windows(test_stream, s["length"], s["eval_windows"])
    teacher, teacher_seconds = _load_or_train_teacher(args, s, len(vocab), train_stream, quiet)
    runs = []
    for method in args.methods:
        for seed in args.seeds:
            path = os.path.join(args.out, "runs", f"{method}-seed{seed}", "result.json")
            if os.path.exists(path):
                with open(path) as f:
                    runs.append(json.load(f))
                continue
            r = train_student(method, seed, s, teacher, student_stream, test_windows, quiet)
            r["revision"] = code
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as f:
                json.dump(r, f, indent=1)
            runs.append(r)
            print(f"{method} seed {seed}: test perplexity {r['test']['perplexity']:.3f}, accuracy "
                  f"{r['test']['accuracy']:.4f} ({r['train_seconds']:.0f} s)", flush=True)
    result = {"command": "python -m jacfast " + " ".join(sys.argv[1:]) if sys.argv[0].endswith("__main__.py")
              else "python -m jacfast text (from Python)", "revision": code,
              "settings": {**s, "seeds": list(args.seeds), "methods": list(args.methods), "threads": args.threads},
              "vocab": len(vocab), "corpus_chars": {"train": int(train_stream.numel()), "test": int(test_stream.numel()),
                                                    "student": int(student_stream.numel()),
                                                    "test_evaluated": int(test_windows[1].numel())},
              "teacher": {"params": sum(p.numel() for p in teacher.parameters()), "train_seconds": teacher_seconds,
                          "test": evaluate(teacher, test_windows)},
              "runs": runs, "summary": summarize(runs)}
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(markdown(result))
    plot(result, os.path.join(args.out, "text.png"))
    print(markdown(result))
    return 0
