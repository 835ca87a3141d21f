"""Where a served request's time goes: the service under load, inside torch.profiler.

The load benchmarks say how fast; this says where the time went, measured rather than guessed (issue 14: "find out
first where the time goes on the GPU path, with a profiler"). The service runs in this process (uvicorn in a
thread, the settings from CNN_* as `serve` reads them, with the model under test the only one loaded), a closed-loop
load generator runs in another process (bench.classify_load or bench.text_load against its URL, so the client does
not share this process's interpreter), and after the warm-up torch.profiler records every thread of the service for
the window:

    python -m bench.profile_service --route classify --model resnet50 --device cuda --concurrency 64 \\
        --warmup 5 --duration 6 --json runs/profile.json --markdown runs/profile.md

Written: --json (settings, machine, the load generator's result over its whole run, and the profile: per torch
operator its calls, self CPU time and self device time; the window's totals), --markdown (the same as tables) and
--trace (the Chrome trace: open it in Perfetto or chrome://tracing; large). Read the totals as:
device busy = the GPU kernels' time over the window (how far from saturated the GPU is); torch CPU = the operators'
own CPU time over the window, in cores; the rest of the window's CPU is the interpreter, HTTP, JPEG decoding in PIL,
the event loop (not torch operators, so not in the table; `top` or py-spy see them).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from bench.classify_load import PROJECT_ROOT, free_port, machine_description, model_ready


def _settings(args: argparse.Namespace) -> Any:
    from app.settings import Settings

    env = {"CNN_LOG_LEVEL": "warning", "CNN_API_KEYS": "", "CNN_STYLE_ENABLED": "false", "CNN_FACE_MODELS": "",
           "CNN_IN_FLIGHT_MAX": str(max(64, 2 * args.concurrency))}
    if args.route == "classify":
        env.update({"CNN_CLASSIFIERS": args.model, "CNN_DEFAULT_CLASSIFIER": args.model, "CNN_TEXT_MODELS": ""})
    else:
        env.update({"CNN_CLASSIFIERS": "", "CNN_TEXT_MODELS": args.model, "CNN_DEFAULT_TEXT_MODEL": args.model})
    if args.device:
        env["CNN_DEVICE"] = args.device
    if args.allow_untrained:
        env["CNN_ALLOW_UNTRAINED"] = "true"
    for k, v in env.items():
        os.environ.setdefault(k, v)  # what the caller set wins
    return Settings()


class AnsweredCounter:
    """ASGI wrapper counting the responses started on the benchmarked routes: the window is opened only once the
    load generator's requests are being answered, and the count over the window says whether it held any work."""

    def __init__(self, app: Any, paths: tuple[str, ...]) -> None:
        self.app, self.paths, self.answered = app, paths, 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("path") not in self.paths:
            await self.app(scope, receive, send)
            return

        async def counting_send(message: Any) -> None:
            if message["type"] == "http.response.start":
                self.answered += 1
            await send(message)

        await self.app(scope, receive, send=counting_send)


def stopped_early(load: subprocess.Popen[bytes]) -> RuntimeError:
    err = load.stderr.read().decode()[-2000:] if load.stderr else ""
    return RuntimeError(f"the load generator stopped early: {err}")


def wait_for_answers(counter: AnsweredCounter, timeout: float, load: subprocess.Popen[bytes]) -> None:
    """Until the load generator's first request on the route is answered (its start-up, imports and warm-up
    requests take a variable time on a busy machine, so a fixed sleep can leave the window empty)."""
    deadline = time.monotonic() + timeout
    since = counter.answered
    while counter.answered <= since:
        if load.poll() is not None:
            raise stopped_early(load)
        if time.monotonic() > deadline:
            raise RuntimeError(f"no request answered within {timeout:.0f} s of starting the load")
        time.sleep(0.05)


class InProcessServer:
    """The app under uvicorn in a background thread of this process (what torch.profiler can see)."""

    def __init__(self, settings: Any, model: str) -> None:
        import uvicorn

        from app.main import create_app

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.model = model
        self.counter = AnsweredCounter(create_app(settings), ("/classify", "/text/classify"))
        config = uvicorn.Config(self.counter, host="127.0.0.1", port=self.port, log_level="warning",
                                http="h11", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)

    def start(self, timeout: float) -> None:
        self.thread.start()
        deadline = time.monotonic() + timeout
        last = "no answer"
        with httpx.Client(base_url=self.url, timeout=5, trust_env=False) as c:
            while time.monotonic() < deadline:
                if not self.thread.is_alive():
                    raise RuntimeError("the server stopped before it was ready")
                try:
                    status = model_ready(c, self.model, "this process's output")
                    if status is None:
                        return
                    last = status
                except httpx.HTTPError as exc:
                    last = type(exc).__name__
                time.sleep(0.3)
        raise RuntimeError(f"server not ready after {timeout:.0f} s ({last})")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)


