"""Command line: serve, fetch-weights, train, evaluate.

    python -m app.cli serve                      # start the API (settings from CNN_* variables)
    python -m app.cli serve --front-workers 4    # 4 HTTP processes in front of one model process
    python -m app.cli worker                     # run style-transfer jobs from the shared store
    python -m app.cli fetch-weights resnet50     # official torchvision weights (needs internet)
    python -m app.cli train images --data DIR --out runs/x
    python -m app.cli train text --train CSV --out runs/y    (--family vdcnn | char-cnn | word-cnn)
    python -m app.cli train faces --data LFW_DIR --pairs PAIRS --out runs/z
    python -m app.cli train ensemble --name N --members A B --out runs/e   (combine trained CIFAR ResNets)
    python -m app.cli evaluate cifar10-resnet56 --data DIR            (--holdout: the images it was validated on)
    python -m app.cli evaluate MODEL --test-split                     (its frozen test split: report once)
    python -m app.cli evaluate-text agnews-vdcnn9 --csv FILE          (or --holdout instead of --csv)
    python -m app.cli baseline-text agnews-vdcnn9 --out FILE.json     (TF-IDF + logistic regression, same split)
    python -m app.cli calibrate-identification lfw-face-resnet --pairs PAIRS --data LFW_DIR   (1:N thresholds)
    python -m app.cli keygen alice --scopes read,write --file keys.json   (a new API key for a principal)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from app.settings import DEFAULT_IMAGENET_MODELS, Settings

if TYPE_CHECKING:  # imported where used: the command line starts without torch
    import torch

    from app.runtime.registry import LoadedClassifier, LoadedFaceEmbedder
    from app.services.classification import Upload
    from app.services.faces import DetectorPool

M = TypeVar("M")


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the API with uvicorn: in one process, or (--front-workers N) N HTTP processes and one model host."""
    import uvicorn

    from app.main import create_app

    settings = Settings()
    host = args.host or settings.host
    port = args.port or settings.port
    fronts = settings.front_workers if args.front_workers is None else args.front_workers
    if fronts > 0:
        return _serve_with_fronts(settings, host, port, fronts)
    # h11, not httptools (which the Ray extra installs): httptools refuses an unknown method with a bare-text 400
    # before the app sees it; with h11 the app answers every request, with problem details
    uvicorn.run(create_app(settings), host=host, port=port, log_level=settings.log_level, workers=1, http="h11")
    return 0


def _serve_with_fronts(settings: Settings, host: str, port: int, fronts: int) -> int:
    """Start the model host, then `fronts` uvicorn workers that forward to it (app/model_host.py). If the host
    exits, the workers are stopped and the exit status is 1; on SIGTERM/SIGINT both stop."""
    import logging
    import os
    import signal
    import subprocess
    import threading

    import uvicorn

    from app.model_host import socket_path

    try:
        path = socket_path(settings)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    os.environ["CNN_MODEL_HOST_SOCKET"] = path  # the front workers (spawned by uvicorn) read it from here
    host_proc = subprocess.Popen([sys.executable, "-m", "app.cli", "model-host", "--socket", path, "--parent-pipe"],
                                 stdin=subprocess.PIPE)
    stopping = threading.Event()
    host_died = threading.Event()

    def watch() -> None:
        code = host_proc.wait()
        if not stopping.is_set():
            host_died.set()
            logging.getLogger("app").error("the model host exited with %s: stopping the front workers", code)
            os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="model-host-watch", daemon=True).start()
    try:
        uvicorn.run("app.model_host:front_app", factory=True, host=host, port=port, log_level=settings.log_level,
                    workers=fronts, http="h11")
    finally:
        stopping.set()
        if host_proc.poll() is None:
            host_proc.terminate()
            try:
                host_proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                host_proc.kill()
                host_proc.wait()
    return 1 if host_died.is_set() else 0


def cmd_model_host(args: argparse.Namespace) -> int:
    """Run the model host that `serve --front-workers N` starts (its models, batchers and style workers)."""
    import logging

    from app.model_host import run_model_host, socket_path

    settings = Settings()
    logging.basicConfig(level=settings.log_level.upper(), format="%(levelname)s:     model-host %(name)s: %(message)s")
    run_model_host(settings, args.socket or socket_path(settings), parent_pipe=args.parent_pipe)
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    """Run style-transfer jobs from the shared store until SIGINT/SIGTERM (several workers may share it)."""
    import logging
    import signal

    from app.runtime.device import configure_torch, select_device
    from app.runtime.registry import hub_checkpoint_dir
    from app.services.style import FeatureSource, StyleWorker
    from app.stores.factory import open_job_store

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    s = Settings()
    device = select_device(s.device)
    configure_torch(device, s.torch_threads)
    store = open_job_store(s)  # the same factory the server uses: both see one store
    worker = StyleWorker(store, FeatureSource(s.weights_dir, hub_checkpoint_dir(s.torch_home)), device,
                         ttl_seconds=s.style_ttl_hours * 3600)

    def stop(signum: int, frame: object) -> None:
        worker._stop.set()
        worker.wake.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    worker.recover()
    logging.getLogger("app").info("style worker %s on %s, store %s", worker.id, device, store.location)
    worker.run_forever()
    return 0


def cmd_keygen(args: argparse.Namespace) -> int:
    """Make a random API key for a principal: print the key once, store only its sha256 in the keys file."""
    import secrets

    from app.auth import SCOPES
    from app.gate import KeyFileError, KeyRing, hash_key

    scopes = [x.strip() for x in args.scopes.split(",") if x.strip()]
    if not scopes or any(x not in SCOPES for x in scopes):
        print(f"--scopes must be a comma-separated subset of {', '.join(SCOPES)}", file=sys.stderr)
        return 2
    key = secrets.token_urlsafe(32)
    entry = {"name": args.name, "key_sha256": hash_key(key), "scopes": scopes}
    if args.file is None:
        print(json.dumps(entry))
    else:
        path = Path(args.file)
        entries = json.loads(path.read_text()) if path.exists() else []
        if any(isinstance(e, dict) and e.get("name") == args.name for e in entries):
            print(f"{path} already has a principal named {args.name!r}", file=sys.stderr)
            return 2
        entries.append(entry)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(entries, indent=2) + "\n")
        try:
            KeyRing.build([], tmp)  # never leave a file the server would refuse
        except KeyFileError as exc:
            tmp.unlink()
            print(str(exc), file=sys.stderr)
            return 2
        tmp.replace(path)
        print(f"added {args.name} ({', '.join(scopes)}) to {path}", file=sys.stderr)
    print(key)  # shown once: only its hash is stored
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
    if args.what == "ensemble":
        from models.train import ensemble

        ensemble.main(rest)
        return 0
    print(f"unknown training target {args.what!r}", file=sys.stderr)
    return 2


