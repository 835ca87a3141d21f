"""Raw model forward, the service's model path and image decoding, timed in one process (issue 14).

These are the ceilings the end-to-end /classify numbers are compared with, measured in the same run:

- ``raw``: torchvision's classifier (random weights), eval, channels_last, ``torch.inference_mode`` and
  autocast (bf16 where the GPU supports it, else fp16; none on CPU), cudnn.benchmark on as the service sets
  it, the input batch already on the device: images/s and ms per batch for each batch size.
- ``service``: the same model loaded as the server loads it (``ModelRegistry.load``, untrained weights
  allowed) and ``loaded.forward(list of CHW tensors)``: stacking, pinning, the host-to-device copy, the
  forward, softmax and the copy back, i.e. what one micro-batch costs the server without HTTP and decoding.
- ``decode``: the CPU path of one upload (``app.runtime.images.decode_image`` + ``models.preprocess.
  image_to_tensor``) on one thread for a generated 224 px JPEG and a 500x375 one, images/s per core and that
  times the usable cores; on CUDA also ``torchvision.io.decode_jpeg(..., device="cuda")`` on batches plus
  resize, centre crop and normalisation on the GPU.

    python -m bench.gpu_forward --device cuda --batch-sizes 1,16,64,256 --seconds 2 --json runs/bench/forward.json

Each part is reported on its own: a part that fails records its error and the others still run.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bench.classify_load import PROJECT_ROOT, machine_description, make_test_image


def parse_int_list(s: str) -> list[int]:
    return [int(v) for v in s.split(",") if v.strip()]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], Any], device: torch.device, *, seconds: float, warmup: int,
               min_calls: int = 3) -> list[float]:
    """Per-call wall times (synchronised) after `warmup` untimed calls, for at least `seconds` and `min_calls`."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times: list[float] = []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds or len(times) < min_calls:
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


def stats(times: list[float], items_per_call: int) -> dict[str, Any]:
    s = sorted(times)

    def pct(q: float) -> float:
        k = (len(s) - 1) * q / 100
        lo, hi = math.floor(k), math.ceil(k)
        return 1000 * (s[lo] + (s[hi] - s[lo]) * (k - lo))

    total = sum(s)
    return {"calls": len(s), "seconds": round(total, 4), "items_per_s": items_per_call * len(s) / total,
            "p50_ms": pct(50), "p90_ms": pct(90), "mean_ms": 1000 * total / len(s)}


def autocast_dtype(device: torch.device, name: str) -> torch.dtype | None:
    if device.type != "cuda" or name == "fp32":
        return None
    if name == "fp16":
        return torch.float16
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


# --------------------------------------------------------------------------------------------- parts