def load_command(args: argparse.Namespace, url: str, out: Path) -> list[str]:
    seconds = args.warmup + args.duration + 2  # the load outlasts the window on both sides
    if args.route == "classify":
        cmd = [args.python, "-m", "bench.classify_load", "--url", url, "--model", args.model, "--concurrency",
               str(args.concurrency), "--duration", str(seconds), "--warmup", "0", "--images-per-request",
               str(args.images_per_request), "--client-processes", str(args.client_processes), "--json", str(out)]
        if args.image:
            cmd += ["--image", str(args.image)]
        return cmd
    return [args.python, "-m", "bench.text_load", "--url", url, "--model", args.model, "--skip-forward",
            "--concurrency", str(args.concurrency), "--duration", str(seconds), "--warmup", "0",
            "--texts-per-request", str(args.images_per_request), "--json", str(out)]


def experimental_config(cuda: bool) -> Any:
    """Every thread's operators (the profiler records only the thread that starts it unless told otherwise: here
    that thread only sleeps), and on CUDA the synchronisations (device, stream, event) as events of their own."""
    from torch._C._profiler import _ExperimentalConfig

    try:
        return _ExperimentalConfig(profile_all_threads=True, enable_cuda_sync_events=cuda)
    except TypeError:  # an older torch without profile_all_threads: the table then says so (no operators)
        return _ExperimentalConfig(enable_cuda_sync_events=cuda)


def _device_us(e: Any) -> float:
    for name in ("self_device_time_total", "self_cuda_time_total"):
        if hasattr(e, name):
            return float(getattr(e, name))
    return 0.0


def summarise(prof: Any, window_s: float, top: int) -> dict[str, Any]:
    rows = []
    for e in prof.key_averages():
        rows.append({"name": e.key, "calls": int(e.count), "self_cpu_ms": round(e.self_cpu_time_total / 1000, 3),
                     "cpu_total_ms": round(e.cpu_time_total / 1000, 3),
                     "self_device_ms": round(_device_us(e) / 1000, 3)})
    cpu_ms = sum(r["self_cpu_ms"] for r in rows)
    dev_ms = sum(r["self_device_ms"] for r in rows)
    by_cpu = sorted(rows, key=lambda r: r["self_cpu_ms"], reverse=True)[:top]
    by_dev = sorted((r for r in rows if r["self_device_ms"] > 0), key=lambda r: r["self_device_ms"],
                    reverse=True)[:top]
    syncs = [r for r in rows if any(k in r["name"] for k in ("Synchronize", "synchronize", "cudaMemcpy", "aten::copy_",
                                                             "cudaStreamWaitEvent", "_local_scalar_dense", "aten::item",
                                                             "pin_memory"))]
    return {"window_s": round(window_s, 3), "torch_self_cpu_ms": round(cpu_ms, 1),
            "torch_cpu_cores_busy": round(cpu_ms / 1000 / window_s, 3),
            "device_busy_ms": round(dev_ms, 1), "device_busy_fraction": round(dev_ms / 1000 / window_s, 4),
            "operators": len(rows), "top_self_cpu": by_cpu, "top_self_device": by_dev,
            "synchronising_calls": sorted(syncs, key=lambda r: r["self_cpu_ms"], reverse=True)[:top]}


