"""The oracle itself, argument checking, the backend registry, torch.library and torch.compile."""
import pytest
import torch
from conftest import DEVICE, kernel_backends
from hypothesis import given, settings
from hypothesis import strategies as st
from helpers import KINDS, REDUCTIONS, assert_matches_oracle, make_pair

import jacfast
from jacfast import reference, registry
from jacfast.ops import jacobian_matching as ops


@pytest.mark.parametrize("kind", KINDS)
def test_oracle_is_twice_differentiable(kind):
    student, teacher = make_pair((3, 2, 5), torch.float64, "cpu", kind)
    inputs = (student.requires_grad_(),) + (() if teacher is None else (teacher.requires_grad_(),))

    def fn(*args):
        return reference.jacobian_matching_loss(*args, kind=kind, reduction="none")

    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


def test_oracle_gradient_matches_the_closed_form():
    """dl/ds = (2/||s||)(u<u,v> - v) above eps and (2/eps)(u - v) below (the issue's formulas)."""
    s, t = torch.randn(2, 1, 6, dtype=torch.float64), torch.randn(2, 1, 6, dtype=torch.float64)
    eps = 1e-3
    s[1] *= 1e-4 / s[1].norm()
    s.requires_grad_()
    (grad,) = torch.autograd.grad(reference.jacobian_matching_loss(s, t, reduction="sum", eps=eps), s)
    u0, v0 = s[0, 0] / s[0, 0].norm(), t[0, 0] / t[0, 0].norm()
    u1, v1 = s[1, 0] / eps, t[1, 0] / t[1, 0].norm()
    torch.testing.assert_close(grad[0, 0], 2 / s[0, 0].norm() * (u0 * (u0 @ v0) - v0), rtol=1e-12, atol=0)
    torch.testing.assert_close(grad[1, 0], 2 / eps * (u1 - v1), rtol=1e-12, atol=0)


def test_reductions_follow_the_paper():
    """mean = sum over the K outputs, averaged over the B samples."""
    student, teacher = make_pair((4, 3, 10), torch.float64, "cpu", "normalized")
    rows = jacfast.jacobian_matching_loss(student, teacher, reduction="none", backend="torch")
    assert rows.shape == (4, 3)
    torch.testing.assert_close(jacfast.jacobian_matching_loss(student, teacher, reduction="mean"), rows.sum() / 4)
    torch.testing.assert_close(jacfast.jacobian_matching_loss(student, teacher, reduction="sum"), rows.sum())
    flat = jacfast.jacobian_matching_loss(student[:, 0], teacher[:, 0], reduction="none")
    assert flat.shape == (4,)
    image = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    assert jacfast.jacobian_matching_loss(image, image.flip(0), reduction="none", outputs_dim=False).shape == (4,)


def test_empty_inputs():
    student, teacher = torch.randn(0, 3, 5), torch.randn(0, 3, 5)
    assert jacfast.jacobian_matching_loss(student, teacher, reduction="sum").item() == 0
    assert jacfast.jacobian_matching_loss(student, teacher, reduction="none").shape == (0, 3)
    with pytest.raises(ValueError, match="empty batch"):
        jacfast.jacobian_matching_loss(student, teacher, reduction="mean")
    no_outputs = torch.randn(2, 0, 5)
    assert jacfast.jacobian_matching_loss(no_outputs, no_outputs.clone(), reduction="mean").item() == 0
    with pytest.raises(ValueError, match="rows are empty"):
        jacfast.jacobian_matching_loss(torch.randn(2, 3, 0), torch.randn(2, 3, 0))


