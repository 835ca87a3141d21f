"""Open-set identification (1:N): thresholds calibrated for a false-positive identification rate, and its metrics.

A search compares a probe with every enrolled face and answers the nearest subject when its squared L2 distance
is at most a threshold t. For a stranger (someone never enrolled) that is a false positive identification; its
probability for a gallery of N faces is FPIR(t, N) = P(min over the N faces of the stranger's distance <= t).
With the per-comparison false accept rate FAR(t) = P(impostor distance <= t), treating the N comparisons as
independent gives FPIR = 1 - (1 - FAR(t))^N, so the threshold for a target FPIR is the impostor-distance quantile
at FAR = 1 - (1 - FPIR)^(1/N).

That independence answer is an upper bound on the FPIR of a gallery of people drawn at random: given the probe,
the gallery's faces are independent draws, so P(min <= t | probe) = 1 - (1 - FAR_probe(t))^N exactly, and the
average over probes of this concave function of FAR_probe is at most its value at the average FAR (Jensen). Probes
that look like many people (and galleries of correlated faces) therefore only make the real FPIR lower than the
target: the threshold errs on the strict side. `simulate_galleries` measures how much, on real embeddings.

The model's manifest entry carries the impostor-distance quantiles (`ImpostorTable`); the service interpolates the
threshold for the current gallery size from them and refuses to extrapolate below the smallest FAR the table
supports (it clamps to the strictest calibrated threshold and says so).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

# quarter decades: 10^-0.25 (0.56) down to the smallest FAR the data supports
QUANTILE_STEP = 0.25
MIN_TAIL_PAIRS = 10  # a quantile needs at least this many impostor pairs at or below it


# ------------------------------------------------------------------------------------------ FAR <-> FPIR

def far_for_fpir(fpir: float, n: int) -> float:
    """The per-comparison FAR at which N independent comparisons give a false positive with probability fpir."""
    if not 0.0 < fpir < 1.0:
        raise ValueError(f"fpir must be between 0 and 1, not {fpir}")
    return float(-math.expm1(math.log1p(-fpir) / max(1, n)))


def fpir_for_far(far: float, n: int) -> float:
    """1 - (1 - far)^N: the FPIR of N independent comparisons that each falsely accept with probability far."""
    if far >= 1.0:
        return 1.0
    return float(-math.expm1(max(1, n) * math.log1p(-max(0.0, far))))


# ------------------------------------------------------------------------------------------ impostor table

@dataclass(frozen=True)
class IdentificationThreshold:
    """The threshold for a target FPIR at a gallery size, and whether the table had to be clamped."""

    threshold: float
    fpir: float  # the target
    gallery_size: int
    far: float  # the per-comparison FAR the target needs
    clamped: str | None  # None, 'strictest' (needed a FAR below the table) or 'most-lenient' (above it)
    fpir_expected: float  # the FPIR the table predicts at `threshold` (the target unless clamped)


@dataclass(frozen=True)
class ImpostorTable:
    """Impostor-distance quantiles: FAR(d) = P(impostor squared L2 distance <= d), as (far, distance) rows with the
    FAR strictly decreasing; interpolated linearly in log10(FAR)."""

    quantiles: tuple[tuple[float, float], ...]
    pairs: int
    source: str | None = None

    def __post_init__(self) -> None:
        rows = self.quantiles
        if len(rows) < 2:
            raise ValueError("impostor_quantiles needs at least two [far, distance] rows")
        for far, d in rows:
            if not (0.0 < far < 1.0 and math.isfinite(far)):
                raise ValueError(f"impostor_quantiles: FAR {far!r} is not between 0 and 1")
            if not (0.0 <= d <= 4.0 and math.isfinite(d)):
                raise ValueError(f"impostor_quantiles: distance {d!r} is not a squared L2 distance of unit vectors "
                                 "(0 to 4)")
        if any(b[0] >= a[0] for a, b in itertools.pairwise(rows)):
            raise ValueError("impostor_quantiles: FAR must decrease strictly from row to row")
        if any(b[1] > a[1] for a, b in itertools.pairwise(rows)):
            raise ValueError("impostor_quantiles: distances must not increase as the FAR decreases")
        if self.pairs < 1:
            raise ValueError("impostor_pairs must be a positive count")
        if rows[-1][0] * self.pairs < 1.0 - 1e-9:
            raise ValueError(f"impostor_quantiles: FAR {rows[-1][0]} is below one pair in {self.pairs}: "
                             "not measurable")

    @classmethod
    def from_manifest(cls, entry: Mapping[str, Any]) -> ImpostorTable:
        """From a manifest entry's `identification` object; ValueError naming what is wrong."""
        if not isinstance(entry, Mapping):
            raise ValueError("identification must be an object with impostor_quantiles and impostor_pairs")
        rows = entry.get("impostor_quantiles")
        pairs = entry.get("impostor_pairs")
        if not isinstance(rows, list) or not all(
                isinstance(r, list | tuple) and len(r) == 2 and all(isinstance(v, int | float) and
                                                                   not isinstance(v, bool) for v in r)
                for r in rows):
            raise ValueError("identification.impostor_quantiles must be a list of [far, distance] number pairs")
        if not isinstance(pairs, int) or isinstance(pairs, bool):
            raise ValueError("identification.impostor_pairs must be an integer")
        source = entry.get("source")
        return cls(tuple((float(f), float(d)) for f, d in rows), pairs, str(source) if source is not None else None)

    def to_manifest(self) -> dict[str, Any]:
        return {"impostor_quantiles": [[f, d] for f, d in self.quantiles], "impostor_pairs": self.pairs,
                **({"source": self.source} if self.source else {})}

    @property
    def far_min(self) -> float:
        return self.quantiles[-1][0]

    @property
    def far_max(self) -> float:
        return self.quantiles[0][0]

    def distance_at(self, far: float) -> float:
        """The impostor distance quantile at `far` (within the table's range; clamped to its ends outside)."""
        fars = np.log10([f for f, _ in self.quantiles][::-1])  # increasing for np.interp
        dists = [d for _, d in self.quantiles][::-1]
        return float(np.interp(math.log10(max(far, 1e-300)), fars, dists))

    def far_at(self, distance: float) -> float | None:
        """FAR at a distance by the table, or None outside the distances it covers."""
        dists = [d for _, d in self.quantiles][::-1]
        if not dists[0] <= distance <= dists[-1]:
            return None
        fars = np.log10([f for f, _ in self.quantiles][::-1])
        # distances may repeat (flat runs): np.interp needs increasing x, so take the last FAR of a run
        xs: list[float] = []
        ys: list[float] = []
        for d, f in zip(dists, fars, strict=True):
            if xs and d == xs[-1]:
                ys[-1] = f
            else:
                xs.append(d)
                ys.append(f)
        return float(10 ** np.interp(distance, xs, ys))

    def fpir_at(self, distance: float, n: int) -> float | None:
        """The FPIR the table predicts at a threshold for a gallery of N faces (None outside the table)."""
        far = self.far_at(distance)
        return None if far is None else fpir_for_far(far, n)

    def threshold_for(self, fpir: float, gallery_size: int) -> IdentificationThreshold:
        """The threshold at which a stranger is falsely identified with probability fpir in a gallery of N faces
        (independent comparisons: FAR = 1 - (1 - fpir)^(1/N)); never extrapolated beyond the table."""
        n = max(1, gallery_size)
        far = far_for_fpir(fpir, n)
        clamped: str | None = None
        if far < self.far_min * (1 - 1e-9):
            clamped, used = "strictest", self.far_min
        elif far > self.far_max * (1 + 1e-9):
            clamped, used = "most-lenient", self.far_max
        else:
            used = far
        t = self.distance_at(used)
        return IdentificationThreshold(threshold=t, fpir=fpir, gallery_size=gallery_size, far=far, clamped=clamped,
                                       fpir_expected=fpir if clamped is None else fpir_for_far(used, n))


