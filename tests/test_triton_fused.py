"""The Triton backend's fused forward_backward and its device-side upstream scaling.

forward_backward must give the bits of forward followed by backward(grad_loss = 1) whichever
path it takes (the fused single-read kernel for rows of up to 2 blocks in one split; for longer
rows stage 1 writing the gradient of the squared and norm kinds, or the two kernels), and the
rows it fuses must match the float64 oracle like the rest.
"""
import os

import pytest
import torch
from conftest import DEVICE
from test_loss import assert_forward_backward_bits, assert_matches_oracle, make_pair

from jacfast import registry

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


@pytest.fixture(scope="module")
def triton_kernels():
    status = registry._status_for("triton", DEVICE.type)
    if not status.available:
        pytest.skip(status.reason)
    return registry.kernels("triton", "jacobian_matching")


def _fused_shapes(device):
    """(R, D, fused?) for the device's split plan: rows of 1 and 2 blocks (of 2048) are fused;
    longer rows and rows split for want of rows take the two-kernel path."""
    from jacfast.kernels.triton_jacobian_matching import _num_sms

    many = 4 * _num_sms(device)  # at least this many rows: one split per row
    return [(many + 1, 784, True), (many, 2048, True), (many, 3072, True), (many + 2, 4096, True),
            (many + 3, 1, True), (many, 4097, False), (many, 8192, False), (2, 3072, False)]


class _Spy:
    """Stands in for a Triton kernel in ``module``: counts launches, then launches it."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_backward_has_the_bits_of_forward_then_backward(triton_kernels, monkeypatch, dtype):
    """Also which kernels forward_backward launched: the fused one for the rows it takes; for
    longer rows, stage 1 writing the gradient (squared, norm) or forward then backward."""
    module = triton_kernels
    if module._fused_tuned is not None:  # compiled: the autotuner launches it, the spy cannot count
        fused_spy = backward_spy = None
    else:
        fused_spy, backward_spy = _Spy(module._fused_kernel), _Spy(module._backward_kernel)
        monkeypatch.setattr(module, "_fused_kernel", fused_spy)
        monkeypatch.setattr(module, "_backward_kernel", backward_spy)
    gen = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    for rows, dim, fused in _fused_shapes(DEVICE):
        for kind in (0, 1, 2):
            for reduction in (0, 1):
                s = torch.randn(rows, dim, generator=gen, dtype=torch.float64).to(DEVICE, dtype)
                t = None if kind == 2 else torch.randn(rows, dim, generator=gen, dtype=torch.float64).to(DEVICE, dtype)
                before = (fused_spy.launches, backward_spy.launches) if fused_spy else None
                assert_forward_backward_bits(module, s, t, kind, reduction)  # forward_backward, forward, backward
                if fused_spy:
                    two_passes = not fused and kind == 0  # forward then backward inside forward_backward
                    assert fused_spy.launches - before[0] == int(fused), (rows, dim, kind)
                    assert backward_spy.launches - before[1] == int(two_passes) + 1, (rows, dim, kind)


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=str)
@pytest.mark.parametrize("kind", ("normalized", "squared", "norm"))
def test_fused_rows_match_the_oracle(triton_kernels, dtype, kind):
    """Through the public loss (the training case takes the fused path), odd row lengths."""
    rows = 4 * triton_kernels._num_sms(DEVICE) + 1
    for dim in (3, 1000, 3001, 4096):
        student, teacher = make_pair((rows, 1, dim), dtype, DEVICE, kind)
        for reduction in ("none", "mean"):
            assert_matches_oracle("triton", student, teacher, kind, reduction, teacher_grad=False)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_scale_unless_one_matches_torch_mul(triton_kernels, dtype):
    """The device-side scaling of a fused gradient: torch's product, rows with g == 1 untouched."""
    rows, dim = 37, 1500
    grad = torch.randn(rows, dim, dtype=torch.float64).to(DEVICE, dtype)
    per_row = (torch.rand(rows, dtype=torch.float64) * 3).to(DEVICE, dtype)
    per_row[::3] = 1.0
    per_row[5] = float("nan")  # NaN scales (to NaN), it is not 1
    cases = [(per_row, 0), (torch.ones((), dtype=dtype, device=DEVICE), 1),
             (torch.full((), 0.37, dtype=dtype, device=DEVICE), 1),
             (torch.full((1,), 1.5, dtype=dtype, device=DEVICE).expand(rows), 0)]  # stride 0
    for g, reduction in cases:
        got = triton_kernels.scale_unless_one_(grad.clone(), g, reduction)
        want = grad * (g.reshape(-1, 1) if reduction == 0 else g)
        assert torch.equal(got.isnan(), want.isnan()), reduction
        assert torch.equal(got.nan_to_num(), want.nan_to_num()), reduction
