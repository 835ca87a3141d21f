"""The service on Ray Serve: the same FastAPI app as the ingress, each application's service in a deployment of its
own (its replica count, CPU/GPU fractions, autoscaling on ongoing requests), style workers as a deployment too.

    ray start --head                       # on the first host; `ray start --address=HEAD:6379` on the others
    serve run deploy/ray-serve.yaml        # or: python -m app.cli serve-ray --config deploy/ray-serve.yaml

How it fits the single-process design: every application is declared once (app/apps/); here each declaration is
started twice. In its deployment (`ApplicationReplica`) it starts as in `serve` - models, pool, micro-batchers,
service. In the ingress it is replaced by a remote twin: same routers, route policies and name, no models, and a
service that forwards each call to the deployment through a Ray handle (`RemoteService`); a problem raised there
(404, 413, 422, 503 ...) crosses back as the same problem details. The gate (keys, scopes, in-flight bounds,
deadlines), readiness and request metrics run in the ingress; the micro-batcher runs in each application replica,
so batches form per replica, and the ingress's /metrics adds every replica's batcher and model metrics (one
`replica` label each, collected by a broadcast at scrape time). Stores must be shared by every replica: set
CNN_DATABASE_URL (PostgreSQL) for the gallery and the jobs, and give every host the same CNN_DATA_DIR/style-jobs
(style-job files).

Ray is an optional extra (`pip install -e '.[ray]'`); nothing else imports this module.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from app.application import AppContext, Application, Started
from app.apps import BUILTIN
from app.errors import ProblemError
from app.metrics import Metrics
from app.settings import Settings
from app.state import AppState, AppStatus

log = logging.getLogger("app.ray")

SERVE_APP = "cnn-apps"  # the Ray Serve application name
WORKERS = "style-workers"  # the style workers' deployment
REMOTE = ("classification", "text", "faces")  # applications whose service runs in a deployment of its own


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


def _plain_attributes(service: object) -> dict[str, Any]:
    """The service's plain settings (limits a router reads before calling, such as max_image_bytes)."""
    return {k: v for k, v in vars(service).items()
            if not k.startswith("_") and isinstance(v, int | float | str | bool | type(None))}


class RemoteService:
    """Stands in for an application's service in the ingress: plain attributes copied from the deployment, every
    coroutine method forwarded to it; a problem raised there is raised here. While the deployment has no service
    (its start failed), every use is a 503 that says why; `update` takes what the deployment describes later."""

    def __init__(self, application: str, handle: Any, info: Mapping[str, Any]) -> None:
        self._application = application
        self._handle = handle
        self._methods: frozenset[str] = frozenset()
        self._status = AppStatus("loading")
        self.update(info)

    def update(self, info: Mapping[str, Any]) -> AppStatus:
        """Take the deployment's description (status, attributes, methods); returns the status."""
        self.__dict__.update(info["attributes"])
        self._methods = frozenset(info["methods"])
        self._status = AppStatus(**info["status"])
        return self._status

    def __getattr__(self, name: str) -> Callable[..., Awaitable[Any]]:
        if name.startswith("_"):
            raise AttributeError(name)
        if not self._methods:  # the deployment has no service: say why, as the single process does
            st = self._status
            raise ProblemError(f"the {self._application} application is {st.status}: {st.reason}", status=503,
                               title="Service unavailable", slug="service-unavailable",
                               extra={"application": self._application})
        if name not in self._methods:
            raise AttributeError(name)

        async def call(*args: Any, **kwargs: Any) -> Any:
            result = await self._handle.call.remote(name, args, kwargs)
            if isinstance(result, RemoteProblem):
                raise result.error()
            return result

        return call


