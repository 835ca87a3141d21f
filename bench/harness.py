"""What the benchmark scripts run with `python -m bench.NAME` share: the machine's load and writing the raw JSON."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def loadavg() -> list[float]:
    """The 1, 5 and 15 minute load averages, rounded: recorded at the start and end of every timing run, since
    timings taken while other work shares the cores are inflated."""
    return [round(x, 2) for x in os.getloadavg()]


def write_json(path: Path | None, payload: dict[str, Any], indent: int = 2) -> None:
    """Write a benchmark's raw result (nothing when no path was given), creating the folder."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=indent) + "\n")


@contextmanager
def pg_database(url: str | None) -> Iterator[tuple[str, str]]:
    """(url, where it came from): the given PostgreSQL URL, or a fresh database on a throwaway server started for the
    benchmark (tests/pgserver.py: initdb + pg_ctl, fsync off), stopped afterwards."""
    if url:
        yield url, "given"
        return
    from tests.pgserver import running_server, unavailable_reason

    why = unavailable_reason()
    if why:
        raise SystemExit(f"no PostgreSQL URL given and no throwaway server can start: {why}")
    with running_server() as server:
        yield server.new_database(), "throwaway server (tests/pgserver.py: fsync=off, on this machine)"


def style_job_lines(results: dict[str, dict[str, Any]]) -> list[str]:
    """The style benchmark's lines for warm jobs (`--jobs`) and jobs at once (`--concurrent`), per variant (shared
    by bench/style_speed.py's table and bench/gpu_summary.py's, which must import nothing but the standard library)."""
    lines = []
    for name, r in results.items():
        if r.get("warm_job_seconds"):
            lines.append(f"- {name}, later jobs in the same process (warm): "
                         + ", ".join(f"{v:.2f} s" for v in r["warm_job_seconds"]))
        if c := r.get("concurrent_jobs"):
            lines.append(f"- {name}, {c['jobs']} jobs at once (own CUDA stream each): {c['together_seconds']:.2f} s "
                         f"against {c['one_alone_seconds']:.2f} s for one alone "
                         f"({c['together_over_sum_alone']:.2f} of the sum)")
    return lines
