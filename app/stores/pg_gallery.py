"""The face gallery on PostgreSQL: the database is the source of truth, each replica keeps its own FAISS index.

- Subjects and faces (float32 embedding as bytea, box, producing model name and sha256) live in PostgreSQL; an
  enrolment that returned is committed. Tables are prefixed `gallery_`; the schema is versioned
  (`app.stores.pg.migrate`, component "gallery") and applied at start-up under an advisory lock.
- Change feed: every mutation, in its own transaction, bumps `gallery_state.generation` (its first statement: the
  row lock serialises mutations, so generations are contiguous and commit in order), appends
  (generation, 'add' | 'remove', vector ids) to `gallery_changes`, prunes entries older than `log_keep`
  generations, and sends `NOTIFY cnn_gallery, '<generation>'` (delivered at commit).
- Each store instance (one per replica) builds its index from the faces of its model at start-up, then a listener
  thread (`LISTEN` on its own connection; a `poll_seconds` timeout as the fallback when a notification is lost or
  the connection was re-made) applies the changes since the generation it holds: one REPEATABLE READ snapshot gives
  the generation, the log entries and the embeddings of the added faces, so the index moves from one committed
  state to a later one. When the log no longer holds every entry since that generation (the replica fell behind
  past the pruning, or the database went back in time) it rebuilds the index from the faces table instead.
- Read-your-writes: a mutation made through this instance is applied to its own index before `enroll` / `delete_*`
  return (directly when the index was at the previous generation, else by catching up to at least its own).
- The bound: a face acknowledged by one replica is searchable on every other within the NOTIFY latency plus one
  catch-up (one statement, one round trip): milliseconds (docs/bench/gallery-sync.md: p50 1.2 ms, p99 6 ms, max
  10 ms between processes on a busy 2-core machine). When a notification is lost the poll caps it at
  `poll_seconds` (default 1 s) plus one catch-up; a dropped listener connection is re-made (0.1 s back-off, doubling
  to 5 s while the database stays unreachable) and catches up at once. Deletions are seen at once everywhere: a
  search keeps only the hits whose face is still in the database.
- Faces made by another model are stored but never indexed; `foreign_faces` is the database's face count at the
  index's generation minus the faces indexed.
- Thread safety: searches share the index read lock; applying changes takes the write lock (FAISS mutations are
  serialised), never while holding a database connection. Connections come from a small lock-protected pool.

`close(snapshot=...)` ignores `snapshot`: there is nothing to persist, since the index is always rebuilt from the
database at start-up.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Sequence
from contextlib import suppress
from typing import Any

import numpy as np

from app.stores.common import box_json, face_record, gallery_stats, new_embeddings, subject_record
from app.stores.gallery import IndexKind, RWLock, VectorIndex, as_queries, model_mismatch, nearest_subjects
from app.stores.interfaces import Hit, ModelKey, NewFace, UnknownFace, UnknownSubject, validate_subject
from app.stores.pg import Pool, connect, migrate, redact

log = logging.getLogger(__name__)

COMPONENT = "gallery"
CHANNEL = "cnn_gallery"

MIGRATIONS: tuple[str, ...] = (
    # 1: subjects, faces, the generation counter and the change log
    """
    CREATE TABLE gallery_state (
        id BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (id),
        generation BIGINT NOT NULL DEFAULT 0,
        faces BIGINT NOT NULL DEFAULT 0
    );
    INSERT INTO gallery_state DEFAULT VALUES;
    CREATE TABLE gallery_subjects (
        subject TEXT COLLATE "C" PRIMARY KEY,
        created_at DOUBLE PRECISION NOT NULL
    );
    CREATE TABLE gallery_faces (
        vid BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        face_id TEXT NOT NULL UNIQUE,
        subject TEXT COLLATE "C" NOT NULL REFERENCES gallery_subjects(subject) ON DELETE CASCADE,
        model TEXT NOT NULL,
        model_sha256 TEXT NOT NULL,
        dim INTEGER NOT NULL,
        embedding BYTEA NOT NULL,
        box TEXT,
        image TEXT,
        created_at DOUBLE PRECISION NOT NULL
    );
    CREATE INDEX gallery_faces_subject ON gallery_faces(subject, vid);
    CREATE INDEX gallery_faces_model ON gallery_faces(model, model_sha256);
    CREATE TABLE gallery_changes (
        generation BIGINT PRIMARY KEY,
        op TEXT NOT NULL CHECK (op IN ('add', 'remove')),
        vids BIGINT[] NOT NULL,
        at TIMESTAMPTZ NOT NULL DEFAULT now()
    );
    """,
)


# a mutation's bookkeeping in one statement: face count, log entry, pruning, NOTIFY (sent at commit)
_LOG_CHANGE = """
WITH f AS (UPDATE gallery_state SET faces = faces + %(delta)s RETURNING faces),
     c AS (INSERT INTO gallery_changes (generation, op, vids) VALUES (%(generation)s, %(op)s, %(vids)s)),
     p AS (DELETE FROM gallery_changes WHERE generation <= %(oldest)s)