class ApplicationReplica:
    """One replica of one application: its models, pool, batchers and service, started as `serve` starts them."""

    async def __init__(self, application: str, settings: Mapping[str, Any] | None = None) -> None:  # type: ignore[misc]
        # Ray Serve awaits an async constructor: the replica takes requests once its models are loaded
        from app.main import start_applications

        self.name = application
        self.settings = Settings(**dict(settings or {}))
        app = {a.name: a for a in BUILTIN}[application]
        self.state = AppState(settings=self.settings, metrics=Metrics(), declared=(app,),
                              executor=ThreadPoolExecutor(self.settings.inference_threads, "inference"))
        await start_applications(self.state)

    async def describe(self) -> dict[str, Any]:
        """Status, plain attributes and coroutine methods of the service (what the ingress's twin needs)."""
        service = self.state.services.get(self.name)
        st = self.state.applications[self.name]
        methods = sorted(n for n, f in inspect.getmembers(type(service), inspect.iscoroutinefunction)
                         if not n.startswith("_")) if service is not None else []
        return {"status": dataclasses.asdict(st), "attributes": _plain_attributes(service) if service else {},
                "methods": methods}

    async def call(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Run one service method here; a problem comes back as a RemoteProblem value."""
        service = self.state.services.get(self.name)
        if service is None:
            st = self.state.applications[self.name]
            return RemoteProblem(f"the {self.name} application is {st.status}: {st.reason}", 503,
                                 "Service unavailable", "service-unavailable", {}, {"application": self.name})
        try:
            return await getattr(service, method)(*args, **kwargs)
        except ProblemError as e:
            return RemoteProblem.of(e)

    async def models(self) -> dict[str, Any]:
        """This replica's models as /models shows them (its defaults and run-time changes too)."""
        manager = self.state.models
        return manager.listing() if manager is not None else {"models": [], "defaults": {}, "changes": []}

    async def metrics(self) -> tuple[dict[str, str], str]:
        """This replica's Prometheus exposition (batchers, models) and the labels that tell it apart."""
        from ray import serve

        replica = serve.get_replica_context().replica_id.unique_id
        return {"application": self.name, "replica": replica}, self.state.metrics.render().decode()

    async def check_health(self) -> None:
        """Ray Serve's health check: a replica whose start-up failed is replaced."""
        st = self.state.applications[self.name]
        if st.status == "failed":
            raise RuntimeError(st.reason)


class StyleWorkers:
    """Style-transfer workers as a deployment: each replica runs CNN_STYLE_WORKERS threads on the shared job store."""

    def __init__(self, settings: Mapping[str, Any] | None = None) -> None:
        from app.runtime.device import select_device
        from app.runtime.registry import hub_checkpoint_dir
        from app.services.style import FeatureSource, StyleWorker
        from app.stores.factory import open_job_store

        s = Settings(**dict(settings or {}))
        device = select_device(s.device)
        features = FeatureSource(s.weights_dir, hub_checkpoint_dir(s.torch_home))
        self.worker = StyleWorker(open_job_store(s), features, device, ttl_seconds=s.style_ttl_hours * 3600)
        self.worker.start(max(1, s.style_workers))

    def __del__(self) -> None:
        self.worker.stop()

    async def check_health(self) -> None:
        return None


def remote_twin(app: Application, handle: Any) -> Application:
    """The ingress's version of an application: same name, routers and policies; no models; its service forwards
    to the deployment behind `handle`."""

    async def start(ctx: AppContext) -> Started:
        service = RemoteService(app.name, handle, await handle.describe.remote())
        st = service._status

        async def status() -> AppStatus:
            # how the deployment is now (a replica replaced after a failure, or gone): readiness asks each time
            return service.update(await handle.describe.remote())

        async def metrics() -> list[tuple[dict[str, str], str]]:
            # every live replica's, one `replica` label each (a replica that fails to answer is left out)
            results = await handle.broadcast("metrics").results_async(timeout_s=5, return_exceptions=True)
            return [r for r in results if isinstance(r, tuple)]

        async def models() -> dict[str, Any]:
            listing: dict[str, Any] = await handle.models.remote()
            return listing

        return Started(service, status=st, metrics=metrics, models=models, status_source=status)

    def enabled(settings: Settings) -> bool:
        return app.is_enabled(settings)  # as configured, though the twin itself loads no model

    return dataclasses.replace(app, start=start, task=None, adapter=None, guard=None, enabled=enabled)


class LifespanState:
    """Hands the lifespan's state to every request: Ray Serve runs an ingress app's lifespan but, unlike uvicorn,
    does not copy its state into each request's scope."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.state: MutableMapping[str, Any] | None = None

    async def __call__(self, scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            self.state = scope.setdefault("state", {})
        elif self.state is not None:  # Ray's proxy may send an empty state of its own
            scope["state"] = {**self.state, **(scope.get("state") or {})}
        await self.app(scope, receive, send)


def ingress_app(settings: Mapping[str, Any] | None = None) -> Any:
    """The FastAPI app of the ingress (built in the replica): the shipped applications, those in REMOTE replaced by
    their remote twins; style's API stays here (it only touches the job store), its work runs in StyleWorkers."""
    from ray import serve

    from app.main import create_app

    s = Settings(**{**dict(settings or {}), "style_workers": 0})
    apps = [remote_twin(a, serve.get_deployment_handle(a.name, app_name=SERVE_APP)) if a.name in REMOTE else a
            for a in BUILTIN]
    return LifespanState(create_app(s, applications=apps))


def build(args: Mapping[str, Any]) -> Any:
    """The Ray Serve application (`import_path: app.ray_serve:build`): args["settings"] holds CNN_* values (field
    names) for every replica; deployment options (replicas, resources, autoscaling) come from the config file."""
    from ray import serve

    settings = dict(args.get("settings") or {})
    replica: Any = serve.deployment(name="application")(ApplicationReplica)
    parts = {name: replica.options(name=name).bind(name, settings) for name in REMOTE}
    if args.get("style_workers", True):
        workers: Any = serve.deployment(name=WORKERS)(StyleWorkers)
        parts[WORKERS] = workers.bind(settings)

    def make_app() -> Any:
        return ingress_app(settings)

    class Ingress:
        def __init__(self, **deployments: Any) -> None:
            self.deployments = deployments  # bound here so Serve deploys them with this application

    ingress: Any = serve.deployment(name="ingress")(serve.ingress(make_app)(Ingress))
    return ingress.bind(**parts)
