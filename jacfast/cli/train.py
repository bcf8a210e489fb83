"""``python -m jacfast {distill,prop1,robustness,transfer}``: the paper's experiments on real data.

This module holds the command lines; each experiment is a module of :mod:`jacfast.experiments`.
Each command runs every (method, setting, seed) in its own folder under ``--out/runs`` and
writes into ``--out``: ``results.json`` (the command, every setting, the git revision, every run,
the summaries and paired differences), ``results.md`` (tables) and PNG plots. Rerunning the same
command skips finished runs and resumes interrupted ones from their checkpoints (Ctrl-C writes
one); a different setting in the same ``--out`` is refused. ``--tiny`` shrinks everything to
seconds (for tests and a first look).
"""
from __future__ import annotations

import argparse
import os

import torch

from jacfast import data as D

_INTRO = """The command runs every (method, setting, seed) in its own folder OUT/runs/NAME and writes into
OUT: results.json (the command, every setting, the git revision, every run, mean +- std over
seeds and the paired differences with 95% paired-t intervals), results.md (tables) and PNG
plots. Every method sees the same subsets and seeds. Rerunning the same command skips finished
runs and resumes an interrupted one from its checkpoint (Ctrl-C writes one); changed settings
in the same OUT are refused. Try --tiny first (seconds). Data comes from installed packages,
never from the network (see --fashion-dir)."""
SEEDS = (0, 1, 2, 3, 4)


def _common(p: argparse.ArgumentParser, out: str, teacher_epochs: int = 3) -> None:
    g = p.add_argument_group("common")
    g.add_argument("--out", default=out, help=f"output folder (default {out})")
    g.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS),
                   help="seeds (default 0-4); each selects the training subset and the initialization")
    g.add_argument("--tiny", action="store_true", help="seconds-long smoke run: few steps, small subsets, 2 seeds")
    g.add_argument("--teacher", default=None, metavar="PATH",
                   help="a teacher.pt written by an earlier run (default: OUT/teacher.pt, trained if missing)")
    g.add_argument("--teacher-epochs", type=int, default=teacher_epochs,
                   help=f"epochs of the teacher's training (default {teacher_epochs})")
    g.add_argument("--fashion-dir", default=None, metavar="DIR",
                   help=f"Fashion-MNIST idx files (default $JACFAST_FASHION_MNIST_DIR or {D.FASHION_MNIST_DIR}, "
                   "from the Debian package dataset-fashion-mnist)")
    g.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none", help="mixed precision (default none)")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    g.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: these small networks gain little from more, and OpenMP "
                   "threads slow down badly when other processes share the cores)")
    g.add_argument("--no-progress", action="store_true", help="no tqdm bars")


def _distill_weights(p) -> None:
    p.add_argument("--beta-norm", type=float, default=1.0, help="weight of normalized Jacobian matching (default 1)")
    p.add_argument("--beta-sq", type=float, default=0.1, help="weight of squared Jacobian matching (default 0.1)")


def _command_line(parser: argparse.ArgumentParser, command: str, args) -> str:
    """``python -m jacfast COMMAND`` + the options whose values differ from their defaults."""
    import shlex
    import sys

    if sys.argv[1:2] == [command]:
        return shlex.join(["python", "-m", "jacfast", *sys.argv[1:]])
    words = ["python", "-m", "jacfast", command]
    for a in parser._actions:
        if not a.option_strings or a.dest == "help":
            continue
        v = getattr(args, a.dest, None)
        if v == a.default:
            continue
        if isinstance(v, bool):
            words.append(a.option_strings[0])
        else:
            words += [a.option_strings[0], *map(str, v if isinstance(v, list) else [v])]
    return shlex.join(words)


def _lazy(module: str, parser: argparse.ArgumentParser, command: str):
    """The experiment's run(args), imported when the command runs (help stays fast)."""
    def run(args):
        import importlib

        from jacfast.experiments.common import clean_errors

        args.command_line = _command_line(parser, command, args)
        return clean_errors(importlib.import_module(f"jacfast.experiments.{module}").run)(args)
    return run


