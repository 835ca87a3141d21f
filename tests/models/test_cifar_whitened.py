"""The whitened convnet family: its size, its whitening layer and how the trainer sets and freezes it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from models.cifar_whitened import WHITEN_KERNEL, WhitenedConvNet, set_whitening, whitening_filters
from models.zoo import build_classifier
from tests.models.test_train_images import train_tiny_whitened


def _correlated_images(n: int, seed: int = 0) -> torch.Tensor:
    """Images whose neighbouring pixels and channels are strongly correlated (as in photos)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, 1, 16, 16, generator=g)
    smooth = F.interpolate(base, size=32, mode="bilinear", align_corners=False)  # spatial correlation
    mix = torch.tensor([[1.0], [0.8], [0.6]])  # channel correlation
    return smooth * mix[None, :, :, None] + 0.1 * torch.randn(n, 3, 32, 32, generator=g)


def test_default_size_counted_by_hand() -> None:
    net = build_classifier("cifar-whitened-convnet", {}, 10)
    k2 = WHITEN_KERNEL * WHITEN_KERNEL
    whiten = 3 * k2 * 24 + 24
    convs = 9 * (24 * 64 + 64 * 64 + 64 * 256 + 256 * 256 + 256 * 256 + 256 * 256)
    norms = 2 * 2 * (64 + 256 + 256)  # two BN layers per group, weight + bias
    head = 256 * 10
    assert sum(p.numel() for p in net.parameters()) == whiten + convs + norms + head == 1_972_792
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_whitening_filters_decorrelate_patches() -> None:
    x = _correlated_images(400)
    w = whitening_filters(x, eps=1e-6)
    assert w.shape == (2 * 3 * WHITEN_KERNEL**2, 3, WHITEN_KERNEL, WHITEN_KERNEL)
    torch.testing.assert_close(w[12:], -w[:12])  # each filter and its negative
    out = F.conv2d(x, w[:12])  # N x 12 x 31 x 31
    feats = out.permute(0, 2, 3, 1).reshape(-1, 12).double()
    feats = feats - feats.mean(0)
    cov = feats.T @ feats / (len(feats) - 1)
    # whitened: unit variance, no correlation (neighbouring raw pixels correlate at over 0.5)
    torch.testing.assert_close(cov, torch.eye(12, dtype=torch.float64), atol=0.02, rtol=0)
    raw = F.unfold(x, WHITEN_KERNEL).transpose(1, 2).reshape(-1, 12)
    assert torch.corrcoef(raw.T)[0, 1] > 0.5


def test_set_whitening_freezes_the_weights_not_the_bias() -> None:
    net = WhitenedConvNet(widths=(8, 8, 8), convs=1, num_classes=3)
    x = _correlated_images(50)
    set_whitening(net, x)
    assert not net.whiten.weight.requires_grad and net.whiten.bias is not None and net.whiten.bias.requires_grad
    torch.testing.assert_close(net.whiten.weight.detach(), whitening_filters(x))


@pytest.mark.parametrize(("arch", "message"), [
    ({"widths": "64"}, "list of integers"),
    ({"widths": [8, 0, 8]}, "positive"),
    ({"convs": 0}, "at least one convolution"),
    ({"logit_scale": 0}, "logit_scale"),
    ({"width": 8}, "unknown cifar-whitened-convnet arch keys"),
])
def test_bad_arch_refused(arch: dict, message: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(ValueError, match=message):
        build_classifier("cifar-whitened-convnet", arch, 3)


def test_trainer_sets_the_whitening_from_training_images_and_never_updates_it(tmp_path: Path) -> None:
    from models.train import images as train_images

    data, out, report = train_tiny_whitened(tmp_path, "--save-dtype", "float16")
    entry = json.loads((out / "manifest_entry.json").read_text())
    recipe = entry["training"]["recipe"]
    assert recipe["whitening"] == {"images": 21, "kernel": WHITEN_KERNEL, "frozen": True}
    assert recipe["augmentation"] == "pad 2 + random crop, h-flip" and recipe["weights_dtype"] == "float16"
    state = torch.load(out / f"{entry['name']}.pt", weights_only=True)
    assert {v.dtype for k, v in state.items() if not k.endswith("num_batches_tracked")} == {torch.float16}
    assert state["groups.0.norms.0.num_batches_tracked"].dtype == torch.int64
    # the saved first layer is the whitening of the (normalised) training images, rounded to float16: two epochs
    # at a large learning rate did not move it
    _, (train_u8, _), (val_u8, y_val) = train_images.load_split(data, 32, 6, 0, tmp_path / "cache",
                                                                test=train_images.FrozenTestSplit(0.1))
    spec = entry["preprocessing"]
    mean = torch.tensor(spec["mean"])[None, :, None, None]
    std = torch.tensor(spec["std"])[None, :, None, None]
    x = (train_u8.float() / 255.0 - mean) / std
    torch.testing.assert_close(state["whiten.weight"], whitening_filters(x).half())
    # the report's accuracy is that of the stored float16 weights, loaded into a float32 model as the registry does
    net = build_classifier("cifar-whitened-convnet", entry["arch"], 3)
    net.load_state_dict(state)
    assert net.whiten.weight.dtype == torch.float32
    with torch.no_grad():
        pred = net.eval()((val_u8.float() / 255.0 - mean) / std).argmax(-1)
    assert round(report["val_accuracy"] * 6) == int((pred == y_val).sum())
