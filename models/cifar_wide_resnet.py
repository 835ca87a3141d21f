"""Wide residual networks for CIFAR (Zagoruyko & Komodakis 2016, "Wide Residual Networks").

WRN-d-k: a 3x3 conv with 16 filters, three groups of N = (d - 4) / 6 pre-activation basic blocks
(BN-ReLU-conv3x3-BN-ReLU-conv3x3, the paper's B(3,3)) with 16k, 32k and 64k filters on 32x32, 16x16
and 8x8 maps, BN-ReLU, global average pooling and one fully connected layer. Where the shape changes
the shortcut is a 1x1 convolution of the pre-activated input. Optional dropout between the two
convolutions of a block (the paper's 0.3 in its dropout experiments). Depth d = 6N + 4 (WRN-28-10:
36.5M parameters, WRN-16-8: 11.0M, as in the paper's tables; checked in tests/models/test_cifar_families.py).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from models.families import arch_kwargs, register_family

GROUP_WIDTHS = (16, 32, 64)


class WideBasicBlock(nn.Module):
    """Pre-activation block: BN-ReLU-conv3x3-BN-ReLU-(dropout)-conv3x3 plus the shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = F.relu(self.bn1(x))
        y = self.conv1(o)
        y = self.conv2(self.dropout(F.relu(self.bn2(y))))
        # the projection reads the pre-activated input, the identity the raw one (as the authors' code does)
        return y + (x if self.shortcut is None else self.shortcut(o))


class WideResNet(nn.Module):
    """WRN-depth-width for 32x32 inputs."""

    def __init__(self, depth: int = 16, width: int = 4, num_classes: int = 10, dropout: float = 0.0) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0 or depth < 10:
            raise ValueError(f"WRN depth must be 6n+4 (10, 16, 22, 28, 40, ...), got {depth}")
        if width < 1:
            raise ValueError(f"WRN width must be a positive integer, got {width}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        n = (depth - 4) // 6
        self.depth, self.width = depth, width
        self.conv = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        layers: list[nn.Module] = []
        in_ch = 16
        for group, base in enumerate(GROUP_WIDTHS):
            for i in range(n):
                stride = 2 if group > 0 and i == 0 else 1
                layers.append(WideBasicBlock(in_ch, base * width, stride, dropout))
                in_ch = base * width
        self.blocks = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(in_ch)
        self.fc = nn.Linear(in_ch, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.conv(x))
        x = F.relu(self.bn(x))
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.fc(x)


def wide_resnet(depth: int = 16, width: int = 4, num_classes: int = 10, dropout: float = 0.0) -> WideResNet:
    """Build a WRN-depth-width for CIFAR-sized inputs."""
    return WideResNet(depth=depth, width=width, num_classes=num_classes, dropout=dropout)


@register_family("cifar-wide-resnet", task="image-classification")
def build_cifar_wide_resnet(arch: dict[str, Any], num_classes: int, **_: Any) -> WideResNet:
    """Wide ResNet WRN-d-k for CIFAR (Zagoruyko & Komodakis 2016); arch: depth, width, dropout."""
    kw = arch_kwargs("cifar-wide-resnet", arch, ("depth", "width", "dropout"), num_classes)
    return wide_resnet(int(kw.get("depth", 16)), int(kw.get("width", 4)), num_classes, float(kw.get("dropout", 0.0)))
