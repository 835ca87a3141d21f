"""Very Deep CNN for text classification (Conneau, Schwenk, Barrault, LeCun, EACL 2017).

Layout (the paper's figure 1 and table 2):

- a learned 16-d character embedding over a fixed length L (index 0, the padding, is a fixed zero vector);
- one temporal convolution, 64 filters of size 3;
- four stages of convolutional blocks with 64, 128, 256 and 512 filters; a block is two
  [temporal conv k=3, BatchNorm, ReLU]; blocks per stage: depth 9 -> (1,1,1,1), 17 -> (2,2,2,2),
  29 -> (5,5,2,2), 49 -> (8,8,5,3);
- between two stages the length is halved by one of the paper's three down-sampling variants:
  ``"max"`` (max-pool, size 3, stride 2, padding 1), ``"kmax"`` (k-max pooling with k = L_current // 2,
  keeping the order of the selected positions) or ``"conv"`` (the first convolution of the next
  stage has stride 2);
- after the last stage, k-max pooling with k = 8 gives 512 x 8 = 4096 features, then
  FC(4096 -> hidden), ReLU, FC(hidden -> hidden), ReLU, FC(hidden -> classes); hidden is 2048 in
  the paper and configurable here (small values for tests and small data sets).

Depth counts convolution layers the way the paper's table 2 does: the first convolution plus two per
block, depth = 1 + 2 * sum(blocks): 9 = 1 + 2*4, 17 = 1 + 2*8, 29 = 1 + 2*14, 49 = 1 + 2*24. The
fully connected layers and the 1x1 shortcut projections are not counted.

Optional shortcuts (the paper's "ResNet-like" variant): an identity around every block whose input
and output shapes agree; a 1x1 convolution + BatchNorm projection around the first block of a stage,
where the channel count doubles (stride 2 as well with ``"conv"`` down-sampling). With ``"max"`` and
``"kmax"`` the pooling sits between stages, outside any shortcut, so the projection only changes the
channel count. The shortcut is added after the block's second ReLU (figure 1 draws the addition there).

Block convolutions have no bias (BatchNorm's shift makes it redundant); the first convolution, which
has no BatchNorm after it, keeps its bias. Convolutions get He initialisation, as in the paper.
"""

from __future__ import annotations

import torch
from torch import nn

BLOCKS_PER_DEPTH: dict[int, tuple[int, int, int, int]] = {
    9: (1, 1, 1, 1),
    17: (2, 2, 2, 2),
    29: (5, 5, 2, 2),
    49: (8, 8, 5, 3),
}
STAGE_WIDTHS = (64, 128, 256, 512)
POOLINGS = ("max", "kmax", "conv")
EMBEDDING_DIM = 16
FINAL_K = 8


def kmax_pool(x: torch.Tensor, k: int) -> torch.Tensor:
    """The k largest values of each channel along the last axis, in their original order."""
    idx = x.topk(k, dim=-1, sorted=False).indices.sort(dim=-1).values
    return x.gather(-1, idx)


class KMaxPool1d(nn.Module):
    """k-max pooling with a fixed k, or k = length // 2 when k is None."""

    def __init__(self, k: int | None = None) -> None:
        super().__init__()
        self.k = k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.k if self.k is not None else max(1, x.shape[-1] // 2)
        return kmax_pool(x, k)

    def extra_repr(self) -> str:
        return f"k={self.k if self.k is not None else 'length // 2'}"


class ConvBlock(nn.Module):
    """Two [conv k=3, BatchNorm, ReLU] layers, with an optional shortcut around them."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, shortcut: bool) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv1d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm1d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv1d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm1d(out_channels),
            nn.ReLU(inplace=True),
        )
        self.shortcut: nn.Module | None = None
        if shortcut:
            if in_channels == out_channels and stride == 1:
                self.shortcut = nn.Identity()
            else:
                self.shortcut = nn.Sequential(
                    nn.Conv1d(in_channels, out_channels, 1, stride=stride, bias=False),
                    nn.BatchNorm1d(out_channels),
                )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        return out if self.shortcut is None else out + self.shortcut(x)


def _halve(length: int, pool: str) -> int:
    """Length after one down-sampling step (max-pool 3/2/1 and stride-2 conv 3/2/1 give ceil(L/2))."""
    return length // 2 if pool == "kmax" else (length - 1) // 2 + 1


class VDCNN(nn.Module):
    """VDCNN of depth 9, 17, 29 or 49 over index tensors [N, L]; returns logits [N, num_classes]."""

    def __init__(self, num_classes: int, vocab_size: int, depth: int = 9, pool: str = "max",
                 shortcut: bool = False, hidden: int = 2048, embedding_dim: int = EMBEDDING_DIM,
                 k: int = FINAL_K) -> None:
        super().__init__()
        if depth not in BLOCKS_PER_DEPTH:
            raise ValueError(f"depth must be one of {sorted(BLOCKS_PER_DEPTH)}, got {depth}")
        if pool not in POOLINGS:
            raise ValueError(f"pool must be one of {POOLINGS}, got {pool!r}")
        if num_classes < 1 or vocab_size < 2 or hidden < 1 or k < 1:
            raise ValueError("num_classes, hidden and k must be positive and vocab_size at least 2")
        self.depth, self.pool, self.k = depth, pool, k
        self.embedding = nn.Embedding(vocab_size, embedding_dim, padding_idx=0)
        self.first_conv = nn.Conv1d(embedding_dim, STAGE_WIDTHS[0], 3, padding=1)
        layers: list[nn.Module] = []
        in_ch = STAGE_WIDTHS[0]
        for stage, (width, n_blocks) in enumerate(zip(STAGE_WIDTHS, BLOCKS_PER_DEPTH[depth], strict=True)):
            stride = 1
            if stage > 0:
                if pool == "max":
                    layers.append(nn.MaxPool1d(3, stride=2, padding=1))
                elif pool == "kmax":
                    layers.append(KMaxPool1d())
                else:
                    stride = 2
            for b in range(n_blocks):
                layers.append(ConvBlock(in_ch, width, stride if b == 0 else 1, shortcut))
                in_ch = width
        self.features = nn.Sequential(*layers)
        self.final_pool = KMaxPool1d(k)
        self.classifier = nn.Sequential(
            nn.Linear(in_ch * k, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, num_classes),
        )
        for m in self.modules():
            if isinstance(m, nn.Conv1d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        # shortest input that still leaves k positions for the final k-max pooling
        self.min_length = next(n for n in range(1, 1 << 20) if self.feature_length(n) >= k)

    def feature_length(self, length: int) -> int:
        """Length of the last stage's output for an input of `length` characters."""
        for _ in range(len(STAGE_WIDTHS) - 1):
            length = _halve(length, self.pool)
        return length

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] < self.min_length:
            raise ValueError(f"input length {x.shape[-1]} is below this VDCNN's minimum {self.min_length}")
        h = self.embedding(x).transpose(1, 2)  # [N, L, E] -> [N, E, L] for Conv1d
        h = self.features(self.first_conv(h))
        h = self.final_pool(h).flatten(1)
        return self.classifier(h)


def conv_layer_count(model: VDCNN) -> int:
    """Convolutions counted as the paper counts depth: the first one plus those inside blocks."""
    blocks = [m for m in model.features if isinstance(m, ConvBlock)]
    return 1 + sum(sum(isinstance(c, nn.Conv1d) for c in b.body) for b in blocks)
