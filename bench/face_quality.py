"""Where the enrolment quality limits and the eye alignment stand on real photos: the raw source of the defaults
CNN_FACE_ENROLL_MIN_SHARPNESS and CNN_FACE_ENROLL_MIN_SIDE and of the alignment figures in the README and card.

On a fixed sample of LFW photos (sorted paths, every `--step`-th), through the service's own code (the Haar cascade
with the served parameters, the largest face, the 64-pixel crop with a 10% margin): the face side, the crop's
sharpness (Laplacian variance) of the photo as it is and blurred with a Gaussian of radius 1, 2 and 3 pixels
(PIL's GaussianBlur on the whole photo), the share flagged at the given limits, and how often the eye cascade finds
a plausible pair of eyes with the angle it measures.

    .venv/bin/python -m bench.face_quality            # writes docs/bench/face-quality.{json,md}
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    from models.faces.align import EyeFinder
    from models.faces.crop import CropSpec, crop_face, largest
    from models.faces.detect import HaarDetector
    from models.faces.quality import measure

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "lfw" / "images")
    p.add_argument("--step", type=int, default=25, help="every step-th photo of the sorted list")
    p.add_argument("--min-sharpness", type=float, default=100.0)
    p.add_argument("--min-side", type=int, default=40)
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "bench" / "face-quality.json")
    args = p.parse_args()

    files = sorted(args.data.glob("*/*.jpg"))[:: args.step]
    det, eyes = HaarDetector(), EyeFinder()
    spec = CropSpec(size=64, margin=0.1)
    radii = (0, 1, 2, 3)
    sharp: dict[int, list[float]] = {r: [] for r in radii}
    sides: list[int] = []
    angles: list[float] = []
    no_face = 0
    t0 = time.time()
    for f in files:
        with Image.open(f) as im:
            img = im.convert("RGB")
        box = largest(det.detect(img))
        if box is None:
            no_face += 1
            continue
        sides.append(min(box.w, box.h))
        found = eyes.find(img, box)
        if found is not None:
            angles.append(found.angle)
        for r in radii:
            src = img.filter(ImageFilter.GaussianBlur(r)) if r else img
            sharp[r].append(measure(box, crop_face(src, box, spec)).sharpness)
    faces = len(sides)
    pct = (1, 5, 25, 50, 75, 95)
    report = {
        "photos": len(files), "faces": faces, "no_face": no_face, "sample": f"every {args.step}th sorted LFW photo",
        "data": str(args.data), "crop": {"size": spec.size, "margin": spec.margin},
        "sharpness_percentiles": {f"blur_radius_{r}": dict(zip(map(str, pct), np.percentile(v, pct).round(1).tolist(),
                                                               strict=True)) for r, v in sharp.items()},
        "flagged_blurred_at_min_sharpness": {
            f"blur_radius_{r}": round(float(np.mean(np.array(v) < args.min_sharpness)), 4) for r, v in sharp.items()},
        "min_sharpness": args.min_sharpness, "min_side": args.min_side,
        "face_side_percentiles": dict(zip(map(str, pct), np.percentile(sides, pct).round(1).tolist(), strict=True)),
        "flagged_small": round(float(np.mean(np.array(sides) < args.min_side)), 4),
        "eyes_found": round(len(angles) / faces, 4),
        "eye_angle_abs_percentiles": dict(zip(map(str, pct), np.percentile(np.abs(angles), pct).round(2).tolist(),
                                              strict=True)),
        "seconds": round(time.time() - t0, 1), "python": platform.python_version(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"# Face quality and eye alignment on LFW ({faces} faces of {len(files)} photos)", "",
             f"Made by `bench/face_quality.py`; raw: `{args.out.name}`. Sharpness = Laplacian variance of the served "
             "64-pixel crop; blur = PIL GaussianBlur of the whole photo.", "",
             f"| blur radius | p1 | p5 | p50 | p95 | flagged blurred at {args.min_sharpness:g} |",
             "|---|---|---|---|---|---|"]
    for r in radii:
        q = report["sharpness_percentiles"][f"blur_radius_{r}"]
        lines.append(f"| {r} | {q['1']} | {q['5']} | {q['50']} | {q['95']} | "
                     f"{report['flagged_blurred_at_min_sharpness'][f'blur_radius_{r}']:.1%} |")
    lines += ["", f"Face side (pixels) p1/p50/p95: {report['face_side_percentiles']['1']} / "
              f"{report['face_side_percentiles']['50']} / {report['face_side_percentiles']['95']}; flagged small at "
              f"{args.min_side}: {report['flagged_small']:.1%}.",
              f"Eyes found (plausible pair): {report['eyes_found']:.1%} of faces; |angle| p50/p95: "
              f"{report['eye_angle_abs_percentiles']['50']} / {report['eye_angle_abs_percentiles']['95']} degrees "
              "(LFW's deep-funneled photos are already aligned, so angles are small)."]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
