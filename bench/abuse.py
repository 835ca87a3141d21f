"""Abuse benchmark (issue 13): what a fresh server does with hostile input and with more load than it admits.

    python -m bench.abuse                                   # every phase; docs/bench/abuse.{json,md}
    python -m bench.abuse --schemathesis-examples 5 --overload-seconds 5 --json /tmp/a.json --markdown /tmp/a.md

Starts `python -m app.cli serve` itself (bench/classify_load.Server: a free loopback port, waits for /health/ready)
with the shipped models from --weights-dir: the cifar10-resnet56 classifier, the agnews-vdcnn9 text model, the
lfw-face-resnet face model, and style transfer enabled without in-process workers (CNN_STYLE_WORKERS=0, so submitted
jobs only queue; CNN_STYLE_MAX_QUEUE large), a temporary CNN_DATA_DIR, CNN_DEVICE=--device. Every other setting is the
service's default: CNN_* variables of the calling environment are not passed on. Then, in order:

1. crafted corpus (tests/crafted.py): one valid upload per endpoint first (warm-up), then every crafted upload and
   malformed multipart request to every endpoint that takes files, each answer judged as
   tests/api/test_crafted_inputs.py judges it (the expected status, a problem-details body, no traceback, never a
   5xx).
2. schemathesis on the live server: every operation of its /openapi.json, the examples, coverage and fuzzing phases
   (positive and negative), --schemathesis-examples fuzzing examples per operation, with the checks and data hooks of
   tests/api/test_schema_fuzz.py, pointed at the shipped models and at a style job, a subject and faces that exist.
   Failures are counted, not raised, so every case runs.
3. overload: the first server is stopped and a second one started with the same settings plus
   CNN_IN_FLIGHT_OVERRIDES={"classification": --overload-limit}; --overload-clients closed-loop clients (asyncio +
   httpx, one connection each, the next request as soon as the last one is answered, whatever it was) POST /classify
   with a real CIFAR-10 JPEG (../shared/data/cifar10, else a generated one) for --overload-seconds; then one ordinary
   request.
4. memory: VmRSS of each server after start-up and after each phase, and VmHWM (its peak RSS) at the end.

Helpers (loopback check, server process, percentiles, machine description) come from bench/classify_load.py; the
corpus, endpoint table and judging from tests/crafted.py. Loopback servers only.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import json
import math
import multiprocessing
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.classify_load import (
    PROJECT_ROOT,
    Server,
    _json_safe,
    ensure_loopback,
    fmt,
    machine_description,
    machine_lines,
    make_test_image,
    percentile,
)
from tests.crafted import ENDPOINTS, VALID, corpus, encode, memory_kb, noise, requests, run_corpus

CLASSIFIER, TEXT_MODEL, FACE_MODEL = "cifar10-resnet56", "agnews-vdcnn9", "lfw-face-resnet"
DEFAULT_CIFAR_DIR = PROJECT_ROOT.parent / "shared" / "data" / "cifar10" / "train"
# schemathesis data hooks the in-suite fuzz test may define; every one it defines is registered here too
HOOK_NAMES = tuple(f"{kind}_{part}" for kind in ("filter", "map", "flatmap")
                   for part in ("body", "query", "path_parameters", "headers", "cookies", "case"))
_DURATION_LINE = re.compile(r"^cnn_http_request_duration_seconds_(bucket|sum|count)\{([^}]*)\}\s+(\S+)", re.MULTILINE)
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


# --------------------------------------------------------------------------------------------- server

def server_env(args: argparse.Namespace, data_dir: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The shipped models, style jobs that only queue, a temporary data dir; everything else the defaults."""
    env = {
        "CNN_WEIGHTS_DIR": str(args.weights_dir.resolve()),
        "CNN_DATA_DIR": str(data_dir),
        "CNN_CLASSIFIERS": CLASSIFIER,
        "CNN_TEXT_MODELS": TEXT_MODEL,
        "CNN_FACE_MODELS": FACE_MODEL,
        "CNN_STYLE_ENABLED": "true",
        "CNN_STYLE_WORKERS": "0",
        "CNN_STYLE_MAX_QUEUE": str(args.style_max_queue),
        "CNN_DEVICE": args.device,
        "CNN_ALLOW_DOWNLOADS": "false",
        "CNN_LOG_LEVEL": "warning",
    }
    if args.torch_threads is not None:
        env["CNN_TORCH_THREADS"] = str(args.torch_threads)
    return {**env, **(extra or {})}


def fresh_server(args: argparse.Namespace, env: dict[str, str], log_path: Path) -> Server:
    """classify_load.Server without the caller's other CNN_* variables (so the rest is the service's defaults)."""
    srv = Server(env, python=args.python, log_path=log_path, startup_timeout=args.startup_timeout)
    keep = set(env) | {"CNN_HOST", "CNN_PORT"}
    srv.env = {k: v for k, v in srv.env.items() if not k.startswith("CNN_") or k in keep}
    return srv


