"""The gate: principals and scopes, admission before the body, deadlines, bounded metric labels."""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.apps import ROUTE_POLICIES
from app.auth import Principal
from app.gate import (
    FAIL_CLOSED,
    Admission,
    KeyFileError,
    KeyRing,
    Lane,
    RouteTable,
    hash_key,
    parse_timeout,
    policy_for,
)
from app.main import create_app
from app.metrics import Metrics
from app.middleware import ServiceMiddleware
from app.settings import Settings
from tests.api.test_classify import assert_problem
from tests.conftest import image_bytes

KEYS = {"alice": ("k-alice", ["read", "write"]), "bob": ("k-bob", ["read", "write"]),
        "reader": ("k-reader", ["read"]), "root": ("k-root", ["admin"]), "prom": ("k-prom", ["metrics"])}


def write_keys(path: Path) -> Path:
    path.write_text(json.dumps([{"name": n, "key_sha256": hash_key(k), "scopes": s} for n, (k, s) in KEYS.items()]))
    return path


def h(name: str) -> dict[str, str]:
    return {"X-API-Key": KEYS[name][0]}


@pytest.fixture
def keyed(base_settings: Settings, tmp_path: Path) -> Settings:
    return base_settings.model_copy(update={"api_keys_file": write_keys(tmp_path / "keys.json")})


# -- the table ------------------------------------------------------------------------------------------------


