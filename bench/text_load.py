"""Text-classifier benchmark: in-process forward throughput plus closed-loop load on POST /text/classify.

One run does both parts (``--skip-forward`` / ``--skip-load`` drop one):

1. forward: loads the model in this process exactly as the server does
   (``ModelRegistry(...).load(name, "text-classification")``) and times ``loaded.forward(texts)``
   (encoding + model + softmax) for each ``--forward-batch-sizes`` (default 1,8,32) over
   real texts; reports texts/s and ms per batch.
2. load: starts ``python -m app.cli serve`` itself (free loopback port, only the text model
   configured, ``CNN_CLASSIFIERS`` empty) once per batching mode (on: CNN_BATCH_MAX_SIZE=--batch-size,
   off: CNN_BATCH_MAX_SIZE=1), runs closed-loop load at every ``--concurrency`` level, stops it;
   reports texts/s, requests/s, p50/p95/p99 latency, errors and the mean batch size the server ran
   (delta of cnn_batch_size_sum / cnn_batch_size_count from /metrics). With ``--url`` the load goes
   to a server that is already running instead (loopback only; batching is whatever it has).

    python -m bench.text_load --model agnews-vdcnn9 --concurrency 1,8,32 --duration 20 --warmup 3 \
        --torch-threads 2 --json runs/bench/text.json --markdown runs/bench/text.md

Texts: AG-News-style CSV rows (no header; class,title,description; title and description joined
by a space, a backslash-n unescaped to a newline, as models.train.text reads them) from ``--csv``
(default ../shared/data/agnews/train.csv when present), else generated English-like sentences.
Each request carries ``--texts-per-request`` texts (default 1), cycling through the text pool.
Helpers (loopback check, percentiles, metrics scraping, server process, machine description) come
from bench/classify_load.py.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import gc
import itertools
import json
import math
import random
import sys
import tempfile
import time
from collections.abc import Awaitable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.classify_load import (
    PROJECT_ROOT,
    Server,
    _json_safe,
    add_server_options,
    closed_loop,
    ensure_loopback,
    fmt,
    machine_description,
    machine_lines,
    model_ready,
    parse_batch_metrics,
    parse_int_list,
    percentile,
    scrape_metrics,
    stage_breakdown,
    stage_table,
)
from bench.classify_load import server_env as classify_server_env

DEFAULT_CSV = PROJECT_ROOT.parent / "shared" / "data" / "agnews" / "train.csv"

_VOCAB = ("the government said on monday that oil prices rose sharply after talks with officials in the region "
          "stocks fell as investors worried about profits while the team won its third straight game and the "
          "company announced a new software release for computers and phones scientists reported that the "
          "space agency will launch a mission next year amid growing concern over security and economic growth"
          )


# --------------------------------------------------------------------------------------------- texts

def read_agnews_csv(path: Path, limit: int, seed: int = 0) -> list[str]:
    """Up to `limit` texts (title + " " + description) sampled deterministically from an AG-News CSV."""
    csv.field_size_limit(2**31 - 1)
    texts: list[str] = []
    with open(path, encoding="utf-8", newline="") as fh:
        for row in csv.reader(fh):
            if len(row) < 3:
                continue
            text = " ".join(p for p in (row[1].strip(), row[2].strip()) if p).replace("\\n", "\n")
            if text.strip():
                texts.append(text)
    if not texts:
        raise SystemExit(f"{path}: no usable rows (expected class,title,description)")
    if len(texts) > limit:
        texts = random.Random(seed).sample(texts, limit)
    return texts


def generated_texts(n: int, seed: int = 0) -> list[str]:
    """Deterministic English-like headline + description pairs of AG-News-like length (~200-300 chars)."""
    rng = random.Random(seed)
    words = _VOCAB.split()
    out = []
    for _ in range(n):
        title = " ".join(rng.choices(words, k=rng.randint(5, 10))).capitalize()
        body = " ".join(rng.choices(words, k=rng.randint(25, 45)))
        out.append(f"{title} ({rng.choice(['AP', 'Reuters', 'AFP'])}) {body}.")
    return out


def load_texts(args: argparse.Namespace) -> tuple[list[str], str]:
    if args.csv is not None:
        if not args.csv.is_file():
            raise SystemExit(f"--csv {args.csv}: no such file")
        return read_agnews_csv(args.csv, args.num_texts), f"{args.csv} ({args.num_texts} sampled rows max)"
    if DEFAULT_CSV.is_file():
        return read_agnews_csv(DEFAULT_CSV, args.num_texts), f"{DEFAULT_CSV} ({args.num_texts} sampled rows max)"
    return generated_texts(args.num_texts), f"generated sentences ({DEFAULT_CSV} not found)"


# --------------------------------------------------------------------------------------------- model

def first_text_model(weights_dir: Path) -> str | None:
    """The first text-classification entry of weights_dir/manifest.json, if any."""
    try:
        models = json.loads((weights_dir / "manifest.json").read_text())["models"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return next((m["name"] for m in models if m.get("task") == "text-classification"), None)


@dataclass
class ForwardResult:
    batch_size: int
    calls: int
    seconds: float
    texts_per_s: float
    p50_ms: float
    p95_ms: float
    mean_ms: float
    ms_per_text: float
    encode_ms: float


def measure_forward(args: argparse.Namespace, model: str, texts: list[str],
                    ) -> tuple[list[ForwardResult], dict[str, Any]]:
    """Load the model as the server does and time loaded.forward(batch) per batch size."""
    from app.runtime.device import configure_torch, select_device
    from app.runtime.registry import LoadedTextClassifier, ModelRegistry, hub_checkpoint_dir

    device = select_device(args.device or "auto")
    configure_torch(device, args.torch_threads or 0)
    registry = ModelRegistry(args.weights_dir, hub_checkpoint_dir(None), device, allow_download=False,
                             allow_untrained=args.allow_untrained)
    state = registry.load(model, "text-classification", warmup=True)
    if state.status != "ready" or not isinstance(state.loaded, LoadedTextClassifier):
        raise SystemExit(f"cannot load {model!r} from {args.weights_dir}: {state.status}: {state.reason}")
    loaded = state.loaded
    info = registry.describe(model)
    info["window"] = loaded.encoding.length
    # a character model reads characters, the word model tokens (its encoding's kind is "words")
    info["window_unit"] = "tokens" if (loaded.spec.encoding or {}).get("kind") == "words" else "characters"
    info["longer_than_window"] = sum(len(loaded.encoding.prepare(t)) > loaded.encoding.length for t in texts)
    info["arch"] = loaded.spec.arch
    results: list[ForwardResult] = []
    pool = itertools.cycle(texts)
    for b in args.forward_batch_sizes:
        batches = [[next(pool) for _ in range(b)] for _ in range(max(1, min(64, len(texts) // b)))]
        for batch in batches[:3]:  # warm-up: allocator, lazy kernels for this shape
            loaded.forward(batch)
        times: list[float] = []
        t_start = time.perf_counter()
        i = 0
        while (time.perf_counter() - t_start < args.forward_duration) or len(times) < 3:
            batch = batches[i % len(batches)]
            t0 = time.perf_counter()
            loaded.forward(batch)
            times.append(time.perf_counter() - t0)
            i += 1
        total = sum(times)
        enc: list[float] = []
        for batch in batches[: min(len(batches), max(3, len(times)))]:
            t0 = time.perf_counter()
            loaded.encoding.encode(batch)
            enc.append(time.perf_counter() - t0)
        times.sort()
        r = ForwardResult(batch_size=b, calls=len(times), seconds=round(total, 3),
                          texts_per_s=b * len(times) / total, p50_ms=1000 * percentile(times, 50),
                          p95_ms=1000 * percentile(times, 95), mean_ms=1000 * total / len(times),
                          ms_per_text=1000 * total / (b * len(times)), encode_ms=1000 * sum(enc) / len(enc))
        results.append(r)
        print(f"# forward b={b}: {fmt(r.texts_per_s)} texts/s, p50 {fmt(r.p50_ms, 2)} ms/batch",
              file=sys.stderr, flush=True)
    del loaded, state, registry
    gc.collect()
    return results, info


def forward_table(results: list[ForwardResult]) -> list[str]:
    lines = ["| batch size | calls | texts/s | p50 ms/batch | p95 ms/batch | ms/text | encode ms/batch |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r.batch_size} | {r.calls} | {fmt(r.texts_per_s)} | {fmt(r.p50_ms, 2)} | {fmt(r.p95_ms, 2)} | "
              f"{fmt(r.ms_per_text, 2)} | {fmt(r.encode_ms, 3)} |" for r in results]
    return lines


# --------------------------------------------------------------------------------------------- load

@dataclass
class TextLoadResult:
    model: str
    batching: str
    concurrency: int
    duration_s: float
    requests: int
    ok: int
    errors: int
    errors_by_status: dict[str, int]
    requests_per_s: float
    texts_per_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    mean_ms: float
    max_ms: float
    mean_batch_size: float | None
    batches: int | None
    texts_per_request: int
    extra: dict[str, Any] = field(default_factory=dict)


def describe_errors(r: TextLoadResult) -> str:
    if not r.errors:
        return "0"
    return f"{r.errors} (" + ", ".join(f"{k}: {v}" for k, v in r.errors_by_status.items()) + ")"


def request_bodies(texts: list[str], model: str | None, texts_per_request: int, top_k: int) -> list[bytes]:
    """Pre-serialised JSON bodies cycling through the text pool (at most 1024 distinct bodies)."""
    pool = itertools.cycle(texts)
    n = max(1, min(1024, math.ceil(len(texts) / texts_per_request)))
    bodies = []
    for _ in range(n):
        body: dict[str, Any] = {"texts": [next(pool) for _ in range(texts_per_request)], "top_k": top_k}
        if model:
            body["model"] = model
        bodies.append(json.dumps(body).encode())
    return bodies


_JSON = {"content-type": "application/json"}


async def probe(url: str, body: bytes, api_key: str | None, timeout: float) -> dict[str, Any]:
    """One request, checked: the response's model, weights and window (raises on anything but a good 200)."""
    headers = {"X-API-Key": api_key} if api_key else {}
    async with httpx.AsyncClient(base_url=url, timeout=timeout, headers=headers, trust_env=False) as c:
        r = await c.post("/text/classify", content=body, headers=_JSON)
    if r.status_code != 200:
        raise RuntimeError(f"POST {url}/text/classify: {r.status_code} {r.text[:500]}")
    data = r.json()
    sent = len(json.loads(body)["texts"])
    if len(data.get("results", [])) != sent:
        raise RuntimeError(f"POST {url}/text/classify: {len(data.get('results', []))} results for {sent} texts")
    return {k: data.get(k) for k in ("model", "weights", "weights_source", "window")}


