"""Every kernel backend of the loss head against the float64 oracle (jacfast/reference.py)."""
import pytest
import torch
from conftest import kernel_backends, second_gpu
from helpers import KINDS, REDUCTIONS, assert_forward_backward_bits, assert_matches_oracle, loss_and_grads, make_pair, rel_err

import jacfast
from jacfast import reference

# Shapes (B, K, *input_dims), or (B, D) with K implicit; odd, prime, D = 1 and an image row.
SHAPES = [(3, 2, 7), (4, 1, 1), (2, 3, 97), (5, 2, 3, 5, 7), (6, 13), (1, 2, 3, 224, 224)]
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


@pytest.mark.parametrize("backend,device", kernel_backends())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_backend_matches_oracle(backend, device, dtype, shape, kind):
    student, teacher = make_pair(shape, dtype, device, kind)
    for reduction in REDUCTIONS:
        assert_matches_oracle(backend, student, teacher, kind, reduction)


@pytest.mark.parametrize("backend,device", kernel_backends())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_student_only_gradient(backend, device, dtype, kind):
    """The training case: only the student requires grad, upstream gradient 1 or not."""
    student, teacher = make_pair((5, 3, 67), dtype, device, kind)
    for reduction in REDUCTIONS:
        for unit_grad in (True, False):
            assert_matches_oracle(backend, student, teacher, kind, reduction, unit_grad=unit_grad, teacher_grad=False)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_cpu_streaming_stores_write_the_same_values(monkeypatch, dtype, kind):
    """Large gradients are written with streaming stores (csrc/README.md); forced on for small
    ones, they give the same bits as normal stores and match the oracle. Rows of odd length
    start at unaligned addresses (the aligning head); rows of 784 16-bit elements at addresses
    that are 32 but not 64 bytes aligned every other row; 2 long rows take the split-row path."""
    from jacfast import registry

    status = registry.status_for("cpu", "cpu")
    if not status.available:
        pytest.skip(status.reason)
    grad_out = torch.full((), 0.75, dtype=dtype)
    for shape in ((7, 3, 1001), (4, 2, 784), (2, 1, 3 * 4096 + 5)):
        student, teacher = make_pair(shape, dtype, "cpu", kind)
        results = {}
        for stream in ("0", str(2**62)):
            monkeypatch.setenv("JACFAST_CPU_STREAM_BYTES", stream)
            for teacher_grad in (False, True):  # fused forward_backward / two-pass backward
                results[stream, teacher_grad] = loss_and_grads("cpu", student, teacher, kind, "mean", grad_out,
                                                               teacher_grad=teacher_grad)
            assert_matches_oracle("cpu", student, teacher, kind, "mean", teacher_grad=False)
        for teacher_grad in (False, True):
            (loss_a, grads_a), (loss_b, grads_b) = results["0", teacher_grad], results[str(2**62), teacher_grad]
            assert torch.equal(loss_a, loss_b) and all(torch.equal(a, b) for a, b in zip(grads_a, grads_b))


@pytest.mark.parametrize("backend,device", kernel_backends())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_backward_has_the_bits_of_forward_then_backward(backend, device, dtype):
    """The kernel contract: forward_backward = forward + backward(grad_loss = 1), bit for bit,
    on rows short and long, single and multi-chunk, split or not (fused or not; the CUDA
    limits: 256 groups in the warp layout, 1024 per segment in the block layout, split rows
    fused at a row barrier; image rows in test_long_rows.py). Triton's paths have their own
    shapes, and launch counts, in test_triton_fused.py (the interpreter is slow)."""
    from jacfast import registry

    if backend == "triton":
        pytest.skip("Triton: tests/test_triton_fused.py::test_forward_backward_has_the_bits_of_forward_then_backward")
    kernels = registry.kernels(backend, "jacobian_matching")
    for rows, dim in ((17, 784), (9, 1024), (9, 1025), (5, 3072), (3, 2049), (3, 4096), (3, 4101), (2, 20000),
                      (40, 1)):
        for kind_name, kind in (("normalized", 0), ("squared", 1), ("norm", 2)):
            s, t = make_pair((rows, dim), dtype, device, kind_name)
            for reduction in (0, 1):
                assert_forward_backward_bits(kernels, s, t, kind, reduction)


