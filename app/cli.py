"""Command line: serve, fetch-weights, train, evaluate.

    python -m app.cli serve                      # start the API (settings from CNN_* variables)
    python -m app.cli worker                     # run style-transfer jobs from the shared store
    python -m app.cli fetch-weights resnet50     # official torchvision weights (needs internet)
    python -m app.cli train images --data DIR --out runs/x
    python -m app.cli train text --train CSV --out runs/y
    python -m app.cli train faces --data LFW_DIR --pairs PAIRS --out runs/z
    python -m app.cli evaluate cifar10-resnet20 --data DIR
    python -m app.cli evaluate-text agnews-vdcnn9 --csv FILE
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from app.settings import DEFAULT_IMAGENET_MODELS, Settings


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the API with uvicorn."""
    import uvicorn

    from app.main import create_app

    settings = Settings()
    host = args.host or settings.host
    port = args.port or settings.port
    uvicorn.run(create_app(settings), host=host, port=port, log_level=settings.log_level, workers=1)
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    """Run style-transfer jobs from the shared store until SIGINT/SIGTERM (several workers may share it)."""
    import logging
    import signal

    from app.runtime.device import configure_torch, select_device
    from app.runtime.registry import hub_checkpoint_dir
    from app.services.style import FeatureSource, StyleWorker
    from app.stores.jobs import JobStore

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    s = Settings()
    device = select_device(s.device)
    configure_torch(device, s.torch_threads)
    store = JobStore(s.data_dir / "style-jobs", stale_after=s.style_stale_seconds)
    worker = StyleWorker(store, FeatureSource(s.weights_dir, hub_checkpoint_dir(s.torch_home)), device,
                         ttl_seconds=s.style_ttl_hours * 3600)

    def stop(signum: int, frame: object) -> None:
        worker._stop.set()
        worker.wake.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    worker.recover()
    logging.getLogger("app").info("style worker %s on %s, store %s", worker.id, device, store.root)
    worker.run_forever()
    return 0


def cmd_fetch_weights(args: argparse.Namespace) -> int:
    """Download official torchvision weights, verified by hash, into the weights dir or hub cache."""
    from app.runtime.registry import fetch_torchvision_weights, hub_checkpoint_dir

    settings = Settings()
    dest = Path(args.dest) if args.dest else (hub_checkpoint_dir(settings.torch_home) if args.hub_cache
                                              else settings.weights_dir)
    names = args.models or [m for m in settings.classifiers if m in DEFAULT_IMAGENET_MODELS] or DEFAULT_IMAGENET_MODELS
    failures = fetch_torchvision_weights(names, dest, progress=not args.quiet)
    return 1 if failures else 0


def cmd_train(args: argparse.Namespace, rest: list[str]) -> int:
    """Hand over to a training entry point in models.train."""
    if args.what == "images":
        from models.train import images

        images.main(rest)
        return 0
    if args.what == "text":
        from models.train import text

        text.main(rest)
        return 0
    if args.what == "faces":
        from models.train import faces

        faces.main(rest)
        return 0
    print(f"unknown training target {args.what!r}", file=sys.stderr)
    return 2


def evaluate_classifier(name: str, data: Path, *, batch_size: int = 64, limit_per_class: int = 0,
                        settings: Settings | None = None) -> dict[str, Any]:
    """Accuracy, per-class accuracy and throughput of a registered classifier on an ImageFolder tree,
    through the service's own decoding and preprocessing."""
    import numpy as np

    from app.runtime.device import select_device
    from app.runtime.images import decode_image
    from app.runtime.registry import LoadedClassifier, ModelRegistry, hub_checkpoint_dir
    from models.preprocess import image_to_tensor
    from models.train.common import confusion_matrix
    from models.train.images import scan_image_folder

    s = settings or Settings()
    registry = ModelRegistry(s.weights_dir, hub_checkpoint_dir(s.torch_home), select_device(s.device),
                             allow_download=False, allow_untrained=False)
    st = registry.load_classifier(name)
    if st.loaded is None:
        raise SystemExit(f"{name}: {st.status}: {st.reason}")
    loaded = st.loaded
    assert isinstance(loaded, LoadedClassifier)
    classes, files, labels = scan_image_folder(data)
    if limit_per_class:
        keep = np.concatenate([np.flatnonzero(labels == c)[:limit_per_class] for c in range(len(classes))])
        files, labels = [files[i] for i in keep], labels[keep]
    model_labels = loaded.spec.labels
    missing = [c for c in classes if c not in model_labels]
    if missing:
        raise SystemExit(f"folder classes {missing} are not labels of {name}")
    target = np.asarray([model_labels.index(classes[y]) for y in labels])
    preds: list[int] = []
    t0 = time.perf_counter()
    for i in range(0, len(files), batch_size):
        batch = []
        for f in files[i : i + batch_size]:
            img = decode_image(f.read_bytes(), max_bytes=s.max_image_bytes, max_pixels=s.max_image_pixels,
                               name=f.name)
            batch.append(image_to_tensor(img, loaded.preprocessing))
        preds.extend(int(p.argmax()) for p in loaded.forward(batch))
    seconds = time.perf_counter() - t0
    pred = np.asarray(preds)
    cm = confusion_matrix(target, pred, len(model_labels))
    per_class = {c: float(cm[model_labels.index(c), model_labels.index(c)] / max(1, cm[model_labels.index(c)].sum()))
                 for c in classes}
    return {"model": name, "images": len(files), "accuracy": float((pred == target).mean()),
            "per_class_accuracy": per_class, "seconds": round(seconds, 2),
            "images_per_second": round(len(files) / seconds, 1), "device": str(loaded.device),
            "weights": loaded.weights_tag}


