"""A TF-IDF + logistic-regression baseline for a trained text model, on exactly that model's split.

    python -m app.cli baseline-text agnews-vdcnn9 --out weights/reports/agnews-tfidf-baseline.json

What a user would try before a character CNN: TF-IDF features (word 1-2-grams, and in the second variant also
character 2-5-grams inside word boundaries, both with sublinear tf) and a multinomial logistic regression,
fitted on exactly the training rows of a text model's split and scored on exactly its hold-out. The split is
rebuilt by the trainer's own code (`models.train.text.holdout_split`) from the files, sizes, seed and
de-duplication rule of the model's manifest entry, as `evaluate-text --holdout` does, and refused when the
files or sizes differ. For a model trained before the near-duplicate rule (no training.dedup), the hold-out
as validated and the de-duplicated hold-out (its rows without a near-duplicate in training) are both scored,
as for the CNN.

scikit-learn is a development extra (``pip install -e '.[dev]'``), never a dependency of the service: it is
imported only inside the functions that need it. The hyper-parameters are fixed in `BaselineConfig`; C = 16
was chosen on a de-duplicated 1,500-row split of the model's training rows (C in 1, 4, 16), never on the
hold-out.
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from models.train.common import confusion_matrix
from models.train.text import (
    DEDUP_RULE,
    TextHoldout,
    TextSplit,
    holdout_split,
    near_duplicate_mask,
    per_class_metrics,
)

VARIANTS = ("words", "words+chars")
MISSING_SKLEARN = ("scikit-learn is not installed: the TF-IDF baseline needs it. It is a development extra, not a "
                   "service dependency: `.venv/bin/pip install --require-hashes --no-deps -r requirements.lock` "
                   "(the lock includes the dev extra) or `pip install -e '.[dev]'`")


@dataclass(frozen=True)
class BaselineConfig:
    """The baseline's fixed hyper-parameters (recorded in its report)."""

    word_ngrams: tuple[int, int] = (1, 2)
    char_ngrams: tuple[int, int] = (2, 5)
    char_analyzer: str = "char_wb"  # character n-grams inside word boundaries (padded with a space)
    sublinear_tf: bool = True
    lowercase: bool = True
    min_df: int = 1
    C: float = 16.0  # inverse L2 regularisation; chosen on a split of the training rows, not on the hold-out
    max_iter: int = 1000
    solver: str = "lbfgs"
    seed: int = 0


def require_sklearn() -> str:
    """scikit-learn's version, or SystemExit with how to install it."""
    try:
        import sklearn
    except ImportError:
        raise SystemExit(MISSING_SKLEARN) from None
    return str(sklearn.__version__)


def make_pipeline(variant: str, config: BaselineConfig) -> Any:
    """An unfitted scikit-learn pipeline: TF-IDF features of the variant, then logistic regression."""
    require_sklearn()
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import FeatureUnion, Pipeline

    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r} (known: {', '.join(VARIANTS)})")
    features = [("words", TfidfVectorizer(analyzer="word", ngram_range=config.word_ngrams, lowercase=config.lowercase,
                                          sublinear_tf=config.sublinear_tf, min_df=config.min_df, dtype=np.float32))]
    if variant == "words+chars":
        features.append(("chars", TfidfVectorizer(analyzer=config.char_analyzer, ngram_range=config.char_ngrams,
                                                  lowercase=config.lowercase, sublinear_tf=config.sublinear_tf,
                                                  min_df=config.min_df, dtype=np.float32)))
    classifier = LogisticRegression(C=config.C, solver=config.solver, max_iter=config.max_iter,
                                    random_state=config.seed)
    return Pipeline([("tfidf", FeatureUnion(features)), ("logreg", classifier)])


def out_of_fold_probabilities(texts: list[str], labels: np.ndarray, num_classes: int, folds: int,
                              config: BaselineConfig | None = None, variant: str = "words+chars") -> np.ndarray:
    """Class probabilities of the baseline for every row, each from a pipeline fitted on the other folds
    (stratified, seeded by config.seed): what a teacher can give a student for its own training rows without
    having seen them."""
    require_sklearn()
    from sklearn.model_selection import StratifiedKFold

    if folds < 2:
        raise ValueError(f"out-of-fold probabilities need at least 2 folds, got {folds}")
    config = config or BaselineConfig()
    labels = np.asarray(labels)
    probs = np.zeros((len(texts), num_classes), dtype=np.float32)
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=config.seed)
    for fit_idx, pred_idx in splitter.split(np.zeros(len(labels)), labels):
        pipeline = make_pipeline(variant, config)
        pipeline.fit([texts[i] for i in fit_idx], labels[fit_idx])
        p = pipeline.predict_proba([texts[i] for i in pred_idx])
        probs[np.ix_(pred_idx, np.asarray(pipeline.classes_, dtype=np.int64))] = p
    return probs


