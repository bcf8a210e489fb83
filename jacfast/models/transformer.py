"""Small transformers with the keyword interface of Hugging Face models, for sequence work.

- :class:`TransformerLM`: a causal (GPT-style, pre-norm) language model.
- :class:`TransformerTokenClassifier`: the same body, bidirectional, with a per-token head.

Both are called as ``model(input_ids=ids)`` or ``model(inputs_embeds=e, attention_mask=m)``
and return a :class:`ModelOutput` ``{"logits": (B, L, V)}`` (``out["logits"]`` and
``out.logits``). Token ids have no gradient: Jacobians are taken with respect to
``inputs_embeds`` (B, L, E), the token embeddings ``model.embed(input_ids)``; learned
position embeddings are added inside the model, as Hugging Face models do.

Attention runs on ``F.scaled_dot_product_attention`` (``attention="sdpa"``, the default).
Its fused CPU/CUDA kernels have no double backward, so the exact Jacobian-matching
estimator (which differentiates input gradients again) needs either the math kernel
(``torch.nn.attention.sdpa_kernel(SDPBackend.MATH)``) or ``attention="math"`` (the same
computation written out in matmuls and a softmax); the finite-difference estimator needs
only first derivatives and works with every kernel.

``attention_mask`` (B, L): 1 / True for tokens, 0 / False for padding. A query attends to
the unpadded keys (and, for the LM, only those at or before it) and always to itself, so a
padded position never divides by an empty softmax (no NaN); its logits carry no meaning:
exclude such positions from losses (``positions=attention_mask.bool()``).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ATTENTION_IMPLS = ("sdpa", "math")


class ModelOutput(dict):
    """A dict whose keys are also attributes (``out["logits"]`` is ``out.logits``), like HF's."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"{type(self).__name__} has no field {name!r}; fields: {list(self)}") from None

    def to_tuple(self) -> tuple:
        return tuple(self.values())


def attention_allowed(attention_mask: Optional[Tensor], length: int, causal: bool, device) -> Optional[Tensor]:
    """Boolean (B | 1, 1, L, L) mask, True where query i may attend key j; None for "all".

    attention_mask (B, L) marks the tokens (nonzero) and padding (0); every query also
    attends to itself (see the module docstring).
    """
    if attention_mask is None and not causal:
        return None
    allowed = torch.ones(1, 1, length, length, dtype=torch.bool, device=device)
    if causal:
        allowed = allowed.tril()
    if attention_mask is not None:
        allowed = allowed & (attention_mask != 0)[:, None, None, :]
    return allowed | torch.eye(length, dtype=torch.bool, device=device)


class Attention(nn.Module):
    """Multi-head self-attention: x (B, L, dim), allowed (B | 1, 1, L, L) bool or None -> (B, L, dim)."""

    def __init__(self, dim: int, heads: int, *, attention: str = "sdpa", dropout: float = 0.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be a multiple of heads ({heads})")
        if attention not in ATTENTION_IMPLS:
            raise ValueError(f"attention must be one of {ATTENTION_IMPLS}, got {attention!r}")
        self.heads, self.attention, self.dropout = heads, attention, dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, allowed: Optional[Tensor] = None) -> Tensor:
        B, L, D = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        p = self.dropout if self.training else 0.0
        if self.attention == "sdpa":
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=p)
        else:
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
            if allowed is not None:
                scores = scores.masked_fill(~allowed, float("-inf"))
            out = F.dropout(scores.softmax(-1), p) @ v
        return self.proj(out.transpose(1, 2).reshape(B, L, D))


