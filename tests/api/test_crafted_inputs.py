"""The crafted-input corpus (tests/crafted.py) against every endpoint that takes files: never a 5xx, every error a
problem-details 4xx that fits, every valid odd image served; and a real server's memory stays flat under it."""

from __future__ import annotations

import functools
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.runtime.images import decode_image
from app.settings import Settings
from tests.conftest import write_tiny_classifier, write_tiny_face_model
from tests.crafted import (
    IMAGE,
    OK,
    ImageCase,
    RequestCase,
    encode,
    image_corpus,
    image_status_of,
    noise,
    request_corpus,
)
from tests.server import server

MAX_IMAGE_BYTES = 2 * 1024 * 1024  # lower than the default so the over-limit upload stays cheap
MAX_IMAGES = 16
PROBLEM_KEYS = {"type", "title", "status", "detail"}
VALID = encode(noise((48, 40), seed=11), "PNG")


@dataclass(frozen=True)
class Endpoint:
    """One way of sending an upload: the route, the field the crafted file goes in, and what else the form needs."""

    name: str
    path: str
    upload_field: str
    data: dict[str, str] = field(default_factory=dict)
    others: tuple[tuple[str, str], ...] = ()  # (field, file name) of valid images sent alongside
    ok: int = 200

    def files(self, name: str, payload: bytes) -> list[tuple[str, tuple[str, bytes, str]]]:
        return [(self.upload_field, (name, payload, "application/octet-stream"))] + [
            (f, (n, VALID, "image/png")) for f, n in self.others]


NONE = {"detector": "none"}
STYLE = {"steps": "1", "size": "512"}  # jobs only queue (no workers): the size costs nothing
ENDPOINTS = [
    Endpoint("classify", "/classify", "image"),
    Endpoint("embed-haar", "/faces/embed", "image", {"detector": "haar"}),
    Endpoint("embed-none", "/faces/embed", "image", NONE),
    Endpoint("verify-image_a", "/faces/verify", "image_a", NONE, (("image_b", "b.png"),)),
    Endpoint("verify-image_b", "/faces/verify", "image_b", NONE, (("image_a", "a.png"),)),
    Endpoint("enroll", "/faces/enroll", "image", {"subject": "crafted", "detector": "none"}, ok=201),
    Endpoint("identify", "/faces/identify", "image", NONE),
    Endpoint("style-content", "/style-transfer", "content", STYLE, (("style", "s.png"),), ok=202),
    Endpoint("style-style", "/style-transfer", "style", STYLE, (("content", "c.png"),), ok=202),
]


@functools.cache
def corpus() -> tuple[ImageCase, ...]:
    return tuple(image_corpus(max_image_bytes=MAX_IMAGE_BYTES))


def requests() -> list[RequestCase]:
    return request_corpus(VALID, max_images=MAX_IMAGES)


def write_models(weights: Path) -> None:
    write_tiny_classifier(weights)
    write_tiny_face_model(weights)


def problem_errors(status: int, headers: Any, body: bytes, where: str) -> list[str]:
    """What is wrong with a response that must be a fitting problem-details 4xx (empty list: nothing)."""
    import json

    errors = []
    if status >= 500:
        errors.append(f"{where}: {status} {body[:300]!r}")
        return errors
    if not headers.get("content-type", "").startswith("application/problem+json"):
        errors.append(f"{where}: {status} with content-type {headers.get('content-type')!r}")
        return errors
    doc = json.loads(body)
    if not set(doc) >= PROBLEM_KEYS or doc["status"] != status:
        errors.append(f"{where}: not a problem document: {doc}")
    if "Traceback" in body.decode("utf-8", "replace"):
        errors.append(f"{where}: a traceback in the response")
    return errors


@dataclass
class Outcome:
    """What the corpus produced: failures to assert on, and 4xx answers to valid style images (reported)."""

    failures: list[str] = field(default_factory=list)
    style_refusals: list[str] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)
    requests: int = 0


def run_corpus(client: httpx.Client, *, endpoints: list[Endpoint] = ENDPOINTS) -> Outcome:
    """Send every crafted image to every endpoint, then every malformed request, and judge each answer."""
    out = Outcome()
    for ep in endpoints:
        for case in corpus():
            r = client.post(ep.path, data=ep.data, files=ep.files(case.name, case.data))
            _judge(out, ep, case.name, case.expect, r.status_code, r.headers, r.content)
        for rc in requests():
            files = [(ep.upload_field if f == IMAGE else f, v) for f, v in rc.files]
            files += [(f, (n, VALID, "image/png")) for f, n in ep.others]
            r = client.post(ep.path, data={**ep.data, **dict(rc.fields)}, files=files)
            _judge(out, ep, rc.name, rc.expect, r.status_code, r.headers, r.content)
    return out


def report(out: Outcome) -> None:
    """Print what is tolerated rather than failed, so it stays visible (pytest -s, or -rA)."""
    if out.style_refusals:
        print("\nvalid images the style service refused:\n  " + "\n  ".join(out.style_refusals))


def _judge(out: Outcome, ep: Endpoint, name: str, expect: int, status: int, headers: Any, body: bytes) -> None:
    out.requests += 1
    out.statuses[status] = out.statuses.get(status, 0) + 1
    where = f"{ep.name} <- {name}"
    if expect == OK:
        if status == ep.ok:
            return
        if ep.name.startswith("style") and status == 422:
            # the style service may refuse an image too small or thin for its algorithm: reported, not failed
            out.style_refusals.append(f"{where}: {body[:200]!r}")
            out.failures += problem_errors(status, headers, body, where)
            return
        out.failures.append(f"{where}: expected {ep.ok}, got {status} {body[:300]!r}")
        return
    out.failures += problem_errors(status, headers, body, where)
    if status != expect:
        out.failures.append(f"{where}: expected {expect}, got {status} {body[:300]!r}")


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


def memory_kb(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of a process, in kB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


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
    grew_mb = (after["VmRSS"] - before["VmRSS"]) / 1024
    peak_over_mb = (after["VmHWM"] - before["VmRSS"]) / 1024
    print(f"\n{out.requests} requests in {elapsed:.1f}s; statuses {dict(sorted(out.statuses.items()))}; "
          f"VmRSS {before['VmRSS'] / 1024:.0f} -> {after['VmRSS'] / 1024:.0f} MB (+{grew_mb:.1f} MB), "
          f"VmHWM {before['VmHWM'] / 1024:.0f} -> {after['VmHWM'] / 1024:.0f} MB")
    report(out)
    assert out.failures == [], "\n".join(out.failures)
    assert grew_mb < 200
    assert peak_over_mb < 400  # no request came close to the gigabytes a 2,000,000 x 1 strip used to take