def far_levels(pairs: int, *, step: float = QUANTILE_STEP, min_tail_pairs: int = MIN_TAIL_PAIRS) -> list[float]:
    """FAR levels 10^-step, 10^-2step, ... down to the smallest with at least min_tail_pairs pairs at or below."""
    out: list[float] = []
    j = 1
    while True:
        far = 10.0 ** (-j * step)
        if math.floor(far * pairs + 1e-9) < min_tail_pairs:
            return out
        out.append(far)
        j += 1


def quantile_table(distances: np.ndarray, *, step: float = QUANTILE_STEP, min_tail_pairs: int = MIN_TAIL_PAIRS,
                   source: str | None = None) -> ImpostorTable:
    """The impostor table of these distances: at each FAR level f, with k = floor(f * n) pairs allowed, the
    midpoint between the k-th and (k+1)-th smallest distance, so that the measured FAR at the distance is k / n <= f."""
    d = np.sort(np.asarray(distances, dtype=np.float64))
    d = d[np.isfinite(d)]
    n = len(d)
    levels = far_levels(n, step=step, min_tail_pairs=min_tail_pairs)
    if len(levels) < 2:
        raise ValueError(f"{n} impostor distances are too few for a table (need {min_tail_pairs} pairs below "
                         f"FAR {10 ** (-2 * step):.3g})")
    rows = []
    for level in levels:
        f = float(f"{level:.4g}")  # the FAR as written in the table: k is counted from it
        k = math.floor(f * n + 1e-9)
        t = (d[k - 1] + d[k]) / 2.0 if k < n else d[-1]
        rows.append((f, round(float(t), 5)))
    # rounding can break strict monotonicity only through equal distances, which the table allows
    return ImpostorTable(tuple(rows), n, source)


