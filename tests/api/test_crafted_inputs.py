"""The crafted-input corpus (tests/crafted.py) against every endpoint that takes files: never a 5xx, every error a
problem-details 4xx that fits, every valid odd image served; and a real server's memory stays flat under it."""

from __future__ import annotations

import functools
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.runtime.images import decode_image
from app.settings import Settings
from tests.conftest import write_tiny_classifier, write_tiny_face_model
from tests.crafted import (
    ENDPOINTS,
    VALID,
    ImageCase,
    Outcome,
    RequestCase,
    image_status_of,
    memory_kb,
    report,
)
from tests.crafted import corpus as corpus_for
from tests.crafted import requests as requests_for
from tests.crafted import run_corpus as run_corpus_with
from tests.server import server

MAX_IMAGE_BYTES = 2 * 1024 * 1024  # lower than the default so the over-limit upload stays cheap
MAX_IMAGES = 16


def corpus() -> tuple[ImageCase, ...]:
    return corpus_for(MAX_IMAGE_BYTES)


def requests() -> list[RequestCase]:
    return requests_for(MAX_IMAGES)


def run_corpus(client: httpx.Client) -> Outcome:
    """The endpoint table, runner and judging live in tests/crafted.py (bench/abuse.py uses them too)."""
    return run_corpus_with(client, max_image_bytes=MAX_IMAGE_BYTES, max_images=MAX_IMAGES)


def write_models(weights: Path) -> None:
    write_tiny_classifier(weights)
    write_tiny_face_model(weights)


# ----------------------------------------------------------------------------------------------- the corpus


def test_corpus_statuses_are_what_decode_image_says() -> None:
    """The corpus's expectations agree with the decoder under the server's limits (so the API checks below test
    the endpoints, not the corpus)."""
    decode = functools.partial(decode_image, max_bytes=MAX_IMAGE_BYTES)
    wrong = {c.name: (c.expect, image_status_of(decode, c.data)) for c in corpus()
             if image_status_of(decode, c.data) != c.expect}
    assert wrong == {}
    names = [c.name for c in corpus()]
    assert len(names) == len(set(names))
    # the corpus covers what it promises
    for needle in ("mode-1.", "mode-L.", "mode-P.", "mode-RGB.", "mode-RGBA.", "mode-CMYK.", "mode-I.", "mode-I_16.",
                   "mode-F.", "mode-LA.", "mode-PA.", "mode-YCbCr.", "animated.gif", "animated.webp", "animated.apng",
                   "truncated.png", "truncated.jpg", "png-with-zip", "jpeg-with-html", "image.svg", "empty",
                   "random", "header-100000x100000.png", ".gif", ".bmp", "1x1", "strip-2000x1", "strip-1x2000"):
        assert any(needle in n for n in names), needle


# ----------------------------------------------------------------------------------------------- in process


@pytest.fixture
def crafted_settings(tmp_path: Path) -> Settings:
    write_models(tmp_path / "weights")
    return Settings(
        weights_dir=tmp_path / "weights", torch_home=tmp_path / "torch_home", classifiers=["tiny-cifar"],
        face_models=["tiny-face"], text_models=[], allow_untrained=False, allow_downloads=False, device="cpu",
        warmup=False, data_dir=tmp_path / "data", style_workers=0, style_max_queue=100_000,
        max_image_bytes=MAX_IMAGE_BYTES, max_images_per_request=MAX_IMAGES,
    )


def test_every_endpoint_answers_the_corpus_with_fitting_problems(
        crafted_settings: Settings, client_factory: Callable[[Settings], Any]) -> None:
    with client_factory(crafted_settings) as client:
        # the service is up and serves valid images on every endpoint before the corpus starts
        for ep in ENDPOINTS:
            r = client.post(ep.path, data=ep.data, files=ep.files("warm.png", VALID))
            assert r.status_code == ep.ok, (ep.name, r.text)
        out = run_corpus(client)
    assert out.failures == [], "\n".join(out.failures)
    report(out)
    assert out.requests == len(ENDPOINTS) * (len(corpus()) + len(requests()))
    assert max(out.statuses) < 500


# ----------------------------------------------------------------------------------------------- a real server


@contextmanager
def corpus_server(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """The service with the tiny models and in-process style jobs off (they only queue)."""
    env = {"CNN_CLASSIFIERS": "tiny-cifar", "CNN_TEXT_MODELS": "", "CNN_FACE_MODELS": "tiny-face",
           "CNN_STYLE_ENABLED": "true", "CNN_STYLE_WORKERS": "0", "CNN_STYLE_MAX_QUEUE": "100000",
           "CNN_MAX_IMAGE_BYTES": str(MAX_IMAGE_BYTES), "CNN_MAX_IMAGES_PER_REQUEST": str(MAX_IMAGES)}
    with server(tmp_path, env, kill=False) as running:
        yield running


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="needs /proc (Linux)")
def test_a_real_server_stays_small_and_never_fails_under_the_corpus(tmp_path: Path) -> None:
    write_models(tmp_path / "weights")
    with corpus_server(tmp_path) as (proc, url), httpx.Client(base_url=url, timeout=60) as client:
        for ep in ENDPOINTS:  # first use of every path (lazy imports, cascades, kernels) before the baseline
            r = client.post(ep.path, data=ep.data, files=ep.files("warm.png", VALID))
            assert r.status_code == ep.ok, (ep.name, r.text)
        before = memory_kb(proc.pid)
        started = time.monotonic()
        out = run_corpus(client)
        elapsed = time.monotonic() - started
        after = memory_kb(proc.pid)
        assert proc.poll() is None, "the server died"
        # an unknown method reaches the app (h11, not a parser that refuses it in bare text): 405 problem details
        r = client.request("FOO", "/classify")
        assert r.status_code == 405 and r.headers["content-type"] == "application/problem+json", r.text
    grew_mb = (after["VmRSS"] - before["VmRSS"]) / 1024
    peak_over_mb = (after["VmHWM"] - before["VmRSS"]) / 1024
    print(f"\n{out.requests} requests in {elapsed:.1f}s; statuses {dict(sorted(out.statuses.items()))}; "
          f"VmRSS {before['VmRSS'] / 1024:.0f} -> {after['VmRSS'] / 1024:.0f} MB (+{grew_mb:.1f} MB), "
          f"VmHWM {before['VmHWM'] / 1024:.0f} -> {after['VmHWM'] / 1024:.0f} MB")
    report(out)
    assert out.failures == [], "\n".join(out.failures)
    assert grew_mb < 200
    assert peak_over_mb < 400  # no request came close to the gigabytes a 2,000,000 x 1 strip used to take
