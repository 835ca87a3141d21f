"""Training step time of the CIFAR families (ResNet, SE-ResNet, wide ResNet) at one batch size.

One step is what `python -m app.cli train images` does per batch: the trainer's augmentation (pad 4 + random
crop + flip) on a normalised uint8-derived batch, forward, label-smoothed cross-entropy, backward and a Nesterov
SGD step with the trainer's parameter groups, under the chosen precision and memory format. Random 32x32 inputs
(the time does not depend on the pixels). A few warm-up steps, then the median of the timed steps.

    python -m bench.cifar_step_time --json docs/bench/cifar-step-time.json
    python -m bench.cifar_step_time --models wrn-16-8 --device cuda --precision bf16 --steps 20

Raw numbers only: the machine and its load are recorded next to them (a shared machine makes them noisy).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from bench.harness import write_json
from models.cifar_resnet import count_parameters
from models.train.images import augment
from models.zoo import build_classifier

# name: (family, arch), the architectures the docs give recipes for
MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "resnet-56": ("cifar-resnet", {"depth": 56, "shortcut": "A"}),
    "se-resnet-20": ("cifar-se-resnet", {"depth": 20, "shortcut": "A", "reduction": 16}),
    "se-resnet-56": ("cifar-se-resnet", {"depth": 56, "shortcut": "A", "reduction": 16}),
    "se-resnet-110": ("cifar-se-resnet", {"depth": 110, "shortcut": "A", "reduction": 16}),
    "wrn-16-2": ("cifar-wide-resnet", {"depth": 16, "width": 2, "dropout": 0.0}),
    "wrn-16-4": ("cifar-wide-resnet", {"depth": 16, "width": 4, "dropout": 0.0}),
    "wrn-16-8": ("cifar-wide-resnet", {"depth": 16, "width": 8, "dropout": 0.0}),
    "wrn-28-10": ("cifar-wide-resnet", {"depth": 28, "width": 10, "dropout": 0.0}),
    "whitened-convnet": ("cifar-whitened-convnet", {"widths": [64, 256, 256], "convs": 2, "logit_scale": 1 / 9}),
}


def forward_macs(model: torch.nn.Module) -> int:
    """Multiply-adds of one 32x32 image's forward pass through the convolutions and fully connected layers."""
    total = 0

    def hook(mod: torch.nn.Module, inputs: Any, out: torch.Tensor) -> None:
        nonlocal total
        if isinstance(mod, torch.nn.Conv2d):
            k = mod.kernel_size[0] * mod.kernel_size[1] * mod.in_channels // mod.groups
            total += out[0].numel() * k
        elif isinstance(mod, torch.nn.Linear):
            total += mod.in_features * mod.out_features

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, 3, 32, 32))
    finally:
        for h in handles:
            h.remove()
    return total


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_times(family: str, arch: dict[str, Any], *, batch: int, steps: int, warmup: int, device: torch.device,
               precision: str, channels_last: bool) -> dict[str, Any]:
    """Seconds per training step (each timed step, synchronised on CUDA) of one architecture."""
    torch.manual_seed(0)
    model = build_classifier(family, arch, 10).to(device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt).train()
    decay = [p for p in model.parameters() if p.dim() > 1]
    no_decay = [p for p in model.parameters() if p.dim() <= 1]
    opt = torch.optim.SGD([{"params": decay, "weight_decay": 5e-4}, {"params": no_decay, "weight_decay": 0.0}],
                          lr=0.05, momentum=0.9, nesterov=True)
    gen = torch.Generator().manual_seed(0)
    x_all = torch.randn(batch, 3, 32, 32)
    y_all = torch.randint(0, 10, (batch,), generator=gen)
    times: list[float] = []
    for i in range(warmup + steps):
        _sync(device)
        t0 = time.perf_counter()
        xb = augment(x_all, gen).to(device, non_blocking=True, memory_format=fmt)
        yb = y_all.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = F.cross_entropy(model(xb).float(), yb, label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return {"family": family, "arch": arch, "params": count_parameters(model), "batch": batch,
            "precision": precision, "channels_last": channels_last, "warmup_steps": warmup,
            "step_seconds": [round(t, 4) for t in times], "median_step_seconds": round(statistics.median(times), 4),
            "images_per_second": round(batch / statistics.median(times), 1)}


def machine() -> dict[str, Any]:
    """Where the numbers were measured, and how busy the machine was."""
    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                            "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                            "torch_threads": torch.get_num_threads()}
    try:
        info["loadavg_1_5_15"] = list(os.getloadavg())
    except OSError:  # pragma: no cover - not on every platform
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=3, help="timed steps per model")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--precision", nargs="+", choices=["fp32", "bf16"], default=["fp32"])
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--json", type=Path, default=None, help="write the raw results here")
    p.add_argument("--note", default="", help="recorded with the results (e.g. what else ran on the machine)")
    p.add_argument("--macs-only", action="store_true",
                   help="no timing: each model's parameters and forward multiply-adds per image (the compute ratio)")
    args = p.parse_args(argv)
    if args.macs_only:
        sizes = {}
        for name in args.models:
            family, arch = MODELS[name]
            model = build_classifier(family, arch, 10)
            sizes[name] = {"family": family, "arch": arch, "params": count_parameters(model),
                           "forward_macs_per_image": forward_macs(model)}
            print(f"{name}: {sizes[name]['params']:,} params, {sizes[name]['forward_macs_per_image'] / 1e6:.1f} M MACs")
        report = {"what": "parameters and forward multiply-adds per 32x32 image (counted, not timed)",
                  "results": sizes}
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(report, indent=2) + "\n")
        return report
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    out: dict[str, Any] = {"what": "training step time (augment + forward + backward + SGD step) of CIFAR families",
                           "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "device": str(device),
                           "machine_before": machine(), "note": args.note, "results": {}}
    for name in args.models:
        family, arch = MODELS[name]
        for precision in args.precision:
            key = f"{name}/{precision}"
            r = step_times(family, arch, batch=args.batch_size, steps=args.steps, warmup=args.warmup,
                           device=device, precision=precision, channels_last=args.channels_last)
            out["results"][key] = r
            print(f"{key}: {r['params']:,} params, {r['median_step_seconds']:.3f} s/step "
                  f"({r['images_per_second']} img/s) {r['step_seconds']}", flush=True)
    out["machine_after"] = machine()
    write_json(args.json, out)
    return out


if __name__ == "__main__":
    main()
