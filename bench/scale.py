"""One process against two replicas on one PostgreSQL database, on this machine, in one run.

What it measures (real server processes, `python -m app.cli serve`, the shipped models, real images from
`../shared/data`, a throwaway PostgreSQL server from tests/pgserver.py unless a URL is given):

1. **Throughput**: `/classify` (the default CIFAR model, a CIFAR-10 image) and `/faces/identify` (the shipped face
   model, Haar detection, an LFW photo, against a gallery of real enrolled LFW faces), closed-loop clients for
   --duration seconds each:
   - one server process using every core (`CNN_TORCH_THREADS` = the core count);
   - two replica processes on the same database, one torch thread each, the client alternating between them (a
     round-robin load balancer's work, done by the client: no proxy hop is measured).
2. **Cross-replica visibility of an enrolment through the API**: enrol a photo on one replica (alternating A->B,
   B->A); from the 201, poll the other replica's `GET /faces/gallery` until its index holds the new face (index
   visible), then one `POST /faces/identify` there with the same photo must name the new subject (found).
3. **Job throughput** with 1, 2 and 4 `python -m app.cli worker` processes on the PostgreSQL job store: the workers
   start and go idle, then --jobs small style-transfer jobs are submitted at once through the API; the time from the
   first submission to the last `succeeded` gives jobs/s.

The report ends with the arithmetic for N hosts from the measured per-replica figures (an estimate, not a
measurement: nothing here ran on two hosts).

    python -m bench.scale                                   # ~6 minutes here
    python -m bench.scale --duration 10 --workers 1,2 --jobs 6
    python -m bench.scale postgresql://user@host/db         # an empty database of your own

Raw JSON: --out (default docs/bench/scale.json), Markdown next to it (.md).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx

from bench.classify_load import PROJECT_ROOT, Server, closed_loop, percentile
from bench.harness import loadavg, pg_database, write_json

DATA = PROJECT_ROOT.parent / "shared" / "data"


# ------------------------------------------------------------------------------------------------ inputs

def cifar_image() -> bytes:
    path = DATA / "cifar10" / "train" / "airplane" / "0000.jpg"
    if not path.is_file():
        raise SystemExit(f"{path} is missing: this benchmark uses the real datasets of ../shared/data")
    return path.read_bytes()


def lfw_photos(n: int) -> list[tuple[str, bytes]]:
    """(person, first photo) for the first n people of LFW's image folder, in name order."""
    root = DATA / "lfw" / "images"
    if not root.is_dir():
        raise SystemExit(f"{root} is missing: this benchmark uses the real datasets of ../shared/data")
    out = []
    for person in sorted(p for p in root.iterdir() if p.is_dir()):
        files = sorted(person.glob("*.jpg"))
        if files:
            out.append((person.name, files[0].read_bytes()))
        if len(out) == n:
            break
    return out


def style_images() -> tuple[bytes, bytes]:
    content = sorted((DATA / "style" / "content").glob("*"))
    style = sorted((DATA / "style" / "style").glob("*"))
    if not content or not style:
        raise SystemExit(f"{DATA / 'style'} has no content/style images")
    return content[0].read_bytes(), style[0].read_bytes()


# ------------------------------------------------------------------------------------------------ servers

def server_env(args: argparse.Namespace, db: str, data_dir: Path, threads: int) -> dict[str, str]:
    return {
        "CNN_DATABASE_URL": db, "CNN_DATA_DIR": str(data_dir), "CNN_DEVICE": "cpu",
        "CNN_CLASSIFIERS": args.classifier, "CNN_DEFAULT_CLASSIFIER": args.classifier, "CNN_TEXT_MODELS": "",
        "CNN_FACE_MODELS": args.face_model, "CNN_STYLE_ENABLED": "true", "CNN_STYLE_WORKERS": "0",
        "CNN_TORCH_THREADS": str(threads), "CNN_WARMUP": "true", "CNN_LOG_LEVEL": "warning", "CNN_API_KEYS": "",
        "CNN_API_KEYS_FILE": "", "CNN_ALLOW_DOWNLOADS": "false", "CNN_IN_FLIGHT_MAX": "256",
        "OMP_NUM_THREADS": str(threads),
    }


