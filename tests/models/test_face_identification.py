"""1:N calibration: FPIR <-> FAR, the impostor table (building, validation, interpolation, clamping), simulated
galleries, and the open-set metrics of bench/faces_identification.py on a fixed toy case."""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np
import pytest

from models.faces.identification import (
    ImpostorTable,
    MatedSearch,
    distance_matrix,
    far_for_fpir,
    far_levels,
    fnir_at,
    fnir_at_fpir,
    fpir_at,
    fpir_for_far,
    gallery_check,
    impostor_distances,
    quantile_table,
    rank_rate,
    selection_metrics,
    simulate_galleries,
    threshold_at_fpir,
)

MU, SIGMA = 2.0, 0.3  # synthetic impostor distances: normal, as the real ones roughly are (1.95 +- 0.36)


def normal_cdf(x: float) -> float:
    return 0.5 * math.erfc(-(x - MU) / (SIGMA * math.sqrt(2)))


@pytest.fixture(scope="module")
def synthetic_table() -> ImpostorTable:
    """The table of 2 million sampled impostor distances (as the calibration command makes it)."""
    rng = np.random.default_rng(0)
    return quantile_table(rng.normal(MU, SIGMA, 2_000_000))


@pytest.fixture(scope="module")
def exact_table() -> ImpostorTable:
    """The table at the same levels with the distribution's true quantiles: the FPIR math without sampling noise."""
    dist = NormalDist(MU, SIGMA)
    return ImpostorTable(tuple((f, dist.inv_cdf(f)) for f in far_levels(2_000_000)), pairs=2_000_000)


def test_far_and_fpir_are_inverse_and_match_the_formula() -> None:
    for fpir in (0.001, 0.01, 0.1, 0.5):
        for n in (1, 7, 100, 10_000):
            far = far_for_fpir(fpir, n)
            assert far == pytest.approx(1 - (1 - fpir) ** (1 / n), rel=1e-9)
            assert fpir_for_far(far, n) == pytest.approx(fpir, rel=1e-9)
    assert far_for_fpir(0.01, 1) == pytest.approx(0.01)
    assert far_for_fpir(0.01, 0) == pytest.approx(0.01)  # an empty gallery is treated as one face
    assert far_for_fpir(0.01, 1000) == pytest.approx(1.005e-5, rel=1e-3)  # about fpir / N when small
    with pytest.raises(ValueError):
        far_for_fpir(0.0, 10)
    with pytest.raises(ValueError):
        far_for_fpir(1.0, 10)


def test_the_table_of_synthetic_distances_has_the_true_quantiles(synthetic_table: ImpostorTable) -> None:
    t = synthetic_table
    assert t.pairs == 2_000_000
    fars = [f for f, _ in t.quantiles]
    assert fars[0] == pytest.approx(10 ** -0.25, rel=1e-3) and fars[-1] == pytest.approx(10 ** -5.25, rel=1e-3)
    assert all(math.floor(f * t.pairs) >= 10 for f in fars)  # every level has ten pairs at or below it
    for far, d in t.quantiles:
        if far >= 1e-4:  # >= 200 samples below: the empirical quantile is close to the true one
            assert normal_cdf(d) == pytest.approx(far, rel=0.15)


@pytest.mark.parametrize("n", [1, 10, 100, 1000])
@pytest.mark.parametrize("fpir", [0.01, 0.1])
def test_sampled_galleries_have_the_target_fpir_at_the_calibrated_threshold(
        exact_table: ImpostorTable, synthetic_table: ImpostorTable, n: int, fpir: float) -> None:
    th = exact_table.threshold_for(fpir, n)
    assert th.clamped is None and th.fpir_expected == fpir and th.gallery_size == n
    # the true FPIR of that threshold (independent impostors with a known distribution) is the target, up to the
    # interpolation between quarter-decade rows
    assert fpir_for_far(normal_cdf(th.threshold), n) == pytest.approx(fpir, rel=0.05)
    # the table made from sampled distances gives the same, up to the sampling error of its k tail samples
    sampled = synthetic_table.threshold_for(fpir, n)
    k = th.far * synthetic_table.pairs
    assert fpir_for_far(normal_cdf(sampled.threshold), n) == pytest.approx(fpir, rel=0.05 + 3 / math.sqrt(k))
    # and the rate measured on many sampled galleries (the nearest of N fresh impostor distances) is the target
    rng = np.random.default_rng(n)
    trials = 40_000
    hits = 0
    for _ in range(0, trials, 4000):
        nearest = rng.normal(MU, SIGMA, (4000, n)).min(axis=1)
        hits += int((nearest <= th.threshold).sum())
    measured = hits / trials
    se = math.sqrt(fpir * (1 - fpir) / trials)
    # the galleries' sampling error plus the interpolation's
    assert abs(measured - fpir) <= 4 * se + 0.05 * fpir, (measured, fpir)