def _upload(path: Path) -> Upload:
    """A file as the services see an uploaded one (its name and bytes)."""
    from app.services.classification import Upload

    return Upload(filename=path.name, data=path.read_bytes())


def _classifier_inputs(loaded: LoadedClassifier, files: list[Path], s: Settings) -> list[torch.Tensor]:
    """The classifier's input tensors of image files, made by the classification service's own per-upload step
    (`classifier_input`: decoded and checked within the server's limits, then the model's preprocessing)."""
    from app.services.classification import ImageLimits, classifier_input

    limits = ImageLimits.from_settings(s)
    return [classifier_input(_upload(f), loaded, limits) for f in files]


def _training_path(path: Path, s: Settings) -> Path:
    """A path from a manifest entry's training info: as written (relative to the directory the trainer ran in,
    normally the project root), else relative to the weights directory's parent (the project root)."""
    if path.is_absolute() or path.exists():
        return path
    alt = s.weights_dir.parent / path
    return alt if alt.exists() else path


def _accuracy_counts(target: Any, pred: Any) -> dict[str, Any]:
    """Accuracy with its numerator and denominator (so a reader can check a rounding)."""
    return {"accuracy": float((pred == target).mean()) if len(target) else 0.0, "correct": int((pred == target).sum()),
            "total": len(target)}


def _points(measured: float, card: float) -> float:
    """measured - card in percentage points, rounded to 0.01 (never "-0.0")."""
    return round(100 * (measured - card), 2) + 0.0


def _load_trained(name: str, task: str, kind: type[M], s: Settings) -> M:
    """One model of the registry with its trained weights (no download, never random weights), or exit naming
    why it cannot load: what the evaluation and calibration commands measure."""
    from app.runtime.device import select_device
    from app.runtime.registry import ModelRegistry, hub_checkpoint_dir

    registry = ModelRegistry(s.weights_dir, hub_checkpoint_dir(s.torch_home), select_device(s.device),
                             allow_download=False, allow_untrained=False)
    st = registry.load(name, task)
    if not isinstance(st.loaded, kind):
        raise SystemExit(f"{name}: {st.status}: {st.reason}")
    return st.loaded


def evaluate_classifier(name: str, data: Path | None, *, batch_size: int = 64, limit_per_class: int = 0,
                        holdout: bool = False, one_view: bool = False, test_split: bool = False,
                        settings: Settings | None = None) -> dict[str, Any]:
    """Accuracy, per-class accuracy and throughput of a registered classifier on an ImageFolder tree,
    through the service's own decoding and preprocessing ("accuracy" is as served: with the flip averaging
    the manifest asks for). holdout: only the images the model was validated on, rebuilt with the trainer's
    split from the folder, validation size and seed in its manifest entry (`data` may point at the same
    folder elsewhere; default: the recorded one), reported next to the card's numbers; one_view adds the
    accuracy without flip averaging (one more forward pass). limit_per_class: the first N images (of the
    hold-out, with holdout) of every class. test_split: instead of the hold-out, the model's frozen test split
    (never trained on, never used for a choice; models trained before it existed have none and are refused):
    report this number once per model, never to choose anything."""
    import numpy as np

    from app.runtime.registry import LoadedClassifier
    from models.train.common import confusion_matrix
    from models.train.images import frozen_test_files, holdout_files, holdout_from_training, scan_image_folder
    from models.tta import metric_key

    if holdout and test_split:
        raise SystemExit("evaluate: --holdout and --test-split are different images: choose one")
    s = settings or Settings()
    loaded = _load_trained(name, "image-classification", LoadedClassifier, s)
    split: dict[str, Any] | None = None
    if test_split:
        h = holdout_from_training(loaded.spec.info.get("training") or {}, name)
        root = data if data is not None else _training_path(h.data, s)
        classes, files, labels = frozen_test_files(h, root, name)
        assert h.test is not None  # frozen_test_files refuses models without a test split
        split = {"data": str(root), "test_images": h.test_size, "val_images": h.val_size,
                 "train_images": h.train_size, "seed": h.seed, "test_split": h.test.to_dict(),
                 "files_sha256": h.test_files_sha256,
                 "split": "models.train.images.frozen_test_files: the frozen test split, left out of training and "
                          "validation; a number to report once, never to choose by"}
    elif holdout:
        h = holdout_from_training(loaded.spec.info.get("training") or {}, name)
        root = data if data is not None else _training_path(h.data, s)
        classes, files, labels = holdout_files(h, root)
        split = {"data": str(root), "val_images": h.val_size, "train_images": h.train_size, "seed": h.seed,
                 "split": "models.train.images.split_files: the trainer's stratified split"}
    elif data is None:
        raise SystemExit("give --data (an ImageFolder directory) or --holdout")
    else:
        classes, files, labels = scan_image_folder(data)
    if limit_per_class:
        keep = np.concatenate([np.flatnonzero(labels == c)[:limit_per_class] for c in range(len(classes))])
        files, labels = [files[i] for i in keep], labels[keep]
    model_labels = loaded.spec.labels
    missing = [c for c in classes if c not in model_labels]
    if missing:
        raise SystemExit(f"folder classes {missing} are not labels of {name}")
    target = np.asarray([model_labels.index(classes[y]) for y in labels])
    served_tta = loaded.tta
    one_view = one_view and split is not None and served_tta is not None
    preds: list[int] = []
    preds_one: list[int] = []
    t0 = time.perf_counter()
    for i in range(0, len(files), batch_size):
        batch = _classifier_inputs(loaded, files[i : i + batch_size], s)
        # the forward the service's micro-batcher runs on a batch of requests' inputs
        preds.extend(int(p.argmax()) for p in loaded.forward(batch))
        if one_view:
            loaded.tta = None  # the same forward without the other views: the card's one-view number
            try:
                preds_one.extend(int(p.argmax()) for p in loaded.forward(batch))
            finally:
                loaded.tta = served_tta
    seconds = time.perf_counter() - t0
    pred = np.asarray(preds)
    cm = confusion_matrix(target, pred, len(model_labels))
    per_class = {c: float(cm[model_labels.index(c), model_labels.index(c)] / max(1, cm[model_labels.index(c)].sum()))
                 for c in classes}
    report: dict[str, Any] = {
        "model": name, "images": len(files), "accuracy": float((pred == target).mean()),
        "per_class_accuracy": per_class, "seconds": round(seconds, 2),
        "images_per_second": round(len(files) / seconds, 1), "device": str(loaded.device),
        "weights": loaded.weights_tag}
    if split is not None:
        served = served_tta or "one view"
        measured = {metric_key(served_tta): _accuracy_counts(target, pred)}
        if one_view:
            measured["val_accuracy"] = _accuracy_counts(target, np.asarray(preds_one))
        card = {k: loaded.spec.metrics[k] for k in measured if k in loaded.spec.metrics}
        where = "test split" if test_split else "hold-out"
        report |= {"model_sha256": loaded.spec.weights.sha256, ("test_split" if test_split else "holdout"): split,
                   "served_with": served,
                   "sample": f"first {limit_per_class} {where} images of every class" if limit_per_class else None,
                   "measured": measured, "confusion_matrix": cm.tolist(), "card_metrics": card}
        if test_split:  # the card's numbers are validation numbers: next to it, not a difference to check
            report["test_minus_validation_points"] = {k: _points(measured[k]["accuracy"], v) for k, v in card.items()}
        else:
            report["difference_from_card_points"] = {k: _points(measured[k]["accuracy"], v) for k, v in card.items()}
    return report


