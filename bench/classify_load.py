"""Closed-loop load generator for POST /classify (loopback servers only).

Single run against a server that is already up:

    python -m bench.classify_load --url http://127.0.0.1:8000 --model resnet18 \
        --concurrency 1,8,32 --duration 20 --warmup 3 --json runs/bench.json

Matrix: start the server itself (python -m app.cli serve, free port, CNN_* env) once per
model x batching (on: CNN_BATCH_MAX_SIZE=--batch-size, off: CNN_BATCH_MAX_SIZE=1), run every
concurrency level against it, stop it, and print a Markdown table:

    python -m bench.classify_load --matrix --model resnet18,resnet50 --concurrency 1,8,32 \
        --duration 20 --device cpu

Each of the N workers sends requests back to back (closed loop) through one shared
httpx.AsyncClient whose pool holds N connections. Reported: requests/s, p50/p95/p99 latency of
successful requests, errors by status, and the mean batch size the server ran during the
measured window (delta of cnn_batch_size_sum / cnn_batch_size_count from /metrics).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import ipaddress
import itertools
import json
import math
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

PROJECT_ROOT = Path(__file__).resolve().parent.parent



# --------------------------------------------------------------------------------------------- helpers

def ensure_loopback(url: str) -> None:
    """Refuse anything but a loopback server: this tool generates load, it must not point elsewhere."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise SystemExit(f"--url must be http(s)://, got {url!r}")
    host = parts.hostname
    if not host:
        raise SystemExit(f"--url has no host: {url!r}")
    try:
        infos = socket.getaddrinfo(host, parts.port or 80, proto=socket.IPPROTO_TCP)
    except socket.gaierror as exc:
        raise SystemExit(f"cannot resolve {host!r}: {exc}") from None
    addrs = {str(info[4][0]).split("%", 1)[0] for info in infos}
    bad = sorted(a for a in addrs if not ipaddress.ip_address(a).is_loopback)
    if not addrs or bad:
        raise SystemExit(f"refusing non-loopback host {host!r} ({', '.join(bad) or 'no address'}): "
                         "this load generator only targets 127.0.0.0/8 or ::1")


def make_test_image(size: int = 224, quality: int = 90) -> bytes:
    """A deterministic, photo-like (smooth gradients + noise) RGB JPEG generated in memory."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / max(1, size - 1)
    r = 255 * (0.5 + 0.5 * np.sin(6.0 * x + 2.0 * y))
    g = 255 * (0.5 + 0.5 * np.cos(4.0 * y - 3.0 * x))
    b = 255 * (x * y)
    img = np.stack([r, g, b], axis=-1) + rng.normal(0.0, 12.0, (size, size, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB").save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def percentile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100) of an already sorted list; NaN when empty."""
    if not sorted_values:
        return math.nan
    k = (len(sorted_values) - 1) * q / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo)


def parse_batch_metrics(text: str, model: str | None) -> tuple[float, float]:
    """(sum, count) of cnn_batch_size for one model, or summed over all models when model is None."""
    return histogram_totals(text, "cnn_batch_size", **({"model": model} if model else {}))


async def scrape_metrics(client: httpx.AsyncClient) -> str | None:
    """The server's /metrics text (None when it cannot be read)."""
    try:
        r = await client.get("/metrics")
        r.raise_for_status()
    except httpx.HTTPError:
        return None
    return r.text


_HIST_LINE = re.compile(r'^(cnn_[a-z_]+)_(sum|count)\{([^}]*)\}\s+(\S+)', re.MULTILINE)


def histogram_totals(text: str, name: str, **labels: str) -> tuple[float, float]:
    """(sum, count) of a histogram over the series whose labels include `labels`."""
    total = {"sum": 0.0, "count": 0.0}
    for metric, kind, label_text, value in _HIST_LINE.findall(text):
        if metric == name and all(f'{k}="{v}"' in label_text for k, v in labels.items()):
            total[kind] += float(value)
    return total["sum"], total["count"]


