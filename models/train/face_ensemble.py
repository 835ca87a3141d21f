"""Combine trained face embedders of one manifest into one ensemble embedder (family ``face-ensemble``).

    python -m models.train.face_ensemble --name lfw-face-ensemble --members lfw-face-resnet lfw-face-singles \\
        --weights-dir weights --out runs/lfw-face-ensemble [--install weights]

Nothing is trained: the members' weights are copied into one state dict (``members.<i>.*``; see
models.faces.ensemble for what the ensemble computes). The members must be face-resnet embedders with trained
weights that cut the same face crop (size, margin, alignment), from the same training data and hold-out rule (so
no member has seen a held-out identity). The manifest entry's 1:1 threshold starts as the mean of the members'
thresholds (the ensemble's squared distance is the mean of theirs); calibrate it on the served path
(`app.cli evaluate-faces --split calibration`) and its 1:N table (`app.cli calibrate-identification`) before
serving it. The command also exports ONNX and checks it against PyTorch.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from models.faces.ensemble import build_face_ensemble
from models.train.common import save_weights, sha256_file
from models.train.faces import export_onnx, install, onnx_parity


class FaceEnsembleError(ValueError):
    """The members cannot be combined."""


def member_entries(manifest: dict[str, Any], names: list[str]) -> list[dict[str, Any]]:
    """The members' manifest entries, after checking that one crop and one hold-out serve them all."""
    if len(names) < 2 or len(set(names)) != len(names):
        raise FaceEnsembleError("an ensemble needs at least two different members")
    by_name = {m["name"]: m for m in manifest.get("models", [])}
    missing = [n for n in names if n not in by_name]
    if missing:
        raise FaceEnsembleError(f"not in the manifest: {', '.join(missing)}")
    entries = [by_name[n] for n in names]
    for e in entries:
        if e.get("family") != "face-resnet" or e.get("task") != "face-embedding":
            raise FaceEnsembleError(f"{e['name']}: members must be face-resnet embedders, not {e.get('family')!r}")
        if not e.get("file") or not e.get("sha256"):
            raise FaceEnsembleError(f"{e['name']}: no trained weights in the manifest")
    first = entries[0]
    for e in entries[1:]:
        if e.get("face_crop") != first.get("face_crop"):
            raise FaceEnsembleError(f"{e['name']} and {first['name']} cut different face crops "
                                    f"({e.get('face_crop')} vs {first.get('face_crop')}); one crop feeds all")
        for key in ("resize", "crop"):
            if e["preprocessing"].get(key) != first["preprocessing"].get(key):
                raise FaceEnsembleError(f"{e['name']} and {first['name']} differ in preprocessing {key!r}")
        for key in ("data", "held_out"):
            if (e.get("training") or {}).get(key) != (first.get("training") or {}).get(key):
                raise FaceEnsembleError(f"{e['name']} and {first['name']} differ in training {key!r}: their "
                                        "hold-outs would not be the same people")
    return entries


def compose(names: list[str], weights_dir: Path, out: Path, name: str) -> dict[str, Any]:
    """Write `<name>.pt`, `<name>.onnx` and `manifest_entry.json` under `out`; return the entry."""
    manifest = json.loads((weights_dir / "manifest.json").read_text())
    entries = member_entries(manifest, names)
    first = entries[0]
    mean, std = first["preprocessing"]["mean"], first["preprocessing"]["std"]
    arch = {"members": [{"arch": e["arch"], "mean": e["preprocessing"]["mean"], "std": e["preprocessing"]["std"]}
                        for e in entries],
            "mean": mean, "std": std, "flip_average": True}
    model = build_face_ensemble(arch)
    for i, e in enumerate(entries):
        path = weights_dir / e["file"]
        if sha256_file(path) != e["sha256"]:
            raise FaceEnsembleError(f"{path}: sha256 does not match the manifest entry of {e['name']}")
        model.members[i].load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    weights = out / f"{name}.pt"
    save_weights(model, weights)
    onnx_file = out / f"{name}.onnx"
    size = int(first["preprocessing"]["crop"])
    export_onnx(model, onnx_file, size)  # type: ignore[arg-type]  # any module with a (N, 3, S, S) input
    gen = torch.Generator().manual_seed(0)
    parity = onnx_parity(model, onnx_file, torch.randn(16, 3, size, size, generator=gen))  # type: ignore[arg-type]
    thresholds = [float(e["threshold"]) for e in entries]
    entry = {
        "name": name, "task": "face-embedding", "family": "face-ensemble", "arch": arch,
        "file": weights.name, "sha256": sha256_file(weights), "source": "project",
        "preprocessing": first["preprocessing"], "face_crop": first["face_crop"],
        "embedding": {"dim": model.dim, "normalised": True, "flip_average": False,
                      "members_flip_average": True},
        "threshold": round(sum(thresholds) / len(thresholds), 4),
        "threshold_from": "the mean of the members' thresholds (uncalibrated: run evaluate-faces --split calibration)",
        "training": {**{k: v for k, v in (first.get("training") or {}).items() if k in ("data", "held_out")},
                     "ensemble_of": [{"name": e["name"], "sha256": e["sha256"]} for e in entries]},
        "onnx": {"file": onnx_file.name, "sha256": sha256_file(onnx_file),
                 "min_cosine_to_pytorch": round(parity["min_cosine"], 6)},
    }
    (out / "manifest_entry.json").write_text(json.dumps(entry, indent=2) + "\n")
    return entry


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", required=True)
    p.add_argument("--members", nargs="+", required=True, help="manifest names of the members (two or more)")
    p.add_argument("--weights-dir", type=Path, default=Path("weights"), help="where the members are installed")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--install", type=Path, default=None, help="copy the result into this weights dir")
    args = p.parse_args(argv)
    try:
        entry = compose(args.members, args.weights_dir, args.out, args.name)
    except FaceEnsembleError as exc:
        raise SystemExit(f"face ensemble: {exc}") from None
    if args.install:  # the ensemble (and its ONNX export, as `<name>-onnx`), entries merged
        install(args.out, args.install)
    print(json.dumps({k: entry[k] for k in ("name", "sha256", "threshold", "onnx")}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
