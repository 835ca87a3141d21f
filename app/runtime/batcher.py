"""Dynamic micro-batching: coalesce concurrent single-item requests into one model call."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import functools
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

log = logging.getLogger(__name__)

I = TypeVar("I")  # noqa: E741 - input item type; the public interface names it I
O = TypeVar("O")  # noqa: E741 - output type, one per input

# Weight of the newest batch in the running average behind retry_after: recent enough to follow
# load changes, smooth enough that one slow batch does not swing the estimate.
_EWMA_ALPHA = 0.3


def _as_int(name: str, value: Any) -> int:
    """An integral config value; settings may deliver 8.0 for 8, so integral floats are accepted."""
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not numeric or not float(value).is_integer():
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return int(value)


@dataclass(frozen=True)
class BatchConfig:
    """Limits of one batcher: batch size, how long a batch waits to fill, and queue capacity."""

    max_batch_size: int = 16
    max_wait_ms: float = 5.0
    max_queue: int = 256

    def __post_init__(self) -> None:
        """Validate and normalise the values (ValueError on bad ones)."""
        size = _as_int("max_batch_size", self.max_batch_size)
        queue = _as_int("max_queue", self.max_queue)
        if size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {size}")
        if queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {queue}")
        wait = self.max_wait_ms
        numeric = isinstance(wait, (int, float)) and not isinstance(wait, bool)
        if not numeric or not math.isfinite(wait) or wait < 0:
            raise ValueError(f"max_wait_ms must be a finite number >= 0, got {wait!r}")
        # Frozen dataclass: object.__setattr__ is the sanctioned way to normalise in __post_init__.
        object.__setattr__(self, "max_batch_size", size)
        object.__setattr__(self, "max_queue", queue)
        object.__setattr__(self, "max_wait_ms", float(wait))


class QueueFullError(Exception):
    """The batcher's queue is at capacity; the caller should retry after ``retry_after`` seconds."""

    def __init__(self, model: str, retry_after: float) -> None:
        """Record the model and the suggested back-off (never below one second)."""
        self.model = model
        self.retry_after = max(1.0, retry_after)
        super().__init__(f"queue for model {model!r} is full; retry in {self.retry_after:.1f}s")


# The monotonic time after which the current request's queued work is not worth computing (None: no
# deadline). The HTTP gate sets it per request; a context variable reaches the batcher through the
# services without every signature carrying it.
request_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar("request_deadline", default=None)


class DeadlineExceededError(Exception):
    """The caller's deadline passed before its item ran, so the item was dropped, not computed."""

    def __init__(self, model: str, waited: float) -> None:
        self.model = model
        self.waited = waited
        super().__init__(f"the request's deadline passed after {waited:.3f}s in the queue of model {model!r}")


class BatcherClosedError(Exception):
    """The batcher is closed (or closing) and will not run this item."""


class BatchSizeMismatchError(RuntimeError):
    """The batch function returned a different number of outputs than it was given inputs."""


class BatchObserver(Protocol):
    """Receives batcher metrics (e.g. Prometheus adapters)."""

    def batch_run(self, model: str, size: int, seconds: float) -> None:
        """One batch of ``size`` items ran for ``seconds`` inside the batch function."""

    def queue_wait(self, model: str, seconds: float) -> None:
        """One item waited ``seconds`` between enqueue and the start of its batch."""

    def queue_depth(self, model: str, depth: int) -> None:
        """The number of waiting items changed to ``depth``."""

    def rejected(self, model: str, items: int, reason: str) -> None:
        """``items`` were refused (``reason``: 'queue_full') or dropped unrun ('deadline')."""


@dataclass(eq=False)  # identity equality, so deque.remove() removes exactly this entry
class _Pending(Generic[I, O]):
    """One queued item and the future its caller awaits."""

    item: I
    future: asyncio.Future[O]
    enqueued: float = field(default_factory=time.monotonic)
    deadline: float | None = None  # monotonic; past it the item is dropped unrun


