"""The /classify load generator (bench/classify_load.py) against a real server behind a front worker: its counts,
the batch sizes it reads from the merged /metrics, and its load spread over several client processes."""

from __future__ import annotations

import asyncio
from pathlib import Path

from bench.classify_load import run_load
from tests.conftest import image_bytes, write_tiny_classifier
from tests.server import server
from tests.test_model_host import short_socket


def test_load_from_several_client_processes_through_a_front_worker(tmp_path: Path) -> None:
    write_tiny_classifier(tmp_path / "weights")
    env = {"CNN_FRONT_WORKERS": "1", "CNN_CLASSIFIERS": "tiny-cifar", "CNN_TEXT_MODELS": "", "CNN_FACE_MODELS": "",
           "CNN_STYLE_ENABLED": "false", "CNN_MODEL_HOST_SOCKET": short_socket()}
    with server(tmp_path, env) as (_, url):
        one = asyncio.run(run_load(url, model="tiny-cifar", concurrency=3, duration=1.0, warmup=0.3,
                                   image=image_bytes(), image_name="a.png"))
        spread = asyncio.run(run_load(url, model="tiny-cifar", concurrency=3, duration=1.5, warmup=0.3,
                                      image=image_bytes(), image_name="a.png", client_processes=2))
    for r in (one, spread):
        assert r.errors == 0 and r.ok > 0 and r.requests == r.ok
        assert r.p50_ms <= r.p99_ms <= r.max_ms
        # the host's batches, read through the front worker's merged /metrics
        assert r.batches is not None and r.batches > 0
        assert r.mean_batch_size is not None and 1.0 <= r.mean_batch_size <= 3.0


def test_the_transport_benchmark_runs() -> None:
    """bench/host_transport.py's row: a model process with an echo service, one client process; every call
    answered and counted."""
    from bench.host_transport import run_row

    row = run_row(clients=1, in_flight=4, payload=1000, seconds=0.5)
    assert row["calls"] > 0 and row["calls_per_s"] > 0
    assert row["p50_ms"] <= row["p99_ms"] and row["host_cpu_us_per_call"] is not None


def test_the_profiler_sees_the_service_threads_under_load(tmp_path: Path) -> None:
    """bench/profile_service.py: the service in its process, the load from another; the profile must hold the
    forwards run by the service's worker threads (the main thread only sleeps through the window)."""
    import json
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    write_tiny_classifier(tmp_path / "weights")
    env = {**os.environ, "CNN_WEIGHTS_DIR": str(tmp_path / "weights"), "CNN_DATA_DIR": str(tmp_path / "data"),
           "CNN_FACE_MODELS": "", "CNN_TEXT_MODELS": ""}
    out = tmp_path / "profile.json"
    r = subprocess.run([sys.executable, "-m", "bench.profile_service", "--model", "tiny-cifar", "--device", "cpu",
                        "--concurrency", "2", "--warmup", "1", "--duration", "1", "--json", str(out),
                        "--markdown", str(tmp_path / "profile.md")],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.loads(out.read_text())
    load, prof = data["load"][0], data["profile"]
    assert load["ok"] > 0 and load["errors"] == 0
    assert 0.9 <= prof["window_s"] <= 5
    assert prof["answered_in_window"] > 0  # the window opens only once the load is being answered
    names = {row["name"] for row in prof["top_self_cpu"]}
    assert any("conv" in n for n in names), names  # the classifier's forwards, from the batch threads
    assert prof["torch_cpu_cores_busy"] > 0 and prof["device_busy_fraction"] == 0  # no device on the CPU
    assert "top operators by self CPU time" in (tmp_path / "profile.md").read_text()
