"""Verification metrics on labelled pairs: ROC, AUC, TAR at a FAR, 10-fold accuracy, the threshold.

The decision rule is FaceNet's: same person when the squared L2 distance of the two unit embeddings
is at most the threshold tau. The 10-fold protocol is LFW's: the threshold is chosen on nine folds
(highest accuracy) and the accuracy measured on the tenth.
"""

from __future__ import annotations

from collections.abc import Callable
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
    tau, correct = _best_weighted(dist, np.asarray(same, dtype=bool), 1, 1)
    return tau, float(correct / len(dist))


def _best_weighted(dist: np.ndarray, same: np.ndarray, w_same: int, w_diff: int) -> tuple[float, int]:
    """(tau, score) maximising w_same * (same pairs accepted) + w_diff * (different pairs rejected); integer
    weights keep ties exact; ties take the middle of the best run."""
    cands = _candidates(dist)
    order = np.argsort(dist, kind="stable")
    d_sorted, s_sorted = dist[order], same[order]
    # matches at threshold t: all pairs with dist <= t; correct = same among them + different beyond
    k = np.searchsorted(d_sorted, cands, side="right")
    cum_same = np.concatenate([[0], np.cumsum(s_sorted)])
    n_diff = int((~same).sum())
    cum_diff = np.arange(len(d_sorted) + 1) - cum_same
    correct = w_same * cum_same[k] + w_diff * (n_diff - cum_diff[k])
    best = correct.max()
    idx = np.flatnonzero(correct == best)
    mid = idx[len(idx) // 2]
    return float(cands[mid]), int(best)


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


def _stratified_folds(same: np.ndarray, folds: int) -> list[np.ndarray]:
    """Pair indices of each fold: part i of the same pairs and part i of the different pairs (contiguous)."""
    s_parts = np.array_split(np.flatnonzero(same), folds)
    d_parts = np.array_split(np.flatnonzero(~same), folds)
    parts = [np.concatenate([a, b]) for a, b in zip(s_parts, d_parts, strict=True)]
    parts = [p for p in parts if len(p)]  # fewer pairs than folds: no empty folds (their accuracy is undefined)
    if len(parts) < 2:
        raise ValueError(f"k-fold accuracy needs at least 2 pairs, got {len(same)}")
    return parts


def kfold_accuracy(dist: np.ndarray, same: np.ndarray, folds: int = 10) -> dict[str, Any]:
    """LFW-style k-fold accuracy: threshold picked on k-1 folds, accuracy on the held-out fold.
    Folds are stratified and deterministic: the same-person pairs and the different-person pairs are
    each cut, in their given order, into k contiguous parts, and fold i joins part i of both."""
    dist = np.asarray(dist, dtype=np.float64)
    same = np.asarray(same, dtype=bool)
    parts = _stratified_folds(same, folds)
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


# ---------------------------------------------------------------------------- the served path: missed faces
# On the served path a pair with no detected face in one of its images gets no decision at all: /faces/verify
# answers 422 "no face found", neither match nor no-match. Such a pair has the distance NaN here. It is counted
# separately (the miss rate) and, in the headline accuracy, as an error whatever the truth, because the service
# did not give the right answer; a client that reads the 422 as "not the same person" gets
# `accuracy_misses_as_rejects` instead, which flatters different-person pairs.


def found(dist: np.ndarray) -> np.ndarray:
    """Which pairs have a distance (both faces found)."""
    return ~np.isnan(np.asarray(dist, dtype=np.float64))


def _ratio(num: float, den: float) -> float | None:
    return float(num / den) if den else None


def _balanced(accepted_same: int, n_same: int, rejected_diff: int, n_diff: int) -> float | None:
    """The mean of the true accept rate and the true reject rate (None without both kinds of pair)."""
    return float((accepted_same / n_same + rejected_diff / n_diff) / 2.0) if n_same and n_diff else None


def served_accuracy(dist: np.ndarray, same: np.ndarray, tau: float) -> dict[str, Any]:
    """Decisions at tau when pairs with a missed face (NaN) get none: accuracy counting them as errors, among the
    pairs with both faces found, and counting them as rejects; TAR and FAR over all pairs (a miss is never an
    accept) and among found pairs."""
    dist = np.asarray(dist, dtype=np.float64)
    same = np.asarray(same, dtype=bool)
    ok = found(dist)
    accept = ok & (np.nan_to_num(dist, nan=np.inf) <= tau)
    right = ok & (accept == same)
    n_same, n_diff = int(same.sum()), int((~same).sum())
    ok_same, ok_diff = int((ok & same).sum()), int((ok & ~same).sum())
    ta, fa = int((accept & same).sum()), int((accept & ~same).sum())
    return {"threshold": float(tau), "pairs": len(dist), "pairs_found": int(ok.sum()),
            "accuracy_misses_as_errors": _ratio(int(right.sum()), len(dist)),
            "accuracy_among_found": _ratio(int(right.sum()), int(ok.sum())),
            "accuracy_misses_as_rejects": _ratio(int(right.sum()) + int((~ok & ~same).sum()), len(dist)),
            "balanced_accuracy_misses_as_errors": _balanced(ta, n_same, ok_diff - fa, n_diff),
            "tar": _ratio(ta, n_same), "far": _ratio(fa, n_diff),
            "tar_among_found": _ratio(ta, ok_same), "far_among_found": _ratio(fa, ok_diff),
            "true_accepts": ta, "false_accepts": fa, "false_rejects_found": ok_same - ta,
            "missed_same": n_same - ok_same, "missed_different": n_diff - ok_diff}


CRITERIA = ("accuracy", "balanced")


def served_threshold(dist: np.ndarray, same: np.ndarray, criterion: str = "accuracy") -> tuple[float, float]:
    """(tau, score) with the best score counting misses as errors: 'accuracy' over the pairs as given, or
    'balanced' (the mean of TAR and true reject rate, i.e. accuracy on a list with as many same as different
    pairs, whatever this one's mix). A missed pair is wrong at every threshold, so only found pairs move tau."""
    dist = np.asarray(dist, dtype=np.float64)
    same = np.asarray(same, dtype=bool)
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, not {criterion!r}")
    ok = found(dist)
    if not ok.any():
        raise ValueError("no pair has both faces found: no threshold can be calibrated")
    n_same, n_diff = int(same.sum()), int((~same).sum())
    # balanced: each same pair weighs 1 / n_same and each different pair 1 / n_diff (scaled to integers)
    w_same, w_diff = (max(1, n_diff), max(1, n_same)) if criterion == "balanced" else (1, 1)
    tau, _ = _best_weighted(dist[ok], same[ok], w_same, w_diff)
    at = served_accuracy(dist, same, tau)
    key = "balanced_accuracy_misses_as_errors" if criterion == "balanced" else "accuracy_misses_as_errors"
    return tau, float(at[key] or 0.0)


def served_kfold_accuracy(dist: np.ndarray, same: np.ndarray, folds: int = 10) -> dict[str, Any]:
    """k-fold accuracy with misses as errors: stratified folds over all pairs (as kfold_accuracy), the threshold
    chosen on the found pairs of k-1 folds, accuracy on every pair of the k-th."""
    dist = np.asarray(dist, dtype=np.float64)
    same = np.asarray(same, dtype=bool)
    accs, taus = [], []
    for i, test in enumerate(parts := _stratified_folds(same, folds)):
        train = np.concatenate([p for j, p in enumerate(parts) if j != i])
        if found(dist[train]).any():
            tau: float | None = served_threshold(dist[train], same[train])[0]
        else:  # nothing to choose a threshold on: every pair of the fold is rejected
            tau = None
        taus.append(tau)
        at = served_accuracy(dist[test], same[test], -1.0 if tau is None else tau)
        accs.append(float(at["accuracy_misses_as_errors"] or 0.0))
    return {"folds": len(parts), "mean": float(np.mean(accs)), "std": float(np.std(accs)),
            "per_fold": accs, "thresholds": taus}


def served_tar_at_far(dist: np.ndarray, same: np.ndarray, target_far: float) -> dict[str, Any]:
    """The highest TAR whose FAR is at most target_far, among found pairs and over all pairs (a miss is never
    accepted), with the number of different-person pairs behind each FAR (its resolution is 1 / negatives)."""
    dist = np.asarray(dist, dtype=np.float64)
    same = np.asarray(same, dtype=bool)
    ok = found(dist)
    far, tar, th = roc_curve(dist[ok], same[ok])
    n_same, n_diff = int(same.sum()), int((~same).sum())
    ok_same, ok_diff = int((ok & same).sum()), int((ok & ~same).sum())

    def pick(far_: np.ndarray, tar_: np.ndarray, negatives: int) -> dict[str, Any]:
        good = np.flatnonzero(far_ <= target_far + 1e-12)
        i = good[np.argmax(tar_[good])] if len(good) else 0
        return {"tar": float(tar_[i]), "far": float(far_[i]), "threshold": float(th[i]), "negatives": negatives,
                "false_accepts": round(float(far_[i]) * negatives),
                "false_accepts_allowed": int(np.floor(target_far * negatives + 1e-9))}

    return {"far_target": target_far,
            "among_found": pick(far, tar, ok_diff),
            "all_pairs": pick(far * ok_diff / max(1, n_diff), tar * ok_same / max(1, n_same), n_diff)}


def _or_none(metric: Callable[[], dict[str, Any]]) -> dict[str, Any] | None:
    """A k-fold metric, or None when the pairs cannot make two folds (or no fold has a found pair to fit)."""
    try:
        return metric()
    except ValueError:
        return None


def served_report(dist: np.ndarray, same: np.ndarray, tau: float, folds: int = 10) -> dict[str, Any]:
    """Everything about a served-path run at a threshold chosen elsewhere: decisions at tau, k-fold accuracy
    (misses as errors and among found pairs), ROC AUC and TAR at FAR 1e-2 / 1e-3 (among found pairs), and what a
    threshold fitted on these very pairs would give (optimistic, for comparison only)."""
    dist = np.asarray(dist, dtype=np.float64)
    same = np.asarray(same, dtype=bool)
    ok = found(dist)
    enough = int(ok.sum()) >= 2
    far, tar, _ = roc_curve(dist[ok], same[ok]) if enough else (None, None, None)
    in_sample = served_threshold(dist, same) if ok.any() else None
    return {"pairs": len(dist), "same_pairs": int(same.sum()), "different_pairs": int((~same).sum()),
            "pairs_with_a_miss": {"same": int((~ok & same).sum()), "different": int((~ok & ~same).sum())},
            "pair_miss_rate": _ratio(int((~ok).sum()), len(dist)),
            "at_threshold": served_accuracy(dist, same, tau),
            "kfold_accuracy_misses_as_errors": (_or_none(lambda: served_kfold_accuracy(dist, same, folds))
                                                if enough else None),
            "kfold_accuracy_among_found": (_or_none(lambda: kfold_accuracy(dist[ok], same[ok], folds))
                                           if enough else None),
            "roc_auc_among_found": auc(far, tar) if far is not None and tar is not None else None,
            "tar_at_far": [served_tar_at_far(dist, same, f) for f in (1e-2, 1e-3)] if enough else None,
            "in_sample_best": ({"threshold": in_sample[0], "accuracy_misses_as_errors": in_sample[1]}
                               if in_sample else None)}


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
