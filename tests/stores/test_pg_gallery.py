"""The PostgreSQL face gallery as replicas: the change feed between instances and processes, catching up past the
pruned log, migrations, concurrent writers. The store contract itself runs in test_contract.py.

A real throwaway PostgreSQL server (tests/pgserver.py), never a mock. Deadlines are generous (events that must
happen, never speed assertions); a replica that must see a change through NOTIFY polls only every 60 s, so the
deadline can only be met by the notification."""

from __future__ import annotations

import multiprocessing as mp
import threading
import time
from collections.abc import Callable, Iterator
from functools import partial
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
import pytest

from app.stores.interfaces import ModelKey, NewFace
from app.stores.pg import DatabaseUnavailable, connect
from app.stores.pg_gallery import COMPONENT, MIGRATIONS, PgGalleryStore
from tests.stores.helpers import opened_stores

pytestmark = pytest.mark.postgres

DIM = 8
KEY = ModelKey("face-a", "a" * 64, DIM)
WAIT = 10.0  # far beyond the stated bound (milliseconds): a deadline for what must happen, not a speed check
NO_POLL = 60.0  # a replica with this poll interval can only meet WAIT through NOTIFY


def unit(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.normal(size=(n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def index_ids(store: PgGalleryStore) -> list[int]:
    """The vector ids in a replica's FAISS index, duplicates included."""
    import faiss

    return sorted(int(i) for i in faiss.vector_to_array(store.index.cpu.id_map))


def db_ids(url: str) -> list[int]:
    with connect(url) as conn:
        return [int(r["vid"]) for r in conn.execute(
            "SELECT vid FROM gallery_faces WHERE model = %s AND model_sha256 = %s ORDER BY vid",
            (KEY.name, KEY.sha256))]


def until(check: Callable[[], bool], timeout: float = WAIT) -> bool:
    """Whether check() became true before the deadline."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.005)
    return check()


def top_face(store: Any, vec: np.ndarray) -> str | None:
    hits = store.search(vec[None, :], 1)[0]
    return hits[0].face_id if hits else None


def _is_top(store: PgGalleryStore, vec: np.ndarray, face_id: str) -> bool:
    return top_face(store, vec) == face_id


def _is_gone(store: PgGalleryStore, vec: np.ndarray, face_id: str, left: int) -> bool:
    return top_face(store, vec) != face_id and store.index.ntotal == left


def _replica(url: str, pipe: Connection) -> None:
    """A replica in another process, driven by commands over the pipe."""
    store = PgGalleryStore(url, KEY, poll_seconds=NO_POLL)
    pipe.send("ready")
    try:
        while True:
            cmd, *args = pipe.recv()
            if cmd == "stop":
                break
            if cmd == "found":
                pipe.send(until(partial(_is_top, store, *args)))
            elif cmd == "gone":
                pipe.send(until(partial(_is_gone, store, *args)))
            elif cmd == "enroll":
                subjects, vecs = args
                pipe.send([store.enroll(s, [NewFace(v)])[0]["face_id"] for s, v in zip(subjects, vecs, strict=True)])
            elif cmd == "ids":
                store.sync()
                pipe.send(index_ids(store))
    finally:
        store.close()


class Remote:
    """The other process's replica."""

    def __init__(self, url: str) -> None:
        ctx = mp.get_context("spawn")
        self.pipe, child = ctx.Pipe()
        self.proc = ctx.Process(target=_replica, args=(url, child), daemon=True)
        self.proc.start()
        assert self.pipe.poll(120) and self.pipe.recv() == "ready"

    def ask(self, *cmd: Any) -> Any:
        self.pipe.send(cmd)
        assert self.pipe.poll(120), f"the replica process did not answer {cmd[0]}"
        return self.pipe.recv()

    def stop(self) -> None:
        if self.proc.is_alive():
            self.pipe.send(("stop",))
        self.proc.join(30)
        if self.proc.is_alive():
            self.proc.kill()


@pytest.fixture
def url(pg_url: str) -> str:
    return pg_url


@pytest.fixture
def stores(url: str) -> Iterator[Callable[..., PgGalleryStore]]:
    yield from opened_stores(lambda **kw: PgGalleryStore(url, KEY, **kw))


@pytest.fixture
def remote(url: str) -> Iterator[Remote]:
    r = Remote(url)
    yield r
    r.stop()


# ----------------------------------------------------------------------------------------------- (a) replicas

def test_enrol_on_one_replica_is_found_on_the_others_and_deletes_reach_them(
        stores: Callable[..., PgGalleryStore], remote: Remote) -> None:
    a, b = stores(), stores(poll_seconds=NO_POLL)
    rng = np.random.default_rng(0)
    v = unit(rng, 3)
    face = a.enroll("alice", [NewFace(v[0])])[0]["face_id"]
    assert top_face(a, v[0]) == face  # read-your-writes on the replica that acknowledged
    assert until(lambda: top_face(b, v[0]) == face), "B (same process, NOTIFY only) never found the face"
    assert remote.ask("found", v[0], face), "the replica in another process never found the face"
    # the other way round: enrolled in the other process, found here
    [bob] = remote.ask("enroll", ["bob"], v[1:2])
    assert until(lambda: top_face(a, v[1]) == bob) and until(lambda: top_face(b, v[1]) == bob)
    # deletes
    a.delete_face(face)
    assert top_face(a, v[0]) != face and a.index.ntotal == 1
    assert until(lambda: b.index.ntotal == 1) and top_face(b, v[0]) != face
    assert remote.ask("gone", v[0], face, 1)
    a.delete_subject("bob")
    assert until(lambda: b.index.ntotal == 0) and b.search(v, 1) == [[], [], []]
    assert remote.ask("gone", v[1], bob, 0)
    assert a.generation == b.generation


def test_a_replica_whose_listener_connection_drops_reconnects_and_catches_up(
        url: str, stores: Callable[..., PgGalleryStore]) -> None:
    a, b = stores(), stores(poll_seconds=NO_POLL)
    with connect(url, autocommit=True) as admin:
        assert until(lambda: admin.execute("SELECT 1 FROM pg_stat_activity WHERE query = %s",
                                           (f"LISTEN {b._wake}",)).fetchone() is not None)
        killed = admin.execute("SELECT pg_terminate_backend(pid) AS ok FROM pg_stat_activity WHERE query = %s",
                               (f"LISTEN {b._wake}",)).fetchall()
    assert killed and all(r["ok"] for r in killed)
    v = unit(np.random.default_rng(1), 1)
    face = a.enroll("alice", [NewFace(v[0])])[0]["face_id"]  # its NOTIFY may go to the dead connection
    assert until(lambda: top_face(b, v[0]) == face)


def test_a_poll_only_replica_converges_within_its_poll_interval(stores: Callable[..., PgGalleryStore]) -> None:
    a, b = stores(), stores(notify=False, poll_seconds=0.2)  # e.g. behind a transaction-pooling PgBouncer
    v = unit(np.random.default_rng(6), 2)
    face = a.enroll("alice", [NewFace(v[0])])[0]["face_id"]
    assert until(lambda: top_face(b, v[0]) == face)
    a.enroll("bob", [NewFace(v[1])])
    a.delete_face(face)
    assert until(lambda: b.generation == a.generation) and index_ids(b) == index_ids(a)


def test_searches_never_return_a_face_deleted_elsewhere_even_before_the_index_applies_it(
        stores: Callable[..., PgGalleryStore]) -> None:
    a, b = stores(), stores(listen=False)  # B applies changes only when told to
    v = unit(np.random.default_rng(2), 2)
    ra = a.enroll("alice", [NewFace(v[0])])[0]["face_id"]
    a.enroll("bob", [NewFace(v[1])])
    b.sync()
    a.delete_face(ra)
    assert b.index.ntotal == 2  # not applied yet ...
    assert [h.subject for h in b.search(v[:1], 5)[0]] == ["bob"]  # ... but the database has the last word
    b.sync()
    assert b.index.ntotal == 1 and index_ids(b) == db_ids(b.url)


# ----------------------------------------------------------------------------------------------- (b) catching up

def test_a_replica_behind_within_the_log_applies_changes_beyond_it_rebuilds(
        url: str, stores: Callable[..., PgGalleryStore]) -> None:
    a = stores(log_keep=5)
    b = stores(listen=False)
    rng = np.random.default_rng(3)
    first = a.enroll("alice", [NewFace(x) for x in unit(rng, 2)])
    a.enroll("bob", [NewFace(unit(rng, 1)[0])])
    a.delete_face(first[0]["face_id"])
    assert b.index.ntotal == 0 and b.rebuilds == 1  # the start-up build only
    assert b.sync() == a.generation == 3
    assert b.rebuilds == 1 and index_ids(b) == db_ids(url) == index_ids(a)  # incremental: within the log
    for i in range(8):  # past what the log keeps
        a.enroll(f"s{i}", [NewFace(unit(rng, 1)[0])])
    a.delete_subject("alice")
    a.delete_subject("s0")
    empty = a.enroll("empty", [NewFace(unit(rng, 1)[0])])[0]["face_id"]
    a.delete_face(empty)
    assert a.delete_subject("empty") == 0  # a log entry with no ids
    with connect(url) as conn:
        kept = [r["generation"] for r in conn.execute("SELECT generation FROM gallery_changes ORDER BY generation")]
    assert kept == list(range(a.generation - 4, a.generation + 1))  # pruned to the last log_keep entries
    assert b.sync() == a.generation
    assert b.rebuilds == 2 and index_ids(b) == db_ids(url) == index_ids(a)
    assert b.foreign_faces == 0 and b.stats()["indexed_faces"] == len(db_ids(url)) == 8
    q = unit(rng, 4)
    assert b.search(q, 3) == a.search(q, 3)


# ----------------------------------------------------------------------------------------------- (c) migrations

def test_migrations_run_once_and_a_newer_schema_is_refused(url: str, stores: Callable[..., PgGalleryStore]) -> None:
    opened: list[PgGalleryStore] = []
    errors: list[BaseException] = []

    def start() -> None:
        try:
            opened.append(stores())
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(3)]  # replicas starting together
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(opened) == 3
    opened[0].enroll("alice", [NewFace(unit(np.random.default_rng(4), 1)[0])])
    again = stores()  # a restart: nothing re-applied, nothing lost
    assert again.schema_version == len(MIGRATIONS) and again.index.ntotal == 1
    with connect(url) as conn:
        versions = [r["version"] for r in conn.execute(
            "SELECT version FROM schema_migrations WHERE component = %s ORDER BY version", (COMPONENT,))]
        assert versions == list(range(1, len(MIGRATIONS) + 1))
        conn.execute("INSERT INTO schema_migrations (component, version) VALUES (%s, %s)",
                     (COMPONENT, len(MIGRATIONS) + 1))
        conn.commit()
    with pytest.raises(DatabaseUnavailable, match="newer"):
        PgGalleryStore(url, KEY)


# ----------------------------------------------------------------------------------------------- (d) concurrency

def test_concurrent_enrolments_from_several_replicas_lose_nothing(
        url: str, stores: Callable[..., PgGalleryStore], remote: Remote) -> None:
    a, b = stores(), stores()
    rng = np.random.default_rng(5)
    n = 25
    vecs = {name: unit(rng, n) for name in ("a", "b", "c")}
    failures: list[BaseException] = []

    def enrol(store: PgGalleryStore, name: str) -> None:
        try:
            for i, v in enumerate(vecs[name]):
                store.enroll(f"{name}{i}", [NewFace(v)])
                if i % 5 == 0:
                    store.delete_subject(f"{name}{i}")
        except BaseException as exc:  # reported below
            failures.append(exc)

    threads = [threading.Thread(target=enrol, args=(a, "a")), threading.Thread(target=enrol, args=(b, "b"))]
    for t in threads:
        t.start()
    remote_faces = remote.ask("enroll", [f"c{i}" for i in range(n)], vecs["c"])
    for t in threads:
        t.join()
    assert not failures
    expected = db_ids(url)
    assert len(expected) == 3 * n - 2 * (n // 5) and len(remote_faces) == n
    a.sync()
    b.sync()
    assert index_ids(a) == expected and index_ids(b) == expected  # none missing, none twice
    assert remote.ask("ids") == expected
    assert a.generation == b.generation
    hits = b.search(vecs["a"][1:2], 1)[0]
    assert [h.subject for h in hits] == ["a1"]


def test_ivf_replicas_train_once_the_gallery_is_big_enough(stores: Callable[..., PgGalleryStore]) -> None:
    a, b = stores(index_kind="ivf", nlist=1), stores(index_kind="ivf", nlist=1)
    rng = np.random.default_rng(7)
    v = unit(rng, 40)
    a.enroll("few", [NewFace(x) for x in v[:5]])
    assert a.index.trained_kind == "flat"
    a.enroll("many", [NewFace(x) for x in v[5:]])  # 40 >= 39 * nlist: trained from the database
    assert a.index.trained_kind == "ivf" and a.index.ntotal == 40
    # stats() reads under the index lock: `index` alone may be caught between the IVF swap and its add
    assert until(lambda: b.generation == a.generation and b.stats()["index"] == "ivf")
    assert b.stats()["indexed_faces"] == 40
    assert [h.subject for h in b.search(v[:1], 2)[0]] == [h.subject for h in a.search(v[:1], 2)[0]]
