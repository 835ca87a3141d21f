"""In-plane face alignment from the two eyes, found with the eye cascade OpenCV ships.

A face box from the frontal-face cascade says where a face is, not how it is tilted. Embedders see
faces more alike when the line through the eyes is level (the usual first step of face pipelines:
FaceNet, ArcFace and dlib align on landmarks). Here the landmarks are the centres of the two eyes
that `haarcascade_eye.xml` finds in the upper part of the face box; the crop is then rotated about
the box centre by the eye line's angle. When no plausible pair of eyes is found (closed eyes,
glasses, profile, a tiny face), the angle is 0 and the crop is the unaligned one: alignment can
only refine a detection, never lose a face.

Geometry, in image coordinates (x right, y down): the eye line's angle is atan2(dy, dx) of the
vector from the image-left eye to the image-right eye; a positive angle means the face is tilted
clockwise on screen, and rotating the crop counter-clockwise by that angle levels it.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .crop import FILL, CropSpec, crop_face
from .detect import FaceBox, haar_cascade_path

EYE_CASCADE = "haarcascade_eye.xml"
SQRT2 = math.sqrt(2.0)

# where eyes may be, as fractions of the face box (Haar face boxes put the eyes at about 38% of the height)
_BAND = (0.12, 0.62)  # top and bottom of the searched band
_EYE_SIDE = (0.10, 0.40)  # eye box side
_EYE_GAP = (0.22, 0.70)  # horizontal distance between the eye centres
_WORK_WIDTH = 160  # the band is scaled to this width before the cascade runs (speed, and the same scale always)


@dataclass(frozen=True)
class Eyes:
    """Centres of the image-left and image-right eye, in image pixels."""

    left: tuple[float, float]
    right: tuple[float, float]

    @property
    def angle(self) -> float:
        """Degrees of the eye line from horizontal (positive: the image-right eye is lower)."""
        return eye_angle(self.left, self.right)

    def to_dict(self) -> dict[str, list[float]]:
        return {"left": [round(v, 1) for v in self.left], "right": [round(v, 1) for v in self.right]}


def eye_angle(left: tuple[float, float], right: tuple[float, float]) -> float:
    """Degrees of the line from `left` to `right` (x right, y down); 0 when level."""
    return math.degrees(math.atan2(right[1] - left[1], right[0] - left[0]))


def rotate_point(p: tuple[float, float], centre: tuple[float, float], degrees: float) -> tuple[float, float]:
    """Where a point goes when the image is rotated counter-clockwise on screen by `degrees` about `centre`
    (what `crop_aligned` does to the face): with y down, that is a clockwise turn in the maths convention."""
    t = math.radians(degrees)
    dx, dy = p[0] - centre[0], p[1] - centre[1]
    return (centre[0] + dx * math.cos(t) + dy * math.sin(t), centre[1] - dx * math.sin(t) + dy * math.cos(t))


def pick_eyes(candidates: list[tuple[float, float, float]], box: FaceBox, max_angle: float) -> Eyes | None:
    """The most plausible pair among eye candidates (centre x, centre y, side; image pixels) inside a face box:
    one in each half of the box, both in the eye band, a gap of 22-70% of the box width, a tilt of at most
    `max_angle`; the pair nearest a level line at a typical gap (40% of the width) wins."""
    w = float(box.w)
    cx = box.x + w / 2.0
    best: tuple[float, Eyes] | None = None
    lefts = [c for c in candidates if c[0] < cx]
    rights = [c for c in candidates if c[0] >= cx]
    for lx, ly, _ in lefts:
        for rx, ry, _ in rights:
            gap = (rx - lx) / w
            if not _EYE_GAP[0] <= gap <= _EYE_GAP[1]:
                continue
            angle = eye_angle((lx, ly), (rx, ry))
            if abs(angle) > max_angle:
                continue
            cost = abs(ry - ly) / w + abs(gap - 0.40)
            if best is None or cost < best[0]:
                best = (cost, Eyes((lx, ly), (rx, ry)))
    return best[1] if best else None


class EyeFinder:
    """Finds the two eyes inside a face box with OpenCV's eye cascade (not thread-safe: one per thread)."""

    def __init__(self, cascade: Path | None = None, max_angle: float = 30.0) -> None:
        import cv2

        path = cascade or haar_cascade_path(EYE_CASCADE)
        self._cascade = cv2.CascadeClassifier(str(path))
        if self._cascade.empty():
            raise RuntimeError(f"could not load the eye cascade {path}")
        self.max_angle = max_angle

    def candidates(self, img: Image.Image, box: FaceBox) -> list[tuple[float, float, float]]:
        """Eye detections (centre x, centre y, side) in image pixels, within the eye band of the box."""
        import cv2

        left, right = max(0, box.x), min(img.width, box.x + box.w)
        top = max(0, box.y + round(_BAND[0] * box.h))
        bottom = min(img.height, box.y + round(_BAND[1] * box.h))
        if right - left < 16 or bottom - top < 8:
            return []
        band = img.crop((left, top, right, bottom)).convert("L")
        scale = _WORK_WIDTH / band.width
        band = band.resize((_WORK_WIDTH, max(1, round(band.height * scale))), Image.Resampling.BILINEAR)
        gray = cv2.equalizeHist(np.asarray(band))
        unit = box.w * scale  # the face box width in working pixels
        lo, hi = max(4, round(_EYE_SIDE[0] * unit)), max(5, round(_EYE_SIDE[1] * unit))
        if min(gray.shape) < lo:
            return []
        rects = self._cascade.detectMultiScale(gray, scaleFactor=1.1, minNeighbors=3, minSize=(lo, lo),
                                               maxSize=(hi, hi))
        out = []
        for x, y, w, h in np.asarray(rects).reshape(-1, 4).tolist():
            out.append((left + (x + w / 2.0) / scale, top + (y + h / 2.0) / scale, w / scale))
        return out

    def find(self, img: Image.Image, box: FaceBox) -> Eyes | None:
        return pick_eyes(self.candidates(img, box), box, self.max_angle)