SELECT f.faces, pg_notify(%(channel)s, %(payload)s) FROM f
"""

# a catch-up in one statement: the state row, the ids removed since `have`, and the added faces of this model
# still present (with their embeddings); `changes` tells whether the log still holds every entry since `have`
_CATCH_UP = """
WITH s AS (SELECT generation, faces FROM gallery_state),
     c AS (SELECT c.op, c.vids FROM gallery_changes c, s
           WHERE c.generation > %(have)s AND c.generation <= s.generation),
     a AS (SELECT DISTINCT unnest(vids) AS vid FROM c WHERE op = 'add'),
     r AS (SELECT DISTINCT unnest(vids) AS vid FROM c WHERE op = 'remove')
SELECT 'state' AS kind, s.generation, s.faces, (SELECT COUNT(*) FROM c) AS changes, NULL::bigint AS vid,
       NULL::bytea AS embedding FROM s
UNION ALL
SELECT 'remove', NULL, NULL, NULL, r.vid, NULL FROM r WHERE r.vid NOT IN (SELECT vid FROM a)
UNION ALL
SELECT 'add', NULL, NULL, NULL, f.vid, f.embedding FROM gallery_faces f JOIN a ON f.vid = a.vid
WHERE f.model = %(model)s AND f.model_sha256 = %(sha)s
"""


def pg_models_in_gallery(url: str) -> dict[tuple[str, str], int]:
    """Faces per producing model (name, sha256) in the PostgreSQL gallery, without opening the store; empty when
    its tables do not exist yet."""
    with connect(url) as conn:
        exists = conn.execute("SELECT to_regclass('gallery_faces') AS t").fetchone()["t"]
        if exists is None:
            return {}
        rows = conn.execute("SELECT model, model_sha256, COUNT(*) AS n FROM gallery_faces "
                            "GROUP BY model, model_sha256").fetchall()
    return {(str(r["model"]), str(r["model_sha256"])): int(r["n"]) for r in rows}


class PgGalleryStore:
    """Subjects and faces in PostgreSQL, a FAISS index of one model's embeddings per instance (module docstring)."""

    def __init__(self, url: str, model: ModelKey, *, index_kind: IndexKind = "flat", nlist: int = 1024,
                 nprobe: int = 16, use_gpu: bool = False, poll_seconds: float = 1.0, log_keep: int = 10_000,
                 pool_size: int = 8, listen: bool = True, notify: bool = True) -> None:
        """`poll_seconds`: the listener's fallback poll interval; `log_keep`: change-log entries kept (a replica
        further behind rebuilds); `listen=False`: no listener thread, changes of other replicas are applied only by
        `sync()`; `notify=False`: poll only, no LISTEN (e.g. behind a transaction-pooling PgBouncer, where LISTEN
        does not work): other replicas' changes then arrive within `poll_seconds`."""
        if log_keep < 1 or poll_seconds <= 0:
            raise ValueError("log_keep must be >= 1 and poll_seconds > 0")
        self.url = url
        self.model = model
        self.poll_seconds = poll_seconds
        self.notify = notify
        self.log_keep = log_keep
        self.schema_version = migrate(url, COMPONENT, MIGRATIONS)
        self._pool = Pool(url, pool_size, closed_message="the gallery is closed")
        self._rw = RWLock()
        self._sync_lock = threading.Lock()  # one catch-up at a time; the index write lock is taken inside it
        self.index = VectorIndex(model.dim, index_kind, nlist=nlist, nprobe=nprobe, use_gpu=use_gpu)
        self._generation = 0  # the generation the index reflects
        self._faces_total = 0  # all faces (any model) in the database at that generation
        self.rebuilds = 0  # full rebuilds from the faces table (the first one included)
        self.index_source = "rebuilt"
        self._closed = False
        with self._sync_lock:
            self._rebuild_locked()
        self._stop = threading.Event()
        self._wake = f"cnn_gallery_{uuid.uuid4().hex}"  # this instance's own channel: close() wakes the listener
        self._listener: threading.Thread | None = None
        if listen:
            self._listener = threading.Thread(target=self._listen, name="gallery-listener", daemon=True)
            self._listener.start()

    # ----- state ----------------------------------------------------------------------------------------
    @property
    def location(self) -> str:
        """Where the records live, for logs (never a secret)."""
        return redact(self.url)

    @property
    def generation(self) -> int:
        """The database generation the local index reflects."""
        return self._generation

    @property
    def foreign_faces(self) -> int:
        """Faces made by another model (stored, not searched), as of the index's generation."""
        with self._rw.read():
            return self._faces_total - self.index.ntotal

    def close(self, *, snapshot: bool = True) -> None:
        """Stop the listener and close the connections (`snapshot` is ignored: the index is rebuilt at start-up)."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        if self._listener is not None:
            with suppress(Exception), self._pool.connection() as conn:
                conn.execute("SELECT pg_notify(%s, 'stop')", (self._wake,))
            self._listener.join(timeout=self.poll_seconds + 10)
        self._pool.close()

    # ----- change feed ----------------------------------------------------------------------------------
    def _listen(self) -> None:
        """LISTEN for changes and apply them; on a timeout poll anyway; re-connect after errors."""
        backoff = 0.1
        while not self._stop.is_set():
            conn = None
            try:
                conn = connect(self.url, autocommit=True)
                if self.notify:
                    conn.execute(f"LISTEN {CHANNEL}")
                conn.execute(f"LISTEN {self._wake}")
                self.sync()  # whatever was committed before LISTEN took effect
                backoff = 0.1
                while not self._stop.is_set():
                    payload: str | None = None
                    for note in conn.notifies(timeout=self.poll_seconds, stop_after=1):
                        payload = note.payload
                    if self._stop.is_set():
                        break
                    if payload is not None and payload.isdigit() and int(payload) <= self._generation:
                        continue  # already applied (our own write, or an earlier catch-up covered it)
                    self.sync()
            except Exception as exc:
                if self._stop.is_set():
                    break
                log.warning("gallery change listener on %s failed (%s); re-connecting in %.1f s",
                            redact(self.url), exc, backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)
            finally:
                if conn is not None:
                    with suppress(Exception):
                        conn.close()

    def sync(self) -> int:
        """Apply the changes committed since the index's generation (or rebuild); returns the generation now."""
        with self._sync_lock:
            self._sync_locked()
            return self._generation

    def _sync_locked(self) -> None:
        have = self._generation
        # one statement, so one snapshot (even in READ COMMITTED) and one round trip: a catch-up costs the
        # listener a single wait for the GIL, which matters when searches keep the other threads busy
        with self._pool.connection() as conn:
            rows = conn.execute(_CATCH_UP, {"have": have, "model": self.model.name,
                                            "sha": self.model.sha256}).fetchall()
        state = next(r for r in rows if r["kind"] == "state")
        now, faces_total, changes = int(state["generation"]), int(state["faces"]), int(state["changes"])
        if now == have:
            return
        if changes != now - have:  # pruned past us (or the database went back in time): start again
            self._rebuild_locked()
            return
        # a face added and removed within the batch is neither fetched nor removed
        removed = sorted(int(r["vid"]) for r in rows if r["kind"] == "remove")
        added = [r for r in rows if r["kind"] == "add"]
        ids = np.fromiter((r["vid"] for r in added), dtype=np.int64, count=len(added))
        vecs = np.frombuffer(b"".join(bytes(r["embedding"]) for r in added), dtype=np.float32)
        with self._rw.write():
            self.index.remove(removed)
            if len(ids):
                self.index.add(ids, vecs.reshape(len(ids), self.model.dim))
            self._generation, self._faces_total = now, faces_total
        self._maybe_train()

    def _rebuild_locked(self) -> None:
        with self._pool.connection() as conn, conn.transaction():
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            state = conn.execute("SELECT generation, faces FROM gallery_state").fetchone()
            t0 = time.perf_counter()
            ids, vecs = self._current_rows(conn)
        with self._rw.write():
            self.index.build(ids, vecs)
            self._generation, self._faces_total = int(state["generation"]), int(state["faces"])
            self.rebuilds += 1
        log.info("gallery index built from PostgreSQL (generation %d, build %d): %d faces in %.2f s",
                 self._generation, self.rebuilds, len(ids), time.perf_counter() - t0)

    def _maybe_train(self) -> None:
        """IVF: once the gallery is big enough, rebuild (which trains) from one consistent snapshot."""
        index = self.index
        if index.kind == "ivf" and index.trained_kind == "flat" and index.ntotal >= 39 * index.nlist:
            self._rebuild_locked()

    def _current_rows(self, conn: Any, vids: list[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(vector ids, embeddings) of this model's faces: all of them, or those of `vids` still present."""
        sql = "SELECT vid, embedding FROM gallery_faces WHERE model = %s AND model_sha256 = %s"
        params: list[Any] = [self.model.name, self.model.sha256]
        if vids is not None:
            sql += " AND vid = ANY(%s)"
            params.append(vids)
        rows = conn.execute(sql + " ORDER BY vid", params).fetchall()
        ids = np.fromiter((r["vid"] for r in rows), dtype=np.int64, count=len(rows))
        vecs = np.frombuffer(b"".join(bytes(r["embedding"]) for r in rows), dtype=np.float32)
        return ids, vecs.reshape(len(rows), self.model.dim)

    # ----- mutations ------------------------------------------------------------------------------------
    @staticmethod
    def _begin_change(conn: Any) -> int:
        """The mutation's generation; the row lock it takes serialises mutations until commit."""
        return int(conn.execute("UPDATE gallery_state SET generation = generation + 1 RETURNING generation")
                   .fetchone()["generation"])

    def _log_change(self, conn: Any, generation: int, op: str, vids: list[int]) -> int:
        """Append to the change log, prune it, notify at commit; returns the database's face count after."""
        row = conn.execute(_LOG_CHANGE, {"delta": len(vids) if op == "add" else -len(vids), "generation": generation,
                                         "op": op, "vids": vids, "oldest": generation - self.log_keep,
                                         "channel": CHANNEL, "payload": str(generation)}).fetchone()
        return int(row["faces"])

    def _apply_own(self, generation: int, faces_total: int, *, add: tuple[np.ndarray, np.ndarray] | None = None,
                   remove: list[int] | None = None) -> None:
        """Bring the local index to at least our own committed generation before the call returns."""
        with self._sync_lock:
            if self._generation == generation - 1:  # nothing else in between: apply our change directly
                with self._rw.write():
                    if add is not None:
                        self.index.add(*add)
                    if remove:
                        self.index.remove(remove)
                    self._generation, self._faces_total = generation, faces_total
                self._maybe_train()
            elif self._generation < generation:
                try:
                    self._sync_locked()
                except Exception as exc:  # the change is committed: report success, the listener will apply it
                    log.warning("gallery: committed generation %d but could not catch up (%s); the listener will",
                                generation, exc)

    def enroll(self, subject: str, faces: Sequence[NewFace]) -> list[dict[str, Any]]:
        """Store faces for a subject (created on first use) in one transaction; returns the new face records."""
        validate_subject(subject)
        vecs = new_embeddings(faces, self.model.dim)
        now = time.time()
        records = []
        vids: list[int] = []
        with self._pool.connection() as conn, conn.transaction():
            generation = self._begin_change(conn)
            conn.execute("INSERT INTO gallery_subjects (subject, created_at) VALUES (%s, %s) ON CONFLICT DO NOTHING",
                         (subject, now))
            for f, v in zip(faces, vecs, strict=True):
                face_id = uuid.uuid4().hex
                row = conn.execute(
                    "INSERT INTO gallery_faces (face_id, subject, model, model_sha256, dim, embedding, box, image, "
                    "created_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING vid",
                    (face_id, subject, self.model.name, self.model.sha256, self.model.dim, v.tobytes(), box_json(f),
                     f.image, now)).fetchone()
                vids.append(int(row["vid"]))
                records.append(face_record(face_id, subject, f, self.model, now))
            faces_total = self._log_change(conn, generation, "add", vids)
        # committed; now the derived index of this replica
        self._apply_own(generation, faces_total, add=(np.asarray(vids, dtype=np.int64), np.stack(vecs)))
        return records

    def delete_subject(self, subject: str) -> int:
        """Delete a subject and all its faces; returns the number of faces deleted."""
        validate_subject(subject)
        with self._pool.connection() as conn, conn.transaction():
            generation = self._begin_change(conn)
            if conn.execute("SELECT 1 FROM gallery_subjects WHERE subject = %s", (subject,)).fetchone() is None:
                raise UnknownSubject(subject)
            vids = [int(r["vid"]) for r in
                    conn.execute("DELETE FROM gallery_faces WHERE subject = %s RETURNING vid", (subject,))]
            conn.execute("DELETE FROM gallery_subjects WHERE subject = %s", (subject,))
            faces_total = self._log_change(conn, generation, "remove", vids)
        self._apply_own(generation, faces_total, remove=vids)
        return len(vids)

    def delete_face(self, face_id: str) -> dict[str, Any]:
        """Delete one face (the subject stays, possibly with no faces); returns what was deleted."""
        if "\x00" in face_id:  # PostgreSQL text cannot hold NUL: no face has such an id
            raise UnknownFace(face_id)
        with self._pool.connection() as conn, conn.transaction():
            generation = self._begin_change(conn)
            row = conn.execute("DELETE FROM gallery_faces WHERE face_id = %s RETURNING vid, subject",
                               (face_id,)).fetchone()
            if row is None:
                raise UnknownFace(face_id)
            faces_total = self._log_change(conn, generation, "remove", [int(row["vid"])])
        self._apply_own(generation, faces_total, remove=[int(row["vid"])])
        return {"face_id": face_id, "subject": row["subject"]}

    # ----- queries --------------------------------------------------------------------------------------
    def search(self, queries: np.ndarray, top_k: int) -> list[list[Hit]]:
        """For each query, the best face of each of the top_k nearest subjects (current model only)."""
        q = as_queries(queries, self.model.dim)
        with self._rw.read():
            return nearest_subjects(self.index, q, top_k, self._face_info)

    def _face_info(self, vids: set[int]) -> dict[int, tuple[str, str]]:
        if not vids:
            return {}
        with self._pool.connection() as conn:
            rows = conn.execute("SELECT vid, face_id, subject FROM gallery_faces WHERE vid = ANY(%s)",
                                (sorted(vids),)).fetchall()
        return {int(r["vid"]): (r["face_id"], r["subject"]) for r in rows}

    def subject_embeddings(self, subject: str) -> tuple[list[str], np.ndarray]:
        """(face ids, embeddings) of a subject made by the current model; ModelMismatch when the subject's
        faces all come from another model, UnknownSubject when there is no such subject."""
        validate_subject(subject)
        with self._pool.connection() as conn, conn.transaction():
            if conn.execute("SELECT 1 FROM gallery_subjects WHERE subject = %s", (subject,)).fetchone() is None:
                raise UnknownSubject(subject)
            rows = conn.execute("SELECT face_id, embedding, model, model_sha256 FROM gallery_faces "
                                "WHERE subject = %s ORDER BY vid", (subject,)).fetchall()
        mine = [r for r in rows if (r["model"], r["model_sha256"]) == (self.model.name, self.model.sha256)]
        if rows and not mine:
            raise model_mismatch(subject, ((r["model"], r["model_sha256"]) for r in rows), self.model)
        vecs = np.frombuffer(b"".join(bytes(r["embedding"]) for r in mine), dtype=np.float32)
        return [r["face_id"] for r in mine], vecs.reshape(len(mine), self.model.dim)

    def get_subject(self, subject: str) -> dict[str, Any]:
        """A subject with its faces (UnknownSubject)."""
        validate_subject(subject)
        with self._pool.connection() as conn, conn.transaction():
            row = conn.execute("SELECT created_at FROM gallery_subjects WHERE subject = %s", (subject,)).fetchone()
            if row is None:
                raise UnknownSubject(subject)
            faces = conn.execute("SELECT face_id, model, model_sha256, box, image, created_at FROM gallery_faces "
                                 "WHERE subject = %s ORDER BY vid", (subject,)).fetchall()
        return subject_record(subject, row["created_at"], faces, self.model)

    def list_subjects(self, limit: int, offset: int) -> tuple[list[dict[str, Any]], int]:
        """A page of subjects (sorted by id) with face counts, and the total number of subjects."""
        with self._pool.connection() as conn, conn.transaction():
            total = int(conn.execute("SELECT COUNT(*) AS n FROM gallery_subjects").fetchone()["n"])
            if offset >= total or limit <= 0:  # also keeps values beyond 64-bit integers out of the query
                return [], total
            rows = conn.execute(
                "SELECT s.subject, s.created_at, COUNT(f.vid) AS n, "
                "COUNT(f.vid) FILTER (WHERE f.model = %s AND f.model_sha256 = %s) AS mine "
                "FROM gallery_subjects s LEFT JOIN gallery_faces f ON f.subject = s.subject "
                "GROUP BY s.subject ORDER BY s.subject LIMIT %s OFFSET %s",
                (self.model.name, self.model.sha256, min(limit, 2**63 - 1), max(offset, 0))).fetchall()
        return [{"subject": r["subject"], "created_at": r["created_at"], "face_count": int(r["n"]),
                 "faces_from_other_models": int(r["n"]) - int(r["mine"])} for r in rows], total

    def stats(self) -> dict[str, Any]:
        """Counts of subjects, faces and indexed faces, and the model."""
        with self._pool.connection() as conn:
            row = conn.execute("SELECT (SELECT COUNT(*) FROM gallery_faces) AS faces, "
                               "(SELECT COUNT(*) FROM gallery_subjects) AS subjects").fetchone()
        faces, subjects = int(row["faces"]), int(row["subjects"])
        with self._rw.read():
            indexed = self.index.ntotal
            kind = self.index.trained_kind
        return gallery_stats(subjects=subjects, faces=faces, indexed=indexed, index_kind=kind,
                             index_source=self.index_source, model=self.model)
