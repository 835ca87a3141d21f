"""The face gallery store: round trips, subject ids, restart recovery, model changes, concurrency, IVF, RWLock."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import numpy as np
import pytest

from app.stores.gallery import (
    GalleryStore,
    Hit,
    InvalidSubject,
    ModelKey,
    ModelMismatch,
    NewFace,
    RWLock,
    UnknownFace,
    UnknownSubject,
    validate_subject,
)

DIM = 16
KEY_A = ModelKey("face-a", "a" * 64, DIM)
KEY_B = ModelKey("face-b", "b" * 64, DIM)
WAIT = 10.0  # generous timeout for events that must happen (never a speed assertion)


def unit(rng: np.random.Generator, n: int, dim: int = DIM) -> np.ndarray:
    """n random unit vectors, float32."""
    v = rng.normal(size=(n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def faces(vecs: np.ndarray) -> list[NewFace]:
    return [NewFace(v) for v in vecs]


def top(store: GalleryStore, vec: np.ndarray, k: int = 1) -> list[Hit]:
    return store.search(vec[None, :], k)[0]


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture
def open_store(tmp_path: Path) -> Iterator[Callable[..., GalleryStore]]:
    """Open GalleryStores on tmp_path/gallery (or another root); the test decides whether to close them."""

    def make(key: ModelKey = KEY_A, root: Path | None = None, **kw: object) -> GalleryStore:
        return GalleryStore(root or tmp_path / "gallery", key, **kw)  # type: ignore[arg-type]

    yield make


@pytest.fixture
def store(open_store: Callable[..., GalleryStore]) -> Iterator[GalleryStore]:
    s = open_store()
    yield s
    s.close(snapshot=False)


def brute_force(gallery: dict[str, np.ndarray], q: np.ndarray, k: int) -> list[tuple[str, float]]:
    """(subject, distance) of the k nearest subjects by their best face: the reference for search()."""
    best = {s: float(np.max(v @ q)) for s, v in gallery.items()}
    ranked = sorted(best.items(), key=lambda kv: -kv[1])[:k]
    return [(s, 2.0 - 2.0 * c) for s, c in ranked]


def simulate_crash(store: GalleryStore) -> None:
    """Drop a store the way a killed process would: no snapshot, nothing flushed beyond what SQLite committed."""
    store._write_conn.close()


# ----------------------------------------------------------------------------------------- subject ids

@pytest.mark.parametrize("subject", ["a", "Z", "0", "alice", "Bob_2", "john.doe@example.com", "x+y-z_1.v2",
                                     "a" * 128, "9" + "-" * 127])
def test_valid_subject_ids(subject: str) -> None:
    assert validate_subject(subject) == subject


@pytest.mark.parametrize("subject", ["", "a" * 129, "../x", "..", ".hidden", "-x", "_x", "@x", "a b", " a", "a ",
                                     "a/b", "a\\b", "a\tb", "a%20b", "a;b", "é", "a\x00b", "\nabc"])
def test_invalid_subject_ids(subject: str) -> None:
    with pytest.raises(InvalidSubject):
        validate_subject(subject)


def test_trailing_newline_is_not_a_valid_subject() -> None:
    with pytest.raises(InvalidSubject):
        validate_subject("abc\n")


@pytest.mark.parametrize("value", [None, 5, b"abc"])
def test_non_string_subject_ids(value: object) -> None:
    with pytest.raises(InvalidSubject):
        validate_subject(value)  # type: ignore[arg-type]


def test_store_rejects_invalid_subjects_everywhere(store: GalleryStore, rng: np.random.Generator) -> None:
    v = unit(rng, 1)
    for bad in ["", "../x", "a b", "a" * 129]:
        with pytest.raises(InvalidSubject):
            store.enroll(bad, faces(v))
        with pytest.raises(InvalidSubject):
            store.delete_subject(bad)
        with pytest.raises(InvalidSubject):
            store.get_subject(bad)
        with pytest.raises(InvalidSubject):
            store.subject_embeddings(bad)
    assert store.stats()["subjects"] == 0 and store.stats()["faces"] == 0


# ----------------------------------------------------------------------------------------- round trips

def test_enroll_then_search_finds_the_face(store: GalleryStore, rng: np.random.Generator) -> None:
    v = unit(rng, 3)
    records = store.enroll("alice", [NewFace(v[0], box={"x": 1, "y": 2, "w": 3, "h": 4}, image="a.jpg"),
                                     NewFace(v[1])])
    store.enroll("bob", faces(v[2:3]))
    assert [r["subject"] for r in records] == ["alice", "alice"]
    assert len({r["face_id"] for r in records}) == 2 and records[0]["model"] == KEY_A.name
    hits = top(store, v[0], 5)
    assert hits[0].subject == "alice" and hits[0].face_id == records[0]["face_id"]
    assert hits[0].distance == pytest.approx(0.0, abs=1e-5) and hits[0].similarity == pytest.approx(1.0, abs=1e-5)
    assert [h.subject for h in hits] == ["alice", "bob"]  # one hit per subject, never more than there are
    subject = store.get_subject("alice")
    assert subject["face_count"] == 2 and [f["face_id"] for f in subject["faces"]] == [r["face_id"] for r in records]
    assert subject["faces"][0]["box"] == {"x": 1, "y": 2, "w": 3, "h": 4} and subject["faces"][0]["image"] == "a.jpg"
    assert all(f["current_model"] for f in subject["faces"])
    ids, embs = store.subject_embeddings("alice")
    assert ids == [r["face_id"] for r in records]
    np.testing.assert_allclose(embs, v[:2])
    st = store.stats()
    assert (st["subjects"], st["faces"], st["indexed_faces"], st["faces_from_other_models"]) == (2, 3, 3, 0)
    assert st["index"] == "flat" and st["model"] == KEY_A.name


def test_search_returns_best_face_per_subject_sorted_by_distance(store: GalleryStore,
                                                                 rng: np.random.Generator) -> None:
    gallery = {f"s{i:02d}": unit(rng, 3) for i in range(12)}
    for subject, vecs in gallery.items():
        store.enroll(subject, faces(vecs))
    queries = unit(rng, 6)
    results = store.search(queries, 5)
    assert len(results) == len(queries)
    for q, hits in zip(queries, results, strict=True):
        expected = brute_force(gallery, q, 5)
        assert [h.subject for h in hits] == [s for s, _ in expected]
        assert [h.distance for h in hits] == pytest.approx([d for _, d in expected], abs=1e-5)
        distances = [h.distance for h in hits]
        assert distances == sorted(distances)
        for h in hits:
            assert h.distance == pytest.approx(2.0 - 2.0 * h.similarity, abs=1e-6)
            ids, embs = store.subject_embeddings(h.subject)
            best = int(np.argmax(embs @ q))
            assert h.face_id == ids[best]  # the subject's best face, not any of its faces


def test_search_looks_deeper_when_one_subject_owns_the_nearest_faces(store: GalleryStore,
                                                                     rng: np.random.Generator) -> None:
    q = unit(rng, 1)[0]
    crowd = q + 0.05 * rng.normal(size=(120, DIM)).astype(np.float32)  # 120 faces, all nearer than anyone else
    crowd /= np.linalg.norm(crowd, axis=1, keepdims=True)
    store.enroll("crowd", faces(crowd))
    others = {f"o{i}": unit(rng, 1) for i in range(4)}
    for subject, vecs in others.items():
        store.enroll(subject, faces(vecs))
    hits = top(store, q, 3)
    assert len(hits) == 3 and hits[0].subject == "crowd"
    gallery = {"crowd": crowd, **others}
    assert [h.subject for h in hits] == [s for s, _ in brute_force(gallery, q, 3)]


def test_search_on_an_empty_gallery(store: GalleryStore, rng: np.random.Generator) -> None:
    assert store.search(unit(rng, 3), 5) == [[], [], []]


def test_search_rejects_queries_of_the_wrong_dimension(store: GalleryStore, rng: np.random.Generator) -> None:
    store.enroll("alice", faces(unit(rng, 1)))
    with pytest.raises(ValueError):
        store.search(unit(rng, 1, 2 * DIM), 1)


def test_enroll_rejects_wrong_dimension_and_empty_lists(store: GalleryStore, rng: np.random.Generator) -> None:
    with pytest.raises(ValueError):
        store.enroll("alice", [])
    with pytest.raises(ValueError):
        store.enroll("alice", [NewFace(unit(rng, 1)[0]), NewFace(unit(rng, 1, DIM + 1)[0])])
    st = store.stats()
    assert (st["subjects"], st["faces"], st["indexed_faces"]) == (0, 0, 0)  # nothing half-enrolled


def test_delete_subject_removes_it_everywhere(store: GalleryStore, rng: np.random.Generator) -> None:
    a, b = unit(rng, 3), unit(rng, 2)
    store.enroll("alice", faces(a))
    store.enroll("bob", faces(b))
    assert store.delete_subject("alice") == 3
    for v in a:
        assert all(h.subject != "alice" for h in top(store, v, 5))
    with pytest.raises(UnknownSubject):
        store.get_subject("alice")
    with pytest.raises(UnknownSubject):
        store.subject_embeddings("alice")
    with pytest.raises(UnknownSubject):
        store.delete_subject("alice")
    rows, total = store.list_subjects(10, 0)
    assert total == 1 and [r["subject"] for r in rows] == ["bob"]
    st = store.stats()
    assert (st["subjects"], st["faces"], st["indexed_faces"]) == (1, 2, 2)


def test_delete_face_removes_exactly_one_face(store: GalleryStore, rng: np.random.Generator) -> None:
    v = unit(rng, 3)
    records = store.enroll("alice", faces(v[:2]))
    store.enroll("bob", faces(v[2:]))
    assert store.delete_face(records[0]["face_id"]) == {"face_id": records[0]["face_id"], "subject": "alice"}
    hits = top(store, v[0], 5)
    assert records[0]["face_id"] not in {h.face_id for h in hits}
    alice = next(h for h in hits if h.subject == "alice")
    assert alice.face_id == records[1]["face_id"]  # the remaining face still represents the subject
    assert store.get_subject("alice")["face_count"] == 1
    with pytest.raises(UnknownFace):
        store.delete_face(records[0]["face_id"])
    # the subject stays, with no faces, after its last face goes; it is never returned by search
    store.delete_face(records[1]["face_id"])
    assert store.get_subject("alice")["face_count"] == 0
    assert store.subject_embeddings("alice")[0] == []
    assert [h.subject for h in top(store, v[1], 5)] == ["bob"]


def test_unknown_subject_and_face_errors(store: GalleryStore) -> None:
    with pytest.raises(UnknownSubject):
        store.get_subject("nobody")
    with pytest.raises(UnknownSubject):
        store.delete_subject("nobody")
    with pytest.raises(UnknownSubject):
        store.subject_embeddings("nobody")
    with pytest.raises(UnknownFace):
        store.delete_face("0" * 32)


def test_list_subjects_pages_sorted(store: GalleryStore, rng: np.random.Generator) -> None:
    for s in ["carol", "alice", "bob", "dave"]:
        store.enroll(s, faces(unit(rng, 2)))
    page, total = store.list_subjects(2, 1)
    assert total == 4 and [r["subject"] for r in page] == ["bob", "carol"]
    assert all(r["face_count"] == 2 and r["faces_from_other_models"] == 0 for r in page)


def test_enrolment_is_committed_to_sqlite(store: GalleryStore, rng: np.random.Generator) -> None:
    v = unit(rng, 1)
    record = store.enroll("alice", faces(v))[0]
    with sqlite3.connect(store.db_path) as raw:  # an independent connection sees the committed row
        row = raw.execute("SELECT subject, model, model_sha256, dim, embedding FROM faces WHERE face_id = ?",
                          (record["face_id"],)).fetchone()
        assert raw.execute("SELECT 1 FROM subjects WHERE subject = 'alice'").fetchone() is not None
    raw.close()
    assert row[:4] == ("alice", KEY_A.name, KEY_A.sha256, DIM)
    np.testing.assert_array_equal(np.frombuffer(row[4], dtype=np.float32), v[0])


# ----------------------------------------------------------------------------------------- restarts

def test_close_and_reopen_loads_the_snapshot(open_store: Callable[..., GalleryStore],
                                             rng: np.random.Generator) -> None:
    s = open_store()
    assert s.index_source == "rebuilt"  # first start: nothing to load
    v = unit(rng, 5)
    for i, vec in enumerate(v):
        s.enroll(f"s{i}", faces(vec[None]))
    s.delete_subject("s4")
    s.close()
    assert s.snapshot_path.exists() and s.snapshot_meta_path.exists()
    s2 = open_store()
    assert s2.index_source == "snapshot" and s2.stats()["index_source"] == "snapshot"
    assert s2.index.ntotal == 4
    for i in range(4):
        assert top(s2, v[i])[0].subject == f"s{i}"
    assert all(h.subject != "s4" for h in top(s2, v[4], 5))
    s2.close()


def test_reopen_after_crash_without_snapshot_rebuilds(open_store: Callable[..., GalleryStore],
                                                      rng: np.random.Generator) -> None:
    s = open_store()
    v = unit(rng, 6)
    records = [s.enroll(f"s{i}", faces(vec[None]))[0] for i, vec in enumerate(v)]
    s.delete_face(records[5]["face_id"])
    simulate_crash(s)
    s2 = open_store()
    assert s2.index_source == "rebuilt"
    assert s2.stats()["indexed_faces"] == 5
    for i in range(5):
        assert top(s2, v[i])[0].face_id == records[i]["face_id"]
    s2.close()


def test_mutation_after_snapshot_then_crash_rebuilds(open_store: Callable[..., GalleryStore],
                                                     rng: np.random.Generator) -> None:
    v = unit(rng, 4)
    s = open_store()
    s.enroll("a", faces(v[:1]))
    s.enroll("b", faces(v[1:2]))
    s.close()
    s = open_store()
    assert s.index_source == "snapshot"
    s.enroll("c", faces(v[2:3]))  # after the snapshot, then the process dies
    s.delete_subject("a")
    simulate_crash(s)
    s2 = open_store()
    assert s2.index_source == "rebuilt"
    assert top(s2, v[2])[0].subject == "c"
    assert all(h.subject != "a" for h in top(s2, v[0], 5))
    assert s2.stats()["indexed_faces"] == 2
    s2.close()


def test_explicit_snapshot_is_loaded_after_a_crash_when_nothing_changed_since(
        open_store: Callable[..., GalleryStore], rng: np.random.Generator) -> None:
    v = unit(rng, 3)
    s = open_store()
    s.enroll("a", faces(v))
    s.snapshot()
    simulate_crash(s)
    s2 = open_store()
    assert s2.index_source == "snapshot" and top(s2, v[1])[0].subject == "a"
    s2.close()


def _closed_gallery(open_store: Callable[..., GalleryStore], rng: np.random.Generator) -> np.ndarray:
    v = unit(rng, 8)
    s = open_store()
    for i, vec in enumerate(v):
        s.enroll(f"s{i}", faces(vec[None]))
    s.close()
    return v


def _assert_rebuilt_and_intact(store: GalleryStore, v: np.ndarray) -> None:
    assert store.index_source == "rebuilt"
    assert store.index.ntotal == len(v)
    for i, vec in enumerate(v):
        assert top(store, vec)[0].subject == f"s{i}"
    store.close()


def test_tampered_snapshot_generation_rebuilds(open_store: Callable[..., GalleryStore],
                                               rng: np.random.Generator, tmp_path: Path) -> None:
    v = _closed_gallery(open_store, rng)
    meta_path = tmp_path / "gallery" / "index.json"
    meta = json.loads(meta_path.read_text())
    meta["generation"] -= 1
    meta_path.write_text(json.dumps(meta))
    _assert_rebuilt_and_intact(open_store(), v)


@pytest.mark.parametrize("field", ["count", "ids_sha256", "model_sha256", "dim", "index_kind"])
def test_any_snapshot_meta_mismatch_rebuilds(open_store: Callable[..., GalleryStore], rng: np.random.Generator,
                                             tmp_path: Path, field: str) -> None:
    v = _closed_gallery(open_store, rng)
    meta_path = tmp_path / "gallery" / "index.json"
    meta = json.loads(meta_path.read_text())
    meta[field] = {"count": 7, "ids_sha256": "0" * 64, "model_sha256": "c" * 64, "dim": 32,
                   "index_kind": "ivf"}[field]
    meta_path.write_text(json.dumps(meta))
    _assert_rebuilt_and_intact(open_store(), v)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "missing", "meta-garbage", "meta-missing"])
def test_damaged_snapshot_rebuilds_without_error(open_store: Callable[..., GalleryStore], rng: np.random.Generator,
                                                 tmp_path: Path, damage: str) -> None:
    v = _closed_gallery(open_store, rng)
    index_path, meta_path = tmp_path / "gallery" / "index.faiss", tmp_path / "gallery" / "index.json"
    data = index_path.read_bytes()
    if damage == "truncated":
        index_path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        index_path.write_bytes(np.random.default_rng(1).bytes(len(data)))
    elif damage == "empty":
        index_path.write_bytes(b"")
    elif damage == "missing":
        index_path.unlink()
    elif damage == "meta-garbage":
        meta_path.write_text("{not json")
    else:
        meta_path.unlink()
    _assert_rebuilt_and_intact(open_store(), v)


def test_snapshot_with_damaged_vectors_is_not_trusted(open_store: Callable[..., GalleryStore],
                                                      rng: np.random.Generator, tmp_path: Path) -> None:
    v = _closed_gallery(open_store, rng)
    index_path = tmp_path / "gallery" / "index.faiss"
    data = bytearray(index_path.read_bytes())
    payload = v.tobytes()
    start = bytes(data).find(payload[:64])  # the flat index stores the vectors verbatim
    assert start > 0
    data[start:start + 4 * DIM] = b"\xff" * (4 * DIM)  # NaNs in place of the first vector
    index_path.write_bytes(bytes(data))
    _assert_rebuilt_and_intact(open_store(), v)


def test_close_without_snapshot_rebuilds_next_time(open_store: Callable[..., GalleryStore],
                                                   rng: np.random.Generator) -> None:
    v = unit(rng, 2)
    s = open_store()
    s.enroll("a", faces(v))
    s.close(snapshot=False)
    s2 = open_store()
    assert s2.index_source == "rebuilt" and top(s2, v[0])[0].subject == "a"
    s2.close()


# ----------------------------------------------------------------------------------------- model changes

def test_faces_of_another_model_are_kept_but_never_compared(open_store: Callable[..., GalleryStore],
                                                            rng: np.random.Generator) -> None:
    v = unit(rng, 4)
    a = open_store(KEY_A)
    a.enroll("alice", faces(v[:2]))
    a.enroll("bob", faces(v[2:3]))
    a.close()

    b = open_store(KEY_B)  # a snapshot of model A exists: it must not be loaded for model B
    assert b.index_source == "rebuilt" and b.index.ntotal == 0
    st = b.stats()
    assert (st["subjects"], st["faces"], st["indexed_faces"], st["faces_from_other_models"]) == (2, 3, 0, 3)
    assert st["model"] == KEY_B.name
    assert b.search(v[:1], 5) == [[]]
    with pytest.raises(ModelMismatch, match="re-enrol"):
        b.subject_embeddings("alice")
    rows, total = b.list_subjects(10, 0)
    assert total == 2
    assert {r["subject"]: (r["face_count"], r["faces_from_other_models"]) for r in rows} == {
        "alice": (2, 2), "bob": (1, 1)}
    assert not any(f["current_model"] for f in b.get_subject("alice")["faces"])

    # re-enrolling with the current model: only the new face is compared and returned
    new = b.enroll("alice", faces(v[3:4]))[0]
    ids, embs = b.subject_embeddings("alice")
    assert ids == [new["face_id"]]
    np.testing.assert_allclose(embs, v[3:4])
    assert [h.subject for h in top(b, v[0], 5)] == ["alice"] and top(b, v[0])[0].face_id == new["face_id"]
    rows, _ = b.list_subjects(10, 0)
    assert {r["subject"]: (r["face_count"], r["faces_from_other_models"]) for r in rows} == {
        "alice": (3, 2), "bob": (1, 1)}
    assert b.stats()["faces_from_other_models"] == 3
    b.close()

    a2 = open_store(KEY_A)  # back to model A: its own faces only, model B's face is not indexed
    assert a2.index.ntotal == 3 and a2.stats()["faces_from_other_models"] == 1
    assert top(a2, v[3])[0].face_id != new["face_id"]
    a2.close()


def test_same_name_other_sha_or_dimension_is_another_model(open_store: Callable[..., GalleryStore],
                                                           rng: np.random.Generator) -> None:
    a = open_store(KEY_A)
    a.enroll("alice", faces(unit(rng, 1)))
    a.close()
    retrained = ModelKey(KEY_A.name, "f" * 64, DIM)
    wider = ModelKey("face-c", "c" * 64, 2 * DIM)
    for key in (retrained, wider):
        s = open_store(key)
        st = s.stats()
        assert s.index.ntotal == 0 and st["faces"] >= 1 and st["faces_from_other_models"] == st["faces"]
        with pytest.raises(ModelMismatch):
            s.subject_embeddings("alice")
        s.enroll("bob", faces(unit(rng, 1, key.dim)))
        assert s.subject_embeddings("bob")[1].shape == (1, key.dim)
        s.close()


# ----------------------------------------------------------------------------------------- concurrency

def test_concurrent_enrol_and_search(store: GalleryStore, rng: np.random.Generator) -> None:
    seed = unit(rng, 8)
    for i, v in enumerate(seed):
        store.enroll(f"seed{i}", faces(v[None]))
    writers, per_writer, readers = 4, 50, 4
    vecs = unit(rng, writers * per_writer).reshape(writers, per_writer, DIM)
    errors: list[BaseException] = []
    done = threading.Event()
    searches = [0] * readers
    start = threading.Barrier(writers + readers)

    def write(w: int) -> None:
        try:
            start.wait(WAIT)
            for i in range(per_writer):
                store.enroll(f"w{w}-{i}", faces(vecs[w, i][None]))
        except BaseException as exc:
            errors.append(exc)

    def read(r: int) -> None:
        try:
            start.wait(WAIT)
            while not done.is_set() or searches[r] == 0:
                j = searches[r] % len(seed)
                hits = top(store, seed[j], 3)
                assert hits[0].subject == f"seed{j}" and hits[0].distance < 1e-4
                assert len(hits) == 3 and [h.distance for h in hits] == sorted(h.distance for h in hits)
                searches[r] += 1
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(w,)) for w in range(writers)]
    threads += [threading.Thread(target=read, args=(r,)) for r in range(readers)]
    for t in threads:
        t.start()
    for t in threads[:writers]:
        t.join(60)
    done.set()
    for t in threads[writers:]:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    assert all(n > 0 for n in searches)
    total = len(seed) + writers * per_writer
    st = store.stats()
    assert (st["subjects"], st["faces"], st["indexed_faces"]) == (total, total, total)
    results = store.search(vecs.reshape(-1, DIM), 1)
    assert [hits[0].subject for hits in results] == [f"w{w}-{i}" for w in range(writers) for i in range(per_writer)]


# ----------------------------------------------------------------------------------------- IVF

def test_ivf_index_trains_once_big_enough_and_still_finds_duplicates(
        open_store: Callable[..., GalleryStore], rng: np.random.Generator) -> None:
    nlist = 4
    need = 39 * nlist
    s = open_store(index_kind="ivf", nlist=nlist, nprobe=1)
    v = unit(rng, need + 24)
    s.enroll("first", faces(v[:10]))
    assert s.stats()["index"] == "flat"  # too few vectors to train yet
    for c in range(10, len(v), 20):
        s.enroll(f"s{c:03d}", faces(v[c:c + 20]))
    assert s.stats()["index"] == "ivf" and s.index.ntotal == len(v)

    def owner(i: int) -> str:
        return "first" if i < 10 else f"s{(i - 10) // 20 * 20 + 10:03d}"

    probe = [0, 5, 17, 63, 100, need - 1, need + 20]
    for i in probe:
        hit = top(s, v[i])[0]
        assert hit.subject == owner(i) and hit.distance == pytest.approx(0.0, abs=1e-5)

    deleted = owner(63)
    assert s.delete_subject(deleted) == 20
    assert s.index.ntotal == len(v) - 20 and s.stats()["index"] == "ivf"
    assert all(h.subject != deleted for h in top(s, v[63], 5))
    record = s.enroll("late", faces(v[63:64]))[0]  # adding to a trained IVF index
    assert top(s, v[63])[0].face_id == record["face_id"]
    s.close()

    s2 = open_store(index_kind="ivf", nlist=nlist, nprobe=1)
    assert s2.index_source == "snapshot" and s2.stats()["index"] == "ivf"
    assert top(s2, v[63])[0].subject == "late" and top(s2, v[100])[0].subject == owner(100)
    simulate_crash(s2)
    s3 = open_store(index_kind="ivf", nlist=nlist, nprobe=1)
    s3.enroll("after", faces(unit(rng, 1)))
    simulate_crash(s3)
    s4 = open_store(index_kind="ivf", nlist=nlist, nprobe=1)  # rebuilt from SQLite: trained again
    assert s4.index_source == "rebuilt" and s4.stats()["index"] == "ivf"
    assert s4.index.ntotal == len(v) - 20 + 2
    assert top(s4, v[5])[0].subject == "first"
    s4.close()


# ----------------------------------------------------------------------------------------- RWLock

def _hold(lock_cm: Callable[[], AbstractContextManager[None]], entered: threading.Event,
          release: threading.Event) -> threading.Thread:
    """A thread that takes the lock, says so, and keeps it until `release` is set."""

    def run() -> None:
        with lock_cm():
            entered.set()
            release.wait(WAIT)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def _queued_writers(lock: RWLock, n: int) -> bool:
    """Wait until n writers are queued on the lock (its own state; polling, not a timing assertion)."""
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        if lock._waiting_writers == n:
            return True
        time.sleep(0.005)
    return False


def test_rwlock_readers_share() -> None:
    lock = RWLock()
    a_in, b_in, release = threading.Event(), threading.Event(), threading.Event()
    ta = _hold(lock.read, a_in, release)
    assert a_in.wait(WAIT)
    tb = _hold(lock.read, b_in, release)
    assert b_in.wait(WAIT)  # the second reader got in while the first still holds the lock
    release.set()
    ta.join(WAIT)
    tb.join(WAIT)


def test_rwlock_writer_excludes_readers_and_writers() -> None:
    lock = RWLock()
    w_in, w_release = threading.Event(), threading.Event()
    w2_in, w2_release = threading.Event(), threading.Event()
    r_in, r_release = threading.Event(), threading.Event()
    tw = _hold(lock.write, w_in, w_release)
    assert w_in.wait(WAIT)
    tw2 = _hold(lock.write, w2_in, w2_release)
    assert _queued_writers(lock, 1)
    tr = _hold(lock.read, r_in, r_release)
    assert not r_in.wait(0.2) and not w2_in.is_set()  # both wait while the writer holds the lock
    w_release.set()
    assert w2_in.wait(WAIT)  # the queued writer goes next, alone
    assert not r_in.wait(0.1)
    w2_release.set()
    assert r_in.wait(WAIT)
    r_release.set()
    for t in (tw, tw2, tr):
        t.join(WAIT)


def test_rwlock_reader_excludes_writer_and_waiting_writer_blocks_new_readers() -> None:
    lock = RWLock()
    r1_in, r1_release = threading.Event(), threading.Event()
    w_in, w_release = threading.Event(), threading.Event()
    r2_in, r2_release = threading.Event(), threading.Event()
    tr1 = _hold(lock.read, r1_in, r1_release)
    assert r1_in.wait(WAIT)
    tw = _hold(lock.write, w_in, w_release)
    assert _queued_writers(lock, 1) and not w_in.is_set()  # the reader keeps the writer out
    tr2 = _hold(lock.read, r2_in, r2_release)
    assert not r2_in.wait(0.2)  # a queued writer goes first: no writer starvation
    r1_release.set()
    assert w_in.wait(WAIT)
    assert not r2_in.is_set()
    w_release.set()
    assert r2_in.wait(WAIT)
    r2_release.set()
    for t in (tr1, tw, tr2):
        t.join(WAIT)


def test_rwlock_releases_on_exception() -> None:
    lock = RWLock()
    with pytest.raises(RuntimeError), lock.write():
        raise RuntimeError("boom")
    with pytest.raises(RuntimeError), lock.read():
        raise RuntimeError("boom")
    entered, release = threading.Event(), threading.Event()
    release.set()
    t = _hold(lock.write, entered, release)
    assert entered.wait(WAIT)
    t.join(WAIT)


def test_gpu_copy_is_refreshed_after_a_removal(monkeypatch: pytest.MonkeyPatch) -> None:
    """GPU indexes cannot remove ids: the CPU index is the master and the search copy is remade after a
    removal. A stand-in for faiss's GPU copy (a clone) shows that a removed id is never served from it."""
    import faiss

    from app.stores.gallery import VectorIndex

    copies: list[object] = []

    def fake_copy(res: object, device: int, index: object) -> object:
        clone = faiss.clone_index(index)
        copies.append(clone)
        return clone

    monkeypatch.setattr(faiss, "StandardGpuResources", lambda: object(), raising=False)
    monkeypatch.setattr(faiss, "index_cpu_to_gpu", fake_copy, raising=False)
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1)
    rng = np.random.default_rng(0)
    vecs = rng.normal(size=(4, 8)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    vi = VectorIndex(8, use_gpu=True)
    assert vi.use_gpu
    vi.add(np.arange(4), vecs)
    _, ids = vi.search(vecs[:1], 1)
    assert ids[0, 0] == 0 and len(copies) == 1
    vi.add(np.array([10]), vecs[1:2])  # adds go to the live copy too: no recopy
    assert len(copies) == 1
    vi.remove([0])
    _, ids = vi.search(vecs[:1], 4)
    assert 0 not in ids[0].tolist() and len(copies) == 2


def test_gpu_copy_failure_falls_back_to_the_cpu_index(monkeypatch: pytest.MonkeyPatch) -> None:
    import faiss

    from app.stores.gallery import VectorIndex

    def broken(*a: object) -> object:
        raise RuntimeError("no GPU version of this index")

    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1)
    monkeypatch.setattr(faiss, "StandardGpuResources", lambda: object(), raising=False)
    monkeypatch.setattr(faiss, "index_cpu_to_gpu", broken, raising=False)
    vi = VectorIndex(4, use_gpu=True)
    v = np.eye(4, dtype=np.float32)
    vi.add(np.arange(4), v)
    _, ids = vi.search(v[2:3], 1)
    assert ids[0, 0] == 2 and vi.use_gpu is False


