"""The word-level text encoding: tokens, vocabulary, hashed character n-grams, batch layout."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from models.text import WordEncoder, WordSpec, text_encoding_from_dict
from models.text.encoding import CharSpec
from models.text.words import (
    FIRST_WORD_INDEX,
    UNKNOWN_INDEX,
    build_vocabulary,
    fnv1a_32,
    vocabulary_from_tensor,
    vocabulary_sha256,
    vocabulary_to_tensor,
)
from tests.conftest import ROOT

TRAIN = ["Oil prices rise as OPEC cuts output", "Oil stocks fall; oil prices rise again",
         "Federer wins the final", "the final is on Sunday"]


def encoder(words: list[str] | None = None, **kw: int) -> WordEncoder:
    base = WordSpec(**kw)  # type: ignore[arg-type]
    words = build_vocabulary(base, TRAIN, min_count=2) if words is None else words
    spec = WordSpec(**kw, vocab_size=len(words) + FIRST_WORD_INDEX,  # type: ignore[arg-type]
                    vocabulary_sha256=vocabulary_sha256(words))
    return WordEncoder(spec, words)


def test_tokens_normalise_unicode_html_and_case() -> None:
    spec = WordSpec()
    assert spec.tokens("Ｏｉｌ PRICES ﬁnally rise 5% at AT&T!") == ["oil", "prices", "finally", "rise", "5", "%",
                                                                    "at", "at&t", "!"]
    # AG News' entities: "&amp;", "&lt;b&gt;" and " #39;" whose "&" was lost
    assert spec.tokens("Brazil #39;s rate &lt;b&gt;cut&lt;/b&gt; Q&amp;A") == ["brazil", "s", "rate", "b", "cut",
                                                                               "b", "q&a"]
    assert spec.tokens("U.S. don't stop... co-op") == ["u.s", "don't", "stop", "co", "op"]
    assert spec.tokens("东京 Москва") == ["东京", "москва"]  # any script's letters form tokens
    assert spec.tokens("") == [] and spec.tokens("  ,;: -- ") == []
    assert spec.tokens("a b c d", limit=2) == ["a", "b"]


def test_vocabulary_counts_training_texts_only_in_a_fixed_order() -> None:
    words = build_vocabulary(WordSpec(), TRAIN, min_count=2)
    # counts: oil 3, the 2, prices 2, rise 2, final 2; ties in code-point order
    assert words == ["oil", "final", "prices", "rise", "the"]
    assert build_vocabulary(WordSpec(), TRAIN, min_count=2, max_size=2) == ["oil", "final"]
    assert "opec" in build_vocabulary(WordSpec(), TRAIN, min_count=1)
    enc = encoder()
    x = enc.encode(["OPEC oil"])
    assert x[0, 0, 0].item() == UNKNOWN_INDEX  # seen once in training: not in the vocabulary
    assert x[0, 1, 0].item() == FIRST_WORD_INDEX + words.index("oil")
    assert enc.decode(x[0]) == ["<unk>", "oil"]


def test_fnv1a_matches_the_reference_vectors() -> None:
    # FNV-1a 32-bit test vectors (Fowler-Noll-Vo reference: "" , "a", "foobar")
    assert fnv1a_32(b"") == 0x811C9DC5
    assert fnv1a_32(b"a") == 0xE40C292C
    assert fnv1a_32(b"foobar") == 0xBF9CF968


def test_subwords_are_fasttext_style_ngrams_in_range() -> None:
    spec = WordSpec(min_n=3, max_n=4, buckets=1000, max_subwords=100)
    ids = spec.subword_indices("oil")  # "<oil>": 3-grams <oi oil il> and 4-grams <oil oil>
    assert len(ids) == 3 + 2 and all(1 <= i <= 1000 for i in ids)
    assert ids[0] == 1 + fnv1a_32(b"<oi") % 1000
    assert len(WordSpec(min_n=3, max_n=5, max_subwords=7).subword_indices("internationalisation")) == 7
    # a word never seen in training shares n-grams with one that was: its vector is not a blank
    assert set(spec.subword_indices("oils")) & set(ids)
    assert WordSpec(buckets=0).subword_indices("oil") == []


def test_subword_hashing_is_the_same_in_another_process() -> None:
    """Python's hash() of a str changes with PYTHONHASHSEED; the n-gram indices must not."""
    tokens = ["oil", "москва", "東京", "at&t", "federer"]
    here = {t: WordSpec().subword_indices(t) for t in tokens}
    code = ("import json, sys; from models.text.words import WordSpec; "
            "print(json.dumps({t: WordSpec().subword_indices(t) for t in json.loads(sys.argv[1])}))")
    for seed in ("1", "12345"):
        out = subprocess.run([sys.executable, "-c", code, json.dumps(tokens)], capture_output=True, text=True,
                             check=True, cwd=ROOT, env={**os.environ, "PYTHONHASHSEED": seed})
        assert json.loads(out.stdout) == here


