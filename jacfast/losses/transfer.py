"""Transfer learning with intermediate-layer matching (Srinivas & Fleuret, ICML 2018, Sec. 5.2).

:class:`TransferLoss` hooks named modules of a teacher and a student (the architectures may
differ) and, for each pair of layers l with features F_t (B, C_t, *S_t) and F_s (B, C_s, *S_s)::

    total = ce_weight         * CE(S(x), y)
          + activation_weight * sum_l mean((F_s - F_t)^2)                         (LwF-style)
          + attention_weight  * sum_l mean_b ||a_s/||a_s|| - a_t/||a_t|| ||^2       (attention transfer)
          + jacobian_weight   * sum_l mean_b jm(grad_x A_s[b, i*], grad_x A_t[b, i*])  (Jacobian term)

- Attention map (Zagoruyko & Komodakis): A(F) = mean_c |F_c|^p, shape (B, *S), flattened to
  a (B, P) vector a, then L2-normalized. The loss sums over positions (the original AT code
  averages over them: its weights are P times larger for the same effect).
- Jacobian term (the paper's intermediate-layer Jacobian): i*_b = argmax of the teacher's
  map A_t[b] (un-normalized, on the common grid below); the input gradient of A[b, i*_b]
  is taken for both networks at the teacher's location and matched with
  ``jacobian_matching_loss(kind=kind)`` (``"normalized"`` by default), rows (B, L, *x.shape[1:]).
- Spatial mismatch: maps (and features, for activation matching) of a pair are brought to a
  common grid, the elementwise minimum of S_t and S_s, by adaptive average pooling (area
  averaging, the natural downsampling of a non-negative map; 1-3 spatial dims). Nothing is
  ever upsampled. Activation matching needs equal channels: pass ``adapters`` (e.g. a 1x1
  conv from C_s to C_t, trained with the student) otherwise.

Hooks are only registered during a call, so other forwards of the networks store nothing.
The teacher's rows are computed without a graph and without parameter gradients.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from jacfast.losses.common import (
    _attach,
    _check_input,
    _check_logits,
    _check_target,
    _first_order_rows,
    _jm,
)
from jacfast.losses.finite_difference import check_scheme, fd_directional, rng_state
from jacfast.model_io import ModelCall


class TransferOutput(NamedTuple):
    """total: the weighted sum (scalar); ce, activation, attention, jacobian: unweighted
    components (scalars, summed over layer pairs; 0 when their weight is 0); logits: the
    student's output, with its graph."""

    total: Tensor
    ce: Tensor
    activation: Tensor
    attention: Tensor
    jacobian: Tensor
    logits: Tensor

    def scalars(self) -> dict:
        return {k: float(getattr(self, k).detach()) for k in ("total", "ce", "activation", "attention", "jacobian")}


def attention_map(feat: Tensor, p: float = 2.0) -> Tensor:
    """A(F) = mean over channels of |F_c|^p: (B, C, *S) -> (B, *S), not normalized."""
    if feat.ndim < 3:
        raise ValueError(f"attention maps need features (B, C, *spatial); got shape {tuple(feat.shape)}")
    return feat.abs().pow(p).mean(1)


def _pool_to(t: Tensor, size: tuple, channels: bool) -> Tensor:
    """Adaptive average pooling of the trailing spatial dims of ``t`` to ``size``."""
    if tuple(t.shape[-len(size):]) == tuple(size):
        return t
    pool = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}.get(len(size))
    if pool is None:
        raise ValueError(f"resizing supports 1 to 3 spatial dims, got {len(size)}")
    return pool(t, size) if channels else pool(t.unsqueeze(1), size).squeeze(1)


def _resolve_layers(model: nn.Module, names, who: str) -> dict:
    modules = dict(model.named_modules())
    valid = [n for n in modules if n]
    for name in names:
        if name not in modules or not name:
            raise ValueError(f"no module named {name!r} in the {who} ({type(model).__name__}); "
                             f"valid names: {', '.join(valid) if valid else '(none)'}")
    return {n: modules[n] for n in names}


