"""The Ray Serve split without Ray: the ingress app built from remote twins whose handle calls an in-process
ApplicationReplica. Fast checks of the forwarding: answers, problem details crossing back, readiness, the /models
listing gathered from the replicas, and management refused at the ingress. tests/test_ray_serve.py runs the real
thing under `serve run`."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.apps import BUILTIN
from app.main import create_app
from app.ray_serve import REMOTE, ApplicationReplica, LifespanState, RayHandle, RemoteProblem, remote_twin
from app.settings import Settings
from tests.api.test_classify import assert_problem
from tests.conftest import image_bytes, wait_ready, write_tiny_classifier, write_tiny_text_model


class LocalHandle:
    """Stands in for a Ray deployment handle: `handle.method.remote(...)` awaits the replica's method in this loop
    (the replica is made on first use, in the app's own event loop, as a Serve replica would be)."""

    def __init__(self, application: str, settings: dict[str, Any]) -> None:
        self.application = application
        self.settings = settings
        self.replica: ApplicationReplica | None = None
        self.lock: asyncio.Lock | None = None

    async def _target(self) -> ApplicationReplica:
        self.lock = self.lock or asyncio.Lock()
        async with self.lock:
            if self.replica is None:
                replica = ApplicationReplica.__new__(ApplicationReplica)
                await replica.__init__(self.application, self.settings)  # type: ignore[misc]
                self.replica = replica
        return self.replica

    def __getattr__(self, name: str) -> Any:
        handle = self

        class Method:
            async def remote(self, *args: Any, **kwargs: Any) -> Any:
                return await getattr(await handle._target(), name)(*args, **kwargs)

        return Method()


@pytest.fixture
def ingress(base_settings: Settings) -> Iterator[TestClient]:
    write_tiny_text_model(base_settings.weights_dir)
    write_tiny_classifier(base_settings.weights_dir, "tiny-b")
    fields = {"weights_dir": str(base_settings.weights_dir), "torch_home": str(base_settings.torch_home),
              "data_dir": str(base_settings.data_dir), "classifiers": ["tiny-cifar", "tiny-b"],
              "text_models": ["tiny-text"], "face_models": [], "warmup": False, "device": "cpu",
              "style_workers": 0}
    settings = Settings(**fields)  # type: ignore[arg-type]
    handles = {a.name: LocalHandle(a.name, fields) for a in BUILTIN if a.name in REMOTE}
    apps = [remote_twin(a, RayHandle(handles[a.name])) if a.name in REMOTE else a for a in BUILTIN]
    with TestClient(LifespanState(create_app(settings, applications=apps))) as c:
        wait_ready(c)
        c.handles = handles  # type: ignore[attr-defined]
        yield c


def test_twins_forward_calls_and_problems(ingress: TestClient) -> None:
    r = ingress.post("/classify", files={"image": ("a.png", image_bytes())}, data={"model": "tiny-b"})
    assert r.status_code == 200 and r.json()["model"] == "tiny-b"
    body = assert_problem(ingress.post("/classify", files={"image": ("a.png", image_bytes())},
                                       data={"model": "nope"}), 404)
    assert body["available"] == ["tiny-cifar", "tiny-b"]  # the extra fields of the problem crossed back too
    assert_problem(ingress.post("/classify", files={"image": ("a.txt", b"not an image")}), 415)
    assert ingress.post("/text/classify", json={"texts": ["markets"]}).json()["model"] == "tiny-text"
    ready = ingress.get("/health/ready").json()["applications"]
    assert ready["classification"]["status"] == "ready" and ready["faces"]["status"] == "disabled"


def test_models_are_listed_from_the_replicas_and_changed_only_by_redeploying(ingress: TestClient) -> None:
    listing = ingress.get("/models").json()
    assert {m["name"] for m in listing["models"]} == {"tiny-cifar", "tiny-b", "tiny-text"}
    assert listing["defaults"]["image-classification"] == "tiny-cifar"
    assert ingress.get("/models/tiny-b").json()["status"] == "ready"
    assert_problem(ingress.get("/models/nope"), 404)
    assert ingress.get("/models/defaults").json()["defaults"]["text-classification"] == "tiny-text"
    detail = assert_problem(ingress.put("/models/defaults", json={"image-classification": "tiny-b"}), 503)["detail"]
    assert "Ray Serve" in detail
    assert_problem(ingress.post("/models/tiny-b/unload"), 503)
    assert ingress.get("/metrics").status_code == 200  # a replica outside Ray has no metrics to give: left out


def test_remote_problem_round_trip() -> None:
    from app.errors import NotFound

    e = RemoteProblem.of(NotFound("gone", extra={"k": 1})).error()
    assert (e.status, e.detail, e.extra, e.slug) == (404, "gone", {"k": 1}, NotFound.slug)



def test_readiness_follows_the_deployments_after_start(ingress: TestClient) -> None:
    """The ingress asks the deployments again at each readiness check: a deployment whose replica lost its service
    (as after a failed restart) makes the ingress not ready and its requests 503 with the reason, never a 500; one
    that does not answer is unavailable; once it serves again, so does the ingress."""
    from app.state import AppStatus

    handle = ingress.handles["classification"]  # type: ignore[attr-defined]
    replica = handle.replica
    assert replica is not None and ingress.get("/health/ready").status_code == 200
    service, healthy = replica.state.services["classification"], replica.state.applications["classification"]

    replica.state.services["classification"] = None
    replica.state.applications["classification"] = AppStatus("failed", "CUDA error: device lost")
    r = ingress.get("/health/ready")
    assert r.status_code == 503
    app_status = r.json()["applications"]["classification"]
    assert app_status["status"] == "failed" and "device lost" in app_status["reason"]
    detail = assert_problem(ingress.post("/classify", files={"image": ("a.png", image_bytes())}), 503)["detail"]
    assert "device lost" in detail
    assert ingress.post("/text/classify", json={"texts": ["markets"]}).status_code == 200  # the others serve

    class Broken:
        async def remote(self, *args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("actor died")

    handle.describe = Broken()  # the deployment no longer answers
    app_status = ingress.get("/health/ready").json()["applications"]["classification"]
    assert app_status["status"] == "unavailable" and "actor died" in app_status["reason"]

    del handle.describe
    replica.state.services["classification"] = service
    replica.state.applications["classification"] = healthy
    assert ingress.get("/health/ready").status_code == 200
    r = ingress.post("/classify", files={"image": ("a.png", image_bytes())})
    assert r.status_code == 200, r.text
