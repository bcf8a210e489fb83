"""The user-style models of jacfast.models on their own: shapes, masks, causality, BatchNorm modes."""
import pytest
import torch

from jacfast.models import (BasicBlock, BasicBlockResNet, LeNetStudent, ModelOutput, ResNetStudent,
                            TransformerLM, TransformerTokenClassifier, VGGTeacher, ViTClassifier, build_model)


def _lm(cls=TransformerLM, **kw):
    torch.manual_seed(0)
    args = dict(vocab_size=11, dim=12, depth=2, heads=3, max_len=9)
    if cls is TransformerTokenClassifier:
        args["num_labels"] = 5
    return cls(**{**args, **kw}).double()


def test_old_names_still_importable():
    import jacfast
    assert jacfast.models.VGGTeacher is VGGTeacher and build_model("lenet").__class__ is LeNetStudent
    assert isinstance(build_model("resnet", width=4), ResNetStudent)


def test_model_output_item_and_attribute():
    out = ModelOutput(logits=torch.ones(2))
    assert out.logits is out["logits"] and out.to_tuple()[0] is out.logits
    with pytest.raises(AttributeError, match="no field 'loss'"):
        out.loss


@pytest.mark.parametrize("cls", [TransformerLM, TransformerTokenClassifier])
def test_transformer_shapes_and_ids_equal_embeddings(cls):
    m = _lm(cls)
    ids = torch.randint(0, 11, (3, 7))
    out = m(ids)
    v = 11 if cls is TransformerLM else 5
    assert isinstance(out, ModelOutput) and out.logits.shape == (3, 7, v)
    torch.testing.assert_close(m(inputs_embeds=m.embed(ids)).logits, out.logits, rtol=0, atol=0)
    assert m.get_input_embeddings() is m.embed and m.embed(ids).shape == (3, 7, 12)


