"""Image classification, declared: POST /classify over the image-classification models."""

from __future__ import annotations

from app.api import classify
from app.application import AppContext, Application, Started
from app.gate import RoutePolicy
from app.runtime.registry import LoadedClassifier
from app.services.classification import ClassificationService


async def start(ctx: AppContext) -> Started:
    """The classification service over the pool of image classifiers."""
    s = ctx.settings
    assert ctx.pool is not None
    service = ClassificationService(ctx.pool, max_image_bytes=s.max_image_bytes, max_image_pixels=s.max_image_pixels,
                                    max_images=s.max_images_per_request, max_image_side=s.max_image_side,
                                    max_aspect_ratio=s.max_aspect_ratio, device_decode=s.gpu_decode)
    return Started(service, stop=service.stop)


APP = Application(
    name="classification", start=start, routers=(classify.router,), task="image-classification",
    adapter=LoadedClassifier, models=lambda s: s.classifiers, default_model=lambda s: s.default_classifier,
    policies={("POST", "/classify"): RoutePolicy("read", "classification")},
)