async def run_load(url: str, *, model: str, concurrency: int, duration: float, warmup: float, bodies: list[bytes],
                   texts_per_request: int, batching: str, api_key: str | None = None,
                   timeout: float = 120.0) -> TextLoadResult:
    """Warm up, then `concurrency` closed-loop workers for `duration` seconds; summarised."""
    ensure_loopback(url)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    headers = {"X-API-Key": api_key} if api_key else {}
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=timeout, headers=headers,
                                 trust_env=False) as client:

        def send(n: int) -> Awaitable[httpx.Response]:
            return client.post("/text/classify", content=bodies[n % len(bodies)], headers=_JSON)

        if warmup > 0:
            await closed_loop(concurrency, warmup, send)
        text_before = await scrape_metrics(client)
        latencies, statuses, elapsed = await closed_loop(concurrency, duration, send)
        text_after = await scrape_metrics(client)
    latencies.sort()
    total = sum(statuses.values())
    ok = statuses.get("200", 0)
    mean_batch = batches = None
    stages = stage_breakdown(text_before, text_after, route="/text/classify", model=model,
                             client_mean_ms=1000 * sum(latencies) / len(latencies) if latencies else math.nan)
    if text_before is not None and text_after is not None:
        before, after = parse_batch_metrics(text_before, model), parse_batch_metrics(text_after, model)
        d_sum, d_count = after[0] - before[0], after[1] - before[1]
        batches = int(d_count)
        mean_batch = d_sum / d_count if d_count > 0 else None
    return TextLoadResult(
        model=model, batching=batching, concurrency=concurrency, duration_s=round(elapsed, 3), requests=total,
        ok=ok, errors=total - ok, errors_by_status={k: v for k, v in sorted(statuses.items()) if k != "200"},
        requests_per_s=ok / elapsed if elapsed > 0 else 0.0,
        texts_per_s=ok * texts_per_request / elapsed if elapsed > 0 else 0.0,
        p50_ms=1000 * percentile(latencies, 50), p95_ms=1000 * percentile(latencies, 95),
        p99_ms=1000 * percentile(latencies, 99),
        mean_ms=1000 * sum(latencies) / len(latencies) if latencies else math.nan,
        max_ms=1000 * latencies[-1] if latencies else math.nan,
        mean_batch_size=mean_batch, batches=batches, texts_per_request=texts_per_request,
        extra={"stages_ms": stages} if stages else {},
    )