BAD_CALLS = [
    (ValueError, "teacher_jac shape", lambda s, t: jacfast.jacobian_matching_loss(s, t[:, :1])),
    (ValueError, "teacher_jac must be None", lambda s, t: jacfast.jacobian_matching_loss(s, t, kind="norm")),
    (ValueError, "teacher_jac is required", lambda s, t: jacfast.jacobian_matching_loss(s)),
    (TypeError, "student_jac must have a floating dtype", lambda s, t: jacfast.jacobian_matching_loss(s.long(), t)),
    (TypeError, "student_jac must have a floating dtype", lambda s, t: jacfast.jacobian_matching_loss(s > 0, t)),
    (TypeError, "teacher_jac must have a floating dtype", lambda s, t: jacfast.jacobian_matching_loss(s, t.int())),
    (TypeError, "teacher_jac dtype", lambda s, t: jacfast.jacobian_matching_loss(s, t.double())),
    (TypeError, "student_jac must be a torch.Tensor", lambda s, t: jacfast.jacobian_matching_loss(s.tolist(), t)),
    (ValueError, "kind must be", lambda s, t: jacfast.jacobian_matching_loss(s, t, kind="cosine")),
    (ValueError, "reduction must be", lambda s, t: jacfast.jacobian_matching_loss(s, t, reduction="avg")),
    (ValueError, "backend must be", lambda s, t: jacfast.jacobian_matching_loss(s, t, backend="tpu")),
    (TypeError, "backend must be a str", lambda s, t: jacfast.jacobian_matching_loss(s, t, backend=None)),
    (ValueError, "eps must be", lambda s, t: jacfast.jacobian_matching_loss(s, t, eps=0.0)),
    (ValueError, "student_jac must have shape", lambda s, t: jacfast.jacobian_matching_loss(s[0, 0], t[0, 0])),
    (ValueError, "kind must be", lambda s, t: jacfast.JacobianMatchingLoss(kind="l1")),
    (ValueError, "teacher_jac shape", lambda s, t: jacfast.jacobian_matching_loss_and_grad(s, t[:1])),
    (ValueError, "weight must be a finite number", lambda s, t: jacfast.jacobian_matching_loss(s, t, weight=float("nan"))),
    (ValueError, "weight must be a finite number", lambda s, t: jacfast.jacobian_matching_loss(s, t, weight=float("inf"))),
    (ValueError, "weight must be a finite number", lambda s, t: jacfast.jacobian_matching_loss(s, t, weight=True)),
    (ValueError, "weight must be a finite number", lambda s, t: jacfast.jacobian_matching_loss(s, t, weight="2")),
    (ValueError, "weight scales a reduced loss",
     lambda s, t: jacfast.jacobian_matching_loss(s, t, reduction="none", weight=2.0)),
    (ValueError, "weight scales a reduced loss", lambda s, t: jacfast.JacobianMatchingLoss(reduction="none", weight=0.5)),
    (ValueError, "weight must be", lambda s, t: jacfast.jacobian_matching_loss_and_grad(s, t, weight=float("nan"))),
]


@pytest.mark.parametrize("error,message,call", BAD_CALLS, ids=[m for _, m, _ in BAD_CALLS])
def test_bad_input_names_the_argument(error, message, call):
    student, teacher = torch.randn(3, 2, 4), torch.randn(3, 2, 4)
    with pytest.raises(error, match=message):
        call(student, teacher)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU for a second device")
def test_devices_must_match():
    with pytest.raises(ValueError, match="teacher_jac is on"):
        jacfast.jacobian_matching_loss(torch.randn(2, 1, 3), torch.randn(2, 1, 3, device="cuda"))


def test_backends_report_reasons():
    status = jacfast.backends()
    assert set(status) == {"cuda", "triton", "cpu", "torch"}
    assert status["torch"].available
    for entry in status.values():
        assert entry.available or entry.reason


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the interpreter serves CPU tensors only without a GPU")
def test_triton_interpreter_that_cannot_run_is_unavailable_with_its_error(monkeypatch):
    if registry._import("triton")[1]:
        pytest.skip("triton is not installed")
    monkeypatch.setattr(registry, "_interpreter_error", lambda: "InterpreterError: TypeError('probe')")
    status = registry.status_for("triton", "cpu")
    assert not status.available and "TypeError('probe')" in status.reason and "numpy" in status.reason
    with pytest.raises(registry.BackendUnavailableError, match="probe"):
        jacfast.jacobian_matching_loss(torch.randn(2, 1, 3), torch.randn(2, 1, 3), backend="triton")


