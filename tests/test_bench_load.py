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