class EyeFinderPool:
    """One EyeFinder per thread (cascades are not safe to share); `error` says why none can be built."""

    def __init__(self) -> None:
        self._local = threading.local()
        self.error: str | None = None
        try:
            EyeFinder()
        except Exception as exc:  # an OpenCV without cascades: alignment is then unavailable, not a crash
            self.error = f"{type(exc).__name__}: {exc}"

    def find(self, img: Image.Image, box: FaceBox) -> Eyes | None:
        if self.error is not None:
            return None
        finder: EyeFinder | None = getattr(self._local, "finder", None)
        if finder is None:
            finder = self._local.finder = EyeFinder()
        return finder.find(img, box)


def crop_aligned(img: Image.Image, box: FaceBox, spec: CropSpec, angle: float, *, context: float = 1.0,
                 size: int | None = None) -> Image.Image:
    """`crop_face` rotated counter-clockwise (on screen) by `angle` degrees about the box centre, so that an eye
    line at `angle` becomes level. Angle 0 is exactly `crop_face`.

    The square of side sqrt(2) x the crop's is cut at twice the output resolution (memory bounded as in
    crop_face), rotated about its centre (every pixel of the inner square stays defined for any angle), and its
    centre window of the crop's side is resized to the output: one antialiased downscale, as in crop_face."""
    out_side = size or spec.size
    if angle == 0.0:
        return crop_face(img, box, spec, context=context, size=out_side)
    big = 2 * math.ceil(out_side * SQRT2)
    wide = crop_face(img, box, spec, context=context * SQRT2, size=big)
    turned = wide.rotate(angle, resample=Image.Resampling.BILINEAR, center=(big / 2.0, big / 2.0), fillcolor=FILL)
    inner = big / SQRT2
    lo = (big - inner) / 2.0
    return turned.resize((out_side, out_side), Image.Resampling.BILINEAR, box=(lo, lo, lo + inner, lo + inner))


def face_input(img: Image.Image, box: FaceBox, spec: CropSpec, eyes: EyeFinder | EyeFinderPool | None
               ) -> tuple[Image.Image, Eyes | None]:
    """The embedder's input crop of one detected face as the serving path makes it (and the evaluation commands,
    which must see what the service sees): aligned on the eyes when the spec says so and they are found."""
    found = eyes.find(img, box) if spec.align == "eyes" and eyes is not None else None
    return crop_aligned(img, box, spec, found.angle if found else 0.0), found
