"""Word tokenisation, the word vocabulary and hashed character n-grams for the word-level text CNN.

A text becomes a LongTensor [N, W, 1 + S]: for each of its first W tokens (W = the longest text of the batch,
at most ``max_words``), column 0 is the token's word index and columns 1..S its hashed character n-gram
indices (S = the most n-grams of any token in the batch). Index 0 is padding in both: a padding position has
word index 0 and no n-grams, so every text reads the same whatever else is in its batch.

- Word indices: 0 padding, 1 unknown (a token outside the vocabulary), 2 .. vocab_size - 1 the vocabulary's
  words in order. The vocabulary is built from training rows only (`build_vocabulary`) and travels with the
  checkpoint (the model's ``vocabulary`` buffer; its sha256 is in the manifest's encoding, `vocabulary_sha256`).
- Character n-grams, as fastText's subwords (Bojanowski et al. 2017): the token between ``<`` and ``>``, every
  n-gram of ``min_n`` .. ``max_n`` code points (shorter n first, then left to right), at most ``max_subwords``
  of them; each one hashed with 32-bit FNV-1a over its UTF-8 bytes into ``buckets`` rows (index = 1 + hash %
  buckets). FNV-1a is written out here: it gives the same index in every process and on every machine
  (Python's ``hash()`` of a string is salted per process and must never be used for this).

Text preparation, in order: Unicode normalisation (NFKC), HTML entities decoded (``&amp;``, and AG News'
``#39;`` whose ``&`` was lost), lower-casing, then tokens are runs of letters and digits (any script) that may
contain inner ``'``, ``’``, ``.`` or ``&`` (``u.s``, ``at&t``, ``don't``), and the symbols ``$ % ? !`` alone.
Everything else (spaces, other punctuation) separates tokens.
"""

from __future__ import annotations

import hashlib
import html
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

PADDING_INDEX = 0
UNKNOWN_INDEX = 1
FIRST_WORD_INDEX = 2
ENCODING_KIND = "words"
TOKEN_PATTERN = r"[^\W_]+(?:['’.&][^\W_]+)*|[$%?!]"
_TOKEN = re.compile(TOKEN_PATTERN)
_LOST_AMPERSAND = re.compile(r"(?<![&\w])#(\d{2,5});")
_FNV_OFFSET = 0x811C9DC5
_FNV_PRIME = 0x01000193
_CACHE_LIMIT = 200_000


def fnv1a_32(data: bytes) -> int:
    """32-bit FNV-1a hash of a byte string (deterministic across processes, unlike Python's hash())."""
    h = _FNV_OFFSET
    for byte in data:
        h = ((h ^ byte) * _FNV_PRIME) & 0xFFFFFFFF
    return h


