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


# ---------------------------------------------------------------------------------------------- owners


def test_owner_is_recorded_and_limits_reads_and_deletions(tmp_path: Path) -> None:
    store = JobStore(tmp_path)
    a = store.create("style", {"steps": 3}, {"content": b"c"}, max_queued=10, owner="alice").id
    b = store.create("style", {"steps": 3}, {"content": b"c"}, max_queued=10, owner="bob").id
    assert store.get(a).owner == "alice"  # type: ignore[union-attr]
    assert store.get(a, owner="alice") is not None and store.get(a, owner="bob") is None
    assert store.get(a) is not None  # no owner filter: everything (admins, keys off)
    page, total = store.list_jobs(owner="bob")
    assert total == 1 and [j.id for j in page] == [b]
    assert store.list_jobs()[1] == 2
    # bob can neither cancel nor delete alice's job
    assert store.cancel(a, owner="bob") is None and store.get(a).status == "queued"  # type: ignore[union-attr]
    assert store.cancel(a, owner="alice").status == "canceled"  # type: ignore[union-attr]
    assert not store.delete(a, owner="bob") and store.get(a) is not None
    assert store.delete(a, owner="alice") and store.get(a) is None and not store.job_dir(a).exists()


_OLD_SCHEMA = """
CREATE TABLE jobs (id TEXT PRIMARY KEY, kind TEXT NOT NULL, status TEXT NOT NULL, params TEXT NOT NULL,
    created_at REAL NOT NULL, started_at REAL, finished_at REAL, heartbeat_at REAL, worker TEXT,
    attempts INTEGER NOT NULL DEFAULT 0, cancel_requested INTEGER NOT NULL DEFAULT 0,
    progress REAL NOT NULL DEFAULT 0, step INTEGER NOT NULL DEFAULT 0, total_steps INTEGER NOT NULL DEFAULT 0,
    loss REAL, error TEXT, info TEXT NOT NULL DEFAULT '{}');
"""


def test_a_database_from_before_owners_and_sizes_is_migrated(tmp_path: Path) -> None:
    import sqlite3

    with sqlite3.connect(tmp_path / "jobs.db") as db:
        db.executescript(_OLD_SCHEMA)
        db.execute("INSERT INTO jobs (id, kind, status, params, created_at, finished_at) "
                   "VALUES ('a' , 'style', 'succeeded', '{}', 1, 2), ('b', 'style', 'queued', '{}', 3, NULL)")
    (tmp_path / "files" / "a").mkdir(parents=True)
    (tmp_path / "files" / "a" / "result.png").write_bytes(b"x" * 100)
    store = JobStore(tmp_path, max_finished_bytes=1000)
    old = store.get("a")
    assert old is not None and old.owner is None and old.size_bytes is None and old.status == "succeeded"
    assert store.get("a", owner="alice") is None  # an ownerless job is visible to admins only
    assert store.prune() == 0 and store.get("a").size_bytes == 100  # type: ignore[union-attr]  # measured once
    store.close()
    again = JobStore(tmp_path)  # reopening a migrated database changes nothing
    assert again.get("b").status == "queued" and again.list_jobs()[1] == 2  # type: ignore[union-attr]
    c = again.create("style", {}, {}, max_queued=10, owner="carol").id
    assert again.get(c).owner == "carol"  # type: ignore[union-attr]


# ---------------------------------------------------------------------------------------------- bounds


def _finish(store: JobStore, job_id: str, *, result: bytes = b"", status: str = "succeeded") -> None:
    job = store.claim("w")
    assert job is not None and job.id == job_id  # jobs are claimed oldest first
    if result:
        store.write_file(job_id, "result.png", result)
    assert store.finish(job_id, "w", status)


def test_finished_jobs_are_bounded_by_count_oldest_first(tmp_path: Path) -> None:
    store = JobStore(tmp_path, max_finished=2)
    ids = [new_job(store) for _ in range(4)]
    for i in ids[:3]:
        _finish(store, i)
    # three finished, bound two: the oldest went, records and files
    assert store.get(ids[0]) is None and not store.job_dir(ids[0]).exists()
    assert store.get(ids[1]) is not None and store.get(ids[2]) is not None
    running = store.claim("w")
    assert running is not None and running.id == ids[3]
    queued = [new_job(store) for _ in range(3)]
    assert store.cancel(queued[0]).status == "canceled"  # type: ignore[union-attr]  # a cancel finishes a job too
    assert store.get(ids[1]) is None and store.get(ids[2]) is not None
    assert store.prune() == 0  # queued and running jobs are never evicted, whatever the bounds
    assert store.get(ids[3]).status == "running"  # type: ignore[union-attr]
    assert all(store.get(q) is not None for q in queued)
    assert store.finished_usage()[0] == 2


