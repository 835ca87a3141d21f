"""The models of one task behind their micro-batchers: choose a model, submit work, map overload to 503."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from typing import Any, Generic, TypeVar

from app.errors import DeadlineExceeded, NotFound, ServiceUnavailable
from app.runtime.batcher import (
    BatchConfig,
    BatcherClosedError,
    BatchObserver,
    DeadlineExceededError,
    MicroBatcher,
    QueueFullError,
)
from app.runtime.registry import LoadedModel, ModelRegistry

M = TypeVar("M", bound=LoadedModel)
T = TypeVar("T")


class SpareThreads:
    """Cores a request may borrow for its extra parallel work while nobody else needs them: each request always has
    its own lane (one thread at a time, as when work ran one item after another); extra lanes come from here only
    while tokens are left, so under load (as many requests as cores) requests stop borrowing and their work
    interleaves as before, and at low load one request's items use the idle cores."""

    def __init__(self, tokens: int) -> None:
        self._sem = threading.BoundedSemaphore(max(tokens, 1)) if tokens > 0 else None

    def take(self, want: int) -> int:
        """Borrow up to `want` tokens without waiting; how many were borrowed."""
        got = 0
        while self._sem is not None and got < want and self._sem.acquire(blocking=False):
            got += 1
        return got

    def give_back(self, n: int) -> None:
        for _ in range(n):
            assert self._sem is not None
            self._sem.release()


SPARE_THREADS = SpareThreads((os.cpu_count() or 1) - 1)


async def map_in_threads(fn: Callable[[Any], T], items: Sequence[Any], spare: SpareThreads | None = None) -> list[T]:
    """fn(item) for every item in worker threads, in the request's own lane plus the lanes it can borrow from
    `spare` (default: the process's spare cores) right now; results in item order; when some raise, the first in
    item order is raised after all have finished, so the answer does not depend on which thread finished first."""
    if len(items) == 1:
        return [await asyncio.to_thread(fn, items[0])]
    pool = SPARE_THREADS if spare is None else spare
    borrowed = pool.take(len(items) - 1)
    pending = list(range(len(items)))
    results: list[Any] = [None] * len(items)

    async def lane() -> None:
        while pending:
            i = pending.pop(0)
            try:
                results[i] = await asyncio.to_thread(fn, items[i])
            except BaseException as exc:  # kept per item: the first failure in item order is raised below
                results[i] = exc

    try:
        await asyncio.gather(*(lane() for _ in range(1 + borrowed)))
    finally:
        pool.give_back(borrowed)
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return results


def bucket_sizes(max_batch: int) -> list[int]:
    """Every size bucket_size makes for batches of 1 to max_batch: the powers of two below it, and it."""
    return [1 << k for k in range(max_batch.bit_length()) if 1 << k < max_batch] + [max_batch]


def bucket_size(n: int, max_batch: int) -> int:
    """The batch size a batch of n is padded to: the next power of two, at most max_batch (never below n)."""
    size = 1 << max(0, n - 1).bit_length()
    return max(n, min(size, max_batch))


class PaddedForward:
    """A model's forward that pads each batch to its bucket size (repeating the last input) and drops the padding
    rows from the outputs: on CUDA with cudnn.benchmark, each new input shape costs a round of algorithm tuning, and
    a micro-batcher makes batches of every size from 1 to its maximum; buckets bound that to log2(max) + 1 shapes.
    The padding rows cost compute, which on a GPU is small next to a batch's fixed costs."""

    def __init__(self, forward: Callable[[list[Any]], list[Any]], max_batch: Callable[[], int]) -> None:
        self.forward = forward
        self.max_batch = max_batch
        self.padded_rows = 0  # rows computed only as padding (for tests and diagnostics)

    def __call__(self, batch: list[Any]) -> list[Any]:
        n = len(batch)
        size = bucket_size(n, self.max_batch()) if n else 0
        if size == n:
            return self.forward(batch)
        self.padded_rows += size - n
        return self.forward(list(batch) + [batch[-1]] * (size - n))[:n]


