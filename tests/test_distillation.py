"""DistillationLoss, its three estimators, Proposition 1 and jacobian_penalty.

Random data is drawn fresh on every run (no fixed seeds); tolerances are set from the error
analysis in jacfast/losses/distillation.py, not tuned to one draw.
"""
import functools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import assert_matches_directional_differences
from torch.autograd.function import once_differentiable

from jacfast.jacobians import input_jacobians, select
from jacfast.losses import DistillationLoss as _DistillationLoss
from jacfast.losses import jacobian_penalty

IN = (3, 8, 8)
C = 10
# strategy="loop" unless a test says otherwise: "auto" times every strategy on its first call
# per model (seconds of vmap warm-up on a busy 2-core machine); test_jacobians covers it and
# test_finite_difference_matches_exact_on_smooth_cnn runs it here.
DistillationLoss = functools.partial(_DistillationLoss, strategy="loop")


def cnn(width, act=nn.Tanh, dtype=torch.float64, classes=C):
    """conv-act-conv(stride 2)-act-linear on 3x8x8 (act a module class, or a module factory)."""
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1), act(), nn.Conv2d(width, width, 3, stride=2, padding=1), act(),
        nn.Flatten(), nn.Linear(width * 16, classes),
    ).to(dtype)


def param_grad(loss, model):
    grads = torch.autograd.grad(loss, list(model.parameters()), materialize_grads=True)
    return torch.cat([g.reshape(-1) for g in grads])


def rel(a, b):
    return float((a - b).norm() / b.norm())


def make(dtype=torch.float64, act=nn.Tanh, batch=4):
    teacher, student = cnn(8, act, dtype), cnn(4, act, dtype)
    x = torch.randn(batch, *IN, dtype=dtype)
    y = torch.randint(0, C, (batch,))
    return teacher, student, x, y


# ---------------------------------------------------------------------------------------------
# Components
# ---------------------------------------------------------------------------------------------
def test_components_and_weights():
    teacher, student, x, y = make()
    loss = DistillationLoss(teacher, ce_weight=0.3, kd_weight=0.7, beta=2.0, temperature=3.0, k=3, backend="torch")
    out = loss(student, x, y)
    s, t = student(x), teacher(x)
    torch.testing.assert_close(out.ce, F.cross_entropy(s, y))
    kd = (F.softmax(t / 3, 1) * (F.log_softmax(t / 3, 1) - F.log_softmax(s / 3, 1))).sum(1).mean() * 9
    torch.testing.assert_close(out.kd, kd)
    idx = torch.sort(t, dim=1, descending=True, stable=True).indices[:, :3]
    _, j_t, _ = input_jacobians(teacher, x, select.indices(idx))
    _, j_s, _ = input_jacobians(student, x, select.indices(idx))
    n = lambda j: j.flatten(2) / j.flatten(2).norm(dim=2, keepdim=True)  # noqa: E731
    torch.testing.assert_close(out.jacobian, (n(j_s) - n(j_t)).pow(2).sum((1, 2)).mean())
    torch.testing.assert_close(out.total, 0.3 * out.ce + 0.7 * out.kd + 2.0 * out.jacobian)
    assert set(out.scalars()) == {"total", "ce", "kd", "jacobian"}
    torch.testing.assert_close(out.logits, s)


def test_beta_reaches_the_loss_head_as_its_weight(monkeypatch):
    """Exact estimator: beta is the loss head's weight, so the gradient the head's backward
    receives is 1 (its fused gradient goes on unscaled) and the total's parameter gradient is
    that of beta times the term."""
    from jacfast.ops import jacobian_matching as ops

    teacher, student, x, y = make(torch.float32)
    upstream = []
    real = ops._scale_by_upstream_
    monkeypatch.setattr(ops, "_scale_by_upstream_", lambda g, gl, r: (upstream.append(gl.item()), real(g, gl, r)))
    out = DistillationLoss(teacher, ce_weight=0, kd_weight=0, beta=0.3, k=2, backend="cpu")(student, x, y)
    got = param_grad(out.total, student)
    assert upstream == [1.0]
    out = DistillationLoss(teacher, ce_weight=0, kd_weight=0, beta=1.0, k=2, backend="torch")(student, x, y)
    assert rel(got, 0.3 * param_grad(out.total, student)) < 1e-5


