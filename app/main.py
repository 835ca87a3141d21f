"""create_app() and the lifespan: models load and stores open here, never at import time."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from app.api import classify, faces, health, models, style, text, ui
from app.api.schemas import Problem
from app.errors import install_handlers
from app.gate import APPLICATIONS, Admission, KeyRing, policy_for
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
from app.state import AppState, AppStatus
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
                               max_images=s.max_images_per_request, max_image_side=s.max_image_side,
                               max_aspect_ratio=s.max_aspect_ratio, identify_fpir=s.face_identify_fpir,
                               enroll_min_side=s.face_enroll_min_side,
                               enroll_min_sharpness=s.face_enroll_min_sharpness)


def _open_style(state: AppState, registry: ModelRegistry) -> None:
    """Check the feature network, open the job store, recover jobs a crash left running, start the workers."""
    s = state.settings
    features = FeatureSource(s.weights_dir, registry.hub_dir)
    if s.warmup and s.style_workers > 0:
        features.get(registry.device)  # build it now, so the first job does not pay for it
    else:
        features.check()  # a damaged file fails style here, at start-up, not job after job
    store = JobStore(s.data_dir / "style-jobs", stale_after=s.style_stale_seconds,
                     max_finished=s.style_max_finished_jobs, max_finished_bytes=s.style_max_finished_bytes)
    limits = StyleLimits(max_size=s.style_max_size, max_steps=s.style_max_steps, max_styles=s.style_max_styles,
                         max_queue=s.style_max_queue, max_image_bytes=s.max_image_bytes,
                         max_image_pixels=s.max_image_pixels, max_image_side=s.max_image_side,
                         max_aspect_ratio=s.max_aspect_ratio)
    worker = StyleWorker(store, features, registry.device,
                         ttl_seconds=s.style_ttl_hours * 3600, on_finish=state.metrics.style_job_finished)
    if s.style_workers > 0:
        worker.start(s.style_workers)
        state.style_worker = worker
    else:
        worker.recover()
    state.style = StyleJobs(store, limits, wake=worker.wake if s.style_workers > 0 else None)


def _model_reason(registry: ModelRegistry, names: list[str], default: str | None) -> str:
    """Why no model of an application serves: the default's reason, else each configured model's."""
    wanted = [default] if default else names
    parts = [f"{n}: {registry.states[n].status}" + (f" ({registry.states[n].reason})" if registry.states[n].reason
                                                     else "") for n in wanted if n in registry.states]
    return "; ".join(parts) or "no model is configured"


def _pool_status(registry: ModelRegistry, pool: ModelPool[Any], names: list[str]) -> AppStatus:
    """ready when the application's default model serves, else unavailable with the reason."""
    default = pool.default_model
    st = registry.states.get(default) if default else None
    if st is not None and st.status == "ready":
        return AppStatus("ready", default_model=default)
    return AppStatus("unavailable", _model_reason(registry, names, default), default_model=default)


async def _start_classification(state: AppState, registry: ModelRegistry, common: dict[str, Any]) -> AppStatus:
    s = state.settings
    images = ModelPool(registry, "image-classification", LoadedClassifier, default_model=s.default_classifier,
                       **common)
    await images.start()
    state.pools.append(images)
    state.classification = ClassificationService(images, max_image_bytes=s.max_image_bytes,
                                                 max_image_pixels=s.max_image_pixels,
                                                 max_images=s.max_images_per_request,
                                                 max_image_side=s.max_image_side,
                                                 max_aspect_ratio=s.max_aspect_ratio)
    return _pool_status(registry, images, s.classifiers)


async def _start_text(state: AppState, registry: ModelRegistry, common: dict[str, Any]) -> AppStatus:
    s = state.settings
    texts = ModelPool(registry, "text-classification", LoadedTextClassifier, default_model=s.default_text_model,
                      **common)
    await texts.start()
    state.pools.append(texts)
    state.text = TextService(texts, max_texts=s.max_texts_per_request, max_text_chars=s.max_text_chars)
    return _pool_status(registry, texts, s.text_models)


async def _start_faces(state: AppState, registry: ModelRegistry, common: dict[str, Any]) -> AppStatus:
    s = state.settings
    face_pool = ModelPool(registry, "face-embedding", LoadedFaceEmbedder, default_model=s.face_model, **common)
    await face_pool.start()
    state.pools.append(face_pool)
    await asyncio.to_thread(_open_faces, state, face_pool)
    status = _pool_status(registry, face_pool, s.face_models)
    assert state.faces is not None
    broken = state.faces.detectors.errors
    if status.status == "ready" and broken:
        reason = "; ".join(f"face detector {n} unavailable: {e}" for n, e in broken.items())
        # requests for a working detector still serve; readiness fails only when the default detector is broken
        status = AppStatus("degraded" if s.face_detector in broken else "ready", reason,
                           default_model=status.default_model)
    return status


