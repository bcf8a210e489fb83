"""input_jacobians against plain per-sample, per-output torch.autograd.grad references (float64)."""
import copy

import pytest
import torch
from torch import nn

from jacfast import jacobians
from jacfast.jacobians import input_jacobians, select, strategy_cache

B, C, IN = 4, 7, (3, 6, 6)
STRATEGIES = ("loop", "batched", "replicate", "auto")


class SmallCNN(nn.Module):
    """Conv + BatchNorm (one with cumulative momentum) + a BatchNorm1d head; 3x6x6 -> C."""

    def __init__(self, classes=C, dropout=0.0):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
            nn.Conv2d(6, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8, momentum=None), nn.Tanh(),
        )
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(8 * 3 * 3, 16), nn.BatchNorm1d(16), nn.Softplus(),
            nn.Dropout(dropout), nn.Linear(16, classes),
        )

    def forward(self, x):
        return self.head(self.features(x))


def make_model(train: bool, dtype=torch.float64, seed=0, **kw) -> SmallCNN:
    torch.manual_seed(seed)
    model = SmallCNN(**kw).to(dtype)
    model.train()
    with torch.no_grad():  # non-trivial running statistics and affine parameters
        for _ in range(2):
            model(torch.randn(8, *IN, dtype=dtype))
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return model.train(train)


def reference_rows(model, x, seeds, create_graph=False):
    """Plain autograd, one grad per (sample b, row k): d <seeds[k, b], f_b> / d x_b.

    Eval mode: samples are independent, each sample is run on its own (a true per-sample
    Jacobian). Train mode: BatchNorm uses batch statistics, so f_b depends on the whole
    batch; the row is then d/dx_b of sum_b' <seeds[k, b'], f_b'(x)> on the full batch,
    the definition input_jacobians documents (one grad per row k and sample b here).
    """
    x = x.detach().requires_grad_(True)
    k_rows = seeds.shape[0]
    rows = [[None] * k_rows for _ in range(B)]
    if model.training:
        for k in range(k_rows):
            for b in range(B):
                out = model(x)
                (g,) = torch.autograd.grad((out * seeds[k]).sum(), x, create_graph=create_graph)
                rows[b][k] = g[b]
    else:
        for b in range(B):
            for k in range(k_rows):
                xb = x[b : b + 1]
                (g,) = torch.autograd.grad((model(xb)[0] * seeds[k, b]).sum(), xb, create_graph=create_graph)
                rows[b][k] = g[0]
    return torch.stack([torch.stack(r) for r in rows])


def selections(x_logits, gen):
    """name -> (selection, K known before the forward)."""
    idx = torch.randint(0, C, (B, 3), generator=gen)
    return {
        "topk_own": select.topk(3),
        "topk_given": select.topk(3, logits=x_logits),
        "target": select.target(torch.randint(0, C, (B,), generator=gen)),
        "all": select.all(),
        "all_known": select.all(num_outputs=C),
        "indices": select.indices(idx),
        "indices_shared": select.indices(torch.tensor([6, 0])),
        "index_tensor": idx,
        "projections": select.projections(3, vectors=torch.randn(3, B, C, generator=gen, dtype=torch.float64)),
        "function": lambda logits: logits.argsort(dim=1, descending=True, stable=True)[:, [1, 4]],
    }


SELECTIONS = list(selections(torch.zeros(B, C), torch.Generator()).keys())


def seeds_for(name, sel, indices):
    if name == "projections":
        assert torch.equal(indices, torch.full((B, 3), -1))
        return sel.vectors
    k = indices.shape[1]
    return torch.zeros(k, B, C, dtype=torch.float64).scatter_(2, indices.t().unsqueeze(-1), 1)


def expected_indices(name, sel, logits):
    order = lambda z: torch.sort(z, dim=1, descending=True, stable=True).indices  # noqa: E731
    if name == "topk_own":
        return order(logits)[:, :3]
    if name == "topk_given":
        return order(sel.logits)[:, :3]
    if name == "target":
        return sel.target.unsqueeze(1)
    if name in ("all", "all_known"):
        return torch.arange(C).expand(B, C)
    if name == "indices":
        return sel.indices
    if name == "indices_shared":
        return sel.indices.expand(B, 2)
    if name == "index_tensor":
        return sel
    if name == "function":
        return order(logits)[:, [1, 4]]
    return torch.full((B, 3), -1)