class _Capture:
    """Forward hooks that store each named module's output, only inside ``with capture:``."""

    def __init__(self, modules: dict):
        self.modules, self.out, self.handles = modules, {}, []

    def _hook(self, name):
        def hook(module, inputs, output):
            if name in self.out:
                raise RuntimeError(f"module {name!r} ran more than once in one forward; hook a module that runs once")
            self.out[name] = output[0] if isinstance(output, (tuple, list)) else output
        return hook

    def __enter__(self):
        self.handles = [m.register_forward_hook(self._hook(n)) for n, m in self.modules.items()]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles = []

    def run(self, model, x: Tensor):
        """Forward ``model``; return (its output, {name: feature})."""
        self.out = {}
        y = model(x)
        missing = [n for n in self.modules if n not in self.out]
        if missing:
            raise RuntimeError(f"hooked modules {missing} did not run in the forward pass")
        feats, self.out = self.out, {}
        return y, feats


class TransferLoss(nn.Module):
    """CE + activation matching + attention transfer + attention-map Jacobian matching.

    Args:
        teacher, student: networks (any architectures); neither becomes a submodule.
        layers: the hooked pairs: a dict {teacher_name: student_name}, a list of
            (teacher_name, student_name) pairs, or a list of names present in both.
            Names are those of ``named_modules()``; an unknown name raises listing the valid ones.
        ce_weight: weight of cross-entropy on the student's logits (default 1.0; 0 skips it).
        activation_weight: LwF-style feature matching (default 0.0: off).
        attention_weight: attention transfer (default 1.0).
        jacobian_weight: attention-map Jacobian matching (default 1.0).
        p: exponent of the attention map (default 2).
        kind: kind of the Jacobian loss, "normalized" (default, the paper's) or "squared".
        estimator: "exact" (double backward) | "finite_difference" (first order only; see
            :func:`jacfast.losses.finite_difference.fd_directional`).
        fd_step: relative finite-difference step (default by dtype and scheme).
        fd_scheme: "central" (default) or "forward" (half the perturbed forwards, first-order
            accurate), as in :class:`jacfast.losses.DistillationLoss`.
        adapters: optional {student_name: module} applied to the student's features before
            activation matching (registered here, so ``loss.parameters()`` holds them).
        backend: of ``jacobian_matching_loss``.
        outputs, inputs: how the networks are called (:class:`jacfast.ModelCall`): ``inputs``
            names the differentiated entry of a tuple / dict x, ``outputs`` the student's
            logits in what it returns (used for CE; the teacher's return value is not used).

    Call: ``loss(x, target=None) -> TransferOutput``; x (B, *input_dims) (or a tuple / dict
    with ``inputs=``), target (B,) int64 (required when ce_weight > 0).
    """

    def __init__(self, teacher: nn.Module, student: nn.Module, layers, *, ce_weight: float = 1.0,
                 activation_weight: float = 0.0, attention_weight: float = 1.0, jacobian_weight: float = 1.0,
                 p: float = 2.0, kind: str = "normalized", estimator: str = "exact",
                 fd_step: Optional[float] = None, fd_scheme: str = "central", adapters: Optional[dict] = None,
                 backend: str = "auto", outputs=None, inputs=None):
        super().__init__()
        ModelCall(student, outputs=outputs, inputs=inputs)  # validates outputs= and inputs=
        self.outputs, self.inputs = outputs, inputs
        if isinstance(layers, dict):
            pairs = list(layers.items())
        else:
            pairs = [(n, n) if isinstance(n, str) else tuple(n) for n in layers]
        if not pairs or any(len(pr) != 2 or not all(isinstance(n, str) for n in pr) for pr in pairs):
            raise ValueError("layers must be a non-empty dict {teacher_name: student_name}, "
                             "a list of (teacher_name, student_name) pairs or a list of names")
        if estimator not in ("exact", "finite_difference"):
            raise ValueError(f"estimator must be 'exact' or 'finite_difference', got {estimator!r}")
        if kind not in ("normalized", "squared"):
            raise ValueError(f"kind must be 'normalized' or 'squared', got {kind!r}")
        for name, v in (("ce_weight", ce_weight), ("activation_weight", activation_weight),
                        ("attention_weight", attention_weight), ("jacobian_weight", jacobian_weight), ("p", p)):
            if not v >= 0:
                raise ValueError(f"{name} must be >= 0, got {v!r}")
        self.pairs = pairs
        t_mods = _resolve_layers(teacher, dict.fromkeys(t for t, _ in pairs), "teacher")
        s_mods = _resolve_layers(student, dict.fromkeys(s for _, s in pairs), "student")
        self.__dict__.update(teacher=teacher, student=student,
                             _t_cap=_Capture(t_mods), _s_cap=_Capture(s_mods))
        adapters = dict(adapters or {})
        unknown = [n for n in adapters if n not in s_mods]
        if unknown:
            raise ValueError(f"adapters for {unknown}, which are not hooked student layers {list(s_mods)}")
        self.adapters = nn.ModuleDict({n.replace(".", "__"): m for n, m in adapters.items()})
        self.ce_weight, self.activation_weight = ce_weight, activation_weight
        self.attention_weight, self.jacobian_weight = attention_weight, jacobian_weight
        self.p, self.kind, self.estimator, self.fd_step, self.backend = float(p), kind, estimator, fd_step, backend
        self.fd_scheme = check_scheme(fd_scheme)

    def extra_repr(self) -> str:
        return (f"pairs={self.pairs}, weights=(ce={self.ce_weight}, act={self.activation_weight}, "
                f"att={self.attention_weight}, jac={self.jacobian_weight}), p={self.p}, kind={self.kind!r}, "
                f"estimator={self.estimator!r}")

    # -- per-pair maps ---------------------------------------------------------------------------
    def _maps(self, ft: Tensor, fs: Tensor, pair) -> tuple:
        """Attention maps of a pair on the common grid, flattened: (B, P) each, and the grid."""
        at, as_ = attention_map(ft, self.p), attention_map(fs, self.p)
        if at.ndim != as_.ndim:
            raise ValueError(f"layers {pair} have {at.ndim - 1} and {as_.ndim - 1} spatial dims: cannot match")
        size = tuple(min(a, b) for a, b in zip(at.shape[1:], as_.shape[1:]))
        return _pool_to(at, size, False).flatten(1), _pool_to(as_, size, False).flatten(1), size

    def _activation(self, ft: Tensor, fs: Tensor, pair) -> Tensor:
        key = pair[1].replace(".", "__")
        if key in self.adapters:
            fs = self.adapters[key](fs)
        if ft.ndim != fs.ndim or ft.shape[1] != fs.shape[1]:
            raise ValueError(f"activation matching of {pair}: teacher features {tuple(ft.shape)} and student "
                             f"{tuple(fs.shape)} differ in channels; pass adapters={{{pair[1]!r}: ...}}")
        if ft.ndim > 2:
            size = tuple(min(a, b) for a, b in zip(ft.shape[2:], fs.shape[2:]))
            ft, fs = _pool_to(ft, size, True), _pool_to(fs, size, True)
        return F.mse_loss(fs, ft.to(fs.dtype))

    # -- forward ---------------------------------------------------------------------------------
    def forward(self, x, target: Optional[Tensor] = None) -> TransferOutput:
        if isinstance(x, Tensor):
            _check_input(x)
        t_call = ModelCall(self.teacher, inputs=self.inputs).bind(x)
        s_call = ModelCall(self.student, outputs=self.outputs, inputs=self.inputs).bind(x)
        x = s_call.xd
        B = x.shape[0]
        if target is not None:
            target = _check_target(target, B)
        elif self.ce_weight > 0:
            raise ValueError("target is required when ce_weight > 0 (set ce_weight=0 to train without labels)")
        need_jac = self.jacobian_weight > 0
        zero = x.new_zeros(())
        teacher, student = t_call.raw, s_call
        with self._t_cap, self._s_cap:
            # Teacher: features (and their input gradients) only; gradients wrt x alone.
            x_t = x.detach().requires_grad_(need_jac)
            with torch.set_grad_enabled(need_jac):
                _, t_feats = self._t_cap.run(teacher, x_t)
            x_s = x if (x.requires_grad or not need_jac) else x.detach().requires_grad_(True)
            state = rng_state(x.device)
            out, s_feats = self._s_cap.run(student.raw, x_s)
            act, att, t_vals, s_vals, where = zero, zero, [], [], []
            for pair in self.pairs:
                ft, fs = t_feats[pair[0]], s_feats[pair[1]]
                if self.activation_weight > 0:
                    act = act + self._activation(ft.detach(), fs, pair)
                if self.attention_weight > 0 or need_jac:
                    at, as_, grid = self._maps(ft, fs, pair)
                    if self.attention_weight > 0:
                        d = F.normalize(as_, dim=1) - F.normalize(at.detach(), dim=1).to(as_.dtype)
                        att = att + d.pow(2).sum(1).mean()
                    if need_jac:
                        i_star = at.detach().argmax(1, keepdim=True)  # the teacher's location, for both
                        where.append((pair[1], grid, i_star))
                        t_vals.append(at.gather(1, i_star))
                        s_vals.append(as_.gather(1, i_star))
            jac, weighted = zero, None
            if need_jac:
                jac, weighted = self._jacobian(student, x, x_t, x_s, torch.cat(t_vals, 1), torch.cat(s_vals, 1), where,
                                               state)
        ce, logits = zero, out
        if self.ce_weight > 0:
            logits = _check_logits(s_call.call.logits(out), B, "student")
            ce = F.cross_entropy(logits, _check_target(target, B, logits.shape[1]))
        total = (self.ce_weight * ce + self.activation_weight * act + self.attention_weight * att
                 + (self.jacobian_weight * jac if weighted is None else weighted))
        return TransferOutput(total, ce, act, att, jac, logits)

    def _jacobian(self, student, x, x_t, x_s, t_vals: Tensor, s_vals: Tensor, where: list,
                  state) -> tuple[Tensor, Optional[Tensor]]:
        """t_vals, s_vals: (B, L) map values at the teacher's argmax -> the Jacobian term, and
        (exact estimator) jacobian_weight times it as the loss head forms it, else None.

        where: per pair, (student layer, common grid, argmax (B, 1)) to re-evaluate the
        student's values at perturbed inputs (finite differences).
        """
        L = t_vals.shape[1]
        J_t = torch.stack([torch.autograd.grad(t_vals[:, l].sum(), x_t, retain_graph=l < L - 1)[0]
                           for l in range(L)], 1).detach()
        jm = _jm()
        if self.estimator == "exact":
            J_s = torch.stack([torch.autograd.grad(s_vals[:, l].sum(), x_s, create_graph=True, retain_graph=True)[0]
                               for l in range(L)], 1)
            # the weight goes into the kernel (see DistillationLoss.forward)
            weighted = jm.jacobian_matching_loss(J_s, J_t.to(J_s.dtype), kind=self.kind, backend=self.backend,
                                                 weight=self.jacobian_weight)
            return weighted / self.jacobian_weight, weighted
        J_s = _first_order_rows(s_vals, x_s)
        value, g = jm.jacobian_matching_loss_and_grad(J_s, J_t.to(J_s.dtype), kind=self.kind, backend=self.backend)

        def values_at(xp: Tensor) -> Tensor:  # (N, L): the student's map values at i* for perturbed inputs
            _, feats = self._s_cap.run(student.raw, xp)
            reps = xp.shape[0] // x.shape[0]
            return torch.cat([_pool_to(attention_map(feats[name], self.p), grid, False).flatten(1)
                              .gather(1, i_star.repeat(reps, 1)) for name, grid, i_star in where], 1)

        base = s_vals if self.fd_scheme == "forward" else None  # the main forward's values, with their graph
        return _attach(value, fd_directional(student.module, values_at, x, g, rel_step=self.fd_step, state=state,
                                             base=base, separate=student.passthrough)), None
