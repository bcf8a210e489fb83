"""The Triton backend's fused forward_backward and its device-side upstream scaling.

forward_backward must give the bits of forward followed by backward(grad_loss = 1) whichever
path it takes (the fused single-read kernel for rows of up to 2 blocks in one split; for split
rows stage 1 writing the gradient of the squared and norm kinds, the row-barrier kernel for the
normalized kind, or forward then backward past one split per SM), and the rows it fuses must
match the float64 oracle like the rest.
"""
import os

import pytest
import torch
from conftest import DEVICE
from helpers import assert_forward_backward_bits, assert_matches_oracle, make_pair

from jacfast import registry

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


@pytest.fixture(scope="module")
def triton_kernels():
    status = registry.status_for("triton", DEVICE.type)
    if not status.available:
        pytest.skip(status.reason)
    return registry.kernels("triton", "jacobian_matching")


def _path_shapes(device):
    """(R, D, path of the normalized kind) for the device's split plan: rows of 1 and 2 blocks
    (of 2048) in one split are "fused"; longer rows, and rows split for want of rows, go in
    splits of one block to the row "barrier", or "two-pass" past one split per SM. Squared and
    norm rows are fused either way (in one kernel, or by stage 1 writing their gradient)."""
    from jacfast.kernels.triton_jacobian_matching.common import num_sms as _num_sms

    many = 4 * _num_sms(device)  # at least this many rows: one split per row
    beyond = (_num_sms(device) + 1) * 2048 + 1  # one split more than the barrier takes
    return [(many + 1, 784, "fused"), (many, 2048, "fused"), (many, 3072, "fused"), (many + 2, 4096, "fused"),
            (many + 3, 1, "fused"), (many, 4097, "barrier"), (5, 8192, "barrier"), (2, 3072, "barrier"),
            (2, beyond, "two-pass")]


def test_split_plan_covers_rows_in_launchable_splits():
    """Host code only (no tensors). Split rows go in splits of one block, which the barrier
    kernel holds in registers, except past CUDA's 65535 limit on stage 1's second grid
    dimension (rows of more than 65535 blocks, ~2^27 elements), where splits grow; every plan
    covers its row."""
    from jacfast.kernels.triton_jacobian_matching.common import plan as _plan

    for device in (torch.device("cpu"), DEVICE):
        for rows in (1, 2, 16, 1024):
            for dim in (1, 784, 2048, 3000, 4096, 4097, 150528, 2**27, 2**27 + 1, 2**28 + 5):
                block, splits, chunk = _plan(rows, dim, device)
                assert splits <= 65535 and chunk % block == 0, (rows, dim)
                assert (splits - 1) * chunk < dim <= splits * chunk, (rows, dim)
                if splits > 1 and dim <= 65535 * 2048:
                    assert chunk == block == 2048, (rows, dim)


class _Spy:
    """Stands in for a Triton kernel in ``module``: counts launches and keeps the arguments
    of the last, then launches it."""

    def __init__(self, kernel):
        self.kernel, self.launches, self.args = kernel, 0, None

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches += 1
            self.args = args
            return self.kernel[grid](*args, **kwargs)
        return launch


def _kernel_module(name):
    """A module of the Triton loss head, imported on first use (triton may be missing)."""
    import importlib

    return importlib.import_module(f"jacfast.kernels.triton_jacobian_matching.{name}")


def _fused_module():
    return _kernel_module("fused")


