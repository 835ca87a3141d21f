"""Character encoding for the character-level text CNNs: text -> fixed-length LongTensor of indices.

Index layout (the same for every alphabet):

- 0 is padding (and, with ``unknown="zero"``, every character outside the alphabet);
- 1 .. len(alphabet) are the alphabet's characters in order;
- len(alphabet) + 1 is the unknown-character index, present only with ``unknown="index"``.

Each text is prepared as follows, in this order:

1. Unicode normalisation (NFKC by default), so compatibility forms meet the alphabet: full-width
   ``Ａ`` becomes ``A``, the ligature ``ﬁ`` becomes ``fi``, ``①`` becomes ``1``, the non-breaking
   space becomes a space. NFKC does not strip accents (``é`` stays one character outside the
   default alphabet) and leaves emoji, CJK and right-to-left scripts as they are.
2. Lower-casing with ``str.lower`` (when ``lowercase`` is on); it runs after NFKC because NFKC can
   produce capitals (``Ⅻ`` -> ``XII``).
3. Each code point is looked up; code points outside the alphabet (emoji, CJK, Arabic, combining
   marks left after NFKC, ...) become the unknown index, are dropped, or become padding, according
   to ``unknown``. Each code point counts as one character: an emoji made of several code points
   (a ZWJ sequence, a flag) takes several positions.
4. Truncation keeps the first ``length`` positions (after dropping, with ``unknown="skip"``);
   shorter texts are padded with 0 on the right.

The default alphabet is the one of Zhang, Zhao and LeCun (2015), listed in the paper as 70
characters: the 26 lower-case letters, the 10 digits, the 33 symbols
``-,;.!?:'"/\\|_@#$%^&*~`+-=<>()[]{}`` and the newline. The paper's list names ``-`` twice, so it
holds 69 distinct characters (``ZHANG_ALPHABET`` below, in the paper's order, the second ``-``
removed, newline last). The space is not in it (as in the paper, where a space is a zero
vector); ``ZHANG_SPACE_ALPHABET`` adds it, which VDCNN's paper does too.
"""

from __future__ import annotations

import functools
import unicodedata
from dataclasses import asdict, dataclass
from typing import Any, ClassVar, Literal, cast

import numpy as np
import torch

UnknownMode = Literal["index", "skip", "zero"]
UNKNOWN_MODES: tuple[str, ...] = ("index", "skip", "zero")
PADDING_INDEX = 0
_MAX_CODE_POINT = 0x110000

# Zhang et al. 2015, section 2.2, in the paper's order; the duplicated "-" kept once, newline last
ZHANG_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789-,;.!?:'\"/\\|_@#$%^&*~`+=<>()[]{}\n"
ZHANG_SPACE_ALPHABET = ZHANG_ALPHABET + " "
ALPHABETS: dict[str, str] = {"zhang": ZHANG_ALPHABET, "zhang+space": ZHANG_SPACE_ALPHABET}

# sentinel in the lookup table for "drop this code point" (unknown="skip")
_SKIP = -1


@functools.lru_cache(maxsize=8)
def _lookup_table(alphabet: str, unknown_code: int) -> np.ndarray:
    """Code point -> index for every Unicode code point (built once per alphabet; 4.5 MB as int32)."""
    table = np.full(_MAX_CODE_POINT, unknown_code, dtype=np.int32)
    for i, ch in enumerate(alphabet):
        table[ord(ch)] = i + 1
    table.setflags(write=False)
    return table


