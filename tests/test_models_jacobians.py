"""Jacobian rows of the user-style models (jacfast.models) against float64 references built by
hand, one ``torch.autograd.grad`` per row: dict outputs, sequence outputs with positions,
embedding inputs with an attention mask, images with BatchNorm in both modes.

The reference of row k is d/dx sum_b logits[b, pos[b, k], cls[b, k]] (zero for rows marked
-1), which is each sample's own input gradient for models whose samples do not interact, and
the batch forward's (cross-sample terms included) for BatchNorm in training mode.
"""
import copy

import pytest
import torch

from jacfast.jacobians import input_jacobians
from jacfast.models import BasicBlockResNet, TransformerLM, TransformerTokenClassifier, ViTClassifier
from jacfast.selection import select
from models_reference import reference_rows, topk_per_position

STRATEGIES = ("loop", "batched", "auto")


def _lm_inputs(seed=0, B=3, L=7, E=10):
    torch.manual_seed(seed)
    e = torch.randn(B, L, E, dtype=torch.float64)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, 5:] = 0  # right padding
    mask[2, :2] = 0  # left padding
    return e, mask


def _lm(cls=TransformerLM, attention="math", seed=1, **kw):
    torch.manual_seed(seed)
    if cls is TransformerTokenClassifier:
        return cls(13, 5, dim=10, depth=2, heads=2, max_len=8, attention=attention, **kw).double().eval()
    return cls(13, dim=10, depth=2, heads=2, max_len=8, attention=attention, **kw).double().eval()


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("cls,attention", [(TransformerLM, "math"), (TransformerLM, "sdpa"),
                                           (TransformerTokenClassifier, "sdpa")])