def test_finished_jobs_are_bounded_by_bytes_oldest_first(tmp_path: Path) -> None:
    # every job has 2 bytes of inputs (new_job) plus its result
    store = JobStore(tmp_path, max_finished_bytes=250)
    a, b, c = new_job(store), new_job(store), new_job(store)
    _finish(store, a, result=b"a" * 98)  # 100 bytes
    _finish(store, b, result=b"b" * 98)  # 200 in all: within the bound
    assert store.get(a) is not None and store.finished_usage() == (2, 200)
    _finish(store, c, result=b"c" * 48)  # 250 in all: still within
    assert store.finished_usage() == (3, 250)
    d = new_job(store)
    _finish(store, d, result=b"d" * 8)  # 260: the oldest (a) goes, and only it
    assert store.get(a) is None and not store.job_dir(a).exists()
    assert [store.get(x) is not None for x in (b, c, d)] == [True, True, True]
    assert store.finished_usage() == (3, 160)
    # a job bigger than the whole budget cannot be kept: it goes at once, with everything older
    e = new_job(store)
    _finish(store, e, result=b"e" * 300, status="failed")
    assert store.finished_usage() == (0, 0) and not store.job_dir(e).exists()


def test_stale_jobs_that_fail_count_toward_the_bounds(tmp_path: Path) -> None:
    store = JobStore(tmp_path, max_attempts=1, stale_after=10, max_finished=1)
    a, b = new_job(store), new_job(store)
    _finish(store, a)
    store.claim("dead-worker")
    assert store.recover_stale(now=time.time() + 11) == [(b, "failed")]
    assert store.get(a) is None and store.get(b).status == "failed"  # type: ignore[union-attr]


def test_bounds_apply_to_an_existing_store_on_prune(tmp_path: Path) -> None:
    store = JobStore(tmp_path)  # unbounded
    ids = [new_job(store) for _ in range(3)]
    for i in ids:
        _finish(store, i)
    store.close()
    bounded = JobStore(tmp_path, max_finished=1)
    assert bounded.prune() == 2 and bounded.list_jobs()[1] == 1 and bounded.get(ids[2]) is not None


# ---------------------------------------------------------------------------------------------- refusals


def test_huge_offsets_are_an_empty_page_not_an_overflow(tmp_path: Path) -> None:
    store = JobStore(tmp_path)
    new_job(store)
    for offset in (1, 2**63 - 1, 2**63, 2**100):
        assert store.list_jobs(offset=offset) == ([], 1)
    assert store.list_jobs(limit=2**70)[1] == 1 and len(store.list_jobs(limit=2**70)[0]) == 1
    with pytest.raises(ValueError):
        store.list_jobs(offset=-1)


def test_a_refused_create_stores_nothing(tmp_path: Path) -> None:
    store = JobStore(tmp_path)
    with pytest.raises(ValueError):
        store.create("style", {"style_blend": [float("nan")]}, {"content": b"c"}, max_queued=10)
    with pytest.raises(QueueFull):
        store.create("style", {}, {"content": b"c"}, max_queued=0)
    assert store.list_jobs()[1] == 0 and list(store.files_root.iterdir()) == []


def test_a_create_that_fails_half_way_leaves_no_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = JobStore(tmp_path)
    real = store.write_file
    calls: list[str] = []

    def failing(job_id: str, name: str, data: bytes) -> Path:
        calls.append(name)
        if len(calls) == 2:
            raise OSError("disk full")
        return real(job_id, name, data)

    monkeypatch.setattr(store, "write_file", failing)
    with pytest.raises(OSError, match="disk full"):
        store.create("style", {}, {"content": b"c", "style_0": b"s"}, max_queued=10)
    assert calls == ["content", "style_0"] and list(store.files_root.iterdir()) == []
    assert store.list_jobs()[1] == 0
