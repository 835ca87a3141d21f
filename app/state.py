"""The typed state the lifespan builds and the dependencies hand to routers."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from app.metrics import Metrics
from app.runtime.registry import ModelRegistry
from app.services.classification import ClassificationService
from app.services.faces import FacesService
from app.services.pool import ModelPool
from app.services.style import StyleJobs, StyleWorker
from app.services.text import TextService
from app.settings import Settings


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
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    startup_error: str | None = None