def register(subparsers) -> None:
    from jacfast.experiments.distill import ALL_METHODS, METHODS, RQ5_METHODS

    fmt = argparse.RawDescriptionHelpFormatter
    p = subparsers.add_parser("distill", formatter_class=fmt, help="(a) distillation with limited data, RQ5",
                              description=_INTRO + "\n" + """
(a) Distillation with limited data. A student (ResNet-style, narrower than the teacher) learns
from n examples per class of Fashion-MNIST with: cross-entropy only (ce); + KD (kd); + KD and
normalized Jacobian matching of the teacher's top-1 output (kd+jac-norm); + KD and squared
Jacobian matching (kd+jac-sq); the same two with the finite-difference estimator (-fd).
RQ5, at one n (--rq5-n, default 1): squared matching of the target class, top-1 (kd+jac-sq), top-5, all
10 outputs, 1 and 4 random projections, and the noise estimator (kd+jac-sq-noise), each with
its time per step (interleaved, one process). Also selectable: sq, sq-noise, sq+jac (see
`python -m jacfast prop1`). Reported: test accuracy on the 10,000 test images, and the paired
difference against kd (same subset and seed) with a 95% paired-t interval.

example:  python -m jacfast distill --out experiments/distill""")
    _common(p, os.path.join("experiments", "distill"))
    p.add_argument("--n", type=int, nargs="+", default=[1, 5], help="examples per class (default 1 5)")
    p.add_argument("--methods", nargs="+", choices=ALL_METHODS, default=list(METHODS), metavar="METHOD",
                   help="run at every n; from: " + " ".join(ALL_METHODS) + " (default: " + " ".join(METHODS) + ")")
    p.add_argument("--rq5-methods", nargs="*", choices=ALL_METHODS, default=list(RQ5_METHODS), metavar="METHOD",
                   help="run at --rq5-n only, and timed (default: " + " ".join(RQ5_METHODS) + ")")
    p.add_argument("--rq5-n", type=int, default=1,
                   help="examples per class of the RQ5 comparison (default 1: at 5 the all-outputs and top-5 runs "
                   "exceed the 30-minute budget on 2 shared cores)")
    p.add_argument("--steps", type=int, default=100, help="student optimizer steps per run (default 100)")
    _distill_weights(p)
    p.add_argument("--noise-sigma", type=float, default=0.1,
                   help="sigma of the noise estimator and of sq-noise / sq+jac (default 0.1)")
    p.add_argument("--timing-rounds", type=int, default=5, help="interleaved rounds of the RQ5 timing (default 5)")
    p.add_argument("--jacobian-projections", type=int, default=0,
                   help="sq+jac: estimate ||J_s - J_t||_F^2 from K random projections (default 0: all outputs)")
    p.set_defaults(run=_lazy("distill", p, "distill"))

    p = subparsers.add_parser("prop1", formatter_class=fmt, help="Proposition 1: input noise vs Jacobian matching",
                              description=_INTRO + "\n" + """
Proposition 1: E||f_s(x+e) - f_t(x+e)||^2 = ||f_s(x) - f_t(x)||^2 + sigma^2 ||J_s - J_t||_F^2 + O(sigma^4)
for e ~ N(0, sigma^2 I). Training, at n per class and each sigma: CE + squared-error
distillation on noisy inputs (sq-noise) against CE + clean squared-error distillation +
sigma^2 * ||J_s - J_t||_F^2 (sq+jac, no reweighting; by default estimated from one random
projection per sample and step, unbiased like the single noise draw of sq-noise; see
--jacobian-projections), and CE + clean squared error (sq); paired differences. Then a Monte-Carlo check of both sides at the
trained (teacher, sq student) pairs, with standard errors. The teacher: --teacher, else
experiments/distill/teacher.pt when it exists, else one trained into OUT/teacher.pt.

example:  python -m jacfast prop1 --out experiments/prop1""")
    _common(p, os.path.join("experiments", "prop1"))
    p.add_argument("--n", type=int, default=5, help="examples per class (default 5)")
    p.add_argument("--sigmas", type=float, nargs="+", default=[0.05, 0.1, 0.2], help="noise levels (default 0.05 0.1 0.2)")
    p.add_argument("--steps", type=int, default=100, help="student optimizer steps per run (default 100)")
    p.add_argument("--jacobian-projections", type=int, default=1,
                   help="sq+jac: K random Rademacher projections per sample and step, an unbiased estimate of "
                   "||J_s - J_t||_F^2 (default 1; 0: all 10 outputs, exact, ~10x the cost)")
    p.add_argument("--mc-images-per-class", type=int, default=10,
                   help="test images per class of the Monte-Carlo check (default 10)")
    p.add_argument("--mc-pairs", type=int, default=64, help="antithetic noise pairs per image (default 64)")
    p.set_defaults(run=_lazy("prop1", p, "prop1"))

    p = subparsers.add_parser("robustness", formatter_class=fmt, help="(b) robustness to input noise",
                              description=_INTRO + "\n" + """
(b) Robustness to input noise. The same network (LeNet-style) trained on Fashion-MNIST with the
Jacobian-norm penalty (jacobian), with L2 weight decay (l2), with dropout (dropout) or with none;
test accuracy under Gaussian input noise of each --sigmas, and the paired difference against
none. No teacher is needed.

example:  python -m jacfast robustness --out experiments/robustness""")
    _common(p, os.path.join("experiments", "robustness"))
    methods = ("none", "jacobian", "l2", "dropout")
    p.add_argument("--methods", nargs="+", choices=methods, default=list(methods), metavar="METHOD",
                   help="subset of: " + " ".join(methods) + " (default: all)")
    p.add_argument("--sigmas", type=float, nargs="+", default=[0.0, 0.1, 0.2, 0.3, 0.5], help="test noise levels")
    p.add_argument("--steps", type=int, default=1000, help="optimizer steps per run, batch 64 (default 1000)")
    p.add_argument("--train-size", type=int, default=1000, help="training examples per class (default 1000)")
    p.add_argument("--jacobian-weight", type=float, default=0.1, help="Jacobian-norm penalty weight (default 0.1)")
    p.add_argument("--weight-decay", type=float, default=5e-4, help="L2 weight decay of 'l2' (default 5e-4)")
    p.add_argument("--dropout", type=float, default=0.5, help="dropout rate of 'dropout' (default 0.5)")
    p.set_defaults(run=_lazy("robustness", p, "robustness"))

    p = subparsers.add_parser("transfer", formatter_class=fmt, help="(c) transfer from other Fashion-MNIST classes",
                              description=_INTRO + "\n" + """
(c) Transfer learning with a relevant teacher. A VGG-style teacher trained on all training
images of --source-classes (default 0-4: T-shirt/top, Trouser, Pullover, Dress, Coat) guides
a ResNet-style student learning --target-classes (default 5-9: Sandal, Shirt, Sneaker, Bag,
Ankle boot) from n images per class. First the teacher's relevance: a linear probe on its
frozen features (probe) against training from scratch; then scratch, activation matching
(lwf, a 1x1 conv adapter), attention transfer (at) and attention transfer + the attention-map
Jacobian term (at+jac), each at a shallow (block1) and a deep (block3) layer pair; paired
differences against scratch. Reported: accuracy on every test image of the target classes.

example:  python -m jacfast transfer --out experiments/transfer""")
    _common(p, os.path.join("experiments", "transfer"), teacher_epochs=2)
    tm = ("scratch", "lwf", "at", "at+jac")
    p.add_argument("--n", type=int, nargs="+", default=[5, 20], help="target images per class (default 5 20)")
    p.add_argument("--methods", nargs="+", choices=tm, default=list(tm), metavar="METHOD",
                   help="subset of: " + " ".join(tm) + " (default: all)")
    p.add_argument("--layers", nargs="+", choices=("block1", "block2", "block3"), default=["block1", "block3"],
                   help="hooked layer pairs, shallow and deep (default block1 block3)")
    p.add_argument("--source-classes", type=int, nargs="+", default=[0, 1, 2, 3, 4],
                   help="the teacher's Fashion-MNIST classes (default 0-4)")
    p.add_argument("--target-classes", type=int, nargs="+", default=[5, 6, 7, 8, 9],
                   help="the student's Fashion-MNIST classes (default 5-9)")
    p.add_argument("--steps", type=int, default=200, help="student optimizer steps per run (default 200)")
    p.add_argument("--attention-weight", type=float, default=10.0, help="attention transfer weight (default 10)")
    p.add_argument("--jacobian-weight", type=float, default=1.0, help="attention-map Jacobian weight (default 1)")
    p.add_argument("--activation-weight", type=float, default=1.0, help="LwF activation matching weight (default 1)")
    p.set_defaults(run=_lazy("transfer", p, "transfer"))
