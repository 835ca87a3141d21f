"""Durable job store on PostgreSQL: records in a `jobs` table, files in a directory every replica shares.

The second implementation of `app.stores.interfaces.JobStoreProtocol`, with the semantics of the SQLite
`app.stores.jobs.JobStore` (owners, attempts, heartbeats, cancel requests, stale recovery, expiry, bounds on
finished jobs), for several servers and workers on several hosts over one database (CNN_DATABASE_URL).

- Files: a job's inputs, result and preview live in `files_root/<job id>/`, NOT in the database. Every replica
  and worker must see the same `files_root` (one host, or a volume all of them mount: NFS, a shared Kubernetes
  volume, ...); a worker on a host without it would claim jobs whose inputs it cannot read. Input files are
  written before the record exists, so a worker never claims a job without inputs.
- Claims: one statement, `UPDATE jobs ... WHERE id = (SELECT id ... FOR UPDATE SKIP LOCKED LIMIT 1) RETURNING *`:
  concurrent claimers skip each other's rows instead of waiting, and a row is re-checked (still queued) once
  locked, so each job goes to exactly one worker.
- Clock: every timestamp (created, started, heartbeat, finished) is the database server's clock, in epoch
  seconds (double precision, like SQLite's REAL), so heartbeats from hosts with skewed clocks are judged
  fairly; `recover_stale(now=...)` and `expire(now=...)` accept an explicit time for tests and tools.
- Schema: versioned migrations of the component "jobs", applied at start-up by `app.stores.pg.migrate`.
- Threads: the service calls the store from many threads; each call borrows a connection from a small
  lock-protected pool (at most `pool_size` connections per store), never sharing one across threads at once.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from app.stores.common import JobFiles, check_page, equal_conditions, new_job_fields, state_counts
from app.stores.common import dir_bytes as _dir_bytes
from app.stores.interfaces import FINISHED, Job, QueueFull
from app.stores.pg import Pool, migrate, redact

COMPONENT = "jobs"
# steps[i] is schema version i + 1; never edit a released step, append a new one
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE jobs (
        id TEXT PRIMARY KEY,
        kind TEXT NOT NULL,
        status TEXT NOT NULL CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'canceled')),
        params JSONB NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        started_at DOUBLE PRECISION,
        finished_at DOUBLE PRECISION,
        heartbeat_at DOUBLE PRECISION,
        worker TEXT,
        attempts INTEGER NOT NULL DEFAULT 0,
        cancel_requested BOOLEAN NOT NULL DEFAULT FALSE,
        progress DOUBLE PRECISION NOT NULL DEFAULT 0,
        step INTEGER NOT NULL DEFAULT 0,
        total_steps INTEGER NOT NULL DEFAULT 0,
        loss DOUBLE PRECISION,
        error TEXT,
        info JSONB NOT NULL DEFAULT '{}'::jsonb,
        owner TEXT,
        size_bytes BIGINT
    );
    CREATE INDEX jobs_queued ON jobs (kind, created_at, id) WHERE status = 'queued';
    CREATE INDEX jobs_status_created ON jobs (status, created_at);
    CREATE INDEX jobs_created ON jobs (created_at);
    CREATE INDEX jobs_owner_created ON jobs (owner, created_at);
    CREATE INDEX jobs_running_heartbeat ON jobs (heartbeat_at) WHERE status = 'running';
    """,
)
# the server's clock in epoch seconds; now() is the transaction's start, so one statement sees one time
_NOW = "EXTRACT(EPOCH FROM now())::double precision"
_FINISHED_SQL = "('" + "', '".join(FINISHED) + "')"
# stale recovery (`JobFiles._recover`): back to the queue (id), or finished (status, finished_at, error, size_bytes, id)
_REQUEUE_STALE = ("UPDATE jobs SET status = 'queued', worker = NULL, heartbeat_at = NULL, progress = 0, step = 0 "
                  "WHERE id = %s")
_FINISH_STALE = "UPDATE jobs SET status = %s, finished_at = %s, error = %s, size_bytes = %s WHERE id = %s"
PG_MAX_BIGINT = 2**63 - 1
# creates take this transaction-level advisory lock around "count queued, insert", so the queue bound holds
# across replicas (SQLite gets the same from BEGIN IMMEDIATE)
_CREATE_LOCK = 0x6A6F6273  # "jobs"


def _job(row: dict[str, Any]) -> Job:
    """A Job from one row of the jobs table (psycopg decodes JSONB to dicts)."""
    return Job(**row)


def _owner_clause(owner: str | None) -> tuple[str, list[Any]]:
    """SQL condition (with a leading AND) restricting rows to one owner; nothing when owner is None."""
    return equal_conditions("%s", owner=owner)


