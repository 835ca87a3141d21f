"""Pure ASGI middleware: request body size limit and per-route metrics."""

from __future__ import annotations

import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import PayloadTooLarge
from app.metrics import Metrics


class ServiceMiddleware:
    """Counts requests per route template and status, times them, and caps the request body."""

    def __init__(self, app: ASGIApp, *, metrics: Metrics, max_body_bytes: int) -> None:
        self.app = app
        self.metrics = metrics
        self.max_body = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500
        started = False
        limit = self.max_body

        declared = _content_length(scope)
        if declared is not None and declared > limit:
            err = PayloadTooLarge(f"request body of {declared} bytes exceeds the limit of {limit} bytes")
            await _send_problem(send, err, scope)
            self._record(scope, 413, start)
            return

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
                    err = PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")
                    await _send_problem(send, err, scope)
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
            self._record(scope, status if started else 500, start)

    def _record(self, scope: Scope, status: int, start: float) -> None:
        route = scope.get("route")
        path = getattr(route, "path", None) or "unmatched"
        self.metrics.observe_request(path, scope.get("method", ""), status, time.perf_counter() - start)


def _content_length(scope: Scope) -> int | None:
    for k, v in scope.get("headers", []):
        if k == b"content-length":
            try:
                return int(v)
            except ValueError:
                return None
    return None


async def _send_problem(send: Send, err: PayloadTooLarge, scope: Scope) -> None:
    import json

    body = json.dumps(err.body(scope.get("path"))).encode()
    headers: list[Any] = [(b"content-type", b"application/problem+json"), (b"content-length", str(len(body)).encode()),
                          (b"connection", b"close")]
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
