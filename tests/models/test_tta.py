"""Test-time augmentation views (models.tta), shared by the trainer and the service."""

from __future__ import annotations

import pytest
import torch

from models.tta import TTA_MODES, metric_key, tta_probabilities, tta_views


def test_hflip_views_are_the_image_and_its_mirror() -> None:
    x = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).view(2, 3, 4, 5)
    views, weights = tta_views(x, "hflip")
    assert weights == [0.5, 0.5]
    assert torch.equal(views[:2], x) and torch.equal(views[2:, :, :, 0], x[:, :, :, 4])


def test_translate_views_shift_by_one_pixel_with_reflected_edges() -> None:
    x = torch.tensor([[1.0, 2, 3], [4, 5, 6], [7, 8, 9]]).view(1, 1, 3, 3)
    views, weights = tta_views(x, "hflip-translate")
    assert len(views) == 6 and sum(weights) == 1.0 and weights[:2] == [0.25, 0.25]
    # content moves down-right by one pixel (the picture seen from one pixel up-left); the first row and column
    # are reflections (row 1 of the original above row 0, column 1 left of column 0)
    up_left = torch.tensor([[5.0, 4, 5], [2, 1, 2], [5, 4, 5]])
    down_right = torch.tensor([[5.0, 6, 5], [8, 9, 8], [5, 6, 5]])
    assert torch.equal(views[2, 0], up_left) and torch.equal(views[3, 0], up_left.flip(-1))
    assert torch.equal(views[4, 0], down_right) and torch.equal(views[5, 0], down_right.flip(-1))


def test_probabilities_are_the_weighted_mean_over_views_in_one_call() -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    x = torch.randn(3, 3, 8, 8)
    calls: list[int] = []

    def probs(v: torch.Tensor) -> torch.Tensor:
        calls.append(len(v))
        return net(v).softmax(-1)

    got = tta_probabilities(probs, x, "hflip-translate")
    assert calls == [18]
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")
    ul, dr = padded[..., :8, :8], padded[..., 2:, 2:]
    with torch.no_grad():
        expected = (0.25 * (net(x).softmax(-1) + net(x.flip(-1)).softmax(-1))
                    + 0.125 * sum(net(v).softmax(-1) for v in (ul, ul.flip(-1), dr, dr.flip(-1))))
    torch.testing.assert_close(got.detach(), expected)
    torch.testing.assert_close(got.sum(-1).detach(), torch.ones(3))
    assert torch.equal(tta_probabilities(probs, x, None), net(x).softmax(-1))


def test_metric_keys_and_unknown_modes() -> None:
    assert [metric_key(m) for m in (None, *TTA_MODES)] == [
        "val_accuracy", "val_accuracy_hflip_tta", "val_accuracy_hflip_translate"]
    with pytest.raises(ValueError, match="rotate"):
        tta_views(torch.zeros(1, 3, 4, 4), "rotate")
    with pytest.raises(ValueError, match="rotate"):
        metric_key("rotate")