def stage_breakdown(before: str | None, after: str | None, *, route: str, model: str | None,
                    client_mean_ms: float) -> dict[str, float] | None:
    """Where a request's time went over the measured window, from the server's own histograms (means, ms):
    `client` as the load generator saw it; `server` from the gate's request timer (route, status 200);
    `queue_wait` per item before its batch ran; `forward` per batch; `server_other` = server - queue_wait - forward
    (multipart parsing, decode and preprocessing, response); `outside_server` = client - server (loopback, the
    client, the HTTP server's parsing before the middleware, event-loop scheduling). On a GPU machine this says
    first whether the HTTP side, the CPU preprocessing, the queue or the model holds the time."""
    if before is None or after is None:
        return None

    def mean_ms(name: str, **labels: str) -> float:
        s0, c0 = histogram_totals(before, name, **labels)
        s1, c1 = histogram_totals(after, name, **labels)
        return 1000 * (s1 - s0) / (c1 - c0) if c1 > c0 else math.nan

    by_model = {"model": model} if model else {}
    server = mean_ms("cnn_http_request_duration_seconds", route=route, status="200")
    wait = mean_ms("cnn_batch_queue_wait_seconds", **by_model)
    forward = mean_ms("cnn_batch_forward_seconds", **by_model)
    return {"client": round(client_mean_ms, 2), "server": round(server, 2), "queue_wait": round(wait, 2),
            "forward": round(forward, 2), "server_other": round(server - wait - forward, 2),
            "outside_server": round(client_mean_ms - server, 2)}


def stage_table(rows: list[tuple[str, dict[str, float] | None]]) -> list[str]:
    """The stage breakdowns as a Markdown table (rows: label, breakdown)."""
    lines = ["| row | client ms | server ms | queue wait ms | forward ms (per batch) | other in server ms | "
             "outside server ms |", "|---|---:|---:|---:|---:|---:|---:|"]
    for label, st in rows:
        if st:
            lines.append(f"| {label} | {fmt(st['client'])} | {fmt(st['server'])} | {fmt(st['queue_wait'])} | "
                         f"{fmt(st['forward'])} | {fmt(st['server_other'])} | {fmt(st['outside_server'])} |")
    return lines


def parse_int_list(text: str) -> list[int]:
    values = [int(p) for p in text.split(",") if p.strip()]
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, got {text!r}")
    return values


