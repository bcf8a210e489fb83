"""Finite-difference parameter gradients of input-gradient terms (first-order backprop only).

The estimators of :mod:`jacfast.losses.distillation` and :mod:`jacfast.losses.transfer` take
the parameter gradient of sum_{b,k} <grad_x S_k(x_b), g_bk> (g detached, dJ/dJ_s) as that of a
difference of the network's outputs at perturbed inputs, so only ordinary backprop runs:

- ``"central"`` (default): (S_k(x + e g_k) - S_k(x - e g_k)) / 2e, 2K perturbed forwards,
  truncation O(e^2) for smooth networks;
- ``"forward"``: (S_k(x + e g_k) - S_k(x)) / e, K perturbed forwards plus the main forward's
  S_k(x), whose backward joins the rest of the loss's: about half the extra work, truncation
  O(e) (the second directional derivative, (e/2) d^2 S_k / dx^2 [g, g]), so less accurate at
  its own best step.

:func:`fd_directional` says how the step is chosen and what the error is; :func:`forward_many`
runs the perturbed forwards as the main forward ran (BatchNorm batch statistics, dropout masks).
"""
from __future__ import annotations

import contextlib
import math
import warnings
import weakref
from typing import Callable, Optional

import torch
from torch import Tensor, nn

FD_SCHEMES = ("central", "forward")
# Relative steps that balance truncation against O(u / e) round-off for smooth networks:
# central ~ cbrt(u) (measured on a GELU CNN: fp32 gradients within ~3e-5), forward ~ sqrt(u).
_DEFAULT_REL_STEP = {
    "central": {torch.float64: 6e-6, torch.float32: 4.9e-3, torch.float16: 0.1, torch.bfloat16: 0.2},
    "forward": {torch.float64: 1.5e-8, torch.float32: 3.5e-4, torch.float16: 0.03, torch.bfloat16: 0.06},
}


def check_scheme(fd_scheme) -> str:
    if fd_scheme not in FD_SCHEMES:
        raise ValueError(f"fd_scheme must be one of {FD_SCHEMES}, got {fd_scheme!r}")
    return fd_scheme


# ----------------------------------------------------------------------------------------------
# Forwards at perturbed inputs: same batch statistics, same dropout masks
# ----------------------------------------------------------------------------------------------
def _separate_passes(model) -> bool:
    """Whether perturbed copies of a batch must run as separate forwards rather than one
    concatenated batch: a train-mode BatchNorm couples samples, dropout-like modules draw
    random masks per position. Callables that are not modules are treated as such too."""
    if not isinstance(model, nn.Module):
        return True
    for m in model.modules():
        if not m.training:
            continue
        if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd)):
            return True
        if any(isinstance(getattr(m, a, None), float) and getattr(m, a) > 0 for a in ("dropout", "drop_prob")):
            return True
    return False


@contextlib.contextmanager
def _frozen_running_stats(model):
    """Extra forwards must not update BatchNorm running statistics. They run on copies of the
    buffers, and the originals are put back by attribute (never written in place: the main
    forward's graph has saved them, and an in-place write would invalidate its backward)."""
    mods = [m for m in (model.modules() if isinstance(model, nn.Module) else ())
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats]
    names = ("running_mean", "running_var", "num_batches_tracked")
    saved = [{n: getattr(m, n) for n in names if getattr(m, n) is not None} for m in mods]
    for m, bufs in zip(mods, saved):
        for n, b in bufs.items():
            setattr(m, n, b.clone())
    try:
        yield
    finally:
        for m, bufs in zip(mods, saved):
            for n, b in bufs.items():
                setattr(m, n, b)


def rng_state(device: torch.device):
    """RNG state to replay before perturbed forwards (so dropout masks equal the main forward's)."""
    return torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def forward_many(model, fn: Callable[[Tensor], Tensor], xs: list, state, separate: Optional[bool] = None) -> list:
    """``fn(x_i)`` for each perturbed batch x_i (each (B, ...)), as if each were the main forward:

    concatenated into one batch when the model is sample-independent and deterministic, else
    one forward each with the RNG replayed to ``state`` and BatchNorm running stats untouched.
    ``separate=True`` forces one forward each (a model called with other inputs of the batch's
    size: an attention mask cannot be concatenated along with x). The global RNG continues as
    if these forwards had not happened.
    """
    if not (separate or _separate_passes(model)):
        return list(fn(torch.cat(xs)).split(xs[0].shape[0]))
    cpu, cuda = state
    device = xs[0].device
    outs = []
    with torch.random.fork_rng(devices=[device] if cuda is not None else []), _frozen_running_stats(model):
        for xp in xs:
            torch.set_rng_state(cpu)
            if cuda is not None:
                torch.cuda.set_rng_state(cuda, device)
            outs.append(fn(xp))
    return outs


_KINKED = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.Hardtanh, nn.modules.pooling._MaxPoolNd)
_warned: "weakref.WeakSet" = weakref.WeakSet()


def _warn_kinks(model) -> None:
    """Once per model: the finite-difference gradient is unreliable at ReLU / max-pool kinks."""
    if not isinstance(model, nn.Module) or model in _warned:
        return
    _warned.add(model)
    kinked = sorted({type(m).__name__ for m in model.modules() if isinstance(m, _KINKED)})
    if kinked:
        warnings.warn(f"estimator='finite_difference' on a network with {', '.join(kinked)}: its parameter "
                      "gradient is wrong by O(1/step) wherever a perturbation crosses a kink (see "
                      "jacfast.losses.finite_difference.fd_directional); prefer estimator='exact' or smooth "
                      "activations", stacklevel=3)