def test_target_selection_uses_the_label():
    teacher, student, x, y = make()
    loss = DistillationLoss(teacher, select="target", kind="squared", ce_weight=0, kd_weight=0, backend="torch")
    out = loss(student, x, y)
    _, j_t, _ = input_jacobians(teacher, x, select.target(y))
    _, j_s, _ = input_jacobians(student, x, select.target(y))
    torch.testing.assert_close(out.jacobian, (j_s - j_t).pow(2).sum() / x.shape[0])


def test_teacher_gets_no_graph_and_no_gradients():
    teacher, student, x, y = make()
    out = DistillationLoss(teacher, k=2, backend="torch")(student, x, y)
    out.total.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in student.parameters())


# ---------------------------------------------------------------------------------------------
# The Jacobian term moves the student (float64; tanh: the loss is smooth in the parameters, so
# the central difference along a parameter direction has only its O(h^2) error)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("estimator", ["exact", "finite_difference"])
def test_jacobian_term_moves_the_student(estimator):
    teacher, student, x, y = make()
    kw = dict(k=2, temperature=2.0, backend="torch", estimator=estimator)
    full = DistillationLoss(teacher, beta=1.0, **kw)
    g_full = param_grad(full(student, x, y).total, student)
    g_kd = param_grad(DistillationLoss(teacher, beta=0.0, **kw)(student, x, y).total, student)
    assert rel(g_kd, g_full) > 1e-2  # the Jacobian term contributes a real gradient

    # finite differences of the full loss along random parameter directions
    assert_matches_directional_differences(lambda: full(student, x, y).total.item(), list(student.parameters()), g_full)


