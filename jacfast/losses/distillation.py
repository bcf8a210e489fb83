"""Distillation with Jacobian matching (Srinivas & Fleuret, ICML 2018) and the Jacobian-norm penalty.

:class:`DistillationLoss` ``(student, x, target) -> DistillationOutput``::

    total = ce_weight  * CE(S(x), y)
          + kd_weight  * T^2 * KL(softmax(T(x)/T) || softmax(S(x)/T))        (Hinton et al.)
          + beta       * J                                                    (Jacobian term)

where J = ``jacobian_matching_loss(J_s, J_t, kind=kind, reduction="mean")`` over the selected
outputs (the teacher's top-k by default, the paper's choice; or the target class; or all).
J_s, J_t: (B, K, *x.shape[1:]), rows grad_x S_k(x) and grad_x T_k(x) for the SAME outputs k.

Estimators of J and of its parameter gradient (``estimator=``):

- ``"exact"``: student rows with ``create_graph=True``; ``backward`` double-differentiates.
- ``"finite_difference"``: first-order only. Student rows without a graph, then
  g = dJ/dJ_s from ``jacobian_matching_loss_and_grad`` (no autograd) and the parameter
  gradient of J is that of the directional derivative sum_{b,k} <grad_x S_k(x_b), g_bk>, taken
  by a central difference (S_k(x + e g_k) - S_k(x - e g_k)) / 2e with ordinary backprop, or
  with ``fd_scheme="forward"`` by (S_k(x + e g_k) - S_k(x)) / e (half the perturbed passes,
  first-order accurate). The returned J has the exact value:
  ``J = value + (surrogate - surrogate.detach())``. Works for students whose ops have no
  double backward (fused attention, cuDNN RNNs, ``once_differentiable`` Functions). See
  :mod:`jacfast.losses.finite_difference` for the step and its bias.
- ``"noise"``: Proposition 1 itself. For inputs x + xi, xi ~ N(0, sigma^2 I),
  E||T(x+xi) - S(x+xi)||^2 = ||T(x) - S(x)||^2 + sigma^2 sum_k ||grad T_k - grad S_k||^2 + O(sigma^4)
  (exact for affine T, S), so J = (E||.||^2_noisy - ||.||^2_clean) / sigma^2 over the selected
  outputs estimates the ``"squared"`` kind. Antithetic pairs (xi, -xi) cancel the O(sigma)
  noise term; ``noise_samples`` pairs are averaged. Caveat: the proposition's first-order
  expansion drops sigma^2 <T(x) - S(x), Laplacian_x (T - S)(x)>, of the same order as the
  Jacobian term. It is zero for affine networks and for ReLU networks once sigma is below
  the distance of x to the nearest kink (Laplacian zero off the kinks), but not for smooth
  activations or larger sigma, where this estimator is biased unless S(x) = T(x).
  Minimizing it is unstable: the clean error enters with a minus sign, so for a non-affine
  student the estimate is not bounded below. In experiment (a) (ReLU student, sigma 0.1,
  beta 0.1) every run diverged to chance accuracy with J near -1e13 (experiments/README.md):
  use this estimator to measure the term, or train with small sigma and beta and watch J.

The teacher's rows are computed without a graph and without parameter gradients. The
teacher is not a submodule of the loss (its mode and device stay yours: use ``teacher.eval()``).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from jacfast.losses.finite_difference import check_scheme, fd_directional, forward_many, rng_state

ESTIMATORS = ("exact", "finite_difference", "noise")
SELECTIONS = ("topk", "target", "all")


class TeacherOutputs(NamedTuple):
    """Teacher quantities for one batch (what :class:`jacfast.TeacherCache` returns).

    logits (B, C); jac (B, K, *input_dims) or None; indices (B, K) int64: the selected outputs.
    """

    logits: Tensor
    jac: Optional[Tensor]
    indices: Tensor


class DistillationOutput(NamedTuple):
    """total (scalar, what to ``backward``); ce, kd, jacobian: the unweighted components
    (scalars; 0 when their weight is 0); logits: the student's (B, C), with their graph."""

    total: Tensor
    ce: Tensor
    kd: Tensor
    jacobian: Tensor
    logits: Tensor

    def scalars(self) -> dict:
        """Components as floats, for logging."""
        return {k: float(getattr(self, k).detach()) for k in ("total", "ce", "kd", "jacobian")}


