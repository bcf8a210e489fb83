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

Models as users write them (``outputs=``, ``inputs=``: :class:`jacfast.ModelCall`): ``x`` may
be a tuple or dict of inputs (``inputs="inputs_embeds"`` is differentiated, an attention mask
rides along), the logits a dict entry / attribute / tuple item. ``teacher_outputs=`` picks the
teacher's logits when it returns something else than the student; ``input_adapter`` maps the
student's differentiated input to the teacher's (another embedding width): the teacher's rows
are then those of ``teacher(adapter(x))`` with respect to ``x``, so both are (B, K, *x.shape[1:]).
The adapter runs without a graph in the Jacobian term (a learned adapter is not trained by it).

Sequence outputs (B, L, C): the selection applies per position at ``positions=`` (see
:mod:`jacfast.sequence`); the Jacobian term sums the K' = P * Kp rows of a sample and averages
over samples (zero rows of ignored positions add exactly 0; a batch with every position
ignored gives J = 0). CE is the mean over positions whose target is not ``ignore_index``
(0 when there is none); KD the mean over positions (those of a bool ``positions`` mask if
given) of the per-position KL. Cost per step: the teacher's K' backward passes (or one
batched), the student's K' double-backward rows (exact), or K' first-order rows and 2K'
(central) / K' (forward) perturbed forwards (finite differences).

Precision: under ``torch.autocast`` the networks run in the autocast dtype; the rows come back
in the dtype of the differentiated input (autograd returns a leaf's gradient in its dtype:
float32 for float32 x), the loss head runs with autocast disabled on rows of at least float32
(the teacher's rows are cast to the student's), and CE/KD are computed in at least float32.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from jacfast.jacobian_strategies import Rows, _no_donated_buffers
from jacfast.jacobians import jacobians_of
from jacfast.model_io import ModelCall
from jacfast.selection import select as select_
from jacfast.sequence import freeze
from jacfast.losses.common import (  # noqa: F401  (re-exported)
    Selected,
    _attach,
    _check_input,
    _check_logits,
    _check_target,
    _first_order_rows,
    _jm,
)
from jacfast.losses.finite_difference import check_scheme, fd_directional, forward_many, rng_state

ESTIMATORS = ("exact", "finite_difference", "noise")
SELECTIONS = ("topk", "target", "all", "projections")


class TeacherOutputs(NamedTuple):
    """Teacher quantities for one batch (what :class:`jacfast.TeacherCache` returns).

    logits (B, C) or (B, L, C); jac (B, K, *input_dims) or None; indices (B, K) int64: the
    selected outputs (sequence outputs: position * C + class, -1 for zero rows).
    """

    logits: Tensor
    jac: Optional[Tensor]
    indices: Tensor


class DistillationOutput(NamedTuple):
    """total (scalar, what to ``backward``); ce, kd, jacobian: the unweighted components
    (scalars; 0 when their weight is 0); logits: the student's (B, C) or (B, L, C), with their graph."""

    total: Tensor
    ce: Tensor
    kd: Tensor
    jacobian: Tensor
    logits: Tensor

    def scalars(self) -> dict:
        """Components as floats, for logging."""
        return {k: float(getattr(self, k).detach()) for k in ("total", "ce", "kd", "jacobian")}


def _low(dtype: torch.dtype) -> bool:
    return dtype in (torch.float16, torch.bfloat16)


def _head_rows(J_s: Tensor, J_t: Tensor) -> tuple[Tensor, Tensor]:
    """Rows for the loss head: at least float32 (see the module docstring), the teacher's in the student's dtype."""
    if _low(J_s.dtype):
        J_s = J_s.float()
    return J_s, J_t.to(J_s.dtype)


def _no_autocast(device: torch.device):
    return torch.autocast(device.type, enabled=False)