def impostor_distances(embeddings: np.ndarray, labels: Sequence[str]) -> np.ndarray:
    """Squared L2 distances of every pair of unit embeddings whose labels differ (each unordered pair once)."""
    e = np.asarray(embeddings, dtype=np.float64)
    lab = np.asarray(labels)
    d = np.clip(2.0 - 2.0 * (e @ e.T), 0.0, 4.0)
    iu = np.triu_indices(len(e), 1)
    return d[iu][(lab[:, None] != lab[None, :])[iu]]


def distance_matrix(embeddings: np.ndarray) -> np.ndarray:
    """All squared L2 distances between unit embeddings (clipped to [0, 4])."""
    e = np.asarray(embeddings, dtype=np.float64)
    return np.clip(2.0 - 2.0 * (e @ e.T), 0.0, 4.0)


# ------------------------------------------------------------------------------------------ simulated galleries

def simulate_galleries(dist: np.ndarray, labels: Sequence[str], gallery_size: int, *, draws: int,
                       rng: np.random.Generator) -> list[np.ndarray]:
    """Per draw: enrol one random photo of each of `gallery_size` random people, search with every photo of all
    the other people (strangers), and return each stranger search's nearest distance (one array per draw)."""
    lab = np.asarray(labels)
    people = np.unique(lab)
    if not 1 <= gallery_size < len(people):
        raise ValueError(f"a gallery of {gallery_size} needs more than {gallery_size} people, have {len(people)}")
    rows = {p: np.flatnonzero(lab == p) for p in people}
    out = []
    for _ in range(draws):
        order = rng.permutation(len(people))
        enrolled = np.array([rng.choice(rows[people[i]]) for i in order[:gallery_size]])
        probes = np.concatenate([rows[people[i]] for i in order[gallery_size:]])
        out.append(dist[np.ix_(probes, enrolled)].min(axis=1))
    return out


def gallery_check(dist: np.ndarray, labels: Sequence[str], table: ImpostorTable, gallery_size: int,
                  fpirs: Sequence[float], *, draws: int, rng: np.random.Generator) -> dict[str, Any]:
    """Simulated galleries against the table: for each target FPIR, the independence threshold's empirical FPIR
    (pooled over draws, with the spread of the per-draw rates) and the empirical threshold (the target quantile of
    the strangers' nearest distances)."""
    mins = simulate_galleries(dist, labels, gallery_size, draws=draws, rng=rng)
    pooled = np.concatenate(mins)
    out = []
    for f in fpirs:
        th = table.threshold_for(f, gallery_size)
        per_draw = np.array([(m <= th.threshold).mean() for m in mins])
        out.append({"fpir_target": f, "threshold_independence": th.threshold, "clamped": th.clamped,
                    "fpir_expected": th.fpir_expected,
                    "fpir_empirical": float((pooled <= th.threshold).mean()),
                    "fpir_empirical_draw_sd": float(per_draw.std()),
                    "threshold_empirical": float(np.quantile(pooled, f))})
    return {"gallery_size": gallery_size, "draws": draws, "searches": len(pooled),
            "searches_per_draw": int(np.mean([len(m) for m in mins])), "targets": out}


# ------------------------------------------------------------------------------------------ 1:N metrics

@dataclass(frozen=True)
class MatedSearch:
    """A search with a photo of an enrolled person: the mate's rank among the returned subjects (1-based; None
    when not returned or when no face was found), and the nearest subject's distance (None: no face)."""

    rank: int | None
    top1_distance: float | None


