"""Cross-replica visibility of an enrolment on the PostgreSQL gallery (`app.stores.pg_gallery.PgGalleryStore`).

Replica A (this process) enrols N single-face subjects one at a time, --gap-ms apart; replica B (a second process,
started with multiprocessing spawn) searches for each face in turn until its top hit is that subject. Both read
CLOCK_MONOTONIC, which is system-wide on Linux, so "visible on B" minus "enroll returned on A" is the propagation
delay: NOTIFY delivery + B's catch-up (one REPEATABLE READ read of the log and the new embeddings, then the index
add) + at most one search poll of B (--probe-ms apart). Also reported: from the start of A's enroll call, and A's
enroll latency (the commit plus its own index add).

    python -m bench.gallery_sync                       # starts a throwaway server (tests/pgserver.py)
    python -m bench.gallery_sync postgresql://user@host/db --n 1000 --dim 512

The database given is written to (tables gallery_*); use an empty one.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import sys
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

from bench.harness import loadavg, pg_database, write_json

KEY_NAME = "bench-face"


def _now() -> float:
    return time.clock_gettime(time.CLOCK_MONOTONIC)


def _vectors(n: int, dim: int, seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _replica_b(url: str, dim: int, n: int, seed: int, prefix: str, probe_s: float, timeout_s: float, notify: bool,
               pipe: Connection) -> None:
    """Replica B: wait for each face in order; send back the time each became the top hit."""
    from app.stores.interfaces import ModelKey
    from app.stores.pg_gallery import PgGalleryStore

    store = PgGalleryStore(url, ModelKey(KEY_NAME, "0" * 64, dim), notify=notify)
    vecs = _vectors(n, dim, seed)
    first = store.sync() + 1  # A is the only writer: enrolment i is generation first + i
    pipe.send("ready")
    seen: list[float | None] = []
    applied: list[float | None] = []
    try:
        for i in range(n):
            deadline = _now() + timeout_s
            found = at_generation = None
            while _now() < deadline:
                if at_generation is None and store.generation >= first + i:
                    at_generation = _now()
                hits = store.search(vecs[i:i + 1], 1)[0]
                if hits and hits[0].subject == f"{prefix}{i}":
                    found = _now()
                    break
                time.sleep(probe_s)
            seen.append(found)
            applied.append(at_generation if at_generation is not None else found)
        pipe.send((seen, applied))
    finally:
        store.close()


def _pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q)) if xs else float("nan")


def _summary(ms: list[float]) -> dict[str, float]:
    return {"p50": round(_pct(ms, 50), 3), "p95": round(_pct(ms, 95), 3), "p99": round(_pct(ms, 99), 3),
            "max": round(max(ms), 3) if ms else float("nan"), "min": round(min(ms), 3) if ms else float("nan")}


def run(url: str, args: argparse.Namespace, *, n: int, notify: bool, seed: int, prefix: str) -> dict[str, Any]:
    """One run: A enrols n faces (subjects prefix0, prefix1, ...), B (notify or poll only) waits for each."""
    from app.stores.interfaces import ModelKey, NewFace
    from app.stores.pg import connect
    from app.stores.pg_gallery import PgGalleryStore

    vecs = _vectors(n, args.dim, seed)
    a = PgGalleryStore(url, ModelKey(KEY_NAME, "0" * 64, args.dim))
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_replica_b, args=(url, args.dim, n, seed, prefix, args.probe_ms / 1000,
                                                args.timeout, notify, child), daemon=True)
    proc.start()
    try:
        if not parent.poll(120) or parent.recv() != "ready":
            raise SystemExit("replica B did not start")
        started, acked = [], []
        for i in range(n):
            t0 = _now()
            a.enroll(f"{prefix}{i}", [NewFace(vecs[i])])
            started.append(t0)
            acked.append(_now())
            time.sleep(args.gap_ms / 1000)
        if not parent.poll(args.timeout + 60):
            raise SystemExit("replica B did not report")
        seen, applied = parent.recv()
        proc.join(30)
    finally:
        if proc.is_alive():
            proc.kill()
        with connect(url) as conn:
            server_version = conn.execute("SHOW server_version").fetchone()["server_version"]
        a.close()
    missing = [i for i, s in enumerate(seen) if s is None]
    from_ack = [(s - t) * 1000 for s, t in zip(seen, acked, strict=True) if s is not None]
    applied_ms = [(s - t) * 1000 for s, t in zip(applied, acked, strict=True) if s is not None]
    from_start = [(s - t) * 1000 for s, t in zip(seen, started, strict=True) if s is not None]
    enroll_ms = [(t1 - t0) * 1000 for t0, t1 in zip(started, acked, strict=True)]
    return {
        "mode": "LISTEN/NOTIFY" if notify else "poll only", "n": n, "dim": args.dim, "omp_threads": args.threads,
        "gap_ms": args.gap_ms, "probe_ms": args.probe_ms, "timeout_s": args.timeout,
        "poll_seconds": a.poll_seconds, "postgres": server_version, "missing": missing,
        "propagation_from_ack_ms": _summary(from_ack), "propagation_from_call_ms": _summary(from_start),
        "b_index_at_generation_from_ack_ms": _summary(applied_ms),
        "enroll_ms": _summary(enroll_ms),
        "raw": {"from_ack_ms": [round(x, 3) for x in from_ack], "enroll_ms": [round(x, 3) for x in enroll_ms]},
    }


def report(results: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    first = results[0]
    lines = [
        "## Gallery change feed: cross-replica visibility (PostgreSQL)",
        "",
        f"- {meta['machine']}; PostgreSQL {first['postgres']} ({meta['database']}); load average before/after "
        f"{meta['loadavg_start']} / {meta['loadavg_end']} (other work shared the cores)",
        f"- single-face enrolments on replica A (one process), {first['gap_ms']} ms apart, dim {first['dim']}, FAISS "
        f"OpenMP threads {first['omp_threads']}; replica B (another process, spawn) searches for each in turn every "
        f"{first['probe_ms']} ms until it is the top hit (so visibility includes up to one probe interval)",
        f"- B's listener: LISTEN/NOTIFY with a poll every {first['poll_seconds']} s as the fallback; the poll-only "
        "rows show that fallback alone (notify=False: no LISTEN, as when notifications are lost)",
        "",
        "| B's mode | n | missing | what | p50 ms | p95 ms | p99 ms | max ms |",
        "|---|---:|---:|---|---:|---:|---:|---:|",
    ]
    for r in results:
        rows = [("visible on B after A's enroll returned", r["propagation_from_ack_ms"]),
                ("B's index at A's generation after A's enroll returned", r["b_index_at_generation_from_ack_ms"]),
                ("visible on B after A's enroll was called", r["propagation_from_call_ms"]),
                ("A's enroll latency (commit + own index add)", r["enroll_ms"])]
        lines += [f"| {r['mode']} | {r['n']} | {len(r['missing'])} | {name} | {s['p50']:.2f} | {s['p95']:.2f} | "
                  f"{s['p99']:.2f} | {s['max']:.2f} |" for name, s in rows]
    lines += ["", "Negative values can occur: B may apply the change before A's own index add has returned."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("url", nargs="?", help="PostgreSQL URL of an empty database (default: a throwaway server)")
    p.add_argument("--n", type=int, default=200, help="enrolments seen through LISTEN/NOTIFY")
    p.add_argument("--poll-n", type=int, default=30, help="enrolments seen by a poll-only replica (0: skip)")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--gap-ms", type=float, default=20.0, help="pause between enrolments on A")
    p.add_argument("--probe-ms", type=float, default=0.5, help="pause between B's searches")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds B waits for one face before giving up")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="OpenMP threads of FAISS in both replicas (OMP_NUM_THREADS, set before FAISS loads): on a "
                        "busy 2-core machine, spinning OpenMP workers add milliseconds to every tiny search")
    p.add_argument("--out", type=Path, default=Path("docs/bench/gallery-sync.json"),
                   help="raw JSON (the Markdown table goes next to it, .md)")
    args = p.parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # inherited by replica B's spawned process
    with pg_database(args.url) as (url, where):
        meta: dict[str, Any] = {"database": where, "loadavg_start": loadavg(),
                                "machine": f"{platform.processor() or platform.machine()}, {mp.cpu_count()} CPUs, "
                                           f"Python {platform.python_version()}"}
        results = [run(url, args, n=args.n, notify=True, seed=args.seed, prefix="n")]
        if args.poll_n:
            results.append(run(url, args, n=args.poll_n, notify=False, seed=args.seed + 1, prefix="p"))
        meta["loadavg_end"] = loadavg()
    write_json(args.out, {**meta, "runs": results})
    text = report(results, meta)
    args.out.with_suffix(".md").write_text(text + "\n")
    print(text)
    print(f"# wrote {args.out} and {args.out.with_suffix('.md')}", file=sys.stderr)


if __name__ == "__main__":
    main()