# ----------------------------------------------------------------------------------------------
# Checks and the part-1 adapter (jacfast.jacobians is imported lazily)
# ----------------------------------------------------------------------------------------------
def _check_input(x) -> None:
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating torch.Tensor, got {type(x).__name__}"
                        + (f" of dtype {x.dtype}" if isinstance(x, Tensor) else ""))
    if x.ndim < 2 or x.shape[0] == 0:
        raise ValueError(f"x must have a non-empty batch dimension, shape (B, *input_dims); got {tuple(x.shape)}")


def _check_logits(out, batch: int, who: str) -> Tensor:
    if not isinstance(out, Tensor) or out.ndim != 2 or out.shape[0] != batch:
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"the {who}'s output must be logits of shape (B={batch}, C); got {shape}")
    return out


def _check_target(target, batch: int, classes: Optional[int] = None) -> Tensor:
    if not isinstance(target, Tensor) or target.dtype not in (torch.int64, torch.int32) or target.shape != (batch,):
        raise ValueError(f"target must be an integer tensor of shape (B={batch},); got "
                         f"{tuple(target.shape) if isinstance(target, Tensor) else type(target).__name__}")
    if classes is not None and target.numel() and (int(target.min()) < 0 or int(target.max()) >= classes):
        raise ValueError(f"target holds class indices outside [0, {classes})")
    return target.long()


def _selections():
    """Part 1's selection factories (``jacfast.jacobians.select``), imported lazily."""
    from jacfast.jacobians import select

    return select


def input_jacobians(model, x, selection, *, create_graph=False, strategy="auto"):
    """``jacfast.jacobians.input_jacobians`` (imported when first used); ``"auto"`` also
    chooses the input layout (:func:`jacfast.fast_rows.fast_input_jacobians`)."""
    from jacfast.jacobians import input_jacobians as impl

    if strategy == "auto":
        from jacfast.fast_rows import fast_input_jacobians

        return fast_input_jacobians(model, x, selection, create_graph=create_graph)
    return impl(model, x, selection, create_graph=create_graph, strategy=strategy)


def _pick(out: Tensor, idx: Optional[Tensor], proj: Optional[Tensor]) -> Tensor:
    """Selected scalar outputs (N, K) of logits (N, C): ``out[n, idx[n % B, k]]`` or ``<out_n, proj[n % B, k]>``."""
    reps = out.shape[0] // (idx if proj is None else proj).shape[0]
    if proj is None:
        return out.gather(1, idx.repeat(reps, 1))
    return torch.einsum("nc,nkc->nk", out, proj.to(out.dtype).repeat(reps, 1, 1))


def _first_order_rows(values: Tensor, x_in: Tensor) -> Tensor:
    """Rows grad_x values[:, k].sum() for each k, (B, K, *x.shape[1:]), no graph; keeps the forward graph."""
    rows = []
    for k in range(values.shape[1]):
        (g,) = torch.autograd.grad(values[:, k].sum(), x_in, retain_graph=True, allow_unused=True)
        rows.append(torch.zeros_like(x_in) if g is None else g)  # an output that ignores x: zero row
    return torch.stack(rows, 1)


def _attach(value: Tensor, surrogate: Tensor) -> Tensor:
    """``value`` in the forward, ``surrogate``'s gradient in the backward."""
    return value.detach().to(surrogate.dtype) + (surrogate - surrogate.detach())


