"""Image classification: decode -> model preprocessing -> micro-batched forward -> top-k."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import torch

from app.errors import InvalidParameters
from app.runtime.images import DEFAULT_MAX_ASPECT_RATIO, DEFAULT_MAX_SIDE, decode_image
from app.runtime.registry import LoadedClassifier
from app.services.pool import ModelPool
from models.preprocess import image_to_tensor


@dataclass(frozen=True)
class Upload:
    """One uploaded file: its form field's file name and bytes."""

    filename: str
    data: bytes


def top_k(probs: torch.Tensor, labels: list[str], k: int) -> list[dict[str, Any]]:
    """The k most probable classes as {label, index, probability}."""
    k = min(k, probs.numel())
    values, indices = probs.topk(k)
    return [{"label": labels[int(i)], "index": int(i), "probability": round(float(v), 6)}
            for v, i in zip(values, indices, strict=True)]


class ClassificationService:
    """Serves every loaded image classifier through its own micro-batcher."""

    def __init__(self, pool: ModelPool[LoadedClassifier], *, max_image_bytes: int, max_image_pixels: int,
                 max_images: int, max_image_side: int = DEFAULT_MAX_SIDE,
                 max_aspect_ratio: float = DEFAULT_MAX_ASPECT_RATIO) -> None:
        self.pool = pool
        self.max_image_bytes = max_image_bytes
        self.max_image_pixels = max_image_pixels
        self.max_image_side = max_image_side
        self.max_aspect_ratio = max_aspect_ratio
        self.max_images = max_images

    @property
    def default_model(self) -> str | None:
        """The model used when a request names none."""
        return self.pool.default_model

    def _prepare(self, upload: Upload, loaded: LoadedClassifier) -> torch.Tensor:
        img = decode_image(upload.data, max_bytes=self.max_image_bytes, max_pixels=self.max_image_pixels,
                           max_side=self.max_image_side, max_aspect_ratio=self.max_aspect_ratio, name=upload.filename)
        return image_to_tensor(img, loaded.preprocessing)

    async def classify(self, uploads: list[Upload], model: str | None, k: int) -> dict[str, Any]:
        """Top-k classes for each upload."""
        if not uploads:
            raise InvalidParameters("at least one image is required (field 'image')")
        if len(uploads) > self.max_images:
            raise InvalidParameters(f"{len(uploads)} images sent; at most {self.max_images} per request")
        name, loaded = self.pool.resolve(model)
        # decoding and resizing are CPU work: keep them off the event loop
        tensors = [await asyncio.to_thread(self._prepare, u, loaded) for u in uploads]
        probs = await self.pool.run(name, tensors)
        return {
            "model": name,
            "weights": loaded.weights_tag,
            "weights_source": loaded.weights_source,
            "results": [
                {"filename": u.filename, "top_k": top_k(p, loaded.spec.labels, k)}
                for u, p in zip(uploads, probs, strict=True)
            ],
        }
