"""The deployment files agree with the code: the compose file's scale profile, its nginx config and the Ray Serve
config name services, deployments and settings that exist."""

from __future__ import annotations

import importlib
import re

import yaml

from app.ray_serve import REMOTE, WORKERS
from app.settings import Settings
from tests.conftest import ROOT


def test_compose_scale_profile_runs_replicas_on_postgres_behind_nginx() -> None:
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    scale = {n for n, s in services.items() if "scale" in s.get("profiles", [])}
    assert scale == {"postgres", "api-a", "api-b", "worker-pg", "lb"}
    for name in ("api-a", "api-b", "worker-pg"):
        env = services[name]["environment"]
        assert re.match(r"postgresql://cnn:.*@postgres:5432/cnn$", env["CNN_DATABASE_URL"]), name
        assert env["CNN_DATA_DIR"] == "/data/stores" and "cnn-data:/data" in services[name]["volumes"]
        assert services[name]["depends_on"]["postgres"]["condition"] == "service_healthy"
        assert all(k.startswith(("CNN_", "TORCH_")) for k in env)
        known = {f"CNN_{f.upper()}" for f in Settings.model_fields}
        assert {k for k in env if k.startswith("CNN_") and k != "CNN_PG_PASSWORD"} <= known, name
    conf = (ROOT / "deploy" / "nginx-scale.conf").read_text()
    upstreams = set(re.findall(r"server (\S+):(\d+)", conf))
    assert upstreams == {("api-a", "8000"), ("api-b", "8000")}
    assert "./deploy/nginx-scale.conf:/etc/nginx/conf.d/default.conf:ro" in services["lb"]["volumes"]


def test_ray_serve_config_names_the_deployments_the_code_builds() -> None:
    config = yaml.safe_load((ROOT / "deploy" / "ray-serve.yaml").read_text())
    (app,) = config["applications"]
    module, attr = app["import_path"].split(":")
    assert callable(getattr(importlib.import_module(module), attr))
    assert {d["name"] for d in app["deployments"]} == {"ingress", *REMOTE, WORKERS}
    assert set(app["args"]["settings"]) <= set(Settings.model_fields)
