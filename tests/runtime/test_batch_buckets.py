"""Batch buckets (CNN_BATCH_BUCKETS): each batch is padded to the next power of two, at most the model's max batch
size, so a GPU with cudnn.benchmark sees log2(max) + 1 shapes instead of one per batch size; the padding rows
never reach an answer. On by default only for models on CUDA; tested here on the CPU with the setting forced on."""

from __future__ import annotations

import time
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

from app.main import create_app
from app.services.pool import PaddedForward, bucket_size
from app.settings import Settings
from tests.conftest import image_bytes, wait_ready


@pytest.mark.parametrize(("n", "max_batch", "size"), [
    (1, 16, 1), (2, 16, 2), (3, 16, 4), (5, 16, 8), (8, 16, 8), (9, 16, 16), (16, 16, 16),
    (9, 12, 12), (12, 12, 12), (5, 6, 6), (1, 1, 1), (33, 64, 64), (20, 16, 20)])
def test_bucket_sizes(n: int, max_batch: int, size: int) -> None:
    assert bucket_size(n, max_batch) == size


def test_padding_rows_are_computed_and_dropped() -> None:
    seen: list[list[int]] = []

    def forward(batch: list[int]) -> list[int]:
        seen.append(list(batch))
        return [10 * x for x in batch]

    limit = [16]
    padded = PaddedForward(forward, lambda: limit[0])
    assert padded([1, 2, 3]) == [10, 20, 30]
    assert seen[-1] == [1, 2, 3, 3]  # padded with the last input
    assert padded([1, 2, 3, 4, 5]) == [10, 20, 30, 40, 50] and len(seen[-1]) == 8
    limit[0] = 6  # the batcher's max batch size changed at run time
    assert padded([1, 2, 3, 4, 5]) == [10, 20, 30, 40, 50] and len(seen[-1]) == 6
    assert padded([7, 8]) == [70, 80] and seen[-1] == [7, 8]
    assert padded.padded_rows == 1 + 3 + 1


def _classify(settings: Settings, n: int) -> tuple[list[Any], Any]:
    with TestClient(create_app(settings)) as client:
        wait_ready(client)
        files = [("image", (f"{i}.png", image_bytes(color=(40 * i, 90, 200 - 30 * i)), "image/png"))
                 for i in range(n)]
        r = client.post("/classify", files=files, data={"top_k": "10"})
        assert r.status_code == 200, r.text
        batcher = client.app_state["app_state"].pools[0].batchers["tiny-cifar"]
        return r.json()["results"], batcher._fn


def test_served_answers_are_the_same_with_buckets_on(base_settings: Settings) -> None:
    """Five images in one request make one batch of 5, padded to 8 with buckets on: the five answers are those of
    the unpadded batch (eval mode: rows do not interact)."""
    off, fn_off = _classify(base_settings.model_copy(update={"batch_buckets": "off"}), 5)
    on, fn_on = _classify(base_settings.model_copy(update={"batch_buckets": "on"}), 5)
    assert not isinstance(fn_off, PaddedForward)  # auto and off: no padding on the CPU
    assert isinstance(fn_on, PaddedForward) and fn_on.padded_rows == 3
    for a, b in zip(off, on, strict=True):
        pa = torch.tensor([p["probability"] for p in a["top_k"]])
        pb = torch.tensor([p["probability"] for p in b["top_k"]])
        assert [p["label"] for p in a["top_k"]] == [p["label"] for p in b["top_k"]]
        assert torch.allclose(pa, pb, atol=1e-5)
    _, fn_auto = _classify(base_settings, 1)
    assert not isinstance(fn_auto, PaddedForward)


@pytest.mark.parametrize(("max_batch", "sizes"), [(16, [1, 2, 4, 8, 16]), (12, [1, 2, 4, 8, 12]), (1, [1]),
                                                  (64, [1, 2, 4, 8, 16, 32, 64])])
def test_the_bucket_sizes_a_batcher_makes(max_batch: int, sizes: list[int]) -> None:
    from app.services.pool import bucket_sizes

    assert bucket_sizes(max_batch) == sizes
    assert bucket_sizes(max_batch) == sorted({bucket_size(n, max_batch) for n in range(1, max_batch + 1)})


@pytest.mark.parametrize("warmup", [True, False])
def test_every_bucket_shape_is_warmed_at_start_up(base_settings: Settings, monkeypatch: pytest.MonkeyPatch,
                                                  warmup: bool) -> None:
    """With buckets on (as on CUDA) and warm-up on, start-up runs one forward per bucket size, so cudnn.benchmark
    tunes each shape before a request; a model loaded at run time too; with warm-up off, none."""
    from app.runtime.registry import LoadedClassifier

    sizes: list[int] = []
    real = LoadedClassifier.forward

    def counting(self: LoadedClassifier, batch: list[Any]) -> list[Any]:
        sizes.append(len(batch))
        return real(self, batch)

    monkeypatch.setattr(LoadedClassifier, "forward", counting)
    settings = base_settings.model_copy(update={"batch_buckets": "on", "warmup": warmup, "batch_max_size": 8,
                                                "allow_untrained": True})
    with TestClient(create_app(settings)) as client:
        wait_ready(client)
        at_start = list(sizes)
        assert client.post("/models/resnet18/load").status_code == 202
        while client.get("/models/resnet18").json()["status"] == "loading":
            time.sleep(0.01)
        after_load = sizes[len(at_start):]
    if warmup:
        assert at_start == [1, 1, 2, 4, 8]  # the registry's one-image warm-up, then each bucket
        assert after_load == [1, 1, 2, 4, 8]
    else:
        assert at_start == [] and after_load == []