def load_table(results: list[TextLoadResult]) -> list[str]:
    lines = ["| model | batching | concurrency | texts/s | req/s | p50 ms | p95 ms | p99 ms | errors | mean batch |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|---:|"]
    lines += [f"| {r.model} | {r.batching} | {r.concurrency} | {fmt(r.texts_per_s)} | {fmt(r.requests_per_s)} | "
              f"{fmt(r.p50_ms)} | {fmt(r.p95_ms)} | {fmt(r.p99_ms)} | {describe_errors(r)} | "
              f"{fmt(r.mean_batch_size, 2)} |" for r in results]
    return lines


# --------------------------------------------------------------------------------------------- server

class TextServer(Server):
    """classify_load.Server, ready once the text model is "ready" in GET /models.

    /health/ready answers 503 when no image classifier is configured, so it cannot be used here.
    """

    def __init__(self, env_overrides: dict[str, str], *, model: str, python: str, log_path: Path,
                 startup_timeout: float) -> None:
        super().__init__(env_overrides, python=python, log_path=log_path, startup_timeout=startup_timeout)
        self.model = model

    def _probe(self, c: httpx.Client) -> str | None:
        """None once the text model is "ready" in GET /models, else its status; raises when it never will be."""
        r = c.get("/models")
        if r.status_code != 200:
            body = c.get("/health/ready").json()  # start-up failures show up only here
            last = f"/models {r.status_code}, /health/ready {body.get('status')}: {body.get('detail')}"
            if body.get("status") == "failed":
                raise RuntimeError(f"server start-up failed ({last}); log: {self.log_path}")
            return last
        return model_ready(c, self.model, str(self.log_path))


