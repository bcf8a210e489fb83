"""Trainers: checkpointed, resumable, mixed-precision, DDP-ready training loops.

- :class:`SupervisedTrainer`: cross-entropy (+ optional penalty such as the Jacobian norm).
- :class:`Distiller`: teacher -> student with a distillation loss (``jacfast.DistillationLoss``).
- :class:`TransferTrainer`: teacher features -> student on a new data set (``jacfast.TransferLoss``).
"""
from jacfast.trainers.base import (
    BatchStream,
    CheckpointMismatchError,
    GradScaled,
    Trainer,
    TrainingInterrupted,
    atomic_save,
    unwrap,
)
from jacfast.trainers.distiller import Distiller, SupervisedTrainer
from jacfast.trainers.transfer import TransferTrainer

__all__ = [
    "BatchStream",
    "CheckpointMismatchError",
    "Distiller",
    "GradScaled",
    "SupervisedTrainer",
    "Trainer",
    "TrainingInterrupted",
    "TransferTrainer",
    "atomic_save",
    "unwrap",
]
