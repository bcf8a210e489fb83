"""Transfer learning: a pretrained teacher's intermediate features guide a student on a new data set.

The student (any architecture) learns the new labels with cross-entropy; ``jacfast.TransferLoss``
(activation matching / attention transfer / + the attention-map Jacobian term) ties chosen
student layers to chosen teacher layers. With ``loss=None`` the student trains from scratch
(cross-entropy only), the baseline.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from jacfast.trainers.base import Trainer
from jacfast.trainers.batches import cross_entropy, model_logits, wide
from jacfast.trainers.distiller import describe, networks_in, split_components, weights_hash


class TransferTrainer(Trainer):
    """Train ``student`` on ``train_data`` with a ``TransferLoss`` to a frozen ``teacher``.

    Args:
        teacher: the pretrained network (frozen, eval mode); None only with ``loss=None``.
        student: the network trained, (B, *input_dims) -> (B, C_new). It must be the student
            the loss hooked (``TransferLoss(teacher, student, layers, ...)``).
        loss: a ``jacfast.TransferLoss`` (its ``ce_weight`` weighs the new labels' CE), called
            as ``loss(x, y)`` with its student swapped for the DDP wrapper; or None for
            cross-entropy only (from scratch). Its parameters (adapters) train with the student.
        train_data: (x (N, *input_dims), y (N,)) of the NEW task: tensors, a Dataset or a DataLoader.
        **kwargs: see :class:`~jacfast.trainers.base.Trainer`.
    """

    def __init__(self, teacher: Optional[nn.Module], student: nn.Module, loss: Optional[nn.Module], train_data,
                 **kwargs):
        if loss is not None and teacher is None:
            raise ValueError("a transfer loss needs a teacher")
        if loss is not None and loss.__dict__.get("student") not in (None, student):
            raise ValueError("the loss hooks another student module: build TransferLoss(teacher, student, ...) "
                             "with the student passed here")
        config = dict(kwargs.pop("config", None) or {})
        config.setdefault("teacher", getattr(teacher, "spec", type(teacher).__name__) if teacher else None)
        config.setdefault("teacher_weights", weights_hash(teacher))
        config.setdefault("loss", describe(loss))
        if loss is not None and any(True for _ in loss.parameters()):  # adapters train with the student
            kwargs["extra_modules"] = (*kwargs.get("extra_modules", ()), loss)
        super().__init__(student, train_data, config=config, **kwargs)
        self.teacher = teacher.to(self.device).eval() if teacher is not None else None
        if self.teacher is not None:
            for p in self.teacher.parameters():
                p.requires_grad_(False)
        self.loss = loss

    def compute_loss(self, x, y: Tensor):
        if self.loss is None:
            logits = model_logits(self.net, x, self.outputs)
            ce = cross_entropy(wide(logits), y)
            return ce, {"ce": ce.detach()}, logits
        # No GradScaled here: the attention-map Jacobians are seeded inside the networks, not at
        # their outputs, so an output-side scale would not cancel. fp16 runs them unscaled.
        with networks_in(self.loss, student=self.net):
            return split_components(self.loss(x, y))
