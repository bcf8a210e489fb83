"""The loss head on rows of image size (3 x 224 x 224 and more), the case every kernel splits.

forward_backward keeps the kernel contract there too: the bits of forward then backward
(grad_loss = 1). The CUDA backend fuses such rows by cutting them into segments that fit a
block's registers (for the normalized kind the blocks of a row meet at a barrier); these
tests pin which rows take which path and check NaN still reaches the loss of its row.
"""
import pytest
import torch
from conftest import kernel_backends
from helpers import assert_forward_backward_bits, assert_matches_oracle, make_pair

import jacfast
from jacfast import registry

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
IMAGE = 3 * 224 * 224


def _skip_interpreter(backend, device):
    if backend == "triton" and device.type == "cpu":
        pytest.skip("the Triton interpreter is too slow for image rows (its fused kernel takes rows of <= 4096 "
                    "elements, tested in test_triton_fused.py)")


@pytest.mark.parametrize("backend,device", kernel_backends())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_backward_bits_on_image_rows(backend, device, dtype):
    """Rows of 16, 1 and 3 images (an odd length, so a partial last group), all kinds."""
    _skip_interpreter(backend, device)
    kernels = registry.kernels(backend, "jacobian_matching")
    for rows, dim in ((16, IMAGE), (1, IMAGE), (3, IMAGE - 5)):
        for kind_name, kind in (("normalized", 0), ("squared", 1), ("norm", 2)):
            s, t = make_pair((rows, dim), dtype, device, kind_name)
            for reduction in (0, 1):
                assert_forward_backward_bits(kernels, s, t, kind, reduction)


@pytest.mark.parametrize("backend,device", kernel_backends())
def test_forward_backward_bits_on_a_row_of_too_many_segments(backend, device):
    """One row of 2^24 elements: more segments than CUDA's row barrier takes (the normalized
    kind runs forward then backward; squared and norm, which need no barrier, stay fused)."""
    _skip_interpreter(backend, device)
    kernels = registry.kernels(backend, "jacobian_matching")
    for kind_name, kind in (("normalized", 0), ("squared", 1), ("norm", 2)):
        s, t = make_pair((1, 2**24 + 3), torch.float32, device, kind_name)
        for reduction in (0, 1):
            assert_forward_backward_bits(kernels, s, t, kind, reduction)


@pytest.mark.parametrize("backend,device", kernel_backends())
def test_a_row_past_the_gpu_grid_limits(backend, device):
    """GPU only: one row of more than 65535 x 1024 elements, more column tiles than a CUDA
    grid's second dimension takes (the Triton backward and scaling kernels use one dimension),
    through forward_backward, forward, backward and the upstream scaling."""
    if device.type != "cuda":
        pytest.skip("a limit of GPU launches; the CPU kernels have none")
    kernels = registry.kernels(backend, "jacobian_matching")
    s, t = make_pair((1, 2**26 + 1029), torch.float32, device, "normalized")
    assert_forward_backward_bits(kernels, s, t, 0, 0)
    x = s.clone().requires_grad_(True)
    loss = jacfast.jacobian_matching_loss(x, t, reduction="none", backend=backend)
    (loss * 3).sum().backward()  # an upstream gradient of 3: the scaling kernel
    _, grad1 = kernels.forward_backward(s, t, 0, 0, 1e-12, 1.0)
    # 3 x a float is exact in float64, so this rounds once, as the kernels do
    assert torch.isfinite(x.grad).all() and torch.equal(x.grad, (grad1.double() * 3).to(x.dtype))


@pytest.mark.parametrize("backend,device", kernel_backends())
@pytest.mark.parametrize("kind", ("normalized", "squared", "norm"))
def test_image_rows_match_the_oracle_in_training(backend, device, kind):
    """The training case (only the student requires grad) on split rows, against float64."""
    _skip_interpreter(backend, device)
    student, teacher = make_pair((4, 2, IMAGE), torch.float32, device, kind)
    for reduction in ("none", "mean"):
        assert_matches_oracle(backend, student, teacher, kind, reduction, teacher_grad=False)


@pytest.mark.parametrize("backend,device", kernel_backends())
@pytest.mark.parametrize("kind", ("normalized", "squared", "norm"))
def test_nan_in_a_late_segment_reaches_its_row(backend, device, kind):
    """NaN far into row 2 (past the first segments): that row's loss is NaN, the others finite;
    for the normalized loss the whole row's gradient is NaN (its coefficients are)."""
    _skip_interpreter(backend, device)
    student, teacher = make_pair((5, IMAGE), torch.float32, device, kind)
    student[2, IMAGE - 7] = float("nan")
    x = student.clone().requires_grad_(True)
    loss = jacfast.jacobian_matching_loss(x, teacher, kind=kind, reduction="none", backend=backend)
    loss.sum().backward()
    finite = torch.isfinite(loss)
    assert torch.isnan(loss[2]) and finite[[0, 1, 3, 4]].all(), loss
    assert torch.isfinite(x.grad[[0, 1, 3, 4]]).all()
    assert torch.isnan(x.grad[2, IMAGE - 7])
    if kind == "normalized":
        assert torch.isnan(x.grad[2]).all()
    total = jacfast.jacobian_matching_loss(student, teacher, kind=kind, reduction="mean", backend=backend)
    assert torch.isnan(total)


