"""The one place stores are built from the settings: the server (`serve`) and the worker use these, nothing else
constructs a store, so choosing another implementation is a change here only."""

from __future__ import annotations

from pathlib import Path

from app.settings import Settings
from app.stores.gallery import GalleryStore, models_in_gallery
from app.stores.interfaces import GalleryProtocol, JobStoreProtocol, ModelKey
from app.stores.jobs import JobStore


def job_store_dir(settings: Settings) -> Path:
    """Directory of the style-job store (records and files) under the data directory."""
    return settings.data_dir / "style-jobs"


def gallery_dir(settings: Settings) -> Path:
    """Directory of the face gallery (database and index snapshot) under the data directory."""
    return settings.data_dir / "gallery"


def open_job_store(settings: Settings) -> JobStoreProtocol:
    """The style-job store the settings describe (shared by the server's workers and `app.cli worker`): on
    PostgreSQL when CNN_DATABASE_URL is set (files under CNN_DATA_DIR/style-jobs/files, which every replica must
    share), else SQLite under CNN_DATA_DIR/style-jobs."""
    if settings.database_url:
        from app.stores.pg_jobs import PgJobStore  # psycopg is an optional extra: imported only when chosen

        return PgJobStore(settings.database_url, job_store_dir(settings) / "files",
                          stale_after=settings.style_stale_seconds, max_finished=settings.style_max_finished_jobs,
                          max_finished_bytes=settings.style_max_finished_bytes)
    return JobStore(job_store_dir(settings), stale_after=settings.style_stale_seconds,
                    max_finished=settings.style_max_finished_jobs,
                    max_finished_bytes=settings.style_max_finished_bytes)


def open_gallery(settings: Settings, key: ModelKey) -> GalleryProtocol:
    """The face gallery of the embedding model `key` (blocking: it builds or loads the search index): on
    PostgreSQL when CNN_DATABASE_URL is set (each replica keeps its own index in step through the change feed),
    else SQLite + FAISS under CNN_DATA_DIR/gallery."""
    if settings.database_url:
        from app.stores.pg_gallery import PgGalleryStore  # psycopg is an optional extra: imported only when chosen

        return PgGalleryStore(settings.database_url, key, index_kind=settings.gallery_index,
                              nlist=settings.gallery_ivf_nlist, nprobe=settings.gallery_ivf_nprobe,
                              use_gpu=settings.gallery_gpu)
    return GalleryStore(gallery_dir(settings), key, index_kind=settings.gallery_index,
                        nlist=settings.gallery_ivf_nlist, nprobe=settings.gallery_ivf_nprobe,
                        use_gpu=settings.gallery_gpu)


def gallery_models(settings: Settings) -> dict[tuple[str, str], int]:
    """Faces per producing model (name, sha256) in the gallery the settings describe, read without opening it."""
    if settings.database_url:
        from app.stores.pg_gallery import pg_models_in_gallery

        return pg_models_in_gallery(settings.database_url)
    return models_in_gallery(gallery_dir(settings))