def start_servers(stack: ExitStack, env: dict[str, str], n: int, logs: Path, tag: str) -> list[str]:
    urls = []
    for i in range(n):
        s = Server(env, python=sys.executable, log_path=logs / f"{tag}-{i}.log", startup_timeout=300)
        stack.enter_context(s)
        urls.append(s.url)
    return urls


# ------------------------------------------------------------------------------------------------ load

def summarise(latencies: list[float], statuses: dict[str, int], elapsed: float, per_request: int = 1
              ) -> dict[str, Any]:
    latencies = sorted(latencies)
    ok = statuses.get("200", 0)
    return {"requests": sum(statuses.values()), "ok": ok,
            "errors": {k: v for k, v in sorted(statuses.items()) if k != "200"},
            "seconds": round(elapsed, 3), "requests_per_s": round(ok / elapsed, 2) if elapsed else 0.0,
            "items_per_s": round(ok * per_request / elapsed, 2) if elapsed else 0.0,
            "p50_ms": round(1000 * percentile(latencies, 50), 1), "p99_ms": round(1000 * percentile(latencies, 99), 1)}


async def load(urls: list[str], route: str, files: list[tuple[str, tuple[str, bytes, str]]], data: dict[str, str],
               concurrency: int, duration: float, warmup: float) -> dict[str, Any]:
    """Closed-loop clients for `duration` s, the n-th request going to urls[n % len(urls)]."""
    limits = httpx.Limits(max_connections=concurrency * len(urls), max_keepalive_connections=concurrency * len(urls))
    async with httpx.AsyncClient(limits=limits, timeout=120, trust_env=False) as client:

        def send(n: int) -> Awaitable[httpx.Response]:
            return client.post(f"{urls[n % len(urls)]}{route}", files=files, data=data)

        if warmup > 0:
            await closed_loop(concurrency, warmup, send)
        latencies, statuses, elapsed = await closed_loop(concurrency, duration, send)
    return summarise(latencies, dict(statuses), elapsed)


def enrol(url: str, subject: str, photo: bytes, client: httpx.Client) -> httpx.Response:
    return client.post(f"{url}/faces/enroll", data={"subject": subject},
                       files=[("image", (f"{subject}.jpg", photo, "image/jpeg"))])


def seed_gallery(url: str, photos: list[tuple[str, bytes]]) -> dict[str, Any]:
    """Enrol each photo through the API (Haar detection, largest face); the gallery the identify load searches."""
    t0 = time.perf_counter()
    ok = no_face = 0
    with httpx.Client(timeout=60, trust_env=False) as c:
        for person, photo in photos:
            r = enrol(url, person, photo, c)
            if r.status_code == 201:
                ok += 1
            elif r.status_code == 422:
                no_face += 1
            else:
                raise SystemExit(f"enrolment of {person} failed: {r.status_code} {r.text[:300]}")
    return {"enrolled": ok, "rejected_422": no_face, "seconds": round(time.perf_counter() - t0, 2)}


def indexed(url: str, c: httpx.Client) -> int:
    r = c.get(f"{url}/faces/gallery")
    r.raise_for_status()
    return int(r.json()["indexed_faces"])


def visibility(urls: list[str], photos: list[tuple[str, bytes]], timeout: float) -> dict[str, Any]:
    """Enrol photo i on urls[i % 2]; time until the other replica's index holds it, then until it identifies it."""
    index_ms: list[float] = []
    found_ms: list[float] = []
    enrol_ms: list[float] = []
    misses: list[str] = []
    with httpx.Client(timeout=60, trust_env=False) as c:
        for i, (person, photo) in enumerate(photos):
            a, b = urls[i % 2], urls[(i + 1) % 2]
            subject = f"vis-{i}-{person}"
            before = indexed(b, c)
            t0 = time.perf_counter()
            r = enrol(a, subject, photo, c)
            t1 = time.perf_counter()
            if r.status_code != 201:
                continue  # no face found in this photo: not a visibility sample
            enrol_ms.append((t1 - t0) * 1000)
            added = len(r.json()["faces"])
            while indexed(b, c) < before + added:
                if time.perf_counter() - t1 > timeout:
                    misses.append(subject)
                    break
            else:
                index_ms.append((time.perf_counter() - t1) * 1000)
                ident = c.post(f"{b}/faces/identify", files=[("image", ("p.jpg", photo, "image/jpeg"))])
                t3 = time.perf_counter()
                faces = ident.json().get("faces", []) if ident.status_code == 200 else []
                cands = [cand.get("subject") for f in faces for cand in f.get("candidates", [])]
                if subject in cands:
                    found_ms.append((t3 - t1) * 1000)
                else:
                    misses.append(subject)

    def stats(xs: list[float]) -> dict[str, float]:
        s = sorted(xs)
        return {"n": len(s), "p50": round(percentile(s, 50), 2), "p99": round(percentile(s, 99), 2),
                "max": round(s[-1], 2) if s else float("nan")}

    return {"index_visible_ms": stats(index_ms), "identified_ms": stats(found_ms), "enrol_ms": stats(enrol_ms),
            "misses": misses}


