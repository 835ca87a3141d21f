"""Device selection and the inference fast paths (eval, inference mode, autocast, channels_last)."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator

import torch
from torch import nn

log = logging.getLogger(__name__)


def select_device(setting: str = "auto") -> torch.device:
    """CUDA when present (or asked for), else CPU."""
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(setting)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {setting!r} requested but CUDA is not available")
    return dev


CUDA_AUTO_THREADS = 1


def configure_torch(device: torch.device, threads: int = 0) -> None:
    """Process-wide torch settings for serving. `threads` 0 (auto): torch's default on the CPU, where the forwards
    need every core; CUDA_AUTO_THREADS on CUDA, where the CPU's torch work is small per-request preprocessing run by
    many request threads at once, and torch's default (one intra-op thread per core in each of them) would
    oversubscribe the cores."""
    if threads > 0:
        torch.set_num_threads(threads)
    elif device.type == "cuda":
        torch.set_num_threads(CUDA_AUTO_THREADS)
        log.info("torch intra-op threads: %d (device %s; CNN_TORCH_THREADS sets another number)",
                 CUDA_AUTO_THREADS, device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def prepare_model(model: nn.Module, device: torch.device, *, compile_model: bool = False) -> nn.Module:
    """Eval mode on the device, 4-D weights channels_last (faster convolutions on CUDA and on CPU: 1.16-1.21x
    for resnet18 and the CIFAR ResNets at batch 16 here, docs/bench/forward-layout-ab.json), optional
    torch.compile on CUDA."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    model = model.to(device).to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    if device.type == "cuda" and compile_model:
        model = torch.compile(model)  # type: ignore[assignment]
    return model


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """bf16 where the GPU supports it, fp16 on older GPUs, none on CPU (fp32 there is faster and exact)."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


@contextlib.contextmanager
def inference_context(device: torch.device) -> Iterator[None]:
    """torch.inference_mode plus autocast on CUDA."""
    dtype = autocast_dtype(device)
    with torch.inference_mode():
        if dtype is None:
            yield
        else:
            with torch.autocast(device_type="cuda", dtype=dtype):
                yield


def stack_inputs(items: list[torch.Tensor]) -> torch.Tensor:
    """One batch from per-request inputs. They stay on the CPU until the batch is formed (one pinned,
    asynchronous copy per batch in to_device_batch instead of a synchronous copy per image in the request
    threads, which on CUDA would wait for the forward running on the device); inputs already on the device (decoded
    there) take the CPU ones to it when a batch mixes both."""
    devices = {t.device for t in items}
    if len(devices) > 1:
        target = next(d for d in devices if d.type != "cpu")
        items = [t.to(target) for t in items]
    return torch.stack(items)


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A batch on the device: from the CPU to a GPU through pinned memory, without blocking the host (the caching
    host allocator reuses the pinned blocks); already there (decoded on the GPU) or on the CPU device, as it is."""
    if device.type == "cuda" and x.device.type == "cpu":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


def to_device_batch(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Move a 4-D batch to the device in channels_last, the models' memory format (see prepare_model)."""
    return to_device(x, device).contiguous(memory_format=torch.channels_last)


_streams = threading.local()


@contextlib.contextmanager
def job_stream(device: torch.device) -> Iterator[None]:
    """Run the block on this thread's own CUDA stream (made once per thread and device), so long jobs of several
    threads, such as style workers', overlap on one GPU instead of queueing on the shared default stream; a no-op
    off CUDA. What the block returns to the host (`.cpu()`, `.item()`) waits for its own stream only."""
    if device.type != "cuda":
        yield
        return
    key = str(device)
    streams: dict[str, torch.cuda.Stream] = getattr(_streams, "by_device", None) or {}
    _streams.by_device = streams
    if key not in streams:
        streams[key] = torch.cuda.Stream(device)
    with torch.cuda.stream(streams[key]):
        yield
