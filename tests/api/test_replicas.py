"""Two replica processes on one PostgreSQL database (CNN_DATABASE_URL), as a scale-out deployment runs them:
a face enrolled on one is identified on the other within the stated bound, a deletion on one is gone on the other,
kill -9 right after a 201 loses nothing, and a style job whose replica is killed mid-job is requeued and finished
by the other. Real server processes, a real throwaway PostgreSQL server (tests/pgserver.py)."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.api.test_faces import pattern
from tests.conftest import image_bytes, write_tiny_face_model
from tests.server import server

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

# a face acknowledged by one replica is searchable on the other within this (docs/bench/gallery-sync.md measures
# the propagation; this bound leaves room for a loaded 2-core test machine)
SYNC_BOUND_S = 5.0


@contextmanager
def replica(tmp_path: Path, name: str, url: str, **extra: str) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    env = {"CNN_DATABASE_URL": url, "CNN_CLASSIFIERS": "", "CNN_TEXT_MODELS": "", "CNN_FACE_MODELS": "tiny-face",
           "CNN_STYLE_ENABLED": "false", "CNN_DATA_DIR": str(tmp_path / "shared-data"), **extra}
    with server(tmp_path, env, probe="/faces/gallery") as running:
        yield running


def _identify(url: str, seed: int) -> dict[str, Any]:
    r = httpx.post(f"{url}/faces/identify", data={"detector": "none", "threshold": "3.9"},
                   files=[("image", ("p.png", pattern(seed), "image/png"))], timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["faces"][0]  # type: ignore[no-any-return]


def _within(bound: float, check: Any) -> float:
    """Seconds until check() is true (fails past the bound)."""
    t0 = time.monotonic()
    while not check():
        assert time.monotonic() - t0 < bound, f"not seen within {bound}s"
        time.sleep(0.05)
    return time.monotonic() - t0


def test_gallery_is_shared_between_replicas(tmp_path: Path, pg_url: str) -> None:
    write_tiny_face_model(tmp_path / "weights")
    with ExitStack() as stack:
        _, a = stack.enter_context(replica(tmp_path, "a", pg_url))
        pb, b = stack.enter_context(replica(tmp_path, "b", pg_url))
        r = httpx.post(f"{a}/faces/enroll", data={"subject": "alice", "detector": "none"},
                       files=[("image", ("a.png", pattern(1), "image/png"))], timeout=30)
        assert r.status_code == 201, r.text
        face_id = r.json()["faces"][0]["face_id"]
        seen = _within(SYNC_BOUND_S, lambda: _identify(b, 1)["subject"] == "alice")
        assert _identify(b, 1)["candidates"][0]["face_id"] == face_id
        assert httpx.get(f"{b}/faces/subjects/alice", timeout=10).json()["faces"][0]["face_id"] == face_id

        assert httpx.delete(f"{b}/faces/subjects/alice", timeout=10).status_code == 200
        gone = _within(SYNC_BOUND_S, lambda: _identify(a, 1)["candidates"] == [])
        assert httpx.get(f"{a}/faces/subjects/alice", timeout=10).status_code == 404
        print(f"propagation through the API: enrol {seen:.3f}s, delete {gone:.3f}s")

        # kill -9 of the replica right after its 201: nothing is lost, the other replica has it
        r = httpx.post(f"{b}/faces/enroll", data={"subject": "bob", "detector": "none"},
                       files=[("image", ("b.png", pattern(2), "image/png"))], timeout=30)
        assert r.status_code == 201, r.text
        pb.kill()
        _within(SYNC_BOUND_S, lambda: _identify(a, 2)["subject"] == "bob")
    with replica(tmp_path, "c", pg_url) as (_, c):  # a new replica builds its index from the database
        assert _identify(c, 2)["subject"] == "bob"
        assert httpx.get(f"{c}/faces/gallery", timeout=10).json()["indexed_faces"] == 1


def test_style_job_of_a_killed_replica_is_finished_by_the_other(tmp_path: Path, pg_url: str) -> None:
    """Both replicas run style workers on the shared job store; the one running a job is killed with SIGKILL; the
    other requeues it once its heartbeat is stale and finishes it; no job is run twice to completion."""
    (tmp_path / "weights").mkdir()
    style = {"CNN_STYLE_ENABLED": "true", "CNN_STYLE_WORKERS": "1", "CNN_STYLE_STALE_SECONDS": "3",
             "CNN_FACE_MODELS": "", "CNN_TORCH_HOME": str(tmp_path / "torch")}
    png = image_bytes(size=(48, 48))
    with ExitStack() as stack:
        pa, a = stack.enter_context(server(tmp_path, {"CNN_DATABASE_URL": pg_url, "CNN_CLASSIFIERS": "",
                                                      "CNN_TEXT_MODELS": "", "CNN_DATA_DIR": str(tmp_path / "d"),
                                                      **style}, probe="/health/ready"))
        job = httpx.post(f"{a}/style-transfer", data={"steps": "150", "size": "48"},
                         files=[("content", ("c.png", png)), ("style", ("s.png", png))], timeout=30)
        assert job.status_code == 202, job.text
        job_id = job.json()["id"]
        _within(60, lambda: httpx.get(f"{a}/style-transfer/{job_id}", timeout=10).json()["status"] == "running")
        pa.kill()  # mid-job: its heartbeat stops
        pa.wait(timeout=30)
        _, b = stack.enter_context(server(tmp_path, {"CNN_DATABASE_URL": pg_url, "CNN_CLASSIFIERS": "",
                                                     "CNN_TEXT_MODELS": "", "CNN_DATA_DIR": str(tmp_path / "d"),
                                                     **style}, probe="/health/ready"))
        _within(180, lambda: httpx.get(f"{b}/style-transfer/{job_id}", timeout=10).json()["status"] == "succeeded")
        body = httpx.get(f"{b}/style-transfer/{job_id}", timeout=10).json()
        assert body["attempts"] == 2, body
        assert httpx.get(f"{b}/style-transfer/{job_id}/result", timeout=10).status_code == 200
