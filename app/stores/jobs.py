"""Durable job store: SQLite (WAL) records plus files on disk, shared safely by several processes.

A job's input files are written before its row exists, so a worker never claims a job without
inputs. Claiming is one atomic UPDATE ... WHERE status = 'queued' inside an immediate transaction,
so two workers (threads or processes) never run the same job. A running job carries a heartbeat;
a job whose heartbeat stopped (its worker crashed or the server was killed) is requeued, or failed
with a reason once it has used its attempts, so nothing stays "running" forever.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STATES = ("queued", "running", "succeeded", "failed", "canceled")
FINISHED = ("succeeded", "failed", "canceled")

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


@dataclass(frozen=True)
class Job:
    """One job record."""

    id: str
    kind: str
    status: str
    params: dict[str, Any]
    created_at: float
    started_at: float | None
    finished_at: float | None
    heartbeat_at: float | None
    worker: str | None
    attempts: int
    cancel_requested: bool
    progress: float
    step: int
    total_steps: int
    loss: float | None
    error: str | None
    info: dict[str, Any]

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> Job:
        d = dict(row)
        d["params"] = json.loads(d["params"])
        d["info"] = json.loads(d["info"])
        d["cancel_requested"] = bool(d["cancel_requested"])
        return cls(**d)

    @property
    def finished(self) -> bool:
        """Whether the job reached a final state."""
        return self.status in FINISHED


class QueueFull(Exception):
    """Too many queued jobs."""

    def __init__(self, queued: int, limit: int) -> None:
        super().__init__(f"{queued} jobs are queued (limit {limit})")
        self.queued = queued
        self.limit = limit


def _fsync_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class JobStore:
    """Jobs in SQLite under `root/jobs.db`, their files under `root/files/<id>/`."""

    def __init__(self, root: Path, *, max_attempts: int = 2, stale_after: float = 60.0) -> None:
        self.root = Path(root)
        self.files_root = self.root / "files"
        self.files_root.mkdir(parents=True, exist_ok=True)
        self.db_path = self.root / "jobs.db"
        self.max_attempts = max_attempts
        self.stale_after = stale_after
        self._local = threading.local()
        self._conn().executescript(_SCHEMA)  # executescript manages its own transaction

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

    # -- files ---------------------------------------------------------------------------------
    def job_dir(self, job_id: str) -> Path:
        """Directory of a job's files."""
        return self.files_root / job_id

    def write_file(self, job_id: str, name: str, data: bytes) -> Path:
        """Write one of a job's files atomically (temp file, fsync, rename)."""
        d = self.job_dir(job_id)
        d.mkdir(parents=True, exist_ok=True)
        path = d / name
        _fsync_write(path, data)
        return path

    # -- lifecycle -----------------------------------------------------------------------------
    def create(self, kind: str, params: dict[str, Any], files: dict[str, bytes], *, max_queued: int,
               info: dict[str, Any] | None = None) -> Job:
        """Store the input files, then the queued record; QueueFull when too many jobs wait."""
        job_id = uuid.uuid4().hex
        with self._tx() as db:
            queued = db.execute("SELECT COUNT(*) FROM jobs WHERE status = 'queued'").fetchone()[0]
            if queued >= max_queued:
                raise QueueFull(queued, max_queued)
            for name, data in files.items():
                self.write_file(job_id, name, data)
            now = time.time()
            db.execute(
                "INSERT INTO jobs (id, kind, status, params, created_at, info) VALUES (?, ?, 'queued', ?, ?, ?)",
                (job_id, kind, json.dumps(params), now, json.dumps(info or {})),
            )
        job = self.get(job_id)
        assert job is not None
        return job

    def get(self, job_id: str) -> Job | None:
        """A job by id, or None."""
        row = self._conn().execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return Job.from_row(row) if row else None

    def list_jobs(self, *, limit: int = 20, offset: int = 0, status: str | None = None) -> tuple[list[Job], int]:
        """Jobs newest first, and the total count (for pagination)."""
        where, args = ("WHERE status = ?", [status]) if status else ("", [])
        db = self._conn()
        total = db.execute(f"SELECT COUNT(*) FROM jobs {where}", args).fetchone()[0]
        rows = db.execute(f"SELECT * FROM jobs {where} ORDER BY created_at DESC, id LIMIT ? OFFSET ?",
                          [*args, limit, offset]).fetchall()
        return [Job.from_row(r) for r in rows], total

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
        out = dict.fromkeys(STATES, 0)
        out.update({r[0]: r[1] for r in rows})
        return out

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
            db.execute(f"UPDATE jobs SET status = ?, finished_at = ?, error = ?, info = ?{progress_sql} WHERE id = ?",
                       (status, time.time(), error, json.dumps(merged), job_id))
        return True

    def release(self, job_id: str, worker: str) -> bool:
        """Give a running job back to the queue (its worker is shutting down); the attempt does not count."""
        with self._tx() as db:
            cur = db.execute("UPDATE jobs SET status = 'queued', worker = NULL, heartbeat_at = NULL, progress = 0, "
                             "step = 0, attempts = MAX(attempts - 1, 0) WHERE id = ? AND worker = ? AND "
                             "status = 'running' AND cancel_requested = 0", (job_id, worker))
            return cur.rowcount == 1

    def cancel(self, job_id: str) -> Job | None:
        """Cancel a queued job at once; ask a running one to stop (its worker sees it at the next step)."""
        with self._tx() as db:
            db.execute("UPDATE jobs SET status = 'canceled', finished_at = ?, error = 'canceled by request' "
                       "WHERE id = ? AND status = 'queued'", (time.time(), job_id))
            db.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ? AND status = 'running'", (job_id,))
        return self.get(job_id)

    def delete(self, job_id: str) -> bool:
        """Remove a finished job's record and files."""
        with self._tx() as db:
            cur = db.execute(f"DELETE FROM jobs WHERE id = ? AND status IN {FINISHED}", (job_id,))
            deleted = cur.rowcount == 1
        if deleted:
            shutil.rmtree(self.job_dir(job_id), ignore_errors=True)
        return deleted

    def recover_stale(self, *, now: float | None = None) -> list[tuple[str, str]]:
        """Requeue running jobs whose heartbeat stopped, or fail them once their attempts are used up."""
        now = now or time.time()
        changed: list[tuple[str, str]] = []
        with self._tx() as db:
            rows = db.execute("SELECT id, attempts, cancel_requested, worker FROM jobs WHERE status = 'running' "
                              "AND (heartbeat_at IS NULL OR heartbeat_at < ?)", (now - self.stale_after,)).fetchall()
            for r in rows:
                if r["cancel_requested"]:
                    db.execute("UPDATE jobs SET status = 'canceled', finished_at = ?, error = 'canceled by request' "
                               "WHERE id = ?", (now, r["id"]))
                    changed.append((r["id"], "canceled"))
                elif r["attempts"] >= self.max_attempts:
                    db.execute("UPDATE jobs SET status = 'failed', finished_at = ?, error = ? WHERE id = ?",
                               (now, f"worker {r['worker']} stopped while running the job "
                                     f"({r['attempts']} attempts); giving up", r["id"]))
                    changed.append((r["id"], "failed"))
                else:
                    db.execute("UPDATE jobs SET status = 'queued', worker = NULL, heartbeat_at = NULL, "
                               "progress = 0, step = 0 WHERE id = ?", (r["id"],))
                    changed.append((r["id"], "queued"))
        return changed

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
        for i in ids:
            shutil.rmtree(self.job_dir(i), ignore_errors=True)
        return len(ids)
