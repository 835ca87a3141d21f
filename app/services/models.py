"""Run-time model management: load, unload, reload (swap weights) and set defaults on a running server.

TorchServe's management API and Triton's model control, for this service: every change keeps serving. A load
runs in the background (202 + the model's URL); an unload stops new work, lets queued work finish and frees the
memory; a reload builds the new copy beside the old one, switches atomically and drains the old one, so no
request fails during a swap. Changes are kept in the model-set store and applied again at start-up.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import gc
import hashlib
import logging
import os
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from typing import Any

import torch

from app.errors import Conflict, InvalidParameters, NotFound
from app.metrics import Metrics
from app.runtime.batcher import BatchConfig
from app.runtime.registry import LoadedModel, ModelRegistry, ModelState, WeightsOverride
from app.services.pool import ModelPool
from app.stores.model_set import ModelRecord, ModelSetStore

log = logging.getLogger(__name__)

# (action, model name, the new copy or None) -> why the change must be refused, or None
Guard = Callable[[str, str, LoadedModel | None], str | None]


def process_rss() -> int:
    """Resident set size of this process in bytes (0 where /proc is absent)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def cuda_allocated(device: torch.device) -> int | None:
    """Bytes of CUDA memory held by tensors (None off CUDA)."""
    return int(torch.cuda.memory_allocated(device)) if device.type == "cuda" else None


def model_bytes(loaded: LoadedModel | None) -> int:
    """Bytes held by a model's parameters and buffers (0 for a model that is not a torch module)."""
    module = getattr(loaded, "model", None)
    if not isinstance(module, torch.nn.Module):
        return 0
    tensors = [*module.parameters(), *module.buffers()]
    return int(sum(t.numel() * t.element_size() for t in tensors))


