"""The faces package (detection, crop geometry, embedder, triplet loss, pair metrics, LFW lists) and the pure
helpers of the face training command, on tiny hand-made inputs."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from models.faces.crop import CropSpec, crop_face, largest, square_box
from models.faces.detect import FaceBox, HaarDetector, HaarParams, WholeImageDetector, make_detector
from models.faces.evaluation import (
    accuracy_at,
    auc,
    best_threshold,
    evaluate_pairs,
    kfold_accuracy,
    plot_roc,
    roc_curve,
    tar_at_far,
)
from models.faces.lfw import Pair, holdout_split, identity_images, image_path, read_pairs
from models.faces.losses import pairwise_sq_dist, semi_hard_triplets, triplet_loss
from models.faces.net import FaceEmbedder, build_embedder
from models.train.faces import (
    CONTEXT,
    PKSampler,
    augment,
    center,
    central_face,
    export_onnx,
    fallback_box,
    onnx_parity,
    pair_distances,
)
from tests.conftest import SHARED_DATA
from tests.crafted import pixel_budget

LFW_IMAGE = SHARED_DATA / "lfw" / "images" / "George_W_Bush" / "George_W_Bush_0001.jpg"


def noise_image(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def smooth_image(w: int, h: int) -> Image.Image:
    """Smooth gradients, so different resampling paths agree to within a grey level or two."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    a = np.stack([x / w * 255, y / h * 255, 127 + 100 * np.sin(x / 9.0) * np.cos(y / 11.0)], axis=-1)
    return Image.fromarray(a.round().clip(0, 255).astype(np.uint8))


def unit(deg: float) -> list[float]:
    r = math.radians(deg)
    return [math.cos(r), math.sin(r)]


def sq(deg_a: float, deg_b: float) -> float:
    """Squared L2 distance of two unit vectors `deg` apart."""
    return 2.0 - 2.0 * math.cos(math.radians(deg_a - deg_b))


# ----------------------------------------------------------------------------------------------------- crop


def test_square_box_of_a_non_square_box_is_centred_with_margin_and_context() -> None:
    box = FaceBox(10, 20, 40, 20, 1.0)  # centre (30, 30), longer side 40
    assert square_box(box, 0.0) == pytest.approx((10, 10, 50, 50))
    assert square_box(box, 0.25) == pytest.approx((0, 0, 60, 60))
    left, top, right, bottom = square_box(box, 0.25, context=1.125)
    side = 40 * 1.5 * 1.125
    assert (right - left, bottom - top) == pytest.approx((side, side))
    assert ((left + right) / 2, (top + bottom) / 2) == pytest.approx((30, 30))
    tall = square_box(FaceBox(0, 0, 10, 30, 1.0), 0.1)
    assert tall[2] - tall[0] == pytest.approx(30 * 1.2) and tall[3] - tall[1] == pytest.approx(30 * 1.2)
    assert ((tall[0] + tall[2]) / 2, (tall[1] + tall[3]) / 2) == pytest.approx((5, 15))


def test_crop_face_output_size_and_mode() -> None:
    img = noise_image(50, 40)
    box = FaceBox(10, 10, 20, 16, 1.0)
    assert crop_face(img, box, CropSpec(size=32)).size == (32, 32)
    assert crop_face(img, box, CropSpec(size=32), size=20).size == (20, 20)
    out = crop_face(img.convert("L"), box, CropSpec(size=16), context=CONTEXT)
    assert out.mode == "RGB" and out.size == (16, 16)


def test_crop_inside_the_image_equals_pil_resize_of_the_region() -> None:
    img = smooth_image(100, 80)
    box = FaceBox(30, 20, 30, 30, 1.0)  # margin 0.1: side 36 -> (27, 17, 63, 53)
    spec = CropSpec(size=24, margin=0.1)
    assert square_box(box, spec.margin) == pytest.approx((27, 17, 63, 53))
    got = np.asarray(crop_face(img, box, spec), dtype=np.int16)
    want = np.asarray(img.crop((27, 17, 63, 53)).resize((24, 24), Image.Resampling.BILINEAR), dtype=np.int16)
    assert got.shape == want.shape == (24, 24, 3)
    assert np.abs(got - want).max() <= 3 and np.abs(got - want).mean() < 0.5


def test_crop_partly_outside_is_grey_filled_not_stretched() -> None:
    img = noise_image(40, 40, seed=1)
    # box (0, 0, 20, 20), margin 0.5: the square is (-10, -10, 30, 30), 40 px -> 40 px is a 1:1 copy
    out = np.asarray(crop_face(img, FaceBox(0, 0, 20, 20, 1.0), CropSpec(size=40, margin=0.5)), dtype=np.int16)
    src = np.asarray(img, dtype=np.int16)
    assert (out[:10, :, :] == 127).all() and (out[:, :10, :] == 127).all()
    # the part inside the image is the image itself, pixel for pixel (away from the seam)
    assert np.abs(out[11:, 11:] - src[1:30, 1:30]).max() <= 1


def test_crop_beyond_the_right_and_bottom_edges_is_grey_too() -> None:
    img = Image.new("RGB", (30, 30), (200, 10, 10))
    out = np.asarray(crop_face(img, FaceBox(20, 20, 10, 10, 1.0), CropSpec(size=20, margin=0.5)))
    # square (15, 15, 35, 35): image up to 30, grey beyond
    assert (out[:, 16:] == 127).all() and (out[16:, :] == 127).all()
    assert (out[:14, :14] == (200, 10, 10)).all()


def reference_crop_face(img: Image.Image, box: FaceBox, spec: CropSpec, *, context: float = 1.0) -> Image.Image:
    """crop_face as the shipped embedder was trained with it: the whole image grown with grey to cover the square."""
    img = img.convert("RGB")
    left, top, right, bottom = square_box(box, spec.margin, context)
    w, h = img.size
    pad_l, pad_t = max(0, math.ceil(-left)), max(0, math.ceil(-top))
    pad_r, pad_b = max(0, math.ceil(right - w)), max(0, math.ceil(bottom - h))
    if pad_l or pad_t or pad_r or pad_b:
        canvas = Image.new("RGB", (w + pad_l + pad_r, h + pad_t + pad_b), (127, 127, 127))
        canvas.paste(img, (pad_l, pad_t))
        img = canvas
        left, right, top, bottom = left + pad_l, right + pad_l, top + pad_t, bottom + pad_t
    return img.resize((spec.size, spec.size), Image.Resampling.BILINEAR, box=(left, top, right, bottom))


