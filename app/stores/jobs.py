"""Durable job store: SQLite (WAL) records plus files on disk, shared safely by several processes.

A job's input files are written before its row exists, so a worker never claims a job without
inputs. Claiming is one atomic UPDATE ... WHERE status = 'queued' inside an immediate transaction,
so two workers (threads or processes) never run the same job. A running job carries a heartbeat;
a job whose heartbeat stopped (its worker crashed or the server was killed) is requeued, or failed
with a reason once it has used its attempts, so nothing stays "running" forever.

Every job records its owner (the principal that submitted it); reads and deletions can be limited to
one owner. Finished jobs are bounded by count and bytes on disk: whenever a job finishes (and on
`prune`), the oldest finished jobs beyond either bound are deleted with their files; queued and
running jobs are never evicted.

The records (`Job`) and errors (`QueueFull`) are the store-independent ones of `app.stores.interfaces`;
`JobStore` satisfies its `JobStoreProtocol`, and `app.stores.factory` builds it from the settings.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from app.stores.common import JobFiles, check_page, equal_conditions, new_job_fields, state_counts
from app.stores.common import dir_bytes as _dir_bytes
from app.stores.interfaces import FINISHED, Job, QueueFull

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    status TEXT NOT NULL,
    params TEXT NOT NULL,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    heartbeat_at REAL,
    worker TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    progress REAL NOT NULL DEFAULT 0,
    step INTEGER NOT NULL DEFAULT 0,
    total_steps INTEGER NOT NULL DEFAULT 0,
    loss REAL,
    error TEXT,
    info TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS jobs_status_created ON jobs(status, created_at);
CREATE INDEX IF NOT EXISTS jobs_created ON jobs(created_at);
"""
# columns added after the first release: (name, declaration), added to older databases when missing
_ADDED_COLUMNS = (
    ("owner", "TEXT"),  # the principal that submitted the job (NULL: made before owners were recorded)
    ("size_bytes", "INTEGER"),  # bytes of the job's files, measured when it finished
)
# stale recovery (`JobFiles._recover`): back to the queue (id), or finished (status, finished_at, error, size_bytes, id)
_REQUEUE_STALE = ("UPDATE jobs SET status = 'queued', worker = NULL, heartbeat_at = NULL, progress = 0, step = 0 "
                  "WHERE id = ?")
_FINISH_STALE = "UPDATE jobs SET status = ?, finished_at = ?, error = ?, size_bytes = ? WHERE id = ?"
_ADDED_INDEXES = "CREATE INDEX IF NOT EXISTS jobs_owner_created ON jobs(owner, created_at);"
# SQLite integers are signed 64-bit: a larger LIMIT or OFFSET is an OverflowError, not an empty page
SQLITE_MAX_INT = 2**63 - 1


def _job_from_row(row: sqlite3.Row) -> Job:
    """A Job from one row of the jobs table (JSON columns decoded)."""
    d = dict(row)
    d["params"] = json.loads(d["params"])
    d["info"] = json.loads(d["info"])
    d["cancel_requested"] = bool(d["cancel_requested"])
    return Job(**d)


def _owner_clause(owner: str | None) -> tuple[str, list[Any]]:
    """SQL condition (with a leading AND) restricting rows to one owner; nothing when owner is None."""
    return equal_conditions("?", owner=owner)