def release_memory(device: torch.device) -> None:
    """Return freed memory: collect cycles, give cached CUDA blocks back, trim glibc's heap."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class ModelManager:
    """The models of every task's pool, changed at run time; one action per model at a time."""

    def __init__(self, registry: ModelRegistry, store: ModelSetStore, *, metrics: Metrics, warmup: bool,
                 base_batching: Callable[[str], Mapping[str, float]], on_change: Callable[[], None]) -> None:
        self.registry = registry
        self.store = store
        self.metrics = metrics
        self.warmup = warmup
        self.base_batching = base_batching
        self.on_change = on_change
        self.pools: dict[str, ModelPool[Any]] = {}
        self.guards: list[Guard] = []
        self.busy: dict[str, str] = {}  # model -> the action under way
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model-loader")
        self._tasks: set[asyncio.Task[None]] = set()

    # -- start-up -----------------------------------------------------------------------------------------

    def startup_models(self, configured: list[tuple[str, str]]) -> list[tuple[str, str, WeightsOverride | None]]:
        """What to load at start-up: the configured models, plus those loaded at run time, minus those unloaded;
        each with the weights given at run time, if any."""
        wanted = dict(configured)
        for name, rec in self.store.models.items():
            if rec.state == "loaded":
                wanted.setdefault(name, rec.task)
            else:
                wanted.pop(name, None)
        return [(n, t, self.weights_override(n)) for n, t in wanted.items()]

    def weights_override(self, name: str) -> WeightsOverride | None:
        """The weights file given at run time for a model, if any."""
        rec = self.store.models.get(name)
        if rec is None or not rec.weights_file or not rec.weights_sha256:
            return None
        return WeightsOverride(self.store.weights_dir / rec.weights_file, rec.weights_sha256)

    def batch_config(self, name: str) -> BatchConfig:
        """A model's batcher limits: the settings, then what was set at run time."""
        values = dict(self.base_batching(name))
        rec = self.store.models.get(name)
        if rec is not None and rec.batching:
            values.update(rec.batching)
        return BatchConfig(max_batch_size=int(values["max_batch_size"]), max_wait_ms=float(values["max_wait_ms"]),
                           max_queue=int(values["max_queue"]))

    def add_pool(self, pool: ModelPool[Any]) -> None:
        """Manage a task's pool, applying the default chosen at run time when that model serves."""
        self.pools[pool.task] = pool
        name = self.store.defaults.get(pool.task)
        if name is not None and name in pool.models:
            pool.default_model = name

    async def close(self) -> None:
        """Stop background loads (a load in progress finishes in its thread and is dropped)."""
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._loader.shutdown(wait=False, cancel_futures=True)

    # -- views ----------------------------------------------------------------------------------------------

    def view(self, name: str) -> dict[str, Any]:
        """One model as /models shows it: the registry's description and what run-time management adds."""
        return {**self.registry.describe(name), **self.describe(name)}

    def listing(self) -> dict[str, Any]:
        """What /models shows of this process's models: each one's view, the defaults, the changes."""
        return {"models": [self.view(n) for n in list(self.registry.states)],
                "defaults": self.defaults(), "changes": self.history()}

    def history(self, limit: int = 50) -> list[dict[str, Any]]:
        """The run-time changes, newest first."""
        return self.store.history(limit=limit)

    def keep_weights(self, data: bytes, sha256: str) -> WeightsOverride:
        """Keep a new weights file for a reload, after checking it is the one the caller named."""
        got = hashlib.sha256(data).hexdigest()
        if got != sha256:
            raise InvalidParameters(f"the weights file has sha256 {got}, not {sha256}; nothing was changed")
        path, _ = self.store.save_weights(data)
        return WeightsOverride(path, got)

    def defaults(self) -> dict[str, str | None]:
        """The default model of each task."""
        return {task: pool.default_model for task, pool in self.pools.items()}

    def describe(self, name: str) -> dict[str, Any]:
        """What run-time management adds to a model's /models view."""
        rec = self.store.models.get(name)
        pool = self.pools.get(self.registry.states[name].task) if name in self.registry.states else None
        b = pool.batchers.get(name) if pool is not None else None
        runtime = rec is not None or self.busy.get(name) == "loading"
        return {"origin": "runtime" if runtime else "settings",
                "changed_at": rec.changed_at if rec is not None else None,
                "batching": asdict(b.config) if b is not None else None,
                "busy": self.busy.get(name)}

    # -- actions --------------------------------------------------------------------------------------------

    def _claim(self, name: str, action: str) -> None:
        if name in self.busy:
            raise Conflict(f"model {name!r} is busy ({self.busy[name]}); retry when it is done",
                           extra={"model": name, "busy": self.busy[name]})
        self.busy[name] = action

    def _guard(self, action: str, name: str, new: LoadedModel | None) -> None:
        for guard in self.guards:
            why = guard(action, name, new)
            if why:
                raise Conflict(why, extra={"model": name})

    def _pool(self, task: str) -> ModelPool[Any]:
        pool = self.pools.get(task)
        if pool is None:
            raise Conflict(f"no application of this server serves {task} models",
                           extra={"tasks": sorted(self.pools)})
        return pool

    async def load(self, name: str, *, by: str) -> ModelState:
        """Start loading a model (manifest name or torchvision classifier); returns its `loading` state."""
        try:
            spec = self.registry.spec_for(name)
        except KeyError:
            raise NotFound(f"unknown model {name!r}: not in the manifest and not a torchvision classifier",
                           extra={"model": name}) from None
        pool = self._pool(spec.task)
        st = self.registry.states.get(name)
        if st is not None and st.status in ("ready", "unloading"):
            raise Conflict(f"model {name!r} is {st.status}; reload it to change its weights", extra={"model": name})
        self._claim(name, "loading")
        state = ModelState(name=name, task=spec.task, status="loading", spec=spec)
        self.registry.states[name] = state
        task = asyncio.create_task(self._finish_load(name, spec.task, pool, by))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return state

    async def _finish_load(self, name: str, task: str, pool: ModelPool[Any], by: str) -> None:
        try:
            loop = asyncio.get_running_loop()
            build = functools.partial(self.registry.build, name, task, warmup=self.warmup)
            st = await loop.run_in_executor(self._loader, build)
            if st.loaded is not None and st.status == "ready":
                await pool.add(name, st.loaded, self.batch_config(name), warm=self.warmup)
            rec = self.store.models.get(name)
            batching = rec.batching if rec is not None else None
            detail = st.status + (f" ({st.reason})" if st.reason else "") + f" in {st.load_seconds or 0:.2f}s"
            # recorded before it shows: once /models says ready, the load is over (an unload is not refused as busy)
            await asyncio.to_thread(self.store.record, "load", name, by, detail,
                                    update={name: ModelRecord("loaded", task, batching=batching)})
            # from here to the end (busy released in finally) no await: requests, /models and readiness see the
            # model ready all at once
            self.registry.states[name] = st
            if pool.default_model is None:
                pool.default_model = pool.first_ready()
            self.on_change()
            self.metrics.model_ready.labels(name, task).set(1 if st.status == "ready" else 0)
            log.info("model %s loaded at run time by %s: %s", name, by, detail)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the state says why; the server keeps serving
            log.exception("run-time load of %s failed", name)
            self.registry.states[name] = ModelState(name=name, task=task, status="failed",
                                                    reason=f"loading failed: {type(exc).__name__}: {exc}")
        finally:
            self.busy.pop(name, None)
            self.on_change()

    async def unload(self, name: str, *, by: str) -> dict[str, Any]:
        """Stop new work for a model, finish its queued work, free it; says how much memory came back."""
        st = self.registry.states.get(name)
        if st is None:
            raise NotFound(f"model {name!r} is not loaded", extra={"model": name})
        if st.status == "loading":
            raise Conflict(f"model {name!r} is still loading; unload it when it is done", extra={"model": name})
        self._guard("unload", name, None)
        self._claim(name, "unloading")
        device = self.registry.device
        try:
            rss_before, cuda_before = process_rss(), cuda_allocated(device)
            params = model_bytes(st.loaded)
            previous_status = st.status
            st.status = "unloading"
            pool = self.pools.get(st.task)
            if pool is not None:
                await pool.remove(name)
            self.registry.states.pop(name, None)
            st.loaded = None
            del st
            await asyncio.to_thread(release_memory, device)
            rss_after, cuda_after = process_rss(), cuda_allocated(device)
            task = self._task_of(name, pool)
            freed = {"parameter_bytes": params, "rss_before": rss_before, "rss_after": rss_after,
                     "rss_freed": rss_before - rss_after, "cuda_allocated_before": cuda_before,
                     "cuda_allocated_after": cuda_after}
            self.metrics.model_ready.labels(name, task).set(0)
            defaults: dict[str, str | None] | None = {task: None} if self.store.defaults.get(task) == name else None
            await asyncio.to_thread(self.store.record, "unload", name, by,
                                    f"was {previous_status}; {params} parameter bytes freed, resident memory "
                                    f"{rss_before - rss_after} bytes lower",
                                    update={name: ModelRecord("unloaded", task)}, defaults=defaults)
            return {"name": name, "task": task, "status": "unloaded", "freed": freed,
                    "default_model": pool.default_model if pool is not None else None}
        finally:
            self.busy.pop(name, None)
            self.on_change()

    @staticmethod
    def _task_of(name: str, pool: ModelPool[Any] | None) -> str:
        return pool.task if pool is not None else "unknown"

    async def reload(self, name: str, *, by: str, weights: WeightsOverride | None = None) -> dict[str, Any]:
        """Build a new copy (from the given weights file, else the manifest read again) beside the serving one,
        switch to it at once, drain and free the old one. A copy that fails to load changes nothing."""
        st = self.registry.states.get(name)
        if st is None:
            raise NotFound(f"model {name!r} is not loaded; load it first", extra={"model": name})
        if st.status != "ready" or st.loaded is None:
            raise Conflict(f"model {name!r} is {st.status}; only a serving model can be reloaded (load it instead)",
                           extra={"model": name})
        self._claim(name, "reloading")
        try:
            if weights is None:
                try:
                    await asyncio.to_thread(self.registry.refresh_manifest)
                except Exception as exc:
                    raise InvalidParameters(f"the manifest cannot be read: {exc}") from exc
            loop = asyncio.get_running_loop()
            build = functools.partial(self.registry.build, name, st.task, warmup=self.warmup, weights=weights)
            new = await loop.run_in_executor(self._loader, build)
            if new.status != "ready" or new.loaded is None:
                why = (new.reason or "").splitlines()[0][:200]  # torch's unpickling errors run to paragraphs
                raise InvalidParameters(f"the new copy of {name!r} did not load ({new.status}: {why}); "
                                        "the serving copy is unchanged", extra={"model": name})
            self._guard("reload", name, new.loaded)
            old_sha = _sha(st)
            pool = self._pool(st.task)
            params = model_bytes(st.loaded)
            self.registry.states[name] = new
            old = await pool.swap(name, new.loaded, pool.batchers[name].config)
            st.loaded = None
            del old, st
            await asyncio.to_thread(release_memory, self.registry.device)
            rec = self.store.models.get(name)
            record = ModelRecord("loaded", new.task,
                                 weights_file=weights.path.name if weights is not None else None,
                                 weights_sha256=weights.sha256 if weights is not None else None,
                                 batching=rec.batching if rec is not None else None)
            await asyncio.to_thread(self.store.record, "reload", name, by, f"sha256 {old_sha} -> {_sha(new)}",
                                    update={name: record})
            return {"name": name, "task": new.task, "status": "ready", "previous_sha256": old_sha,
                    "sha256": _sha(new), "weights_source": new.loaded.weights_source,
                    "load_seconds": new.load_seconds, "freed_parameter_bytes": params}
        finally:
            self.busy.pop(name, None)
            self.on_change()

    async def set_defaults(self, mapping: Mapping[str, str], *, by: str) -> dict[str, str | None]:
        """Make each named model its task's default (all or nothing)."""
        problems = []
        for task, name in mapping.items():
            st = self.registry.states.get(name)
            if task not in self.pools:
                problems.append(f"unknown task {task!r} (known: {', '.join(sorted(self.pools))})")
            elif st is None:
                problems.append(f"{task}: model {name!r} is not loaded")
            elif st.task != task:
                problems.append(f"{task}: {name!r} is a {st.task} model")
            elif st.status != "ready" or name not in self.pools[task].models:
                problems.append(f"{task}: model {name!r} is {st.status}")
        if problems or not mapping:
            raise InvalidParameters("; ".join(problems) or "name at least one task",
                                    extra={"errors": problems})
        for name in mapping.values():
            self._guard("default", name, None)
        for task, name in mapping.items():
            self.pools[task].default_model = name
        detail = ", ".join(f"{t}={n}" for t, n in mapping.items())
        await asyncio.to_thread(self.store.record, "defaults", None, by, detail, defaults=dict(mapping))
        self.on_change()
        return self.defaults()

    def batching(self, name: str) -> BatchConfig:
        """A serving model's batcher limits."""
        return self._batcher(name).config

    def _batcher(self, name: str) -> Any:
        st = self.registry.states.get(name)
        pool = self.pools.get(st.task) if st is not None else None
        b = pool.batchers.get(name) if pool is not None else None
        if b is None:
            raise NotFound(f"model {name!r} is not serving", extra={"model": name})
        return b

    async def set_batching(self, name: str, values: Mapping[str, float], *, by: str) -> BatchConfig:
        """Change a serving model's batcher limits from its next batch on (kept across restarts)."""
        b = self._batcher(name)
        merged = {**asdict(b.config), **values}
        try:
            config = BatchConfig(**merged)
        except (TypeError, ValueError) as exc:
            raise InvalidParameters(str(exc)) from exc
        b.reconfigure(config)
        st = self.registry.states[name]
        rec = self.store.models.get(name)
        record = (ModelRecord("loaded", st.task, rec.weights_file, rec.weights_sha256, batching=asdict(config))
                  if rec is not None else ModelRecord("loaded", st.task, batching=asdict(config)))
        await asyncio.to_thread(self.store.record, "batching", name, by,
                                ", ".join(f"{k}={v}" for k, v in asdict(config).items()), update={name: record})
        return config


def _sha(st: ModelState) -> str | None:
    """The sha256 (or torchvision hash prefix) of the weights a model state was built from."""
    if st.spec is None:
        return None
    if st.loaded is not None and st.loaded.weights_tag != "trained":
        return "untrained"
    return st.spec.weights.sha256 or st.spec.weights.hash_prefix