def test_crop_of_normal_boxes_matches_the_training_crop() -> None:
    """Detector boxes anywhere in photos (inside, over an edge, with margin and context) and detector=none on
    near-square crops: within one grey level of the crop the model was trained with."""
    rnd = np.random.default_rng(8)
    worst = 0
    for i in range(300):
        w, h = (int(v) for v in rnd.integers(8, 300, 2))
        if i % 3 == 0:  # detector=none on a cropped face: aspect up to 2:1
            h = int(np.clip(h, w // 2 + 1, 2 * w))
            box, margin = FaceBox(0, 0, w, h, 1.0), 0.0
        else:
            bw, bh = int(rnd.integers(1, w + 1)), int(rnd.integers(1, h + 1))
            box = FaceBox(int(rnd.integers(0, w - bw + 1)), int(rnd.integers(0, h - bh + 1)), bw, bh, 1.0)
            margin = float(rnd.choice([0.0, 0.1, 0.2, 0.5, 1.0]))
        spec, context = CropSpec(size=int(rnd.choice([16, 64, 112])), margin=margin), float(rnd.choice([1.0, CONTEXT]))
        img = noise_image(w, h, seed=i)
        got = np.asarray(crop_face(img, box, spec, context=context), dtype=np.int16)
        want = np.asarray(reference_crop_face(img, box, spec, context=context), dtype=np.int16)
        worst = max(worst, int(np.abs(got - want).max()))
    assert worst <= 1


def test_crop_over_the_top_left_edge_is_the_training_crop_bit_for_bit() -> None:
    img = noise_image(90, 70, seed=4)
    for box in (FaceBox(0, 0, 30, 30, 1.0), FaceBox(2, 5, 60, 40, 1.0), FaceBox(0, 0, 90, 70, 1.0)):
        spec = CropSpec(size=32, margin=0.3)
        got = np.asarray(crop_face(img, box, spec, context=CONTEXT))
        assert (got == np.asarray(reference_crop_face(img, box, spec, context=CONTEXT))).all()


@pytest.mark.parametrize("size", [(20000, 3), (3, 20000), (200_000, 1), (1, 200_000), (20000, 1000)])
def test_crop_of_a_whole_strip_allocates_no_square_canvas(size: tuple[int, int]) -> None:
    """detector=none on a strip: the square around it is side x side (1.2 GB at 20000 x 20000) but only the output
    and the strip's share of it are ever made."""
    img = Image.new("RGB", size, (250, 20, 20))
    spec = CropSpec(size=16, margin=0.0)
    with pixel_budget(64 * 16 * 16) as made:
        out = crop_face(img, WholeImageDetector().detect(img)[0], spec)
    assert out.size == (16, 16) and out.mode == "RGB" and made
    arr = np.asarray(out, dtype=np.int16)
    short = min(size) / max(size) * 16  # the strip's thickness in output pixels
    red = (np.abs(arr - (250, 20, 20)).max(axis=-1) <= 2)
    grey = (arr == 127).all(axis=-1)
    assert (red | grey).all()
    assert red.sum() == pytest.approx(16 * round(short), abs=16)


def test_crop_of_a_strip_matches_the_training_crop_away_from_the_seams() -> None:
    # 2000 x 200 with detector=none: a 2000 x 2000 square, the strip a 10-row band in a 100-pixel crop
    img = smooth_image(2000, 200)
    box, spec = FaceBox(0, 0, 2000, 200, 1.0), CropSpec(size=100, margin=0.0)
    with pixel_budget(2000 * 200) as made:
        got = np.asarray(crop_face(img, box, spec), dtype=np.int16)
    assert max(w * h for w, h in made) <= 100 * 100  # never the 2000 x 2000 grey canvas
    want = np.asarray(reference_crop_face(img, box, spec), dtype=np.int16)
    assert (got[:44] == 127).all() and (got[56:] == 127).all()
    assert np.abs(got[46:54] - want[46:54]).max() <= 3  # inside the band
    assert np.abs(got - want).mean() < 1.0


def test_crop_of_a_box_far_outside_the_image_is_grey() -> None:
    img = Image.new("RGB", (10, 10), (0, 200, 0))
    out = np.asarray(crop_face(img, FaceBox(0, 0, 10, 10, 1.0), CropSpec(size=16, margin=1.0), context=200.0))
    # a 6000-pixel square around a 10-pixel image: the image is under a thirtieth of an output pixel
    assert out.shape == (16, 16, 3) and (np.abs(out.astype(int) - 127) <= 1).all()


@pytest.mark.parametrize("kw", [{"size": 7}, {"margin": -0.01}, {"margin": 1.01}])
def test_crop_spec_rejects_bad_values(kw: dict) -> None:
    with pytest.raises(ValueError):
        CropSpec(**kw)


def test_crop_spec_accepts_boundary_values() -> None:
    assert CropSpec(size=8, margin=0.0).size == 8
    assert CropSpec(margin=1.0).margin == 1.0


# ----------------------------------------------------------------------------------------------- detectors


def test_whole_image_detector_returns_the_whole_image() -> None:
    boxes = WholeImageDetector().detect(Image.new("RGB", (37, 21)))
    assert boxes == [FaceBox(0, 0, 37, 21, 1.0)]
    assert boxes[0].area == 37 * 21
    assert boxes[0].to_dict() == {"x": 0, "y": 0, "w": 37, "h": 21, "score": 1.0}


def test_make_detector_by_name() -> None:
    assert isinstance(make_detector("none"), WholeImageDetector)
    assert isinstance(make_detector("haar"), HaarDetector)
    with pytest.raises(ValueError, match="bogus"):
        make_detector("bogus")


def test_haar_finds_nothing_in_a_blank_image() -> None:
    det = HaarDetector()
    assert det.detect(Image.new("RGB", (120, 100), (128, 128, 128))) == []
    # longer than max_side: the downscaling path, still nothing
    assert HaarDetector(HaarParams(max_side=64)).detect(Image.new("L", (200, 80), 0)) == []


@pytest.mark.parametrize("size", [(20000, 1), (1, 20000), (1, 1), (2, 1), (23, 500), (500, 23), (20000, 30),
                                  (30, 20000), (5000, 40)])
def test_haar_on_thin_and_tiny_images_finds_nothing_and_never_fails(size: tuple[int, int]) -> None:
    # 20000 x 1 used to scale to 1024 x 0 for detection: cv2.resize raised and the endpoint answered 500
    assert HaarDetector().detect(Image.new("RGB", size, (128, 128, 128))) == []


def test_haar_with_a_small_min_size_on_a_strip_scaled_to_one_row() -> None:
    det = HaarDetector(HaarParams(min_size=8, max_side=64))
    assert det.detect(Image.new("L", (20000, 10), 90)) == []  # 64 x 1 after scaling: no window fits
    assert det.detect(Image.new("L", (64, 8), 90)) == []


@pytest.mark.shared_data
def test_haar_finds_the_face_in_a_real_lfw_image() -> None:
    if not LFW_IMAGE.is_file():
        pytest.skip(f"{LFW_IMAGE} is not present")
    with Image.open(LFW_IMAGE) as im:
        img = im.convert("RGB")
    boxes = HaarDetector().detect(img)
    assert len(boxes) == 1
    b = boxes[0]
    assert 70 <= b.w <= 170 and b.w == b.h and b.score > 0
    assert abs(b.x + b.w / 2 - img.width / 2) < 30 and abs(b.y + b.h / 2 - img.height / 2) < 30
    # detection on a half-size copy (max_side) maps the box back to full-resolution coordinates
    half = HaarDetector(HaarParams(max_side=img.width // 2)).detect(img)
    assert len(half) == 1
    h = half[0]
    assert abs(h.x - b.x) <= 12 and abs(h.y - b.y) <= 12 and abs(h.w - b.w) <= 20
    assert crop_face(img, b, CropSpec()).size == (64, 64)


def test_largest_prefers_area_then_score() -> None:
    assert largest([]) is None
    a, b, c = FaceBox(0, 0, 10, 10, 9.0), FaceBox(5, 5, 20, 10, 1.0), FaceBox(50, 50, 10, 20, 2.0)
    assert largest([a, b, c]) == c  # b and c tie on area (200): the higher score wins
    assert largest([a]) == a


# ------------------------------------------------------------------------------------------------ embedder


def test_embedder_shape_and_unit_norm() -> None:
    torch.manual_seed(0)
    model = FaceEmbedder(size=16, dim=8, widths=(4, 4, 4, 4), blocks=(1, 1, 1, 1)).eval()
    with torch.no_grad():
        e = model(torch.randn(3, 3, 16, 16))
    assert e.shape == (3, 8)
    assert torch.allclose(e.norm(dim=-1), torch.ones(3), atol=1e-5)
    model.train()
    e = model(torch.randn(4, 3, 16, 16))
    assert e.shape == (4, 8) and torch.allclose(e.norm(dim=-1), torch.ones(4), atol=1e-5)


@pytest.mark.parametrize(("size", "dim", "widths", "blocks"), [(32, 12, (4, 8, 8), (1, 1, 1)),
                                                              (8, 5, (4,), (2,)),
                                                              (24, 16, (4, 4, 6), (1, 2, 1))])
def test_embedder_other_sizes_and_dims(size: int, dim: int, widths: tuple, blocks: tuple) -> None:
    model = FaceEmbedder(size=size, dim=dim, widths=widths, blocks=blocks).eval()
    with torch.no_grad():
        e = model(torch.randn(2, 3, size, size))
    assert e.shape == (2, dim) and model.size == size and model.dim == dim
    assert torch.allclose(e.norm(dim=-1), torch.ones(2), atol=1e-5)


def test_build_embedder_from_manifest_arch() -> None:
    arch = {"size": 16, "dim": 8, "widths": [4, 6], "blocks": [1, 2], "dropout": 0.0}
    model = build_embedder(arch)
    assert isinstance(model, FaceEmbedder) and model.size == 16 and model.dim == 8
    assert arch["widths"] == [4, 6]  # the caller's dict is not modified
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 8)
    with pytest.raises(ValueError, match="depth"):
        build_embedder({"size": 16, "depth": 3})


def test_embedder_rejects_bad_geometry() -> None:
    with pytest.raises(ValueError, match="divisible"):
        FaceEmbedder(size=20, widths=(4, 4, 4), blocks=(1, 1, 1))
    with pytest.raises(ValueError, match="divisible"):
        build_embedder({"size": 18, "widths": [4, 4], "blocks": [1, 1]})
    with pytest.raises(ValueError, match="one value per stage"):
        FaceEmbedder(size=16, widths=(4, 4), blocks=(1,))


def test_embedder_eval_mode_is_deterministic() -> None:
    torch.manual_seed(0)
    model = FaceEmbedder(size=16, dim=8, widths=(4, 4), blocks=(1, 1), dropout=0.5)
    x = torch.randn(2, 3, 16, 16)
    model.train()
    model(x)  # updates batch-norm statistics
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
        # one sample alone gives the same embedding as inside a batch
        assert torch.allclose(model(x[:1]), model(x)[:1], atol=1e-6)


# ------------------------------------------------------------------------------------------- triplet loss


def test_pairwise_sq_dist_matches_brute_force() -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 3, generator=g), torch.randn(4, 3, generator=g)
    brute = torch.tensor([[float(((x - y) ** 2).sum()) for y in b] for x in a])
    assert torch.allclose(pairwise_sq_dist(a, b), brute, atol=1e-5)
    self_d = pairwise_sq_dist(a)
    assert self_d.shape == (5, 5) and (self_d >= 0).all()
    assert torch.allclose(self_d, self_d.T, atol=1e-6) and torch.allclose(self_d.diag(), torch.zeros(5), atol=1e-5)


def test_semi_hard_picks_the_closest_negative_farther_than_the_positive() -> None:
    # a at 0 deg, p at 60 deg (d_ap = 1); negatives (distinct labels, so no other pairs) at 30, 100, 180 deg
    angles = [0, 60, 30, 100, 180]
    emb = torch.tensor([unit(d) for d in angles])
    labels = torch.tensor([0, 0, 1, 2, 3])
    a, p, n = semi_hard_triplets(emb, labels, 0.2)
    got = {(int(i), int(j)): int(k) for i, j, k in zip(a, p, n, strict=True)}
    # anchor 0: d to 30/100/180 deg = 0.27 / 2.35 / 4 -> beyond 1: 100 deg (index 3) is the closest
    # anchor 1 (60 deg): d to 30/100/180 deg = 0.27 / 0.47 / 3 -> only 180 deg (index 4) is beyond 1
    assert got == {(0, 1): 3, (1, 0): 4}
    margin = 1.5
    loss, stats = triplet_loss(emb, labels, margin)
    want = (max(0.0, 1.0 - sq(0, 100) + margin) + max(0.0, 1.0 - sq(60, 180) + margin)) / 2
    assert stats["triplets"] == 2 and stats["active"] == pytest.approx(0.5)
    assert float(loss.detach()) == pytest.approx(want, abs=1e-5)
    assert want == pytest.approx((1.0 - sq(0, 100) + margin) / 2)


def test_semi_hard_falls_back_to_the_farthest_negative() -> None:
    # a at 0, p at 180 deg (d_ap = 4): every negative is closer than the positive for both anchors
    angles = [0, 180, 30, 100]
    emb = torch.tensor([unit(d) for d in angles])
    labels = torch.tensor([0, 0, 1, 2])
    a, p, n = semi_hard_triplets(emb, labels, 0.2)
    got = {(int(i), int(j)): int(k) for i, j, k in zip(a, p, n, strict=True)}
    # anchor 0: farthest is 100 deg (index 3), not the hardest 30 deg; anchor 1 (180): farthest is 30 deg
    assert got == {(0, 1): 3, (1, 0): 2}
    loss, stats = triplet_loss(emb, labels, 0.2)
    want = ((4.0 - sq(0, 100) + 0.2) + (4.0 - sq(180, 30) + 0.2)) / 2
    assert float(loss.detach()) == pytest.approx(want, abs=1e-5) and stats == {"triplets": 2, "active": 1.0}


def test_semi_hard_matches_a_brute_force_rule_on_random_embeddings() -> None:
    g = torch.Generator().manual_seed(3)
    emb = F.normalize(torch.randn(12, 4, generator=g), dim=-1)
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 3, 4, 4, 5])
    d = torch.cdist(emb.double(), emb.double()) ** 2
    want = {}
    for i in range(12):
        for j in range(12):
            if i == j or labels[i] != labels[j]:
                continue
            negs = [k for k in range(12) if labels[k] != labels[i]]
            beyond = [k for k in negs if d[i, k] > d[i, j]]
            want[(i, j)] = min(beyond, key=lambda k: d[i, k]) if beyond else max(negs, key=lambda k: d[i, k])
    a, p, n = semi_hard_triplets(emb, labels, 0.2)
    assert {(int(i), int(j)): int(k) for i, j, k in zip(a, p, n, strict=True)} == want


