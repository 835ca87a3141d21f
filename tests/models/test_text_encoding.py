"""CharSpec: hand-worked encodings of the character alphabet, unknown characters, padding and Unicode."""

from __future__ import annotations

import json

import pytest
import torch

from models.text.encoding import ALPHABETS, ZHANG_ALPHABET, ZHANG_SPACE_ALPHABET, CharSpec

# Index layout of the default (Zhang et al.) alphabet, worked out by hand:
# 0 padding; a..z 1..26; 0..9 27..36; "-" 37 "," 38 ";" 39 "." 40 "!" 41 "?" 42 ":" 43 "'" 44 '"' 45
# "/" 46 "\" 47 "|" 48 "_" 49 "@" 50 "#" 51 "$" 52 "%" 53 "^" 54 "&" 55 "*" 56 "~" 57 "`" 58 "+" 59
# "=" 60 "<" 61 ">" 62 "(" 63 ")" 64 "[" 65 "]" 66 "{" 67 "}" 68 newline 69; unknown 70 (unknown="index")
UNK = 70


def enc(text: str, length: int = 8, **kw: object) -> list[int]:
    return CharSpec(length=length, **kw).encode([text])[0].tolist()  # type: ignore[arg-type]


def test_default_alphabet_is_zhangs_69_distinct_characters() -> None:
    assert len(ZHANG_ALPHABET) == 69 and len(set(ZHANG_ALPHABET)) == 69
    assert ZHANG_ALPHABET.startswith("abcdefghijklmnopqrstuvwxyz0123456789-,;.!?:") and ZHANG_ALPHABET[-1] == "\n"
    assert " " not in ZHANG_ALPHABET and ZHANG_SPACE_ALPHABET == ZHANG_ALPHABET + " "
    assert ALPHABETS["zhang"] == ZHANG_ALPHABET
    assert CharSpec().length == 1014 and CharSpec().lowercase and CharSpec().unknown == "index"
    assert CharSpec(unknown="index").vocab_size == 71 and CharSpec(unknown="index").unknown_index == UNK
    assert CharSpec(unknown="skip").vocab_size == 70 and CharSpec(unknown="zero").unknown_index is None


def test_hand_worked_indices_padding_and_lowercasing() -> None:
    assert enc("abc", 5) == [1, 2, 3, 0, 0]
    assert enc("Hi!\n9", 6) == [8, 9, 41, 69, 36, 0]
    assert enc("z0-}", 4) == [26, 27, 37, 68]
    assert enc('"\\$', 3) == [45, 47, 52]
    assert enc("", 3) == [0, 0, 0]
    # without lower-casing the capitals are outside the (lower-case) alphabet
    assert enc("Ab", 3, lowercase=False) == [UNK, 2, 0]


def test_unknown_characters_in_each_mode() -> None:
    # the space is not in Zhang's alphabet
    assert enc("a b", 4, unknown="index") == [1, UNK, 2, 0]
    assert enc("a b", 4, unknown="skip") == [1, 2, 0, 0]
    assert enc("a b", 4, unknown="zero") == [1, 0, 2, 0]
    assert enc("a b", 4, alphabet=ZHANG_SPACE_ALPHABET) == [1, 70, 2, 0]  # space is index 70 there; unknown 71


def test_truncation_keeps_the_first_length_characters() -> None:
    assert enc("abcdef", 3) == [1, 2, 3]
    assert enc("a b c d", 3, unknown="index") == [1, UNK, 2]
    # skip drops first, then truncates: the first three kept characters
    assert enc("a b c d", 3, unknown="skip") == [1, 2, 3]
    assert enc("a b c d", 3, unknown="zero") == [1, 0, 2]
    x = CharSpec(length=4).encode(["abcdefgh", "a", ""])
    assert x.dtype == torch.int64 and x.shape == (3, 4)
    assert CharSpec(length=4).encode([]).shape == (0, 4)


