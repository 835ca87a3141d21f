"""Small checks behind the design notes of docs/style-transfer.md, raw numbers to JSON.

- rms: RMS of relu1_1 .. relu5_1 on a photo for the random VGG-19 without rescaling (He init only), with
  max pooling, average pooling, and zero-sum filters with average pooling (what `rescale` corrects);
- layout: one forward + backward of the feature network for a 256x192 image, NCHW against channels_last,
  alternating blocks in one process (timing: os.getloadavg() recorded at the start and the end);
- amp: `stylize` at 128 px in float32 and under bf16 autocast (losses are deterministic; seconds per step
  from runs in the order fp32, bf16, bf16, fp32).

    .venv/bin/python -m bench.style_checks --threads 1 --json docs/bench/style-checks.json
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from bench.harness import loadavg, write_json
from models.style import ProgressInfo, StyleParams, random_vgg_features, stylize, to_tensor

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "style"
RELUS = ["relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1"]


def _load() -> list[float]:
    return loadavg()


def rms_check(photo: Image.Image) -> dict[str, Any]:
    x = to_tensor(photo.resize((256, 192)))
    out: dict[str, Any] = {}
    for name, kw in {"he_max": {"pool": "max"}, "he_avg": {"pool": "avg"},
                     "he_zero_mean_avg": {"pool": "avg", "zero_mean": True}}.items():
        net = random_vgg_features(0, layers=RELUS, rescale=False, **kw)  # type: ignore[arg-type]
        with torch.no_grad():
            acts = net(x, RELUS)
        out[name] = {k: round(float(acts[k].float().square().mean().sqrt()), 4) for k in RELUS}
        print("rms", name, out[name], flush=True)
    return out


def layout_check(rounds: int, iters: int) -> dict[str, Any]:
    net = random_vgg_features(0)
    variants = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
    x0 = torch.rand(1, 3, 192, 256)
    blocks: dict[str, list[float]] = {v: [] for v in variants}

    def block(v: str) -> float:
        fmt = variants[v]
        net.to(memory_format=fmt)  # type: ignore[call-overload]
        times = []
        for i in range(iters + 1):
            x = x0.contiguous(memory_format=fmt).requires_grad_(True)
            t0 = time.perf_counter()
            acts = net(x)
            sum(a.square().mean() for a in acts.values()).backward()  # type: ignore[union-attr]
            if i > 0:
                times.append(time.perf_counter() - t0)
        return statistics.median(times)

    order = list(variants)
    for r in range(rounds):
        for v in (order if r % 2 == 0 else order[::-1]):
            blocks[v].append(block(v))
    ratios = [a / b for a, b in zip(blocks["nchw"], blocks["channels_last"], strict=True)]
    res: dict[str, Any] = {v: {"median_s": round(statistics.median(b), 4), "min_s": round(min(b), 4),
                               "max_s": round(max(b), 4), "blocks_s": [round(t, 4) for t in b]}
                           for v, b in blocks.items()}
    res["speedup_channels_last_per_round"] = [round(r, 3) for r in ratios]
    res["speedup_channels_last_median"] = round(statistics.median(ratios), 3)
    print("layout", res, flush=True)
    return res


def amp_check(content: Image.Image, style: Image.Image, steps: int, size: int) -> dict[str, Any]:
    params = StyleParams(steps=steps, size=size, style_weight=1e3)
    net = random_vgg_features(0)
    runs: list[dict[str, Any]] = []
    for amp in ("fp32", "bf16", "bf16", "fp32"):
        losses: list[float] = []
        times: list[float] = []
        t0 = time.perf_counter()

        def progress(info: ProgressInfo, losses: list[float] = losses, times: list[float] = times,
                     t0: float = t0) -> bool:
            losses.append(info.loss)
            times.append(time.perf_counter() - t0)
            return True

        stylize(content, [style], params, net, torch.device("cpu"), progress=progress,
                amp=torch.bfloat16 if amp == "bf16" else None)
        per_step = (times[-1] - times[0]) / max(1, len(times) - 1)
        runs.append({"amp": amp, "first_loss": losses[0], "best_loss": min(losses), "last_loss": losses[-1],
                     "seconds_per_step": round(per_step, 4), "losses": losses})
        print("amp", amp, losses[0], min(losses), round(per_step, 3), flush=True)
    fp32 = [r["seconds_per_step"] for r in runs if r["amp"] == "fp32"]
    bf16 = [r["seconds_per_step"] for r in runs if r["amp"] == "bf16"]
    return {"steps": steps, "size": size, "runs": runs,
            "speedup_bf16_per_pair": [round(a / b, 3) for a, b in zip(fp32, bf16, strict=True)]}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checks", default="rms,layout,amp")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--amp-steps", type=int, default=100)
    p.add_argument("--amp-size", type=int, default=128)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    content = Image.open(DATA / "content" / "tubingen.jpg").convert("RGB")
    style = Image.open(DATA / "style" / "starry_night_vangogh.jpg").convert("RGB")
    out: dict[str, Any] = {"what": "style-transfer design checks", "torch": torch.__version__,
                           "torch_threads": torch.get_num_threads(), "loadavg_1_5_15_start": _load(),
                           "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    checks = args.checks.split(",")
    if "rms" in checks:
        out["rms_without_rescale"] = rms_check(content)
    if "layout" in checks:
        out["forward_backward_256x192"] = layout_check(args.rounds, args.iters)
    if "amp" in checks:
        out["amp"] = amp_check(content, style, args.amp_steps, args.amp_size)
    out["loadavg_1_5_15_end"] = _load()
    write_json(args.json, out, indent=1)
    return out


if __name__ == "__main__":
    main()
