"""CIFAR-10 residual networks of He et al. 2016 ("Deep Residual Learning", section 4.2).

Three stages of 16/32/64 filters on 32x32, 16x16 and 8x8 maps, n basic blocks per stage,
6n+2 weighted layers in all, global average pooling and one fully connected layer.
Shortcut option "A" is the paper's parameter-free identity (stride-2 subsampling plus zero
padding of the new channels); option "B" uses a 1x1 projection where the shape changes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from models.families import arch_kwargs, register_family

DEPTHS = (20, 32, 44, 56, 110)
STAGE_WIDTHS = (16, 32, 64)

# block(in_channels, out_channels, stride, shortcut): a residual block of the 6n+2 skeleton
BlockFactory = Callable[[int, int, int, str], nn.Module]


class _PadShortcut(nn.Module):
    """Option A: subsample by two and zero-pad the extra channels."""

    def __init__(self, out_channels: int, in_channels: int) -> None:
        super().__init__()
        self.extra = out_channels - in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, ::2, ::2]
        half = self.extra // 2
        return F.pad(x, (0, 0, 0, 0, half, self.extra - half))


class BasicBlock(nn.Module):
    """Two 3x3 conv + BN layers with a residual connection."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, shortcut: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module
        if stride == 1 and in_channels == out_channels:
            self.shortcut = nn.Identity()
        elif shortcut == "A":
            self.shortcut = _PadShortcut(out_channels, in_channels)
        else:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs."""

    def __init__(self, depth: int = 20, num_classes: int = 10, shortcut: str = "A",
                 block: BlockFactory | None = None) -> None:
        super().__init__()
        make_block: BlockFactory = block or BasicBlock
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ValueError(f"depth must be 6n+2 (20, 32, 44, 56, 110, ...), got {depth}")
        if shortcut not in ("A", "B"):
            raise ValueError(f"shortcut must be 'A' or 'B', got {shortcut!r}")
        n = (depth - 2) // 6
        self.depth = depth
        self.conv = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        layers: list[nn.Module] = []
        in_ch = 16
        for stage, width in enumerate(STAGE_WIDTHS):
            for i in range(n):
                stride = 2 if stage > 0 and i == 0 else 1
                layers.append(make_block(in_ch, width, stride, shortcut))
                in_ch = width
        self.blocks = nn.Sequential(*layers)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.conv(x)))
        x = self.blocks(x)
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.fc(x)


def cifar_resnet(depth: int = 20, num_classes: int = 10, shortcut: str = "A") -> CifarResNet:
    """Build a CIFAR ResNet of the given 6n+2 depth."""
    return CifarResNet(depth=depth, num_classes=num_classes, shortcut=shortcut)


@register_family("cifar-resnet", task="image-classification")
def build_cifar_resnet(arch: dict[str, Any], num_classes: int, **_: Any) -> CifarResNet:
    """CIFAR ResNet-(6n+2) of He et al. 2016; arch: depth (default 20), shortcut ("A" or "B", default "A")."""
    kw = arch_kwargs("cifar-resnet", arch, ("depth", "shortcut"), num_classes)
    return cifar_resnet(int(kw.get("depth", 20)), num_classes, str(kw.get("shortcut", "A")))


def count_parameters(model: nn.Module) -> int:
    """Number of parameters, frozen ones included (a whitening layer set from the data counts: it is in the
    weights file and in every forward pass)."""
    return sum(p.numel() for p in model.parameters())