def test_heterogeneous_probes_make_the_independence_threshold_strict_not_lenient() -> None:
    """Probes differ (some look like many people): the real FPIR is then at most the target (Jensen)."""
    rng = np.random.default_rng(3)
    probes, n = 20_000, 100
    shift = rng.normal(0.0, 0.15, probes)  # each probe's impostor distances are shifted by its own amount
    pooled = (rng.normal(MU, SIGMA, (2000, 500)) + rng.normal(0.0, 0.15, (2000, 1))).ravel()
    table = quantile_table(pooled)
    th = table.threshold_for(0.01, n)
    nearest = (rng.normal(MU, SIGMA, (probes, n)) + shift[:, None]).min(axis=1)
    measured = float((nearest <= th.threshold).mean())
    assert measured <= 0.01 + 3 * math.sqrt(0.01 * 0.99 / probes)


def test_interpolation_is_linear_in_log_far_and_clamps_at_both_ends() -> None:
    table = ImpostorTable(((0.1, 1.5), (0.01, 1.1), (0.001, 0.8)), pairs=10_000)
    assert table.distance_at(0.01) == pytest.approx(1.1)
    assert table.distance_at(10 ** -1.5) == pytest.approx(1.3)  # halfway in log FAR
    assert table.distance_at(10 ** -2.5) == pytest.approx(0.95)
    assert table.far_at(1.3) == pytest.approx(10 ** -1.5)
    assert table.far_at(0.5) is None and table.far_at(1.6) is None
    assert table.fpir_at(1.1, 10) == pytest.approx(1 - 0.99 ** 10)

    ok = table.threshold_for(0.01, 1)
    assert ok.threshold == pytest.approx(1.1) and ok.clamped is None
    # a gallery so large that the FAR needed is below the table's smallest: the strictest value, and the FPIR to expect
    big = table.threshold_for(0.01, 1000)
    assert big.far == pytest.approx(far_for_fpir(0.01, 1000))
    assert big.clamped == "strictest" and big.threshold == pytest.approx(0.8)
    assert big.fpir_expected == pytest.approx(1 - 0.999 ** 1000) and big.fpir_expected > 0.01
    lenient = table.threshold_for(0.5, 1)
    assert lenient.clamped == "most-lenient" and lenient.threshold == pytest.approx(1.5)
    # thresholds fall as the gallery grows
    ths = [table.threshold_for(0.1, n).threshold for n in (1, 2, 5, 10, 50, 100)]
    assert ths == sorted(ths, reverse=True) and len(set(ths)) == len(ths)


def test_flat_runs_of_the_table_interpolate() -> None:
    table = ImpostorTable(((0.1, 1.5), (0.01, 1.0), (0.001, 1.0), (0.0001, 0.5)), pairs=100_000)
    assert table.far_at(1.0) == pytest.approx(0.01)  # FAR(d) = P(dist <= d): the largest FAR of the flat run
    assert table.distance_at(10 ** -2.5) == pytest.approx(1.0)


