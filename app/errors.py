"""RFC 9457 problem details: one exception type for every expected failure, and its handlers."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"
_TYPE_BASE = "https://cnn-apps.invalid/problems/"  # stable identifiers, not fetched


class ProblemError(Exception):
    """An expected failure that becomes a problem-details response."""

    status: int = 400
    title: str = "Bad request"
    slug: str = "bad-request"

    def __init__(
        self,
        detail: str,
        *,
        status: int | None = None,
        title: str | None = None,
        slug: str | None = None,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        if status is not None:
            self.status = status
        if title is not None:
            self.title = title
        if slug is not None:
            self.slug = slug
        self.headers = headers or {}
        self.extra = extra or {}

    def body(self, instance: str | None = None) -> dict[str, Any]:
        """The problem-details JSON object."""
        out: dict[str, Any] = {
            "type": _TYPE_BASE + self.slug,
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
        }
        if instance:
            out["instance"] = instance
        out.update(self.extra)
        return out


class BadRequest(ProblemError):
    status, title, slug = 400, "Bad request", "bad-request"


class Unauthorized(ProblemError):
    status, title, slug = 401, "Unauthorized", "unauthorized"


class NotFound(ProblemError):
    status, title, slug = 404, "Not found", "not-found"


class Conflict(ProblemError):
    status, title, slug = 409, "Conflict", "conflict"


class PayloadTooLarge(ProblemError):
    status, title, slug = 413, "Payload too large", "payload-too-large"


class UnsupportedMediaType(ProblemError):
    status, title, slug = 415, "Unsupported media type", "unsupported-media-type"


class Forbidden(ProblemError):
    status, title, slug = 403, "Forbidden", "forbidden"


class InvalidParameters(ProblemError):
    status, title, slug = 422, "Invalid parameters", "invalid-parameters"


class ServiceUnavailable(ProblemError):
    status, title, slug = 503, "Service unavailable", "service-unavailable"

    def __init__(self, detail: str, *, retry_after: float | None = None, **kw: Any) -> None:
        headers = dict(kw.pop("headers", None) or {})
        if retry_after is not None:
            headers["Retry-After"] = str(max(1, round(retry_after)))
        super().__init__(detail, headers=headers, **kw)


class DeadlineExceeded(ProblemError):
    status, title, slug = 504, "Deadline exceeded", "deadline-exceeded"


def problem_response(err: ProblemError, request: Request | None = None) -> JSONResponse:
    """Render a ProblemError as an application/problem+json response."""
    instance = request.url.path if request is not None else None
    return JSONResponse(err.body(instance), status_code=err.status, headers=err.headers, media_type=PROBLEM_JSON)


_HTTP_SLUGS = {
    400: BadRequest, 401: Unauthorized, 403: Forbidden, 404: NotFound, 409: Conflict, 413: PayloadTooLarge,
    415: UnsupportedMediaType, 422: InvalidParameters, 503: ServiceUnavailable,
}


def install_handlers(app: FastAPI) -> None:
    """Make every failure, expected or not, a problem-details response without a traceback."""

    @app.exception_handler(ProblemError)
    async def _problem(request: Request, exc: ProblemError) -> JSONResponse:
        return problem_response(exc, request)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            {"loc": [str(p) for p in e.get("loc", ())], "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
            for e in exc.errors()
        ]
        parts = [f"{'/'.join(e['loc'])}: {e['msg']}" for e in errors]
        err = InvalidParameters("; ".join(parts) or "invalid request", extra={"errors": errors})
        return problem_response(err, request)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        cls = _HTTP_SLUGS.get(exc.status_code, ProblemError)
        title = None if cls is not ProblemError else "HTTP error"
        err = cls(str(exc.detail), status=exc.status_code, title=title, headers=dict(exc.headers or {}))
        return problem_response(err, request)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        err = ProblemError("internal error; see the server log", status=500, title="Internal server error",
                           slug="internal")
        return problem_response(err, request)
