"""Annotated dependency aliases onto the lifespan state, and the API-key guard."""

from __future__ import annotations

import hmac
from typing import Annotated, TypeVar

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from app.errors import ServiceUnavailable, Unauthorized
from app.services.classification import ClassificationService
from app.services.faces import FacesService
from app.services.style import StyleJobs
from app.services.text import TextService
from app.state import AppState

_api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="API key (when keys are configured)")
_bearer = HTTPBearer(auto_error=False, description="API key as a bearer token (when keys are configured)")


def get_state(request: Request) -> AppState:
    """The AppState the lifespan yielded."""
    state: AppState = request.state.app_state
    return state


State = Annotated[AppState, Depends(get_state)]
T = TypeVar("T")


def _loaded(service: T | None) -> T:
    """A service the lifespan builds once the models are loaded, or 503 until then."""
    if service is None:
        raise ServiceUnavailable("models are still loading; retry shortly", retry_after=5)
    return service


def get_classification(state: State) -> ClassificationService:
    """The classification service, or 503 while models are still loading."""
    return _loaded(state.classification)


Classification = Annotated[ClassificationService, Depends(get_classification)]


def get_text(state: State) -> TextService:
    """The text service, or 503 while models are still loading."""
    return _loaded(state.text)


Text = Annotated[TextService, Depends(get_text)]


def get_faces(state: State) -> FacesService:
    """The face service, or 503 while models are still loading."""
    return _loaded(state.faces)


Faces = Annotated[FacesService, Depends(get_faces)]


def get_style_jobs(state: State) -> StyleJobs:
    """The style-job service, or 503 while starting (404-like 503 when disabled)."""
    if state.style is None:
        if not state.settings.style_enabled:
            raise ServiceUnavailable("style transfer is disabled on this server (CNN_STYLE_ENABLED=false)")
        raise ServiceUnavailable("the job store is still opening; retry shortly", retry_after=5)
    return state.style


StyleJobsDep = Annotated[StyleJobs, Depends(get_style_jobs)]


def require_api_key(
    state: State,
    key: Annotated[str | None, Security(_api_key_header)],
    bearer: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
) -> None:
    """When API keys are configured, demand one of them (constant-time comparison)."""
    keys = state.settings.api_keys
    if not keys:
        return
    given = key if key is not None else (bearer.credentials if bearer is not None else None)
    if given is None:
        raise Unauthorized("an API key is required: send X-API-Key or Authorization: Bearer",
                           headers={"WWW-Authenticate": "Bearer"})
    ok = False
    for candidate in keys:  # compare with every key so timing does not tell which one was close
        ok |= hmac.compare_digest(given.encode(), candidate.encode())
    if not ok:
        raise Unauthorized("invalid API key", headers={"WWW-Authenticate": "Bearer"})
