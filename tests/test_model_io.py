"""ModelCall and sequence outputs (B, L, C) in input_jacobians, against per-row torch.autograd.grad
references in float64 (each sample run alone, one grad per selected (position, output))."""
import pytest
import torch
from torch import nn

from jacfast import ModelCall, input_jacobians, select, strategy_cache

B, L, C, E = 3, 5, 7, 6


class SeqModel(nn.Module):
    """inputs_embeds (B, L, E), attention_mask (B, L) int -> {"logits": (B, L, C), "hidden": ...}.
    Positions interact (a masked causal running mean), so rows are not block-diagonal."""

    def __init__(self, seed=0, width=8):
        super().__init__()
        torch.manual_seed(seed)
        self.inp, self.out = nn.Linear(E, width), nn.Linear(2 * width, C)

    def forward(self, inputs_embeds, attention_mask=None):
        h = torch.tanh(self.inp(inputs_embeds))
        m = torch.ones(h.shape[:2], dtype=h.dtype) if attention_mask is None else attention_mask.to(h.dtype)
        ctx = (h * m[..., None]).cumsum(1) / m.cumsum(1).clamp_min(1)[..., None]
        return {"hidden": h, "logits": self.out(torch.cat([h, ctx], -1))}


def make(seed=0):
    gen = torch.Generator().manual_seed(seed)
    model = SeqModel(seed).double()
    x = torch.randn(B, L, E, generator=gen, dtype=torch.float64)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, 3:] = 0
    return model, x, mask, gen


def ref_row(model, x, mask, b, fn):
    """d fn(logits of sample b (L, C)) / d x_b, sample b run alone."""
    xb = x[b : b + 1].detach().requires_grad_(True)
    out = model(xb, mask[b : b + 1])["logits"][0]
    (g,) = torch.autograd.grad(fn(out), xb)
    return g[0]


def reference(model, x, mask, pos, valid, cls=None, proj=None):
    """Rows (B, P * Kp, L, E) for positions pos (B, P), classes cls (B, P, Kp) or projections (B, P, Kp, C)."""
    rows = []
    for b in range(B):
        rb = []
        for p in range(pos.shape[1]):
            kp = cls.shape[2] if cls is not None else proj.shape[2]
            for j in range(kp):
                if not valid[b, p] or (cls is not None and cls[b, p, j] < 0):
                    rb.append(torch.zeros(L, E, dtype=x.dtype))
                    continue
                lp = int(pos[b, p])
                if cls is not None:
                    c = int(cls[b, p, j])
                    rb.append(ref_row(model, x, mask, b, lambda o: o[lp, c]))
                else:
                    v = proj[b, p, j]
                    rb.append(ref_row(model, x, mask, b, lambda o: (o[lp] * v).sum()))
        rows.append(torch.stack(rb))
    return torch.stack(rows)


def order(z):
    return torch.sort(z, dim=-1, descending=True, stable=True).indices