# ---------------------------------------------------------------------------------------------
# finite_difference vs exact
# ---------------------------------------------------------------------------------------------
class KinkWatch:
    """Counts ReLU units whose sign differs between the main forward (batch B) and the
    perturbed forwards of the finite-difference estimator (a concatenated batch)."""

    def __init__(self, model, batch):
        self.batch, self.main, self.crossed = batch, {}, 0
        self.handles = [m.register_forward_hook(self.hook) for m in model.modules() if isinstance(m, nn.ReLU)]

    def hook(self, module, inputs, output):
        z = inputs[0].detach() > 0
        if z.shape[0] == self.batch:
            self.main[module] = z
        else:
            ref = self.main[module].repeat(z.shape[0] // self.batch, *([1] * (z.ndim - 1)))
            self.crossed += int((ref != z).sum())

    def remove(self):
        for h in self.handles:
            h.remove()


@pytest.mark.parametrize("dtype,step,tol", [(torch.float32, 1e-3, 1e-3), (torch.float64, None, 1e-6)])
def test_finite_difference_matches_exact_on_relu_cnn(dtype, step, tol):
    # A ReLU network is piecewise linear in x: between kinks the central difference is exact
    # and only round-off remains (~1e-7 / step in fp32: 1e-4 at step 1e-3). A pre-activation
    # that changes sign within x +- e*g makes the parameter gradient jump (an O(1/e) error,
    # see fd_directional), so the inputs must stay away from kinks: the hooks check this and
    # a draw whose perturbation crosses a kink is redrawn (a tiny net keeps that rare).
    for _ in range(40):
        teacher, student, x, y = make(dtype, nn.ReLU)
        kw = dict(k=2, ce_weight=0.5, backend="torch", strategy="loop")
        exact = DistillationLoss(teacher, **kw)(student, x, y)
        watch = KinkWatch(student, x.shape[0])
        with pytest.warns(UserWarning, match="kink"):  # the estimator warns about ReLU students
            fd = DistillationLoss(teacher, estimator="finite_difference", fd_step=step, **kw)(student, x, y)
        g_fd = param_grad(fd.total, student)
        watch.remove()
        if watch.crossed == 0:
            break
    else:
        pytest.fail("every draw crossed a ReLU kink")
    torch.testing.assert_close(fd.total, exact.total, rtol=tol, atol=0)
    assert rel(g_fd, param_grad(exact.total, student)) < tol


@pytest.mark.parametrize("scheme,dtype,tol", [("central", torch.float32, 1e-3), ("central", torch.float64, 1e-6),
                                              ("forward", torch.float32, 3e-3), ("forward", torch.float64, 1e-6)])
def test_finite_difference_matches_exact_on_smooth_cnn(scheme, dtype, tol):
    # Smooth activations, at the scheme's default step: central O(e^2) truncation + round-off
    # (e ~ cbrt(u)); forward O(e) + round-off (e ~ sqrt(u): ~4e-8 fp64, ~8e-4 fp32 measured).
    teacher, student, x, y = make(dtype, nn.GELU)
    kw = dict(k=3, backend="auto", strategy="auto")
    g_exact = param_grad(DistillationLoss(teacher, **kw)(student, x, y).total, student)
    fd = DistillationLoss(teacher, estimator="finite_difference", fd_scheme=scheme, **kw)
    assert rel(param_grad(fd(student, x, y).total, student), g_exact) < tol


def test_finite_difference_schemes_converge_at_their_order():
    """float64, GELU: the forward difference's error falls 10x per 10x smaller step (first
    order), the central one's 100x (second order), until round-off."""
    teacher, student, x, y = make(torch.float64, nn.GELU)
    kw = dict(k=2, backend="torch")
    g_exact = param_grad(DistillationLoss(teacher, **kw)(student, x, y).total, student)

    def error(scheme, step):
        fd = DistillationLoss(teacher, estimator="finite_difference", fd_scheme=scheme, fd_step=step, **kw)
        return rel(param_grad(fd(student, x, y).total, student), g_exact)

    fwd, cen = [error("forward", h) for h in (1e-3, 1e-4)], [error("central", h) for h in (1e-3, 1e-4)]
    assert 5 < fwd[0] / fwd[1] < 20, fwd
    assert 50 < cen[0] / cen[1] < 200, cen
    assert fwd[1] > 10 * cen[1]


def test_forward_scheme_runs_half_the_perturbed_forwards():
    """Samples through the student per call: the main batch plus 2K perturbed copies (central)
    or K (forward), whether they run as one concatenated batch or one by one (BatchNorm)."""
    teacher, student, x, y = make(torch.float64, nn.GELU)
    samples = []
    student.register_forward_hook(lambda module, inputs, out: samples.append(out.shape[0]))
    for net in (student, nn.Sequential(nn.BatchNorm2d(3).double(), student)):
        for scheme, copies in (("central", 1 + 2 * 3), ("forward", 1 + 3)):
            samples.clear()
            DistillationLoss(teacher, k=3, estimator="finite_difference", fd_scheme=scheme)(net, x, y).total.backward()
            assert sum(samples) == copies * x.shape[0], (scheme, samples)


class _SoftplusOnce(torch.autograd.Function):
    """softplus with a hand-written backward that has no double backward."""

    @staticmethod
    def forward(ctx, z):
        ctx.save_for_backward(z)
        return F.softplus(z)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        (z,) = ctx.saved_tensors
        return grad * torch.sigmoid(z)


class SoftplusOnce(nn.Module):
    def forward(self, z):
        return _SoftplusOnce.apply(z)


def test_finite_difference_trains_a_once_differentiable_student():
    teacher = cnn(8, nn.Softplus, torch.float32)
    student = cnn(4, SoftplusOnce, torch.float32)
    x, y = torch.randn(8, *IN), torch.randint(0, C, (8,))
    kw = dict(k=2, ce_weight=0.0, kd_weight=0.0, backend="auto", strategy="loop")
    with pytest.raises(RuntimeError, match="once_differentiable"):
        DistillationLoss(teacher, **kw)(student, x, y).total.backward()

    # Same gradient as the exact estimator on a twin with the ordinary (twice-differentiable) softplus.
    twin = cnn(4, nn.Softplus, torch.float32)
    twin.load_state_dict(student.state_dict())
    loss = DistillationLoss(teacher, estimator="finite_difference", **kw)
    g_fd = param_grad(loss(student, x, y).total, student)
    assert rel(g_fd, param_grad(DistillationLoss(teacher, **kw)(twin, x, y).total, twin)) < 1e-3

    opt = torch.optim.Adam(student.parameters(), lr=1e-2)
    history = []
    for _ in range(25):
        out = loss(student, x, y)
        opt.zero_grad()
        out.total.backward()
        opt.step()
        history.append(out.jacobian.item())
    assert history[-1] < 0.6 * history[0]


@pytest.mark.parametrize("scheme", ["central", "forward"])
def test_finite_difference_with_batchnorm_and_dropout(scheme):
    # Train-mode BatchNorm couples samples and dropout draws masks: the perturbed forwards run
    # one by one with the main forward's RNG state replayed and running statistics restored.
    def net(width):
        return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.Tanh(), nn.Flatten(),
                             nn.Dropout(0.3), nn.Linear(width * 64, C)).double()

    teacher, student = net(6).eval(), net(4)
    x, y = torch.randn(6, *IN, dtype=torch.float64), torch.randint(0, C, (6,))
    seed = int(torch.randint(0, 2**31, ()))
    kw = dict(k=2, backend="torch", strategy="loop")
    before = student[1].running_mean.clone()
    torch.manual_seed(seed)
    g_exact = param_grad(DistillationLoss(teacher, **kw)(student, x, y).total, student)
    after_exact = student[1].running_mean.clone()
    student[1].running_mean.copy_(before)
    student[1].num_batches_tracked.zero_()
    torch.manual_seed(seed)
    fd = DistillationLoss(teacher, estimator="finite_difference", fd_scheme=scheme, **kw)
    g_fd = param_grad(fd(student, x, y).total, student)
    torch.testing.assert_close(student[1].running_mean, after_exact)  # updated once, as one forward does
    assert rel(g_fd, g_exact) < 1e-6


