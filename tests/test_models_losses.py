"""DistillationLoss on the user-style models, every estimator, against float64 references built by
hand (per-row ``torch.autograd.grad``, then ``jacfast.reference``'s loss, double backward for
the parameter gradient): a causal LM teacher and a narrower student on the teacher's embedding
table (inputs_embeds with an attention mask, dict outputs, positions), and the ResNet.

Exact: the student's attention written out (``attention="math"``), twice differentiable, and
on SDPA (the loss runs create_graph forwards on SDPA's math kernel).
Finite differences (central and forward): the student on ``F.scaled_dot_product_attention``,
where the exact estimator would need SDPA's double backward; the reference is the same
weights with the math attention. Tolerances: the estimator's truncation and round-off in
float64 (GELU networks: central ~1e-8 relative, forward ~1e-7; see finite_difference.py).
"""
import copy

import pytest
import torch

from jacfast import reference
from jacfast.losses import DistillationLoss
from jacfast.models import BasicBlockResNet, TransformerLM
from jacfast.selection import select
from models_reference import reference_rows, topk_per_position

CASES = [("exact", "central", "math", 1e-9), ("exact", "central", "sdpa", 1e-9), ("finite_difference", "central", "sdpa", 1e-6),
         ("finite_difference", "forward", "sdpa", 1e-5)]


def _grad(value, params):
    """Parameter gradients, zero for parameters the Jacobian term does not reach (output biases)."""
    return torch.autograd.grad(value, params, allow_unused=True, materialize_grads=True)


def _assert_grads_close(grads, want, rtol):
    """Each parameter's gradient within rtol of the reference, relative to the largest entry of
    all of them (a parameter the term barely reaches, e.g. a bias behind BatchNorm, has a
    reference of ~0 that a difference estimate meets only to its absolute accuracy)."""
    assert len(grads) == len(want)
    scale = max(w.abs().max().item() for w in want)
    for g, w in zip(grads, want):
        torch.testing.assert_close(g, w, rtol=rtol, atol=rtol * scale)


def _pair(student_attention):
    torch.manual_seed(0)
    teacher = TransformerLM(13, dim=10, depth=2, heads=2, max_len=8).double().eval().requires_grad_(False)
    student = TransformerLM(13, dim=6, depth=1, heads=2, max_len=8, input_dim=10,
                            attention=student_attention).double().train()
    student.embed.load_state_dict(teacher.embed.state_dict())
    student.embed.requires_grad_(False)
    return teacher, student


def _batch(seed=1):
    torch.manual_seed(seed)
    ids = torch.randint(0, 13, (3, 7))
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, 5:] = 0
    mask[2, :1] = 0
    return ids, mask


def _math_copy(student):
    ref = TransformerLM(13, dim=6, depth=1, heads=2, max_len=8, input_dim=10, attention="math").double().train()
    ref.load_state_dict(student.state_dict())
    ref.embed.requires_grad_(False)
    return ref


@pytest.mark.parametrize("estimator,scheme,attention,rtol", CASES)
def test_lm_jacobian_term_and_gradient(estimator, scheme, attention, rtol):
    teacher, student = _pair(attention)
    ids, mask = _batch()
    e = teacher.embed(ids)
    pos = torch.tensor([[1, 4, 6], [0, 2, 3], [3, 5, 6]])
    loss = DistillationLoss(teacher, ce_weight=0.0, kd_weight=0.0, beta=1.0, k=2, estimator=estimator,
                            fd_scheme=scheme, outputs="logits", inputs="inputs_embeds", positions=pos)
    ref_student = _math_copy(student)
    params = [p for p in student.parameters() if p.requires_grad]
    out = loss(student, {"inputs_embeds": e, "attention_mask": mask})
    grads = _grad(out.total, params)

    t_logits = teacher(inputs_embeds=e, attention_mask=mask).logits
    idx = topk_per_position(t_logits, pos, 2)
    t_rows = reference_rows(lambda x: teacher(inputs_embeds=x, attention_mask=mask).logits, e, idx)
    s_rows = reference_rows(lambda x: ref_student(inputs_embeds=x, attention_mask=mask).logits, e, idx,
                            create_graph=True)
    want = reference.jacobian_matching_loss(s_rows, t_rows, kind="normalized")
    want_grads = _grad(want, [p for p in ref_student.parameters() if p.requires_grad])
    torch.testing.assert_close(out.jacobian, want.detach(), rtol=1e-10, atol=0)
    torch.testing.assert_close(out.total, want.detach(), rtol=1e-10, atol=0)
    _assert_grads_close(grads, want_grads, rtol)


