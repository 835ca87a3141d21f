"""The durable job store: lifecycle, atomic claims across processes, crash recovery, expiry."""

from __future__ import annotations

import multiprocessing as mp
import time
from pathlib import Path

import pytest

from app.stores.jobs import JobStore, QueueFull


def new_job(store: JobStore, **kw: object) -> str:
    return store.create("style", {"steps": 3, **kw}, {"content.png": b"c", "style_0.png": b"s"}, max_queued=100).id


def test_create_writes_files_then_record(tmp_path: Path) -> None:
    store = JobStore(tmp_path)
    job_id = new_job(store)
    job = store.get(job_id)
    assert job is not None and job.status == "queued" and job.params == {"steps": 3}
    assert (store.job_dir(job_id) / "content.png").read_bytes() == b"c"
    assert store.queue_position(job) == 0 and store.counts()["queued"] == 1


def test_queue_limit(tmp_path: Path) -> None:
    store = JobStore(tmp_path)
    store.create("style", {}, {}, max_queued=1)
    with pytest.raises(QueueFull):
        store.create("style", {}, {}, max_queued=1)


def test_claim_heartbeat_finish(tmp_path: Path) -> None:
    store = JobStore(tmp_path)
    a, b = new_job(store), new_job(store)
    job = store.claim("w1")
    assert job is not None and job.id == a and job.status == "running" and job.attempts == 1
    assert store.queue_position(store.get(b)) == 0  # type: ignore[arg-type]
    assert store.heartbeat(a, "w1", step=1, total=4, loss=2.5, info={"x": 1})
    got = store.get(a)
    assert got is not None and got.progress == 0.25 and got.loss == 2.5 and got.info == {"x": 1}
    assert not store.heartbeat(a, "someone-else", step=2, total=4, loss=1.0)
    assert store.finish(a, "w1", "succeeded")
    done = store.get(a)
    assert done is not None and done.status == "succeeded" and done.progress == 1 and done.finished_at


def test_cancel_queued_at_once_and_running_cooperatively(tmp_path: Path) -> None:
    store = JobStore(tmp_path)
    a, b = new_job(store), new_job(store)
    store.claim("w1")  # a runs
    assert store.cancel(b).status == "canceled"  # type: ignore[union-attr]
    running = store.cancel(a)
    assert running is not None and running.status == "running" and running.cancel_requested
    assert store.heartbeat(a, "w1", step=1, total=3, loss=None) is False  # the worker learns it must stop
    assert store.finish(a, "w1", "canceled", error="canceled by request")
    assert store.claim("w1") is None  # the canceled queued job is never run


def test_delete_only_finished_and_removes_files(tmp_path: Path) -> None:
    store = JobStore(tmp_path)
    a = new_job(store)
    assert not store.delete(a)  # queued: use cancel
    store.claim("w")
    store.finish(a, "w", "succeeded")
    store.write_file(a, "result.png", b"r")
    assert store.delete(a) and store.get(a) is None and not store.job_dir(a).exists()


def test_stale_running_job_is_requeued_then_failed(tmp_path: Path) -> None:
    store = JobStore(tmp_path, max_attempts=2, stale_after=10)
    a = new_job(store)
    store.claim("dead-worker")
    assert store.recover_stale(now=time.time() + 5) == []  # heartbeat still fresh
    assert store.recover_stale(now=time.time() + 11) == [(a, "queued")]
    store.claim("dead-again")
    assert store.recover_stale(now=time.time() + 11) == [(a, "failed")]
    job = store.get(a)
    assert job is not None and job.status == "failed" and "dead-again" in (job.error or "")


def test_records_survive_reopening(tmp_path: Path) -> None:
    store = JobStore(tmp_path)
    a = new_job(store)
    store.claim("w")
    store.finish(a, "w", "succeeded")
    b = new_job(store)
    store.close()
    again = JobStore(tmp_path)
    assert again.get(a).status == "succeeded" and again.get(b).status == "queued"  # type: ignore[union-attr]


def test_expiry_removes_old_finished_jobs(tmp_path: Path) -> None:
    store = JobStore(tmp_path)
    a, b = new_job(store), new_job(store)
    store.claim("w")
    store.finish(a, "w", "failed", error="x")
    assert store.expire(3600, now=time.time() + 10) == 0
    assert store.expire(3600, now=time.time() + 7200) == 1
    assert store.get(a) is None and not store.job_dir(a).exists() and store.get(b) is not None


def test_list_is_paginated_newest_first(tmp_path: Path) -> None:
    store = JobStore(tmp_path)
    ids = [new_job(store) for _ in range(5)]
    page, total = store.list_jobs(limit=2, offset=0)
    assert total == 5 and [j.id for j in page] == ids[::-1][:2]
    page2, _ = store.list_jobs(limit=2, offset=2)
    assert [j.id for j in page2] == ids[::-1][2:4]
    assert store.list_jobs(status="running")[1] == 0


def _claim_all(root: str, worker: str, out: mp.Queue) -> None:  # type: ignore[type-arg]
    store = JobStore(Path(root))
    got = []
    while (job := store.claim(worker)) is not None:
        got.append(job.id)
        store.finish(job.id, worker, "succeeded")
    out.put(got)


def test_two_processes_never_claim_the_same_job(tmp_path: Path) -> None:
    store = JobStore(tmp_path)
    ids = {new_job(store) for _ in range(40)}
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_claim_all, args=(str(tmp_path), f"w{i}", out)) for i in range(2)]
    for p in procs:
        p.start()
    results = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    claimed = [j for r in results for j in r]
    assert sorted(claimed) == sorted(ids)  # every job exactly once
    assert store.counts()["succeeded"] == 40


def test_release_hands_a_job_back_without_using_an_attempt(tmp_path: Path) -> None:
    store = JobStore(tmp_path)
    a = new_job(store)
    store.claim("w")
    assert store.release(a, "w")
    job = store.get(a)
    assert job is not None and job.status == "queued" and job.attempts == 0
    assert store.claim("w2").id == a  # type: ignore[union-attr]
