"""Store-independent logic shared by the SQLite and the PostgreSQL stores (each store keeps its own statements;
only `equal_conditions` writes a WHERE fragment, in the placeholder style it is given).

- Jobs: a job's files on disk (`JobFiles`), the decision for a running job whose heartbeat stopped
  (`stale_outcome`) with its messages, page checks and state counts.
- Gallery: checking new embeddings and shaping the records the gallery returns.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from app.stores.interfaces import STATES, Job, ModelKey, NewFace

# ----- jobs ---------------------------------------------------------------------------------------------------
CANCELED_BY_REQUEST = "canceled by request"


def gave_up(worker: str | None, attempts: int) -> str:
    """The error of a job failed because its worker kept stopping while running it."""
    return f"worker {worker} stopped while running the job ({attempts} attempts); giving up"


def stale_outcome(*, cancel_requested: bool, attempts: int, worker: str | None,
                  max_attempts: int) -> tuple[str, str | None]:
    """(new status, error) of a running job whose heartbeat stopped: a cancel request wins ("canceled"), a job
    that used its attempts is "failed", any other goes back to "queued" (no error)."""
    if cancel_requested:
        return "canceled", CANCELED_BY_REQUEST
    if attempts >= max_attempts:
        return "failed", gave_up(worker, attempts)
    return "queued", None


def recover_rows(rows: Iterable[Any], max_attempts: int, *, requeue: Callable[[str], object],
                 finish: Callable[[str, str, str | None], object]) -> list[tuple[str, str]]:
    """Apply `stale_outcome` to stale running rows (id, attempts, cancel_requested, worker): `requeue(id)` or
    `finish(id, status, error)` (each store's SQL); returns the (id, new status) pairs."""
    changed: list[tuple[str, str]] = []
    for r in rows:
        status, error = stale_outcome(cancel_requested=bool(r["cancel_requested"]), attempts=r["attempts"],
                                      worker=r["worker"], max_attempts=max_attempts)
        if status == "queued":
            requeue(r["id"])
        else:
            finish(r["id"], status, error)
        changed.append((r["id"], status))
    return changed


def new_job_fields(params: dict[str, Any], info: dict[str, Any] | None) -> tuple[str, str, str]:
    """(a new job id, params as JSON, info as JSON) for a job being created.

    allow_nan=False: a NaN or infinity is no valid parameter, and would break every JSON view of the job."""
    return uuid.uuid4().hex, json.dumps(params, allow_nan=False), json.dumps(info or {}, allow_nan=False)


def equal_conditions(mark: str, **columns: Any) -> tuple[str, list[Any]]:
    """SQL conditions, each with a leading AND, that the given columns equal their values (a column whose value is
    None is not restricted), and their arguments in order; `mark` is the driver's placeholder ("?" or "%s")."""
    names = [c for c, v in columns.items() if v is not None]
    return "".join(f" AND {c} = {mark}" for c in names), [columns[c] for c in names]


def fsync_write(path: Path, data: bytes) -> None:
    """Write a file atomically and durably: a temp file, fsynced, renamed over `path`."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def dir_bytes(path: Path) -> int:
    """Total size of the files in a job's directory (0 when it is gone)."""
    total = 0
    try:
        entries = list(os.scandir(path))
    except FileNotFoundError:
        return 0
    for entry in entries:
        try:
            if entry.is_file(follow_symlinks=False):
                total += entry.stat(follow_symlinks=False).st_size
        except FileNotFoundError:
            continue
    return total


class JobFiles:
    """What both job stores do alike: each job's files in `files_root/<id>/` (set by the store), and the parts of
    cancel, delete and stale recovery around each store's own SQL (`_cancel_rows`, `_delete_row`, `_stale_rows`)."""

    files_root: Path
    max_attempts: int

    def get(self, job_id: str, *, owner: str | None = None) -> Job | None:
        raise NotImplementedError

    def prune(self) -> int:
        raise NotImplementedError

    def _cancel_rows(self, job_id: str, owner: str | None) -> bool:
        """Cancel the job when queued, mark it when running; whether it was finished (canceled) now."""
        raise NotImplementedError

    def _delete_row(self, job_id: str, owner: str | None) -> bool:
        """Delete the record of a finished job; whether there was one."""
        raise NotImplementedError

    def _recover_stale_rows(self, now: float | None) -> list[tuple[str, str]]:
        """`recover_rows` over the stale running jobs, in one transaction."""
        raise NotImplementedError

    def _recover(self, execute: Callable[[str, tuple[Any, ...]], object], rows: Iterable[Any], now: float, *,
                 requeue_sql: str, finish_sql: str) -> list[tuple[str, str]]:
        """`recover_rows` with the store's statements: `requeue_sql` takes (id), `finish_sql` takes (status,
        finished_at, error, size_bytes, id)."""
        return recover_rows(
            rows, self.max_attempts, requeue=lambda job_id: execute(requeue_sql, (job_id,)),
            finish=lambda job_id, status, error: execute(
                finish_sql, (status, now, error, dir_bytes(self.job_dir(job_id)), job_id)))

    def remove_files(self, *job_ids: str) -> None:
        """Delete jobs' directories (what is already gone is no error)."""
        for job_id in job_ids:
            shutil.rmtree(self.job_dir(job_id), ignore_errors=True)

    def cancel(self, job_id: str, *, owner: str | None = None) -> Job | None:
        """Cancel a queued job at once; ask a running one to stop (its worker sees it at the next step).

        With `owner`, only that owner's job is touched (None is returned for anyone else's)."""
        finished = self._cancel_rows(job_id, owner)
        job = self.get(job_id, owner=owner)
        if finished:
            self.prune()
        return job

    def delete(self, job_id: str, *, owner: str | None = None) -> bool:
        """Remove a finished job's record and files (only `owner`'s when given)."""
        deleted = self._delete_row(job_id, owner)
        if deleted:
            self.remove_files(job_id)
        return deleted

    def recover_stale(self, *, now: float | None = None) -> list[tuple[str, str]]:
        """Requeue running jobs whose heartbeat stopped, or fail them once their attempts are used up."""
        changed = self._recover_stale_rows(now)
        if any(status != "queued" for _, status in changed):
            self.prune()
        return changed

    def job_dir(self, job_id: str) -> Path:
        """Directory of a job's files."""
        return self.files_root / job_id

    def write_file(self, job_id: str, name: str, data: bytes) -> Path:
        """Write one of a job's files atomically (temp file, fsync, rename)."""
        d = self.job_dir(job_id)
        d.mkdir(parents=True, exist_ok=True)
        path = d / name
        fsync_write(path, data)
        return path


def check_page(limit: int, offset: int) -> None:
    """ValueError for a negative limit or offset."""
    if limit < 0 or offset < 0:
        raise ValueError(f"limit and offset must be >= 0, got {limit} and {offset}")


def state_counts(rows: Iterable[tuple[str, int]]) -> dict[str, int]:
    """Number of jobs in each state (0 for the states without any) from (status, count) pairs."""
    out = dict.fromkeys(STATES, 0)
    out.update({status: int(n) for status, n in rows})
    return out


# ----- gallery ------------------------------------------------------------------------------------------------
def new_embeddings(faces: Sequence[NewFace], dim: int) -> list[np.ndarray]:
    """The faces' embeddings as flat float32 vectors; ValueError when there are none or one has another dimension."""
    if not faces:
        raise ValueError("nothing to enrol")
    vecs = []
    for f in faces:
        v = np.asarray(f.embedding, dtype=np.float32).reshape(-1)
        if v.shape[0] != dim:
            raise ValueError(f"embedding has {v.shape[0]} dimensions, the model makes {dim}")
        vecs.append(v)
    return vecs


def face_record(face_id: str, subject: str, face: NewFace, model: ModelKey, created_at: float) -> dict[str, Any]:
    """What enrolment returns for one stored face."""
    return {"face_id": face_id, "subject": subject, "box": face.box, "image": face.image, "model": model.name,
            "created_at": created_at}


def box_json(face: NewFace) -> str | None:
    """A new face's box as stored (JSON text, or None)."""
    return json.dumps(face.box) if face.box is not None else None


def subject_record(subject: str, created_at: float | None, faces: Sequence[Any], model: ModelKey) -> dict[str, Any]:
    """A subject with its faces (rows with face_id, model, model_sha256, box as JSON text, image, created_at)."""
    return {
        "subject": subject, "created_at": created_at, "face_count": len(faces),
        "faces": [{"face_id": f["face_id"], "model": f["model"], "model_sha256": f["model_sha256"],
                   "current_model": (f["model"], f["model_sha256"]) == (model.name, model.sha256),
                   "box": json.loads(f["box"]) if f["box"] else None, "image": f["image"],
                   "created_at": f["created_at"]} for f in faces],
    }


def gallery_stats(*, subjects: int, faces: int, indexed: int, index_kind: str, index_source: str,
                  model: ModelKey) -> dict[str, Any]:
    """The gallery's counts, index and model, as `stats()` returns them."""
    return {"subjects": subjects, "faces": faces, "indexed_faces": indexed,
            "faces_from_other_models": faces - indexed, "index": index_kind, "index_source": index_source,
            "model": model.name, "model_sha256": model.sha256}