# ---------------------------------------------------------------------------------------------
# Proposition 1
# ---------------------------------------------------------------------------------------------
def test_proposition_1_affine():
    D, K, N, sigma = 6, 4, 20000, 0.3
    teacher, student = nn.Linear(D, K).double(), nn.Linear(D, K).double()
    x = torch.randn(1, D, dtype=torch.float64)
    xi = sigma * torch.randn(N, D, dtype=torch.float64)
    with torch.no_grad():
        clean = (teacher(x) - student(x)).pow(2).sum()
        vals = (teacher(x + xi) - student(x + xi)).pow(2).sum(1) - clean
    rhs = sigma**2 * (teacher.weight - student.weight).pow(2).sum()
    se = vals.std() / math.sqrt(N)
    assert abs(vals.mean() - rhs) < 5 * se

    # The "noise" estimator estimates the squared Jacobian distance (here exactly, per pair).
    xb = torch.randn(8, D, dtype=torch.float64)
    y = torch.randint(0, K, (8,))
    kw = dict(select="all", kind="squared", ce_weight=0, kd_weight=0, backend="torch")
    exact = DistillationLoss(teacher, **kw)(student, xb, y).jacobian
    torch.testing.assert_close(exact.detach(), (teacher.weight - student.weight).pow(2).sum().detach())
    M = (teacher.weight - student.weight).detach()
    samples = 500
    noise = DistillationLoss(teacher, estimator="noise", noise_sigma=sigma, noise_samples=samples, **kw)(student, xb, y)
    # Antithetic pairs: each estimate is ||M xi||^2 / sigma^2 exactly, variance 2 tr((M^T M)^2).
    se = math.sqrt(2 * float(torch.trace((M.T @ M) @ (M.T @ M))) / (8 * samples))
    assert abs(noise.jacobian.item() - exact.item()) < 5 * se


