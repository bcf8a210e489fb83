"""fast_rows (strategy and input layout chosen by timing) against float64 autograd references."""
import copy

import pytest
import torch
from torch import nn

from jacfast import fast_rows
from jacfast.fast_rows import candidates, fast_input_jacobians, layout_cache, to_layout
from jacfast.jacobians import select
from jacfast.losses import DistillationLoss

B, C, IN = 5, 7, (3, 6, 6)


def make_cnn(seed=0, dtype=torch.float64, view_flatten=False):
    torch.manual_seed(seed)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.Tanh(),
                                          nn.Conv2d(6, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.Softplus())
            self.head = nn.Linear(8 * 3 * 3, C)

        def forward(self, x):
            h = self.features(x)
            # .view on a channels-last activation raises: that candidate must be skipped
            return self.head(h.view(h.shape[0], -1) if view_flatten else h.flatten(1))

    net = Net().to(dtype)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return net


def reference(model, x, idx, create_graph):
    """Rows d f[:, idx[:, k]].sum() / dx, one autograd.grad each (batch statistics included)."""
    xg = x.detach().requires_grad_(True)
    out = model(xg)
    rows = [torch.autograd.grad(out.gather(1, idx[:, k:k + 1]).sum(), xg, create_graph=create_graph,
                                retain_graph=True)[0] for k in range(idx.shape[1])]
    return out, torch.stack(rows, 1)


