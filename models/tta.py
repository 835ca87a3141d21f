"""Test-time augmentation of image classifiers: the views a model sees of one image and how their class
probabilities are weighted. Shared by the trainer (the as-served numbers of a run) and the service (what
the manifest's `test_time_augmentation` asks for), so both compute the same thing.

    "hflip":            the image and its mirror image, weight 1/2 each
    "hflip-translate":  those two (1/4 each) and both shifted by one pixel up-left and down-right (edges
                        reflected), 1/8 each: 6 views (the multi-crop evaluation of the CIFAR speed-runs)
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

TTA_MODES = ("hflip", "hflip-translate")


def metric_key(mode: str | None) -> str:
    """The name of the validation accuracy of a mode in reports and manifests (the h-flip key predates the others)."""
    if mode is None:
        return "val_accuracy"
    if mode == "hflip":
        return "val_accuracy_hflip_tta"
    if mode not in TTA_MODES:
        raise ValueError(f"unknown test-time augmentation {mode!r} (supported: {', '.join(TTA_MODES)})")
    return "val_accuracy_" + mode.replace("-", "_")


def tta_views(x: torch.Tensor, mode: str) -> tuple[torch.Tensor, list[float]]:
    """All views of an NCHW batch stacked along the batch axis (view-major: view v of image i is row v*N+i),
    and each view's weight (they sum to 1)."""
    if mode == "hflip":
        return torch.cat([x, x.flip(-1)]), [0.5, 0.5]
    if mode == "hflip-translate":
        h, w = x.shape[-2:]
        padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
        up_left, down_right = padded[..., :h, :w], padded[..., 2:, 2:]
        views = [x, x.flip(-1), up_left, up_left.flip(-1), down_right, down_right.flip(-1)]
        return torch.cat(views), [0.25, 0.25, 0.125, 0.125, 0.125, 0.125]
    raise ValueError(f"unknown test-time augmentation {mode!r} (supported: {', '.join(TTA_MODES)})")


def tta_probabilities(probabilities: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                      mode: str | None) -> torch.Tensor:
    """Class probabilities of an NCHW batch averaged over the views of `mode` (None: the image alone), with
    every view computed in one call of `probabilities` (one batch of N x views)."""
    if mode is None:
        return probabilities(x)
    views, weights = tta_views(x, mode)
    p = probabilities(views).reshape(len(weights), len(x), -1)
    return torch.einsum("v,vnc->nc", torch.tensor(weights, dtype=p.dtype, device=p.device), p)
