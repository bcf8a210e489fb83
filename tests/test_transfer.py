"""TransferLoss: hooks, activation matching, attention transfer, attention-map Jacobians."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import assert_matches_directional_differences

from jacfast.losses import TransferLoss, attention_map

C = 5


class Net(nn.Module):
    """block1 (B, w1, 8/s, 8/s) -> block2 (B, w2, 4/s, 4/s) -> head; input 3x8x8, s = stride1."""

    def __init__(self, w1, w2, act=nn.Tanh, stride1=1):
        super().__init__()
        self.block1 = nn.Sequential(nn.Conv2d(3, w1, 3, stride=stride1, padding=1), act())
        self.block2 = nn.Sequential(nn.Conv2d(w1, w2, 3, stride=2, padding=1), act())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(w2, C))

    def forward(self, x):
        return self.head(self.block2(self.block1(x)))


def nets(dtype=torch.float64, act=nn.Tanh):
    # Different architectures: widths differ, and the student's block1 is strided, so its maps
    # are 4x4 and 2x2 where the teacher's are 8x8 and 4x4.
    return Net(6, 8, act).to(dtype), Net(3, 4, act, stride1=2).to(dtype)


def data(dtype=torch.float64, batch=3):
    return torch.randn(batch, 3, 8, 8, dtype=dtype), torch.randint(0, C, (batch,))


def features(model, x, names):
    out, hooks = {}, []
    for n in names:
        hooks.append(dict(model.named_modules())[n].register_forward_hook(lambda m, i, o, n=n: out.__setitem__(n, o)))
    y = model(x)
    for h in hooks:
        h.remove()
    return y, out


def param_grad(loss, model):
    grads = torch.autograd.grad(loss, list(model.parameters()), materialize_grads=True)
    return torch.cat([g.reshape(-1) for g in grads])


def test_values_match_a_manual_computation():
    teacher, student = nets()
    x, y = data()
    layers = ["block1", "block2"]
    out = TransferLoss(teacher, student, layers, attention_weight=0.5, jacobian_weight=2.0, p=2, backend="torch")(x, y)

    xt, xs = x.clone().requires_grad_(), x.clone().requires_grad_()
    _, ft = features(teacher, xt, layers)
    logits, fs = features(student, xs, layers)
    att = jac = 0
    for n in layers:
        at, as_ = ft[n].pow(2).mean(1), fs[n].pow(2).mean(1)
        # resized to the common (smaller) grid by area averaging: the teacher's 8x8 -> 4x4, 4x4 -> 2x2
        at = F.adaptive_avg_pool2d(at[:, None], as_.shape[-2:])[:, 0].flatten(1)
        as_ = as_.flatten(1)
        att = att + (F.normalize(as_, dim=1) - F.normalize(at, dim=1)).pow(2).sum(1).mean()
        i = at.argmax(1, keepdim=True)
        (gt,) = torch.autograd.grad(at.gather(1, i).sum(), xt, retain_graph=True)
        (gs,) = torch.autograd.grad(as_.gather(1, i).sum(), xs, retain_graph=True)
        jac = jac + (F.normalize(gs.flatten(1), dim=1) - F.normalize(gt.flatten(1), dim=1)).pow(2).sum(1).mean()
    torch.testing.assert_close(out.attention, att)
    torch.testing.assert_close(out.jacobian, jac)
    torch.testing.assert_close(out.ce, F.cross_entropy(logits, y))
    torch.testing.assert_close(out.total, out.ce + 0.5 * att + 2.0 * jac)
    assert out.activation.item() == 0.0
    assert set(out.scalars()) == {"total", "ce", "activation", "attention", "jacobian"}


def test_jacobian_weight_reaches_the_loss_head_as_its_weight(monkeypatch):
    """As DistillationLoss's beta: the loss head's backward receives 1, and the total's
    parameter gradient is jacobian_weight times the unweighted term's."""
    from jacfast.ops import jacobian_matching as ops

    teacher, student = nets(torch.float32)
    x, y = data(torch.float32)
    upstream = []
    real = ops._scale_by_upstream_
    monkeypatch.setattr(ops, "_scale_by_upstream_", lambda g, gl, r: (upstream.append(gl.item()), real(g, gl, r)))
    kw = dict(ce_weight=0, attention_weight=0)
    out = TransferLoss(teacher, student, ["block1", "block2"], jacobian_weight=0.3, backend="cpu", **kw)(x, y)
    got = param_grad(out.total, student)
    assert upstream == [1.0]
    out = TransferLoss(teacher, student, ["block1", "block2"], jacobian_weight=1.0, backend="torch", **kw)(x, y)
    assert float((got - 0.3 * param_grad(out.total, student)).norm() / got.norm()) < 1e-4


