"""map_in_threads: a request's images are decoded in parallel worker threads, answers in upload order, and the error
reported for several bad uploads is always the first bad one in upload order."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from app.services.pool import SpareThreads, map_in_threads


def test_items_run_at_once_and_results_keep_their_order() -> None:
    barrier = threading.Barrier(3, timeout=10)  # passes only if three items run at the same time

    def work(x: int) -> int:
        barrier.wait()
        time.sleep(0.01 * (3 - x))  # the later items finish first
        return x * x

    assert asyncio.run(map_in_threads(work, [1, 2, 3], SpareThreads(2))) == [1, 4, 9]


def test_the_first_failure_in_item_order_is_raised() -> None:
    def work(x: int) -> int:
        if x == 1:
            time.sleep(0.05)  # fails last
            raise ValueError("item 1")
        if x == 3:
            raise KeyError("item 3")  # fails first
        return x

    with pytest.raises(ValueError, match="item 1"):
        asyncio.run(map_in_threads(work, [0, 1, 2, 3]))
    assert asyncio.run(map_in_threads(lambda x: x + 1, [41])) == [42]


def _peak(items: int, spare: SpareThreads, hold: SpareThreads | None = None, held: int = 0) -> int:
    running = {"now": 0, "most": 0}
    guard = threading.Lock()

    def work(x: int) -> int:
        with guard:
            running["now"] += 1
            running["most"] = max(running["most"], running["now"])
        time.sleep(0.02)
        with guard:
            running["now"] -= 1
        return x

    assert asyncio.run(map_in_threads(work, list(range(items)), spare)) == list(range(items))
    return running["most"]


def test_a_request_borrows_only_the_spare_threads_left() -> None:
    """One lane of its own, plus what it can borrow now: with 1 spare token, 2 at once; with the tokens taken by
    other requests, one at a time (as before parallel decoding); the tokens come back afterwards."""
    spare = SpareThreads(1)
    assert _peak(8, spare) == 2
    assert spare.take(5) == 1  # given back after the call; now taken, as by another request
    assert _peak(8, spare) == 1
    spare.give_back(1)
    assert _peak(8, SpareThreads(3)) == 4
    assert _peak(8, SpareThreads(0)) == 1
