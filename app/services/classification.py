"""Image classification: decode -> model preprocessing -> micro-batched forward -> top-k."""

from __future__ import annotations

import asyncio
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from app.errors import InvalidParameters, NotFound, ServiceUnavailable
from app.runtime.batcher import BatchConfig, BatcherClosedError, BatchObserver, MicroBatcher, QueueFullError
from app.runtime.images import decode_image
from app.runtime.registry import LoadedClassifier, ModelRegistry
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

    def __init__(self, registry: ModelRegistry, *, default_model: str | None, max_image_bytes: int,
                 max_image_pixels: int, max_images: int, executor: Executor, observer: BatchObserver | None,
                 batch_configs: dict[str, BatchConfig]) -> None:
        self.registry = registry
        self.max_image_bytes = max_image_bytes
        self.max_image_pixels = max_image_pixels
        self.max_images = max_images
        self.batchers: dict[str, MicroBatcher[torch.Tensor, torch.Tensor]] = {}
        for name, st in registry.states.items():
            if st.loaded is not None and st.task == "image-classification":
                self.batchers[name] = MicroBatcher(name, st.loaded.forward, batch_configs[name],
                                                   executor=executor, observer=observer)
        self.default_model = default_model or self._first_ready()

    def _first_ready(self) -> str | None:
        """The first configured classifier that serves, preferring trained weights over untrained ones."""
        ready = [s for s in self.registry.states.values() if s.loaded is not None and s.task == "image-classification"]
        trained = [s.name for s in ready if s.loaded is not None and s.loaded.weights_tag == "trained"]
        names = trained or [s.name for s in ready]
        return names[0] if names else None

    async def start(self) -> None:
        """Start every batcher."""
        for b in self.batchers.values():
            await b.start()

    async def close(self) -> None:
        """Stop every batcher; queued callers get an error, running batches finish."""
        for b in self.batchers.values():
            await b.close()

    def resolve(self, name: str | None) -> tuple[str, LoadedClassifier]:
        """The loaded classifier for a request, or the problem that explains why there is none."""
        name = name or self.default_model
        if name is None:
            raise ServiceUnavailable("no image classifier is loaded; see GET /models", retry_after=None)
        st = self.registry.states.get(name)
        if st is None or st.task != "image-classification":
            available = sorted(n for n, s in self.registry.states.items() if s.task == "image-classification")
            raise NotFound(f"unknown classifier {name!r}; configured classifiers: {', '.join(available)}",
                           extra={"available": available})
        if st.loaded is None:
            raise ServiceUnavailable(f"model {name!r} is {st.status}: {st.reason}", extra={"model": name})
        return name, st.loaded

    def _prepare(self, upload: Upload, loaded: LoadedClassifier) -> torch.Tensor:
        img: Image.Image = decode_image(upload.data, max_bytes=self.max_image_bytes,
                                        max_pixels=self.max_image_pixels, name=upload.filename)
        return image_to_tensor(img, loaded.preprocessing)

    async def classify(self, uploads: list[Upload], model: str | None, k: int) -> dict[str, Any]:
        """Top-k classes for each upload."""
        if not uploads:
            raise InvalidParameters("at least one image is required (field 'image')")
        if len(uploads) > self.max_images:
            raise InvalidParameters(f"{len(uploads)} images sent; at most {self.max_images} per request")
        name, loaded = self.resolve(model)
        # decoding and resizing are CPU work: keep them off the event loop
        tensors = [await asyncio.to_thread(self._prepare, u, loaded) for u in uploads]
        try:
            probs = await self.batchers[name].submit_many(tensors)
        except QueueFullError as exc:
            raise ServiceUnavailable(f"model {name!r} is overloaded (queue full); retry later",
                                     retry_after=exc.retry_after) from exc
        except BatcherClosedError as exc:
            raise ServiceUnavailable("the service is shutting down; retry on another instance", retry_after=5) from exc
        return {
            "model": name,
            "weights": loaded.weights_tag,
            "weights_source": loaded.weights_source,
            "results": [
                {"filename": u.filename, "top_k": top_k(p, loaded.spec.labels, k)}
                for u, p in zip(uploads, probs, strict=True)
            ],
        }
