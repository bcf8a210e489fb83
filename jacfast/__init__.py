"""jacfast: fused Jacobian-matching losses for knowledge transfer in PyTorch.

Implements "Knowledge Transfer with Jacobian Matching" (Srinivas & Fleuret, ICML 2018).
Layers: ``loss`` (the fused loss head, ``ops``/``kernels``/``csrc``), ``jacobians`` and
``selection`` (input-Jacobian rows), ``losses`` (distillation, transfer), ``teacher_cache``,
``trainers``; ``python -m jacfast --help`` for the command line.
"""
from jacfast.data import DataError, load_fashion_mnist, load_mnist_digits, subset_per_class
from jacfast.jacobians import StrategyCache, StrategyChoice, input_jacobians, strategy_cache
from jacfast.loss import (
    JacobianMatchingLoss,
    jacobian_matching_loss,
    jacobian_matching_loss_and_grad,
    jacobian_norm_penalty,
)
from jacfast.losses import (
    DistillationLoss,
    DistillationOutput,
    TransferLoss,
    TransferOutput,
    attention_map,
    jacobian_penalty,
)
from jacfast.models import LeNetStudent, ResNetStudent, VGGTeacher, build_model
from jacfast.ops.topk_seeds import topk_seeds
from jacfast.registry import BackendUnavailableError, backends
from jacfast.selection import AllOutputs, ByFunction, Indices, Projections, Selection, Target, TopK, select
from jacfast.teacher_cache import CacheMismatchError, TeacherCache, TeacherOutputs, WithIndices
from jacfast.trainers import CheckpointMismatchError, Distiller, SupervisedTrainer, TrainingInterrupted, TransferTrainer
from jacfast.model_io import ModelCall
from jacfast.sequence import RowPlan, SamplePositions

from jacfast.version import __version__

__all__ = [
    "AllOutputs", "BackendUnavailableError", "ByFunction", "CacheMismatchError", "DistillationLoss",
    "DistillationOutput", "Indices", "JacobianMatchingLoss", "Projections", "Selection", "StrategyCache",
    "StrategyChoice", "Target", "TeacherCache", "TeacherOutputs", "TopK", "TransferLoss", "TransferOutput",
    "WithIndices", "attention_map", "backends", "input_jacobians", "jacobian_matching_loss",
    "jacobian_matching_loss_and_grad", "jacobian_norm_penalty", "jacobian_penalty", "select",
    "strategy_cache", "topk_seeds",
    "DataError", "load_fashion_mnist", "load_mnist_digits", "subset_per_class",
    "LeNetStudent", "ResNetStudent", "VGGTeacher", "build_model",
    "CheckpointMismatchError", "Distiller", "SupervisedTrainer", "TrainingInterrupted", "TransferTrainer",
    "ModelCall", "RowPlan", "SamplePositions",
]