class MicroBatcher(Generic[I, O]):
    """Collects single items into batches and runs the batch function off the event loop."""

    def __init__(
        self,
        name: str,
        fn: Callable[[list[I]], Sequence[O]],
        config: BatchConfig = BatchConfig(),  # frozen, so a shared default instance is safe
        *,
        executor: concurrent.futures.Executor | None = None,
        observer: BatchObserver | None = None,
    ) -> None:
        """Create a stopped batcher; call ``start()`` from the event loop before submitting."""
        self._name = name
        self._fn = fn
        self._config = config
        self._executor = executor
        self._observer = observer
        self._queue: deque[_Pending[I, O]] = deque()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._draining = False  # drain(): no new items; the queued ones still run
        self._idle = asyncio.Event()  # set while the collector waits on an empty queue with no batch running
        self._avg_batch_s = 0.0  # running average of batch durations, for retry_after

    @property
    def name(self) -> str:
        """The batcher's name (the model it serves)."""
        return self._name

    @property
    def config(self) -> BatchConfig:
        """The batcher's limits."""
        return self._config

    def reconfigure(self, config: BatchConfig) -> None:
        """New limits, applied from the next batch (a smaller queue bound refuses new items, it drops none)."""
        self._config = config
        self._wakeup.set()

    @property
    def accepting(self) -> bool:
        """Whether new items are taken (False once draining or closed)."""
        return not (self._closed or self._draining)

    @property
    def queue_depth(self) -> int:
        """Items waiting for a batch (not counting the batch being run)."""
        return len(self._queue)

    async def start(self) -> None:
        """Start the collector task on the running loop (idempotent)."""
        if self._closed:
            raise BatcherClosedError(f"batcher {self._name!r} is closed")
        if self._task is not None:
            return
        self._task = asyncio.get_running_loop().create_task(self._collector(), name=f"batcher:{self._name}")
        self._task.add_done_callback(self._collector_done)

    async def close(self) -> None:
        """Stop: queued callers get BatcherClosedError; waits for the running batch to finish."""
        if not self._closed:
            self._closed = True
            self._fail_queued()
            self._wakeup.set()
        if self._task is not None and not self._task.done():
            # Shielded so that a cancelled close() does not abandon callers of the running batch.
            await asyncio.shield(self._task)

    async def drain(self) -> None:
        """Stop taking new items (they get BatcherClosedError), run every queued one, then close."""
        self._draining = True
        while self._task is not None and not self._task.done() and (self._queue or not self._idle.is_set()):
            if self._queue:
                self._idle.clear()  # the collector sets it again once it has run them and waits on an empty queue
            self._wakeup.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), 0.5)  # bounded, so a collector that died cannot hang it
        await self.close()

    async def submit(self, item: I) -> O:
        """Queue one item and wait for its output."""
        (fut,) = self._enqueue([item])
        return await fut

    async def submit_many(self, items: Sequence[I], deadline: float | None = None) -> list[O]:
        """Queue several items (all or none) and wait for their outputs, in order. Items still queued at
        ``deadline`` (default: the current request's, see ``request_deadline``) fail with DeadlineExceededError."""
        if not items:
            return []
        futs = self._enqueue(items, request_deadline.get() if deadline is None else deadline)
        try:
            return [await fut for fut in futs]
        except BaseException:
            # The request failed or was cancelled as a whole: drop the rest of its items from the
            # queue, and mark already-failed futures as retrieved so asyncio does not log them.
            for fut in futs:
                if not fut.done():
                    fut.cancel()
                elif not fut.cancelled():
                    fut.exception()
            raise

    # -- internals -------------------------------------------------------------------------------

    def _enqueue(self, items: Sequence[I], deadline: float | None = None) -> list[asyncio.Future[O]]:
        """Append items to the queue or raise without enqueuing any of them."""
        if self._closed or self._draining:
            raise BatcherClosedError(f"batcher {self._name!r} is {'closed' if self._closed else 'draining'}")
        if self._task is None or self._task.done():
            # Without a running collector the caller would wait forever; fail loudly instead.
            raise RuntimeError(f"batcher {self._name!r} is not running")
        if len(self._queue) + len(items) > self._config.max_queue:
            self._observe(lambda obs: obs.rejected(self._name, len(items), "queue_full"))
            raise QueueFullError(self._name, self._retry_after())
        if deadline is not None and time.monotonic() >= deadline:
            self._observe(lambda obs: obs.rejected(self._name, len(items), "deadline"))
            raise DeadlineExceededError(self._name, 0.0)
        loop = asyncio.get_running_loop()
        futs: list[asyncio.Future[O]] = []
        for item in items:
            fut: asyncio.Future[O] = loop.create_future()
            entry = _Pending(item, fut, deadline=deadline)
            fut.add_done_callback(functools.partial(self._on_done, entry))
            self._queue.append(entry)
            futs.append(fut)
        self._observe_depth()
        self._wakeup.set()
        return futs

    def _on_done(self, entry: _Pending[I, O], fut: asyncio.Future[O]) -> None:
        """Remove a cancelled caller's item from the queue so it neither runs nor holds capacity."""
        if not fut.cancelled():
            return
        try:
            self._queue.remove(entry)
        except ValueError:
            return  # already taken into a batch; the collector skips or drops it
        self._observe_depth()

    def _retry_after(self) -> float:
        """Estimated seconds until the queue has room: the batches ahead times the recent batch time."""
        cfg = self._config
        batches_ahead = math.ceil(len(self._queue) / cfg.max_batch_size) + 1
        return max(1.0, batches_ahead * (self._avg_batch_s + cfg.max_wait_ms / 1000.0))

    def _take(self) -> _Pending[I, O] | None:
        """Pop the oldest live item, skipping callers that went away and dropping items past their deadline."""
        while self._queue:
            entry = self._queue.popleft()
            self._observe_depth()
            if entry.future.done():
                continue
            now = time.monotonic()
            if entry.deadline is not None and now >= entry.deadline:
                entry.future.set_exception(DeadlineExceededError(self._name, now - entry.enqueued))
                self._observe(lambda obs: obs.rejected(self._name, 1, "deadline"))
                continue
            return entry
        return None

    async def _collector(self) -> None:
        """Collect, run, repeat until closed; no failure of one batch stops the loop."""
        while True:
            batch: list[_Pending[I, O]] = []
            try:
                if not await self._collect(batch):
                    return
                await self._execute(batch)
            except asyncio.CancelledError:
                # Task cancelled from outside (e.g. loop shutdown without close()): nobody will
                # serve these callers any more, so tell them rather than leave them hanging.
                self._closed = True
                self._fail(batch, BatcherClosedError(f"batcher {self._name!r} was stopped"))
                self._fail_queued()
                raise
            except Exception as exc:
                # Only a bug gets here; fail this batch's callers and keep serving the next ones.
                log.exception("batcher %s: collector error", self._name)
                self._fail(batch, exc)

    async def _collect(self, batch: list[_Pending[I, O]]) -> bool:
        """Fill ``batch`` (in place, so a failure can still reach its callers); False when closed."""
        cfg = self._config
        while True:
            if self._closed:
                return False
            first = self._take()
            if first is not None:
                break
            self._wakeup.clear()
            self._idle.set()
            try:
                await self._wakeup.wait()
            finally:
                self._idle.clear()
        batch.append(first)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + cfg.max_wait_ms / 1000.0
        while len(batch) < cfg.max_batch_size:
            nxt = self._take()
            if nxt is not None:
                batch.append(nxt)
                continue
            remaining = deadline - loop.time()
            if remaining <= 0 or self._closed:
                break
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except TimeoutError:
                break
        if self._closed:
            # Closed while still collecting: these items never started, so they fail like queued ones.
            self._fail(batch, BatcherClosedError(f"batcher {self._name!r} is closed"))
            return False
        return True

    async def _execute(self, batch: list[_Pending[I, O]]) -> None:
        """Run the batch function in the executor and hand each caller its own output (or the error)."""
        live = [p for p in batch if not p.future.done()]
        if not live:
            return
        loop = asyncio.get_running_loop()
        began = time.monotonic()

        def report_waits(obs: BatchObserver) -> None:
            for p in live:
                obs.queue_wait(self._name, began - p.enqueued)

        self._observe(report_waits)
        items = [p.item for p in live]
        try:
            try:
                outputs = list(await loop.run_in_executor(self._executor, self._fn, items))
            finally:
                seconds = time.monotonic() - began
                self._record_duration(seconds)
                self._observe(lambda obs: obs.batch_run(self._name, len(live), seconds))
            if len(outputs) != len(live):
                raise BatchSizeMismatchError(
                    f"batch function of {self._name!r} returned {len(outputs)} outputs for {len(live)} inputs"
                )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # Expected failures (bad input, model error) belong to the callers, who report them.
            log.debug("batcher %s: batch of %d failed: %r", self._name, len(live), exc)
            self._fail(live, exc)
            return
        except BaseException as exc:
            # SystemExit/KeyboardInterrupt from a worker thread must not unwind the server's loop
            # through every awaiting caller; report it to them as an ordinary error instead.
            self._fail(live, RuntimeError(f"batch function of {self._name!r} raised {exc!r}"))
            return
        for p, out in zip(live, outputs, strict=True):
            if not p.future.done():  # the caller may have been cancelled while the batch ran
                p.future.set_result(out)

    def _record_duration(self, seconds: float) -> None:
        """Fold one batch duration into the running average used for retry_after."""
        if self._avg_batch_s == 0.0:
            self._avg_batch_s = seconds
        else:
            self._avg_batch_s = _EWMA_ALPHA * seconds + (1 - _EWMA_ALPHA) * self._avg_batch_s

    def _fail(self, batch: list[_Pending[I, O]], exc: BaseException) -> None:
        """Give every still-waiting caller of the batch the same exception."""
        for p in batch:
            if not p.future.done():
                p.future.set_exception(exc)

    def _fail_queued(self) -> None:
        """Fail every queued item with BatcherClosedError and empty the queue."""
        pending = list(self._queue)
        self._queue.clear()
        self._fail(pending, BatcherClosedError(f"batcher {self._name!r} is closed"))
        if pending:
            self._observe_depth()

    def _observe_depth(self) -> None:
        """Report the current queue depth."""
        depth = len(self._queue)
        self._observe(lambda obs: obs.queue_depth(self._name, depth))

    def _observe(self, call: Callable[[BatchObserver], None]) -> None:
        """Call the observer, if any; a broken metrics sink must never break inference."""
        if self._observer is None:
            return
        try:
            call(self._observer)
        except AttributeError as exc:  # an observer written before a newer hook existed
            log.debug("batcher %s: observer lacks a hook: %s", self._name, exc)
        except Exception:
            log.exception("batcher %s: observer failed", self._name)

    def _collector_done(self, task: asyncio.Task[None]) -> None:
        """Log a collector that ended with an error (it is designed never to)."""
        if not task.cancelled() and task.exception() is not None:
            log.error("batcher %s: collector stopped", self._name, exc_info=task.exception())