def vocabulary_sha256(words: Sequence[str]) -> str:
    """sha256 of the vocabulary as stored: its words joined by newlines, UTF-8."""
    return hashlib.sha256("\n".join(words).encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class WordSpec:
    """How texts become word + character n-gram indices; travels in the manifest entry's "encoding"."""

    max_words: int = 256
    lowercase: bool = True
    normalization: str | None = "NFKC"
    html_unescape: bool = True
    min_n: int = 3
    max_n: int = 5
    buckets: int = 32768
    max_subwords: int = 40
    vocab_size: int = FIRST_WORD_INDEX  # padding + unknown + the vocabulary's words
    vocabulary_sha256: str = ""

    def __post_init__(self) -> None:
        if self.max_words < 1:
            raise ValueError(f"max_words must be positive, got {self.max_words}")
        if self.buckets < 0:
            raise ValueError(f"buckets must be >= 0 (0: no character n-grams), got {self.buckets}")
        if self.buckets and not 1 <= self.min_n <= self.max_n:
            raise ValueError(f"need 1 <= min_n <= max_n, got {self.min_n}, {self.max_n}")
        if self.buckets and self.max_subwords < 1:
            raise ValueError(f"max_subwords must be positive, got {self.max_subwords}")
        if self.vocab_size < FIRST_WORD_INDEX:
            raise ValueError(f"vocab_size counts padding and unknown: at least {FIRST_WORD_INDEX}, "
                             f"got {self.vocab_size}")
        if self.normalization not in (None, "NFC", "NFKC", "NFD", "NFKD"):
            raise ValueError(f"normalization must be NFC, NFKC, NFD, NFKD or None, got {self.normalization!r}")

    @property
    def length(self) -> int:
        """The window: tokens the model reads (the rest of a text is cut)."""
        return self.max_words

    def normalise(self, text: str) -> str:
        """The text after Unicode normalisation, HTML-entity decoding and lower-casing (before tokenising)."""
        if self.normalization:
            text = unicodedata.normalize(self.normalization, text)  # type: ignore[arg-type]
        if self.html_unescape:
            text = _LOST_AMPERSAND.sub(lambda m: _code_point(m.group(1)), text)
            text = html.unescape(text)
        return text.lower() if self.lowercase else text

    def tokens(self, text: str, limit: int | None = None) -> list[str]:
        """The text's tokens (all of them, or the first `limit`)."""
        out: list[str] = []
        for m in _TOKEN.finditer(self.normalise(text)):
            if limit is not None and len(out) >= limit:
                break
            out.append(m.group(0))
        return out

    def subword_indices(self, token: str) -> list[int]:
        """The token's hashed character n-gram indices (1 .. buckets; empty when buckets is 0)."""
        if not self.buckets:
            return []
        s = f"<{token}>"
        out: list[int] = []
        for n in range(self.min_n, self.max_n + 1):
            for i in range(len(s) - n + 1):
                out.append(1 + fnv1a_32(s[i : i + n].encode("utf-8", "surrogatepass")) % self.buckets)
                if len(out) >= self.max_subwords:
                    return out
        return out

    def to_dict(self) -> dict[str, Any]:
        """Manifest form."""
        return {"kind": ENCODING_KIND, "max_words": self.max_words, "length": self.max_words,
                "lowercase": self.lowercase, "normalization": self.normalization, "html_unescape": self.html_unescape,
                "token_pattern": TOKEN_PATTERN,
                "subwords": {"min_n": self.min_n, "max_n": self.max_n, "buckets": self.buckets,
                             "max_per_word": self.max_subwords, "hash": "fnv1a-32 of UTF-8 bytes"},
                "padding_index": PADDING_INDEX, "unknown_index": UNKNOWN_INDEX, "vocab_size": self.vocab_size,
                "vocabulary_sha256": self.vocabulary_sha256}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> WordSpec:
        """A spec from its manifest form (refusing an unknown tokeniser or hash)."""
        if d.get("kind") != ENCODING_KIND:
            raise ValueError(f"not a word encoding: kind {d.get('kind')!r}")
        extra = set(d) - {"kind", "max_words", "length", "lowercase", "normalization", "html_unescape",
                          "token_pattern", "subwords", "padding_index", "unknown_index", "vocab_size",
                          "vocabulary_sha256"}
        if extra:
            raise ValueError(f"unknown encoding keys: {sorted(extra)}")
        if d.get("token_pattern", TOKEN_PATTERN) != TOKEN_PATTERN:
            raise ValueError("the encoding's token pattern is not this version's tokeniser")
        if (int(d.get("padding_index", PADDING_INDEX)), int(d.get("unknown_index", UNKNOWN_INDEX))) != (
                PADDING_INDEX, UNKNOWN_INDEX):
            raise ValueError(f"padding and unknown indices must be {PADDING_INDEX} and {UNKNOWN_INDEX}")
        sub = dict(d.get("subwords") or {})
        if sub.get("hash", "fnv1a-32 of UTF-8 bytes") != "fnv1a-32 of UTF-8 bytes":
            raise ValueError(f"unknown subword hash {sub.get('hash')!r}")
        max_words = int(d["max_words"])
        if "length" in d and int(d["length"]) != max_words:
            raise ValueError(f"encoding says length {d['length']} but max_words {max_words}")
        return cls(max_words=max_words, lowercase=bool(d.get("lowercase", True)),
                   normalization=d.get("normalization", "NFKC"), html_unescape=bool(d.get("html_unescape", True)),
                   min_n=int(sub.get("min_n", 3)), max_n=int(sub.get("max_n", 5)), buckets=int(sub.get("buckets", 0)),
                   max_subwords=int(sub.get("max_per_word", 40)), vocab_size=int(d["vocab_size"]),
                   vocabulary_sha256=str(d.get("vocabulary_sha256", "")))


def _code_point(digits: str) -> str:
    value = int(digits)
    return chr(value) if value < 0x110000 else f"#{digits};"


def build_vocabulary(spec: WordSpec, texts: Iterable[str], *, min_count: int = 2, max_size: int = 0) -> list[str]:
    """The words of the training texts seen at least min_count times, most frequent first (ties in code-point
    order), at most max_size of them (0: no limit). Only training rows may be given."""
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(spec.tokens(text))
    words = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
    return words[:max_size] if max_size else words


class WordEncoder:
    """A WordSpec with its vocabulary: texts -> LongTensor [N, W, 1 + S] (see the module docstring)."""

    unit = "tokens"  # what `length` counts

    def __init__(self, spec: WordSpec, words: Sequence[str], *, check: bool = True) -> None:
        if check:
            if len(words) + FIRST_WORD_INDEX != spec.vocab_size:
                raise ValueError(f"the vocabulary has {len(words)} words, the encoding expects "
                                 f"{spec.vocab_size - FIRST_WORD_INDEX}")
            if spec.vocabulary_sha256 and vocabulary_sha256(words) != spec.vocabulary_sha256:
                raise ValueError("the vocabulary's sha256 differs from the encoding's vocabulary_sha256")
        if len(words) + FIRST_WORD_INDEX > spec.vocab_size:
            raise ValueError(f"{len(words)} words do not fit a vocab_size of {spec.vocab_size}")
        self.spec = spec
        self.words = list(words)
        self.index = {w: i + FIRST_WORD_INDEX for i, w in enumerate(self.words)}
        if len(self.index) != len(self.words):
            raise ValueError("the vocabulary repeats words")
        self._cache: dict[str, tuple[int, ...]] = {}

    @property
    def length(self) -> int:
        """The window in tokens (see WordSpec.length)."""
        return self.spec.max_words

    def prepare(self, text: str) -> list[str]:
        """The text's tokens (all of them: more than `length` means the text is cut)."""
        return self.spec.tokens(text)

    def token_row(self, token: str) -> tuple[int, ...]:
        """(word index, n-gram indices...) of one token (cached)."""
        row = self._cache.get(token)
        if row is None:
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache.clear()
            row = (self.index.get(token, UNKNOWN_INDEX), *self.spec.subword_indices(token))
            self._cache[token] = row
        return row

    def encode(self, texts: list[str]) -> torch.Tensor:
        """Encode texts into a LongTensor [N, W, 1 + S] (W, S: the batch's longest; both at least 1)."""
        if isinstance(texts, str):  # a lone string would silently become one text per character
            raise TypeError("encode takes a list of texts, not a single string")
        rows = [[self.token_row(t) for t in self.spec.tokens(text, self.spec.max_words)] for text in texts]
        width = max([1, *(len(r) for r in rows)])
        depth = max([1, *(len(t) for r in rows for t in r)])
        out = np.zeros((len(texts), width, depth), dtype=np.int64)
        for i, r in enumerate(rows):
            for j, t in enumerate(r):
                out[i, j, : len(t)] = t
        return torch.from_numpy(out)

    def encode_corpus(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A compact form of many texts for training: token-type ids [N, max_words] (0 = padding), the lengths
        [N], and the type table [T, 1 + S] (row 0 all padding) that maps a type to its encode() row."""
        types: dict[str, int] = {}
        table: list[tuple[int, ...]] = [(PADDING_INDEX,)]
        ids = np.zeros((len(texts), self.spec.max_words), dtype=np.int32)
        lengths = np.zeros(len(texts), dtype=np.int64)
        for i, text in enumerate(texts):
            toks = self.spec.tokens(text, self.spec.max_words)
            lengths[i] = len(toks)
            for j, tok in enumerate(toks):
                k = types.get(tok)
                if k is None:
                    k = types[tok] = len(table)
                    table.append(self.token_row(tok))
                ids[i, j] = k
        depth = max(len(t) for t in table)
        tab = np.zeros((len(table), depth), dtype=np.int64)
        for k, t in enumerate(table):
            tab[k, : len(t)] = t
        width = max(1, int(lengths.max()) if len(lengths) else 1)
        return torch.from_numpy(ids[:, :width].copy()), torch.from_numpy(lengths), torch.from_numpy(tab)

    def decode(self, row: torch.Tensor) -> list[str]:
        """The words of one encoded text (unknown tokens as "<unk>"), for debugging."""
        out = []
        for i in row[:, 0].tolist():
            if i == PADDING_INDEX:
                break
            out.append(self.words[i - FIRST_WORD_INDEX] if i >= FIRST_WORD_INDEX else "<unk>")
        return out


def vocabulary_to_tensor(words: Sequence[str]) -> torch.Tensor:
    """The vocabulary as a uint8 tensor (UTF-8 of the words joined by newlines), storable in a state dict."""
    if any("\n" in w or not w for w in words):
        raise ValueError("vocabulary words must be non-empty and contain no newline")
    data = "\n".join(words).encode("utf-8")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).clone() if data else torch.zeros(0, dtype=torch.uint8)


def vocabulary_from_tensor(t: torch.Tensor) -> list[str]:
    """The inverse of vocabulary_to_tensor."""
    if t.numel() == 0:
        return []
    return bytes(t.detach().cpu().to(torch.uint8).numpy().tobytes()).decode("utf-8").split("\n")
