"""DistillationLoss with models as users write them (issue 23): dict inputs and outputs, sequence
outputs with positions, an input adapter, random projections, compiled students, autocast, a
teacher cache of a sequence teacher. References: float64, per-row torch.autograd.grad by hand."""
import torch
import torch.nn.functional as F
import pytest
from torch import nn

from jacfast import DistillationLoss, TeacherCache, jacobian_penalty, select
from jacfast.reference import row_losses

B, L, C, E = 3, 5, 7, 6


class Seq(nn.Module):
    """inputs_embeds (B, L, E), attention_mask (B, L) int -> {"logits": (B, L, C)} (positions interact)."""

    def __init__(self, width, seed, emb=E, tuple_out=False):
        super().__init__()
        torch.manual_seed(seed)
        self.inp, self.out, self.tuple_out = nn.Linear(emb, width), nn.Linear(2 * width, C), tuple_out

    def forward(self, inputs_embeds, attention_mask):
        h = torch.tanh(self.inp(inputs_embeds))
        m = attention_mask.to(h.dtype)
        ctx = (h * m[..., None]).cumsum(1) / m.cumsum(1).clamp_min(1)[..., None]
        logits = self.out(torch.cat([h, ctx], -1))
        return (logits, h) if self.tuple_out else {"logits": logits}


def data(seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, L, E, generator=gen, dtype=dtype)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, 3:] = 0
    y = torch.randint(0, C, (B, L), generator=gen)
    y[mask == 0] = -100
    return x, mask, y