@pytest.mark.parametrize("estimator,scheme,attention,rtol", CASES)
def test_lm_sampled_positions_same_for_teacher_and_student(estimator, scheme, attention, rtol):
    """positions=select.sample(m, seed): the loss equals the reference at the positions that the
    same seeded draw gives input_jacobians (the first draw of a fresh sampler)."""
    from jacfast.jacobians import input_jacobians

    teacher, student = _pair(attention)
    ids, mask = _batch(seed=2)
    e = teacher.embed(ids)
    loss = DistillationLoss(teacher, ce_weight=0.0, kd_weight=0.0, k=1, estimator=estimator, fd_scheme=scheme,
                            outputs="logits", inputs="inputs_embeds", positions=select.sample(3, seed=4))
    out = loss(student, {"inputs_embeds": e, "attention_mask": mask})
    _, t_rows, idx = input_jacobians(teacher, {"inputs_embeds": e, "attention_mask": mask}, select.topk(1),
                                     outputs="logits", inputs="inputs_embeds", positions=select.sample(3, seed=4))
    ref_student = _math_copy(student)
    s_rows = reference_rows(lambda x: ref_student(inputs_embeds=x, attention_mask=mask).logits, e, idx)
    want = reference.jacobian_matching_loss(s_rows, t_rows, kind="normalized")
    torch.testing.assert_close(out.jacobian.detach(), want, rtol=1e-10, atol=0)


def test_lm_kd_and_ce_per_position_with_ignore_index():
    """CE over the (B, L) targets with ignore_index -100 and KD per position, next to the rows."""
    teacher, student = _pair("sdpa")
    ids, mask = _batch(seed=3)
    e = teacher.embed(ids)
    y = torch.randint(0, 13, (3, 7))
    y[mask == 0] = -100
    loss = DistillationLoss(teacher, beta=1.0, k=1, estimator="finite_difference", temperature=2.0,
                            outputs="logits", inputs="inputs_embeds", positions=mask.bool())
    out = loss(student, {"inputs_embeds": e, "attention_mask": mask}, y)
    s = student(inputs_embeds=e, attention_mask=mask).logits
    t = teacher(inputs_embeds=e, attention_mask=mask).logits
    ce = torch.nn.functional.cross_entropy(s.flatten(0, 1), y.flatten(), ignore_index=-100)
    torch.testing.assert_close(out.ce, ce, rtol=1e-10, atol=0)
    assert out.kd.item() > 0 and out.jacobian.item() > 0 and torch.isfinite(out.total)


@pytest.mark.parametrize("estimator,scheme,rtol", [("exact", "central", 1e-9), ("finite_difference", "central", 1e-6),
                                                    ("finite_difference", "forward", 1e-5)])
def test_resnet_eval_teacher_and_student(estimator, scheme, rtol):
    """BasicBlockResNet teacher (eval) and student (eval: per-sample rows), image input; the
    ReLU student has kinks, so the finite differences are compared where no unit crosses one:
    at these tiny steps in float64 (checked by the exact agreement)."""
    torch.manual_seed(5)
    teacher = BasicBlockResNet((1, 1), width=4, in_channels=2, num_classes=5).double().eval().requires_grad_(False)
    student = BasicBlockResNet((1,), width=3, in_channels=2, num_classes=5).double().eval()
    x = torch.randn(3, 2, 6, 6, dtype=torch.float64)
    ref_student = copy.deepcopy(student)
    loss = DistillationLoss(teacher, ce_weight=0.0, kd_weight=0.0, k=2, estimator=estimator, fd_scheme=scheme)
    if estimator == "finite_difference":
        with pytest.warns(UserWarning, match="network with ReLU"):
            out = loss(student, x)
    else:
        out = loss(student, x)
    grads = _grad(out.total, list(student.parameters()))
    idx = torch.sort(teacher(x), dim=1, descending=True, stable=True).indices[:, :2]
    want = reference.jacobian_matching_loss(reference_rows(ref_student, x, idx, create_graph=True),
                                            reference_rows(teacher, x, idx), kind="normalized")
    want_grads = _grad(want, list(ref_student.parameters()))
    torch.testing.assert_close(out.jacobian.detach(), want.detach(), rtol=1e-10, atol=0)
    _assert_grads_close(grads, want_grads, rtol)
