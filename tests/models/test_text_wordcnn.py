"""The word-level CNN: shapes, padding invariance, short/empty/long texts, the ensemble, the stored vocabulary."""

from __future__ import annotations

import io
import math

import pytest
import torch

from models.text import WordCNN, WordEncoder, WordSpec, build_text_model, count_parameters, text_encoder
from models.text.words import build_vocabulary, vocabulary_sha256

TEXTS = ["Oil prices rise as OPEC cuts output", "Federer wins the final on Sunday", "oil final"]
ARCH = {"buckets": 1024, "dim": 16, "widths": [2, 3, 4, 5], "filters": 8, "dropout": 0.5}


def make(members: int = 1, max_words: int = 64, pooling: str = "max") -> tuple[WordCNN, WordEncoder]:
    base = WordSpec(max_words=max_words, buckets=ARCH["buckets"])  # type: ignore[arg-type]
    words = build_vocabulary(base, TEXTS, min_count=1)
    spec = WordSpec(max_words=max_words, buckets=1024, vocab_size=len(words) + 2,
                    vocabulary_sha256=vocabulary_sha256(words))
    torch.manual_seed(0)
    model = build_text_model("word-cnn", ARCH | {"members": members, "pooling": pooling}, 4, spec.vocab_size)
    assert isinstance(model, WordCNN)
    model.set_vocabulary(words)
    return model.eval(), WordEncoder(spec, words)


def test_shapes_and_parameter_count() -> None:
    model, enc = make()
    x = enc.encode(TEXTS)
    assert x.shape[0] == 3 and x.shape[1] == 7
    assert model(x).shape == (3, 4)
    v = enc.spec.vocab_size
    # word table + n-gram table (padding row included) + convs (dim * k * filters + bias) + linear (4 widths * 8 -> 4)
    expected = v * 16 + 1025 * 16 + sum(16 * k * 8 + 8 for k in (2, 3, 4, 5)) + (32 * 4 + 4)
    assert count_parameters(model) == expected


@pytest.mark.parametrize("pooling", ["max", "max-mean"])
def test_a_text_reads_the_same_alone_or_padded_in_a_batch(pooling: str) -> None:
    model, enc = make(pooling=pooling)
    with torch.no_grad():  # a positive bias makes all-padding windows win the max unless they are masked
        for conv in model.members[0].convs:
            conv.bias.fill_(1.0)
    long_text = " ".join(["oil prices rise"] * 15)
    with torch.no_grad():
        alone = [model(enc.encode([t])) for t in TEXTS]
        batched = model(enc.encode([*TEXTS, long_text]))
    for i, a in enumerate(alone):
        torch.testing.assert_close(batched[i : i + 1], a, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pooling", ["max", "max-mean"])
def test_short_empty_and_long_texts(pooling: str) -> None:
    model, enc = make(max_words=16, pooling=pooling)
    with torch.no_grad():
        one_word = model(enc.encode(["oil"]))  # shorter than every filter width but 1: the wide convs still read it
        empty = model(enc.encode([""]))
        long = model(enc.encode(["oil " * 5000]))
    assert torch.isfinite(one_word).all() and torch.isfinite(long).all()
    # no token: all pooled features are zero, the logits are the classifier's bias
    torch.testing.assert_close(empty[0], model.members[0].fc.bias)
    assert enc.encode(["oil " * 5000]).shape[1] == 16
    # an unknown word still moves the output through its character n-grams
    with torch.no_grad():
        a, b = model(enc.encode(["zebras"])), model(enc.encode(["quokkas"]))
    assert not torch.allclose(a, b)


def test_max_mean_pooling_is_the_max_and_the_mean_over_the_texts_positions() -> None:
    model, enc = make(pooling="max-mean")
    member = model.members[0]
    with torch.no_grad():
        for conv in member.convs:
            conv.bias.fill_(0.5)  # padding positions would then add 0.5 to a mean that counted them
    x = enc.encode(TEXTS)  # lengths 7, 5, 2 tokens: the shorter texts are padded in the batch
    lengths = [(row[:, 0] != 0).sum().item() for row in x]
    feats = []
    with torch.no_grad():
        h = member.token_vectors(x).transpose(1, 2)
        for i, n in enumerate(lengths):
            parts = []
            for k, conv in zip(member.widths, member.convs, strict=True):
                y = torch.relu(conv(h[i : i + 1, :, :n]))[0]  # the text alone, unpadded: n + k - 1 positions
                assert y.shape[-1] == n + k - 1
                parts += [y.amax(-1), y.mean(-1)]
            feats.append(torch.cat(parts))
        expected = member.fc(torch.stack(feats))
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    # twice the features of max pooling alone: the classifier reads filters * widths * 2
    assert member.fc.in_features == 2 * 8 * 4
    assert count_parameters(model) == count_parameters(make()[0]) + 32 * 4


def test_ensemble_averages_member_probabilities() -> None:
    model, enc = make(members=2)
    x = enc.encode(TEXTS)
    with torch.no_grad():
        member = model.member_logits(x)
        out = model(x)
    assert member.shape == (2, 3, 4)
    torch.testing.assert_close(out.softmax(-1), member.softmax(-1).mean(0))
    torch.testing.assert_close(out.exp().sum(-1), torch.ones(3))  # already log-probabilities
    assert not torch.allclose(member[0], member[1])  # independently initialised
    assert math.isclose(count_parameters(model), 2 * count_parameters(make()[0]))


def test_vocabulary_travels_in_the_state_dict() -> None:
    model, enc = make()
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    fresh = build_text_model("word-cnn", ARCH, 4, enc.spec.vocab_size)
    assert isinstance(fresh, WordCNN) and fresh.vocabulary_words() == []
    fresh.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
    assert fresh.vocabulary_words() == enc.words
    served = text_encoder(enc.spec.to_dict(), fresh)
    assert isinstance(served, WordEncoder) and served.words == enc.words
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(served.encode(TEXTS)), model(enc.encode(TEXTS)))
    # an untrained model has no vocabulary: every word is unknown, read through its n-grams
    untrained = text_encoder(enc.spec.to_dict(), build_text_model("word-cnn", ARCH, 4, enc.spec.vocab_size))
    assert isinstance(untrained, WordEncoder) and (untrained.encode(TEXTS)[..., 0] <= 1).all()
    # a vocabulary that is not the manifest's is refused
    other = build_text_model("word-cnn", ARCH, 4, enc.spec.vocab_size)
    assert isinstance(other, WordCNN)
    other.set_vocabulary([*enc.words[:-1], "zzz"])
    with pytest.raises(ValueError, match="sha256"):
        text_encoder(enc.spec.to_dict(), other)
    with pytest.raises(ValueError, match="buckets"):
        text_encoder(enc.spec.to_dict(), build_text_model("word-cnn", ARCH | {"buckets": 64}, 4, enc.spec.vocab_size))


def test_builder_refuses_bad_arch() -> None:
    with pytest.raises(ValueError, match="unknown word-cnn arch keys"):
        build_text_model("word-cnn", ARCH | {"depth": 9}, 4, 10)
    with pytest.raises(ValueError, match="bucket count"):
        build_text_model("word-cnn", {"dim": 8}, 4, 10)
    with pytest.raises(ValueError, match="vocab_size"):
        build_text_model("word-cnn", ARCH | {"vocab_size": 11}, 4, 10)
    with pytest.raises(ValueError):
        build_text_model("word-cnn", ARCH | {"widths": [0, 3]}, 4, 10)
    with pytest.raises(ValueError, match="pooling"):
        build_text_model("word-cnn", ARCH | {"pooling": "mean"}, 4, 10)
