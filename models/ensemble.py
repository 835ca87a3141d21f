"""A probability-averaging ensemble of classifiers served as one model.

The members run on the same preprocessed batch; the ensemble returns the logarithm of the mean of
their softmax outputs, so the service's usual softmax over the "logits" gives back exactly that mean
(softmax(log p) = p when p sums to one). It is one module with one state dict (keys
``members.<i>.<member key>``), so it loads, hashes and serves through the registry like any other
classifier.

Members are CIFAR models of the project's families (ResNet, SE-ResNet, wide ResNet, whitened convnet), built
through the family registry; this module imports those family modules directly and nothing that imports it back.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

# importing the member families registers them
from models import cifar_resnet, cifar_se_resnet, cifar_whitened, cifar_wide_resnet  # noqa: F401
from models.families import arch_kwargs, build, register_family

MEMBER_FAMILIES = ("cifar-resnet", "cifar-se-resnet", "cifar-wide-resnet", "cifar-whitened-convnet")


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
    """An untrained ensemble of CIFAR models from a manifest arch: ``{"members": [{"depth": 56, "shortcut": "A"},
    {"family": "cifar-wide-resnet", "depth": 16, "width": 8}, ...], "weights": [optional]}`` (a member without
    "family" is a cifar-resnet)."""
    specs = arch.get("members")
    if not isinstance(specs, list) or not specs:
        raise ValueError("a cifar-resnet-ensemble arch needs a non-empty 'members' list")
    members = []
    for spec in specs:
        member = dict(spec)
        family = str(member.pop("family", "cifar-resnet"))
        if family not in MEMBER_FAMILIES:
            raise ValueError(f"ensemble member family {family!r} is not one of {', '.join(MEMBER_FAMILIES)}")
        members.append(build(family, member, num_classes, task="image-classification"))
    return ProbabilityEnsemble(members, arch.get("weights"))


@register_family("cifar-resnet-ensemble", task="image-classification")
def build_cifar_ensemble(arch: dict[str, Any], num_classes: int, **_: Any) -> ProbabilityEnsemble:
    """Probability-averaging ensemble of CIFAR models; arch: members (arch dicts), weights (optional)."""
    return cifar_resnet_ensemble(arch_kwargs("cifar-resnet-ensemble", arch, ("members", "weights"), num_classes),
                                 num_classes)
