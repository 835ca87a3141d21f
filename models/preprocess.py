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


# The full resize below is bounded by the input (when it shrinks) or by this many output squares (when it grows):
# every photo and panorama. Past that only a strip is left, a few pixels thick, that would balloon into a
# huge image (a 5000 x 2 strip becomes 80000 x 32 on the way to a 32-pixel crop).
_MAX_GROWTH_SQUARES = 16


def resize_plan(width: int, height: int, spec: ImageSpec) -> tuple[int, int, int, int]:
    """(width, height) after the short side is resized to spec.resize, and the (left, top) corner of the centred
    crop in those coordinates: torchvision's rules (the long side truncated, not rounded; center_crop's corner)."""
    if min(width, height) == spec.resize:
        nw, nh = width, height
    elif width <= height:
        nw, nh = spec.resize, int(spec.resize * height / width)
    else:
        nw, nh = int(spec.resize * width / height), spec.resize
    return nw, nh, round((nw - spec.crop) / 2.0), round((nh - spec.crop) / 2.0)


def is_strip(width: int, height: int, spec: ImageSpec) -> bool:
    """Whether the full resize would be larger than both the input and 16 output squares (a thin strip): then only
    the crop is resampled."""
    nw, nh, _, _ = resize_plan(width, height, spec)
    return (nw, nh) != (width, height) and nw * nh > max(width * height, _MAX_GROWTH_SQUARES * spec.resize ** 2)


def resize_crop(img: Image.Image, spec: ImageSpec) -> Image.Image:
    """Resize the shorter side to spec.resize and take the centred spec.crop square.

    No intermediate is larger than the input or 16 x resize^2 pixels, whatever the aspect ratio."""
    img = img.convert("RGB") if img.mode != "RGB" else img
    w, h = img.size
    nw, nh, left, top = resize_plan(w, h, spec)
    resample = _INTERPOLATIONS[spec.interpolation]
    if is_strip(w, h, spec):
        # A strip: resample only the crop, with the source box the full resize would have mapped onto it
        # (same sampling positions; PIL may order its two passes differently, so a few grey levels can differ).
        sx, sy = w / nw, h / nh
        # clamped: nw * (w / nw) can exceed w by a rounding error, and PIL refuses boxes outside the image
        box = (left * sx, top * sy, min(w, (left + spec.crop) * sx), min(h, (top + spec.crop) * sy))
        return img.resize((spec.crop, spec.crop), resample, box=box)
    # Every other image: the full resize, then the crop, exactly the transform the models were trained with.
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), resample)
    if (nw, nh) != (spec.crop, spec.crop):
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
