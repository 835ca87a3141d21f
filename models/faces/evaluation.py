"""Verification metrics on labelled pairs: ROC, AUC, TAR at a FAR, 10-fold accuracy, the threshold.

The decision rule is FaceNet's: same person when the squared L2 distance of the two unit embeddings
is at most the threshold tau. The 10-fold protocol is LFW's: the threshold is chosen on nine folds
(highest accuracy) and the accuracy measured on the tenth.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


def _candidates(dist: np.ndarray) -> np.ndarray:
    """Thresholds between consecutive distinct distances (plus both ends)."""
    u = np.unique(dist)
    mids = (u[:-1] + u[1:]) / 2.0 if len(u) > 1 else u
    return np.concatenate([[u[0] - 1e-6], mids, [u[-1] + 1e-6]])


def accuracy_at(dist: np.ndarray, same: np.ndarray, tau: float) -> float:
    """Fraction of pairs decided correctly with threshold tau (match when dist <= tau)."""
    return float(((dist <= tau) == same).mean())


def best_threshold(dist: np.ndarray, same: np.ndarray) -> tuple[float, float]:
    """(tau, accuracy) maximising accuracy on these pairs; ties take the middle of the best run."""
    dist = np.asarray(dist, dtype=np.float64)
    same = np.asarray(same, dtype=bool)
    cands = _candidates(dist)
    order = np.argsort(dist, kind="stable")
    d_sorted, s_sorted = dist[order], same[order]
    # matches at threshold t: all pairs with dist <= t; correct = same among them + different beyond
    k = np.searchsorted(d_sorted, cands, side="right")
    cum_same = np.concatenate([[0], np.cumsum(s_sorted)])
    n_diff = int((~same).sum())
    cum_diff = np.arange(len(d_sorted) + 1) - cum_same
    correct = cum_same[k] + (n_diff - cum_diff[k])
    best = correct.max()
    idx = np.flatnonzero(correct == best)
    mid = idx[len(idx) // 2]
    return float(cands[mid]), float(best / len(dist))


def roc_curve(dist: np.ndarray, same: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(far, tar, thresholds) as the threshold sweeps from below the smallest to above the largest distance."""
    dist = np.asarray(dist, dtype=np.float64)
    same = np.asarray(same, dtype=bool)
    cands = _candidates(dist)
    n_same, n_diff = max(1, int(same.sum())), max(1, int((~same).sum()))
    d_same, d_diff = np.sort(dist[same]), np.sort(dist[~same])
    tar = np.searchsorted(d_same, cands, side="right") / n_same
    far = np.searchsorted(d_diff, cands, side="right") / n_diff
    return far, tar, cands


def auc(far: np.ndarray, tar: np.ndarray) -> float:
    """Area under the ROC curve (trapezoids)."""
    far, tar = np.asarray(far, dtype=np.float64), np.asarray(tar, dtype=np.float64)
    return float(np.sum(np.diff(far) * (tar[1:] + tar[:-1]) / 2.0))


def tar_at_far(dist: np.ndarray, same: np.ndarray, target_far: float) -> dict[str, float]:
    """The highest TAR whose FAR does not exceed target_far, with its threshold and actual FAR."""
    far, tar, th = roc_curve(dist, same)
    ok = np.flatnonzero(far <= target_far)
    i = ok[np.argmax(tar[ok])] if len(ok) else 0
    return {"far_target": target_far, "tar": float(tar[i]), "far": float(far[i]), "threshold": float(th[i])}


def kfold_accuracy(dist: np.ndarray, same: np.ndarray, folds: int = 10) -> dict[str, Any]:
    """LFW-style k-fold accuracy: threshold picked on k-1 folds, accuracy on the held-out fold.
    Folds are stratified and deterministic: the same-person pairs and the different-person pairs are
    each cut, in their given order, into k contiguous parts, and fold i joins part i of both."""
    dist = np.asarray(dist, dtype=np.float64)
    same = np.asarray(same, dtype=bool)
    s_parts = np.array_split(np.flatnonzero(same), folds)
    d_parts = np.array_split(np.flatnonzero(~same), folds)
    parts = [np.concatenate([a, b]) for a, b in zip(s_parts, d_parts, strict=True)]
    parts = [p for p in parts if len(p)]  # fewer pairs than folds: no empty folds (their accuracy is undefined)
    if len(parts) < 2:
        raise ValueError(f"k-fold accuracy needs at least 2 pairs, got {len(dist)}")
    accs, taus = [], []
    for i, test in enumerate(parts):
        train = np.concatenate([p for j, p in enumerate(parts) if j != i])
        tau, _ = best_threshold(dist[train], same[train])
        taus.append(tau)
        accs.append(accuracy_at(dist[test], same[test], tau))
    return {"folds": len(parts), "mean": float(np.mean(accs)), "std": float(np.std(accs)),
            "per_fold": [float(a) for a in accs], "thresholds": [float(t) for t in taus]}


@dataclass
class PairReport:
    """Everything the model card and the manifest quote about a verification run."""

    pairs: int
    same: int
    kfold: dict[str, Any]
    auc: float
    threshold: float
    accuracy_at_threshold: float
    tar_at_far: list[dict[str, float]]

    def to_dict(self) -> dict[str, Any]:
        return {"pairs": self.pairs, "same_pairs": self.same, "kfold_accuracy": self.kfold, "roc_auc": self.auc,
                "threshold": self.threshold, "accuracy_at_threshold": self.accuracy_at_threshold,
                "tar_at_far": self.tar_at_far}


def evaluate_pairs(dist: np.ndarray, same: np.ndarray, folds: int = 10) -> PairReport:
    """The full verification report for pair distances."""
    dist = np.asarray(dist, dtype=np.float64)
    same = np.asarray(same, dtype=bool)
    far, tar, _ = roc_curve(dist, same)
    tau, acc = best_threshold(dist, same)
    return PairReport(pairs=len(dist), same=int(same.sum()), kfold=kfold_accuracy(dist, same, folds),
                      auc=auc(far, tar), threshold=tau, accuracy_at_threshold=acc,
                      tar_at_far=[tar_at_far(dist, same, f) for f in (1e-2, 1e-3)])


def plot_roc(dist: np.ndarray, same: np.ndarray, path: Path, title: str) -> None:
    """Save the ROC curve (TAR against FAR, log FAR axis) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    far, tar, _ = roc_curve(dist, same)
    fig, axes = plt.subplots(1, 2, figsize=(9, 4))
    axes[0].plot(far, tar)
    axes[0].plot([0, 1], [0, 1], ls=":", c="grey")
    axes[0].set_xlabel("false accept rate")
    axes[0].set_ylabel("true accept rate")
    axes[0].set_title(f"ROC (AUC {auc(far, tar):.3f})")
    pos = far > 0
    axes[1].semilogx(far[pos], tar[pos])
    axes[1].set_xlabel("false accept rate (log)")
    axes[1].set_ylabel("true accept rate")
    axes[1].set_xlim(1e-3, 1)
    axes[1].grid(True, which="both", ls=":")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
