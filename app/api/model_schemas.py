"""Response and request models of /models: the model list and run-time model management."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from app.api.schemas import ApplicationInfo


class BatchingInfo(BaseModel):
    max_batch_size: int = Field(ge=1, description="items per forward pass at most")
    max_wait_ms: float = Field(ge=0, description="how long a batch waits for company")
    max_queue: int = Field(ge=1, description="items queued at most; beyond it 503 + Retry-After")


class BatchingUpdate(BaseModel):
    """Any subset of a model's batcher limits; the others keep their values."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"max_batch_size": 32,
                                                                              "max_wait_ms": 2}]})
    max_batch_size: int | None = Field(None, ge=1, le=4096)
    max_wait_ms: float | None = Field(None, ge=0, le=10_000, allow_inf_nan=False)
    max_queue: int | None = Field(None, ge=1, le=1_000_000)


class ModelChange(BaseModel):
    at: float = Field(description="unix time of the change")
    action: Literal["load", "unload", "reload", "defaults", "batching", "set-aside"]
    model: str | None = None
    by: str = Field(description="the principal who made it")
    detail: str


class ModelInfo(BaseModel):
    name: str
    task: str
    status: Literal["loading", "ready", "unavailable", "failed", "unloading"]
    reason: str | None = Field(None, description="why the model is not ready (names the missing weights file)")
    family: str | None = None
    source: str | None = Field(None, description="'project' or the torchvision weights enum")
    weights: Literal["trained", "untrained"] | None = None
    weights_source: Literal["weights_dir", "hub_cache", "download", "runtime", "untrained"] | None = Field(
        None, description="where the weights file was found; runtime: a file given to this server by a reload")
    weights_file: str | None = None
    sha256: str | None = None
    num_labels: int | None = None
    input_size: int | None = None
    device: str | None = None
    load_seconds: float | None = None
    metrics: dict[str, Any] = Field(default_factory=dict)
    info: dict[str, Any] = Field(default_factory=dict)
    origin: Literal["settings", "runtime"] | None = Field(None, description="configured by the settings, or "
                                                          "changed at run time (kept across restarts)")
    changed_at: float | None = Field(None, description="unix time of its last run-time change")
    batching: BatchingInfo | None = Field(None, description="its batcher's limits (while it serves)")
    busy: Literal["loading", "unloading", "reloading"] | None = Field(None, description="an action under way")


class ModelList(BaseModel):
    default_classifier: str | None
    default_text_model: str | None = None
    defaults: dict[str, str | None] = Field(default_factory=dict, description="the default model of each task")
    applications: dict[str, ApplicationInfo] = Field(default_factory=dict, description="each application's status "
                                                     "and, when it does not serve, why")
    models: list[ModelInfo]
    changes: list[ModelChange] = Field(default_factory=list, description="run-time changes, newest first (50)")


class FreedMemory(BaseModel):
    parameter_bytes: int = Field(description="bytes of the model's parameters and buffers")
    rss_before: int = Field(description="process resident memory before the unload, bytes")
    rss_after: int
    rss_freed: int = Field(description="rss_before - rss_after (the allocator may keep some)")
    cuda_allocated_before: int | None = None
    cuda_allocated_after: int | None = None


class UnloadResult(BaseModel):
    name: str
    task: str
    status: Literal["unloaded"]
    freed: FreedMemory
    default_model: str | None = Field(description="the task's default model now")


class ReloadResult(BaseModel):
    name: str
    task: str
    status: Literal["ready"]
    previous_sha256: str | None
    sha256: str | None
    weights_source: str
    load_seconds: float | None
    freed_parameter_bytes: int = Field(description="bytes of the old copy's parameters and buffers, now freed")


class Defaults(BaseModel):
    defaults: dict[str, str | None] = Field(description="task -> its default model")
