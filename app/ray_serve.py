"""The service on Ray Serve: the same FastAPI app as the ingress, each application's service in a deployment of its
own (its replica count, CPU/GPU fractions, autoscaling on ongoing requests), style workers as a deployment too.

    ray start --head                       # on the first host; `ray start --address=HEAD:6379` on the others
    serve run deploy/ray-serve.yaml        # or: python -m app.cli serve-ray --config deploy/ray-serve.yaml

How it fits the single-process design: every application is declared once (app/apps/); here each declaration is
started twice. In its deployment (`ApplicationReplica`) it starts as in `serve` - models, pool, micro-batchers,
service (app/remote.py's `ServiceHost`). In the ingress it is replaced by its remote twin (app/remote.py): same
routers, route policies and name, no models, and a service that forwards each call to the deployment through a Ray
handle (`RayHandle`); a problem raised there (404, 413, 422, 503 ...) crosses back as the same problem details.
The gate (keys, scopes, in-flight bounds, deadlines), readiness and request metrics run in the ingress; the
micro-batcher runs in each application replica, so batches form per replica, and the ingress's /metrics adds every
replica's batcher and model metrics (one `replica` label each, collected by a broadcast at scrape time). Stores
must be shared by every replica: set CNN_DATABASE_URL (PostgreSQL) for the gallery and the jobs, and give every
host the same CNN_DATA_DIR/style-jobs (style-job files).

Ray is an optional extra (`pip install -e '.[ray]'`); nothing else imports this module.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, MutableMapping
from typing import Any

from app.apps import BUILTIN
from app.metrics import Metrics
from app.remote import REMOTE, RemoteProblem, RemoteService, ServiceHost, remote_twin

__all__ = ["REMOTE", "ApplicationReplica", "LifespanState", "RayHandle", "RemoteProblem", "RemoteService",
           "StyleWorkers", "build", "ingress_app", "remote_twin"]
from app.settings import Settings

log = logging.getLogger("app.ray")

SERVE_APP = "cnn-apps"  # the Ray Serve application name
WORKERS = "style-workers"  # the style workers' deployment


class RayHandle:
    """A Ray Serve deployment handle as a twin's ServiceHandle (each deployment reports its own replicas)."""

    reports = True

    def __init__(self, handle: Any) -> None:
        self.handle = handle

    async def describe(self) -> dict[str, Any]:
        info: dict[str, Any] = await self.handle.describe.remote()
        return info

    async def call(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any], timeout: float | None) -> Any:
        return await self.handle.call.remote(method, args, kwargs, timeout)

    async def models(self) -> dict[str, Any]:
        listing: dict[str, Any] = await self.handle.models.remote()
        return listing

    async def metrics(self) -> list[tuple[dict[str, str], str]]:
        # every live replica's, one `replica` label each (a replica that fails to answer is left out)
        results = await self.handle.broadcast("metrics").results_async(timeout_s=5, return_exceptions=True)
        return [r for r in results if isinstance(r, tuple)]

    async def attach(self, metrics: Metrics) -> None:
        return None  # the ingress replicas' own metrics stay their own (Ray's proxy picks one per scrape)


class ApplicationReplica:
    """One replica of one application: its models, pool, batchers and service, started as `serve` starts them."""

    async def __init__(self, application: str, settings: Mapping[str, Any] | None = None) -> None:  # type: ignore[misc]
        # Ray Serve awaits an async constructor: the replica takes requests once its models are loaded
        self.name = application
        self.settings = Settings(**dict(settings or {}))
        self.host = ServiceHost(self.settings, [a for a in BUILTIN if a.name == application])
        self.state = self.host.state
        await self.host.start()

    async def describe(self) -> dict[str, Any]:
        """Status, plain attributes and coroutine methods of the service (what the ingress's twin needs)."""
        return self.host.describe(self.name)

    async def call(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any],
                   timeout: float | None = None) -> Any:
        """Run one service method here; a problem comes back as a RemoteProblem value."""
        return await self.host.call(self.name, method, args, kwargs, timeout)

    async def models(self) -> dict[str, Any]:
        """This replica's models as /models shows them (its defaults and run-time changes too)."""
        return self.host.models()

    async def metrics(self) -> tuple[dict[str, str], str]:
        """This replica's Prometheus exposition (batchers, models) and the labels that tell it apart."""
        from ray import serve

        replica = serve.get_replica_context().replica_id.unique_id
        return {"application": self.name, "replica": replica}, self.host.metrics()

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
    handle = serve.get_deployment_handle
    apps = [remote_twin(a, RayHandle(handle(a.name, app_name=SERVE_APP))) if a.name in REMOTE else a for a in BUILTIN]
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
