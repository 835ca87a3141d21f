"""Style-transfer speed: `models.style.stylize` against a plain reference implementation of the same algorithm.

The reference is written the classic tutorial way: the *whole* VGG-19 `features` stack is copied into
an `nn.Sequential` with a normalisation module in front and loss modules inserted after the chosen
layers (each computes its loss as a side effect of every forward), every forward runs through all 37
modules, ReLUs are out-of-place, and the feature weights keep `requires_grad=True` as in the original
tutorial code, so each backward also computes weight gradients nobody uses. Style targets are the
Gram matrices of the style image computed once when the model is built (as the tutorial does too).

Both sides optimise exactly the same objective (models/style.py's relative content and style losses,
alpha, beta, the same Gram normalisation) with the same random VGG-19 weights, the same L-BFGS
settings (lr 1, history 50, one iteration = one evaluation per step, no line search), the same
content initialisation, and the same handling of the pixel range: the loss is evaluated at
clamp(x, 0, 1) (where the tutorial clamps x in place inside the closure, which breaks L-BFGS's
curvature pairs; see docs/style-transfer.md).

Each variant runs in a fresh process so peak memory is its own: on CPU the peak resident set during
the run minus the resident set just before (Linux: VmHWM after resetting it through
/proc/self/clear_refs; elsewhere ru_maxrss, which may include the set-up); on CUDA
torch.cuda.max_memory_allocated. "Time to result" = target set-up + all steps. Equal-loss comparison:
the reference's final loss is the bar; for ours we report the first step whose loss is at or below it
and the time to that step.

    .venv/bin/python -m bench.style_speed --size 256 --steps 300 --device cpu --json runs/bench/style.json

Variants: ``ours`` (stylize), ``reference`` (as above), ``reference-frozen`` (the reference with frozen
weights: shows how much of the gap is weight gradients). Pick with ``--variants``.

``--repeats N`` runs N rounds of the variants, the order reversed every other round (interleaved, so drift
in the machine's load hits each variant alike); the JSON keeps every round (``later_rounds``), the spread of
the equal-loss speed-ups over rounds (``spread_over_rounds``) and os.getloadavg() at the start and the end.
On a shared machine pass ``--threads 1``: with two threads competing for busy cores the times measure the
contention (docs/number-sources.md).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from torch import Tensor, nn

from bench.harness import style_job_lines
from models.style import (
    VGG19_MODULES,
    ProgressInfo,
    StyleParams,
    VGGFeatures,
    fit_size,
    layer_index,
    random_vgg_features,
    stylize,
    to_tensor,
)

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "style"
DEFAULT_CONTENT = DATA / "content" / "tubingen.jpg"
DEFAULT_STYLE = DATA / "style" / "starry_night_vangogh.jpg"
VARIANTS = ("ours", "reference", "reference-frozen")


# ---------------------------------------------------------------------------------------------- reference


class Normalization(nn.Module):
    """ImageNet mean/std normalisation as the first module of the sequence."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("m", torch.tensor([0.485, 0.456, 0.406]).view(-1, 1, 1))
        self.register_buffer("s", torch.tensor([0.229, 0.224, 0.225]).view(-1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.m) / self.s  # type: ignore[operator]


def plain_gram(x: Tensor) -> Tensor:
    """F Fᵀ / (C*H*W) for a batch of one."""
    _, c, h, w = x.size()
    f = x.view(c, h * w)
    return torch.mm(f, f.t()) / (c * h * w)


class ContentLoss(nn.Module):
    """Identity module that records the relative squared error to its target on each forward."""

    def __init__(self, target: Tensor, weight: float) -> None:
        super().__init__()
        self.target = target.detach()
        self.weight = weight / float(self.target.pow(2).mean())
        self.loss = torch.zeros(())

    def forward(self, x: Tensor) -> Tensor:
        self.loss = self.weight * F.mse_loss(x, self.target)
        return x


class StyleLoss(nn.Module):
    """Identity module that records the relative squared Gram error to its target on each forward."""

    def __init__(self, target_feature: Tensor, weight: float) -> None:
        super().__init__()
        self.target = plain_gram(target_feature).detach()
        self.weight = weight / float(self.target.pow(2).sum())
        self.loss = torch.zeros(())

    def forward(self, x: Tensor) -> Tensor:
        self.loss = self.weight * (plain_gram(x) - self.target).pow(2).sum()
        return x


def reference_model(trained: VGGFeatures, pool: str, frozen: bool, content: Tensor, style: Tensor,
                    params: StyleParams) -> tuple[nn.Sequential, list[ContentLoss], list[StyleLoss]]:
    """The full VGG-19 features with loss modules inserted after the chosen ReLUs (tutorial structure)."""
    with torch.device("meta"):  # a classifier we would throw away is not worth 0.5 GB here
        cnn = torchvision.models.vgg19(weights=None).features
    cnn = cnn.to_empty(device="cpu")  # initialised on the CPU: a CPU generator cannot fill CUDA tensors
    gen = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for m in cnn:
            if isinstance(m, nn.Conv2d):  # layers beyond conv5_1 are computed but not used
                nn.init.kaiming_normal_(m.weight, generator=gen)
                nn.init.zeros_(m.bias)  # type: ignore[arg-type]
    own = trained.layers.state_dict()
    cnn.load_state_dict({**cnn.state_dict(), **own})
    cnn = cnn.to(content.device)
    cnn.requires_grad_(not frozen)

    wanted = {layer_index(n): n for n in params.style_layers}
    content_at = {layer_index(n): n for n in params.content_layers}
    style_w = params.layer_weights()
    model = nn.Sequential(Normalization().to(content.device))
    prefix = nn.Sequential(Normalization().to(content.device))  # targets: the same layers, no loss modules
    content_losses: list[ContentLoss] = []
    style_losses: list[StyleLoss] = []
    for i, layer in enumerate(cnn.children()):
        if isinstance(layer, nn.ReLU):
            layer = nn.ReLU(inplace=False)
        elif isinstance(layer, nn.MaxPool2d) and pool == "avg":
            layer = nn.AvgPool2d(2, 2)
        model.add_module(VGG19_MODULES[i], layer)
        prefix.add_module(VGG19_MODULES[i], layer)
        if i in content_at:
            target = prefix(content).detach()
            cl = ContentLoss(target, 1.0 / len(content_at))
            model.add_module(f"content_loss_{i}", cl)
            content_losses.append(cl)
        if i in wanted:
            target = prefix(style).detach()
            sl = StyleLoss(target, style_w[wanted[i]])
            model.add_module(f"style_loss_{i}", sl)
            style_losses.append(sl)
    model.eval()
    return model, content_losses, style_losses


def run_reference(content_img: Image.Image, style_img: Image.Image, params: StyleParams, net: VGGFeatures,
                  device: torch.device, frozen: bool, steps_log: list[tuple[float, float]]) -> float:
    """Classic loop; appends (seconds since start, loss) per step; returns the set-up time."""
    t0 = time.perf_counter()
    w, h = fit_size(*content_img.size, params.size)
    content = to_tensor(content_img.convert("RGB").resize((w, h), Image.Resampling.LANCZOS)).to(device)
    style_img = style_img.convert("RGB")
    style = to_tensor(style_img.resize(fit_size(*style_img.size, max(w, h)), Image.Resampling.LANCZOS)).to(device)
    model, content_losses, style_losses = reference_model(net, params.pool or net.pool, frozen, content, style,
                                                          params)
    input_img = content.clone().requires_grad_(True)
    optimizer = torch.optim.LBFGS([input_img], lr=1.0, max_iter=1, history_size=50, tolerance_grad=0.0,
                                  tolerance_change=0.0)
    setup = time.perf_counter() - t0
    last = [0.0]

    def closure() -> Tensor:
        optimizer.zero_grad()
        model(input_img.clamp(0, 1))
        c = sum((cl.loss for cl in content_losses), torch.zeros((), device=device))
        s = sum((sl.loss for sl in style_losses), torch.zeros((), device=device))
        loss = params.content_weight * c + params.style_weight * s
        loss.backward()
        last[0] = loss.item()
        return loss

    for _ in range(params.steps):
        optimizer.step(closure)
        _sync(device)
        steps_log.append((time.perf_counter() - t0, last[0]))
    input_img.detach().clamp(0, 1)  # the result
    return setup


# ---------------------------------------------------------------------------------------------- measuring


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_kb() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM (peak RSS) to the current RSS
        return True
    except OSError:
        return False


def _peak_kb() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def worker(variant: str, args: dict[str, Any], queue: Any) -> None:
    """One variant in a fresh process; puts a result dict on the queue."""
    try:
        queue.put(_measure(variant, args))
    except Exception as exc:  # report, do not hang the parent
        queue.put({"variant": variant, "error": f"{type(exc).__name__}: {exc}"})


def _measure(variant: str, args: dict[str, Any]) -> dict[str, Any]:
    if args["threads"]:
        torch.set_num_threads(args["threads"])
    device = torch.device(args["device"])
    net = random_vgg_features(args["seed"])
    content, style = _images(args)
    params = StyleParams(steps=args["steps"], size=args["size"], style_weight=args["style_weight"],
                         seed=args["seed"], pool=args["pool"])
    log: list[tuple[float, float]] = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        exact = _reset_peak()
        base = _rss_kb() * 1024
    warm_jobs: list[float] = []
    together: dict[str, Any] | None = None
    t0 = time.perf_counter()
    if variant == "ours":
        first = [0.0]

        def progress(info: ProgressInfo) -> bool:
            _sync(device)
            if info.step == 1:
                first[0] = time.perf_counter() - t0
            log.append((time.perf_counter() - t0, info.loss))
            return True

        stylize(content, [style], params, net, device, progress=progress)
        setup = None
        # later jobs in the same process, as a style worker runs them: network, CUDA state and kernels warm
        for _ in range(max(0, args.get("jobs", 1) - 1)):
            _sync(device)
            t_job = time.perf_counter()
            stylize(content, [style], params, net, device)
            _sync(device)
            warm_jobs.append(time.perf_counter() - t_job)
        together = _concurrent_jobs(args.get("concurrent", 1), content, style, params, net, device)
    else:
        setup = run_reference(content, style, params, net, device, variant == "reference-frozen", log)
    total = time.perf_counter() - t0 - sum(warm_jobs) - (together or {}).get("wall_seconds", 0.0)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) - base
        how = "torch.cuda.max_memory_allocated"
    else:
        peak = _peak_kb() * 1024 - base
        how = "VmHWM delta" if exact else "ru_maxrss delta (includes set-up)"
    return {"variant": variant, "seconds": total, "setup_seconds": setup, "peak_bytes": peak, "memory": how,
            "losses": [v for _, v in log], "times": [t for t, _ in log], "torch_threads": torch.get_num_threads(),
            "warm_job_seconds": warm_jobs, "concurrent_jobs": together}


