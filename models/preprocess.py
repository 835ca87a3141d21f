"""Image preprocessing specs shared by training, evaluation and serving.

One spec (resize shorter side, centre crop, mean/std) describes how a model sees an image, so
the service feeds a model exactly what its training fed it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

_INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
}


@dataclass(frozen=True)
class ImageSpec:
    """Resize the shorter side to `resize`, centre-crop `crop`, scale to [0, 1], normalise."""

    resize: int
    crop: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.interpolation not in _INTERPOLATIONS:
            raise ValueError(f"unknown interpolation {self.interpolation!r}")
        if self.crop > self.resize:
            raise ValueError("crop must not exceed resize")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ImageSpec:
        """Build a spec from its manifest form."""
        return cls(
            resize=int(d["resize"]),
            crop=int(d["crop"]),
            mean=tuple(float(v) for v in d["mean"]),  # type: ignore[arg-type]
            std=tuple(float(v) for v in d["std"]),  # type: ignore[arg-type]
            interpolation=str(d.get("interpolation", "bilinear")),
        )

    def to_dict(self) -> dict[str, Any]:
        """Manifest form of the spec."""
        d = asdict(self)
        d.pop("extra")
        d["mean"] = list(self.mean)
        d["std"] = list(self.std)
        return d


def resize_crop(img: Image.Image, spec: ImageSpec) -> Image.Image:
    """Resize the shorter side to spec.resize and take the centred spec.crop square."""
    img = img.convert("RGB") if img.mode != "RGB" else img
    w, h = img.size
    if min(w, h) != spec.resize:
        # torchvision's rule: the short side becomes `resize`, the long side is truncated, not rounded
        if w <= h:
            nw, nh = spec.resize, int(spec.resize * h / w)
        else:
            nw, nh = int(spec.resize * w / h), spec.resize
        img = img.resize((nw, nh), _INTERPOLATIONS[spec.interpolation])
        w, h = nw, nh
    left = round((w - spec.crop) / 2.0)
    top = round((h - spec.crop) / 2.0)
    if (w, h) != (spec.crop, spec.crop):
        img = img.crop((left, top, left + spec.crop, top + spec.crop))
    return img


def to_uint8_array(img: Image.Image, spec: ImageSpec) -> np.ndarray:
    """HWC uint8 array of the resized and cropped image."""
    return np.asarray(resize_crop(img, spec), dtype=np.uint8)


def normalize_uint8(batch: torch.Tensor, spec: ImageSpec) -> torch.Tensor:
    """NHWC or NCHW uint8 batch -> normalised float NCHW tensor."""
    if batch.dim() != 4:
        raise ValueError("expected a 4-D batch")
    if batch.shape[-1] == 3 and batch.shape[1] != 3:
        batch = batch.permute(0, 3, 1, 2)
    x = batch.float().div_(255.0)
    mean = torch.tensor(spec.mean, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std


def image_to_tensor(img: Image.Image, spec: ImageSpec) -> torch.Tensor:
    """One PIL image -> normalised CHW float tensor, as the model saw its training data."""
    arr = torch.from_numpy(to_uint8_array(img, spec).copy()).unsqueeze(0)
    return normalize_uint8(arr, spec)[0]