@pytest.mark.parametrize("backend,device", kernel_backends())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_backward_bits_on_special_values(backend, device, dtype):
    """The same contract where rows hold NaN, +-inf, +-0, the dtype's largest values (s - t
    overflows the dtype) and subnormals: the CPU's squared and norm kernels form the gradient
    from one load as g (d + d), d = s - t, and backward as g (2s - 2t). Bits compared as
    integers (-0 is not 0), NaN by position (its payload is no part of the contract)."""
    from jacfast import registry

    if backend == "triton":
        pytest.skip("Triton: tests/test_triton_fused.py::test_forward_backward_has_the_bits_of_forward_then_backward")
    info, kernels = torch.finfo(dtype), registry.kernels(backend, "jacobian_matching")
    nan, inf, big, sub = float("nan"), float("inf"), info.max, info.smallest_normal / 4
    specials = [(nan, 1.0), (inf, inf), (inf, -2.0), (big, -big), (-big, -big), (-0.0, 0.0), (-0.0, -0.0),
                (sub, -sub), (3 * sub, sub), (big, big / 3)]
    bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[info.bits // 8]
    for dim in (1001, 4096 + 37):  # one chunk with a padded tail; two chunks
        s, t = make_pair((len(specials) + 1, dim), dtype, device, "squared")  # the last row stays plain
        for row, (a, b) in enumerate(specials):
            cols = torch.randint(0, dim, (3,)).tolist()
            s[row, cols], t[row, cols] = a, b
        for kind, teacher in ((0, t), (1, t), (1, None), (2, None)):  # squared without teacher: t = 0
            for reduction in (0, 1):
                scale = 1 / s.shape[0]
                fused = kernels.forward_backward(s, teacher, kind, reduction, 1e-12, scale)
                loss, coef = kernels.forward(s, teacher, kind, reduction, 1e-12, scale)
                ones = torch.ones((s.shape[0],) if reduction == 0 else (), dtype=dtype, device=device)
                grad, _ = kernels.backward(ones, s, teacher, coef, reduction, scale, True, False)
                where = (dim, kind, teacher is None, reduction)
                for got, want in zip(fused, (loss, grad)):
                    got, want = got.reshape(-1), want.reshape(-1)
                    nan = torch.isnan(want)
                    assert torch.equal(torch.isnan(got), nan), where
                    assert torch.equal(got[~nan].view(bits), want[~nan].view(bits)), where


@pytest.mark.parametrize("backend,device", kernel_backends())
def test_backward_twice_with_retained_graph(backend, device):
    """A second backward sees the same gradient: the first one must not consume saved state."""
    student, teacher = make_pair((4, 2, 33), torch.float64, device, "normalized")
    student.requires_grad_(True)
    loss = jacfast.jacobian_matching_loss(student, teacher, backend=backend)
    loss.backward(retain_graph=True)
    first = student.grad.clone()
    (again,) = torch.autograd.grad(loss, student, retain_graph=True)
    loss.backward()
    assert torch.equal(again, first)
    assert torch.equal(student.grad, 2 * first)


@pytest.mark.parametrize("backend,device", kernel_backends())
def test_differentiating_the_backward_raises(backend, device):
    """The kernels' backward is first order: asking for more raises instead of returning zeros."""
    student, teacher = make_pair((3, 2, 9), torch.float64, device, "normalized")
    student.requires_grad_(True)
    loss = jacfast.jacobian_matching_loss(student, teacher, backend=backend)
    with pytest.raises(RuntimeError, match="first-order gradients .* backend='torch'"):
        torch.autograd.grad(loss, student, create_graph=True)


@pytest.mark.parametrize("backend,device", kernel_backends())
def test_nearly_matched_rows_stay_accurate(backend, device):
    """t = c*s*(1 + 1e-3 noise): 2 - 2cos would lose every digit; each fp32 row within 1e-4."""
    rows, dim = 64, 3 * 32 * 32
    student = torch.randn(rows, 1, dim, dtype=torch.float64)
    scale = torch.rand(rows, 1, 1, dtype=torch.float64) * 2 + 0.25
    teacher = scale * student * (1 + 1e-3 * torch.randn_like(student))
    student, teacher = student.float().to(device), teacher.float().to(device)
    loss, _ = loss_and_grads(backend, student, teacher, "normalized", "none")
    ref, _ = loss_and_grads("oracle", student.double(), teacher.double(), "normalized", "none")
    assert ref.min() > 0
    assert ((loss.double() - ref).abs() / ref).max() <= 1e-4
    assert_matches_oracle(backend, student, teacher, "normalized", "mean")


@pytest.mark.parametrize("backend,device", kernel_backends())
@pytest.mark.parametrize("which", ["student", "teacher", "both"])
def test_zero_rows_take_the_eps_branch(backend, device, which):
    student, teacher = make_pair((6, 3, 41), torch.float32, device, "normalized")
    if which in ("student", "both"):
        student[1, 2] = 0
        student[4] = 0
    if which in ("teacher", "both"):
        teacher[1, 2] = 0
        teacher[0, 0] = 0
    for kind in KINDS:
        for reduction in REDUCTIONS:
            assert_matches_oracle(backend, student, None if kind == "norm" else teacher, kind, reduction)


@pytest.mark.parametrize("backend,device", kernel_backends())
def test_tiny_eps_branch_rows(backend, device):
    """Rows whose norm is nonzero but below eps use the eps formula (2/eps)(u - v)."""
    student, teacher = make_pair((4, 2, 9), torch.float64, device, "normalized")
    student[0, 1] *= 1e-9 / student[0, 1].norm()
    assert_matches_oracle(backend, student, teacher, "normalized", "sum", eps=1e-6)


@pytest.mark.parametrize("backend,device", kernel_backends())
def test_huge_and_tiny_rows(backend, device):
    """Row norms near the fp32 range limits: squares overflow/underflow in fp32, not in the kernels."""
    student, teacher = make_pair((4, 2, 33), torch.float32, device, "normalized")
    student[0], teacher[1], student[2, 1], teacher[3, 0] = student[0] * 1e30, teacher[1] * 1e30, student[2, 1] * 1e-30, teacher[3, 0] * 1e-25
    assert_matches_oracle(backend, student, teacher, "normalized", "none")


@pytest.mark.parametrize("backend,device", kernel_backends())
def test_non_contiguous_and_expanded_inputs(backend, device):
    base, other = make_pair((3, 5, 4, 8), torch.float32, device, "normalized")
    student = base.transpose(2, 3)  # (3, 5, 8, 4) non-contiguous
    teacher = other[:, :1].expand(3, 5, 4, 8).transpose(2, 3)  # stride 0 along K
    assert not student.is_contiguous()
    for reduction in REDUCTIONS:
        assert_matches_oracle(backend, student, teacher, "normalized", reduction)


@pytest.mark.parametrize("backend,device", kernel_backends())
@pytest.mark.parametrize("kind", KINDS)
def test_nan_and_inf_never_become_finite(backend, device, kind):
    student, teacher = make_pair((4, 2, 17), torch.float32, device, kind)
    student[1, 0, 3] = float("nan")
    student[2, 1, 5] = float("inf")
    loss = jacfast.jacobian_matching_loss(student, teacher, kind=kind, reduction="none", backend=backend)
    assert torch.isnan(loss[1, 0])
    assert not torch.isfinite(loss[2, 1])
    if kind == "normalized":
        assert torch.isnan(loss[2, 1])
    others = torch.ones_like(loss, dtype=torch.bool)
    others[1, 0] = others[2, 1] = False
    assert torch.isfinite(loss[others]).all()
    for reduction in ("sum", "mean"):
        assert torch.isnan(jacfast.jacobian_matching_loss(student, teacher, kind=kind, reduction=reduction, backend=backend))


@pytest.mark.parametrize("backend,device", kernel_backends())
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_loss_and_grad_matches_autograd(backend, device, kind, reduction):
    student, teacher = make_pair((5, 3, 2, 37), torch.float32, device, kind)
    loss, grad = jacfast.jacobian_matching_loss_and_grad(student, teacher, kind=kind, reduction=reduction, backend=backend)
    ref_loss, ref_grads = loss_and_grads("oracle", student.double(), None if teacher is None else teacher.double(), kind, reduction)
    assert not loss.requires_grad and not grad.requires_grad and grad.shape == student.shape
    assert rel_err(loss, ref_loss) <= 1e-5
    assert rel_err(grad, ref_grads[0]) <= 1e-5


@pytest.mark.parametrize("backend,device", kernel_backends())
def test_results_are_deterministic(backend, device):
    student, teacher = make_pair((7, 2, 5000), torch.float32, device, "normalized")
    first = loss_and_grads(backend, student, teacher, "normalized", "sum")
    second = loss_and_grads(backend, student, teacher, "normalized", "sum")
    assert torch.equal(first[0], second[0]) and all(torch.equal(a, b) for a, b in zip(first[1], second[1]))


@pytest.mark.parametrize("backend,device", kernel_backends())
def test_gradient_flows_into_a_double_backward(backend, device):
    """The student Jacobian built with create_graph=True: the op's gradient reaches the weights."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(11, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4)).double().to(device)
    x = torch.randn(6, 11, dtype=torch.float64, device=device, requires_grad=True)
    teacher_jac = torch.randn(6, 2, 11, dtype=torch.float64, device=device)

    def param_grads(loss_backend):
        out = net(x)
        rows = [torch.autograd.grad(out[:, k].sum(), x, create_graph=True)[0] for k in (0, 3)]
        jac = torch.stack(rows, dim=1)
        if loss_backend == "oracle":
            loss = reference.jacobian_matching_loss(jac, teacher_jac)
        else:
            loss = jacfast.jacobian_matching_loss(jac, teacher_jac, backend=loss_backend)
        # allow_unused: the Jacobian does not depend on the last layer's bias.
        return torch.autograd.grad(loss, list(net.parameters()), allow_unused=True)

    got_grads, ref_grads = param_grads(backend), param_grads("oracle")
    assert got_grads[-1] is None and ref_grads[-1] is None
    for got, ref in zip(got_grads[:-1], ref_grads[:-1]):
        assert rel_err(got, ref) <= 1e-12


@pytest.mark.parametrize("backend,device", kernel_backends())
def test_module_form(backend, device):
    student, teacher = make_pair((4, 2, 9), torch.float32, device, "normalized")
    module = jacfast.JacobianMatchingLoss(kind="squared", reduction="sum", backend=backend)
    assert "squared" in repr(module)
    expected = reference.jacobian_matching_loss(student.double(), teacher.double(), kind="squared", reduction="sum")
    assert rel_err(module(student, teacher), expected) <= 1e-5
    penalty = jacfast.jacobian_norm_penalty(student, backend=backend)
    assert rel_err(penalty, reference.jacobian_matching_loss(student.double(), kind="norm")) <= 1e-5


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_tensors_on_a_device_that_is_not_the_current_one(backend):
    """Triton launches on the current device: its functions switch to their tensors' first."""
    student, teacher = make_pair((5, 3, 3001), torch.float32, second_gpu(backend), "normalized")
    for reduction in REDUCTIONS:  # forward, backward and the fused path, all on cuda:1
        assert_matches_oracle(backend, student, teacher, "normalized", reduction)
        assert_matches_oracle(backend, student, teacher, "normalized", reduction, unit_grad=True, teacher_grad=False)
    assert torch.cuda.current_device() == 0
