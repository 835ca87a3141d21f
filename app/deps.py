"""Annotated dependency aliases onto the lifespan state and the calling principal."""

from __future__ import annotations

from typing import Annotated, TypeVar

from fastapi import Depends, Request

from app.auth import ANONYMOUS, SCOPE_KEY, Principal
from app.errors import ServiceUnavailable
from app.services.classification import ClassificationService
from app.services.faces import FacesService
from app.services.style import StyleJobs
from app.services.text import TextService
from app.state import AppState


def get_state(request: Request) -> AppState:
    """The AppState the lifespan yielded."""
    state: AppState = request.state.app_state
    return state


State = Annotated[AppState, Depends(get_state)]


def get_principal(request: Request) -> Principal:
    """The caller the auth middleware identified (the anonymous all-scopes principal when keys are off)."""
    p = request.scope.get(SCOPE_KEY)
    return p if isinstance(p, Principal) else ANONYMOUS


Caller = Annotated[Principal, Depends(get_principal)]
T = TypeVar("T")


def service_of(state: AppState, application: str) -> object:
    """Any declared application's service once started, else 503 saying why (see _loaded)."""
    return _loaded(state, application, state.services.get(application))


def _loaded(state: AppState, application: str, service: T | None) -> T:
    """An application's service once started, else 503: still loading (Retry-After), or why it cannot serve."""
    if service is not None:
        return service
    st = state.applications.get(application)
    if st is None or st.status == "loading":
        raise ServiceUnavailable(f"the {application} application is still loading; retry shortly", retry_after=5)
    if st.status == "disabled":
        raise ServiceUnavailable(f"the {application} application is disabled on this server")
    raise ServiceUnavailable(f"the {application} application is {st.status}: {st.reason}",
                             extra={"application": application})


def get_classification(state: State) -> ClassificationService:
    """The classification service, or 503 while models are still loading."""
    return _loaded(state, "classification", state.classification)


Classification = Annotated[ClassificationService, Depends(get_classification)]


def get_text(state: State) -> TextService:
    """The text service, or 503 while models are still loading."""
    return _loaded(state, "text", state.text)


Text = Annotated[TextService, Depends(get_text)]


def get_faces(state: State) -> FacesService:
    """The face service, or 503 while models are still loading."""
    return _loaded(state, "faces", state.faces)


Faces = Annotated[FacesService, Depends(get_faces)]


def get_style_jobs(state: State) -> StyleJobs:
    """The style-job service, or 503 while starting, when disabled or when it failed to start."""
    return _loaded(state, "style", state.style)


StyleJobsDep = Annotated[StyleJobs, Depends(get_style_jobs)]
