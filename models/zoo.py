"""Architectures by name: the project's own families and torchvision's classifiers.

Pure PyTorch: builds modules and describes torchvision's published weights; never loads files
from the network by itself.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from models.cifar_resnet import cifar_resnet
from models.preprocess import ImageSpec

# torch.hub's convention: the file name carries the first hex digits of the file's sha256
_HASH_PREFIX = re.compile(r"-([a-f0-9]*)\.")
_INTERP_NAMES = {"InterpolationMode.BILINEAR": "bilinear", "InterpolationMode.BICUBIC": "bicubic",
                 "InterpolationMode.NEAREST": "nearest"}


def torchvision_classifiers() -> list[str]:
    """Names of every torchvision classification architecture (torchvision.models.list_models)."""
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


@dataclass(frozen=True)
class TorchvisionWeights:
    """What torchvision publishes about a model's default weights."""

    model: str
    enum: str
    url: str
    file_name: str
    hash_prefix: str
    labels: list[str]
    preprocessing: ImageSpec
    meta: dict[str, Any]


def torchvision_weights(name: str) -> TorchvisionWeights:
    """Default (best) weights of a torchvision classifier, with file name, hash prefix, labels, transforms."""
    import torchvision

    if name not in torchvision_classifiers():
        raise KeyError(f"{name!r} is not a torchvision classification model")
    enum_cls = torchvision.models.get_model_weights(name)
    weights = enum_cls.DEFAULT
    url = weights.url
    file_name = url.rsplit("/", 1)[-1]
    m = _HASH_PREFIX.search(file_name)
    t = weights.transforms()
    spec = ImageSpec(
        resize=int(t.resize_size[0]),
        crop=int(t.crop_size[0]),
        mean=tuple(float(v) for v in t.mean),  # type: ignore[arg-type]
        std=tuple(float(v) for v in t.std),  # type: ignore[arg-type]
        interpolation=_INTERP_NAMES.get(str(t.interpolation), "bilinear"),
    )
    meta = {k: v for k, v in weights.meta.items() if k != "categories"}
    return TorchvisionWeights(
        model=name, enum=f"{enum_cls.__name__}.{weights.name}", url=url, file_name=file_name,
        hash_prefix=m.group(1) if m else "", labels=list(weights.meta["categories"]), preprocessing=spec, meta=meta,
    )


# torchvision's DenseNet checkpoints predate a rename: "norm.1" was "norm1" and so on
_DENSENET_OLD_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)


def fix_torchvision_state_dict(name: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Apply the key renames torchvision itself applies when loading old checkpoints."""
    if not name.startswith("densenet"):
        return state
    fixed: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        m = _DENSENET_OLD_KEY.match(k)
        fixed[m.group(1) + m.group(2) if m else k] = v
    return fixed


def build_classifier(family: str, arch: dict[str, Any], num_classes: int) -> nn.Module:
    """An untrained classifier of the given family ("cifar-resnet", "cifar-resnet-ensemble" or "torchvision")."""
    if family == "cifar-resnet":
        return cifar_resnet(int(arch.get("depth", 20)), num_classes, str(arch.get("shortcut", "A")))
    if family == "cifar-resnet-ensemble":
        from models.ensemble import cifar_resnet_ensemble

        return cifar_resnet_ensemble(arch, num_classes)
    if family == "torchvision":
        import torchvision

        return torchvision.models.get_model(str(arch["name"]), weights=None, num_classes=num_classes)
    raise ValueError(f"unknown model family {family!r}")