def server_memory(srv: Server) -> dict[str, Any]:
    """VmRSS / VmHWM of the server process in MiB, and whether it is still running."""
    assert srv.proc is not None
    alive = srv.proc.poll() is None
    kb = memory_kb(srv.proc.pid) if alive else {}
    return {"alive": alive, "rss_mib": round(kb["VmRSS"] / 1024, 1) if kb else None,
            "hwm_mib": round(kb["VmHWM"] / 1024, 1) if kb else None}


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process from /proc/<pid>/stat (all its threads), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def host_busy_seconds() -> float:
    """CPU time all processes of the host have used (every CPU, /proc/stat: all but idle and iowait), in seconds."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    return (sum(values) - values[3] - values[4]) / os.sysconf("SC_CLK_TCK")


def wait_for_quiet(limit_s: float, threshold: float) -> dict[str, Any]:
    """Wait (up to limit_s) until the host's CPUs were less than `threshold` busy over 3 s (the idle server included):
    other work on a small host distorts the overload's latencies."""
    started = time.monotonic()
    cpus = len(os.sched_getaffinity(0))
    while True:
        b0, t0 = host_busy_seconds(), time.monotonic()
        time.sleep(3.0)
        busy = (host_busy_seconds() - b0) / ((time.monotonic() - t0) * cpus)
        waited = time.monotonic() - started
        if busy < threshold or waited >= limit_s:
            print(f"#   host {100 * busy:.0f}% busy after waiting {waited:.0f} s", file=sys.stderr, flush=True)
            return {"busy_share": round(busy, 3), "waited_s": round(waited, 1), "quiet": busy < threshold}


def settings_default(name: str) -> Any:
    """A setting's default value (app/settings.py), e.g. the per-image byte limit the corpus is built for."""
    from app.settings import Settings

    return Settings.model_fields[name].default


def status_counts(counts: dict[int, int] | Counter[str]) -> dict[str, int]:
    return {str(k): v for k, v in sorted(counts.items(), key=lambda kv: str(kv[0]))}


# --------------------------------------------------------------------------------------------- 1. crafted corpus

def phase_crafted(url: str) -> dict[str, Any]:
    max_image_bytes = int(settings_default("max_image_bytes"))
    max_images = int(settings_default("max_images_per_request"))
    with httpx.Client(base_url=url, timeout=120, trust_env=False) as client:
        warm = {}
        for ep in ENDPOINTS:  # first use of every path (lazy imports, cascades, kernels)
            r = client.post(ep.path, data=ep.data, files=ep.files("warm.png", VALID))
            warm[ep.name] = {"status": r.status_code, "expected": ep.ok, "body": r.text[:300] if r.status_code != ep.ok
                             else None}
        started = time.perf_counter()
        out = run_corpus(client, max_image_bytes=max_image_bytes, max_images=max_images, clock=time.perf_counter)
        elapsed = time.perf_counter() - started
    n_images, n_requests = len(corpus(max_image_bytes)), len(requests(max_images))
    return {
        "endpoints": [ep.name for ep in ENDPOINTS], "image_cases": n_images, "malformed_requests": n_requests,
        "max_image_bytes": max_image_bytes, "max_images_per_request": max_images,
        "warmup": warm, "warmup_ok": all(w["status"] == w["expected"] for w in warm.values()),
        "cases": out.requests, "expected_cases": len(ENDPOINTS) * (n_images + n_requests), "seconds": round(elapsed, 2),
        "statuses": status_counts(out.statuses), "five_xx": sum(v for k, v in out.statuses.items() if k >= 500),
        "failures": out.failures, "style_refusals": out.style_refusals,
        "by_endpoint": {k: status_counts(v) for k, v in out.by_endpoint.items()},
        "seconds_by_endpoint": {k: round(v, 2) for k, v in out.seconds.items()},
    }


# --------------------------------------------------------------------------------------------- 2. schemathesis

def _seed_fixtures(url: str) -> dict[str, list[str]]:
    """What test_schema_fuzz's `live` fixture creates: two queued style jobs and two subjects with faces."""
    other = encode(noise((40, 30), seed=5), "PNG")
    with httpx.Client(base_url=url, timeout=60, trust_env=False) as c:
        jobs = []
        for _ in range(2):
            r = c.post("/style-transfer", files=[("content", ("c.png", VALID, "image/png")),
                                                 ("style", ("s.png", other, "image/png"))])
            if r.status_code != 202:
                raise RuntimeError(f"POST /style-transfer: {r.status_code} {r.text[:300]}")
            jobs.append(r.json()["id"])
        faces: dict[str, list[str]] = {}
        for subject in ("fuzz.subject", "fuzz.doomed"):
            r = c.post("/faces/enroll", data={"subject": subject, "detector": "none"},
                       files=[("image", ("a.png", VALID, "image/png")), ("image", ("b.png", other, "image/png"))])
            if r.status_code != 201:
                raise RuntimeError(f"POST /faces/enroll: {r.status_code} {r.text[:300]}")
            faces[subject] = [f["face_id"] for f in r.json()["faces"]]
    return {"job_id": jobs, "fuzz.subject": faces["fuzz.subject"], "fuzz.doomed": faces["fuzz.doomed"]}