def _spies(monkeypatch, *names):
    """Spies on the kernels of forward_backward's module (and _backward_kernel in forward's),
    or None where the autotuner launches them (compiled)."""
    fused = _fused_module()
    if fused._fused_tuned is not None:
        return None
    spies = {}
    for name in names:
        module = fused if hasattr(fused, name) else _kernel_module("two_pass")
        spies[name] = _Spy(getattr(module, name))
        monkeypatch.setattr(module, name, spies[name])
    return spies


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_backward_has_the_bits_of_forward_then_backward(triton_kernels, monkeypatch, dtype):
    """Also which kernels forward_backward launched for each path."""
    spies = _spies(monkeypatch, "_fused_kernel", "_barrier_kernel", "_pending_backward_kernel",
                   "_backward_kernel")
    gen = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    for rows, dim, path in _path_shapes(DEVICE):
        for kind in (0, 1, 2):
            for reduction in (0, 1):
                s = torch.randn(rows, dim, generator=gen, dtype=torch.float64).to(DEVICE, dtype)
                t = None if kind == 2 else torch.randn(rows, dim, generator=gen, dtype=torch.float64).to(DEVICE, dtype)
                before = {name: spy.launches for name, spy in spies.items()} if spies else None
                assert_forward_backward_bits(triton_kernels, s, t, kind, reduction)  # forward_backward, forward, backward
                taken = path if kind == 0 else ("fused" if path == "fused" else "stage 1")
                code = {"two-pass": 0, "fused": 1, "barrier": 2, "stage 1": 2}[taken]  # the CUDA backend's codes
                assert triton_kernels.fused_path(rows, dim, kind, DEVICE) == code, (rows, dim, kind)
                if spies:
                    ran = {name: spy.launches - before[name] for name, spy in spies.items()}
                    want = {"_fused_kernel": int(taken == "fused"), "_barrier_kernel": int(taken == "barrier"),
                            "_pending_backward_kernel": int(taken == "barrier"),
                            "_backward_kernel": 1 + int(taken == "two-pass")}  # + the test's own backward
                    assert ran == want, (rows, dim, kind, taken)


def test_row_barrier_gives_up_without_changing_the_bits(triton_kernels, monkeypatch):
    """The interpreter runs programs one after another, so every split but a row's last gives
    up waiting and _pending_backward_kernel writes it; compiled on a GPU, every split passes the
    barrier. Either way the bits of forward then backward, NaN included: a NaN in a row's
    last split makes that whole row's gradient NaN, and only that row's."""
    spies = _spies(monkeypatch, "_barrier_kernel")
    rows, dim = 3, 4 * 2048 - 5  # 4 splits, the last one partial
    s, t = make_pair((rows, dim), torch.float32, DEVICE, "normalized")
    for reduction in (0, 1):
        assert_forward_backward_bits(triton_kernels, s, t, 0, reduction)
        if spies:
            sync = spies["_barrier_kernel"].args[4]  # [ticket, arrived per row, done per split]
            assert sync[0] == rows * 4 and torch.equal(sync[1:1 + rows], torch.full((rows,), 4, dtype=sync.dtype))
            passed = sync[1 + rows:].reshape(rows, 4).sum(1)  # splits that wrote their gradient themselves
            if _fused_module().INTERPRET:
                assert torch.equal(passed, torch.ones_like(passed)), passed
            else:  # 12 programs, all resident at once: none may give up (or the barrier never fuses)
                assert torch.equal(passed, torch.full_like(passed, 4)), passed
    s[1, dim - 3] = float("nan")
    loss, grad = triton_kernels.forward_backward(s, t, 0, 0, 1e-12, 1.0)
    loss2, coef = triton_kernels.forward(s, t, 0, 0, 1e-12, 1.0)
    grad2, _ = triton_kernels.backward(torch.ones_like(loss2), s, t, coef, 0, 1.0, True, False)
    assert torch.isnan(loss[1]) and torch.isfinite(loss[[0, 2]]).all()
    assert torch.isnan(grad[1]).all() and torch.isfinite(grad[[0, 2]]).all()
    assert torch.equal(loss[[0, 2]], loss2[[0, 2]]) and torch.equal(grad[[0, 2]], grad2[[0, 2]])
    assert torch.isnan(loss2[1]) and torch.isnan(grad2[1]).all()


def test_row_barrier_can_be_turned_off(triton_kernels, monkeypatch):
    """JACFAST_TRITON_FUSE_SPLIT_ROWS=0 (read at import): normalized split rows go forward then
    backward, the same bits; squared and norm keep stage 1's gradient (no barrier)."""
    monkeypatch.setattr(_fused_module(), "FUSE_SPLIT_ROWS", False)
    assert [triton_kernels.fused_path(2, 3072, kind, DEVICE) for kind in (0, 1, 2)] == [0, 2, 2]
    s, t = make_pair((2, 3072), torch.float32, DEVICE, "normalized")
    assert_forward_backward_bits(triton_kernels, s, t, 0, 1)


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=str)
@pytest.mark.parametrize("kind", ("normalized", "squared", "norm"))
def test_fused_rows_match_the_oracle(triton_kernels, dtype, kind):
    """Through the public loss (the training case takes the fused path), odd row lengths."""
    rows = 4 * _kernel_module("common").num_sms(DEVICE) + 1
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
