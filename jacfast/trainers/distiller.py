"""Supervised training (optionally with a Jacobian-norm penalty) and teacher -> student distillation.

Losses plug in as jacfast defines them:

- :class:`Distiller` takes a ``jacfast.DistillationLoss`` (or any ``loss(student, x, y, *,
  teacher_outputs=None)`` returning a scalar or a result with ``total`` / ``logits`` fields).
- :class:`SupervisedTrainer` adds ``jacobian_weight * jacfast.jacobian_penalty(model, x)`` to
  the cross-entropy, and/or any ``penalty(model, x, y) -> scalar``.

The trainer always hands the loss the DDP-wrapped student (so the one normal backward syncs
gradients) and, under fp16, networks wrapped in :class:`~jacfast.trainers.base.GradScaled` so
that input-gradient backward passes run scaled like the loss (see ``Trainer.input_grad_scale``).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from jacfast.trainers.base import Trainer
from jacfast.trainers.batches import OnDevice, cross_entropy, model_logits, wide


def split_components(out) -> tuple[Tensor, dict, Optional[Tensor]]:
    """A loss's return value -> (total, {name: scalar tensor} for logging, student logits or None).

    Accepts a tensor, a NamedTuple/dataclass with ``total`` (and optionally ``logits``) such as
    ``DistillationOutput`` / ``TransferOutput``, or a ``(total, {name: value})`` pair.
    """
    if isinstance(out, Tensor):
        return out, {}, None
    if hasattr(out, "_asdict"):
        fields = dict(out._asdict())
    elif hasattr(out, "total"):
        fields = dict(vars(out))
    else:
        fields = {"total": out[0], **(dict(out[1]) if len(out) > 1 and out[1] is not None else {})}
    total, logits = fields.pop("total"), fields.pop("logits", None)
    comps = {k: v.detach() for k, v in fields.items() if isinstance(v, Tensor) and v.numel() == 1}
    return total, comps, logits


@contextmanager
def networks_in(loss, **nets):
    """Temporarily replace networks a loss holds (``loss.teacher`` / ``loss.student``) by wrapped
    versions (DDP, GradScaled). Hooks the loss registered on inner modules keep firing."""
    old = {k: loss.__dict__[k] for k in nets if k in loss.__dict__}
    for k, v in nets.items():
        if k in old and v is not None:
            loss.__dict__[k] = v
    try:
        yield
    finally:
        loss.__dict__.update(old)


def weights_hash(model: Optional[nn.Module]) -> Optional[str]:
    """Content hash of a network's state (so a resumed run refuses a retrained teacher)."""
    if model is None:
        return None
    import hashlib

    h = hashlib.sha1()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def describe(obj) -> str:
    """A stable description of a loss for checkpoint configs (class + simple attributes)."""
    if obj is None:
        return "none"
    if isinstance(obj, nn.Module) and obj.extra_repr():
        return f"{type(obj).__name__}({obj.extra_repr()})"
    simple = {k: v for k, v in sorted(getattr(obj, "__dict__", {}).items())
              if isinstance(v, (int, float, str, bool, tuple, type(None))) and not k.startswith("_")}
    return f"{getattr(obj, '__name__', type(obj).__name__)}{simple}"