@pytest.mark.parametrize(("entry", "needle"), [
    ({"impostor_quantiles": [[0.1, 1.5]], "impostor_pairs": 100}, "two"),
    ({"impostor_quantiles": [[0.1, 1.5], [0.2, 1.2]], "impostor_pairs": 100}, "decrease"),
    ({"impostor_quantiles": [[0.1, 1.5], [0.01, 1.6]], "impostor_pairs": 1000}, "not increase"),
    ({"impostor_quantiles": [[1.5, 1.5], [0.01, 1.2]], "impostor_pairs": 1000}, "between 0 and 1"),
    ({"impostor_quantiles": [[0.1, 4.5], [0.01, 1.2]], "impostor_pairs": 1000}, "0 to 4"),
    ({"impostor_quantiles": [[0.1, 1.5], [0.001, 1.2]], "impostor_pairs": 100}, "below one pair"),
    ({"impostor_quantiles": [[0.1, 1.5], [0.01, float("nan")]], "impostor_pairs": 1000}, "0 to 4"),
    ({"impostor_quantiles": [[0.1, "x"], [0.01, 1.2]], "impostor_pairs": 1000}, "number pairs"),
    ({"impostor_quantiles": [[0.1, 1.5], [0.01, 1.2]], "impostor_pairs": 0}, "positive"),
    ({"impostor_quantiles": [[0.1, 1.5], [0.01, 1.2]], "impostor_pairs": 1.5}, "integer"),
    ({"impostor_quantiles": [[0.1, 1.5], [0.01, 1.2]]}, "integer"),
    ([1, 2], "object"),
])
def test_invalid_tables_are_refused(entry: object, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        ImpostorTable.from_manifest(entry)  # type: ignore[arg-type]


def test_a_table_round_trips_through_the_manifest(synthetic_table: ImpostorTable) -> None:
    again = ImpostorTable.from_manifest({**synthetic_table.to_manifest(), "identities": 3, "method": "x"})
    assert again == synthetic_table


def test_quantile_rows_never_exceed_their_far() -> None:
    rng = np.random.default_rng(5)
    d = rng.uniform(0, 4, 5000)
    table = quantile_table(d, min_tail_pairs=5)
    assert far_levels(5000, min_tail_pairs=5)[-1] * 5000 >= 5
    for far, t in table.quantiles:
        assert (d <= t).mean() <= far + 1e-12
        assert (d <= t + 1e-4).mean() >= far - 2 / 5000  # and it is the largest such distance (up to rounding)
    with pytest.raises(ValueError, match="too few"):
        quantile_table(d[:20])  # ten pairs below 0.56 but not below 0.32: one row only


def test_impostor_distances_cover_every_pair_of_different_people_once() -> None:
    e = np.eye(4)[[0, 0, 1, 2, 3]]  # five unit vectors; the first two are one person's identical photos
    labels = ["a", "a", "b", "c", "c"]
    d = impostor_distances(e, labels)
    assert len(d) == 10 - 1 - 1  # C(5, 2) pairs less the a-a and c-c pairs
    assert np.allclose(d, 2.0)
    assert distance_matrix(e)[0, 1] == 0.0


def test_simulated_galleries_search_only_strangers() -> None:
    # people 0..9 with two photos each; a photo's vector is unique to its person, so strangers are all at distance 2
    labels = [f"p{i}" for i in range(10) for _ in range(2)]
    e = np.eye(10)[[i for i in range(10) for _ in range(2)]]
    dist = distance_matrix(e)
    mins = simulate_galleries(dist, labels, 4, draws=5, rng=np.random.default_rng(0))
    assert len(mins) == 5 and all(len(m) == 12 for m in mins)  # the 6 people not enrolled, 2 photos each
    assert all(np.allclose(m, 2.0) for m in mins)  # never matched with their own photo
    with pytest.raises(ValueError):
        simulate_galleries(dist, labels, 10, draws=1, rng=np.random.default_rng(0))
    table = ImpostorTable(((0.5, 2.5), (0.1, 1.0)), pairs=1000)
    check = gallery_check(dist, labels, table, 4, [0.1], draws=3, rng=np.random.default_rng(0))
    assert check["searches"] == 36 and check["targets"][0]["fpir_empirical"] == 0.0


def test_open_set_metrics_on_a_fixed_toy_case() -> None:
    mated = [MatedSearch(1, 0.3), MatedSearch(1, 0.9), MatedSearch(2, 0.5), MatedSearch(None, 0.4),
             MatedSearch(None, None)]  # the last one: no face found in the probe
    strangers: list[float | None] = [0.2, 0.6, 0.8, 1.0, None]
    assert rank_rate(mated, 1) == pytest.approx(2 / 5)
    assert rank_rate(mated, 5) == pytest.approx(3 / 5)
    assert fnir_at(mated, 1.0) == pytest.approx(3 / 5)
    assert fnir_at(mated, 0.5) == pytest.approx(4 / 5)  # the 0.9 mate is beyond it
    assert fnir_at(mated, 0.1) == 1.0
    assert fpir_at(strangers, 0.7) == pytest.approx(2 / 4)  # among the four strangers with a face
    assert fpir_at(strangers, 0.1) == 0.0
    assert threshold_at_fpir(strangers, 0.25) == pytest.approx(0.4)  # one of four allowed: between 0.2 and 0.6
    none_allowed, all_allowed = threshold_at_fpir(strangers, 0.1), threshold_at_fpir(strangers, 1.0)
    # none allowed: just below the nearest stranger (0.2); all four allowed: just beyond the farthest (1.0)
    assert none_allowed < 0.2 and none_allowed == pytest.approx(0.2, abs=1e-4) and fpir_at(strangers, none_allowed) == 0
    assert all_allowed > 1.0 and all_allowed == pytest.approx(1.0, abs=1e-4) and fpir_at(strangers, all_allowed) == 1
    r = fnir_at_fpir(mated, strangers, 0.25)
    assert r["threshold"] == pytest.approx(0.4) and r["fpir"] == pytest.approx(0.25)
    assert r["fnir"] == pytest.approx(4 / 5) and r["strangers"] == 4 and r["false_positives_allowed"] == 1
    with pytest.raises(ValueError):
        threshold_at_fpir([None], 0.1)


def test_selection_metrics_on_a_fixed_toy_case() -> None:
    # photos of A, B, A, C, B, A on a line (1-d "embeddings"); distances are squared differences
    labels = ["A", "B", "A", "C", "B", "A"]
    x = np.array([0.0, 1.0, 0.5, 3.0, 2.5, 1.2])
    dist = (x[:, None] - x[None, :]) ** 2
    m = selection_metrics(dist, labels, fars=(0.25, 0.5))
    # genuine pairs: A (0,2) 0.25, (0,5) 1.44, (2,5) 0.49; B (1,4) 2.25
    # impostors (11), pairs (0,1) (0,3) (0,4) (1,2) (1,3) (1,5) (2,3) (2,4) (3,4) (3,5) (4,5)
    imp = sorted([1.0, 9.0, 6.25, 0.25, 4.0, 0.04, 6.25, 4.0, 0.25, 3.24, 1.69])
    assert m["genuine_pairs"] == 4 and m["impostor_pairs"] == 11 == len(imp)
    t25 = imp[int(np.floor(0.25 * 10))]  # numpy's "lower" quantile: index floor(q * (n - 1)) = 2 -> 0.25
    assert m["tar_at_far"][0]["threshold"] == pytest.approx(t25) == pytest.approx(0.25)
    assert m["tar_at_far"][0]["far"] == pytest.approx(3 / 11)  # 0.04, 0.25, 0.25
    assert m["tar_at_far"][0]["tar"] == pytest.approx(1 / 4)  # only A (0,2) at 0.25
    assert m["tar_at_far"][1]["threshold"] == pytest.approx(imp[5]) == pytest.approx(3.24)
    assert m["tar_at_far"][1]["far"] == pytest.approx(6 / 11)
    assert m["tar_at_far"][1]["tar"] == pytest.approx(1.0)  # every genuine pair (at most 2.25) is accepted
    # gallery: first photos A@0, B@1, C@3; searches: A's second (x 0.5) and B's second (x 2.5)
    # A: distances to A 0.25, B 0.25, C 6.25 -> tie broken by gallery order: A first (rank 1)
    # B: distances to A 6.25, B 2.25, C 0.25 -> C nearer: rank 2
    assert (m["gallery_size"], m["searches"], m["people"], m["photos"]) == (3, 2, 3, 6)
    assert m["rank1"] == pytest.approx(0.5) and m["rank5"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="does not match"):
        selection_metrics(dist[:5, :5], labels)
    with pytest.raises(ValueError, match="same-person and different-person"):
        selection_metrics(dist[:2, :2], labels[:2])


def test_the_shipped_face_models_carry_their_calibration_report() -> None:
    import json
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    entries = {m["name"]: m for m in json.loads((root / "weights" / "manifest.json").read_text())["models"]}
    for name in ("lfw-face-resnet", "lfw-face-resnet-onnx"):
        ident = entries[name]["identification"]
        table = ImpostorTable.from_manifest(ident)
        report = json.loads((root / ident["source"]).read_text())
        assert report["model"] == name and report["model_sha256"] == entries[name]["sha256"]
        assert report["half"] == "calibration" and report["table"]["impostor_quantiles"] == ident["impostor_quantiles"]
        assert table.pairs == report["impostor_pairs"] and table.far_min * table.pairs >= 10
        # the verification threshold is a 1:1 one: at 100 enrolled faces nearly every stranger would pass it
        assert table.fpir_at(entries[name]["threshold"], 100) > 0.99