def server_env(args: argparse.Namespace, model: str, batching: bool) -> dict[str, str]:
    """The classify benchmark's server settings (batching, threads, device), serving only the text model."""
    env = classify_server_env(args, model, batching)
    env.pop("CNN_DEFAULT_CLASSIFIER")
    env.update({
        "CNN_WEIGHTS_DIR": str(args.weights_dir),
        "CNN_CLASSIFIERS": "",  # empty list: only the text model is loaded
        "CNN_TEXT_MODELS": model,
        "CNN_DEFAULT_TEXT_MODEL": model,
        "CNN_MAX_TEXTS_PER_REQUEST": str(max(64, args.texts_per_request)),
    })
    return env


def run_levels(args: argparse.Namespace, url: str, model: str, bodies: list[bytes], batching: str,
               api_key: str | None) -> list[TextLoadResult]:
    out = []
    for c in args.concurrency:
        r = asyncio.run(run_load(url, model=model, concurrency=c, duration=args.duration, warmup=args.warmup,
                                 bodies=bodies, texts_per_request=args.texts_per_request, batching=batching,
                                 api_key=api_key, timeout=args.timeout))
        out.append(r)
        print(f"#   c={c}: {fmt(r.texts_per_s)} texts/s, p50 {fmt(r.p50_ms)} ms, p99 {fmt(r.p99_ms)} ms, "
              f"errors {describe_errors(r)}, mean batch {fmt(r.mean_batch_size, 2)}", file=sys.stderr, flush=True)
    return out


