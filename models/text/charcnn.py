"""Character-level ConvNet of Zhang, Zhao and LeCun ("Character-level Convolutional Networks for Text
Classification", NIPS 2015), "small" and "large".

Six temporal convolutions without padding (kernels 7, 7, 3, 3, 3, 3; 256 features for "small",
1024 for "large"), each followed by a ReLU, non-overlapping max-pooling of size 3 after the 1st, 2nd
and 6th; then two fully connected layers (1024 units for "small", 2048 for "large"), each followed by
a ReLU and dropout 0.5, and the output layer (tables 1 and 2 of the paper; its "2 dropout modules in
between the 3 fully-connected layers").

The input is the paper's one-hot quantisation by default: one channel per non-padding index, so
padding (and, with ``unknown="zero"``, every character outside the alphabet) is the all-zero vector,
exactly as in the paper. With the default 69-character alphabet and ``unknown="zero"`` that is 69
channels (the paper says 70 because its list names "-" twice); ``unknown="index"`` adds one channel.
``input="embedding"`` swaps the fixed one-hot for a learned embedding of the same width
(vocab_size - 1), still zero for padding.

The length after the convolutions is l6 = (L - 96) / 27 (the paper's formula, exact when
L - 96 is divisible by 27, floored otherwise): 34 for the paper's L = 1014, so the first fully
connected layer sees 34 x 256 = 8704 ("small") or 34 x 1024 = 34816 ("large") features. The
shortest usable length is 123 (it leaves one position). Weights start from a Gaussian with standard
deviation 0.05 ("small") or 0.02 ("large"), as in the paper.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

SIZES: dict[str, tuple[int, int, float]] = {
    # name: (conv features, fully connected units, init std)
    "small": (256, 1024, 0.05),
    "large": (1024, 2048, 0.02),
}
INPUTS = ("onehot", "embedding")
KERNELS = (7, 7, 3, 3, 3, 3)
POOLED_AFTER = (0, 1, 5)  # zero-based conv layers followed by max-pooling of size 3


def charcnn_feature_length(length: int) -> int:
    """Positions left after the six convolutions and three poolings for an input of `length`."""
    for i, k in enumerate(KERNELS):
        length -= k - 1
        if i in POOLED_AFTER:
            length //= 3
    return length


class CharCNN(nn.Module):
    """Zhang et al. 2015 char-CNN over index tensors [N, L]; returns logits [N, num_classes]."""

    onehot: torch.Tensor

    def __init__(self, num_classes: int, vocab_size: int, length: int = 1014, size: str = "small",
                 input: str = "onehot", dropout: float = 0.5) -> None:
        super().__init__()
        if size not in SIZES:
            raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}")
        if input not in INPUTS:
            raise ValueError(f"input must be one of {INPUTS}, got {input!r}")
        if num_classes < 1 or vocab_size < 2:
            raise ValueError("num_classes must be positive and vocab_size at least 2")
        self.length, self.size, self.input = length, size, input
        self.feature_length = charcnn_feature_length(length)
        if self.feature_length < 1:
            raise ValueError(f"length {length} is too short for the char-CNN (at least 123 characters)")
        features, units, std = SIZES[size]
        in_ch = vocab_size - 1  # one channel per non-padding index
        self.embedding: nn.Embedding | None = None
        if input == "onehot":
            # row 0 (padding) is all zeros; a non-persistent buffer keeps it out of the state_dict
            onehot = torch.zeros(vocab_size, in_ch)
            onehot[1:] = torch.eye(in_ch)
            self.register_buffer("onehot", onehot, persistent=False)
        else:
            self.embedding = nn.Embedding(vocab_size, in_ch, padding_idx=0)
        convs: list[nn.Module] = []
        for i, k in enumerate(KERNELS):
            convs += [nn.Conv1d(in_ch if i == 0 else features, features, k), nn.ReLU(inplace=True)]
            if i in POOLED_AFTER:
                convs.append(nn.MaxPool1d(3))
        self.features = nn.Sequential(*convs)
        self.classifier = nn.Sequential(
            nn.Linear(features * self.feature_length, units),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(units, units),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(units, num_classes),
        )
        for m in self.modules():
            if isinstance(m, (nn.Conv1d, nn.Linear)):
                nn.init.normal_(m.weight, 0.0, std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.length:
            # the first fully connected layer's width is fixed by the length
            raise ValueError(f"this char-CNN takes inputs of length {self.length}, got {x.shape[-1]}")
        h = self.embedding(x) if self.embedding is not None else F.embedding(x, self.onehot)
        h = self.features(h.transpose(1, 2))  # [N, L, C] -> [N, C, L] for Conv1d
        return self.classifier(h.flatten(1))