async def _start_style(state: AppState, registry: ModelRegistry, common: dict[str, Any]) -> AppStatus:
    await asyncio.to_thread(_open_style, state, registry)
    return AppStatus("ready")


STARTERS = {"classification": _start_classification, "text": _start_text, "faces": _start_faces,
            "style": _start_style}


def enabled_applications(s: Settings) -> list[str]:
    """The applications this configuration serves."""
    on = {"classification": bool(s.classifiers), "text": bool(s.text_models), "faces": bool(s.face_models),
          "style": s.style_enabled}
    return [a for a in APPLICATIONS if on[a]]


async def _start(state: AppState) -> None:
    """Load models off the event loop, then start each application on its own: one that fails is reported
    with its reason while the others serve."""
    s = state.settings
    enabled = enabled_applications(s)
    for a in APPLICATIONS:
        state.applications[a] = AppStatus("loading" if a in enabled else "disabled")
    try:
        try:
            registry = await asyncio.get_running_loop().run_in_executor(None, _load_models, state)
        except Exception as exc:  # no device or no manifest: nothing that needs a model can start
            log.exception("loading models failed")
            reason = f"loading models failed: {type(exc).__name__}: {exc}"
            for a in enabled:
                state.applications[a] = AppStatus("failed", reason)
            return
        configs = {n: _batch_config(s, n) for n in registry.states}
        common: dict[str, Any] = {"executor": state.executor, "observer": state.metrics, "batch_configs": configs}
        state.registry = registry
        for a in APPLICATIONS:
            if a not in enabled and a == "style":
                continue  # no workers, no store: disabled
            try:
                st = await STARTERS[a](state, registry, common)
                # without models the service still answers, with the 503/404 that says what is missing
                state.applications[a] = st if a in enabled else AppStatus("disabled")
            except Exception as exc:  # keep serving the others and /health, so the failure is visible
                log.exception("application %s failed to start", a)
                state.applications[a] = AppStatus("failed", f"{type(exc).__name__}: {exc}")
            st = state.applications[a]
            log.info("application %s: %s%s", a, st.status, f" ({st.reason})" if st.reason else "")
    finally:
        state.ready.set()


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the FastAPI application (nothing heavy happens until the lifespan runs)."""
    settings = settings or Settings()
    metrics = Metrics()
    keys = KeyRing.build(settings.api_keys, settings.api_keys_file)  # a bad keys file stops start-up here
    admission = Admission({a: settings.in_flight_limit(a) for a in APPLICATIONS})

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, AppState]]:
        executor = ThreadPoolExecutor(max_workers=settings.inference_threads, thread_name_prefix="inference")
        state = AppState(settings=settings, metrics=metrics, executor=executor, admission=admission,
                         keys_enabled=keys.enabled)
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
        docs_url=None,  # /docs and /redoc come from app/api/ui.py, with their assets served here (offline)
        redoc_url=None,
    )
    install_handlers(app)
    app.add_middleware(ServiceMiddleware, metrics=metrics, max_body_bytes=settings.max_body_bytes,
                       keys=keys, admission=admission,
                       default_timeout=settings.request_timeout_seconds)
    for router in (health.router, models.router, classify.router, text.router, faces.router, style.router,
                   ui.router):
        app.include_router(router)  # who may call what is the gate's table (app/gate.py), checked before the body
    _document_gate(app)
    return app


def _document_gate(app: FastAPI) -> None:
    """Put the gate's table into /openapi.json: the security schemes, each operation's required scope, and the
    401/403/503/504 answers the gate can give before the route runs."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = build()
        components = schema.setdefault("components", {})
        components.setdefault("securitySchemes", {}).update({
            "APIKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
            "Bearer": {"type": "http", "scheme": "bearer"}})
        problem = {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}
        components.setdefault("schemas", {}).setdefault("Problem", Problem.model_json_schema())
        for path, ops in schema.get("paths", {}).items():
            for method, op in ops.items():
                policy = policy_for(method.upper(), path)
                responses = op.setdefault("responses", {})
                if policy.scope:
                    op["security"] = [{"APIKey": []}, {"Bearer": []}]
                    op["x-required-scope"] = policy.scope
                    responses.setdefault("401", {"description": "API keys are on and none or a wrong one was sent",
                                                 "content": problem})
                    responses.setdefault("403", {"description": f"the principal lacks the {policy.scope!r} scope",
                                                 "content": problem})
                if policy.application:
                    responses.setdefault("503", {"description": f"{policy.application} is at its in-flight bound "
                                                 "(Retry-After) or not available", "content": problem})
                    responses.setdefault("504", {"description": "the X-Request-Timeout deadline passed before the "
                                                 "work ran", "content": problem})
                responses.setdefault("422", {"description": "invalid parameters or X-Request-Timeout",
                                             "content": problem})
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
