"""Response models shared by the routers (they make /docs accurate)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field


class Problem(BaseModel):
    """RFC 9457 problem details."""

    type: str
    title: str
    status: int
    detail: str
    instance: str | None = None


PROBLEM_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": Problem, "content": {"application/problem+json": {}}, "description": desc,
           **({"headers": {"Retry-After": {"description": "seconds to wait before retrying (when overloaded or "
                                           "loading)", "schema": {"type": "string"}}}} if code == 503 else {})}
    for code, desc in {
        400: "Malformed request or corrupt image", 401: "Missing or invalid API key",
        403: "The API key's principal lacks the scope this route needs",
        404: "Unknown model", 413: "Body, image or decoded pixels too large",
        415: "Not an image or unsupported format", 422: "Invalid parameters",
        503: "Model unavailable, still loading, or overloaded (see Retry-After)",
        504: "The request's deadline (X-Request-Timeout) passed before its work ran",
    }.items()
}


class Live(BaseModel):
    status: Literal["ok"] = "ok"


class ModelReadiness(BaseModel):
    name: str
    task: str
    status: str
    reason: str | None = None


class ApplicationInfo(BaseModel):
    status: Literal["loading", "ready", "degraded", "unavailable", "failed", "disabled"]
    reason: str | None = Field(None, description="why it is not (fully) ready")
    default_model: str | None = None


class ApplicationReadiness(ApplicationInfo):
    reason: str | None = Field(None, description="why it is not ready (omitted when API keys are on)")
    required: bool = Field(description="whether this readiness answer requires it")


class Ready(BaseModel):
    status: Literal["ready", "loading", "not-ready"]
    detail: str | None = None
    applications: dict[str, ApplicationReadiness] = Field(default_factory=dict)
    models: list[ModelReadiness] = Field(default_factory=list)


class ModelInfo(BaseModel):
    name: str
    task: str
    status: Literal["loading", "ready", "unavailable", "failed"]
    reason: str | None = Field(None, description="why the model is not ready (names the missing weights file)")
    family: str | None = None
    source: str | None = Field(None, description="'project' or the torchvision weights enum")
    weights: Literal["trained", "untrained"] | None = None
    weights_source: Literal["weights_dir", "hub_cache", "download", "untrained"] | None = None
    weights_file: str | None = None
    sha256: str | None = None
    num_labels: int | None = None
    input_size: int | None = None
    device: str | None = None
    load_seconds: float | None = None
    metrics: dict[str, Any] = Field(default_factory=dict)
    info: dict[str, Any] = Field(default_factory=dict)


class ModelList(BaseModel):
    default_classifier: str | None
    default_text_model: str | None = None
    applications: dict[str, ApplicationInfo] = Field(default_factory=dict, description="each application's status "
                                                     "and, when it does not serve, why")
    models: list[ModelInfo]


class Prediction(BaseModel):
    label: str
    index: int
    probability: float = Field(ge=0.0, le=1.0)


class ImageResult(BaseModel):
    filename: str
    top_k: list[Prediction]


class ClassifyResponse(BaseModel):
    model: str
    weights: Literal["trained", "untrained"]
    weights_source: str
    results: list[ImageResult]

    model_config = {
        "json_schema_extra": {
            "examples": [{
                "model": "cifar10-resnet56", "weights": "trained", "weights_source": "weights_dir",
                "results": [{"filename": "ship.jpg", "top_k": [
                    {"label": "ship", "index": 8, "probability": 0.93},
                    {"label": "airplane", "index": 0, "probability": 0.04}]}],
            }]
        }
    }