class SupervisedTrainer(Trainer):
    """Cross-entropy training of one network, with optional regularizers.

    Args:
        model: (B, *input_dims) -> (B, C), or (B, L, C) for sequence targets (B, L) (CE over
            the positions whose target is not -100); ``outputs=``/``inputs=`` pick the logits
            and the differentiated input of other models.
        train_data: (x (N, *input_dims), y (N,)) tensors, a Dataset or a DataLoader.
        jacobian_weight: weight of ``jacfast.jacobian_penalty`` (the Jacobian-norm penalty,
            an estimate of mean_b ||d model(x_b)/d x_b||_F^2); 0 turns it off.
        num_projections: random projections of that penalty (None: all outputs, exact).
        estimator: "exact" | "finite_difference" for that penalty.
        penalty: optional extra ``penalty(model, x, y) -> scalar``, weighted by ``penalty_weight``.
        **kwargs: see :class:`~jacfast.trainers.base.Trainer` (``weight_decay`` is the L2
            baseline; dropout is a property of the model).
    """

    def __init__(self, model: nn.Module, train_data, *, jacobian_weight: float = 0.0,
                 num_projections: Optional[int] = 1, estimator: str = "exact",
                 penalty: Optional[Callable] = None, penalty_weight: float = 0.0, **kwargs):
        config = dict(kwargs.pop("config", None) or {})
        config.update(jacobian_weight=jacobian_weight, num_projections=num_projections, estimator=estimator,
                      penalty=describe(penalty), penalty_weight=penalty_weight)
        super().__init__(model, train_data, config=config, **kwargs)
        self.jacobian_weight, self.num_projections, self.estimator = float(jacobian_weight), num_projections, estimator
        self.penalty, self.penalty_weight = penalty, float(penalty_weight)

    def compute_loss(self, x, y: Tensor):
        comps = {}
        if self.jacobian_weight > 0:
            from jacfast.losses import jacobian_penalty

            pen, logits = jacobian_penalty(self.scaled(self.net), x, num_projections=self.num_projections,
                                           estimator=self.estimator, return_logits=True, **self.model_io())
            comps["jacobian"] = pen.detach()
        else:
            logits = model_logits(self.net, x, self.outputs)
        ce = cross_entropy(wide(logits), y)
        total = ce + (self.jacobian_weight * wide(pen) if self.jacobian_weight > 0 else 0.0)
        comps["ce"] = ce.detach()
        if self.penalty is not None and self.penalty_weight:
            extra = self.penalty(self.scaled(self.net), x, y)
            comps["penalty"] = extra.detach()
            total = total + self.penalty_weight * wide(extra)
        return total, comps, logits


class Distiller(Trainer):
    """Distil ``teacher`` into ``student`` with a distillation loss (``jacfast.DistillationLoss``).

    Args:
        teacher: frozen network (B, *input_dims) -> (B, C): eval mode, no parameter grads.
        student: the network trained, same input and output shapes.
        loss: e.g. ``DistillationLoss(teacher, beta=..., kind=..., estimator=...)``, called as
            ``loss(student, x, y, teacher_outputs=...)`` (the loss's own ``teacher`` is used, and
            swapped for a GradScaled wrapper under fp16). ``x`` is what ``batch_fn`` made of a
            batch (a Tensor, or a tuple / dict of inputs the loss's ``inputs=`` picks from).
        train_data: (x, y) tensors, a Dataset or a DataLoader; y feeds the loss's CE term.
        teacher_cache: optional ``cache[indices] -> TeacherOutputs`` over ``train_data`` rows
            (``jacfast.TeacherCache``): the teacher's logits and rows computed once, not per step.
            Needs sample indices: tensors or a Dataset, not a DataLoader.
        teacher_device: where the teacher runs (default: the student's ``device``). On another
            device the loss sees it wrapped in :class:`~jacfast.trainers.batches.OnDevice`:
            inputs go to the teacher's device, outputs come back to the student's.
        **kwargs: see :class:`~jacfast.trainers.base.Trainer`; ``outputs``/``inputs`` default
            to the loss's (used by evaluation).
    """

    def __init__(self, teacher: nn.Module, student: nn.Module, loss: Callable, train_data, *,
                 teacher_cache=None, teacher_device=None, **kwargs):
        config = dict(kwargs.pop("config", None) or {})
        config.setdefault("teacher", getattr(teacher, "spec", type(teacher).__name__))
        config.setdefault("teacher_weights", weights_hash(teacher))
        config.setdefault("loss", describe(loss))
        for name in ("outputs", "inputs"):
            if kwargs.get(name) is None and getattr(loss, name, None) is not None:
                kwargs[name] = getattr(loss, name)
        super().__init__(student, train_data, config=config, **kwargs)
        if teacher_cache is not None and self.stream is None:
            raise ValueError("teacher_cache needs sample indices: pass train_data as (x, y) tensors or a Dataset, "
                             "not a DataLoader")
        self.teacher_device = self.device if teacher_device is None else torch.device(teacher_device)
        self.teacher = teacher.to(self.teacher_device).eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        # The loss calls the teacher on the student's tensors: on another device, through a mover.
        self._teacher_net = self.teacher if self.teacher_device == self.device else OnDevice(self.teacher,
                                                                                             self.teacher_device)
        self.loss, self.teacher_cache = loss, teacher_cache

    def compute_loss(self, x, y):
        kw = {}
        if self.teacher_cache is not None:
            t = self.teacher_cache[self.batch_indices]
            kw["teacher_outputs"] = type(t)(*(v.to(self.device) if isinstance(v, Tensor) else v for v in t))
        with networks_in(self.loss, teacher=self.scaled(self._teacher_net)):
            return split_components(self.loss(self.scaled(self.net), x, y, **kw))