def phase_schemathesis(url: str, examples: int, max_failures_kept: int) -> dict[str, Any]:
    import requests as requests_lib
    import schemathesis
    from hypothesis import HealthCheck, settings
    from schemathesis.core.failures import Failure
    from schemathesis.core.result import Err
    from schemathesis.errors import FailureGroup
    from schemathesis.generation.hypothesis.builder import HypothesisTestConfig, HypothesisTestMode, create_test

    # the in-suite fuzz test's checks and its data hooks; their lookup tables are pointed at this server's models and
    # at objects that exist on it (the test fills them from its own fixture the same way)
    import tests.api.test_schema_fuzz as suite

    seeded = _seed_fixtures(url)
    suite.MODELS.clear()
    suite.MODELS.update({"/classify": CLASSIFIER, "/text/": TEXT_MODEL, "/faces/": FACE_MODEL})
    suite.KNOWN.clear()
    suite.KNOWN.update(name=[CLASSIFIER, TEXT_MODEL, FACE_MODEL], job_id=seeded["job_id"][:1], subject=["fuzz.subject"])
    suite.DOOMED.clear()
    suite.DOOMED.update(job_id=seeded["job_id"][1:], subject=["fuzz.doomed"], face_id=seeded["fuzz.subject"][1:])

    schema = schemathesis.openapi.from_url(f"{url}/openapi.json", config=schemathesis.Config())
    hooks = [getattr(suite, name) for name in HOOK_NAMES if callable(getattr(suite, name, None))]
    for hook in hooks:
        schema.hook(hook)
    project = schema.config
    # the in-suite test's hypothesis settings, with this run's number of examples
    explicit = settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                               HealthCheck.data_too_large, HealthCheck.large_base_example])
    modes = [HypothesisTestMode.EXAMPLES, HypothesisTestMode.FUZZING, HypothesisTestMode.COVERAGE]
    session = requests_lib.Session()
    session.trust_env = False

    per_op: dict[str, dict[str, Any]] = {}
    statuses: Counter[str] = Counter()
    failures: list[dict[str, Any]] = []
    failure_titles: Counter[str] = Counter()
    five_xx: list[dict[str, Any]] = []
    errors: list[dict[str, str]] = []
    latencies: list[float] = []
    started = time.perf_counter()

    for result in schema.get_all_operations():
        if isinstance(result, Err):  # an operation the loader could not build is reported, not fatal
            errors.append({"operation": "?", "error": f"InvalidSchema: {result.err()}"[:500]})
            continue
        operation = result.ok()
        label = operation.label
        stats = per_op.setdefault(label, {"cases": 0, "statuses": Counter(), "failures": 0})

        def runner(label: str, stats: dict[str, Any]) -> Any:
            def one_case(case: schemathesis.Case) -> None:
                """Send one generated request; count its status and any check failure (never raise: keep going)."""
                stats["cases"] += 1
                t = time.perf_counter()
                try:
                    response = case.call(session=session, timeout=120)
                except requests_lib.RequestException as exc:
                    statuses[type(exc).__name__] += 1
                    stats["statuses"][type(exc).__name__] += 1
                    errors.append({"operation": label, "error": f"{type(exc).__name__}: {exc}"[:500]})
                    return
                latencies.append(time.perf_counter() - t)
                code = response.status_code
                statuses[str(code)] += 1
                stats["statuses"][str(code)] += 1
                if code >= 500:
                    five_xx.append({"operation": label, "status": code, "body": response.text[:500]})
                try:
                    case.validate_response(response, checks=suite.CHECKS)
                except (Failure, FailureGroup) as exc:
                    found = list(exc.exceptions) if isinstance(exc, FailureGroup) else [exc]
                    stats["failures"] += 1
                    for f in found:
                        failure_titles[f"{label}: {f.title}"] += 1
                    if len(failures) < max_failures_kept:
                        failures.append({"operation": label, "status": code,
                                         "request": f"{case.method} {case.formatted_path}",
                                         "failures": [{"title": f.title, "message": str(f.message)[:800]}
                                                      for f in found]})
            return one_case

        test = create_test(operation=operation, test_func=runner(label, stats), config=HypothesisTestConfig(
            project=project, modes=modes, explicit_settings=explicit,
            settings=project.get_hypothesis_settings(operation=operation, phase="fuzzing")))
        t_op = time.perf_counter()
        try:
            test()
        except Exception as exc:  # generation errors are counted; the next operation runs
            errors.append({"operation": label, "error": f"{type(exc).__name__}: {exc}"[:800]})
        stats["seconds"] = round(time.perf_counter() - t_op, 2)
        print(f"#   {label}: {stats['cases']} cases, {stats['failures']} failing, "
              f"{dict(sorted(stats['statuses'].items()))} ({stats['seconds']} s)", file=sys.stderr, flush=True)
    session.close()

    latencies.sort()
    total = sum(s["cases"] for s in per_op.values())
    return {
        "examples_per_operation": examples, "phases": [m.value for m in modes], "operations": len(per_op),
        "cases": total, "seconds": round(time.perf_counter() - started, 2),
        "statuses": dict(sorted(statuses.items())),
        "five_xx": sum(v for k, v in statuses.items() if k.isdigit() and int(k) >= 500),
        "failing_cases": sum(s["failures"] for s in per_op.values()),
        "failures_by_check": dict(failure_titles.most_common()),
        "first_failures": failures, "first_five_xx": five_xx[:max_failures_kept], "errors": errors,
        "latency_ms": {"p50": 1000 * percentile(latencies, 50), "p99": 1000 * percentile(latencies, 99),
                       "max": 1000 * latencies[-1] if latencies else None},
        "checks": [getattr(c, "__name__", str(c)) for c in suite.CHECKS],
        "hooks": [h.__name__ for h in hooks],
        "per_operation": {k: {**v, "statuses": dict(sorted(v["statuses"].items()))} for k, v in per_op.items()},
        "seeded": seeded,
    }


# --------------------------------------------------------------------------------------------- 3. overload

@dataclass
class Shot:
    """One request of the overload: when it was sent and answered (perf_counter) and what came back."""

    sent: float
    done: float
    status: str
    retry_after: str | None = None
    estimate_s: float | None = None  # the 503 body's retry_after_seconds: the server's unrounded drain estimate
    in_flight: int | None = None


@dataclass
class LoopLag:
    """How late the client's own event loop wakes a 10 ms sleeper: is the load generator keeping up?"""

    lags: list[float] = field(default_factory=list)

    async def run(self, until: float) -> None:
        while time.perf_counter() < until:
            t = time.perf_counter()
            await asyncio.sleep(0.01)
            self.lags.append(time.perf_counter() - t - 0.01)


