"""The manifest schema (weights/manifest.json): one typed entry per model, with its architecture,
labels, preprocessing, weights file and sha256, training information and metrics.

It travels with the models (as torchvision keeps its `Weights` next to its builders), so training
code and the service read the same schema."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from models.faces.identification import ImpostorTable

MANIFEST_NAME = "manifest.json"
TASKS = ("image-classification", "face-embedding", "text-classification", "style-features")
# the tasks the shipped applications serve; an application added to the service brings its own task name
KNOWN_TASKS = ("image-classification", "face-embedding", "text-classification", "style-features")
TASK_PATTERN = r"^[a-z][a-z0-9-]{0,63}$"


class PreprocessingEntry(BaseModel):
    """How images are prepared for the model (see models.preprocess.ImageSpec)."""

    model_config = ConfigDict(extra="forbid")
    resize: int = Field(gt=0)
    crop: int = Field(gt=0)
    mean: list[float] = Field(min_length=3, max_length=3)
    std: list[float] = Field(min_length=3, max_length=3)
    interpolation: Literal["nearest", "bilinear", "bicubic"] = "bilinear"


class ManifestEntry(BaseModel):
    """One model in weights/manifest.json."""

    model_config = ConfigDict(extra="allow")
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
    task: str = Field(pattern=TASK_PATTERN)
    family: str
    arch: dict[str, Any] = Field(default_factory=dict)
    file: str = Field(pattern=r"^[^/\\]+$")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    labels: list[str] = Field(default_factory=list)
    preprocessing: PreprocessingEntry | None = None
    source: str = "project"
    training: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)
    card: str | None = None
    license: str | None = None

    @model_validator(mode="after")
    def _task_fields(self) -> ManifestEntry:
        if self.task in ("image-classification", "text-classification") and len(self.labels) < 2:
            raise ValueError(f"a {self.task} model needs at least two labels")
        if self.task == "image-classification" and self.preprocessing is None:
            raise ValueError("an image classifier needs its preprocessing")
        if self.task == "text-classification" and not isinstance((self.model_extra or {}).get("encoding"), dict):
            raise ValueError("a text classifier needs its character encoding ('encoding')")
        if self.task == "face-embedding":
            extra = self.model_extra or {}
            if self.preprocessing is None:
                raise ValueError("a face embedder needs its preprocessing (input size, mean, std)")
            threshold = extra.get("threshold")
            if not isinstance(threshold, int | float) or not 0.0 < float(threshold) < 4.0:
                raise ValueError("a face embedder needs its calibrated 'threshold' (squared L2 on unit vectors, "
                                 "between 0 and 4)")
            if extra.get("identification") is not None:
                ImpostorTable.from_manifest(extra["identification"])  # ValueError names what is wrong
        return self


class Manifest(BaseModel):
    """weights/manifest.json."""

    model_config = ConfigDict(extra="forbid")
    models: list[ManifestEntry]


def load_manifest(weights_dir: Path) -> dict[str, ManifestEntry]:
    """Entries of the manifest in weights_dir by name (empty when there is no manifest)."""
    path = weights_dir / MANIFEST_NAME
    if not path.exists():
        return {}
    try:
        manifest = Manifest.model_validate(json.loads(path.read_text()))
    except (ValueError, ValidationError) as exc:
        raise RuntimeError(f"{path}: invalid manifest: {exc}") from exc
    names = [m.name for m in manifest.models]
    if len(set(names)) != len(names):
        raise RuntimeError(f"{path}: duplicate model names")
    return {m.name: m for m in manifest.models}
