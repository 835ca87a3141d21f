"""Image classification: decode -> model preprocessing -> micro-batched forward -> top-k."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from PIL import Image

from app.errors import InvalidParameters
from app.runtime.batcher import BatchConfig, MicroBatcher
from app.runtime.gpu_decode import decode_and_preprocess, takes_device_path
from app.runtime.images import DEFAULT_MAX_ASPECT_RATIO, DEFAULT_MAX_SIDE, decode_image, plain_jpeg_size
from app.runtime.registry import LoadedClassifier
from app.services.pool import ModelPool, map_in_threads
from app.services.results import ClassifyResponse, ImageResult, Prediction
from models.preprocess import ImageSpec, image_to_tensor

if TYPE_CHECKING:
    from app.settings import Settings

log = logging.getLogger(__name__)

# device JPEG decode, coalesced across requests: at most this many JPEGs per decoder call, this many waiting
DEVICE_DECODE_BATCH = 64
DEVICE_DECODE_QUEUE = 4096


@dataclass(frozen=True)
class Upload:
    """One uploaded file: its form field's file name and bytes."""

    filename: str
    data: bytes


@dataclass(frozen=True)
class ImageLimits:
    """What an uploaded image may be: bytes, decoded pixels, longest side and aspect ratio."""

    max_bytes: int
    max_pixels: int
    max_side: int = DEFAULT_MAX_SIDE
    max_aspect_ratio: float = DEFAULT_MAX_ASPECT_RATIO

    @classmethod
    def from_settings(cls, s: Settings) -> ImageLimits:
        """The server's limits (CNN_MAX_IMAGE_BYTES, CNN_MAX_IMAGE_PIXELS, ...)."""
        return cls(s.max_image_bytes, s.max_image_pixels, s.max_image_side, s.max_aspect_ratio)

    def decode(self, upload: Upload) -> Image.Image:
        """Blocking: the upload decoded and checked (EXIF orientation applied, RGB), or the 4xx problem."""
        return decode_image(upload.data, max_bytes=self.max_bytes, max_pixels=self.max_pixels,
                            max_side=self.max_side, max_aspect_ratio=self.max_aspect_ratio, name=upload.filename)


def classifier_input(upload: Upload, loaded: LoadedClassifier, limits: ImageLimits) -> torch.Tensor:
    """Blocking: one upload as the classifier's input (decoded within `limits`, then the model's preprocessing).
    The service and the evaluation command (`app.cli evaluate`) both make their inputs here."""
    return image_to_tensor(limits.decode(upload), loaded.preprocessing)


def device_eligible(upload: Upload, loaded: LoadedClassifier, limits: ImageLimits) -> bool:
    """Blocking (header only): whether this upload is decoded on the model's device; an upload over a limit gets
    the CPU path's 4xx here."""
    size = plain_jpeg_size(upload.data, max_bytes=limits.max_bytes, max_pixels=limits.max_pixels,
                           max_side=limits.max_side, max_aspect_ratio=limits.max_aspect_ratio, name=upload.filename)
    return size is not None and takes_device_path(*size, loaded.preprocessing)


def top_k(probs: torch.Tensor, labels: list[str], k: int) -> list[Prediction]:
    """The k most probable classes, most probable first."""
    k = min(k, probs.numel())
    values, indices = probs.topk(k)
    # one conversion of each tensor to Python numbers (not one per element: a tensor's int() or float() costs
    # a few microseconds each); `probability` is checked against [0, 1] by Prediction as before
    return [Prediction(label=labels[i], index=i, probability=round(v, 6))
            for v, i in zip(values.tolist(), indices.tolist(), strict=True)]


