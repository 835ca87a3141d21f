"""Liveness, readiness per application, and Prometheus metrics."""

from __future__ import annotations

import asyncio
import logging
from typing import Annotated

from fastapi import APIRouter, Query, Response
from fastapi.responses import JSONResponse

from app.api.schemas import PROBLEM_RESPONSES, Live, Ready
from app.deps import State
from app.errors import InvalidParameters
from app.metrics import merge_expositions
from app.state import AppState, AppStatus

router = APIRouter(tags=["health"])
logger = logging.getLogger(__name__)

STYLE_COUNTS_TIMEOUT_S = 2.0  # how long a scrape waits for the job store's counts


async def read_style_counts(state: AppState) -> None:
    """Style-job counts from the job store into the gauges, read in a worker thread: a slow or unreachable store
    (SQLite behind a long write, PostgreSQL down) must neither block the event loop nor fail the scrape. At most
    one read runs at a time; a scrape waits for it at most STYLE_COUNTS_TIMEOUT_S, then answers with the gauges'
    last values and counts the miss (cnn_style_counts_errors_total)."""
    assert state.style is not None
    read = state.style_counts_read
    if read is None or read.done():
        if read is not None and not read.cancelled():
            read.exception()  # a late failure of the previous read is retrieved here, not logged as lost
        read = state.style_counts_read = asyncio.ensure_future(asyncio.to_thread(state.style.counts))
    try:
        counts = await asyncio.wait_for(asyncio.shield(read), STYLE_COUNTS_TIMEOUT_S)
    except Exception as exc:  # TimeoutError, or whatever the store raised
        state.metrics.style_counts_errors.inc()
        logger.warning("style job counts not read for /metrics: %s", exc if str(exc) else type(exc).__name__)
        return
    state.metrics.set_style_counts(counts)


@router.get("/health/live", response_model=Live, summary="The process is up")
async def live() -> Live:
    """Liveness: the process answers."""
    return Live()


@router.get("/health/ready", response_model=Ready, summary="The required applications serve",
            responses={503: {"model": Ready, "description": "Still loading, or a required application is not ready"},
                       422: PROBLEM_RESPONSES[422]})
async def ready(
    state: State,
    require: Annotated[str | None, Query(max_length=200, description="comma-separated applications this check "
                                         "requires (classification, text, faces, style); default: "
                                         "CNN_READY_REQUIRES, else every enabled application")] = None,
) -> JSONResponse:
    """200 when every required application is ready, else 503 naming those that are not. Each application
    starts and fails on its own, so a faces-only deployment can be ready while text is unavailable."""
    if require is not None:
        wanted = [a.strip() for a in require.split(",") if a.strip()]
        known = [a.name for a in state.declared]
        unknown = [a for a in wanted if a not in known]
        if unknown or not wanted:
            raise InvalidParameters(f"require: unknown applications {unknown}; known: {', '.join(known)}")
    else:
        wanted = list(state.settings.ready_requires) or [
            a for a, st in state.applications.items() if st.status != "disabled"]
    if state.ready.is_set() and state.status_sources:
        await refresh_statuses(state)
    hide = state.keys_enabled  # with keys on, an open endpoint reveals no reasons (they name files and paths)
    apps = {a: {"status": st.status, "reason": None if hide else st.reason, "default_model": st.default_model,
                "required": a in wanted} for a, st in state.applications.items()}
    models = [] if state.registry is None else [
        {"name": n, "task": s.task, "status": s.status, "reason": None if hide else s.reason}
        for n, s in state.registry.states.items()]
    if not state.ready.is_set():
        body = Ready(status="loading", detail="applications are starting", applications=apps)  # type: ignore[arg-type]
        return JSONResponse(body.model_dump(), status_code=503, headers={"Retry-After": "5"})
    missing = [a for a in wanted if a not in state.applications or state.applications[a].status != "ready"]
    if missing:
        detail = "not ready: " + ", ".join(
            f"{a} ({state.applications[a].status if a in state.applications else 'unknown'})" for a in missing)
        body = Ready.model_validate({"status": "not-ready", "detail": detail, "applications": apps, "models": models})
        return JSONResponse(body.model_dump(), status_code=503)
    return JSONResponse(Ready.model_validate({"status": "ready", "applications": apps, "models": models}).model_dump())


STATUS_TIMEOUT_S = 3.0


async def refresh_statuses(state: AppState) -> None:
    """Ask the applications whose status lives in other processes (Ray Serve deployments) how they are now; one that
    does not answer within STATUS_TIMEOUT_S is unavailable, with the reason."""
    names = list(state.status_sources)

    async def ask(name: str) -> AppStatus:
        try:
            return await asyncio.wait_for(state.status_sources[name](), STATUS_TIMEOUT_S)
        except Exception as exc:  # a dead or unreachable deployment: say so instead of the last answer
            why = f"no answer within {STATUS_TIMEOUT_S:.0f} s" if isinstance(exc, TimeoutError) else str(exc)
            last = state.applications.get(name)
            return AppStatus("unavailable", f"its deployment did not answer: {why or type(exc).__name__}",
                             last.default_model if last else None)

    for name, st in zip(names, await asyncio.gather(*(ask(n) for n in names)), strict=True):
        state.applications[name] = st


@router.get("/metrics", summary="Prometheus metrics", response_class=Response,
            responses={200: {"content": {"text/plain": {}}}})
async def metrics(state: State) -> Response:
    """Prometheus text exposition: requests, latency, in-flight per application, queue depth and wait, batch sizes,
    rejections, style jobs."""
    if state.style is not None:
        await read_style_counts(state)
    if state.admission is not None:
        state.metrics.set_admission(state.admission.snapshot())
    own = state.metrics.render()
    body: bytes | str = own
    if state.metrics_sources:  # e.g. the application replicas of a Ray Serve deployment, one label per replica
        parts = await asyncio.gather(*(source() for source in state.metrics_sources), return_exceptions=True)
        others = [p for part in parts if not isinstance(part, BaseException) for p in part]
        body = await asyncio.to_thread(merge_expositions, own.decode(), others, state.metrics.process_labels)
    return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")
