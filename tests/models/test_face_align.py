"""Eye alignment: the angle, the choice of eyes, and the rotated crop's geometry; the margin losses; quality."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFilter

from models.faces.align import EyeFinder, Eyes, crop_aligned, eye_angle, face_input, pick_eyes, rotate_point
from models.faces.crop import CropSpec, crop_face
from models.faces.detect import FaceBox, HaarDetector
from models.faces.losses import margin_logits, margin_softmax_loss
from models.faces.quality import FaceQuality, laplacian_variance, measure

LFW = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "lfw" / "images"


def two_dots(angle: float, size: int = 200, gap: float = 60.0) -> tuple[Image.Image, tuple[float, float],
                                                                        tuple[float, float]]:
    """A grey image with two black dots whose joining line is at `angle` degrees (y down), centred."""
    img = Image.new("RGB", (size, size), (200, 200, 200))
    d = ImageDraw.Draw(img)
    c = size / 2.0
    t = math.radians(angle)
    left = (c - gap / 2 * math.cos(t), c - gap / 2 * math.sin(t))
    right = (c + gap / 2 * math.cos(t), c + gap / 2 * math.sin(t))
    for x, y in (left, right):
        d.ellipse((x - 6, y - 6, x + 6, y + 6), fill=(0, 0, 0))
    return img, left, right


def dark_centroids(img: Image.Image) -> list[tuple[float, float]]:
    """Centroids of the dark pixels in the left and right halves."""
    a = np.asarray(img.convert("L")).astype(float)
    out = []
    for lo, hi in ((0, a.shape[1] // 2), (a.shape[1] // 2, a.shape[1])):
        ys, xs = np.nonzero(a[:, lo:hi] < 90)
        out.append((float(xs.mean()) + lo, float(ys.mean())))
    return out


def test_eye_angle_signs() -> None:
    assert eye_angle((0, 0), (10, 0)) == 0.0
    assert eye_angle((0, 0), (10, 10)) == pytest.approx(45.0)  # right eye lower: clockwise tilt on screen
    assert eye_angle((0, 10), (10, 0)) == pytest.approx(-45.0)
    assert Eyes((0, 0), (10, 10)).angle == pytest.approx(45.0)


def test_rotate_point_levels_the_eye_line() -> None:
    left, right = (40.0, 50.0), (80.0, 70.0)
    angle = eye_angle(left, right)
    centre = (60.0, 60.0)
    a, b = rotate_point(left, centre, angle), rotate_point(right, centre, angle)
    assert a[1] == pytest.approx(b[1], abs=1e-9) and b[0] > a[0]
    assert math.dist(a, b) == pytest.approx(math.dist(left, right))


@pytest.mark.parametrize("angle", [-20.0, -8.0, 5.0, 15.0])
def test_crop_aligned_makes_the_dots_level(angle: float) -> None:
    img, left, right = two_dots(angle)
    box = FaceBox(50, 50, 100, 100, 1.0)
    spec = CropSpec(size=64, margin=0.1)
    before = dark_centroids(crop_face(img, box, spec))
    after = dark_centroids(crop_aligned(img, box, spec, eye_angle(left, right)))
    assert abs(before[0][1] - before[1][1]) > 2.0  # tilted before
    assert abs(after[0][1] - after[1][1]) < 1.0  # level after
    # the rotation is about the box centre: the midpoint stays where it was
    mid_b = np.mean(before, axis=0)
    mid_a = np.mean(after, axis=0)
    assert np.abs(mid_a - mid_b).max() < 1.0


def test_crop_aligned_with_no_angle_is_crop_face() -> None:
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (90, 120, 3), dtype=np.uint8))
    box = FaceBox(10, 5, 60, 70, 1.0)
    spec = CropSpec(size=32, margin=0.1)
    assert np.array_equal(np.asarray(crop_aligned(img, box, spec, 0.0)), np.asarray(crop_face(img, box, spec)))


def test_crop_aligned_on_a_strip_stays_small() -> None:
    img = Image.new("RGB", (20000, 2), (10, 10, 10))
    out = crop_aligned(img, FaceBox(0, 0, 20000, 2, 1.0), CropSpec(size=32, margin=0.0), 12.0)
    assert out.size == (32, 32)


def test_pick_eyes_prefers_a_level_pair_at_a_plausible_gap() -> None:
    box = FaceBox(0, 0, 100, 100, 1.0)
    eyes = pick_eyes([(30, 40, 15), (70, 41, 15), (70, 20, 15), (48, 40, 10)], box, 30.0)
    assert eyes is not None and eyes.left == (30, 40) and eyes.right == (70, 41)
    assert pick_eyes([(30, 40, 15)], box, 30.0) is None  # one eye only
    assert pick_eyes([(30, 40, 15), (70, 80, 15)], box, 30.0) is None  # 45 degrees: too steep
    assert pick_eyes([(45, 40, 15), (55, 40, 15)], box, 30.0) is None  # 10% apart: too close


def test_face_input_aligns_only_when_the_spec_says_so() -> None:
    img, left, right = two_dots(12.0)
    box = FaceBox(50, 50, 100, 100, 1.0)

    class Fixed:
        def find(self, _img: Image.Image, _box: FaceBox) -> Eyes:
            return Eyes(left, right)

    plain, none_found = face_input(img, box, CropSpec(size=64, margin=0.1), Fixed())  # type: ignore[arg-type]
    aligned, eyes = face_input(img, box, CropSpec(size=64, margin=0.1, align="eyes"), Fixed())  # type: ignore[arg-type]
    assert none_found is None and eyes is not None
    assert np.array_equal(np.asarray(plain), np.asarray(crop_face(img, box, CropSpec(size=64, margin=0.1))))
    c = dark_centroids(aligned)
    assert abs(c[0][1] - c[1][1]) < 1.0
    with pytest.raises(ValueError, match="alignment"):
        CropSpec(align="nose")


@pytest.mark.skipif(not LFW.is_dir(), reason="needs ../shared/data/lfw")
def test_eye_finder_on_real_faces() -> None:
    """On LFW's deep-funneled (already level) faces, the eyes found are near level and inside the face's top half."""
    files = sorted(LFW.glob("A*/*.jpg"))[:40]
    det, finder = HaarDetector(), EyeFinder()
    found = []
    for f in files:
        img = Image.open(f).convert("RGB")
        boxes = det.detect(img)
        if boxes:
            e = finder.find(img, boxes[0])
            if e:
                found.append((e, boxes[0]))
    assert len(found) >= 10
    for e, b in found:
        assert abs(e.angle) < 30.0
        assert b.y < e.left[1] < b.y + 0.65 * b.h and e.left[0] < e.right[0]
    assert np.median([abs(e.angle) for e, _ in found]) < 6.0


# ----------------------------------------------------------------------------------------------- margin losses
def unit(*rows: list[float]) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.tensor(rows, dtype=torch.float32), dim=-1)


def test_margin_logits_on_hand_made_embeddings() -> None:
    w = unit([1, 0], [0, 1])
    emb = unit([math.cos(0.3), math.sin(0.3)])  # angle 0.3 rad from class 0
    y = torch.tensor([0])
    cos0, cos1 = math.cos(0.3), math.sin(0.3)
    norm = margin_logits(emb, w, y, kind="normface", scale=10.0, margin=0.0)
    assert norm[0].tolist() == pytest.approx([10 * cos0, 10 * cos1], abs=1e-5)
    cosf = margin_logits(emb, w, y, kind="cosface", scale=10.0, margin=0.35)
    assert cosf[0].tolist() == pytest.approx([10 * (cos0 - 0.35), 10 * cos1], abs=1e-5)
    arc = margin_logits(emb, w, y, kind="arcface", scale=10.0, margin=0.5)
    assert arc[0].tolist() == pytest.approx([10 * math.cos(0.8), 10 * cos1], abs=1e-5)
    # past pi - m ArcFace's target falls back to cos - m sin m (stays monotonic in the angle)
    far = unit([math.cos(3.0), math.sin(3.0)])
    arc_far = margin_logits(far, w, y, kind="arcface", scale=1.0, margin=0.5)
    assert arc_far[0, 0].item() == pytest.approx(math.cos(3.0) - 0.5 * math.sin(0.5), abs=1e-5)
    with pytest.raises(ValueError, match="unknown margin loss"):
        margin_logits(emb, w, y, kind="sphereface", scale=1.0, margin=0.1)


def test_a_margin_makes_the_loss_larger_and_its_gradient_pull_harder() -> None:
    w = torch.nn.Parameter(unit([1, 0, 0], [0, 1, 0], [0, 0, 1]).clone())
    emb = unit([0.9, 0.3, 0.1], [0.2, 0.9, 0.1]).requires_grad_(True)
    y = torch.tensor([0, 1])
    plain = margin_softmax_loss(emb, w, y, kind="normface", scale=16.0, margin=0.0)
    cos = margin_softmax_loss(emb, w, y, kind="cosface", scale=16.0, margin=0.35)
    arc = margin_softmax_loss(emb, w, y, kind="arcface", scale=16.0, margin=0.5)
    assert cos.item() > plain.item() and arc.item() > plain.item()
    arc.backward()
    assert emb.grad is not None and torch.isfinite(emb.grad).all() and w.grad is not None


# ------------------------------------------------------------------------------------------------------ quality
def test_laplacian_variance_ranks_sharp_above_blurred() -> None:
    assert laplacian_variance(np.full((20, 20), 128.0)) == 0.0
    assert laplacian_variance(np.zeros((2, 2))) == 0.0
    rng = np.random.default_rng(0)
    sharp = Image.fromarray(rng.integers(0, 256, (64, 64), dtype=np.uint8))
    blurred = sharp.filter(ImageFilter.GaussianBlur(2))
    assert laplacian_variance(np.asarray(sharp)) > 10 * laplacian_variance(np.asarray(blurred))


def test_measure_and_issues() -> None:
    crop = Image.new("RGB", (64, 64), (100, 100, 100))
    q = measure(FaceBox(0, 0, 30, 50, 1.0), crop)
    assert q == FaceQuality(face_side=30, sharpness=0.0)
    assert q.issues(40, 100.0) == ["small", "blurred"]
    assert FaceQuality(80, 500.0).issues(40, 100.0) == []


def test_eye_finder_pool_without_a_cascade_embeds_unaligned(monkeypatch: pytest.MonkeyPatch) -> None:
    """An OpenCV without the eye cascade (the GPU machine's image) leaves alignment off, never a crash."""
    import models.faces.align as align

    def broken(*_a: object, **_k: object) -> None:
        raise RuntimeError("this OpenCV build ships no Haar cascades")

    monkeypatch.setattr(align, "EyeFinder", broken)
    pool = align.EyeFinderPool()
    assert pool.error is not None and "no Haar cascades" in pool.error
    img, _, _ = two_dots(15.0)
    box = FaceBox(50, 50, 100, 100, 1.0)
    crop, eyes = face_input(img, box, CropSpec(size=64, margin=0.1, align="eyes"), pool)
    assert eyes is None
    assert np.array_equal(np.asarray(crop), np.asarray(crop_face(img, box, CropSpec(size=64, margin=0.1))))
