"""The typed state the lifespan builds and the dependencies hand to routers."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from app.gate import Admission
from app.metrics import Metrics
from app.runtime.registry import ModelRegistry
from app.services.classification import ClassificationService
from app.services.faces import FacesService
from app.services.pool import ModelPool
from app.services.style import StyleJobs, StyleWorker
from app.services.text import TextService
from app.settings import Settings


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
    classification: ClassificationService | None = None
    text: TextService | None = None
    faces: FacesService | None = None
    pools: list[ModelPool[Any]] = field(default_factory=list)
    style: StyleJobs | None = None
    style_worker: StyleWorker | None = None
    admission: Admission | None = None
    keys_enabled: bool = False
    applications: dict[str, AppStatus] = field(default_factory=dict)
    ready: asyncio.Event = field(default_factory=asyncio.Event)
