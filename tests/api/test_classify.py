"""API tests through the lifespan: health, models, /classify and its error paths, keys, metrics, batching."""

from __future__ import annotations

import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.settings import Settings
from tests.conftest import TINY_LABELS, image_bytes

PROBLEM = "application/problem+json"


def assert_problem(r, status: int) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith(PROBLEM)
    body = r.json()
    assert body["status"] == status and body["title"] and body["detail"] and body["type"]
    assert "Traceback" not in r.text
    return body


def test_live_and_ready(client: TestClient) -> None:
    assert client.get("/health/live").json() == {"status": "ok"}
    r = client.get("/health/ready")
    assert r.status_code == 200
    assert r.json()["status"] == "ready"
    assert r.json()["models"][0]["name"] == "tiny-cifar"


def test_models_lists_status_source_and_metrics(client: TestClient) -> None:
    body = client.get("/models").json()
    assert body["default_classifier"] == "tiny-cifar"
    (m,) = body["models"]
    assert m["status"] == "ready" and m["weights"] == "trained" and m["weights_source"] == "weights_dir"
    assert m["metrics"] == {"val_accuracy": 0.5}
    assert client.get("/models/tiny-cifar").json()["name"] == "tiny-cifar"
    assert_problem(client.get("/models/nope"), 404)


