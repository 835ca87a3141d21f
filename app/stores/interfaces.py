"""What the services need from persistence: a job store and a face gallery, as small typed interfaces.

The services, the worker and the API know only these protocols and the records and errors below; the
implementations (`app.stores.jobs.JobStore`: SQLite + files, `app.stores.gallery.GalleryStore`: SQLite + FAISS)
are chosen and built by `app.stores.factory`. A second implementation (e.g. PostgreSQL) satisfies the same
protocols, returns the same records and raises the same errors; nothing here names a database.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

# ----- jobs ---------------------------------------------------------------------------------------------------
STATES = ("queued", "running", "succeeded", "failed", "canceled")
FINISHED = ("succeeded", "failed", "canceled")


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
    owner: str | None = None
    size_bytes: int | None = None

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


@runtime_checkable
class JobStoreProtocol(Protocol):
    """Durable jobs shared by the server and any number of workers: records plus each job's files on disk.

    Claims are atomic (one worker per job); a running job whose heartbeat stops is requeued or failed; `owner`
    arguments limit reads and changes to one principal's jobs (None: anyone's); finished jobs are bounded by the
    implementation's limits (`prune`)."""

    @property
    def location(self) -> str:
        """Where the records live, for logs (never a secret)."""
        ...

    def job_dir(self, job_id: str) -> Path:
        """Directory of a job's files."""
        ...

    def write_file(self, job_id: str, name: str, data: bytes) -> Path:
        """Write one of a job's files atomically."""
        ...

    def create(self, kind: str, params: dict[str, Any], files: dict[str, bytes], *, max_queued: int,
               info: dict[str, Any] | None = None, owner: str | None = None) -> Job:
        """Store the input files, then the queued record (all or nothing); QueueFull when too many jobs wait."""
        ...

    def get(self, job_id: str, *, owner: str | None = None) -> Job | None:
        """A job by id, or None (also when it is another owner's)."""
        ...

    def list_jobs(self, *, limit: int = 20, offset: int = 0, status: str | None = None,
                  owner: str | None = None) -> tuple[list[Job], int]:
        """Jobs newest first, and the total count."""
        ...

    def queue_position(self, job: Job) -> int | None:
        """0-based position among queued jobs (None unless queued)."""
        ...

    def counts(self) -> dict[str, int]:
        """Number of jobs in each of STATES."""
        ...

    def mean_duration(self, kind: str, last: int = 20) -> float | None:
        """Mean run time of the last successful jobs of a kind."""
        ...

    def claim(self, worker: str, kinds: tuple[str, ...] = ("style",)) -> Job | None:
        """Atomically take the oldest queued job of these kinds (running, attempts + 1)."""
        ...

    def heartbeat(self, job_id: str, worker: str, *, step: int, total: int, loss: float | None,
                  info: dict[str, Any] | None = None) -> bool:
        """Record progress; False when the job was canceled or is no longer this worker's."""
        ...

    def still_wanted(self, job_id: str, worker: str) -> bool:
        """A cheap read: the job is still this worker's and nobody asked to cancel it."""
        ...

    def finish(self, job_id: str, worker: str, status: str, *, error: str | None = None,
               info: dict[str, Any] | None = None) -> bool:
        """Move this worker's running job to a final state (ValueError for a state that is not final)."""
        ...

    def release(self, job_id: str, worker: str) -> bool:
        """Give a running job back to the queue without using an attempt."""
        ...

    def cancel(self, job_id: str, *, owner: str | None = None) -> Job | None:
        """Cancel a queued job at once; ask a running one to stop."""
        ...

    def delete(self, job_id: str, *, owner: str | None = None) -> bool:
        """Remove a finished job's record and files."""
        ...

    def recover_stale(self, *, now: float | None = None) -> list[tuple[str, str]]:
        """Requeue (or fail, or cancel) running jobs whose heartbeat stopped: [(job id, new state)]."""
        ...

    def requeue_worker(self, worker: str) -> int:
        """Requeue the running jobs of a worker known to be gone; returns how many it had."""
        ...

    def expire(self, ttl_seconds: float, *, now: float | None = None) -> int:
        """Delete finished jobs older than the time to live."""
        ...

    def prune(self) -> int:
        """Delete the oldest finished jobs beyond the store's bounds; returns how many went."""
        ...

    def close(self) -> None:
        """Release this thread's connection."""
        ...


