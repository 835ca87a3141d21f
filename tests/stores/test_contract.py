"""The store contract: what the services need from a job store and a face gallery, checked against every
implementation (`job_impl` / `gallery_impl`; a new backend adds one entry to JOB_STORES / GALLERIES).

The tests use only the protocols of app.stores.interfaces; implementation-specific behaviour (SQLite migrations,
FAISS snapshots, lock order, ...) is tested in test_jobs.py and test_gallery.py."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from app.services.style import StyleJobs, StyleLimits
from app.stores.gallery import GalleryStore, models_in_gallery
from app.stores.interfaces import (
    FINISHED,
    STATES,
    GalleryProtocol,
    InvalidSubject,
    JobStoreProtocol,
    ModelKey,
    ModelMismatch,
    NewFace,
    QueueFull,
    UnknownFace,
    UnknownSubject,
)
from app.stores.jobs import JobStore
from app.stores.pg_gallery import PgGalleryStore, pg_models_in_gallery
from app.stores.pg_jobs import PgJobStore
from tests.stores.helpers import opened_stores

# an opener: (directory it may use, a function giving one fresh database URL per test, store options) -> a fresh
# store; called again on the same directory (and URL) it reopens. The URL function starts the throwaway PostgreSQL
# server on first use (tests/pgserver.py) and skips the test, saying why, where none can start.
JobOpener = Callable[..., JobStoreProtocol]
GalleryOpener = Callable[..., GalleryProtocol]
Url = Callable[[], str]

JOB_STORES: dict[str, Callable[[Path, Url], JobOpener]] = {
    "sqlite": lambda d, url: lambda **kw: JobStore(d / "jobs", **kw),
    "postgres": lambda d, url: lambda **kw: PgJobStore(url(), d / "files", **kw),
}
GALLERIES: dict[str, Callable[[Path, Url], GalleryOpener]] = {
    "sqlite-faiss": lambda d, url: lambda key, **kw: GalleryStore(d / "gallery", key, **kw),
    "postgres": lambda d, url: lambda key, **kw: PgGalleryStore(url(), key, **kw),
}


def _database(request: pytest.FixtureRequest) -> Url:
    """One database per test, created on first use."""
    made: list[str] = []

    def url() -> str:
        if not made:
            made.append(request.getfixturevalue("pg_url"))
        return made[0]

    return url

DIM = 8
KEY = ModelKey("face-a", "a" * 64, DIM)
OTHER_KEY = ModelKey("face-b", "b" * 64, DIM)


@pytest.fixture(params=sorted(JOB_STORES))
def job_impl(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[JobOpener]:
    url = _database(request)
    yield from opened_stores(lambda **kw: JOB_STORES[request.param](tmp_path, url)(**kw))


@pytest.fixture
def jobs(job_impl: JobOpener) -> JobStoreProtocol:
    return job_impl()


@pytest.fixture(params=sorted(GALLERIES))
def gallery_impl(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[GalleryOpener]:
    url = _database(request)

    def make(key: ModelKey = KEY, **kw: Any) -> GalleryProtocol:
        return GALLERIES[request.param](tmp_path, url)(key, **kw)

    # closing twice is harmless: tests may close a store to reopen it
    yield from opened_stores(make, lambda s: s.close(snapshot=False))


@pytest.fixture
def gallery(gallery_impl: GalleryOpener) -> GalleryProtocol:
    return gallery_impl()


def new_job(store: JobStoreProtocol, kind: str = "style", owner: str | None = None, **params: Any) -> str:
    return store.create(kind, {"steps": 3, **params}, {"content": b"c", "style_0": b"s"}, max_queued=100,
                        info={"styles": 1}, owner=owner).id


def unit(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.normal(size=(n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


# ----------------------------------------------------------------------------------------------- job store

def test_job_store_satisfies_the_protocol(jobs: JobStoreProtocol) -> None:
    assert isinstance(jobs, JobStoreProtocol)
    assert isinstance(jobs.location, str) and jobs.location
    assert jobs.counts() == dict.fromkeys(STATES, 0)


def test_create_stores_files_record_and_queue_order(jobs: JobStoreProtocol) -> None:
    a = new_job(jobs, owner="alice", size=64)
    b = new_job(jobs)
    job = jobs.get(a)
    assert job is not None and job.status == "queued" and job.kind == "style" and not job.finished
    assert job.params == {"steps": 3, "size": 64} and job.info == {"styles": 1} and job.owner == "alice"
    assert (jobs.job_dir(a) / "content").read_bytes() == b"c" and (jobs.job_dir(a) / "style_0").read_bytes() == b"s"
    assert jobs.queue_position(job) == 0 and jobs.queue_position(jobs.get(b)) == 1  # type: ignore[arg-type]
    assert jobs.counts()["queued"] == 2
    assert jobs.get("0" * 32) is None


def test_list_jobs_newest_first_with_filters(jobs: JobStoreProtocol) -> None:
    ids = [new_job(jobs, owner="alice" if i % 2 else "bob") for i in range(5)]
    page, total = jobs.list_jobs(limit=2, offset=0)
    assert total == 5 and [j.id for j in page] == ids[::-1][:2]
    page, total = jobs.list_jobs(limit=10, offset=4)
    assert total == 5 and [j.id for j in page] == [ids[0]]
    assert jobs.list_jobs(limit=10, offset=5) == ([], 5)
    mine, total = jobs.list_jobs(limit=10, owner="alice")
    assert total == 2 and {j.id for j in mine} == {ids[1], ids[3]}
    jobs.claim("w")
    running, total = jobs.list_jobs(limit=10, status="running")
    assert total == 1 and [j.id for j in running] == [ids[0]]
    with pytest.raises(ValueError):
        jobs.list_jobs(limit=-1)


def test_a_full_queue_refuses_and_stores_nothing(jobs: JobStoreProtocol) -> None:
    jobs.create("style", {}, {"content": b"c"}, max_queued=1)
    with pytest.raises(QueueFull) as exc:
        jobs.create("style", {}, {"content": b"c"}, max_queued=1)
    assert exc.value.queued == 1 and exc.value.limit == 1
    assert jobs.counts()["queued"] == 1 and jobs.list_jobs(limit=10)[1] == 1


def test_claim_heartbeat_finish(jobs: JobStoreProtocol) -> None:
    other = new_job(jobs, kind="other")
    a, b = new_job(jobs), new_job(jobs)
    job = jobs.claim("w1", ("style",))
    assert job is not None and job.id == a and job.status == "running" and job.worker == "w1" and job.attempts == 1
    second = jobs.claim("w2", ("style",))
    assert second is not None and second.id == b  # one job, one worker
    assert jobs.claim("w3", ("style",)) is None  # the other kind is not taken
    assert jobs.get(other).status == "queued"  # type: ignore[union-attr]
    assert jobs.heartbeat(a, "w1", step=1, total=4, loss=2.5, info={"device": "cpu"})
    got = jobs.get(a)
    assert got is not None and got.progress == 0.25 and got.step == 1 and got.loss == 2.5
    assert got.info == {"styles": 1, "device": "cpu"}  # merged into what the job had
    assert jobs.still_wanted(a, "w1") and not jobs.still_wanted(a, "w2")
    assert not jobs.heartbeat(a, "w2", step=2, total=4, loss=1.0)
    assert not jobs.finish(a, "w2", "succeeded")
    with pytest.raises(ValueError):
        jobs.finish(a, "w1", "running")
    jobs.write_file(a, "result.png", b"png")
    assert (jobs.job_dir(a) / "result.png").read_bytes() == b"png"
    assert jobs.mean_duration("style") is None
    assert jobs.finish(a, "w1", "succeeded", info={"done": True})
    done = jobs.get(a)
    assert done is not None and done.status == "succeeded" and done.finished and done.progress == 1
    assert done.finished_at is not None and done.info["done"] is True
    assert jobs.mean_duration("style") is not None and jobs.mean_duration("other") is None
    assert jobs.finish(b, "w2", "failed", error="boom")
    assert jobs.get(b).error == "boom"  # type: ignore[union-attr]
    assert jobs.counts() == {"queued": 1, "running": 0, "succeeded": 1, "failed": 1, "canceled": 0}


def test_cancel_queued_at_once_and_running_cooperatively(jobs: JobStoreProtocol) -> None:
    a, b = new_job(jobs), new_job(jobs)
    jobs.claim("w")
    canceled = jobs.cancel(b)
    assert canceled is not None and canceled.status == "canceled" and canceled.status in FINISHED
    running = jobs.cancel(a)
    assert running is not None and running.status == "running" and running.cancel_requested
    assert not jobs.still_wanted(a, "w") and not jobs.heartbeat(a, "w", step=1, total=3, loss=None)
    assert not jobs.release(a, "w")  # a job asked to stop is not handed back to the queue
    assert jobs.finish(a, "w", "canceled", error="canceled by request")
    assert jobs.claim("w") is None
    assert jobs.cancel("0" * 32) is None


def test_delete_only_finished_jobs_with_their_files(jobs: JobStoreProtocol) -> None:
    a = new_job(jobs)
    assert not jobs.delete(a) and jobs.get(a) is not None  # queued: not deletable
    jobs.cancel(a)
    assert jobs.delete(a)
    assert jobs.get(a) is None and not jobs.job_dir(a).exists()
    assert not jobs.delete(a)


def test_owner_limits_reads_cancels_and_deletes(jobs: JobStoreProtocol) -> None:
    a = new_job(jobs, owner="alice")
    assert jobs.get(a, owner="bob") is None and jobs.get(a, owner="alice") is not None
    assert jobs.cancel(a, owner="bob") is None and jobs.get(a).status == "queued"  # type: ignore[union-attr]
    assert jobs.cancel(a, owner="alice").status == "canceled"  # type: ignore[union-attr]
    assert not jobs.delete(a, owner="bob") and jobs.delete(a, owner="alice")


def test_release_hands_a_job_back_without_using_an_attempt(jobs: JobStoreProtocol) -> None:
    a = new_job(jobs)
    jobs.claim("w1")
    assert not jobs.release(a, "w2") and jobs.release(a, "w1")
    job = jobs.get(a)
    assert job is not None and job.status == "queued" and job.attempts == 0 and job.worker is None
    again = jobs.claim("w2")
    assert again is not None and again.id == a and again.attempts == 1


def test_stale_jobs_are_requeued_then_failed(job_impl: JobOpener) -> None:
    jobs = job_impl(stale_after=60.0, max_attempts=2)
    a = new_job(jobs)
    jobs.claim("w1")
    assert jobs.recover_stale() == []  # a fresh heartbeat
    later = time.time() + 600
    assert jobs.recover_stale(now=later) == [(a, "queued")]
    jobs.claim("w2")
    assert jobs.recover_stale(now=later + 600) == [(a, "failed")]
    failed = jobs.get(a)
    assert failed is not None and failed.status == "failed" and failed.error


def test_requeue_worker_and_a_cancel_request_wins_over_a_requeue(jobs: JobStoreProtocol) -> None:
    a, b = new_job(jobs), new_job(jobs)
    jobs.claim("dead")
    jobs.claim("dead")
    jobs.cancel(b)  # b's worker was asked to stop, then died
    assert jobs.requeue_worker("dead") == 2
    assert jobs.get(a).status == "queued" and jobs.get(b).status == "canceled"  # type: ignore[union-attr]
    assert jobs.requeue_worker("nobody") == 0


def test_expire_deletes_old_finished_jobs_only(jobs: JobStoreProtocol) -> None:
    old, queued = new_job(jobs), new_job(jobs)
    jobs.cancel(old)
    assert jobs.expire(3600) == 0  # finished just now
    assert jobs.expire(3600, now=time.time() + 7200) == 1
    assert jobs.get(old) is None and not jobs.job_dir(old).exists() and jobs.get(queued) is not None


def test_prune_keeps_the_newest_finished_jobs_within_the_bounds(job_impl: JobOpener) -> None:
    jobs = job_impl(max_finished=2)
    ids = [new_job(jobs) for _ in range(4)]
    for i in ids[:3]:
        claimed = jobs.claim("w")
        assert claimed is not None and claimed.id == i
        assert jobs.finish(i, "w", "succeeded")  # finishing applies the bounds
    assert jobs.get(ids[0]) is None and not jobs.job_dir(ids[0]).exists()
    assert jobs.get(ids[1]) is not None and jobs.get(ids[2]) is not None and jobs.get(ids[3]) is not None
    assert jobs.prune() == 0  # queued jobs never count


def test_jobs_survive_closing_and_reopening(job_impl: JobOpener) -> None:
    first = job_impl()
    a = new_job(first)
    first.claim("w")
    first.finish(a, "w", "succeeded")
    first.close()
    again = job_impl()
    job = again.get(a)
    assert job is not None and job.status == "succeeded" and (again.job_dir(a) / "content").read_bytes() == b"c"


def test_the_style_service_reads_counts_through_the_protocol(jobs: JobStoreProtocol) -> None:
    service = StyleJobs(jobs, StyleLimits(max_size=64, max_steps=10, max_styles=2, max_queue=5,
                                          max_image_bytes=10**6, max_image_pixels=10**6))
    new_job(jobs)
    assert service.counts() == {**dict.fromkeys(STATES, 0), "queued": 1} == jobs.counts()


# ----------------------------------------------------------------------------------------------- face gallery

def test_gallery_satisfies_the_protocol(gallery: GalleryProtocol) -> None:
    assert isinstance(gallery, GalleryProtocol)
    assert gallery.model == KEY and gallery.foreign_faces == 0 and gallery.index.ntotal == 0
    assert gallery.search(np.ones((2, DIM), dtype=np.float32), 3) == [[], []]
    stats = gallery.stats()
    assert stats["subjects"] == 0 and stats["faces"] == 0 and stats["model"] == KEY.name


def test_enroll_then_search_returns_the_best_face_per_subject(gallery: GalleryProtocol) -> None:
    rng = np.random.default_rng(0)
    a, b = unit(rng, 2), unit(rng, 1)
    records = gallery.enroll("alice", [NewFace(a[0], box={"x": 1, "y": 2, "w": 3, "h": 4}, image="a.jpg"),
                                       NewFace(a[1])])
    assert [r["subject"] for r in records] == ["alice", "alice"] and records[0]["box"] == {"x": 1, "y": 2, "w": 3,
                                                                                           "h": 4}
    assert len({r["face_id"] for r in records}) == 2
    gallery.enroll("bob", [NewFace(b[0])])
    assert gallery.index.ntotal == 3
    hits = gallery.search(a[:1], 5)[0]
    assert [h.subject for h in hits] == ["alice", "bob"]  # one hit per subject, nearest first
    assert hits[0].face_id == records[0]["face_id"] and hits[0].distance == pytest.approx(0.0, abs=1e-5)
    assert hits[0].similarity == pytest.approx(1.0, abs=1e-5)
    assert hits[1].distance == pytest.approx(float(((a[0] - b[0]) ** 2).sum()), abs=1e-4)
    assert [h.subject for h in gallery.search(a[:1], 1)[0]] == ["alice"]
    with pytest.raises(ValueError):
        gallery.search(np.ones((1, DIM + 1), dtype=np.float32), 1)


def test_enroll_is_all_or_nothing_and_validated(gallery: GalleryProtocol) -> None:
    rng = np.random.default_rng(1)
    with pytest.raises(ValueError):
        gallery.enroll("alice", [NewFace(unit(rng, 1)[0]), NewFace(np.ones(DIM + 1, dtype=np.float32))])
    with pytest.raises(ValueError):
        gallery.enroll("alice", [])
    for bad in ["", "../x", "a b", "a" * 129]:
        with pytest.raises(InvalidSubject):
            gallery.enroll(bad, [NewFace(unit(rng, 1)[0])])
        with pytest.raises(InvalidSubject):
            gallery.get_subject(bad)
    assert gallery.index.ntotal == 0 and gallery.list_subjects(10, 0) == ([], 0)


def test_subjects_embeddings_and_pages(gallery: GalleryProtocol) -> None:
    rng = np.random.default_rng(2)
    vecs = unit(rng, 2)
    records = gallery.enroll("carol", [NewFace(v) for v in vecs])
    gallery.enroll("alice", [NewFace(unit(rng, 1)[0])])
    face_ids, embs = gallery.subject_embeddings("carol")
    assert face_ids == [r["face_id"] for r in records] and np.allclose(embs, vecs, atol=1e-6)
    subject = gallery.get_subject("carol")
    assert subject["subject"] == "carol" and subject["face_count"] == 2
    assert [f["face_id"] for f in subject["faces"]] == face_ids
    rows, total = gallery.list_subjects(1, 0)
    assert total == 2 and [r["subject"] for r in rows] == ["alice"]  # sorted by id
    rows, _ = gallery.list_subjects(5, 1)
    assert [(r["subject"], r["face_count"]) for r in rows] == [("carol", 2)]
    with pytest.raises(UnknownSubject):
        gallery.subject_embeddings("nobody")
    with pytest.raises(UnknownSubject):
        gallery.get_subject("nobody")


def test_deleting_faces_and_subjects_removes_them_from_search(gallery: GalleryProtocol) -> None:
    rng = np.random.default_rng(3)
    a, b = unit(rng, 2), unit(rng, 1)
    ra = gallery.enroll("alice", [NewFace(v) for v in a])
    gallery.enroll("bob", [NewFace(b[0])])
    assert gallery.delete_face(ra[0]["face_id"]) == {"face_id": ra[0]["face_id"], "subject": "alice"}
    assert gallery.index.ntotal == 2
    best = {h.subject: h.face_id for h in gallery.search(a[:1], 5)[0]}
    assert best == {"alice": ra[1]["face_id"], "bob": best["bob"]}  # alice's other face now
    with pytest.raises(UnknownFace):
        gallery.delete_face(ra[0]["face_id"])
    assert gallery.delete_subject("alice") == 1
    assert [h.subject for h in gallery.search(a[:1], 5)[0]] == ["bob"]
    with pytest.raises(UnknownSubject):
        gallery.delete_subject("alice")
    with pytest.raises(UnknownSubject):
        gallery.get_subject("alice")
    stats = gallery.stats()
    assert stats["subjects"] == 1 and stats["faces"] == 1 and stats["indexed_faces"] == 1


def test_the_gallery_survives_closing_and_reopening(gallery_impl: GalleryOpener) -> None:
    rng = np.random.default_rng(4)
    v = unit(rng, 1)
    first = gallery_impl()
    rec = first.enroll("alice", [NewFace(v[0])])
    first.close()
    again = gallery_impl()
    assert again.index.ntotal == 1 and again.search(v, 1)[0][0].face_id == rec[0]["face_id"]


# per gallery implementation: faces per producing model, read without opening the store
GALLERY_MODELS: dict[str, Callable[[Path, Url], dict[tuple[str, str], int]]] = {
    "sqlite-faiss": lambda d, url: models_in_gallery(d / "gallery"),
    "postgres": lambda d, url: pg_models_in_gallery(url()),
}


@pytest.mark.parametrize("impl", sorted(GALLERIES))
def test_faces_per_model_are_read_without_opening_the_gallery(impl: str, request: pytest.FixtureRequest,
                                                              tmp_path: Path) -> None:
    assert set(GALLERY_MODELS) == set(GALLERIES)
    url = _database(request)
    assert GALLERY_MODELS[impl](tmp_path, url) == {}  # no gallery yet
    rng = np.random.default_rng(9)
    first = GALLERIES[impl](tmp_path, url)(KEY)
    assert GALLERY_MODELS[impl](tmp_path, url) == {}  # a gallery without faces
    first.enroll("alice", [NewFace(x) for x in unit(rng, 3)])
    first.close(snapshot=False)
    other = GALLERIES[impl](tmp_path, url)(OTHER_KEY)
    other.enroll("bob", [NewFace(unit(rng, 1)[0])])
    assert GALLERY_MODELS[impl](tmp_path, url) == {("face-a", "a" * 64): 3, ("face-b", "b" * 64): 1}
    other.delete_subject("alice")
    assert GALLERY_MODELS[impl](tmp_path, url) == {("face-b", "b" * 64): 1}
    other.close(snapshot=False)


def test_faces_of_another_model_are_kept_but_never_compared(gallery_impl: GalleryOpener) -> None:
    rng = np.random.default_rng(5)
    v = unit(rng, 2)
    first = gallery_impl(KEY)
    first.enroll("alice", [NewFace(x) for x in v])
    first.close()
    other = gallery_impl(OTHER_KEY)
    assert other.model == OTHER_KEY and other.foreign_faces == 2 and other.index.ntotal == 0
    assert other.search(v, 3) == [[], []]
    with pytest.raises(ModelMismatch):
        other.subject_embeddings("alice")
    assert other.get_subject("alice")["face_count"] == 2  # kept, listed
    other.enroll("bob", [NewFace(v[0])])
    assert [h.subject for h in other.search(v[:1], 3)[0]] == ["bob"]
    assert other.delete_subject("alice") == 2 and other.foreign_faces == 0
