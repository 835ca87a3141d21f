"""The face gallery: SQLite (WAL) is the source of truth, the FAISS index is derived from it.

- Subjects and faces (embedding, box, producing model name and sha256) live in SQLite with
  synchronous=FULL, so an enrolment that returned is on disk before the response leaves.
- The FAISS index holds the unit embeddings of the faces made by the *current* model, keyed by each
  face's integer vector id (inner product = cosine; squared L2 = 2 - 2 cos). It is rebuilt from
  SQLite at start-up, or loaded from a snapshot whose generation, model, size and id checksum match
  the database; any mismatch means a rebuild. Every mutation bumps the generation in the same
  transaction.
- Faces made by a different model are never compared with the current one: they stay in SQLite,
  are not indexed, and are reported (and refused for verification) until re-enrolled.
- Mutations are serialised (one writer lock around SQLite + index); searches share a read lock, so
  they run concurrently with each other and never see a half-applied mutation.
- Index kinds: "flat" (exact) or "ivf" (IVF-Flat, approximate, for very large galleries; trained on
  the enrolled embeddings once there are enough, flat until then). A GPU copy is used for search when
  FAISS sees a GPU; GPU indexes cannot remove ids, so the CPU index stays the master and the GPU copy
  is rebuilt from it after a removal.

The records (`ModelKey`, `NewFace`, `Hit`), errors and subject-id rule are the store-independent ones of
`app.stores.interfaces`; `GalleryStore` satisfies its `GalleryProtocol`, and `app.stores.factory` builds it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import numpy as np

from app.stores.common import box_json, face_record, gallery_stats, new_embeddings, subject_record
from app.stores.interfaces import (
    GalleryError,
    Hit,
    InvalidSubject,
    ModelKey,
    ModelMismatch,
    NewFace,
    UnknownFace,
    UnknownSubject,
    validate_subject,
)
from models.weights import sha256_file

# the records and errors are re-exported: callers that predate app.stores.interfaces import them from here
__all__ = ["GalleryError", "GalleryStore", "Hit", "IndexKind", "InvalidSubject", "ModelKey", "ModelMismatch", "NewFace",
           "RWLock", "UnknownFace", "UnknownSubject", "VectorIndex", "as_queries", "model_mismatch",
           "nearest_subjects", "validate_subject"]

log = logging.getLogger(__name__)

IndexKind = Literal["flat", "ivf"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS subjects (
    subject TEXT PRIMARY KEY,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS faces (
    vid INTEGER PRIMARY KEY AUTOINCREMENT,
    face_id TEXT NOT NULL UNIQUE,
    subject TEXT NOT NULL REFERENCES subjects(subject) ON DELETE CASCADE,
    model TEXT NOT NULL,
    model_sha256 TEXT NOT NULL,
    dim INTEGER NOT NULL,
    embedding BLOB NOT NULL,
    box TEXT,
    image TEXT,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS faces_subject ON faces(subject);
CREATE INDEX IF NOT EXISTS faces_model ON faces(model, model_sha256);
"""


