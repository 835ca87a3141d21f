"""`serve --front-workers N` (app/model_host.py): front workers forwarding classification, text and faces to one
model host over a Unix socket. In-process checks (a host in a thread, a front app in a TestClient) of answers,
problems, listings, metrics, deadlines and a lost host; then the real command: its processes, a host that dies,
a graceful stop."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from app.model_host import HostClient, ModelHost, _claim, build_front_app, socket_path
from app.remote import RemoteService, ServiceHost
from app.runtime.batcher import request_deadline
from app.settings import Settings
from tests.api.test_classify import assert_problem
from tests.conftest import image_bytes, wait_ready, write_tiny_classifier, write_tiny_text_model
from tests.server import server


def short_socket() -> str:
    """A socket path under the Unix limit (pytest's tmp_path can be longer)."""
    return os.path.join(tempfile.mkdtemp(prefix="mh", dir="/tmp"), "host.sock")


class HostThread:
    """A ModelHost on its own event loop in a thread, as the model-host process runs it."""

    def __init__(self, settings: Settings, path: str) -> None:
        self.settings, self.path = settings, path
        self.loop: asyncio.AbstractEventLoop | None = None
        self.stop_event: asyncio.Event | None = None
        self.host: ModelHost | None = None
        self.thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    async def _main(self) -> None:
        self.loop, self.stop_event = asyncio.get_running_loop(), asyncio.Event()
        self.host = ModelHost(self.settings, self.path)
        await self.host.run(self.stop_event)

    def start(self) -> HostThread:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not os.path.exists(self.path):
            assert time.monotonic() < deadline and self.thread.is_alive(), "the model host did not listen"
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        assert self.loop is not None and self.stop_event is not None
        self.loop.call_soon_threadsafe(self.stop_event.set)
        self.thread.join(60)
        assert not self.thread.is_alive()


@pytest.fixture
def host_settings(base_settings: Settings) -> Settings:
    write_tiny_text_model(base_settings.weights_dir)
    write_tiny_classifier(base_settings.weights_dir, "tiny-b")
    return base_settings.model_copy(update={"classifiers": ["tiny-cifar", "tiny-b"], "text_models": ["tiny-text"],
                                            "style_enabled": False})


@pytest.fixture
def front(host_settings: Settings) -> Iterator[tuple[TestClient, HostThread]]:
    path = short_socket()
    host = HostThread(host_settings, path).start()
    with TestClient(build_front_app(host_settings, HostClient(path, patience=30))) as c:
        wait_ready(c)
        yield c, host
    if host.thread.is_alive():
        host.stop()


def test_front_forwards_answers_problems_listings_and_metrics(front: tuple[TestClient, HostThread]) -> None:
    c, host = front
    r = c.post("/classify", files={"image": ("a.png", image_bytes())}, data={"model": "tiny-b"})
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "tiny-b"
    assert sum(p["probability"] for p in r.json()["results"][0]["top_k"]) == pytest.approx(1.0, abs=1e-3)
    body = assert_problem(c.post("/classify", files={"image": ("a.png", image_bytes())}, data={"model": "nope"}), 404)
    assert body["available"] == ["tiny-cifar", "tiny-b"]  # the problem's extra fields crossed back too
    assert_problem(c.post("/classify", files={"image": ("a.txt", b"not an image")}), 415)
    assert_problem(c.post("/classify", files={"image": ("a.png", image_bytes())}, data={"top_k": "NaN"}), 422)
    assert c.post("/text/classify", json={"texts": ["markets"]}).json()["model"] == "tiny-text"

    ready = c.get("/health/ready")
    assert ready.status_code == 200
    assert ready.json()["applications"]["faces"]["status"] == "disabled"
    # one host behind three twins: its listing is reported once, not once per application
    names = [m["name"] for m in c.get("/models").json()["models"]]
    assert sorted(names) == ["tiny-b", "tiny-cifar", "tiny-text"]
    assert c.get("/models/tiny-b").json()["status"] == "ready"
    detail = assert_problem(c.post("/models/tiny-b/unload"), 503)["detail"]  # changed by restarting, as on Ray
    assert "--front-workers" in detail
    metrics = c.get("/metrics").text
    batch_counts = [line for line in metrics.splitlines()
                    if line.startswith("cnn_batch_size_count") and 'model="tiny-b"' in line]
    assert len(batch_counts) == 1 and 'replica="model-host"' in batch_counts[0]
    assert float(batch_counts[0].rsplit(" ", 1)[1]) >= 1
    assert host.host is not None and host.host.host.state.services["classification"] is not None


def test_a_scrape_of_any_front_worker_shows_every_workers_requests(host_settings: Settings) -> None:
    """Each front worker hands its own metrics to the model host; a scrape of another worker includes them with a
    `worker` label, so /metrics counts all requests whichever worker the scrape reaches."""
    path = short_socket()
    host = HostThread(host_settings, path).start()
    clients = [HostClient(path, patience=30) for _ in range(2)]
    try:
        with TestClient(build_front_app(host_settings, clients[0], report_interval=0.05)) as a, \
                TestClient(build_front_app(host_settings, clients[1], report_interval=0.05)) as b:
            wait_ready(a)
            wait_ready(b)
            for _ in range(3):
                assert a.post("/classify", files={"image": ("a.png", image_bytes())}).status_code == 200
            deadline = time.monotonic() + 30
            while True:
                lines = [ln for ln in b.get("/metrics").text.splitlines()
                         if ln.startswith("cnn_http_requests_total{") and 'route="/classify"' in ln]
                from_a = [ln for ln in lines if f'worker="{clients[0].worker}"' in ln]
                if from_a and sum(float(ln.rsplit(" ", 1)[1]) for ln in from_a) == 3:
                    break
                assert time.monotonic() < deadline, lines
                time.sleep(0.05)
            own = [ln for ln in lines if f'worker="{clients[1].worker}"' in ln]  # b's own, labelled too: 0 requests
            assert all("worker=" in ln for ln in lines) and sum(float(ln.rsplit(" ", 1)[1]) for ln in own) == 0
    finally:
        host.stop()


def test_a_lost_host_is_a_503_and_the_front_recovers(front: tuple[TestClient, HostThread],
                                                     host_settings: Settings) -> None:
    c, host = front
    host.stop()
    r = c.post("/classify", files={"image": ("a.png", image_bytes())})
    body = assert_problem(r, 503)
    assert "model-host" in body["type"] and r.headers["retry-after"] == "5"
    ready = c.get("/health/ready")
    assert ready.status_code == 503
    assert ready.json()["applications"]["classification"]["status"] == "unavailable"

    HostThread(host_settings, host.path).start()  # a new host on the same socket: the front connects again
    deadline = time.monotonic() + 30
    while c.get("/health/ready").status_code != 200:
        assert time.monotonic() < deadline, "the front did not recover"
        time.sleep(0.1)
    assert c.post("/classify", files={"image": ("a.png", image_bytes())}).status_code == 200


def test_the_deadline_crosses_as_the_time_left() -> None:
    """RemoteService sends the seconds left of the request's deadline; ServiceHost runs the call under a deadline
    that far ahead, so the far micro-batcher drops work nobody waits for any more."""
    seen: list[float | None] = []

    class Handle:
        reports = False

        async def call(self, method: str, args: Any, kwargs: Any, timeout: float | None) -> Any:
            seen.append(timeout)
            return "ok"

    info = {"status": {"status": "ready"}, "attributes": {}, "methods": ["run"]}
    service = RemoteService("x", Handle(), info)  # type: ignore[arg-type]

    async def call_with(deadline: float | None) -> None:
        token = request_deadline.set(deadline)
        try:
            assert await service.run() == "ok"
        finally:
            request_deadline.reset(token)

    asyncio.run(call_with(time.monotonic() + 5))
    asyncio.run(call_with(None))
    assert seen[0] is not None and 4.0 < seen[0] <= 5.0 and seen[1] is None

    class Service:
        async def left(self) -> float | None:
            d = request_deadline.get()
            return None if d is None else d - time.monotonic()

    host = ServiceHost(Settings(style_workers=0), [])
    host.state.services["x"] = Service()
    left = asyncio.run(host.call("x", "left", (), {}, 2.0))
    assert left is not None and 1.0 < left <= 2.0
    assert asyncio.run(host.call("x", "left", (), {}, None)) is None
    host.state.executor.shutdown()


def test_socket_path_limit_and_a_stale_socket(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="CNN_MODEL_HOST_SOCKET"):
        socket_path(Settings(data_dir=Path("/tmp") / ("d" * 120)))
    assert socket_path(Settings(model_host_socket="/tmp/x.sock")) == "/tmp/x.sock"

    path = short_socket()
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(path)  # a socket file nobody listens on: what a killed host leaves
    asyncio.run(_claim(path))
    assert not os.path.exists(path)

    with socket.socket(socket.AF_UNIX) as live:
        live.bind(path)
        live.listen()
        with pytest.raises(RuntimeError, match="another model host"):
            asyncio.run(_claim(path))


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry.name))
    return out


