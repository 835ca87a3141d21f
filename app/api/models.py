"""GET /models: every configured model with its status, weights source and metrics."""

from __future__ import annotations

from fastapi import APIRouter

from app.api.schemas import PROBLEM_RESPONSES, ModelInfo, ModelList
from app.deps import State
from app.errors import NotFound, ServiceUnavailable

router = APIRouter(tags=["models"])


@router.get("/models", response_model=ModelList, responses=PROBLEM_RESPONSES, summary="List models")
async def list_models(state: State) -> ModelList:
    """Every configured model: task, status, where its weights came from, metrics from its card."""
    if state.registry is None:
        raise ServiceUnavailable("models are still loading; retry shortly", retry_after=5)
    default = state.classification.default_model if state.classification else None
    default_text = state.text.default_model if state.text else None
    apps = {a: {"status": st.status, "reason": st.reason, "default_model": st.default_model}
            for a, st in state.applications.items()}
    return ModelList(default_classifier=default, default_text_model=default_text, applications=apps,  # type: ignore[arg-type]
                     models=[ModelInfo.model_validate(state.registry.describe(n)) for n in state.registry.states])


@router.get("/models/{name}", response_model=ModelInfo, responses=PROBLEM_RESPONSES, summary="One model")
async def get_model(name: str, state: State) -> ModelInfo:
    """One configured model."""
    if state.registry is None:
        raise ServiceUnavailable("models are still loading; retry shortly", retry_after=5)
    if name not in state.registry.states:
        raise NotFound(f"unknown model {name!r}")
    return ModelInfo.model_validate(state.registry.describe(name))