def test_identical_networks_give_zero_and_hooks_are_removed():
    teacher, _ = nets()
    student = copy.deepcopy(teacher)
    x, y = data()
    out = TransferLoss(teacher, student, {"block1": "block1", "block2": "block2"}, activation_weight=1.0)(x, y)
    for name in ("activation", "attention", "jacobian"):
        assert getattr(out, name).item() < 1e-20
    for net in (teacher, student):
        assert all(not m._forward_hooks for m in net.modules())


def test_jacobian_term_moves_the_student():
    # float64, tanh: the loss is smooth in the student's parameters (the argmax is the
    # teacher's, fixed), so central differences along parameter directions are O(h^2).
    teacher, student = nets()
    x, y = data()
    full = TransferLoss(teacher, student, ["block1", "block2"], backend="torch")
    g_full = param_grad(full(x, y).total, student)
    g_none = param_grad(TransferLoss(teacher, student, ["block1", "block2"], jacobian_weight=0)(x, y).total, student)
    assert float((g_full - g_none).norm() / g_full.norm()) > 1e-2
    assert_matches_directional_differences(lambda: full(x, y).total.item(), list(student.parameters()), g_full)
    assert all(p.grad is None for p in teacher.parameters())


# Smooth networks: central differences are O(e^2) accurate, forward ones O(e) (at their own
# default steps, ~cbrt(u) and ~sqrt(u), and fp32 round-off: see jacfast/losses/finite_difference.py).
@pytest.mark.parametrize("scheme,dtype,tol", [("central", torch.float32, 1e-3), ("central", torch.float64, 1e-6),
                                              ("forward", torch.float32, 3e-3), ("forward", torch.float64, 1e-6)])
def test_finite_difference_matches_exact(scheme, dtype, tol):
    teacher, student = nets(dtype, nn.GELU)
    x, y = data(dtype)
    kw = dict(layers=["block1", "block2"], attention_weight=0.0)
    exact = TransferLoss(teacher, student, **kw)(x, y)
    fd = TransferLoss(teacher, student, estimator="finite_difference", fd_scheme=scheme, **kw)(x, y)
    torch.testing.assert_close(fd.total, exact.total)
    g_e, g_f = param_grad(exact.total, student), param_grad(fd.total, student)
    assert float((g_f - g_e).norm() / g_e.norm()) < tol


def test_activation_matching_and_adapters():
    teacher, student = nets()
    x, y = data()
    with pytest.raises(ValueError, match="adapters"):
        TransferLoss(teacher, student, ["block2"], activation_weight=1.0)(x, y)  # 8 vs 4 channels
    adapter = nn.Conv2d(4, 8, 1).double()
    loss = TransferLoss(teacher, student, ["block2"], activation_weight=1.0, attention_weight=0, jacobian_weight=0,
                        ce_weight=0, adapters={"block2": adapter})
    assert len(list(loss.parameters())) == 2  # the adapter trains with the student
    out = loss(x)
    _, ft = features(teacher, x, ["block2"])
    _, fs = features(student, x, ["block2"])
    ft = F.adaptive_avg_pool2d(ft["block2"], 2)  # the teacher's 4x4 features pooled to the student's 2x2
    torch.testing.assert_close(out.activation, F.mse_loss(adapter(fs["block2"]), ft))
    out.total.backward()
    assert adapter.weight.grad is not None


