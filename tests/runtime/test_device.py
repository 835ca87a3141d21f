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


def test_torch_threads_auto_is_one_on_cuda_and_the_default_on_cpu() -> None:
    """CNN_TORCH_THREADS=0: torch's default on the CPU; one intra-op thread on CUDA (many request threads run the
    small preprocessing ops at once there); an explicit number always wins. Only sets flags: runs without a GPU."""
    from app.runtime.device import CUDA_AUTO_THREADS, configure_torch

    before, bench = torch.get_num_threads(), torch.backends.cudnn.benchmark
    try:
        configure_torch(torch.device("cpu"), 0)
        assert torch.get_num_threads() == before
        configure_torch(torch.device("cuda"), 0)
        assert torch.get_num_threads() == CUDA_AUTO_THREADS == 1
        configure_torch(torch.device("cuda"), 2)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
        torch.backends.cudnn.benchmark = bench