# ------------------------------------------------------------------------------------------------ jobs

def run_jobs(url: str, env: dict[str, str], workers: int, jobs: int, args: argparse.Namespace, logs: Path,
             content: bytes, style: bytes) -> dict[str, Any]:
    """Start `workers` worker processes, wait until each says it runs, submit `jobs` jobs, wait for all."""
    wenv = {**os.environ, **env, "CNN_TORCH_THREADS": "1", "OMP_NUM_THREADS": "1"}
    procs: list[subprocess.Popen[bytes]] = []
    paths = [logs / f"worker-{workers}-{i}.log" for i in range(workers)]
    try:
        for p in paths:
            with p.open("wb") as log:
                procs.append(subprocess.Popen([sys.executable, "-m", "app.cli", "worker"], cwd=PROJECT_ROOT,
                                              env=wenv, stdout=log, stderr=subprocess.STDOUT,
                                              stdin=subprocess.DEVNULL))
        deadline = time.monotonic() + 120
        while not all("style worker" in p.read_text(errors="replace") for p in paths):
            if time.monotonic() > deadline or any(pr.poll() is not None for pr in procs):
                raise SystemExit(f"workers did not start; see {logs}")
            time.sleep(0.2)
        with httpx.Client(timeout=60, trust_env=False) as c:
            t0 = time.perf_counter()
            ids = []
            for _ in range(jobs):
                r = c.post(f"{url}/style-transfer", data={"steps": str(args.job_steps), "size": str(args.job_size)},
                           files=[("content", ("c.jpg", content, "image/jpeg")),
                                  ("style", ("s.jpg", style, "image/jpeg"))])
                if r.status_code != 202:
                    raise SystemExit(f"job not accepted: {r.status_code} {r.text[:300]}")
                ids.append(r.json()["id"])
            pending = set(ids)
            done: dict[str, dict[str, Any]] = {}
            while pending:
                if time.perf_counter() - t0 > args.job_timeout:
                    raise SystemExit(f"{len(pending)} jobs unfinished after {args.job_timeout} s")
                for job_id in list(pending):
                    body = c.get(f"{url}/style-transfer/{job_id}").json()
                    if body["status"] in ("succeeded", "failed", "canceled"):
                        done[job_id] = body
                        pending.discard(job_id)
                time.sleep(0.1)
            elapsed = time.perf_counter() - t0
    finally:
        for pr in procs:
            pr.terminate()
        for pr in procs:
            try:
                pr.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pr.kill()
    from app.stores.pg import connect

    with connect(env["CNN_DATABASE_URL"]) as conn:  # which worker finished each job (the API does not say)
        rows = conn.execute("SELECT worker, count(*) AS n FROM jobs WHERE id = ANY(%s) GROUP BY worker",
                            (ids,)).fetchall()
    by_worker = {str(r["worker"]): int(r["n"]) for r in rows}
    return {"workers": workers, "jobs": jobs, "succeeded": sum(b["status"] == "succeeded" for b in done.values()),
            "attempts_max": max(int(b.get("attempts", 1)) for b in done.values()),
            "seconds": round(elapsed, 2), "jobs_per_s": round(jobs / elapsed, 3), "jobs_by_worker": by_worker}


# ------------------------------------------------------------------------------------------------ report