class ClassificationService:
    """Serves every loaded image classifier through its own micro-batcher."""

    def __init__(self, pool: ModelPool[LoadedClassifier], *, max_image_bytes: int, max_image_pixels: int,
                 max_images: int, max_image_side: int = DEFAULT_MAX_SIDE,
                 max_aspect_ratio: float = DEFAULT_MAX_ASPECT_RATIO, device_decode: str = "auto") -> None:
        self.pool = pool
        self.device_decode = device_decode  # CNN_GPU_DECODE: JPEGs decoded and preprocessed on the model's device
        self.device_decodes = 0  # images decoded on the device, and device decodes that fell back to the CPU
        self.device_decode_fallbacks = 0
        # one decode batcher per (preprocessing, device): requests' JPEGs queue together and go to the decoder in
        # one call, so small requests do not each pay a decoder call (and wait for each other's under the lock)
        self._decoders: dict[tuple[ImageSpec, str], MicroBatcher[bytes, torch.Tensor | None]] = {}
        # one thread for every decoder call: one at a time, as the decoder's state is shared
        self._decode_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="jpeg-decode")
        self.max_image_bytes = max_image_bytes
        self.max_image_pixels = max_image_pixels
        self.max_image_side = max_image_side
        self.max_aspect_ratio = max_aspect_ratio
        # the limits uploads are decoded within, made once (the max_* values above stay plain attributes: routers
        # read max_image_bytes, and Ray Serve's ingress twins copy plain attributes)
        self.limits = ImageLimits(max_image_bytes, max_image_pixels, max_image_side, max_aspect_ratio)
        self.max_images = max_images

    def _decodes_on_device(self, loaded: LoadedClassifier) -> bool:
        return self.device_decode == "on" or (self.device_decode == "auto" and loaded.device.type == "cuda")

    def _decode_batch(self, spec: ImageSpec, device: torch.device, datas: list[bytes]) -> list[torch.Tensor | None]:
        """Blocking: one decoder call for the JPEGs of several requests; None for each one the decoder refuses (when
        the batch fails, each JPEG is tried alone, so one bad file sends only itself to the CPU)."""
        try:
            return list(decode_and_preprocess(datas, spec, device))
        except Exception as exc:
            log.info("device JPEG decode of %d image(s) failed (%s: %s)", len(datas), type(exc).__name__,
                     str(exc)[:200])
            if len(datas) == 1:
                return [None]
        out: list[torch.Tensor | None] = []
        for d in datas:
            try:
                out.append(decode_and_preprocess([d], spec, device)[0])
            except Exception:
                out.append(None)
        return out

    async def _decoder(self, loaded: LoadedClassifier) -> MicroBatcher[bytes, torch.Tensor | None]:
        key = (loaded.preprocessing, str(loaded.device))
        decoder = self._decoders.get(key)
        if decoder is None:
            spec, device = loaded.preprocessing, loaded.device

            def decode(datas: list[bytes]) -> list[torch.Tensor | None]:
                return self._decode_batch(spec, device, datas)

            config = BatchConfig(max_batch_size=DEVICE_DECODE_BATCH, max_wait_ms=0.0, max_queue=DEVICE_DECODE_QUEUE)
            decoder = MicroBatcher(f"jpeg-decode:{device}", decode, config, executor=self._decode_thread,
                                   observer=self.pool.observer)
            self._decoders[key] = decoder
            await decoder.start()
        return decoder

    async def _device_inputs(self, uploads: list[Upload], loaded: LoadedClassifier) -> list[torch.Tensor]:
        """The inputs with the plain JPEGs decoded and preprocessed on the model's device (with other requests'
        JPEGs, in one decoder call), the others (and any the decoder refuses) on the CPU and then moved there."""
        limits = self.limits
        eligible = await map_in_threads(lambda u: device_eligible(u, loaded, limits), uploads)
        inputs: list[torch.Tensor | None] = [None] * len(uploads)
        chosen = [i for i, ok in enumerate(eligible) if ok]
        if chosen:
            try:
                done = await (await self._decoder(loaded)).submit_many([uploads[i].data for i in chosen])
            except Exception as exc:  # a full decode queue, a closing service, a passed deadline: the CPU path
                log.info("device JPEG decode not used (%s); decoding %d image(s) on the CPU", type(exc).__name__,
                         len(chosen))
                done = [None] * len(chosen)
            for i, t in zip(chosen, done, strict=True):
                inputs[i] = t
            decoded = sum(t is not None for t in done)
            self.device_decodes += decoded
            self.device_decode_fallbacks += len(chosen) - decoded
        rest = [i for i, t in enumerate(inputs) if t is None]
        # decoded on the CPU, these stay there until their batch goes to the device in one copy (stack_inputs)
        cpu = await map_in_threads(lambda u: classifier_input(u, loaded, limits), [uploads[i] for i in rest])
        for i, t in zip(rest, cpu, strict=True):
            inputs[i] = t
        return [t for t in inputs if t is not None]

    async def stop(self) -> None:
        """Close the decode batchers and their thread (at shutdown)."""
        for decoder in self._decoders.values():
            await decoder.close()
        self._decoders.clear()
        self._decode_thread.shutdown(wait=False, cancel_futures=True)

    @property
    def default_model(self) -> str | None:
        """The model used when a request names none."""
        return self.pool.default_model


    async def classify(self, uploads: list[Upload], model: str | None, k: int) -> ClassifyResponse:
        """Top-k classes for each upload."""
        if not uploads:
            raise InvalidParameters("at least one image is required (field 'image')")
        if len(uploads) > self.max_images:
            raise InvalidParameters(f"{len(uploads)} images sent; at most {self.max_images} per request")
        name, loaded = self.pool.resolve(model)
        # decoding and resizing are CPU work: keep them off the event loop
        limits = self.limits
        if self._decodes_on_device(loaded):
            tensors = await self._device_inputs(uploads, loaded)
        else:
            tensors = await map_in_threads(lambda u: classifier_input(u, loaded, limits), uploads)
        probs = await self.pool.run(name, tensors, loaded)
        return ClassifyResponse(
            model=name,
            weights=loaded.weights_tag,  # type: ignore[arg-type]  # a str typed loosely upstream; validated here
            weights_source=loaded.weights_source,
            results=[ImageResult(filename=u.filename, top_k=top_k(p, loaded.spec.labels, k))
                     for u, p in zip(uploads, probs, strict=True)],
        )