def rows_ref(f, x, flat, create_graph=False):
    """(B, K', L, E): row (b, r) = d f(x_b)[flat // C, flat % C] / d x_b, 0 where flat < 0."""
    out = []
    for b in range(B):
        xb = x[b : b + 1].detach().requires_grad_(True)
        ob = f(xb, b)[0]
        rb = []
        for r in range(flat.shape[1]):
            i = int(flat[b, r])
            if i < 0:
                rb.append(torch.zeros(x.shape[1:], dtype=x.dtype))
            else:
                (g,) = torch.autograd.grad(ob[i // C, i % C], xb, create_graph=create_graph, retain_graph=True)
                rb.append(g[0])
        out.append(torch.stack(rb))
    return torch.stack(out)


def reference_total(teacher, student, x, mask, y, flat, T=4.0, beta=1.0, adapter=None):
    t_fn = lambda xb, b: teacher(xb if adapter is None else adapter(xb), mask[b : b + 1])  # noqa: E731
    s_fn = lambda xb, b: student(xb, mask[b : b + 1])["logits"]  # noqa: E731
    t_logits = teacher(x if adapter is None else adapter(x), mask)
    t_logits = t_logits[0] if isinstance(t_logits, tuple) else t_logits["logits"]
    J_t = rows_ref(lambda xb, b: (lambda o: o[0] if isinstance(o, tuple) else o["logits"])(t_fn(xb, b)), x, flat)
    J_s = rows_ref(s_fn, x, flat, create_graph=True)
    jac = row_losses(J_s, J_t, kind="normalized").sum() / B
    s_logits = student(x, mask)["logits"]
    valid = y != -100
    ce = F.cross_entropy(s_logits[valid], y[valid])
    kl = F.kl_div(F.log_softmax(s_logits / T, -1), F.log_softmax(t_logits.detach() / T, -1), reduction="none",
                  log_target=True).sum(-1)
    m = mask.bool()
    kd = kl[m].mean() * T * T
    return ce + kd + beta * jac, jac


def test_sequence_dict_model_exact_matches_reference():
    x, mask, y = data(1)
    teacher, student = Seq(8, 0).double(), Seq(4, 1).double()
    loss = DistillationLoss(teacher, k=2, outputs="logits", inputs="inputs_embeds", positions=mask.bool(),
                            strategy="batched", backend="torch")
    out = loss(student, {"inputs_embeds": x, "attention_mask": mask}, y)
    t_logits = teacher(x, mask)["logits"]
    pos = torch.tensor([[0, 1, 2, 3, 4], [0, 1, 2, 0, 0], [0, 1, 2, 3, 4]])
    cls = torch.sort(t_logits.detach().gather(1, pos[..., None].expand(-1, -1, C)), dim=-1, descending=True,
                     stable=True).indices[..., :2]
    valid = torch.tensor([[1] * 5, [1, 1, 1, 0, 0], [1] * 5]).bool()
    flat = torch.where(valid[..., None], pos[..., None] * C + cls, -1).reshape(B, -1)
    total, jac = reference_total(teacher, student, x, mask, y, flat)
    torch.testing.assert_close(out.jacobian, jac, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.total, total, rtol=1e-10, atol=1e-12)
    got = torch.autograd.grad(out.total, list(student.parameters()))
    want = torch.autograd.grad(total, list(student.parameters()))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("scheme", ["central", "forward"])
def test_sequence_finite_difference_matches_exact_gradient(scheme):
    x, mask, y = data(2)
    teacher, student = Seq(8, 0, tuple_out=True).double(), Seq(4, 1).double()
    xin = {"inputs_embeds": x, "attention_mask": mask}
    kw = dict(k=1, outputs="logits", teacher_outputs=0, inputs="inputs_embeds", ce_weight=0.0, kd_weight=0.0,
              backend="torch", strategy="loop")
    exact = DistillationLoss(teacher, positions=select.sample(3, seed=1), **kw)(student, xin, y)
    g_exact = torch.cat([g.flatten() for g in torch.autograd.grad(exact.total, list(student.parameters()),
                                                                 materialize_grads=True)])
    fd = DistillationLoss(teacher, estimator="finite_difference", fd_scheme=scheme,  # the same first draw
                          positions=select.sample(3, seed=1), **kw)(student, xin, y)
    g_fd = torch.cat([g.flatten() for g in torch.autograd.grad(fd.total, list(student.parameters()),
                                                              materialize_grads=True)])
    torch.testing.assert_close(fd.jacobian, exact.jacobian, rtol=1e-12, atol=1e-14)  # same draw, same value
    # fp64 truncation: central O(step^2) ~ 1e-10, forward O(step) ~ 1e-7 relative (smooth tanh network)
    assert (g_fd - g_exact).norm() / g_exact.norm() < (1e-7 if scheme == "central" else 1e-5)


def test_every_position_ignored_is_zero_not_nan():
    x, mask, _ = data(3)
    teacher, student = Seq(8, 0).double(), Seq(4, 1).double()
    y = torch.full((B, L), -100)
    for est in ("exact", "finite_difference"):
        out = DistillationLoss(teacher, select="target", estimator=est, outputs="logits", inputs=0,
                               backend="torch", strategy="loop")(student, (x, mask), y)
        assert out.jacobian.item() == 0.0 and out.ce.item() == 0.0 and torch.isfinite(out.total)
        out.total.backward()
        assert all(torch.isfinite(p.grad).all() for p in student.parameters())


def test_input_adapter_and_projections():
    x, mask, y = data(4)
    adapter = nn.Linear(E, 9).double()  # the teacher embeds in 9 dims, the student in 6
    teacher, student = Seq(8, 0, emb=9).double(), Seq(4, 1).double()
    loss = DistillationLoss(teacher, k=1, outputs="logits", inputs="inputs_embeds", input_adapter=adapter,
                            positions=torch.tensor([0, 4]), backend="torch", strategy="loop")
    out = loss(student, {"inputs_embeds": x, "attention_mask": mask}, y)
    t_logits = teacher(adapter(x), mask)["logits"]
    pos = torch.tensor([[0, 4]] * B)
    cls = t_logits.detach().gather(1, pos[..., None].expand(-1, -1, C)).argmax(-1, keepdim=True)
    flat = (pos[..., None] * C + cls).reshape(B, -1)
    _, jac = reference_total(teacher, student, x, mask, y, flat, adapter=adapter)
    torch.testing.assert_close(out.jacobian, jac, rtol=1e-10, atol=1e-12)
    # Projections on flat outputs: teacher and student share the directions of the call.
    t2, s2 = nn.Sequential(nn.Linear(E, 9), nn.Tanh(), nn.Linear(9, C)).double(), nn.Linear(E, C).double()
    x2 = torch.randn(B, E, dtype=torch.float64)
    torch.manual_seed(7)
    got = DistillationLoss(t2, select="projections", k=3, backend="torch", strategy="loop", ce_weight=0)(s2, x2)
    torch.manual_seed(7)
    v = torch.randint(0, 2, (3, B, C)).to(torch.float64).mul_(2).sub_(1)

    def rows(f):  # row (b, k) = d <v[k, b], f(x_b)> / d x_b, sample b alone
        out = []
        for b in range(B):
            xb = x2[b : b + 1].clone().requires_grad_(True)
            ob = f(xb)[0]
            out.append(torch.stack([torch.autograd.grad((ob * v[k, b]).sum(), xb, retain_graph=True)[0][0]
                                    for k in range(3)]))
        return torch.stack(out)

    J_t, J_s = rows(t2), rows(s2)
    torch.testing.assert_close(got.jacobian, row_losses(J_s, J_t, kind="normalized").sum() / B, rtol=1e-10, atol=1e-12)


def test_shapes_that_disagree_are_named():
    x, mask, y = data(5)
    teacher = Seq(8, 0).double()
    xin = {"inputs_embeds": x, "attention_mask": mask}
    short = lambda inputs_embeds, attention_mask: {"logits": teacher(inputs_embeds, attention_mask)["logits"][:, :4]}  # noqa: E731,E501
    for est in ("exact", "finite_difference"):
        loss = DistillationLoss(short, outputs="logits", inputs="inputs_embeds", estimator=est, backend="torch",
                                strategy="loop")
        with pytest.raises(ValueError, match=r"\(B=3, L=4, C=7\)|\(3, 4, 7\)"):
            loss(Seq(4, 1).double(), xin, y)
    with pytest.raises(ValueError, match=r"target must be an integer tensor of shape \(B=3, L=5\)"):
        DistillationLoss(teacher, outputs="logits", inputs="inputs_embeds", backend="torch",
                         strategy="loop")(Seq(4, 1).double(), xin, y[:, :4])
    with pytest.raises(TypeError, match="input_adapter must be callable"):
        DistillationLoss(teacher, input_adapter=3)
    with pytest.raises(ValueError, match="select must be one of"):
        DistillationLoss(teacher, select="random")


def cnn(width, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.Tanh(), nn.Conv2d(width, width, 3, stride=2, padding=1),
                         nn.Tanh(), nn.Flatten(), nn.Linear(width * 16, 10)).to(dtype)


@pytest.mark.parametrize("estimator", ["exact", "finite_difference"])
def test_autocast_bf16_loss_close_to_float64(estimator):
    """bf16 autocast on the CPU: rows come back in float32 (x's dtype), the head runs in float32.
    bf16 keeps 8 significant bits (unit roundoff 2^-9 ~ 2e-3); through two convolutions and a
    linear layer the rows are within ~1e-2 relative, so the normalized loss (a squared
    difference of unit rows, here O(1)) is within ~3e-2 relative of the float64 one."""
    teacher, student = cnn(8, seed=0), cnn(4, seed=1)
    x = torch.randn(4, 3, 8, 8)
    y = torch.randint(0, 10, (4,))
    kw = dict(k=2, estimator=estimator, strategy="loop", ce_weight=0.0, kd_weight=0.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = DistillationLoss(teacher, **kw)(student, x, y)
    ref = DistillationLoss(cnn(8, torch.float64, 0), backend="torch", **kw)(cnn(4, torch.float64, 1), x.double(), y)
    assert out.jacobian.dtype == torch.float32
    assert abs(out.jacobian.item() / ref.jacobian.item() - 1) < 3e-2
    pen = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pen = jacobian_penalty(student, x, num_projections=None, estimator=estimator, strategy="loop")
    pen_ref = jacobian_penalty(cnn(4, torch.float64, 1), x.double(), num_projections=None, estimator=estimator,
                               strategy="loop", backend="torch")
    assert pen.dtype == torch.float32 and abs(pen.item() / pen_ref.item() - 1) < 3e-2


def test_compiled_student_with_every_estimator(monkeypatch):
    from torch._functorch import config

    # Donated buffers on (torch's default): after another compiled model ran in this process
    # (tests/test_jacobians_models.py first), the finite-difference rows failed with "compiled
    # with non-empty donated buffers ... retain_graph=False" under a scoped config.patch.
    monkeypatch.setattr(config, "donated_buffer", True)
    teacher = cnn(8, seed=0)
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,))
    for est in ("finite_difference", "noise"):
        kind = "squared" if est == "noise" else None
        eager = cnn(4, seed=1)
        compiled = torch.compile(cnn(4, seed=1), backend="aot_eager")
        torch.manual_seed(3)
        a = DistillationLoss(teacher, k=2, estimator=est, kind=kind, strategy="loop")(eager, x, y)
        torch.manual_seed(3)
        b = DistillationLoss(teacher, k=2, estimator=est, kind=kind, strategy="loop")(compiled, x, y)
        torch.testing.assert_close(b.total, a.total, rtol=1e-5, atol=1e-6)
        ga = torch.autograd.grad(a.total, list(eager.parameters()))
        gb = torch.autograd.grad(b.total, list(compiled.parameters()))
        for p, q in zip(ga, gb):
            torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-6)
    assert config.donated_buffer is False
    with pytest.raises(ValueError, match="estimator='finite_difference'"):
        DistillationLoss(teacher, strategy="loop")(torch.compile(cnn(4), backend="aot_eager"), x, y)


def test_teacher_cache_of_a_sequence_teacher(tmp_path):
    x, mask, y = data(6)
    teacher, student = Seq(8, 0).double(), Seq(4, 1).double()
    data_ = ({"inputs_embeds": x.float(), "attention_mask": mask}, y)
    cache = TeacherCache.build(str(tmp_path / "t.cache"), teacher.float(), data_, k=2, outputs="logits",
                               inputs="inputs_embeds", progress=False, strategy="loop")
    assert cache[[0]].logits.shape == (1, L, C) and cache[[0]].jac.shape == (1, L * 2, L, E)
    TeacherCache.open(str(tmp_path / "t.cache"), teacher, data_, k=2, outputs="logits", inputs="inputs_embeds")
    teacher.double()
    kw = dict(k=2, outputs="logits", inputs="inputs_embeds", backend="torch", strategy="loop")
    xin = {"inputs_embeds": x.float(), "attention_mask": mask}
    student.float()
    live = DistillationLoss(teacher.float(), **kw)(student, xin, y)
    cached = DistillationLoss(None, **kw)(student, xin, y, teacher_outputs=cache[torch.arange(B)])
    torch.testing.assert_close(cached.total, live.total, rtol=1e-6, atol=1e-7)
