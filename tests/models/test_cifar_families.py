"""The CIFAR SE-ResNet and wide-ResNet families: parameter counts against the papers and derived from the
architecture, block structure, and a tiny train-and-serve run of each through the trainer and the registry."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from app import cli
from app.runtime.registry import ModelRegistry, load_manifest
from models.cifar_resnet import STAGE_WIDTHS, cifar_resnet, count_parameters
from models.cifar_se_resnet import SEBasicBlock, SqueezeExcitation, cifar_se_resnet, se_hidden
from models.cifar_wide_resnet import GROUP_WIDTHS, WideBasicBlock, wide_resnet
from models.train import images as train_images
from models.zoo import build_classifier
from tests.models.test_train_images import make_folder


def wrn_parameters(depth: int, width: int, num_classes: int = 10) -> int:
    """WRN-depth-width's parameter count from its definition: a 3x3 stem conv (3 -> 16), per group N blocks of
    BN + 3x3 conv + BN + 3x3 conv (+ a 1x1 projection where the shape changes), BN, a fully connected layer."""
    n = (depth - 4) // 6
    total, cin = 3 * 16 * 9, 16
    for base in GROUP_WIDTHS:
        w = base * width
        for _ in range(n):
            total += 2 * cin + 9 * cin * w + 2 * w + 9 * w * w + (cin * w if cin != w else 0)
            cin = w
    return total + 2 * cin + cin * num_classes + num_classes


def se_extra_parameters(depth: int, reduction: int) -> tuple[int, int]:
    """(weights, biases) the SE blocks add to a CIFAR ResNet-depth: per block of C channels, FC C -> h and
    FC h -> C with h = max(1, C // r)."""
    n = (depth - 2) // 6
    weights = sum(n * 2 * c * se_hidden(c, reduction) for c in STAGE_WIDTHS)
    biases = sum(n * (se_hidden(c, reduction) + c) for c in STAGE_WIDTHS)
    return weights, biases


# Zagoruyko & Komodakis 2016, Tables 1 and 4 ("# params", millions, CIFAR-10)
WRN_PAPER = [(40, 1, 0.6), (40, 2, 2.2), (40, 4, 8.9), (16, 8, 11.0), (28, 10, 36.5), (22, 8, 17.2),
             (16, 10, 17.1), (28, 12, 52.5)]


@pytest.mark.parametrize(("depth", "width", "paper_millions"), WRN_PAPER)
def test_wide_resnet_parameter_counts_match_the_paper(depth: int, width: int, paper_millions: float) -> None:
    n = count_parameters(wide_resnet(depth, width))
    assert n == wrn_parameters(depth, width)
    assert round(n / 1e6, 1) == paper_millions


def test_wide_resnet_exact_counts() -> None:
    assert count_parameters(wide_resnet(28, 10)) == 36_479_194
    assert count_parameters(wide_resnet(16, 8)) == 10_961_370
    # the classifier head scales with the classes: 640 inputs per class plus a bias for WRN-28-10
    assert count_parameters(wide_resnet(28, 10, num_classes=100)) - 36_479_194 == 90 * (640 + 1)


@pytest.mark.parametrize(("depth", "reduction"), [(20, 16), (56, 16), (110, 16), (20, 4), (32, 8)])
def test_se_resnet_adds_exactly_the_se_parameters(depth: int, reduction: int) -> None:
    base = count_parameters(cifar_resnet(depth))
    weights, biases = se_extra_parameters(depth, reduction)
    assert count_parameters(cifar_se_resnet(depth, reduction=reduction)) == base + weights + biases
    if all(c % reduction == 0 for c in STAGE_WIDTHS):
        # Hu et al. 2018 (section 4): the SE blocks add 2/r * sum over stages of N_s * C_s^2 weights
        n = (depth - 2) // 6
        assert weights == 2 * sum(n * c * c for c in STAGE_WIDTHS) // reduction


def test_se_resnet_exact_counts() -> None:
    # r = 16: hidden units 1, 2 and 4 in the 16-, 32- and 64-channel stages; 3 blocks per stage in ResNet-20
    assert count_parameters(cifar_se_resnet(20)) == 269_722 + 3 * ((2 * 16 * 1 + 1 + 16) + (2 * 32 * 2 + 2 + 32)
                                                                   + (2 * 64 * 4 + 4 + 64)) == 272_095
    assert count_parameters(cifar_se_resnet(56)) == 853_018 + 7_119


def test_squeeze_excitation_scales_channels_by_gates_of_the_pooled_features() -> None:
    torch.manual_seed(0)
    se = SqueezeExcitation(8, reduction=2)
    x = torch.randn(3, 8, 5, 5)
    pooled = x.mean(dim=(2, 3))
    gates = torch.sigmoid(se.fc2(torch.relu(se.fc1(pooled))))
    torch.testing.assert_close(se(x), x * gates[:, :, None, None])
    assert se.fc1.out_features == 4 and se.fc2.out_features == 8
    with pytest.raises(ValueError, match="reduction"):
        SqueezeExcitation(8, reduction=0)


def test_se_block_gates_the_residual_branch_before_the_sum() -> None:
    """Hu et al.'s SE-ResNet module: relu(shortcut(x) + SE(residual(x))); with the gates forced to zero the block
    is relu(shortcut(x)), the identity on a non-negative input."""
    block = SEBasicBlock(8, 8, 1, "A", reduction=4).eval()
    nn.init.zeros_(block.se.fc2.weight)
    nn.init.constant_(block.se.fc2.bias, -1e4)  # sigmoid -> 0
    x = torch.rand(2, 8, 6, 6)
    torch.testing.assert_close(block(x), x)
    model = cifar_se_resnet(20, num_classes=7)
    assert sum(isinstance(m, SEBasicBlock) for m in model.modules()) == 9
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)


