"""A real server process for the tests that need one (kill -9, RSS): `python -m app.cli serve` on a free port."""

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

from tests.conftest import ROOT


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def server(tmp_path: Path, env: dict[str, str], *, probe: str = "/health/ready", port: int | None = None,
           kill: bool = True) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """Start the service with CNN_* settings `env` (weights and data under tmp_path, CPU, one torch thread, no
    warm-up unless overridden), wait until `probe` answers 200, yield (process, base URL); SIGKILL (kill=True)
    or SIGTERM it afterwards."""
    port = port or free_port()
    full = {**os.environ, "CNN_WEIGHTS_DIR": str(tmp_path / "weights"), "CNN_DATA_DIR": str(tmp_path / "data"),
            "CNN_WARMUP": "false", "CNN_DEVICE": "cpu", "CNN_TORCH_THREADS": "1", "CNN_LOG_LEVEL": "warning", **env}
    log_path = tmp_path / f"server-{port}.log"
    log = open(log_path, "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--port", str(port)], cwd=ROOT, env=full,
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited: {log_path.read_text()[-2000:]}")
            try:
                if httpx.get(f"{url}{probe}", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"server did not start: {log_path.read_text()[-2000:]}")
            time.sleep(0.2)
        yield proc, url
    finally:
        if proc.poll() is None:
            if kill:
                proc.kill()
            else:
                proc.terminate()
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
        proc.wait(timeout=30)
        log.close()