def _text_scores(target: Any, pred: Any, labels: list[str]) -> dict[str, Any]:
    """Accuracy, macro F1, per-class precision/recall/F1 and the confusion matrix of text predictions."""
    import numpy as np

    from models.train.common import confusion_matrix
    from models.train.text import per_class_metrics

    cm = confusion_matrix(target, pred, len(labels))
    per_class = per_class_metrics(cm, labels)
    return {"texts": len(target), **_accuracy_counts(target, pred),
            "macro_f1": float(np.mean([m["f1"] for m in per_class.values()])), "per_class": per_class,
            "confusion_matrix": cm.tolist()}


def evaluate_text_model(name: str, csv_path: Path | None, *, text_columns: str = "2,3", label_column: str = "1",
                        header: bool = False, label_base: int | None = 1, limit: int = 0, batch_size: int = 64,
                        holdout: bool = False, data_dir: Path | None = None,
                        settings: Settings | None = None) -> dict[str, Any]:
    """Accuracy, per-class precision/recall/F1 and texts/s of a registered text model on a CSV file,
    through the service's own encoding and forward (labels: class names or label_base-based numbers).

    holdout: instead of a CSV file, exactly the validation rows the model was validated with, rebuilt by the
    trainer's split code from the files, sizes, seed and de-duplication rule of its manifest entry (data_dir:
    where those files are now, found by name). A model trained before the near-duplicate rule
    (no training.dedup) is scored on its old hold-out minus the rows that have a near-duplicate in its
    training side ("accuracy"), and on the old hold-out as validated ("holdout_as_validated")."""
    import numpy as np

    from app.runtime.registry import LoadedTextClassifier
    from models.train.text import (
        DEDUP_RULE,
        holdout_from_training,
        holdout_split,
        map_labels,
        near_duplicate_mask,
        read_csv,
    )

    s = settings or Settings()
    loaded = _load_trained(name, "text-classification", LoadedTextClassifier, s)
    labels = loaded.spec.labels
    keep: Any = None  # with an old-split hold-out: the rows without a near-duplicate in training
    split_info: dict[str, Any] | None = None
    if holdout:
        h = holdout_from_training(loaded.spec.info.get("training") or {}, name)
        h.files = [data_dir / p.name if data_dir is not None else _training_path(p, s) for p in h.files]
        split = holdout_split(h, labels)
        texts, target = split.val_texts, split.y_val
        near = near_duplicate_mask(split.val_keys, split.train_keys)
        split_info = {"files": [str(p) for p in h.files], "val_size": h.val_size, "seed": h.seed,
                      "val_from": str(h.files[0]) if h.val_from_first else "all", "train_rows": len(split.train_texts),
                      "val_rows": len(texts), "dedup": DEDUP_RULE if h.dedup else None,
                      "val_rows_with_near_duplicate_in_training": int(near.sum()),
                      "split": "models.train.text.holdout_split: the trainer's split_rows"}
        if not h.dedup:
            keep = ~near
        if limit:
            texts, target = texts[:limit], target[:limit]
            keep = keep[:limit] if keep is not None else None
    elif csv_path is None:
        raise SystemExit("give --csv (a CSV file) or --holdout")
    else:
        raw, texts = read_csv(csv_path, label_column=label_column, text_columns=text_columns.split(","),
                              header=header, unescape=True, encoding="utf-8", limit=limit)
        target = map_labels(raw, labels, label_base, csv_path)
    preds: list[int] = []
    t0 = time.perf_counter()
    for i in range(0, len(texts), batch_size):
        preds.extend(int(p.argmax()) for p in loaded.forward(texts[i : i + batch_size]))
    seconds = time.perf_counter() - t0
    pred = np.asarray(preds)
    scored = _text_scores(target, pred, labels) if keep is None else _text_scores(target[keep], pred[keep], labels)
    report: dict[str, Any] = {
        "model": name, **scored, "seconds": round(seconds, 2), "texts_per_second": round(len(texts) / seconds, 1),
        "batch_size": batch_size, "device": str(loaded.device), "weights": loaded.weights_tag}
    if split_info is not None:
        card = {k: loaded.spec.metrics[k] for k in ("val_accuracy", "val_macro_f1", "val_rows")
                if k in loaded.spec.metrics}
        report |= {"model_sha256": loaded.spec.weights.sha256, "holdout": split_info,
                   "sample": f"first {limit} hold-out rows" if limit else None, "card_metrics": card}
        measured = {"holdout": scored["accuracy"]}
        if keep is not None:
            old = _text_scores(target, pred, labels)
            report["holdout"]["scored"] = (
                "the model's hold-out as validated (old split: exact-text de-duplication only) minus its rows "
                f"that have a near-duplicate in training ({DEDUP_RULE!r} rule); as validated: holdout_as_validated")
            report["holdout_as_validated"] = old
            measured = {"holdout_as_validated": old["accuracy"], "deduplicated_holdout": scored["accuracy"]}
        else:
            report["holdout"]["scored"] = "the model's hold-out, which has no near-duplicate in training"
        if "val_accuracy" in card:
            report["difference_from_card_points"] = {k: _points(v, card["val_accuracy"]) for k, v in measured.items()}
    return report


