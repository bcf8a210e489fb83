"""(c) Transfer learning with a relevant teacher, an offline analog of ImageNet -> MIT Scenes.

Source: Fashion-MNIST classes ``--source-classes`` (default 0-4: T-shirt/top, Trouser, Pullover,
Dress, Coat; all 30,000 of their training images) train a VGG-style teacher. Target: a
ResNet-style student learns the other classes (default 5-9: Sandal, Shirt, Sneaker, Bag, Ankle
boot, relabelled 0-4) from n training images per class, and is tested on all their test images.

First, whether the teacher is relevant: a linear probe (logistic regression on the teacher's
frozen pooled block3 features, the same n images) against the student trained from scratch.
Then scratch, activation matching (lwf, 1x1-conv adapter), attention transfer (at) and at + the
attention-map Jacobian term (at+jac) at a shallow and a deep layer, paired against scratch
(same subset and seed).
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from jacfast import data as D
from jacfast.experiments import common as C
from jacfast.models import build_model
from jacfast.trainers import TransferTrainer

METHODS = ("scratch", "lwf", "at", "at+jac")


def split_classes(x, y, classes):
    """Rows of ``classes``, labels renumbered 0..len(classes)-1 in the given order."""
    keep = torch.zeros_like(y, dtype=torch.bool)
    new = torch.full_like(y, -1)
    for i, c in enumerate(classes):
        keep |= y == c
        new[y == c] = i
    return x[keep], new[keep]


@torch.no_grad()
def teacher_features(teacher, x, batch=1000):
    """Pooled block3 features (N, 4w) of the VGG teacher (the input of its classifier)."""
    out = []
    for i in range(0, x.shape[0], batch):
        h = teacher.block3(teacher.block2(teacher.block1(x[i:i + batch])))
        out.append(teacher.pool(h).flatten(1))
    return torch.cat(out)


def linear_probe(f_train, y_train, f_test, y_test, classes, seed, steps=500, weight_decay=1e-3) -> float:
    """Multinomial logistic regression on standardized features (full-batch Adam); test accuracy."""
    mu, sd = f_train.mean(0), f_train.std(0).clamp_min(1e-6)
    a, b = (f_train - mu) / sd, (f_test - mu) / sd
    g = torch.Generator().manual_seed(seed)
    w = (0.01 * torch.randn(a.shape[1], classes, generator=g)).requires_grad_(True)
    bias = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.Adam([w, bias], lr=0.01, weight_decay=weight_decay)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(a @ w + bias, y_train).backward()
        opt.step()
    with torch.no_grad():
        return float(((b @ w + bias).argmax(1) == y_test).float().mean())


def _loss(method: str, layer: str, teacher, student, args):
    from jacfast.losses import TransferLoss

    if method == "scratch":
        return None
    if method == "lwf":  # channels differ between the architectures: a trained 1x1 conv adapter
        chans = [next(m.out_channels for m in reversed(list(net.get_submodule(layer).modules()))
                      if isinstance(m, torch.nn.Conv2d)) for net in (teacher, student)]
        return TransferLoss(teacher, student, {layer: layer}, activation_weight=args.activation_weight,
                            attention_weight=0.0, jacobian_weight=0.0,
                            adapters={layer: torch.nn.Conv2d(chans[1], chans[0], 1)})
    return TransferLoss(teacher, student, {layer: layer}, attention_weight=args.attention_weight,
                        jacobian_weight=args.jacobian_weight if method == "at+jac" else 0.0)


def run(args) -> int:
    C.setup(args)
    train, test = C.fashion(args)
    src, tgt = list(args.source_classes), list(args.target_classes)
    if set(src) & set(tgt):
        raise SystemExit(f"--source-classes {src} and --target-classes {tgt} overlap")
    src_train, src_test = split_classes(*train, src), split_classes(*test, src)
    teacher, t_acc = C.teacher(args, src_train, src_test, what=f"Fashion-MNIST classes {src}")
    x_tr, y_tr = split_classes(*train, tgt)
    x_te, y_te = split_classes(*test, tgt)
    f_te = teacher_features(teacher, x_te)
    ns = [1, 2] if args.tiny else args.n
    steps = 4 if args.tiny else args.steps
    rows = [m if m == "scratch" else f"{m}@{layer}" for m in args.methods
            for layer in (["-"] if m == "scratch" else args.layers)]
    results = []
    for n in ns:
        for seed in args.seeds:
            xs, ys = D.subset_per_class(x_tr, y_tr, n, seed=seed)
            probe = linear_probe(teacher_features(teacher, xs), ys, f_te, y_te, len(tgt), seed)
            results.append({"name": f"probe_n{n}_s{seed}", "method": "probe", "n": n, "seed": seed, "test_acc": probe})
            print(f"  probe_n{n}_s{seed}: test acc {probe:.4f}", flush=True)
            for row in rows:
                method, _, layer = row.partition("@")

                def make(run_dir, method=method, layer=layer, seed=seed, xs=xs, ys=ys, n=n, row=row):
                    torch.manual_seed(seed)
                    student = build_model("resnet", width=4 if args.tiny else 8, num_classes=len(tgt))
                    loss = _loss(method, layer, teacher, student, args)
                    return TransferTrainer(teacher if loss is not None else None, student, loss, (xs, ys), seed=seed,
                                           config={"n": n, "method": row, "classes": tgt},
                                           **C.trainer_kw(args, run_dir, steps))
                r = C.run_one(args, f"{row.replace('@', '-')}_n{n}_s{seed}", make, x_te, y_te)
                results.append({**r, "method": row, "n": n, "seed": seed})
    all_rows = ["probe"] + rows
    summ = C.summary(results, lambda r: (r["method"], r["n"]))
    paired = C.paired_by(results, "scratch", "n") if "scratch" in rows else {}
    names = ", ".join(D.FASHION_MNIST_CLASSES[c] for c in tgt)
    md = (C.table(all_rows, ns, summ, "method@layer", "n") + f" Teacher (VGG, classes {src}): {100 * t_acc:.2f}% on "
          f"its classes' test images. Target: {names}, {len(x_te)} test images. probe: logistic regression on the "
          "teacher's frozen pooled block3 features.")
    if paired:
        md += "\n\n## Paired differences against scratch\n\n" + C.paired_table(all_rows, ns, paired, "method@layer",
                                                                              "n", "scratch")
    C.write(args, "transfer", {"teacher_test_acc": t_acc, "source_classes": src, "target_classes": tgt,
                               "runs": results, "summary": [{"method": m, "n": n, **s} for (m, n), s in summ.items()],
                               "paired_vs_scratch": C.paired_list(paired)},
            md, {"transfer": lambda ax: (C.lines(ax, all_rows, ns, summ, "target images per class (n)", logx=True),
                                         ax.set_title(f"Transfer: Fashion-MNIST {src} teacher -> {tgt} student"))})
    return 0
