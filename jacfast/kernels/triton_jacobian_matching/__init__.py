"""Triton kernels for the Jacobian-matching loss head (contract: csrc/README.md).

The registry's namespace for the triton backend (``registry.kernels("triton",
"jacobian_matching")``). Imports point one way: this package -> fused -> two_pass -> common.

- common   : the split plan, launch options and the jit helpers every kernel shares (one
             definition each, so the kernels add and round alike), and the determinism rules
- two_pass : forward (stage 1 + finishing kernel) and backward (one elementwise launch)
- fused    : forward_backward, which reads each row once where it can, fused_path (which
             kernels it runs) and scale_unless_one_ (a fused gradient times grad_loss)
"""
from .fused import forward_backward, fused_path, scale_unless_one_
from .two_pass import backward, forward

__all__ = ["backward", "forward", "forward_backward", "fused_path", "scale_unless_one_"]
