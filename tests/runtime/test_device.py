"""The inference fast path on CPU: channels_last weights and batches, same answers as plain NCHW."""

from __future__ import annotations

import copy

import pytest
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


def test_inputs_stay_on_their_device_until_the_batch_is_stacked() -> None:
    """A batch of CPU inputs is stacked on the CPU (to_device_batch then makes one copy); a batch that mixes
    device-decoded inputs with CPU ones is stacked on the device. The meta device stands in for CUDA here."""
    from app.runtime.device import stack_inputs

    cpu = [torch.full((3, 4, 4), float(i)) for i in range(3)]
    x = stack_inputs(cpu)
    assert x.device.type == "cpu" and x.shape == (3, 3, 4, 4) and x[2].eq(2).all()
    mixed = stack_inputs([cpu[0], torch.zeros(3, 4, 4, device="meta"), cpu[1]])
    assert mixed.device.type == "meta" and mixed.shape == (3, 3, 4, 4)


def test_the_classifier_copies_the_batch_once_and_mirrors_it_after(monkeypatch: pytest.MonkeyPatch) -> None:
    """With flip averaging, the batch goes to the device once and the mirror images are made there (the CPU
    path gives the same probabilities as mirroring before the copy)."""
    from app.runtime import registry as reg
    from models.preprocess import ImageSpec
    from models.weights import WeightsRef

    net = cifar_resnet(8, 3).eval()
    spec = reg.ModelSpec(name="t", task="image-classification", family="cifar-resnet", arch={"depth": 8},
                         labels=["a", "b", "c"], preprocessing=ImageSpec(32, 32, (0.5,) * 3, (0.25,) * 3),
                         weights=WeightsRef("t.pt"), source="test", info={"test_time_augmentation": "hflip"})
    loaded = reg.LoadedClassifier(spec, prepare_model(net, torch.device("cpu")), torch.device("cpu"), "trained", "t")
    copies: list[int] = []
    real = reg.to_device_batch
    monkeypatch.setattr(reg, "to_device_batch", lambda x, d: copies.append(len(x)) or real(x, d))
    batch = [torch.randn(3, 32, 32) for _ in range(4)]
    probs = torch.stack(loaded.forward(batch))
    assert copies == [4]  # the 4 inputs, not 8 with their mirrors
    with torch.no_grad():
        x = torch.stack(batch)
        expected = (net(x).softmax(-1) + net(x.flip(-1)).softmax(-1)) / 2
    torch.testing.assert_close(probs, expected, atol=1e-5, rtol=1e-4)


def test_job_stream_is_a_no_op_off_cuda() -> None:
    from app.runtime.device import job_stream

    with job_stream(torch.device("cpu")):
        assert torch.ones(2).sum().item() == 2.0
