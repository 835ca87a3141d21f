"""Liveness, readiness and Prometheus metrics (never behind API keys)."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse

from app.api.schemas import Live, Ready
from app.deps import State

router = APIRouter(tags=["health"])


@router.get("/health/live", response_model=Live, summary="The process is up")
async def live() -> Live:
    """Liveness: the process answers."""
    return Live()


@router.get("/health/ready", response_model=Ready, summary="Models loaded and stores open",
            responses={503: {"model": Ready, "description": "Still loading, or no model could be loaded"}})
async def ready(state: State) -> JSONResponse:
    """Readiness: 200 once start-up finished and the default classifier is serving, else 503."""
    if not state.ready.is_set():
        body = Ready(status="loading", detail="models are loading")
        return JSONResponse(body.model_dump(), status_code=503, headers={"Retry-After": "5"})
    if state.startup_error is not None or state.registry is None or state.classification is None:
        body = Ready(status="failed", detail=state.startup_error)
        return JSONResponse(body.model_dump(), status_code=503)
    models = [{"name": n, "task": s.task, "status": s.status, "reason": s.reason}
              for n, s in state.registry.states.items()]
    default = state.classification.default_model
    default_state = state.registry.states.get(default) if default else None
    if default_state is None or default_state.status != "ready":
        body = Ready.model_validate({"status": "no-models", "models": models,
                                     "detail": f"default classifier {default!r} is not ready"})
        return JSONResponse(body.model_dump(), status_code=503)
    return JSONResponse(Ready.model_validate({"status": "ready", "models": models}).model_dump())


@router.get("/metrics", summary="Prometheus metrics", response_class=Response,
            responses={200: {"content": {"text/plain": {}}}})
async def metrics(state: State) -> Response:
    """Prometheus text exposition: requests, latency, queue depth and wait, batch sizes, style jobs."""
    if state.style is not None:
        state.metrics.set_style_counts(state.style.store.counts())
    return Response(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")