def cmd_evaluate_text(args: argparse.Namespace) -> int:
    """Print the evaluation of a text model on a CSV file (or on its hold-out) as JSON."""
    if args.holdout == (args.csv is not None):
        print("evaluate-text: give either --csv FILE or --holdout", file=sys.stderr)
        return 2
    report = evaluate_text_model(args.model, Path(args.csv) if args.csv else None, text_columns=args.text_columns,
                                 label_column=args.label_column, header=args.header, label_base=args.label_base,
                                 limit=args.limit, batch_size=args.batch_size, holdout=args.holdout,
                                 data_dir=Path(args.data_dir) if args.data_dir else None)
    print(json.dumps(report, indent=2))
    return 0


def cmd_baseline_text(args: argparse.Namespace) -> int:
    """Train and score the TF-IDF + logistic-regression baseline on exactly a text model's split (scikit-learn,
    a dev extra, is imported lazily by models.train.text_baseline); with --compare, the model itself on the
    same hold-out next to it. JSON to --out (or stdout)."""
    from app.runtime.registry import load_manifest
    from models.train.text import holdout_from_training
    from models.train.text_baseline import BaselineConfig, require_sklearn, run_baseline

    require_sklearn()
    s = Settings()
    entry = load_manifest(s.weights_dir).get(args.model)
    if entry is None or entry.task != "text-classification":
        print(f"baseline-text: {args.model!r} is not a text model in {s.weights_dir}", file=sys.stderr)
        return 2
    h = holdout_from_training(entry.training or {}, args.model)
    data_dir = Path(args.data_dir) if args.data_dir else None
    h.files = [data_dir / p.name if data_dir is not None else _training_path(p, s) for p in h.files]
    report: dict[str, Any] = {"model": args.model, "model_sha256": entry.sha256}
    report |= run_baseline(h, entry.labels, config=BaselineConfig(C=args.C, seed=args.seed),
                           batch_sizes=(1, args.batch_size))
    if args.compare:
        import torch

        runs = {b: evaluate_text_model(args.model, None, holdout=True, batch_size=b, data_dir=data_dir, settings=s)
                for b in (1, args.batch_size)}
        cnn = runs[args.batch_size]

        def brief(scored: dict[str, Any]) -> dict[str, Any]:
            return {k: scored[k] for k in ("texts", "accuracy", "correct", "macro_f1")} | {
                "per_class_accuracy": {c: m["recall"] for c, m in scored["per_class"].items()}}

        report["cnn"] = {"weights": cnn["weights"], "device": cnn["device"], "torch_threads": torch.get_num_threads(),
                         "card_metrics": cnn.get("card_metrics"),
                         "prediction_speed": {str(b): {"texts": r["holdout"]["val_rows"], "seconds": r["seconds"],
                                                       "texts_per_second": r["texts_per_second"]}
                                              for b, r in runs.items()},
                         "deduplicated_holdout": brief(cnn)}
        if "holdout_as_validated" in cnn:
            report["cnn"]["holdout_as_validated"] = brief(cnn["holdout_as_validated"])
    compared = [*report["variants"].items(), *([(args.model, report["cnn"])] if args.compare else [])]
    report["side_by_side"] = {
        name: {k: r[k]["accuracy"] for k in ("holdout_as_validated", "deduplicated_holdout") if k in r}
        | {"texts_per_second": {b: v["texts_per_second"] for b, v in r["prediction_speed"].items()}}
        | ({"fit_seconds": r["fit_seconds"]} if "fit_seconds" in r else {})
        for name, r in compared}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
        print(json.dumps(report["side_by_side"], indent=2))
    else:
        print(json.dumps(report, indent=2))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Print the evaluation of a classifier on an ImageFolder directory (or on its hold-out) as JSON."""
    if args.data is None and not (args.holdout or args.test_split):
        print("evaluate: give --data DIR, --holdout or --test-split (with --data: that split of DIR)", file=sys.stderr)
        return 2
    if args.holdout and args.test_split:
        print("evaluate: --holdout and --test-split are different images: choose one", file=sys.stderr)
        return 2
    split = args.holdout or args.test_split
    report = evaluate_classifier(args.model, Path(args.data) if args.data else None, batch_size=args.batch_size,
                                 limit_per_class=args.limit_per_class, holdout=args.holdout, one_view=split,
                                 test_split=args.test_split)
    text = json.dumps(report, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0


def _face_detectors(s: Settings, loaded: LoadedFaceEmbedder) -> DetectorPool:
    """The face service's detectors with the server's Haar parameters (exit when the cascade, or the eye cascade
    of a model that aligns on the eyes, is missing: the numbers would not be the served model's)."""
    from app.services.faces import DetectorPool
    from models.faces.detect import HaarParams

    detectors = DetectorPool(HaarParams(scale_factor=s.face_haar_scale_factor,
                                        min_neighbors=s.face_haar_min_neighbors, min_size=s.face_haar_min_size,
                                        max_side=s.face_haar_max_side))
    if "haar" in detectors.errors:
        raise SystemExit(f"the Haar face detector is unavailable: {detectors.errors['haar']}")
    if loaded.crop_align == "eyes" and detectors.eyes.error:
        raise SystemExit(f"{loaded.spec.name} aligns faces on the eyes, but the eye cascade is unavailable: "
                         f"{detectors.eyes.error}")
    return detectors


def _face_embeddings(loaded: LoadedFaceEmbedder, files: list[Path], s: Settings, batch_size: int,
                     misses: str) -> tuple[dict[Path, Any], set[Path]]:
    """Each image's embedding through the served path, the face service's own per-upload step (`find_faces`):
    decoded and checked as an upload, the Haar cascade with the server's parameters, the largest face, the model's
    crop. An image without a face gets None (misses='error': /faces/verify answers 422) or the embedding of the
    training pipeline's centred box (misses='fallback')."""
    from app.services.classification import ImageLimits
    from app.services.faces import face_for_embedding, find_faces
    from models.train.faces import fallback_box

    detectors = _face_detectors(s, loaded)
    limits = ImageLimits.from_settings(s)
    embeddings: dict[Path, Any] = {}  # a unit embedding (a tensor), or None for a miss
    missed: set[Path] = set()
    for i in range(0, len(files), batch_size):
        batch: list[torch.Tensor] = []
        names: list[Path] = []
        for f in files[i : i + batch_size]:
            upload = _upload(f)
            img = limits.decode(upload)
            found = find_faces(img, upload.filename, loaded, detectors, "haar", 1)
            if found.faces:
                face = found.faces[0]
            else:
                missed.add(f)
                if misses == "error":
                    embeddings[f] = None
                    continue
                face = face_for_embedding(img, fallback_box(img.width, img.height), loaded, detectors, "haar")
            batch.append(face.tensor)
            names.append(f)
        if batch:
            for f, e in zip(names, loaded.forward(batch), strict=True):
                embeddings[f] = e
    return embeddings, missed


def _limit_pairs(pairs: list[Any], limit: int) -> list[Any]:
    """At most `limit` pairs: the first half same-person, the rest different-person pairs (0: all)."""
    if not limit:
        return pairs
    same = [p for p in pairs if p.same][: limit // 2]
    return same + [p for p in pairs if not p.same][: limit - len(same)]


def evaluate_face_model(name: str, pairs_file: Path, data: Path, *, holdout_max_images: int = 0, limit: int = 0,
                        batch_size: int = 64, roc: Path | None = None, settings: Settings | None = None,
                        split: str = "all", misses: str | None = None,
                        criterion: str = "balanced") -> dict[str, Any]:
    """Verification metrics of a registered face model on an LFW-style pair list, through the service's own
    detector (largest face), crop and embedder.

    split='all' (the default) scores every pair and fits the threshold on them: 10-fold accuracy, ROC AUC, TAR at
    FAR 1e-2 and 1e-3 and the best threshold (what a third-party ONNX model's manifest entry needs), an image
    without a face taking the centred fallback box unless misses='error'. split='calibration' or 'test' divides the
    pairs' identities into two halves (models.faces.lfw.split_by_identity; pairs across the halves are dropped),
    fits the threshold on the calibration half and scores the chosen half with it, as served: a pair with an image
    without a face gets no decision (the API's 422) and counts as an error (misses='error', the default there).
    The served-path threshold maximises `criterion`: 'balanced' accuracy (the mean of the true accept and true
    reject rates: a half's mix of same and different pairs is an artefact of the split) or plain 'accuracy'."""
    import numpy as np

    from app.runtime.registry import LoadedFaceEmbedder
    from models.faces.evaluation import (
        CRITERIA,
        evaluate_pairs,
        plot_roc,
        served_accuracy,
        served_report,
        served_threshold,
    )
    from models.faces.lfw import HALVES, holdout_split, identity_images, read_pairs, split_by_identity

    if split not in ("all", *HALVES):
        raise SystemExit(f"split must be all, calibration or test, not {split!r}")
    misses = misses or ("fallback" if split == "all" else "error")
    if misses not in ("error", "fallback"):
        raise SystemExit(f"misses must be error or fallback, not {misses!r}")
    s = settings or Settings()
    loaded = _load_trained(name, "face-embedding", LoadedFaceEmbedder, s)
    pairs = read_pairs(pairs_file, data)
    if holdout_max_images:
        _, pairs = holdout_split(identity_images(data), pairs, holdout_max_images)
    halves = split_by_identity(pairs) if split != "all" else None
    evaluated = _limit_pairs(halves.pairs[split] if halves else pairs, limit)
    calibration = _limit_pairs(halves.pairs["calibration"], limit) if halves else evaluated
    if not evaluated or not calibration:
        raise SystemExit(f"{pairs_file}: no pairs to evaluate" + (f" in the {split} half" if halves else ""))
    files = sorted({f for p in evaluated + calibration for f in (p.a, p.b)})
    t0 = time.perf_counter()
    emb, missed = _face_embeddings(loaded, files, s, batch_size, misses)
    seconds = time.perf_counter() - t0

    def distances(ps: list[Any]) -> tuple[Any, Any]:
        d = [float((emb[p.a] - emb[p.b]).pow(2).sum()) if emb[p.a] is not None and emb[p.b] is not None
             else float("nan") for p in ps]
        return np.array(d), np.array([p.same for p in ps])

    def image_stats(ps: list[Any]) -> dict[str, Any]:
        imgs = {f for p in ps for f in (p.a, p.b)}
        n = len(imgs & missed)
        return {"images": len(imgs), "images_without_face": n, "image_miss_rate": n / len(imgs)}

    dist, same_arr = distances(evaluated)
    base: dict[str, Any] = {"model": name, "model_sha256": loaded.sha256, "pairs_file": str(pairs_file),
                            "holdout_max_images": holdout_max_images, "split": split, "misses": misses}
    if split == "all" and misses == "fallback":
        report = evaluate_pairs(dist, same_arr)
        if roc is not None:
            plot_roc(dist, same_arr, roc, f"{name}: {len(evaluated)} pairs of {pairs_file.name}")
        return {**base, **report.to_dict(), "manifest_threshold": loaded.threshold, "images": len(files),
                "images_without_face": len(missed), "seconds": round(seconds, 2),
                "images_per_second": round(len(files) / seconds, 1),
                "detector": "haar (largest face; centred fallback box when none)"}
    d_cal, s_cal = distances(calibration)
    try:
        tau, cal_score = served_threshold(d_cal, s_cal, criterion)
        fits = {c: served_threshold(d_cal, s_cal, c) for c in CRITERIA}
    except ValueError as exc:
        raise SystemExit(f"{name}: {exc}") from exc
    ok = ~np.isnan(dist)
    if roc is not None and ok.any():
        plot_roc(dist[ok], same_arr[ok], roc, f"{name}: {int(ok.sum())} pairs ({split}) of {pairs_file.name}")
    cal = served_accuracy(d_cal, s_cal, tau)
    return {**base,
            "served_path": {"decode": "as an upload (the server's size and pixel limits)", "detector": "haar",
                            "haar": {"scale_factor": s.face_haar_scale_factor,
                                     "min_neighbors": s.face_haar_min_neighbors, "min_size": s.face_haar_min_size,
                                     "max_side": s.face_haar_max_side},
                            "face": "largest", "crop": {"size": loaded.crop_size, "margin": loaded.crop_margin,
                                                       "align": loaded.crop_align},
                            "flip_average": loaded.flip_average,
                            "no_face": ("no decision (/faces/verify answers 422 'no face found'): the pair counts as "
                                        "an error in accuracy_misses_as_errors" if misses == "error" else
                                        "the centred fallback box (not what the service does)")},
            "identity_split": halves.summary() if halves else None,
            "threshold": tau, "threshold_criterion": criterion,
            "threshold_from": "the calibration half" if halves else "these pairs (in-sample)",
            "calibration": {"pairs": len(calibration), "same_pairs": int(s_cal.sum()), **image_stats(calibration),
                            "pairs_found": cal["pairs_found"], "criterion_score": cal_score,
                            "accuracy_misses_as_errors": cal["accuracy_misses_as_errors"],
                            "balanced_accuracy_misses_as_errors": cal["balanced_accuracy_misses_as_errors"],
                            "accuracy_among_found": cal["accuracy_among_found"],
                            "fitted": {c: {"threshold": t, "score": v} for c, (t, v) in fits.items()}},
            **image_stats(evaluated),
            **served_report(dist, same_arr, tau),
            "manifest_threshold": loaded.threshold,
            "at_manifest_threshold": served_accuracy(dist, same_arr, loaded.threshold),
            "at_other_calibration_thresholds": {c: served_accuracy(dist, same_arr, t) for c, (t, _) in fits.items()
                                                if c != criterion},
            "card_metrics": loaded.spec.metrics,
            "seconds": round(seconds, 2), "images_per_second": round(len(files) / seconds, 1)}


def cmd_evaluate_faces(args: argparse.Namespace) -> int:
    """Print the verification report of a face model on a pair list."""
    result = evaluate_face_model(args.model, Path(args.pairs), Path(args.data),
                                 holdout_max_images=args.holdout_max_images, limit=args.limit,
                                 batch_size=args.batch_size, roc=Path(args.roc) if args.roc else None,
                                 split=args.split, misses=args.misses, criterion=args.criterion)
    print(json.dumps(result, indent=2))
    return 0


def calibrate_identification(name: str, pairs_file: Path, data: Path, *, holdout_max_images: int = 5,
                             batch_size: int = 64, draws: int = 200, seed: int = 0,
                             gallery_sizes: tuple[int, ...] = (1, 10, 30, 100, 300, 600),
                             fpirs: tuple[float, ...] = (0.01, 0.05, 0.1), settings: Settings | None = None,
                             source: str | None = None) -> dict[str, Any]:
    """The 1:N calibration of a face model: every photo of the calibration half of the held-out identities
    (models.faces.lfw.split_by_identity; never the test half, never a trained identity) embedded once through the
    served path (decoded as an upload, Haar with the server's parameters, the largest face, the served crop; a photo
    without a face is left out, as the API would refuse it), every pair of photos of different people as an impostor
    comparison, and their distance quantiles (models.faces.identification.quantile_table): the manifest's
    `identification` entry. The independence rule it serves (FAR = 1 - (1 - FPIR)^(1/N)) is then checked on
    simulated galleries of calibration people (one photo each, searched with every photo of the others), and out of
    sample: thresholds from the table of one random half of the calibration people, FPIR measured on galleries of
    the other half."""
    import numpy as np

    from app.runtime.registry import LoadedFaceEmbedder
    from models.faces.identification import (
        distance_matrix,
        gallery_check,
        impostor_distances,
        quantile_table,
        selection_metrics,
        simulate_galleries,
    )
    from models.faces.lfw import holdout_split, identity_images, read_pairs, split_by_identity

    s = settings or Settings()
    loaded = _load_trained(name, "face-embedding", LoadedFaceEmbedder, s)
    images = identity_images(data)
    _, held_pairs = holdout_split(images, read_pairs(pairs_file, data), holdout_max_images)
    halves = split_by_identity(held_pairs)
    people = halves.identities["calibration"]
    files = [f for p in people for f in images.get(p, [])]
    if not files:
        raise SystemExit(f"{pairs_file}: no calibration identities with images under {data}")
    t0 = time.perf_counter()
    emb, missed = _face_embeddings(loaded, files, s, batch_size, "error")
    seconds = time.perf_counter() - t0
    kept = [f for f in files if emb[f] is not None]
    vectors = np.stack([emb[f].numpy() for f in kept]).astype(np.float64)
    labels = [f.parent.name for f in kept]
    impostors = impostor_distances(vectors, labels)
    table = quantile_table(impostors, source=source)
    dist = distance_matrix(vectors)
    rng = np.random.default_rng(seed)
    n_people = len(set(labels))
    checks = [gallery_check(dist, labels, table, n, fpirs, draws=draws, rng=rng)
              for n in gallery_sizes if n < n_people]

    # out of sample: the table of half A's people, the FPIR on simulated galleries of half B's (repeated splits)
    lab = np.asarray(labels)
    uniq = np.unique(lab)
    split_checks: dict[tuple[int, float], list[float]] = {}
    split_clamped: dict[tuple[int, float], int] = {}
    split_sizes = [n for n in gallery_sizes if 1 < n < n_people // 2 - 50]
    for _ in range(10):
        order = rng.permutation(len(uniq))
        a, b = set(uniq[order[: len(uniq) // 2]]), set(uniq[order[len(uniq) // 2:]])
        ia = np.flatnonzero([x in a for x in lab])
        ib = np.flatnonzero([x in b for x in lab])
        table_a = quantile_table(impostor_distances(vectors[ia], lab[ia].tolist()))
        for n in split_sizes:
            mins = np.concatenate(simulate_galleries(dist[np.ix_(ib, ib)], lab[ib].tolist(), n, draws=20, rng=rng))
            for f in fpirs:
                th = table_a.threshold_for(f, n)
                split_checks.setdefault((n, f), []).append(float((mins <= th.threshold).mean()))
                split_clamped[n, f] = split_clamped.get((n, f), 0) + (th.clamped is not None)
    out_of_sample = [{"gallery_size": n, "fpir_target": f, "fpir_mean": float(np.mean(v)), "fpir_sd": float(np.std(v)),
                      "splits": len(v), "splits_clamped": split_clamped[n, f]}
                     for (n, f), v in sorted(split_checks.items())]
    ident = {**table.to_manifest(), "identities": n_people, "images": len(kept),
             "method": "independence: t_N = the impostor-distance quantile at FAR = 1 - (1 - FPIR)^(1/N), "
                       "N = enrolled faces searched",
             "gallery_check": {"columns": ["gallery_size", "fpir_target", "fpir_measured"],
                               "what": f"simulated galleries of calibration people ({draws} per size): the FPIR "
                                       "measured at the table's threshold",
                               "rows": [[c["gallery_size"], t["fpir_target"], round(t["fpir_empirical"], 5)]
                                        for c in checks for t in c["targets"] if t["fpir_target"] in (0.01, 0.1)]}}
    return {"model": name, "model_sha256": loaded.sha256, "pairs_file": str(pairs_file),
            "holdout_max_images": holdout_max_images,
            "identity_split": halves.summary(), "half": "calibration",
            "served_path": {"decode": "as an upload (the server's size and pixel limits)", "detector": "haar",
                            "haar": {"scale_factor": s.face_haar_scale_factor,
                                     "min_neighbors": s.face_haar_min_neighbors, "min_size": s.face_haar_min_size,
                                     "max_side": s.face_haar_max_side},
                            "face": "largest", "crop": {"size": loaded.crop_size, "margin": loaded.crop_margin,
                                                       "align": loaded.crop_align},
                            "flip_average": loaded.flip_average,
                            "no_face": "left out (the API refuses to enrol or search it)"},
            "identities": len(people), "images": len(files), "images_without_face": len(missed),
            "identities_with_a_face": n_people, "images_used": len(kept),
            "impostor_pairs": len(impostors),
            "impostor_distance": {"mean": float(impostors.mean()), "std": float(impostors.std()),
                                  "min": float(impostors.min())},
            "verification_threshold": loaded.threshold,
            "far_at_verification_threshold": float((impostors <= loaded.threshold).mean()),
            "table": table.to_manifest(),
            "gallery_check": {"what": "simulated galleries of calibration people: one random photo of each of N "
                                      "random people enrolled, every photo of the other people searched (strangers); "
                                      "the independence threshold's empirical FPIR, pooled over draws",
                              "seed": seed, "results": checks},
            "out_of_sample_check": {"what": "10 random halvings of the calibration people: the table of half A, "
                                            "the FPIR of its thresholds on 20 simulated galleries of half B each",
                                    "results": out_of_sample},
            "manifest_identification": ident,
            "selection": {"what": "for choosing between models on the calibration half: TAR at FAR over every "
                                  "same-person photo pair against every different-person pair, and the closed-set "
                                  "rank-1 / rank-5 of a gallery of each person's first photo searched with each "
                                  "person's second photo (photos in file order)",
                          **selection_metrics(dist, labels)},
            "seconds_embedding": round(seconds, 2)}


def cmd_calibrate_identification(args: argparse.Namespace) -> int:
    """Print (and with --out write) the identification calibration report of a face model."""
    result = calibrate_identification(args.model, Path(args.pairs), Path(args.data),
                                      holdout_max_images=args.holdout_max_images, batch_size=args.batch_size,
                                      draws=args.draws, seed=args.seed, source=args.source)
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m app.cli", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="start the API server")
    s.add_argument("--host", default=None)
    s.add_argument("--port", type=int, default=None)
    s.add_argument("--front-workers", type=int, default=None,
                   help="N HTTP processes in front of one model process (default: CNN_FRONT_WORKERS, 0: one process)")
    mh = sub.add_parser("model-host", help="the model process behind `serve --front-workers` (started by it)")
    mh.add_argument("--socket", default=None, help="Unix socket to listen on (default: CNN_MODEL_HOST_SOCKET)")
    mh.add_argument("--parent-pipe", action="store_true", help="stop when standard input closes (the parent died)")
    sub.add_parser("worker", help="run style-transfer jobs from the shared job store (no HTTP)")
    k = sub.add_parser("keygen", help="make an API key for a named principal (only its hash is stored)")
    k.add_argument("name")
    k.add_argument("--scopes", default="read,write", help="comma-separated: read, write, admin, metrics")
    k.add_argument("--file", default=None, help="append the principal to this keys file (CNN_API_KEYS_FILE)")
    f = sub.add_parser("fetch-weights", help="download official torchvision weights (needs internet)")
    f.add_argument("models", nargs="*", help="torchvision model names (default: the configured ImageNet models)")
    f.add_argument("--dest", default=None, help="target directory (default: the weights dir)")
    f.add_argument("--hub-cache", action="store_true", help="store in the torch hub cache instead")
    f.add_argument("--quiet", action="store_true", help="no progress bar")
    t = sub.add_parser("train", help="train a model (options after the target go to the trainer)")
    t.add_argument("what", choices=["images", "text", "faces", "ensemble"])
    e = sub.add_parser("evaluate", help="evaluate a classifier on an ImageFolder directory or on its hold-out")
    e.add_argument("model")
    e.add_argument("--data", default=None, help="ImageFolder directory (with --holdout: the model's training folder, "
                                                "default: the one its manifest entry records)")
    e.add_argument("--holdout", action="store_true",
                   help="only the images the model was validated on (the trainer's split, with the validation size "
                        "and seed of its manifest entry): reproduces its model card's numbers")
    e.add_argument("--test-split", action="store_true",
                   help="only the model's frozen test split (left out of its training and validation by the trainer; "
                        "models trained before it existed have none): a number to report once, never to choose by")
    e.add_argument("--batch-size", type=int, default=64)
    e.add_argument("--limit-per-class", type=int, default=0,
                   help="the first N images (of the hold-out or test split) per class")
    e.add_argument("--out", default=None, help="also write the JSON report to this file")
    et = sub.add_parser("evaluate-text", help="evaluate a text model on a CSV file (AG News layout by default) or on "
                                              "its hold-out")
    et.add_argument("model")
    et.add_argument("--csv", default=None)
    et.add_argument("--holdout", action="store_true",
                    help="instead of --csv: the rows the model was validated on, rebuilt by the trainer's split from "
                         "the files, sizes, seed and de-duplication rule of its manifest entry (the CSV options below "
                         "are then those of the manifest entry, AG News' layout when it records none)")
    et.add_argument("--data-dir", default=None,
                    help="with --holdout: the folder that now holds the model's training files (found by name)")
    et.add_argument("--text-columns", default="2,3", help="1-based positions (or names with --header)")
    et.add_argument("--label-column", default="1")
    et.add_argument("--header", action="store_true")
    et.add_argument("--label-base", type=int, default=1, help="number of the first class in numeric labels")
    et.add_argument("--limit", type=int, default=0, help="at most N rows (of the hold-out)")
    et.add_argument("--batch-size", type=int, default=64)
    bt = sub.add_parser("baseline-text", help="train and score a TF-IDF + logistic-regression baseline on exactly a "
                                              "text model's split (needs scikit-learn, a dev extra)")
    bt.add_argument("model", nargs="?", default="agnews-vdcnn9", help="the text model whose split to use")
    bt.add_argument("--out", default=None, help="write the JSON report here (default: print it)")
    bt.add_argument("--data-dir", default=None, help="the folder that now holds the model's training files")
    bt.add_argument("--C", type=float, default=16.0, help="logistic regression's inverse regularisation")
    bt.add_argument("--seed", type=int, default=0, help="logistic regression's random_state")
    bt.add_argument("--batch-size", type=int, default=64, help="batch size of the speed measurement (and the CNN's)")
    bt.add_argument("--compare", action=argparse.BooleanOptionalAction, default=True,
                    help="also score the model itself on the same hold-out (evaluate-text --holdout)")
    ef = sub.add_parser("evaluate-faces", help="verification metrics and threshold of a face model on a pair list "
                                               "(--split test: on held-out identities, as served)")
    ef.add_argument("model")
    ef.add_argument("--pairs", required=True, help="LFW-style pairs file (e.g. pairsDevTrain.txt)")
    ef.add_argument("--data", required=True, help="LFW-style image root (one folder per person)")
    ef.add_argument("--holdout-max-images", type=int, default=0,
                    help="keep only the pairs whose people have fewer images than this (the ones the shipped "
                         "model was not trained on: 5)")
    ef.add_argument("--limit", type=int, default=0,
                    help="at most N pairs (half same, half different; of each half with --split calibration/test)")
    ef.add_argument("--batch-size", type=int, default=64)
    ef.add_argument("--roc", default=None, help="write the ROC curve PNG here")
    ef.add_argument("--split", choices=["all", "calibration", "test"], default="all",
                    help="all: every pair, threshold fitted on them; calibration / test: the pairs of one half of the "
                         "identities (a salted hash of the name; pairs across the halves are dropped), scored at the "
                         "threshold fitted on the calibration half, pairs with a missed face counted as errors")
    ef.add_argument("--misses", choices=["error", "fallback"], default=None,
                    help="an image where the detector finds no face: error (no decision, as /faces/verify's 422; "
                         "the default with --split calibration/test) or the centred fallback box (the default with "
                         "--split all, as the training pipeline)")
    ef.add_argument("--criterion", choices=["balanced", "accuracy"], default="balanced",
                    help="what the served-path threshold maximises on the calibration pairs (misses as errors): "
                         "balanced accuracy (mean of true accept and true reject rates) or accuracy")
    ci = sub.add_parser("calibrate-identification",
                        help="impostor-distance table for FPIR-calibrated /faces/identify thresholds (the manifest's "
                             "`identification`), from the calibration half of the held-out identities")
    ci.add_argument("model")
    ci.add_argument("--pairs", required=True, help="LFW-style pairs file whose held-out people are split in halves")
    ci.add_argument("--data", required=True, help="LFW-style image root (one folder per person)")
    ci.add_argument("--holdout-max-images", type=int, default=5,
                    help="people of the pairs with fewer images than this are the held-out ones (the model's rule)")
    ci.add_argument("--batch-size", type=int, default=64)
    ci.add_argument("--draws", type=int, default=200, help="simulated galleries per size in the check")
    ci.add_argument("--seed", type=int, default=0)
    ci.add_argument("--source", default=None, help="the `source` recorded in the table (where the report is kept)")
    ci.add_argument("--out", default=None, help="also write the report here")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv[:1] == ["train"]:
        args, rest = parser.parse_known_args(argv)
        return cmd_train(args, rest)
    args = parser.parse_args(argv)
    handlers = {"serve": cmd_serve, "model-host": cmd_model_host, "worker": cmd_worker, "keygen": cmd_keygen,
                "fetch-weights": cmd_fetch_weights,
                "evaluate": cmd_evaluate,
                "evaluate-text": cmd_evaluate_text, "baseline-text": cmd_baseline_text,
                "evaluate-faces": cmd_evaluate_faces,
                "calibrate-identification": cmd_calibrate_identification}
    return handlers[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