# ----- face gallery -------------------------------------------------------------------------------------------
SUBJECT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@+-]{0,127}$")


class GalleryError(Exception):
    """Base class of gallery errors."""


class InvalidSubject(GalleryError):
    """A subject id that is not 1-128 safe characters."""


class UnknownSubject(GalleryError):
    """No such subject."""


class UnknownFace(GalleryError):
    """No such face."""


class ModelMismatch(GalleryError):
    """Stored embeddings were made by another model than the one asked for."""


def validate_subject(subject: str) -> str:
    """The subject id itself, or InvalidSubject explaining the rule."""
    if not isinstance(subject, str) or not SUBJECT_RE.fullmatch(subject):
        raise InvalidSubject("a subject id is 1-128 characters: letters, digits and . _ @ + -, starting with a "
                             "letter or digit")
    return subject


@dataclass(frozen=True)
class ModelKey:
    """The model that made an embedding."""

    name: str
    sha256: str
    dim: int


@dataclass(frozen=True)
class NewFace:
    """A face to enrol: its unit embedding and where it came from."""

    embedding: np.ndarray
    box: dict[str, Any] | None = None
    image: str | None = None


@dataclass(frozen=True)
class Hit:
    """One search result."""

    face_id: str
    subject: str
    similarity: float
    distance: float


class SearchIndex(Protocol):
    """The searchable part of a gallery, as far as callers may see it."""

    @property
    def ntotal(self) -> int:
        """Number of faces a search compares with (those of the gallery's model)."""
        ...


@runtime_checkable
class GalleryProtocol(Protocol):
    """Subjects and their faces' embeddings for one embedding model, with nearest-subject search.

    Faces made by another model are kept but never compared (`foreign_faces` counts them); every method
    validates subject ids (InvalidSubject) and refuses embeddings of the wrong dimension (ValueError)."""

    @property
    def model(self) -> ModelKey:
        """The model whose embeddings are searched."""
        ...

    @property
    def foreign_faces(self) -> int:
        """Faces made by another model (stored, not searched)."""
        ...

    @property
    def index(self) -> SearchIndex:
        """The search index (callers read only its size)."""
        ...

    def enroll(self, subject: str, faces: Sequence[NewFace]) -> list[dict[str, Any]]:
        """Store faces for a subject (created on first use), durably and all or nothing; the new face records."""
        ...

    def delete_subject(self, subject: str) -> int:
        """Delete a subject and all its faces (UnknownSubject); the number of faces deleted."""
        ...

    def delete_face(self, face_id: str) -> dict[str, Any]:
        """Delete one face (UnknownFace); {"face_id", "subject"}."""
        ...

    def search(self, queries: np.ndarray, top_k: int) -> list[list[Hit]]:
        """For each query, the best face of each of the top_k nearest subjects, nearest first."""
        ...

    def subject_embeddings(self, subject: str) -> tuple[list[str], np.ndarray]:
        """(face ids, embeddings) of a subject made by the gallery's model (UnknownSubject, ModelMismatch)."""
        ...

    def get_subject(self, subject: str) -> dict[str, Any]:
        """A subject with its faces (UnknownSubject)."""
        ...

    def list_subjects(self, limit: int, offset: int) -> tuple[list[dict[str, Any]], int]:
        """A page of subjects sorted by id, and the total number of subjects."""
        ...

    def stats(self) -> dict[str, Any]:
        """Counts of subjects, faces and indexed faces, and the model."""
        ...

    def close(self, *, snapshot: bool = True) -> None:
        """Persist what is worth keeping (when asked) and release the store."""
        ...
