"""Pure ASGI middleware: the gate (route, key, scope, room, deadline), the body size limit, and metrics.

Order of work for one request, all before the application reads a byte of the body:
match the route -> authenticate and check its scope (401/403) -> admit it into its application's
in-flight bound (503 + Retry-After) -> set its deadline -> run it with the body capped.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.auth import SCOPE_KEY
from app.errors import Forbidden, InvalidParameters, PayloadTooLarge, ProblemError, ServiceUnavailable, Unauthorized
from app.gate import (
    DEADLINE_HEADER,
    Admission,
    KeyRing,
    RoutePolicy,
    RouteTable,
    parse_timeout,
    presented_key,
    retry_after_header,
)
from app.metrics import Metrics
from app.runtime.batcher import request_deadline

log = logging.getLogger(__name__)

# methods reported as themselves in metrics; anything else is "other", so no client can grow the label set
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
UNMATCHED = "unmatched"


class ServiceMiddleware:
    """The gate, the body cap and per-route metrics in one pass over the ASGI messages."""

    def __init__(self, app: ASGIApp, *, metrics: Metrics, max_body_bytes: int, keys: KeyRing,
                 admission: Admission, default_timeout: float | None,
                 policies: dict[tuple[str, str], RoutePolicy]) -> None:
        self.app = app
        self.metrics = metrics
        self.max_body = max_body_bytes
        self.table = RouteTable(policies)
        self.keys = keys
        self.admission = admission
        self.default_timeout = default_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        method = scope.get("method", "")
        method_label = method if method in KNOWN_METHODS else "other"
        path = scope.get("path", "")
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root):]
        template, policy = self.table.match(method, path)
        route_label = template or UNMATCHED
        headers = dict(scope.get("headers") or [])

        def refuse(err: ProblemError) -> Any:
            return _send_problem(send, err, scope)

        # 1. who is calling and may they call this route
        if policy.scope is not None and self.keys.enabled:
            key = presented_key(headers)
            principal = self.keys.principal(key) if key is not None else None
            if principal is None:
                detail = ("an API key is required: send X-API-Key or Authorization: Bearer" if key is None
                          else "invalid API key")
                await refuse(Unauthorized(detail, headers={"WWW-Authenticate": "Bearer"}))
                self._record(route_label, method_label, 401, start)
                return
            if not principal.can(policy.scope):
                await refuse(Forbidden(f"principal {principal.name!r} lacks the {policy.scope!r} scope this "
                                       "route needs", extra={"required_scope": policy.scope}))
                self._record(route_label, method_label, 403, start)
                return
            scope[SCOPE_KEY] = principal

        # 2. the body limit from the declared length, before anything is read
        declared = _content_length(headers)
        if declared is not None and declared > self.max_body:
            limit = self.max_body
            await refuse(PayloadTooLarge(f"request body of {declared} bytes exceeds the limit of {limit} bytes"))
            self._record(route_label, method_label, 413, start)
            return

        # 3. the deadline
        timeout = parse_timeout(headers.get(DEADLINE_HEADER), self.default_timeout)
        if isinstance(timeout, str):
            await refuse(InvalidParameters(timeout, extra={"header": "X-Request-Timeout"}))
            self._record(route_label, method_label, 422, start)
            return

        # 4. room in the application's in-flight bound
        lane = self.admission.lane(policy.application)
        if lane is not None and not lane.try_acquire():
            wait = lane.expected_wait()
            app_name = policy.application
            self.metrics.admission_rejected.labels(app_name).inc()
            err = ServiceUnavailable(
                f"{app_name} is at its bound of {lane.limit} requests in flight; retry after the Retry-After seconds",
                headers={"Retry-After": retry_after_header(wait)},
                extra={"application": app_name, "in_flight": lane.in_flight, "limit": lane.limit,
                       "retry_after_seconds": round(wait, 3)})
            await refuse(err)
            self._record(route_label, method_label, 503, start)
            return

        token = request_deadline.set(None if timeout is None else time.monotonic() + timeout)
        status = 500  # unless the app answers
        try:
            status = await self._run_capped(scope, receive, send)
        finally:
            request_deadline.reset(token)
            if lane is not None:
                lane.release(time.perf_counter() - start)
            self._record(route_label, method_label, status, start)

    async def _run_capped(self, scope: Scope, receive: Receive, send: Send) -> int:
        """Run the app with the body capped at max_body; returns the status sent (500 if none)."""
        limit = self.max_body
        status = 500
        started = False
        received = 0
        overflow = False
        replaced = False

        async def limited_receive() -> Message:
            nonlocal received, overflow
            if overflow:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    # stop feeding the app; whatever it answers is replaced by the 413 below (body parsers
                    # turn exceptions raised here into their own 400, so raising would lose the status)
                    overflow = True
                    return {"type": "http.disconnect"}
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal status, started, replaced
            if overflow:
                if message["type"] == "http.response.start" and not replaced:
                    replaced, started, status = True, True, 413
                    await _send_problem(send, PayloadTooLarge(f"request body exceeds the limit of {limit} bytes"),
                                        scope)
                return  # the app's own answer to the cut-off body is dropped
            if message["type"] == "http.response.start":
                status = int(message["status"])
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except Exception:
            if not overflow or replaced:
                raise
        finally:
            if overflow and not replaced and not started:
                replaced = True
                await _send_problem(send, PayloadTooLarge(f"request body exceeds the limit of {limit} bytes"), scope)
                status, started = 413, True
        return status if started else 500

    def _record(self, route: str, method: str, status: int, start: float) -> None:
        self.metrics.observe_request(route, method, status, time.perf_counter() - start)


def _content_length(headers: dict[bytes, bytes]) -> int | None:
    v = headers.get(b"content-length")
    if v is None:
        return None
    try:
        return int(v)
    except ValueError:
        return None


async def _send_problem(send: Send, err: ProblemError, scope: Scope) -> None:
    body = json.dumps(err.body(scope.get("path"))).encode()
    headers: list[Any] = [(b"content-type", b"application/problem+json"), (b"content-length", str(len(body)).encode()),
                          (b"connection", b"close")]
    headers += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in err.headers.items()]
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
