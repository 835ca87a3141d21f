"""Neural style transfer, declared: jobs on a store, run by worker threads (or `python -m app.cli worker`)."""

from __future__ import annotations

import asyncio

from app.api import style
from app.application import AppContext, Application, Started
from app.gate import RoutePolicy
from app.services.style import FeatureSource, StyleJobs, StyleLimits, StyleWorker
from app.state import AppStatus
from app.stores.factory import open_job_store


def _open(ctx: AppContext) -> tuple[StyleJobs, StyleWorker | None]:
    """Check the feature network, open the job store, recover jobs a crash left running, start the workers."""
    s = ctx.settings
    registry = ctx.registry
    features = FeatureSource(s.weights_dir, registry.hub_dir)
    if s.warmup and s.style_workers > 0:
        features.get(registry.device)  # build it now, so the first job does not pay for it
    else:
        features.check()  # a damaged file fails style here, at start-up, not job after job
    store = open_job_store(s)
    limits = StyleLimits(max_size=s.style_max_size, max_steps=s.style_max_steps, max_styles=s.style_max_styles,
                         max_queue=s.style_max_queue, max_image_bytes=s.max_image_bytes,
                         max_image_pixels=s.max_image_pixels, max_image_side=s.max_image_side,
                         max_aspect_ratio=s.max_aspect_ratio)
    worker = StyleWorker(store, features, registry.device,
                         ttl_seconds=s.style_ttl_hours * 3600, on_finish=ctx.metrics.style_job_finished)
    if s.style_workers > 0:
        worker.start(s.style_workers)
        return StyleJobs(store, limits, wake=worker.wake), worker
    worker.recover()
    return StyleJobs(store, limits, wake=None), None


async def start(ctx: AppContext) -> Started:
    """The style-job service and its worker threads."""
    jobs, worker = await asyncio.to_thread(_open, ctx)

    async def stop() -> None:
        if worker is not None:
            await asyncio.to_thread(worker.stop)

    return Started(jobs, status=AppStatus("ready"), stop=stop)


APP = Application(
    name="style", start=start, routers=(style.router,), enabled=lambda s: s.style_enabled, always_start=False,
    policies={
        ("POST", "/style-transfer"): RoutePolicy("write", "style"),
        ("GET", "/style-transfer"): RoutePolicy("read"),
        ("GET", "/style-transfer/{job_id}"): RoutePolicy("read"),
        ("GET", "/style-transfer/{job_id}/result"): RoutePolicy("read"),
        ("GET", "/style-transfer/{job_id}/preview"): RoutePolicy("read"),
        ("DELETE", "/style-transfer/{job_id}"): RoutePolicy("write"),
    },
)
