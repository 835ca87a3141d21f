"""A style job whose worker process is killed with SIGKILL mid-job is not stuck: it is requeued and finishes.

Real `python -m app.cli worker` processes share a job store under tmp_path (CPU, one torch thread, the
offline random VGG-19: the weights dir and the hub cache are empty). The same-host rule (a job left
running by a dead pid of this host is requeued when the next worker starts) and the stale rule (a job of
another host is requeued once its heartbeat is older than CNN_STYLE_STALE_SECONDS) are each shown alone.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from PIL import Image

from app.services.style import RESULT_FILE, StyleJobs, StyleLimits
from app.stores.jobs import Job, JobStore
from tests.conftest import ROOT, image_bytes
from tests.server import server

# 48 px L-BFGS steps take ~45 ms on one CPU thread: 120 steps (~5 s) leave a wide margin between the first
# heartbeat and the kill, and keep the rerun short
STEPS = 120
SIZE = 48
# a worker that believes it runs on another host: a real process, claimed job and heartbeats, whose
# worker id names a host the recovering process is not on, so only the stale rule can requeue its job
OTHER_HOST_WORKER = ("import socket, sys; socket.gethostname = lambda: 'another-host'; "
                     "from app.cli import main; sys.exit(main(['worker']))")


def worker_env(tmp_path: Path, stale_seconds: float) -> dict[str, str]:
    """CNN_* settings of a worker on the store under tmp_path (empty weights dir and hub cache)."""
    (tmp_path / "weights").mkdir(exist_ok=True)
    return {"CNN_DATA_DIR": str(tmp_path / "data"), "CNN_WEIGHTS_DIR": str(tmp_path / "weights"),
            "CNN_TORCH_HOME": str(tmp_path / "torch"), "CNN_DEVICE": "cpu", "CNN_TORCH_THREADS": "1",
            "CNN_STYLE_STALE_SECONDS": str(stale_seconds)}


@contextmanager
def worker(tmp_path: Path, name: str, env: dict[str, str], *,
           other_host: bool = False) -> Iterator[subprocess.Popen[bytes]]:
    """A running worker process (SIGKILLed afterwards if still alive); its log is tmp_path/worker-NAME.log."""
    cmd = [sys.executable, "-c", OTHER_HOST_WORKER] if other_host else [sys.executable, "-m", "app.cli", "worker"]
    log_path = tmp_path / f"worker-{name}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT)
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=30)


def wait_job(store: JobStore, job_id: str, ok: Callable[[Job], bool], proc: subprocess.Popen[bytes] | None,
             log: Path | None, timeout: float = 90.0) -> Job:
    """Poll the store until `ok(job)`; fail early (with the log) if `proc` exits."""
    deadline = time.monotonic() + timeout
    while True:
        job = store.get(job_id)
        assert job is not None
        if ok(job):
            return job
        if proc is not None and proc.poll() is not None:
            tail = log.read_text()[-3000:] if log is not None else ""
            raise AssertionError(f"the process exited ({proc.returncode}) with the job {job.status}: {tail}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} is {job.status} at step {job.step} (attempts {job.attempts})")
        time.sleep(0.05)


def submit(data_dir: Path) -> tuple[JobStore, Job]:
    """The job store of the workers and one job submitted through the service."""
    store = JobStore(data_dir / "style-jobs")
    jobs = StyleJobs(store, StyleLimits(max_size=256, max_steps=1000, max_styles=4, max_queue=8,
                                        max_image_bytes=10**6, max_image_pixels=10**6))
    job = jobs.submit(("photo.png", image_bytes((120, 160, 200), (64, 48))),
                      [("paint.png", image_bytes((200, 60, 30), (40, 40)))], {"steps": STEPS, "size": SIZE})
    assert job.status == "queued" and job.attempts == 0
    return store, job


def run_until_killed(tmp_path: Path, store: JobStore, job: Job, env: dict[str, str], *,
                     other_host: bool = False) -> Job:
    """Start a worker, wait until it is running the job past step 0, SIGKILL it; the job as it was left."""
    with worker(tmp_path, "a", env, other_host=other_host) as a:
        running = wait_job(store, job.id, lambda j: j.status == "running" and j.step > 0, a,
                           tmp_path / "worker-a.log")
        a.send_signal(signal.SIGKILL)  # no shutdown hook: the job cannot be handed back
        assert a.wait(timeout=30) == -signal.SIGKILL
    left = store.get(job.id)
    assert left is not None and left.status == "running" and left.worker == running.worker, left
    assert 0 < left.step < STEPS and left.attempts == 1  # killed mid-job, after its first heartbeat
    assert f":{a.pid}:" in (left.worker or "")
    return left


@pytest.mark.slow
def test_worker_killed_mid_job_is_requeued_at_once_by_the_next_worker_on_its_host(tmp_path: Path) -> None:
    # stale seconds of an hour: only the same-host rule (dead pid of this host) can requeue the job in time
    env = worker_env(tmp_path, stale_seconds=3600)
    store, job = submit(tmp_path / "data")
    left = run_until_killed(tmp_path, store, job, env)
    with worker(tmp_path, "b", env) as b:
        log = tmp_path / "worker-b.log"
        # requeued at start-up (attempts stay 1 while queued), then claimed again: by b, as its second attempt
        rerun = wait_job(store, job.id, lambda j: j.worker not in (None, left.worker), b, log, timeout=60)
        assert rerun.attempts == 2 and rerun.status in ("running", "succeeded"), rerun
        assert f":{b.pid}:" in (rerun.worker or "")
        done = wait_job(store, job.id, lambda j: j.finished, b, log)
    assert done.status == "succeeded" and done.error is None, done
    assert done.step == STEPS and done.progress == 1 and done.attempts == 2
    result = Image.open(store.job_dir(job.id) / RESULT_FILE)
    assert result.format == "PNG" and result.size == (SIZE, 36)
    store.close()


@pytest.mark.slow
def test_job_of_a_worker_killed_on_another_host_is_requeued_once_stale(tmp_path: Path) -> None:
    stale = 2.0
    env = worker_env(tmp_path, stale_seconds=stale)
    store, job = submit(tmp_path / "data")
    left = run_until_killed(tmp_path, store, job, env, other_host=True)
    assert (left.worker or "").startswith("another-host:")
    # nobody is running it: it stays "running" until a process sees its heartbeat is stale
    assert left.heartbeat_at is not None
    while time.time() - left.heartbeat_at <= stale + 0.5:
        time.sleep(0.1)
    still = store.get(job.id)
    assert still is not None and still.status == "running" and still.worker == left.worker
    # the API with one in-process worker recovers it at start-up (the pid rule does not apply: another host)
    server_env = {k: v for k, v in env.items() if k not in ("CNN_DATA_DIR", "CNN_WEIGHTS_DIR")}
    server_env |= {"CNN_CLASSIFIERS": "", "CNN_TEXT_MODELS": "", "CNN_FACE_MODELS": "", "CNN_STYLE_WORKERS": "1"}
    with server(tmp_path, server_env) as (proc, url):
        done = wait_job(store, job.id, lambda j: j.finished, proc, None)
        view = httpx.get(f"{url}/style-transfer/{job.id}", timeout=10).json()
        png = httpx.get(f"{url}/style-transfer/{job.id}/result", timeout=10)
    assert done.status == "succeeded" and done.error is None, done
    assert view["status"] == "succeeded" and view["attempts"] == 2 and view["step"] == STEPS
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(png.content)).size == (SIZE, 36)
    store.close()
