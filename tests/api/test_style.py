"""Style-transfer jobs through the API: submit, poll, result, preview, cancel, list, errors, durability."""

from __future__ import annotations

import io
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from app.settings import Settings
from app.stores.jobs import JobStore
from models.style import ProgressInfo, StyleParams, random_vgg_features, stylize
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
        assert done["started_at"] and done["finished_at"]
        png = c.get(done["links"]["result"])
        assert png.status_code == 200 and png.headers["content-type"] == "image/png"
        img = Image.open(io.BytesIO(png.content))
        assert max(img.size) == 32 and img.size == (32, 24)  # the content's aspect ratio is kept
        # the job's loss and result are what stylize gives here, outside the service, for the same inputs,
        # parameters and offline feature network (no VGG-19 file in this torch_home: the random one, seed 0)
        assert done["feature_weights"].startswith("random"), done["feature_weights"]
        content, *styles = [Image.open(io.BytesIO(data)).convert("RGB") for _, (_, data, _) in files()]
        losses: list[float] = []

        def progress(info: ProgressInfo) -> bool:
            losses.append(info.loss)
            return True

        direct = stylize(content, styles, StyleParams(**done["parameters"]), random_vgg_features(seed=0),
                         torch.device("cpu"), progress=progress)
        assert len(losses) == 3 and done["loss"] == pytest.approx(losses[-1], rel=1e-3)
        assert np.abs(np.asarray(img.convert("RGB"), dtype=float) - np.asarray(direct, dtype=float)).max() <= 2
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