@pytest.fixture(scope="module")
def cuda_ops():
    try:
        import jacfast._C_cuda  # noqa: F401  (its host code loads and runs without a GPU)
    except ImportError as e:
        pytest.skip(f"the CUDA extension is not built: {e}")
    return torch.ops.jacfast_cuda


def test_cuda_split_plan_fits_the_fused_kernel(cuda_ops):
    """Runs without a GPU. Every row of the CUDA plan fits rows_fused_kernel (warp-layout rows
    of <= 256 16-byte groups, block-layout segments of <= 1024 covering the row exactly, none
    empty), and the segment counts the comments and README quote."""
    for elem in (2, 4, 8):
        for rows in (1, 2, 3, 16, 128, 1000, 1024, 6644):
            for dim in (1, 7, 1024, 1025, 2048, 2049, 4096, 4097, 20000, IMAGE - 5, IMAGE, 2**24 + 3):
                team, splits, gps = cuda_ops._plan(rows, dim, elem)
                G = -(-dim // (16 // elem))  # 16-byte groups in a row
                if G <= 256:
                    assert (team, splits, gps) == (32, 1, G), (rows, dim, elem)
                else:
                    assert team == 256 and gps <= 1024, (rows, dim, elem)
                    assert (splits - 1) * gps < G <= splits * gps, (rows, dim, elem)
    assert cuda_ops._plan(16, IMAGE, 4) == (256, 64, 588)
    assert cuda_ops._plan(128, IMAGE, 4)[1] == cuda_ops._plan(1024, IMAGE, 4)[1] == 37
    assert cuda_ops._plan(16, IMAGE, 2)[1] == 36 and cuda_ops._plan(1024, IMAGE, 2)[1] == 19
    assert cuda_ops._plan(1, IMAGE, 4)[1] == 73 and cuda_ops._plan(1, IMAGE, 8)[1] == 147
    assert cuda_ops._plan(3, 4096, 4) == (256, 2, 512) and cuda_ops._plan(2048, 3072, 4) == (256, 1, 768)


def _cuda_available() -> bool:
    return registry.status_for("cuda", "cuda").available


@pytest.mark.skipif(not _cuda_available(), reason="needs the CUDA backend on a GPU")
def test_cuda_fused_paths():
    """Which kernel CUDA's forward_backward runs (0: forward then backward, 1: rows in
    registers, 2: split rows; the normalized kind's at a row barrier, of at most 128 segments;
    squared and norm need none), so a change that loses a fusion fails here rather than only
    in the benchmark. Segment counts: test_cuda_split_plan_fits_the_fused_kernel."""
    path = torch.ops.jacfast_cuda._fused_path
    cases = {  # (rows, dim, dtype): (normalized, squared and norm)
        (8192, 784, torch.float32): (1, 1),     # warp layout, 196 groups
        (17, 1024, torch.float32): (1, 1),      # warp layout, 256 groups: the limit
        (9, 1025, torch.float32): (1, 1),       # block layout from 257 groups, unsplit
        (9, 2048, torch.float16): (1, 1),       # 256 groups of 8 halves
        (2048, 3072, torch.float32): (1, 1),    # block layout, unsplit (R >= 1024)
        (3, 4096, torch.float32): (2, 2),       # 2 segments of 512 groups
        (16, IMAGE, torch.float32): (2, 2),     # 64 segments
        (128, IMAGE, torch.float32): (2, 2),    # 37 segments of <= 1024 groups
        (16, IMAGE, torch.bfloat16): (2, 2),    # 36
        (1, IMAGE, torch.float32): (2, 2),      # 73
        (1, IMAGE, torch.float64): (0, 2),      # 147: more than the barrier takes
        (1, 2**24 + 3, torch.float32): (0, 2),  # 4097
    }
    for (rows, dim, dtype), (normalized, others) in cases.items():
        got = [path(rows, dim, dtype, kind) for kind in (0, 1, 2)]
        assert got == [normalized, others, others], (rows, dim, dtype, got)


@pytest.mark.skipif(not _cuda_available(), reason="needs the CUDA backend on a GPU")
def test_cuda_row_barrier_gives_up_without_changing_the_bits(monkeypatch):
    """JACFAST_CUDA_BARRIER_POLLS=0: a block that does not find its row complete at once gives
    up at the row barrier and leaves its segment to pending_backward_kernel; the bits are still
    those of forward then backward. Memory just filled with NaN and freed is what the
    gradient's allocation gets back, so a segment nobody writes fails the comparison."""
    monkeypatch.setenv("JACFAST_CUDA_BARRIER_POLLS", "0")
    kernels = registry.kernels("cuda", "jacobian_matching")
    for rows, dim, dtype in ((16, IMAGE, torch.float32), (1, IMAGE, torch.float32), (3, IMAGE - 5, torch.bfloat16)):
        assert torch.ops.jacfast_cuda._fused_path(rows, dim, dtype, 0) == 2, (rows, dim, dtype)
        s, t = make_pair((rows, dim), dtype, "cuda", "normalized")
        for reduction in (0, 1):
            torch.full((rows, dim), float("nan"), dtype=dtype, device="cuda")  # freed at once
            assert_forward_backward_bits(kernels, s, t, 0, reduction)