class PgJobStore(JobFiles):
    """Jobs in PostgreSQL at `url`, their files under `files_root/<id>/` (a directory every replica shares).

    Options as `JobStore`: `max_attempts` runs before a job whose worker keeps dying is failed, `stale_after`
    seconds without a heartbeat before a running job counts as abandoned, `max_finished` / `max_finished_bytes`
    bounds on the finished jobs kept (None: unbounded); `pool_size` bounds this store's connections.
    """

    def __init__(self, url: str, files_root: Path, *, max_attempts: int = 2, stale_after: float = 60.0,
                 max_finished: int | None = None, max_finished_bytes: int | None = None, pool_size: int = 8) -> None:
        self.url = url
        self.files_root = Path(files_root)
        self.files_root.mkdir(parents=True, exist_ok=True)
        self.max_attempts = max_attempts
        self.stale_after = stale_after
        self.max_finished = max_finished
        self.max_finished_bytes = max_finished_bytes
        self.schema_version = migrate(url, COMPONENT, MIGRATIONS)
        self._pool = Pool(url, pool_size)

    def close(self) -> None:
        """Close the connections no thread is using (safe while other threads still use the store)."""
        self._pool.close_idle()

    @property
    def location(self) -> str:
        """The database (without password) and the files directory, for logs."""
        return f"{redact(self.url)} (files under {self.files_root})"

    # -- lifecycle -----------------------------------------------------------------------------
    def _queued(self, db: Any) -> int:
        return int(db.execute("SELECT COUNT(*) AS n FROM jobs WHERE status = 'queued'").fetchone()["n"])

    def create(self, kind: str, params: dict[str, Any], files: dict[str, bytes], *, max_queued: int,
               info: dict[str, Any] | None = None, owner: str | None = None) -> Job:
        """Store the input files, then the queued record (all or nothing); QueueFull when too many jobs wait."""
        job_id, params_json, info_json = new_job_fields(params, info)
        with self._pool.connection() as db:
            queued = self._queued(db)  # a full queue is refused before any file is written (cheap shedding)
            if queued >= max_queued:
                raise QueueFull(queued, max_queued)
            try:
                for name, data in files.items():
                    self.write_file(job_id, name, data)
                with db.transaction():
                    db.execute("SELECT pg_advisory_xact_lock(%s)", (_CREATE_LOCK,))
                    queued = self._queued(db)
                    if queued >= max_queued:
                        raise QueueFull(queued, max_queued)
                    row = db.execute(
                        "INSERT INTO jobs (id, kind, status, params, created_at, info, owner) VALUES "
                        "(%s, %s, 'queued', %s::jsonb, EXTRACT(EPOCH FROM clock_timestamp())::double precision, "
                        "%s::jsonb, %s) RETURNING *", (job_id, kind, params_json, info_json, owner)).fetchone()
            except BaseException:
                self.remove_files(job_id)
                raise
        return _job(row)

    def get(self, job_id: str, *, owner: str | None = None) -> Job | None:
        """A job by id, or None (also when `owner` is given and the job is someone else's)."""
        cond, args = _owner_clause(owner)
        with self._pool.connection() as db:
            row = db.execute(f"SELECT * FROM jobs WHERE id = %s{cond}", (job_id, *args)).fetchone()
        return _job(row) if row else None

    def list_jobs(self, *, limit: int = 20, offset: int = 0, status: str | None = None,
                  owner: str | None = None) -> tuple[list[Job], int]:
        """Jobs newest first (only `owner`'s when given), and the total count (for pagination)."""
        check_page(limit, offset)
        cond, args = equal_conditions("%s", status=status or None, owner=owner)
        where = "WHERE TRUE" + cond
        with self._pool.connection() as db:
            total = int(db.execute(f"SELECT COUNT(*) AS n FROM jobs {where}", args).fetchone()["n"])
            if offset >= total:  # also keeps offsets beyond PostgreSQL's 64-bit integers out of the query
                return [], total
            rows = db.execute(f"SELECT * FROM jobs {where} ORDER BY created_at DESC, id LIMIT %s OFFSET %s",
                              [*args, min(limit, PG_MAX_BIGINT), offset]).fetchall()
        return [_job(r) for r in rows], total

    def queue_position(self, job: Job) -> int | None:
        """0-based position among queued jobs (None unless queued)."""
        if job.status != "queued":
            return None
        with self._pool.connection() as db:
            row = db.execute(
                "SELECT COUNT(*) AS n FROM jobs WHERE status = 'queued' AND (created_at < %s OR "
                "(created_at = %s AND id < %s))", (job.created_at, job.created_at, job.id)).fetchone()
        return int(row["n"])

    def counts(self) -> dict[str, int]:
        """Number of jobs in each state."""
        with self._pool.connection() as db:
            rows = db.execute("SELECT status, COUNT(*) AS n FROM jobs GROUP BY status").fetchall()
        return state_counts((r["status"], r["n"]) for r in rows)

    def mean_duration(self, kind: str, last: int = 20) -> float | None:
        """Mean run time of the last successful jobs of a kind (for ETAs)."""
        with self._pool.connection() as db:
            row = db.execute(
                "SELECT AVG(finished_at - started_at) AS d FROM (SELECT finished_at, started_at FROM jobs "
                "WHERE kind = %s AND status = 'succeeded' ORDER BY finished_at DESC LIMIT %s) AS recent",
                (kind, last)).fetchone()
        return float(row["d"]) if row and row["d"] is not None else None

    def claim(self, worker: str, kinds: tuple[str, ...] = ("style",)) -> Job | None:
        """Atomically take the oldest queued job: at most one worker ever gets a given job.

        SKIP LOCKED: rows another claimer holds are passed over, not waited for; a row that stopped being
        queued while this statement waited for it fails the re-check and the next one is taken."""
        with self._pool.connection() as db:
            row = db.execute(
                f"UPDATE jobs SET status = 'running', worker = %s, started_at = {_NOW}, heartbeat_at = {_NOW}, "
                "attempts = attempts + 1, progress = 0, step = 0, error = NULL "
                "WHERE id = (SELECT id FROM jobs WHERE status = 'queued' AND kind = ANY(%s) "
                "ORDER BY created_at, id LIMIT 1 FOR UPDATE SKIP LOCKED) AND status = 'queued' RETURNING *",
                (worker, list(kinds))).fetchone()
        return _job(row) if row else None

    def heartbeat(self, job_id: str, worker: str, *, step: int, total: int, loss: float | None,
                  info: dict[str, Any] | None = None) -> bool:
        """Record progress; returns False when the job was canceled (or taken away) and should stop."""
        progress = min(1.0, step / total) if total else 0.0
        with self._pool.connection() as db:
            cur = db.execute(
                f"UPDATE jobs SET heartbeat_at = {_NOW}, step = %s, total_steps = %s, progress = %s, loss = %s, "
                "info = info || %s::jsonb WHERE id = %s AND status = 'running' AND worker = %s "
                "AND NOT cancel_requested", (step, total, progress, loss, json.dumps(info or {}), job_id, worker))
            return cur.rowcount == 1

    def still_wanted(self, job_id: str, worker: str) -> bool:
        """A read-only check: the job is still this worker's and nobody asked to cancel it."""
        with self._pool.connection() as db:
            row = db.execute("SELECT 1 FROM jobs WHERE id = %s AND status = 'running' AND worker = %s "
                             "AND NOT cancel_requested", (job_id, worker)).fetchone()
        return row is not None

    def finish(self, job_id: str, worker: str, status: str, *, error: str | None = None,
               info: dict[str, Any] | None = None) -> bool:
        """Move a running job of this worker to a final state (False if it is no longer this worker's)."""
        if status not in FINISHED:
            raise ValueError(f"not a final state: {status}")
        size = _dir_bytes(self.job_dir(job_id))  # the result is written before the job finishes
        progress_sql = ", progress = 1" if status == "succeeded" else ""
        with self._pool.connection() as db:
            cur = db.execute(
                f"UPDATE jobs SET status = %s, finished_at = {_NOW}, error = %s, info = info || %s::jsonb, "
                f"size_bytes = %s{progress_sql} WHERE id = %s AND status = 'running' AND worker = %s",
                (status, error, json.dumps(info or {}), size, job_id, worker))
            done = cur.rowcount == 1
        if done:
            self.prune()
        return done

    def release(self, job_id: str, worker: str) -> bool:
        """Give a running job back to the queue (its worker is shutting down); the attempt does not count."""
        with self._pool.connection() as db:
            cur = db.execute(
                "UPDATE jobs SET status = 'queued', worker = NULL, heartbeat_at = NULL, progress = 0, step = 0, "
                "attempts = GREATEST(attempts - 1, 0) WHERE id = %s AND worker = %s AND status = 'running' "
                "AND NOT cancel_requested", (job_id, worker))
            return cur.rowcount == 1

    def _cancel_rows(self, job_id: str, owner: str | None) -> bool:
        cond, args = _owner_clause(owner)
        size = _dir_bytes(self.job_dir(job_id))
        with self._pool.connection() as db, db.transaction():
            cur = db.execute(
                f"UPDATE jobs SET status = 'canceled', finished_at = {_NOW}, error = 'canceled by request', "
                f"size_bytes = %s WHERE id = %s AND status = 'queued'{cond}", (size, job_id, *args))
            finished = cur.rowcount == 1
            db.execute(f"UPDATE jobs SET cancel_requested = TRUE WHERE id = %s AND status = 'running'{cond}",
                       (job_id, *args))
        return finished

    def _delete_row(self, job_id: str, owner: str | None) -> bool:
        cond, args = _owner_clause(owner)
        with self._pool.connection() as db:
            cur = db.execute(f"DELETE FROM jobs WHERE id = %s AND status IN {_FINISHED_SQL}{cond}", (job_id, *args))
            return cur.rowcount == 1

    def _recover_stale_rows(self, now: float | None) -> list[tuple[str, str]]:
        """`now` defaults to the database server's clock. Rows another replica is recovering (locked) are skipped."""
        with self._pool.connection() as db, db.transaction():
            if now is None:
                now = float(db.execute(f"SELECT {_NOW} AS t").fetchone()["t"])
            rows = db.execute(
                "SELECT id, attempts, cancel_requested, worker FROM jobs WHERE status = 'running' "
                "AND (heartbeat_at IS NULL OR heartbeat_at < %s) ORDER BY created_at, id FOR UPDATE SKIP LOCKED",
                (now - self.stale_after,)).fetchall()
            return self._recover(db.execute, rows, now, requeue_sql=_REQUEUE_STALE, finish_sql=_FINISH_STALE)

    def requeue_worker(self, worker: str) -> int:
        """Requeue the running jobs of a worker that is known to be gone (e.g. this process at start-up)."""
        with self._pool.connection() as db:
            n = db.execute("UPDATE jobs SET heartbeat_at = NULL WHERE status = 'running' AND worker = %s",
                           (worker,)).rowcount
        self.recover_stale()
        return int(n)

    def expire(self, ttl_seconds: float, *, now: float | None = None) -> int:
        """Delete finished jobs (records and files) older than the time to live (`now`: the server's clock)."""
        with self._pool.connection() as db:
            rows = db.execute(
                f"DELETE FROM jobs WHERE status IN {_FINISHED_SQL} "
                f"AND finished_at < COALESCE(%s::double precision, {_NOW}) - %s::double precision RETURNING id",
                (now, ttl_seconds)).fetchall()
        self.remove_files(*(r["id"] for r in rows))
        return len(rows)

    def prune(self) -> int:
        """Delete the oldest finished jobs (records and files) beyond `max_finished` jobs or
        `max_finished_bytes` bytes; queued and running jobs are never touched. Returns how many went.

        Finished jobs are kept newest first (by finish time) while both bounds hold; the first that would break
        one, and every older one, is deleted: with the running count and running byte total over that order
        (both only grow), that is every row where either passes its bound, found in one statement. A size never
        measured (NULL) is measured on disk first, as the SQLite store does (this store always measures it)."""
        max_n, max_bytes = self.max_finished, self.max_finished_bytes
        if max_n is None and max_bytes is None:
            return 0
        with self._pool.connection() as db:
            if max_bytes is not None:
                unmeasured = db.execute(f"SELECT id FROM jobs WHERE status IN {_FINISHED_SQL} "
                                        "AND size_bytes IS NULL").fetchall()
                for r in unmeasured:
                    db.execute("UPDATE jobs SET size_bytes = %s WHERE id = %s AND size_bytes IS NULL",
                               (_dir_bytes(self.job_dir(r["id"])), r["id"]))
            rows = db.execute(
                f"DELETE FROM jobs WHERE status IN {_FINISHED_SQL} AND id IN (SELECT id FROM ("
                "SELECT id, row_number() OVER w AS n, SUM(COALESCE(size_bytes, 0)) OVER w AS b "
                f"FROM jobs WHERE status IN {_FINISHED_SQL} "
                "WINDOW w AS (ORDER BY finished_at DESC, created_at DESC, id DESC ROWS UNBOUNDED PRECEDING)"
                ") AS ranked WHERE (%(n)s::bigint IS NOT NULL AND n > %(n)s::bigint) "
                "OR (%(b)s::bigint IS NOT NULL AND b > %(b)s::bigint)) RETURNING id",
                {"n": max_n, "b": max_bytes}).fetchall()
        self.remove_files(*(r["id"] for r in rows))
        return len(rows)

    def finished_usage(self) -> tuple[int, int]:
        """(number of finished jobs, bytes their files took when they finished; unmeasured ones count 0)."""
        with self._pool.connection() as db:
            row = db.execute(f"SELECT COUNT(*) AS n, COALESCE(SUM(size_bytes), 0) AS b FROM jobs "
                             f"WHERE status IN {_FINISHED_SQL}").fetchone()
        return int(row["n"]), int(row["b"])