class SignWatch:
    """Counts ReLU pre-activations whose sign differs from the first (clean, batch B) forward
    in later forwards of perturbed copies (batches of n * B rows, row i from sample i % B)."""

    def __init__(self, *models):
        self.main, self.crossed = {}, 0
        self.handles = [m.register_forward_hook(self.hook) for net in models for m in net.modules()
                        if isinstance(m, nn.ReLU)]

    def hook(self, module, inputs, output):
        z = inputs[0].detach() > 0
        if module not in self.main:
            self.main[module] = z
        else:
            ref = self.main[module]
            self.crossed += int((ref.repeat(z.shape[0] // ref.shape[0], *([1] * (z.ndim - 1))) != z).sum())

    def remove(self):
        for h in self.handles:
            h.remove()


def test_proposition_1_relu_cnn_as_sigma_goes_to_zero():
    # E||d(x + xi)||^2 - ||d(x)||^2 = sigma^2 ||M||_F^2 + sigma^2 <d(x), Laplacian d(x)> + O(sigma^4), with
    # d = T - S and M = J_T - J_S. A ReLU network is piecewise linear: its Laplacian is zero
    # except on the kinks, so the identity becomes exact (up to round-off) once sigma is below
    # the distance from x to the nearest kink; above it a kink term remains (error ~ 1/sigma
    # for a unit right at its kink). A draw with a pre-activation within ~1e-5 of zero (a few
    # percent of draws) is redrawn.
    N = 400
    for _ in range(6):
        teacher, student, x, y = make(torch.float64, nn.ReLU, batch=2)
        M = (input_jacobians(teacher, x, select.all())[1] - input_jacobians(student, x, select.all())[1]).flatten(2)
        xi = torch.randn(N, *x.shape, dtype=torch.float64)
        # Reference on the same draws: mean_j sum_b ||M_b xi_jb||^2, whose expectation is ||M||_F^2.
        ref_samples = torch.einsum("bcd,nbd->nbc", M, xi.flatten(2)).pow(2).sum((1, 2))
        ref = ref_samples.mean()
        assert abs(ref - M.pow(2).sum()) < 5 * ref_samples.std() / math.sqrt(N)
        errs = {}
        with torch.no_grad():
            watch = SignWatch(teacher, student)
            clean = (teacher(x) - student(x)).pow(2).sum()
            for sigma in (1e-1, 1e-2, 1e-3, 1e-4, 1e-5):
                # antithetic pairs (xi, -xi) cancel the O(sigma) cross term draw by draw
                xs = (x + sigma * torch.cat([xi, -xi])).flatten(0, 1)  # (2 N B, ...): row i is sample i % B
                watch.crossed = 0
                sq = (teacher(xs) - student(xs)).pow(2).sum(1).view(2, N, -1).sum(2)
                est = ((sq[0] + sq[1]) / 2 - clean).mean() / sigma**2
                errs[sigma] = (float((est - ref).abs() / ref), watch.crossed)
            watch.remove()
        kink_free = [sigma for sigma, (_, crossed) in errs.items() if crossed == 0]
        if kink_free:
            break
    else:
        pytest.fail(f"every draw had a kink within sigma = 1e-5 of x: {errs}")
    assert errs[kink_free[0]][0] < 1e-4, errs  # round-off only: ~1e-16 / sigma^2 relative


def test_noise_estimator_matches_exact_squared_on_relu_cnn():
    # Below the kink margin (see the test above) the antithetic estimate is exactly the mean
    # of ||M xi||^2 / sigma^2 over the draws: compare within its sampling error. A draw in
    # which some pre-activation changes sign is redrawn (rare at sigma = 1e-5).
    kw = dict(k=2, kind="squared", ce_weight=0, kd_weight=0, backend="torch")
    samples = 300
    for _ in range(10):
        teacher, student, x, y = make(torch.float64, nn.ReLU)
        exact = DistillationLoss(teacher, **kw)(student, x, y)
        watch = SignWatch(teacher, student)
        out = DistillationLoss(teacher, estimator="noise", noise_sigma=1e-5, noise_samples=samples, **kw)(student, x, y)
        watch.remove()
        if watch.crossed == 0:
            break
    else:
        pytest.fail("every draw crossed a ReLU kink")
    idx = torch.sort(teacher(x), dim=1, descending=True, stable=True).indices[:, :2]
    M = input_jacobians(teacher, x, select.indices(idx))[1] - input_jacobians(student, x, select.indices(idx))[1]
    G = M.flatten(2) @ M.flatten(2).transpose(1, 2)  # (B, K, K): ||M_b xi||^2 has mean tr G, variance 2 tr G^2
    B = x.shape[0]
    torch.testing.assert_close(exact.jacobian, G.diagonal(dim1=1, dim2=2).sum() / B)
    se = math.sqrt(float(2 * (G @ G).diagonal(dim1=1, dim2=2).sum()) / samples) / B
    assert abs(out.jacobian.item() - exact.jacobian.item()) < 5 * se
    out.total.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in student.parameters())


# ---------------------------------------------------------------------------------------------
# jacobian_penalty
# ---------------------------------------------------------------------------------------------
def full_jacobian(model, x):
    return torch.stack([torch.autograd.functional.jacobian(lambda v: model(v[None])[0], xb) for xb in x])


def test_jacobian_penalty_all_outputs_and_finite_difference():
    _, model, x, _ = make(torch.float64, nn.GELU)
    ref = full_jacobian(model, x).pow(2).sum() / x.shape[0]
    exact = jacobian_penalty(model, x, num_projections=None, backend="torch", strategy="loop")
    torch.testing.assert_close(exact, ref)
    g_exact = param_grad(exact, model)
    for scheme in ("central", "forward"):
        fd, logits = jacobian_penalty(model, x, num_projections=None, estimator="finite_difference",
                                      fd_scheme=scheme, return_logits=True)
        torch.testing.assert_close(fd, ref)
        torch.testing.assert_close(logits, model(x))
        assert rel(param_grad(fd, model), g_exact) < 1e-6, scheme


def test_jacobian_penalty_projections_are_unbiased():
    _, model, x, _ = make(torch.float64, nn.Tanh)
    J = full_jacobian(model, x).flatten(2)  # (B, C, D)
    G = J @ J.transpose(1, 2)  # (B, C, C); Rademacher: Var v^T G v = 2 sum_{i != j} G_ij^2
    off = G - torch.diag_embed(torch.diagonal(G, dim1=1, dim2=2))
    K, B = 100, x.shape[0]
    se = math.sqrt(float((2 * off.pow(2).sum((1, 2))).sum()) / K) / B
    ref = float(J.pow(2).sum()) / B
    for estimator in ("exact", "finite_difference"):
        est = jacobian_penalty(model, x, num_projections=K, estimator=estimator, backend="torch",
                               strategy="batched").item()
        assert abs(est - ref) < 5 * se


# ---------------------------------------------------------------------------------------------
# Bad inputs
# ---------------------------------------------------------------------------------------------
class Bad(nn.Module):
    def forward(self, x):
        return x.flatten(1)[:, :C, None]  # (B, C, 1), not (B, C)


@pytest.mark.parametrize("estimator", ["exact", "finite_difference", "noise"])
def test_bad_inputs(estimator):
    teacher, student, x, y = make(torch.float32)
    kind = "squared" if estimator == "noise" else None
    loss = DistillationLoss(teacher, estimator=estimator, kind=kind)
    with pytest.raises(ValueError, match="batch"):
        loss(student, x[0, 0, 0], y)  # no batch dimension
    with pytest.raises(ValueError, match="(?i)k"):
        DistillationLoss(teacher, k=C + 1, estimator=estimator, kind=kind)(student, x, y)  # K > C
    with pytest.raises(ValueError, match=r"\(B"):
        loss(Bad(), x, y)  # student output not (B, C)
    with pytest.raises(ValueError, match=r"\(B"):
        DistillationLoss(Bad(), estimator=estimator, kind=kind)(student, x, y)  # teacher output not (B, C)
    with pytest.raises(ValueError, match="target"):
        loss(student, x)  # CE needs labels
    with pytest.raises(ValueError, match="range"):
        DistillationLoss(teacher, select="target", estimator=estimator, kind=kind)(student, x, y + C)
    if estimator != "noise":  # indices out of range, from a (corrupt) teacher cache
        logits, jac, idx = input_jacobians(teacher, x, select.topk(1))
        with pytest.raises(ValueError, match="range"):
            loss(student, x, y, teacher_outputs=(logits, jac, idx + C))
        with pytest.raises(ValueError, match="shape"):
            loss(student, x, y, teacher_outputs=(logits, jac[:, :, :1], idx))


def test_bad_settings():
    teacher = cnn(4)
    for kw in (dict(estimator="magic"), dict(select="top5"), dict(kind="norm"), dict(k=0),
               dict(estimator="noise", kind="normalized"), dict(beta=-1.0), dict(temperature=0.0)):
        with pytest.raises(ValueError):
            DistillationLoss(teacher, **kw)
    _, model, x, _ = make()
    with pytest.raises(ValueError):
        jacobian_penalty(model, x, num_projections=0)
    with pytest.raises(ValueError):
        jacobian_penalty(model, x, estimator="noise")
    with pytest.raises(ValueError, match="fd_scheme"):
        DistillationLoss(teacher, estimator="finite_difference", fd_scheme="backward")
    with pytest.raises(ValueError, match="fd_scheme"):
        jacobian_penalty(model, x, estimator="finite_difference", fd_scheme="Central")
    with pytest.raises(ValueError, match="teacher"):
        DistillationLoss(None)(model, x, torch.zeros(x.shape[0], dtype=torch.long))
