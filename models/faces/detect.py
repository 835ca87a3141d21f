"""Face detectors: one small interface, OpenCV's bundled Haar cascade as the offline default.

A detector takes an RGB image (PIL) and returns boxes in pixel coordinates with a score. `none`
is the detector for callers who send already-cropped faces: it returns the whole image.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class FaceBox:
    """A detected face: top-left corner, width and height in pixels, and the detector's score."""

    x: int
    y: int
    w: int
    h: int
    score: float

    @property
    def area(self) -> int:
        return self.w * self.h

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


class Detector(Protocol):
    """Finds faces in an RGB image and returns them largest first (ties: higher score first)."""

    name: str

    def detect(self, img: Image.Image) -> list[FaceBox]: ...


class WholeImageDetector:
    """`detector=none`: the caller sends a cropped face, so the face is the whole image (score 1)."""

    name = "none"

    def detect(self, img: Image.Image) -> list[FaceBox]:
        return [FaceBox(0, 0, img.width, img.height, 1.0)]


@dataclass(frozen=True)
class HaarParams:
    """cv2.CascadeClassifier.detectMultiScale parameters."""

    scale_factor: float = 1.1
    min_neighbors: int = 5
    min_size: int = 24
    max_side: int = 1024  # images are scaled down to this longest side before detection (speed)


def haar_cascade_path(file_name: str = "haarcascade_frontalface_default.xml") -> Path:
    """The cascade file opencv-python(-headless) < 5 ships in cv2.data.haarcascades."""
    import cv2

    base = getattr(getattr(cv2, "data", None), "haarcascades", None)
    if not base:
        raise RuntimeError("this OpenCV build ships no Haar cascades (opencv-python-headless >= 5 dropped them); "
                           "install opencv-python-headless<5")
    path = Path(base) / file_name
    if not path.is_file():
        raise RuntimeError(f"Haar cascade {path} not found")
    return path


class HaarDetector:
    """OpenCV's Viola-Jones frontal-face cascade. Scores are the cascade's level weights (higher is
    surer; roughly 0-10), faces sorted largest first."""

    name = "haar"

    def __init__(self, params: HaarParams | None = None, cascade: Path | None = None) -> None:
        import cv2

        self.params = params or HaarParams()
        path = cascade or haar_cascade_path()
        self._cascade = cv2.CascadeClassifier(str(path))
        if self._cascade.empty():
            raise RuntimeError(f"could not load the Haar cascade {path}")

    def detect(self, img: Image.Image) -> list[FaceBox]:
        import cv2

        p = self.params
        if min(img.size) < p.min_size:
            return []  # no face of the minimum size fits (and a 20000 x 1 strip would scale to 0 rows)
        gray = np.asarray(img.convert("L"))
        scale = 1.0
        longest = max(gray.shape)
        if longest > p.max_side:
            scale = longest / p.max_side
            # at least one pixel per side: cv2.resize refuses an empty size
            size = (max(1, round(gray.shape[1] / scale)), max(1, round(gray.shape[0] / scale)))
            gray = cv2.resize(gray, size, interpolation=cv2.INTER_AREA)
        gray = cv2.equalizeHist(gray)
        min_size = max(1, round(p.min_size / scale))
        if min(gray.shape) < min_size:
            return []
        rects, _levels, weights = self._cascade.detectMultiScale3(
            gray, scaleFactor=p.scale_factor, minNeighbors=p.min_neighbors, minSize=(min_size, min_size),
            outputRejectLevels=True)
        boxes = [
            FaceBox(round(x * scale), round(y * scale), round(w * scale), round(h * scale), float(s))
            for (x, y, w, h), s in zip(np.asarray(rects).reshape(-1, 4).tolist(),
                                       np.asarray(weights).reshape(-1).tolist(), strict=True)
        ]
        return sorted(boxes, key=lambda b: (-b.area, -b.score))


def make_detector(name: str, params: HaarParams | None = None) -> Detector:
    """A detector by name: 'haar' or 'none'."""
    if name == "haar":
        return HaarDetector(params)
    if name == "none":
        return WholeImageDetector()
    raise ValueError(f"unknown face detector {name!r} (known: haar, none)")
