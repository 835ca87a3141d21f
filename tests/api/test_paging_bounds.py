"""Face gallery pagination bounds: huge offsets are a 422, never a 500 (issue 13, item 6; the style job list's
bounds are tested in test_style.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from app.settings import Settings
from app.stores.gallery import GalleryStore, ModelKey, NewFace
from tests.api.test_classify import assert_problem
from tests.conftest import write_tiny_face_model

HUGE = [2**31, 2**63 - 1, 2**63, 2**64, 10**30]  # SQLite integers are signed 64-bit


@pytest.mark.parametrize("offset", HUGE)
def test_subject_list_offset_beyond_the_bound_is_422(base_settings: Settings, client_factory, offset: int) -> None:
    write_tiny_face_model(base_settings.weights_dir)
    with client_factory(base_settings.model_copy(update={"face_models": ["tiny-face"]})) as c:
        body = assert_problem(c.get("/faces/subjects", params={"offset": offset}), 422)
        assert "offset" in body["detail"]
        last = c.get("/faces/subjects", params={"offset": 2**31 - 1})
        assert last.status_code == 200 and last.json()["subjects"] == [] and last.json()["next"] is None


def test_gallery_store_pages_past_the_end_are_empty(tmp_path: Path) -> None:
    store = GalleryStore(tmp_path / "gallery", ModelKey("m", "0" * 64, 4))
    try:
        v = np.array([1.0, 0.0, 0.0, 0.0], dtype=np.float32)
        store.enroll("alice", [NewFace(v)])
        for offset in (1, 2**63 - 1, 2**63, 2**100):
            assert store.list_subjects(10, offset) == ([], 1)
        rows, total = store.list_subjects(2**70, 0)  # an unbounded limit is every row, not an overflow
        assert total == 1 and [r["subject"] for r in rows] == ["alice"]
    finally:
        store.close()
