"""Trainers: checkpointed, resumable, mixed-precision, DDP-ready training loops.

- :class:`SupervisedTrainer`: cross-entropy (+ optional penalty such as the Jacobian norm).
- :class:`Distiller`: teacher -> student with a distillation loss (``jacfast.DistillationLoss``).
- :class:`TransferTrainer`: teacher features -> student on a new data set (``jacfast.TransferLoss``).

Data: ``(x, y)`` tensors, a ``Dataset`` or a ``DataLoader`` (:mod:`jacfast.trainers.sources`);
``accumulate=``, ``clip_grad_norm=``, ``batch_fn=`` (dict / tuple batches) on every trainer.
"""
from jacfast.trainers.base import CheckpointMismatchError, Trainer, TrainingInterrupted
from jacfast.trainers.batches import OnDevice
from jacfast.trainers.grad_scaling import GradScaled, unwrap
from jacfast.trainers.state import BatchStream, atomic_save
from jacfast.trainers.distiller import Distiller, SupervisedTrainer
from jacfast.trainers.transfer import TransferTrainer

__all__ = [
    "BatchStream",
    "CheckpointMismatchError",
    "Distiller",
    "GradScaled",
    "OnDevice",
    "SupervisedTrainer",
    "Trainer",
    "TrainingInterrupted",
    "TransferTrainer",
    "atomic_save",
    "unwrap",
]
