"""Faces, declared: embedding, 1:1 verification, enrolment and 1:N identification against the gallery."""

from __future__ import annotations

import asyncio
import logging

from app.api import faces
from app.application import AppContext, Application, Started
from app.gate import RoutePolicy
from app.runtime.registry import LoadedFaceEmbedder, LoadedModel
from app.services.faces import DetectorPool, FacesService
from app.state import AppStatus
from app.stores.factory import gallery_models, open_gallery
from app.stores.interfaces import ModelKey
from models.faces.detect import HaarParams

log = logging.getLogger("app")


def gallery_model(default: str | None, explicit: bool, loaded: dict[str, str],
                  made_by: dict[tuple[str, str], int]) -> tuple[str | None, str | None]:
    """The model the gallery is opened for, and why when it is not the default.

    An operator who names the face model (CNN_FACE_MODEL) gets it. Otherwise an existing gallery keeps the model
    that made its faces: when none of them was made by the default (name and weights), but some were made by
    another loaded model with the same weights, the gallery stays with the one that made the most, so a new
    default model in an upgrade does not leave every enrolled face unsearchable. `loaded`: name -> sha256 of the
    loaded face models; `made_by`: faces per (name, sha256) in the gallery."""
    if default is None or explicit or not made_by or (default, loaded.get(default)) in made_by:
        return default, None
    usable = [(n, name) for (name, sha), n in made_by.items() if loaded.get(name) == sha]
    if not usable:
        return default, None
    n, name = max(usable)
    return name, (f"the gallery's {n} face{'s' if n != 1 else ''} {'were' if n != 1 else 'was'} made by {name!r}, "
                  f"not by the default {default!r}: the gallery "
                  f"stays with {name!r} (set CNN_FACE_MODEL={default} and enrol again to move it)")


def _open(ctx: AppContext) -> FacesService:
    """Open the gallery (blocking: it may rebuild the index) and the service."""
    s = ctx.settings
    pool = ctx.pool
    assert pool is not None
    gallery = None
    if pool.default_model is not None:
        name, why = gallery_model(pool.default_model, s.face_model is not None,
                                  {n: m.sha256 for n, m in pool.models.items()}, gallery_models(s))
        if why:
            log.warning("face gallery: %s", why)
        assert name is not None
        _, loaded = pool.resolve(name)
        key = ModelKey(name, loaded.sha256, loaded.dim)
        gallery = open_gallery(s, key)
        log.info("face gallery: %s", gallery.stats())
    params = HaarParams(scale_factor=s.face_haar_scale_factor, min_neighbors=s.face_haar_min_neighbors,
                        min_size=s.face_haar_min_size, max_side=s.face_haar_max_side)
    return FacesService(pool, gallery, DetectorPool(params), default_detector=s.face_detector,
                        max_faces=s.face_max_faces, threshold_override=s.face_threshold,
                        max_image_bytes=s.max_image_bytes, max_image_pixels=s.max_image_pixels,
                        max_images=s.max_images_per_request, max_image_side=s.max_image_side,
                        max_aspect_ratio=s.max_aspect_ratio, identify_fpir=s.face_identify_fpir,
                        enroll_min_side=s.face_enroll_min_side, enroll_min_sharpness=s.face_enroll_min_sharpness)


async def start(ctx: AppContext) -> Started:
    """The face service and its gallery; a broken detector degrades the application when it is the default."""
    service = await asyncio.to_thread(_open, ctx)
    default_detector = ctx.settings.face_detector

    def refine(status: AppStatus) -> AppStatus:
        broken = service.detectors.errors
        if status.status != "ready" or not broken:
            return status
        reason = "; ".join(f"face detector {n} unavailable: {e}" for n, e in broken.items())
        # requests for a working detector still serve; readiness fails only when the default detector is broken
        return AppStatus("degraded" if default_detector in broken else "ready", reason,
                         default_model=status.default_model)

    async def stop() -> None:
        if service.gallery is not None:
            await asyncio.to_thread(service.gallery.close)  # writes the index snapshot

    return Started(service, refine=refine, stop=stop)


def guard(service: FacesService, action: str, name: str, new: LoadedModel | None) -> str | None:
    """The gallery's embeddings belong to one model and its weights: refuse to unload it, or to swap in weights
    with another sha256 (every enrolled face would have to be enrolled again). Other face models change freely,
    and so does the default of requests that name no model (enrol and identify always use the gallery's)."""
    g = service.gallery
    if g is None or name != g.model.name:
        return None
    bound = f"the face gallery holds embeddings of {g.model.name!r} (sha256 {g.model.sha256[:12]}...)"
    if action == "unload":
        return f"{bound}: it cannot be unloaded while serving"
    if action == "reload" and isinstance(new, LoadedFaceEmbedder) and new.sha256 != g.model.sha256:
        return f"{bound}: weights with another sha256 would make every enrolled face unusable"
    return None


APP = Application(
    name="faces", start=start, routers=(faces.router,), task="face-embedding", adapter=LoadedFaceEmbedder,
    models=lambda s: s.face_models, default_model=lambda s: s.face_model, guard=guard,
    policies={
        ("POST", "/faces/embed"): RoutePolicy("read", "faces"),
        ("POST", "/faces/verify"): RoutePolicy("read", "faces"),
        ("POST", "/faces/identify"): RoutePolicy("read", "faces"),
        ("POST", "/faces/enroll"): RoutePolicy("write", "faces"),
        ("GET", "/faces/subjects"): RoutePolicy("read"),
        ("GET", "/faces/subjects/{subject}"): RoutePolicy("read"),
        ("DELETE", "/faces/subjects/{subject}"): RoutePolicy("write"),
        ("DELETE", "/faces/{face_id}"): RoutePolicy("write"),
        ("GET", "/faces/gallery"): RoutePolicy("read"),
    },
)
