"""The strategies of :func:`jacfast.input_jacobians`: loop, batched, replicate (see its module docstring).

Each strategy is ``fn(call, x, spec, create_graph, rows) -> (logits, jac, indices, resolved)``:
``call`` a :class:`jacfast.model_io.BoundCall` (``call.fn(x)`` gives the logits, ``call.module``
is inspected), ``x`` the differentiated tensor (B, *input_dims), ``spec`` a :class:`Rows`,
``rows`` K when known before the forward pass. ``resolved`` is what replays the same rows on
another model (the seeds of a flat output, the :class:`~jacfast.sequence.RowPlan` of a sequence).
"""
from __future__ import annotations

import contextlib
import functools
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from jacfast.model_io import FLOAT_DTYPES
from jacfast.sequence import RowPlan, freeze, known_rows, plan_rows

STRATEGIES = ("loop", "batched", "replicate")


def _compiled(model) -> bool:
    """Whether ``model`` is a ``torch.compile`` wrapper (a module or a function)."""
    return type(model).__name__ == "OptimizedModule" or hasattr(model, "_torchdynamo_orig_callable")


def _math_attention():
    """The SDPA math kernel: the fused ones (flash, memory-efficient) have no double backward."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # older torch: nothing to choose
        return contextlib.nullcontext()
    return sdpa_kernel(SDPBackend.MATH)


def _no_donated_buffers(model):
    """A compiled model's backward may free ("donate") its saved tensors, which breaks the
    retained graph of K >= 2 backward passes and of the finite-difference rows. The flag is
    read when the backward runs (the caller's ``loss.backward()`` included), so a scope around
    our calls is not enough: on meeting a compiled model, ``torch._functorch.config.donated_buffer``
    is turned off for the process (a memory optimization only; like ``cudnn.benchmark``, a global)."""
    if _compiled(model):
        from torch._functorch import config

        config.donated_buffer = False
    return _NULL


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


_NULL = _Null()


class Rows:
    """Which rows: a selection, and for sequence outputs (B, L, C) the positions; or the
    resolved rows of an earlier call (``resolved``: flat seeds (K, B, C) or a RowPlan)."""

    __slots__ = ("sel", "positions", "plan", "flat")

    def __init__(self, sel, positions=None, plan: Optional[RowPlan] = None, flat: bool = False):
        # flat: the rows were chosen on another model's (B, C) logits (a teacher's), so
        # sequence outputs here are a mismatch, not a per-position selection
        self.sel, self.positions, self.plan, self.flat = sel, freeze(positions), plan, flat

    def rows(self) -> Optional[int]:
        if self.plan is not None:
            return self.plan.rows
        return self.sel.rows() if self.positions is None else known_rows(self.sel, self.positions)

    def key(self):
        pos = self.positions
        kind = None if pos is None else (type(pos).__name__, tuple(pos.shape) if isinstance(pos, Tensor) else None)
        return (type(self.sel).__name__ if self.plan is None else "RowPlan", kind)

    def head(self, out: Tensor, batch: int):
        """(what to differentiate (N, M), indices (B, K), seeds (K, B, M), resolved) for the
        model output ``out`` (N, C) or (N, L, C), N = replicas * batch."""
        if self.flat and out.dim() == 3:
            raise ValueError(f"the rows were selected on logits of shape (B, C), but this model returned "
                             f"{tuple(out.shape)}: teacher and student outputs must have the same shape")
        if self.plan is not None or out.dim() == 3:
            if out.dim() != 3:
                raise ValueError(f"the rows were selected for sequence outputs (B, L, C), but the model returned "
                                 f"{tuple(out.shape)}")
            plan = self.plan
            if plan is None:
                plan = plan_rows(self.sel, (out if out.shape[0] == batch else out[:batch]).detach(), self.positions)
            plan.check(out)
            vals = plan.pick(out)
            k = plan.rows
            seeds = torch.eye(k, dtype=vals.dtype, device=vals.device).unsqueeze(1).expand(k, batch, k)
            return vals, plan.indices, seeds, plan
        if self.positions is not None:
            raise ValueError(f"positions= selects positions of sequence outputs (B, L, C), but the model returned "
                             f"logits of shape {tuple(out.shape)}")
        indices, seeds = self.sel.resolve((out if out.shape[0] == batch else out[:batch]).detach())
        return out, indices, seeds, seeds


def _forward(call, xin: Tensor, create_graph: bool, replicas: int = 1) -> Tensor:
    if create_graph:
        with _math_attention():
            out = call.fn(xin)
    else:
        out = call.fn(xin)
    if not isinstance(out, Tensor):
        call.call.logits(out)  # raises the TypeError that names what the model returned and how to pick
    if out.dim() not in (2, 3) or out.shape[0] != xin.shape[0]:
        note = f" for x repeated {replicas} times (strategy='replicate')" if replicas > 1 else ""
        raise ValueError(f"model must return logits of shape (B, C) or (B, L, C) with B = {xin.shape[0]}, "
                         f"got {tuple(out.shape)}{note}")
    if out.dtype not in FLOAT_DTYPES:
        raise TypeError(f"model must return floating logits, got {out.dtype}")
    if not out.requires_grad:
        raise ValueError("model output does not depend on x (no autograd graph); is it run under torch.no_grad()?")
    return out


def _vjp(out, xin, seeds, create_graph, retain, batched=False) -> Tensor:
    (g,) = torch.autograd.grad(
        out, xin, seeds, retain_graph=retain, create_graph=create_graph, allow_unused=True, is_grads_batched=batched
    )
    if g is None:  # the output does not depend on x at all: the Jacobian is zero
        g = xin.new_zeros(((seeds.shape[0],) if batched else ()) + tuple(xin.shape))
    return g


def _loop(call, x, spec, create_graph, rows):
    out = _forward(call, x, create_graph)
    head, indices, seeds, resolved = spec.head(out, x.shape[0])
    k = seeds.shape[0]
    jac = [_vjp(head, x, seeds[j], create_graph, retain=create_graph or j < k - 1) for j in range(k)]
    return out, torch.stack(jac, 1), indices, resolved


def _batched(call, x, spec, create_graph, rows):
    out = _forward(call, x, create_graph)
    head, indices, seeds, resolved = spec.head(out, x.shape[0])
    jac = _vjp(head, x, seeds, create_graph, retain=create_graph, batched=True)  # (K, B, ...)
    return out, jac.transpose(0, 1).contiguous(), indices, resolved


def _bn_forward_per_replica(m: nn.modules.batchnorm._BatchNorm, replicas: int, inp: Tensor) -> Tensor:
    """BatchNorm forward on a batch of ``replicas`` stacked copies, each copy normalized with
    its own batch statistics; running statistics updated once, as for one copy."""
    if not (m.training or (m.running_mean is None and m.running_var is None)):
        return type(m).forward(m, inp)  # running statistics: per sample already
    m._check_input_dim(inp)
    n, c, rest = inp.shape[0], inp.shape[1], tuple(inp.shape[2:])
    b = n // replicas
    if m.training and m.track_running_stats:
        # Same momentum bookkeeping as _BatchNorm.forward; the update reads one replica, so
        # the unbiased variance (n / (n - 1)) is that of the unreplicated batch.
        factor = 0.0 if m.momentum is None else m.momentum
        if m.num_batches_tracked is not None:
            m.num_batches_tracked.add_(1)
            factor = 1.0 / float(m.num_batches_tracked) if m.momentum is None else m.momentum
        if m.running_mean is not None:
            with torch.no_grad():
                F.batch_norm(inp[:b], m.running_mean, m.running_var, None, None, True, factor, m.eps)
    # Fold the replicas into channels, (R*B, C, ...) -> (B, R*C, ...): every (replica, channel)
    # is normalized over its own B samples, so values and gradients match the plain batch.
    folded = inp.reshape(replicas, b, c, *rest).transpose(0, 1).reshape(b, replicas * c, *rest)
    weight = m.weight.repeat(replicas) if m.weight is not None else None
    bias = m.bias.repeat(replicas) if m.bias is not None else None
    y = F.batch_norm(folded, None, None, weight, bias, True, 0.0, m.eps)
    return y.reshape(b, replicas, c, *rest).transpose(0, 1).reshape(n, c, *rest)


def _replicate_blocker(model) -> Optional[str]:
    """Why ``model`` cannot be replicated exactly, or None."""
    if not isinstance(model, nn.Module):
        return None
    if _compiled(model):
        return "the model is compiled (torch.compile): its BatchNorm modules cannot be seen"
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.training and m.p > 0:
            return f"dropout {name!r} is in training mode: the replicas would draw different masks"
        if isinstance(m, nn.SyncBatchNorm) and m.training:
            return f"SyncBatchNorm {name!r} in training mode is not supported"
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and "forward" in m.__dict__:
            return f"BatchNorm {name!r} has an instance-level forward override"
    return None


@contextlib.contextmanager
def _per_replica_batchnorm(model, replicas: int):
    patched = []
    if isinstance(model, nn.Module) and replicas > 1:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.forward = functools.partial(_bn_forward_per_replica, m, replicas)
                patched.append(m)
    try:
        yield
    finally:
        for m in patched:
            del m.forward


def _replicate(call, x, spec, create_graph, rows):
    if rows is None:
        raise ValueError(
            "select: strategy='replicate' needs K before the forward pass; use select.all(num_outputs=C) "
            "or explicit indices (for sequence outputs also positions=: a mask or select.sample(m)), "
            "or another strategy"
        )
    if call.passthrough:
        raise ValueError("strategy='replicate' cannot be used for a model called with several inputs (tuple or "
                         "dict x): it cannot tell which of the other inputs are batched; use 'loop' or 'batched'")
    model = call.module
    why = _replicate_blocker(model)
    if why:
        raise ValueError(f"strategy='replicate' cannot be used: {why}; use 'loop' or 'batched'")
    b = x.shape[0]
    xr = x.unsqueeze(0).expand(rows, *x.shape).reshape(rows * b, *x.shape[1:])
    with _per_replica_batchnorm(model, rows):
        out = _forward(call, xr, create_graph, rows)
    if out.dim() == 3 and spec.positions is None and spec.plan is None:
        raise ValueError("strategy='replicate' needs K' before the forward pass: for sequence outputs (B, L, C) "
                         "pass positions= (a mask or select.sample(m)); or use 'loop' or 'batched'")
    head, indices, seeds, resolved = spec.head(out, b)
    if seeds.shape[0] != rows:
        raise ValueError(f"select gave K = {seeds.shape[0]} rows, expected {rows}")
    g = _vjp(head, xr, seeds.reshape(rows * b, -1), create_graph, retain=create_graph)
    return out[:b], g.reshape(rows, *x.shape).transpose(0, 1).contiguous(), indices, resolved


_STRATEGIES = {"loop": _loop, "batched": _batched, "replicate": _replicate}
