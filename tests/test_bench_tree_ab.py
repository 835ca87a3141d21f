"""The paired A/B statistics of bench/tree_ab.py: per-pair ratios, their geometric mean and bootstrap interval,
and the server's CPU time per request. No servers are started here."""

from __future__ import annotations

import math
import os
import sys
import time

import pytest

from bench.tree_ab import paired_summary, paired_table, process_cpu_s, ratio_interval


def _windows(base: list[float], head: list[float], cpu_base: float = 10.0, cpu_head: float = 12.0) -> list[dict]:
    out = []
    for i, (b, h) in enumerate(zip(base, head, strict=True)):
        out.append({"pair": i, "tree": "base", "requests_per_s": b, "server_cpu_ms_per_request": cpu_base})
        out.append({"pair": i, "tree": "head", "requests_per_s": h, "server_cpu_ms_per_request": cpu_head})
    return out


def test_equal_ratios_give_that_ratio_with_no_spread() -> None:
    g, lo, hi = ratio_interval([0.9] * 8)
    assert g == pytest.approx(0.9) and lo == pytest.approx(0.9) and hi == pytest.approx(0.9)


def test_the_mean_is_geometric_and_the_interval_contains_it() -> None:
    g, lo, hi = ratio_interval([0.5, 2.0, 0.8, 1.25])
    assert g == pytest.approx(1.0)  # 0.5 x 2 x 0.8 x 1.25 = 1: the arithmetic mean would be 1.14
    assert lo < 1.0 < hi and lo >= 0.5 and hi <= 2.0
    assert ratio_interval([0.5, 2.0, 0.8, 1.25]) == (g, lo, hi)  # fixed seed: the same interval every run


def test_pairs_are_compared_within_each_pair_not_across() -> None:
    # the machine drifts (every pair twice as fast as the one before), head is 10% slower in every pair:
    # pairing finds exactly that, while comparing means across pairs would be swamped by the drift
    base = [100.0 * 2 ** i for i in range(6)]
    head = [0.9 * b for b in base]
    s = paired_summary(_windows(base, head), 6)
    assert s["rps_head_over_base"]["geometric_mean"] == pytest.approx(0.9)
    assert s["rps_head_over_base"]["ci95"] == [pytest.approx(0.9), pytest.approx(0.9)]
    assert s["cpu_per_request_head_over_base"]["geometric_mean"] == pytest.approx(1.2)
    assert s["rps_head_over_base"]["pairs"] == 6


def test_a_pair_without_answers_is_left_out_and_the_table_renders() -> None:
    windows = _windows([100.0, 0.0, 100.0], [110.0, 50.0, 90.0])
    s = paired_summary(windows, 3)
    assert s["rps_head_over_base"]["pairs"] == 2
    assert s["rps_head_over_base"]["geometric_mean"] == pytest.approx(math.sqrt(1.1 * 0.9), abs=1e-4)
    table = paired_table([{"workload": "text", "levels": [{"concurrency": 8, "windows": windows, **s}]}])
    assert table[-1].startswith("| text | 8 | 100.0 | 90.0 | 0.995 (")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_process_cpu_time_grows_with_work() -> None:
    before = process_cpu_s(os.getpid())
    t = time.process_time()
    while time.process_time() - t < 0.3:
        sum(range(1000))
    after = process_cpu_s(os.getpid())
    assert before is not None and after is not None and after - before >= 0.2
    assert process_cpu_s(2 ** 22 + 12345) is None  # no such process