def test_every_openapi_operation_has_a_policy_and_the_table_no_stale_entry(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    operations = {(m.upper(), p) for p, ops in paths.items() for m in ops}
    docs = {("GET", "/openapi.json"), ("GET", "/docs"), ("GET", "/docs/oauth2-redirect"), ("GET", "/redoc")}
    assert operations - set(ROUTE_POLICIES) == set(), "routes without a policy (they would need admin)"
    assert set(ROUTE_POLICIES) - operations - docs == set(), "policies for routes that do not exist"
    for (method, path), policy in ROUTE_POLICIES.items():
        if (method, path) in operations:
            assert paths[path][method.lower()].get("x-required-scope") == (policy.scope or None)
    # fail closed: an unknown method on a known route needs admin
    assert policy_for("PATCH", "/classify", ROUTE_POLICIES) == FAIL_CLOSED


def test_route_table_matches_literals_before_parameters() -> None:
    t = RouteTable(ROUTE_POLICIES)
    assert t.match("GET", "/faces/subjects")[0] == "/faces/subjects"
    assert t.match("DELETE", "/faces/abc")[0] == "/faces/{face_id}"
    assert t.match("GET", "/faces/gallery")[0] == "/faces/gallery"
    assert t.match("GET", "/style-transfer/abc/result")[0] == "/style-transfer/{job_id}/result"
    template, policy = t.match("GET", "/nowhere")
    assert template is None and policy.scope == ""  # any valid key: a 404 tells strangers nothing


def _fill(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "x0", path)


def test_scopes_are_enforced_on_every_route(keyed: Settings, client_factory) -> None:
    """Table-driven over the OpenAPI operations: no key -> 401, a principal without the scope -> 403, with it the
    gate lets the request through (whatever the route then answers, it is not 401/403)."""
    holders = {"read": "reader", "write": "alice", "metrics": "prom", "admin": "root"}
    lacking = {"read": "prom", "write": "reader", "metrics": "reader", "admin": "alice"}
    with client_factory(keyed) as c:
        paths = c.get("/openapi.json").json()["paths"]
        checked = 0
        for path, ops in paths.items():
            for method in ops:
                scope = policy_for(method.upper(), path, ROUTE_POLICIES).scope
                url = _fill(path)
                if scope is None:
                    assert c.request(method, url).status_code not in (401, 403), (method, path)
                    continue
                checked += 1
                assert_problem(c.request(method, url), 401)
                assert_problem(c.request(method, url, headers={"X-API-Key": "not-a-key"}), 401)
                body = assert_problem(c.request(method, url, headers=h(lacking[scope])), 403)
                assert body["required_scope"] == scope
                r = c.request(method, url, headers=h(holders[scope]))
                assert r.status_code not in (401, 403), (method, path, r.text)
                r = c.request(method, url, headers={"Authorization": f"Bearer {KEYS['root'][0]}"})
                assert r.status_code not in (401, 403), ("admin holds every scope", method, path)
        assert checked >= 20


def test_unknown_paths_need_a_key_when_keys_are_on(keyed: Settings, client_factory) -> None:
    with client_factory(keyed) as c:
        assert_problem(c.get("/secret-admin"), 401)
        assert_problem(c.get("/secret-admin", headers=h("reader")), 404)


def test_the_body_of_an_unauthenticated_or_shed_request_is_never_read() -> None:
    """The gate answers from the headers alone: the application's receive() is never called."""
    keys = KeyRing.build(["good"], None)
    sent: list[dict[str, Any]] = []
    reads = 0
    app_calls = 0

    async def app(scope: Any, receive: Any, send: Any) -> None:
        nonlocal app_calls
        app_calls += 1

    async def receive() -> dict[str, Any]:
        nonlocal reads
        reads += 1
        return {"type": "http.request", "body": b"x" * 100, "more_body": True}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    admission = Admission({"classification": 1})
    mw = ServiceMiddleware(app, metrics=Metrics(), max_body_bytes=10**9, keys=keys, admission=admission,
                           default_timeout=None, policies=ROUTE_POLICIES)

    def scope(key: str | None) -> dict[str, Any]:
        headers = [(b"content-length", b"1000000")] + ([(b"x-api-key", key.encode())] if key else [])
        return {"type": "http", "method": "POST", "path": "/classify", "headers": headers, "root_path": ""}

    asyncio.run(mw(scope(None), receive, send))
    assert sent[0]["status"] == 401 and reads == 0 and app_calls == 0
    assert admission.lanes["classification"].try_acquire()  # fill the only slot
    sent.clear()
    asyncio.run(mw(scope("good"), receive, send))
    assert sent[0]["status"] == 503 and reads == 0 and app_calls == 0
    headers = dict(sent[0]["headers"])
    assert int(headers[b"retry-after"]) >= 1


def test_keys_are_stored_as_hashes_and_bad_key_files_refused(tmp_path: Path) -> None:
    ring = KeyRing.build(["plain"], write_keys(tmp_path / "k.json"))
    assert ring.principal("k-alice") == Principal("alice", frozenset({"read", "write"}))
    assert ring.principal("plain") is not None and ring.principal("plain").name == "key-1"  # type: ignore[union-attr]
    assert ring.principal("nope") is None
    assert all(b"k-alice" not in stored for stored, _ in ring.entries)
    bad = tmp_path / "bad.json"
    for content in ("{", "{}", json.dumps([{"name": "x", "key_sha256": "abc", "scopes": ["read"]}]),
                    json.dumps([{"name": "x", "key_sha256": "0" * 64, "scopes": ["root"]}]),
                    json.dumps([{"name": "x", "key_sha256": "0" * 64, "scopes": ["read"]}] * 2)):
        bad.write_text(content)
        with pytest.raises(KeyFileError):
            KeyRing.build([], bad)


def test_keygen_writes_a_hash_only(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from app.cli import main

    f = tmp_path / "keys.json"
    assert main(["keygen", "carol", "--scopes", "read,metrics", "--file", str(f)]) == 0
    key = capsys.readouterr().out.strip()
    entries = json.loads(f.read_text())
    assert entries == [{"name": "carol", "key_sha256": hash_key(key), "scopes": ["read", "metrics"]}]
    assert key not in f.read_text()
    assert main(["keygen", "carol", "--file", str(f)]) == 2  # names are unique
    assert main(["keygen", "dave", "--scopes", "root"]) == 2
    assert KeyRing.build([], f).principal(key).name == "carol"  # type: ignore[union-attr]


def test_open_health_reveals_no_paths_with_keys_on(keyed: Settings, client_factory) -> None:
    s = keyed.model_copy(update={"classifiers": ["tiny-cifar", "resnet18"]})
    with client_factory(s) as c:
        body = json.dumps(c.get("/health/ready").json())
        assert "/" + "tmp" not in body and ".pth" not in body and str(s.weights_dir) not in body
        # an authenticated caller still learns the reason from /models
        assert "resnet18-f37072fd.pth" in c.get("/models/resnet18", headers=h("reader")).json()["reason"]


# -- metrics labels ----------------------------------------------------------------------------------------


def test_metric_labels_stay_bounded(client: TestClient) -> None:
    before = len(client.get("/metrics").text)
    for i in range(60):
        client.request(f"X{i}ME", f"/classify{i}")
        client.request(f"BREW{i}", "/classify")
        client.get(f"/no/such/path/{i}")
    text = client.get("/metrics").text
    methods = set(re.findall(r'method="([^"]*)"', text))
    routes = set(re.findall(r'route="([^"]*)"', text))
    assert methods <= {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "other"}
    assert routes <= {p for _, p in ROUTE_POLICIES} | {"unmatched"}
    assert len(text) - before < 20_000  # a few new series, not 180


# -- admission, Retry-After, deadlines ------------------------------------------------------------------------


def test_lane_estimates_the_wait_from_the_drain_rate() -> None:
    lane = Lane(limit=4)
    now = 1000.0
    for _ in range(4):
        assert lane.try_acquire()
    assert not lane.try_acquire() and lane.rejected == 1
    for i in range(8):  # two completions per second
        lane.release(0.5, now=now + i * 0.5)
        assert lane.try_acquire()
    # 8 completions between t = 0 and t = 3.5 s: 8 / 3.5 per second, one slot every 3.5 / 8 s
    assert lane.drain_rate(now=now + 3.5) == pytest.approx(8 / 3.5)
    assert lane.expected_wait(now=now + 3.5) == pytest.approx(3.5 / 8)  # slots free one at a time at that rate
    # only the last 10 s count: at t = 12.5 the completions at 2.5, 3.0 and 3.5 s remain, over a 10 s span
    assert lane.drain_rate(now=now + 12.5) == pytest.approx(3 / 10)
    assert lane.drain_rate(now=now + 13.6) is None  # fewer than two left in the window


def test_timeouts_parse() -> None:
    assert parse_timeout(None, None) is None
    assert parse_timeout(b"2.5", None) == 2.5
    assert parse_timeout(b"10", 3.0) == 3.0  # a client may ask for less, not more
    for bad in (b"soon", b"nan", b"inf", b"-1", b"0", b"99999"):
        assert isinstance(parse_timeout(bad, None), str)


def _held_classifier(monkeypatch: pytest.MonkeyPatch, seconds: float | None = None
                     ) -> tuple[threading.Event, threading.Event, list[int]]:
    """Make the classifier's forward wait for `release` (or sleep `seconds` per batch); count its items."""
    from app.runtime.registry import LoadedClassifier

    entered, release = threading.Event(), threading.Event()
    computed: list[int] = []
    original = LoadedClassifier.forward

    def held(self: Any, batch: Any) -> Any:
        entered.set()
        if seconds is None:
            assert release.wait(30)
        else:
            time.sleep(seconds)
        computed.append(len(batch))
        return original(self, batch)

    monkeypatch.setattr(LoadedClassifier, "forward", held)
    return entered, release, computed


def test_queued_work_past_its_deadline_is_dropped_not_computed(base_settings: Settings, client_factory,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    entered, release, computed = _held_classifier(monkeypatch)
    s = base_settings.model_copy(update={"batch_max_size": 1})
    files = {"image": ("a.png", image_bytes(), "image/png")}
    with client_factory(s) as c, ThreadPoolExecutor(2) as pool:
        first = pool.submit(c.post, "/classify", files=files)
        assert entered.wait(30)
        late = pool.submit(c.post, "/classify", files=files, headers={"X-Request-Timeout": "0.2"})
        time.sleep(0.5)  # the second request's deadline passes while the first batch holds the model
        release.set()
        assert first.result().status_code == 200
        body = assert_problem(late.result(), 504)
        assert "nothing was computed" in body["detail"]
        assert computed == [1]  # the late item never reached the model
        assert 'cnn_batch_rejected_total{model="tiny-cifar",reason="deadline"} 1.0' in c.get("/metrics").text
        assert_problem(c.post("/classify", files=files, headers={"X-Request-Timeout": "never"}), 422)


def test_overload_sheds_at_the_gate_with_an_honest_retry_after(base_settings: Settings, client_factory,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """64 concurrent clients against a bound of 2 in flight on a model taking 0.4 s a batch: the excess is
    shed at once with 503, Retry-After tracks the measured drain, and service is normal right after."""
    _held_classifier(monkeypatch, seconds=0.4)
    s = base_settings.model_copy(update={"batch_max_size": 1, "in_flight_overrides": {"classification": 2}})
    files = {"image": ("a.png", image_bytes(), "image/png")}
    with client_factory(s) as c:
        for _ in range(4):  # let the gate measure a drain rate first
            assert c.post("/classify", files=files).status_code == 200

        def one(i: int) -> tuple[int, float, float, str | None]:
            t0 = time.monotonic()
            r = c.post("/classify", files=files)
            return r.status_code, t0, time.monotonic(), r.headers.get("Retry-After")

        with ThreadPoolExecutor(64) as pool:
            results = list(pool.map(one, range(64)))
        ok = [r for r in results if r[0] == 200]
        shed = [r for r in results if r[0] == 503]
        assert len(ok) + len(shed) == 64 and len(ok) >= 2 and len(shed) >= 32
        # one forward at a time of 0.4 s: a slot frees every ~0.4 s; Retry-After is whole seconds, at least 1
        assert {r[3] for r in shed} == {"1"}
        text = c.get("/metrics").text
        assert f'cnn_admission_rejected_total{{application="classification"}} {float(len(shed))}' in text
        assert 'cnn_requests_in_flight{application="classification"} 0.0' in text
        assert c.post("/classify", files=files).status_code == 200


# -- partial failure ------------------------------------------------------------------------------------------


def _apps(c: TestClient, query: str = "") -> tuple[int, dict[str, Any]]:
    r = c.get("/health/ready" + query)
    return r.status_code, r.json()


def test_a_missing_face_detector_leaves_everything_else_serving(base_settings: Settings, client_factory,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import cv2

    from tests.api.test_faces import pattern
    from tests.conftest import write_tiny_face_model, write_tiny_text_model

    write_tiny_face_model(base_settings.weights_dir)
    write_tiny_text_model(base_settings.weights_dir)
    monkeypatch.delattr(cv2, "CascadeClassifier")  # as on an OpenCV build without it
    s = base_settings.model_copy(update={"face_models": ["tiny-face"], "text_models": ["tiny-text"]})
    with client_factory(s) as c:
        code, body = _apps(c)
        assert code == 503 and body["applications"]["faces"]["status"] == "degraded"
        assert "CascadeClassifier" in body["applications"]["faces"]["reason"]
        for a in ("classification", "text", "style"):
            assert body["applications"][a]["status"] == "ready", a
        assert _apps(c, "?require=classification,text,style")[0] == 200
        assert_problem(c.get("/health/ready?require=bogus"), 422)
        assert c.get("/models").json()["applications"]["faces"]["status"] == "degraded"
        files = {"image": ("a.png", image_bytes(), "image/png")}
        assert c.post("/classify", files=files).status_code == 200
        assert c.post("/text/classify", json={"texts": ["hello"]}).status_code == 200
        haar = assert_problem(c.post("/faces/embed", files=[("image", ("f.png", pattern(1), "image/png"))]), 503)
        assert "detector=none" in haar["detail"]
        r = c.post("/faces/embed", data={"detector": "none"}, files=[("image", ("f.png", pattern(1), "image/png"))])
        assert r.status_code == 200
    # a crop-only deployment (default detector none) is ready without the cascade
    with client_factory(s.model_copy(update={"face_detector": "none"})) as c:
        assert _apps(c)[0] == 200


def test_a_broken_face_or_text_model_leaves_the_others_serving(base_settings: Settings, client_factory) -> None:
    from tests.conftest import write_tiny_face_model, write_tiny_text_model

    write_tiny_face_model(base_settings.weights_dir)
    write_tiny_text_model(base_settings.weights_dir)
    for f in ("tiny-face.pt", "tiny-text.pt"):
        (base_settings.weights_dir / f).write_bytes(b"damaged")
    s = base_settings.model_copy(update={"face_models": ["tiny-face"], "text_models": ["tiny-text"]})
    with client_factory(s) as c:
        code, body = _apps(c)
        assert code == 503
        for a in ("faces", "text"):
            assert body["applications"][a]["status"] == "unavailable" and "tiny-" in body["applications"][a]["reason"]
        assert body["applications"]["classification"]["status"] == "ready"
        assert _apps(c, "?require=classification")[0] == 200
        assert c.post("/classify", files={"image": ("a.png", image_bytes(), "image/png")}).status_code == 200
        assert "tiny-text" in assert_problem(c.post("/text/classify", json={"texts": ["hi"]}), 503)["detail"]
    # readiness can be narrowed by configuration too
    with client_factory(s.model_copy(update={"ready_requires": ["classification", "style"]})) as c:
        assert _apps(c)[0] == 200


def test_a_gallery_that_cannot_open_fails_faces_only(base_settings: Settings, client_factory) -> None:
    from tests.conftest import write_tiny_face_model

    write_tiny_face_model(base_settings.weights_dir)
    base_settings.data_dir.mkdir(parents=True, exist_ok=True)
    (base_settings.data_dir / "gallery").write_text("a file where the gallery directory should be")
    s = base_settings.model_copy(update={"face_models": ["tiny-face"]})
    with client_factory(s) as c:
        code, body = _apps(c)
        assert code == 503 and body["applications"]["faces"]["status"] == "failed"
        assert_problem(c.get("/faces/subjects"), 503)
        assert c.post("/classify", files={"image": ("a.png", image_bytes(), "image/png")}).status_code == 200
        assert _apps(c, "?require=classification")[0] == 200


def test_startup_failure_of_one_application_does_not_stop_the_others(base_settings: Settings, client_factory,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import app.apps.style as style_app

    def boom(*a: Any, **k: Any) -> None:
        raise OSError("disk on fire")

    monkeypatch.setattr(style_app, "_open", boom)
    with client_factory(base_settings) as c:
        code, body = _apps(c)
        assert code == 503 and body["applications"]["style"] == {
            "status": "failed", "reason": "OSError: disk on fire", "default_model": None, "required": True}
        assert "disk on fire" in assert_problem(c.get("/style-transfer"), 503)["detail"]
        assert c.post("/classify", files={"image": ("a.png", image_bytes(), "image/png")}).status_code == 200


def test_create_app_refuses_a_bad_keys_file(base_settings: Settings, tmp_path: Path) -> None:
    bad = tmp_path / "keys.json"
    bad.write_text("[")
    with pytest.raises(KeyFileError):
        create_app(base_settings.model_copy(update={"api_keys_file": bad}))


def test_a_damaged_style_feature_network_fails_style_only(base_settings: Settings, client_factory) -> None:
    from app.runtime.registry import spec_from_torchvision

    name = spec_from_torchvision("vgg19").weights.file_name
    (base_settings.weights_dir / name).write_bytes(b"not the VGG-19 weights")
    with client_factory(base_settings) as c:
        code, body = _apps(c)
        assert code == 503 and body["applications"]["style"]["status"] == "failed"
        assert name in body["applications"]["style"]["reason"] and "sha256" in body["applications"]["style"]["reason"]
        assert "cannot be used" in assert_problem(c.get("/style-transfer"), 503)["detail"]
        assert c.post("/classify", files={"image": ("a.png", image_bytes(), "image/png")}).status_code == 200
        assert _apps(c, "?require=classification")[0] == 200
    (base_settings.weights_dir / name).unlink()  # absent (not damaged) is the documented offline fallback
    with client_factory(base_settings) as c:
        assert _apps(c)[0] == 200


def test_jobs_belong_to_the_key_that_made_them(keyed: Settings, client_factory) -> None:
    """End to end through the gate: alice's job is a 404 for bob (get, result, preview, delete, list), an admin
    sees and controls it, and a read-only principal cannot submit."""
    files = [("content", ("c.png", image_bytes(size=(64, 48)), "image/png")),
             ("style", ("s.png", image_bytes((10, 200, 10), size=(64, 64)), "image/png"))]
    with client_factory(keyed) as c:
        r = c.post("/style-transfer", files=files, data={"steps": "1", "size": "64"}, headers=h("alice"))
        assert r.status_code == 202, r.text
        job = r.json()
        assert job["owner"] == "alice"
        url = f"/style-transfer/{job['id']}"
        assert c.get(url, headers=h("alice")).status_code == 200
        for method, suffix in (("GET", ""), ("GET", "/result"), ("GET", "/preview"), ("DELETE", "")):
            assert_problem(c.request(method, url + suffix, headers=h("bob")), 404)
        assert c.get("/style-transfer", headers=h("bob")).json()["total"] == 0
        assert c.get("/style-transfer", headers=h("alice")).json()["total"] == 1
        assert c.get("/style-transfer", headers=h("root")).json()["total"] == 1
        assert c.get(url, headers=h("root")).json()["owner"] == "alice"
        assert_problem(c.post("/style-transfer", files=files, data={"size": "64"}, headers=h("reader")), 403)
        assert c.delete(url, headers=h("root")).status_code == 200  # the admin cancels alice's queued job
        assert c.get(url, headers=h("alice")).json()["status"] == "canceled"
