"""The face embedder: a compact residual CNN mapping a face crop to an L2-normalised embedding.

FaceNet (Schroff et al. 2015) uses a deep CNN followed by L2 normalisation; this network is a
small ResNet (He et al. 2016) sized for training on two CPU cores: a 3x3 stem, four stages of basic
residual blocks (widths `widths`, each stage halving the resolution), then batch norm, dropout, a
fully connected layer to `dim` and batch norm (the "BN-Dropout-FC-BN" embedding head of ArcFace's
ResNets, Deng et al. 2019), and L2 normalisation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class _Block(nn.Module):
    """Pre-activation-free basic block: conv-BN-PReLU-conv-BN plus shortcut, PReLU."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.act1 = nn.PReLU(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.act2 = nn.PReLU(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act2(out + self.shortcut(x))


class FaceEmbedder(nn.Module):
    """Face crop (N, 3, size, size), normalised as its manifest says -> (N, dim) unit vectors."""

    def __init__(self, size: int = 64, dim: int = 128, widths: Sequence[int] = (32, 64, 96, 128),
                 blocks: Sequence[int] = (1, 2, 2, 1), dropout: float = 0.2) -> None:
        super().__init__()
        if len(widths) != len(blocks):
            raise ValueError("widths and blocks need one value per stage")
        if size % (2 ** len(widths)) != 0:
            raise ValueError(f"input size {size} must be divisible by {2 ** len(widths)}")
        self.size, self.dim = size, dim
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]),
                                  nn.PReLU(widths[0]))
        layers: list[nn.Module] = []
        cin = widths[0]
        for w, n in zip(widths, blocks, strict=True):
            for i in range(n):
                layers.append(_Block(cin, w, 2 if i == 0 else 1))
                cin = w
        self.body = nn.Sequential(*layers)
        side = size // (2 ** len(widths))
        self.head = nn.Sequential(nn.BatchNorm2d(cin), nn.Dropout(dropout), nn.Flatten(),
                                  nn.Linear(cin * side * side, dim), nn.BatchNorm1d(dim))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The embedding before L2 normalisation."""
        return self.head(self.body(self.stem(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.features(x), dim=-1)


def build_embedder(arch: dict) -> FaceEmbedder:
    """A FaceEmbedder from its manifest `arch` (size, dim, widths, blocks, dropout)."""
    known = {"size", "dim", "widths", "blocks", "dropout"}
    unknown = set(arch) - known
    if unknown:
        raise ValueError(f"unknown face embedder arch keys {sorted(unknown)}")
    kw = dict(arch)
    for k in ("widths", "blocks"):
        if k in kw:
            kw[k] = tuple(kw[k])
    return FaceEmbedder(**kw)
