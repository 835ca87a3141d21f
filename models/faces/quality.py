"""Face image quality for a gallery: is a face big and sharp enough to enrol?

A gallery is only as good as its enrolment photos (NIST's face-in-video and FRVT reports, and every
face service's guidance, put image quality first). Two measures that need no model:

- **face side**: the shorter side of the detector box in the original image, in pixels. Below about
  40 pixels a face carries little identity (ICAO-style guidance asks for 90+ pixels between the eyes
  for passports; surveillance studies see accuracy fall quickly under 32-pixel faces).
- **sharpness**: the variance of the Laplacian of the grey face crop at the embedder's input size
  (Pech-Pacheco et al. 2000), so faces of every size are judged on the same grid. A blurred face has
  few strong second derivatives and a low variance.

The limits are settings of the service; `models/faces/quality.py` only measures.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from .detect import FaceBox


@dataclass(frozen=True)
class FaceQuality:
    """What a face's quality checks measured."""

    face_side: int
    sharpness: float

    def issues(self, min_side: int, min_sharpness: float) -> list[str]:
        """'small' and/or 'blurred' against the given limits (empty: fine)."""
        out = []
        if self.face_side < min_side:
            out.append("small")
        if self.sharpness < min_sharpness:
            out.append("blurred")
        return out


def laplacian_variance(gray: np.ndarray) -> float:
    """Variance of the 4-neighbour Laplacian of a 2-D grey image (0-255 scale), over its interior."""
    g = np.asarray(gray, dtype=np.float64)
    if g.ndim != 2 or min(g.shape) < 3:
        return 0.0
    lap = (g[:-2, 1:-1] + g[2:, 1:-1] + g[1:-1, :-2] + g[1:-1, 2:]) - 4.0 * g[1:-1, 1:-1]
    return float(lap.var())


def measure(box: FaceBox, crop: Image.Image) -> FaceQuality:
    """Quality of one face: its box in the original image and the embedder's input crop of it."""
    return FaceQuality(
        face_side=int(min(box.w, box.h)), sharpness=round(laplacian_variance(np.asarray(crop.convert("L"))), 2)
    )