def test_wide_block_is_pre_activation_with_projection_where_the_shape_changes() -> None:
    model = wide_resnet(16, 2, num_classes=5)
    blocks = [m for m in model.modules() if isinstance(m, WideBasicBlock)]
    assert len(blocks) == 6  # (16 - 4) / 6 = 2 per group
    # a projection in the first block of every group (16 -> 32 changes the width too), identity elsewhere
    assert [b.shortcut is not None for b in blocks] == [True, False, True, False, True, False]
    assert all(isinstance(b.bn1, nn.BatchNorm2d) for b in blocks)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 5)
    assert [b.shortcut is not None for b in wide_resnet(16, 1).modules() if isinstance(b, WideBasicBlock)] == [
        False, False, True, False, True, False]  # k = 1: the first group keeps 16 channels


def test_wide_resnet_dropout_only_in_training() -> None:
    torch.manual_seed(0)
    model = wide_resnet(10, 1, dropout=0.5)
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    torch.testing.assert_close(model(x), model(x))
    model.train()
    assert not torch.allclose(model(x), model(x))
    assert not any(isinstance(m, nn.Dropout) for m in wide_resnet(10, 1).modules())


@pytest.mark.parametrize(("builder", "kwargs", "match"), [
    (wide_resnet, {"depth": 18}, "6n\\+4"), (wide_resnet, {"width": 0}, "width"),
    (wide_resnet, {"dropout": 1.0}, "dropout"), (cifar_se_resnet, {"depth": 21}, "6n\\+2"),
    (cifar_se_resnet, {"reduction": 0}, "reduction")])
def test_bad_architectures_are_refused(builder, kwargs, match) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=match):
        builder(**kwargs)


def test_families_build_from_manifest_arch_dicts() -> None:
    se = build_classifier("cifar-se-resnet", {"depth": 8, "shortcut": "B", "reduction": 4, "num_classes": 3}, 3)
    assert any(isinstance(m, SqueezeExcitation) for m in se.modules())
    wrn = build_classifier("cifar-wide-resnet", {"depth": 10, "width": 2, "dropout": 0.3}, 4)
    assert isinstance(wrn.fc, nn.Linear) and wrn.fc.in_features == 128 and wrn.fc.out_features == 4
    with pytest.raises(ValueError, match="unknown cifar-wide-resnet arch keys"):
        build_classifier("cifar-wide-resnet", {"depth": 10, "widht": 2}, 4)
    with pytest.raises(ValueError, match="num_classes=10"):
        build_classifier("cifar-se-resnet", {"depth": 8, "num_classes": 10}, 3)


