"""Text CNNs: character-level (VDCNN, Zhang et al. char-CNN) and word-level (Kim-style word-cnn), and the
encodings they read.

A text model is described by ``family``, ``arch`` (the keyword arguments of its class), the number
of classes (from the labels) and the vocabulary size (from the encoding: ``CharSpec.vocab_size`` or
``WordSpec.vocab_size``). The character models take a LongTensor [N, L] of character indices, the word model
a LongTensor [N, W, 1 + S] of word and character n-gram indices (`WordEncoder`); all return logits
[N, num_classes]. `text_encoding_from_dict` reads a manifest "encoding" of either kind and `text_encoder`
pairs it with a built model (the word model's vocabulary is stored in its state dict).
"""

from __future__ import annotations

from collections.abc import Sized
from typing import Any, Protocol

import torch
from torch import nn

from .charcnn import CharCNN, charcnn_feature_length
from .encoding import ALPHABETS, ZHANG_ALPHABET, ZHANG_SPACE_ALPHABET, CharSpec
from .vdcnn import VDCNN, conv_layer_count
from .wordcnn import WordCNN
from .words import ENCODING_KIND, WordEncoder, WordSpec

TEXT_FAMILIES = ("vdcnn", "char-cnn", "word-cnn")

# arch keys each family accepts (besides the informational num_classes / vocab_size)
_ARCH_KEYS: dict[str, set[str]] = {
    "vdcnn": {"depth", "pool", "shortcut", "hidden", "embedding_dim", "k"},
    "char-cnn": {"length", "size", "input", "dropout"},
    "word-cnn": {"buckets", "dim", "widths", "filters", "dropout", "members", "pooling"},
}


class TextEncoder(Protocol):
    """What the service needs of an encoding: the window, a text's prepared units, and batch encoding."""

    @property
    def length(self) -> int: ...

    @property
    def unit(self) -> str: ...  # what length counts: "characters" or "tokens"

    def prepare(self, text: str) -> Sized: ...

    def encode(self, texts: list[str]) -> torch.Tensor: ...

__all__ = [
    "ALPHABETS",
    "TEXT_FAMILIES",
    "VDCNN",
    "ZHANG_ALPHABET",
    "ZHANG_SPACE_ALPHABET",
    "CharCNN",
    "CharSpec",
    "TextEncoder",
    "WordCNN",
    "WordEncoder",
    "WordSpec",
    "build_text_model",
    "charcnn_feature_length",
    "conv_layer_count",
    "count_parameters",
    "text_encoder",
    "text_encoding_from_dict",
]


def build_text_model(family: str, arch: dict[str, Any], num_classes: int, vocab_size: int) -> nn.Module:
    """An untrained text classifier of the given family ("vdcnn", "char-cnn" or "word-cnn")."""
    if family not in _ARCH_KEYS:
        raise ValueError(f"unknown text model family {family!r}; expected one of {TEXT_FAMILIES}")
    # a manifest may record num_classes / vocab_size in arch: they must agree with labels and encoding
    for key, value in (("num_classes", num_classes), ("vocab_size", vocab_size)):
        if key in arch and int(arch[key]) != value:
            raise ValueError(f"arch says {key}={arch[key]} but {value} was given")
    kwargs = {k: v for k, v in arch.items() if k not in ("num_classes", "vocab_size")}
    unknown = set(kwargs) - _ARCH_KEYS[family]
    if unknown:
        raise ValueError(f"unknown {family} arch keys: {sorted(unknown)}")
    if family == "vdcnn":
        return VDCNN(
            num_classes, vocab_size,
            depth=int(kwargs.get("depth", 9)),
            pool=str(kwargs.get("pool", "max")),
            shortcut=bool(kwargs.get("shortcut", False)),
            hidden=int(kwargs.get("hidden", 2048)),
            embedding_dim=int(kwargs.get("embedding_dim", 16)),
            k=int(kwargs.get("k", 8)),
        )
    if family == "word-cnn":
        if "buckets" not in kwargs:
            raise ValueError("a word-cnn arch needs its n-gram bucket count (the encoding hashes into it)")
        return WordCNN(
            num_classes, vocab_size,
            buckets=int(kwargs["buckets"]),
            dim=int(kwargs.get("dim", 64)),
            widths=[int(k) for k in kwargs.get("widths", (2, 3, 4, 5))],
            filters=int(kwargs.get("filters", 128)),
            dropout=float(kwargs.get("dropout", 0.5)),
            members=int(kwargs.get("members", 1)),
            pooling=str(kwargs.get("pooling", "max")),
        )
    if "length" not in kwargs:
        raise ValueError("a char-cnn arch needs its input length (the fully connected width depends on it)")
    return CharCNN(
        num_classes, vocab_size,
        length=int(kwargs["length"]),
        size=str(kwargs.get("size", "small")),
        input=str(kwargs.get("input", "onehot")),
        dropout=float(kwargs.get("dropout", 0.5)),
    )


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters (the fixed one-hot buffer of the char-CNN is not one)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def text_encoding_from_dict(d: dict[str, Any]) -> CharSpec | WordSpec:
    """The encoding of a manifest entry: a WordSpec when its kind is "words", else a CharSpec."""
    return WordSpec.from_dict(d) if d.get("kind") == ENCODING_KIND else CharSpec.from_dict(d)


def text_encoder(d: dict[str, Any], model: nn.Module) -> CharSpec | WordEncoder:
    """What turns texts into the built model's input: the CharSpec itself, or for a word model a WordEncoder
    over the vocabulary stored in its state dict (checked against the encoding's size and sha256). An untrained
    word model has no vocabulary yet: every word is unknown and reaches it through its character n-grams only."""
    spec = text_encoding_from_dict(d)
    if isinstance(spec, CharSpec):
        return spec
    inner = getattr(model, "_orig_mod", model)  # torch.compile wraps the module
    if not isinstance(inner, WordCNN):
        raise ValueError(f"a word encoding needs a word-cnn model, got {type(inner).__name__}")
    if inner.buckets != spec.buckets:
        raise ValueError(f"the model has {inner.buckets} n-gram buckets, the encoding hashes into {spec.buckets}")
    words = inner.vocabulary_words()
    return WordEncoder(spec, words, check=bool(words))