def run_server_load(args: argparse.Namespace, model: str, bodies: list[bytes],
                    ) -> tuple[list[TextLoadResult], dict[str, Any]]:
    """Matrix (server started per batching mode) or, with --url, one pass against a running server."""
    if args.url:
        probed = asyncio.run(probe(args.url, bodies[0], args.api_key, args.timeout))
        print(f"# load against {args.url}: {probed}", file=sys.stderr, flush=True)
        return run_levels(args, args.url, model, bodies, "server's", args.api_key), probed
    log_dir = Path(args.server_log_dir) if args.server_log_dir else Path(tempfile.mkdtemp(prefix="text-bench-"))
    results: list[TextLoadResult] = []
    probed = {}
    for mode in args.batching:
        batching = mode == "on"
        label = f"on (max {args.batch_size}, {fmt(args.batch_wait_ms)} ms)" if batching else "off"
        log_path = log_dir / f"server-{model}-{'batch' if batching else 'nobatch'}.log"
        print(f"# starting server: {model}, batching {label} (log {log_path})", file=sys.stderr, flush=True)
        with TextServer(server_env(args, model, batching), model=model, python=args.python, log_path=log_path,
                        startup_timeout=args.startup_timeout) as srv:
            probed = asyncio.run(probe(srv.url, bodies[0], None, args.timeout))
            for r in run_levels(args, srv.url, model, bodies, mode, None):
                r.extra = {**r.extra, "max_batch_size": args.batch_size if batching else 1,
                           "max_wait_ms": args.batch_wait_ms}
                results.append(r)
    return results, probed