@pytest.mark.skipif(DEVICE.type != "cpu" or not registry._triton_interpreting(), reason="needs TRITON_INTERPRET=1")
def test_interpreter_probe_predicts_a_real_kernel():
    """The probe is neither optimistic nor pessimistic: a jacfast Triton kernel runs exactly
    when the probe does, and the backend status follows the probe."""
    from jacfast.kernels import interpreter_probe, triton_topk_seeds

    why = interpreter_probe.interpreter_error()
    try:
        triton_topk_seeds.topk_seeds(torch.randn(4, 10), 2)
        kernel_runs = True
    except Exception:  # whatever the interpreter raises
        kernel_runs = False
    assert kernel_runs == (why == ""), why
    assert registry.status_for("triton", "cpu").available == (why == "")


@pytest.mark.parametrize("backend,device", kernel_backends())
def test_fused_gradient_only_when_it_will_be_used(backend, device, monkeypatch):
    """The eager path computes the gradient in the forward (fused backends) only under grad
    mode, for a student that requires grad, with a teacher that does not."""
    calls = []

    class Spy:
        def __init__(self, kernels):
            self.kernels = kernels

        def __getattr__(self, name):
            calls.append(name)
            return getattr(self.kernels, name)

    real = ops._kernels
    monkeypatch.setattr(ops, "_kernels", lambda name: Spy(real(name)))
    student, teacher = make_pair((4, 2, 9), torch.float32, device, "normalized")
    fused = ["forward_backward"] if backend in ops.FUSED_BACKENDS else ["forward"]
    # 16-bit normalized: fused on the GPU backends only (the CPU's are compute-bound)
    fused16 = ["forward_backward"] if backend in ("triton", "cuda") else ["forward"]
    cases = [  # (kind, dtype, student requires grad, teacher requires grad, grad mode, kernels expected)
        ("normalized", torch.float32, True, False, True, fused),
        ("normalized", torch.float32, True, False, False, ["forward"]),
        ("normalized", torch.float32, True, True, True, ["forward"]),
        ("normalized", torch.float32, False, True, True, ["forward"]),
        ("normalized", torch.bfloat16, True, False, True, fused16),
        ("normalized", torch.float16, True, False, True, fused16),
        ("squared", torch.bfloat16, True, False, True, fused), ("squared", torch.float16, True, True, True, ["forward"]),
    ]
    for kind, dtype, s_grad, t_grad, grad_mode, expected in cases:
        calls.clear()
        with torch.set_grad_enabled(grad_mode):
            jacfast.jacobian_matching_loss(student.to(dtype, copy=True).requires_grad_(s_grad),
                                           teacher.to(dtype, copy=True).requires_grad_(t_grad), kind=kind,
                                           backend=backend)
        assert calls == expected, (kind, dtype, s_grad, t_grad, grad_mode)
    calls.clear()
    jacfast.jacobian_matching_loss(student.to(torch.float16, copy=True).requires_grad_(True), kind="norm",
                                   backend=backend)
    assert calls == fused, "norm, float16"


