"""CUDA graphs over the batch shapes a model meets (opt-in: CNN_CUDA_GRAPHS).

An eager forward of a ResNet launches hundreds of kernels, one Python call each; at small batches the GPU waits for
the host. A CUDA graph records the launches of one forward once and replays them with one call. It needs fixed
shapes, which the batcher's power-of-two buckets provide (a few batch shapes per model, all met at the start-up
warm-up), and fixed memory: each recorded shape keeps a static input buffer (a batch is copied into it), its
output (cloned for the caller) and the activations it recorded with, in one memory pool per model.

`GraphedForward` wraps a model's forward: the first call of a new shape runs eagerly (cudnn.benchmark tunes its
kernels there, outside any recording), then records that shape; later calls of the shape replay it. Shapes past
`max_shapes`, inputs off CUDA and shapes whose recording failed run eagerly. Replays of one model are serialised
(one set of static buffers) and run on the caller's current stream; a replay on another stream than the last one
first waits for it on the device. Autocast's weight cache is off while
recording (cast weights would otherwise be cached tensors freed after the recording that the graph still reads).

The recording itself is a backend (`TorchCudaGraphs` on CUDA), so the bookkeeping is tested on the CPU with a
stand-in; the real recording is tested on a GPU (tests/test_cuda.py).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import nn

log = logging.getLogger(__name__)

Signature = tuple[tuple[int, ...], tuple[int, ...], torch.dtype, torch.device]


def signature(x: torch.Tensor) -> Signature:
    """What a recording depends on: shape, strides (memory format), dtype and device."""
    return tuple(x.shape), tuple(x.stride()), x.dtype, x.device


class Replay(Protocol):
    def __call__(self) -> None: ...


class GraphBackend(Protocol):
    def supports(self, x: torch.Tensor) -> bool:
        """Whether inputs like x can be recorded."""
        ...

    def record(self, fn: Callable[[torch.Tensor], torch.Tensor], static_in: torch.Tensor,
               ) -> tuple[Replay, torch.Tensor]:
        """Record fn(static_in); return the replay and the output tensor every replay rewrites."""
        ...


class TorchCudaGraphs:
    """torch.cuda.CUDAGraph recordings sharing one memory pool (replays are serial, and every output is cloned
    right after its replay, so one shape's activations may reuse another's)."""

    def __init__(self) -> None:
        self.pool: Any = None

    def supports(self, x: torch.Tensor) -> bool:
        return x.is_cuda

    def record(self, fn: Callable[[torch.Tensor], torch.Tensor], static_in: torch.Tensor,
               ) -> tuple[Replay, torch.Tensor]:
        device = static_in.device
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize(device)
        dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None
        # thread_local: only this thread's unsafe calls are refused while recording; other threads serving other
        # models (a run-time load records while requests run) go on allocating and synchronising as usual
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            if dtype is None:
                static_out = fn(static_in)
            else:
                with torch.autocast("cuda", dtype=dtype, cache_enabled=False):
                    static_out = fn(static_in)
        torch.cuda.synchronize(device)
        return graph.replay, static_out


class GraphedForward(nn.Module):
    """A model whose forward replays a CUDA graph per input signature (see the module's docstring)."""

    def __init__(self, model: nn.Module, *, max_shapes: int = 16, backend: GraphBackend | None = None) -> None:
        super().__init__()
        self.model = model
        self.max_shapes = max_shapes
        self.backend: GraphBackend = backend if backend is not None else TorchCudaGraphs()
        self.recordings: dict[Signature, tuple[torch.Tensor, Replay, torch.Tensor]] = {}
        self.eager_only: set[Signature] = set()
        self._lock = threading.Lock()
        self._last_replay: Any = None  # CUDA event after the last replay's clone (ordering across streams)
        self.replays = 0

    def _eager(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.model(x)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.backend.supports(x):
            return self._eager(x)
        sig = signature(x)
        with self._lock:
            rec = self.recordings.get(sig)
            if rec is not None:
                static_in, replay, static_out = rec
                if x.is_cuda and self._last_replay is not None:
                    # a caller on another stream: its copy into the static input must wait for the last replay
                    torch.cuda.current_stream(x.device).wait_event(self._last_replay)
                static_in.copy_(x)
                replay()
                self.replays += 1
                out = static_out.clone()
                if x.is_cuda:
                    self._last_replay = torch.cuda.Event()
                    self._last_replay.record()
                return out
            out = self._eager(x)  # a new shape: tuned eagerly first, recorded after
            if sig in self.eager_only or len(self.recordings) >= self.max_shapes:
                return out
            static_in = x.clone()
            try:
                replay, static_out = self.backend.record(self._eager, static_in)
            except Exception as exc:
                self.eager_only.add(sig)
                log.warning("CUDA graph of input %s could not be recorded (%s: %s); that shape runs eagerly",
                            tuple(x.shape), type(exc).__name__, exc)
                return out
            self.recordings[sig] = (static_in, replay, static_out)
            log.info("CUDA graph recorded for input %s (%d shapes)", tuple(x.shape), len(self.recordings))
            return out