def buffers(model):
    return {n: b.clone() for n, b in model.named_buffers()}


def _run(model, x, name, sel, strategy, create_graph=False):
    if strategy == "replicate" and name in ("all", "function"):
        with pytest.raises(ValueError, match="select"):  # K unknown before the forward pass
            input_jacobians(model, x, sel, strategy=strategy, create_graph=create_graph)
        pytest.skip("replicate needs K before the forward pass (checked to raise)")
    return input_jacobians(model, x, sel, strategy=strategy, create_graph=create_graph)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("name", SELECTIONS)
def test_rows_match_reference(name, strategy, train):
    strategy_cache.clear()
    gen = torch.Generator().manual_seed(1)
    model = make_model(train)
    plain = copy.deepcopy(model)
    x = torch.randn(B, *IN, generator=gen, dtype=torch.float64)
    sel = selections(torch.randn(B, C, generator=gen, dtype=torch.float64), gen)[name]
    logits, jac, indices = _run(model, x, name, sel, strategy)

    ref_logits = plain(x)  # one plain forward: also the reference running statistics
    assert torch.allclose(logits, ref_logits, rtol=1e-12, atol=1e-12)
    for (n, b), (_, rb) in zip(model.named_buffers(), plain.named_buffers()):
        assert torch.allclose(b.double(), rb.double(), rtol=1e-12, atol=1e-14), n
    assert indices.dtype == torch.int64
    assert torch.equal(indices, expected_indices(name, sel, ref_logits.detach()))
    assert jac.shape == (B, indices.shape[1], *IN) and jac.dtype == torch.float64
    assert not jac.requires_grad and not logits.requires_grad
    ref = reference_rows(copy.deepcopy(plain), x, seeds_for(name, sel, indices))
    torch.testing.assert_close(jac, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_create_graph_gradients_reach_parameters(strategy, train):
    strategy_cache.clear()
    gen = torch.Generator().manual_seed(2)
    model = make_model(train)
    twin = copy.deepcopy(model)
    x = torch.randn(B, *IN, generator=gen, dtype=torch.float64)
    sel = select.topk(3)
    logits, jac, indices = input_jacobians(model, x, sel, create_graph=True, strategy=strategy)
    assert jac.requires_grad and logits.requires_grad
    w_jac = torch.randn(jac.shape, generator=gen, dtype=torch.float64)
    w_out = torch.randn(logits.shape, generator=gen, dtype=torch.float64)
    params = [p for _, p in model.named_parameters()]
    grads = torch.autograd.grad((jac * w_jac).sum() + (logits * w_out).sum(), params, retain_graph=True)

    ref_jac = reference_rows(twin, x, seeds_for("topk_own", sel, indices), create_graph=True)
    ref_logits = twin(x)
    ref_grads = torch.autograd.grad((ref_jac * w_jac).sum() + (ref_logits * w_out).sum(), list(twin.parameters()))
    for (n, _), g, r in zip(model.named_parameters(), grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-12, msg=n)
    # The Jacobian term alone moves the first convolution (it is not a KD-only gradient).
    (g_conv,) = torch.autograd.grad((jac * w_jac).sum(), [model.features[0].weight])
    assert g_conv.abs().max() > 1e-6


def test_teacher_rows_touch_nothing():
    model = make_model(train=False)
    x = torch.randn(B, *IN, dtype=torch.float64, requires_grad=True)
    for strategy in STRATEGIES:
        logits, jac, _ = input_jacobians(model, x, select.topk(2), strategy=strategy)
        assert not logits.requires_grad and not jac.requires_grad and logits.grad_fn is None
    assert all(p.grad is None for p in model.parameters()) and x.grad is None
    with torch.no_grad():  # works under no_grad, and on inference tensors
        _, jac2, _ = input_jacobians(model, x, select.topk(2), strategy="loop")
    with torch.inference_mode():
        xi = x.detach().clone()
    _, jac3, _ = input_jacobians(model, xi, select.topk(2), strategy="loop")
    torch.testing.assert_close(jac2, jac3)


def test_create_graph_keeps_the_graph_to_x():
    model = make_model(train=False)
    x0 = torch.randn(B, *IN, dtype=torch.float64, requires_grad=True)
    _, jac, _ = input_jacobians(model, x0 * 2, select.target(torch.zeros(B, dtype=torch.long)), create_graph=True)
    jac.square().sum().backward()
    assert x0.grad is not None and x0.grad.abs().max() > 0


def test_float32_matches_float64():
    model64 = make_model(train=True)
    model32 = copy.deepcopy(model64).float()
    x = torch.randn(B, *IN, dtype=torch.float64)
    idx = torch.randint(0, C, (B, 2))
    for strategy in ("loop", "batched", "replicate"):
        _, j32, _ = input_jacobians(model32, x.float(), idx, strategy=strategy)
        _, j64, _ = input_jacobians(copy.deepcopy(model64), x, idx, strategy=strategy)
        assert j32.dtype == torch.float32
        torch.testing.assert_close(j32.double(), j64, rtol=1e-4, atol=1e-5)


def test_projection_rows_are_reproducible_and_unbiased():
    model = make_model(train=False)
    x = torch.randn(B, *IN, dtype=torch.float64)
    sel = select.projections(3, generator=torch.Generator().manual_seed(5))
    _, jac, indices = input_jacobians(model, x, sel, strategy="loop")
    assert torch.equal(indices, torch.full((B, 3), -1))
    vectors = select.projections(3, generator=torch.Generator().manual_seed(5)).sample(B, C, torch.float64)
    assert set(vectors.unique().tolist()) == {-1.0, 1.0}
    torch.testing.assert_close(jac, reference_rows(model, x, vectors), rtol=1e-10, atol=1e-12)
    # Hutchinson: mean over rows of |v^T J|^2 estimates |J|_F^2 (linear model: J = W).
    linear = nn.Linear(6, 5, bias=False).double()
    for dist in ("rademacher", "gaussian"):
        sel = select.projections(4000, generator=torch.Generator().manual_seed(0), distribution=dist)
        _, rows, _ = input_jacobians(linear, torch.randn(1, 6, dtype=torch.float64), sel, strategy="batched")
        estimate = rows.square().sum(-1).mean()
        assert abs(estimate / linear.weight.square().sum() - 1) < 0.1


def test_auto_times_once_per_key_and_caches_the_fastest():
    strategy_cache.clear()
    model = make_model(train=True)
    plain = copy.deepcopy(model)
    x = torch.randn(B, *IN, dtype=torch.float64)
    first = input_jacobians(model, x, select.topk(3))
    plain(x)
    for (n, b), (_, rb) in zip(model.named_buffers(), plain.named_buffers()):  # trials undone
        assert torch.allclose(b, rb, rtol=1e-12, atol=1e-14), n
    (choice,) = strategy_cache.choices(model).values()
    assert set(choice.timings) == {"loop", "batched", "replicate"}
    assert choice.strategy == min((t, s) for s, t in choice.timings.items() if t is not None)[1]
    trials = strategy_cache.trials
    second = input_jacobians(model, x, select.topk(3))
    assert strategy_cache.trials == trials  # cached: no new timing
    torch.testing.assert_close(second[1], first[1], rtol=1e-10, atol=1e-12)
    input_jacobians(model, x, select.topk(3), create_graph=True)  # new key
    input_jacobians(model, x[:2], select.topk(3))  # new key
    assert len(strategy_cache.choices(model)) == 3
    trials = strategy_cache.trials
    input_jacobians(model, x, select.target(torch.zeros(B, dtype=torch.long)))  # K = 1: loop, untimed
    assert strategy_cache.trials == trials
    assert [c.strategy for k, c in strategy_cache.choices(model).items() if k[2] == 1] == ["loop"]


def test_auto_skips_a_strategy_that_raises(monkeypatch):
    strategy_cache.clear()

    def broken(*args, **kwargs):
        raise RuntimeError("no batching rule for this op")

    monkeypatch.setitem(jacobians._STRATEGIES, "batched", broken)
    model = make_model(train=False)
    x = torch.randn(B, *IN, dtype=torch.float64)
    _, jac, idx = input_jacobians(model, x, select.topk(3))
    (choice,) = strategy_cache.choices(model).values()
    assert choice.timings["batched"] is None and "no batching rule" in choice.errors["batched"]
    assert choice.strategy in ("loop", "replicate")
    torch.testing.assert_close(jac, reference_rows(model, x, seeds_for("topk_own", None, idx)), rtol=1e-10, atol=1e-12)
    # Dropout in training mode: replicate is not a candidate (replicas would draw other masks).
    strategy_cache.clear()
    drop = make_model(train=True, dropout=0.5)
    input_jacobians(drop, x, select.topk(3))
    (choice,) = strategy_cache.choices(drop).values()
    assert "replicate" not in choice.timings
    with pytest.raises(ValueError, match="dropout"):
        input_jacobians(drop, x, select.topk(3), strategy="replicate")


class FourD(nn.Module):  # (B, C) and sequence logits (B, L, C) are logits; (B, 3, 2, 1) is not
    def forward(self, x):
        return x.flatten(1)[:, :6].reshape(-1, 3, 2, 1) * 2


def test_bad_inputs():
    model = make_model(train=False)
    x = torch.randn(B, *IN, dtype=torch.float64)
    with pytest.raises(ValueError, match="x must have a batch dimension"):
        input_jacobians(nn.Linear(3, 2), torch.randn(3), select.topk(1))
    with pytest.raises(TypeError, match="x must have a floating dtype"):
        input_jacobians(model, x.long(), select.topk(1))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        input_jacobians(model, x.tolist(), select.topk(1))
    with pytest.raises(TypeError, match="model must be callable"):
        input_jacobians("resnet", x, select.topk(1))
    for strategy in STRATEGIES:
        with pytest.raises(ValueError, match="k must satisfy 1 <= k <= C = 7"):
            input_jacobians(model, x, select.topk(8), strategy=strategy)
        with pytest.raises(ValueError, match="model must return logits of shape"):
            input_jacobians(FourD(), x, select.topk(1), strategy=strategy)
        with pytest.raises(TypeError, match="model must return a logits tensor"):
            input_jacobians(lambda z: (model(z),), x, select.topk(1), strategy=strategy)
        with pytest.raises(ValueError, match="indices out of range"):
            input_jacobians(model, x, select.indices(torch.tensor([[0, 7]] * B)), strategy=strategy)
        with pytest.raises(ValueError, match="indices out of range"):
            input_jacobians(model, x, torch.tensor([-1, 2]), strategy=strategy)
        with pytest.raises(ValueError, match="target out of range"):
            input_jacobians(model, x, select.target(torch.full((B,), C)), strategy=strategy)
        with pytest.raises(ValueError, match="target must be a"):
            input_jacobians(model, x, select.target(torch.zeros(B + 1, dtype=torch.long)), strategy=strategy)
        with pytest.raises(ValueError, match="indices must have shape"):
            input_jacobians(model, x, select.indices(torch.zeros(B + 1, 2, dtype=torch.long)), strategy=strategy)
        with pytest.raises(ValueError, match="logits given to select.topk"):
            input_jacobians(model, x, select.topk(2, logits=torch.randn(B, C + 1)), strategy=strategy)
        with pytest.raises(ValueError, match="does not depend on x"):
            input_jacobians(lambda z: torch.zeros(z.shape[0], 3), x, select.topk(1), strategy=strategy)
    with pytest.raises(TypeError, match="indices must be an integer tensor"):
        input_jacobians(model, x, torch.tensor([0.0, 1.0]))
    with pytest.raises(TypeError, match="select must be"):
        input_jacobians(model, x, 3)
    with pytest.raises(ValueError, match="strategy must be one of"):
        input_jacobians(model, x, select.topk(1), strategy="fast")
    with pytest.raises(TypeError, match="create_graph must be a bool"):
        input_jacobians(model, x, select.topk(1), create_graph=1)
    with pytest.raises(ValueError, match="k must be a positive int"):
        select.topk(0)
    with pytest.raises(TypeError, match="k must be an int"):
        select.projections(2.5)
    with pytest.raises(ValueError, match="distribution"):
        select.projections(2, distribution="uniform")
    with pytest.raises(ValueError, match="num_outputs"):
        input_jacobians(model, x, select.all(num_outputs=5))
