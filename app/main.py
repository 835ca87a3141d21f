"""create_app() and the lifespan: models load and stores open here, never at import time."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI

from app.api import classify, health, models
from app.deps import require_api_key
from app.errors import install_handlers
from app.metrics import Metrics
from app.middleware import ServiceMiddleware
from app.runtime.batcher import BatchConfig
from app.runtime.device import configure_torch, select_device
from app.runtime.registry import ModelRegistry, hub_checkpoint_dir
from app.services.classification import ClassificationService
from app.settings import Settings
from app.state import AppState

log = logging.getLogger("app")


def _load_models(state: AppState) -> ModelRegistry:
    """Blocking: resolve and load every configured model (runs in a worker thread)."""
    s = state.settings
    device = select_device(s.device)
    configure_torch(device, s.torch_threads)
    registry = ModelRegistry(
        s.weights_dir, hub_checkpoint_dir(s.torch_home), device,
        allow_download=s.allow_downloads, allow_untrained=s.allow_untrained, compile_model=s.compile,
    )
    for name in dict.fromkeys(s.classifiers):
        st = registry.load_classifier(name, warmup=s.warmup)
        state.metrics.model_ready.labels(name, st.task).set(1 if st.status == "ready" else 0)
        log.info("model %s: %s%s", name, st.status, f" ({st.reason})" if st.reason else "")
    return registry


def _batch_config(s: Settings, model: str) -> BatchConfig:
    c = s.batch_config_for(model)
    return BatchConfig(max_batch_size=int(c["max_batch_size"]), max_wait_ms=float(c["max_wait_ms"]),
                       max_queue=int(c["max_queue"]))


async def _start(state: AppState) -> None:
    """Load models off the event loop, then start the services and mark the app ready."""
    s = state.settings
    try:
        registry = await asyncio.get_running_loop().run_in_executor(None, _load_models, state)
        configs = {n: _batch_config(s, n) for n in registry.states}
        service = ClassificationService(
            registry, default_model=s.default_classifier, max_image_bytes=s.max_image_bytes,
            max_image_pixels=s.max_image_pixels, max_images=s.max_images_per_request, executor=state.executor,
            observer=state.metrics, batch_configs=configs,
        )
        await service.start()
        state.registry, state.classification = registry, service
    except Exception as exc:  # keep serving /health so the failure is visible, not a crash loop
        log.exception("start-up failed")
        state.startup_error = f"{type(exc).__name__}: {exc}"
    finally:
        state.ready.set()


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the FastAPI application (nothing heavy happens until the lifespan runs)."""
    settings = settings or Settings()
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, AppState]]:
        executor = ThreadPoolExecutor(max_workers=settings.inference_threads, thread_name_prefix="inference")
        state = AppState(settings=settings, metrics=metrics, executor=executor)
        loader = asyncio.create_task(_start(state))
        try:
            yield {"app_state": state}
        finally:
            loader.cancel()
            await asyncio.gather(loader, return_exceptions=True)
            if state.classification is not None:
                await state.classification.close()
            executor.shutdown(wait=True, cancel_futures=True)

    app = FastAPI(
        title="CNN applications service",
        version="0.1.0",
        description="Image classification, face verification and identification, character-level text "
        "categorisation and neural style transfer behind one API. Errors are RFC 9457 problem details.",
        lifespan=lifespan,
    )
    install_handlers(app)
    app.add_middleware(ServiceMiddleware, metrics=metrics, max_body_bytes=settings.max_body_bytes)
    app.include_router(health.router)
    protected = [Depends(require_api_key)]
    app.include_router(models.router, dependencies=protected)
    app.include_router(classify.router, dependencies=protected)
    return app
