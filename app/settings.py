"""The one settings class; every value can be set with a CNN_-prefixed environment variable."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

PROJECT_ROOT = Path(__file__).resolve().parent.parent

DEFAULT_IMAGENET_MODELS = [
    "resnet50", "densenet121", "resnext50_32x4d", "wide_resnet50_2", "vgg16_bn", "efficientnet_b0", "convnext_tiny",
]
# the project's own CIFAR-10 models (weights/), strongest single network first
DEFAULT_CIFAR_MODELS = ["cifar10-resnet56", "cifar10-ensemble", "cifar10-ensemble-40k", "cifar10-whitened-convnet-30",
                        "cifar10-whitened-convnet", "cifar10-resnet32", "cifar10-wrn-16-2", "cifar10-se-resnet20",
                        "cifar10-resnet20"]


def _split_list(v: Any) -> Any:
    if isinstance(v, str):
        return [p.strip() for p in v.split(",") if p.strip()]
    return v


class Settings(BaseSettings):
    """Service configuration (environment prefix CNN_, lists comma-separated)."""

    model_config = SettingsConfigDict(env_prefix="CNN_", env_file=None, extra="ignore")

    host: str = "127.0.0.1"
    port: int = 8000
    log_level: str = "info"
    front_workers: int = Field(default=0, ge=0, le=64, description="`serve` only: 0 runs everything in one process; "
                               "N runs N HTTP processes that forward classification, text and faces to one model "
                               "process (the micro-batchers, the device and style workers live there)")
    model_host_socket: str = Field(default="", description="the model process's Unix socket with front workers "
                                   "(default: CNN_DATA_DIR/model-host.sock)")

    weights_dir: Path = Field(default=PROJECT_ROOT / "weights", description="manifest + checkpoint files")
    torch_home: Path | None = Field(default=None, description="overrides $TORCH_HOME (hub cache)")
    allow_downloads: bool = Field(default=False, description="let start-up download missing torchvision weights")
    allow_untrained: bool = Field(default=False, description="serve random weights, labelled 'untrained' (dev/tests)")

    classifiers: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: [*DEFAULT_IMAGENET_MODELS, *DEFAULT_CIFAR_MODELS],
        description="image classifiers loaded at start-up: manifest names or torchvision model names",
    )
    default_classifier: str | None = Field(
        default=None, description="model used when a request names none (default: the first configured classifier with "
        "trained weights, so an ImageNet model when its weights are present, else cifar10-resnet56)"
    )

    text_models: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["agnews-wordcnn", "agnews-vdcnn9"],
        description="text classifiers loaded at start-up (manifest names; the first ready one is the default)"
    )
    default_text_model: str | None = Field(default=None, description="text model used when a request names none")
    max_texts_per_request: int = Field(default=64, ge=1)
    max_text_chars: int = Field(default=100_000, ge=1, description="characters per text (longer: 422)")

    face_models: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["lfw-face-ensemble", "lfw-face-resnet"],
        description="face embedders loaded at start-up (manifest names; the first with trained weights is the default)"
    )
    face_model: str | None = Field(default=None, description="the embedder of the gallery and of requests naming none "
                                   "(default: the first configured face model with trained weights)")
    face_detector: Literal["haar", "none"] = Field(default="haar", description="default detector ('none': the "
                                                   "upload is already a cropped face)")
    face_haar_scale_factor: float = Field(default=1.1, gt=1.0, le=2.0)
    face_haar_min_neighbors: int = Field(default=5, ge=0, le=50)
    face_haar_min_size: int = Field(default=24, ge=8, description="smallest face side in pixels")
    face_haar_max_side: int = Field(default=1024, ge=64, description="images are scaled to this side for detection")
    face_max_faces: int = Field(default=10, ge=1, le=100, description="faces per image considered by embed/identify")
    face_threshold: float | None = Field(default=None, gt=0.0, lt=4.0, description="overrides the model's calibrated "
                                         "threshold (squared L2)")
    face_identify_fpir: float = Field(default=0.01, gt=0.0, lt=1.0, description="/faces/identify: probability that a "
                                      "stranger is identified as someone at the current gallery size (FPIR)")
    face_enroll_min_side: int = Field(default=40, ge=1, description="/faces/enroll: faces whose shorter box side "
                                      "(pixels, original image) is below this are reported as 'small'")
    face_enroll_min_sharpness: float = Field(default=100.0, ge=0.0, description="/faces/enroll: faces whose crop's "
                                             "Laplacian variance is below this are reported as 'blurred'")
    gallery_index: Literal["flat", "ivf"] = Field(default="flat", description="exact (flat) or approximate (ivf)")
    gallery_ivf_nlist: int = Field(default=1024, ge=1)
    gallery_ivf_nprobe: int = Field(default=16, ge=1)
    gallery_gpu: bool = Field(default=True, description="search on the GPU when FAISS sees one")

    style_enabled: bool = Field(default=True, description="serve /style-transfer")
    data_dir: Path = Field(default=PROJECT_ROOT / "data", description="stores: face gallery and style jobs")
    database_url: str | None = Field(
        default=None, description="PostgreSQL URL (postgresql://user@host/db): the job store and the face gallery "
        "live there, shared by every replica; unset: the embedded SQLite stores under CNN_DATA_DIR. Style-job files "
        "stay under CNN_DATA_DIR/style-jobs, which replicas on several hosts must share (a common volume)")
    style_workers: int = Field(default=1, ge=0, le=16,
                               description="style jobs run at once inside the server (0: only external workers)")
    style_max_queue: int = Field(default=32, ge=1)
    style_max_size: int = Field(default=1024, ge=32, description="largest result side in pixels")
    style_max_steps: int = Field(default=1000, ge=1)
    style_max_styles: int = Field(default=4, ge=1)
    style_ttl_hours: float = Field(default=24.0, gt=0, description="finished jobs and their files are deleted after")
    style_stale_seconds: float = Field(default=120.0, gt=0, description="a running job without heartbeat is requeued")
    style_max_finished_jobs: int = Field(default=1000, ge=1, description="finished jobs kept; beyond it the oldest "
                                         "finished ones (records and files) are deleted")
    style_max_finished_bytes: int = Field(default=2 * 1024**3, ge=1, description="bytes the files of finished jobs "
                                          "may take; beyond it the oldest finished jobs are deleted")

    device: str = Field(default="auto", description="auto, cpu, cuda, cuda:N")
    torch_threads: int = Field(default=0, description="intra-op CPU threads (0: torch default)")
    inference_threads: int = Field(default=2, description="threads running model forwards (one batch per model)")
    compile: bool = Field(default=False, description="torch.compile models on CUDA")
    cuda_graphs: bool = Field(default=False, description="on CUDA, image classifiers and face embedders replay a "
                              "CUDA graph per batch shape (recorded at the warm-up; pair with batch buckets)")
    warmup: bool = Field(default=True, description="run one forward per model at start-up")

    batch_max_size: int = Field(default=16, ge=1, le=1024)
    batch_max_wait_ms: float = Field(
        default=0.0, ge=0.0, le=1000.0,
        description="how long a batch waits for company; 0 = greedy: take what queued while the model was busy",
    )
    batch_max_queue: int = Field(default=256, ge=1)
    gpu_decode: Literal["auto", "on", "off"] = Field(
        default="auto",
        description="decode JPEGs for image classifiers on the model's device (nvJPEG on CUDA) and preprocess "
                    "them there; other formats, EXIF-rotated or CMYK JPEGs and JPEGs the decoder refuses take the "
                    "CPU path; auto: on for classifiers on CUDA, off on the CPU (on: also on the CPU, for tests)",
    )
    batch_buckets: Literal["auto", "on", "off"] = Field(
        default="auto",
        description="pad each batch to the next power of two (at most the model's max batch size) before its "
                    "forward, so the GPU sees a handful of batch shapes (cudnn.benchmark tunes each new shape once) "
                    "instead of one per batch size; auto: on for models on CUDA, off on CPU, where padding only "
                    "costs time",
    )
    batch_overrides: dict[str, dict[str, float]] = Field(
        default_factory=dict,
        description='per-model batcher settings, JSON: {"resnet50": {"max_batch_size": 8, "max_wait_ms": 10}}',
    )

    max_body_bytes: int = Field(default=50 * 1024 * 1024, description="whole request body limit")
    max_image_bytes: int = Field(default=10 * 1024 * 1024, description="per uploaded image")
    max_image_pixels: int = Field(default=40_000_000, description="decoded pixel cap (decompression bombs)")
    max_image_side: int = Field(default=20_000, ge=1, description="longest image side in pixels, checked from the "
                                "header before decoding (413 above)")
    max_aspect_ratio: float = Field(default=20.0, ge=1.0, description="longest side / shortest side, checked from "
                                    "the header (422 above; panoramas to 10:1 pass)")
    max_images_per_request: int = Field(default=16, ge=1)

    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="plain keys (principals key-1, key-2, ... with scopes read, write, "
        "metrics); when any key is configured every non-health endpoint needs X-API-Key or Bearer"
    )
    api_keys_file: Path | None = Field(
        default=None, description="JSON list of principals: {name, key_sha256, scopes: read|write|admin|metrics} "
        "(make one with `python -m app.cli keygen NAME --scopes read,write`)")

    in_flight_max: int = Field(default=32, ge=1, description="requests admitted at once per application "
                               "(classification, text, faces, style); more get 503 + Retry-After before their body "
                               "is read")
    in_flight_overrides: dict[str, int] = Field(default_factory=dict, description='per application, JSON: '
                                                '{"classification": 64, "style": 4}')
    request_timeout_seconds: float | None = Field(
        default=None, gt=0, le=3600, description="default per-request deadline; queued work past it is dropped with "
        "504 (clients may ask for less with X-Request-Timeout)")
    ready_requires: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="applications /health/ready requires (default: every enabled one)")

    @field_validator("classifiers", "text_models", "face_models", "api_keys", "ready_requires", mode="before")
    @classmethod
    def _lists(cls, v: Any) -> Any:
        return _split_list(v)

    @field_validator("api_keys_file", "request_timeout_seconds", mode="before")
    @classmethod
    def _empty_is_unset(cls, v: Any) -> Any:
        return None if isinstance(v, str) and not v.strip() else v  # CNN_X= in a compose file means unset

    @field_validator("ready_requires", "in_flight_overrides")
    @classmethod
    def _known_applications(cls, v: Any) -> Any:
        unknown = sorted(set(v) - {"classification", "text", "faces", "style"})
        if unknown:
            raise ValueError(f"unknown applications {unknown}; known: classification, text, faces, style")
        return v

    def in_flight_limit(self, application: str) -> int:
        """The in-flight bound of one application."""
        return max(1, int(self.in_flight_overrides.get(application, self.in_flight_max)))

    def batch_config_for(self, model: str) -> dict[str, float]:
        """Batcher settings for one model: the global values overlaid with its override."""
        base: dict[str, float] = {
            "max_batch_size": self.batch_max_size,
            "max_wait_ms": self.batch_max_wait_ms,
            "max_queue": self.batch_max_queue,
        }
        base.update(self.batch_overrides.get(model, {}))
        return base
