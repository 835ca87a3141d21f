"""Character-level text CNNs (VDCNN, Zhang et al. char-CNN) and the character encoding they read.

A text model is described by ``family``, ``arch`` (the keyword arguments of its class), the number
of classes (from the labels) and the vocabulary size (from the encoding, ``CharSpec.vocab_size``).
Every model takes a LongTensor [N, L] of character indices and returns logits [N, num_classes].
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .charcnn import CharCNN, charcnn_feature_length
from .encoding import ALPHABETS, ZHANG_ALPHABET, ZHANG_SPACE_ALPHABET, CharSpec
from .vdcnn import VDCNN, conv_layer_count

TEXT_FAMILIES = ("vdcnn", "char-cnn")

# arch keys each family accepts (besides the informational num_classes / vocab_size)
_ARCH_KEYS: dict[str, set[str]] = {
    "vdcnn": {"depth", "pool", "shortcut", "hidden", "embedding_dim", "k"},
    "char-cnn": {"length", "size", "input", "dropout"},
}

__all__ = [
    "ALPHABETS",
    "TEXT_FAMILIES",
    "VDCNN",
    "ZHANG_ALPHABET",
    "ZHANG_SPACE_ALPHABET",
    "CharCNN",
    "CharSpec",
    "build_text_model",
    "charcnn_feature_length",
    "conv_layer_count",
    "count_parameters",
]


def build_text_model(family: str, arch: dict[str, Any], num_classes: int, vocab_size: int) -> nn.Module:
    """An untrained text classifier of the given family ("vdcnn" or "char-cnn")."""
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
