"""Face embedders side by side, in one sitting: the embedding forward alone (batches of preprocessed crops) and the
whole served per-photo path (decode as an upload, Haar detection, crop, embed), interleaved in repeated rounds so
that load on the machine hits every model alike.

    python -m bench.face_models_speed --models lfw-face-resnet lfw-face-ensemble \\
        --images ../shared/data/lfw/images --out docs/bench/face-models-speed.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from app.cli import _face_detectors, _load_trained, _upload
from app.runtime.registry import LoadedFaceEmbedder
from app.services.classification import ImageLimits
from app.services.faces import find_faces
from app.settings import Settings
from bench.classify_load import machine_description

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["lfw-face-resnet", "lfw-face-ensemble"])
    p.add_argument("--images", type=Path, default=PROJECT_ROOT.parent / "shared" / "data" / "lfw" / "images")
    p.add_argument("--photos", type=int, default=40, help="photos per round for the served path")
    p.add_argument("--batches", default="1,32")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", type=Path, default=PROJECT_ROOT / "docs" / "bench" / "face-models-speed.json")
    args = p.parse_args(argv)
    s = Settings()
    models = {n: _load_trained(n, "face-embedding", LoadedFaceEmbedder, s) for n in args.models}
    files = sorted(args.images.rglob("*.jpg"))[: args.photos]
    limits = ImageLimits.from_settings(s)
    batches = [int(b) for b in args.batches.split(",")]
    forward: dict[tuple[str, int], list[float]] = {}
    served: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        for name, m in models.items():
            side = m.preprocessing.crop
            for b in batches:
                crops = [torch.randn(3, side, side) for _ in range(b)]
                m.forward(crops)  # warm
                t0 = time.perf_counter()
                reps = max(1, 64 // b)
                for _ in range(reps):
                    m.forward(crops)
                forward.setdefault((name, b), []).append(reps * b / (time.perf_counter() - t0))
            detectors = _face_detectors(s, m)
            t0 = time.perf_counter()
            for f in files:
                upload = _upload(f)
                found = find_faces(limits.decode(upload), upload.filename, m, detectors, "haar", 1)
                if found.faces:
                    m.forward([found.faces[0].tensor])
            served.setdefault(name, []).append(len(files) / (time.perf_counter() - t0))
    rows = [{"model": n, "batch": b, "faces_per_s_median": statistics.median(v), "faces_per_s_rounds": v}
            for (n, b), v in forward.items()]
    srows = [{"model": n, "photos_per_s_median": statistics.median(v), "photos_per_s_rounds": v}
             for n, v in served.items()]
    out = {"what": "face embedders in one sitting, rounds interleaved: forward only (faces/s) and the served "
                   "per-photo path one photo at a time (decode, Haar, crop, embed; photos/s)",
           "settings": {k: str(v) for k, v in vars(args).items()}, "machine": machine_description("cpu"),
           "torch_threads": torch.get_num_threads(), "forward": rows, "served_path": srows}
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    for r in rows:
        print(f"forward {r['model']:<20} batch {r['batch']:>3}: {r['faces_per_s_median']:8.1f} faces/s")
    for r in srows:
        print(f"served  {r['model']:<20}: {r['photos_per_s_median']:8.1f} photos/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
