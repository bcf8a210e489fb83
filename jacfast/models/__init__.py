"""Models: the paper's CNN families, and the kinds of models users bring to jacfast.

CNN families for 1x28x28 inputs (the paper's experiments, :mod:`jacfast.models.cnn`):
:class:`VGGTeacher`, :class:`ResNetStudent`, :class:`LeNetStudent`, built by name with
:func:`build_model`.

Models as users write them (issue 23), for tests, examples and benchmarks:

- :class:`BasicBlockResNet` (:mod:`jacfast.models.resnet`): torchvision-style ResNet of
  :class:`BasicBlock` s (BatchNorm, in-place ReLU); x (B, C_in, H, W) -> logits (B, classes).
- :class:`ViTClassifier` (:mod:`jacfast.models.vit`): patch embedding, a class token and
  pre-norm transformer blocks on ``F.scaled_dot_product_attention``; x (B, C_in, H, W) ->
  logits (B, classes), or per-patch logits (B, patches, classes) with ``per_patch=True``.
- :class:`TransformerLM` and :class:`TransformerTokenClassifier`
  (:mod:`jacfast.models.transformer`): Hugging Face-style keyword interface
  (``input_ids=`` or ``inputs_embeds=`` (B, L, E), ``attention_mask=`` (B, L)) returning a
  :class:`ModelOutput` ``{"logits": (B, L, V)}`` (item and attribute access).
"""
from jacfast.models.cnn import MODELS, LeNetStudent, ResNetStudent, VGGTeacher, build_model
from jacfast.models.resnet import BasicBlock, BasicBlockResNet
from jacfast.models.transformer import (Attention, ModelOutput, TransformerBlock, TransformerLM,
                                        TransformerTokenClassifier)
from jacfast.models.vit import ViTClassifier

__all__ = ["MODELS", "LeNetStudent", "ResNetStudent", "VGGTeacher", "build_model", "BasicBlock", "BasicBlockResNet",
           "Attention", "ModelOutput", "TransformerBlock", "TransformerLM", "TransformerTokenClassifier",
           "ViTClassifier"]