def load_image(path: Path | None) -> tuple[bytes, str]:
    """The overload's upload: --image, else the first CIFAR-10 JPEG of ../shared/data/cifar10, else a generated one."""
    if path is not None:
        return path.read_bytes(), str(path)
    if DEFAULT_CIFAR_DIR.is_dir():
        for cls in sorted(p for p in DEFAULT_CIFAR_DIR.iterdir() if p.is_dir()):
            jpgs = sorted(cls.glob("*.jpg"))
            if jpgs:
                return jpgs[0].read_bytes(), str(jpgs[0].relative_to(PROJECT_ROOT.parent))
    return make_test_image(32), "generated 32x32 JPEG"


def multipart(image: bytes) -> tuple[bytes, dict[str, str]]:
    """The /classify body encoded once (httpx's encoder), so the clients do not re-encode it per request."""
    req = httpx.Request("POST", "http://127.0.0.1/classify", files={"image": ("cifar.jpg", image, "image/jpeg")})
    return req.read(), {"content-type": req.headers["content-type"]}


def parse_durations(text: str, route: str, method: str) -> dict[str, dict[str, Any]]:
    """cnn_http_request_duration_seconds of one route, per status: cumulative buckets (le -> count), sum and count."""
    out: dict[str, dict[str, Any]] = {}
    for kind, labels, value in _DURATION_LINE.findall(text):
        d = dict(_LABEL.findall(labels))
        if d.get("route") != route or d.get("method") != method:
            continue
        entry = out.setdefault(d["status"], {"buckets": {}, "sum": 0.0, "count": 0.0})
        if kind == "bucket":
            entry["buckets"][math.inf if d["le"] == "+Inf" else float(d["le"])] = float(value)
        else:
            entry[kind] = float(value)
    return out


def histogram_delta(before: dict[str, Any] | None, after: dict[str, Any]) -> dict[str, Any]:
    """Server-side latency over a window, from histogram deltas: count, mean, the bucket bound holding p50 / p99."""
    before = before or {"buckets": {}, "sum": 0.0, "count": 0.0}
    delta = {le: v - before["buckets"].get(le, 0.0) for le, v in sorted(after["buckets"].items())}
    total = after["count"] - before["count"]
    if total <= 0:
        return {"count": 0}

    def bound(q: float) -> float | None:
        le = next(le for le in sorted(delta) if delta[le] >= q * total)
        return None if math.isinf(le) else 1000 * le

    return {"count": int(total), "mean_ms": 1000 * (after["sum"] - before["sum"]) / total,
            "p50_at_most_ms": bound(0.5), "p99_at_most_ms": bound(0.99),
            "share_within_1ms": round(delta.get(0.001, 0.0) / total, 4),
            "buckets_ms": {("inf" if math.isinf(le) else f"{1000 * le:g}"): int(v) for le, v in delta.items()}}


def probe(url: str, body: bytes, headers: dict[str, str], start_at: float, end_at: float, interval: float,
          retry_every: float, give_up: float) -> dict[str, list[Any]]:
    """An independent, well-behaved client in its own process (its own event loop and interpreter, so the load
    generator's backlog is not in its numbers): every `interval` seconds, GET /health/live, then POST /classify; after
    a 503, retry every `retry_every` seconds until admitted (or `give_up` seconds), recording how long that took."""
    live: list[float] = []
    first: list[dict[str, Any]] = []
    waits: list[dict[str, Any]] = []
    while time.monotonic() < start_at:
        time.sleep(0.005)
    cpu = time.process_time()
    with httpx.Client(base_url=url, timeout=60, trust_env=False) as c:
        while (tick := time.monotonic()) < end_at:
            t = time.perf_counter()
            c.get("/health/live")
            live.append(time.perf_counter() - t)
            t = time.perf_counter()
            r = c.post("/classify", content=body, headers=headers)
            refused_at = time.perf_counter()
            first.append({"status": r.status_code, "latency": refused_at - t,
                          "retry_after": r.headers.get("retry-after")})
            if r.status_code == 503:
                attempts, admitted = 0, None
                while time.perf_counter() - refused_at < give_up:
                    time.sleep(retry_every)
                    sent = time.perf_counter()
                    attempts += 1
                    if c.post("/classify", content=body, headers=headers).status_code != 503:
                        admitted = sent - refused_at
                        break
                waits.append({"wait": admitted, "attempts": attempts, "retry_after": r.headers.get("retry-after")})
            time.sleep(max(0.0, tick + interval - time.monotonic()))
    return {"live": live, "first": first, "waits": waits, "cpu_s": [time.process_time() - cpu]}


async def overload(url: str, body: bytes, headers: dict[str, str], *, clients: int, seconds: float,
                   timeout: float) -> tuple[list[Shot], float, LoopLag]:
    """`clients` closed-loop clients, each with its own single-connection httpx.AsyncClient (made before the clock
    starts: making one costs milliseconds of CPU), for `seconds`; every answer recorded."""
    shots: list[Shot] = []
    lag = LoopLag()
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    pool = [httpx.AsyncClient(base_url=url, limits=limits, timeout=timeout, trust_env=False) for _ in range(clients)]

    async def client(c: httpx.AsyncClient, deadline: float) -> None:
        while time.perf_counter() < deadline:
            sent = time.perf_counter()
            try:
                r = await c.post("/classify", content=body, headers=headers)
                shot = Shot(sent, time.perf_counter(), str(r.status_code), r.headers.get("retry-after"))
                if r.status_code == 503:
                    try:
                        doc = r.json()
                        shot.estimate_s, shot.in_flight = doc.get("retry_after_seconds"), doc.get("in_flight")
                    except ValueError:
                        pass
            except httpx.TimeoutException:
                shot = Shot(sent, time.perf_counter(), "timeout")
            except httpx.HTTPError as exc:
                shot = Shot(sent, time.perf_counter(), type(exc).__name__)
            shots.append(shot)
            if not shot.status.isdigit():
                await asyncio.sleep(0.05)  # connection-level failure: do not spin

    try:
        t0 = time.perf_counter()
        deadline = t0 + seconds
        await asyncio.gather(lag.run(deadline), *(client(c, deadline) for c in pool))
        elapsed = time.perf_counter() - t0
    finally:
        await asyncio.gather(*(c.aclose() for c in pool))
    return shots, elapsed, lag


