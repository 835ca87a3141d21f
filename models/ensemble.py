"""A probability-averaging ensemble of classifiers served as one model.

The members run on the same preprocessed batch; the ensemble returns the logarithm of the mean of
their softmax outputs, so the service's usual softmax over the "logits" gives back exactly that mean
(softmax(log p) = p when p sums to one). It is one module with one state dict (keys
``members.<i>.<member key>``), so it loads, hashes and serves through the registry like any other
classifier.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class ProbabilityEnsemble(nn.Module):
    """Averages the class probabilities of its members (optionally weighted)."""

    def __init__(self, members: list[nn.Module], weights: list[float] | None = None) -> None:
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        w = [1.0] * len(members) if weights is None else [float(v) for v in weights]
        if len(w) != len(members) or any(v <= 0 for v in w):
            raise ValueError("ensemble weights: one positive number per member")
        self.members = nn.ModuleList(members)
        self.member_weights = [v / sum(w) for v in w]  # from the manifest arch, not part of the state dict

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = None
        for w, m in zip(self.member_weights, self.members, strict=True):
            p = w * m(x).float().softmax(-1)
            probs = p if probs is None else probs + p
        assert probs is not None
        return probs.clamp_min(torch.finfo(probs.dtype).tiny).log()


def cifar_resnet_ensemble(arch: dict[str, Any], num_classes: int) -> ProbabilityEnsemble:
    """An untrained ensemble of CIFAR ResNets from a manifest arch:
    ``{"members": [{"depth": 56, "shortcut": "A"}, ...], "weights": [optional]}``."""
    specs = arch.get("members")
    if not isinstance(specs, list) or not specs:
        raise ValueError("a cifar-resnet-ensemble arch needs a non-empty 'members' list")
    from models.zoo import build_classifier  # zoo builds this family through this function

    members = [build_classifier("cifar-resnet", s, num_classes) for s in specs]
    return ProbabilityEnsemble(members, arch.get("weights"))