def report(res: dict[str, Any]) -> str:
    m = res["meta"]
    lines = ["## One process against two replicas on one PostgreSQL database (`python -m bench.scale`)", "",
             f"- {m['machine']}; PostgreSQL: {m['database']}; load average before/after {m['loadavg_start']} / "
             f"{m['loadavg_end']}",
             f"- models: `{m['classifier']}` for /classify (a {m['cifar_image']}), `{m['face_model']}` for "
             f"/faces/identify (an LFW photo, Haar detection) against a gallery of {m['gallery']} real LFW faces "
             f"enrolled through the API; {m['concurrency']} closed-loop clients, {m['duration']} s per row after "
             f"{m['warmup']} s warm-up",
             "- one process: torch threads = cores; two replicas: one torch thread each, requests alternating "
             "between them (client-side round robin, no proxy); the load generator, PostgreSQL and the servers "
             "share the same cores", "",
             "| shape | route | req/s | p50 ms | p99 ms | errors |", "|---|---|---:|---:|---:|---|"]
    for shape in ("one process", "two replicas"):
        for route in ("/classify", "/faces/identify"):
            r = res["throughput"][shape][route]
            lines.append(f"| {shape} | {route} | {r['requests_per_s']:.1f} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} | "
                         f"{sum(r['errors'].values()) or 0} |")
    v = res["visibility"]
    lines += ["", f"Cross-replica visibility of an enrolment through the API ({v['index_visible_ms']['n']} enrolments, "
              "alternating A->B and B->A; from the 201 on one replica):", "",
              "| what, on the other replica | p50 ms | p99 ms | max ms |", "|---|---:|---:|---:|",
              f"| its index holds the face (`GET /faces/gallery` polled) | {v['index_visible_ms']['p50']:.1f} | "
              f"{v['index_visible_ms']['p99']:.1f} | {v['index_visible_ms']['max']:.1f} |",
              f"| `POST /faces/identify` with the photo names the subject (end of that call) | "
              f"{v['identified_ms']['p50']:.1f} | {v['identified_ms']['p99']:.1f} | {v['identified_ms']['max']:.1f} |",
              f"| (the enrolment itself on the first replica) | {v['enrol_ms']['p50']:.1f} | "
              f"{v['enrol_ms']['p99']:.1f} | {v['enrol_ms']['max']:.1f} |",
              "", f"Misses: {len(v['misses'])}.", "",
              f"Style jobs ({m['job_size']} px, {m['job_steps']} steps, one torch thread per worker process), "
              "submitted at once through one replica, run by `app.cli worker` processes on the PostgreSQL store:", "",
              "| workers | jobs | succeeded | seconds | jobs/s | jobs per worker | most attempts |",
              "|---:|---:|---:|---:|---:|---|---:|"]
    for j in res["jobs"]:
        split = ", ".join(str(n) for n in sorted(j["jobs_by_worker"].values(), reverse=True))
        lines.append(f"| {j['workers']} | {j['jobs']} | {j['succeeded']} | {j['seconds']:.1f} | {j['jobs_per_s']:.3f} "
                     f"| {split} | {j['attempts_max']} |")
    lines += ["", "### What this machine allows, and the arithmetic for N hosts", ""] + res["arithmetic"]
    return "\n".join(lines)