def test_searches_on_the_gpu_copy_run_one_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """FAISS GPU indexes are not thread-safe: concurrent identify requests (each holding only the gallery's shared
    read lock) must reach the GPU copy one at a time. A stand-in GPU copy counts how many searches are inside it."""
    import faiss

    from app.stores.gallery import VectorIndex

    inside = {"now": 0, "most": 0}
    guard = threading.Lock()

    class GpuCopy:
        def __init__(self, index: object) -> None:
            self.index = faiss.clone_index(index)

        def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
            with guard:
                inside["now"] += 1
                inside["most"] = max(inside["most"], inside["now"])
            time.sleep(0.01)
            try:
                return self.index.search(q, k)  # type: ignore[attr-defined,no-any-return]
            finally:
                with guard:
                    inside["now"] -= 1

    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1)
    monkeypatch.setattr(faiss, "StandardGpuResources", lambda: object(), raising=False)
    monkeypatch.setattr(faiss, "index_cpu_to_gpu", lambda res, dev, index: GpuCopy(index), raising=False)
    vi = VectorIndex(4, use_gpu=True)
    v = np.eye(4, dtype=np.float32)
    vi.add(np.arange(4), v)
    found: list[int] = []

    def search(i: int) -> None:
        _, ids = vi.search(v[i % 4:i % 4 + 1], 1)
        found.append(int(ids[0, 0]) - i % 4)

    threads = [threading.Thread(target=search, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert found == [0] * 8 and inside["most"] == 1


def test_a_rebuild_never_shows_an_empty_index(monkeypatch: pytest.MonkeyPatch) -> None:
    """build() fills the new index before swapping it in: a reader that takes no lock (the gallery's counts) sees
    the old contents or the new, never the empty index on its way to being filled."""
    import faiss

    from app.stores.gallery import VectorIndex

    vi = VectorIndex(4)
    v = np.eye(4, dtype=np.float32)
    vi.build(np.arange(3), v[:3])
    seen: list[int] = []
    real = faiss.IndexIDMap2

    def spying(inner: object) -> object:
        index = real(inner)
        add = index.add_with_ids

        def add_with_ids(x: np.ndarray, ids: np.ndarray) -> None:
            seen.append(vi.ntotal)  # what a reader sees while the new index fills
            add(x, ids)

        index.add_with_ids = add_with_ids
        return index

    monkeypatch.setattr(faiss, "IndexIDMap2", spying)
    vi.build(np.arange(4), v)
    assert seen == [3] and vi.ntotal == 4
