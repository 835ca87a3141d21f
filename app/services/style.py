"""Neural style transfer as durable jobs: submission, views, cancellation, and the worker that runs them."""

from __future__ import annotations

import functools
import io
import logging
import math
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from app.errors import Conflict, InvalidParameters, NotFound, ServiceUnavailable
from app.runtime.device import job_stream
from app.runtime.images import decode_image
from app.services.results import StyleJob, StyleJobList
from app.stores.interfaces import Job, JobStoreProtocol, QueueFull
from models.style import StyleCancelled, StyleParams, plan_stylize, stylize
from models.weights import WeightsRef

log = logging.getLogger(__name__)

KIND = "style"
CONTENT_FILE = "content"
RESULT_FILE = "result.png"
PREVIEW_FILE = "preview.png"


def style_file(i: int) -> str:
    """File name of the i-th style image of a job."""
    return f"style_{i}"


class StyleParameters(BaseModel):
    """Validated parameters of one style-transfer job (limits come from the settings)."""

    # allow_inf_nan=False: NaN and infinities are refused in every float, list items included
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    steps: int = Field(300, ge=1, description="optimisation steps (L-BFGS iterations or Adam steps)")
    size: int = Field(512, ge=32, description="longest side of the result in pixels")
    content_weight: float = Field(1.0, ge=0.0, le=1e12, description="alpha")
    style_weight: float = Field(1e3, ge=0.0, le=1e15, description="beta (losses are relative errors per layer)")
    tv_weight: float = Field(0.0, ge=0.0, le=1e12, description="total-variation weight")
    init: Literal["content", "noise"] = "content"
    optimizer: Literal["lbfgs", "adam"] = "lbfgs"
    lr: float = Field(0.02, gt=0.0, le=10.0, description="Adam learning rate (image in [0, 1])")
    style_blend: list[float] | None = Field(None, description="one weight per style image (normalised)")
    preserve_colors: bool = Field(False, description="luminance-only transfer: keep the content's colours")
    multires: int = Field(1, ge=1, le=4, description="coarse-to-fine levels (1 = off)")
    seed: int = Field(0, ge=0, le=2**31 - 1)

    @field_validator("style_blend")
    @classmethod
    def _blend(cls, v: list[float] | None) -> list[float] | None:
        if v is not None and (any(w < 0 for w in v) or sum(v) <= 0):
            raise ValueError("style_blend weights must be >= 0 with a positive sum")
        return v


@dataclass(frozen=True)
class StyleLimits:
    """Sane maxima for submissions."""

    max_size: int
    max_steps: int
    max_styles: int
    max_queue: int
    max_image_bytes: int
    max_image_pixels: int
    max_image_side: int = 20_000
    max_aspect_ratio: float = 20.0


def _ago(t: float | None) -> str | None:
    return None if t is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


