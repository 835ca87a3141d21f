"""Combine trained CIFAR models (ResNet, SE-ResNet, wide ResNet, whitened convnet) from a manifest into one
probability-averaging ensemble model.

    python -m models.train.ensemble --name cifar10-ensemble --members cifar10-resnet56 cifar10-resnet32 \\
        --data ../shared/data/cifar10/train --out runs/cifar10-ensemble --install weights

Nothing is trained: the members' weights are copied into one state dict (``members.<i>.*``), the
ensemble is measured on the members' own hold-out (the same folder, size, validation size and seed,
test split, all checked against their manifest entries, so no member has seen a validation image), and the
command writes a report (the ensemble and each member, one view and with horizontal-flip averaging),
the weights file and its manifest entry (family ``cifar-resnet-ensemble``).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import torch

from models.ensemble import MEMBER_FAMILIES, cifar_resnet_ensemble
from models.manifest import ManifestEntry, load_manifest
from models.preprocess import ImageSpec, normalize_uint8
from models.train.common import hardware_description, plot_confusion, save_weights, sha256_file, start_run
from models.train.images import (
    holdout_from_training,
    holdout_metrics,
    load_split,
    publish_run,
    report_markdown,
)


class EnsembleError(ValueError):
    """The members cannot be combined (unknown, different labels, preprocessing or hold-out)."""


def check_members(manifest: dict[str, ManifestEntry], names: list[str]) -> list[ManifestEntry]:
    """The members' manifest entries, after checking they can be averaged and share one hold-out."""
    if len(names) < 2 or len(set(names)) != len(names):
        raise EnsembleError("an ensemble needs at least two different members")
    missing = [n for n in names if n not in manifest]
    if missing:
        raise EnsembleError(f"not in the manifest: {', '.join(missing)}")
    entries = [manifest[n] for n in names]
    for e in entries:
        if e.family not in MEMBER_FAMILIES:
            raise EnsembleError(f"{e.name}: family {e.family!r}; members must be one of {', '.join(MEMBER_FAMILIES)}")
    first = entries[0]
    for e in entries[1:]:
        if e.labels != first.labels:
            raise EnsembleError(f"{e.name} and {first.name} have different labels")
        if e.preprocessing != first.preprocessing:
            raise EnsembleError(f"{e.name} and {first.name} have different preprocessing (one batch feeds all)")
        for key in ("data", "val_images", "test_split"):
            if e.training.get(key) != first.training.get(key):
                raise EnsembleError(f"{e.name} and {first.name} were trained with different {key!r}: "
                                    "their hold-outs differ, so the ensemble could not be validated fairly")
        if e.training.get("recipe", {}).get("seed") != first.training.get("recipe", {}).get("seed"):
            raise EnsembleError(f"{e.name} and {first.name} used different split seeds: their hold-outs differ")
    return entries


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", required=True, help="model name of the ensemble")
    p.add_argument("--members", nargs="+", required=True,
                   help=f"manifest names of the members ({', '.join(MEMBER_FAMILIES)})")
    p.add_argument("--member-weights", type=float, nargs="+", default=None,
                   help="weight of each member's probabilities (default: equal)")
    p.add_argument("--weights-dir", type=Path, default=Path("weights"), help="where the members are")
    p.add_argument("--data", type=Path, default=None,
                   help="ImageFolder the members were trained on (default: the folder in their manifest entry)")
    p.add_argument("--out", type=Path, required=True, help="run directory (weights, report)")
    p.add_argument("--cache", type=Path, default=Path(".cache/datasets"), help="decoded-image cache")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: all cores)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--install", type=Path, default=None, help="copy weights + merge the manifest entry into this dir")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    t_start = time.time()
    try:
        entries = check_members(load_manifest(args.weights_dir), args.members)
    except EnsembleError as exc:
        raise SystemExit(f"ensemble: {exc}") from exc
    first = entries[0]
    assert first.preprocessing is not None  # required for image classifiers by the manifest schema
    seed = int(first.training.get("recipe", {}).get("seed", 0))
    val_size = int(first.training.get("val_images") or 0)
    data = args.data or Path(str(first.training.get("data", "")))
    if val_size <= 0 or not data.is_dir():
        raise SystemExit(f"ensemble: need the members' training folder ({data}) and hold-out size ({val_size})")
    device = start_run(args.threads, args.device, seed)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)

    # a cifar-resnet member is written as before (no "family" key: the ensembles already shipped read the same)
    arch: dict[str, Any] = {"members": [({} if e.family == "cifar-resnet" else {"family": e.family})
                                        | {k: v for k, v in e.arch.items() if k != "num_classes"} for e in entries],
                            "num_classes": len(first.labels)}
    if args.member_weights is not None:
        arch["weights"] = args.member_weights
    try:
        ensemble = cifar_resnet_ensemble(arch, len(first.labels))
    except ValueError as exc:
        raise SystemExit(f"ensemble: {exc}") from exc
    for member, e in zip(ensemble.members, entries, strict=True):
        path = args.weights_dir / e.file
        if sha256_file(path) != e.sha256:
            raise SystemExit(f"ensemble: {path} does not match its manifest sha256")
        member.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    ensemble = ensemble.to(device).eval()

    pre = first.preprocessing
    spec = ImageSpec.from_dict(pre.model_dump())
    test_rule = holdout_from_training(first.training, first.name).test
    classes, _, (val_u8, y_val) = load_split(data, pre.crop, val_size, seed, args.cache, test=test_rule)
    if classes != first.labels:
        raise SystemExit(f"ensemble: the classes of {data} ({classes}) are not the members' labels")
    x_val = normalize_uint8(val_u8, spec).to(device)

    member_metrics = {e.name: holdout_metrics(m, x_val, y_val, classes)
                      for e, m in zip(entries, ensemble.members, strict=True)}
    m = holdout_metrics(ensemble, x_val, y_val, classes)
    weights_file = out / f"{args.name}.pt"
    digest = save_weights(ensemble, weights_file)
    hardware = hardware_description(device)
    plot_confusion(m["confusion_matrix"], classes, out / "confusion.png", f"{args.name}: validation confusion matrix")
    member_lines = [f"- member {n}: {mm['val_accuracy']:.4f} ({mm['val_accuracy_hflip_tta']:.4f} with flips)"
                    for n, mm in member_metrics.items()]
    lines = [*member_lines, f"- mean of the members' probabilities, weights {arch.get('weights', 'equal')}; "
                            f"evaluated on {hardware}"]
    (out / "report.md").write_text(report_markdown(f"{args.name} ensemble", m, classes, lines))
    report = {"model": args.name, "val_accuracy": m["val_accuracy"],
              "val_accuracy_hflip_tta": m["val_accuracy_hflip_tta"], "per_class_accuracy": m["per_class_accuracy"],
              "confusion_matrix": m["confusion_matrix"].tolist(), "val_size": len(y_val),
              "members": {n: {k: v for k, v in mm.items() if k != "confusion_matrix"}
                          for n, mm in member_metrics.items()},
              "seconds": round(time.time() - t_start, 1), "hardware": hardware,
              "torch": torch.__version__, "python": platform.python_version()}
    (out / "report.json").write_text(json.dumps(report, indent=2))
    entry = {
        "name": args.name, "task": "image-classification", "family": "cifar-resnet-ensemble", "arch": arch,
        "file": weights_file.name, "sha256": digest, "labels": classes,
        "preprocessing": first.preprocessing.model_dump(), "source": "project",
        "training": {"data": str(data), "train_images": first.training.get("train_images"), "val_images": val_size}
        | ({"test_split": first.training["test_split"]} if first.training.get("test_split") else {})
        | {"recipe": {"seed": seed, "combination": "mean of the members' softmax outputs"},
           "members": [{"name": e.name, "sha256": e.sha256} for e in entries]},
        "metrics": {"val_accuracy": round(m["val_accuracy"], 4),
                    "val_accuracy_hflip_tta": round(m["val_accuracy_hflip_tta"], 4), "val_images": len(y_val)},
    }
    publish_run(out, entry, weights_file, args.install)
    return report


if __name__ == "__main__":
    main()
