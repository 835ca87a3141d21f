"""One declaration per application: its task, loaded-model adapter, service factory, routers, route policies
and settings section. `create_app` and the lifespan iterate over the declared applications, so adding one is
one module plus its declaration (docs/adding-an-application.md)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter
from pydantic_settings import BaseSettings

from app.gate import RoutePolicy
from app.metrics import Metrics
from app.runtime.registry import LoadedModel, ModelRegistry
from app.services.pool import ModelPool
from app.settings import Settings
from app.state import AppStatus


@dataclass
class AppContext:
    """What an application's start function gets: settings (the shared ones and its own section), the model
    registry, the pool of its task's models (already started; None without a task), the inference executor."""

    settings: Settings
    section: BaseSettings | None
    registry: ModelRegistry
    pool: ModelPool[Any] | None
    executor: Executor
    metrics: Metrics


@dataclass
class Started:
    """What a start function returns: the service routers reach through the dependencies, its status (None: the
    pool decides, ready when the default model serves), how to refine a pool-derived status later (faces: a
    broken detector), what to run at shutdown, and where its other processes' metrics and models come from."""

    service: Any
    status: AppStatus | None = None
    refine: Callable[[AppStatus], AppStatus] | None = None
    stop: Callable[[], Awaitable[None]] | None = None
    # metrics the application's other processes hold (Ray Serve: its replicas), merged into /metrics
    metrics: Callable[[], Awaitable[list[tuple[dict[str, str], str]]]] | None = None
    # the model listing its other processes hold (Ray Serve: its deployment), shown by /models
    models: Callable[[], Awaitable[dict[str, Any]]] | None = None
    # the status its other processes report now (Ray Serve: its deployment), asked again at each readiness check
    status_source: Callable[[], Awaitable[AppStatus]] | None = None


def _no_models(settings: Settings) -> Sequence[str]:
    return ()


def _no_default(settings: Settings) -> str | None:
    return None


@dataclass(frozen=True)
class Application:
    """An application of the service, declared once."""

    name: str
    start: Callable[[AppContext], Awaitable[Started]]
    routers: tuple[APIRouter, ...] = ()
    policies: Mapping[tuple[str, str], RoutePolicy] = field(default_factory=dict)
    task: str | None = None  # the model task its pool serves (as /models spells it)
    adapter: type[LoadedModel] | None = None  # how a model of that task is served (preprocess -> forward)
    models: Callable[[Settings], Sequence[str]] = _no_models  # models loaded at start-up
    default_model: Callable[[Settings], str | None] = _no_default
    enabled: Callable[[Settings], bool] | None = None  # default: some model is configured (always, without a task)
    section: type[BaseSettings] | None = None  # its own settings (read from the environment with their prefix)
    always_start: bool = True  # start even when disabled (answers say what is missing); False: not at all
    # (service, action, model, new copy or None) -> why a run-time model change must be refused (faces: the
    # gallery's embeddings belong to one model)
    guard: Callable[[Any, str, str, LoadedModel | None], str | None] | None = None

    def is_enabled(self, settings: Settings) -> bool:
        """Whether this configuration serves the application."""
        if self.enabled is not None:
            return self.enabled(settings)
        return bool(self.models(settings)) if self.task else True


def pool_status(registry: ModelRegistry, pool: ModelPool[Any], names: Sequence[str]) -> AppStatus:
    """ready when the application's default model serves, else unavailable with the reason."""
    default = pool.default_model
    st = registry.states.get(default) if default else None
    if st is not None and st.status == "ready":
        return AppStatus("ready", default_model=default)
    wanted = [default] if default else list(names)
    parts = [f"{n}: {registry.states[n].status}" + (f" ({registry.states[n].reason})" if registry.states[n].reason
                                                     else "") for n in wanted if n in registry.states]
    return AppStatus("unavailable", "; ".join(parts) or "no model is configured", default_model=default)


def route_policies(core: Mapping[tuple[str, str], RoutePolicy],
                   applications: Sequence[Application]) -> dict[tuple[str, str], RoutePolicy]:
    """The gate's table: the core routes' policies and every application's, each route declared once."""
    table = dict(core)
    for a in applications:
        clash = set(table) & set(a.policies)
        if clash:
            raise ValueError(f"application {a.name!r} declares routes already declared: {sorted(clash)}")
        table.update(a.policies)
    return table