class TransformerBlock(nn.Module):
    """Pre-norm block: x + attn(ln(x)), then + mlp(ln(x)) (GELU); (B, L, dim) -> (B, L, dim)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int = 4, *, attention: str = "sdpa", dropout: float = 0.0):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, attention=attention, dropout=dropout)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim),
                                 nn.Dropout(dropout))

    def forward(self, x: Tensor, allowed: Optional[Tensor] = None) -> Tensor:
        x = x + self.attn(self.ln1(x), allowed)
        return x + self.mlp(self.ln2(x))


class TransformerLM(nn.Module):
    """Causal transformer language model with a Hugging Face-style keyword interface.

    ``forward(input_ids=None, attention_mask=None, *, inputs_embeds=None)``:

    - input_ids (B, L) int64 in [0, vocab_size), or inputs_embeds (B, L, input_dim) floating
      (exactly one of the two; ``inputs_embeds = model.embed(input_ids)``);
    - attention_mask (B, L), optional: nonzero for tokens, 0 for padding;
    - returns ``ModelOutput(logits=(B, L, num_outputs))``, num_outputs = vocab_size for the
      LM; position i's logits predict token i + 1 (they see positions <= i only).

    Args:
        vocab_size: tokens (embedding rows).
        dim: embedding / model width E.
        depth: transformer blocks.
        heads: attention heads (dim must be a multiple).
        max_len: longest sequence (learned position embeddings).
        mlp_ratio: MLP hidden width / dim.
        attention: "sdpa" (``F.scaled_dot_product_attention``) or "math" (written out;
            twice differentiable, for the exact estimator).
        dropout: dropout in attention and MLP (training mode only).
        input_dim: width of the token embeddings (``inputs_embeds`` (B, L, input_dim)) when it
            differs from ``dim``: a linear map ``in_proj`` (input_dim -> dim) follows them.
            A student given its teacher's embedding table (copied into ``embed``, frozen)
            then takes the teacher's inputs_embeds, so both are differentiated with respect
            to the same tensor.
    """

    causal = True

    def __init__(self, vocab_size: int, dim: int = 64, depth: int = 2, heads: int = 4, max_len: int = 128,
                 mlp_ratio: int = 4, *, attention: str = "sdpa", dropout: float = 0.0,
                 num_outputs: Optional[int] = None, input_dim: Optional[int] = None):
        super().__init__()
        for name, value in (("vocab_size", vocab_size), ("dim", dim), ("depth", depth), ("heads", heads),
                            ("max_len", max_len), ("mlp_ratio", mlp_ratio), ("input_dim", input_dim or dim)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.vocab_size, self.dim, self.max_len = vocab_size, dim, max_len
        self.input_dim = input_dim or dim
        self.embed = nn.Embedding(vocab_size, self.input_dim)
        self.in_proj = nn.Identity() if self.input_dim == dim else nn.Linear(self.input_dim, dim)
        self.pos = nn.Parameter(torch.zeros(max_len, dim))
        self.blocks = nn.ModuleList(TransformerBlock(dim, heads, mlp_ratio, attention=attention, dropout=dropout)
                                    for _ in range(depth))
        self.ln_f = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_outputs or vocab_size)
        nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.normal_(self.pos, std=0.02)

    @property
    def num_outputs(self) -> int:
        return self.head.out_features

    def get_input_embeddings(self) -> nn.Embedding:
        """The token embedding table (vocab_size, dim), as in Hugging Face models."""
        return self.embed

    def _check(self, input_ids, inputs_embeds, attention_mask) -> Tensor:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids (B, L) and inputs_embeds (B, L, E), got "
                             f"{'both' if input_ids is not None else 'neither'}")
        if input_ids is not None:
            if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
                raise ValueError(f"input_ids must be an integer tensor (B, L), got "
                                 f"{getattr(input_ids, 'dtype', type(input_ids).__name__)} "
                                 f"{tuple(getattr(input_ids, 'shape', ()))}")
            inputs_embeds = self.embed(input_ids)
        if (not isinstance(inputs_embeds, Tensor) or inputs_embeds.dim() != 3
                or inputs_embeds.shape[-1] != self.input_dim):
            raise ValueError(f"inputs_embeds must have shape (B, L, {self.input_dim}), got "
                             f"{tuple(getattr(inputs_embeds, 'shape', ()))}")
        B, L, _ = inputs_embeds.shape
        if L > self.max_len:
            raise ValueError(f"sequence length {L} exceeds max_len={self.max_len}")
        if attention_mask is not None and (not isinstance(attention_mask, Tensor)
                                           or tuple(attention_mask.shape) != (B, L)):
            raise ValueError(f"attention_mask must have shape (B, L) = {(B, L)} like the input, got "
                             f"{tuple(getattr(attention_mask, 'shape', ()))}")
        return inputs_embeds

    def forward(self, input_ids: Optional[Tensor] = None, attention_mask: Optional[Tensor] = None, *,
                inputs_embeds: Optional[Tensor] = None) -> ModelOutput:
        """See the class docstring: ids (B, L) or embeddings (B, L, E) -> {"logits": (B, L, V)}."""
        e = self._check(input_ids, inputs_embeds, attention_mask)
        L = e.shape[1]
        h = self.in_proj(e) + self.pos[:L].to(e.dtype)
        allowed = attention_allowed(attention_mask, L, self.causal, e.device)
        for block in self.blocks:
            h = block(h, allowed)
        return ModelOutput(logits=self.head(self.ln_f(h)))


class TransformerTokenClassifier(TransformerLM):
    """Bidirectional transformer with a per-token classifier: {"logits": (B, L, num_labels)}.

    Same interface and arguments as :class:`TransformerLM` (``num_labels`` replaces the LM
    head's vocab_size outputs); every position attends to every unpadded position.
    """

    causal = False

    def __init__(self, vocab_size: int, num_labels: int, dim: int = 64, depth: int = 2, heads: int = 4,
                 max_len: int = 128, mlp_ratio: int = 4, *, attention: str = "sdpa", dropout: float = 0.0):
        if not isinstance(num_labels, int) or num_labels < 1:
            raise ValueError(f"num_labels must be a positive int, got {num_labels!r}")
        super().__init__(vocab_size, dim, depth, heads, max_len, mlp_ratio, attention=attention, dropout=dropout,
                         num_outputs=num_labels)