class RWLock:
    """Many readers or one writer; a waiting writer blocks new readers (no writer starvation)."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer = False
        self._waiting_writers = 0

    @contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._waiting_writers:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if self._readers == 0:
                    self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._waiting_writers += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._waiting_writers -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


def _faiss() -> Any:
    import faiss

    return faiss


class VectorIndex:
    """A FAISS inner-product index over unit vectors keyed by int64 ids, with removal (CPU master)."""

    def __init__(self, dim: int, kind: IndexKind = "flat", *, nlist: int = 1024, nprobe: int = 16,
                 use_gpu: bool = False) -> None:
        self.dim, self.kind, self.nlist, self.nprobe = dim, kind, nlist, nprobe
        faiss = _faiss()
        self.use_gpu = use_gpu and faiss.get_num_gpus() > 0
        self.cpu: Any = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        self._gpu: Any = None
        self._gpu_res: Any = None
        self._gpu_lock = threading.Lock()
        self._gpu_stale = True

    @property
    def trained_kind(self) -> str:
        return "ivf" if self.cpu.__class__.__name__.startswith("IndexIVF") else "flat"

    @property
    def ntotal(self) -> int:
        return int(self.cpu.ntotal)

    def build(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Replace the contents (IVF: trained on these vectors when there are enough of them)."""
        faiss = _faiss()
        vectors = np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1, self.dim)
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if self.kind == "ivf" and len(vectors) >= 39 * self.nlist:
            quantizer = faiss.IndexFlatIP(self.dim)
            index = faiss.IndexIVFFlat(quantizer, self.dim, self.nlist, faiss.METRIC_INNER_PRODUCT)
            index.train(vectors)
            index.nprobe = self.nprobe
        else:
            index = faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))
        if len(vectors):
            index.add_with_ids(vectors, ids)
        # swapped in whole: a reader that does not take the lock (a count for /faces/gallery) sees the old index or
        # the new one, never an empty one on its way to being filled
        self.cpu = index
        self._gpu_stale = True

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        vectors = np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1, self.dim)
        self.cpu.add_with_ids(vectors, np.ascontiguousarray(ids, dtype=np.int64))
        if self._gpu is not None and not self._gpu_stale:
            self._gpu.add_with_ids(vectors, np.ascontiguousarray(ids, dtype=np.int64))

    def remove(self, ids: Sequence[int]) -> int:
        if not len(ids):
            return 0
        faiss = _faiss()
        removed = int(self.cpu.remove_ids(faiss.IDSelectorBatch(np.asarray(ids, dtype=np.int64))))
        self._gpu_stale = True  # GPU indexes cannot remove ids: recopy from the CPU master before the next search
        return removed


    def _gpu_copy(self) -> Any:
        if self._gpu is None or self._gpu_stale:
            faiss = _faiss()
            try:
                if self._gpu_res is None:
                    self._gpu_res = faiss.StandardGpuResources()
                self._gpu = faiss.index_cpu_to_gpu(self._gpu_res, 0, self.cpu)
            except Exception as exc:  # an index type without a GPU version: search on the CPU master instead
                log.warning("FAISS GPU copy failed (%s); searching on the CPU index", exc)
                self.use_gpu = False
                return self.cpu
            self._gpu_stale = False
        return self._gpu

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(similarities, ids), each (n, k); missing results have id -1."""
        q = np.ascontiguousarray(queries, dtype=np.float32).reshape(-1, self.dim)
        k = max(1, min(k, self.ntotal)) if self.ntotal else 1
        if self.ntotal == 0:
            return np.zeros((len(q), 0), dtype=np.float32), np.zeros((len(q), 0), dtype=np.int64)
        if not self.use_gpu:
            sims, ids = self.cpu.search(q, k)  # CPU indexes take concurrent searches
            return sims, ids
        # a FAISS GPU index and its StandardGpuResources are not thread-safe, and searches hold only the shared read
        # lock: one search at a time on the GPU copy (the first after a change also makes the copy)
        with self._gpu_lock:
            sims, ids = self._gpu_copy().search(q, k)
        return sims, ids

    def save(self, path: Path) -> None:
        _faiss().write_index(self.cpu, str(path))

    def load(self, path: Path) -> None:
        index = _faiss().read_index(str(path))
        if index.d != self.dim:
            raise ValueError(f"snapshot dimension {index.d} != {self.dim}")
        if hasattr(index, "nprobe"):
            index.nprobe = self.nprobe
        self.cpu = index
        self._gpu_stale = True


def as_queries(queries: np.ndarray, dim: int) -> np.ndarray:
    """Queries as a float32 (n, dim) array; ValueError for another dimension."""
    q = np.asarray(queries, dtype=np.float32)
    if q.ndim == 1:
        q = q[None, :]
    if q.ndim != 2 or q.shape[1] != dim:
        raise ValueError(f"queries have {q.shape[-1]} dimensions, the model makes {dim}")
    return q


def nearest_subjects(index: VectorIndex, q: np.ndarray, top_k: int,
                     face_info: Callable[[set[int]], dict[int, tuple[str, str]]]) -> list[list[Hit]]:
    """For each query, the best face of each of the top_k nearest subjects; `face_info` maps vector ids to
    (face id, subject) and leaves out ids no longer in the database. The caller holds the index's read lock."""
    n = index.ntotal
    if n == 0:
        return [[] for _ in range(len(q))]
    k = min(n, max(top_k * 8, top_k + 16))
    widenings = 0
    while True:
        sims, ids = index.search(q, k)
        info = face_info({int(i) for i in ids.reshape(-1) if i >= 0})
        results = []
        short = False
        for row_s, row_i in zip(sims, ids, strict=True):
            best: dict[str, Hit] = {}
            for s, i in zip(row_s.tolist(), row_i.tolist(), strict=True):
                if i < 0 or i not in info:
                    continue
                face_id, subject = info[i]
                if subject not in best:
                    best[subject] = Hit(face_id, subject, float(s), float(max(0.0, 2.0 - 2.0 * s)))
            hits = sorted(best.values(), key=lambda h: h.distance)[:top_k]
            short |= len(hits) < top_k and k < n
            results.append(hits)
        if not short or widenings == 3:
            return results
        # a few subjects own many faces: look deeper (at most 3 times, so a gallery with fewer
        # subjects than top_k does not turn every search into a scan)
        k = min(n, k * 4)
        widenings += 1