def test_triplet_loss_is_zero_when_well_separated() -> None:
    emb = torch.tensor([unit(d) for d in (0, 5, 180, 185)])
    loss, stats = triplet_loss(emb, torch.tensor([0, 0, 1, 1]), 0.2)
    assert float(loss.detach()) == 0.0 and stats == {"triplets": 4, "active": 0.0}


def test_no_triplets_when_every_label_is_distinct() -> None:
    x = torch.randn(4, 3, requires_grad=True)
    emb = F.normalize(x, dim=-1)
    a, _p, _n = semi_hard_triplets(emb, torch.arange(4), 0.2)
    assert len(a) == 0
    loss, stats = triplet_loss(emb, torch.arange(4), 0.2)
    assert float(loss.detach()) == 0.0 and stats == {"triplets": 0, "active": 0.0}
    loss.backward()  # still differentiable (a zero that keeps the graph)
    assert x.grad is not None and float(x.grad.abs().sum()) == 0.0
    # a single identity: positives but no negatives -> no triplets either
    loss, stats = triplet_loss(F.normalize(torch.randn(3, 2), dim=-1), torch.zeros(3, dtype=torch.long))
    assert stats["triplets"] == 0 and float(loss.detach()) == 0.0


def test_triplet_loss_gradients_flow_and_reduce_the_loss() -> None:
    x = torch.tensor([unit(d) for d in (0, 60, 30, 100, 180)], requires_grad=True)
    labels = torch.tensor([0, 0, 1, 2, 3])
    loss, stats = triplet_loss(F.normalize(x, dim=-1), labels, 1.5)
    # by hand (|u(a) - u(b)|^2 = 2 - 2 cos(a - b)): anchor 0 / positive 60 (d 1) takes the closest negative beyond
    # it, 100 (d 2 - 2 cos 100): loss 1 - d + 1.5 > 0; anchor 60 / positive 0 (d 1) takes 180 (d 3, the only one
    # beyond): 1 - 3 + 1.5 < 0, inactive. Two triplets, half active, mean of the two
    d = [2 - 2 * math.cos(math.radians(angle)) for angle in (60, 100, 120)]
    assert stats == {"triplets": 2, "active": 0.5}
    assert float(loss.detach()) == pytest.approx((d[0] - d[1] + 1.5) / 2, rel=1e-5)
    loss.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    # the active triplet is (0, 1, 3): the gradient is that of its hinge alone (autograd on the formula), so the
    # unused negatives 2 and 4 get none
    xx = x.detach().clone().requires_grad_(True)
    e = F.normalize(xx, dim=-1)
    ((e[0] - e[1]).square().sum() - (e[0] - e[3]).square().sum() + 1.5).div(2).backward()
    assert xx.grad is not None and torch.allclose(x.grad, xx.grad, atol=1e-6)
    assert (x.grad[[0, 1, 3]].abs().sum(dim=1) > 1e-3).all()
    assert float(x.grad[2].abs().sum()) == 0.0 and float(x.grad[4].abs().sum()) == 0.0
    with torch.no_grad():
        x2 = x - 0.1 * x.grad
    loss2, _ = triplet_loss(F.normalize(x2, dim=-1), labels, 1.5)
    assert float(loss2.detach()) < float(loss.detach())