def same_inputs(a: LoadedModel, b: LoadedModel) -> bool:
    """Whether work prepared for model a is valid input for model b (a weights swap keeps this true)."""
    keys = ("face_crop", "embedding")
    return (type(a) is type(b) and a.spec.preprocessing == b.spec.preprocessing and a.spec.labels == b.spec.labels
            and a.spec.encoding == b.spec.encoding
            and all(a.spec.info.get(k) == b.spec.info.get(k) for k in keys))


class ModelPool(Generic[M]):
    """Every loaded model of one task, each with its own batcher, and the default among them.

    Models come and go while serving (the model manager adds, swaps and removes them): a request that
    resolved a model keeps it for its whole life, and work it submits after that model was swapped out goes
    to the new copy when the inputs are the same kind (a weights swap), so no request fails during a swap."""

    def __init__(self, registry: ModelRegistry, task: str, kind: type[M], *, default_model: str | None,
                 executor: Executor, observer: BatchObserver | None, batch_configs: dict[str, BatchConfig],
                 buckets: str = "auto") -> None:
        self.registry = registry
        self.buckets = buckets  # CNN_BATCH_BUCKETS: pad batches to power-of-two sizes (auto: on CUDA)
        self.task = task
        self.kind = kind
        self.executor = executor
        self.observer = observer
        self.batchers: dict[str, MicroBatcher[Any, Any]] = {}
        self.models: dict[str, M] = {}  # the model each batcher serves
        self.padded: dict[str, PaddedForward] = {}  # the bucketed forwards, by model
        for name in registry.names(task):
            loaded = registry.states[name].loaded
            if loaded is not None:
                self.batchers[name] = self._batcher(name, loaded, batch_configs[name])  # type: ignore[arg-type]
                self.models[name] = loaded  # type: ignore[assignment]
        self.default_model = default_model or self.first_ready()

    def _batcher(self, name: str, loaded: M, config: BatchConfig) -> MicroBatcher[Any, Any]:
        on = self.buckets == "on" or (self.buckets == "auto" and getattr(loaded, "device", None) is not None
                                      and loaded.device.type == "cuda")
        if not on:
            return MicroBatcher(name, loaded.forward, config, executor=self.executor, observer=self.observer)
        batcher: list[MicroBatcher[Any, Any]] = []  # the max batch size is the batcher's, which can change
        padded = PaddedForward(loaded.forward, lambda: batcher[0].config.max_batch_size)
        batcher.append(MicroBatcher(name, padded, config, executor=self.executor, observer=self.observer))
        self.padded[name] = padded
        return batcher[0]

    async def warm_buckets(self, names: Sequence[str] | None = None) -> list[int]:
        """One forward per bucket size for each bucketed model (all, or `names`), so cudnn.benchmark tunes every
        shape the batcher will make now, not during the first requests of each size; returns the sizes run."""
        loop = asyncio.get_running_loop()
        ran: list[int] = []
        for name in names if names is not None else list(self.padded):
            padded, loaded, batcher = self.padded.get(name), self.models.get(name), self.batchers.get(name)
            item = loaded.warmup_input() if loaded is not None else None
            if padded is None or batcher is None or item is None:
                continue
            for size in bucket_sizes(batcher.config.max_batch_size):
                await loop.run_in_executor(self.executor, padded.forward, [item] * size)
                ran.append(size)
        return ran

    def first_ready(self, *, besides: str | None = None) -> str | None:
        """The first configured model that serves, preferring trained weights over untrained ones."""
        loaded = [(n, self.registry.states[n].loaded) for n in self.registry.names(self.task) if n != besides]
        ready = [(n, m) for n, m in loaded if m is not None and self.registry.states[n].status == "ready"]
        names = [n for n, m in ready if m.weights_tag == "trained"] or [n for n, _ in ready]
        return names[0] if names else None

    async def start(self) -> None:
        """Start every batcher."""
        for b in self.batchers.values():
            await b.start()

    async def close(self) -> None:
        """Stop every batcher; queued callers get an error, running batches finish."""
        for b in self.batchers.values():
            await b.close()

    async def add(self, name: str, loaded: M, config: BatchConfig, *, warm: bool = False) -> None:
        """Serve a newly loaded model (the caller then installs its state in the registry and, when the task has no
        default, makes one with first_ready). The batcher starts before it serves: never an unstarted one; with
        `warm`, its bucket sizes are warmed first (warm_buckets)."""
        b = self._batcher(name, loaded, config)
        await b.start()
        self.batchers[name] = b
        self.models[name] = loaded
        if warm:
            await self.warm_buckets([name])

    async def swap(self, name: str, loaded: M, config: BatchConfig | None = None) -> M:
        """Serve `loaded` in place of the current copy of `name` at once; the old copy runs what is already
        queued for it, then stops. Returns the old copy (the caller frees it)."""
        old_batcher, old = self.batchers[name], self.models[name]
        await self.add(name, loaded, config or old_batcher.config)
        await old_batcher.drain()
        return old

    async def remove(self, name: str) -> M | None:
        """Stop serving `name`: no new work, queued work finishes. Returns the model (the caller frees it)."""
        b = self.batchers.pop(name, None)
        loaded = self.models.pop(name, None)
        self.padded.pop(name, None)
        if self.default_model == name:
            self.default_model = self.first_ready(besides=name)
        if b is not None:
            await b.drain()
        return loaded

    def resolve(self, name: str | None) -> tuple[str, M]:
        """The loaded model a request asks for (or the default), or the problem that explains why there is none."""
        name = name or self.default_model
        if name is None:
            states = [(n, self.registry.states[n]) for n in self.registry.names(self.task)]
            why = "; ".join(f"{n} is {st.status}" + (f" ({st.reason})" if st.reason else "") for n, st in states)
            raise ServiceUnavailable(f"no {self.task} model is loaded" + (f": {why}" if why else "; none is "
                                     "configured"), extra={"models": [n for n, _ in states]})
        st = self.registry.states.get(name)
        if st is None or st.task != self.task:
            available = self.registry.names(self.task)
            raise NotFound(f"unknown {self.task} model {name!r}; configured: {', '.join(available) or 'none'}",
                           extra={"available": available})
        loaded = self.models.get(name)
        if loaded is None or st.status != "ready":
            why = f": {st.reason}" if st.reason else ""
            raise ServiceUnavailable(f"model {name!r} is {st.status}{why}", extra={"model": name},
                                     retry_after=5 if st.status in ("loading", "unloading") else None)
        assert isinstance(loaded, self.kind)
        return name, loaded

    async def run(self, name: str, items: Sequence[Any], loaded: M | None = None) -> list[Any]:
        """Submit one request's items to the batcher of `loaded` (the model `resolve` gave the request; during a
        swap the old copy still serves the requests that resolved it); overload and shutdown become 503."""
        try:
            return await self._submit(name, items, loaded)
        except QueueFullError as exc:
            raise ServiceUnavailable(f"model {name!r} is overloaded (queue full); retry later",
                                     retry_after=exc.retry_after) from exc
        except DeadlineExceededError as exc:
            raise DeadlineExceeded(f"the request's deadline passed before model {name!r} ran it (after "
                                   f"{exc.waited:.3f}s in its queue); nothing was computed",
                                   extra={"model": name}) from exc
        except BatcherClosedError as exc:
            raise ServiceUnavailable("the service is shutting down; retry shortly", retry_after=5) from exc

    async def _submit(self, name: str, items: Sequence[Any], loaded: M | None) -> list[Any]:
        """Submit to the batcher serving `loaded`; if that copy was swapped out meanwhile, to its successor."""
        b = self.batchers.get(name)
        current = self.models.get(name)
        if b is None or current is None:
            raise ServiceUnavailable(f"model {name!r} was unloaded while the request was being prepared",
                                     extra={"model": name})
        if loaded is not None and current is not loaded and not same_inputs(loaded, current):
            raise ServiceUnavailable(f"model {name!r} was replaced by one with other inputs while the request was "
                                     "being prepared; retry", retry_after=1, extra={"model": name})
        try:
            return await b.submit_many(items)
        except BatcherClosedError:
            nxt = self.batchers.get(name)
            if nxt is None or nxt is b or not nxt.accepting:
                raise
            return await self._submit(name, items, loaded)  # swapped between the lookup and the submit
