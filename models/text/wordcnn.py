"""A word-level text CNN in the style of Kim (EMNLP 2014), with fastText-style character n-grams.

Each token's vector is its word embedding (learned from scratch; row 0 = padding is zero, row 1 = unknown word)
plus the mean of its hashed character n-gram embeddings (Bojanowski et al. 2017), so a word never seen in
training still gets a vector from its spelling. The token vectors go through one layer of parallel
convolutions of several widths (width 2 reads word bigrams, 3-5 longer phrases; Kim used 3, 4, 5 with 100
maps each), ReLU, max-over-time pooling, dropout and one linear layer. With ``pooling="max-mean"`` each map is
also averaged over the text's positions (concatenated with its max): the max says whether a phrase detector
fired anywhere, the mean how much of the text it covers, so evidence spread over many words adds up as it does
in a bag-of-n-grams model.

Padding never changes a prediction: the convolutions are "wide" (k - 1 zero positions on both sides), and
output positions that see no token of the text (those past its end, where a longer text of the batch pads it)
are masked before the max (and left out of the mean); a text without any token gives zero features. The input
is the LongTensor [N, W, 1 + S] of `models.text.words.WordEncoder`.

``members`` > 1 holds several independent networks (own embeddings, convolutions, classifier) over the same
vocabulary, trained side by side on the same batches from different initialisations; the output is the log
of their averaged probabilities (a probability-average ensemble in one state dict).

The vocabulary travels in the state dict as the buffer ``vocabulary`` (UTF-8 bytes of the newline-joined
words), so weights and vocabulary are one file under one sha256; its length follows the loaded state dict.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .words import vocabulary_from_tensor, vocabulary_to_tensor

# over time, per feature map: the max (Kim 2014), or the max and the mean side by side
POOLINGS = ("max", "max-mean")


class _WordCNNMember(nn.Module):
    """One Kim-style network: token vectors -> parallel wide convolutions -> masked max-over-time -> linear."""

    def __init__(self, num_classes: int, vocab_size: int, buckets: int, dim: int, widths: Sequence[int],
                 filters: int, dropout: float, pooling: str = "max") -> None:
        super().__init__()
        self.pooling = pooling
        self.word_embedding = nn.Embedding(vocab_size, dim, padding_idx=0)
        # mean of the token's n-gram vectors; padding index 0 is excluded from the mean (and from gradients)
        self.subword_embedding = nn.EmbeddingBag(buckets + 1, dim, mode="mean", padding_idx=0) if buckets else None
        self.widths = tuple(int(k) for k in widths)
        self.convs = nn.ModuleList(nn.Conv1d(dim, filters, k, padding=k - 1) for k in self.widths)
        self.dropout = nn.Dropout(dropout)
        per_map = 2 if pooling == "max-mean" else 1
        self.fc = nn.Linear(filters * len(self.widths) * per_map, num_classes)
        nn.init.normal_(self.word_embedding.weight, std=dim ** -0.5)
        if self.subword_embedding is not None:
            nn.init.normal_(self.subword_embedding.weight, std=dim ** -0.5)
            with torch.no_grad():
                self.subword_embedding.weight[0].zero_()
        with torch.no_grad():
            self.word_embedding.weight[0].zero_()

    def token_vectors(self, x: torch.Tensor) -> torch.Tensor:
        """[N, W, dim]: word vector + mean n-gram vector per position (zero at padding)."""
        n, w, depth = x.shape
        e = self.word_embedding(x[..., 0])
        if self.subword_embedding is not None and depth > 1:
            sub = x[..., 1:].reshape(n * w, depth - 1)
            e = e + self.subword_embedding(sub).view(n, w, -1)
        return e

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lengths = (x[..., 0] != 0).sum(1)  # tokens are contiguous from position 0
        h = self.token_vectors(x).transpose(1, 2)  # [N, dim, W]
        pooled = []
        for k, conv in zip(self.widths, self.convs, strict=True):
            y = torch.relu(conv(h))  # [N, F, W + k - 1]; position p reads tokens p - k + 1 .. p
            pos = torch.arange(y.shape[-1], device=y.device)
            valid = (pos[None, :] < (lengths + k - 1)[:, None]) & (lengths > 0)[:, None]
            masked = y * valid[:, None, :].to(y.dtype)
            # after the ReLU every value is >= 0, so zeroing the invalid positions leaves the max of the valid ones
            pooled.append(masked.amax(-1))
            if self.pooling == "max-mean":
                # mean over the text's lengths + k - 1 output positions (0 for a text without tokens)
                count = valid.sum(1, keepdim=True).clamp_min(1).to(y.dtype)
                pooled.append(masked.sum(-1) / count)
        return self.fc(self.dropout(torch.cat(pooled, 1)))


class WordCNN(nn.Module):
    """Word-level CNN text classifier (one network, or a probability-average ensemble of `members`)."""

    def __init__(self, num_classes: int, vocab_size: int, *, buckets: int = 32768, dim: int = 64,
                 widths: Sequence[int] = (2, 3, 4, 5), filters: int = 128, dropout: float = 0.5,
                 members: int = 1, pooling: str = "max") -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"word-cnn pooling must be one of {list(POOLINGS)}, got {pooling!r}")
        if vocab_size < 2 or num_classes < 2 or dim < 1 or filters < 1 or members < 1 or not widths:
            raise ValueError("word-cnn needs vocab_size >= 2, num_classes >= 2, and positive dim, filters, members "
                             "and at least one width")
        if any(int(k) < 1 for k in widths):
            raise ValueError(f"convolution widths must be positive, got {list(widths)}")
        self.buckets = int(buckets)
        self.vocab_size = int(vocab_size)
        self.members = nn.ModuleList(
            _WordCNNMember(num_classes, vocab_size, self.buckets, dim, widths, filters, dropout, pooling)
            for _ in range(members))
        self.vocabulary: torch.Tensor
        self.register_buffer("vocabulary", torch.zeros(0, dtype=torch.uint8))

    def member_logits(self, x: torch.Tensor) -> torch.Tensor:
        """[members, N, classes]: each network's logits (training uses one loss per member)."""
        return torch.stack([m(x) for m in self.members])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [N, classes]; with several members, log of the mean of their probabilities."""
        if len(self.members) == 1:
            return self.members[0](x)  # type: ignore[no-any-return]
        logp = self.member_logits(x).float().log_softmax(-1)
        return torch.logsumexp(logp, 0) - math.log(len(self.members))

    def set_vocabulary(self, words: Sequence[str]) -> None:
        """Store the vocabulary (index 2 + i is words[i]) in the state dict."""
        if len(words) + 2 > self.vocab_size:
            raise ValueError(f"{len(words)} words do not fit the embedding's {self.vocab_size} rows")
        self.vocabulary = vocabulary_to_tensor(words).to(self.vocabulary.device)

    def vocabulary_words(self) -> list[str]:
        """The stored vocabulary (empty for an untrained model)."""
        return vocabulary_from_tensor(self.vocabulary)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # the vocabulary's length is the checkpoint's, not the untrained model's empty one
        key = prefix + "vocabulary"
        if key in state_dict:
            self.vocabulary = torch.zeros_like(state_dict[key], dtype=torch.uint8, device=self.vocabulary.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
