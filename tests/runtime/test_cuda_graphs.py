"""GraphedForward's bookkeeping (CNN_CUDA_GRAPHS), with a stand-in for the CUDA graph recorder.

The stand-in's replay recomputes the recorded function from the static input into the static output, as a CUDA
graph replays its kernels over the same buffers, and sleeps inside the replay so overlapping replays would mix
their buffers. The real recorder runs in tests/test_cuda.py."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import pytest
import torch
from torch import nn

from app.runtime.cuda_graphs import GraphedForward, TorchCudaGraphs


class StandIn:
    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.recorded: list[tuple[int, ...]] = []

    def supports(self, x: torch.Tensor) -> bool:
        return True

    def record(self, fn: Callable[[torch.Tensor], torch.Tensor], static_in: torch.Tensor):  # type: ignore[no-untyped-def]
        if self.fail:
            raise RuntimeError("operation not permitted when stream is capturing")
        self.recorded.append(tuple(static_in.shape))
        static_out = fn(static_in)

        def replay() -> None:
            time.sleep(0.002)
            static_out.copy_(fn(static_in))

        return replay, static_out


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()


def test_a_shape_runs_eagerly_once_then_replays_its_recording_with_new_data() -> None:
    model, backend = net(), StandIn()
    g = GraphedForward(model, backend=backend)
    x1, x2, x3 = (torch.randn(4, 3, 8, 8) for _ in range(3))
    with torch.inference_mode():
        y1 = g(x1)
        assert backend.recorded == [(4, 3, 8, 8)] and g.replays == 0
        torch.testing.assert_close(y1, model(x1))
        y2 = g(x2)
        y3 = g(x3)
        assert g.replays == 2 and backend.recorded == [(4, 3, 8, 8)]  # recorded once
        torch.testing.assert_close(y2, model(x2))  # the new batch was copied into the static input
        torch.testing.assert_close(y3, model(x3))
        # each answer is the caller's own tensor, not the static output the next replay rewrites
        torch.testing.assert_close(y2, model(x2))
        assert y2.data_ptr() != y3.data_ptr()


def test_each_shape_and_memory_format_has_its_own_recording_up_to_the_limit() -> None:
    model, backend = net(), StandIn()
    g = GraphedForward(model, backend=backend, max_shapes=3)
    with torch.inference_mode():
        for n in (1, 2, 4, 8):
            g(torch.randn(n, 3, 8, 8))
        assert backend.recorded == [(1, 3, 8, 8), (2, 3, 8, 8), (4, 3, 8, 8)]  # 8 is past the limit
        x = torch.randn(8, 3, 8, 8)
        torch.testing.assert_close(g(x), model(x))  # eager, still right
        assert g.replays == 0 and len(g.recordings) == 3
    backend2 = StandIn()
    g2 = GraphedForward(model, backend=backend2)
    with torch.inference_mode():
        g2(torch.randn(2, 3, 8, 8))
        g2(torch.randn(2, 3, 8, 8).to(memory_format=torch.channels_last))
    assert len(g2.recordings) == 2  # same shape, other strides: another recording


def test_a_shape_that_cannot_be_recorded_runs_eagerly_without_retrying(caplog: pytest.LogCaptureFixture) -> None:
    model, backend = net(), StandIn(fail=True)
    g = GraphedForward(model, backend=backend)
    x = torch.randn(2, 3, 8, 8)
    with caplog.at_level(logging.WARNING), torch.inference_mode():
        torch.testing.assert_close(g(x), model(x))
        backend.fail = False
        torch.testing.assert_close(g(x), model(x))
    assert not backend.recorded and g.replays == 0 and len(g.eager_only) == 1
    assert "could not be recorded" in caplog.text


def test_concurrent_callers_get_their_own_answers() -> None:
    """One set of static buffers per shape: replays are serialised, or one caller's batch would be answered for
    another (the stand-in's replay sleeps between reading the input and writing the output)."""
    model, backend = net(), StandIn()
    g = GraphedForward(model, backend=backend)
    with torch.inference_mode():
        g(torch.randn(2, 3, 8, 8))
    inputs = [torch.randn(2, 3, 8, 8) for _ in range(12)]
    got: dict[int, torch.Tensor] = {}

    def call(i: int) -> None:
        with torch.inference_mode():
            got[i] = g(inputs[i])

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with torch.inference_mode():
        for i, x in enumerate(inputs):
            torch.testing.assert_close(got[i], model(x))
    assert g.replays == len(inputs)


def test_the_cuda_recorder_leaves_cpu_inputs_to_the_eager_model() -> None:
    model = net()
    g = GraphedForward(model)  # TorchCudaGraphs
    assert isinstance(g.backend, TorchCudaGraphs)
    x = torch.randn(2, 3, 8, 8)
    with torch.inference_mode():
        torch.testing.assert_close(g(x), model(x))
        g(x)
    assert not g.recordings and g.replays == 0
