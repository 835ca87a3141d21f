"""Face-gallery benchmark: GalleryStore (SQLite + FAISS) and the raw VectorIndex next to NumPy brute force.

For every size x dim x index kind, on synthetic unit vectors (seeded; queries are noisy copies of random
gallery faces, cosine about 0.86 to their source, so each has a clear nearest face):

- add: ``VectorIndex.add`` in chunks of --chunk vectors (IVF: first trained on 39 * nlist vectors, as the
  store does), and ``GalleryStore.enroll`` with --chunk faces per call, one subject per call (one SQLite
  transaction with synchronous=FULL + the index add: the durable path); then --enroll-calls single-face
  enrolments on the full gallery, the latency an API caller sees;
- search: p50/p99 latency of single queries (the first --single-queries queries) and of batches of
  --batch queries through ``GalleryStore.search(top_k)`` and ``VectorIndex.search(k=top_k)``, and of
  NumPy brute force (``queries @ matrix.T``, ``argpartition`` top-k) on the same queries in the same run;
  recall@1 (and recall@k for the raw index) against the exact answer;
- memory: RSS delta of the built index and of the populated store, and the peak RSS of each phase
  (VmHWM, reset through /proc/self/clear_refs where the kernel allows it);
- start-up: ``close()`` (writes the snapshot), reopening from the snapshot, and rebuilding from SQLite
  (snapshot removed).

The SQLite database and the snapshot live in a temporary directory under --tmp-dir that is removed after
each configuration. 1M x 512 float32 is 2 GB: expect about 2 GB for the database, 2 GB for the snapshot,
and a rebuild from SQLite that briefly holds the rows, their concatenation and the index (several GB).

    python -m bench.faces_gallery --sizes 10k,100k,1M --dims 128,512 --kinds flat,ivf --queries 1000
    python -m bench.faces_gallery --sizes 2000 --dims 128 --queries 50 --out /tmp/gallery.json  # smoke

End to end, separately: closed-loop POST /faces/identify against a loopback server whose gallery holds
--gallery-size faces. --e2e-model seeds a temporary gallery with synthetic faces for the shipped model
and starts the server itself; --http measures a server you started:

    python -m bench.faces_gallery --e2e-model lfw-face-resnet --gallery-size 100000 \\
        --image ../shared/data/lfw/images/Aaron_Peirsol/Aaron_Peirsol_0001.jpg --concurrency 1,8,32
    python -m bench.faces_gallery --http http://127.0.0.1:8000 --gallery-size 100000 --image face.jpg
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import math
import shutil
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from functools import partial
from importlib import metadata
from pathlib import Path
from typing import Any


def _pin_threads(argv: list[str]) -> None:
    """--threads N also caps the BLAS and OpenMP pools of NumPy and FAISS. It must happen before they are
    imported: faiss.omp_set_num_threads alone leaves the bundled OpenBLAS free to start its own threads,
    which oversubscribe the cores (measured: a 32-query flat search took 390 ms instead of 47 ms)."""
    import os

    for i, a in enumerate(argv):
        value = a.split("=", 1)[1] if a.startswith("--threads=") else (
            argv[i + 1] if a == "--threads" and i + 1 < len(argv) else None)
        if value:
            for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
                os.environ[var] = value


if __name__ == "__main__":
    _pin_threads(sys.argv[1:])

import httpx  # noqa: E402
import numpy as np  # noqa: E402

from app.stores.gallery import GalleryStore, IndexKind, ModelKey, NewFace, VectorIndex  # noqa: E402
from bench.classify_load import (  # noqa: E402
    PROJECT_ROOT,
    Server,
    _json_safe,
    closed_loop,
    ensure_loopback,
    fmt,
    machine_description,
    machine_lines,
    parse_int_list,
    percentile,
)

MIB = 1024 * 1024
BLOCK = 8192  # rows generated per seeded block: row i is the same whatever the gallery size
BENCH_MODEL = "bench-synthetic"


# --------------------------------------------------------------------------------------------- helpers

def parse_sizes(text: str) -> list[int]:
    """'10k,100k,1M' -> [10000, 100000, 1000000]."""
    out = []
    for part in (p.strip().lower() for p in text.split(",") if p.strip()):
        mult = {"k": 1_000, "m": 1_000_000}.get(part[-1], 1)
        try:
            value = int(float(part[:-1] if mult > 1 else part) * mult)
        except ValueError:
            raise argparse.ArgumentTypeError(f"bad size {part!r} (e.g. 2000, 10k, 1M)") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"sizes are positive, got {part!r}")
        out.append(value)
    if not out:
        raise argparse.ArgumentTypeError("no sizes given")
    return out


def parse_kinds(text: str) -> list[IndexKind]:
    kinds = [p.strip() for p in text.split(",") if p.strip()]
    if not kinds or any(k not in ("flat", "ivf") for k in kinds):
        raise argparse.ArgumentTypeError(f"--kinds takes flat,ivf; got {text!r}")
    return kinds  # type: ignore[return-value]


def human(n: int) -> str:
    if n >= 1_000_000 and n % 1_000_000 == 0:
        return f"{n // 1_000_000}M"
    if n >= 1_000 and n % 1_000 == 0:
        return f"{n // 1_000}k"
    return str(n)


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_mib() -> float:
    """Resident memory now (NaN where /proc is absent)."""
    kib = _status_kib("VmRSS")
    return kib / 1024 if kib is not None else math.nan


def peak_mib() -> float:
    """Peak resident memory since the last reset_peak() (process lifetime where it cannot be reset)."""
    kib = _status_kib("VmHWM")
    if kib is not None:
        return kib / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def settle() -> float:
    """Collect garbage and reset the peak; returns the RSS the next phase starts from."""
    gc.collect()
    reset_peak()
    return rss_mib()


def dir_mib(root: Path, names: Sequence[str]) -> float:
    return sum((root / n).stat().st_size for n in names if (root / n).exists()) / MIB


def ms_stats(seconds: list[float], prefix: str) -> dict[str, float]:
    s = sorted(seconds)
    return {f"{prefix}_p50_ms": 1000 * percentile(s, 50), f"{prefix}_p99_ms": 1000 * percentile(s, 99),
            f"{prefix}_max_ms": 1000 * s[-1] if s else math.nan}


def auto_nlist(size: int, requested: int | None) -> int:
    """The store's default (1024) unless the gallery is too small to train that many lists (39 per list)."""
    if requested is not None:
        return requested
    return max(1, min(1024, size // 39))


class SyntheticGallery:
    """n seeded random unit vectors, generated block by block so big galleries never exist twice in memory."""

    def __init__(self, n: int, dim: int, seed: int) -> None:
        self.n, self.dim, self.seed = n, dim, seed
        self._cached: tuple[int, np.ndarray] | None = None

    def _block(self, b: int) -> np.ndarray:
        if self._cached is None or self._cached[0] != b:
            rng = np.random.default_rng([self.seed, self.dim, b])
            v = rng.standard_normal((BLOCK, self.dim), dtype=np.float32)
            v /= np.linalg.norm(v, axis=1, keepdims=True)
            self._cached = (b, v)
        return self._cached[1]

    def rows(self, start: int, stop: int) -> np.ndarray:
        out = np.empty((stop - start, self.dim), dtype=np.float32)
        for b in range(start // BLOCK, (stop - 1) // BLOCK + 1):
            lo, hi = max(start, b * BLOCK), min(stop, (b + 1) * BLOCK)
            out[lo - start:hi - start] = self._block(b)[lo - b * BLOCK:hi - b * BLOCK]
        return out

    def chunks(self, size: int, begin: int = 0) -> Iterator[tuple[int, np.ndarray]]:
        for start in range(begin, self.n, size):
            yield start, self.rows(start, min(self.n, start + size))

    def drop_cache(self) -> None:
        self._cached = None


def make_queries(matrix: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """Noisy copies of random gallery rows (noise norm about 0.6), renormalised."""
    src = rng.choice(len(matrix), size=count, replace=len(matrix) < count)
    dim = matrix.shape[1]
    q = matrix[src] + rng.standard_normal((count, dim), dtype=np.float32) * np.float32(0.6 / math.sqrt(dim))
    return (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)


def numpy_topk(matrix: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Exact top-k row indices by inner product, best first: the brute-force baseline."""
    sims = queries @ matrix.T
    k = min(k, sims.shape[1])
    part = np.argpartition(-sims, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(sims, part, axis=1), axis=1)
    return np.take_along_axis(part, order, axis=1)


def time_search(search: Callable[[np.ndarray], list[list[Any]]], queries: np.ndarray, *, batch: int,
                single: int, warmup: int = 5) -> tuple[dict[str, float], list[list[Any]]]:
    """Latency of `single` one-query calls and of batches over all queries; returns the batched answers."""
    for i in range(min(warmup, len(queries))):
        search(queries[i:i + 1])
    single_s = []
    for i in range(min(single, len(queries))):
        t0 = time.perf_counter()
        search(queries[i:i + 1])
        single_s.append(time.perf_counter() - t0)
    batch_s, answers = [], []
    for i in range(0, len(queries), batch):
        t0 = time.perf_counter()
        answers += search(queries[i:i + batch])
        batch_s.append(time.perf_counter() - t0)
    stats = {**ms_stats(single_s, "single"), **ms_stats(batch_s, "batch"),
             "single_queries_per_s": len(single_s) / sum(single_s) if single_s else math.nan,
             "batch_queries_per_s": len(queries) / sum(batch_s) if batch_s else math.nan,
             "single_calls": len(single_s), "batch_calls": len(batch_s)}
    return stats, answers


def recall(answers: list[list[Any]], truth: list[list[Any]], k: int) -> float:
    if not truth:
        return math.nan
    return float(np.mean([len(set(a[:k]) & set(t[:k])) / min(k, len(t)) for a, t in zip(answers, truth,
                                                                                         strict=True)]))


# --------------------------------------------------------------------------------------------- phases

def bench_numpy(gal: SyntheticGallery, args: argparse.Namespace, rng: np.random.Generator,
                ) -> tuple[dict[str, Any], np.ndarray, list[list[int]]]:
    """Materialise the gallery, draw the queries, time brute force; returns (row, queries, exact top-k)."""
    rss0 = settle()
    matrix = gal.rows(0, gal.n)
    gal.drop_cache()
    queries = make_queries(matrix, args.queries, rng)
    matrix_mib = rss_mib() - rss0
    stats, exact = time_search(partial(_numpy_search, matrix, args.top_k), queries, batch=args.batch,
                               single=args.single_queries)
    row = {"engine": "numpy brute force", "kind": "exact", "size": gal.n, "dim": gal.dim, **stats,
           "recall_at_1": 1.0, "recall_at_k": 1.0, "memory_mib": matrix_mib, "peak_mib": peak_mib() - rss0}
    return row, queries, exact


def _numpy_search(matrix: np.ndarray, k: int, q: np.ndarray) -> list[list[int]]:
    return numpy_topk(matrix, q, k).tolist()


def _index_search(index: VectorIndex, k: int, q: np.ndarray) -> list[list[int]]:
    return index.search(q, k)[1].tolist()


def _store_search(store: GalleryStore, k: int, q: np.ndarray) -> list[list[str]]:
    return [[h.subject for h in hits] for hits in store.search(q, k)]


def bench_index(gal: SyntheticGallery, kind: IndexKind, args: argparse.Namespace, queries: np.ndarray,
                exact: list[list[int]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """VectorIndex alone: train (IVF), add in chunks, search; returns (add row, search row)."""
    nlist = auto_nlist(gal.n, args.nlist)
    rss0 = settle()
    index = VectorIndex(gal.dim, kind, nlist=nlist, nprobe=args.nprobe, use_gpu=args.gpu)
    train_s = add_s = 0.0
    added = 0
    ntrain = 39 * nlist if kind == "ivf" and gal.n >= 39 * nlist else 0
    if ntrain:
        vecs = gal.rows(0, ntrain)
        t0 = time.perf_counter()
        index.build(np.arange(ntrain, dtype=np.int64), vecs)
        train_s = time.perf_counter() - t0
    for start, vecs in gal.chunks(args.chunk, begin=ntrain):
        ids = np.arange(start, start + len(vecs), dtype=np.int64)
        t0 = time.perf_counter()
        index.add(ids, vecs)
        add_s += time.perf_counter() - t0
        added += len(vecs)
    gal.drop_cache()
    gc.collect()
    memory = rss_mib() - rss0
    peak = peak_mib() - rss0
    stats, answers = time_search(partial(_index_search, index, args.top_k), queries, batch=args.batch,
                                 single=args.single_queries)
    add_row = {"what": "VectorIndex", "size": gal.n, "dim": gal.dim, "kind": kind, "trained_kind": index.trained_kind,
               "nlist": nlist if kind == "ivf" else None, "train_s": train_s if ntrain else None,
               "train_vectors": ntrain, "add_vectors": added,
               "add_per_s": added / add_s if add_s > 0 else math.nan, "memory_mib": memory, "peak_mib": peak}
    search_row = {"engine": "VectorIndex", "kind": index.trained_kind, "size": gal.n, "dim": gal.dim, **stats,
                  "recall_at_1": recall(answers, exact, 1), "recall_at_k": recall(answers, exact, args.top_k),
                  "memory_mib": memory, "peak_mib": peak}
    return add_row, search_row


def subject_of(i: int, chunk: int) -> str:
    """The subject the bench enrols face i under (one subject per enroll call)."""
    return f"s{i // chunk:07d}"


def bench_store(gal: SyntheticGallery, kind: IndexKind, args: argparse.Namespace, queries: np.ndarray,
                exact: list[list[int]], rng: np.random.Generator) -> tuple[dict[str, Any], dict[str, Any],
                                                                            dict[str, Any]]:
    """GalleryStore: enrol, search, single enrolments, close, reopen (snapshot), rebuild; (add, search, startup)."""
    nlist = auto_nlist(gal.n, args.nlist)
    key = ModelKey(BENCH_MODEL, "0" * 64, gal.dim)
    opts: dict[str, Any] = {"index_kind": kind, "nlist": nlist, "nprobe": args.nprobe, "use_gpu": args.gpu}
    root = Path(tempfile.mkdtemp(prefix="faces-gallery-bench-", dir=args.tmp_dir))
    db_files = ("gallery.sqlite3", "gallery.sqlite3-wal", "gallery.sqlite3-shm")
    try:
        rss0 = settle()
        store = GalleryStore(root, key, **opts)
        calls: list[float] = []
        for start, vecs in gal.chunks(args.chunk):
            faces = [NewFace(v) for v in vecs]
            subject = subject_of(start, args.chunk)
            t0 = time.perf_counter()
            store.enroll(subject, faces)
            calls.append(time.perf_counter() - t0)
        gal.drop_cache()
        del faces
        gc.collect()
        memory, peak = rss_mib() - rss0, peak_mib() - rss0
        trained = store.stats()["index"]
        stats, answers = time_search(partial(_store_search, store, args.top_k), queries, batch=args.batch,
                                     single=args.single_queries)
        truth = [[subject_of(t[0], args.chunk)] for t in exact]
        search_row = {"engine": "GalleryStore", "kind": trained, "size": gal.n, "dim": gal.dim, **stats,
                      "recall_at_1": recall(answers, truth, 1), "recall_at_k": None,
                      "memory_mib": memory, "peak_mib": peak}

        extra = rng.standard_normal((args.enroll_calls, gal.dim), dtype=np.float32)
        extra /= np.linalg.norm(extra, axis=1, keepdims=True)
        singles = []
        for j, v in enumerate(extra):
            t0 = time.perf_counter()
            store.enroll(f"extra{j:06d}", [NewFace(v)])
            singles.append(time.perf_counter() - t0)
        add_row = {"what": "GalleryStore", "size": gal.n, "dim": gal.dim, "kind": kind, "trained_kind": trained,
                   "nlist": nlist if kind == "ivf" else None, "faces_per_call": args.chunk, "calls": len(calls),
                   "subjects": len(calls),
                   "add_per_s": gal.n / sum(calls), **ms_stats(calls, "call"), **ms_stats(singles, "single_enroll"),
                   "single_enrolls": len(singles), "memory_mib": memory, "peak_mib": peak,
                   "db_mib": dir_mib(root, db_files)}

        faces_total = store.stats()["faces"]
        t0 = time.perf_counter()
        store.close()  # writes the snapshot
        close_s = time.perf_counter() - t0
        snapshot_mib = dir_mib(root, ("index.faiss",))
        db_mib = dir_mib(root, db_files)
        del store
        load_s, load = timed_open(root, key, opts)
        for name in ("index.faiss", "index.json"):
            (root / name).unlink(missing_ok=True)
        rebuild_s, rebuild = timed_open(root, key, opts)
        startup_row = {"size": gal.n, "dim": gal.dim, "kind": kind, "trained_kind": trained, "faces": faces_total,
                       "close_snapshot_s": close_s, "snapshot_mib": snapshot_mib, "db_mib": db_mib,
                       "snapshot_load_s": load_s, "snapshot_source": load[0], "snapshot_rss_mib": load[1],
                       "snapshot_peak_mib": load[2], "rebuild_s": rebuild_s, "rebuild_source": rebuild[0],
                       "rebuild_rss_mib": rebuild[1], "rebuild_peak_mib": rebuild[2]}
        return add_row, search_row, startup_row
    finally:
        gc.collect()
        if args.keep:
            print(f"# kept {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)


def timed_open(root: Path, key: ModelKey, opts: dict[str, Any]) -> tuple[float, tuple[str, float, float]]:
    """Open (start up) a store from what is on disk and close it without a snapshot: seconds, and where its
    index came from with the resident and peak memory it added."""
    rss0 = settle()
    t0 = time.perf_counter()
    store = GalleryStore(root, key, **opts)
    seconds = time.perf_counter() - t0
    found = (store.index_source, rss_mib() - rss0, peak_mib() - rss0)
    store.close(snapshot=False)
    del store
    return seconds, found


def preflight(size: int, dim: int, tmp_dir: str | None) -> None:
    """Warn (stderr) when disk or memory look too small for this configuration; never stops the run."""
    data = size * dim * 4
    try:
        free = shutil.disk_usage(tmp_dir or tempfile.gettempdir()).free
        if free < 2.5 * data:
            print(f"# warning: {human(size)} x {dim} needs about {2.5 * data / 2**30:.1f} GiB on disk, "
                  f"{free / 2**30:.1f} GiB free", file=sys.stderr)
        avail = 0
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
        if avail and avail < 4 * data:
            print(f"# warning: {human(size)} x {dim} may need about {4 * data / 2**30:.1f} GiB of memory "
                  f"(rebuild from SQLite), {avail / 2**30:.1f} GiB available", file=sys.stderr)
    except OSError:
        pass


def run_matrix(args: argparse.Namespace) -> dict[str, list[dict[str, Any]]]:
    results: dict[str, list[dict[str, Any]]] = {"add": [], "search": [], "startup": []}
    for size in args.sizes:
        for dim in args.dims:
            preflight(size, dim, args.tmp_dir)
            if math.ceil(size / args.chunk) < args.top_k:
                print(f"# warning: {math.ceil(size / args.chunk)} subjects (size / --chunk) < top_k {args.top_k}: "
                      "every store search deepens to the whole gallery; lower --chunk", file=sys.stderr)
            gal = SyntheticGallery(size, dim, args.seed)
            rng = np.random.default_rng([args.seed, size, dim])
            print(f"# {human(size)} x {dim}: numpy baseline", file=sys.stderr, flush=True)
            row, queries, exact = bench_numpy(gal, args, rng)
            results["search"].append(row)
            for kind in args.kinds:
                print(f"# {human(size)} x {dim}: VectorIndex {kind}", file=sys.stderr, flush=True)
                add_row, search_row = bench_index(gal, kind, args, queries, exact)
                results["add"].append(add_row)
                results["search"].append(search_row)
            for kind in args.kinds:
                print(f"# {human(size)} x {dim}: GalleryStore {kind}", file=sys.stderr, flush=True)
                add_row, search_row, startup_row = bench_store(gal, kind, args, queries, exact, rng)
                results["add"].append(add_row)
                results["search"].append(search_row)
                results["startup"].append(startup_row)
    return results


# --------------------------------------------------------------------------------------------- report

def _mib(v: float | None) -> str:
    return fmt(v, 0)


def report_lines(args: argparse.Namespace, results: dict[str, list[dict[str, Any]]],
                 meta: dict[str, Any]) -> list[str]:
    lines = ["## Face gallery benchmark", "", *machine_lines(meta["machine"]),
             f"- faiss {meta['faiss']} ({meta['faiss_omp_threads']} OpenMP threads, GPUs seen: {meta['faiss_gpus']}, "
             f"GPU search {'on' if args.gpu else 'off'}), numpy {np.__version__}",
             f"- synthetic unit vectors (seed {args.seed}); {args.queries} queries = noisy copies of gallery faces "
             f"(cosine about 0.86); top_k {args.top_k}; single-query latency over the first "
             f"{min(args.single_queries, args.queries)} queries, batches of {args.batch} over all of them",
             f"- IVF: nlist {'auto (min(1024, size // 39))' if args.nlist is None else args.nlist}, nprobe "
             f"{args.nprobe}, trained once there are 39 * nlist vectors; the store enrols {args.chunk} faces per "
             f"call (one subject per call: size / {args.chunk} subjects, synchronous=FULL), then {args.enroll_calls} "
             "single-face enrolments; synthetic faces of one subject are unrelated vectors",
             "- memory: RSS delta after the phase; peak = VmHWM during the phase minus RSS at its start"
             + ("" if meta["peak_resettable"] else " (VmHWM could not be reset: process-lifetime peak)"),
             "", "### add", "",
             "| what | size | dim | kind (trained) | nlist | subjects | train s | vectors/s | call p50 ms | "
             "call p99 ms | single enrol p50 ms | single enrol p99 ms | RSS MiB | peak MiB | db MiB |",
             "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results["add"]:
        lines.append(f"| {r['what']} | {human(r['size'])} | {r['dim']} | {r['kind']} ({r['trained_kind']}) | "
                     f"{r['nlist'] or '-'} | {r.get('subjects') or '-'} | {fmt(r.get('train_s'), 2)} | "
                     f"{fmt(r['add_per_s'], 0)} | "
                     f"{fmt(r.get('call_p50_ms'), 2)} | {fmt(r.get('call_p99_ms'), 2)} | "
                     f"{fmt(r.get('single_enroll_p50_ms'), 2)} | {fmt(r.get('single_enroll_p99_ms'), 2)} | "
                     f"{_mib(r['memory_mib'])} | {_mib(r['peak_mib'])} | {_mib(r.get('db_mib'))} |")
    lines += ["", f"### search (top_k {args.top_k})", "",
              f"| engine | size | dim | kind | single p50 ms | single p99 ms | batch {args.batch} p50 ms | "
              f"batch {args.batch} p99 ms | batched queries/s | recall@1 | recall@{args.top_k} |",
              "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results["search"]:
        lines.append(f"| {r['engine']} | {human(r['size'])} | {r['dim']} | {r['kind']} | "
                     f"{fmt(r['single_p50_ms'], 3)} | {fmt(r['single_p99_ms'], 3)} | "
                     f"{fmt(r['batch_p50_ms'], 2)} | {fmt(r['batch_p99_ms'], 2)} | "
                     f"{fmt(r['batch_queries_per_s'], 0)} | {fmt(r['recall_at_1'], 3)} | "
                     f"{fmt(r['recall_at_k'], 3)} |")
    lines += ["", "### start-up", "",
              "| size | dim | kind (trained) | faces | close + snapshot s | snapshot MiB | db MiB | "
              "load snapshot s | load RSS MiB | rebuild s | rebuild RSS MiB | rebuild peak MiB |",
              "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results["startup"]:
        load = fmt(r["snapshot_load_s"], 3)
        load += "" if r["snapshot_source"] == "snapshot" else f" ({r['snapshot_source']}!)"
        rebuild = fmt(r["rebuild_s"], 3)
        rebuild += "" if r["rebuild_source"] == "rebuilt" else f" ({r['rebuild_source']}!)"
        lines.append(f"| {human(r['size'])} | {r['dim']} | {r['kind']} ({r['trained_kind']}) | {r['faces']} | "
                     f"{fmt(r['close_snapshot_s'], 3)} | {_mib(r['snapshot_mib'])} | {_mib(r['db_mib'])} | {load} | "
                     f"{_mib(r['snapshot_rss_mib'])} | {rebuild} | {_mib(r['rebuild_rss_mib'])} | "
                     f"{_mib(r['rebuild_peak_mib'])} |")
    lines += ["", "Single-query rows are per call; batched queries/s = queries / total batch time. The store's "
              "search asks the index for max(8 * top_k, top_k + 16) faces and maps them to subjects in SQLite; "
              "the raw index and NumPy return top_k faces. Compare rows of the same run only."]
    return lines


def faiss_meta() -> dict[str, Any]:
    import faiss

    try:
        version = metadata.version("faiss-gpu")
    except metadata.PackageNotFoundError:
        version = getattr(faiss, "__version__", "unknown")
    return {"faiss": version, "faiss_omp_threads": faiss.omp_get_max_threads(), "faiss_gpus": faiss.get_num_gpus()}


# --------------------------------------------------------------------------------------------- end to end (HTTP)

def seed_gallery(root: Path, model: ModelKey, size: int, *, chunk: int = 1000, seed: int = 0) -> int:
    """Fill a gallery directory with `size` synthetic faces for `model` (name, sha256 and dim of the server's
    face model) before the server opens it; returns the number of faces the gallery then holds."""
    store = GalleryStore(root, model)
    try:
        gal = SyntheticGallery(size, model.dim, seed)
        for start, vecs in gal.chunks(chunk):
            store.enroll(f"synthetic{start // chunk:07d}", [NewFace(v) for v in vecs])
        return int(store.stats()["faces"])
    finally:
        store.close()


async def _gallery_total(client: httpx.AsyncClient) -> int | None:
    """Subjects in the server's gallery (GET /faces/subjects 'total'), None when it does not say."""
    try:
        r = await client.get("/faces/subjects", params={"limit": 1})
        r.raise_for_status()
        total = r.json().get("total")
        return int(total) if total is not None else None
    except (httpx.HTTPError, ValueError, TypeError):
        return None


async def run_http_identify(url: str, image_path: Path, *, gallery_size: int, concurrency: int, duration: float,
                            warmup: float, top_k: int = 5, api_key: str | None = None, timeout: float = 120.0,
                            transport: httpx.AsyncBaseTransport | None = None) -> dict[str, Any]:
    """Closed-loop POST /faces/identify (multipart 'image' + top_k) at one concurrency level against a
    loopback server whose gallery should hold `gallery_size` faces; requests/s and latency percentiles."""
    if transport is None:
        ensure_loopback(url)
    image = image_path.read_bytes()
    ctype = "image/png" if image[:8] == b"\x89PNG\r\n\x1a\n" else "image/jpeg"
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    headers = {"X-API-Key": api_key} if api_key else {}
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=timeout, headers=headers, trust_env=False,
                                 transport=transport) as client:
        server_total = await _gallery_total(client)

        def send(n: int) -> Awaitable[httpx.Response]:
            return client.post("/faces/identify", files=[("image", (image_path.name, image, ctype))],
                               data={"top_k": str(top_k)})

        if warmup > 0:
            await closed_loop(concurrency, warmup, send)
        latencies, statuses, elapsed = await closed_loop(concurrency, duration, send)
    latencies.sort()
    ok = statuses.get("200", 0)
    return {"url": url, "gallery_size": gallery_size, "server_subjects": server_total, "concurrency": concurrency,
            "duration_s": elapsed, "requests": sum(statuses.values()), "ok": ok,
            "errors_by_status": {k: v for k, v in sorted(statuses.items()) if k != "200"},
            "requests_per_s": ok / elapsed if elapsed > 0 else 0.0,
            "p50_ms": 1000 * percentile(latencies, 50), "p95_ms": 1000 * percentile(latencies, 95),
            "p99_ms": 1000 * percentile(latencies, 99)}


def http_lines(results: list[dict[str, Any]], image: Path) -> list[str]:
    lines = [f"## POST /faces/identify against {results[0]['url']}", "",
             f"- image {image.name}; gallery size asked {results[0]['gallery_size']}, server reports "
             f"{results[0]['server_subjects'] if results[0]['server_subjects'] is not None else 'unknown'} subjects",
             "", "| concurrency | req/s | p50 ms | p95 ms | p99 ms | errors |", "|---:|---:|---:|---:|---:|---|"]
    for r in results:
        errors = ", ".join(f"{k}: {v}" for k, v in r["errors_by_status"].items()) or "0"
        lines.append(f"| {r['concurrency']} | {fmt(r['requests_per_s'])} | {fmt(r['p50_ms'])} | {fmt(r['p95_ms'])} | "
                     f"{fmt(r['p99_ms'])} | {errors} |")
    return lines


# --------------------------------------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=parse_sizes, default=[10_000, 100_000, 1_000_000], help="e.g. 10k,100k,1M")
    p.add_argument("--dims", type=parse_int_list, default=[128, 512], help="embedding dimensions, e.g. 128,512")
    p.add_argument("--kinds", type=parse_kinds, default=["flat", "ivf"], help="index kinds: flat,ivf")
    p.add_argument("--queries", type=int, default=1000, help="queries per configuration (batched timing)")
    p.add_argument("--single-queries", type=int, default=200, help="of which timed one at a time")
    p.add_argument("--batch", type=int, default=32, help="queries per batched search")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--chunk", type=int, default=1000, help="faces per enroll call / vectors per index add")
    p.add_argument("--enroll-calls", type=int, default=50, help="single-face enrolments timed on the full gallery")
    p.add_argument("--nlist", type=int, default=None, help="IVF lists (default: min(1024, size // 39))")
    p.add_argument("--nprobe", type=int, default=16, help="IVF lists probed per query (the store's default)")
    p.add_argument("--gpu", action="store_true", help="search on a GPU copy when FAISS sees one")
    p.add_argument("--threads", type=int, default=None, help="FAISS OpenMP threads (default: FAISS's own)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tmp-dir", default=None, help="where the SQLite databases go (default: the system temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the temporary gallery directories")
    p.add_argument("--out", type=Path, default=PROJECT_ROOT / "docs" / "bench" / "faces-gallery.json",
                   help="JSON results (the Markdown report goes next to it, .md)")
    h = p.add_argument_group("end to end: POST /faces/identify against a running loopback server")
    h.add_argument("--http", metavar="URL", default=None, help="server URL; runs only the HTTP part")
    h.add_argument("--gallery-size", type=int, default=None, help="faces the server's gallery holds")
    h.add_argument("--image", type=Path, default=None, help="image with a face to identify")
    h.add_argument("--concurrency", type=parse_int_list, default=[1, 8, 32])
    h.add_argument("--duration", type=float, default=20.0)
    h.add_argument("--warmup", type=float, default=3.0)
    h.add_argument("--api-key", default=None, help="X-API-Key")
    h.add_argument("--e2e-model", default=None, help="seed --gallery-size synthetic faces for this shipped face "
                   "model, start a server on them and run the HTTP part (instead of --http)")
    return p


def write_outputs(out: Path, lines: list[str], payload: dict[str, Any]) -> None:
    report = "\n".join(lines)
    print(report)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(_json_safe(payload), indent=2, default=str) + "\n")
    out.with_suffix(".md").write_text(report + "\n")
    print(f"# wrote {out} and {out.with_suffix('.md')}", file=sys.stderr)


def run_e2e(args: argparse.Namespace, settings: dict[str, Any]) -> int:
    """Seed a gallery of --gallery-size synthetic faces for the shipped face model, start a server on it (no
    classifiers, text models or style jobs, so the CPU serves faces only), and run the HTTP identify loop."""
    manifest = json.loads((PROJECT_ROOT / "weights" / "manifest.json").read_text())
    entry = next(m for m in manifest["models"] if m["name"] == args.e2e_model)
    key = ModelKey(entry["name"], entry["sha256"], int(entry["embedding"]["dim"]))
    root = Path(tempfile.mkdtemp(prefix="faces-e2e-", dir=args.tmp_dir))
    try:
        t0 = time.perf_counter()
        faces = seed_gallery(root / "gallery", key, args.gallery_size, chunk=args.chunk, seed=args.seed)
        print(f"# seeded {faces} faces in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        env = {"CNN_DATA_DIR": str(root), "CNN_CLASSIFIERS": "", "CNN_TEXT_MODELS": "",
               "CNN_FACE_MODELS": key.name, "CNN_STYLE_ENABLED": "false", "CNN_LOG_LEVEL": "warning"}
        with Server(env, python=sys.executable, log_path=root / "server.log", startup_timeout=600) as server:
            results = [asyncio.run(run_http_identify(server.url, args.image, gallery_size=faces, concurrency=c,
                                                     duration=args.duration, warmup=args.warmup, top_k=args.top_k))
                       for c in args.concurrency]
        machine = machine_description(None)
        write_outputs(args.out, [*http_lines(results, args.image), "", *machine_lines(machine)],
                      {"machine": machine, "settings": settings, "results": results})
        return 0
    except BaseException:  # also a timeout's SIGINT: the server's log goes with the temporary folder, so show it
        log = root / "server.log"
        if log.is_file():
            print(f"# the server's log ({log}), last 3000 characters:\n{log.read_text(errors='replace')[-3000:]}",
                  file=sys.stderr)
        raise
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    if args.e2e_model:
        if args.image is None or args.gallery_size is None:
            raise SystemExit("--e2e-model needs --image (a photo with a face) and --gallery-size")
        return run_e2e(args, settings)
    if args.http:
        if args.image is None or args.gallery_size is None:
            raise SystemExit("--http needs --image (a photo with a face) and --gallery-size")
        http_results = [asyncio.run(run_http_identify(args.http, args.image, gallery_size=args.gallery_size,
                                                      concurrency=c, duration=args.duration, warmup=args.warmup,
                                                      top_k=args.top_k, api_key=args.api_key))
                        for c in args.concurrency]
        machine = machine_description(None)
        write_outputs(args.out, [*http_lines(http_results, args.image), "", *machine_lines(machine)],
                      {"machine": machine, "settings": settings, "results": http_results})
        return 0
    if min(args.queries, args.batch, args.top_k, args.chunk) < 1 or min(args.single_queries, args.enroll_calls) < 0:
        raise SystemExit("--queries, --batch, --top-k and --chunk must be positive")
    if args.threads is not None:
        import faiss

        faiss.omp_set_num_threads(args.threads)
    meta = {**faiss_meta(), "peak_resettable": reset_peak()}
    meta["machine"] = machine_description("cuda (faiss)" if args.gpu and meta["faiss_gpus"] else "cpu")
    results = run_matrix(args)
    write_outputs(args.out, report_lines(args, results, meta), {**meta, "settings": settings, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
