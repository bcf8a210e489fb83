"""``torch.library`` ops for the Jacobian-matching loss head, with fake kernels and autograd.

The ops work on 2-D contiguous row matrices (R, D) and an already-resolved backend name;
``jacfast/loss.py`` validates, flattens and resolves before calling them. Each op forwards
to the kernel namespace of its backend (``jacfast.registry.kernels``), which implements the
contract in ``csrc/README.md``: forward returns the loss and per-row float64 coefficients,
backward is one elementwise pass that uses only those coefficients, so autograd saves no
copy of the inputs beyond the inputs themselves.

Eager calls go through :class:`JacobianMatchingFunction` instead (see its docstring); compiled
graphs, ``opcheck`` and export see the ops.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from jacfast import registry

KINDS = {"normalized": 0, "squared": 1, "norm": 2}
REDUCTION_NONE, REDUCTION_SCALED_SUM = 0, 1
# Backends whose forward_backward reads each row from memory once: the CPU kernel writes a
# row's gradient while the row is in cache (squared and norm: each element from one load), the
# Triton and CUDA ones from registers for rows short enough (csrc/README.md), running forward
# then backward for longer rows. On a GPU fusing saves 2 of 5 passes for every dtype. The
# CPU's 16-bit normalized kernels are compute-bound (float64 arithmetic and conversions), so
# fusing them gains less than scaling by an incoming gradient other than 1 costs: they run
# forward then backward (docs/performance.md); its 16-bit squared and norm ones fuse.
FUSED_BACKENDS = frozenset({"cpu", "triton", "cuda"})
_WIDE = frozenset({torch.float32, torch.float64})


def fuses(backend: str, kind: int, dtype: torch.dtype) -> bool:
    """Whether the eager path computes the gradient in the forward (``forward_backward``) for
    this backend, kind code and dtype, when only the student needs one."""
    if backend == "cpu":
        return dtype in _WIDE or kind != KINDS["normalized"]
    return backend in FUSED_BACKENDS


def _kernels(backend: str):
    return registry.kernels(backend, "jacobian_matching")


@torch.library.custom_op("jacfast::jacobian_matching_fwd", mutates_args=())
def jacobian_matching_fwd(
    student: Tensor, teacher: Optional[Tensor], kind: int, reduction: int, eps: float, scale: float, backend: str
) -> tuple[Tensor, Tensor]:
    """Loss ((R,) or ()) in the input dtype, and per-row coefficients (R, 3) float64."""
    return _kernels(backend).forward(student, teacher, kind, reduction, eps, scale)


@jacobian_matching_fwd.register_fake
def _(student, teacher, kind, reduction, eps, scale, backend):
    rows = student.shape[0]
    loss = student.new_empty((rows,) if reduction == REDUCTION_NONE else ())
    return loss, student.new_empty((rows, 3), dtype=torch.float64)


@torch.library.custom_op("jacfast::jacobian_matching_bwd", mutates_args=())
def jacobian_matching_bwd(
    grad_loss: Tensor,
    student: Tensor,
    teacher: Optional[Tensor],
    coef: Tensor,
    reduction: int,
    scale: float,
    need_student: bool,
    need_teacher: bool,
    backend: str,
) -> tuple[Tensor, Tensor]:
    """Gradients wrt student and teacher rows; an empty tensor for one not needed."""
    return _kernels(backend).backward(
        grad_loss.contiguous(), student, teacher, coef, reduction, scale, need_student, need_teacher
    )


@jacobian_matching_bwd.register_fake
def _(grad_loss, student, teacher, coef, reduction, scale, need_student, need_teacher, backend):
    grad_s = torch.empty_like(student) if need_student else student.new_empty((0,))
    grad_t = torch.empty_like(student) if (need_teacher and teacher is not None) else student.new_empty((0,))
    return grad_s, grad_t


@torch.library.custom_op("jacfast::jacobian_matching_fwd_bwd", mutates_args=())
def jacobian_matching_fwd_bwd(
    student: Tensor, teacher: Optional[Tensor], kind: int, reduction: int, eps: float, scale: float, backend: str
) -> tuple[Tensor, Tensor]:
    """Loss and its gradient wrt the student rows (of the sum when reduction is none), no autograd."""
    return _kernels(backend).forward_backward(student, teacher, kind, reduction, eps, scale)


@jacobian_matching_fwd_bwd.register_fake
def _(student, teacher, kind, reduction, eps, scale, backend):
    loss = student.new_empty((student.shape[0],) if reduction == REDUCTION_NONE else ())
    return loss, torch.empty_like(student)


def _setup_context(ctx, inputs, output):
    student, teacher, kind, reduction, eps, scale, backend = inputs
    ctx.save_for_backward(student, teacher, output[1])
    ctx.reduction, ctx.scale, ctx.backend = reduction, scale, backend


def _backward(ctx, grad_loss, _grad_coef):
    student, teacher, coef = ctx.saved_tensors
    need_s, need_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    grad_s, grad_t = jacobian_matching_bwd(
        grad_loss, student, teacher, coef, ctx.reduction, ctx.scale, need_s, need_t, ctx.backend
    )
    return (
        grad_s if need_s else None,
        grad_t if (need_t and teacher is not None) else None,
        None, None, None, None, None,
    )


torch.library.register_autograd("jacfast::jacobian_matching_fwd", _backward, setup_context=_setup_context)


def _scale_by_upstream_(grad: Tensor, grad_loss: Tensor, reduction: int) -> None:
    """grad *= grad_loss (per row for reduction none), in place; nothing to do when it is 1.

    On the CPU, asking is free; on a GPU, ``.item()`` would stall the host until the device
    catches up, so a Triton kernel skips the tiles whose grad_loss is 1 on the device. Without
    Triton the product is always formed (same values: one rounding of an exact product).
    """
    on_cpu = grad_loss.device.type == "cpu"
    if on_cpu and grad_loss.ndim == 0 and grad_loss.item() == 1.0:
        return
    if not on_cpu and registry.status_for("triton", grad_loss.device.type).available:
        _kernels("triton").scale_unless_one_(grad, grad_loss.to(grad.dtype), reduction)
    else:
        grad.mul_(grad_loss.view(-1, 1) if reduction == REDUCTION_NONE else grad_loss)


class JacobianMatchingFunction(torch.autograd.Function):
    """The ops' autograd formula for eager calls: same kernels, less overhead, fewer passes.

    Custom-op dispatch with ``register_autograd`` costs per call about what the kernels take
    at R*D ~ 1e6 (docs/performance.md); this Function calls the kernels directly.
    Compiled graphs, ``opcheck`` and export go through the registered ops instead.

    Fused path (:func:`fuses`: every dtype on the GPU backends; on the CPU every dtype of the
    squared and norm kinds and float32/float64 of the normalized one; only the student needs a
    gradient: the training case): the forward runs
    ``forward_backward``, one pass that reads each row once and writes its gradient, and keeps
    that gradient. The first backward hands the buffer over, scaled in place by the incoming
    gradient unless that is 1 (on a GPU the check runs on the device, see
    ``_scale_by_upstream_``): 3 passes over memory (5 when scaled: pass a term's weight as
    the loss's ``weight`` instead), against 5 for forward + backward; the scaling rounds a
    second time, so gradients may then differ from the ops' by an ulp. The buffer is
    never returned twice (autograd may accumulate into a returned gradient in place): a
    second backward through a retained graph recomputes from the saved inputs.

    The backward is first order: a backward with ``create_graph=True`` raises instead of
    returning gradients that silently carry no graph; ``backend="torch"`` is twice
    differentiable. (A student Jacobian built with ``create_graph=True`` is fine: only the
    loss head's own backward must be first order.)
    """

    @staticmethod
    def forward(ctx, student, teacher, kind: int, reduction: int, eps: float, scale: float, backend: str,
                grad_mode: bool):
        # grad_mode: torch.is_grad_enabled() of the caller (forward itself runs without grad,
        # and needs_input_grad is True under no_grad too). False never fuses: the loss-head
        # benchmark passes it to time forward then backward against the fused path.
        kernels = _kernels(backend)
        ctx.kind, ctx.reduction, ctx.eps, ctx.scale, ctx.backend = kind, reduction, eps, scale, backend
        need_t = ctx.needs_input_grad[1] and teacher is not None
        fused = grad_mode and ctx.needs_input_grad[0] and not need_t and fuses(backend, kind, student.dtype)
        if fused:
            loss, ctx.gradient = kernels.forward_backward(student, teacher, kind, reduction, eps, scale)
            ctx.save_for_backward(student, teacher)
        else:
            loss, coef = kernels.forward(student, teacher, kind, reduction, eps, scale)
            ctx.gradient = None
            ctx.save_for_backward(student, teacher, coef)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        if torch.is_grad_enabled():  # create_graph=True
            raise RuntimeError(
                f"backend={ctx.backend!r} computes first-order gradients of the Jacobian-matching loss only;"
                " differentiating its backward (create_graph=True) needs backend='torch'"
            )
        nones = (None,) * 6
        if ctx.gradient is not None:  # fused forward: hand its gradient over, once
            grad, ctx.gradient = ctx.gradient, None
            _scale_by_upstream_(grad, grad_loss, ctx.reduction)
            return (grad, None) + nones
        kernels = _kernels(ctx.backend)
        saved = ctx.saved_tensors
        if len(saved) == 2:  # fused forward whose gradient went to an earlier backward
            student, teacher = saved
            _, coef = kernels.forward(student, teacher, ctx.kind, ctx.reduction, ctx.eps, ctx.scale)
        else:
            student, teacher, coef = saved
        need_s, need_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1] and teacher is not None
        grad_s, grad_t = kernels.backward(
            grad_loss.contiguous(), student, teacher, coef, ctx.reduction, ctx.scale, need_s, need_t
        )
        return (grad_s if need_s else None, grad_t if need_t else None) + nones