@dataclass(frozen=True)
class CharSpec:
    """How texts become index tensors; travels with a checkpoint as its manifest "encoding"."""

    unit: ClassVar[str] = "characters"  # what `length` counts
    alphabet: str = ZHANG_ALPHABET
    length: int = 1014
    lowercase: bool = True
    unknown: UnknownMode = "index"
    normalization: str | None = "NFKC"

    def __post_init__(self) -> None:
        if not self.alphabet:
            raise ValueError("the alphabet is empty")
        if len(set(self.alphabet)) != len(self.alphabet):
            dup = sorted({c for c in self.alphabet if self.alphabet.count(c) > 1})
            raise ValueError(f"the alphabet repeats characters: {dup!r}")
        if self.length < 1:
            raise ValueError(f"length must be positive, got {self.length}")
        if self.unknown not in UNKNOWN_MODES:
            raise ValueError(f"unknown must be one of {UNKNOWN_MODES}, got {self.unknown!r}")
        if self.normalization not in (None, "NFC", "NFKC", "NFD", "NFKD"):
            raise ValueError(f"normalization must be NFC, NFKC, NFD, NFKD or None, got {self.normalization!r}")

    @property
    def unknown_index(self) -> int | None:
        """The index of characters outside the alphabet (None unless unknown="index")."""
        return len(self.alphabet) + 1 if self.unknown == "index" else None

    @property
    def vocab_size(self) -> int:
        """Number of distinct indices: padding + alphabet (+ unknown); the embedding's row count."""
        return len(self.alphabet) + 1 + (1 if self.unknown == "index" else 0)

    def prepare(self, text: str) -> str:
        """The text after normalisation and lower-casing (before the alphabet lookup)."""
        if self.normalization:
            text = unicodedata.normalize(self.normalization, text)  # type: ignore[arg-type]
        return text.lower() if self.lowercase else text

    def encode(self, texts: list[str]) -> torch.Tensor:
        """Encode texts into a LongTensor [N, length] of indices (0 = padding)."""
        if isinstance(texts, str):  # a lone string would silently become one text per character
            raise TypeError("encode takes a list of texts, not a single string")
        unknown_code = {"index": len(self.alphabet) + 1, "skip": _SKIP, "zero": PADDING_INDEX}[self.unknown]
        table = _lookup_table(self.alphabet, unknown_code)
        out = np.zeros((len(texts), self.length), dtype=np.int64)
        for row, text in enumerate(texts):
            text = self.prepare(text)
            if self.unknown != "skip":
                # nothing is dropped, so only the first `length` code points can matter
                text = text[: self.length]
            # UTF-32 gives one uint32 per code point; surrogatepass keeps lone surrogates (they become unknown)
            cps = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
            codes = table[cps]
            if self.unknown == "skip":
                codes = codes[codes != _SKIP][: self.length]
            out[row, : len(codes)] = codes
        return torch.from_numpy(out)

    def decode(self, indices: torch.Tensor | list[int]) -> str:
        """Readable form of one encoded row: padding dropped, unknown shown as U+FFFD (for debugging)."""
        chars = []
        for i in (indices.tolist() if isinstance(indices, torch.Tensor) else indices):
            if i == PADDING_INDEX:
                continue
            chars.append(self.alphabet[i - 1] if i <= len(self.alphabet) else "\ufffd")
        return "".join(chars)

    def to_dict(self) -> dict[str, Any]:
        """Manifest form (the derived padding index and vocabulary size are included for readers)."""
        d = asdict(self)
        d["padding_index"] = PADDING_INDEX
        d["vocab_size"] = self.vocab_size
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CharSpec:
        """Build a spec from its manifest form, checking the derived fields when present."""
        extra = set(d) - {"alphabet", "length", "lowercase", "unknown", "normalization", "padding_index",
                          "vocab_size"}
        if extra:
            raise ValueError(f"unknown encoding keys: {sorted(extra)}")
        spec = cls(
            alphabet=str(d["alphabet"]),
            length=int(d["length"]),
            lowercase=bool(d.get("lowercase", True)),
            unknown=cast(UnknownMode, str(d.get("unknown", "index"))),
            normalization=d.get("normalization", "NFKC"),
        )
        if "vocab_size" in d and int(d["vocab_size"]) != spec.vocab_size:
            raise ValueError(f"encoding says vocab_size {d['vocab_size']} but its alphabet gives {spec.vocab_size}")
        if "padding_index" in d and int(d["padding_index"]) != PADDING_INDEX:
            raise ValueError(f"padding index must be {PADDING_INDEX}, got {d['padding_index']}")
        return spec