def model_mismatch(subject: str, models: Iterable[tuple[str, str]], current: ModelKey) -> ModelMismatch:
    """The error for a subject whose faces were all made by other models (name, sha256)."""
    others = sorted({f"{name} ({sha[:12]})" for name, sha in models})
    return ModelMismatch(f"subject {subject!r} was enrolled with {', '.join(others)}; this server embeds with "
                         f"{current.name} ({current.sha256[:12]}): embeddings of different models are never "
                         "compared; re-enrol the subject")


def _fsync(path: Path) -> None:
    """fsync a file or a directory (so a rename is durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _ids_digest(ids: np.ndarray) -> str:
    return hashlib.sha256(np.sort(np.asarray(ids, dtype=np.int64)).tobytes()).hexdigest()


def models_in_gallery(root: Path) -> dict[tuple[str, str], int]:
    """Faces per producing model (name, sha256) in the SQLite gallery under `root`, read without opening the store
    (no index is built); empty when there is no gallery yet."""
    db = Path(root) / "gallery.sqlite3"
    if not db.exists():
        return {}
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30.0)
    try:
        if not conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'faces'").fetchone():
            return {}
        rows = conn.execute("SELECT model, model_sha256, COUNT(*) FROM faces GROUP BY model, model_sha256").fetchall()
    finally:
        conn.close()
    return {(str(m), str(sha)): int(n) for m, sha, n in rows}


class GalleryStore:
    """Subjects, faces and the index of one model's embeddings (see the module docstring)."""

    def __init__(self, root: Path, model: ModelKey, *, index_kind: IndexKind = "flat", nlist: int = 1024,
                 nprobe: int = 16, use_gpu: bool = False) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.db_path = self.root / "gallery.sqlite3"
        self.snapshot_path = self.root / "index.faiss"
        self.snapshot_meta_path = self.root / "index.json"
        self.model = model
        self._rw = RWLock()
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
        self._write_conn = self._connect()
        with self._write_conn:
            self._write_conn.executescript(_SCHEMA)
            self._write_conn.execute("INSERT OR IGNORE INTO meta(key, value) VALUES ('generation', '0')")
        self.index = VectorIndex(model.dim, index_kind, nlist=nlist, nprobe=nprobe, use_gpu=use_gpu)
        self.index_source = self._open_index()
        # faces made by other models: counted once here, then kept up to date by the mutations
        self.foreign_faces = int(self._write_conn.execute(
            "SELECT COUNT(*) FROM faces WHERE model != ? OR model_sha256 != ?",
            (model.name, model.sha256)).fetchone()[0])

    # ----- connections -------------------------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.db_path, timeout=30.0, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("PRAGMA busy_timeout=30000")
        conn.row_factory = sqlite3.Row
        return conn

    def _reader(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect()
            self._local.conn = conn
            with self._readers_lock:
                self._readers.append(conn)
        return conn

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        conn = self._write_conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
            conn.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'generation'")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def close(self, *, snapshot: bool = True) -> None:
        """Write a snapshot of the index (when asked) and close the database."""
        with self._rw.write():
            if snapshot:
                self._write_snapshot()
            self._write_conn.close()
            with self._readers_lock:
                for conn in self._readers:
                    conn.close()
                self._readers.clear()

    # ----- index ----------------------------------------------------------------------------------------
    def _generation(self, conn: sqlite3.Connection) -> int:
        return int(conn.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()[0])

    def _current_rows(self, conn: sqlite3.Connection) -> tuple[np.ndarray, np.ndarray]:
        rows = conn.execute("SELECT vid, embedding FROM faces WHERE model = ? AND model_sha256 = ? ORDER BY vid",
                            (self.model.name, self.model.sha256)).fetchall()
        ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
        vecs = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32).reshape(len(rows), self.model.dim)
        return ids, vecs

    def _current_ids(self, conn: sqlite3.Connection) -> np.ndarray:
        rows = conn.execute("SELECT vid FROM faces WHERE model = ? AND model_sha256 = ?",
                            (self.model.name, self.model.sha256)).fetchall()
        return np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))

    def _snapshot_meta(self, conn: sqlite3.Connection) -> dict[str, Any]:
        ids = self._current_ids(conn)
        return {"generation": self._generation(conn), "model": self.model.name, "model_sha256": self.model.sha256,
                "dim": self.model.dim, "count": len(ids), "ids_sha256": _ids_digest(ids),
                "index_kind": self.index.kind}

    def _open_index(self) -> str:
        """Load the snapshot when it matches SQLite exactly, else rebuild; returns which happened."""
        conn = self._write_conn
        expected = self._snapshot_meta(conn)
        if self.snapshot_path.exists() and self.snapshot_meta_path.exists():
            try:
                meta = json.loads(self.snapshot_meta_path.read_text())
                file_sha = meta.pop("file_sha256", None)
                if meta == expected and file_sha == sha256_file(self.snapshot_path):
                    self.index.load(self.snapshot_path)
                    if self.index.ntotal == expected["count"]:
                        return "snapshot"
                log.warning("gallery snapshot does not match the database or its checksum (%s vs %s): rebuilding",
                            meta, expected)
            except Exception as exc:  # a torn or foreign snapshot is only a cache: rebuild
                log.warning("gallery snapshot unreadable (%s): rebuilding", exc)
        t0 = time.perf_counter()
        ids, vecs = self._current_rows(conn)
        self.index.build(ids, vecs)
        log.info("gallery index rebuilt from SQLite: %d faces in %.2f s", len(ids), time.perf_counter() - t0)
        return "rebuilt"

    def _write_snapshot(self) -> None:
        """index.faiss, then index.json with its sha256: each written to a temp file, fsynced, renamed."""
        meta = self._snapshot_meta(self._write_conn)
        tmp = self.snapshot_path.with_suffix(".tmp")
        self.index.save(tmp)
        _fsync(tmp)
        meta["file_sha256"] = sha256_file(tmp)
        os.replace(tmp, self.snapshot_path)
        tmp_meta = self.snapshot_meta_path.with_suffix(".tmp")
        tmp_meta.write_text(json.dumps(meta))
        _fsync(tmp_meta)
        os.replace(tmp_meta, self.snapshot_meta_path)
        _fsync(self.root)

    def snapshot(self) -> None:
        """Write the index snapshot now (it is also written on close)."""
        with self._rw.write():
            self._write_snapshot()

    def rebuild(self) -> None:
        """Rebuild the index from SQLite (e.g. to train IVF once the gallery has grown)."""
        with self._rw.write():
            ids, vecs = self._current_rows(self._write_conn)
            self.index.build(ids, vecs)

    # ----- mutations ------------------------------------------------------------------------------------
    def enroll(self, subject: str, faces: Sequence[NewFace]) -> list[dict[str, Any]]:
        """Store faces for a subject (created on first use) in one transaction; returns the new face records."""
        validate_subject(subject)
        vecs = new_embeddings(faces, self.model.dim)
        now = time.time()
        records = []
        with self._rw.write():
            with self._transaction() as conn:
                conn.execute("INSERT OR IGNORE INTO subjects(subject, created_at) VALUES (?, ?)", (subject, now))
                vids = []
                for f, v in zip(faces, vecs, strict=True):
                    face_id = uuid.uuid4().hex
                    cur = conn.execute(
                        "INSERT INTO faces(face_id, subject, model, model_sha256, dim, embedding, box, image, "
                        "created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (face_id, subject, self.model.name, self.model.sha256, self.model.dim, v.tobytes(),
                         box_json(f), f.image, now))
                    vids.append(int(cur.lastrowid or 0))
                    records.append(face_record(face_id, subject, f, self.model, now))
            # committed (durable); now the derived index
            self.index.add(np.asarray(vids, dtype=np.int64), np.stack(vecs))
            if (self.index.kind == "ivf" and self.index.trained_kind == "flat"
                    and self.index.ntotal >= 39 * self.index.nlist):
                ids, all_vecs = self._current_rows(self._write_conn)  # big enough now: train the IVF index
                self.index.build(ids, all_vecs)
        return records

    def delete_subject(self, subject: str) -> int:
        """Delete a subject and all its faces; returns the number of faces deleted."""
        validate_subject(subject)
        with self._rw.write():
            with self._transaction() as conn:
                if conn.execute("SELECT 1 FROM subjects WHERE subject = ?", (subject,)).fetchone() is None:
                    raise UnknownSubject(subject)
                rows = conn.execute("SELECT vid, model, model_sha256 FROM faces WHERE subject = ?",
                                    (subject,)).fetchall()
                conn.execute("DELETE FROM faces WHERE subject = ?", (subject,))
                conn.execute("DELETE FROM subjects WHERE subject = ?", (subject,))
            vids = [r["vid"] for r in rows]
            self.foreign_faces -= sum(1 for r in rows if not self._is_current(r))
            self.index.remove(vids)
        return len(vids)

    def _is_current(self, row: sqlite3.Row) -> bool:
        return bool((row["model"], row["model_sha256"]) == (self.model.name, self.model.sha256))

    def delete_face(self, face_id: str) -> dict[str, Any]:
        """Delete one face (the subject stays, possibly with no faces); returns what was deleted."""
        with self._rw.write():
            with self._transaction() as conn:
                row = conn.execute("SELECT vid, subject, model, model_sha256 FROM faces WHERE face_id = ?",
                                   (face_id,)).fetchone()
                if row is None:
                    raise UnknownFace(face_id)
                conn.execute("DELETE FROM faces WHERE vid = ?", (row["vid"],))
            if not self._is_current(row):
                self.foreign_faces -= 1
            self.index.remove([row["vid"]])
        return {"face_id": face_id, "subject": row["subject"]}

    # ----- queries --------------------------------------------------------------------------------------
    def search(self, queries: np.ndarray, top_k: int) -> list[list[Hit]]:
        """For each query, the best face of each of the top_k nearest subjects (current model only)."""
        q = as_queries(queries, self.model.dim)
        with self._rw.read():
            return nearest_subjects(self.index, q, top_k, lambda vids: self._face_info(self._reader(), vids))

    @staticmethod
    def _face_info(conn: sqlite3.Connection, vids: set[int]) -> dict[int, tuple[str, str]]:
        out: dict[int, tuple[str, str]] = {}
        ids = list(vids)
        for i in range(0, len(ids), 500):
            chunk = ids[i:i + 500]
            q = f"SELECT vid, face_id, subject FROM faces WHERE vid IN ({','.join('?' * len(chunk))})"
            for r in conn.execute(q, chunk):
                out[int(r[0])] = (r[1], r[2])
        return out

    def subject_embeddings(self, subject: str) -> tuple[list[str], np.ndarray]:
        """(face ids, embeddings) of a subject made by the current model; ModelMismatch when the subject's
        faces all come from another model, UnknownSubject when there is no such subject."""
        validate_subject(subject)
        conn = self._reader()
        if conn.execute("SELECT 1 FROM subjects WHERE subject = ?", (subject,)).fetchone() is None:
            raise UnknownSubject(subject)
        rows = conn.execute("SELECT face_id, embedding, model, model_sha256 FROM faces WHERE subject = ?",
                            (subject,)).fetchall()
        mine = [r for r in rows if (r["model"], r["model_sha256"]) == (self.model.name, self.model.sha256)]
        if rows and not mine:
            raise model_mismatch(subject, ((r["model"], r["model_sha256"]) for r in rows), self.model)
        vecs = np.frombuffer(b"".join(r["embedding"] for r in mine), dtype=np.float32).reshape(len(mine),
                                                                                               self.model.dim)
        return [r["face_id"] for r in mine], vecs

    def _subject_row(self, conn: sqlite3.Connection, subject: str) -> dict[str, Any]:
        faces = conn.execute("SELECT face_id, model, model_sha256, box, image, created_at FROM faces "
                             "WHERE subject = ? ORDER BY vid", (subject,)).fetchall()
        row = conn.execute("SELECT created_at FROM subjects WHERE subject = ?", (subject,)).fetchone()
        return subject_record(subject, row["created_at"] if row else None, faces, self.model)

    def get_subject(self, subject: str) -> dict[str, Any]:
        validate_subject(subject)
        conn = self._reader()
        if conn.execute("SELECT 1 FROM subjects WHERE subject = ?", (subject,)).fetchone() is None:
            raise UnknownSubject(subject)
        return self._subject_row(conn, subject)

    def list_subjects(self, limit: int, offset: int) -> tuple[list[dict[str, Any]], int]:
        """A page of subjects (sorted by id) with face counts, and the total number of subjects."""
        conn = self._reader()
        total = int(conn.execute("SELECT COUNT(*) FROM subjects").fetchone()[0])
        if offset >= total or limit <= 0:  # also keeps values beyond SQLite's 64-bit integers out of the query
            return [], total
        rows = conn.execute(
            "SELECT s.subject, s.created_at, COUNT(f.vid) AS n, "
            "SUM(CASE WHEN f.model = ? AND f.model_sha256 = ? THEN 1 ELSE 0 END) AS mine "
            "FROM subjects s LEFT JOIN faces f ON f.subject = s.subject GROUP BY s.subject ORDER BY s.subject "
            "LIMIT ? OFFSET ?", (self.model.name, self.model.sha256, min(limit, 2**63 - 1), offset)).fetchall()
        return [{"subject": r["subject"], "created_at": r["created_at"], "face_count": int(r["n"]),
                 "faces_from_other_models": int(r["n"]) - int(r["mine"] or 0)} for r in rows], total

    def stats(self) -> dict[str, Any]:
        conn = self._reader()
        faces = int(conn.execute("SELECT COUNT(*) FROM faces").fetchone()[0])
        subjects = int(conn.execute("SELECT COUNT(*) FROM subjects").fetchone()[0])
        with self._rw.read():
            indexed = self.index.ntotal
            kind = self.index.trained_kind
        return gallery_stats(subjects=subjects, faces=faces, indexed=indexed, index_kind=kind,
                             index_source=self.index_source, model=self.model)
