"""Applications whose service runs in another process, whatever carries the calls there.

Two deployments split the service this way: Ray Serve (app/ray_serve.py: an ingress replica forwards to one
deployment per application) and `serve --front-workers N` (app/model_host.py: N HTTP processes forward over a
local socket to one model process per machine). Both use the same two halves from here:

- where the models are, a `ServiceHost` starts applications exactly as `serve` starts them (models, pool,
  micro-batchers, service) and answers `describe`, `call`, `models` and `metrics` for them;
- where HTTP is parsed, each such application is replaced by its `remote_twin`: same name, routers and route
  policies, no models, and a `RemoteService` that forwards every coroutine method through a `ServiceHandle`.
  A problem raised there (404, 413, 422, 503 ...) crosses back as the same problem details; the request's
  deadline (X-Request-Timeout) crosses as the seconds left, so the far batcher drops work nobody waits for.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

from app.application import AppContext, Application, Started
from app.errors import ProblemError
from app.metrics import Metrics
from app.runtime.batcher import request_deadline
from app.settings import Settings
from app.state import AppState, AppStatus

log = logging.getLogger("app.remote")

REMOTE = ("classification", "text", "faces")  # the applications whose service can run in another process


@dataclasses.dataclass(frozen=True)
class RemoteProblem:
    """A ProblemError as it crosses a process boundary (exceptions with keyword-only arguments do not pickle)."""

    detail: str
    status: int
    title: str
    slug: str
    headers: dict[str, str]
    extra: dict[str, Any]

    @classmethod
    def of(cls, e: ProblemError) -> RemoteProblem:
        return cls(e.detail, e.status, e.title, e.slug, dict(e.headers), dict(e.extra))

    def error(self) -> ProblemError:
        return ProblemError(self.detail, status=self.status, title=self.title, slug=self.slug,
                            headers=self.headers, extra=self.extra)


class ServiceHandle(Protocol):
    """How a twin reaches the process that holds its application (a Ray deployment handle, the model host's
    socket). `reports`: whether this handle also brings that process's metrics and model listing; False where
    several twins share one process, so that only one of them reports it."""

    reports: bool

    async def describe(self) -> dict[str, Any]:
        """The application's status, its service's plain attributes and coroutine methods."""

    async def call(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any], timeout: float | None) -> Any:
        """Run one service method there (`timeout`: seconds left of the request's deadline); a RemoteProblem
        value stands for a problem raised there."""

    async def models(self) -> dict[str, Any]:
        """The model listing of the process(es) behind the handle, as /models shows it."""

    async def metrics(self) -> list[tuple[dict[str, str], str]]:
        """(labels, Prometheus exposition) of each process behind the handle."""

    async def attach(self, metrics: Metrics) -> Callable[[], Awaitable[None]] | None:
        """Called once the twin starts, with this process's metrics (the model host's handle shares them with the
        other front workers); returns what to run at shutdown, or None."""


def _plain_attributes(service: object) -> dict[str, Any]:
    """The service's plain settings (limits a router reads before calling, such as max_image_bytes)."""
    return {k: v for k, v in vars(service).items()
            if not k.startswith("_") and isinstance(v, int | float | str | bool | type(None))}


def _unavailable(application: str, st: AppStatus) -> ProblemError:
    return ProblemError(f"the {application} application is {st.status}: {st.reason}", status=503,
                        title="Service unavailable", slug="service-unavailable", extra={"application": application},
                        headers={"Retry-After": "5"} if st.status == "loading" else None)


