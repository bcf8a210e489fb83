"""A one-launch check that the Triton interpreter (``TRITON_INTERPRET=1``) runs here at all.

Some Triton releases' interpreters fail on newer NumPy before any jacfast kernel does
(triton 3.6 with NumPy >= 2.4: a loop bound such as ``range(0, n)`` raises "only
0-dimensional arrays can be converted to Python scalars"). The registry runs this probe
once and reports the Triton backend on CPU tensors as unavailable, with the error, instead
of letting every kernel fail with it.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _loop_sum_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    # The constructs the jacfast kernels rely on: a runtime-bounded loop, masked loads, a reduction.
    acc = tl.zeros([BLOCK], dtype=tl.float64)
    for start in range(0, n, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        acc += tl.load(x_ptr + cols, mask=cols < n, other=0.0)
    tl.store(out_ptr + tl.program_id(0), tl.sum(acc, axis=0))


def interpreter_error() -> str:
    """The empty string when the interpreter runs the probe exactly, else what went wrong."""
    x = torch.arange(1, 21, dtype=torch.float64)
    out = torch.empty(1, dtype=torch.float64)
    try:
        _loop_sum_kernel[(1,)](x, out, x.numel(), BLOCK=8)
    except Exception as exc:  # the interpreter's own failure, whatever its type
        return f"{type(exc).__name__}: {exc}".splitlines()[0]
    return "" if out.item() == 210.0 else f"the probe kernel summed 1..20 to {out.item()}, not 210"