def part_raw(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.get_model(args.model, weights=None).eval()
    for param in model.parameters():  # as app.runtime.device.prepare_model (on CPU 3x faster under inference_mode)
        param.requires_grad_(False)
    model = model.to(device).to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    dtype = autocast_dtype(device, args.dtype)
    rows = []
    for b in args.batch_sizes:
        x = torch.randn(b, 3, args.size, args.size, device=device).contiguous(memory_format=torch.channels_last)

        def call(x: torch.Tensor = x, model: torch.nn.Module = model) -> None:
            with torch.inference_mode():
                if dtype is None:
                    model(x)
                else:
                    with torch.autocast(device_type="cuda", dtype=dtype):
                        model(x)

        rows.append({"batch_size": b, **stats(time_calls(call, device, seconds=args.seconds,
                                                         warmup=args.warmup), b)})
        print(f"# raw b={b}: {rows[-1]['items_per_s']:.0f} img/s, p50 {rows[-1]['p50_ms']:.2f} ms", file=sys.stderr,
              flush=True)
        del x
    out: dict[str, Any] = {"model": args.model, "autocast": str(dtype).replace("torch.", "") if dtype else "none",
                           "memory_format": "channels_last", "input": f"{args.size}x{args.size}, on the device",
                           "rows": rows}
    if device.type == "cuda":
        out["max_memory_allocated_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def part_service(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    from app.runtime.registry import ModelRegistry, hub_checkpoint_dir

    registry = ModelRegistry(PROJECT_ROOT / "weights", hub_checkpoint_dir(None), device, allow_download=False,
                             allow_untrained=True)
    state = registry.load(args.model, "image-classification", warmup=True)
    if state.status != "ready" or state.loaded is None:
        raise RuntimeError(f"{args.model}: {state.status}: {state.reason}")
    loaded = state.loaded
    side = loaded.preprocessing.crop  # type: ignore[attr-defined]
    rows = []
    for b in args.batch_sizes:
        batch = [torch.randn(3, side, side) for _ in range(b)]

        def call(batch: list[torch.Tensor] = batch) -> None:
            loaded.forward(batch)

        rows.append({"batch_size": b, **stats(time_calls(call, device, seconds=args.seconds, warmup=args.warmup), b)})
        print(f"# service b={b}: {rows[-1]['items_per_s']:.0f} img/s, p50 {rows[-1]['p50_ms']:.2f} ms",
              file=sys.stderr, flush=True)
    return {"model": args.model, "weights": loaded.weights_tag, "input": f"CPU CHW float tensors, {side} px",
            "what": "LoadedClassifier.forward: stack + pin + copy + forward + softmax + copy back", "rows": rows}


def _jpeg(w: int, h: int, quality: int = 90) -> bytes:
    from PIL import Image

    square = Image.open(io.BytesIO(make_test_image(max(w, h), quality)))
    buf = io.BytesIO()
    square.crop((0, 0, w, h)).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def part_decode(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    from app.runtime.images import decode_image
    from models.preprocess import ImageSpec, image_to_tensor

    spec = ImageSpec(resize=256, crop=224, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one request's preprocessing on one core
    cpu_rows = []
    try:
        for w, h in ((224, 224), (500, 375)):
            data = _jpeg(w, h)

            def preprocess(data: bytes = data) -> None:
                image_to_tensor(decode_image(data), spec)

            times = time_calls(preprocess, torch.device("cpu"), seconds=min(args.seconds, 1.5), warmup=3)
            row = {"image": f"{w}x{h} JPEG, {len(data)} B", **stats(times, 1)}
            row["all_cores_ceiling_per_s"] = row["items_per_s"] * cores
            cpu_rows.append(row)
            print(f"# decode cpu {w}x{h}: {row['items_per_s']:.0f} img/s per core", file=sys.stderr, flush=True)
    finally:
        torch.set_num_threads(threads)
    out: dict[str, Any] = {"cpu": {"what": "decode_image + image_to_tensor (resize 256, crop 224), one thread",
                                   "usable_cores": cores, "rows": cpu_rows}}
    if device.type == "cuda":
        out["gpu"] = gpu_decode(args, device, spec)
    return out


def gpu_decode(args: argparse.Namespace, device: torch.device, spec: Any) -> dict[str, Any]:
    import torch.nn.functional as F
    from torchvision.io import decode_jpeg

    mean = torch.tensor(spec.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, device=device).view(1, 3, 1, 1)
    rows = []
    for w, h in ((224, 224), (500, 375)):
        data = torch.frombuffer(bytearray(_jpeg(w, h)), dtype=torch.uint8)
        for b in args.decode_batch_sizes:
            datas = [data] * b

            def call(datas: list[torch.Tensor] = datas) -> None:
                imgs = decode_jpeg(datas, device=device)
                x = torch.stack([F.interpolate(i.unsqueeze(0).float(), size=(spec.resize, spec.resize),
                                               mode="bilinear", antialias=True)[0] for i in imgs])
                o = (spec.resize - spec.crop) // 2
                x = x[:, :, o:o + spec.crop, o:o + spec.crop].div_(255).sub_(mean).div_(std)
                x.contiguous(memory_format=torch.channels_last)

            rows.append({"image": f"{w}x{h} JPEG", "batch_size": b,
                         **stats(time_calls(call, device, seconds=min(args.seconds, 1.5), warmup=3), b)})
            print(f"# decode gpu {w}x{h} b={b}: {rows[-1]['items_per_s']:.0f} img/s", file=sys.stderr, flush=True)
    return {"what": "torchvision.io.decode_jpeg(list, device=cuda) + resize 256 (square) + crop 224 + normalise",
            "rows": rows}


# --------------------------------------------------------------------------------------------- report

def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = ["## Raw forward, service model path and decode (`bench/gpu_forward.py`)", "",
             f"- {m.get('gpu') or m.get('cpu')}; torch {result['torch']}, device {result['device']}, "
             f"cudnn.benchmark {result['cudnn_benchmark']}"]
    raw, svc = result.get("raw") or {}, result.get("service") or {}
    if raw.get("rows") or svc.get("rows"):
        lines += [f"- {result['model']}, autocast {raw.get('autocast', '?')}, channels_last; service = "
                  "LoadedClassifier.forward from CPU tensors", "",
                  "| batch | raw img/s | raw p50 ms | service img/s | service p50 ms | service / raw |",
                  "|---:|---:|---:|---:|---:|---:|"]
        srows = {r["batch_size"]: r for r in svc.get("rows", [])}
        for r in raw.get("rows", []):
            s = srows.get(r["batch_size"])
            service = (f"{s['items_per_s']:.0f} | {s['p50_ms']:.2f} | {s['items_per_s'] / r['items_per_s']:.2f}"
                       if s else "- | - | -")
            lines.append(f"| {r['batch_size']} | {r['items_per_s']:.0f} | {r['p50_ms']:.2f} | {service} |")
    for part in ("raw", "service", "decode"):
        if err := (result.get(part) or {}).get("error"):
            lines.append(f"- {part}: error: {err}")
    dec = result.get("decode") or {}
    if dec.get("cpu", {}).get("rows"):
        lines += ["", "| decode | img/s | p50 ms | note |", "|---|---:|---:|---|"]
        for r in dec["cpu"]["rows"]:
            lines.append(f"| CPU, 1 thread, {r['image']} | {r['items_per_s']:.0f} | {r['p50_ms']:.2f} | x "
                         f"{dec['cpu']['usable_cores']} cores = {r['all_cores_ceiling_per_s']:.0f} img/s |")
        for r in dec.get("gpu", {}).get("rows", []):
            lines.append(f"| GPU nvjpeg batch {r['batch_size']}, {r['image']} | {r['items_per_s']:.0f} | "
                         f"{r['p50_ms']:.2f} | per batch |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="cuda, cpu (default: cuda when available)")
    p.add_argument("--model", default="resnet50", help="a torchvision classifier name")
    p.add_argument("--size", type=int, default=224, help="input side of the raw forward")
    p.add_argument("--batch-sizes", type=parse_int_list, default=[1, 16, 64, 256])
    p.add_argument("--decode-batch-sizes", type=parse_int_list, default=[64], help="GPU decode batches")
    p.add_argument("--dtype", choices=["auto", "bf16", "fp16", "fp32"], default="auto",
                   help="autocast dtype on CUDA (auto: bf16 where supported, as the service)")
    p.add_argument("--seconds", type=float, default=2.0, help="timed seconds per row")
    p.add_argument("--warmup", type=int, default=5, help="untimed calls before each row")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--parts", default="raw,service,decode", help="subset of raw,service,decode")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--markdown", type=Path, default=None)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    if bad := sorted(set(parts) - {"raw", "service", "decode"}):
        raise SystemExit(f"--parts takes raw,service,decode; got {bad}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch.cuda.is_available() is False")
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as app.runtime.device.configure_torch
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    result: dict[str, Any] = {"machine": machine_description(str(device)), "device": str(device),
                              "torch": torch.__version__, "model": args.model,
                              "cudnn_benchmark": torch.backends.cudnn.benchmark,
                              "torch_threads": torch.get_num_threads(),
                              "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    failed = False
    for part, fn in (("raw", part_raw), ("service", part_service), ("decode", part_decode)):
        if part not in parts:
            continue
        t0 = time.perf_counter()
        try:
            result[part] = fn(args, device)
        except Exception as exc:  # one part failing must not lose the others
            failed = True
            traceback.print_exc()
            result[part] = {"error": f"{type(exc).__name__}: {exc}"}
        result[part]["part_seconds"] = round(time.perf_counter() - t0, 2)
    report = markdown(result)
    print(report)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2, default=str) + "\n")
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(report + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