class JobStore(JobFiles):
    """Jobs in SQLite under `root/jobs.db`, their files under `root/files/<id>/`.

    `max_finished` and `max_finished_bytes` bound the finished jobs kept (None: unbounded); the
    oldest finished jobs beyond either bound are deleted whenever a job finishes and on `prune()`.
    """

    def __init__(self, root: Path, *, max_attempts: int = 2, stale_after: float = 60.0,
                 max_finished: int | None = None, max_finished_bytes: int | None = None) -> None:
        self.root = Path(root)
        self.files_root = self.root / "files"
        self.files_root.mkdir(parents=True, exist_ok=True)
        self.db_path = self.root / "jobs.db"
        self.max_attempts = max_attempts
        self.stale_after = stale_after
        self.max_finished = max_finished
        self.max_finished_bytes = max_finished_bytes
        self._local = threading.local()
        self._conn().executescript(_SCHEMA)  # executescript manages its own transaction
        self._migrate()

    def _migrate(self) -> None:
        """Add the columns later versions introduced to an older database (in one transaction, so two
        processes opening the same old database do not both add them)."""
        with self._tx() as db:
            have = {r[1] for r in db.execute("PRAGMA table_info(jobs)").fetchall()}
            for name, decl in _ADDED_COLUMNS:
                if name not in have:
                    db.execute(f"ALTER TABLE jobs ADD COLUMN {name} {decl}")
        self._conn().executescript(_ADDED_INDEXES)

    # -- connections ---------------------------------------------------------------------------
    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.db_path, timeout=30.0, isolation_level=None, check_same_thread=True)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")  # an acknowledged job survives power loss, not just a crash
            conn.execute("PRAGMA busy_timeout=30000")
            self._local.conn = conn
        return conn

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """An IMMEDIATE transaction: takes the write lock up front, so read-then-write is atomic."""
        db = self._conn()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def close(self) -> None:
        """Close this thread's connection."""
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    @property
    def location(self) -> str:
        """The store's directory (records in jobs.db, files under files/), for logs."""
        return str(self.root)

    # -- lifecycle -----------------------------------------------------------------------------
    def create(self, kind: str, params: dict[str, Any], files: dict[str, bytes], *, max_queued: int,
               info: dict[str, Any] | None = None, owner: str | None = None) -> Job:
        """Store the input files, then the queued record; QueueFull when too many jobs wait.

        All or nothing: when the record cannot be stored, the files written for it are removed.
        """
        job_id, params_json, info_json = new_job_fields(params, info)
        try:
            with self._tx() as db:
                queued = db.execute("SELECT COUNT(*) FROM jobs WHERE status = 'queued'").fetchone()[0]
                if queued >= max_queued:
                    raise QueueFull(queued, max_queued)
                for name, data in files.items():
                    self.write_file(job_id, name, data)
                db.execute(
                    "INSERT INTO jobs (id, kind, status, params, created_at, info, owner) "
                    "VALUES (?, ?, 'queued', ?, ?, ?, ?)",
                    (job_id, kind, params_json, time.time(), info_json, owner),
                )
        except BaseException:
            self.remove_files(job_id)
            raise
        job = self.get(job_id)
        assert job is not None
        return job

    def get(self, job_id: str, *, owner: str | None = None) -> Job | None:
        """A job by id, or None (also when `owner` is given and the job is someone else's)."""
        cond, args = _owner_clause(owner)
        row = self._conn().execute(f"SELECT * FROM jobs WHERE id = ?{cond}", (job_id, *args)).fetchone()
        return _job_from_row(row) if row else None

    def list_jobs(self, *, limit: int = 20, offset: int = 0, status: str | None = None,
                  owner: str | None = None) -> tuple[list[Job], int]:
        """Jobs newest first (only `owner`'s when given), and the total count (for pagination)."""
        check_page(limit, offset)
        cond, args = equal_conditions("?", status=status or None, owner=owner)
        where = "WHERE 1 = 1" + cond
        db = self._conn()
        total = db.execute(f"SELECT COUNT(*) FROM jobs {where}", args).fetchone()[0]
        if offset >= total:  # also keeps offsets beyond SQLite's 64-bit integers out of the query
            return [], total
        rows = db.execute(f"SELECT * FROM jobs {where} ORDER BY created_at DESC, id LIMIT ? OFFSET ?",
                          [*args, min(limit, SQLITE_MAX_INT), offset]).fetchall()
        return [_job_from_row(r) for r in rows], total

    def queue_position(self, job: Job) -> int | None:
        """0-based position among queued jobs (None unless queued)."""
        if job.status != "queued":
            return None
        return int(self._conn().execute(
            "SELECT COUNT(*) FROM jobs WHERE status = 'queued' AND (created_at < ? OR (created_at = ? AND id < ?))",
            (job.created_at, job.created_at, job.id)).fetchone()[0])

    def counts(self) -> dict[str, int]:
        """Number of jobs in each state."""
        rows = self._conn().execute("SELECT status, COUNT(*) FROM jobs GROUP BY status").fetchall()
        return state_counts((r[0], r[1]) for r in rows)

    def mean_duration(self, kind: str, last: int = 20) -> float | None:
        """Mean run time of the last successful jobs of a kind (for ETAs)."""
        row = self._conn().execute(
            "SELECT AVG(finished_at - started_at) FROM (SELECT finished_at, started_at FROM jobs "
            "WHERE kind = ? AND status = 'succeeded' ORDER BY finished_at DESC LIMIT ?)", (kind, last)).fetchone()
        return float(row[0]) if row and row[0] is not None else None

    def claim(self, worker: str, kinds: tuple[str, ...] = ("style",)) -> Job | None:
        """Atomically take the oldest queued job: at most one worker ever gets a given job."""
        marks = ",".join("?" * len(kinds))
        now = time.time()
        with self._tx() as db:
            row = db.execute(
                f"SELECT id FROM jobs WHERE status = 'queued' AND kind IN ({marks}) ORDER BY created_at, id LIMIT 1",
                kinds).fetchone()
            if row is None:
                return None
            cur = db.execute(
                "UPDATE jobs SET status = 'running', worker = ?, started_at = ?, heartbeat_at = ?, "
                "attempts = attempts + 1, progress = 0, step = 0, error = NULL WHERE id = ? AND status = 'queued'",
                (worker, now, now, row[0]))
            if cur.rowcount != 1:
                return None
        return self.get(row[0])

    def heartbeat(self, job_id: str, worker: str, *, step: int, total: int, loss: float | None,
                  info: dict[str, Any] | None = None) -> bool:
        """Record progress; returns False when the job was canceled (or taken away) and should stop."""
        progress = min(1.0, step / total) if total else 0.0
        with self._tx() as db:
            row = db.execute("SELECT status, worker, cancel_requested, info FROM jobs WHERE id = ?",
                             (job_id,)).fetchone()
            if row is None or row["status"] != "running" or row["worker"] != worker or row["cancel_requested"]:
                return False
            merged = json.loads(row["info"]) | (info or {})
            db.execute("UPDATE jobs SET heartbeat_at = ?, step = ?, total_steps = ?, progress = ?, loss = ?, "
                       "info = ? WHERE id = ?", (time.time(), step, total, progress, loss, json.dumps(merged), job_id))
        return True

    def still_wanted(self, job_id: str, worker: str) -> bool:
        """A read-only check (no write lock): the job is still this worker's and nobody asked to cancel it."""
        row = self._conn().execute("SELECT status, worker, cancel_requested FROM jobs WHERE id = ?",
                                   (job_id,)).fetchone()
        return row is not None and row["status"] == "running" and row["worker"] == worker \
            and not row["cancel_requested"]

    def finish(self, job_id: str, worker: str, status: str, *, error: str | None = None,
               info: dict[str, Any] | None = None) -> bool:
        """Move a running job of this worker to a final state (False if it is no longer this worker's)."""
        if status not in FINISHED:
            raise ValueError(f"not a final state: {status}")
        with self._tx() as db:
            row = db.execute("SELECT status, worker, info FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None or row["status"] != "running" or row["worker"] != worker:
                return False
            merged = json.loads(row["info"]) | (info or {})
            progress_sql = ", progress = 1" if status == "succeeded" else ""
            size = _dir_bytes(self.job_dir(job_id))  # the result is written before the job finishes
            db.execute("UPDATE jobs SET status = ?, finished_at = ?, error = ?, info = ?, "
                       f"size_bytes = ?{progress_sql} WHERE id = ?",
                       (status, time.time(), error, json.dumps(merged), size, job_id))
        self.prune()
        return True

    def release(self, job_id: str, worker: str) -> bool:
        """Give a running job back to the queue (its worker is shutting down); the attempt does not count."""
        with self._tx() as db:
            cur = db.execute("UPDATE jobs SET status = 'queued', worker = NULL, heartbeat_at = NULL, progress = 0, "
                             "step = 0, attempts = MAX(attempts - 1, 0) WHERE id = ? AND worker = ? AND "
                             "status = 'running' AND cancel_requested = 0", (job_id, worker))
            return cur.rowcount == 1

    def _cancel_rows(self, job_id: str, owner: str | None) -> bool:
        cond, args = _owner_clause(owner)
        with self._tx() as db:
            cur = db.execute("UPDATE jobs SET status = 'canceled', finished_at = ?, error = 'canceled by request', "
                             f"size_bytes = ? WHERE id = ? AND status = 'queued'{cond}",
                             (time.time(), _dir_bytes(self.job_dir(job_id)), job_id, *args))
            finished = cur.rowcount == 1
            db.execute(f"UPDATE jobs SET cancel_requested = 1 WHERE id = ? AND status = 'running'{cond}",
                       (job_id, *args))
        return finished

    def _delete_row(self, job_id: str, owner: str | None) -> bool:
        cond, args = _owner_clause(owner)
        with self._tx() as db:
            cur = db.execute(f"DELETE FROM jobs WHERE id = ? AND status IN {FINISHED}{cond}", (job_id, *args))
            return cur.rowcount == 1

    def _recover_stale_rows(self, now: float | None) -> list[tuple[str, str]]:
        now = now or time.time()
        with self._tx() as db:
            rows = db.execute("SELECT id, attempts, cancel_requested, worker FROM jobs WHERE status = 'running' "
                              "AND (heartbeat_at IS NULL OR heartbeat_at < ?)", (now - self.stale_after,)).fetchall()
            return self._recover(db.execute, rows, now, requeue_sql=_REQUEUE_STALE, finish_sql=_FINISH_STALE)

    def requeue_worker(self, worker: str) -> int:
        """Requeue the running jobs of a worker that is known to be gone (e.g. this process at start-up)."""
        with self._tx() as db:
            cur = db.execute("UPDATE jobs SET heartbeat_at = NULL WHERE status = 'running' AND worker = ?", (worker,))
            n = cur.rowcount
        self.recover_stale()
        return n

    def expire(self, ttl_seconds: float, *, now: float | None = None) -> int:
        """Delete finished jobs (records and files) older than the time to live."""
        cutoff = (now or time.time()) - ttl_seconds
        with self._tx() as db:
            ids = [r[0] for r in db.execute(
                f"SELECT id FROM jobs WHERE status IN {FINISHED} AND finished_at < ?", (cutoff,)).fetchall()]
            db.executemany("DELETE FROM jobs WHERE id = ?", [(i,) for i in ids])
        self.remove_files(*ids)
        return len(ids)

    def prune(self) -> int:
        """Delete the oldest finished jobs (records and files) beyond `max_finished` jobs or
        `max_finished_bytes` bytes; queued and running jobs are never touched. Returns how many went.

        Finished jobs are kept newest first (by finish time) while both bounds hold; the first that
        would break one, and every older one, is deleted. A finished job whose size was never measured
        (a database from before sizes were recorded) is measured on disk here.
        """
        max_n, max_bytes = self.max_finished, self.max_finished_bytes
        if max_n is None and max_bytes is None:
            return 0
        evict: list[str] = []
        with self._tx() as db:
            rows = db.execute(f"SELECT id, size_bytes FROM jobs WHERE status IN {FINISHED} "
                              "ORDER BY finished_at DESC, created_at DESC, id DESC").fetchall()
            kept = kept_bytes = 0
            for r in rows:
                if evict:  # older than one already evicted: the oldest go first
                    evict.append(r["id"])
                    continue
                size = r["size_bytes"]
                if size is None:
                    size = _dir_bytes(self.job_dir(r["id"]))
                    db.execute("UPDATE jobs SET size_bytes = ? WHERE id = ?", (size, r["id"]))
                over_count = max_n is not None and kept + 1 > max_n
                if over_count or (max_bytes is not None and kept_bytes + size > max_bytes):
                    evict.append(r["id"])
                else:
                    kept, kept_bytes = kept + 1, kept_bytes + size
            db.executemany(f"DELETE FROM jobs WHERE id = ? AND status IN {FINISHED}", [(i,) for i in evict])
        self.remove_files(*evict)
        return len(evict)

    def finished_usage(self) -> tuple[int, int]:
        """(number of finished jobs, bytes their files took when they finished; unmeasured ones count 0)."""
        row = self._conn().execute(
            f"SELECT COUNT(*), COALESCE(SUM(size_bytes), 0) FROM jobs WHERE status IN {FINISHED}").fetchone()
        return int(row[0]), int(row[1])
