"""input_jacobians on the models of issue 23's "found when tried": the auto-strategy cache key,
torch.compile'd models, nn.TransformerEncoderLayer (SDPA) with double backward on the CPU."""
import pytest
import torch
from torch import nn

from jacfast import jacobians
from jacfast.jacobians import input_jacobians, select, strategy_cache

B, L, C, E = 3, 5, 7, 6


def test_auto_cache_key_tells_selections_apart(monkeypatch):
    """select.all() (K = C, known only after the forward) then a callable giving K = 1 on the same
    model and shapes: the second call must not reuse the first's choice (it raised "select gave
    K = 1 rows, expected 10" when replicate had won the timing)."""
    strategy_cache.clear()
    model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 10)).double()
    x = torch.randn(4, 6, dtype=torch.float64)
    real = jacobians._time_once

    def replicate_wins(name, *args):
        seconds, rows = real(name, *args)
        return (0.0 if name == "replicate" else 1.0), rows

    monkeypatch.setattr(jacobians, "_time_once", replicate_wins)
    _, jac_all, _ = input_jacobians(model, x, select.all())
    assert [c.strategy for c in strategy_cache.choices(model).values()] == ["replicate"]
    _, jac1, idx = input_jacobians(model, x, lambda logits: logits.argmax(1, keepdim=True))
    assert jac1.shape == (4, 1, 6)
    torch.testing.assert_close(jac1[:, 0], jac_all[torch.arange(4), idx[:, 0]], rtol=1e-12, atol=1e-14)
    keys = list(strategy_cache.choices(model))
    assert len(keys) == 2 and keys[0][-2] != keys[1][-2]  # keyed on the selection kind
    # outputs= is part of the key too: the same model called through a dict-returning wrapper
    # is another callable; the same model with another outputs= / positions= is another key.
    seq = nn.Linear(E, C).double()
    xs = torch.randn(B, L, E, dtype=torch.float64)
    input_jacobians(seq, xs, select.topk(2))
    input_jacobians(seq, xs, select.topk(2), positions=select.sample(2))
    input_jacobians(seq, xs, select.topk(2), outputs=lambda out: out)
    assert len(strategy_cache.choices(seq)) == 3


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 5))


def test_compiled_model_rows_and_the_refused_double_backward():
    eager = mlp()
    compiled = torch.compile(mlp(), backend="aot_eager")  # aot_autograd, without a C++ compile
    x = torch.randn(4, 6)
    for strategy in ("loop", "batched"):  # K = 2: two retained backward passes through the compiled graph
        want = input_jacobians(eager, x, select.topk(2), strategy=strategy)
        got = input_jacobians(compiled, x, select.topk(2), strategy=strategy)
        torch.testing.assert_close(got[1], want[1], rtol=1e-6, atol=1e-7)
    # The reason for the refusal: aot_autograd has no double backward.
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(compiled(xg)[:, 0].sum(), xg, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        g.square().sum().backward()
    with pytest.raises(ValueError, match=r"no double backward.*_orig_mod.*finite_difference"):
        input_jacobians(compiled, x, select.topk(2), create_graph=True)
    with pytest.raises(ValueError, match="replicate' cannot be used: the model is compiled"):
        input_jacobians(compiled, x, select.topk(2), strategy="replicate")


def encoder(dtype=torch.float64):
    torch.manual_seed(1)
    layer = nn.TransformerEncoderLayer(E, 2, 8, dropout=0.0, batch_first=True).to(dtype)
    head = nn.Linear(E, C).to(dtype)
    return nn.Sequential(layer, head)


def test_transformer_encoder_layer_exact_rows_on_cpu():
    """SDPA's CPU flash kernel has no double backward; create_graph forwards use the math kernel."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = encoder()
    x = torch.randn(B, L, E, dtype=torch.float64)
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(model(xg)[:, 0, 0].sum(), xg, create_graph=True)
    with pytest.raises(RuntimeError, match="not implemented"):  # the failure fixed here (default kernel)
        g.square().sum().backward()
    model.zero_grad()
    _, jac, idx = input_jacobians(model, x, select.topk(1), positions=torch.tensor([1, 3]), create_graph=True,
                                  strategy="loop")
    w = torch.randn(jac.shape, dtype=torch.float64)
    grads = torch.autograd.grad((jac * w).sum(), list(model.parameters()), materialize_grads=True)
    total = 0
    with sdpa_kernel(SDPBackend.MATH):
        for b in range(B):
            xb = x[b : b + 1].clone().requires_grad_(True)
            out = model(xb)[0]
            for r in range(2):
                flat = int(idx[b, r])
                (gb,) = torch.autograd.grad(out[flat // C, flat % C], xb, create_graph=True)
                total = total + (gb[0] * w[b, r]).sum()
    ref = torch.autograd.grad(total, list(model.parameters()), materialize_grads=True)
    for a, r in zip(grads, ref):
        torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-12)
