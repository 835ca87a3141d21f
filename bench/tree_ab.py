"""Same-run A/B of two revisions of the service on this machine: did the CPU path regress?

A benchmark number from another day (or another machine: the build machines change between sessions) cannot
say whether a change made the service slower. This script serves the same workloads from two source trees in
one sitting, interleaved A B B A per round, with the same Python environment and the same settings (each
tree's own defaults for everything not set here), and writes every row:

    python -m bench.tree_ab --base da4dfc5 --rounds 1 --duration 15 --json docs/bench/cpu-regression-ab.json

`--base` is a git revision of this repository, exported with `git archive` (weights included: they are
committed) to a scratch folder; `--head` is the working tree (default) or another revision. Workloads, each
on a server that loads only the models it needs (its own `python -m app.cli serve`, free loopback port):

- classify-cifar: POST /classify, the default CIFAR-10 model, one real CIFAR-10 JPEG (32 px) per request
- classify-resnet18: POST /classify, torchvision resnet18 with random weights, a 224 px-class JPEG
  (golden_gate.jpg from the style contents when present, else a generated one)
- text: POST /text/classify, the default text model, one AG News text per request
- faces-embed: POST /faces/embed, the default face embedder (Haar detection), one LFW photo

Reported per workload, tree and concurrency: requests/s, p50/p99 latency, errors; the summary gives the
mean of each tree's runs and head/base.

`--paired K` measures differently, for differences smaller than the drift of a shared machine (the same
tree's throughput moves by 10-20% between runs minutes apart here): both trees' servers run at once (the idle
one uses next to no CPU), and each concurrency level is measured as K pairs of short windows, base then head
or head then base in turn (ABBA), so every pair sees the same moment of the machine. Per window it also reads
the server process's CPU time per request (/proc, Linux), which scheduling noise moves less than throughput.
The summary gives the geometric mean of the K per-pair head/base ratios with a 95% bootstrap interval
(fixed seed):

    python -m bench.tree_ab --base da4dfc5 --workloads text --paired 12 --duration 5 --json out.json
"""
from __future__ import annotations

import argparse
import asyncio
import io
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import httpx

from bench.classify_load import (
    PROJECT_ROOT,
    Server,
    closed_loop,
    ensure_loopback,
    machine_description,
    make_test_image,
    model_ready,
    parse_int_list,
    parse_str_list,
    percentile,
)
from bench.harness import loadavg, write_json

SHARED = PROJECT_ROOT.parent / "shared" / "data"

WORKLOADS = ("classify-cifar", "classify-resnet18", "text", "faces-embed")


def export_tree(rev: str, dest: Path) -> Path:
    """`git archive rev` unpacked under dest/<rev>; returns the folder."""
    out = dest / rev.replace("/", "_")
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    data = subprocess.run(["git", "-C", str(PROJECT_ROOT), "archive", "--format=tar", rev],
                          check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(out, filter="data")
    return out


def revision_of(tree: Path) -> str:
    try:
        rev = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], check=True,
                             capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(tree), "status", "--porcelain", "--untracked-files=no"],
                               check=True, capture_output=True, text=True).stdout.strip()
        return rev + ("+changes" if dirty else "")
    except (subprocess.CalledProcessError, FileNotFoundError):
        return "?"


