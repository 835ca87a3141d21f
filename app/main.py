"""create_app() and the lifespan: models load and stores open here, never at import time."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI

from app.api import classify, faces, health, models, style, text
from app.deps import require_api_key
from app.errors import install_handlers
from app.metrics import Metrics
from app.middleware import ServiceMiddleware
from app.runtime.batcher import BatchConfig
from app.runtime.device import configure_torch, select_device
from app.runtime.registry import (
    LoadedClassifier,
    LoadedFaceEmbedder,
    LoadedTextClassifier,
    ModelRegistry,
    hub_checkpoint_dir,
)
from app.services.classification import ClassificationService
from app.services.faces import DetectorPool, FacesService
from app.services.pool import ModelPool
from app.services.style import FeatureSource, StyleJobs, StyleLimits, StyleWorker
from app.services.text import TextService
from app.settings import Settings
from app.state import AppState
from app.stores.gallery import GalleryStore, ModelKey
from app.stores.jobs import JobStore
from models.faces.detect import HaarParams

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
    wanted = ([(n, "image-classification") for n in s.classifiers] + [(n, "text-classification") for n in s.text_models]
              + [(n, "face-embedding") for n in s.face_models])
    for name, task in dict.fromkeys(wanted):
        st = registry.load(name, task, warmup=s.warmup)
        state.metrics.model_ready.labels(name, st.task).set(1 if st.status == "ready" else 0)
        log.info("model %s: %s%s", name, st.status, f" ({st.reason})" if st.reason else "")
    return registry


def _batch_config(s: Settings, model: str) -> BatchConfig:
    c = s.batch_config_for(model)
    return BatchConfig(max_batch_size=int(c["max_batch_size"]), max_wait_ms=float(c["max_wait_ms"]),
                       max_queue=int(c["max_queue"]))


def _open_faces(state: AppState, pool: ModelPool[LoadedFaceEmbedder]) -> None:
    """Open the gallery for the default face model (blocking: it may rebuild the index) and the service."""
    s = state.settings
    gallery = None
    if pool.default_model is not None:
        _, loaded = pool.resolve(pool.default_model)
        key = ModelKey(pool.default_model, loaded.sha256, loaded.dim)
        gallery = GalleryStore(s.data_dir / "gallery", key, index_kind=s.gallery_index, nlist=s.gallery_ivf_nlist,
                               nprobe=s.gallery_ivf_nprobe, use_gpu=s.gallery_gpu)
        log.info("face gallery: %s", gallery.stats())
    params = HaarParams(scale_factor=s.face_haar_scale_factor, min_neighbors=s.face_haar_min_neighbors,
                        min_size=s.face_haar_min_size, max_side=s.face_haar_max_side)
    state.faces = FacesService(pool, gallery, DetectorPool(params), default_detector=s.face_detector,
                               max_faces=s.face_max_faces, threshold_override=s.face_threshold,
                               max_image_bytes=s.max_image_bytes, max_image_pixels=s.max_image_pixels,
                               max_images=s.max_images_per_request)


def _open_style(state: AppState, registry: ModelRegistry) -> None:
    """Open the job store, recover jobs a crash left running, and start the in-process workers."""
    s = state.settings
    store = JobStore(s.data_dir / "style-jobs", stale_after=s.style_stale_seconds)
    limits = StyleLimits(max_size=s.style_max_size, max_steps=s.style_max_steps, max_styles=s.style_max_styles,
                         max_queue=s.style_max_queue, max_image_bytes=s.max_image_bytes,
                         max_image_pixels=s.max_image_pixels)
    worker = StyleWorker(store, FeatureSource(s.weights_dir, registry.hub_dir), registry.device,
                         ttl_seconds=s.style_ttl_hours * 3600, on_finish=state.metrics.style_job_finished)
    if s.style_workers > 0:
        worker.start(s.style_workers)
        state.style_worker = worker
    else:
        worker.recover()
    state.style = StyleJobs(store, limits, wake=worker.wake if s.style_workers > 0 else None)


async def _start(state: AppState) -> None:
    """Load models off the event loop, then start the services and mark the app ready."""
    s = state.settings
    try:
        registry = await asyncio.get_running_loop().run_in_executor(None, _load_models, state)
        configs = {n: _batch_config(s, n) for n in registry.states}
        common: dict[str, Any] = {"executor": state.executor, "observer": state.metrics, "batch_configs": configs}
        images = ModelPool(registry, "image-classification", LoadedClassifier, default_model=s.default_classifier,
                           **common)
        texts = ModelPool(registry, "text-classification", LoadedTextClassifier, default_model=s.default_text_model,
                          **common)
        face_pool = ModelPool(registry, "face-embedding", LoadedFaceEmbedder, default_model=s.face_model, **common)
        for pool in (images, texts, face_pool):
            await pool.start()
        state.pools = [images, texts, face_pool]
        state.classification = ClassificationService(images, max_image_bytes=s.max_image_bytes,
                                                     max_image_pixels=s.max_image_pixels,
                                                     max_images=s.max_images_per_request)
        state.text = TextService(texts, max_texts=s.max_texts_per_request, max_text_chars=s.max_text_chars)
        await asyncio.to_thread(_open_faces, state, face_pool)
        state.registry = registry
        if s.style_enabled:
            await asyncio.to_thread(_open_style, state, registry)
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
            for pool in state.pools:
                await pool.close()
            if state.style_worker is not None:
                await asyncio.to_thread(state.style_worker.stop)
            if state.faces is not None and state.faces.gallery is not None:
                await asyncio.to_thread(state.faces.gallery.close)  # writes the index snapshot
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
    app.include_router(text.router, dependencies=protected)
    app.include_router(faces.router, dependencies=protected)
    app.include_router(style.router, dependencies=protected)
    return app