def table(rows: list[dict[str, Any]]) -> list[str]:
    out = ["| operator | calls | self CPU ms | self device ms |", "|---|---:|---:|---:|"]
    out += [f"| `{r['name'][:70]}` | {r['calls']} | {r['self_cpu_ms']:.1f} | {r['self_device_ms']:.1f} |"
            for r in rows]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--route", choices=("classify", "text"), default="classify")
    p.add_argument("--model", default=None, help="default: cifar10-resnet56 (classify), agnews-vdcnn9 (text)")
    p.add_argument("--device", default=None, help="CNN_DEVICE (default: inherited, else auto)")
    p.add_argument("--allow-untrained", action="store_true", help="CNN_ALLOW_UNTRAINED (torchvision models)")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--client-processes", type=int, default=1)
    p.add_argument("--images-per-request", type=int, default=1, help="images (or texts) per request")
    p.add_argument("--image", type=Path, default=None, help="image to send (default: the load generator's)")
    p.add_argument("--warmup", type=float, default=5.0, help="load before the profiler starts, seconds")
    p.add_argument("--duration", type=float, default=6.0, help="profiled window, seconds")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--trace", type=Path, default=None, help="also write the Chrome trace here (large)")
    p.add_argument("--startup-timeout", type=float, default=300.0)
    p.add_argument("--python", default=sys.executable)
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--markdown", type=Path, default=None)
    args = p.parse_args(argv)
    args.model = args.model or ("cifar10-resnet56" if args.route == "classify" else "agnews-vdcnn9")

    import torch
    from torch.profiler import ProfilerActivity, profile

    settings = _settings(args)
    server = InProcessServer(settings, args.model)
    server.start(args.startup_timeout)
    device = next((m.get("device") for m in httpx.get(f"{server.url}/models", trust_env=False).json()["models"]
                   if m["name"] == args.model), None)
    activities = [ProfilerActivity.CPU]
    cuda = torch.cuda.is_available() and str(device or "").startswith("cuda")
    if cuda:
        activities.append(ProfilerActivity.CUDA)
    for path in (args.json, args.markdown, args.trace):
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
    # The profiler's first start in a process initialises its back end (seconds on a 2-core machine without a GPU,
    # timed by hand): done once here, before the load, so the window opens when it is asked to and the load
    # generator (which runs for a fixed time) has not ended by then.
    with profile(activities=activities, experimental_config=experimental_config(cuda)):
        pass
    with tempfile.TemporaryDirectory() as tmp:
        load_json = Path(tmp) / "load.json"
        load = subprocess.Popen(load_command(args, server.url, load_json), cwd=PROJECT_ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            wait_for_answers(server.counter, args.startup_timeout, load)
            time.sleep(args.warmup)
            if load.poll() is not None:
                raise stopped_early(load)
            with profile(activities=activities, experimental_config=experimental_config(cuda)) as prof:
                before = server.counter.answered
                t0 = time.perf_counter()
                time.sleep(args.duration)
                window = time.perf_counter() - t0
                answered = server.counter.answered - before
            if answered == 0:
                raise RuntimeError(f"no request was answered during the {window:.1f} s profiled window")
            _, err = load.communicate(timeout=args.duration + args.warmup + 120)
            if load.returncode != 0:
                raise RuntimeError(f"load generator failed: {err.decode()[-2000:]}")
            load_result = json.loads(load_json.read_text())
        finally:
            if load.poll() is None:
                load.kill()
            server.stop()
    summary = summarise(prof, window, args.top)
    summary["answered_in_window"] = answered
    if args.trace:
        prof.export_chrome_trace(str(args.trace))
    results = load_result.get("results") or load_result.get("load") or []
    payload = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               "machine": machine_description(str(device) if device else None), "device": device,
               "profiler_activities": [a.name for a in activities], "load": results, "profile": summary}
    args.json.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    rate = next((r.get("requests_per_s") for r in results), None)
    lines = [f"## profile: /{args.route} {args.model} on {device}, concurrency {args.concurrency}", "",
             f"- load over the whole run: {rate if rate is None else round(rate, 1)} req/s; profiled window "
             f"{summary['window_s']} s ({answered} requests answered in it) after {args.warmup:g} s of load",
             f"- torch operators' own CPU time: {summary['torch_self_cpu_ms']} ms = "
             f"{summary['torch_cpu_cores_busy']} cores busy on average",
             f"- device kernels: {summary['device_busy_ms']} ms = {100 * summary['device_busy_fraction']:.1f}% of "
             f"the window", "", "### top operators by self CPU time", "", *table(summary["top_self_cpu"])]
    if summary["top_self_device"]:
        lines += ["", "### top operators by device time", "", *table(summary["top_self_device"])]
    if summary["synchronising_calls"]:
        lines += ["", "### copies and synchronisations", "", *table(summary["synchronising_calls"])]
    if args.markdown:
        args.markdown.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
