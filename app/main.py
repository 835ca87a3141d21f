"""create_app() and the lifespan: models load and stores open here, never at import time."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from app.api import health, models, ui
from app.api.schemas import Problem
from app.application import AppContext, Application, Started, pool_status, route_policies
from app.apps import BUILTIN
from app.errors import install_handlers
from app.gate import CORE_POLICIES, Admission, KeyRing, RoutePolicy, policy_for
from app.metrics import Metrics
from app.middleware import ServiceMiddleware
from app.runtime.device import configure_torch, select_device
from app.runtime.registry import ModelRegistry, hub_checkpoint_dir
from app.services.models import ModelManager
from app.services.pool import ModelPool
from app.settings import Settings
from app.state import AppState, AppStatus
from app.stores.model_set import ModelSetStore

log = logging.getLogger("app")


def _load_models(state: AppState, apps: Sequence[Application], manager_store: ModelSetStore) -> ModelManager:
    """Blocking: resolve and load every configured model, and those changed at run time (worker thread)."""
    s = state.settings
    device = select_device(s.device)
    configure_torch(device, s.torch_threads)
    adapters = {a.task: a.adapter for a in apps if a.task and a.adapter}
    registry = ModelRegistry(
        s.weights_dir, hub_checkpoint_dir(s.torch_home), device,
        allow_download=s.allow_downloads, allow_untrained=s.allow_untrained, compile_model=s.compile,
        cuda_graphs=s.cuda_graphs,
        adapters=adapters,
    )
    manager = ModelManager(registry, manager_store, metrics=state.metrics, warmup=s.warmup,
                           base_batching=s.batch_config_for, on_change=lambda: _refresh_statuses(state))
    configured = [(n, a.task) for a in apps if a.task for n in a.models(s)]
    for name, task, weights in manager.startup_models(list(dict.fromkeys(configured))):
        st = registry.load(name, task, warmup=s.warmup, weights=weights)
        state.metrics.model_ready.labels(name, st.task).set(1 if st.status == "ready" else 0)
        log.info("model %s: %s%s", name, st.status, f" ({st.reason})" if st.reason else "")
    return manager


def _refresh_statuses(state: AppState) -> None:
    """After a run-time model change: each started application with a model pool gets its status again."""
    manager = state.models
    if manager is None:
        return
    for app in state.declared:
        cur = state.applications.get(app.name)
        pool = manager.pools.get(app.task) if app.task else None
        if pool is None or cur is None or cur.status in ("failed", "loading"):
            continue
        new = pool_status(manager.registry, pool, manager.registry.names(pool.task))
        if cur.status == "disabled" and new.status != "ready":
            continue  # nothing configured and nothing loaded since: still disabled
        refine = state.refiners.get(app.name)
        state.applications[app.name] = refine(new) if refine else new


async def _start_application(state: AppState, app: Application, manager: ModelManager, enabled: bool) -> None:
    """Start one application (its pool first) and record its status; a failure is recorded, never raised."""
    s = state.settings
    try:
        pool: ModelPool[Any] | None = None
        if app.task and app.adapter:
            default = app.default_model(s)
            pool = ModelPool(manager.registry, app.task, app.adapter, default_model=default,
                             executor=state.executor, observer=state.metrics,
                             batch_configs={n: manager.batch_config(n) for n in manager.registry.names(app.task)},
                             buckets=s.batch_buckets)
            manager.add_pool(pool)
            await pool.start()
            state.pools.append(pool)
            if s.warmup:
                await pool.warm_buckets()  # bucketed models (CUDA): every batch shape tuned before the first request
        section = app.section() if app.section is not None else None
        ctx = AppContext(settings=s, section=section, registry=manager.registry, pool=pool,
                         executor=state.executor, metrics=state.metrics)
        started: Started = await app.start(ctx)
        state.services[app.name] = started.service
        if started.stop is not None:
            state.stops.append(started.stop)
        if started.metrics is not None:
            state.metrics_sources.append(started.metrics)
        if started.models is not None:
            state.model_sources[app.name] = started.models
        if started.refine is not None:
            state.refiners[app.name] = started.refine
        if started.status_source is not None and enabled:
            state.status_sources[app.name] = started.status_source
        if app.guard is not None:
            manager.guards.append(functools.partial(app.guard, started.service))
        st = started.status
        if st is None:
            assert pool is not None, f"{app.name}: an application without a model pool must return its status"
            st = pool_status(manager.registry, pool, list(app.models(s)))
        if started.refine is not None:
            st = started.refine(st)
        # without models the service still answers, with the 503/404 that says what is missing
        state.applications[app.name] = st if enabled else AppStatus("disabled")
    except Exception as exc:  # keep serving the others and /health, so the failure is visible
        log.exception("application %s failed to start", app.name)
        state.applications[app.name] = AppStatus("failed", f"{type(exc).__name__}: {exc}")
    st = state.applications[app.name]
    log.info("application %s: %s%s", app.name, st.status, f" ({st.reason})" if st.reason else "")


async def start_applications(state: AppState) -> None:
    """Load models off the event loop, then start each application on its own: one that fails is reported
    with its reason while the others serve."""
    s = state.settings
    apps = state.declared
    enabled = {a.name for a in apps if a.is_enabled(s)}
    for a in apps:
        state.applications[a.name] = AppStatus("loading" if a.name in enabled else "disabled")
    try:
        try:
            store = await asyncio.to_thread(ModelSetStore, s.data_dir / "models")
            manager = await asyncio.get_running_loop().run_in_executor(None, _load_models, state, apps, store)
        except Exception as exc:  # no device, no manifest: nothing with a model starts
            log.exception("loading models failed")
            reason = f"loading models failed: {type(exc).__name__}: {exc}"
            for name in enabled:
                state.applications[name] = AppStatus("failed", reason)
            return
        state.registry = manager.registry
        state.models = manager
        for a in apps:
            if a.name not in enabled and not a.always_start:
                continue  # e.g. style: no workers, no store: disabled
            await _start_application(state, a, manager, a.name in enabled)
    finally:
        state.ready.set()


async def stop_applications(state: AppState) -> None:
    """Stop what start_applications started: model management, pools, each application's shutdown hook (one that
    fails does not keep the others from theirs), then the inference threads."""
    if state.models is not None:
        await state.models.close()
    for pool in state.pools:
        await pool.close()
    for stop in reversed(state.stops):
        try:
            await stop()
        except Exception:
            log.exception("stopping an application failed")
    state.executor.shutdown(wait=True, cancel_futures=True)


def create_app(settings: Settings | None = None, applications: Sequence[Application] = BUILTIN) -> FastAPI:
    """Build the FastAPI application serving the declared applications (nothing heavy happens until the
    lifespan runs)."""
    settings = settings or Settings()
    apps = tuple(applications)
    metrics = Metrics()
    keys = KeyRing.build(settings.api_keys, settings.api_keys_file)  # a bad keys file stops start-up here
    admission = Admission({a.name: settings.in_flight_limit(a.name) for a in apps})
    policies = route_policies(CORE_POLICIES, apps)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, AppState]]:
        executor = ThreadPoolExecutor(max_workers=settings.inference_threads, thread_name_prefix="inference")
        state = AppState(settings=settings, metrics=metrics, executor=executor, admission=admission,
                         keys_enabled=keys.enabled, declared=apps)
        loader = asyncio.create_task(start_applications(state))
        try:
            yield {"app_state": state}
        finally:
            loader.cancel()
            await asyncio.gather(loader, return_exceptions=True)
            await stop_applications(state)

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
                       default_timeout=settings.request_timeout_seconds, policies=policies)
    routers = [health.router, models.router, *(r for a in apps for r in a.routers), ui.router]
    for router in routers:
        app.include_router(router)  # who may call what is the gate's table (app/gate.py), checked before the body
    app.state.route_policies = policies
    _document_gate(app, policies)
    return app


def _document_gate(app: FastAPI, policies: dict[tuple[str, str], RoutePolicy]) -> None:
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
                policy = policy_for(method.upper(), path, policies)
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
