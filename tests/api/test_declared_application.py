"""An application declared here, outside the core modules (a toy task: scale numbers by a learnt factor), gets
its routes, its gate policy, readiness, metrics, its settings section and run-time model management from its
declaration alone. This is the shape docs/adding-an-application.md describes."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import pytest
import torch
from fastapi import APIRouter, Depends, Request
from fastapi.testclient import TestClient
from pydantic import BaseModel, Field
from pydantic_settings import BaseSettings, SettingsConfigDict
from torch import nn

from app.application import AppContext, Application, Started
from app.apps import BUILTIN
from app.deps import get_state, service_of
from app.gate import RoutePolicy
from app.main import create_app
from app.runtime.registry import LoadedModel
from app.services.pool import ModelPool
from app.settings import Settings
from models.families import register_family
from models.train.common import sha256_file
from tests.api.test_classify import assert_problem
from tests.conftest import wait_ready

# -- the model: a family of the toy task -----------------------------------------------------------------------


class Scale(nn.Module):
    def __init__(self, init: float) -> None:
        super().__init__()
        self.factor = nn.Parameter(torch.tensor(float(init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor


@register_family("toy-scale", task="toy-scaling")
def build_scale(arch: dict[str, Any], num_classes: int, **_: Any) -> nn.Module:
    """A one-parameter model: y = factor * x."""
    return Scale(float(arch.get("init", 1.0)))


class LoadedScaler(LoadedModel):
    """The adapter: a batch of numbers in, one number out per input."""

    task = "toy-scaling"

    def forward(self, batch: list[float]) -> list[float]:
        with torch.inference_mode():
            return [float(v) for v in self.model(torch.tensor(batch))]

    def warmup(self) -> None:
        self.forward([0.0])


# -- the service, its settings section, its router -------------------------------------------------------------


class ToySettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CNN_TOY_")
    offset: float = 0.0


class ScaleService:
    def __init__(self, pool: ModelPool[LoadedScaler], offset: float) -> None:
        self.pool = pool
        self.offset = offset

    async def scale(self, values: list[float], model: str | None) -> dict[str, Any]:
        name, loaded = self.pool.resolve(model)
        out = await self.pool.run(name, values, loaded)
        return {"model": name, "outputs": [v + self.offset for v in out]}


class ScaleIn(BaseModel):
    values: list[float] = Field(min_length=1, max_length=16)
    model: str | None = None


class ScaleOut(BaseModel):
    model: str
    outputs: list[float]


def get_toy(request: Request) -> ScaleService:
    svc = service_of(get_state(request), "toy")
    assert isinstance(svc, ScaleService)
    return svc


router = APIRouter(tags=["toy"])


@router.post("/toy/scale", response_model=ScaleOut)
async def scale(body: ScaleIn, service: Annotated[ScaleService, Depends(get_toy)]) -> ScaleOut:
    """Scale numbers with the chosen model."""
    return ScaleOut.model_validate(await service.scale(body.values, body.model))


async def start(ctx: AppContext) -> Started:
    assert ctx.pool is not None and isinstance(ctx.section, ToySettings)
    return Started(ScaleService(ctx.pool, ctx.section.offset))


TOY = Application(name="toy", start=start, routers=(router,), task="toy-scaling", adapter=LoadedScaler,
                  models=lambda s: ["toy-doubler"], section=ToySettings,
                  policies={("POST", "/toy/scale"): RoutePolicy("read", "toy")})


# -- the tests -------------------------------------------------------------------------------------------------


def _toy_model(weights_dir: Path, name: str, factor: float) -> None:
    path = weights_dir / f"{name}.pt"
    torch.save(Scale(factor).state_dict(), path)
    manifest = weights_dir / "manifest.json"
    models = json.loads(manifest.read_text())["models"] if manifest.exists() else []
    models.append({"name": name, "task": "toy-scaling", "family": "toy-scale", "arch": {"init": 1.0},
                   "file": path.name, "sha256": sha256_file(path), "source": "project"})
    manifest.write_text(json.dumps({"models": models}))


@pytest.fixture
def toy_client(base_settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    _toy_model(base_settings.weights_dir, "toy-doubler", 2.0)
    _toy_model(base_settings.weights_dir, "toy-tripler", 3.0)
    monkeypatch.setenv("CNN_TOY_OFFSET", "0.5")
    with TestClient(create_app(base_settings, applications=(*BUILTIN, TOY))) as c:
        wait_ready(c)
        yield c


def test_declared_application_serves_with_readiness_metrics_and_policy(toy_client: TestClient) -> None:
    c = toy_client
    r = c.post("/toy/scale", json={"values": [1, 2.5]})
    assert r.status_code == 200, r.text
    assert r.json() == {"model": "toy-doubler", "outputs": [2.5, 5.5]}  # factor 2 from the weights, offset 0.5
    assert_problem(c.post("/toy/scale", json={"values": [1], "model": "nope"}), 404)
    ready = c.get("/health/ready", params={"require": "toy"})
    assert ready.status_code == 200 and ready.json()["applications"]["toy"]["status"] == "ready"
    listing = c.get("/models").json()
    assert listing["defaults"]["toy-scaling"] == "toy-doubler"
    assert any(m["name"] == "toy-doubler" and m["task"] == "toy-scaling" for m in listing["models"])
    assert c.post("/classify").status_code == 422  # the shipped applications still serve beside it
    metrics = c.get("/metrics").text
    assert 'route="/toy/scale"' in metrics
    assert 'model="toy-doubler"' in metrics  # its batcher reports like every other
    op = c.get("/openapi.json").json()["paths"]["/toy/scale"]["post"]
    assert op["x-required-scope"] == "read" and "503" in op["responses"]


def test_declared_application_gets_run_time_model_management(toy_client: TestClient) -> None:
    c = toy_client
    assert c.post("/models/toy-tripler/load").status_code == 202
    for _ in range(500):
        if c.get("/models/toy-tripler").json()["status"] != "loading":
            break
    assert c.put("/models/defaults", json={"toy-scaling": "toy-tripler"}).status_code == 200
    assert c.post("/toy/scale", json={"values": [1]}).json() == {"model": "toy-tripler", "outputs": [3.5]}
    assert c.post("/models/toy-doubler/unload").status_code == 200
    assert_problem(c.post("/toy/scale", json={"values": [1], "model": "toy-doubler"}), 404)


def test_an_application_cannot_take_a_route_another_declares() -> None:
    clash = Application(name="clash", start=start, policies={("POST", "/classify"): RoutePolicy("read")})
    with pytest.raises(ValueError, match="already declared"):
        create_app(Settings(), applications=(*BUILTIN, clash))