# ----------------------------------------------------------------------------------------------
# DistillationLoss
# ----------------------------------------------------------------------------------------------
class DistillationLoss(nn.Module):
    """CE + KD + beta * Jacobian matching (see the module docstring for the formula).

    Args:
        teacher: the teacher network x -> (B, C) or (B, L, C); may be None when every call
            passes ``teacher_outputs`` (a teacher cache), except for ``estimator="noise"``.
        ce_weight: weight of the cross-entropy on labels (default 1.0; 0 skips it).
        kd_weight: weight of the temperature-softened KL (default 1.0; 0 skips it).
        beta: weight of the Jacobian term (default 1.0; 0 skips it, and the teacher's rows).
            The normalized kind is bounded by 4 per selected output and sample.
        temperature: T of the KD term (default 4.0); the term is scaled by T^2.
        select: "topk" (the teacher's top-k outputs, default), "target" (the label), "all" or
            "projections" (k random Rademacher output directions, the same for teacher and
            student within a call).
        k: K for "topk" and "projections" (default 1); per position for sequence outputs.
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
        outputs, inputs: how the student (and teacher) are called (:class:`jacfast.ModelCall`).
        positions: for sequence outputs: None (all), a bool mask (B, L), positions (B, P) /
            (P,), or ``select.sample(m, seed=0)`` (one draw per call, shared by teacher and student).
        teacher_outputs: the teacher's ``outputs=`` when it differs from the student's.
        input_adapter: callable mapping the student's differentiated input to the teacher's.
        ignore_index: target value of positions without a label (sequence targets; default -100).

    Call: ``loss(student, x, target=None, *, teacher_outputs=None) -> DistillationOutput``,
    x the model input (a Tensor (B, *input_dims), or a tuple / dict with ``inputs=``), target
    (B,) or (B, L) int64 (needed when ce_weight > 0 or select="target"), teacher_outputs a
    :class:`TeacherOutputs` (logits, jac (B, K, *input_dims), indices (B, K)) that replaces the
    teacher's computation (the call's ``teacher_outputs`` is that cache entry, the
    constructor's is the teacher's ``outputs=``).
    """

    def __init__(self, teacher: Optional[nn.Module] = None, *, ce_weight: float = 1.0, kd_weight: float = 1.0,
                 beta: float = 1.0, temperature: float = 4.0, select: str = "topk", k: int = 1,
                 kind: Optional[str] = None, estimator: str = "exact", fd_step: Optional[float] = None,
                 fd_scheme: str = "central", noise_sigma: float = 0.05, noise_samples: int = 1,
                 strategy: str = "auto", backend: str = "auto", outputs=None, inputs=None, positions=None,
                 teacher_outputs=None, input_adapter: Optional[Callable] = None, ignore_index: int = -100):
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
        if input_adapter is not None and not callable(input_adapter):
            raise TypeError(f"input_adapter must be callable (e.g. an nn.Linear from the student's to the teacher's "
                            f"embedding width), got {type(input_adapter).__name__}")
        ModelCall(nn.Identity(), outputs=outputs, inputs=None)  # validates the kinds of outputs=
        ModelCall(nn.Identity(), outputs=teacher_outputs)
        # Not registered as a submodule: loss.parameters() stays empty, loss.train() leaves it alone.
        self.__dict__["teacher"] = teacher
        self.__dict__["input_adapter"] = input_adapter
        self.ce_weight, self.kd_weight, self.beta, self.temperature = ce_weight, kd_weight, beta, temperature
        self.select, self.k, self.kind, self.estimator, self.fd_step = select, k, kind, estimator, fd_step
        self.noise_sigma, self.noise_samples = float(noise_sigma), int(noise_samples)
        self.strategy, self.backend = strategy, backend
        self.outputs, self.inputs, self.positions = outputs, inputs, positions
        self.teacher_outputs = outputs if teacher_outputs is None else teacher_outputs
        self.ignore_index = ignore_index

    def extra_repr(self) -> str:
        return (f"ce_weight={self.ce_weight}, kd_weight={self.kd_weight}, beta={self.beta}, T={self.temperature}, "
                f"select={self.select!r}, k={self.k}, kind={self.kind!r}, estimator={self.estimator!r}"
                + (f", fd_scheme={self.fd_scheme!r}" if self.estimator == "finite_difference" else ""))

    # -- teacher --------------------------------------------------------------------------------
    def _selection(self, target):
        if self.select == "topk":
            return select_.topk(self.k)
        if self.select == "projections":
            return select_.projections(self.k)
        if self.select == "target":
            return select_.target(target, ignore_index=self.ignore_index)
        return select_.all()

    def _teacher(self, x, xd: Tensor, target, given, need_jac: bool, positions):
        """(TeacherOutputs, Selected): the teacher's logits, rows and the rows it selected."""
        B = xd.shape[0]
        if given is not None:
            logits, jac, idx = given
            logits = _check_logits(logits, B, "teacher cache").to(xd.device, xd.dtype)
            if not isinstance(idx, Tensor) or idx.ndim != 2 or idx.shape[0] != B or idx.dtype.is_floating_point:
                raise ValueError(f"teacher_outputs.indices must be an integer tensor (B={B}, K), got "
                                 f"{tuple(idx.shape) if isinstance(idx, Tensor) else type(idx).__name__}")
            if self.select == "projections":
                raise ValueError("select='projections' cannot be replayed from teacher_outputs (a cache stores no "
                                 "projection directions); use select='topk', 'target' or 'all'")
            N = logits.shape[1] * (logits.shape[2] if logits.ndim == 3 else 1)
            lo = -1 if logits.ndim == 3 else 0
            if idx.numel() and (int(idx.min()) < lo or int(idx.max()) >= N):
                raise ValueError(f"teacher_outputs.indices out of range: values in [{int(idx.min())}, "
                                 f"{int(idx.max())}] for logits of shape {tuple(logits.shape)}")
            if need_jac:
                want = (B, idx.shape[1], *xd.shape[1:])
                if jac is None or tuple(jac.shape) != want:
                    raise ValueError(f"teacher_outputs.jac must have shape {want}; got "
                                     f"{None if jac is None else tuple(jac.shape)}")
                jac = jac.to(xd.device)
            idx = idx.to(xd.device).long()
            return TeacherOutputs(logits, jac, idx), Selected.from_cache(idx, logits)
        if self.teacher is None:
            raise ValueError("no teacher: pass one to DistillationLoss or teacher_outputs= to the call")
        bound = ModelCall(self.teacher, outputs=self.teacher_outputs, inputs=self.inputs).bind(x, self.input_adapter)
        spec = Rows(self._selection(target), positions)
        if not need_jac:
            with torch.no_grad():
                logits = _check_logits(bound.fn(xd), B, "teacher")
            _, idx, _, resolved = spec.head(logits, B)
            return TeacherOutputs(logits, None, idx), Selected(idx, resolved, self.select == "projections")
        logits, jac, idx, resolved = jacobians_of(bound, xd.detach(), spec, strategy=self.strategy)
        return TeacherOutputs(logits, jac, idx), Selected(idx, resolved, self.select == "projections")

    # -- forward --------------------------------------------------------------------------------
    def forward(self, student, x, target: Optional[Tensor] = None, *,
                teacher_outputs: Optional[TeacherOutputs] = None) -> DistillationOutput:
        call = ModelCall(student, outputs=self.outputs, inputs=self.inputs)
        if isinstance(x, Tensor):
            _check_input(x)
        bound = call.bind(x)
        xd = bound.xd
        B = xd.shape[0]
        if target is not None:
            target = _check_target(target, B)
        elif self.ce_weight > 0 or self.select == "target":
            raise ValueError("target is required when ce_weight > 0 or select='target'")
        positions = freeze(self.positions)  # one draw of select.sample for teacher and student
        need_jac = self.beta > 0 and self.estimator != "noise"
        t, chosen = self._teacher(x, xd, target, teacher_outputs, need_jac, positions)
        zero = xd.new_zeros((), dtype=torch.promote_types(xd.dtype, torch.float32))
        weighted = None  # beta * jac, where the loss head forms it
        if not self.beta > 0:
            logits, jac = _check_logits(bound.fn(xd), B, "student"), zero
        elif self.estimator == "exact":
            logits, J_s, _, _ = jacobians_of(bound, xd, chosen.spec, create_graph=True, strategy=self.strategy)
            # beta goes into the kernel: its gradient then reaches the loss head as 1, which the
            # fused backends hand over without a pass to scale it
            J_s, J_t = _head_rows(J_s, t.jac)
            with _no_autocast(J_s.device):
                weighted = _jm().jacobian_matching_loss(J_s, J_t, kind=self.kind, backend=self.backend,
                                                        weight=self.beta)
            jac = weighted / self.beta
        elif self.estimator == "finite_difference":
            logits, jac = self._finite_difference(bound, xd, t, chosen)
        else:
            logits, jac = self._noise(bound, x, xd, t, chosen)
        logits = _check_logits(logits, B, "student")
        if tuple(logits.shape) != tuple(t.logits.shape):
            raise ValueError(f"the student's logits have shape {tuple(logits.shape)} but the teacher's "
                             f"{tuple(t.logits.shape)}: they must be the same (B, C) or (B, L, C)")
        ce = self._ce(logits, target) if self.ce_weight > 0 else zero
        kd = self._kd(logits, t.logits, positions) if self.kd_weight > 0 else zero
        total = self.ce_weight * ce + self.kd_weight * kd + (self.beta * jac if weighted is None else weighted)
        return DistillationOutput(total, ce, kd, jac, logits)

    def _ce(self, logits: Tensor, target: Tensor) -> Tensor:
        if logits.ndim == 2:
            return F.cross_entropy(logits, _check_target(target, logits.shape[0], logits.shape[1]))
        B, L, C = logits.shape
        target = _check_target(target, B, C, L, self.ignore_index)
        wide = logits.to(torch.promote_types(logits.dtype, torch.float32))
        summed = F.cross_entropy(wide.reshape(B * L, C), target.reshape(-1), ignore_index=self.ignore_index,
                                 reduction="sum")
        return summed / (target != self.ignore_index).sum().clamp_min(1)  # every position ignored: 0, not NaN

    def _kd(self, logits: Tensor, t_logits: Tensor, positions) -> Tensor:
        T = self.temperature
        # At least fp32 even under autocast: a bf16 KL of near-equal distributions can come out < 0.
        wide = torch.promote_types(logits.dtype, torch.float32)
        s, t = F.log_softmax(logits.to(wide) / T, -1), F.log_softmax(t_logits.to(wide) / T, -1)
        if logits.ndim == 2:
            return F.kl_div(s, t, reduction="batchmean", log_target=True) * (T * T)
        per_pos = F.kl_div(s, t, reduction="none", log_target=True).sum(-1)  # (B, L)
        if isinstance(positions, Tensor) and positions.dtype == torch.bool:
            m = positions.to(per_pos.device, per_pos.dtype)
            return (per_pos * m).sum() / m.sum().clamp_min(1) * (T * T)
        return per_pos.mean() * (T * T)

    def _finite_difference(self, bound, xd: Tensor, t: TeacherOutputs, chosen: Selected):
        # One forward with a graph (kept for CE/KD), K first-order row backwards, one fused
        # loss-and-grad pass, then 2K (central) or K (forward) perturbed forwards whose
        # backward is ordinary backprop.
        x_in = xd if xd.requires_grad else xd.detach().requires_grad_(True)
        state = rng_state(xd.device)
        with _no_donated_buffers(bound.module):  # K retained backward passes follow
            logits = _check_logits(bound.fn(x_in), xd.shape[0], "student")
        J_s = _first_order_rows(chosen.pick(logits), x_in)
        J_s, J_t = _head_rows(J_s, t.jac)
        with _no_autocast(J_s.device):
            value, g = _jm().jacobian_matching_loss_and_grad(J_s, J_t, kind=self.kind, backend=self.backend)
        base = chosen.pick(logits) if self.fd_scheme == "forward" else None
        surrogate = fd_directional(bound.module, lambda xp: chosen.pick(bound.fn(xp)), xd, g.to(xd.dtype),
                                   rel_step=self.fd_step, state=state, base=base, separate=bound.passthrough)
        return logits, _attach(value, surrogate)

    def _noise(self, bound, x, xd: Tensor, t: TeacherOutputs, chosen: Selected):
        if self.teacher is None:
            raise ValueError("estimator='noise' runs the teacher on noisy inputs: pass a teacher")
        teacher = ModelCall(self.teacher, outputs=self.teacher_outputs, inputs=self.inputs).bind(x, self.input_adapter)
        state = rng_state(xd.device)
        logits = _check_logits(bound.fn(xd), xd.shape[0], "student")
        sigma = self.noise_sigma
        clean = (chosen.pick(logits) - chosen.pick(t.logits.to(logits.dtype))).pow(2).sum(1)
        xs = []
        for _ in range(self.noise_samples):
            xi = torch.randn_like(xd) * sigma  # drawn after `state`: the replay does not repeat it
            xs += [xd + xi, xd - xi]
        with torch.no_grad():
            t_noisy = forward_many(teacher.module, lambda xp: chosen.pick(teacher.fn(xp)), xs, state,
                                   teacher.passthrough)
        s_noisy = forward_many(bound.module, lambda xp: chosen.pick(bound.fn(xp)), xs, state, bound.passthrough)
        noisy = sum((s - tt.to(s.dtype)).pow(2).sum(1) for s, tt in zip(s_noisy, t_noisy)) / len(xs)
        return logits, (noisy - clean).mean() / sigma**2


from jacfast.losses.penalty import jacobian_penalty  # noqa: E402  (re-exported: it was defined here)