STRATEGIES = ("loop", "batched", "replicate", "auto")


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("positions", ["all", "mask", "sample", "index"])
def test_sequence_topk_rows_match_reference(positions, strategy):
    strategy_cache.clear()
    model, x, mask, gen = make(1)
    kw = {"all": None, "mask": mask.bool(), "sample": select.sample(2, seed=3), "index": torch.tensor([[4, 0]] * B)}
    pos_arg = kw[positions]
    xin = {"inputs_embeds": x, "attention_mask": mask}
    args = dict(outputs="logits", inputs="inputs_embeds", positions=pos_arg, strategy=strategy)
    if strategy == "replicate":
        with pytest.raises(ValueError, match="replicate"):  # several inputs: it cannot tell which are batched
            input_jacobians(model, xin, select.topk(2), **args)
        return
    logits, jac, idx = input_jacobians(model, xin, select.topk(2), **args)
    ref_logits = model(x, mask)["logits"]
    torch.testing.assert_close(logits, ref_logits, rtol=1e-12, atol=1e-12)
    if positions == "all":
        pos, valid = torch.arange(L).expand(B, L), torch.ones(B, L, dtype=torch.bool)
    elif positions == "mask":
        pos = torch.tensor([[0, 1, 2, 3, 4], [0, 1, 2, 0, 0], [0, 1, 2, 3, 4]])
        valid = torch.tensor([[1] * 5, [1, 1, 1, 0, 0], [1] * 5]).bool()
    elif positions == "sample":
        pos = idx.clamp_min(0).view(B, 2, 2)[..., 0] // C  # the draw: checked to be distinct, sorted, seeded
        assert (pos[:, 1] > pos[:, 0]).all()
        again = input_jacobians(model, xin, select.topk(2), **{**args, "positions": select.sample(2, seed=3)})
        assert torch.equal(again[2], idx)  # same seed, same first draw
        valid = torch.ones(B, 2, dtype=torch.bool)
    else:
        pos, valid = torch.tensor([[4, 0]] * B), torch.ones(B, 2, dtype=torch.bool)
    cls = order(ref_logits.gather(1, pos[..., None].expand(-1, -1, C)))[..., :2]
    want_idx = torch.where(valid[..., None], pos[..., None] * C + cls, -1).reshape(B, -1)
    assert torch.equal(idx, want_idx)
    assert jac.shape == (B, pos.shape[1] * 2, L, E)
    torch.testing.assert_close(jac, reference(model, x, mask, pos, valid, cls=cls), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("strategy", ["loop", "batched", "replicate"])
@pytest.mark.parametrize("name", ["target", "all", "indices", "projections", "function", "topk_given"])
def test_sequence_selections_tensor_input(name, strategy):
    """Tensor x (embeddings) with a tuple output, every per-position selection."""
    strategy_cache.clear()
    model, x, mask, gen = make(2)
    f = lambda z: (model(z)["logits"], None)  # noqa: E731
    y = torch.randint(0, C, (B, L), generator=gen)
    y[0, 1] = y[2, 4] = -100
    teacher_logits = torch.randn(B, L, C, generator=gen, dtype=torch.float64)
    vec = torch.randn(2, B, C, generator=gen, dtype=torch.float64)
    sels = {"target": select.target(y), "all": select.all(num_outputs=C), "indices": select.indices(torch.tensor([6, 1])),
            "projections": select.projections(2, vectors=vec), "topk_given": select.topk(2, logits=teacher_logits),
            "function": lambda z: order(z)[:, [2]]}
    positions = torch.tensor([[0, 2, 4]] * B) if strategy == "replicate" else None
    if strategy == "replicate" and name == "function":
        with pytest.raises(ValueError, match="needs K"):
            input_jacobians(f, x, sels[name], outputs=0, positions=positions, strategy=strategy)
        return
    logits, jac, idx = input_jacobians(f, x, sels[name], outputs=0, positions=positions, strategy=strategy)
    pos = torch.arange(L).expand(B, L) if positions is None else positions
    valid = torch.ones(pos.shape, dtype=torch.bool)
    lg = logits.gather(1, pos[..., None].expand(-1, -1, C))
    proj = None
    if name == "target":
        t = y.gather(1, pos)
        cls = torch.where(t == -100, -1, t)[..., None]
    elif name == "all":
        cls = torch.arange(C).expand(B, pos.shape[1], C)
    elif name == "indices":
        cls = torch.tensor([6, 1]).expand(B, pos.shape[1], 2)
    elif name == "function":
        cls = order(lg)[..., [2]]
    elif name == "topk_given":
        cls = order(teacher_logits.gather(1, pos[..., None].expand(-1, -1, C)))[..., :2]
    else:
        cls, proj = None, vec.permute(1, 0, 2)[:, None].expand(B, pos.shape[1], 2, C)
        assert torch.equal(idx, torch.full_like(idx, -1))
    if cls is not None:
        assert torch.equal(idx, torch.where(cls >= 0, pos[..., None] * C + cls, -1).reshape(B, -1))
    ref = reference(model, x, torch.ones(B, L, dtype=torch.long), pos, valid, cls=cls, proj=proj)
    torch.testing.assert_close(jac, ref, rtol=1e-10, atol=1e-12)
    if name == "target":  # ignored positions: exactly zero rows
        ignored = y.gather(1, pos) == -100
        assert ignored.any() and jac[ignored].abs().max() == 0 and (jac[~ignored].flatten(1).abs().amax(1) > 0).all()


def test_sequence_create_graph_gradients_reach_parameters():
    model, x, mask, gen = make(3)
    xin = (x, mask)
    logits, jac, idx = input_jacobians(model, xin, select.topk(1), outputs="logits", inputs=0,
                                       positions=mask.bool(), create_graph=True, strategy="batched")
    w = torch.randn(jac.shape, generator=gen, dtype=torch.float64)
    grads = torch.autograd.grad((jac * w).sum(), list(model.parameters()), materialize_grads=True)
    pos = torch.tensor([[0, 1, 2, 3, 4], [0, 1, 2, 0, 0], [0, 1, 2, 3, 4]])
    valid = torch.tensor([[1] * 5, [1, 1, 1, 0, 0], [1] * 5]).bool()
    cls = order(logits.detach().gather(1, pos[..., None].expand(-1, -1, C)))[..., :1]
    total = 0
    for b in range(B):  # reference: per-row double backward
        xb = x[b : b + 1].detach().requires_grad_(True)
        out = model(xb, mask[b : b + 1])["logits"][0]
        for p in range(5):
            if valid[b, p]:
                (g,) = torch.autograd.grad(out[pos[b, p], cls[b, p, 0]], xb, create_graph=True)
                total = total + (g[0] * w[b, p]).sum()
    ref = torch.autograd.grad(total, list(model.parameters()), materialize_grads=True)
    for g, r in zip(grads, ref):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-12)