def test_running_job_cancels_within_a_step(worker_settings: Settings, client_factory,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """After the cancel request is committed, the optimiser takes at most one more step."""
    from app.services import style as style_service
    from app.stores.jobs import JobStore

    events: list[tuple[str, int]] = []  # ("cancel", 0) when the request is stored, ("step", n) per callback
    cancel, progress = JobStore.cancel, style_service._Progress.__call__

    def recording_cancel(self: JobStore, *a: object, **k: object) -> object:
        out = cancel(self, *a, **k)  # type: ignore[arg-type]
        events.append(("cancel", 0))
        return out

    def recording_progress(self: object, info: object) -> bool:
        events.append(("step", int(info.step)))  # type: ignore[attr-defined]
        return progress(self, info)  # type: ignore[arg-type]

    monkeypatch.setattr(JobStore, "cancel", recording_cancel)
    monkeypatch.setattr(style_service._Progress, "__call__", recording_progress)
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
        assert done["status"] == "canceled"
        after = events[events.index(("cancel", 0)) + 1:]
        assert len(after) <= 2, after  # a step already running when the request landed, then the one that sees it


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
    # 2. records as a crash leaves them, written through the store: the oldest queued job marked "running" by a
    #    worker id of this host whose pid does not exist, and a job queued directly in the store (a real worker
    #    killed with SIGKILL mid-job: tests/api/test_style_crash.py)
    store = JobStore(base_settings.data_dir / "style-jobs")
    stored = store.create("style", {**{k: int(v) for k, v in TINY.items()}}, {
        "content": image_bytes(size=(30, 20)), "style_0": image_bytes((9, 9, 9))}, max_queued=10, info={"styles": 1})
    import socket

    was_running = store.claim(f"{socket.gethostname()}:999999:deadbeef")  # the oldest queued job
    assert was_running is not None and was_running.id == queued["id"]
    store.close()
    # 3. restart with a worker: the interrupted job is requeued, both run; the canceled one stays canceled
    with client_factory(worker_settings) as c:
        a = wait_status(c, queued["links"]["self"], {"succeeded", "failed"})
        b = wait_status(c, f"/style-transfer/{stored.id}", {"succeeded", "failed"})
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


# ---------------------------------------------------------------------------------------------- refusals store nothing


def assert_nothing_stored(s: Settings) -> None:
    store = JobStore(s.data_dir / "style-jobs")
    try:
        assert store.list_jobs()[1] == 0 and list(store.files_root.iterdir()) == []
    finally:
        store.close()


FLOAT_FIELDS = ("content_weight", "style_weight", "tv_weight", "lr")


@pytest.mark.parametrize("data", [
    *({field: value} for field in FLOAT_FIELDS for value in ("nan", "inf", "-inf", "1e999", "NaN", "-Infinity")),
    {"style_blend": "nan"}, {"style_blend": "inf"}, {"style_blend": "1,nan"}, {"style_blend": "1e999,1"},
    {"style_blend": "-inf,1"},
], ids=lambda d: "-".join(f"{k}={v}" for k, v in d.items()))
def test_non_finite_numbers_are_422_and_store_nothing(base_settings: Settings, client_factory, data: dict) -> None:
    n = 2 if "," in data.get("style_blend", "") else 1
    with client_factory(base_settings) as c:
        body = assert_problem(c.post("/style-transfer", files=files(n), data={**TINY, **data}), 422)
        assert next(iter(data)) in body["detail"]
        assert c.get("/style-transfer").json()["total"] == 0
    assert_nothing_stored(base_settings)


def thin(size: tuple[int, int]) -> bytes:
    return image_bytes((90, 120, 150), size)


def uploads(content: bytes | None = None, styles: list[bytes] | None = None) -> list:
    """files() with the content and/or the style images replaced."""
    default = files()
    out = [("content", ("thin.png", content, "image/png"))] if content is not None else default[:1]
    if styles is None:
        return out + default[1:]
    return out + [("style", (f"style{i}.png", data, "image/png")) for i, data in enumerate(styles)]


@pytest.mark.parametrize(("data", "sent", "needle"), [
    # 160x9 at size 128 is 128x7: VGG-19's four poolings before conv5_1 need 16 px per side (and the
    # aspect ratio, under 20:1, passes the image checks)
    ({"size": "128"}, uploads(content=thin((160, 9))), "content image (160x9 px) is 128x7 px at size 128"),
    ({"size": "128"}, uploads(styles=[thin((10, 180))]), "style[0] (10x180 px) is scaled to 7x128 px"),
    ({"size": "128", "style_blend": "1,1"}, uploads(styles=[image_bytes(), thin((180, 10))]), "style[1]"),
    ({"content_weight": "0", "style_weight": "0"}, uploads(), "nothing to optimise"),
    # size 32 allows two levels on a square, not on the 48x36 content: 32x24 -> 16x12
    ({"size": "32", "multires": "2"}, uploads(), "16x12 px at multires level 1 of 2"),
    ({"size": "32", "multires": "3"}, uploads(), "multires"),
    ({"steps": "2", "multires": "3", "size": "128"}, uploads(), "one per level"),
    ({"style_blend": "0,0"}, uploads(styles=[image_bytes(), image_bytes()]), "style_blend"),
], ids=["thin-content", "thin-style", "thin-second-style", "no-weights", "multires-aspect", "multires-size",
        "multires-steps", "blend-zero"])
def test_jobs_that_could_never_run_are_422_at_submission(base_settings: Settings, client_factory, data: dict,
                                                         sent: list, needle: str) -> None:
    with client_factory(base_settings) as c:
        body = assert_problem(c.post("/style-transfer", files=sent, data={**TINY, **data}), 422)
        assert needle in body["detail"], body
        assert c.get("/style-transfer").json()["total"] == 0
    assert_nothing_stored(base_settings)


def test_the_same_shapes_are_accepted_when_they_can_run(worker_settings: Settings, client_factory) -> None:
    with client_factory(worker_settings) as c:
        # 300x19 becomes 128x8 at size 128: enough for conv4_2 (three poolings) when there is no style loss
        r = c.post("/style-transfer", files=uploads(content=thin((300, 19))),
                   data={"size": "128", "style_weight": "0", "steps": "2"})
        assert r.status_code == 202, r.text
        # a thin style image with blend weight 0 never reaches the network
        r2 = c.post("/style-transfer", files=uploads(styles=[image_bytes(), thin((180, 10))]),
                    data={"size": "128", "style_blend": "1,0", "steps": "2"})
        assert r2.status_code == 202, r2.text
        r3 = c.post("/style-transfer", files=files(), data={"size": "64", "multires": "2", "steps": "2"})
        assert r3.status_code == 202, r3.text
        for job in (r, r2, r3):  # and they do run
            done = wait_status(c, job.headers["location"], {"succeeded", "failed"})
            assert done["status"] == "succeeded", done


# ---------------------------------------------------------------------------------------------- paging bounds


@pytest.mark.parametrize("offset", [2**31, 2**63 - 1, 2**63, 2**64, 10**30])
def test_huge_offsets_are_422(base_settings: Settings, client_factory, offset: int) -> None:
    with client_factory(base_settings) as c:
        assert "offset" in assert_problem(c.get("/style-transfer", params={"offset": offset}), 422)["detail"]
        assert_problem(c.get("/style-transfer", params={"limit": 10**30}), 422)
        assert c.get("/style-transfer", params={"offset": 2**31 - 1}).json()["jobs"] == []


# ---------------------------------------------------------------------------------------------- owners


def test_jobs_belong_to_their_owner(base_settings: Settings, client_factory) -> None:
    from app.auth import Principal
    from app.deps import get_principal

    alice = Principal("alice", frozenset({"read", "write"}))
    bob = Principal("bob", frozenset({"read", "write"}))
    admin = Principal("root", frozenset({"read", "write", "admin"}))
    caller = {"now": alice}
    with client_factory(base_settings) as c:
        c.app.dependency_overrides[get_principal] = lambda: caller["now"]  # type: ignore[attr-defined]
        mine = c.post("/style-transfer", files=files(), data=TINY).json()
        done = c.post("/style-transfer", files=files(), data=TINY).json()
        # finish the second job by hand (no worker here) so its result and preview exist
        store = JobStore(base_settings.data_dir / "style-jobs")
        claimed = store.claim("test-worker")
        assert claimed is not None and claimed.id == mine["id"] and claimed.owner == "alice"
        store.release(mine["id"], "test-worker")
        store.cancel(mine["id"])  # alice's first job: canceled (finished)
        running = store.claim("test-worker")
        assert running is not None and running.id == done["id"]
        store.write_file(done["id"], "result.png", image_bytes(size=(32, 24)))
        assert store.finish(done["id"], "test-worker", "succeeded")
        store.close()
        caller["now"] = bob
        theirs = c.post("/style-transfer", files=files(), data=TINY).json()
        for job in (mine, done):
            for link in ("self", "result", "preview"):
                assert_problem(c.get(job["links"][link]), 404)  # not 403: existence is not revealed
            assert_problem(c.delete(job["links"]["self"]), 404)
        listing = c.get("/style-transfer").json()
        assert listing["total"] == 1 and [j["id"] for j in listing["jobs"]] == [theirs["id"]]
        caller["now"] = alice
        assert c.get(done["links"]["result"]).status_code == 200
        assert c.get(done["links"]["preview"]).status_code == 200
        assert {j["id"] for j in c.get("/style-transfer").json()["jobs"]} == {mine["id"], done["id"]}
        assert_problem(c.delete(theirs["links"]["self"]), 404)
        caller["now"] = admin  # an admin sees and controls everyone's jobs
        assert c.get("/style-transfer").json()["total"] == 3
        seen = c.get(theirs["links"]["self"]).json()
        assert seen["status"] == "queued" and seen["owner"] == "bob"
        assert c.get(done["links"]["result"]).status_code == 200
        assert c.delete(theirs["links"]["self"]).json()["status"] == "canceled"
        caller["now"] = alice
        assert c.delete(done["links"]["self"]).status_code == 204  # the owner deletes her own
        assert_problem(c.get(done["links"]["self"]), 404)


# ---------------------------------------------------------------------------------------------- bounds


def test_finished_jobs_beyond_the_bound_are_evicted(worker_settings: Settings, client_factory) -> None:
    s = worker_settings.model_copy(update={"style_max_finished_jobs": 1})
    with client_factory(s) as c:
        first = c.post("/style-transfer", files=files(), data=TINY).json()
        assert wait_status(c, first["links"]["self"], {"succeeded", "failed"})["status"] == "succeeded"
        second = c.post("/style-transfer", files=files(), data=TINY).json()
        assert wait_status(c, second["links"]["self"], {"succeeded", "failed"})["status"] == "succeeded"
        assert_problem(c.get(first["links"]["self"]), 404)  # the oldest finished job went when the next finished
        assert c.get(second["links"]["result"]).status_code == 200
    store = JobStore(s.data_dir / "style-jobs")
    assert not store.job_dir(first["id"]).exists() and store.finished_usage()[0] == 1


def test_bounds_are_applied_at_start_up(base_settings: Settings, client_factory) -> None:
    store = JobStore(base_settings.data_dir / "style-jobs")
    ids = [store.create("style", {"steps": 1}, {"content": b"c"}, max_queued=10).id for _ in range(3)]
    for i in ids:
        assert store.claim("w") is not None and store.finish(i, "w", "failed", error="x")
    store.close()
    with client_factory(base_settings.model_copy(update={"style_max_finished_jobs": 2})) as c:
        assert [j["id"] for j in c.get("/style-transfer").json()["jobs"]] == ids[:0:-1]


def test_a_stored_job_with_non_finite_numbers_still_renders(base_settings: Settings, client_factory) -> None:
    # jobs accepted before NaN was refused have it in their parameters; their view must not be a 500
    import sqlite3

    with client_factory(base_settings) as c:
        job = c.post("/style-transfer", files=files(2), data=TINY).json()
        with sqlite3.connect(base_settings.data_dir / "style-jobs" / "jobs.db") as db:
            db.execute("UPDATE jobs SET params = ? WHERE id = ?",
                       ('{"steps": 3, "size": 32, "style_blend": [NaN, Infinity]}', job["id"]))
        r = c.get(job["links"]["self"])
        assert r.status_code == 200 and r.json()["parameters"]["style_blend"] == [None, None]
        assert c.get("/style-transfer").json()["jobs"][0]["parameters"]["style_blend"] == [None, None]


def test_a_result_removed_meanwhile_is_404(tmp_path: Path) -> None:
    from app.errors import NotFound
    from app.services.style import read_job_file

    (tmp_path / "result.png").write_bytes(b"png")
    assert read_job_file(tmp_path / "result.png") == b"png"
    with pytest.raises(NotFound, match="has been removed"):
        read_job_file(tmp_path / "preview.png")


def test_metrics_never_wait_on_a_slow_or_failing_job_store(base_settings: Settings, client_factory,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The style-job counts are read from the store off the event loop: a store that hangs delays nothing else
    and a scrape still answers (last values, a miss counted); a store that fails does not fail the scrape."""
    import sqlite3
    import threading

    from app.api import health

    monkeypatch.setattr(health, "STYLE_COUNTS_TIMEOUT_S", 0.5)
    release = threading.Event()
    calls: list[str] = []
    returned: list[bool] = []
    real_counts = JobStore.counts

    def slow_counts(self: JobStore) -> dict[str, int]:
        calls.append(threading.current_thread().name)
        release.wait(10)
        returned.append(True)
        return real_counts(self)

    monkeypatch.setattr(JobStore, "counts", slow_counts)
    with client_factory(base_settings) as c:
        r = c.post("/style-transfer", files=files(), data=TINY)  # one queued job (no worker)
        assert r.status_code == 202
        scrape: dict[str, object] = {}
        t = threading.Thread(target=lambda: scrape.update(r=c.get("/metrics")))
        t.start()
        while not calls:
            time.sleep(0.01)
        live = c.get("/health/live")  # served while the store read is still blocked
        assert live.status_code == 200 and not returned  # (on the event loop, live would wait for the read)
        t.join(10)
        first = scrape["r"]
        assert first.status_code == 200  # type: ignore[attr-defined]
        assert "cnn_style_counts_errors_total 1.0" in first.text  # type: ignore[attr-defined]
        assert "cnn_http_requests_total" in first.text  # type: ignore[attr-defined]
        assert calls[0] != threading.current_thread().name and len(calls) == 1
        # a second scrape while the read still hangs starts no second read
        assert "cnn_style_counts_errors_total 2.0" in c.get("/metrics").text and len(calls) == 1
        release.set()
        deadline = time.monotonic() + 10
        while 'cnn_style_jobs{state="queued"} 1.0' not in (text := c.get("/metrics").text):
            assert time.monotonic() < deadline, text
            time.sleep(0.05)
        assert "cnn_style_queue_length 1.0" in text

        def broken(self: JobStore) -> dict[str, int]:
            raise sqlite3.OperationalError("database is locked")

        monkeypatch.setattr(JobStore, "counts", broken)
        m = c.get("/metrics")
        assert m.status_code == 200 and "cnn_style_counts_errors_total 3.0" in m.text
        assert 'cnn_style_jobs{state="queued"} 1.0' in m.text  # the last values stay


def test_the_pinned_vgg19_weights_are_torchvisions() -> None:
    """The style service looks for VGG-19's weights by a pinned name and hash prefix (no torchvision import at
    start-up): they must be what torchvision itself publishes for its default VGG-19 weights."""
    from app.runtime.registry import spec_from_torchvision
    from app.services.style import VGG19_SOURCE, VGG19_WEIGHTS

    spec = spec_from_torchvision("vgg19")
    assert (VGG19_WEIGHTS.file_name, VGG19_WEIGHTS.hash_prefix) == (spec.weights.file_name, spec.weights.hash_prefix)
    assert spec.source == VGG19_SOURCE


def test_starting_the_service_does_not_import_torchvision(tmp_path: Path) -> None:
    """A process serving only the project's own models, with style on, never imports torchvision (its import costs
    seconds and memory: it pulls in torch._dynamo); checked in a fresh interpreter."""
    code = (
        "import sys, time\n"
        "from fastapi.testclient import TestClient\n"
        "from app.main import create_app\n"
        "from app.settings import Settings\n"
        "from tests.conftest import write_tiny_classifier\n"
        f"w = __import__('pathlib').Path({str(tmp_path)!r}) / 'weights'\n"
        "write_tiny_classifier(w)\n"
        f"s = Settings(weights_dir=w, torch_home=w.parent / 'th', data_dir=w.parent / 'data', device='cpu',\n"
        "             classifiers=['tiny-cifar'], text_models=[], face_models=[], style_workers=1)\n"
        "with TestClient(create_app(s)) as c:\n"
        "    for _ in range(600):\n"
        "        if c.get('/health/ready').status_code == 200: break\n"
        "        time.sleep(0.1)\n"
        "    assert c.get('/health/ready').json()['applications']['style']['status'] == 'ready'\n"
        "print('torchvision' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "False"
