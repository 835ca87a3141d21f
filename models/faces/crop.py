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

ALIGNMENTS = ("none", "eyes")


@dataclass(frozen=True)
class CropSpec:
    """How a face box becomes the embedder's input image."""

    size: int = 64
    margin: float = 0.2
    align: str = "none"  # "none", or "eyes": rotated so the eye line is level (models/faces/align.py)

    def __post_init__(self) -> None:
        if self.align not in ALIGNMENTS:
            raise ValueError(f"unknown face alignment {self.align!r} (known: {', '.join(ALIGNMENTS)})")
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


FILL = (127, 127, 127)
_SMALL_CANVAS = 1 << 20  # pixels (3 MB): a grey canvas this small is always fine, whatever it holds


def crop_face(img: Image.Image, box: FaceBox, spec: CropSpec, *, context: float = 1.0,
              size: int | None = None) -> Image.Image:
    """The RGB square crop of one face resized to `size` (default spec.size) pixels.

    Memory stays bounded by the output and the part of the image the square covers, even when the square is
    far larger than the image (detector=none on a 20000 x 3 strip makes a 20000-pixel square)."""
    img = img.convert("RGB") if img.mode != "RGB" else img
    out_side = size or spec.size
    left, top, right, bottom = square_box(box, spec.margin, context)
    w, h = img.size
    if left >= 0 and top >= 0 and right <= w and bottom <= h:
        # resize with a source box: one antialiased resampling of exactly the square
        return img.resize((out_side, out_side), Image.Resampling.BILINEAR, box=(left, top, right, bottom))
    # The square leaves the image, and the crop is defined on the image grown with mid-grey to cover it. The
    # resampling reads the square plus the bilinear filter's reach (one output pixel in source pixels), so
    # only that window of the grown image is built: the same pixels, whatever lies farther away.
    reach = math.ceil(max((right - left) / out_side, 1.0)) + 2
    pad_l, pad_t = max(0, math.ceil(-left)), max(0, math.ceil(-top))
    pad_r, pad_b = max(0, math.ceil(right - w)), max(0, math.ceil(bottom - h))
    x0, x1 = max(-pad_l, math.floor(left) - reach), min(w + pad_r, math.ceil(right) + reach)
    y0, y1 = max(-pad_t, math.floor(top) - reach), min(h + pad_b, math.ceil(bottom) + reach)
    covered = max(0, min(x1, w) - max(x0, 0)) * max(0, min(y1, h) - max(y0, 0))
    if (x1 - x0) * (y1 - y0) > max(2 * covered + 4 * out_side * out_side, _SMALL_CANVAS):
        # mostly grey (a strip and its huge square): resample only the image's part, never the grey
        return _crop_mostly_outside(img, (left, top, right, bottom), out_side)
    canvas = Image.new("RGB", (x1 - x0, y1 - y0), FILL)
    canvas.paste(img, (-x0, -y0))  # PIL clips the paste to the canvas
    return canvas.resize((out_side, out_side), Image.Resampling.BILINEAR,
                         box=(left - x0, top - y0, right - x0, bottom - y0))


def _crop_mostly_outside(img: Image.Image, square: tuple[float, float, float, float], out_side: int) -> Image.Image:
    """crop_face for a square mostly outside the image: the image's part resized into its place (snapped to whole
    output pixels) on a grey output. Allocates the output and at most the output's share of the image."""
    left, top, right, bottom = square
    w, h = img.size
    step = (right - left) / out_side  # source pixels per output pixel
    ox0, ox1 = round((max(left, 0.0) - left) / step), round((min(right, float(w)) - left) / step)
    oy0, oy1 = round((max(top, 0.0) - top) / step), round((min(bottom, float(h)) - top) / step)
    out = Image.new("RGB", (out_side, out_side), FILL)
    src = (max(0.0, left + ox0 * step), max(0.0, top + oy0 * step),
           min(float(w), left + ox1 * step), min(float(h), top + oy1 * step))
    if ox1 > ox0 and oy1 > oy0 and src[2] > src[0] and src[3] > src[1]:
        part = img.resize((ox1 - ox0, oy1 - oy0), Image.Resampling.BILINEAR, box=src)
        out.paste(part, (ox0, oy0))
    return out


def largest(boxes: list[FaceBox]) -> FaceBox | None:
    """The largest face (ties: the higher score), or None."""
    return max(boxes, key=lambda b: (b.area, b.score)) if boxes else None
