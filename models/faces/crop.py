"""Face crops: the one piece of geometry shared by training, evaluation and serving.

A detector's box is made square around its centre, enlarged by `margin` (a fraction of the box side
on each side), and the square is cut from the image (parts outside the image are filled with
mid-grey, never stretched) and resized to the embedder's input side. Training prepares crops
with extra `context` around the same square so that random crops for augmentation are still
centred on the serving crop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from PIL import Image

from .detect import FaceBox


@dataclass(frozen=True)
class CropSpec:
    """How a face box becomes the embedder's input image."""

    size: int = 64
    margin: float = 0.2

    def __post_init__(self) -> None:
        if self.size < 8:
            raise ValueError("crop size must be at least 8 pixels")
        if not 0.0 <= self.margin <= 1.0:
            raise ValueError("margin must be within [0, 1]")


def square_box(box: FaceBox, margin: float, context: float = 1.0) -> tuple[float, float, float, float]:
    """(left, top, right, bottom) of the square crop around a box: side = max(w, h) * (1 + 2 margin) * context,
    centred on the box centre. May extend beyond the image."""
    cx = box.x + box.w / 2.0
    cy = box.y + box.h / 2.0
    side = max(box.w, box.h) * (1.0 + 2.0 * margin) * context
    return (cx - side / 2.0, cy - side / 2.0, cx + side / 2.0, cy + side / 2.0)


def crop_face(img: Image.Image, box: FaceBox, spec: CropSpec, *, context: float = 1.0,
              size: int | None = None) -> Image.Image:
    """The RGB square crop of one face resized to `size` (default spec.size) pixels."""
    img = img.convert("RGB") if img.mode != "RGB" else img
    out_side = size or spec.size
    left, top, right, bottom = square_box(box, spec.margin, context)
    fill = (127, 127, 127)
    w, h = img.size
    pad_l, pad_t = max(0, math.ceil(-left)), max(0, math.ceil(-top))
    pad_r, pad_b = max(0, math.ceil(right - w)), max(0, math.ceil(bottom - h))
    if pad_l or pad_t or pad_r or pad_b:
        canvas = Image.new("RGB", (w + pad_l + pad_r, h + pad_t + pad_b), fill)
        canvas.paste(img, (pad_l, pad_t))
        img = canvas
        left, right, top, bottom = left + pad_l, right + pad_l, top + pad_t, bottom + pad_t
    # resize with a source box: one antialiased resampling of exactly the square
    return img.resize((out_side, out_side), Image.Resampling.BILINEAR, box=(left, top, right, bottom))


def largest(boxes: list[FaceBox]) -> FaceBox | None:
    """The largest face (ties: the higher score), or None."""
    return max(boxes, key=lambda b: (b.area, b.score)) if boxes else None