def parse_str_list(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


def _json_safe(v: Any) -> Any:
    """NaN/inf become null (strict JSON)."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    return v


def fmt(v: float | None, digits: int = 1) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.{digits}f}"


# --------------------------------------------------------------------------------------------- load

@dataclass
class LoadResult:
    model: str | None
    concurrency: int
    duration_s: float
    requests: int
    ok: int
    errors: int
    errors_by_status: dict[str, int]
    requests_per_s: float
    images_per_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    mean_ms: float
    max_ms: float
    mean_batch_size: float | None
    batches: int | None
    images_per_request: int
    batching: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


async def closed_loop(concurrency: int, seconds: float, send: Callable[[int], Awaitable[httpx.Response]],
                      ) -> tuple[list[float], Counter[str], float]:
    """`concurrency` workers each send request after request (send(n) for the n-th) until `seconds` pass.

    Returns the latencies of 200 responses, counts by status (or error name) and the elapsed time, which
    includes the tail: every counted request completed inside it. Shared by the text benchmark.
    """
    latencies: list[float] = []
    statuses: Counter[str] = Counter()
    counter = itertools.count()
    t0 = time.perf_counter()
    deadline = t0 + seconds

    async def worker() -> None:
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            try:
                r = await send(next(counter))
                await r.aread()
                key = str(r.status_code)
            except httpx.TimeoutException:
                key = "timeout"
            except httpx.HTTPError as exc:
                key = type(exc).__name__
            statuses[key] += 1
            if key == "200":
                latencies.append(time.perf_counter() - start)
            elif not key.isdigit():
                await asyncio.sleep(0.05)  # connection-level failure: do not spin

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, statuses, time.perf_counter() - t0


def _classify_request(image: bytes, image_name: str, images_per_request: int, top_k: int,
                      model: str | None) -> tuple[list[tuple[str, tuple[str, bytes, str]]], dict[str, str]]:
    """The multipart files and form fields of one /classify request."""
    ctype = "image/png" if image[:8] == b"\x89PNG\r\n\x1a\n" else "image/jpeg"
    files = [("image", (f"{i}-{image_name}", image, ctype)) for i in range(images_per_request)]
    data = {"top_k": str(top_k)}
    if model:
        data["model"] = model
    return files, data


def _client(url: str, concurrency: int, timeout: float, api_key: str | None) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    headers = {"X-API-Key": api_key} if api_key else {}
    return httpx.AsyncClient(base_url=url, limits=limits, timeout=timeout, headers=headers, trust_env=False)


async def _warm_then_measure(url: str, concurrency: int, duration: float, warmup: float, request: dict[str, Any],
                             timeout: float, api_key: str | None,
                             at_start: Callable[[httpx.AsyncClient], Awaitable[Any]],
                             at_end: Callable[[httpx.AsyncClient], Awaitable[Any]],
                             ) -> tuple[list[float], Counter[str], float, Any, Any]:
    """Warm up, call `at_start` (read /metrics, or wait for the other client processes), run the measured closed
    loop, call `at_end`; returns latencies, statuses, elapsed and what the two calls returned."""
    files, data = _classify_request(**request)
    async with _client(url, concurrency, timeout, api_key) as client:

        def send(n: int) -> Awaitable[httpx.Response]:
            return client.post("/classify", files=files, data=data)

        if warmup > 0:
            await closed_loop(concurrency, warmup, send)
        started = await at_start(client)
        latencies, statuses, elapsed = await closed_loop(concurrency, duration, send)
        ended = await at_end(client)
    return latencies, statuses, elapsed, started, ended


def _client_process(url: str, concurrency: int, duration: float, warmup: float, request: dict[str, Any],
                    timeout: float, api_key: str | None, barrier: Any, results: Any) -> None:
    """One load-generator process of `--client-processes`: warm up, wait at the barrier (the parent reads
    /metrics there), run the measured window, put (latencies, statuses, elapsed) on `results`."""

    async def wait(client: httpx.AsyncClient) -> None:
        await asyncio.to_thread(barrier.wait)

    async def nothing(client: httpx.AsyncClient) -> None:
        return None

    latencies, statuses, elapsed, _, _ = asyncio.run(_warm_then_measure(
        url, concurrency, duration, warmup, request, timeout, api_key, wait, nothing))
    results.put((latencies, dict(statuses), elapsed))


async def _load_in_processes(url: str, processes: int, concurrency: int, duration: float, warmup: float,
                             request: dict[str, Any], timeout: float, api_key: str | None,
                             ) -> tuple[list[float], Counter[str], float, str | None, str | None]:
    """The closed loop spread over `processes` load-generator processes (one Python process's HTTP client tops
    out far below what a GPU server answers): `concurrency` workers in all, measured over the same window."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    shares = [n for i in range(processes) if (n := concurrency // processes + (i < concurrency % processes))]
    barrier, results = ctx.Barrier(len(shares) + 1), ctx.Queue()
    procs = [ctx.Process(target=_client_process, args=(url, n, duration, warmup, request, timeout, api_key, barrier,
                                                       results), daemon=True) for n in shares]
    for p in procs:
        p.start()
    async with _client(url, 1, timeout, api_key) as scraper:
        await asyncio.to_thread(barrier.wait, warmup + 120)
        text_before = await scrape_metrics(scraper)
        parts = [await asyncio.to_thread(results.get, True, duration + timeout + 60) for _ in procs]
        text_after = await scrape_metrics(scraper)
    for p in procs:
        p.join(10)
    latencies = [x for lat, _, _ in parts for x in lat]
    statuses: Counter[str] = Counter()
    for _, st, _ in parts:
        statuses.update(st)
    return latencies, statuses, max(e for _, _, e in parts), text_before, text_after


async def run_load(url: str, *, model: str | None, concurrency: int, duration: float, warmup: float,
                   image: bytes, image_name: str = "bench.jpg", images_per_request: int = 1, top_k: int = 5,
                   api_key: str | None = None, timeout: float = 120.0, client_processes: int = 1) -> LoadResult:
    """Warm up, then run `concurrency` closed-loop workers (in `client_processes` processes) for `duration`
    seconds and summarise."""
    ensure_loopback(url)
    request: dict[str, Any] = {"image": image, "image_name": image_name, "images_per_request": images_per_request,
               "top_k": top_k, "model": model}
    if client_processes > 1:
        latencies, statuses, elapsed, text_before, text_after = await _load_in_processes(
            url, client_processes, concurrency, duration, warmup, request, timeout, api_key)
    else:
        latencies, statuses, elapsed, text_before, text_after = await _warm_then_measure(
            url, concurrency, duration, warmup, request, timeout, api_key, scrape_metrics, scrape_metrics)

    latencies.sort()
    total = sum(statuses.values())
    ok = statuses.get("200", 0)
    errors = {k: v for k, v in sorted(statuses.items()) if k != "200"}
    mean_batch = batches = None
    stages = stage_breakdown(text_before, text_after, route="/classify", model=model,
                             client_mean_ms=1000 * sum(latencies) / len(latencies) if latencies else math.nan)
    if text_before is not None and text_after is not None:
        before, after = parse_batch_metrics(text_before, model), parse_batch_metrics(text_after, model)
        d_sum, d_count = after[0] - before[0], after[1] - before[1]
        batches = int(d_count)
        mean_batch = d_sum / d_count if d_count > 0 else None
    return LoadResult(
        model=model, concurrency=concurrency, duration_s=round(elapsed, 3), requests=total, ok=ok,
        errors=total - ok, errors_by_status=errors,
        requests_per_s=ok / elapsed if elapsed > 0 else 0.0,
        images_per_s=ok * images_per_request / elapsed if elapsed > 0 else 0.0,
        p50_ms=1000 * percentile(latencies, 50), p95_ms=1000 * percentile(latencies, 95),
        p99_ms=1000 * percentile(latencies, 99),
        mean_ms=1000 * sum(latencies) / len(latencies) if latencies else math.nan,
        max_ms=1000 * latencies[-1] if latencies else math.nan,
        mean_batch_size=mean_batch, batches=batches, images_per_request=images_per_request,
        extra={"stages_ms": stages} if stages else {},
    )


def describe_errors(r: LoadResult) -> str:
    if not r.errors:
        return "0"
    return f"{r.errors} (" + ", ".join(f"{k}: {v}" for k, v in r.errors_by_status.items()) + ")"


# --------------------------------------------------------------------------------------------- machine

def machine_description(device: str | None = None) -> dict[str, Any]:
    """CPU model, core counts, torch version (from package metadata, torch is not imported), device."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 0
    try:
        torch_version = metadata.version("torch")
    except metadata.PackageNotFoundError:
        torch_version = "not installed"
    desc: dict[str, Any] = {"cpu": cpu, "logical_cpus": os.cpu_count(), "usable_cpus": usable,
                            "torch": torch_version, "python": platform.python_version(),
                            "platform": platform.platform(terse=True), "device": device}
    if device and device.startswith("cuda") and shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=10, check=True).stdout.strip()
            desc["gpu"] = out.splitlines()[0] if out else None
        except (OSError, subprocess.SubprocessError):
            pass
    return desc


def machine_lines(m: dict[str, Any]) -> list[str]:
    lines = [f"- CPU: {m['cpu']} ({m['logical_cpus']} logical CPUs, {m['usable_cpus']} usable by this process)",
             f"- torch {m['torch']}, Python {m['python']}, {m['platform']}",
             f"- device: {m.get('device') or 'unknown'}"]
    if m.get("gpu"):
        lines.append(f"- GPU: {m['gpu']}")
    return lines


async def model_info(url: str, model: str | None, api_key: str | None) -> dict[str, Any]:
    """GET /models/{model} (or the default classifier) for device and weights; {} when unavailable."""
    headers = {"X-API-Key": api_key} if api_key else {}
    try:
        async with httpx.AsyncClient(base_url=url, timeout=10, headers=headers, trust_env=False) as c:
            if model is None:
                r = await c.get("/models")
                r.raise_for_status()
                model = r.json().get("default_classifier")
                if not model:
                    return {}
            r = await c.get(f"/models/{model}")
            r.raise_for_status()
            return dict(r.json())
    except (httpx.HTTPError, ValueError):
        return {}


# --------------------------------------------------------------------------------------------- server (matrix)

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def model_ready(c: httpx.Client, model: str, where: str = "") -> str | None:
    """None once `model` is "ready" in GET /models, else what it is now; raises when it never will be (not
    configured, failed, unavailable). `where` (a log path) goes into the error."""
    r = c.get("/models")
    if r.status_code != 200:
        return f"/models {r.status_code}"
    entry = next((m for m in r.json().get("models", []) if m.get("name") == model), None)
    if entry is None:
        raise RuntimeError(f"server started without {model!r}; log: {where}")
    if entry.get("status") == "ready":
        return None
    if entry.get("status") in ("failed", "unavailable"):
        raise RuntimeError(f"{model}: {entry['status']}: {entry.get('reason')}; log: {where}")
    return f"{model} {entry.get('status')}"


class Server:
    """`python -m app.cli serve` on 127.0.0.1:<free port> as a child process."""

    def __init__(self, env_overrides: dict[str, str], *, python: str, log_path: Path, startup_timeout: float) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, **env_overrides, "CNN_HOST": "127.0.0.1", "CNN_PORT": str(self.port)}
        self.python = python
        self.log_path = log_path
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("wb")
        cmd = [self.python, "-m", "app.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port)]
        self.proc = subprocess.Popen(cmd, cwd=PROJECT_ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        log.close()
        self._wait_ready()

    def _wait_ready(self) -> None:
        """Poll `_probe` until the server serves, dies, or the start-up timeout passes."""
        assert self.proc is not None
        deadline = time.monotonic() + self.startup_timeout
        last = "no answer yet"
        with httpx.Client(base_url=self.url, timeout=5, trust_env=False) as c:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"server exited with {self.proc.returncode} before it was ready; "
                                       f"log: {self.log_path}\n{self.log_tail()}")
                try:
                    status = self._probe(c)
                    if status is None:
                        return
                    last = status
                except (httpx.HTTPError, ValueError) as exc:
                    last = type(exc).__name__
                time.sleep(0.5)
        raise RuntimeError(f"server not ready after {self.startup_timeout:.0f} s ({last}); log: {self.log_path}")

    def _probe(self, c: httpx.Client) -> str | None:
        """None once /health/ready is 200, else what it says; raises when the server will never serve."""
        r = c.get("/health/ready")
        if r.status_code == 200:
            return None
        body = r.json()
        last = f"{r.status_code} {body.get('status')}: {body.get('detail')}"
        if body.get("status") in ("failed", "no-models"):
            reasons = "; ".join(f"{m['name']}: {m.get('reason')}" for m in body.get("models", []))
            raise RuntimeError(f"server not serving ({last}) {reasons}; log: {self.log_path}")
        return last

    def log_tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGINT)  # uvicorn: graceful shutdown, runs the lifespan exit
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def __enter__(self) -> Server:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def server_env(args: argparse.Namespace, model: str, batching: bool) -> dict[str, str]:
    env = {
        "CNN_CLASSIFIERS": model,
        "CNN_DEFAULT_CLASSIFIER": model,
        "CNN_BATCH_MAX_SIZE": str(args.batch_size if batching else 1),
        "CNN_BATCH_MAX_WAIT_MS": str(args.batch_wait_ms),
        "CNN_BATCH_MAX_QUEUE": str(args.batch_queue),
        "CNN_BATCH_OVERRIDES": "{}",
        "CNN_ALLOW_UNTRAINED": "true" if args.allow_untrained else "false",
        "CNN_ALLOW_DOWNLOADS": "false",
        "CNN_API_KEYS": "",
        "CNN_LOG_LEVEL": "warning",
        "CNN_WARMUP": "true",
    }
    if args.device:
        env["CNN_DEVICE"] = args.device
    if args.torch_threads is not None:
        env["CNN_TORCH_THREADS"] = str(args.torch_threads)
    if args.inference_threads is not None:
        env["CNN_INFERENCE_THREADS"] = str(args.inference_threads)
    env["CNN_FRONT_WORKERS"] = str(args.front_workers)
    return env


def markdown_table(results: list[LoadResult]) -> list[str]:
    lines = ["| model | batching | concurrency | req/s | p50 ms | p95 ms | p99 ms | errors | mean batch |",
             "|---|---|---:|---:|---:|---:|---:|---|---:|"]
    for r in results:
        lines.append(f"| {r.model} | {r.batching} | {r.concurrency} | {fmt(r.requests_per_s)} | {fmt(r.p50_ms)} | "
                     f"{fmt(r.p95_ms)} | {fmt(r.p99_ms)} | {describe_errors(r)} | {fmt(r.mean_batch_size, 2)} |")
    return lines


def run_matrix(args: argparse.Namespace, image: bytes) -> tuple[list[LoadResult], list[str], dict[str, Any]]:
    models = args.model or ["resnet18", "resnet50"]
    modes = [m == "on" for m in args.batching]
    log_dir = Path(args.server_log_dir) if args.server_log_dir else Path(tempfile.mkdtemp(prefix="classify-bench-"))
    results: list[LoadResult] = []
    infos: dict[str, dict[str, Any]] = {}
    for model in models:
        for batching in modes:
            label = f"on (max {args.batch_size}, {fmt(args.batch_wait_ms, 1)} ms)" if batching else "off"
            log_path = log_dir / f"server-{model}-{'batch' if batching else 'nobatch'}.log"
            print(f"# starting server: {model}, batching {label} (log {log_path})", file=sys.stderr, flush=True)
            with Server(server_env(args, model, batching), python=args.python, log_path=log_path,
                        startup_timeout=args.startup_timeout) as srv:
                infos.setdefault(model, asyncio.run(model_info(srv.url, model, None)))
                for c in args.concurrency:
                    r = asyncio.run(run_load(srv.url, model=model, concurrency=c, duration=args.duration,
                                             warmup=args.warmup, image=image, image_name=args.image_name,
                                             images_per_request=args.images_per_request, top_k=args.top_k,
                                             timeout=args.timeout, client_processes=args.client_processes))
                    r.batching = "on" if batching else "off"
                    stages = r.extra.get("stages_ms")
                    if stages and args.front_workers > 1:
                        # the other front workers' request timers reach /metrics up to 2 s late (their reports
                        # to the model host): only the model host's columns (queue wait, forward) fit the window
                        stages.update(server=math.nan, server_other=math.nan, outside_server=math.nan)
                    r.extra = {**r.extra, "max_batch_size": args.batch_size if batching else 1,
                               "max_wait_ms": args.batch_wait_ms, "front_workers": args.front_workers,
                               "client_processes": args.client_processes}
                    results.append(r)
                    print(f"#   c={c}: {fmt(r.requests_per_s)} req/s, p50 {fmt(r.p50_ms)} ms, "
                          f"p99 {fmt(r.p99_ms)} ms, errors {describe_errors(r)}, "
                          f"mean batch {fmt(r.mean_batch_size, 2)}", file=sys.stderr, flush=True)
    devices = sorted({str(i.get("device")) for i in infos.values() if i.get("device")})
    machine = machine_description(", ".join(devices) or args.device)
    weights = {m: f"{i.get('weights')} ({i.get('weights_source')})" for m, i in infos.items() if i}
    lines = ["## /classify load benchmark", "", *machine_lines(machine)]
    lines.append(f"- load: closed loop, {args.duration:g} s per row after {args.warmup:g} s warm-up, "
                 f"{args.images_per_request} image(s) per request ({len(image)} B {args.image_name}), top_k "
                 f"{args.top_k}; server restarted per model x batching; torch threads "
                 f"{args.torch_threads if args.torch_threads is not None else 'default'}; "
                 + (f"{args.front_workers} front workers in front of one model process" if args.front_workers
                    else "one server process"))
    lines.append("- weights: " + (", ".join(f"{m}: {w}" for m, w in weights.items()) or "unknown"))
    if args.allow_untrained:
        lines.append("- CNN_ALLOW_UNTRAINED=true: models without local weights run with random weights; "
                     "speed does not depend on weight values")
    lines.append("- latency percentiles are over successful requests; mean batch = delta cnn_batch_size_sum / "
                 "delta cnn_batch_size_count over the measured window")
    lines += ["", *markdown_table(results)]
    stages = [(f"{r.model}, batching {r.batching}, c={r.concurrency}", r.extra.get("stages_ms")) for r in results]
    if any(st for _, st in stages):
        lines += ["", "Where the time went (means over each row's window, from the server's histograms; see "
                  "`stage_breakdown`):", "", *stage_table(stages)]
    return results, lines, {"machine": machine, "models": infos}


# --------------------------------------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000", help="running server (loopback only; not with --matrix)")
    p.add_argument("--model", type=parse_str_list, default=None,
                   help="model name(s), comma-separated (single mode: default the server's default classifier; "
                        "matrix: default resnet18,resnet50)")
    p.add_argument("--concurrency", type=parse_int_list, default=[1, 8, 32], help="worker counts, e.g. 1,8,32")
    p.add_argument("--duration", type=float, default=20.0, help="measured seconds per concurrency level")
    p.add_argument("--warmup", type=float, default=3.0, help="unmeasured seconds before each level")
    p.add_argument("--image", type=Path, default=None, help="image file to send (default: generated JPEG)")
    p.add_argument("--image-size", type=int, default=224, help="side of the generated JPEG")
    p.add_argument("--images-per-request", type=int, default=1)
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--timeout", type=float, default=120.0, help="per-request timeout, seconds")
    p.add_argument("--client-processes", type=int, default=1,
                   help="load-generator processes sharing the concurrency (one Python client tops out at a few "
                        "thousand requests/s)")
    p.add_argument("--api-key", default=os.environ.get("CNN_BENCH_API_KEY"), help="X-API-Key (single mode)")
    p.add_argument("--json", type=Path, default=None, help="write all results as JSON here")
    p.add_argument("--markdown", type=Path, default=None, help="also write the report as Markdown here")
    m = p.add_argument_group("matrix mode (starts and stops the server itself)")
    m.add_argument("--matrix", action="store_true", help="models x batching on/off x concurrency")
    m.add_argument("--device", default=None, help="CNN_DEVICE (default: inherited, else auto)")
    m.add_argument("--torch-threads", type=int, default=None, help="CNN_TORCH_THREADS")
    m.add_argument("--no-untrained", dest="allow_untrained", action="store_false",
                   help="do not pass CNN_ALLOW_UNTRAINED=true (needs real weights)")
    add_server_options(m)
    return p


def add_server_options(g: argparse._ArgumentGroup) -> None:
    """Options of a benchmark that starts its own server per batching mode (used by the text benchmark too)."""
    g.add_argument("--batching", type=parse_str_list, default=["on", "off"], help="on,off (default both)")
    g.add_argument("--batch-size", type=int, default=16, help="CNN_BATCH_MAX_SIZE with batching on")
    g.add_argument("--batch-wait-ms", type=float, default=0.0, help="CNN_BATCH_MAX_WAIT_MS (0: greedy)")
    g.add_argument("--batch-queue", type=int, default=256, help="CNN_BATCH_MAX_QUEUE")
    g.add_argument("--inference-threads", type=int, default=None, help="CNN_INFERENCE_THREADS")
    g.add_argument("--front-workers", type=int, default=0,
                   help="CNN_FRONT_WORKERS: N HTTP processes in front of one model process (0: one process)")
    g.add_argument("--python", default=sys.executable, help="interpreter that runs the server")
    g.add_argument("--startup-timeout", type=float, default=600.0)
    g.add_argument("--server-log-dir", default=None, help="server logs (default: a temp dir)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if bad := [b for b in args.batching if b not in ("on", "off")]:
        raise SystemExit(f"--batching takes on,off; got {bad}")
    if args.image is not None:
        image, args.image_name = args.image.read_bytes(), args.image.name
    else:
        image, args.image_name = make_test_image(args.image_size), f"generated-{args.image_size}.jpg"

    if args.matrix:
        results, lines, meta = run_matrix(args, image)
    else:
        ensure_loopback(args.url)
        models = args.model or [None]
        results = []
        for model in models:
            for c in args.concurrency:
                results.append(asyncio.run(run_load(
                    args.url, model=model, concurrency=c, duration=args.duration, warmup=args.warmup, image=image,
                    image_name=args.image_name, images_per_request=args.images_per_request, top_k=args.top_k,
                    api_key=args.api_key, timeout=args.timeout, client_processes=args.client_processes)))
        infos = {m or "(default)": asyncio.run(model_info(args.url, m, args.api_key)) for m in models}
        for r in results:
            r.model = r.model or infos.get("(default)", {}).get("name") or "(default)"
        devices = sorted({str(i.get("device")) for i in infos.values() if i.get("device")})
        meta = {"machine": machine_description(", ".join(devices) or None), "models": infos, "url": args.url}
        lines = [f"## /classify load benchmark against {args.url}", "", *machine_lines(meta["machine"]),
                 f"- {args.duration:g} s per level after {args.warmup:g} s warm-up, "
                 f"{args.images_per_request} image(s) per request ({len(image)} B {args.image_name})", "",
                 "| model | concurrency | req/s | p50 ms | p95 ms | p99 ms | errors | mean batch |",
                 "|---|---:|---:|---:|---:|---:|---|---:|"]
        lines += [f"| {r.model} | {r.concurrency} | {fmt(r.requests_per_s)} | {fmt(r.p50_ms)} | {fmt(r.p95_ms)} | "
                  f"{fmt(r.p99_ms)} | {describe_errors(r)} | {fmt(r.mean_batch_size, 2)} |" for r in results]

    report = "\n".join(lines)
    print(report)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(report + "\n")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {**meta, "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                   "results": [asdict(r) for r in results]}
        args.json.write_text(json.dumps(_json_safe(payload), indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