# ---------------------------------------------------------------------------------------------- evaluation


def test_best_threshold_separable() -> None:
    dist = np.array([0.1, 1.1, 0.2, 1.0, 0.3, 1.2])
    same = np.array([True, False, True, False, True, False])
    tau, acc = best_threshold(dist, same)
    # only thresholds in the gap between the farthest same pair (0.3) and the nearest different one (1.0) are
    # right on all six; the candidate there is the gap's midpoint
    assert acc == 1.0 and tau == pytest.approx((0.3 + 1.0) / 2)
    assert accuracy_at(dist, same, tau) == 1.0


def test_best_threshold_overlapping_hand_computed() -> None:
    # sorted: 0.1 S, 0.3 D, 0.5 S, 0.7 D, 0.9 S, 1.1 D -> correct counts 3,4,3,4,3,4,3 over the 7 thresholds:
    # best 4 of 6 at thresholds 0.2, 0.6, 1.0; the middle of those is 0.6
    dist = np.array([0.1, 0.5, 0.9, 0.3, 0.7, 1.1])
    same = np.array([True, True, True, False, False, False])
    tau, acc = best_threshold(dist, same)
    assert acc == pytest.approx(4 / 6) and tau == pytest.approx(0.6)
    assert accuracy_at(dist, same, tau) == pytest.approx(4 / 6)


