"""The inference fast path on CPU: channels_last weights and batches, same answers as plain NCHW."""

from __future__ import annotations

import copy

import torch

from app.runtime.device import inference_context, prepare_model, to_device_batch
from models.cifar_resnet import cifar_resnet


def test_cpu_models_and_batches_are_channels_last_with_unchanged_outputs() -> None:
    torch.manual_seed(0)
    plain = cifar_resnet(8).eval()
    fast = prepare_model(copy.deepcopy(plain), torch.device("cpu"))
    conv = next(m for m in fast.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert not conv.weight.requires_grad and not fast.training
    x = torch.randn(3, 3, 32, 32)
    xb = to_device_batch(x, torch.device("cpu"))
    assert xb.is_contiguous(memory_format=torch.channels_last) and torch.equal(xb, x)
    with inference_context(torch.device("cpu")):
        assert torch.allclose(fast(xb), plain(x), atol=1e-5)


def test_one_dimensional_models_keep_their_layout() -> None:
    m = prepare_model(torch.nn.Conv1d(4, 8, 3), torch.device("cpu"))
    assert m.weight.is_contiguous()
    with inference_context(torch.device("cpu")):
        assert m(torch.randn(2, 4, 16)).shape == (2, 8, 14)