def _host_pid(path: str) -> int:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"model-host" in cmd and path.encode() in cmd:
                return int(entry.name)
    raise AssertionError("no model host process")


def _wait_gone(pids: list[int], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while any(Path(f"/proc/{p}").exists() and "Z" not in Path(f"/proc/{p}/stat").read_text().split()[2]
              for p in pids):
        assert time.monotonic() < deadline, f"processes still running: {pids}"
        time.sleep(0.1)


@pytest.mark.skipif(not Path("/proc").exists(), reason="reads the process table from /proc")
def test_serve_with_front_workers_stops_with_its_host(tmp_path: Path) -> None:
    """The real command: two front workers and a host; the answer is the single process's; SIGTERM stops all of
    them and removes the socket (exit 0); a host that dies takes the front workers down with it (exit 1)."""
    write_tiny_classifier(tmp_path / "weights")
    env = {"CNN_FRONT_WORKERS": "2", "CNN_CLASSIFIERS": "tiny-cifar", "CNN_TEXT_MODELS": "", "CNN_FACE_MODELS": "",
           "CNN_STYLE_ENABLED": "false", "CNN_MODEL_HOST_SOCKET": short_socket()}
    with server(tmp_path, {**env, "CNN_FRONT_WORKERS": "0"}) as (_, url):
        single = httpx.post(f"{url}/classify", files={"image": ("a.png", image_bytes())}).json()

    with server(tmp_path, env, kill=False) as (proc, url):
        r = httpx.post(f"{url}/classify", files={"image": ("a.png", image_bytes())})
        assert r.status_code == 200 and r.json()["results"] == single["results"]
        workers = _children(proc.pid)
        assert _host_pid(env["CNN_MODEL_HOST_SOCKET"]) in workers
        assert len(workers) >= 3  # the host, two front workers (and multiprocessing's resource tracker)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        _wait_gone(workers)
        assert not os.path.exists(env["CNN_MODEL_HOST_SOCKET"])

    with server(tmp_path, env) as (proc, url):
        workers = _children(proc.pid)
        os.kill(_host_pid(env["CNN_MODEL_HOST_SOCKET"]), signal.SIGKILL)
        assert proc.wait(timeout=60) == 1
        _wait_gone(workers)
