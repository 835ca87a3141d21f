"""Unit tests for the dynamic micro-batcher, sequenced with events rather than sleeps."""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import Callable, Coroutine, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ParamSpec

import pytest

from app.runtime.batcher import (
    BatchConfig,
    BatcherClosedError,
    BatchSizeMismatchError,
    MicroBatcher,
    QueueFullError,
)

LIMIT_S = 5.0  # upper bound for any wait; passing tests take milliseconds
FOREVER_MS = 60_000.0  # a max_wait_ms no test lasts long enough to reach

P = ParamSpec("P")


def async_test(fn: Callable[P, Coroutine[Any, Any, None]]) -> Callable[P, None]:
    """Run an async test body on a fresh loop, failing instead of hanging past LIMIT_S."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> None:
        asyncio.run(asyncio.wait_for(fn(*args, **kwargs), LIMIT_S))

    return wrapper


async def settle() -> None:
    """Let every ready task run until it blocks (submits enqueue within one step)."""
    for _ in range(10):
        await asyncio.sleep(0)


def double(xs: list[int]) -> list[int]:
    """The default batch function."""
    return [x * 2 for x in xs]


class Recorder:
    """Batch function that records batches, announces each start to the loop, and can block until released."""

    def __init__(self, *, blocking: bool = False, transform: Callable[[list[int]], Sequence[int]] = double) -> None:
        self._loop = asyncio.get_running_loop()
        self._permits = threading.Semaphore(0)
        self._blocking = blocking
        self._transform = transform
        self.batches: list[list[int]] = []
        self.threads: set[int] = set()
        self.started: asyncio.Queue[list[int]] = asyncio.Queue()

    def __call__(self, items: list[int]) -> Sequence[int]:
        self.batches.append(list(items))
        self.threads.add(threading.get_ident())
        self._loop.call_soon_threadsafe(self.started.put_nowait, list(items))
        if self._blocking and not self._permits.acquire(timeout=LIMIT_S):
            raise TimeoutError("the test never released this batch")
        return self._transform(items)

    def release(self, batches: int = 1) -> None:
        """Let that many (current or future) batches finish."""
        for _ in range(batches):
            self._permits.release()

    async def next_batch(self) -> list[int]:
        """Wait until the next batch has entered the function; return its items."""
        return await asyncio.wait_for(self.started.get(), LIMIT_S)


class Observer:
    """BatchObserver that records every call."""

    def __init__(self) -> None:
        self.runs: list[tuple[str, int, float]] = []
        self.waits: list[tuple[str, float]] = []
        self.depths: list[tuple[str, int]] = []

    def batch_run(self, model: str, size: int, seconds: float) -> None:
        self.runs.append((model, size, seconds))

    def queue_wait(self, model: str, seconds: float) -> None:
        self.waits.append((model, seconds))

    def queue_depth(self, model: str, depth: int) -> None:
        self.depths.append((model, depth))


class BrokenObserver(Observer):
    """An observer whose every method fails."""

    def batch_run(self, model: str, size: int, seconds: float) -> None:
        raise RuntimeError("metrics down")

    def queue_wait(self, model: str, seconds: float) -> None:
        raise RuntimeError("metrics down")

    def queue_depth(self, model: str, depth: int) -> None:
        raise RuntimeError("metrics down")


@pytest.fixture
def executor() -> Iterator[ThreadPoolExecutor]:
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="test-batcher")
    yield pool
    pool.shutdown(wait=True, cancel_futures=True)


async def started(fn: Recorder, executor: ThreadPoolExecutor | None, **config: Any) -> MicroBatcher[int, int]:
    """A started batcher named 'm' over fn."""
    b: MicroBatcher[int, int] = MicroBatcher("m", fn, BatchConfig(**config), executor=executor)
    await b.start()
    return b


async def block_first_batch(b: MicroBatcher[int, int], fn: Recorder) -> asyncio.Task[int]:
    """Submit item 0 and wait until its (blocked) batch is running, so later items queue up."""
    first = asyncio.create_task(b.submit(0))
    assert await fn.next_batch() == [0]
    return first


# -- configuration ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_batch_size": 0},
        {"max_batch_size": 2.5},
        {"max_batch_size": True},
        {"max_wait_ms": -1.0},
        {"max_wait_ms": float("nan")},
        {"max_queue": 0},
        {"max_queue": "8"},
    ],
)
def test_config_rejects_bad_values(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        BatchConfig(**kwargs)


def test_config_normalises_integral_floats() -> None:
    cfg = BatchConfig(max_batch_size=8.0, max_wait_ms=0, max_queue=32.0)  # type: ignore[arg-type]
    assert (cfg.max_batch_size, cfg.max_wait_ms, cfg.max_queue) == (8, 0.0, 32)
    assert isinstance(cfg.max_batch_size, int) and isinstance(cfg.max_queue, int)


@async_test
async def test_properties_and_submit_before_start() -> None:
    cfg = BatchConfig(max_batch_size=4)
    b: MicroBatcher[int, int] = MicroBatcher("resnet", double, cfg)
    assert (b.name, b.config, b.queue_depth) == ("resnet", cfg, 0)
    with pytest.raises(RuntimeError):
        await b.submit(1)


# -- batching ----------------------------------------------------------------------------------------


@async_test
async def test_concurrent_submits_coalesce_and_each_caller_gets_its_own_result(executor: ThreadPoolExecutor) -> None:
    fn = Recorder(blocking=True)
    b = await started(fn, executor, max_batch_size=8, max_wait_ms=0)
    first = await block_first_batch(b, fn)
    tasks = [asyncio.create_task(b.submit(x)) for x in (1, 2, 3, 4)]
    await settle()
    assert b.queue_depth == 4
    fn.release(2)
    assert await first == 0
    assert await asyncio.gather(*tasks) == [2, 4, 6, 8]
    assert fn.batches == [[0], [1, 2, 3, 4]]
    await b.close()


@async_test
async def test_max_batch_size_is_respected(executor: ThreadPoolExecutor) -> None:
    fn = Recorder(blocking=True)
    b = await started(fn, executor, max_batch_size=3, max_wait_ms=0)
    first = await block_first_batch(b, fn)
    tasks = [asyncio.create_task(b.submit(x)) for x in range(1, 8)]
    await settle()
    fn.release(4)
    assert await asyncio.gather(first, *tasks) == [x * 2 for x in range(8)]
    assert fn.batches == [[0], [1, 2, 3], [4, 5, 6], [7]]
    await b.close()


@async_test
async def test_full_batch_runs_without_waiting_for_the_timer(executor: ThreadPoolExecutor) -> None:
    fn = Recorder()
    b = await started(fn, executor, max_batch_size=2, max_wait_ms=FOREVER_MS)
    # Would hang until LIMIT_S if the collector waited out max_wait_ms once the batch was full.
    assert list(await asyncio.gather(b.submit(1), b.submit(2))) == [2, 4]
    assert fn.batches == [[1, 2]]
    await b.close()


@async_test
async def test_lone_item_flushes_after_max_wait(executor: ThreadPoolExecutor) -> None:
    fn = Recorder()
    b = await started(fn, executor, max_batch_size=8, max_wait_ms=20)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    assert await b.submit(5) == 10
    assert loop.time() - t0 >= 0.015  # it did wait for company first
    assert fn.batches == [[5]]
    await b.close()


@async_test
async def test_submit_many_keeps_order_across_batches(executor: ThreadPoolExecutor) -> None:
    fn = Recorder(blocking=True)
    b = await started(fn, executor, max_batch_size=2, max_wait_ms=0)
    first = await block_first_batch(b, fn)
    many = asyncio.create_task(b.submit_many([1, 2, 3, 4, 5]))
    await settle()
    fn.release(4)
    assert await many == [2, 4, 6, 8, 10]
    assert await first == 0
    assert fn.batches == [[0], [1, 2], [3, 4], [5]]
    assert await b.submit_many([]) == []
    await b.close()


@async_test
async def test_batch_function_runs_off_the_event_loop() -> None:
    fn = Recorder()
    b = await started(fn, None)  # the loop's default executor
    assert await b.submit(1) == 2
    assert threading.get_ident() not in fn.threads
    await b.close()


# -- failures ------------------------------------------------------------------------------------------


@async_test
async def test_exception_reaches_every_caller_of_the_batch(executor: ThreadPoolExecutor) -> None:
    boom = ValueError("bad batch")

    def fail_unless_zero(xs: list[int]) -> list[int]:
        if xs != [0]:
            raise boom
        return double(xs)

    fn = Recorder(blocking=True, transform=fail_unless_zero)
    b = await started(fn, executor, max_batch_size=8, max_wait_ms=0)
    first = await block_first_batch(b, fn)
    tasks = [asyncio.create_task(b.submit(x)) for x in (1, 2, 3)]
    await settle()
    fn.release(3)
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(r is boom for r in results)
    assert await first == 0
    assert await b.submit(0) == 0  # the collector survived
    await b.close()


@async_test
async def test_output_count_mismatch_reaches_every_caller(executor: ThreadPoolExecutor) -> None:
    fn = Recorder(blocking=True, transform=lambda xs: double(xs)[: max(1, len(xs) - 1)])
    b = await started(fn, executor, max_batch_size=8, max_wait_ms=0)
    first = await block_first_batch(b, fn)
    tasks = [asyncio.create_task(b.submit(x)) for x in (1, 2, 3)]
    await settle()
    fn.release(3)
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, BatchSizeMismatchError) for r in results)
    assert await first == 0
    assert await b.submit(7) == 14  # the collector survived
    await b.close()


@async_test
async def test_full_queue_rejects_immediately_and_all_or_nothing(executor: ThreadPoolExecutor) -> None:
    fn = Recorder(blocking=True)
    b = await started(fn, executor, max_batch_size=8, max_wait_ms=0, max_queue=3)
    first = await block_first_batch(b, fn)  # running, so it does not count against max_queue
    tasks = [asyncio.create_task(b.submit(x)) for x in (1, 2)]
    await settle()
    assert b.queue_depth == 2
    # Nothing is released yet, so a rejection that awaited anything would hang here.
    with pytest.raises(QueueFullError) as err:
        await b.submit_many([3, 4])
    assert err.value.model == "m"
    assert err.value.retry_after >= 1.0
    assert b.queue_depth == 2  # neither item was enqueued
    tasks.append(asyncio.create_task(b.submit(3)))
    await settle()
    assert b.queue_depth == 3
    with pytest.raises(QueueFullError):
        await b.submit(4)
    fn.release(2)
    assert await asyncio.gather(first, *tasks) == [0, 2, 4, 6]
    assert fn.batches == [[0], [1, 2, 3]]
    await b.close()


# -- cancellation ----------------------------------------------------------------------------------------


@async_test
async def test_cancelled_queued_item_is_not_run(executor: ThreadPoolExecutor) -> None:
    fn = Recorder(blocking=True)
    b = await started(fn, executor, max_batch_size=8, max_wait_ms=0)
    first = await block_first_batch(b, fn)
    keep_a, gone, keep_c = (asyncio.create_task(b.submit(x)) for x in (1, 2, 3))
    await settle()
    gone.cancel()
    await settle()
    assert b.queue_depth == 2  # its slot is freed at once
    fn.release(2)
    assert list(await asyncio.gather(first, keep_a, keep_c)) == [0, 2, 6]
    assert gone.cancelled()
    assert fn.batches == [[0], [1, 3]]
    await b.close()


@async_test
async def test_cancelled_submit_many_withdraws_its_queued_items(executor: ThreadPoolExecutor) -> None:
    fn = Recorder(blocking=True)
    b = await started(fn, executor, max_batch_size=8, max_wait_ms=0)
    first = await block_first_batch(b, fn)
    many = asyncio.create_task(b.submit_many([1, 2, 3]))
    await settle()
    assert b.queue_depth == 3
    many.cancel()
    await settle()
    assert b.queue_depth == 0
    fn.release(1)
    assert await first == 0
    assert fn.batches == [[0]]
    await b.close()


@async_test
async def test_cancel_during_running_batch_drops_only_that_result(executor: ThreadPoolExecutor) -> None:
    fn = Recorder(blocking=True)
    b = await started(fn, executor, max_batch_size=2, max_wait_ms=FOREVER_MS)
    gone, kept = (asyncio.create_task(b.submit(x)) for x in (1, 2))
    assert await fn.next_batch() == [1, 2]
    gone.cancel()
    await settle()
    fn.release(2)
    assert await kept == 4
    assert gone.cancelled()
    assert await b.submit_many([3, 4]) == [6, 8]  # the collector survived
    await b.close()


# -- close --------------------------------------------------------------------------------------------------


@async_test
async def test_close_fails_queued_callers_and_waits_for_running_batch(executor: ThreadPoolExecutor) -> None:
    fn = Recorder(blocking=True)
    b = await started(fn, executor, max_batch_size=8, max_wait_ms=0)
    first = await block_first_batch(b, fn)
    queued = [asyncio.create_task(b.submit(x)) for x in (1, 2)]
    await settle()
    closing = asyncio.create_task(b.close())
    results = await asyncio.gather(*queued, return_exceptions=True)
    assert all(isinstance(r, BatcherClosedError) for r in results)
    await settle()
    assert not closing.done()  # still waiting for the running batch
    fn.release(1)
    await closing
    assert await first == 0
    assert fn.batches == [[0]]
    with pytest.raises(BatcherClosedError):
        await b.submit(9)
    with pytest.raises(BatcherClosedError):
        await b.submit_many([9])
    await b.close()  # idempotent


@async_test
async def test_close_fails_a_batch_still_being_collected(executor: ThreadPoolExecutor) -> None:
    fn = Recorder()
    b = await started(fn, executor, max_batch_size=4, max_wait_ms=FOREVER_MS)
    waiting = asyncio.create_task(b.submit(1))
    await settle()
    assert b.queue_depth == 0  # taken by the collector, which now waits for company
    await b.close()
    with pytest.raises(BatcherClosedError):
        await waiting
    assert fn.batches == []


# -- observer ----------------------------------------------------------------------------------------------


@async_test
async def test_observer_receives_metrics(executor: ThreadPoolExecutor) -> None:
    obs = Observer()
    fn = Recorder(blocking=True)
    b: MicroBatcher[int, int] = MicroBatcher("m", fn, BatchConfig(max_wait_ms=0), executor=executor, observer=obs)
    await b.start()
    first = await block_first_batch(b, fn)
    tasks = [asyncio.create_task(b.submit(x)) for x in (1, 2)]
    await settle()
    fn.release(2)
    await asyncio.gather(first, *tasks)
    await b.close()
    assert [(m, size) for m, size, _ in obs.runs] == [("m", 1), ("m", 2)]
    assert all(seconds >= 0 for _, _, seconds in obs.runs)
    assert len(obs.waits) == 3
    assert all(m == "m" and seconds >= 0 for m, seconds in obs.waits)
    depths = [d for _, d in obs.depths]
    assert depths[:2] == [1, 0]  # item 0 enqueued, then taken
    assert 2 in depths
    assert depths[-1] == 0


@async_test
async def test_failing_observer_does_not_break_batching(executor: ThreadPoolExecutor) -> None:
    b: MicroBatcher[int, int] = MicroBatcher(
        "m", double, BatchConfig(max_wait_ms=0), executor=executor, observer=BrokenObserver()
    )
    await b.start()
    assert list(await asyncio.gather(b.submit(1), b.submit(2))) == [2, 4]
    await b.close()


# -- drain and reconfigure (run-time model management) ---------------------------------------------


@async_test
async def test_drain_runs_everything_queued_refuses_new_items_then_closes(executor: ThreadPoolExecutor) -> None:
    fn = Recorder(blocking=True)
    b = await started(fn, executor, max_batch_size=2, max_wait_ms=0)
    first = await block_first_batch(b, fn)
    queued = [asyncio.create_task(b.submit(i)) for i in (1, 2, 3)]
    await settle()
    drain = asyncio.create_task(b.drain())
    await settle()
    assert not b.accepting and not drain.done()
    with pytest.raises(BatcherClosedError, match="draining"):
        await b.submit(9)
    fn.release(3)  # the running batch and the two the queue makes
    await drain
    assert await first == 0 and [await q for q in queued] == [2, 4, 6]
    assert fn.batches == [[0], [1, 2], [3]]
    with pytest.raises(BatcherClosedError, match="closed"):
        await b.submit(9)


@async_test
async def test_drain_of_an_idle_or_unstarted_batcher_returns_at_once(executor: ThreadPoolExecutor) -> None:
    b = await started(Recorder(), executor)
    await settle()
    await b.drain()
    assert not b.accepting
    unstarted: MicroBatcher[int, int] = MicroBatcher("u", double, BatchConfig())
    await unstarted.drain()
    assert not unstarted.accepting


@async_test
async def test_reconfigure_applies_from_the_next_batch(executor: ThreadPoolExecutor) -> None:
    fn = Recorder(blocking=True)
    b = await started(fn, executor, max_batch_size=1, max_wait_ms=0, max_queue=8)
    first = await block_first_batch(b, fn)
    b.reconfigure(BatchConfig(max_batch_size=3, max_wait_ms=0, max_queue=3))
    queued = [asyncio.create_task(b.submit(i)) for i in (1, 2, 3)]
    await settle()
    with pytest.raises(QueueFullError):  # the new, smaller queue bound
        await b.submit(4)
    fn.release(2)
    assert await first == 0 and [await q for q in queued] == [2, 4, 6]
    assert fn.batches == [[0], [1, 2, 3]]
    await b.close()
