"""The PostgreSQL job store beyond the shared contract (tests/stores/test_contract.py): versioned migrations, claims
by worker processes exactly once, a worker killed with SIGKILL mid-job, SKIP LOCKED under contention, and the
connection pool across threads. A real throwaway server (tests/pgserver.py), never a mock."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from app.settings import Settings
from app.stores import factory
from app.stores.interfaces import JobStoreProtocol
from app.stores.pg import DatabaseUnavailable, connect
from app.stores.pg_jobs import COMPONENT, MIGRATIONS, PgJobStore

pytestmark = pytest.mark.postgres

SPAWN = mp.get_context("spawn")  # each worker process opens its own store and connections, as a replica does


def new_job(store: PgJobStore, **params: Any) -> str:
    return store.create("style", {"steps": 3, **params}, {"content": b"c"}, max_queued=1000).id


def migrations(url: str) -> list[tuple[int, Any]]:
    with connect(url) as conn:
        rows = conn.execute("SELECT version, applied_at FROM schema_migrations WHERE component = %s "
                            "ORDER BY version", (COMPONENT,)).fetchall()
    return [(r["version"], r["applied_at"]) for r in rows]


# ----------------------------------------------------------------------------------------------- migrations

def test_a_second_store_applies_no_migration_again(pg_url: str, tmp_path: Path) -> None:
    first = PgJobStore(pg_url, tmp_path / "files")
    a = new_job(first)
    applied = migrations(pg_url)
    assert [v for v, _ in applied] == list(range(1, len(MIGRATIONS) + 1)) and first.schema_version == len(MIGRATIONS)
    second = PgJobStore(pg_url, tmp_path / "files")  # v1 is a plain CREATE TABLE: applying it twice would fail
    try:
        assert migrations(pg_url) == applied  # same versions, same application times
        assert second.get(a) is not None and second.counts()["queued"] == 1  # the table was not remade
    finally:
        first.close()
        second.close()


def test_stores_starting_together_migrate_once(pg_url: str, tmp_path: Path) -> None:
    stores: list[PgJobStore] = []
    errors: list[BaseException] = []

    def start() -> None:
        try:
            stores.append(PgJobStore(pg_url, tmp_path / "files"))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == [] and len(stores) == 4
    assert [v for v, _ in migrations(pg_url)] == list(range(1, len(MIGRATIONS) + 1))
    for s in stores:
        s.close()


def test_a_database_with_a_newer_schema_is_refused(pg_url: str, tmp_path: Path) -> None:
    PgJobStore(pg_url, tmp_path / "files").close()
    with connect(pg_url) as conn:
        conn.execute("INSERT INTO schema_migrations (component, version) VALUES (%s, %s)",
                     (COMPONENT, len(MIGRATIONS) + 1))
    with pytest.raises(DatabaseUnavailable, match="newer than this server"):
        PgJobStore(pg_url, tmp_path / "files")


def test_the_factory_opens_the_postgres_store_when_a_database_url_is_set(pg_url: str, tmp_path: Path) -> None:
    s = Settings(data_dir=tmp_path, database_url=pg_url, style_stale_seconds=33.0, style_max_finished_jobs=7,
                 style_max_finished_bytes=12345)
    store = factory.open_job_store(s)
    try:
        assert isinstance(store, PgJobStore) and isinstance(store, JobStoreProtocol)
        assert store.files_root == factory.job_store_dir(s) / "files"
        assert (store.stale_after, store.max_finished, store.max_finished_bytes) == (33.0, 7, 12345)
        assert "127.0.0.1" in store.location
        job = store.create("style", {}, {"content": b"c"}, max_queued=1)
        assert (tmp_path / "style-jobs" / "files" / job.id / "content").read_bytes() == b"c"
    finally:
        store.close()
    assert not (tmp_path / "style-jobs" / "jobs.db").exists()  # nothing went to SQLite


# ----------------------------------------------------------------------------------------------- worker processes

def _drain(url: str, files: str, name: str, go: Any, out: str) -> None:
    """A worker process: wait for the start signal, then claim and finish jobs until none is left."""
    store = PgJobStore(url, Path(files), pool_size=1)
    got: list[str] = []
    go.wait(60)
    while (job := store.claim(name)) is not None:
        got.append(job.id)
        store.write_file(job.id, "result.png", name.encode())
        time.sleep(0.002)  # a little work, so claims of the workers interleave
        assert store.finish(job.id, name, "succeeded")
    store.close()
    Path(out).write_text(json.dumps(got))


def test_worker_processes_claim_each_job_exactly_once(pg_url: str, tmp_path: Path) -> None:
    store = PgJobStore(pg_url, tmp_path / "files")
    ids = {new_job(store, n=i) for i in range(40)}
    go = SPAWN.Event()
    names = [f"w{i}" for i in range(4)]
    procs = [SPAWN.Process(target=_drain, args=(pg_url, str(tmp_path / "files"), n, go, str(tmp_path / f"{n}.json")))
             for n in names]
    for p in procs:
        p.start()
    time.sleep(0.5)  # let them connect, so the claims start together
    go.set()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    claimed = {n: json.loads((tmp_path / f"{n}.json").read_text()) for n in names}
    every = [i for got in claimed.values() for i in got]
    assert sorted(every) == sorted(ids)  # all claimed, none twice
    jobs, total = store.list_jobs(limit=100)
    assert total == 40 and all(j.status == "succeeded" and j.attempts == 1 for j in jobs)
    for n, got in claimed.items():
        for i in got:
            assert store.get(i).worker == n and (store.job_dir(i) / "result.png").read_bytes() == n.encode()  # type: ignore[union-attr]
    store.close()


def _claim_and_hang(url: str, files: str, name: str, claimed: Any) -> None:
    """A worker process that claims a job, heartbeats once, says so, then hangs until it is killed."""
    store = PgJobStore(url, Path(files))
    job = store.claim(name)
    assert job is not None
    store.heartbeat(job.id, name, step=1, total=3, loss=1.0)
    store.write_file(job.id, "preview.png", b"partial")
    claimed.set()
    time.sleep(600)


def _claim_and_finish(url: str, files: str, name: str, out: str) -> None:
    store = PgJobStore(url, Path(files))
    job = store.claim(name)
    if job is not None:
        store.write_file(job.id, "result.png", b"done")
        store.finish(job.id, name, "succeeded")
    store.close()
    Path(out).write_text(json.dumps({"id": job.id if job else None, "attempts": job.attempts if job else None}))


def test_a_job_whose_worker_is_killed_is_requeued_and_finished_by_another(pg_url: str, tmp_path: Path) -> None:
    stale_after = 1.0
    store = PgJobStore(pg_url, tmp_path / "files", stale_after=stale_after)
    a = new_job(store)
    claimed = SPAWN.Event()
    victim = SPAWN.Process(target=_claim_and_hang, args=(pg_url, str(tmp_path / "files"), "victim", claimed))
    victim.start()
    try:
        assert claimed.wait(60)
        assert victim.pid is not None
        os.kill(victim.pid, signal.SIGKILL)
    finally:
        victim.join(30)
    assert victim.exitcode == -signal.SIGKILL
    job = store.get(a)
    assert job is not None and job.status == "running" and job.worker == "victim" and job.step == 1
    assert job.heartbeat_at is not None
    assert store.recover_stale(now=job.heartbeat_at + stale_after / 2) == []  # not stale yet
    deadline = time.monotonic() + 60
    recovered: list[tuple[str, str]] = []
    while not recovered and time.monotonic() < deadline:  # the heartbeat stopped: stale after stale_after
        time.sleep(0.2)
        recovered = store.recover_stale()
    assert recovered == [(a, "queued")]
    out = tmp_path / "rescuer.json"
    rescuer = SPAWN.Process(target=_claim_and_finish, args=(pg_url, str(tmp_path / "files"), "rescuer", str(out)))
    rescuer.start()
    rescuer.join(120)
    assert rescuer.exitcode == 0 and json.loads(out.read_text()) == {"id": a, "attempts": 2}
    done = store.get(a)
    assert done is not None and done.status == "succeeded" and done.worker == "rescuer" and done.attempts == 2
    assert (store.job_dir(a) / "result.png").read_bytes() == b"done"
    store.close()


# ----------------------------------------------------------------------------------------------- SKIP LOCKED

def _in_thread(fn: Any, timeout: float = 10.0) -> Any:
    """fn() run in a thread; fails (instead of hanging the run) when it blocks."""
    out: list[Any] = []
    t = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), "the call blocked on a locked row"
    return out[0]


def test_a_claim_skips_a_row_another_transaction_holds(pg_url: str, tmp_path: Path) -> None:
    store = PgJobStore(pg_url, tmp_path / "files")
    a, b = new_job(store), new_job(store)
    with connect(pg_url) as other:  # another replica in the middle of claiming the oldest job
        other.execute("SELECT id FROM jobs WHERE id = %s FOR UPDATE", (a,))
        got = _in_thread(lambda: store.claim("w1"))
        assert got is not None and got.id == b  # skipped, not waited for
        assert _in_thread(lambda: store.claim("w2")) is None  # a is locked, b is running
        other.rollback()
    again = store.claim("w2")
    assert again is not None and again.id == a and again.attempts == 1
    store.close()


def test_a_claim_skips_a_row_another_claim_has_not_committed(pg_url: str, tmp_path: Path) -> None:
    """Another transaction claimed the oldest job but has not committed: a claim neither waits for it nor takes
    it, and after the commit nobody else gets it."""
    store = PgJobStore(pg_url, tmp_path / "files")
    a, b = new_job(store), new_job(store)
    with connect(pg_url) as other:
        other.execute("UPDATE jobs SET status = 'running', worker = 'other', attempts = attempts + 1 WHERE id = %s",
                      (a,))
        got = _in_thread(lambda: store.claim("w1"))
        assert got is not None and got.id == b
        other.commit()
    assert store.claim("w2") is None
    assert store.get(a).worker == "other" and store.get(a).attempts == 1  # type: ignore[union-attr]
    store.close()


def test_many_threads_claim_each_job_once_through_the_pool(pg_url: str, tmp_path: Path) -> None:
    """One store shared by 8 threads over a pool of 3 connections: every job claimed once, no error."""
    store = PgJobStore(pg_url, tmp_path / "files", pool_size=3)
    ids = {new_job(store, n=i) for i in range(60)}
    claimed: list[str] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def work(name: str) -> None:
        try:
            while (job := store.claim(name)) is not None:
                assert store.heartbeat(job.id, name, step=1, total=1, loss=None)
                assert store.finish(job.id, name, "succeeded")
                with lock:
                    claimed.append(job.id)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(f"t{i}",)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == [] and sorted(claimed) == sorted(ids)
    assert store.counts()["succeeded"] == 60
    with connect(pg_url) as conn:  # the pool never held more than its size
        n = conn.execute("SELECT COUNT(*) AS n FROM pg_stat_activity WHERE datname = current_database() "
                         "AND backend_type = 'client backend' AND pid <> pg_backend_pid()").fetchone()["n"]
    assert n <= 3
    store.close()
    with connect(pg_url) as conn:
        n = conn.execute("SELECT COUNT(*) AS n FROM pg_stat_activity WHERE datname = current_database() "
                         "AND backend_type = 'client backend' AND pid <> pg_backend_pid()").fetchone()["n"]
    assert n == 0  # close() released them


def test_recovery_by_two_replicas_at_once_changes_each_job_once(pg_url: str, tmp_path: Path) -> None:
    """recover_stale skips rows another replica is recovering (SKIP LOCKED), so a stale job is requeued once."""
    store = PgJobStore(pg_url, tmp_path / "files", stale_after=60.0)
    a, b = new_job(store), new_job(store)
    store.claim("dead")
    store.claim("dead")
    later = time.time() + 600
    with connect(pg_url) as other:  # another replica recovering job a, not committed yet
        other.execute("SELECT id FROM jobs WHERE id = %s FOR UPDATE", (a,))
        assert _in_thread(lambda: store.recover_stale(now=later)) == [(b, "queued")]
        other.execute("UPDATE jobs SET status = 'queued', worker = NULL, heartbeat_at = NULL WHERE id = %s", (a,))
        other.commit()
    assert store.recover_stale(now=later) == []
    assert store.counts()["queued"] == 2
    store.close()