class StyleJobs:
    """The application side of style jobs: validate and store submissions, present and control jobs."""

    def __init__(self, store: JobStoreProtocol, limits: StyleLimits, *, wake: threading.Event | None = None) -> None:
        self.store = store
        self.limits = limits
        self.wake = wake  # set on submission so an in-process worker starts at once

    def validate(self, raw: dict[str, Any], n_styles: int) -> StyleParameters:
        """Parameters within the service's limits (422 otherwise)."""
        try:
            params = StyleParameters.model_validate({k: v for k, v in raw.items() if v is not None})
        except ValidationError as exc:
            parts = [f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']}" for e in exc.errors()]
            raise InvalidParameters("; ".join(parts)) from exc
        if params.steps > self.limits.max_steps:
            raise InvalidParameters(f"steps: at most {self.limits.max_steps}")
        if params.size > self.limits.max_size:
            raise InvalidParameters(f"size: at most {self.limits.max_size} pixels")
        if params.style_blend is not None and len(params.style_blend) != n_styles:
            raise InvalidParameters(f"style_blend has {len(params.style_blend)} weights for {n_styles} style images")
        return params

    def check_runnable(self, params: StyleParameters, content_size: tuple[int, int],
                       style_sizes: list[tuple[int, int]]) -> None:
        """422 unless the algorithm accepts these parameters for images of these sizes (the same check
        `stylize` makes before it runs, so an accepted job never fails on its parameters)."""
        try:
            plan_stylize(StyleParams(**params.model_dump()), content_size, style_sizes)
        except ValueError as exc:
            raise InvalidParameters(str(exc)) from exc

    def submit(self, content: tuple[str, bytes], styles: list[tuple[str, bytes]], raw: dict[str, Any], *,
               owner: str | None = None) -> Job:
        """Validate everything, then store the inputs and a queued job owned by `owner` (blocking: call
        off the event loop). Nothing is stored for a refused submission."""
        if not styles:
            raise InvalidParameters("at least one 'style' image is required")
        if len(styles) > self.limits.max_styles:
            raise InvalidParameters(f"{len(styles)} style images; at most {self.limits.max_styles}")
        params = self.validate(raw, len(styles))
        files: dict[str, bytes] = {}
        sizes: list[tuple[int, int]] = []
        for key, (name, data) in [(CONTENT_FILE, content), *((style_file(i), s) for i, s in enumerate(styles))]:
            # decode now so a bad upload is a 4xx at submission, not a failed job later
            img = decode_image(data, max_bytes=self.limits.max_image_bytes, max_pixels=self.limits.max_image_pixels,
                               max_side=self.limits.max_image_side, max_aspect_ratio=self.limits.max_aspect_ratio,
                               name=name)
            sizes.append(img.size)  # as the worker will see it: decode_image applies the EXIF orientation
            img.close()
            files[key] = data
        self.check_runnable(params, sizes[0], sizes[1:])
        try:
            job = self.store.create(KIND, params.model_dump(), files, max_queued=self.limits.max_queue,
                                    info={"styles": len(styles), "filenames": [content[0], *(s[0] for s in styles)]},
                                    owner=owner)
        except QueueFull as exc:
            raise ServiceUnavailable(f"the style-transfer queue is full ({exc.queued} jobs waiting)",
                                     retry_after=self._retry_after()) from exc
        if self.wake is not None:
            self.wake.set()
        return job

    def _retry_after(self) -> float:
        return max(5.0, self.store.mean_duration(KIND) or 30.0)

    def get(self, job_id: str, *, owner: str | None = None) -> Job:
        """A job, or 404 (also when `owner` is given and the job is another owner's: existence is not revealed)."""
        job = self.store.get(job_id, owner=owner) if _valid_id(job_id) else None
        if job is None or job.kind != KIND:
            raise NotFound(f"no style-transfer job {job_id!r} (unknown, deleted or expired)")
        return job

    def list(self, *, limit: int, offset: int, status: str | None = None,
             owner: str | None = None) -> tuple[list[Job], int]:
        """A page of jobs, newest first (only `owner`'s when given), and their total."""
        return self.store.list_jobs(limit=limit, offset=offset, status=status, owner=owner)

    def page(self, *, limit: int, offset: int, status: str | None = None, owner: str | None = None) -> StyleJobList:
        """A page of job views, newest first (only `owner`'s when given), with the link to the next page."""
        jobs, total = self.list(limit=limit, offset=offset, status=status, owner=owner)
        nxt = f"/style-transfer?limit={limit}&offset={offset + limit}" if offset + limit < total else None
        if nxt and status:
            nxt += f"&status={status}"
        return StyleJobList(jobs=[self.view(j) for j in jobs], total=total, limit=limit, offset=offset, next=nxt)

    def view(self, job: Job) -> StyleJob:
        """The job as clients see it."""
        base = f"/style-transfer/{job.id}"
        position = self.store.queue_position(job)
        eta: float | None = None
        mean = self.store.mean_duration(KIND)
        if mean is not None:
            if job.status == "queued" and position is not None:
                eta = mean * (position + 1)
            elif job.status == "running":
                eta = max(0.0, mean * (1.0 - job.progress))
        return StyleJob(
            id=job.id,
            status=job.status,  # type: ignore[arg-type]  # one of the store's job states; validated here
            progress=round(job.progress, 4), step=job.step,
            total_steps=job.total_steps or job.params.get("steps"), loss=_finite_or_none(job.loss),
            queue_position=position, eta_seconds=None if eta is None else round(eta, 1),
            created_at=_ago(job.created_at), started_at=_ago(job.started_at),
            finished_at=_ago(job.finished_at), attempts=job.attempts, error=job.error,
            cancel_requested=job.cancel_requested, parameters=_json_safe(job.params),
            feature_weights=job.info.get("feature_weights"), device=job.info.get("device"), owner=job.owner,
            links={"self": base, "result": f"{base}/result", "preview": f"{base}/preview"},
        )

    def result(self, job_id: str, *, owner: str | None = None) -> Path:
        """The result file of a succeeded job; 409 before, 404 when unknown (or another owner's)."""
        job = self.get(job_id, owner=owner)
        if job.status != "succeeded":
            raise Conflict(f"job {job_id} is {job.status}; the result exists once it has succeeded",
                           extra={"job_status": job.status})
        path = self.store.job_dir(job.id) / RESULT_FILE
        if not path.is_file():
            raise NotFound(f"the result of job {job_id} has been removed")
        return path

    def preview(self, job_id: str, *, owner: str | None = None) -> Path:
        """The latest intermediate image (or the result once finished); 409 when none exists yet."""
        job = self.get(job_id, owner=owner)
        d = self.store.job_dir(job.id)
        for name in ((RESULT_FILE, PREVIEW_FILE) if job.status == "succeeded" else (PREVIEW_FILE,)):
            if (d / name).is_file():
                return d / name
        raise Conflict(f"job {job_id} is {job.status} and has no preview yet", extra={"job_status": job.status})

    def cancel_or_delete(self, job_id: str, *, owner: str | None = None) -> Job | None:
        """Cancel a queued or running job; delete a finished one with its files (returns None then).
        With `owner`, only that owner's job (anyone else's is a 404)."""
        job = self.get(job_id, owner=owner)
        if job.finished:
            self.store.delete(job.id, owner=owner)
            return None
        updated = self.store.cancel(job.id, owner=owner)
        if updated is None:  # finished and deleted (or evicted) meanwhile
            raise NotFound(f"no style-transfer job {job_id!r}")
        return updated

    def counts(self) -> dict[str, int]:
        """Number of jobs in each state (for the metrics; routers never reach the store)."""
        return self.store.counts()


def read_job_file(path: Path) -> bytes:
    """The bytes of a job's file; 404 when it went meanwhile (the job expired, was deleted or evicted)."""
    try:
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise NotFound(f"{path.name} of job {path.parent.name} has been removed") from exc


def _valid_id(job_id: str) -> bool:
    return len(job_id) == 32 and all(c in "0123456789abcdef" for c in job_id)


def _finite_or_none(v: float | None) -> float | None:
    return v if v is None or math.isfinite(v) else None


def _json_safe(v: Any) -> Any:
    """A copy with non-finite floats as None: JSON has no NaN (jobs stored before they were refused had them)."""
    if isinstance(v, float):
        return _finite_or_none(v)
    if isinstance(v, dict):
        return {k: _json_safe(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_json_safe(x) for x in v]
    return v


def encode_image(img: Image.Image, fmt: str = "PNG", quality: int = 92) -> bytes:
    """Image bytes in PNG or JPEG."""
    buf = io.BytesIO()
    if fmt == "JPEG":
        img.convert("RGB").save(buf, "JPEG", quality=quality)
    else:
        img.save(buf, "PNG")
    return buf.getvalue()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class StyleWorker:
    """Drains the style queue: claims a job atomically, runs it, heartbeats progress, stores the result.

    Runs as threads inside the server (CNN_STYLE_WORKERS) or alone (`python -m app.cli worker`); any number
    of workers may share one store. Each runs one job at a time, so CNN_STYLE_WORKERS bounds how much CPU
    or GPU style transfer can take from the inference endpoints.
    """

    def __init__(self, store: JobStoreProtocol, features: FeatureSource, device: torch.device, *, ttl_seconds: float,
                 poll_seconds: float = 1.0, on_finish: Any = None) -> None:
        self.store = store
        self.features = features
        self.device = device
        self.ttl_seconds = ttl_seconds
        self.poll_seconds = poll_seconds
        self.on_finish = on_finish  # callback(status, seconds) for metrics
        self.id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.wake = threading.Event()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def recover(self) -> None:
        """At start-up and every housekeeping round: requeue jobs left running by dead workers of this host (at
        once) and stale ones anywhere; then apply the bounds on finished jobs (they may have changed)."""
        host = socket.gethostname()
        jobs, _ = self.store.list_jobs(limit=10_000, status="running")
        for job in jobs:
            parts = (job.worker or "").split(":")
            dead = len(parts) == 3 and parts[0] == host and parts[1].isdigit() and not _pid_alive(int(parts[1]))
            if dead and self.store.requeue_worker(job.worker or ""):
                log.warning("style job %s was left running by worker %s, whose process is gone: requeued",
                                job.id, job.worker)
        for job_id, status in self.store.recover_stale():
            log.warning("style job %s was left running by a stopped worker: now %s", job_id, status)
        self.housekeeping()

    def housekeeping(self) -> None:
        """Expire finished jobs past their time to live, then evict the oldest beyond the store's bounds."""
        expired = self.store.expire(self.ttl_seconds)
        evicted = self.store.prune()
        if expired or evicted:
            log.info("style jobs: %d expired, %d evicted by the bounds on finished jobs", expired, evicted)

    def start(self, threads: int) -> None:
        """Start worker threads (each runs one job at a time)."""
        self.recover()
        for i in range(threads):
            t = threading.Thread(target=self.run_forever, name=f"style-worker-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self, timeout: float = 10.0) -> None:
        """Ask the threads to stop; a running job is requeued by the next worker (its heartbeat stops)."""
        self._stop.set()
        self.wake.set()
        for t in self._threads:
            t.join(timeout)
        self.store.close()

    def run_forever(self) -> None:
        """Claim and run jobs until stopped; also requeue stale jobs and expire old ones."""
        last_housekeeping = float("-inf")
        while not self._stop.is_set():
            try:
                now = time.monotonic()
                if now - last_housekeeping > 30:
                    self.recover()  # also a worker of this host that died while this one runs
                    last_housekeeping = now
                job = self.store.claim(self.id, (KIND,))
                if job is None:
                    self.wake.wait(self.poll_seconds)
                    self.wake.clear()
                    continue
                self.run_job(job)
            except Exception:  # the loop must survive anything a job or the disk throws
                log.exception("style worker error")
                self._stop.wait(1.0)
        self.store.close()

    def run_job(self, job: Job) -> str:
        """Run one claimed job to a final state; returns that state."""
        t0 = time.perf_counter()
        d = self.store.job_dir(job.id)
        status, error = "failed", None
        try:
            # everything that can fail sits inside the try: a job must always reach a final state
            # inputs were vetted at submission; a limit lowered since must not fail a job already accepted
            loose = functools.partial(decode_image, max_pixels=10**9, max_bytes=10**10, max_side=10**9,
                                      max_aspect_ratio=1e9)
            content = loose((d / CONTENT_FILE).read_bytes())
            styles = [loose((d / style_file(i)).read_bytes())
                      for i in range(int(job.info.get("styles", 1)))]
            features, tag = self.features.get(self.device)
            info = {"feature_weights": tag, "device": str(self.device)}
            self.store.heartbeat(job.id, self.id, step=0, total=job.params["steps"], loss=None, info=info)
            params = StyleParams(**job.params)
            progress = _Progress(self, job.id, int(job.params["steps"]))
            with job_stream(self.device):  # several workers' jobs overlap on one GPU
                result = stylize(content, styles, params, features, self.device, progress=progress)
            self.store.write_file(job.id, RESULT_FILE, encode_image(result))
            status = "succeeded"
        except StyleCancelled:
            if self._stop.is_set() and self.store.release(job.id, self.id):
                log.info("style job %s handed back to the queue at shutdown", job.id)
                return "queued"
            status, error = "canceled", "canceled by request"
        except Exception as exc:
            log.exception("style job %s failed", job.id)
            error = f"{type(exc).__name__}: {exc}"
        if not self.store.finish(job.id, self.id, status, error=error):
            log.warning("style job %s was taken from this worker before it finished", job.id)
        if self.on_finish is not None:
            self.on_finish(status, time.perf_counter() - t0)
        return status


class _Progress:
    """The optimiser's per-step callback: heartbeat, cancellation check, occasional preview."""

    def __init__(self, worker: StyleWorker, job_id: str, total: int) -> None:
        self.worker = worker
        self.job_id = job_id
        self.total = total
        self.last_beat = 0.0
        self.last_preview = time.monotonic()

    def __call__(self, info: Any) -> bool:
        now = time.monotonic()
        final = info.step >= info.total
        # progress is written at most every 0.2 s (on a GPU, steps take milliseconds); a cancel request is read
        # every step (a read without the write lock), so a running job stops within one step of it
        if now - self.last_beat < 0.2 and not final:
            return self.worker.store.still_wanted(self.job_id, self.worker.id) and not self.worker._stop.is_set()
        self.last_beat = now
        ok = self.worker.store.heartbeat(self.job_id, self.worker.id, step=info.step, total=info.total,
                                         loss=float(info.loss))
        if ok and (now - self.last_preview > 2.0 or info.step == 1):
            self.worker.store.write_file(self.job_id, PREVIEW_FILE, encode_image(info.image()))
            self.last_preview = now
        return ok and not self.worker._stop.is_set()


# torchvision's default VGG-19 weights (VGG19_Weights.IMAGENET1K_V1): the file name, whose hex digits are the start of
# its sha256 (torch.hub's convention), as torchvision publishes it. Pinned here so that looking for the file does not
# import torchvision (seconds and ~150 MB in every process that checks, front workers included); a test compares
# both with torchvision's own metadata
VGG19_WEIGHTS = WeightsRef("vgg19-dcbb9e9d.pth", hash_prefix="dcbb9e9d")
VGG19_SOURCE = "torchvision VGG19_Weights.IMAGENET1K_V1"


class FeatureSource:
    """The VGG-19 feature network for style transfer: torchvision's ImageNet weights when present,
    otherwise the project's offline fallback (see docs/style-transfer.md); built once, on first use."""

    def __init__(self, weights_dir: Path, hub_dir: Path) -> None:
        self.weights_dir = weights_dir
        self.hub_dir = hub_dir
        self._lock = threading.Lock()
        self._cache: dict[str, tuple[Any, str]] = {}

    def get(self, device: torch.device) -> tuple[Any, str]:
        """(feature network, description of its weights)."""
        with self._lock:
            key = str(device)
            if key not in self._cache:
                self._cache[key] = self._build(device)
            return self._cache[key]

    def check(self) -> tuple[Path | None, str]:
        """Resolve the weights (hashing a file that is present): (file or None for the offline fallback, description).
        A file that is present but damaged is a RuntimeError, never a silent fall back to random features."""
        from app.runtime.registry import WeightsUnavailable, resolve_weights

        try:
            found = resolve_weights(VGG19_WEIGHTS, self.weights_dir, self.hub_dir, allow_download=False)
        except WeightsUnavailable as exc:
            if any((d / VGG19_WEIGHTS.file_name).is_file() for d in (self.weights_dir, self.hub_dir)):
                raise RuntimeError(f"the style feature network cannot be used: {exc}") from exc
            return None, f"random VGG-19 (seed 0): {VGG19_WEIGHTS.file_name} not found, see docs/style-transfer.md"
        return found.path, f"{VGG19_SOURCE} ({found.source}: {found.path.name})"

    def _build(self, device: torch.device) -> tuple[Any, str]:
        from models.style import VGGFeatures, prepare_features, random_vgg_features

        path, tag = self.check()
        if path is None:
            net = random_vgg_features(seed=0)
        else:
            net = VGGFeatures.from_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        # on the device and in its layout before any job: workers' jobs on their own CUDA streams only read it
        return prepare_features(net.eval(), device), tag