def test_encode_layout_padding_empty_and_long_texts() -> None:
    enc = encoder(max_words=6, buckets=512, max_subwords=5)
    x = enc.encode(["oil prices", "", "the final is on Sunday and more words than the window holds"])
    assert x.dtype == torch.int64 and x.shape == (3, 6, 1 + 5)  # W = the longest (cut at max_words), S = 5
    assert (x[1] == 0).all()  # an empty text: padding only
    assert (x[0, 2:] == 0).all() and (x[0, :2, 0] >= FIRST_WORD_INDEX).all()
    assert (x[2, :, 0] > 0).all()  # cut to the first 6 tokens
    assert len(enc.prepare("the final is on Sunday and more")) == 7 > enc.length  # the service's "truncated"
    # the same text encodes the same whatever its batch (padding to the batch's longest only adds zeros)
    alone = enc.encode(["oil prices"])
    assert torch.equal(x[0, : alone.shape[1], : alone.shape[2]], alone[0])
    assert enc.encode([""]).shape == (1, 1, 1)
    with pytest.raises(TypeError):
        enc.encode("oil")  # type: ignore[arg-type]


def test_corpus_encoding_gives_the_same_rows_as_encode() -> None:
    enc = encoder(max_words=8, buckets=256)
    texts = ["oil prices rise", "Federer wins the final on Sunday", "unseen zebra words"]
    ids, lengths, table = enc.encode_corpus(texts)
    assert lengths.tolist() == [3, 6, 3]
    direct = enc.encode(texts)
    via_table = table[ids.long()]
    assert torch.equal(via_table[:, : direct.shape[1], : direct.shape[2]], direct)
    assert (via_table[:, :, direct.shape[2]:] == 0).all()


def test_spec_round_trip_and_refusals() -> None:
    enc = encoder(buckets=4096)
    d = enc.spec.to_dict()
    assert d["kind"] == "words" and d["length"] == d["max_words"] and d["vocab_size"] == len(enc.words) + 2
    assert WordSpec.from_dict(json.loads(json.dumps(d))) == enc.spec
    assert text_encoding_from_dict(d) == enc.spec
    assert isinstance(text_encoding_from_dict(CharSpec(length=64).to_dict()), CharSpec)
    with pytest.raises(ValueError, match="token pattern"):
        WordSpec.from_dict(d | {"token_pattern": r"\S+"})
    with pytest.raises(ValueError, match="hash"):
        WordSpec.from_dict(d | {"subwords": d["subwords"] | {"hash": "python hash()"}})
    with pytest.raises(ValueError, match="unknown encoding keys"):
        WordSpec.from_dict(d | {"surprise": 1})
    with pytest.raises(ValueError, match="sha256"):
        WordEncoder(enc.spec, [*enc.words[:-1], "zzz"])
    with pytest.raises(ValueError, match="words"):
        WordEncoder(enc.spec, enc.words[:-1])


def test_vocabulary_tensor_round_trip() -> None:
    words = ["oil", "москва", "東京", "at&t", "naïve"]
    t = vocabulary_to_tensor(words)
    assert t.dtype == torch.uint8 and vocabulary_from_tensor(t) == words
    assert vocabulary_from_tensor(vocabulary_to_tensor([])) == []
    with pytest.raises(ValueError):
        vocabulary_to_tensor(["two\nlines"])