@pytest.mark.parametrize("backend,device", kernel_backends())
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_eager_path_and_registered_op_agree_bitwise(backend, device, kind, dtype):
    """The eager Function (fused where ops.fuses says) and the op that compiled graphs
    call: the same bits, except that the fused path scales its saved gradient by an upstream
    gradient != 1 in the input dtype (a second rounding: within an ulp)."""
    student, teacher = make_pair((6, 3, 257), dtype, device, kind)
    args = (ops.KINDS[kind], ops.REDUCTION_SCALED_SUM, 1e-12, 1 / 6, backend)
    rows_s = student.reshape(18, -1)
    rows_t = None if teacher is None else teacher.reshape(18, -1)
    for upstream in (1.0, 0.37):
        s1 = rows_s.clone().requires_grad_(True)
        loss1 = ops.JacobianMatchingFunction.apply(s1, rows_t, *args, True)
        (g1,) = torch.autograd.grad(loss1 * upstream, s1)
        s2 = rows_s.clone().requires_grad_(True)
        loss2, _ = ops.jacobian_matching_fwd(s2, rows_t, *args)
        (g2,) = torch.autograd.grad(loss2 * upstream, s2)
        assert torch.equal(loss1, loss2)
        if upstream == 1.0 or not ops.fuses(backend, ops.KINDS[kind], dtype):
            assert torch.equal(g1, g2)
        else:
            ulp = torch.finfo(dtype).eps * g2.abs()
            assert ((g1 - g2).abs() <= ulp).all()


@pytest.mark.parametrize("backend,device", kernel_backends() + [("torch", DEVICE)])
@pytest.mark.parametrize("kind", KINDS)
def test_weight_is_folded_into_the_reduced_loss(backend, device, kind):
    """weight w: w times the loss and its gradient (float64 oracle), for "sum" and "mean",
    through autograd and loss_and_grad; in the kernels w is part of the scale, rounded once,
    so the gradient reaching autograd is unscaled and both paths give the same bits."""
    student, teacher = make_pair((5, 2, 67), torch.float64, device, kind)
    for reduction in ("sum", "mean"):
        ref_leaf = student.clone().requires_grad_(True)
        ref = reference.jacobian_matching_loss(ref_leaf, teacher, kind=kind, reduction=reduction)
        (ref_grad,) = torch.autograd.grad(ref, ref_leaf)
        for w in (0.3, -2.5, 0.0):
            leaf = student.clone().requires_grad_(True)
            loss = jacfast.jacobian_matching_loss(leaf, teacher, kind=kind, reduction=reduction, backend=backend,
                                                  weight=w)
            (grad,) = torch.autograd.grad(loss, leaf)
            torch.testing.assert_close(loss, w * ref.detach(), rtol=1e-12, atol=1e-300)
            # elementwise relative error is unbounded where a gradient element cancels (c0 s - c1 t
            # near 0): the absolute part is relative to the gradient's largest element
            torch.testing.assert_close(grad, w * ref_grad, rtol=1e-12,
                                       atol=1e-12 * abs(w) * ref_grad.abs().max().item() + 1e-300)
            value, grad2 = jacfast.jacobian_matching_loss_and_grad(student, teacher, kind=kind, reduction=reduction,
                                                                   backend=backend, weight=w)
            assert torch.equal(value, loss.detach()) and torch.equal(grad2, grad), (reduction, w)


def test_loss_module_passes_its_weight():
    student, teacher = torch.randn(4, 2, 7), torch.randn(4, 2, 7)
    module = jacfast.JacobianMatchingLoss(weight=0.25, backend="torch")
    assert "weight=0.25" in repr(module)
    torch.testing.assert_close(module(student, teacher), 0.25 * jacfast.jacobian_matching_loss(student, teacher))


def test_explicit_unavailable_backend_raises_and_auto_falls_back(monkeypatch):
    student, teacher = torch.randn(3, 2, 4), torch.randn(3, 2, 4)
    with pytest.raises(jacfast.BackendUnavailableError, match="CUDA tensors only"):
        registry.resolve("cuda", torch.device("cpu"))
    unavailable = registry.BackendStatus("cpu", False, "pretend it is not built")
    original = registry.status_for
    monkeypatch.setattr(registry, "status_for", lambda name, dev: unavailable if name == "cpu" else original(name, dev))
    with pytest.raises(jacfast.BackendUnavailableError, match="pretend it is not built"):
        registry.resolve("cpu", torch.device("cpu"))
    assert registry.resolve("auto", torch.device("cpu")) == "torch"


