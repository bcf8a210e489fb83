"""``python -m jacfast check``: which backends are available here, each verified against the oracle."""
from __future__ import annotations

import itertools

import torch

import jacfast
from jacfast import reference

TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-12}


def register(subparsers) -> None:
    parser = subparsers.add_parser("check", help="list the backends and verify each against the PyTorch oracle",
                                   description=__doc__)
    parser.add_argument("--seed", type=int, default=0, help="seed of the random test rows (default 0)")
    parser.set_defaults(run=run)


def _verify(backend: str, device: torch.device, seed: int) -> float:
    """Largest relative error (loss and gradient) over kinds x reductions x dtypes, scaled by tolerance."""
    gen = torch.Generator().manual_seed(seed)
    worst = 0.0
    for kind, reduction, dtype in itertools.product(("normalized", "squared", "norm"), ("none", "sum", "mean"), TOLERANCE):
        student = torch.randn(5, 3, 257, generator=gen, dtype=torch.float64).to(device, dtype)
        teacher = None if kind == "norm" else torch.randn(5, 3, 257, generator=gen, dtype=torch.float64).to(device, dtype)
        loss, grad = jacfast.jacobian_matching_loss_and_grad(student, teacher, kind=kind, reduction=reduction, backend=backend)
        s64 = student.double().requires_grad_(True)
        ref = reference.jacobian_matching_loss(s64, None if teacher is None else teacher.double(), kind=kind, reduction=reduction)
        (ref_grad,) = torch.autograd.grad(ref.sum(), s64)
        for got, want in ((loss, ref), (grad, ref_grad)):
            err = (torch.linalg.vector_norm(got.double() - want.detach()) / torch.linalg.vector_norm(want.detach())).item()
            worst = max(worst, err / TOLERANCE[dtype])
    return worst


def run(args) -> int:
    status = jacfast.backends()
    print("backend  available  notes")
    for entry in status.values():
        print(f"  {entry}")
    failures = 0
    print("\nverification against the float64 oracle (error / tolerance; <= 1 passes):")
    for name, entry in status.items():
        if not entry.available or name == "torch":
            continue
        device = torch.device("cuda" if name in ("cuda", "triton") and torch.cuda.is_available() else "cpu")
        score = _verify(name, device, args.seed)
        ok = score <= 1.0
        failures += not ok
        print(f"  {name:7s} on {device.type}: {score:.3g}  {'PASS' if ok else 'FAIL'}")
    return 1 if failures else 0