@pytest.mark.parametrize(("family", "options", "name", "arch"), [
    ("cifar-se-resnet", ["--depth", "8", "--se-reduction", "4"], "data-se-resnet8",
     {"depth": 8, "shortcut": "A", "reduction": 4}),
    ("cifar-wide-resnet", ["--depth", "10", "--width", "2", "--dropout", "0.1"], "data-wrn-10-2",
     {"depth": 10, "width": 2, "dropout": 0.1}),
    ("cifar-whitened-convnet", ["--widths", "8", "16", "16", "--convs", "2", "--crop-pad", "2"],
     "data-whitened-convnet", {"widths": [8, 16, 16], "convs": 2, "logit_scale": 1 / 9}),
])
def test_train_two_epochs_and_serve_through_the_registry(tmp_path: Path, family: str, options: list[str], name: str,
                                                          arch: dict) -> None:  # type: ignore[type-arg]
    data = make_folder(tmp_path / "data", per_class=10)
    weights = tmp_path / "weights"
    out = tmp_path / "run"
    code = cli.main(["train", "images", "--data", str(data), "--out", str(out), "--family", family, *options,
                     "--epochs", "2", "--batch-size", "8", "--val-size", "6", "--cache", str(tmp_path / "cache"),
                     "--threads", "1", "--install", str(weights)])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["epochs"] == 2 and report["family"] == family and report["arch"] == arch
    assert len(report["history"]) == 2 and all(r["val_acc"] is not None for r in report["history"])
    entry = load_manifest(weights)[name]  # the default name says the family and its size
    assert entry.family == family and entry.arch == arch | {"num_classes": 3}
    assert entry.training["test_split"]["images"] == 3 and entry.training["train_images"] == 21
    built = build_classifier(family, entry.arch, 3)
    assert count_parameters(built) == report["num_params"]

    st = ModelRegistry(weights, tmp_path / "hub", torch.device("cpu"), allow_download=False,
                       allow_untrained=False).load_classifier(name)
    assert st.status == "ready", st.reason
    assert st.loaded is not None and st.loaded.weights_tag == "trained"
    # the served model is the trained one: its probabilities are those of the saved weights
    built.load_state_dict(torch.load(out / f"{name}.pt", weights_only=True))
    x = [torch.randn(3, 32, 32) for _ in range(2)]
    with torch.no_grad():
        expected = built.eval()(torch.stack(x)).softmax(-1)
    torch.testing.assert_close(torch.stack(st.loaded.forward(x)), expected, atol=1e-5, rtol=1e-4)
    # the served accuracy on the hold-out is the trainer's validation accuracy (same images, same weights)
    from app.settings import Settings

    s = Settings(weights_dir=weights, torch_home=tmp_path / "th", device="cpu")
    ev = cli.evaluate_classifier(name, None, holdout=True, one_view=True, settings=s)
    assert ev["images"] == 6 and ev["measured"]["val_accuracy"]["correct"] == round(6 * report["val_accuracy"])


@pytest.mark.parametrize(("options", "message"), [
    (["--family", "cifar-resnet", "--width", "4"], "--width do\\(es\\) not apply to cifar-resnet"),
    (["--family", "cifar-wide-resnet", "--shortcut", "B"], "--shortcut do\\(es\\) not apply"),
    (["--family", "cifar-se-resnet", "--dropout", "0.3"], "--dropout"),
    (["--family", "cifar-wide-resnet", "--depth", "20"], "6n\\+4"),
    (["--family", "cifar-whitened-convnet", "--depth", "20"], "--depth do\\(es\\) not apply"),
    (["--family", "cifar-resnet", "--widths", "8", "8"], "--widths do\\(es\\) not apply"),
    (["--family", "cifar-whitened-convnet", "--convs", "0"], "at least one convolution"),
])
def test_trainer_refuses_options_of_another_family(tmp_path: Path, options: list[str], message: str,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        train_images.parse_args(["--data", str(tmp_path), "--out", str(tmp_path / "o"), *options])
    assert exc.value.code == 2
    assert re.search(message, capsys.readouterr().err)


def test_trainer_defaults_per_family(tmp_path: Path) -> None:
    common = ["--data", str(tmp_path / "cifar10"), "--out", str(tmp_path / "o")]
    args = train_images.parse_args(common)
    assert (args.family, args.arch) == ("cifar-resnet", {"depth": 20, "shortcut": "A"})
    args = train_images.parse_args([*common, "--family", "cifar-wide-resnet", "--width", "8"])
    assert args.arch == {"depth": 16, "width": 8, "dropout": 0.0}
    assert train_images.default_name(args.data, args.family, args.arch) == "cifar10-wrn-16-8"
    args = train_images.parse_args([*common, "--family", "cifar-se-resnet", "--depth", "56"])
    assert args.arch == {"depth": 56, "shortcut": "A", "reduction": 16}
    assert train_images.default_name(args.data, args.family, args.arch) == "cifar10-se-resnet56"