def test_nfkc_then_lowercase() -> None:
    assert enc("ＡＢ", 3) == [1, 2, 0]  # full-width capitals -> "AB" -> "ab"
    assert enc("ﬁ①", 4) == [6, 9, 28, 0]  # ligature -> "fi", circled one -> "1"
    assert enc("Ⅻ", 4) == [24, 9, 9, 0]  # roman numeral twelve -> "XII" -> "xii" (lower-cased after NFKC)
    # a decomposed accent composes to the same single (unknown) character as the precomposed one
    assert enc("cafe\u0301", 5) == enc("caf\u00e9", 5) == [3, 1, 6, UNK, 0]
    # a combining mark with no precomposed form stays a separate code point
    assert enc("q\u0308", 3) == [17, UNK, 0]
    assert enc("ab", 3, normalization=None) == [1, 2, 0]
    assert enc("ＡＢ", 3, normalization=None) == [UNK, UNK, 0]


@pytest.mark.parametrize("unknown", ["index", "skip", "zero"])
def test_emoji_cjk_rtl_per_mode(unknown: str) -> None:
    texts = ["😀 北京", "שלום 42", "مرحبا!", "👨\u200d👩\u200d👧", "\ud800x"]
    x = CharSpec(length=8, unknown=unknown).encode(texts)  # type: ignore[arg-type]
    assert x.shape == (5, 8)
    u = {"index": UNK, "zero": 0}.get(unknown)
    if unknown == "skip":
        assert x.tolist() == [
            [0] * 8,
            [31, 29, 0, 0, 0, 0, 0, 0],
            [41, 0, 0, 0, 0, 0, 0, 0],
            [0] * 8,
            [24, 0, 0, 0, 0, 0, 0, 0],
        ]
    else:
        assert x.tolist() == [
            [u, u, u, u, 0, 0, 0, 0],  # emoji, space, two CJK characters
            [u, u, u, u, u, 31, 29, 0],  # four Hebrew letters, space, "4", "2"
            [u, u, u, u, u, 41, 0, 0],  # five Arabic letters, "!"
            [u, u, u, u, u, 0, 0, 0],  # a ZWJ family emoji is five code points
            [u, 24, 0, 0, 0, 0, 0, 0],  # a lone surrogate is just an unknown character
        ]


def test_turkish_dotted_capital_i() -> None:
    # str.lower() turns "İ" into "i" + combining dot above; the dot is outside the alphabet
    assert enc("İ", 3) == [9, UNK, 0]


def test_decode_and_dict_round_trip() -> None:
    spec = CharSpec(alphabet=ZHANG_SPACE_ALPHABET, length=20, lowercase=True, unknown="index")
    assert spec.decode(spec.encode(["Hello, World! 😀"])[0]) == "hello, world! \ufffd"
    for s in (CharSpec(), spec, CharSpec(alphabet="xyz", length=7, lowercase=False, unknown="skip"),
              CharSpec(unknown="zero", normalization=None)):
        d = json.loads(json.dumps(s.to_dict()))
        assert CharSpec.from_dict(d) == s
        assert d["vocab_size"] == s.vocab_size and d["padding_index"] == 0
    d = CharSpec().to_dict()
    assert set(d) == {"alphabet", "length", "lowercase", "unknown", "normalization", "padding_index", "vocab_size"}
    assert d["alphabet"] == ZHANG_ALPHABET and d["length"] == 1014 and d["normalization"] == "NFKC"


def test_invalid_specs_are_rejected() -> None:
    with pytest.raises(ValueError, match="repeats"):
        CharSpec(alphabet="abca")
    with pytest.raises(ValueError):
        CharSpec(alphabet="")
    with pytest.raises(ValueError):
        CharSpec(length=0)
    with pytest.raises(ValueError):
        CharSpec(unknown="drop")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="vocab_size"):
        CharSpec.from_dict(CharSpec().to_dict() | {"vocab_size": 5})
    with pytest.raises(ValueError, match="unknown encoding keys"):
        CharSpec.from_dict(CharSpec().to_dict() | {"uppercase": True})
    with pytest.raises(TypeError):
        CharSpec().encode("a single string")  # type: ignore[arg-type]