class TreeServer(Server):
    """`python -m app.cli serve` run from `root` (its app, models and weights), ready once `model` is ready."""

    def __init__(self, env: dict[str, str], *, root: Path, model: str, python: str, log_path: Path,
                 startup_timeout: float) -> None:
        super().__init__(env, python=python, log_path=log_path, startup_timeout=startup_timeout)
        self.root = root
        self.model = model

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("wb")
        cmd = [self.python, "-m", "app.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port)]
        env = {**self.env, "PYTHONPATH": str(self.root)}  # this tree's app/ and models/, not the installed ones
        self.proc = subprocess.Popen(cmd, cwd=self.root, env=env, stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        log.close()
        self._wait_ready()

    def _probe(self, c: httpx.Client) -> str | None:
        return model_ready(c, self.model, str(self.log_path))


def _first(pattern: str) -> Path | None:
    hits = sorted(SHARED.glob(pattern)) if SHARED.is_dir() else []
    return hits[0] if hits else None


def workload(name: str) -> dict[str, Any]:
    """Server settings, the model to wait for, and the request of one workload."""
    base_env = {"CNN_DEVICE": "cpu", "CNN_API_KEYS": "", "CNN_LOG_LEVEL": "warning", "CNN_ALLOW_DOWNLOADS": "false",
                "CNN_CLASSIFIERS": "", "CNN_TEXT_MODELS": "", "CNN_FACE_MODELS": "", "CNN_STYLE_WORKERS": "1"}
    if name == "classify-cifar":
        img = _first("cifar10/train/ship/*.jpg")
        model = "cifar10-resnet20"
        return {"env": {**base_env, "CNN_CLASSIFIERS": model}, "model": model, "route": "/classify",
                "file": ("image", ("ship.jpg", img.read_bytes() if img else make_test_image(32), "image/jpeg")),
                "data": {"top_k": "5"}, "input": str(img.relative_to(SHARED)) if img else "generated 32 px JPEG"}
    if name == "classify-resnet18":
        img = SHARED / "style" / "content" / "golden_gate.jpg"
        model = "resnet18"
        return {"env": {**base_env, "CNN_CLASSIFIERS": model, "CNN_ALLOW_UNTRAINED": "true"}, "model": model,
                "route": "/classify",
                "file": ("image", ("golden_gate.jpg", img.read_bytes() if img.is_file() else make_test_image(224),
                                   "image/jpeg")),
                "data": {"top_k": "5"}, "input": "style/content/golden_gate.jpg" if img.is_file() else "generated"}
    if name == "text":
        model = "agnews-vdcnn9"
        csv = SHARED / "agnews" / "train.csv"
        text = ("Wall St. Bears Claw Back Into the Black: short-sellers see green again"
                if not csv.is_file() else csv.read_text(errors="replace").splitlines()[0].split('","', 1)[-1])
        return {"env": {**base_env, "CNN_TEXT_MODELS": model}, "model": model, "route": "/text/classify",
                "json": {"texts": [text]}, "input": "agnews/train.csv row 1" if csv.is_file() else "fixed sentence"}
    if name == "faces-embed":
        img = _first("lfw/images/George_W_Bush/*.jpg")
        model = "lfw-face-resnet"
        if img is None:
            raise SystemExit("faces-embed needs ../shared/data/lfw")
        return {"env": {**base_env, "CNN_FACE_MODELS": model}, "model": model, "route": "/faces/embed",
                "file": ("image", ("face.jpg", img.read_bytes(), "image/jpeg")), "data": {},
                "input": str(img.relative_to(SHARED))}
    raise SystemExit(f"unknown workload {name!r}; choose from {', '.join(WORKLOADS)}")


async def measure(url: str, w: dict[str, Any], concurrency: int, duration: float, warmup: float) -> dict[str, Any]:
    ensure_loopback(url)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120, trust_env=False) as client:

        def send(_: int) -> Awaitable[httpx.Response]:
            if "json" in w:
                return client.post(w["route"], json=w["json"])
            return client.post(w["route"], files=[w["file"]], data=w["data"])

        probe = await send(0)
        if probe.status_code != 200:
            raise RuntimeError(f"{w['route']} answered {probe.status_code}: {probe.text[:300]}")
        if warmup > 0:
            await closed_loop(concurrency, warmup, send)
        latencies, statuses, elapsed = await closed_loop(concurrency, duration, send)
    latencies.sort()
    ok = statuses.get("200", 0)
    return {"concurrency": concurrency, "duration_s": round(elapsed, 3), "ok": ok,
            "errors": {k: v for k, v in statuses.items() if k != "200"},
            "requests_per_s": round(ok / elapsed, 2) if elapsed > 0 else 0.0,
            "p50_ms": round(1000 * percentile(latencies, 50), 2), "p99_ms": round(1000 * percentile(latencies, 99), 2)}


def run_one(tree: Path, label: str, name: str, levels: list[int], args: argparse.Namespace,
            log_dir: Path) -> dict[str, Any]:
    w = workload(name)
    server = TreeServer(w["env"], root=tree, model=w["model"], python=args.python,
                        log_path=log_dir / f"{label}-{name}-{time.time_ns()}.log", startup_timeout=args.startup_timeout)
    t0 = time.perf_counter()
    with server:
        started = time.perf_counter() - t0
        rows = [asyncio.run(measure(server.url, w, c, args.duration, args.warmup)) for c in levels]
    return {"tree": label, "workload": name, "input": w["input"], "model": w["model"], "startup_s": round(started, 2),
            "loadavg_after": loadavg(), "levels": rows}


def process_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of a process so far (Linux /proc; None elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def ratio_interval(ratios: list[float], *, draws: int = 4000, seed: int = 0) -> tuple[float, float, float]:
    """Geometric mean of per-pair ratios and its 95% bootstrap interval (percentile method, fixed seed)."""
    logs = [math.log(r) for r in ratios]
    rng = random.Random(seed)
    means = sorted(statistics.fmean(rng.choices(logs, k=len(logs))) for _ in range(draws))
    lo, hi = means[int(0.025 * draws)], means[min(draws - 1, int(0.975 * draws))]
    return math.exp(statistics.fmean(logs)), math.exp(lo), math.exp(hi)


def run_paired(trees: dict[str, Path], name: str, levels: list[int], pairs: int, args: argparse.Namespace,
               log_dir: Path) -> dict[str, Any]:
    """Both trees served at once; per level, `pairs` pairs of windows in ABBA order (see the module's doc)."""
    w = workload(name)
    servers = {label: TreeServer(w["env"], root=trees[label], model=w["model"], python=args.python,
                                 log_path=log_dir / f"paired-{label}-{name}-{time.time_ns()}.log",
                                 startup_timeout=args.startup_timeout) for label in ("base", "head")}
    out: dict[str, Any] = {"workload": name, "input": w["input"], "model": w["model"], "levels": []}
    with servers["base"], servers["head"]:
        for c in levels:
            for srv in servers.values():  # warm both at this level before any window counts
                asyncio.run(measure(srv.url, w, c, args.warmup, 0.0))
            windows: list[dict[str, Any]] = []
            for i in range(pairs):
                order = ("base", "head") if i % 2 == 0 else ("head", "base")
                for label in order:
                    srv = servers[label]
                    assert srv.proc is not None
                    cpu0 = process_cpu_s(srv.proc.pid)
                    row = asyncio.run(measure(srv.url, w, c, args.duration, 0.0))
                    cpu1 = process_cpu_s(srv.proc.pid)
                    if cpu0 is not None and cpu1 is not None and row["ok"]:
                        row["server_cpu_ms_per_request"] = round(1000 * (cpu1 - cpu0) / row["ok"], 3)
                    windows.append({"pair": i, "tree": label, **row})
                print(f"{name} c={c} pair {i}: " + ", ".join(
                    f"{r['tree']} {r['requests_per_s']} req/s" for r in windows[-2:]), flush=True)
            out["levels"].append({"concurrency": c, "windows": windows, **paired_summary(windows, pairs)})
    return out


def paired_summary(windows: list[dict[str, Any]], pairs: int) -> dict[str, Any]:
    """Per-pair head/base ratios of req/s and of server CPU per request, with their intervals."""
    by = {(r["pair"], r["tree"]): r for r in windows}
    rps = [by[(i, "head")]["requests_per_s"] / by[(i, "base")]["requests_per_s"] for i in range(pairs)
           if by[(i, "base")]["requests_per_s"] > 0 and by[(i, "head")]["requests_per_s"] > 0]
    cpu = [by[(i, "head")]["server_cpu_ms_per_request"] / by[(i, "base")]["server_cpu_ms_per_request"]
           for i in range(pairs) if by[(i, "head")].get("server_cpu_ms_per_request")
           and by[(i, "base")].get("server_cpu_ms_per_request")]
    summary: dict[str, Any] = {}
    for key, ratios in (("rps_head_over_base", rps), ("cpu_per_request_head_over_base", cpu)):
        if len(ratios) >= 2:
            g, lo, hi = ratio_interval(ratios)
            summary[key] = {"geometric_mean": round(g, 4), "ci95": [round(lo, 4), round(hi, 4)], "pairs": len(ratios)}
    return summary


def paired_table(results: list[dict[str, Any]]) -> list[str]:
    lines = ["| workload | concurrency | base req/s (median) | head req/s (median) | head / base req/s (95% CI) "
             "| head / base server CPU per request (95% CI) |", "|---|---:|---:|---:|---|---|"]
    for res in results:
        for lv in res["levels"]:
            med = {t: statistics.median(r["requests_per_s"] for r in lv["windows"] if r["tree"] == t)
                   for t in ("base", "head")}

            def cell(key: str, lv: dict[str, Any] = lv) -> str:
                s = lv.get(key)
                return f"{s['geometric_mean']:.3f} ({s['ci95'][0]:.3f}-{s['ci95'][1]:.3f})" if s else "-"

            lines.append(f"| {res['workload']} | {lv['concurrency']} | {med['base']:.1f} | {med['head']:.1f} | "
                         f"{cell('rps_head_over_base')} | {cell('cpu_per_request_head_over_base')} |")
    return lines


def summarise(runs: list[dict[str, Any]], workloads: list[str], levels: dict[str, list[int]]) -> list[str]:
    lines = ["| workload | concurrency | base req/s (runs) | head req/s (runs) | head / base | base p99 ms "
             "| head p99 ms |", "|---|---:|---|---|---:|---:|---:|"]
    for name in workloads:
        for c in levels[name]:
            got: dict[str, list[dict[str, Any]]] = {"base": [], "head": []}
            for r in runs:
                if r["workload"] == name:
                    got[r["tree"]] += [row for row in r["levels"] if row["concurrency"] == c]
            if not got["base"] or not got["head"]:
                continue
            b = [row["requests_per_s"] for row in got["base"]]
            h = [row["requests_per_s"] for row in got["head"]]
            bp = statistics.mean(row["p99_ms"] for row in got["base"])
            hp = statistics.mean(row["p99_ms"] for row in got["head"])
            lines.append(f"| {name} | {c} | {statistics.mean(b):.1f} ({' / '.join(f'{v:.1f}' for v in b)}) | "
                         f"{statistics.mean(h):.1f} ({' / '.join(f'{v:.1f}' for v in h)}) | "
                         f"{statistics.mean(h) / statistics.mean(b):.3f} | {bp:.1f} | {hp:.1f} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="git revision to compare against")
    p.add_argument("--head", default=None, help="git revision (default: the working tree)")
    p.add_argument("--workloads", type=parse_str_list, default=list(WORKLOADS))
    p.add_argument("--concurrency", type=parse_int_list, default=[1, 8, 32])
    p.add_argument("--resnet18-concurrency", type=parse_int_list, default=[1, 8],
                   help="levels for classify-resnet18 (slow on a CPU)")
    p.add_argument("--rounds", type=int, default=1, help="rounds of base, head, head, base (see --order)")
    p.add_argument("--order", choices=("base-first", "head-first"), default="base-first",
                   help="head-first: head, base, base, head (to tell a position effect from a code one)")
    p.add_argument("--paired", type=int, default=0, metavar="K",
                   help="both trees served at once, K pairs of short windows per level (see above); --rounds ignored")
    p.add_argument("--duration", type=float, default=15.0)
    p.add_argument("--warmup", type=float, default=3.0)
    p.add_argument("--python", default=sys.executable)
    p.add_argument("--startup-timeout", type=float, default=300.0)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--markdown", type=Path, default=None)
    args = p.parse_args(argv)

    scratch = Path(tempfile.mkdtemp(prefix="tree-ab-"))
    try:
        trees = {"base": export_tree(args.base, scratch)}
        trees["head"] = PROJECT_ROOT if args.head is None else export_tree(args.head, scratch)
        revs = {"base": subprocess.run(["git", "-C", str(PROJECT_ROOT), "rev-parse", "--short", args.base],
                                       check=True, capture_output=True, text=True).stdout.strip(),
                "head": revision_of(PROJECT_ROOT) if args.head is None else args.head}
        levels = {w: (args.resnet18_concurrency if w == "classify-resnet18" else args.concurrency)
                  for w in args.workloads}
        runs: list[dict[str, Any]] = []
        log_dir = scratch / "logs"
        if args.paired > 0:
            results = [run_paired(trees, name, levels[name], args.paired, args, log_dir) for name in args.workloads]
            table = paired_table(results)
            print("\n".join(table))
            write_json(args.json, {"revisions": revs, "mode": f"paired: both servers up, {args.paired} pairs of "
                                   "windows per level, ABBA", "duration_s": args.duration, "warmup_s": args.warmup,
                                   "machine": machine_description("cpu"), "loadavg_after": loadavg(),
                                   "results": results, "summary_markdown": table})
            if args.markdown:
                args.markdown.parent.mkdir(parents=True, exist_ok=True)
                args.markdown.write_text("\n".join(table) + "\n")
            return 0
        for rnd in range(args.rounds):
            for name in args.workloads:
                for label in (("base", "head", "head", "base") if args.order == "base-first"
                              else ("head", "base", "base", "head")):
                    r = run_one(trees[label], label, name, levels[name], args, log_dir)
                    r["round"] = rnd
                    runs.append(r)
                    print(f"round {rnd} {name} {label}: " + ", ".join(
                        f"c={row['concurrency']} {row['requests_per_s']} req/s" for row in r["levels"]), flush=True)
        table = summarise(runs, args.workloads, levels)
        print("\n".join(table))
        order = "base, head, head, base" if args.order == "base-first" else "head, base, base, head"
        payload = {"revisions": revs, "order": f"per workload and round: {order}",
                   "duration_s": args.duration, "warmup_s": args.warmup, "machine": machine_description("cpu"),
                   "runs": runs, "summary_markdown": table}
        write_json(args.json, payload)
        if args.markdown:
            args.markdown.parent.mkdir(parents=True, exist_ok=True)
            args.markdown.write_text("\n".join(table) + "\n")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