# --------------------------------------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None,
                   help="text model (manifest name; default: the first text-classification entry of the manifest)")
    p.add_argument("--weights-dir", type=Path, default=PROJECT_ROOT / "weights",
                   help="manifest + checkpoints (in-process load and the server's CNN_WEIGHTS_DIR)")
    p.add_argument("--csv", type=Path, default=None,
                   help=f"AG-News-style CSV (class,title,description; no header); default {DEFAULT_CSV} if present, "
                        "else generated sentences")
    p.add_argument("--num-texts", type=int, default=2000, help="texts sampled into the pool")
    p.add_argument("--device", default=None, help="cpu, cuda, auto (in-process; CNN_DEVICE for the server)")
    p.add_argument("--torch-threads", type=int, default=None,
                   help="intra-op threads, in-process and CNN_TORCH_THREADS (default: torch's)")
    p.add_argument("--allow-untrained", action="store_true",
                   help="random weights when the checkpoint is missing (speed does not depend on weight values)")
    p.add_argument("--json", type=Path, default=None, help="write all results as JSON here")
    p.add_argument("--markdown", type=Path, default=None, help="also write the report as Markdown here")
    f = p.add_argument_group("forward (in-process)")
    f.add_argument("--skip-forward", action="store_true")
    f.add_argument("--forward-batch-sizes", type=parse_int_list, default=[1, 8, 32])
    f.add_argument("--forward-duration", type=float, default=5.0, help="timed seconds per batch size")
    g = p.add_argument_group("load (POST /text/classify)")
    g.add_argument("--skip-load", action="store_true")
    g.add_argument("--url", default=None,
                   help="load a server that is already running (loopback only) instead of starting one per mode")
    g.add_argument("--api-key", default=None, help="X-API-Key (with --url)")
    g.add_argument("--concurrency", type=parse_int_list, default=[1, 8, 32], help="worker counts, e.g. 1,8,32")
    g.add_argument("--duration", type=float, default=20.0, help="measured seconds per concurrency level")
    g.add_argument("--warmup", type=float, default=3.0, help="unmeasured seconds before each level")
    g.add_argument("--texts-per-request", type=int, default=1)
    g.add_argument("--top-k", type=int, default=5)
    g.add_argument("--timeout", type=float, default=120.0, help="per-request timeout, seconds")
    add_server_options(g)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if bad := [b for b in args.batching if b not in ("on", "off")]:
        raise SystemExit(f"--batching takes on,off; got {bad}")
    if args.texts_per_request < 1 or args.num_texts < 1:
        raise SystemExit("--texts-per-request and --num-texts must be >= 1")
    if args.url:
        ensure_loopback(args.url)
    args.weights_dir = args.weights_dir.resolve()
    model = args.model or first_text_model(args.weights_dir)
    if not model:
        raise SystemExit(f"no --model and no text-classification entry in {args.weights_dir / 'manifest.json'}")
    texts, source = load_texts(args)
    mean_chars = sum(len(t) for t in texts) / len(texts)

    forward: list[ForwardResult] = []
    info: dict[str, Any] = {}
    if not args.skip_forward:
        forward, info = measure_forward(args, model, texts)
    load: list[TextLoadResult] = []
    probed: dict[str, Any] = {}
    if not args.skip_load:
        bodies = request_bodies(texts, model, args.texts_per_request, args.top_k)
        load, probed = run_server_load(args, model, bodies)

    window = info.get("window") or probed.get("window")
    device = info.get("device") or args.device
    machine = machine_description(str(device) if device else None)
    threads = args.torch_threads if args.torch_threads is not None else "default"
    lines = [f"## text classifier benchmark: {model}", "", *machine_lines(machine)]
    if info:
        lines.append(f"- model: {info.get('family')} {json.dumps(info.get('arch') or {})} "
                     f"weights {info.get('weights')} ({info.get('weights_source')}), window {window} "
                     f"{info.get('window_unit', 'characters')}")
    elif probed:
        lines.append(f"- model: {probed.get('model')}, weights {probed.get('weights')} "
                     f"({probed.get('weights_source')}), window {window} characters")
    n_longer = info["longer_than_window"] if "longer_than_window" in info else sum(len(t) > window for t in texts)
    longer = f", {100 * n_longer / len(texts):.0f}% longer than the window" if window else ""
    lines.append(f"- texts: {len(texts)} from {source}; mean {mean_chars:.0f} characters{longer}")
    note = " (in-process only; the --url server uses its own)" if args.url else ""
    lines.append(f"- torch threads: {threads}{note}")
    if forward:
        lines += ["", "### forward, in-process (encode + model + softmax)", "",
                  f"`loaded.forward(batch)` timed for {args.forward_duration:g} s per batch size after 3 warm-up "
                  "calls; encode = the model's encoder alone (`CharSpec.encode` or `WordEncoder.encode`).", "",
                  *forward_table(forward)]
    if load:
        where = (f"against {args.url}" if args.url else
                 f"server restarted per batching mode (on: max batch {args.batch_size}, wait "
                 f"{fmt(args.batch_wait_ms)} ms; off: max batch 1), only {model} loaded")
        lines += ["", "### POST /text/classify, closed loop", "",
                  f"{args.duration:g} s per row after {args.warmup:g} s warm-up, {args.texts_per_request} text(s) "
                  f"per request, top_k {args.top_k}; {where}. Latency percentiles over successful requests; mean "
                  "batch = delta cnn_batch_size_sum / delta cnn_batch_size_count over the measured window.", "",
                  *load_table(load)]
        stages = [(f"batching {r.batching}, c={r.concurrency}", r.extra.get("stages_ms")) for r in load]
        if any(st for _, st in stages):
            lines += ["", "Where the time went (means over each row's window, from the server's histograms):", "",
                      *stage_table(stages)]
    report = "\n".join(lines)
    print(report)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(report + "\n")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {"machine": machine, "model": model, "model_info": info, "server_model": probed,
                   "texts": {"source": source, "count": len(texts), "mean_chars": mean_chars},
                   "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                   "forward": [asdict(r) for r in forward], "load": [asdict(r) for r in load]}
        args.json.write_text(json.dumps(_json_safe(payload), indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
