"""A torchvision-style ResNet of basic blocks, as users write it (BatchNorm, in-place ReLU).

:class:`BasicBlock` is torchvision's ``resnet.BasicBlock`` (conv3x3-BN-ReLU-conv3x3-BN, plus
the identity or a 1x1-conv-BN downsample, then ReLU; every ReLU in place), and
:class:`BasicBlockResNet` a small ResNet of them for (B, C_in, H, W) images.

In training mode BatchNorm normalizes with the batch statistics, so every sample's logits
depend on the whole batch; input Jacobians are then those of the batch forward (see
:mod:`jacfast.jacobians`). In eval mode (running statistics) samples are independent.
"""
from __future__ import annotations

from typing import Optional, Sequence

from torch import Tensor, nn


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """x (B, cin, H, W) -> (B, cout, H / stride, W / stride), torchvision's BasicBlock."""

    expansion = 1

    def __init__(self, cin: int, cout: int, stride: int = 1, downsample: Optional[nn.Module] = None):
        super().__init__()
        self.conv1 = _conv3x3(cin, cout, stride)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(cout, cout)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity  # in place, as torchvision does
        return self.relu(out)


class BasicBlockResNet(nn.Module):
    """ResNet of :class:`BasicBlock` s: x (B, in_channels, H, W) -> logits (B, num_classes).

    Stem: conv3x3-BN-ReLU (no max-pool: small images). Stage i has ``layers[i]`` blocks of
    width ``width * 2**i``; every stage after the first halves H and W. Then global average
    pooling and a linear classifier.

    Args:
        layers: blocks per stage, e.g. (2, 2, 2, 2) for a ResNet-18 layout.
        width: channels of the first stage.
        in_channels: image channels.
        num_classes: logits per sample.
    """

    def __init__(self, layers: Sequence[int] = (1, 1), width: int = 8, in_channels: int = 3, num_classes: int = 10):
        super().__init__()
        if not layers or any(int(n) < 1 for n in layers):
            raise ValueError(f"layers must be a non-empty sequence of positive block counts, got {tuple(layers)}")
        if width < 1 or in_channels < 1 or num_classes < 1:
            raise ValueError(f"width, in_channels and num_classes must be >= 1, got {width}, {in_channels}, "
                             f"{num_classes}")
        self.conv1 = _conv3x3(in_channels, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        stages, cin = [], width
        for i, n in enumerate(layers):
            cout, stride = width * 2 ** i, 1 if i == 0 else 2
            down = None
            if stride != 1 or cin != cout:
                down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))
            blocks = [BasicBlock(cin, cout, stride, down)] + [BasicBlock(cout, cout) for _ in range(int(n) - 1)]
            stages.append(nn.Sequential(*blocks))
            cin = cout
        self.stages = nn.Sequential(*stages)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():  # torchvision's initialization
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, in_channels, H, W) -> logits (B, num_classes)."""
        if x.dim() != 4 or x.shape[1] != self.conv1.in_channels:
            raise ValueError(f"x must have shape (B, {self.conv1.in_channels}, H, W), got {tuple(x.shape)}")
        h = self.stages(self.relu(self.bn1(self.conv1(x))))
        return self.fc(self.avgpool(h).flatten(1))
