"""The front workers' transport alone (app/model_host.py): how many service calls per second one model process's
event loop answers over its Unix socket, with nothing behind the calls.

    .venv/bin/python -m bench.host_transport --clients 1,2,4 --in-flight 32 --payload 45000 --seconds 5

A model process (`ModelHost`) whose applications are replaced by an echo service, and P client processes (as P
front workers), each with one `HostClient` connection and C calls in flight, each call carrying one upload of
`--payload` bytes (a JPEG's size) and getting a small result back. Reported per row: calls/s, latency
percentiles, and the model process's CPU seconds per call (from /proc). This bounds `serve --front-workers`:
the model process's loop also runs the services' own work, so real calls cost more.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from app.model_host import HostClient, ModelHost
from app.settings import Settings


class EchoHost:
    """Stands in for ServiceHost: one application whose service answers at once."""

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def describe(self, application: str) -> dict[str, Any]:
        return {"status": {"status": "ready"}, "attributes": {}, "methods": ["classify"]}

    async def call(self, application: str, method: str, args: tuple[Any, ...], kwargs: dict[str, Any],
                   timeout: float | None = None) -> Any:
        upload = args[0]
        return {"model": "echo", "bytes": len(upload), "top_k": [{"label": "x", "probability": 1.0}] * 5}

    def models(self) -> dict[str, Any]:
        return {"models": [], "defaults": {}, "changes": []}

    def metrics(self) -> str:
        return ""


def _host(path: str, ready: Any, stop_after: float) -> None:
    async def main() -> None:
        stop = asyncio.Event()
        asyncio.get_running_loop().call_later(stop_after, stop.set)
        task = asyncio.create_task(ModelHost(Settings(), path, host=EchoHost()).run(stop))  # type: ignore[arg-type]
        while not os.path.exists(path):
            await asyncio.sleep(0.01)
        ready.set()
        await task

    asyncio.run(main())


def _client(path: str, in_flight: int, payload: int, seconds: float, barrier: Any, out: Any) -> None:
    async def main() -> tuple[list[float], int]:
        client = HostClient(path, patience=30)
        data = os.urandom(payload)
        await client.request("describe", "classification")
        latencies: list[float] = []
        await asyncio.to_thread(barrier.wait)
        end = time.perf_counter() + seconds

        async def caller() -> None:
            while time.perf_counter() < end:
                t0 = time.perf_counter()
                await client.request("call", "classification", "classify", (data,), {}, None)
                latencies.append(time.perf_counter() - t0)

        await asyncio.gather(*(caller() for _ in range(in_flight)))
        return latencies, len(latencies)

    out.put(asyncio.run(main()))


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_row(clients: int, in_flight: int, payload: int, seconds: float) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    path = os.path.join(tempfile.mkdtemp(prefix="ht", dir="/tmp"), "h.sock")
    ready = ctx.Event()
    host = ctx.Process(target=_host, args=(path, ready, seconds + 60), daemon=True)
    host.start()
    assert ready.wait(60), "the model process did not listen"
    barrier, out = ctx.Barrier(clients + 1), ctx.Queue()
    procs = [ctx.Process(target=_client, args=(path, in_flight, payload, seconds, barrier, out), daemon=True)
             for _ in range(clients)]
    for p in procs:
        p.start()
    barrier.wait(60)
    cpu0, t0 = _cpu_seconds(host.pid or 0), time.perf_counter()
    parts = [out.get(timeout=seconds + 60) for _ in procs]
    cpu1, wall = _cpu_seconds(host.pid or 0), time.perf_counter() - t0
    for p in procs:
        p.join(10)
    host.terminate()
    host.join(10)
    lat = sorted(x for part in parts for x in part[0])
    calls = len(lat)

    def pct(q: float) -> float:
        return 1000 * lat[min(len(lat) - 1, int(q / 100 * len(lat)))] if lat else float("nan")

    return {"clients": clients, "in_flight_per_client": in_flight, "payload_bytes": payload, "seconds": wall,
            "calls": calls, "calls_per_s": calls / wall, "p50_ms": pct(50), "p99_ms": pct(99),
            "host_cpu_us_per_call": 1e6 * (cpu1 - cpu0) / calls if calls else None}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", default="1,2,4", help="client processes (front workers), comma-separated")
    ap.add_argument("--in-flight", type=int, default=32, help="calls in flight per client")
    ap.add_argument("--payload", type=int, default=45_000, help="upload bytes per call")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    rows = []
    for c in (int(x) for x in args.clients.split(",")):
        row = run_row(c, args.in_flight, args.payload, args.seconds)
        rows.append(row)
        print(f"clients {c}: {row['calls_per_s']:.0f} calls/s, p50 {row['p50_ms']:.2f} ms, p99 {row['p99_ms']:.2f} ms, "
              f"model process {row['host_cpu_us_per_call']:.0f} us CPU per call", file=sys.stderr, flush=True)
    lines = ["| client processes | calls in flight each | calls/s | p50 ms | p99 ms | model process CPU per call "
             "(us) |", "|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['clients']} | {r['in_flight_per_client']} | {r['calls_per_s']:.0f} | {r['p50_ms']:.2f} | "
              f"{r['p99_ms']:.2f} | {r['host_cpu_us_per_call']:.0f} |" for r in rows]
    print("\n".join(lines))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
                                         "settings": vars(args) | {"json": str(args.json)}, "rows": rows},
                                        indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