class RemoteService:
    """Stands in for an application's service where HTTP is parsed: plain attributes copied from the far side,
    every coroutine method forwarded to it; a problem raised there is raised here. While the far side has no
    service (still loading, or its start failed), every use is a 503 that says why; `update` takes what the far
    side describes later."""

    def __init__(self, application: str, handle: ServiceHandle, info: Mapping[str, Any]) -> None:
        self._application = application
        self._handle = handle
        self._methods: frozenset[str] = frozenset()
        self._status = AppStatus("loading")
        self.update(info)

    def update(self, info: Mapping[str, Any]) -> AppStatus:
        """Take the far side's description (status, attributes, methods); returns the status."""
        self.__dict__.update(info["attributes"])
        self._methods = frozenset(info["methods"])
        self._status = AppStatus(**info["status"])
        return self._status

    def __getattr__(self, name: str) -> Callable[..., Awaitable[Any]]:
        if name.startswith("_"):
            raise AttributeError(name)
        if not self._methods:  # no service there: say why, as the single process does
            raise _unavailable(self._application, self._status)
        if name not in self._methods:
            raise AttributeError(name)

        async def call(*args: Any, **kwargs: Any) -> Any:
            deadline = request_deadline.get()
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            result = await self._handle.call(name, args, kwargs, left)
            if isinstance(result, RemoteProblem):
                raise result.error()
            return result

        return call


def remote_twin(app: Application, handle: ServiceHandle) -> Application:
    """The HTTP side's version of an application: same name, routers and policies; no models; its service forwards
    to the process behind `handle`. Its start waits until that process has finished starting the application."""

    async def start(ctx: AppContext) -> Started:
        info = await handle.describe()
        while info["status"]["status"] == "loading":  # its models are still loading there
            await asyncio.sleep(0.2)
            info = await handle.describe()
        service = RemoteService(app.name, handle, info)

        async def status() -> AppStatus:
            # how the far side is now (a replica replaced after a failure, or gone): readiness asks each time
            return service.update(await handle.describe())

        return Started(service, status=service._status, status_source=status,
                       metrics=handle.metrics if handle.reports else None,
                       models=handle.models if handle.reports else None, stop=await handle.attach(ctx.metrics))

    def enabled(settings: Settings) -> bool:
        return app.is_enabled(settings)  # as configured, though the twin itself loads no model

    return dataclasses.replace(app, start=start, task=None, adapter=None, guard=None, enabled=enabled)


class ServiceHost:
    """Applications started as `serve` starts them (models, pools, micro-batchers, services), answering for their
    services to another process: a Ray Serve replica of one application, or the model host of every application."""

    def __init__(self, settings: Settings, applications: Sequence[Application]) -> None:
        self.settings = settings
        self.state = AppState(settings=settings, metrics=Metrics(), declared=tuple(applications),
                              executor=ThreadPoolExecutor(settings.inference_threads, "inference"))

    async def start(self) -> None:
        """Load the models and start every application (a failure is recorded in its status, never raised)."""
        from app.main import start_applications

        await start_applications(self.state)

    def status(self, application: str) -> AppStatus:
        return self.state.applications.get(application) or AppStatus("loading")

    def describe(self, application: str) -> dict[str, Any]:
        """Status, plain attributes and coroutine methods of the application's service (what a twin needs)."""
        service = self.state.services.get(application)
        methods = sorted(n for n, f in inspect.getmembers(type(service), inspect.iscoroutinefunction)
                         if not n.startswith("_")) if service is not None else []
        return {"status": dataclasses.asdict(self.status(application)),
                "attributes": _plain_attributes(service) if service is not None else {}, "methods": methods}

    async def call(self, application: str, method: str, args: tuple[Any, ...], kwargs: dict[str, Any],
                   timeout: float | None = None) -> Any:
        """Run one service method here, under the caller's deadline; a problem comes back as a RemoteProblem."""
        service = self.state.services.get(application)
        if service is None:
            return RemoteProblem.of(_unavailable(application, self.status(application)))
        token = request_deadline.set(None if timeout is None else time.monotonic() + timeout)
        try:
            return await getattr(service, method)(*args, **kwargs)
        except ProblemError as e:
            return RemoteProblem.of(e)
        finally:
            request_deadline.reset(token)

    def models(self) -> dict[str, Any]:
        """The models held here as /models shows them (defaults and run-time changes too)."""
        manager = self.state.models
        return manager.listing() if manager is not None else {"models": [], "defaults": {}, "changes": []}

    def metrics(self) -> str:
        """This process's Prometheus exposition (batchers, models)."""
        return self.state.metrics.render().decode()

    async def close(self) -> None:
        """Stop the applications and free their models, as the lifespan does at shutdown."""
        from app.main import stop_applications

        await stop_applications(self.state)