def arithmetic(res: dict[str, Any], cores: int) -> list[str]:
    t = res["throughput"]
    out = []
    for route in ("/classify", "/faces/identify"):
        one = t["one process"][route]["requests_per_s"]
        two = t["two replicas"][route]["requests_per_s"]
        out.append(f"- {route}: one process {one:.1f} req/s, two replicas {two:.1f} req/s on the same {cores} cores "
                   f"({two / one:.2f}x). Each replica had {cores // 2 or 1} core(s)' worth, so a host of this kind "
                   f"serving alone gives about {one:.1f} req/s; N such hosts behind a balancer would give about "
                   f"N x {one:.1f} req/s (for N = 4: {4 * one:.0f}) as long as the balancer and the database keep up.")
    v = res["visibility"]
    out += [f"- /classify touches no shared state. /faces/identify searches each replica's own FAISS index and then "
            f"reads the names of its hits in one primary-key query, so the database's share of an identification is "
            f"one small read; an enrolment is one transaction "
            f"({v['enrol_ms']['p50']:.0f} ms p50 through the API here, detection and embedding included) and reaches "
            f"the other replica's index {v['index_visible_ms']['p50']:.0f} ms later (p50) through LISTEN/NOTIFY.",
            "- Jobs: each worker process runs one job at a time; on N hosts with w workers each, jobs/s is about "
            "N x w x (one worker's jobs/s) while the workers do not share cores: on this machine more workers than "
            "cores only share the same two cores."]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("url", nargs="?", help="PostgreSQL URL of an empty database (default: a throwaway server)")
    p.add_argument("--classifier", default="cifar10-resnet56")
    p.add_argument("--face-model", default="lfw-face-resnet")
    p.add_argument("--gallery", type=int, default=200, help="real LFW people enrolled before the identify load")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--duration", type=float, default=20.0)
    p.add_argument("--warmup", type=float, default=3.0)
    p.add_argument("--visibility-n", type=int, default=40, help="enrolments timed across replicas")
    p.add_argument("--visibility-timeout", type=float, default=10.0)
    p.add_argument("--workers", default="1,2,4")
    p.add_argument("--jobs", type=int, default=8, help="style jobs per worker count")
    p.add_argument("--job-size", type=int, default=96)
    p.add_argument("--job-steps", type=int, default=40)
    p.add_argument("--job-timeout", type=float, default=600)
    p.add_argument("--out", type=Path, default=Path("docs/bench/scale.json"))
    args = p.parse_args(argv)
    cores = os.cpu_count() or 1
    image = cifar_image()
    people = lfw_photos(args.gallery + args.visibility_n)
    gallery, probes = people[:args.gallery], people[args.gallery:]
    content, style = style_images()
    worker_counts = [int(x) for x in args.workers.split(",") if x.strip()]
    res: dict[str, Any] = {"throughput": {}, "jobs": []}
    meta: dict[str, Any] = {
        "machine": f"{platform.processor() or platform.machine()}, {cores} CPUs, Python {platform.python_version()}",
        "loadavg_start": loadavg(), "classifier": args.classifier, "face_model": args.face_model,
        "cifar_image": "32 x 32 CIFAR-10 JPEG", "concurrency": args.concurrency, "duration": args.duration,
        "warmup": args.warmup, "job_size": args.job_size, "job_steps": args.job_steps}
    classify_files = [("image", ("plane.jpg", image, "image/jpeg"))]
    identify_files = [("image", ("probe.jpg", gallery[0][1], "image/jpeg"))]
    with pg_database(args.url) as (db, where), tempfile.TemporaryDirectory(prefix="cnn-scale-") as tmp:
        meta["database"] = where
        logs = Path(tmp) / "logs"
        logs.mkdir()
        shared = Path(tmp) / "shared-data"
        for shape, n, threads in (("one process", 1, cores), ("two replicas", 2, max(1, cores // 2))):
            env = server_env(args, db, shared, threads)
            with ExitStack() as stack:
                urls = start_servers(stack, env, n, logs, shape.replace(" ", "-"))
                if "seeded" not in meta:
                    meta["seeded"] = seed_gallery(urls[0], gallery)
                    meta["gallery"] = meta["seeded"]["enrolled"]
                print(f"# {shape}: {urls}", file=sys.stderr)
                res["throughput"][shape] = {
                    "/classify": asyncio.run(load(urls, "/classify", classify_files, {"top_k": "1"},
                                                  args.concurrency, args.duration, args.warmup)),
                    "/faces/identify": asyncio.run(load(urls, "/faces/identify", identify_files, {},
                                                        args.concurrency, args.duration, args.warmup)),
                }
                print(f"# {shape}: {res['throughput'][shape]}", file=sys.stderr)
                if n == 2:
                    res["visibility"] = visibility(urls, probes, args.visibility_timeout)
                    print(f"# visibility: {res['visibility']}", file=sys.stderr)
                    for w in worker_counts:
                        res["jobs"].append(run_jobs(urls[0], env, w, args.jobs, args, logs, content, style))
                        print(f"# jobs: {res['jobs'][-1]}", file=sys.stderr)
        meta["loadavg_end"] = loadavg()
    res["meta"] = meta
    res["arithmetic"] = arithmetic(res, cores)
    write_json(args.out, res)
    text = report(res)
    args.out.with_suffix(".md").write_text(text + "\n")
    print(text)
    print(f"# wrote {args.out} and {args.out.with_suffix('.md')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
