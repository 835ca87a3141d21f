"""Squeeze-and-excitation CIFAR ResNets (Hu et al. 2018, "Squeeze-and-Excitation Networks").

The CIFAR ResNet-(6n+2) of models.cifar_resnet with an SE block on the residual branch of every basic
block, before the sum with the shortcut (the paper's SE-ResNet module, Fig. 3): squeeze by global
average pooling, excite with FC(C -> C/r), ReLU, FC(C/r -> C), sigmoid, and scale the C channels.
The paper's CIFAR experiments put SE blocks into ResNet-110 and ResNet-164 with reduction r = 16.

Each SE block adds 2*C*(C/r) weights (the paper's count, 2/r * sum over stages of N_s * C_s^2) plus
C/r + C biases, with C/r rounded down and at least 1 (at r = 16 the 16-channel stage has one hidden unit).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from models.cifar_resnet import BasicBlock, CifarResNet
from models.families import arch_kwargs, register_family

DEFAULT_REDUCTION = 16


def se_hidden(channels: int, reduction: int) -> int:
    """Hidden units of an SE block: C // r, at least one."""
    return max(1, channels // reduction)


class SqueezeExcitation(nn.Module):
    """Channel-wise gates from globally pooled features: x * sigmoid(W2 relu(W1 avgpool(x)))."""

    def __init__(self, channels: int, reduction: int = DEFAULT_REDUCTION) -> None:
        super().__init__()
        if reduction < 1:
            raise ValueError(f"SE reduction must be at least 1, got {reduction}")
        hidden = se_hidden(channels, reduction)
        self.fc1 = nn.Linear(channels, hidden)
        self.fc2 = nn.Linear(hidden, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(s))))
        return x * s[:, :, None, None].to(x.dtype)


class SEBasicBlock(BasicBlock):
    """The CIFAR basic block with squeeze-and-excitation on its residual branch."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, shortcut: str,
                 reduction: int = DEFAULT_REDUCTION) -> None:
        super().__init__(in_channels, out_channels, stride, shortcut)
        self.se = SqueezeExcitation(out_channels, reduction)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.se(self.bn2(self.conv2(out)))
        return F.relu(out + self.shortcut(x))


def cifar_se_resnet(depth: int = 20, num_classes: int = 10, shortcut: str = "A",
                    reduction: int = DEFAULT_REDUCTION) -> CifarResNet:
    """An SE-ResNet-(6n+2) for 32x32 inputs (SE blocks with reduction `reduction` in every basic block)."""
    if reduction < 1:
        raise ValueError(f"SE reduction must be at least 1, got {reduction}")
    model = CifarResNet(depth, num_classes, shortcut, block=functools.partial(SEBasicBlock, reduction=reduction))
    # the SE layers keep PyTorch's default initialisation (CifarResNet's fan-out init is for the convolutions);
    # then every gate starts near sigmoid(0) = 0.5 instead of saturating
    for m in model.modules():
        if isinstance(m, SqueezeExcitation):
            m.fc1.reset_parameters()
            m.fc2.reset_parameters()
    return model


@register_family("cifar-se-resnet", task="image-classification")
def build_cifar_se_resnet(arch: dict[str, Any], num_classes: int, **_: Any) -> CifarResNet:
    """Squeeze-and-excitation CIFAR ResNet (Hu et al. 2018); arch: depth, shortcut, reduction (default 16)."""
    kw = arch_kwargs("cifar-se-resnet", arch, ("depth", "shortcut", "reduction"), num_classes)
    return cifar_se_resnet(int(kw.get("depth", 20)), num_classes, str(kw.get("shortcut", "A")),
                           int(kw.get("reduction", DEFAULT_REDUCTION)))