def test_bad_inputs():
    teacher, student = nets()
    x, y = data()
    with pytest.raises(ValueError, match=r"valid names: .*block1"):
        TransferLoss(teacher, student, {"block9": "block1"})
    with pytest.raises(ValueError, match=r"no module named 'blk' in the student .*valid names: .*head"):
        TransferLoss(teacher, student, [("block1", "blk")])
    with pytest.raises(ValueError, match="adapters"):
        TransferLoss(teacher, student, ["block1"], adapters={"block2": nn.Identity()})
    with pytest.raises(ValueError):
        TransferLoss(teacher, student, [])
    with pytest.raises(ValueError):
        TransferLoss(teacher, student, ["block1"], estimator="noise")
    with pytest.raises(ValueError, match="spatial"):  # (B, C) features have no attention map
        TransferLoss(teacher, student, ["head"], ce_weight=0)(x)
    loss = TransferLoss(teacher, student, ["block1"])
    with pytest.raises(ValueError, match="batch"):
        loss(x[0, 0, 0], y)
    with pytest.raises(ValueError, match="target"):
        loss(x)

    class Twice(nn.Module):  # one activation module called twice per forward
        def __init__(self):
            super().__init__()
            self.conv, self.act = nn.Conv2d(3, 3, 3, padding=1).double(), nn.Tanh()

        def forward(self, x):
            return self.act(self.conv(self.act(x))).mean((2, 3))

    with pytest.raises(RuntimeError, match="more than once"):
        TransferLoss(teacher, Twice(), {"block1": "act"}, ce_weight=0)(x)
    assert all(not m._forward_hooks for m in teacher.modules())


def test_attention_map_shapes():
    f = torch.randn(2, 4, 5, 6)
    torch.testing.assert_close(attention_map(f, 1.0), f.abs().mean(1))
    assert attention_map(torch.randn(2, 4, 7), 2).shape == (2, 7)
    with pytest.raises(ValueError):
        attention_map(torch.randn(2, 4))


class DictNet(Net):
    """Net called as ``model(pixels=x, scale=s)`` returning ``{"logits": ...}``; ``scale`` (B,) int rides along."""

    def forward(self, pixels, scale):
        return {"logits": super().forward(pixels * scale.to(pixels.dtype)[:, None, None, None])}


@pytest.mark.parametrize("estimator", ["exact", "finite_difference"])
def test_dict_inputs_and_outputs_match_the_tensor_models(estimator):
    teacher, student = nets()
    dt, ds = DictNet(6, 8), DictNet(3, 4, stride1=2)
    dt.load_state_dict(teacher.state_dict())
    ds.load_state_dict(student.state_dict())
    dt, ds = dt.double(), ds.double()
    x, y = data()
    kw = dict(layers=["block1", "block2"], estimator=estimator, backend="torch")
    scale = torch.tensor([1, 2, 3])  # passed through, an integer tensor
    # Rows of f(x * s) wrt x are s times those of f at x * s: the normalized kind does not see
    # the factor, so the loss equals the tensor models' at x * s.
    want = TransferLoss(teacher, student, **kw)(x * scale[:, None, None, None], y)
    got = TransferLoss(dt, ds, outputs="logits", inputs="pixels", **kw)({"pixels": x, "scale": scale}, y)
    for name in ("total", "ce", "activation", "attention", "jacobian"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=1e-10, atol=1e-12)
    # finite differences: steps relative to ||x_b|| differ by s_b, O(step^2) ~ 1e-10 in float64
    tol = 1e-8 if estimator == "exact" else 1e-6
    torch.testing.assert_close(param_grad(got.total, ds), param_grad(want.total, student), rtol=tol, atol=tol * 1e-2)
    scale1 = scale
    with pytest.raises(TypeError, match=r"x\['scale'\] \(inputs='scale'\) must have a floating dtype"):
        TransferLoss(dt, ds, outputs="logits", inputs="scale", **kw)({"pixels": x, "scale": scale1}, y)