def ms_stats(values: list[float]) -> dict[str, Any]:
    v = sorted(values)
    return {"n": len(v), "p50": 1000 * percentile(v, 50), "p90": 1000 * percentile(v, 90),
            "p99": 1000 * percentile(v, 99), "max": 1000 * v[-1] if v else None,
            "mean": 1000 * statistics.fmean(v) if v else None}


def count_stats(values: list[int]) -> dict[str, Any]:
    v = sorted(float(x) for x in values)
    return {"n": len(v), "p50": percentile(v, 50), "p99": percentile(v, 99), "max": v[-1] if v else None}


def summarise_overload(shots: list[Shot], elapsed: float, limit: int, server_ok_mean_s: float | None,
                       ) -> dict[str, Any]:
    ok = [s for s in shots if s.status == "200"]
    shed = [s for s in shots if s.status == "503"]
    ok_lat = [s.done - s.sent for s in ok]
    mean_ok = statistics.fmean(ok_lat) if ok_lat else math.nan
    # next admission: from a 503's arrival to the sending of the next request (any client's) that was admitted, i.e.
    # the earliest moment after the refusal at which a retry found room; a lower bound for a real retrier, who races
    # the other clients for that room
    admitted = sorted(s.sent for s in ok)
    gaps = []
    for s in shed:
        i = bisect.bisect_left(admitted, s.done)
        if i < len(admitted):
            gaps.append(admitted[i] - s.done)
    in_flight = [s.in_flight for s in shed if s.in_flight is not None]
    # Little's law: with `in_flight` admitted requests and `limit` slots each held for the mean accepted latency, what
    # is in flight now has drained after mean latency x in_flight / limit. The server-side mean (its histogram) is the
    # time a slot is really held; the client-side one also holds the load generator's own backlog.
    drain = [mean_ok * n / limit for n in in_flight]
    drain_server = [server_ok_mean_s * n / limit for n in in_flight] if server_ok_mean_s else []
    return {
        "requests": len(shots), "seconds": round(elapsed, 2),
        "statuses": status_counts(Counter(s.status for s in shots)),
        "ok": len(ok), "shed": len(shed), "ok_per_s": len(ok) / elapsed if elapsed else None,
        "shed_per_s": len(shed) / elapsed if elapsed else None,
        "latency_503_ms": ms_stats([s.done - s.sent for s in shed]),
        "latency_200_ms": ms_stats(ok_lat),
        "retry_after_header": status_counts(Counter(s.retry_after or "none" for s in shed)),
        "server_estimate_ms": ms_stats([s.estimate_s for s in shed if s.estimate_s is not None]),
        "in_flight_at_refusal": status_counts(Counter(in_flight)),
        "drain_estimate_client_ms": ms_stats(drain),
        "drain_estimate_ms": ms_stats(drain_server),
        "next_admission_ms": ms_stats(gaps),
        "by_second": by_second(shots),
    }


def by_second(shots: list[Shot]) -> list[dict[str, Any]]:
    """Per second of the run: answers, Retry-After values and the server's median unrounded estimate."""
    if not shots:
        return []
    t0 = min(s.sent for s in shots)
    slices: dict[int, list[Shot]] = {}
    for s in shots:
        slices.setdefault(int(s.done - t0), []).append(s)
    out = []
    for sec, group in sorted(slices.items()):
        shed = [s for s in group if s.status == "503"]
        estimates = sorted(s.estimate_s for s in shed if s.estimate_s is not None)
        out.append({"second": sec, "ok": sum(1 for s in group if s.status == "200"), "shed": len(shed),
                    "retry_after": status_counts(Counter(s.retry_after or "none" for s in shed)),
                    "estimate_p50_ms": 1000 * percentile(estimates, 50)})
    return out


