"""How much `make install` puts on disk: the size of a venv made from requirements.lock, and its largest packages.

    .venv/bin/python -m bench.install_size --json docs/bench/install-size.json

Measures the venv given by --venv (default `.venv`, which `make install` creates with `pip install --require-hashes
--no-deps -r requirements.lock` plus the project itself in editable mode): `du -sb` (apparent bytes) and `du -sB1`
(bytes allocated on this file system) of the whole folder, and the bytes of each installed distribution (the sum
of the file sizes its RECORD lists that exist, byte-compiled files included). Distributions installed in the venv
that the lock does not pin (installed by hand afterwards) are listed separately, so the figure can be checked
against a fresh install.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata as md
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.harness import loadavg, write_json

ROOT = Path(__file__).resolve().parents[1]


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _du(path: Path, *flags: str) -> int:
    out = subprocess.run(["du", "-s", *flags, str(path)], check=True, capture_output=True, text=True).stdout
    return int(out.split()[0])


def locked_versions(lock: Path) -> dict[str, str]:
    """The distributions requirements.lock pins (`name==version` at the start of a line): normalised name -> version."""
    pins = {}
    for line in lock.read_text().splitlines():
        m = re.match(r"([A-Za-z0-9][A-Za-z0-9_.\-]*)(\[[^\]]*\])?==([^\s;\\]+)", line)
        if m:
            pins[_norm(m.group(1))] = m.group(3)
    return pins


def distribution_sizes(site_packages: Path) -> list[dict[str, Any]]:
    """Every distribution in site_packages with the bytes of the files its RECORD lists, largest first."""
    rows: list[dict[str, Any]] = []
    for dist in md.distributions(path=[str(site_packages)]):
        size = 0
        seen: set[Path] = set()
        for f in dist.files or []:
            p = Path(str(dist.locate_file(f))).resolve()
            if p in seen or not p.is_file():
                continue
            seen.add(p)
            size += p.stat().st_size
        rows.append({"name": dist.metadata["Name"], "version": dist.version, "bytes": size})
    rows.sort(key=lambda r: -r["bytes"])
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--venv", type=Path, default=ROOT / ".venv")
    p.add_argument("--lock", type=Path, default=ROOT / "requirements.lock")
    p.add_argument("--top", type=int, default=15, help="how many of the largest distributions to list")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    venv = args.venv.resolve()
    site = sorted(venv.glob("lib/python*/site-packages"))
    if not site:
        raise SystemExit(f"no lib/python*/site-packages under {venv}")
    start = loadavg()
    dists = distribution_sizes(site[0])
    locked = locked_versions(args.lock)
    installed = {_norm(r["name"]): r["version"] for r in dists}
    apparent = _du(venv, "-b")
    allocated = _du(venv, "-B1")
    in_dists = sum(r["bytes"] for r in dists)
    not_locked = [r for r in dists if _norm(r["name"]) not in locked]
    venv_python = venv / "bin" / "python"
    out: dict[str, Any] = {
        "what": "size on disk of the venv that `make install` builds from requirements.lock",
        "command": " ".join(["python -m bench.install_size", *(sys.argv[1:] if argv is None else argv)]),
        "measured": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"platform": platform.platform(), "machine": platform.machine(), "cpus": os.cpu_count()},
        "venv": str(venv.relative_to(ROOT)) if venv.is_relative_to(ROOT) else str(venv),
        "venv_python": subprocess.run([str(venv_python), "-V"], capture_output=True, text=True).stdout.strip()
        if venv_python.exists() else None,
        "venv_made": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime((venv / ".installed").stat().st_mtime))
        if (venv / ".installed").exists() else None,
        "lock_sha256": hashlib.sha256(args.lock.read_bytes()).hexdigest(),
        "lock_pins": len(locked),
        "du_sb_bytes": apparent,
        "du_sB1_bytes": allocated,
        "gib": round(apparent / 2**30, 2),
        "gb": round(apparent / 1e9, 2),
        "distributions": len(dists),
        "distributions_bytes": in_dists,
        "largest": dists[: args.top],
        "nvidia_and_triton_bytes": sum(r["bytes"] for r in dists
                                       if _norm(r["name"]).startswith("nvidia-") or _norm(r["name"]) == "triton"),
        "torch_bytes": sum(r["bytes"] for r in dists if _norm(r["name"]) == "torch"),
        "not_in_lock": not_locked,
        "locked_but_missing": sorted(n for n in locked if n not in installed),
        "version_differs_from_lock": {n: {"lock": v, "installed": installed[n]} for n, v in sorted(locked.items())
                                      if n in installed and installed[n] != v},
        "loadavg_1_5_15_start": start,
        "loadavg_1_5_15_end": loadavg(),
    }
    print(f"{out['venv']}: {apparent} bytes ({out['gb']} GB, {out['gib']} GiB; allocated {allocated}); "
          f"{len(dists)} distributions")
    for r in dists[: args.top]:
        print(f"  {r['bytes'] / 1e6:9.1f} MB  {r['name']} {r['version']}")
    if not_locked:
        print("  not pinned by the lock: " + ", ".join(f"{r['name']} ({r['bytes'] / 1e6:.1f} MB)" for r in not_locked))
    if out["locked_but_missing"] or out["version_differs_from_lock"]:
        print(f"  differs from the lock: missing {out['locked_but_missing']}, "
              f"other versions {out['version_differs_from_lock']}")
    write_json(args.json, out)
    return out


if __name__ == "__main__":
    main()
