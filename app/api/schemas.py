"""Response models shared by the routers (they make /docs accurate)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

# the services' typed results that the classification and text routes answer with (one class, one schema name)
from app.services.results import ClassifyResponse as ClassifyResponse
from app.services.results import ImageResult as ImageResult
from app.services.results import Prediction as Prediction


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
