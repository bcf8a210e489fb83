"""jacfast: fused Jacobian-matching losses for knowledge transfer in PyTorch.

Implements "Knowledge Transfer with Jacobian Matching" (Srinivas & Fleuret, ICML 2018).
"""
from jacfast.registry import BackendUnavailableError, backends
from jacfast.loss import (
    JacobianMatchingLoss,
    jacobian_matching_loss,
    jacobian_matching_loss_and_grad,
    jacobian_norm_penalty,
)

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "JacobianMatchingLoss",
    "backends",
    "jacobian_matching_loss",
    "jacobian_matching_loss_and_grad",
    "jacobian_norm_penalty",
]
