"""Style-transfer jobs through the API: submit, poll, result, preview, cancel, list, errors, durability."""

from __future__ import annotations

import io
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from app.settings import Settings
from app.stores.jobs import JobStore
from tests.api.test_classify import assert_problem
from tests.conftest import image_bytes

TINY = {"steps": "3", "size": "32"}


def files(n_styles: int = 1) -> list[tuple[str, tuple[str, bytes, str]]]:
    out = [("content", ("photo.png", image_bytes((120, 160, 200), (48, 36)), "image/png"))]
    out += [("style", (f"paint{i}.png", image_bytes((200, 60 + 40 * i, 30), (40, 40)), "image/png"))
            for i in range(n_styles)]
    return out


def wait_status(c: TestClient, url: str, wanted: set[str], timeout: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = c.get(url).json()
        if job["status"] in wanted:
            return job
        time.sleep(0.05)
    raise TimeoutError(f"{url} never reached {wanted}: {job}")


@pytest.fixture
def worker_settings(base_settings: Settings) -> Settings:
    return base_settings.model_copy(update={"style_workers": 1, "style_max_size": 256, "style_max_steps": 400})


def test_submit_poll_result_preview_list_delete(worker_settings: Settings, client_factory) -> None:
    with client_factory(worker_settings) as c:
        r = c.post("/style-transfer", files=files(), data={**TINY, "seed": "3"})
        assert r.status_code == 202, r.text
        job = r.json()
        assert r.headers["location"] == f"/style-transfer/{job['id']}" == job["links"]["self"]
        assert job["status"] in ("queued", "running") and job["parameters"]["steps"] == 3
        done = wait_status(c, r.headers["location"], {"succeeded", "failed"})
        assert done["status"] == "succeeded", done
        assert done["progress"] == 1 and done["step"] == 3 and done["feature_weights"]
        assert done["started_at"] and done["finished_at"] and done["loss"] is not None
        png = c.get(done["links"]["result"])
        assert png.status_code == 200 and png.headers["content-type"] == "image/png"
        img = Image.open(io.BytesIO(png.content))
        assert max(img.size) == 32 and img.size == (32, 24)  # the content's aspect ratio is kept
        jpg = c.get(done["links"]["result"], params={"format": "jpeg"})
        assert jpg.headers["content-type"] == "image/jpeg" and Image.open(io.BytesIO(jpg.content)).format == "JPEG"
        assert c.get(done["links"]["preview"]).status_code == 200
        listing = c.get("/style-transfer", params={"limit": 1}).json()
        assert listing["total"] == 1 and listing["jobs"][0]["id"] == job["id"] and listing["next"] is None
        metrics = c.get("/metrics").text
        assert 'cnn_style_jobs{state="succeeded"} 1.0' in metrics and "cnn_style_job_duration_seconds_count" in metrics
        assert c.delete(job["links"]["self"]).status_code == 204
        assert_problem(c.get(job["links"]["self"]), 404)
        assert_problem(c.get(job["links"]["result"]), 404)


def test_queued_job_result_is_409_and_cancel_is_immediate(base_settings: Settings, client_factory) -> None:
    with client_factory(base_settings) as c:  # no worker: jobs stay queued
        first = c.post("/style-transfer", files=files(), data=TINY).json()
        second = c.post("/style-transfer", files=files(), data=TINY).json()
        assert c.get(second["links"]["self"]).json()["queue_position"] == 1
        assert_problem(c.get(first["links"]["result"]), 409)
        assert_problem(c.get(first["links"]["preview"]), 409)
        r = c.delete(first["links"]["self"])
        assert r.status_code == 200 and r.json()["status"] == "canceled"
        assert c.get(second["links"]["self"]).json()["queue_position"] == 0
        assert c.get("/style-transfer", params={"status": "canceled"}).json()["total"] == 1


def test_running_job_cancels_within_a_few_steps(worker_settings: Settings, client_factory) -> None:
    with client_factory(worker_settings) as c:
        job = c.post("/style-transfer", files=files(), data={"steps": "400", "size": "48",
                                                             "optimizer": "adam"}).json()
        url = job["links"]["self"]
        deadline = time.monotonic() + 60
        while c.get(url).json()["step"] < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        r = c.delete(url)
        assert r.status_code == 200 and r.json()["cancel_requested"] is True
        done = wait_status(c, url, {"canceled", "succeeded", "failed"}, timeout=30)
        assert done["status"] == "canceled" and done["step"] < 400


def test_blending_several_styles(worker_settings: Settings, client_factory) -> None:
    with client_factory(worker_settings) as c:
        r = c.post("/style-transfer", files=files(2), data={**TINY, "style_blend": "0.7,0.3",
                                                            "preserve_colors": "true"})
        assert r.status_code == 202, r.text
        assert wait_status(c, r.headers["location"], {"succeeded", "failed"})["status"] == "succeeded"


@pytest.mark.parametrize(
    ("data", "status", "needle"),
    [
        ({"steps": "0"}, 422, "steps"),
        ({"steps": "100000"}, 422, "steps"),
        ({"size": "5000"}, 422, "size"),
        ({"size": "abc"}, 422, "size"),
        ({"optimizer": "sgd"}, 422, "optimizer"),
        ({"style_blend": "1,2,3"}, 422, "style_blend"),
        ({"style_blend": "x"}, 422, "style_blend"),
        ({"content_weight": "-1"}, 422, "content_weight"),
    ],
)
def test_bad_parameters(base_settings: Settings, client_factory, data: dict, status: int, needle: str) -> None:
    with client_factory(base_settings) as c:
        body = assert_problem(c.post("/style-transfer", files=files(), data=data), status)
        assert needle in body["detail"]


def test_bad_uploads(base_settings: Settings, client_factory) -> None:
    with client_factory(base_settings) as c:
        only_style = [f for f in files() if f[0] == "style"]
        assert_problem(c.post("/style-transfer", files=only_style), 422)
        only_content = [f for f in files() if f[0] == "content"]
        assert_problem(c.post("/style-transfer", files=only_content), 422)
        text_style = [files()[0], ("style", ("notes.txt", b"not an image", "text/plain"))]
        assert "notes.txt" in assert_problem(c.post("/style-transfer", files=text_style), 415)["detail"]
        assert_problem(c.get("/style-transfer/" + "0" * 32), 404)
        assert_problem(c.get("/style-transfer/not-an-id/result"), 404)
        assert_problem(c.delete("/style-transfer/" + "f" * 32), 404)
        assert_problem(c.get("/style-transfer", params={"limit": 0}), 422)
        assert c.get("/style-transfer").json()["total"] == 0  # nothing was stored for the rejected uploads


def test_full_queue_is_503_with_retry_after(base_settings: Settings, client_factory) -> None:
    with client_factory(base_settings.model_copy(update={"style_max_queue": 1})) as c:
        assert c.post("/style-transfer", files=files(), data=TINY).status_code == 202
        r = c.post("/style-transfer", files=files(), data=TINY)
        assert_problem(r, 503)
        assert int(r.headers["retry-after"]) >= 1


def test_jobs_survive_restarts_in_every_state(base_settings: Settings, worker_settings: Settings,
                                              client_factory) -> None:
    # 1. without a worker: one job stays queued, one is canceled
    with client_factory(base_settings) as c:
        queued = c.post("/style-transfer", files=files(), data=TINY).json()
        canceled = c.post("/style-transfer", files=files(), data=TINY).json()
        c.delete(canceled["links"]["self"])
    # 2. a job "running" on a worker of this host whose process is gone (the server was killed),
    #    and a job queued directly in the store
    store = JobStore(base_settings.data_dir / "style-jobs")
    crashed = store.create("style", {**{k: int(v) for k, v in TINY.items()}}, {
        "content": image_bytes(size=(30, 20)), "style_0": image_bytes((9, 9, 9))}, max_queued=10, info={"styles": 1})
    import socket

    was_running = store.claim(f"{socket.gethostname()}:999999:deadbeef")  # the oldest queued job
    assert was_running is not None and was_running.id == queued["id"]
    store.close()
    # 3. restart with a worker: the queued and the crashed job both run; the canceled one stays canceled
    with client_factory(worker_settings) as c:
        a = wait_status(c, queued["links"]["self"], {"succeeded", "failed"})
        b = wait_status(c, f"/style-transfer/{crashed.id}", {"succeeded", "failed"})
        assert a["status"] == b["status"] == "succeeded"
        assert a["attempts"] == 2 and b["attempts"] == 1  # the interrupted run counts as an attempt
        assert c.get(canceled["links"]["self"]).json()["status"] == "canceled"
        result = c.get(a["links"]["result"]).content
    # 4. after another restart the finished result is still served, byte for byte
    with client_factory(base_settings) as c:
        assert c.get(queued["links"]["result"]).content == result


def test_expired_jobs_are_removed(worker_settings: Settings, client_factory, tmp_path: Path) -> None:
    s = worker_settings.model_copy(update={"style_ttl_hours": 1e-6})  # about 4 ms
    with client_factory(s) as c:
        job = c.post("/style-transfer", files=files(), data=TINY).json()
        wait_status(c, job["links"]["self"], {"succeeded", "failed"})
    store = JobStore(s.data_dir / "style-jobs")
    assert store.job_dir(job["id"]).exists()
    with client_factory(s) as c:  # a worker expires old jobs when it starts, then every 30 s
        deadline = time.monotonic() + 30
        while c.get(job["links"]["self"]).status_code != 404 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert_problem(c.get(job["links"]["self"]), 404)
    assert store.get(job["id"]) is None and not store.job_dir(job["id"]).exists()


def test_api_defaults_are_the_algorithms_defaults() -> None:
    from app.services.style import StyleParameters
    from models.style import StyleParams

    api, algo = StyleParameters(), StyleParams()
    for name, value in api.model_dump().items():
        assert getattr(algo, name) == value, name


def test_a_job_that_breaks_ends_failed_with_its_reason(tmp_path: Path) -> None:
    import torch

    from app.services.style import StyleWorker

    class BrokenFeatures:
        def get(self, device: torch.device) -> tuple[object, str]:
            raise RuntimeError("feature network could not be built")

    store = JobStore(tmp_path)
    job = store.create("style", {"steps": 3, "size": 32}, {"content": image_bytes(), "style_0": image_bytes()},
                       max_queued=5, info={"styles": 1})
    worker = StyleWorker(store, BrokenFeatures(), torch.device("cpu"), ttl_seconds=3600)  # type: ignore[arg-type]
    claimed = store.claim(worker.id)
    assert claimed is not None and worker.run_job(claimed) == "failed"
    done = store.get(job.id)
    assert done is not None and done.status == "failed" and "could not be built" in (done.error or "")