def test_transformer_bad_input():
    m = _lm()
    ids = torch.randint(0, 11, (2, 4))
    with pytest.raises(ValueError, match="exactly one of input_ids"):
        m(ids, inputs_embeds=m.embed(ids))
    with pytest.raises(ValueError, match="exactly one of input_ids"):
        m()
    with pytest.raises(ValueError, match=r"inputs_embeds must have shape \(B, L, 12\), got \(2, 4, 5\)"):
        m(inputs_embeds=torch.randn(2, 4, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"attention_mask must have shape \(B, L\) = \(2, 4\).*\(2, 5\)"):
        m(ids, torch.ones(2, 5))
    with pytest.raises(ValueError, match="exceeds max_len=9"):
        m(torch.zeros(1, 10, dtype=torch.long))
    with pytest.raises(ValueError, match="input_ids must be an integer tensor"):
        m(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="multiple of heads"):
        TransformerLM(10, dim=10, heads=3)
    with pytest.raises(ValueError, match="attention must be one of"):
        TransformerLM(10, dim=8, heads=2, attention="flash")


def _change_at(m, e, j, mask=None):
    """|logits(e) - logits(e with position j perturbed)| per position, (B, L)."""
    e2 = e.clone()
    e2[:, j] += torch.randn_like(e2[:, j])
    with torch.no_grad():
        return (m(inputs_embeds=e2, attention_mask=mask).logits - m(inputs_embeds=e, attention_mask=mask).logits
                ).abs().amax(-1)


@pytest.mark.parametrize("attention", ["sdpa", "math"])
def test_lm_is_causal_classifier_is_not(attention):
    torch.manual_seed(1)
    e = torch.randn(2, 7, 12, dtype=torch.float64)
    lm, tc = _lm(attention=attention), _lm(TransformerTokenClassifier, attention=attention)
    for j in (0, 3, 6):
        d = _change_at(lm, e, j)
        assert (d[:, :j] == 0).all() and (d[:, j:] > 1e-6).all()
        assert (_change_at(tc, e, j) > 1e-6).all()


@pytest.mark.parametrize("cls", [TransformerLM, TransformerTokenClassifier])
@pytest.mark.parametrize("attention", ["sdpa", "math"])
def test_padding_is_invisible_and_finite(cls, attention):
    """Padded keys change no unpadded position's logits; left padding (a query with no
    unpadded key at or before it) gives finite logits."""
    torch.manual_seed(2)
    m = _lm(cls, attention=attention)
    e = torch.randn(3, 7, 12, dtype=torch.float64)
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[0, 5:] = 0  # right padding
    mask[1, :2] = 0  # left padding
    mask[2, 3] = 0   # a hole
    out = m(inputs_embeds=e, attention_mask=mask).logits
    assert out.isfinite().all()
    for b, j in ((0, 5), (0, 6), (1, 0), (1, 1), (2, 3)):
        d = _change_at(m, e, j, mask)
        keep = mask[b].bool().clone()
        assert (d[b][keep] == 0).all(), (b, j)
    # a bool mask, and an all-ones mask, are the same as an integer one / none
    torch.testing.assert_close(m(inputs_embeds=e, attention_mask=mask.bool()).logits, out, rtol=0, atol=0)
    torch.testing.assert_close(m(inputs_embeds=e, attention_mask=torch.ones(3, 7)).logits,
                               m(inputs_embeds=e).logits, rtol=1e-12, atol=1e-12)


def test_sdpa_and_math_attention_agree():
    torch.manual_seed(3)
    a = _lm(attention="sdpa")
    b = _lm(attention="math")
    b.load_state_dict(a.state_dict())
    e = torch.randn(2, 8, 12, dtype=torch.float64)
    mask = torch.tensor([[1] * 8, [0, 0] + [1] * 6])
    torch.testing.assert_close(a(inputs_embeds=e, attention_mask=mask).logits,
                               b(inputs_embeds=e, attention_mask=mask).logits, rtol=1e-10, atol=1e-12)


def test_math_attention_is_twice_differentiable():
    """The exact estimator's need: d/dparams of an input gradient."""
    m = _lm(attention="math")
    e = torch.randn(2, 5, 12, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(m(inputs_embeds=e).logits[:, -1, 0].sum(), e, create_graph=True)
    (gw,) = torch.autograd.grad(g.square().sum(), m.blocks[0].attn.qkv.weight)
    assert gw.abs().sum() > 0


def test_vit_shapes_and_per_patch():
    torch.manual_seed(4)
    x = torch.randn(2, 3, 12, 12)
    v = ViTClassifier(image_size=12, patch_size=4, num_classes=7)
    p = ViTClassifier(image_size=12, patch_size=4, num_classes=7, per_patch=True)
    p.load_state_dict(v.state_dict())
    assert v(x).shape == (2, 7) and p(x).shape == (2, 9, 7) and p.num_patches == 9
    # patch 0's logits see every patch (bidirectional attention)
    x2 = x.clone()
    x2[:, :, 8:, 8:] += 1.0
    assert ((p(x2) - p(x)).abs()[:, 0] > 0).all()
    with pytest.raises(ValueError, match=r"x must have shape \(B, 3, 12, 12\), got \(2, 3, 8, 8\)"):
        v(torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match="multiple of patch_size"):
        ViTClassifier(image_size=10, patch_size=4)


def test_resnet_shapes_inplace_relu_and_layout():
    m = BasicBlockResNet((2, 1, 1), width=4, in_channels=3, num_classes=6)
    assert m(torch.randn(2, 3, 9, 9)).shape == (2, 6)
    blocks = [b for b in m.modules() if isinstance(b, BasicBlock)]
    assert len(blocks) == 4 and all(b.relu.inplace for b in blocks)
    assert blocks[0].downsample is None and blocks[2].downsample is not None and blocks[2].stride == 2
    with pytest.raises(ValueError, match=r"x must have shape \(B, 3, H, W\), got \(2, 1, 9, 9\)"):
        m(torch.randn(2, 1, 9, 9))
    with pytest.raises(ValueError, match="layers must be"):
        BasicBlockResNet(())


def test_resnet_batchnorm_modes():
    """Train mode: a sample's logits depend on the other samples (batch statistics) and the
    running statistics move; eval mode: samples are independent and nothing moves."""
    torch.manual_seed(5)
    m = BasicBlockResNet((1, 1), width=4).double()
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    x2 = x.clone()
    x2[1:] += torch.randn_like(x2[1:])
    before = m.bn1.running_mean.clone()
    m.train()
    assert (m(x)[0] - m(x2)[0]).abs().max() > 1e-6
    assert not torch.equal(m.bn1.running_mean, before)
    m.eval()
    stats = m.bn1.running_mean.clone()
    torch.testing.assert_close(m(x)[0], m(x2)[0], rtol=0, atol=0)
    torch.testing.assert_close(m(x[:1]), m(x)[:1], rtol=1e-12, atol=1e-12)
    assert torch.equal(m.bn1.running_mean, stats)


def test_old_cnn_families_unchanged():
    for cls in (VGGTeacher, ResNetStudent, LeNetStudent):
        assert cls(width=2)(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_lm_input_dim_takes_a_wider_embedding():
    """A student with its teacher's (wider) embedding table: inputs_embeds (B, L, input_dim)."""
    teacher = _lm(dim=12)
    student = _lm(dim=6, heads=2, input_dim=12)
    student.embed.load_state_dict(teacher.embed.state_dict())
    ids = torch.randint(0, 11, (2, 5))
    e = teacher.embed(ids)
    assert student.embed.weight.shape == (11, 12) and student.in_proj.weight.shape == (6, 12)
    torch.testing.assert_close(student(inputs_embeds=e).logits, student(ids).logits, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"inputs_embeds must have shape \(B, L, 12\)"):
        student(inputs_embeds=torch.randn(2, 5, 6, dtype=torch.float64))
