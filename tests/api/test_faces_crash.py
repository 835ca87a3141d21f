"""An acknowledged enrolment survives kill -9 of a real server process (and so does a deletion)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from tests.api.test_faces import pattern
from tests.conftest import write_tiny_face_model
from tests.server import free_port, server


@contextmanager
def tiny_face_server(tmp_path: Path, port: int) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    env = {"CNN_CLASSIFIERS": "", "CNN_TEXT_MODELS": "", "CNN_FACE_MODELS": "tiny-face", "CNN_STYLE_ENABLED": "false"}
    with server(tmp_path, env, probe="/faces/gallery", port=port) as running:
        yield running


@pytest.mark.slow
def test_enrolment_acknowledged_before_kill_9_survives(tmp_path: Path) -> None:
    write_tiny_face_model(tmp_path / "weights")
    with tiny_face_server(tmp_path, free_port()) as (proc, url):
        r = httpx.post(f"{url}/faces/enroll", data={"subject": "alice", "detector": "none"},
                       files=[("image", ("a.png", pattern(1), "image/png"))], timeout=30)
        assert r.status_code == 201, r.text
        proc.kill()  # SIGKILL right after the 201: no shutdown hook, no snapshot
        face_id = r.json()["faces"][0]["face_id"]
        proc.wait(timeout=30)
    with tiny_face_server(tmp_path, free_port()) as (proc, url):
        subj = httpx.get(f"{url}/faces/subjects/alice", timeout=10).json()
        assert [f["face_id"] for f in subj["faces"]] == [face_id]
        stats = httpx.get(f"{url}/faces/gallery", timeout=10).json()
        assert stats["index_source"] == "rebuilt" and stats["indexed_faces"] == 1
        hit = httpx.post(f"{url}/faces/identify", data={"detector": "none"},
                         files=[("image", ("a.png", pattern(1), "image/png"))], timeout=30).json()["faces"][0]
        assert hit["subject"] == "alice" and hit["candidates"][0]["face_id"] == face_id
        # a deletion acknowledged before a kill -9 stays deleted
        assert httpx.delete(f"{url}/faces/subjects/alice", timeout=10).status_code == 200
        proc.kill()
    with tiny_face_server(tmp_path, free_port()) as (proc, url):
        assert httpx.get(f"{url}/faces/subjects/alice", timeout=10).status_code == 404
        hit = httpx.post(f"{url}/faces/identify", data={"detector": "none"},
                         files=[("image", ("a.png", pattern(1), "image/png"))], timeout=30).json()["faces"][0]
        assert hit["candidates"] == []
