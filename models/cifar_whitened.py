"""A whitened, wide, shallow CIFAR network: the fast-training convnet family of the CIFAR speed-runs.

The design follows the ideas of the fast CIFAR-10 training line (Page 2018, "How to train your ResNet";
tysam-code's hlb-CIFAR10; Jordan 2024, "94% on CIFAR-10 in 3.29 seconds on a single GPU"): few, wide
3x3 convolutions instead of many thin ones, so that a CPU or GPU spends its time in large matrix
products, and a first layer that is not learned but set from the data.

    whiten: 2x2 conv, 3 -> 24 channels, no padding (32 -> 31 px), set from the training images (below), GELU
    group 1..3 (widths 64, 256, 256 by default): conv 3x3 -> max-pool 2 -> BN -> GELU,
                                                  then (convs - 1) x [conv 3x3 -> BN -> GELU]
    global max-pool, linear (no bias), logits scaled by `logit_scale`

Whitening: the 2x2 patches of the (normalised) training images have a 12 x 12 covariance with eigenvectors
v_i and eigenvalues l_i; the first layer's filters are v_i / sqrt(l_i + eps) and their negatives (so a GELU
after it keeps both signs). `set_whitening` computes them; the layer is then frozen (its bias still learns).
In serving the layer is an ordinary convolution whose weights come from the state dict.

With the default widths the network has about 1.97M parameters and needs about 0.12 GMAC per 32x32
image, like a CIFAR ResNet-56 (0.125 GMAC), but in 7 convolutions instead of 55.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from models.families import arch_kwargs, register_family

DEFAULT_WIDTHS = (64, 256, 256)
DEFAULT_CONVS = 2
WHITEN_KERNEL = 2
DEFAULT_LOGIT_SCALE = 1.0 / 9.0


def _conv(cin: int, cout: int) -> nn.Conv2d:
    conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
    # partial identity ("dirac") initialisation: the first min(cin, cout) filters start by passing their input
    # channel through (plus the default random init), which keeps a deep stack of plain convs trainable early
    with torch.no_grad():
        k = min(cin, cout)
        torch.nn.init.dirac_(conv.weight[:k, :k])
    return conv


class ConvGroup(nn.Module):
    """conv -> max-pool 2 -> BN -> GELU, then `convs - 1` times conv -> BN -> GELU, at one width."""

    def __init__(self, cin: int, cout: int, convs: int) -> None:
        super().__init__()
        if convs < 1:
            raise ValueError(f"a conv group needs at least one convolution, got {convs}")
        self.convs = nn.ModuleList([_conv(cin if i == 0 else cout, cout) for i in range(convs)])
        self.norms = nn.ModuleList([nn.BatchNorm2d(cout) for _ in range(convs)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, (conv, norm) in enumerate(zip(self.convs, self.norms, strict=True)):
            x = conv(x)
            if i == 0:
                x = F.max_pool2d(x, 2)
            x = F.gelu(norm(x))
        return x


class WhitenedConvNet(nn.Module):
    """Whitening layer, three wide conv groups with max-pooling, global max-pool and a linear classifier."""

    def __init__(self, widths: Sequence[int] = DEFAULT_WIDTHS, convs: int = DEFAULT_CONVS, num_classes: int = 10,
                 logit_scale: float = DEFAULT_LOGIT_SCALE) -> None:
        super().__init__()
        widths = tuple(int(w) for w in widths)
        if len(widths) < 1 or min(widths) < 1:
            raise ValueError(f"widths must be positive, got {widths}")
        if not logit_scale > 0:
            raise ValueError(f"logit_scale must be positive, got {logit_scale}")
        self.whiten = nn.Conv2d(3, 2 * 3 * WHITEN_KERNEL * WHITEN_KERNEL, WHITEN_KERNEL, padding=0, bias=True)
        cins = (self.whiten.out_channels, *widths[:-1])
        self.groups = nn.ModuleList([ConvGroup(cin, cout, convs) for cin, cout in zip(cins, widths, strict=True)])
        self.head = nn.Linear(widths[-1], num_classes, bias=False)
        self.logit_scale = float(logit_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.whiten(x))
        for group in self.groups:
            x = group(x)
        x = torch.amax(x, dim=(2, 3))
        return self.head(x) * self.logit_scale


@torch.no_grad()
def whitening_filters(images: torch.Tensor, eps: float = 5e-4) -> torch.Tensor:
    """The whitening layer's weights (2 * 3k^2 filters of 3 x k x k) from normalised NCHW images: the
    eigenvectors of the k x k patch covariance scaled by 1/sqrt(eigenvalue + eps), and their negatives."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"need NCHW images with 3 channels, got shape {tuple(images.shape)}")
    k = WHITEN_KERNEL
    patches = F.unfold(images.float(), k)  # N x 3k^2 x L
    patches = patches.transpose(1, 2).reshape(-1, 3 * k * k).double()
    patches = patches - patches.mean(0, keepdim=True)
    cov = patches.T @ patches / max(1, len(patches) - 1)
    eigvals, eigvecs = torch.linalg.eigh(cov)  # ascending
    filters = (eigvecs.T / torch.sqrt(eigvals.clamp_min(0) + eps)[:, None]).flip(0)  # largest variance first
    filters = filters.reshape(-1, 3, k, k).float()
    return torch.cat([filters, -filters])


def set_whitening(model: WhitenedConvNet, images: torch.Tensor, freeze: bool = True) -> None:
    """Set the first layer from the training images (see whitening_filters) and, by default, stop learning
    its weights (its bias still learns)."""
    model.whiten.weight.data.copy_(whitening_filters(images).to(model.whiten.weight))
    model.whiten.weight.requires_grad_(not freeze)


def cifar_whitened_convnet(widths: Sequence[int] = DEFAULT_WIDTHS, convs: int = DEFAULT_CONVS,
                           num_classes: int = 10, logit_scale: float = DEFAULT_LOGIT_SCALE) -> WhitenedConvNet:
    """The family's network (see the module docstring)."""
    return WhitenedConvNet(widths, convs, num_classes, logit_scale)


@register_family("cifar-whitened-convnet", task="image-classification")
def build_cifar_whitened_convnet(arch: dict[str, Any], num_classes: int, **_: Any) -> WhitenedConvNet:
    """Whitened wide convnet of the fast CIFAR training line; arch: widths (default [64, 256, 256]), convs per
    group (default 2), logit_scale (default 1/9)."""
    kw = arch_kwargs("cifar-whitened-convnet", arch, ("widths", "convs", "logit_scale"), num_classes)
    widths = kw.get("widths", DEFAULT_WIDTHS)
    if isinstance(widths, (str, bytes)) or not isinstance(widths, Sequence):
        raise ValueError(f"cifar-whitened-convnet widths must be a list of integers, got {widths!r}")
    return cifar_whitened_convnet(widths, int(kw.get("convs", DEFAULT_CONVS)), num_classes,
                                  float(kw.get("logit_scale", DEFAULT_LOGIT_SCALE)))