def test_classify_one_image(client: TestClient, weights_dir: Path) -> None:
    r = client.post("/classify", files={"image": ("red.png", image_bytes(), "image/png")}, data={"top_k": "2"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "tiny-cifar" and body["weights"] == "trained"
    (res,) = body["results"]
    assert res["filename"] == "red.png"
    assert len(res["top_k"]) == 2
    # the same answer computed here without the service: the checkpoint in a fresh ResNet-8 on the solid colour
    # (200, 30, 30), which any resize and crop leave as it is, normalised with the manifest's mean 0.5 and std 0.25
    import torch

    from models.cifar_resnet import cifar_resnet

    net = cifar_resnet(8, len(TINY_LABELS))
    net.load_state_dict(torch.load(weights_dir / "tiny-cifar.pt", weights_only=True))
    x = ((torch.tensor([200.0, 30.0, 30.0]) / 255 - 0.5) / 0.25).view(1, 3, 1, 1).expand(1, 3, 32, 32)
    with torch.no_grad():
        expected = torch.softmax(net.eval()(x), dim=1)[0].topk(2)
    assert [p["index"] for p in res["top_k"]] == expected.indices.tolist()
    assert [p["probability"] for p in res["top_k"]] == pytest.approx(expected.values.tolist(), abs=1e-5)
    assert all(TINY_LABELS[p["index"]] == p["label"] for p in res["top_k"])


def test_classify_several_images_and_top_k_capped(client: TestClient) -> None:
    files = [("image", (f"{i}.png", image_bytes((i * 40, 10, 10)), "image/png")) for i in range(3)]
    r = client.post("/classify", files=files, data={"top_k": "100"})
    assert r.status_code == 200
    results = r.json()["results"]
    assert [x["filename"] for x in results] == ["0.png", "1.png", "2.png"]
    assert all(len(x["top_k"]) == 3 for x in results)  # only 3 classes exist
    assert all(abs(sum(p["probability"] for p in x["top_k"]) - 1.0) < 1e-4 for x in results)


@pytest.mark.parametrize("top_k", ["0", "101", "abc"])
def test_bad_top_k_is_422(client: TestClient, top_k: str) -> None:
    r = client.post("/classify", files={"image": ("a.png", image_bytes(), "image/png")}, data={"top_k": top_k})
    assert_problem(r, 422)


def test_missing_image_is_422(client: TestClient) -> None:
    assert_problem(client.post("/classify", data={"top_k": "3"}), 422)


def test_not_an_image_is_415(client: TestClient) -> None:
    r = client.post("/classify", files={"image": ("notes.txt", b"hello, this is text", "text/plain")})
    body = assert_problem(r, 415)
    assert "notes.txt" in body["detail"]


def test_truncated_image_is_400(client: TestClient) -> None:
    data = image_bytes(size=(64, 64), fmt="JPEG")
    assert_problem(client.post("/classify", files={"image": ("cut.jpg", data[: len(data) // 2], "image/jpeg")}), 400)


def test_unknown_model_is_404(client: TestClient) -> None:
    r = client.post("/classify", files={"image": ("a.png", image_bytes(), "image/png")}, data={"model": "nope"})
    assert "tiny-cifar" in assert_problem(r, 404)["detail"]


def test_too_many_images_is_422(base_settings: Settings, client_factory) -> None:
    with client_factory(base_settings.model_copy(update={"max_images_per_request": 2})) as c:
        files = [("image", (f"{i}.png", image_bytes(), "image/png")) for i in range(3)]
        assert_problem(c.post("/classify", files=files), 422)


def test_image_and_body_size_limits_are_413(base_settings: Settings, client_factory) -> None:
    big = image_bytes(size=(300, 300), fmt="BMP")  # about 270 kB
    with client_factory(base_settings.model_copy(update={"max_image_bytes": 100_000})) as c:
        body = assert_problem(c.post("/classify", files={"image": ("big.bmp", big, "image/bmp")}), 413)
        assert "big.bmp" in body["detail"]
    with client_factory(base_settings.model_copy(update={"max_body_bytes": 50_000})) as c:
        assert_problem(c.post("/classify", files={"image": ("big.bmp", big, "image/bmp")}), 413)


def test_missing_weights_answer_503_naming_the_file(base_settings: Settings, client_factory) -> None:
    s = base_settings.model_copy(update={"classifiers": ["tiny-cifar", "resnet18"]})
    with client_factory(s) as c:
        m = c.get("/models/resnet18").json()
        assert m["status"] == "unavailable" and "resnet18-f37072fd.pth" in m["reason"]
        r = c.post("/classify", files={"image": ("a.png", image_bytes(), "image/png")}, data={"model": "resnet18"})
        assert "resnet18-f37072fd.pth" in assert_problem(r, 503)["detail"]
        assert c.get("/health/ready").status_code == 200  # the default model still serves


def test_untrained_models_are_labelled(base_settings: Settings, client_factory) -> None:
    s = base_settings.model_copy(update={"classifiers": ["resnet18"], "allow_untrained": True})
    with client_factory(s) as c:
        r = c.post("/classify", files={"image": ("a.png", image_bytes(), "image/png")})
        assert r.status_code == 200
        body = r.json()
        assert body["model"] == "resnet18" and body["weights"] == "untrained" and body["weights_source"] == "untrained"
        assert len(body["results"][0]["top_k"]) == 5
        assert c.get("/models").json()["models"][0]["weights"] == "untrained"


def test_ready_is_503_when_no_model_loads(tmp_path: Path, client_factory) -> None:
    s = Settings(weights_dir=tmp_path / "empty", torch_home=tmp_path / "th", classifiers=["resnet18"],
                 device="cpu", warmup=False, data_dir=tmp_path / "data", style_workers=0)
    with client_factory(s) as c:
        assert c.get("/health/ready").status_code == 503
        assert c.get("/health/live").status_code == 200
        assert_problem(c.post("/classify", files={"image": ("a.png", image_bytes(), "image/png")}), 503)


def test_api_keys(base_settings: Settings, client_factory) -> None:
    files = {"image": ("a.png", image_bytes(), "image/png")}
    with client_factory(base_settings.model_copy(update={"api_keys": ["k-one", "k-two"]})) as c:
        assert_problem(c.post("/classify", files=files), 401)
        assert_problem(c.get("/models", headers={"X-API-Key": "wrong"}), 401)
        assert_problem(c.get("/models", headers={"Authorization": "Bearer nope"}), 401)
        assert c.get("/models", headers={"X-API-Key": "k-two"}).status_code == 200
        assert c.post("/classify", files=files, headers={"Authorization": "Bearer k-one"}).status_code == 200
        for open_path in ("/health/live", "/health/ready", "/docs", "/openapi.json"):
            assert c.get(open_path).status_code == 200, open_path
        # metrics need the metrics scope, which the plain keys hold
        assert_problem(c.get("/metrics"), 401)
        assert c.get("/metrics", headers={"X-API-Key": "k-one"}).status_code == 200


def test_api_keys_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CNN_API_KEYS", "a,b")
    monkeypatch.setenv("CNN_CLASSIFIERS", "x, y")
    s = Settings()
    assert s.api_keys == ["a", "b"] and s.classifiers == ["x", "y"]


def test_metrics_count_requests_and_batches(client: TestClient) -> None:
    client.post("/classify", files={"image": ("a.png", image_bytes(), "image/png")})
    client.post("/classify", files={"image": ("t.txt", b"text", "text/plain")})
    text = client.get("/metrics").text
    assert 'cnn_http_requests_total{method="POST",route="/classify",status="200"} 1.0' in text
    assert 'cnn_http_requests_total{method="POST",route="/classify",status="415"} 1.0' in text
    assert 'cnn_batch_size_count{model="tiny-cifar"} 1.0' in text
    assert "cnn_batch_queue_wait_seconds_bucket" in text and "cnn_batch_queue_depth" in text


def _batch_stats(text: str, model: str) -> tuple[float, float]:
    total = float(re.search(rf'cnn_batch_size_sum{{model="{model}"}} ([0-9.e+]+)', text).group(1))
    count = float(re.search(rf'cnn_batch_size_count{{model="{model}"}} ([0-9.e+]+)', text).group(1))
    return total, count


def test_concurrent_requests_are_batched(base_settings: Settings, client_factory) -> None:
    s = base_settings.model_copy(update={"batch_max_wait_ms": 200.0, "batch_max_size": 8})
    with client_factory(s) as c:
        data = image_bytes()

        def one(i: int) -> int:
            return c.post("/classify", files={"image": (f"{i}.png", data, "image/png")}).status_code

        with ThreadPoolExecutor(8) as pool:
            codes = list(pool.map(one, range(16)))
        assert codes == [200] * 16
        total, count = _batch_stats(c.get("/metrics").text, "tiny-cifar")
        assert total == 16
        assert total / count > 1.0, f"mean batch size {total / count}"


def test_openapi_documents_every_endpoint(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    for p in ("/classify", "/models", "/models/{name}", "/health/live", "/health/ready", "/metrics"):
        assert p in paths
    assert "413" in paths["/classify"]["post"]["responses"]


def test_full_queue_answers_503_with_retry_after(base_settings: Settings, client_factory,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """One batch running (held), one request queued, the next is shed at once with 503 + Retry-After."""
    import threading

    from app.runtime.registry import LoadedClassifier

    entered, release = threading.Event(), threading.Event()
    original = LoadedClassifier.forward

    def held_forward(self, batch):
        entered.set()
        assert release.wait(30)
        return original(self, batch)

    s = base_settings.model_copy(update={"batch_max_size": 1, "batch_max_queue": 1, "batch_max_wait_ms": 0.0})
    monkeypatch.setattr(LoadedClassifier, "forward", held_forward)  # warm-up is off: no call at start-up
    with client_factory(s) as c:
        files = {"image": ("a.png", image_bytes(), "image/png")}
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(c.post, "/classify", files=files)
            assert entered.wait(30)
            second = pool.submit(c.post, "/classify", files=files)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and 'cnn_batch_queue_depth{model="tiny-cifar"} 1.0' not in \
                    c.get("/metrics").text:
                time.sleep(0.01)
            shed = c.post("/classify", files=files)
            body = assert_problem(shed, 503)
            assert int(shed.headers["Retry-After"]) >= 1 and "overloaded" in body["detail"]
            release.set()
            assert first.result().status_code == 200 and second.result().status_code == 200


def test_per_model_batch_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CNN_BATCH_OVERRIDES", '{"resnet50": {"max_batch_size": 4, "max_wait_ms": 20}}')
    monkeypatch.setenv("CNN_BATCH_MAX_SIZE", "32")
    s = Settings()
    assert s.batch_config_for("resnet50") == {"max_batch_size": 4, "max_wait_ms": 20, "max_queue": 256}
    assert s.batch_config_for("other")["max_batch_size"] == 32


def test_default_prefers_trained_weights(base_settings: Settings, client_factory) -> None:
    s = base_settings.model_copy(update={"classifiers": ["resnet18", "tiny-cifar"], "allow_untrained": True})
    with client_factory(s) as c:
        assert c.get("/models").json()["default_classifier"] == "tiny-cifar"
        r = c.post("/classify", files={"image": ("a.png", image_bytes(), "image/png")})
        assert r.json()["model"] == "tiny-cifar" and r.json()["weights"] == "trained"


def test_chunked_body_over_the_limit_is_413(base_settings: Settings, client_factory) -> None:
    """Without Content-Length the limit is enforced while the body streams in."""
    with client_factory(base_settings.model_copy(update={"max_body_bytes": 50_000})) as c:
        boundary = "xyz"
        head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.bmp\"\r\n"
                "Content-Type: image/bmp\r\n\r\n").encode()
        chunks = [head] + [b"\0" * 10_000] * 10 + [f"\r\n--{boundary}--\r\n".encode()]
        r = c.post("/classify", content=iter(chunks),
                   headers={"content-type": f"multipart/form-data; boundary={boundary}"})
        assert_problem(r, 413)
