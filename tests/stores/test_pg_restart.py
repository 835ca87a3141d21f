"""The PostgreSQL stores across a database restart (a crash, a failover, an upgrade): the connection pool checks a
connection that sat idle before lending it and drops every idle connection once one comes back broken, so after a
restart only the operations running at that moment fail; the ones after it get new connections. Each test starts its
own throwaway server (tests/pgserver.py) to restart it without disturbing the others."""

from __future__ import annotations

import time
from contextlib import ExitStack
from pathlib import Path

import pytest

from app.stores.pg import Pool
from app.stores.pg_jobs import PgJobStore

pytestmark = pytest.mark.postgres


def idle_connections(pool: Pool, n: int) -> None:
    """Make the pool hold n idle connections (lend n at once, then give them all back)."""
    with ExitStack() as stack:
        for _ in range(n):
            conn = stack.enter_context(pool.connection())
            assert conn.execute("SELECT 1 AS one").fetchone()["one"] == 1


def one(pool: Pool) -> int:
    with pool.connection() as conn:
        return int(conn.execute("SELECT 1 AS one").fetchone()["one"])


def test_idle_connections_are_checked_and_replaced_after_a_restart(own_pg_server: object) -> None:
    from tests.pgserver import PgServer

    assert isinstance(own_pg_server, PgServer)
    pool = Pool(own_pg_server.new_database(), 4, check_after=0.0)
    idle_connections(pool, 3)
    own_pg_server.restart()
    assert [one(pool) for _ in range(6)] == [1] * 6  # no operation fails
    assert pool.replaced == 3


def test_a_broken_connection_takes_the_other_idle_ones_with_it(own_pg_server: object) -> None:
    """Without the idle check (check_after far away), the first operation after the restart fails, since its
    connection died; the pool then drops the other dead idle connections, so that is the only failure."""
    import psycopg

    from tests.pgserver import PgServer

    assert isinstance(own_pg_server, PgServer)
    pool = Pool(own_pg_server.new_database(), 4, check_after=3600.0)
    idle_connections(pool, 3)
    own_pg_server.restart()
    with pytest.raises(psycopg.OperationalError), pool.connection() as conn:
        conn.execute("SELECT 1")
    assert pool.replaced == 2  # the two idle ones; the broken one was lent
    assert [one(pool) for _ in range(6)] == [1] * 6


def test_job_store_keeps_working_across_a_restart(own_pg_server: object, tmp_path: Path) -> None:
    from tests.pgserver import PgServer

    assert isinstance(own_pg_server, PgServer)
    store = PgJobStore(own_pg_server.new_database(), tmp_path / "files")
    try:
        before = store.create("style", {"steps": 3}, {"content": b"c"}, max_queued=10).id
        own_pg_server.restart()
        # this restart is instant; a real one (crash recovery, failover) takes longer than the pool's 1 s idle
        # check, which is what lets every later operation succeed (the test above covers an instant one)
        time.sleep(1.2)
        after = store.create("style", {"steps": 3}, {"content": b"c"}, max_queued=10).id
        got = store.get(before)
        assert got is not None and got.status == "queued"
        claimed = store.claim("w1")
        assert claimed is not None and claimed.id == before  # oldest first, across the restart
        assert store.get(after) is not None
    finally:
        store.close()


def test_gallery_replicas_keep_in_step_across_a_restart(own_pg_server: object) -> None:
    """Two gallery stores (two replicas) on one database; the database restarts; an enrolment on one after the
    restart is found by the other (its listener re-connected), and the faces from before are still found."""
    import numpy as np

    from app.stores.interfaces import ModelKey, NewFace
    from app.stores.pg_gallery import PgGalleryStore
    from tests.pgserver import PgServer

    assert isinstance(own_pg_server, PgServer)
    url = own_pg_server.new_database()
    key = ModelKey("face-a", "a" * 64, 8)
    vecs = np.eye(8, dtype=np.float32)
    a, b = PgGalleryStore(url, key), PgGalleryStore(url, key)
    try:
        a.enroll("before", [NewFace(vecs[0])])
        own_pg_server.restart()
        time.sleep(1.2)  # see the job store test above
        a.enroll("after", [NewFace(vecs[1])])
        deadline = time.monotonic() + 15
        while not (b.search(vecs[1:2], 1)[0] and b.search(vecs[1:2], 1)[0][0].subject == "after"):
            assert time.monotonic() < deadline, "the other replica never saw the enrolment made after the restart"
            time.sleep(0.05)
        assert b.search(vecs[0:1], 1)[0][0].subject == "before"
    finally:
        a.close()
        b.close()
