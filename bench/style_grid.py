"""The style comparison grid of docs/style-transfer.md: final losses of the offline random VGG-19 with max
against average pooling, 3 contents x 2 styles, raw numbers to JSON.

Each cell is `stylize` with StyleParams(steps, size, style_weight) and `random_vgg_features(seed=0, pool=...)`
on the CPU; recorded per cell: the loss of every step, the best (what `stylize` returns) and the last, and
the wall time (meaningful only on an idle machine; os.getloadavg() is recorded at the start and the end).

    .venv/bin/python -m bench.style_grid --json docs/bench/style-grid.json

One cell alone, e.g. the README's example picture (docs/style-example.png: Chicago x The Starry Night, max
pooling, 256 px, 200 steps, torch's default thread count):

    .venv/bin/python -m bench.style_grid --contents chicago --styles starry_night_vangogh --pools max \
        --json docs/bench/style-example.json
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from bench.harness import loadavg, write_json
from models.style import ProgressInfo, StyleParams, random_vgg_features, stylize

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "style"
CONTENTS = ["tubingen", "golden_gate", "chicago"]
STYLES = ["starry_night_vangogh", "the_scream_munch"]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--style-weight", type=float, default=1e3)
    p.add_argument("--pools", default="max,avg")
    p.add_argument("--contents", default=",".join(CONTENTS), help="content images (names under DATA/content)")
    p.add_argument("--styles", default=",".join(STYLES), help="style images (names under DATA/style)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--save-dir", type=Path, default=None, help="also save each cell's result as PNG there")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    params = StyleParams(steps=args.steps, size=args.size, style_weight=args.style_weight)
    command = " ".join(["python -m bench.style_grid", *(sys.argv[1:] if argv is None else argv)])
    out: dict[str, Any] = {"what": "style comparison grid: losses per cell (weighted relative errors)",
                           "params": {"steps": args.steps, "size": args.size, "style_weight": args.style_weight,
                                      "seed": 0, "init": "content", "optimizer": "lbfgs"},
                           "command": command,
                           "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                           "cpus": os.cpu_count(),
                           "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                           "loadavg_1_5_15_start": loadavg(), "cells": {}}
    for pool in args.pools.split(","):
        net = random_vgg_features(0, pool=pool)  # type: ignore[arg-type]
        for c in args.contents.split(","):
            for s in args.styles.split(","):
                content = Image.open(args.data / "content" / f"{c}.jpg").convert("RGB")
                style = Image.open(args.data / "style" / f"{s}.jpg").convert("RGB")
                losses: list[float] = []

                def progress(info: ProgressInfo, losses: list[float] = losses) -> bool:
                    losses.append(info.loss)
                    return True

                t0 = time.perf_counter()
                result = stylize(content, [style], params, net, device, progress=progress)
                key = f"{c} x {s} / {pool}"
                if args.save_dir is not None:
                    args.save_dir.mkdir(parents=True, exist_ok=True)
                    result.save(args.save_dir / f"{c}-x-{s}-{pool}.png")
                out["cells"][key] = {"best_loss": min(losses), "last_loss": losses[-1],
                                     "seconds": round(time.perf_counter() - t0, 1), "losses": losses}
                print(f"{key}: best {min(losses):.4f} last {losses[-1]:.4f} "
                      f"({out['cells'][key]['seconds']} s)", flush=True)
    out["loadavg_1_5_15_end"] = loadavg()
    write_json(args.json, out, indent=1)
    return out


if __name__ == "__main__":
    main()
