"""Small CNN teacher and student families for 1x28x28 inputs (Fashion-MNIST, MNIST digits).

- :class:`VGGTeacher`: a wider VGG-style network (two 3x3 convs per block).
- :class:`ResNetStudent`: a narrower ResNet-style network (a different architecture).
- :class:`LeNetStudent`: a LeNet-style network, the smallest student.

All of them take x of shape (B, 1, 28, 28) and return logits (B, num_classes). They have no
BatchNorm on purpose: batch statistics would make a 2-process DDP run differ from a
1-process run over the same global batch, and per-sample Jacobians depend on other samples.
Each exposes named submodules ``block1`` (B, C1, 14, 14), ``block2`` (B, C2, 7, 7) and
``block3`` (B, C3, 7, 7), usable as hook points for transfer (``model.hook_points``).
Dropout (``dropout > 0``) sits before the classifier, for the robustness experiment.
"""
from __future__ import annotations

from typing import Any

from torch import Tensor, nn


def _conv(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, padding=1)


def _init(model: nn.Module) -> nn.Module:
    """He-normal weights, zero biases: without BatchNorm, torch's default init shrinks the
    signal layer by layer and these networks barely start training. Residual branches end in
    a zero-initialized conv, so each block starts as its skip path (Fixup-style)."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            nn.init.zeros_(m.bias)
        if isinstance(m, _Residual):
            nn.init.zeros_(m.conv2.weight)
    return model


class VGGTeacher(nn.Module):
    """VGG-style: block_i = [conv-ReLU] x 2 (+ 2x2 max-pool in blocks 1 and 2); widths w, 2w, 4w."""

    hook_points = ("block1", "block2", "block3")

    def __init__(self, width: int = 32, num_classes: int = 10, dropout: float = 0.0):
        super().__init__()
        w = width
        self.block1 = nn.Sequential(_conv(1, w), nn.ReLU(), _conv(w, w), nn.ReLU(), nn.MaxPool2d(2))  # 14x14
        self.block2 = nn.Sequential(_conv(w, 2 * w), nn.ReLU(), _conv(2 * w, 2 * w), nn.ReLU(), nn.MaxPool2d(2))  # 7x7
        self.block3 = nn.Sequential(_conv(2 * w, 4 * w), nn.ReLU(), _conv(4 * w, 4 * w), nn.ReLU())  # 7x7
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(4 * w, num_classes)
        _init(self)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, 1, 28, 28) -> logits (B, num_classes)."""
        h = self.block3(self.block2(self.block1(x)))
        return self.fc(self.drop(self.pool(h).flatten(1)))


class _Residual(nn.Module):
    """conv-ReLU-conv + skip (1x1 conv when the shape changes), then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1)
        self.conv2 = _conv(cout, cout)
        self.skip = nn.Identity() if (cin == cout and stride == 1) else nn.Conv2d(cin, cout, 1, stride=stride)
        self.act = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.conv2(self.act(self.conv1(x))) + self.skip(x))


class ResNetStudent(nn.Module):
    """ResNet-style: stem conv, then one residual block per stage (strided convs, no pooling)."""

    hook_points = ("block1", "block2", "block3")

    def __init__(self, width: int = 8, num_classes: int = 10, dropout: float = 0.0):
        super().__init__()
        w = width
        self.stem = nn.Sequential(_conv(1, w), nn.ReLU())
        self.block1 = _Residual(w, w, 2)  # 14x14
        self.block2 = _Residual(w, 2 * w, 2)  # 7x7
        self.block3 = _Residual(2 * w, 4 * w, 1)  # 7x7
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(4 * w, num_classes)
        _init(self)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, 1, 28, 28) -> logits (B, num_classes)."""
        h = self.block3(self.block2(self.block1(self.stem(x))))
        return self.fc(self.drop(self.pool(h).flatten(1)))


class LeNetStudent(nn.Module):
    """LeNet-style: conv5-ReLU-pool, conv5-ReLU-pool, conv3-ReLU, two fully connected layers."""

    hook_points = ("block1", "block2", "block3")

    def __init__(self, width: int = 8, num_classes: int = 10, dropout: float = 0.0):
        super().__init__()
        w = width
        self.block1 = nn.Sequential(nn.Conv2d(1, w, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2))  # 14x14
        self.block2 = nn.Sequential(nn.Conv2d(w, 2 * w, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2))  # 7x7
        self.block3 = nn.Sequential(_conv(2 * w, 2 * w), nn.ReLU())  # 7x7
        self.fc1 = nn.Linear(2 * w * 49, 64)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(64, num_classes)
        _init(self)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, 1, 28, 28) -> logits (B, num_classes)."""
        h = self.block3(self.block2(self.block1(x)))
        return self.fc(self.drop(nn.functional.relu(self.fc1(h.flatten(1)))))


MODELS = {"vgg": VGGTeacher, "resnet": ResNetStudent, "lenet": LeNetStudent}


def build_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a model by family name ("vgg", "resnet", "lenet") with keyword args (width, dropout...).

    The model remembers ``(name, kwargs)`` in ``model.spec`` so that checkpoints can tell
    whether they belong to it.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    model = MODELS[name](**kwargs)
    model.spec = {"name": name, **kwargs}
    return model