# ----------------------------------------------------------------------------------------------
# DistillationLoss
# ----------------------------------------------------------------------------------------------
class DistillationLoss(nn.Module):
    """CE + KD + beta * Jacobian matching (see the module docstring for the formula).

    Args:
        teacher: the teacher network x -> (B, C); may be None when every call passes
            ``teacher_outputs`` (a teacher cache), except for ``estimator="noise"``.
        ce_weight: weight of the cross-entropy on labels (default 1.0; 0 skips it).
        kd_weight: weight of the temperature-softened KL (default 1.0; 0 skips it).
        beta: weight of the Jacobian term (default 1.0; 0 skips it, and the teacher's rows).
            The normalized kind is bounded by 4 per selected output and sample.
        temperature: T of the KD term (default 4.0); the term is scaled by T^2.
        select: "topk" (the teacher's top-k outputs, default), "target" (the label) or "all".
        k: K for "topk" (default 1).
        kind: "normalized" (default) | "squared" | None (default: "normalized", or "squared"
            for the noise estimator, which estimates only that kind).
        estimator: "exact" (default) | "finite_difference" | "noise".
        fd_step: relative step of the finite-difference estimator (default: by dtype and
            scheme, see :func:`jacfast.losses.finite_difference.fd_directional`).
        fd_scheme: "central" (default: 2K perturbed forwards, O(step^2) truncation) or
            "forward" (K perturbed forwards and the main one, O(step) truncation).
        noise_sigma, noise_samples: Gaussian sigma (absolute, in input units; default 0.05)
            and number of antithetic pairs (default 1) of the noise estimator.
        strategy: passed to ``input_jacobians``; backend: to ``jacobian_matching_loss``.

    Call: ``loss(student, x, target=None, *, teacher_outputs=None) -> DistillationOutput``,
    x (B, *input_dims), target (B,) int64 (needed when ce_weight > 0 or select="target"),
    teacher_outputs a :class:`TeacherOutputs` (logits (B, C), jac (B, K, *input_dims),
    indices (B, K)) that replaces the teacher's computation.
    """

    def __init__(self, teacher: Optional[nn.Module] = None, *, ce_weight: float = 1.0, kd_weight: float = 1.0,
                 beta: float = 1.0, temperature: float = 4.0, select: str = "topk", k: int = 1,
                 kind: Optional[str] = None, estimator: str = "exact", fd_step: Optional[float] = None,
                 fd_scheme: str = "central", noise_sigma: float = 0.05, noise_samples: int = 1,
                 strategy: str = "auto", backend: str = "auto"):
        super().__init__()
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
        self.fd_scheme = check_scheme(fd_scheme)
        if select not in SELECTIONS:
            raise ValueError(f"select must be one of {SELECTIONS}, got {select!r}")
        if kind is None:
            kind = "squared" if estimator == "noise" else "normalized"
        if kind not in ("normalized", "squared"):
            raise ValueError(f"kind must be 'normalized' or 'squared', got {kind!r}")
        if estimator == "noise" and kind != "squared":
            raise ValueError("estimator='noise' (Proposition 1) estimates the 'squared' kind only")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        for name, v in (("ce_weight", ce_weight), ("kd_weight", kd_weight), ("beta", beta)):
            if not v >= 0:
                raise ValueError(f"{name} must be >= 0, got {v!r}")
        if not temperature > 0 or not noise_sigma > 0 or int(noise_samples) < 1:
            raise ValueError("temperature and noise_sigma must be > 0 and noise_samples >= 1")
        # Not registered as a submodule: loss.parameters() stays empty, loss.train() leaves it alone.
        self.__dict__["teacher"] = teacher
        self.ce_weight, self.kd_weight, self.beta, self.temperature = ce_weight, kd_weight, beta, temperature
        self.select, self.k, self.kind, self.estimator, self.fd_step = select, k, kind, estimator, fd_step
        self.noise_sigma, self.noise_samples = float(noise_sigma), int(noise_samples)
        self.strategy, self.backend = strategy, backend

    def extra_repr(self) -> str:
        return (f"ce_weight={self.ce_weight}, kd_weight={self.kd_weight}, beta={self.beta}, T={self.temperature}, "
                f"select={self.select!r}, k={self.k}, kind={self.kind!r}, estimator={self.estimator!r}"
                + (f", fd_scheme={self.fd_scheme!r}" if self.estimator == "finite_difference" else ""))

    # -- teacher --------------------------------------------------------------------------------
    def _selection(self, target):
        sel = _selections()
        if self.select == "topk":
            return sel.topk(self.k)
        return sel.target(target) if self.select == "target" else sel.all()

    def _teacher_outputs(self, x: Tensor, target, given, need_jac: bool) -> TeacherOutputs:
        B = x.shape[0]
        if given is not None:
            logits, jac, idx = given
            logits = _check_logits(logits, B, "teacher cache").to(x.device, x.dtype)
            if not isinstance(idx, Tensor) or idx.ndim != 2 or idx.shape[0] != B or idx.dtype.is_floating_point:
                raise ValueError(f"teacher_outputs.indices must be an integer tensor (B={B}, K)")
            C = logits.shape[1]
            if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= C):
                raise ValueError(f"teacher_outputs.indices out of range: values in [{int(idx.min())}, "
                                 f"{int(idx.max())}] for C = {C} outputs")
            if need_jac:
                want = (B, idx.shape[1], *x.shape[1:])
                if jac is None or tuple(jac.shape) != want:
                    raise ValueError(f"teacher_outputs.jac must have shape {want}; got "
                                     f"{None if jac is None else tuple(jac.shape)}")
                jac = jac.to(x.device, x.dtype)
            return TeacherOutputs(logits, jac, idx.to(x.device).long())
        if self.teacher is None:
            raise ValueError("no teacher: pass one to DistillationLoss or teacher_outputs= to the call")
        if not need_jac:
            with torch.no_grad():
                logits = _check_logits(self.teacher(x), B, "teacher")
            idx = self._selection(target).resolve(logits)[0]  # same fused top-k and tie rule as part 1
            return TeacherOutputs(logits, None, idx)
        logits, jac, idx = input_jacobians(self.teacher, x.detach(), self._selection(target), strategy=self.strategy)
        return TeacherOutputs(logits.detach(), jac.detach(), idx)

    # -- forward --------------------------------------------------------------------------------
    def forward(self, student, x: Tensor, target: Optional[Tensor] = None, *,
                teacher_outputs: Optional[TeacherOutputs] = None) -> DistillationOutput:
        _check_input(x)
        B = x.shape[0]
        if target is not None:
            target = _check_target(target, B)
        elif self.ce_weight > 0 or self.select == "target":
            raise ValueError("target is required when ce_weight > 0 or select='target'")
        need_jac = self.beta > 0 and self.estimator != "noise"
        t = self._teacher_outputs(x, target, teacher_outputs, need_jac)
        zero = x.new_zeros(())
        weighted = None  # beta * jac, where the loss head forms it
        if not self.beta > 0:
            logits, jac = _check_logits(student(x), B, "student"), zero
        elif self.estimator == "exact":
            sel = _selections().indices(t.indices)
            logits, J_s, _ = input_jacobians(student, x, sel, create_graph=True, strategy=self.strategy)
            # beta goes into the kernel: its gradient then reaches the loss head as 1, which the
            # fused backends hand over without a pass to scale it
            weighted = _jm().jacobian_matching_loss(J_s, t.jac.to(J_s.dtype), kind=self.kind, backend=self.backend,
                                                    weight=self.beta)
            jac = weighted / self.beta
        elif self.estimator == "finite_difference":
            logits, jac = self._finite_difference(student, x, t)
        else:
            logits, jac = self._noise(student, x, t)
        logits = _check_logits(logits, B, "student")
        if logits.shape[1] != t.logits.shape[1]:
            raise ValueError(f"student has {logits.shape[1]} outputs but the teacher {t.logits.shape[1]}")
        ce = F.cross_entropy(logits, _check_target(target, B, logits.shape[1])) if self.ce_weight > 0 else zero
        kd = zero
        if self.kd_weight > 0:
            T = self.temperature
            # At least fp32 even under autocast: a bf16 KL of near-equal distributions can come out < 0.
            wide = torch.promote_types(logits.dtype, torch.float32)
            kd = F.kl_div(F.log_softmax(logits.to(wide) / T, 1), F.log_softmax(t.logits.to(wide) / T, 1),
                          reduction="batchmean", log_target=True) * (T * T)
        total = self.ce_weight * ce + self.kd_weight * kd + (self.beta * jac if weighted is None else weighted)
        return DistillationOutput(total, ce, kd, jac, logits)

    def _finite_difference(self, student, x: Tensor, t: TeacherOutputs):
        # One forward with a graph (kept for CE/KD), K first-order row backwards, one fused
        # loss-and-grad pass, then 2K (central) or K (forward) perturbed forwards whose
        # backward is ordinary backprop.
        x_in = x if x.requires_grad else x.detach().requires_grad_(True)
        state = rng_state(x.device)
        logits = _check_logits(student(x_in), x.shape[0], "student")
        J_s = _first_order_rows(_pick(logits, t.indices, None), x_in)
        value, g = _jm().jacobian_matching_loss_and_grad(J_s, t.jac.to(J_s.dtype), kind=self.kind,
                                                         backend=self.backend)
        base = _pick(logits, t.indices, None) if self.fd_scheme == "forward" else None
        surrogate = fd_directional(student, lambda xp: _pick(student(xp), t.indices, None), x, g,
                                   rel_step=self.fd_step, state=state, base=base)
        return logits, _attach(value, surrogate)

    def _noise(self, student, x: Tensor, t: TeacherOutputs):
        if self.teacher is None:
            raise ValueError("estimator='noise' runs the teacher on noisy inputs: pass a teacher")
        state = rng_state(x.device)
        logits = _check_logits(student(x), x.shape[0], "student")
        idx, sigma = t.indices, self.noise_sigma
        clean = (_pick(logits, idx, None) - _pick(t.logits.to(logits.dtype), idx, None)).pow(2).sum(1)
        xs = []
        for _ in range(self.noise_samples):
            xi = torch.randn_like(x) * sigma  # drawn after `state`: the replay does not repeat it
            xs += [x + xi, x - xi]
        with torch.no_grad():
            t_noisy = forward_many(self.teacher, lambda xp: _pick(self.teacher(xp), idx, None), xs, state)
        s_noisy = forward_many(student, lambda xp: _pick(student(xp), idx, None), xs, state)
        noisy = sum((s - tt.to(s.dtype)).pow(2).sum(1) for s, tt in zip(s_noisy, t_noisy)) / len(xs)
        return logits, (noisy - clean).mean() / sigma**2


