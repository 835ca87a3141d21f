"""The typed state the lifespan builds and the dependencies hand to routers."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from app.gate import Admission
from app.metrics import Metrics
from app.runtime.registry import ModelRegistry
from app.services.classification import ClassificationService
from app.services.faces import FacesService
from app.services.style import StyleJobs
from app.services.text import TextService
from app.settings import Settings

if TYPE_CHECKING:
    from app.services.models import ModelManager


@dataclass(frozen=True)
class AppStatus:
    """One application's state: loading, ready, degraded (serves, but its default path is broken),
    unavailable (no model serves), failed (start-up raised) or disabled."""

    status: str
    reason: str | None = None
    default_model: str | None = None

    @property
    def serving(self) -> bool:
        return self.status in ("ready", "degraded")


@dataclass
class AppState:
    """Everything a request may need; created in the lifespan, never at import."""

    settings: Settings
    metrics: Metrics
    executor: ThreadPoolExecutor
    registry: ModelRegistry | None = None
    models: ModelManager | None = None  # run-time model management (load, unload, reload, defaults)
    services: dict[str, Any] = field(default_factory=dict)  # application name -> its started service
    admission: Admission | None = None
    keys_enabled: bool = False
    declared: tuple[Any, ...] = ()  # the Application declarations this server was built with
    pools: list[Any] = field(default_factory=list)  # every task's ModelPool, closed at shutdown
    stops: list[Callable[[], Awaitable[None]]] = field(default_factory=list)  # applications' shutdown hooks
    refiners: dict[str, Callable[[AppStatus], AppStatus]] = field(default_factory=dict)
    # applications whose status lives in other processes (Ray Serve deployments): asked at each readiness check
    status_sources: dict[str, Callable[[], Awaitable[AppStatus]]] = field(default_factory=dict)
    # expositions other processes contribute to /metrics, each as (labels to add, Prometheus text) pairs
    metrics_sources: list[Callable[[], Awaitable[list[tuple[dict[str, str], str]]]]] = field(default_factory=list)
    # model listings other processes hold (Ray Serve: each application's deployment), by application
    model_sources: dict[str, Callable[[], Awaitable[dict[str, Any]]]] = field(default_factory=dict)
    applications: dict[str, AppStatus] = field(default_factory=dict)
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    # the job store's style counts being read for /metrics (off the event loop; one read at a time)
    style_counts_read: asyncio.Future[dict[str, int]] | None = None

    # typed views of the shipped applications' services (None until started)
    @property
    def classification(self) -> ClassificationService | None:
        svc: ClassificationService | None = self.services.get("classification")
        return svc

    @property
    def text(self) -> TextService | None:
        svc: TextService | None = self.services.get("text")
        return svc

    @property
    def faces(self) -> FacesService | None:
        svc: FacesService | None = self.services.get("faces")
        return svc

    @property
    def style(self) -> StyleJobs | None:
        svc: StyleJobs | None = self.services.get("style")
        return svc
