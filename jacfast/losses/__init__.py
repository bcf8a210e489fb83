"""Knowledge-transfer losses built on Jacobian rows: distillation, transfer, the norm penalty."""
from jacfast.losses.distillation import (
    DistillationLoss,
    DistillationOutput,
    TeacherOutputs,
    jacobian_penalty,
)
from jacfast.losses.transfer import TransferLoss, TransferOutput, attention_map

__all__ = [
    "DistillationLoss",
    "DistillationOutput",
    "TeacherOutputs",
    "TransferLoss",
    "TransferOutput",
    "attention_map",
    "jacobian_penalty",
]
