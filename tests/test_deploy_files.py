"""The deployment files agree with the code: the compose file's scale profile, its nginx config and the Ray Serve
config name services, deployments and settings that exist."""

from __future__ import annotations

import importlib
import os
import re
import shutil
import subprocess

import pytest
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


def _host_ports(service: dict[str, object]) -> set[str]:
    ports = service.get("ports", [])
    assert isinstance(ports, list)
    return {str(p).rsplit(":", 1)[0] for p in ports}


def test_compose_profiles_publish_each_host_port_once() -> None:
    """`docker compose up` and `docker compose --profile scale up` start the services without a profile plus the
    profile's: no two of them may publish the same host port (the second would fail to start)."""
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    for profile in (None, "scale"):
        active = [s for s in services.values() if not s.get("profiles") or profile in s["profiles"]]
        published = [p for s in active for p in _host_ports(s)]
        assert len(published) == len(set(published)), (profile, published)


@pytest.mark.skipif(shutil.which("docker-compose") is None,
                    reason="docker-compose is not installed (Debian: apt-get install docker-compose; .ci/run does)")
def test_compose_file_is_valid_for_docker_compose_with_and_without_the_scale_profile() -> None:
    """A real compose implementation reads the file (interpolation, anchors, profiles, depends_on conditions)."""
    for extra in ([], ["--profile", "scale"]):
        r = subprocess.run(["docker-compose", *extra, "config", "-q"], cwd=ROOT, capture_output=True, text=True,
                           timeout=60, env={**os.environ, "CNN_PG_PASSWORD": "x"})
        assert r.returncode == 0, (extra, r.stderr)
    r = subprocess.run(["docker-compose", "--profile", "scale", "config"], cwd=ROOT, capture_output=True, text=True,
                       timeout=60, env={k: v for k, v in os.environ.items() if k != "CNN_PG_PASSWORD"})
    resolved = yaml.safe_load(r.stdout)["services"]
    assert resolved["api-b"]["environment"]["CNN_DATABASE_URL"] == "postgresql://cnn:cnn@postgres:5432/cnn"
    assert resolved["lb"]["depends_on"] and set(resolved["lb"]["depends_on"]) == {"api-a", "api-b"}