def evaluate_text_model(name: str, csv_path: Path, *, text_columns: str = "2,3", label_column: str = "1",
                        header: bool = False, label_base: int | None = 1, limit: int = 0, batch_size: int = 64,
                        settings: Settings | None = None) -> dict[str, Any]:
    """Accuracy, per-class precision/recall/F1 and texts/s of a registered text model on a CSV file,
    through the service's own encoding and forward (labels: class names or label_base-based numbers)."""
    import numpy as np

    from app.runtime.device import select_device
    from app.runtime.registry import LoadedTextClassifier, ModelRegistry, hub_checkpoint_dir
    from models.train.common import confusion_matrix
    from models.train.text import map_labels, per_class_metrics, read_csv

    s = settings or Settings()
    registry = ModelRegistry(s.weights_dir, hub_checkpoint_dir(s.torch_home), select_device(s.device),
                             allow_download=False, allow_untrained=False)
    st = registry.load(name, "text-classification")
    if st.loaded is None:
        raise SystemExit(f"{name}: {st.status}: {st.reason}")
    loaded = st.loaded
    assert isinstance(loaded, LoadedTextClassifier)
    raw, texts = read_csv(csv_path, label_column=label_column, text_columns=text_columns.split(","), header=header,
                          unescape=True, encoding="utf-8", limit=limit)
    labels = loaded.spec.labels
    target = map_labels(raw, labels, label_base, csv_path)
    preds: list[int] = []
    t0 = time.perf_counter()
    for i in range(0, len(texts), batch_size):
        preds.extend(int(p.argmax()) for p in loaded.forward(texts[i : i + batch_size]))
    seconds = time.perf_counter() - t0
    pred = np.asarray(preds)
    cm = confusion_matrix(target, pred, len(labels))
    return {"model": name, "texts": len(texts), "accuracy": float((pred == target).mean()),
            "per_class": per_class_metrics(cm, labels), "confusion_matrix": cm.tolist(),
            "seconds": round(seconds, 2), "texts_per_second": round(len(texts) / seconds, 1),
            "batch_size": batch_size, "device": str(loaded.device), "weights": loaded.weights_tag}


def cmd_evaluate_text(args: argparse.Namespace) -> int:
    """Print the evaluation of a text model on a CSV file as JSON."""
    report = evaluate_text_model(args.model, Path(args.csv), text_columns=args.text_columns,
                                 label_column=args.label_column, header=args.header, label_base=args.label_base,
                                 limit=args.limit, batch_size=args.batch_size)
    print(json.dumps(report, indent=2))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Print the evaluation of a classifier on an ImageFolder directory as JSON."""
    report = evaluate_classifier(args.model, Path(args.data), batch_size=args.batch_size,
                                 limit_per_class=args.limit_per_class)
    print(json.dumps(report, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m app.cli", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="start the API server")
    s.add_argument("--host", default=None)
    s.add_argument("--port", type=int, default=None)
    sub.add_parser("worker", help="run style-transfer jobs from the shared job store (no HTTP)")
    f = sub.add_parser("fetch-weights", help="download official torchvision weights (needs internet)")
    f.add_argument("models", nargs="*", help="torchvision model names (default: the configured ImageNet models)")
    f.add_argument("--dest", default=None, help="target directory (default: the weights dir)")
    f.add_argument("--hub-cache", action="store_true", help="store in the torch hub cache instead")
    f.add_argument("--quiet", action="store_true", help="no progress bar")
    t = sub.add_parser("train", help="train a model (options after the target go to the trainer)")
    t.add_argument("what", choices=["images", "text", "faces"])
    e = sub.add_parser("evaluate", help="evaluate a classifier on an ImageFolder directory")
    e.add_argument("model")
    e.add_argument("--data", required=True)
    e.add_argument("--batch-size", type=int, default=64)
    e.add_argument("--limit-per-class", type=int, default=0)
    et = sub.add_parser("evaluate-text", help="evaluate a text model on a CSV file (AG News layout by default)")
    et.add_argument("model")
    et.add_argument("--csv", required=True)
    et.add_argument("--text-columns", default="2,3", help="1-based positions (or names with --header)")
    et.add_argument("--label-column", default="1")
    et.add_argument("--header", action="store_true")
    et.add_argument("--label-base", type=int, default=1, help="number of the first class in numeric labels")
    et.add_argument("--limit", type=int, default=0, help="at most N rows")
    et.add_argument("--batch-size", type=int, default=64)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv[:1] == ["train"]:
        args, rest = parser.parse_known_args(argv)
        return cmd_train(args, rest)
    args = parser.parse_args(argv)
    handlers = {"serve": cmd_serve, "worker": cmd_worker, "fetch-weights": cmd_fetch_weights, "evaluate": cmd_evaluate,
                "evaluate-text": cmd_evaluate_text}
    return handlers[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