@pytest.mark.parametrize("backend,device", kernel_backends())
def test_opcheck(backend, device):
    student, teacher = make_pair((4, 37), torch.float32, device, "normalized")
    student.requires_grad_()
    teacher.requires_grad_()
    for kind in (0, 1):
        for red, scale in ((0, 1.0), (1, 0.25)):
            torch.library.opcheck(ops.jacobian_matching_fwd, (student, teacher, kind, red, 1e-12, scale, backend))
            torch.library.opcheck(ops.jacobian_matching_fwd_bwd, (student.detach(), teacher.detach(), kind, red, 1e-12, scale, backend))
    torch.library.opcheck(ops.jacobian_matching_fwd, (student, None, 2, 1, 1e-12, 1.0, backend))


@pytest.mark.parametrize("backend,device", kernel_backends())
def test_compiles_without_graph_break(backend, device):
    torch._dynamo.reset()
    student, teacher = make_pair((4, 2, 3, 5), torch.float32, device, "normalized")

    def step(s, t):
        return jacfast.jacobian_matching_loss(s, t, backend=backend) * 2 + s.square().mean()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    s_eager = student.clone().requires_grad_()
    s_comp = student.clone().requires_grad_()
    expected, got = step(s_eager, teacher), compiled(s_comp, teacher)
    torch.testing.assert_close(got, expected)
    got.backward()
    expected.backward()
    torch.testing.assert_close(s_comp.grad, s_eager.grad)


def test_compiles_with_inductor_and_auto_backend():
    torch._dynamo.reset()
    student, teacher = make_pair((4, 2, 3, 5), torch.float32, DEVICE, "normalized")
    compiled = torch.compile(lambda s, t: jacfast.jacobian_matching_loss(s, t), fullgraph=True)
    torch.testing.assert_close(compiled(student, teacher), jacfast.jacobian_matching_loss(student, teacher, backend="torch"))


shapes = st.tuples(st.integers(1, 6), st.integers(1, 4), st.integers(1, 300))


@pytest.mark.parametrize("backend,device", kernel_backends())
def test_property_random_shapes_and_options(backend, device):
    """Hypothesis: >= 200 random (shape, kind, reduction, dtype, scale, zero-row) cases."""
    examples = 200 if backend != "triton" or device.type == "cuda" else 60  # the interpreter is slow

    @settings(max_examples=examples, deadline=None, derandomize=False)
    @given(shape=shapes, kind=st.sampled_from(KINDS), reduction=st.sampled_from(REDUCTIONS),
           dtype=st.sampled_from([torch.float32, torch.float64]), log_scale=st.floats(-8, 8),
           zero_row=st.booleans(), seed=st.integers(0, 2**31 - 1))
    def check(shape, kind, reduction, dtype, log_scale, zero_row, seed):
        student, teacher = make_pair(shape, dtype, device, kind, seed=seed)
        student = student * 10.0**log_scale
        if zero_row:
            student[0, 0] = 0
        assert_matches_oracle(backend, student, teacher, kind, reduction)

    check()


@pytest.mark.slow
@pytest.mark.parametrize("backend,device", kernel_backends())
def test_more_than_2_to_31_elements(backend, device):
    """int64 indexing: R * D > 2^31 (10.7 GB of fp32 rows)."""
    rows, dim = 5, 2**29 + 7
    student = torch.full((rows, 1, dim), 0.5, dtype=torch.float32, device=device)
    student[-1, 0, -1] = 4.0
    loss = jacfast.jacobian_matching_loss(student, None, kind="norm", reduction="none", backend=backend)
    expected = torch.tensor([dim * 0.25] * (rows - 1) + [(dim - 1) * 0.25 + 16], dtype=torch.float64)
    assert torch.allclose(loss.double().cpu().flatten(), expected, rtol=1e-6)