def param_grad(model, logits, jac, weights):
    loss = (jac * weights).sum() + logits.square().sum()
    return torch.autograd.grad(loss, list(model.parameters()))


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("k", [1, 3])
def test_fast_rows_match_reference_with_double_backward(train, k):
    model = make_cnn().train(train)
    x = torch.randn(B, *IN, dtype=torch.float64)
    idx = torch.stack([torch.randperm(C)[:k] for _ in range(B)])
    weights = torch.randn(B, k, *IN, dtype=torch.float64)
    ref_model = copy.deepcopy(model)
    ref_out, ref_jac = reference(ref_model, x, idx, create_graph=True)
    ref_grads = param_grad(ref_model, ref_out, ref_jac, weights)
    logits, jac, indices = fast_input_jacobians(model, x, select.indices(idx), create_graph=True)
    assert jac.is_contiguous() and jac.shape == (B, k, *IN)
    torch.testing.assert_close(logits, ref_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(jac, ref_jac, rtol=1e-10, atol=1e-12)
    assert torch.equal(indices, idx)
    for g, r in zip(param_grad(model, logits, jac, weights), ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-11)
    # the timing trials left no trace: running statistics as after one forward (up to the
    # summation order of a channels-last batch), num_batches_tracked counted once
    for b, rb in zip(model.buffers(), ref_model.buffers()):
        torch.testing.assert_close(b, rb, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("strategy,layout", [(s, lay) for s in ("loop", "batched") for lay in fast_rows.LAYOUTS]
                         + [("replicate", "contiguous")])
def test_every_candidate_matches_reference(strategy, layout):
    model = make_cnn(seed=1).train()
    x = torch.randn(B, *IN, dtype=torch.float64)
    idx = torch.stack([torch.randperm(C)[:2] for _ in range(B)])
    ref_out, ref_jac = reference(copy.deepcopy(model), x, idx, create_graph=False)
    from jacfast.jacobians import input_jacobians

    def rows_fn(x_in, s):
        return input_jacobians(model, x_in, select.indices(idx), strategy=s)
    logits, jac, _ = fast_rows._run(rows_fn, x, strategy, layout)
    assert jac.is_contiguous()
    torch.testing.assert_close(jac, ref_jac, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(logits, ref_out, rtol=1e-12, atol=1e-12)


def test_model_failing_in_channels_last_keeps_contiguous():
    model = make_cnn(view_flatten=True).eval()
    x = torch.randn(B, *IN, dtype=torch.float64)
    idx = torch.stack([torch.randperm(C)[:2] for _ in range(B)])
    _, ref_jac = reference(model, x, idx, create_graph=False)
    _, jac, _ = fast_input_jacobians(model, x, select.indices(idx))
    torch.testing.assert_close(jac, ref_jac, rtol=1e-10, atol=1e-12)
    (choice,) = layout_cache.choices(model).values()
    assert choice.layout == "contiguous"
    assert all(choice.timings[f"{s}/channels_last"] is None for s in ("loop", "batched"))
    assert "view" in choice.errors["loop/channels_last"]


def test_candidates_and_layout_arguments():
    model = make_cnn()
    assert candidates(model, torch.zeros(2, 3, 4, 4), 1) == [("loop", "contiguous"), ("loop", "channels_last")]
    assert {lay for _, lay in candidates(model, torch.zeros(2, 12), 3)} == {"contiguous"}
    assert candidates(model, torch.zeros(2, 3, 4, 4), 3) == [("loop", "contiguous"), ("loop", "channels_last"),
                                                            ("batched", "contiguous"), ("batched", "channels_last"),
                                                            ("replicate", "contiguous")]
    with pytest.raises(ValueError, match="4-D"):
        to_layout(torch.zeros(2, 12), "channels_last")
    with pytest.raises(ValueError, match="layout must be one of"):
        to_layout(torch.zeros(2, 3, 4, 4), "nhwc")
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        fast_input_jacobians(model, [1.0], select.topk(1))


def test_upstream_graph_of_x_is_kept():
    """create_graph with an x that requires grad: the rows stay differentiable wrt x."""
    model = make_cnn().eval()
    x0 = torch.randn(B, *IN, dtype=torch.float64, requires_grad=True)
    idx = torch.zeros(B, 1, dtype=torch.long)

    def f(x0):
        return fast_input_jacobians(model, x0 * 2.0, select.indices(idx), create_graph=True)[1].square().sum()

    (g,) = torch.autograd.grad(f(x0), x0)
    xg = x0 * 2.0  # the reference: plain autograd through the same differentiated input
    out = model(xg)
    (row,) = torch.autograd.grad(out[:, 0].sum(), xg, create_graph=True)
    (g_ref,) = torch.autograd.grad(row.square().sum(), x0)
    torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12)


def naive_distillation_loss(student, teacher, x, y, k, T=4.0, beta=1.0):
    import torch.nn.functional as F

    from jacfast import reference as ref

    xg = x.detach().requires_grad_(True)
    t_logits, s_logits = teacher(xg), student(xg)
    idx = t_logits.detach().topk(k, dim=1).indices
    t_rows, s_rows = [], []
    for j in range(k):
        t_rows.append(torch.autograd.grad(t_logits.gather(1, idx[:, j:j + 1]).sum(), xg, retain_graph=True)[0])
        s_rows.append(torch.autograd.grad(s_logits.gather(1, idx[:, j:j + 1]).sum(), xg, create_graph=True,
                                          retain_graph=True)[0])
    jac = ref.jacobian_matching_loss(torch.stack(s_rows, 1), torch.stack(t_rows, 1), kind="normalized")
    kd = F.kl_div(F.log_softmax(s_logits / T, 1), F.log_softmax(t_logits.detach() / T, 1), reduction="batchmean",
                  log_target=True) * T * T
    return F.cross_entropy(s_logits, y) + kd + beta * jac


def test_distillation_loss_auto_gradient_matches_float64_reference():
    teacher = make_cnn(seed=3).eval().requires_grad_(False)
    student = make_cnn(seed=4).train()
    x = torch.randn(B, *IN, dtype=torch.float64)
    y = torch.randint(0, C, (B,))
    ref_student = copy.deepcopy(student)
    naive_distillation_loss(ref_student, teacher, x, y, 3).backward()
    out = DistillationLoss(teacher, k=3, backend="torch")(student, x, y)
    out.total.backward()
    for p, r in zip(student.parameters(), ref_student.parameters()):
        torch.testing.assert_close(p.grad, r.grad, rtol=1e-9, atol=1e-11)
