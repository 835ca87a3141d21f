"""The service on Ray Serve (app/ray_serve.py), started as an operator starts it: `serve run <config>` on a local
Ray instance, tiny models. The ingress (the same FastAPI app) forwards each application to its own deployment;
answers, problem details, the gate and readiness behave as in the single process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.api.test_faces import pattern
from tests.conftest import ROOT, image_bytes, write_tiny_classifier, write_tiny_face_model, write_tiny_text_model
from tests.server import free_port

pytestmark = pytest.mark.slow

ray = pytest.importorskip("ray", reason="RAY TESTS SKIPPED: ray[serve] is not installed (the 'ray' extra)")


def _config(tmp_path: Path, port: int) -> Path:
    settings = {"weights_dir": str(tmp_path / "weights"), "data_dir": str(tmp_path / "data"),
                "torch_home": str(tmp_path / "torch"), "classifiers": ["tiny-cifar"], "text_models": ["tiny-text"],
                "face_models": ["tiny-face"], "warmup": False, "torch_threads": 1, "device": "cpu",
                "api_keys": ["k-test"], "style_workers": 1}
    deployments = [{"name": n, "num_replicas": 1, "ray_actor_options": {"num_cpus": 0}}
                   for n in ("ingress", "classification", "text", "faces", "style-workers")]
    config = {"proxy_location": "HeadOnly", "http_options": {"host": "127.0.0.1", "port": port},
              "applications": [{"name": "cnn-apps", "route_prefix": "/", "import_path": "app.ray_serve:build",
                                "args": {"settings": settings, "style_workers": True},
                                "deployments": deployments}]}
    path = tmp_path / "serve.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


def test_serve_run_splits_the_applications_into_deployments(tmp_path: Path) -> None:
    weights = tmp_path / "weights"
    write_tiny_classifier(weights)
    write_tiny_text_model(weights)
    write_tiny_face_model(weights)
    port = free_port()
    serve = Path(sys.executable).parent / "serve"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(ROOT)}
    log = open(tmp_path / "serve.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([str(serve), "run", str(_config(tmp_path, port))], cwd=ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    key = {"X-API-Key": "k-test"}
    try:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                if httpx.get(f"{url}/health/ready", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()[-3000:]
            time.sleep(1)
        ready = httpx.get(f"{url}/health/ready", timeout=10).json()
        assert {a: v["status"] for a, v in ready["applications"].items()} == {
            "classification": "ready", "text": "ready", "faces": "ready", "style": "ready"}

        png = image_bytes()
        assert httpx.post(f"{url}/classify", files={"image": ("a.png", png)}, timeout=30).status_code == 401
        r = httpx.post(f"{url}/classify", files={"image": ("a.png", png)}, headers=key, timeout=30)
        assert r.status_code == 200, r.text
        assert r.json()["model"] == "tiny-cifar" and len(r.json()["results"][0]["top_k"]) == 3
        # a problem raised in the classification deployment reaches the client as the same problem details
        r = httpx.post(f"{url}/classify", files={"image": ("a.png", png)}, data={"model": "nope"}, headers=key,
                       timeout=30)
        assert r.status_code == 404 and r.headers["content-type"] == "application/problem+json"
        assert r.json()["available"] == ["tiny-cifar"]
        r = httpx.post(f"{url}/classify", files={"image": ("a.txt", b"not an image")}, headers=key, timeout=30)
        assert r.status_code == 415, r.text
        r = httpx.post(f"{url}/text/classify", json={"texts": ["stocks fell"]}, headers=key, timeout=30)
        assert r.status_code == 200 and r.json()["model"] == "tiny-text"

        r = httpx.post(f"{url}/faces/enroll", data={"subject": "alice", "detector": "none"},
                       files=[("image", ("a.png", pattern(1), "image/png"))], headers=key, timeout=30)
        assert r.status_code == 201, r.text
        r = httpx.post(f"{url}/faces/identify", data={"detector": "none", "threshold": "3.9"},
                       files=[("image", ("a.png", pattern(1), "image/png"))], headers=key, timeout=30)
        assert r.status_code == 200 and r.json()["faces"][0]["subject"] == "alice", r.text
        assert httpx.get(f"{url}/faces/subjects/alice", headers=key, timeout=10).status_code == 200

        # /models lists what the application deployments hold; changing them is a redeployment on Ray
        listing = httpx.get(f"{url}/models", headers=key, timeout=30).json()
        assert {(m["name"], m["status"]) for m in listing["models"]} == {
            ("tiny-cifar", "ready"), ("tiny-text", "ready"), ("tiny-face", "ready")}
        assert listing["defaults"] == {"image-classification": "tiny-cifar", "text-classification": "tiny-text",
                                       "face-embedding": "tiny-face"}
        assert httpx.get(f"{url}/models/tiny-text", headers=key, timeout=30).json()["task"] == "text-classification"
        assert httpx.get(f"{url}/models/nope", headers=key, timeout=30).status_code == 404
        # plain keys have no admin scope: the gate refuses management before it reaches the 503 it would get
        assert httpx.post(f"{url}/models/tiny-cifar/unload", headers=key, timeout=30).status_code == 403

        # a style job submitted at the ingress is run by the style-workers deployment (the offline random VGG-19)
        job = httpx.post(f"{url}/style-transfer", data={"steps": "3", "size": "32"}, headers=key, timeout=30,
                         files=[("content", ("c.png", image_bytes(size=(40, 30)))), ("style", ("s.png", png))])
        assert job.status_code == 202, job.text
        status = ""
        for _ in range(240):
            status = httpx.get(f"{url}{job.headers['location']}", headers=key, timeout=10).json()["status"]
            if status in ("succeeded", "failed"):
                break
            time.sleep(0.5)
        assert status == "succeeded"
        assert httpx.get(f"{url}{job.headers['location']}/result", headers=key, timeout=10).status_code == 200

        metrics = httpx.get(f"{url}/metrics", headers=key, timeout=10).text
        assert 'route="/classify"' in metrics
        # the application replicas' batcher metrics, one `replica` label each, in one valid exposition
        from prometheus_client.parser import text_string_to_metric_families

        families = {f.name: f for f in text_string_to_metric_families(metrics)}
        assert len(families) == len(list(text_string_to_metric_families(metrics)))
        batches = [s for s in families["cnn_batch_size"].samples if s.name == "cnn_batch_size_count"]
        per_model = {(s.labels["application"], s.labels["model"]): s.value for s in batches if s.labels.get("replica")}
        assert per_model[("classification", "tiny-cifar")] >= 1 and per_model[("text", "tiny-text")] >= 1
        assert per_model[("faces", "tiny-face")] >= 2
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        subprocess.run([str(Path(sys.executable).parent / "ray"), "stop", "--force"], capture_output=True,
                       timeout=120, env=env)
        log.close()
