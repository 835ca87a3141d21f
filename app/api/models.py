"""/models: every model with its status, and run-time model management (admin scope): load, unload, reload with
new weights, defaults per task, batching per model. Changes survive a restart."""

from __future__ import annotations

import asyncio
import re
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Body, File, Form, Response, UploadFile

from app.api.model_schemas import (
    BatchingInfo,
    BatchingUpdate,
    Defaults,
    ModelChange,
    ModelInfo,
    ModelList,
    ReloadResult,
    UnloadResult,
)
from app.api.schemas import PROBLEM_RESPONSES
from app.deps import Caller, State
from app.errors import InvalidParameters, NotFound, PayloadTooLarge, ServiceUnavailable
from app.runtime.registry import WeightsOverride
from app.services.models import ModelManager
from app.state import AppState
from models.weights import sha256_file

router = APIRouter(tags=["models"])

SHA256 = re.compile(r"^[0-9a-f]{64}$")
# 409: another action on the model is under way, or the change is refused (e.g. the face gallery's model)
RESPONSES: dict[int | str, dict[str, Any]] = {
    **PROBLEM_RESPONSES,
    409: {"model": PROBLEM_RESPONSES[422]["model"], "content": {"application/problem+json": {}},
          "description": "the model is busy with another action, or the change is refused (the reason says why)"},
}


async def _remote(state: AppState) -> dict[str, Any] | None:
    """The listing of the models other processes hold (a Ray Serve ingress: each application's deployment), merged;
    None when this process holds its models itself."""
    if not state.model_sources:
        return None
    parts = await asyncio.gather(*(source() for source in state.model_sources.values()), return_exceptions=True)
    merged: dict[str, Any] = {"models": [], "defaults": {}, "changes": []}
    for part in parts:
        if isinstance(part, BaseException):
            continue  # an application whose deployment does not answer: its status in /health/ready says more
        merged["models"] += part["models"]
        merged["defaults"].update(part["defaults"])
        merged["changes"] += part["changes"]
    merged["changes"] = sorted(merged["changes"], key=lambda c: -float(c["at"]))[:50]
    return merged


def _manager(state: AppState) -> ModelManager:
    if state.ready.is_set() and state.declared and not any(a.task for a in state.declared):
        # no application of this process loads models: a Ray Serve ingress or a front worker, whose models live
        # in other processes
        raise ServiceUnavailable("this process holds no models: they live in another process (on Ray Serve each "
                                 "application's deployment, changed by redeploying it; with `serve --front-workers` "
                                 "the model process, changed by restarting the service) (docs/scale-out.md)")
    if state.models is None or state.registry is None:
        raise ServiceUnavailable("models are still loading; retry shortly", retry_after=5)
    return state.models


def _info(state: AppState, name: str) -> ModelInfo:
    return ModelInfo.model_validate(_manager(state).view(name))


@router.get("/models", response_model=ModelList, responses=PROBLEM_RESPONSES, summary="List models")
async def list_models(state: State) -> ModelList:
    """Every model: task, status, where its weights came from, metrics from its card, its batching, the default of
    each task, and the run-time changes (newest first)."""
    listing = await _remote(state) or _manager(state).listing()
    apps = {a: {"status": st.status, "reason": st.reason, "default_model": st.default_model}
            for a, st in state.applications.items()}
    defaults = listing["defaults"]
    return ModelList(default_classifier=defaults.get("image-classification"),
                     default_text_model=defaults.get("text-classification"), defaults=defaults,
                     applications=apps,  # type: ignore[arg-type]
                     models=[ModelInfo.model_validate(m) for m in listing["models"]],
                     changes=[ModelChange.model_validate(c) for c in listing["changes"]])


@router.get("/models/defaults", response_model=Defaults, responses=PROBLEM_RESPONSES,
            summary="The default model of each task")
async def get_defaults(state: State) -> Defaults:
    """The model each task uses when a request names none."""
    remote = await _remote(state)
    return Defaults(defaults=remote["defaults"] if remote is not None else _manager(state).defaults())


@router.put("/models/defaults", response_model=Defaults, responses=RESPONSES, summary="Set default models")
async def put_defaults(
    state: State, caller: Caller,
    body: Annotated[dict[str, str], Body(description="task (as /models spells it) -> model name; tasks left out "
                                         "keep their default", examples=[{"image-classification": "resnet18"}])],
) -> Defaults:
    """Make each named model (loaded and ready) the default of its task; all or nothing. Kept across restarts."""
    return Defaults(defaults=await _manager(state).set_defaults(body, by=caller.name))