def phase_overload(args: argparse.Namespace, url: str, pid: int) -> dict[str, Any]:
    ensure_loopback(url)
    image, source = load_image(args.image)
    body, headers = multipart(image)
    quiet = wait_for_quiet(args.quiet_wait, args.quiet_threshold) if args.quiet_wait > 0 else None
    # the probe process gets --probe-spawn-s to start, then begins about 1 s into the overload (past the ramp-up) and
    # stops before its end
    start_at = time.monotonic() + args.probe_spawn_s + 1.0
    end_at = start_at + max(0.5, args.overload_seconds - 2.0)
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        probed = pool.submit(probe, url, body, headers, start_at, end_at, args.probe_interval, args.probe_retry,
                             args.probe_give_up)
        while time.monotonic() < start_at - 1.0:
            time.sleep(0.01)
        with httpx.Client(base_url=url, timeout=60, trust_env=False) as c:
            for _ in range(5):  # unmeasured, right before: first requests through the decoder and the model
                r = c.post("/classify", content=body, headers=headers)
                if r.status_code != 200:
                    raise RuntimeError(f"POST /classify before the overload: {r.status_code} {r.text[:300]}")
            metrics_before = c.get("/metrics").text
        cpu_before, host_before = cpu_seconds(pid), host_busy_seconds()
        wall_before, own_before = time.perf_counter(), time.process_time()
        shots, elapsed, lag = asyncio.run(overload(url, body, headers, clients=args.overload_clients,
                                                   seconds=args.overload_seconds, timeout=args.timeout))
        server_cpu = cpu_seconds(pid) - cpu_before
        host_cpu = host_busy_seconds() - host_before
        wall = time.perf_counter() - wall_before
        own_cpu = time.process_time() - own_before
        probe_raw = probed.result(timeout=args.overload_seconds + args.probe_give_up + 120)
    # normal service right after: one ordinary request on a new connection
    with httpx.Client(base_url=url, timeout=60, trust_env=False) as c:
        t = time.perf_counter()
        r = c.post("/classify", content=body, headers=headers)
        after_ms = 1000 * (time.perf_counter() - t)
        after = {"status": r.status_code, "latency_ms": after_ms,
                 "top1": r.json()["results"][0]["top_k"][0] if r.status_code == 200 else r.text[:300]}
        metrics_after = c.get("/metrics").text
    # the overload window's server-side latencies (the warm-up is before, the request right after is one 200 more)
    hist_before = parse_durations(metrics_before, "/classify", "POST")
    hist_after = parse_durations(metrics_after, "/classify", "POST")
    server_side = {status: histogram_delta(hist_before.get(status), h) for status, h in hist_after.items()}
    server_ok_mean = server_side.get("200", {}).get("mean_ms")
    summary = summarise_overload(shots, elapsed, args.overload_limit,
                                 server_ok_mean / 1000 if server_ok_mean else None)
    first = probe_raw["first"]
    waits = [w["wait"] for w in probe_raw["waits"] if w["wait"] is not None]
    return {
        "clients": args.overload_clients, "limit": args.overload_limit, "image": source, "image_bytes": len(image),
        **summary,
        "server_side_ms": server_side,
        "cpu": {"server_cores": round(server_cpu / wall, 2), "client_cores": round(own_cpu / wall, 2),
                "probe_cores": round(probe_raw["cpu_s"][0] / wall, 2),
                "other_cores": round((host_cpu - server_cpu - own_cpu - probe_raw["cpu_s"][0]) / wall, 2),
                "quiet_wait": quiet,
                "usable_cpus": len(os.sched_getaffinity(0))},
        "client_loop_lag_ms": ms_stats(lag.lags),
        "probe": {
            "interval_s": args.probe_interval, "retry_every_s": args.probe_retry, "give_up_s": args.probe_give_up,
            "requests": len(first), "statuses": status_counts(Counter(str(f["status"]) for f in first)),
            "latency_503_ms": ms_stats([f["latency"] for f in first if f["status"] == 503]),
            "latency_200_ms": ms_stats([f["latency"] for f in first if f["status"] == 200]),
            "health_live_ms": ms_stats(probe_raw["live"]),
            "retry_after_header": status_counts(Counter(f["retry_after"] or "none" for f in first
                                                        if f["status"] == 503)),
            "time_to_admission_ms": ms_stats(waits),
            "retries_to_admission": count_stats([w["attempts"] for w in probe_raw["waits"] if w["wait"] is not None]),
            "gave_up": sum(1 for w in probe_raw["waits"] if w["wait"] is None),
        },
        "right_after": after,
    }


# --------------------------------------------------------------------------------------------- report

def table(report: dict[str, Any]) -> list[str]:
    lines = ["| phase | measure | result |", "|---|---|---|"]

    def row(phase: str, what: str, value: str) -> None:
        lines.append(f"| {phase} | {what} | {value} |")

    def counts(d: dict[str, int]) -> str:
        return ", ".join(f"{k}: {v}" for k, v in d.items()) or "-"

    def pair(d: dict[str, Any], digits: int = 1) -> str:
        return f"{fmt(d.get('p50'), digits)} / {fmt(d.get('p99'), digits)}"

    if c := report.get("crafted"):
        row("crafted corpus", "cases run", f"{c['cases']} ({len(c['endpoints'])} endpoints x ({c['image_cases']} "
            f"uploads + {c['malformed_requests']} malformed requests)) in {c['seconds']:.0f} s")
        row("crafted corpus", "statuses", counts(c["statuses"]))
        row("crafted corpus", "5xx", str(c["five_xx"]))
        row("crafted corpus", "failures vs expectations",
            f"{len(c['failures'])}" + (f" (style refusals reported: {len(c['style_refusals'])})"
                                        if c["style_refusals"] else ""))
    if s := report.get("schemathesis"):
        row("schemathesis", "cases run", f"{s['cases']} over {s['operations']} operations "
            f"({s['examples_per_operation']} fuzzing examples each + examples + coverage) in {s['seconds']:.0f} s")
        row("schemathesis", "statuses", counts(s["statuses"]))
        row("schemathesis", "5xx", str(s["five_xx"]))
        row("schemathesis", "schema-check failures", f"{s['failing_cases']} cases" + (
            " (" + "; ".join(f"{k}: {v}" for k, v in list(s["failures_by_check"].items())[:4]) + ")"
            if s["failures_by_check"] else ""))
        if s["errors"]:
            row("schemathesis", "errors (transport or generation)", str(len(s["errors"])))
    if o := report.get("overload"):
        ph = f"overload ({o['clients']} clients, bound {o['limit']})"
        pr = o["probe"]
        row(ph, f"requests in {o['seconds']:.0f} s", f"{o['requests']}: {counts(o['statuses'])}")
        row(ph, "accepted / shed per s", f"{fmt(o['ok_per_s'])} / {fmt(o['shed_per_s'])}")
        row(ph, "503 latency p50 / p99 ms, the 64 clients", pair(o["latency_503_ms"]))
        row(ph, "200 latency p50 / p99 ms, the 64 clients", pair(o["latency_200_ms"]))
        row(ph, "503 latency p50 / p99 ms, independent probe", f"{pair(pr['latency_503_ms'])} "
            f"(n={pr['latency_503_ms']['n']}; GET /health/live {pair(pr['health_live_ms'])})")
        srv = o["server_side_ms"]
        if srv.get("503", {}).get("count"):
            r503 = srv["503"]
            row(ph, "503 inside the server (histogram: p50 / p99 bucket bound, ms)",
                f"<= {fmt(r503['p50_at_most_ms'], 1)} / <= {fmt(r503['p99_at_most_ms'], 1)} "
                f"({100 * r503['share_within_1ms']:.1f}% within 1 ms)")
        if srv.get("200", {}).get("count"):
            r200 = srv["200"]
            row(ph, "200 inside the server: mean ms, p50 / p99 bucket bound",
                f"{fmt(r200['mean_ms'])}; <= {fmt(r200['p50_at_most_ms'], 1)} / <= {fmt(r200['p99_at_most_ms'], 1)}")
        row(ph, "Retry-After seen", counts({f"{k} s": v for k, v in o["retry_after_header"].items()}))
        row(ph, "server's unrounded estimate (problem body) p50 / p99 ms", pair(o["server_estimate_ms"]))
        row(ph, "drain estimate: server mean accepted latency x in-flight / limit, p50 / p99 ms",
            pair(o["drain_estimate_ms"]))
        row(ph, "probe: retrying every " + f"{1000 * pr['retry_every_s']:g} ms, time to admission p50 / p99 ms",
            f"{pair(pr['time_to_admission_ms'])} (n={pr['time_to_admission_ms']['n']}, "
            f"{fmt(pr['retries_to_admission']['p50'], 0)} retries p50; gave up {pr['gave_up']})")
        row(ph, "next admission after a 503 (64 clients' trace) p50 / p99 ms", pair(o["next_admission_ms"]))
        cpu = o["cpu"]
        row(ph, "CPU cores used: server / load generator / probe / everything else on the host",
            f"{cpu['server_cores']} / {cpu['client_cores']} / {cpu['probe_cores']} / {cpu['other_cores']} "
            f"(of {cpu['usable_cpus']}); "
            f"load generator's loop lag p50 / p99 {pair(o['client_loop_lag_ms'])} ms")
        a = o["right_after"]
        row(ph, "one request right after", f"{a['status']} in {fmt(a['latency_ms'])} ms")
    for name, mem in report.get("memory", {}).items():
        steps = ", ".join(f"{k} {fmt(v['rss_mib'], 0)}" for k, v in mem["rss"].items())
        row("memory", f"{name}: VmRSS MiB", steps)
        row("memory", f"{name}: VmHWM (peak RSS)", f"{fmt(mem['hwm_mib'], 0)} MiB")
    return lines


