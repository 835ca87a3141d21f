"""An acknowledged enrolment survives kill -9 of a real server process (and so does a deletion)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from tests.api.test_faces import pattern
from tests.conftest import ROOT, write_tiny_face_model


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def server(tmp_path: Path, port: int) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    env = {**os.environ, "CNN_WEIGHTS_DIR": str(tmp_path / "weights"), "CNN_DATA_DIR": str(tmp_path / "data"),
           "CNN_CLASSIFIERS": "", "CNN_TEXT_MODELS": "", "CNN_FACE_MODELS": "tiny-face", "CNN_STYLE_ENABLED": "false",
           "CNN_WARMUP": "false", "CNN_DEVICE": "cpu", "CNN_TORCH_THREADS": "1", "CNN_LOG_LEVEL": "warning"}
    log = open(tmp_path / f"server-{port}.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--port", str(port)], cwd=ROOT, env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited: {(tmp_path / f'server-{port}.log').read_text()[-2000:]}")
            try:
                if httpx.get(f"{url}/faces/gallery", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("server did not start")
            time.sleep(0.2)
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
        log.close()


@pytest.mark.slow
def test_enrolment_acknowledged_before_kill_9_survives(tmp_path: Path) -> None:
    write_tiny_face_model(tmp_path / "weights")
    with server(tmp_path, free_port()) as (proc, url):
        r = httpx.post(f"{url}/faces/enroll", data={"subject": "alice", "detector": "none"},
                       files=[("image", ("a.png", pattern(1), "image/png"))], timeout=30)
        assert r.status_code == 201, r.text
        proc.kill()  # SIGKILL right after the 201: no shutdown hook, no snapshot
        face_id = r.json()["faces"][0]["face_id"]
        proc.wait(timeout=30)
    with server(tmp_path, free_port()) as (proc, url):
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
    with server(tmp_path, free_port()) as (proc, url):
        assert httpx.get(f"{url}/faces/subjects/alice", timeout=10).status_code == 404
        hit = httpx.post(f"{url}/faces/identify", data={"detector": "none"},
                         files=[("image", ("a.png", pattern(1), "image/png"))], timeout=30).json()["faces"][0]
        assert hit["candidates"] == []