def _concurrent_jobs(k: int, content: Image.Image, style: Image.Image, params: StyleParams, net: VGGFeatures,
                     device: torch.device) -> dict[str, Any] | None:
    """k jobs at once, each in its own thread and (on CUDA) its own stream, as k style workers run them: the wall
    time for all of them against k times one job alone, timed just before in the same way."""
    import threading

    from app.runtime.device import job_stream

    if k < 2:
        return None

    def one() -> None:
        with job_stream(device):
            stylize(content, [style], params, net, device)
            _sync(device)

    t_alone = time.perf_counter()
    one()
    alone = time.perf_counter() - t_alone
    threads = [threading.Thread(target=one) for _ in range(k)]
    t_all = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t_all
    return {"jobs": k, "wall_seconds": wall + alone, "together_seconds": wall, "one_alone_seconds": alone,
            "together_over_sum_alone": wall / (k * alone)}


def _images(args: dict[str, Any]) -> tuple[Image.Image, Image.Image]:
    c, s = Path(args["content"]), Path(args["style"])
    if c.is_file() and s.is_file():
        return Image.open(c).convert("RGB"), Image.open(s).convert("RGB")
    # no data: a seeded synthetic pair (gradient + squares, noisy stripes)
    gen = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 300), torch.linspace(0, 1, 400), indexing="ij")
    content = torch.stack([xx, yy, 0.5 * (xx + yy)])
    content[:, 60:160, 80:200] = torch.tensor([0.8, 0.2, 0.2]).view(3, 1, 1)
    stripes = (((xx * 400 + yy * 300) // 12) % 2).float()
    style = torch.stack([stripes, 1 - stripes, 0.3 + 0.0 * stripes]) * 0.8 + 0.2 * torch.rand(3, 300, 400,
                                                                                             generator=gen)
    to_img = torchvision.transforms.functional.to_pil_image
    return to_img(content.clamp(0, 1)), to_img(style.clamp(0, 1))


def _first_at_or_below(losses: list[float], bar: float) -> int | None:
    return next((i for i, v in enumerate(losses) if v <= bar), None)


def summarise(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Equal-loss comparison of `ours` against each reference variant.

    The common bar is the higher of the two final losses (the two runs follow the same trajectory up
    to float rounding, so either may end a hair lower): each side's steps and seconds to first reach it.
    """
    out: dict[str, Any] = {}
    ours = results.get("ours")
    for name, ref in results.items():
        if name == "ours" or ours is None or "error" in ref or "error" in ours:
            continue
        bar = max(ref["losses"][-1], ours["losses"][-1])
        i_ours = _first_at_or_below(ours["losses"], bar)
        i_ref = _first_at_or_below(ref["losses"], bar)
        assert i_ours is not None and i_ref is not None  # the bar is at least each side's final loss
        out[f"ours_vs_{name}"] = {
            "reference_final_loss": ref["losses"][-1], "ours_final_loss": ours["losses"][-1], "equal_loss": bar,
            "reference_seconds": ref["seconds"], "ours_seconds": ours["seconds"],
            "reference_steps_to_equal_loss": i_ref + 1, "ours_steps_to_equal_loss": i_ours + 1,
            "reference_seconds_to_equal_loss": ref["times"][i_ref],
            "ours_seconds_to_equal_loss": ours["times"][i_ours],
            "speedup_at_equal_loss": ref["times"][i_ref] / ours["times"][i_ours],
        }
    return out


def markdown(results: dict[str, dict[str, Any]], summary: dict[str, Any], meta: dict[str, Any]) -> str:
    """A result table for docs/style-transfer.md."""
    lines = [f"{meta['size']} px, {meta['steps']} steps, device {meta['device']} ({meta['machine']}), "
             f"torch {meta['torch']}, {meta['threads']} threads", "",
             "| variant | time to result (s) | set-up (s) | s/step | peak memory (MiB) | final loss |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        if "error" in r:
            lines.append(f"| {name} | error: {r['error']} | | | | |")
            continue
        t = r["times"]
        per_step = (t[-1] - t[0]) / max(1, len(t) - 1)
        setup = r["setup_seconds"] if r["setup_seconds"] is not None else t[0] - per_step
        lines.append(f"| {name} | {r['seconds']:.1f} | {setup:.2f} | {per_step:.3f} | "
                     f"{r['peak_bytes'] / 2**20:.0f} | {r['losses'][-1]:.3f} |")
    lines.append("")
    lines += style_job_lines(results)
    for name, row in summary.items():
        lines.append(f"- {name}: final losses {row['ours_final_loss']:.4f} (ours) / {row['reference_final_loss']:.4f}; "
                     f"to reach {row['equal_loss']:.4f} ours needs {row['ours_steps_to_equal_loss']} steps, "
                     f"{row['ours_seconds_to_equal_loss']:.1f} s, the reference {row['reference_steps_to_equal_loss']} "
                     f"steps, {row['reference_seconds_to_equal_loss']:.1f} s: **{row['speedup_at_equal_loss']:.2f}x** "
                     f"at equal loss")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the variants, print a Markdown table, optionally write JSON."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=256, help="longest side in pixels")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--variants", default="ours,reference,reference-frozen")
    ap.add_argument("--content", default=str(DEFAULT_CONTENT))
    ap.add_argument("--style", default=str(DEFAULT_STYLE))
    ap.add_argument("--style-weight", type=float, default=StyleParams().style_weight)
    ap.add_argument("--pool", choices=["max", "avg"], default=None, help="default: the feature network's")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--concurrent", type=int, default=1,
                    help="ours: after the other jobs, this many at once in threads (own CUDA stream each), timed "
                         "against one alone")
    ap.add_argument("--jobs", type=int, default=1,
                    help="ours: this many jobs in one process; the later ones (warm: network, CUDA state and "
                         "kernels as a style worker keeps them) are timed without per-step readings")
    ap.add_argument("--repeats", type=int, default=1,
                    help="rounds of all variants, interleaved (order reversed every other round); the table is "
                         "the first round's, the JSON holds every round and the spread of the speed-ups")
    ap.add_argument("--json", type=Path, default=None, help="write all results (per-step losses too)")
    ap.add_argument("--summarise", type=Path, default=None, metavar="JSON",
                    help="only print the table of a saved --json result")
    args = ap.parse_args(argv)
    if args.summarise:
        saved = json.loads(args.summarise.read_text())
        print(markdown(saved["results"], summarise(saved["results"]), saved["meta"]))
        return 0
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        ap.error(f"unknown variants {sorted(unknown)}; choose from {VARIANTS}")
    cfg = {k: getattr(args, k) for k in ("size", "steps", "device", "threads", "content", "style", "style_weight",
                                         "pool", "seed", "jobs", "concurrent")}
    ctx = mp.get_context("spawn")
    load_start = _loadavg()
    rounds: list[dict[str, dict[str, Any]]] = []
    for k in range(max(1, args.repeats)):
        results: dict[str, dict[str, Any]] = {}
        for v in (variants if k % 2 == 0 else list(reversed(variants))):
            q = ctx.Queue()
            p = ctx.Process(target=worker, args=(v, cfg, q))
            p.start()
            results[v] = q.get()
            p.join()
            r = results[v]
            msg = r.get("error") or f"{r['seconds']:.1f} s, final loss {r['losses'][-1]:.4f}"
            print(f"round {k + 1} {v}: {msg}", file=sys.stderr, flush=True)
        rounds.append({v: results[v] for v in variants})
    results = rounds[0]
    summary = summarise(results)
    meta = {"size": args.size, "steps": args.steps, "device": args.device, "machine": platform.processor()
            or platform.machine(), "torch": torch.__version__, "cpus": os.cpu_count(),
            "threads": next((r["torch_threads"] for r in results.values() if "torch_threads" in r), None),
            "repeats": len(rounds), "loadavg_1_5_15_start": load_start, "loadavg_1_5_15_end": _loadavg()}
    print(markdown(results, summary, meta))
    spread = spread_over_rounds(rounds)
    for name, row in spread.items():
        print(f"- over {len(rounds)} rounds, {name}: speed-up at equal loss median {row['median']:.2f}x "
              f"(min {row['min']:.2f}, max {row['max']:.2f}); seconds per run: {row['seconds']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        doc = {"meta": meta, "config": cfg, "summary": summary, "spread_over_rounds": spread, "results": results,
               "later_rounds": rounds[1:]}
        args.json.write_text(json.dumps(doc, indent=1))
    return 0


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover - not on every platform
        return None


def spread_over_rounds(rounds: list[dict[str, dict[str, Any]]]) -> dict[str, Any]:
    """Per comparison: the speed-up at equal loss of every round, its median, min and max, and each run's time."""
    per: dict[str, list[float]] = {}
    secs: dict[str, dict[str, list[float]]] = {}
    for results in rounds:
        for name, row in summarise(results).items():
            per.setdefault(name, []).append(row["speedup_at_equal_loss"])
            s = secs.setdefault(name, {"ours": [], "reference": []})
            s["ours"].append(round(row["ours_seconds"], 1))
            s["reference"].append(round(row["reference_seconds"], 1))
    return {name: {"speedups": [round(x, 3) for x in v], "median": statistics.median(v), "min": min(v),
                   "max": max(v), "seconds": secs[name]} for name, v in per.items()}


if __name__ == "__main__":
    raise SystemExit(main())