class ModelOutput:
    def __init__(self, logits):
        self.logits = logits


def test_outputs_forms_and_errors():
    lin = nn.Linear(4, 3).double()
    x = torch.randn(B, 4, dtype=torch.float64)
    want = input_jacobians(lin, x, select.all(), strategy="loop")[1]
    for model, outputs in [(lambda z: {"logits": lin(z)}, "logits"), (lambda z: ModelOutput(lin(z)), "logits"),
                           (lambda z: (None, lin(z)), 1), (lambda z: [lin(z)], -1), (lambda z: {"a": lin(z)}, lambda o: o["a"])]:
        torch.testing.assert_close(input_jacobians(model, x, select.all(), outputs=outputs, strategy="loop")[1], want)
    with pytest.raises(TypeError, match=r"got dict \{'logits': Tensor\(3, 3\)\}; pick the logits with outputs='logits'"):
        input_jacobians(lambda z: {"logits": lin(z)}, x, select.all())
    with pytest.raises(TypeError, match=r"got tuple of 2 .*outputs=0"):
        input_jacobians(lambda z: (lin(z), z), x, select.all())
    with pytest.raises(TypeError, match="outputs='logits'"):
        input_jacobians(lambda z: ModelOutput(lin(z)), x, select.all())
    with pytest.raises(ValueError, match=r"outputs='logit'.*no key 'logit'; keys: \['logits'\]"):
        input_jacobians(lambda z: {"logits": lin(z)}, x, select.all(), outputs="logit")
    with pytest.raises(ValueError, match="outputs='logit'.*no key or attribute"):
        input_jacobians(lambda z: ModelOutput(lin(z)), x, select.all(), outputs="logit")
    with pytest.raises(ValueError, match="outputs=3 is out of range.*tuple of 2"):
        input_jacobians(lambda z: (lin(z), z), x, select.all(), outputs=3)
    with pytest.raises(TypeError, match="outputs=0 indexes a tuple/list, but the model returned dict"):
        input_jacobians(lambda z: {"logits": lin(z)}, x, select.all(), outputs=0)
    with pytest.raises(TypeError, match="outputs=1 gave NoneType"):
        input_jacobians(lambda z: (lin(z), None), x, select.all(), outputs=1)
    with pytest.raises(TypeError, match="outputs must be None, a str"):
        ModelCall(lin, outputs=2.0)