def rank_rate(searches: Sequence[MatedSearch], k: int) -> float:
    """Closed-set rank-k identification rate: the mate among the k nearest subjects (a missed face fails)."""
    return sum(s.rank is not None and s.rank <= k for s in searches) / len(searches) if searches else float("nan")


def fnir_at(searches: Sequence[MatedSearch], threshold: float) -> float:
    """FNIR at a threshold (NIST, rank 1): the mate is not the nearest subject within the threshold."""
    if not searches:
        return float("nan")
    hits = sum(s.rank == 1 and s.top1_distance is not None and s.top1_distance <= threshold for s in searches)
    return 1.0 - hits / len(searches)


def fpir_at(stranger_top1: Sequence[float | None], threshold: float) -> float:
    """FPIR at a threshold: strangers whose nearest subject is within it, among strangers with a face found."""
    found = [d for d in stranger_top1 if d is not None]
    return sum(d <= threshold for d in found) / len(found) if found else float("nan")


def threshold_at_fpir(stranger_top1: Sequence[float | None], fpir: float) -> float:
    """The largest threshold whose measured FPIR is at most `fpir`: with k = floor(fpir * n) strangers allowed,
    the midpoint between the k-th and (k+1)-th nearest stranger distances (below the nearest when k = 0)."""
    d = np.sort([x for x in stranger_top1 if x is not None])
    if not len(d):
        raise ValueError("no stranger search found a face")
    k = math.floor(fpir * len(d) + 1e-9)
    if k == 0:
        return float(d[0] - 1e-6)
    return float((d[k - 1] + d[k]) / 2.0) if k < len(d) else float(d[-1] + 1e-6)


def fnir_at_fpir(searches: Sequence[MatedSearch], stranger_top1: Sequence[float | None],
                 fpir: float) -> dict[str, Any]:
    """FNIR at the threshold whose measured FPIR on these strangers is at most `fpir` (the resolution is one
    stranger: 1 / strangers)."""
    t = threshold_at_fpir(stranger_top1, fpir)
    found = sum(d is not None for d in stranger_top1)
    return {"fpir_target": fpir, "threshold": t, "fnir": fnir_at(searches, t), "fpir": fpir_at(stranger_top1, t),
            "strangers": found, "false_positives_allowed": math.floor(fpir * found + 1e-9)}


# ------------------------------------------------------------------------------------------ model selection

def selection_metrics(dist: np.ndarray, labels: Sequence[str], fars: Sequence[float] = (1e-2, 1e-3)) -> dict[str, Any]:
    """Stable comparison measures for choosing between face models on one set of photos (the calibration half):

    - 1:1 over every pair of photos: TAR at each FAR, the threshold being the FAR quantile of all different-person
      distances (a pair at or under it is accepted), with the counts;
    - closed-set rank-1 and rank-5: a gallery with the first photo of every person; each person with two or more
      photos searched with their second photo (their first is the mate); the photo itself is never its own match.

    Photos are in the caller's order, so "first" and "second" are reproducible."""
    lab = np.asarray(labels)
    n = len(lab)
    if dist.shape != (n, n):
        raise ValueError(f"distance matrix {dist.shape} does not match {n} labels")
    iu = np.triu_indices(n, 1)
    same = (lab[:, None] == lab[None, :])[iu]
    d = dist[iu]
    genuine, impostor = d[same], d[~same]
    if not len(genuine) or not len(impostor):
        raise ValueError("need same-person and different-person pairs")
    tar = []
    for far in fars:
        t = float(np.quantile(impostor, far, method="lower"))
        tar.append({"far_target": far, "threshold": t, "far": float((impostor <= t).mean()),
                    "tar": float((genuine <= t).mean())})
    first: dict[str, int] = {}
    second: dict[str, int] = {}
    for i, p in enumerate(lab.tolist()):
        if p not in first:
            first[p] = i
        elif p not in second:
            second[p] = i
    gallery = np.array(list(first.values()))
    gallery_people = lab[gallery]
    ranks = []
    for p, q in second.items():
        order = gallery_people[np.argsort(dist[q, gallery], kind="stable")]
        ranks.append(int(np.flatnonzero(order == p)[0]) + 1)
    r = np.array(ranks)
    return {"photos": n, "people": len(first), "genuine_pairs": len(genuine), "impostor_pairs": len(impostor),
            "tar_at_far": tar, "gallery_size": len(gallery), "searches": len(r),
            "rank1": float((r <= 1).mean()) if len(r) else float("nan"),
            "rank5": float((r <= 5).mean()) if len(r) else float("nan")}