def separable(n: int = 50, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n same pairs in [0, 0.8], then n different pairs in [1.2, 2]."""
    rng = np.random.default_rng(seed)
    dist = np.concatenate([rng.uniform(0.0, 0.8, n), rng.uniform(1.2, 2.0, n)])
    return dist, np.arange(2 * n) < n


def test_kfold_accuracy_on_separable_data() -> None:
    dist, same = separable()
    k = kfold_accuracy(dist, same)
    assert k["folds"] == 10 and len(k["per_fold"]) == 10 and len(k["thresholds"]) == 10
    assert k["mean"] == 1.0 and k["std"] == 0.0
    assert all(dist[same].max() < t < dist[~same].min() for t in k["thresholds"])


def test_kfold_folds_are_stratified_and_contiguous_per_class() -> None:
    # same pairs first, then different ones; one outlier among each class
    dist, same = separable()
    dist[49] = 5.0  # the last same pair -> part 9 of the same pairs -> fold 9
    dist[50] = 0.0  # the first different pair -> part 0 of the different pairs -> fold 0
    k = kfold_accuracy(dist, same)
    # stratified folds hold 5 same + 5 different pairs: one error in a fold of 10
    assert k["per_fold"] == pytest.approx([0.9] + [1.0] * 8 + [0.9])
    assert k["mean"] == pytest.approx(0.98)
    assert all(dist[same][:-1].max() < t < dist[~same][1:].min() for t in k["thresholds"])
    assert kfold_accuracy(dist, same, folds=5)["folds"] == 5


def test_roc_curve_endpoints_and_monotone() -> None:
    rng = np.random.default_rng(1)
    dist = rng.uniform(0, 4, 60)
    same = rng.random(60) < 0.5
    far, tar, th = roc_curve(dist, same)
    assert len(far) == len(tar) == len(th)
    assert (far[0], tar[0]) == (0.0, 0.0) and (far[-1], tar[-1]) == (1.0, 1.0)
    assert (np.diff(far) >= 0).all() and (np.diff(tar) >= 0).all() and (np.diff(th) > 0).all()


def test_auc_separable_and_random() -> None:
    dist, same = separable()
    assert auc(*roc_curve(dist, same)[:2]) == pytest.approx(1.0)
    rng = np.random.default_rng(0)
    dist = rng.uniform(0, 4, 4000)
    same = rng.random(4000) < 0.5
    assert auc(*roc_curve(dist, same)[:2]) == pytest.approx(0.5, abs=0.03)
    # reversed (same pairs farther): AUC 0
    dist, same = separable()
    assert auc(*roc_curve(dist, ~same)[:2]) == pytest.approx(0.0)


def test_tar_at_far_respects_the_bound() -> None:
    rng = np.random.default_rng(2)
    dist = np.concatenate([rng.normal(1.0, 0.3, 200), rng.normal(2.0, 0.3, 200)])
    same = np.arange(400) < 200
    far, tar, _ = roc_curve(dist, same)
    for target in (0.0, 0.01, 0.1, 0.5):
        r = tar_at_far(dist, same, target)
        assert r["far_target"] == target and r["far"] <= target
        assert r["tar"] == pytest.approx(tar[far <= target].max())
        # the threshold reproduces the reported rates
        assert r["far"] == pytest.approx(float((dist[~same] <= r["threshold"]).mean()))
        assert r["tar"] == pytest.approx(float((dist[same] <= r["threshold"]).mean()))
    assert tar_at_far(dist, same, 0.1)["tar"] > 0.5


def test_evaluate_pairs_report() -> None:
    dist, same = separable(20)
    rep = evaluate_pairs(dist, same)
    d = rep.to_dict()
    assert set(d) == {"pairs", "same_pairs", "kfold_accuracy", "roc_auc", "threshold", "accuracy_at_threshold",
                      "tar_at_far"}
    assert d["pairs"] == 40 and d["same_pairs"] == 20 and d["roc_auc"] == pytest.approx(1.0)
    assert d["accuracy_at_threshold"] == 1.0 and d["kfold_accuracy"]["mean"] == 1.0
    assert [t["far_target"] for t in d["tar_at_far"]] == [1e-2, 1e-3]


def test_plot_roc_writes_a_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    dist, same = separable(20)
    path = tmp_path / "roc.png"
    plot_roc(dist, same, path, "tiny")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------------------- lfw


def test_image_path_naming() -> None:
    assert image_path(Path("/lfw"), "Ann_Lee", 7) == Path("/lfw/Ann_Lee/Ann_Lee_0007.jpg")
    assert image_path(Path("r"), "X", 1234) == Path("r/X/X_1234.jpg")


def test_read_pairs(tmp_path: Path) -> None:
    f = tmp_path / "pairs.txt"
    f.write_text("2\nAnn_Lee\t1\t2\nAnn_Lee 3 Bob_Roe 1\n\n")
    root = tmp_path / "img"
    pairs = read_pairs(f, root)
    assert pairs == [
        Pair(root / "Ann_Lee" / "Ann_Lee_0001.jpg", root / "Ann_Lee" / "Ann_Lee_0002.jpg", True, ("Ann_Lee",)),
        Pair(root / "Ann_Lee" / "Ann_Lee_0003.jpg", root / "Bob_Roe" / "Bob_Roe_0001.jpg", False,
             ("Ann_Lee", "Bob_Roe")),
    ]
    f.write_text("10 300\nAnn_Lee 1 2\n")  # the pairs.txt header (folds, pairs per fold) is skipped too
    assert len(read_pairs(f, root)) == 1
    f.write_text("Ann_Lee 1 2\n")  # no count line
    assert len(read_pairs(f, root)) == 1


def test_read_pairs_malformed_line(tmp_path: Path) -> None:
    f = tmp_path / "pairs.txt"
    f.write_text("1\nAnn_Lee 1\n")
    with pytest.raises(ValueError, match=r"pairs.txt:2"):
        read_pairs(f, tmp_path)
    f.write_text("1\nAnn_Lee 1 2 Bob 3 4\n")
    with pytest.raises(ValueError):
        read_pairs(f, tmp_path)


def test_holdout_split_on_a_tiny_tree(tmp_path: Path) -> None:
    counts = {"Ann": 6, "Bob": 2, "Cat": 1, "Dan": 3}
    for person, n in counts.items():
        (tmp_path / person).mkdir()
        for i in range(1, n + 1):
            image_path(tmp_path, person, i).write_bytes(b"")
    (tmp_path / "notes.txt").write_text("not an identity")
    images = identity_images(tmp_path)
    assert {p: len(v) for p, v in images.items()} == counts
    assert images["Bob"] == [image_path(tmp_path, "Bob", 1), image_path(tmp_path, "Bob", 2)]
    f = tmp_path / "pairs.txt"
    f.write_text("5\nAnn 1 2\nBob 1 2\nAnn 1 Bob 2\nBob 1 Cat 1\nCat 1 Eve 1\n")
    pairs = read_pairs(f, tmp_path)
    held, val = holdout_split(images, pairs, max_images=5)
    # Ann has 6 >= 5 images (kept for training); Dan is in no pair; Eve has no folder (0 images)
    assert held == {"Bob", "Cat", "Eve"}
    assert val == [pairs[1], pairs[3], pairs[4]]
    held, val = holdout_split(images, pairs, max_images=7)
    assert held == {"Ann", "Bob", "Cat", "Eve"} and val == pairs
    held, val = holdout_split(images, pairs, max_images=1)
    assert held == {"Eve"} and val == []


# -------------------------------------------------------------------------------------- training helpers


def test_central_face_picks_the_box_nearest_the_centre() -> None:
    assert central_face([], 100, 100) is None
    big_corner = FaceBox(0, 0, 60, 60, 9.0)  # centre (30, 30)
    small_middle = FaceBox(45, 40, 10, 10, 1.0)  # centre (50, 45)
    off = FaceBox(60, 60, 30, 30, 5.0)  # centre (75, 75)
    assert central_face([big_corner, small_middle, off], 100, 100) == small_middle
    assert central_face([off, big_corner], 100, 100) == big_corner  # 20*sqrt(2) from the centre against 25*sqrt(2)
    assert central_face([off], 100, 100) == off


def test_fallback_box_is_centred() -> None:
    for w, h in ((250, 250), (100, 61), (61, 100), (40, 40)):
        b = fallback_box(w, h)
        assert b.w == b.h == round(0.45 * min(w, h)) and b.score == 0.0
        assert abs(b.x + b.w / 2 - w / 2) <= 1 and abs(b.y + b.h / 2 - h / 2) <= 1
        assert b.x >= 0 and b.y >= 0 and b.x + b.w <= w and b.y + b.h <= h


def test_center_of_a_context_crop_is_the_serving_crop() -> None:
    img = smooth_image(120, 100)
    box = FaceBox(35, 25, 40, 44, 1.0)
    spec = CropSpec(size=32, margin=0.1)
    side = round(spec.size * CONTEXT)
    ctx = crop_face(img, box, spec, context=CONTEXT, size=side)
    assert ctx.size == (side, side)
    batch = torch.from_numpy(np.asarray(ctx).copy()).permute(2, 0, 1).unsqueeze(0)
    got = center(batch, spec.size)
    assert got.shape == (1, 3, spec.size, spec.size)
    want = torch.from_numpy(np.asarray(crop_face(img, box, spec)).copy()).permute(2, 0, 1).unsqueeze(0)
    diff = (got.int() - want.int()).abs()
    assert int(diff.max()) <= 3 and float(diff.float().mean()) < 0.5
    # plain index check on a labelled tensor
    x = torch.arange(2 * 3 * 9 * 9).view(2, 3, 9, 9)
    assert torch.equal(center(x, 5), x[..., 2:7, 2:7])


def test_augment_shape_range_and_determinism() -> None:
    g = torch.Generator().manual_seed(0)
    batch = torch.randint(0, 256, (4, 3, 18, 18), dtype=torch.uint8, generator=g)
    out = augment(batch, 16, torch.Generator().manual_seed(7))
    assert out.shape == (4, 3, 16, 16) and out.dtype == torch.float32
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert torch.equal(out, augment(batch, 16, torch.Generator().manual_seed(7)))
    assert not torch.equal(out, augment(batch, 16, torch.Generator().manual_seed(8)))
    assert torch.equal(batch, torch.randint(0, 256, (4, 3, 18, 18), dtype=torch.uint8,
                                            generator=torch.Generator().manual_seed(0)))  # input untouched
    # extremes stay clamped
    assert float(augment(torch.full((2, 3, 16, 16), 255, dtype=torch.uint8), 16, g).max()) <= 1.0


def test_pk_sampler() -> None:
    # identity 0 has one image (skipped); 1 has 2 (drawn with replacement for k=3); 2, 3 have 4+
    labels = np.array([0, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 3])
    s = PKSampler(labels, p=3, k=3, seed=0)
    assert len(s.by_id) == 3
    for _ in range(20):
        b = s.batch()
        assert b.shape == (9,)
        ids, counts = np.unique(labels[b], return_counts=True)
        assert 0 not in ids and len(ids) == 3 and (counts == 3).all()
        for c in (2, 3):  # enough images: no repeats
            assert len(set(b[labels[b] == c].tolist())) == 3
    s2 = PKSampler(labels, p=2, k=2, seed=5)
    s3 = PKSampler(labels, p=2, k=2, seed=5)
    assert all(np.array_equal(s2.batch(), s3.batch()) for _ in range(5))
    with pytest.raises(SystemExit, match="need at least 4 identities"):
        PKSampler(labels, p=4, k=2, seed=0)


def test_pk_sampler_singles() -> None:
    # identities 0, 4, 5, 6, 7 have one image each (indices 0, 12, 13, 14, 15); 1-3 have several
    labels = np.array([0, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 3, 4, 5, 6, 7])
    singles = {0, 12, 13, 14, 15}
    s = PKSampler(labels, p=2, k=2, seed=1, singles=3)
    assert sorted(s.single_ix.tolist()) == sorted(singles)
    seen: list[int] = []
    for _ in range(10):
        b = s.batch()
        assert b.shape == (7,)
        pk, extra = b[:4], b[4:]
        assert not set(pk.tolist()) & singles  # the P x K part never draws a one-image identity
        assert set(extra.tolist()) <= singles and len(set(extra.tolist())) == 3  # distinct within a batch
        seen += extra.tolist()
    # shuffled passes: after 30 draws from 5 singles every one has come up 6 times
    assert sorted(np.unique(seen, return_counts=True)[1].tolist()) == [6, 6, 6, 6, 6]
    assert PKSampler(labels, p=2, k=2, seed=1).batch().shape == (4,)  # default: no singles, as before
    with pytest.raises(SystemExit, match="--singles must be between 0 and the 5"):
        PKSampler(labels, p=2, k=2, seed=0, singles=6)


def test_pair_distances() -> None:
    emb = torch.tensor([unit(0), unit(90), unit(180)])
    root = Path("r")
    a, b, c = (image_path(root, "X", i) for i in (1, 2, 3))
    index = {a: 0, b: 1, c: 2}
    pairs = [Pair(a, b, True, ("X",)), Pair(a, c, False, ("X", "Y")), Pair(c, c, True, ("X",))]
    dist, same = pair_distances(emb, index, pairs)
    assert dist == pytest.approx([2.0, 4.0, 0.0], abs=1e-6)
    assert same.tolist() == [True, False, True]


def test_onnx_export_round_trip(tmp_path: Path) -> None:
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = FaceEmbedder(size=16, dim=8, widths=(8, 8, 8, 8), blocks=(1, 1, 1, 1))
    model.train()
    model(torch.randn(4, 3, 16, 16))  # non-trivial batch-norm statistics
    path = tmp_path / "face.onnx"
    export_onnx(model, path, 16)
    assert path.is_file() and path.stat().st_size > 0
    x = torch.randn(5, 3, 16, 16)  # a batch size other than the export's: the batch axis is dynamic
    r = onnx_parity(model, path, x)
    assert r["inputs"] == 5 and r["min_cosine"] > 0.999 and r["mean_cosine"] > 0.999


# ------------------------------------------------------------------ calibration / test halves, the served path


def test_identity_half_is_deterministic_salted_and_about_even() -> None:
    from models.faces.lfw import HALVES, identity_half

    names = [f"Person_{i:04d}" for i in range(2000)]
    halves = [identity_half(n) for n in names]
    assert halves == [identity_half(n) for n in names] and set(halves) == set(HALVES)
    assert 0.45 < halves.count("test") / len(names) < 0.55
    other = [identity_half(n, salt="another") for n in names]
    assert other != halves  # the salt names the split
    # pinned: the shipped report's split must never move under a refactor
    assert [identity_half(f"Person_{i:02d}") for i in range(6)] == ["test"] * 3 + ["calibration"] * 3


def _pairs_over(names: list[str]) -> list[Pair]:
    root = Path("r")
    same = [Pair(image_path(root, n, 1), image_path(root, n, 2), True, (n,)) for n in names]
    diff = [Pair(image_path(root, a, 1), image_path(root, b, 1), False, (a, b))
            for i, a in enumerate(names) for b in names[i + 1:]]
    return same + diff


def test_split_by_identity_is_disjoint_and_drops_pairs_across_the_halves() -> None:
    from models.faces.lfw import identity_half, split_by_identity

    names = [f"Person_{i:02d}" for i in range(12)]
    pairs = _pairs_over(names)
    sp = split_by_identity(pairs)
    cal, test = set(sp.identities["calibration"]), set(sp.identities["test"])
    assert cal and test and not cal & test and cal | test == set(names)
    for half, people in (("calibration", cal), ("test", test)):
        assert sp.pairs[half] == [p for p in pairs if set(p.people) <= people]  # all of them, in order
        assert all(identity_half(q) == half for p in sp.pairs[half] for q in p.people)
    # dropped: exactly the different-person pairs with one person in each half; never a same-person pair
    assert sp.crossing == [p for p in pairs if len({identity_half(q) for q in p.people}) == 2]
    assert sp.crossing and not any(p.same for p in sp.crossing)
    assert len(sp.pairs["calibration"]) + len(sp.pairs["test"]) + len(sp.crossing) == len(pairs)
    # calibration never sees a test identity
    assert not {q for p in sp.pairs["calibration"] for q in p.people} & test
    summary = sp.summary()
    assert summary["dropped_crossing"]["pairs"] == len(sp.crossing) and summary["dropped_crossing"]["same"] == 0
    assert summary["halves"]["test"]["same"] == len(test) and summary["identities"]["calibration"] == len(cal)
    assert summary["membership_sha256"] == split_by_identity(list(reversed(pairs))).membership_sha256()
    assert summary["membership_sha256"] != split_by_identity(pairs, salt="another").membership_sha256()
    # a person's half does not depend on the other people of the list
    sub = split_by_identity(_pairs_over(names[:5]))
    assert set(sub.identities["test"]) == test & set(names[:5])


def test_served_accuracy_counts_a_missed_face_as_an_error() -> None:
    from models.faces.evaluation import served_accuracy

    nan = float("nan")
    dist = np.array([0.5, 1.5, nan, 2.5, 0.8, nan])
    same = np.array([True, True, True, False, False, False])
    r = served_accuracy(dist, same, 1.0)
    # found: 0.5 same accept (right), 1.5 same reject (wrong), 2.5 diff reject (right), 0.8 diff accept (wrong)
    assert r["pairs"] == 6 and r["pairs_found"] == 4 and r["missed_same"] == 1 and r["missed_different"] == 1
    assert r["accuracy_misses_as_errors"] == pytest.approx(2 / 6)
    assert r["accuracy_among_found"] == pytest.approx(2 / 4)
    assert r["accuracy_misses_as_rejects"] == pytest.approx(3 / 6)  # the missed different pair "rejected"
    assert r["tar"] == pytest.approx(1 / 3) and r["far"] == pytest.approx(1 / 3)  # a miss is never an accept
    assert r["tar_among_found"] == pytest.approx(1 / 2) and r["far_among_found"] == pytest.approx(1 / 2)
    assert r["balanced_accuracy_misses_as_errors"] == pytest.approx((1 / 3 + 1 / 3) / 2)
    assert r["true_accepts"] == 1 and r["false_accepts"] == 1 and r["false_rejects_found"] == 1


def test_served_threshold_ignores_misses_and_balances_a_skewed_mix() -> None:
    from models.faces.evaluation import served_accuracy, served_threshold

    nan = float("nan")
    # 8 same pairs, 5 different (one of each missed): plain accuracy accepts the overlap, balanced does not
    dist = np.array([0.2, 0.3, 0.4, 1.0, 1.1, 1.15, 1.2, nan, 0.7, 0.8, 0.9, 1.6, nan])
    same = np.array([True] * 8 + [False] * 5)
    tau_acc, acc = served_threshold(dist, same, "accuracy")
    tau_bal, bal = served_threshold(dist, same, "balanced")
    assert tau_acc == pytest.approx(1.4) and acc == pytest.approx(8 / 13)
    assert tau_bal == pytest.approx(0.55) and bal == pytest.approx((3 / 8 + 4 / 5) / 2)
    assert served_accuracy(dist, same, tau_bal)["balanced_accuracy_misses_as_errors"] == pytest.approx(bal)
    with pytest.raises(ValueError, match="no pair has both faces"):
        served_threshold(np.array([nan, nan]), np.array([True, False]))
    with pytest.raises(ValueError, match="criterion"):
        served_threshold(dist, same, "f1")


def test_served_report_kfold_and_tar_at_far_with_misses() -> None:
    from models.faces.evaluation import served_kfold_accuracy, served_report, served_tar_at_far

    rng = np.random.default_rng(0)
    same = np.array([True] * 50 + [False] * 50)
    dist = np.where(same, rng.uniform(0.0, 1.0, 100), rng.uniform(1.5, 3.0, 100))  # separable
    dist[[0, 1, 60]] = np.nan  # two missed same pairs, one missed different pair
    k = served_kfold_accuracy(dist, same)
    assert k["folds"] == 10 and k["mean"] == pytest.approx(97 / 100)  # every found pair right, misses wrong
    t = served_tar_at_far(dist, same, 0.01)
    assert t["among_found"]["negatives"] == 49 and t["all_pairs"]["negatives"] == 50
    assert t["among_found"]["tar"] == 1.0 and t["all_pairs"]["tar"] == pytest.approx(48 / 50)
    assert t["among_found"]["false_accepts"] == 0 and t["all_pairs"]["false_accepts_allowed"] == 0
    r = served_report(dist, same, 1.25)
    assert r["pairs_with_a_miss"] == {"same": 2, "different": 1} and r["pair_miss_rate"] == pytest.approx(0.03)
    assert r["at_threshold"]["accuracy_misses_as_errors"] == pytest.approx(0.97)
    assert r["kfold_accuracy_among_found"]["mean"] == 1.0 and r["roc_auc_among_found"] == pytest.approx(1.0)
    assert [x["far_target"] for x in r["tar_at_far"]] == [1e-2, 1e-3]
    # everything missed: no crash, nothing to fit
    none = served_report(np.full(4, np.nan), np.array([True, True, False, False]), 1.0)
    assert none["at_threshold"]["accuracy_misses_as_errors"] == 0.0 and none["kfold_accuracy_misses_as_errors"] is None
    assert none["in_sample_best"] is None and none["roc_auc_among_found"] is None


def test_served_kfold_fold_without_found_training_pairs_rejects_everything() -> None:
    from models.faces.evaluation import served_kfold_accuracy

    nan = float("nan")
    dist = np.array([0.1, nan, 2.0, nan])
    same = np.array([True, True, False, False])
    k = served_kfold_accuracy(dist, same, folds=2)  # fold 0 = pairs 0 and 2, fold 1 = pairs 1 and 3
    assert k["thresholds"][1] is not None and k["thresholds"][0] is None
    assert k["per_fold"] == [pytest.approx(0.5), 0.0]  # fold 0: nothing to fit, all rejected: the different one right


@pytest.mark.shared_data
def test_real_holdout_split_matches_the_shipped_report() -> None:
    """The identity halves of the shipped model's hold-out are the ones its served-path report was made on."""
    import json

    from models.faces.lfw import split_by_identity

    root = SHARED_DATA / "lfw" / "images"
    pairs = read_pairs(SHARED_DATA / "lfw" / "pairsDevTrain.txt", root)
    _, val = holdout_split(identity_images(root), pairs, 5)
    sp = split_by_identity(val)
    report = json.loads((Path(__file__).parents[2] / "weights" / "reports"
                         / "lfw-face-resnet-served-eval.json").read_text())
    assert sp.summary() == report["identity_split"]
    assert len(val) == 1634 and len(sp.crossing) == 487
    cal_people = {q for p in sp.pairs["calibration"] for q in p.people}
    test_people = {q for p in sp.pairs["test"] for q in p.people}
    assert not cal_people & test_people
