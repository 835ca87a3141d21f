"""The models of one task behind their micro-batchers: choose a model, submit work, map overload to 503."""

from __future__ import annotations

from collections.abc import Sequence
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


class ModelPool(Generic[M]):
    """Every loaded model of one task, each with its own batcher, and the default among them."""

    def __init__(self, registry: ModelRegistry, task: str, kind: type[M], *, default_model: str | None,
                 executor: Executor, observer: BatchObserver | None, batch_configs: dict[str, BatchConfig]) -> None:
        self.registry = registry
        self.task = task
        self.kind = kind
        self.batchers: dict[str, MicroBatcher[Any, Any]] = {}
        for name in registry.names(task):
            loaded = registry.states[name].loaded
            if loaded is not None:
                self.batchers[name] = MicroBatcher(name, loaded.forward, batch_configs[name], executor=executor,
                                                   observer=observer)
        self.default_model = default_model or self._first_ready()

    def _first_ready(self) -> str | None:
        """The first configured model that serves, preferring trained weights over untrained ones."""
        loaded = [(n, self.registry.states[n].loaded) for n in self.registry.names(self.task)]
        ready = [(n, m) for n, m in loaded if m is not None]
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
        if st.loaded is None:
            raise ServiceUnavailable(f"model {name!r} is {st.status}: {st.reason}", extra={"model": name})
        assert isinstance(st.loaded, self.kind)
        return name, st.loaded

    async def run(self, name: str, items: Sequence[Any]) -> list[Any]:
        """Submit one request's items to the model's batcher; overload and shutdown become 503."""
        try:
            return await self.batchers[name].submit_many(items)
        except QueueFullError as exc:
            raise ServiceUnavailable(f"model {name!r} is overloaded (queue full); retry later",
                                     retry_after=exc.retry_after) from exc
        except DeadlineExceededError as exc:
            raise DeadlineExceeded(f"the request's deadline passed before model {name!r} ran it (after "
                                   f"{exc.waited:.3f}s in its queue); nothing was computed",
                                   extra={"model": name}) from exc
        except BatcherClosedError as exc:
            raise ServiceUnavailable("the service is shutting down; retry shortly", retry_after=5) from exc