def _jm():
    from jacfast import loss  # the core loss API, imported lazily

    return loss


# ----------------------------------------------------------------------------------------------
# Jacobian-norm penalty on one model
# ----------------------------------------------------------------------------------------------
def jacobian_penalty(model, x: Tensor, *, num_projections: Optional[int] = 1, estimator: str = "exact",
                     fd_step: Optional[float] = None, fd_scheme: str = "central", strategy: str = "auto",
                     backend: str = "auto", return_logits: bool = False):
    """Jacobian-norm regularizer: an estimate of mean_b ||d model(x_b) / d x_b||_F^2.

    Args:
        model: x (B, *input_dims) -> (B, C).
        x: (B, *input_dims).
        num_projections: K random Rademacher output projections v (entries +-1, E[v v^T] = I)
            per sample (Hutchinson: E ||v^T J||^2 = ||J||_F^2; the estimate averages the K rows);
            None for all C outputs (exact, C backward passes).
        estimator: "exact" (double backward) | "finite_difference" (first-order only, as in
            :class:`DistillationLoss`; exact value, finite-difference parameter gradient).
        fd_step, fd_scheme: the finite-difference step and scheme, as in :class:`DistillationLoss`.
        return_logits: also return the model's logits (B, C) from the same forward (with graph).

    Returns:
        A differentiable scalar (and the logits when ``return_logits``).
    """
    _check_input(x)
    if estimator not in ("exact", "finite_difference"):
        raise ValueError(f"estimator must be 'exact' or 'finite_difference', got {estimator!r}")
    check_scheme(fd_scheme)
    if num_projections is not None and (isinstance(num_projections, bool) or not isinstance(num_projections, int)
                                        or num_projections < 1):
        raise ValueError(f"num_projections must be a positive int or None (all outputs), got {num_projections!r}")
    B, scale = x.shape[0], 1.0 / (num_projections or 1)  # the K projected rows are averaged
    if estimator == "exact":
        sel = _selections()
        sel = sel.all() if num_projections is None else sel.projections(num_projections)
        logits, rows, _ = input_jacobians(model, x, sel, create_graph=True, strategy=strategy)
        pen = _jm().jacobian_norm_penalty(rows, backend=backend, weight=scale)  # in the kernel's scale
        return (pen, logits) if return_logits else pen
    # finite_difference: own forward (its graph serves the logits), first-order rows only
    x_in = x if x.requires_grad else x.detach().requires_grad_(True)
    state = rng_state(x.device)
    logits = _check_logits(model(x_in), B, "model")
    C = logits.shape[1]
    if num_projections is None:
        idx, proj = torch.arange(C, device=x.device).expand(B, C), None
    else:  # (B, K, C) Rademacher directions, drawn after `state` so the replayed passes do not repeat them
        idx = None
        proj = torch.randint(0, 2, (B, num_projections, C), device=x.device).to(logits.dtype).mul_(2).sub_(1)
    rows = _first_order_rows(_pick(logits, idx, proj), x_in)
    value, g = _jm().jacobian_matching_loss_and_grad(rows, kind="norm", backend=backend)
    base = _pick(logits, idx, proj) if fd_scheme == "forward" else None
    surrogate = fd_directional(model, lambda xp: _pick(model(xp), idx, proj), x, g * scale,
                               rel_step=fd_step, state=state, base=base)
    pen = _attach(value * scale, surrogate)
    return (pen, logits) if return_logits else pen