def markdown(report: dict[str, Any], args: argparse.Namespace) -> str:
    lines = ["## Abuse benchmark (`bench/abuse.py`)", "", *machine_lines(report["machine"])]
    load = report.get("load_average_start") or (math.nan,) * 3
    lines.append(f"- host load average (1/5/15 min) when the run started: {load[0]:.2f} / {load[1]:.2f} / "
                 f"{load[2]:.2f}; the whole run took {report['seconds']:.0f} s")
    lines.append(f"- one fresh server, shipped models ({CLASSIFIER}, {TEXT_MODEL}, {FACE_MODEL}), style jobs only "
                 "queue (CNN_STYLE_WORKERS=0), every other setting at its default; the overload phase runs on a second "
                 f"fresh server with CNN_IN_FLIGHT_OVERRIDES={{\"classification\": {args.overload_limit}}}")
    if o := report.get("overload"):
        lines.append(f"- overload: {o['clients']} closed-loop clients, one connection each, "
                     f"{args.overload_seconds:g} s, POST /classify with {o['image']} ({o['image_bytes']} B); "
                     "latencies are client-side over loopback, with the load generator on the same cores as the "
                     "server")
        if q := o["cpu"].get("quiet_wait"):
            lines.append(f"- before the overload the host was {100 * q['busy_share']:.0f}% busy (all CPUs, 3 s, idle "
                         f"server included) after waiting {q['waited_s']:g} s for it to be quiet"
                         + ("" if q["quiet"] else ": it never was, so other work shares the CPUs"))
        lines.append("- independent probe: a separate process (its own interpreter and event loop) that every "
                     f"{o['probe']['interval_s']:g} s sends GET /health/live and POST /classify, and after a 503 "
                     f"retries every {1000 * o['probe']['retry_every_s']:g} ms until admitted; time to admission is "
                     "from the 503's arrival to the sending of the retry that got in")
        lines.append("- next admission (64 clients' trace) = from a 503's arrival to the sending of the next request "
                     "any client got admitted; drain estimate = mean accepted latency inside the server x in-flight / "
                     "limit (Little's law); inside the server = cnn_http_request_duration_seconds deltas over the "
                     "window (from the gate's entry, so without time spent waiting to be read)")
    lines += ["", *table(report)]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--phases", default="crafted,schemathesis,overload",
                   help="comma-separated subset of crafted,schemathesis,overload (memory is always reported)")
    p.add_argument("--schemathesis-examples", type=int, default=300,
                   help="hypothesis fuzzing examples per operation (the examples and coverage phases add their own)")
    p.add_argument("--max-failures-kept", type=int, default=10, help="schema failures and 5xx kept in full in the JSON")
    p.add_argument("--overload-seconds", type=float, default=15.0)
    p.add_argument("--overload-clients", type=int, default=64)
    p.add_argument("--overload-limit", type=int, default=4, help="CNN_IN_FLIGHT_OVERRIDES for classification")
    p.add_argument("--probe-interval", type=float, default=0.05,
                   help="the independent probe's request interval during the overload, seconds")
    p.add_argument("--probe-retry", type=float, default=0.01, help="the probe's retry interval after a 503, seconds")
    p.add_argument("--probe-give-up", type=float, default=5.0, help="the probe stops retrying after this, seconds")
    p.add_argument("--probe-spawn-s", type=float, default=3.0, help="time the probe process gets to start, seconds")
    p.add_argument("--quiet-wait", type=float, default=0.0,
                   help="before the overload, wait up to this many seconds for the host to be idle (0: do not wait)")
    p.add_argument("--quiet-threshold", type=float, default=0.1,
                   help="idle = all CPUs together less than this share busy over 3 s")
    p.add_argument("--image", type=Path, default=None, help="overload upload (default: a CIFAR-10 JPEG from "
                   f"{DEFAULT_CIFAR_DIR}, else a generated 32x32 JPEG)")
    p.add_argument("--timeout", type=float, default=120.0, help="per-request timeout of the overload, seconds")
    p.add_argument("--weights-dir", type=Path, default=PROJECT_ROOT / "weights")
    p.add_argument("--device", default="cpu", help="CNN_DEVICE")
    p.add_argument("--torch-threads", type=int, default=None, help="CNN_TORCH_THREADS (default: the service's)")
    p.add_argument("--style-max-queue", type=int, default=1_000_000, help="CNN_STYLE_MAX_QUEUE")
    p.add_argument("--python", default=sys.executable, help="interpreter that runs the server")
    p.add_argument("--startup-timeout", type=float, default=600.0)
    p.add_argument("--server-log-dir", default=None, help="server logs (default: a temp dir)")
    p.add_argument("--json", type=Path, default=PROJECT_ROOT / "docs" / "bench" / "abuse.json")
    p.add_argument("--markdown", type=Path, default=PROJECT_ROOT / "docs" / "bench" / "abuse.md")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    phases = [x.strip() for x in args.phases.split(",") if x.strip()]
    if bad := [x for x in phases if x not in ("crafted", "schemathesis", "overload")]:
        raise SystemExit(f"--phases takes crafted,schemathesis,overload; got {bad}")
    work = Path(tempfile.mkdtemp(prefix="abuse-bench-"))
    log_dir = Path(args.server_log_dir) if args.server_log_dir else work
    print(f"# server logs: {log_dir}", file=sys.stderr, flush=True)
    report: dict[str, Any] = {"machine": machine_description(args.device), "memory": {}, "phase_seconds": {},
                              "load_average_start": os.getloadavg()}
    started = time.perf_counter()

    if "crafted" in phases or "schemathesis" in phases:
        env = server_env(args, work / "data-main")
        with fresh_server(args, env, log_dir / "server-main.log") as srv:
            ensure_loopback(srv.url)
            mem: dict[str, Any] = {"pid": srv.proc.pid if srv.proc else None, "rss": {}, "env": env}
            mem["rss"]["start"] = server_memory(srv)
            if "crafted" in phases:
                print("# phase 1: crafted corpus", file=sys.stderr, flush=True)
                t = time.perf_counter()
                report["crafted"] = phase_crafted(srv.url)
                report["phase_seconds"]["crafted"] = round(time.perf_counter() - t, 1)
                mem["rss"]["after crafted"] = server_memory(srv)
                c = report["crafted"]
                print(f"#   {c['cases']} cases, statuses {c['statuses']}, 5xx {c['five_xx']}, "
                      f"failures {len(c['failures'])}", file=sys.stderr, flush=True)
            if "schemathesis" in phases:
                print("# phase 2: schemathesis", file=sys.stderr, flush=True)
                t = time.perf_counter()
                report["schemathesis"] = phase_schemathesis(srv.url, args.schemathesis_examples,
                                                            args.max_failures_kept)
                report["phase_seconds"]["schemathesis"] = round(time.perf_counter() - t, 1)
                mem["rss"]["after schemathesis"] = server_memory(srv)
            end = server_memory(srv)
            mem["hwm_mib"], mem["alive_at_end"] = end["hwm_mib"], end["alive"]
            mem["log_tail"] = srv.log_tail(30)
        report["memory"]["server (phases 1-2)"] = mem
        shutil.rmtree(work / "data-main", ignore_errors=True)  # the gallery and job store it filled; logs stay

    if "overload" in phases:
        print("# phase 3: overload", file=sys.stderr, flush=True)
        extra = {"CNN_IN_FLIGHT_OVERRIDES": json.dumps({"classification": args.overload_limit})}
        env = server_env(args, work / "data-overload", extra)
        with fresh_server(args, env, log_dir / "server-overload.log") as srv:
            assert srv.proc is not None
            mem = {"pid": srv.proc.pid, "rss": {"start": server_memory(srv)}, "env": env}
            t = time.perf_counter()
            report["overload"] = phase_overload(args, srv.url, srv.proc.pid)
            report["phase_seconds"]["overload"] = round(time.perf_counter() - t, 1)
            end = server_memory(srv)
            mem["rss"]["after overload"] = end
            mem["hwm_mib"], mem["alive_at_end"] = end["hwm_mib"], end["alive"]
            mem["log_tail"] = srv.log_tail(30)
        report["memory"]["server (phase 3)"] = mem
        shutil.rmtree(work / "data-overload", ignore_errors=True)

    report["seconds"] = round(time.perf_counter() - started, 1)
    report["load_average_end"] = os.getloadavg()
    report["settings"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    text = markdown(report, args)
    print(text)
    args.markdown.parent.mkdir(parents=True, exist_ok=True)
    args.markdown.write_text(text + "\n")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(_json_safe(report), indent=2, default=str) + "\n")
    bad = (report.get("crafted", {}).get("five_xx", 0) + report.get("schemathesis", {}).get("five_xx", 0)
           + len(report.get("crafted", {}).get("failures", [])))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
