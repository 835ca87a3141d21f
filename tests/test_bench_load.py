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