def test_transformer_topk_at_positions(cls, attention, strategy):
    """inputs_embeds differentiated, attention_mask passed through, dict output, topk(2) at the
    positions given as an integer tensor (B, P)."""
    m = _lm(cls, attention)
    e, mask = _lm_inputs()
    pos = torch.tensor([[0, 3, 6], [1, 2, 4], [2, 5, 6]])
    x = {"inputs_embeds": e, "attention_mask": mask}
    logits, jac, idx = input_jacobians(m, x, select.topk(2), outputs="logits", inputs="inputs_embeds",
                                       positions=pos, strategy=strategy)
    ref_logits = m(inputs_embeds=e, attention_mask=mask).logits
    want_idx = topk_per_position(ref_logits, pos, 2)
    assert jac.shape == (3, 6, 7, 10) and jac.dtype == torch.float64
    torch.testing.assert_close(logits, ref_logits, rtol=1e-12, atol=1e-12)
    assert torch.equal(idx, want_idx)
    ref = reference_rows(lambda xe: m(inputs_embeds=xe, attention_mask=mask).logits, e, want_idx)
    torch.testing.assert_close(jac, ref, rtol=1e-9, atol=1e-12)
    if cls is TransformerLM:  # causal: position p's rows are zero after p
        for k in range(6):
            p = pos[:, k // 2]
            for b in range(3):
                assert (jac[b, k, p[b] + 1:] == 0).all() and jac[b, k, : p[b] + 1].abs().sum() > 0
    # padded keys get zero rows: row of sample 1 (padded from 5) never depends on positions 5, 6
    # except through the padded queries themselves
    assert (jac[1, :4, 5:] == 0).all()


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_lm_target_rows_with_ignore_index(strategy):
    """select.target(y, ignore_index=-100) at every position: ignored positions give zero rows."""
    m = _lm()
    e, mask = _lm_inputs(seed=2)
    y = torch.randint(0, 13, (3, 7))
    y[mask == 0] = -100
    y[0, 3] = -100
    _, jac, idx = input_jacobians(m, {"inputs_embeds": e, "attention_mask": mask},
                                  select.target(y, ignore_index=-100), outputs="logits", inputs="inputs_embeds",
                                  strategy=strategy)
    want = torch.where(y >= 0, torch.arange(7) * 13 + y, -1)
    assert torch.equal(idx, want)
    ref = reference_rows(lambda xe: m(inputs_embeds=xe, attention_mask=mask).logits, e, want)
    torch.testing.assert_close(jac, ref, rtol=1e-9, atol=1e-12)
    assert (jac[y < 0] == 0).all() and (jac.flatten(2).abs().sum(2)[y >= 0] > 0).all()


def test_lm_sampled_positions_all_outputs():
    """select.all() at m = 2 sampled positions: K' = 2 * 13 rows, positions distinct per sample,
    the draw seeded (the same for a fresh selection with the same seed) and new on the next call."""
    m = _lm(TransformerLM, "sdpa")
    e, mask = _lm_inputs(seed=3)
    x = {"inputs_embeds": e, "attention_mask": mask}
    sampler = select.sample(2, seed=5)
    _, jac, idx = input_jacobians(m, x, select.all(), outputs="logits", inputs="inputs_embeds", positions=sampler)
    _, _, idx_again = input_jacobians(m, x, select.all(), outputs="logits", inputs="inputs_embeds",
                                      positions=select.sample(2, seed=5))
    assert jac.shape == (3, 26, 7, 10) and torch.equal(idx, idx_again)
    pos = idx.view(3, 2, 13) // 13
    assert (pos == pos[:, :, :1]).all() and (pos[:, 0, 0] != pos[:, 1, 0]).all()
    assert torch.equal(idx.view(3, 2, 13) % 13, torch.arange(13).expand(3, 2, 13))
    ref = reference_rows(lambda xe: m(inputs_embeds=xe, attention_mask=mask).logits, e, idx)
    torch.testing.assert_close(jac, ref, rtol=1e-9, atol=1e-12)
    draws = {tuple(input_jacobians(m, x, select.all(), outputs="logits", inputs="inputs_embeds",
                                   positions=sampler)[2][:, ::13].flatten().tolist()) for _ in range(4)}
    assert len(draws) > 1  # the counter advances: not the same positions on every call


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_lm_mask_positions(strategy):
    """positions = the attention mask (B, L) bool: P = the largest count, shorter samples padded
    with zero rows."""
    m = _lm(TransformerLM, "sdpa")
    e, mask = _lm_inputs(seed=4)
    _, jac, idx = input_jacobians(m, {"inputs_embeds": e, "attention_mask": mask}, select.topk(1), outputs="logits",
                                  inputs="inputs_embeds", positions=mask.bool(), strategy=strategy)
    logits = m(inputs_embeds=e, attention_mask=mask).logits
    assert idx.shape == (3, 7)
    for b in range(3):
        n = int(mask[b].sum())
        pos = mask[b].nonzero()[:, 0]
        want = topk_per_position(logits[b:b + 1], pos[None], 1)[0]
        assert torch.equal(idx[b, :n], want) and (idx[b, n:] == -1).all()
    ref = reference_rows(lambda xe: m(inputs_embeds=xe, attention_mask=mask).logits, e, idx)
    torch.testing.assert_close(jac, ref, rtol=1e-9, atol=1e-12)


def test_lm_input_ids_refused_as_differentiated_input():
    m = _lm()
    ids = torch.randint(0, 13, (2, 5))
    with pytest.raises(TypeError, match="inputs"):
        input_jacobians(m, {"input_ids": ids}, select.topk(1), outputs="logits", inputs="input_ids")


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_vit_class_token_and_per_patch(strategy):
    torch.manual_seed(6)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    vit = ViTClassifier(image_size=8, patch_size=4, num_classes=6, dim=8, heads=2).double().eval()
    _, jac, idx = input_jacobians(vit, x, select.topk(3), strategy=strategy)
    want = torch.sort(vit(x), dim=1, descending=True, stable=True).indices[:, :3]
    assert torch.equal(idx, want) and jac.shape == (2, 3, 3, 8, 8)
    torch.testing.assert_close(jac, reference_rows(vit, x, want), rtol=1e-9, atol=1e-12)
    per = ViTClassifier(image_size=8, patch_size=4, num_classes=6, dim=8, heads=2, per_patch=True).double().eval()
    per.load_state_dict(vit.state_dict())
    pos = torch.tensor([[0, 3], [2, 1]])
    _, jac, idx = input_jacobians(per, x, select.topk(2), positions=pos, strategy=strategy)
    want = topk_per_position(per(x), pos, 2)
    assert torch.equal(idx, want) and jac.shape == (2, 4, 3, 8, 8)
    torch.testing.assert_close(jac, reference_rows(per, x, want), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("strategy", ("loop", "batched", "replicate", "auto"))
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_resnet_basic_blocks(train, strategy):
    """BatchNorm in eval mode (per-sample rows) and training mode (the batch forward's rows;
    running statistics updated as by one plain forward), in-place ReLU."""
    torch.manual_seed(7)
    m = BasicBlockResNet((1, 1), width=4, in_channels=2, num_classes=5).double().train(train)
    x = torch.randn(4, 2, 6, 6, dtype=torch.float64)
    plain = copy.deepcopy(m)
    ref_model = copy.deepcopy(m)
    logits, jac, idx = input_jacobians(m, x, select.topk(2), strategy=strategy)
    want_logits = plain(x)  # also moves plain's running statistics once
    want = torch.sort(want_logits, dim=1, descending=True, stable=True).indices[:, :2]
    assert torch.equal(idx, want)
    torch.testing.assert_close(logits, want_logits, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(jac, reference_rows(ref_model, x, want), rtol=1e-9, atol=1e-12)
    for a, b in zip(m.buffers(), plain.buffers()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
    if train:  # cross-sample terms: perturbing sample 1 changes sample 0's logits
        x2 = x.clone()
        x2[1] += 1.0
        assert (copy.deepcopy(ref_model)(x2)[0] - copy.deepcopy(ref_model)(x)[0]).abs().max() > 1e-6
