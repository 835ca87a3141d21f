"""Sizes of downloaded wheels, raw to JSON: what bench/README.md's GPU-check section quotes.

    bench/gpu_wheels.sh /tmp/gpu-wheels
    .venv/bin/python -m pip download --no-deps --only-binary=:all: --implementation cp --python-version 3.12 \\
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \\
        --platform manylinux2014_x86_64 -d /tmp/faiss-gpu-wheel faiss-gpu==1.15.1
    .venv/bin/python -m bench.wheel_sizes --folder gpu_wheels=/tmp/gpu-wheels --folder faiss_gpu=/tmp/faiss-gpu-wheel \\
        --made-by 'gpu_wheels=bench/gpu_wheels.sh /tmp/gpu-wheels' --made-by 'faiss_gpu=pip download --no-deps ...' \\
        --json docs/bench/gpu-wheels.json

For each folder: every wheel's file name, bytes and Requires-Dist (from its METADATA), the total in bytes and MiB
(as gpu_wheels.sh counts: `du -cb` of the wheels), and the folder's requirements.txt when there is one. Also the
checkout's size as gpu_wheels.sh counts it (tracked + untracked files that git does not ignore), since the wheels
and the checkout travel to the GPU machine together.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

from bench.harness import write_json

ROOT = Path(__file__).resolve().parents[1]


def requires_dist(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as z:
        name = next((n for n in z.namelist() if n.endswith(".dist-info/METADATA")), None)
        if name is None:
            return []
        text = z.read(name).decode("utf-8", "replace")
    return [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Requires-Dist:")]


def folder_sizes(folder: Path) -> dict[str, Any]:
    wheels = sorted(folder.glob("*.whl"), key=lambda p: -p.stat().st_size)
    total = sum(p.stat().st_size for p in wheels)
    req = folder / "requirements.txt"
    return {"folder": str(folder), "files": len(wheels), "bytes": total, "mib": round(total / 2**20, 2),
            "mb": round(total / 1e6, 2),
            "requirements_txt": req.read_text().splitlines() if req.exists() else None,
            "wheels": [{"file": p.name, "bytes": p.stat().st_size, "mib": round(p.stat().st_size / 2**20, 2),
                        "requires_dist": requires_dist(p)} for p in wheels]}


def checkout_bytes() -> int:
    """Tracked + untracked-not-ignored files of the checkout, as bench/gpu_wheels.sh adds them up."""
    names = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           check=True, capture_output=True).stdout.split(b"\0")
    total = 0
    for n in names:
        p = ROOT / n.decode()
        if n and p.is_file() and not p.is_symlink():
            total += p.stat().st_size
    return total


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--folder", action="append", default=[], metavar="NAME=DIR", help="a folder of wheels")
    p.add_argument("--made-by", action="append", default=[], metavar="NAME=COMMAND",
                   help="the command that filled folder NAME (recorded as given)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    made_by = dict(m.split("=", 1) for m in args.made_by)
    out: dict[str, Any] = {
        "what": "sizes of downloaded wheels (bench/README.md, GPU check)",
        "command": " ".join(["python -m bench.wheel_sizes", *(sys.argv[1:] if argv is None else argv)]),
        "measured": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "folders": {},
    }
    for spec in args.folder:
        name, _, path = spec.partition("=")
        row = folder_sizes(Path(path))
        row["made_by"] = made_by.get(name)
        out["folders"][name] = row
        print(f"{name}: {row['files']} wheels, {row['bytes']} bytes ({row['mib']} MiB, {row['mb']} MB)")
    cb = checkout_bytes()
    out["checkout_bytes"] = cb
    out["checkout_mib"] = round(cb / 2**20, 2)
    print(f"checkout (tracked + untracked, not ignored): {cb} bytes ({out['checkout_mib']} MiB)")
    write_json(args.json, out)
    return out


if __name__ == "__main__":
    main()