def scores(target: np.ndarray, pred: np.ndarray, classes: list[str]) -> dict[str, Any]:
    """Accuracy (with its counts), macro F1, per-class accuracy (= recall), precision/recall/F1 and the
    confusion matrix (rows true, columns predicted)."""
    cm = confusion_matrix(target, pred, len(classes))
    per_class = per_class_metrics(cm, classes)
    correct = int((pred == target).sum())
    return {"texts": len(target), "accuracy": correct / len(target) if len(target) else 0.0, "correct": correct,
            "total": len(target), "macro_f1": float(np.mean([m["f1"] for m in per_class.values()])),
            "per_class_accuracy": {c: m["recall"] for c, m in per_class.items()}, "per_class": per_class,
            "confusion_matrix": cm.tolist()}


def prediction_speed(pipeline: Any, texts: list[str], batch_sizes: tuple[int, ...]) -> dict[str, Any]:
    """Texts/s of pipeline.predict over the texts, one pass per batch size (vectorising + classifier, one
    process, scikit-learn's default threads)."""
    out: dict[str, Any] = {}
    pipeline.predict(texts[:8])  # warm-up
    for b in batch_sizes:
        t0 = time.perf_counter()
        for i in range(0, len(texts), b):
            pipeline.predict(texts[i : i + b])
        seconds = time.perf_counter() - t0
        out[str(b)] = {"texts": len(texts), "seconds": round(seconds, 3),
                       "texts_per_second": round(len(texts) / seconds, 1) if seconds else None}
    return out


def train_and_score(split: TextSplit, classes: list[str], keep: np.ndarray | None, variant: str,
                    config: BaselineConfig, batch_sizes: tuple[int, ...]) -> dict[str, Any]:
    """Fit one variant on the split's training rows; its scores on the hold-out (as validated, and without the
    rows that have a near-duplicate in training when keep is given) and its prediction speed."""
    pipeline = make_pipeline(variant, config)
    t0 = time.perf_counter()
    pipeline.fit(split.train_texts, split.y_train)
    fit_seconds = time.perf_counter() - t0
    pred = np.asarray(pipeline.predict(split.val_texts))
    logreg = pipeline.named_steps["logreg"]
    n_features = int(logreg.coef_.shape[1])
    result: dict[str, Any] = {"features": n_features, "fit_seconds": round(fit_seconds, 1),
                              "iterations": int(np.max(logreg.n_iter_))}
    if keep is not None:
        result["holdout_as_validated"] = scores(split.y_val, pred, classes)
        result["deduplicated_holdout"] = scores(split.y_val[keep], pred[keep], classes)
    else:
        result["deduplicated_holdout"] = scores(split.y_val, pred, classes)
    result["prediction_speed"] = prediction_speed(pipeline, split.val_texts, batch_sizes)
    return result


def split_summary(holdout: TextHoldout, split: TextSplit, near: np.ndarray) -> dict[str, Any]:
    """Where the rows came from and how they were split (as in evaluate-text --holdout's report)."""
    overlap = len(set(split.val_texts) & set(split.train_texts))
    return {"files": [str(p) for p in holdout.files], "val_size": holdout.val_size, "seed": holdout.seed,
            "val_from": str(holdout.files[0]) if holdout.val_from_first else "all",
            "train_rows": len(split.train_texts), "val_rows": len(split.val_texts),
            "dedup": DEDUP_RULE if holdout.dedup else None,
            "val_rows_with_near_duplicate_in_training": int(near.sum()),
            "holdout_texts_also_in_training": overlap,
            "split": "models.train.text.holdout_split: the trainer's split_rows"}


def run_baseline(holdout: TextHoldout, classes: list[str], *, config: BaselineConfig | None = None,
                 variants: tuple[str, ...] = VARIANTS, batch_sizes: tuple[int, ...] = (1, 64)) -> dict[str, Any]:
    """The baseline report for a text model's split: every variant trained on exactly its training rows and
    scored on exactly its hold-out. Refuses (SystemExit) when scikit-learn is missing or the split cannot be
    rebuilt."""
    version = require_sklearn()
    config = config or BaselineConfig()
    t0 = time.perf_counter()
    split = holdout_split(holdout, classes)
    near = near_duplicate_mask(split.val_keys, split.train_keys)
    info = split_summary(holdout, split, near)
    if info["holdout_texts_also_in_training"]:
        raise SystemExit(f"{info['holdout_texts_also_in_training']} hold-out texts are also training texts: "
                         "not a clean split")
    keep = None if holdout.dedup else ~near
    info["scored"] = ("deduplicated_holdout: the hold-out as validated minus its rows that have a near-duplicate in "
                      f"training ({DEDUP_RULE!r} rule); holdout_as_validated: all of it" if keep is not None
                      else "deduplicated_holdout: the model's hold-out, which has no near-duplicate in training")
    results = {v: train_and_score(split, classes, keep, v, config, batch_sizes) for v in variants}
    return {
        "baseline": "TF-IDF + logistic regression (scikit-learn)",
        "features": {"words": f"word {config.word_ngrams[0]}-{config.word_ngrams[1]}-grams",
                     "words+chars": f"word {config.word_ngrams[0]}-{config.word_ngrams[1]}-grams + character "
                                    f"{config.char_ngrams[0]}-{config.char_ngrams[1]}-grams ({config.char_analyzer})"},
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()},
        "labels": classes, "split": info, "variants": results,
        "seconds": round(time.perf_counter() - t0, 1),
        "environment": {"scikit_learn": version, "numpy": np.__version__, "python": platform.python_version(),
                        "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count()},
    }
