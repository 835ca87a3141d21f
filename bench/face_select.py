"""Compare face-embedder candidates on the calibration half of the held-out LFW identities, through the served
path, for a choice made before the test half is touched.

    python -m bench.face_select --runs runs/lfw-face-singles runs/lfw-face-singles-p16 \\
        --ensemble lfw-face-e3=lfw-face-resnet+lfw-face-singles+lfw-face-singles-p16 --out runs/select

A scratch weights dir gets the project's manifest and weights, each finished training run (models.train.faces
`install`) and each ensemble (models.train.face_ensemble). For every candidate (the shipped `--baseline` first):
`evaluate-faces --split calibration --misses error` (the pair table: 10-fold accuracy, AUC, and the calibration
half's 1:1 threshold, which an ensemble's scratch entry then takes) and `calibrate-identification` (its
`selection` block: TAR at FAR 1e-2 / 1e-3 over every calibration photo pair, closed-set rank-1 / rank-5). Each
candidate's two reports go to `--out/<name>-calibration-pairs.json` and `--out/<name>-identification.json`, the
comparison to `--out/selection.json` and a Markdown table on stdout. Nothing here reads the test half.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from app.cli import calibrate_identification, evaluate_face_model
from app.settings import Settings
from models.train.face_ensemble import compose
from models.train.faces import install


def parse_ensemble(text: str) -> tuple[str, list[str]]:
    """'name=a+b+c' -> ('name', ['a', 'b', 'c'])."""
    name, sep, members = text.partition("=")
    parts = [m for m in members.split("+") if m]
    if not sep or not name or len(parts) < 2:
        raise argparse.ArgumentTypeError(f"an ensemble is NAME=MEMBER+MEMBER[+...], got {text!r}")
    return name, parts


def summarise(name: str, pairs: dict[str, Any], ident: dict[str, Any]) -> dict[str, Any]:
    sel = ident["selection"]
    tar = {f"tar_at_far_{t['far_target']:g}": t["tar"] for t in sel["tar_at_far"]}
    return {"model": name, **tar, "rank1": sel["rank1"], "rank5": sel["rank5"], "searches": sel["searches"],
            "gallery_size": sel["gallery_size"], "genuine_pairs": sel["genuine_pairs"],
            "impostor_pairs": sel["impostor_pairs"],
            "pairs_kfold_misses_as_errors": pairs["kfold_accuracy_misses_as_errors"]["mean"],
            "pairs_kfold_among_found": pairs["kfold_accuracy_among_found"]["mean"],
            "pairs_auc_among_found": pairs["roc_auc_among_found"], "calibration_threshold": pairs["threshold"],
            "pairs": pairs.get("pairs"), "images_without_face": ident["images_without_face"]}


def table(rows: list[dict[str, Any]]) -> str:
    head = ("| candidate | TAR at FAR 1e-2 | TAR at FAR 1e-3 | rank-1 | rank-5 | pairs 10-fold (misses as errors) "
            "| pairs AUC (found) | tau (calibration) |\n|---|---:|---:|---:|---:|---:|---:|---:|")
    lines = [f"| {r['model']} | {100 * r['tar_at_far_0.01']:.1f}% | {100 * r['tar_at_far_0.001']:.1f}% | "
             f"{100 * r['rank1']:.1f}% | {100 * r['rank5']:.1f}% | {100 * r['pairs_kfold_misses_as_errors']:.1f}% | "
             f"{r['pairs_auc_among_found']:.3f} | {r['calibration_threshold']:.4f} |" for r in rows]
    return "\n".join([head, *lines])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="*", type=Path, default=[], help="finished models.train.faces run dirs")
    p.add_argument("--ensemble", nargs="*", type=parse_ensemble, default=[], help="NAME=MEMBER+MEMBER[+...]")
    p.add_argument("--baseline", default="lfw-face-resnet",
                   help="the shipped model, measured the same way ('' to leave it out)")
    p.add_argument("--weights", type=Path, default=Path("weights"))
    p.add_argument("--pairs", type=Path, default=Path("../shared/data/lfw/pairsDevTrain.txt"))
    p.add_argument("--data", type=Path, default=Path("../shared/data/lfw/images"))
    p.add_argument("--holdout-max-images", type=int, default=5)
    p.add_argument("--draws", type=int, default=50, help="simulated galleries per size (the FPIR check)")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="face-select-"))
    try:
        shutil.copytree(args.weights, scratch, dirs_exist_ok=True)
        names = [args.baseline] if args.baseline else []
        for run in args.runs:
            install(run, scratch)
            names.append(json.loads((run / "manifest_entry.json").read_text())["name"])
        s = Settings(weights_dir=scratch)
        rows = []
        ensembles = dict(args.ensemble)
        for name in [*names, *ensembles]:
            t0 = time.time()
            if name in ensembles:
                compose(ensembles[name], scratch, scratch / f"run-{name}", name)
                install(scratch / f"run-{name}", scratch)
            pairs = evaluate_face_model(name, args.pairs, args.data, holdout_max_images=args.holdout_max_images,
                                        split="calibration", misses="error", settings=s)
            (args.out / f"{name}-calibration-pairs.json").write_text(json.dumps(pairs, indent=2) + "\n")
            if name in ensembles:  # serve it with its calibrated 1:1 threshold, as the manifest would
                manifest = json.loads((scratch / "manifest.json").read_text())
                for m in manifest["models"]:
                    if m["name"] in (name, f"{name}-onnx"):
                        m["threshold"] = round(float(pairs["threshold"]), 4)
                        m["threshold_from"] = "the calibration half of the held-out identities (balanced accuracy)"
                (scratch / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
            ident = calibrate_identification(name, args.pairs, args.data, holdout_max_images=args.holdout_max_images,
                                             draws=args.draws, settings=Settings(weights_dir=scratch))
            (args.out / f"{name}-identification.json").write_text(json.dumps(ident, indent=2) + "\n")
            rows.append(summarise(name, pairs, ident) | {"seconds": round(time.time() - t0, 1)})
            print(table(rows[-1:]).splitlines()[-1], flush=True)
        (args.out / "selection.json").write_text(json.dumps({"half": "calibration", "candidates": rows}, indent=2)
                                                 + "\n")
        print(table(rows))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