def test_inputs_forms_and_errors():
    model, x, mask, _ = make(4)
    ref = input_jacobians(model, {"inputs_embeds": x, "attention_mask": mask}, select.topk(1), outputs="logits",
                          inputs="inputs_embeds", strategy="loop")[1]
    got = input_jacobians(model, [x, mask], select.topk(1), outputs="logits", inputs=0, strategy="loop")[1]
    torch.testing.assert_close(got, ref)
    with pytest.raises(TypeError, match=r"x\['attention_mask'\] \(inputs='attention_mask'\) must have a floating dtype"):
        input_jacobians(model, {"inputs_embeds": x, "attention_mask": mask}, select.topk(1), outputs="logits",
                        inputs="attention_mask")
    with pytest.raises(ValueError, match=r"inputs='embeds': the model \(SeqModel\) takes no argument named 'embeds'; "
                                         r"it takes \['inputs_embeds', 'attention_mask'\]"):
        input_jacobians(model, {"embeds": x, "mask": mask}, select.topk(1), outputs="logits", inputs="embeds")
    with pytest.raises(ValueError, match=r"inputs='inputs_embeds' is not a key of x"):
        input_jacobians(model, {"attention_mask": mask}, select.topk(1), outputs="logits", inputs="inputs_embeds")
    with pytest.raises(ValueError, match="say which entry is differentiated with inputs=<key>"):
        input_jacobians(model, {"inputs_embeds": x}, select.topk(1), outputs="logits")
    with pytest.raises(ValueError, match="inputs=2 is out of range for x, a tuple of 2"):
        input_jacobians(model, (x, mask), select.topk(1), outputs="logits", inputs=2)
    with pytest.raises(TypeError, match=r"x\[1\] \(inputs=1\) must have a floating dtype"):
        input_jacobians(model, (x, mask), select.topk(1), outputs="logits", inputs=1)
    with pytest.raises(ValueError, match="inputs=0 picks an entry of a tuple or dict x, but x is a Tensor"):
        input_jacobians(lambda z: model(z)["logits"], x, select.topk(1), inputs=0)


def test_sequence_bad_input():
    model, x, mask, _ = make(5)
    f = lambda z: model(z)["logits"]  # noqa: E731
    with pytest.raises(ValueError, match=r"positions must be a bool mask of shape \(B, L\) = \(3, 5\).*got \(3, 4\)"):
        input_jacobians(f, x, select.topk(1), positions=torch.ones(B, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"positions out of range: .* L = 5 positions, got values in \[0, 5\]"):
        input_jacobians(f, x, select.topk(1), positions=torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="m = 6 is more than the L = 5"):
        input_jacobians(f, x, select.topk(1), positions=select.sample(6))
    with pytest.raises(ValueError, match="k must satisfy 1 <= k <= C = 7"):
        input_jacobians(f, x, select.topk(8))
    with pytest.raises(ValueError, match=r"target must be a \(B, L\) = \(3, 5\) tensor"):
        input_jacobians(f, x, select.target(torch.zeros(B, dtype=torch.long)))
    with pytest.raises(ValueError, match="target out of range.*got 7"):
        input_jacobians(f, x, select.target(torch.full((B, L), 7)))
    with pytest.raises(ValueError, match=r"logits given to select.topk have shape \(3, 5, 6\)"):
        input_jacobians(f, x, select.topk(1, logits=torch.zeros(B, L, 6)))
    with pytest.raises(ValueError, match="positions= selects positions of sequence outputs"):
        input_jacobians(nn.Linear(E, C).double(), x[:, 0], select.topk(1), positions=mask.bool())


def test_every_position_ignored_gives_zero_rows_and_zero_loss():
    from jacfast import jacobian_matching_loss

    model, x, mask, _ = make(6)
    f = lambda z: model(z)["logits"]  # noqa: E731
    y = torch.full((B, L), -100)
    _, jac, idx = input_jacobians(f, x, select.target(y), strategy="loop")
    assert jac.abs().max() == 0 and (idx == -1).all()
    _, jac2, _ = input_jacobians(f, x, select.topk(2), positions=torch.zeros(B, L, dtype=torch.bool), strategy="batched")
    assert jac2.shape == (B, 2, L, E) and jac2.abs().max() == 0  # P = 1 padding position, zero rows
    for kind in ("normalized", "squared"):
        loss = jacobian_matching_loss(jac, jac.clone(), kind=kind, backend="torch")
        assert loss.item() == 0.0
