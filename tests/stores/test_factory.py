"""The store factory: stores configured exactly as the settings say, and the worker builds its store through it."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest

from app.settings import Settings
from app.stores import factory
from app.stores.gallery import GalleryStore
from app.stores.interfaces import GalleryProtocol, JobStoreProtocol, ModelKey
from app.stores.jobs import JobStore

KEY = ModelKey("face-a", "a" * 64, 8)


def test_job_store_is_configured_by_the_settings(tmp_path: Path) -> None:
    s = Settings(data_dir=tmp_path, style_stale_seconds=33.0, style_max_finished_jobs=7,
                 style_max_finished_bytes=12345)
    store = factory.open_job_store(s)
    try:
        assert isinstance(store, JobStore) and isinstance(store, JobStoreProtocol)
        assert store.root == tmp_path / "style-jobs" == factory.job_store_dir(s)
        assert store.location == str(tmp_path / "style-jobs")
        assert (store.stale_after, store.max_finished, store.max_finished_bytes) == (33.0, 7, 12345)
        assert store.max_attempts == 2  # the store's default, as the server has always used it
        job = store.create("style", {}, {"content": b"c"}, max_queued=1)
    finally:
        store.close()
    # a second store built from the same settings (the worker's) sees the same jobs
    again = factory.open_job_store(Settings(data_dir=tmp_path))
    try:
        assert again.get(job.id) is not None
    finally:
        again.close()


def test_gallery_is_configured_by_the_settings(tmp_path: Path) -> None:
    s = Settings(data_dir=tmp_path, gallery_index="ivf", gallery_ivf_nlist=8, gallery_ivf_nprobe=3,
                 gallery_gpu=False)
    gallery = factory.open_gallery(s, KEY)
    try:
        assert isinstance(gallery, GalleryStore) and isinstance(gallery, GalleryProtocol)
        assert gallery.root == tmp_path / "gallery" == factory.gallery_dir(s)
        assert gallery.model == KEY
        idx = gallery.index
        assert (idx.kind, idx.nlist, idx.nprobe, idx.use_gpu, idx.dim) == ("ivf", 8, 3, False, 8)
    finally:
        gallery.close(snapshot=False)


@pytest.mark.parametrize("kw", [
    {"gallery_index": "flat", "gallery_ivf_nlist": 1024, "gallery_ivf_nprobe": 16, "gallery_gpu": True},
    {"gallery_index": "ivf", "gallery_ivf_nlist": 64, "gallery_ivf_nprobe": 5, "gallery_gpu": False},
])
def test_gallery_gets_every_setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kw: dict[str, Any]) -> None:
    """Also the GPU switch, which a machine without a GPU would hide on a real store."""
    calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def spy(*a: Any, **k: Any) -> str:
        calls.append((a, k))
        return "store"

    monkeypatch.setattr(factory, "GalleryStore", spy)
    assert factory.open_gallery(Settings(data_dir=tmp_path, **kw), KEY) == "store"
    assert calls == [((tmp_path / "gallery", KEY), {"index_kind": kw["gallery_index"], "nlist": kw["gallery_ivf_nlist"],
                                                     "nprobe": kw["gallery_ivf_nprobe"], "use_gpu": kw["gallery_gpu"]})]


def test_the_worker_builds_its_store_through_the_factory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from app import cli
    from app.runtime import device
    from app.services.style import StyleWorker

    monkeypatch.setenv("CNN_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("CNN_STYLE_STALE_SECONDS", "42")
    monkeypatch.setenv("CNN_DEVICE", "cpu")
    monkeypatch.setattr(device, "configure_torch", lambda *a, **k: None)  # leave this process's torch threads alone
    monkeypatch.setattr("signal.signal", lambda *a: None)  # and pytest's own signal handlers
    built: list[tuple[Settings, JobStoreProtocol]] = []
    real_open = factory.open_job_store

    def spy(settings: Settings) -> JobStoreProtocol:
        store = real_open(settings)
        built.append((settings, store))
        return store

    ran: list[JobStoreProtocol] = []
    monkeypatch.setattr(factory, "open_job_store", spy)
    monkeypatch.setattr(StyleWorker, "recover", lambda self: None)
    monkeypatch.setattr(StyleWorker, "run_forever", lambda self: ran.append(self.store))
    assert cli.cmd_worker(argparse.Namespace()) == 0
    assert len(built) == 1 and ran == [built[0][1]]
    settings, store = built[0]
    assert settings.data_dir == tmp_path and isinstance(store, JobStore)
    assert store.root == tmp_path / "style-jobs" and store.stale_after == 42.0
    store.close()