@router.get("/models/{name}", response_model=ModelInfo, responses=PROBLEM_RESPONSES, summary="One model")
async def get_model(name: str, state: State) -> ModelInfo:
    """One model (its status while it loads, after a load at run time)."""
    remote = await _remote(state)
    if remote is not None:
        found = [m for m in remote["models"] if m["name"] == name]
        if not found:
            raise NotFound(f"unknown model {name!r}")
        return ModelInfo.model_validate(found[0])
    if name not in _manager(state).registry.states:
        raise NotFound(f"unknown model {name!r}")
    return _info(state, name)


@router.post("/models/{name}/load", response_model=ModelInfo, status_code=202, responses=RESPONSES,
             summary="Load a model while serving")
async def load_model(name: str, state: State, caller: Caller, response: Response) -> ModelInfo:
    """Load a manifest model or a torchvision classifier in the background: 202 with its status URL (Location);
    it then becomes `ready`, or `unavailable`/`failed` with the reason. Kept across restarts."""
    await _manager(state).load(name, by=caller.name)
    response.headers["Location"] = f"/models/{name}"
    return _info(state, name)


@router.post("/models/{name}/unload", response_model=UnloadResult, responses=RESPONSES,
             summary="Unload a model while serving")
async def unload_model(name: str, state: State, caller: Caller) -> UnloadResult:
    """Stop taking new work for the model, finish its queued work, free its memory; says how much was freed and
    which model is now its task's default. Kept across restarts."""
    return UnloadResult.model_validate(await _manager(state).unload(name, by=caller.name))


@router.post("/models/{name}/reload", response_model=ReloadResult, responses=RESPONSES,
             summary="Swap a model's weights while serving")
async def reload_model(
    name: str, state: State, caller: Caller,
    weights: Annotated[UploadFile | None, File(description="a new weights file (a state dict)")] = None,
    file: Annotated[str | None, Form(description="or: the name of a file already in the weights directory")] = None,
    sha256: Annotated[str | None, Form(description="the new file's sha256 (required with weights or file)")] = None,
) -> ReloadResult:
    """Build a new copy beside the serving one (from the new file, or else from the manifest read again), switch
    to it atomically, drain and free the old one: requests keep being answered throughout. A new file must match
    `sha256`; a copy that fails to load changes nothing (422)."""
    manager = _manager(state)
    override = await _new_weights(state, manager, weights, file, sha256)
    return ReloadResult.model_validate(await manager.reload(name, by=caller.name, weights=override))


async def _new_weights(state: AppState, manager: ModelManager, upload: UploadFile | None, file: str | None,
                       sha256: str | None) -> WeightsOverride | None:
    """The verified new weights of a reload, kept in the model-set store (None: reload from the manifest)."""
    if upload is None and not file:
        if sha256:
            raise InvalidParameters("sha256 is given without a weights file or a file name")
        return None
    if upload is not None and file:
        raise InvalidParameters("send either a weights file or a file name, not both")
    want = (sha256 or "").strip().lower()
    if not SHA256.match(want):
        raise InvalidParameters("sha256 (64 hexadecimal digits) is required with new weights")
    if upload is not None:
        limit = state.settings.max_body_bytes
        data = await upload.read(limit + 1)
        if len(data) > limit:
            raise PayloadTooLarge(f"weights file over {limit} bytes")
    else:
        assert file is not None
        if Path(file).name != file or file.startswith("."):
            raise InvalidParameters(f"file must be a plain file name in the weights directory, not {file!r}")
        path = state.settings.weights_dir / file
        if not path.is_file():
            raise InvalidParameters(f"no file {file!r} in the weights directory")
        got = await asyncio.to_thread(sha256_file, path)
        if got != want:
            raise InvalidParameters(f"{file} has sha256 {got}, not {want}")
        data = await asyncio.to_thread(path.read_bytes)
    return await asyncio.to_thread(manager.keep_weights, data, want)


@router.get("/models/{name}/batching", response_model=BatchingInfo, responses=PROBLEM_RESPONSES,
            summary="A model's batching")
async def get_batching(name: str, state: State) -> BatchingInfo:
    """The serving model's micro-batcher limits."""
    return BatchingInfo.model_validate(asdict(_manager(state).batching(name)))


@router.put("/models/{name}/batching", response_model=BatchingInfo, responses=RESPONSES,
            summary="Change a model's batching")
async def put_batching(name: str, state: State, caller: Caller, body: BatchingUpdate) -> BatchingInfo:
    """Change any of the serving model's batcher limits, from its next batch on. Kept across restarts."""
    values = body.model_dump(exclude_none=True)
    if not values:
        raise InvalidParameters("name at least one of max_batch_size, max_wait_ms, max_queue")
    config = await _manager(state).set_batching(name, values, by=caller.name)
    return BatchingInfo.model_validate(asdict(config))
