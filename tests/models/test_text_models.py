"""VDCNN and the Zhang et al. char-CNN: shapes, layer counts and hand-worked parameter counts."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from models.text import (
    VDCNN,
    CharCNN,
    CharSpec,
    build_text_model,
    charcnn_feature_length,
    conv_layer_count,
    count_parameters,
)
from models.text.vdcnn import kmax_pool

VOCAB = CharSpec().vocab_size  # 69 characters + padding + unknown = 71
VOCAB_ZERO = CharSpec(unknown="zero").vocab_size  # 70: the paper's 69 one-hot channels + padding


def on_meta(family: str, arch: dict[str, object], num_classes: int = 4, vocab: int = VOCAB) -> nn.Module:
    """Build on the meta device: parameter shapes without allocating (or initialising) the weights."""
    with torch.device("meta"):
        return build_text_model(family, arch, num_classes, vocab)


@pytest.mark.parametrize("depth", [9, 17, 29])
@pytest.mark.parametrize("pool", ["max", "kmax", "conv"])
@pytest.mark.parametrize("shortcut", [False, True])
def test_vdcnn_output_shapes(depth: int, pool: str, shortcut: bool) -> None:
    torch.manual_seed(0)
    model = build_text_model("vdcnn", {"depth": depth, "pool": pool, "shortcut": shortcut, "hidden": 16}, 5, VOCAB)
    x = torch.randint(0, VOCAB, (3, 64))
    model.train()
    assert model(x).shape == (3, 5)
    model.eval()
    with torch.no_grad():
        out = model(x[:1])
    assert out.shape == (1, 5) and torch.isfinite(out).all()


def test_vdcnn_trains_end_to_end_and_padding_is_zero() -> None:
    torch.manual_seed(0)
    model = VDCNN(3, VOCAB, depth=9, pool="kmax", shortcut=True, hidden=8)
    assert torch.equal(model.embedding.weight[0], torch.zeros(16))
    loss = model(torch.randint(0, VOCAB, (4, 80))).logsumexp(-1).mean()
    loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if n != "embedding.weight")


@pytest.mark.parametrize("depth", [9, 17, 29, 49])
def test_vdcnn_depth_counts_the_papers_conv_layers(depth: int) -> None:
    # the paper's table 2: depth = first conv + 2 per block; blocks (1,1,1,1), (2,2,2,2), (5,5,2,2), (8,8,5,3)
    blocks = {9: 4, 17: 8, 29: 14, 49: 24}[depth]
    assert 1 + 2 * blocks == depth
    plain = on_meta("vdcnn", {"depth": depth})
    assert isinstance(plain, VDCNN) and conv_layer_count(plain) == depth
    assert sum(isinstance(m, nn.Conv1d) for m in plain.modules()) == depth
    # shortcuts add three 1x1 projections (where 64->128, 128->256, 256->512) that depth does not count
    res = on_meta("vdcnn", {"depth": depth, "shortcut": True, "pool": "conv"})
    assert isinstance(res, VDCNN) and conv_layer_count(res) == depth
    assert sum(isinstance(m, nn.Conv1d) for m in res.modules()) == depth + 3


def test_vdcnn9_parameter_count_by_hand() -> None:
    # VDCNN-9, max pooling, no shortcut, 4 classes, default alphabet (vocab 71), hidden 2048, L = 1014
    # (the count does not depend on L: the final k-max pooling always leaves 8 positions).
    #   embedding           71 * 16                                       =      1,136
    #   first conv          16 * 64 * 3 + 64 (bias)                       =      3,136
    #   block 64->64        64*64*3 + 128 (BN) + 64*64*3 + 128            =     24,832
    #   block 64->128       64*128*3 + 256 + 128*128*3 + 256              =     74,240
    #   block 128->256      128*256*3 + 512 + 256*256*3 + 512             =    295,936
    #   block 256->512      256*512*3 + 1024 + 512*512*3 + 1024           =  1,181,696
    #   convolutional part                                                 =  1,580,976
    #   FC 4096->2048       4096*2048 + 2048                              =  8,390,656
    #   FC 2048->2048       2048*2048 + 2048                              =  4,196,352
    #   FC 2048->4          2048*4 + 4                                    =      8,196
    #   head                                                               = 12,595,204
    #   total                                                              = 14,176,180
    model = on_meta("vdcnn", {"depth": 9, "pool": "max", "hidden": 2048})
    assert isinstance(model, VDCNN)
    conv_part = sum(p.numel() for m in (model.embedding, model.first_conv, model.features) for p in m.parameters())
    assert conv_part == 1_580_976
    assert count_parameters(model.classifier) == 12_595_204
    assert count_parameters(model) == 14_176_180
    # pooling variants add no parameters; depth 17 adds one more same-width block per stage:
    # 24,832 + (2*128*128*3 + 512) + (2*256*256*3 + 1024) + (2*512*512*3 + 2048) = 2,092,800
    for pool in ("kmax", "conv"):
        assert count_parameters(on_meta("vdcnn", {"depth": 9, "pool": pool})) == 14_176_180
    assert count_parameters(on_meta("vdcnn", {"depth": 17})) == 14_176_180 + 2_092_800
    # depth 29 (5,5,2,2): 4*24,832 + 4*98,816 + 394,240 + 1,574,912 = 2,463,744 more than depth 9
    assert count_parameters(on_meta("vdcnn", {"depth": 29})) == 14_176_180 + 2_463_744
    # shortcut projections: (64*128 + 256) + (128*256 + 512) + (256*512 + 1024) = 173,824
    assert count_parameters(on_meta("vdcnn", {"depth": 9, "shortcut": True})) == 14_176_180 + 173_824


def test_charcnn_parameter_counts_by_hand() -> None:
    # Zhang et al. 2015, L = 1014, one-hot over the 69 characters (unknown="zero": vocab 70), 4 classes.
    # length: 1014 -conv7-> 1008 -pool3-> 336 -conv7-> 330 -pool3-> 110 -4x conv3-> 102 -pool3-> 34
    # = (1014 - 96) / 27, the paper's l6.
    # small (256 features, FC 1024):
    #   conv1 69*256*7 + 256 = 123,904; conv2 256*256*7 + 256 = 459,008; conv3..6 4 * (256*256*3 + 256) = 787,456
    #   FC 34*256=8704 -> 1024: 8,913,920; FC 1024 -> 1024: 1,049,600; out 1024*4 + 4 = 4,100
    #   total 1,370,368 + 9,967,620 = 11,337,988
    # large (1024 features, FC 2048):
    #   conv1 69*1024*7 + 1024 = 495,616; conv2 1024*1024*7 + 1024 = 7,341,056; conv3..6 4 * 3,146,752 = 12,587,008
    #   FC 34*1024=34816 -> 2048: 71,305,216; FC 2048 -> 2048: 4,196,352; out 2048*4 + 4 = 8,196
    #   total 20,423,680 + 75,509,764 = 95,933,444
    assert charcnn_feature_length(1014) == (1014 - 96) // 27 == 34
    small = on_meta("char-cnn", {"length": 1014, "size": "small"}, vocab=VOCAB_ZERO)
    large = on_meta("char-cnn", {"length": 1014, "size": "large"}, vocab=VOCAB_ZERO)
    assert isinstance(small, CharCNN) and isinstance(large, CharCNN)
    assert small.classifier[0].in_features == 8704 and large.classifier[0].in_features == 34816
    assert count_parameters(small) == 11_337_988
    assert count_parameters(large) == 95_933_444
    # six convolutions; the one-hot table is a buffer, not a parameter, and stays out of the state_dict
    assert sum(isinstance(m, nn.Conv1d) for m in small.modules()) == 6
    assert "onehot" not in small.state_dict()
    # a learned embedding of the same width instead of the one-hot adds 70 * 69 parameters
    emb = on_meta("char-cnn", {"length": 1014, "size": "small", "input": "embedding"}, vocab=VOCAB_ZERO)
    assert count_parameters(emb) == 11_337_988 + 70 * 69


@pytest.mark.parametrize("size", ["small", "large"])
@pytest.mark.parametrize("input_kind", ["onehot", "embedding"])
def test_charcnn_output_shapes(size: str, input_kind: str) -> None:
    torch.manual_seed(0)
    model = build_text_model("char-cnn", {"length": 128, "size": size, "input": input_kind}, 3, VOCAB)
    x = torch.randint(0, VOCAB, (2, 128))
    assert model(x).shape == (2, 3)
    model.eval()
    with torch.no_grad():
        assert model(x[:1]).shape == (1, 3)


def test_charcnn_onehot_is_the_papers_quantisation() -> None:
    model = CharCNN(2, 5, length=123)
    assert model.feature_length == 1
    assert torch.equal(model.onehot, torch.tensor([[0, 0, 0, 0], [1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0],
                                                   [0, 0, 0, 1]], dtype=torch.float32))


def test_length_checks() -> None:
    assert VDCNN(2, VOCAB, pool="max", hidden=4).min_length == 57  # ceil-halving thrice must leave 8
    assert VDCNN(2, VOCAB, pool="kmax", hidden=4).min_length == 64  # floor-halving thrice must leave 8
    with pytest.raises(ValueError, match="minimum"):
        VDCNN(2, VOCAB, hidden=4)(torch.zeros(1, 40, dtype=torch.long))
    with pytest.raises(ValueError, match="too short"):
        CharCNN(2, VOCAB, length=122)
    with pytest.raises(ValueError, match="length 128"):
        CharCNN(2, VOCAB, length=128)(torch.zeros(1, 130, dtype=torch.long))


def test_kmax_pool_keeps_order() -> None:
    x = torch.tensor([[[3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0]]])
    # the three largest are 9 (pos 5), 6 (pos 7), 5 (pos 4): kept in positional order
    assert kmax_pool(x, 3).tolist() == [[[5.0, 9.0, 6.0]]]


def test_builder_rejects_bad_arch() -> None:
    with pytest.raises(ValueError, match="family"):
        build_text_model("lstm", {}, 2, VOCAB)
    with pytest.raises(ValueError, match="arch keys"):
        build_text_model("vdcnn", {"depht": 9}, 2, VOCAB)
    with pytest.raises(ValueError, match="num_classes"):
        build_text_model("vdcnn", {"num_classes": 3}, 2, VOCAB)
    with pytest.raises(ValueError, match="length"):
        build_text_model("char-cnn", {"size": "small"}, 2, VOCAB)
    with pytest.raises(ValueError, match="depth"):
        build_text_model("vdcnn", {"depth": 10}, 2, VOCAB)
    with pytest.raises(ValueError, match="pool"):
        build_text_model("vdcnn", {"pool": "avg"}, 2, VOCAB)
    # informational keys that agree are accepted
    with torch.device("meta"):
        build_text_model("vdcnn", {"depth": 9, "num_classes": 2, "vocab_size": VOCAB, "hidden": 4}, 2, VOCAB)
