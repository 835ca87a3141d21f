"""The style comparison grid of docs/style-transfer.md: final losses of the offline random VGG-19 with max
against average pooling, 3 contents x 2 styles, raw numbers to JSON.

Each cell is `stylize` with StyleParams(steps, size, style_weight) and `random_vgg_features(seed=0, pool=...)`
on the CPU; recorded per cell: the loss of every step, the best (what `stylize` returns) and the last, and
the wall time (meaningful only on an idle machine; os.getloadavg() is recorded at the start and the end).

    .venv/bin/python -m bench.style_grid --json docs/bench/style-grid.json
"""

from __future__ import annotations

import argparse
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
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    params = StyleParams(steps=args.steps, size=args.size, style_weight=args.style_weight)
    out: dict[str, Any] = {"what": "style comparison grid: losses per cell (weighted relative errors)",
                           "params": {"steps": args.steps, "size": args.size, "style_weight": args.style_weight,
                                      "seed": 0, "init": "content", "optimizer": "lbfgs"},
                           "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                           "loadavg_1_5_15_start": loadavg(), "cells": {}}
    for pool in args.pools.split(","):
        net = random_vgg_features(0, pool=pool)  # type: ignore[arg-type]
        for c in CONTENTS:
            for s in STYLES:
                content = Image.open(args.data / "content" / f"{c}.jpg").convert("RGB")
                style = Image.open(args.data / "style" / f"{s}.jpg").convert("RGB")
                losses: list[float] = []

                def progress(info: ProgressInfo, losses: list[float] = losses) -> bool:
                    losses.append(info.loss)
                    return True

                t0 = time.perf_counter()
                stylize(content, [style], params, net, device, progress=progress)
                key = f"{c} x {s} / {pool}"
                out["cells"][key] = {"best_loss": min(losses), "last_loss": losses[-1],
                                     "seconds": round(time.perf_counter() - t0, 1), "losses": losses}
                print(f"{key}: best {min(losses):.4f} last {losses[-1]:.4f} "
                      f"({out['cells'][key]['seconds']} s)", flush=True)
    out["loadavg_1_5_15_end"] = loadavg()
    write_json(args.json, out, indent=1)
    return out


if __name__ == "__main__":
    main()
