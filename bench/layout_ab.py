"""Interleaved A/B timing of memory formats and precisions, in one process, on one sitting.

Two comparisons, each run as alternating blocks (A B C, then C B A, ...) so that drift in what else the
machine is doing hits every variant alike; each block's median is recorded and the report gives, per
variant, the median of its block medians, their min and max, and the per-round ratios against the first
variant:

    forward     inference forward of a classifier (eval, torch.inference_mode, fp32) in NCHW against
                channels_last (what app/runtime/device.py serves with); random weights, random input
    train-step  one CIFAR training step (bench/cifar_step_time.py's step: augment, forward, label-smoothed
                loss, backward, Nesterov SGD) as fp32 NCHW, fp32 channels_last, bf16 autocast NCHW and bf16
                channels_last (what `train images --precision bf16` runs)

    python -m bench.layout_ab forward --models resnet18,cifar10-resnet32 --batch-sizes 1,16 \
        --json docs/bench/forward-layout-ab.json
    python -m bench.layout_ab train-step --depth 20 --json docs/bench/cifar-resnet20-step-ab.json

Raw numbers only: os.getloadavg() is recorded at the start and the end; on a shared machine the absolute
times are inflated and noisy, and only the paired ratios of one sitting are worth comparing.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bench.cifar_step_time import step_times
from bench.harness import loadavg, write_json
from models.zoo import build_classifier


def machine() -> dict[str, Any]:
    """Where and under what load the numbers were taken."""
    return {"python": platform.python_version(), "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "loadavg_1_5_15": loadavg(),
            "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def build(name: str) -> tuple[torch.nn.Module, int]:
    """A model by name (torchvision classifier or cifar10-resnetNN) with random weights, and its input side."""
    if name.startswith("cifar10-resnet"):
        depth = int(name.removeprefix("cifar10-resnet"))
        return build_classifier("cifar-resnet", {"depth": depth, "shortcut": "A"}, 10), 32
    import torchvision

    return torchvision.models.get_model(name, weights=None), 224


def summarise(blocks: dict[str, list[float]], baseline: str) -> dict[str, Any]:
    """Median, min and max of each variant's block medians, and the paired per-round ratios to the baseline."""
    out: dict[str, Any] = {}
    for variant, values in blocks.items():
        ratios = [b / v for b, v in zip(blocks[baseline], values, strict=True)]
        out[variant] = {"median": round(statistics.median(values), 4), "min": round(min(values), 4),
                        "max": round(max(values), 4), "blocks": [round(v, 4) for v in values],
                        f"speedup_vs_{baseline}_per_round": [round(r, 3) for r in ratios],
                        f"speedup_vs_{baseline}_median": round(statistics.median(ratios), 3)}
    return out


def interleave(variants: list[str], rounds: int, run_block: Callable[[str], float]) -> dict[str, list[float]]:
    """Run one block per variant per round, reversing the order every other round."""
    blocks: dict[str, list[float]] = {v: [] for v in variants}
    for r in range(rounds):
        for v in (variants if r % 2 == 0 else list(reversed(variants))):
            blocks[v].append(run_block(v))
    return blocks


def forward_ab(models: list[str], batch_sizes: list[int], rounds: int, iters: int, warmup: int) -> dict[str, Any]:
    """ms per forward, NCHW against channels_last, for every model x batch size."""
    results: dict[str, Any] = {}
    for name in models:
        torch.manual_seed(0)
        base, side = build(name)
        base.eval()
        for p in base.parameters():
            p.requires_grad_(False)
        nets = {"nchw": base, "channels_last": _cl_copy(base)}
        for bs in batch_sizes:
            x = torch.randn(bs, 3, side, side)
            inputs = {"nchw": x.contiguous(), "channels_last": x.contiguous(memory_format=torch.channels_last)}

            def block(v: str, bs: int = bs, inputs: dict[str, torch.Tensor] = inputs,
                      nets: dict[str, torch.nn.Module] = nets) -> float:
                times = []
                with torch.inference_mode():
                    for i in range(warmup + iters):
                        t0 = time.perf_counter()
                        nets[v](inputs[v])
                        if i >= warmup:
                            times.append((time.perf_counter() - t0) * 1000)
                return statistics.median(times)

            blocks = interleave(["nchw", "channels_last"], rounds, block)
            key = f"{name}/batch{bs}"
            results[key] = {"unit": "ms per forward (median of each block)", "iters_per_block": iters,
                            "warmup_per_block": warmup, **summarise(blocks, "nchw")}
            print(key, {v: results[key][v]["median"] for v in blocks},
                  "speedup", results[key]["channels_last"]["speedup_vs_nchw_median"], flush=True)
    return results


def _cl_copy(model: torch.nn.Module) -> torch.nn.Module:
    import copy

    return copy.deepcopy(model).to(memory_format=torch.channels_last)  # type: ignore[call-overload]


def train_step_ab(depth: int, batch: int, rounds: int, steps: int, warmup: int) -> dict[str, Any]:
    """Seconds per CIFAR ResNet training step in four precision x memory-format variants."""
    variants = {"fp32/nchw": ("fp32", False), "fp32/channels_last": ("fp32", True),
                "bf16/nchw": ("bf16", False), "bf16/channels_last": ("bf16", True)}

    def block(v: str) -> float:
        precision, cl = variants[v]
        r = step_times("cifar-resnet", {"depth": depth, "shortcut": "A"}, batch=batch, steps=steps, warmup=warmup,
                       device=torch.device("cpu"), precision=precision, channels_last=cl)
        return float(r["median_step_seconds"]) * 1000

    blocks = interleave(list(variants), rounds, block)
    res = {"unit": "ms per training step (median of each block)", "model": f"cifar-resnet depth {depth}",
           "batch": batch, "steps_per_block": steps, "warmup_per_block": warmup, **summarise(blocks, "fp32/nchw")}
    for v in variants:
        print(v, res[v]["median"], "ms", res[v]["blocks"], flush=True)
    return res


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["forward", "train-step"])
    p.add_argument("--models", default="resnet18,cifar10-resnet32", help="forward: comma-separated")
    p.add_argument("--batch-sizes", default="1,16", help="forward: comma-separated")
    p.add_argument("--iters", type=int, default=10, help="forward: timed calls per block")
    p.add_argument("--depth", type=int, default=20, help="train-step: CIFAR ResNet depth")
    p.add_argument("--batch", type=int, default=128, help="train-step: batch size")
    p.add_argument("--steps", type=int, default=3, help="train-step: timed steps per block")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls or steps per block")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--note", default="")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out: dict[str, Any] = {"what": args.what, "argv": argv if argv is not None else __import__("sys").argv[1:],
                           "note": args.note, "machine_start": machine()}
    if args.what == "forward":
        out["results"] = forward_ab(args.models.split(","), [int(b) for b in args.batch_sizes.split(",")],
                                    args.rounds, args.iters, args.warmup)
    else:
        out["results"] = train_step_ab(args.depth, args.batch, args.rounds, args.steps, args.warmup)
    out["machine_end"] = machine()
    write_json(args.json, out)
    return out


if __name__ == "__main__":
    main()