def default_rel_step(dtype: torch.dtype, scheme: str = "central") -> float:
    return _DEFAULT_REL_STEP[check_scheme(scheme)].get(dtype, 1e-3 if scheme == "central" else 3e-5)


def fd_directional(model, fn: Callable[[Tensor], Tensor], x: Tensor, g: Tensor, *, rel_step: Optional[float] = None,
                   state=None, base: Optional[Tensor] = None, separate: Optional[bool] = None) -> Tensor:
    """sum_{b,k} <grad_x fn(x)[b, k], g[b, k]> by finite differences, differentiable wrt parameters.

    Args:
        model: the module ``fn`` runs (to detect batch coupling / dropout; see :func:`forward_many`).
        fn: (N, *x.shape[1:]) -> (N, K) selected scalar outputs; row n belongs to sample n % B.
        x: (B, *input_dims). g: (B, K, *input_dims), detached directions (dJ/dJ_s).
        rel_step: step length relative to ||x_b|| (default :func:`default_rel_step` of x's dtype,
            or of the autocast dtype inside ``torch.autocast``, for the scheme).
        state: :func:`rng_state` captured before the main forward.
        base: None for central differences; for forward differences fn(x) (B, K) from the main
            forward, with its graph (its parameter gradient is part of the estimate).
        separate: True to run each perturbed batch as its own forward (see :func:`forward_many`).

    Per (b, k) the step is e_bk = rel_step * ||x_b|| / ||g_bk|| (so ||e g|| = rel_step ||x_b||;
    sqrt(D) replaces ||x_b|| = 0). With separate passes (BatchNorm in training couples samples)
    one e_k per output is shared by the batch, which keeps the difference an exact directional
    derivative of the summed outputs.

    Bias. Smooth networks (tanh, GELU, SiLU, softplus): the central difference is exact up to
    O(e^2) (third derivatives) plus round-off O(u / rel_step); the default step ~ cbrt(u)
    balances them (fp32: ~3e-5 relative on a GELU CNN, fp64: ~1e-8).
    ReLU / max-pool kinks: between kinks the network is piecewise linear and the difference is
    exact (round-off only). But the *parameter gradient* of S jumps by O(1) where a
    pre-activation changes sign, so a unit whose sign differs between x - e g and x + e g adds
    an O(1 / e) error, with probability O(e): the error does not shrink with e on average (it
    is the kinks' Dirac second derivative, which double backward drops, sampled along +-e g)
    and is heavy-tailed (measured: one crossing in a 300-unit CNN gives
    errors of 1-20x the gradient norm). It matches the exact estimator only when no unit
    crosses, i.e. for inputs far enough from kinks or a step below the kink margin (then
    limited by round-off, ~1e-7 / rel_step in fp32). Prefer smooth activations in students
    trained with this estimator. Low precision: pass a larger step or run the network in fp32.
    Forward differences (``base`` given): the same, with truncation O(e) instead of O(e^2) for
    smooth networks (default step ~ sqrt(u): fp32 ~1e-3 relative on a GELU CNN), and exact
    between kinks of a piecewise-linear network just as the central difference is.
    """
    _warn_kinks(model)
    B, K = g.shape[:2]
    dtype = x.dtype  # under autocast the network computes (and rounds) in the autocast dtype
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
    scheme = "central" if base is None else "forward"
    rel = default_rel_step(dtype, scheme) if rel_step is None else float(rel_step)
    if not rel > 0:
        raise ValueError(f"the finite-difference step must be positive, got {rel_step!r}")
    gf = g.detach().reshape(B, K, -1)
    gnorm = torch.linalg.vector_norm(gf, dim=2)  # (B, K)
    xnorm = torch.linalg.vector_norm(x.detach().reshape(B, -1), dim=1)  # (B,)
    h = rel * torch.where(xnorm > 0, xnorm, torch.full_like(xnorm, math.sqrt(gf.shape[2])))
    separate = bool(separate) or _separate_passes(model)
    tiny = torch.finfo(gnorm.dtype).tiny
    if separate:  # one step per output k for the whole batch
        rms = gnorm.pow(2).mean(0).sqrt()
        eps = torch.where(rms > 0, h.mean() / rms.clamp_min(tiny), torch.ones_like(rms)).expand(B, K)
    else:  # rows with g = 0 contribute nothing; any finite step will do for them
        eps = torch.where(gnorm > 0, h[:, None] / gnorm.clamp_min(tiny), torch.ones_like(gnorm))
    step = (eps[..., None] * gf).reshape(g.shape)  # (B, K, *input_dims)
    xs = [x + step[:, k] for k in range(K)] + ([x - step[:, k] for k in range(K)] if base is None else [])
    outs = forward_many(model, fn, xs, state if state is not None else rng_state(x.device), separate)
    plus = torch.stack([outs[k][:, k] for k in range(K)], 1)
    if base is not None:
        if base.shape != plus.shape:
            raise ValueError(f"base must be fn(x) of shape {tuple(plus.shape)}, got {tuple(base.shape)}")
        return ((plus - base.to(plus.dtype)) / eps.to(plus.dtype)).sum()
    minus = torch.stack([outs[K + k][:, k] for k in range(K)], 1)
    return ((plus - minus) / (2 * eps.to(plus.dtype))).sum()
