"""Device-side JPEG decode and preprocessing (CNN_GPU_DECODE): which uploads take it (header checks only, the same
limits and errors as the CPU path), and that it makes the model input the CPU path makes, within a few grey levels
of resampling. Run here on the CPU device (torchvision decodes JPEG lists there too); tests/test_cuda.py compares
nvJPEG on a GPU."""

from __future__ import annotations

import io
import time
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from app.errors import ProblemError
from app.main import create_app
from app.runtime.gpu_decode import decode_and_preprocess, takes_device_path
from app.runtime.images import decode_image, plain_jpeg_size
from app.settings import Settings
from models.preprocess import ImageSpec, image_to_tensor
from tests.conftest import wait_ready

IMAGENET = ImageSpec(resize=256, crop=224, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
CIFAR = ImageSpec(resize=32, crop=32, mean=(0.49, 0.48, 0.45), std=(0.25, 0.24, 0.26))
UPSCALE = ImageSpec(resize=400, crop=384, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def photo(w: int = 300, h: int = 200, mode: str = "RGB", seed: int = 0, exif_orientation: int | None = None) -> bytes:
    """A photo-like JPEG: smooth gradients, edges and some noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    rgb = np.stack([128 + 100 * np.sin(xx / 23.0), 128 + 90 * np.cos(yy / 17.0), (xx + yy) % 255], axis=-1)
    rgb[h // 3:h // 2, w // 4:w // 2] = (250, 30, 40)
    rgb += rng.normal(0, 8, rgb.shape)
    img = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB").convert(mode)
    buf = io.BytesIO()
    kw: dict[str, Any] = {"quality": 90}
    if exif_orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        kw["exif"] = exif
    img.save(buf, format="JPEG", **kw)
    return buf.getvalue()


def png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (1, 2, 3)).save(buf, format="PNG")
    return buf.getvalue()


def test_which_uploads_take_the_device_path() -> None:
    assert plain_jpeg_size(photo()) == (300, 200)
    assert plain_jpeg_size(photo(mode="L")) == (300, 200)
    assert plain_jpeg_size(photo(mode="CMYK")) is None  # nvJPEG's RGB output would differ from PIL's conversion
    assert plain_jpeg_size(photo(exif_orientation=6)) is None  # the CPU path rotates it upright
    assert plain_jpeg_size(photo(exif_orientation=1)) == (300, 200)
    assert plain_jpeg_size(png()) is None
    with pytest.raises(ProblemError) as e:  # the same 413 the CPU path gives, from the header alone
        plain_jpeg_size(photo(), max_pixels=1000)
    assert e.value.status == 413
    with pytest.raises(ProblemError) as e:  # a header that is not an image, with an end marker: the 415 here
        plain_jpeg_size(b"\xff\xd8\xff" + b"junk" * 10 + b"\xff\xd9")
    assert e.value.status == 415
    assert plain_jpeg_size(b"\xff\xd8\xff" + b"junk" * 10) is None  # no end marker: the CPU path decides (415)
    assert takes_device_path(300, 200, IMAGENET) and not takes_device_path(5000, 2, CIFAR)
    assert takes_device_path(4096, 4096, IMAGENET) and not takes_device_path(4097, 4096, IMAGENET)


@pytest.mark.parametrize("spec", [IMAGENET, CIFAR, UPSCALE], ids=["imagenet-down", "cifar-down", "up"])
def test_device_preprocessing_makes_the_cpu_input(spec: ImageSpec) -> None:
    datas = [photo(seed=s, w=300 + 17 * s, h=200 + 9 * s) for s in range(3)] + [photo(mode="L", seed=9)]
    got = decode_and_preprocess(datas, spec, torch.device("cpu"))
    for data, g in zip(datas, got, strict=True):
        want = image_to_tensor(decode_image(data), spec)
        assert g.shape == want.shape == (3, spec.crop, spec.crop)
        # in grey levels: the normalised difference times std times 255
        levels = ((g - want).abs() * torch.tensor(spec.std).view(3, 1, 1) * 255)
        assert float(levels.max()) <= 3.01 and float(levels.mean()) <= 0.5, (float(levels.max()),
                                                                               float(levels.mean()))


def _classify(settings: Settings, files: list[Any]) -> tuple[Any, Any]:
    with TestClient(create_app(settings)) as client:
        wait_ready(client)
        r = client.post("/classify", files=files, data={"top_k": "10"})
        return r, client.app_state["app_state"].services["classification"]


def test_served_answers_match_the_cpu_path(base_settings: Settings) -> None:
    files = [("image", ("a.jpg", photo(seed=1), "image/jpeg")), ("image", ("b.png", png(), "image/png")),
             ("image", ("c.jpg", photo(seed=2, exif_orientation=3), "image/jpeg")),
             ("image", ("d.jpg", photo(seed=3, mode="L"), "image/jpeg"))]
    off, svc_off = _classify(base_settings.model_copy(update={"gpu_decode": "off"}), files)
    on, svc_on = _classify(base_settings.model_copy(update={"gpu_decode": "on"}), files)
    assert off.status_code == on.status_code == 200, on.text
    assert svc_off.device_decodes == 0 and svc_on.device_decodes == 2  # a.jpg and d.jpg; b and c on the CPU
    for a, b in zip(off.json()["results"], on.json()["results"], strict=True):
        assert a["filename"] == b["filename"]  # upload order kept
        pa = {p["label"]: p["probability"] for p in a["top_k"]}
        pb = {p["label"]: p["probability"] for p in b["top_k"]}
        assert max(abs(pa[k] - pb[k]) for k in pa) < 0.02
    _, svc_auto = _classify(base_settings, files[:1])
    assert svc_auto.device_decodes == 0  # auto: only on CUDA


def test_a_cut_off_jpeg_gets_the_cpu_paths_answer(base_settings: Settings) -> None:
    """A JPEG without its end-of-image marker (cut off in transit) is left to the CPU path, whose answer it gets (PIL
    refuses truncated data: a 400), since decoders differ on such data (libjpeg-based ones fill the rest in grey)."""
    cut = photo(seed=4)
    cut = cut[:len(cut) // 2]
    assert plain_jpeg_size(cut) is None
    files = [("image", ("ok.jpg", photo(seed=5), "image/jpeg")), ("image", ("cut.jpg", cut, "image/jpeg"))]
    off, _ = _classify(base_settings.model_copy(update={"gpu_decode": "off"}), files)
    on, _ = _classify(base_settings.model_copy(update={"gpu_decode": "on"}), files)
    assert on.status_code == off.status_code == 400 and on.json()["detail"] == off.json()["detail"]


def test_when_the_device_decoder_fails_the_cpu_path_answers(base_settings: Settings,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """nvJPEG refusing a batch (a JPEG feature it lacks, a decoder error): those images are decoded on the CPU and
    the answers are the CPU path's."""
    import app.services.classification as classification

    def refuse(*args: Any) -> Any:
        raise RuntimeError("nvjpeg: unsupported JPEG")

    files = [("image", (f"{i}.jpg", photo(seed=10 + i), "image/jpeg")) for i in range(3)]
    off, _ = _classify(base_settings.model_copy(update={"gpu_decode": "off"}), files)
    monkeypatch.setattr(classification, "decode_and_preprocess", refuse)
    on, svc = _classify(base_settings.model_copy(update={"gpu_decode": "on"}), files)
    assert on.status_code == 200 and on.json()["results"] == off.json()["results"]
    assert svc.device_decode_fallbacks == 3 and svc.device_decodes == 0


def test_jpegs_of_concurrent_requests_share_one_decoder_call(base_settings: Settings,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Requests of one JPEG each, arriving while the decoder is busy, are decoded together in its next call (one
    call per batch, not per request); each still gets its own answer, equal to the CPU path's."""
    import threading

    import app.services.classification as classification

    calls: list[int] = []
    first_started, release = threading.Event(), threading.Event()
    real = classification.decode_and_preprocess

    def gated(datas: Any, spec: Any, device: Any) -> Any:
        calls.append(len(datas))
        if len(calls) == 1:
            first_started.set()
            assert release.wait(30)
        return real(datas, spec, device)

    monkeypatch.setattr(classification, "decode_and_preprocess", gated)
    jpegs = [photo(seed=20 + i) for i in range(5)]
    with TestClient(create_app(base_settings.model_copy(update={"gpu_decode": "on"}))) as client:
        wait_ready(client)
        results: dict[int, Any] = {}

        def post(i: int) -> None:
            results[i] = client.post("/classify", files={"image": (f"{i}.jpg", jpegs[i], "image/jpeg")})

        first = threading.Thread(target=post, args=(0,))
        first.start()
        assert first_started.wait(30)  # the decoder is busy with request 0
        others = [threading.Thread(target=post, args=(i,)) for i in range(1, 5)]
        for t in others:
            t.start()
        svc = client.app_state["app_state"].services["classification"]
        decoder = next(iter(svc._decoders.values()))
        deadline = time.monotonic() + 30
        while decoder.queue_depth < 4:  # requests 1-4 wait in the decode queue
            assert time.monotonic() < deadline
            time.sleep(0.01)
        release.set()
        for t in [first, *others]:
            t.join(60)
    assert calls == [1, 4]
    files = [("image", (f"{i}.jpg", j, "image/jpeg")) for i, j in enumerate(jpegs)]
    off, _ = _classify(base_settings.model_copy(update={"gpu_decode": "off"}), files)
    for i in range(5):
        assert results[i].status_code == 200
        got = {p["label"]: p["probability"] for p in results[i].json()["results"][0]["top_k"]}
        want = {p["label"]: p["probability"] for p in off.json()["results"][i]["top_k"]}
        assert max(abs(got[k] - want[k]) for k in want) < 0.02


def test_one_jpeg_the_decoder_refuses_sends_only_itself_to_the_cpu(base_settings: Settings,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import app.services.classification as classification

    bad = photo(seed=31)
    real = classification.decode_and_preprocess

    def picky(datas: Any, spec: Any, device: Any) -> Any:
        if any(d == bad for d in datas):
            raise RuntimeError("nvjpeg: unsupported JPEG")
        return real(datas, spec, device)

    monkeypatch.setattr(classification, "decode_and_preprocess", picky)
    files = [("image", ("a.jpg", photo(seed=30), "image/jpeg")), ("image", ("bad.jpg", bad, "image/jpeg")),
             ("image", ("c.jpg", photo(seed=32), "image/jpeg"))]
    off, _ = _classify(base_settings.model_copy(update={"gpu_decode": "off"}), files)
    on, svc = _classify(base_settings.model_copy(update={"gpu_decode": "on"}), files)
    assert on.status_code == 200 and svc.device_decodes == 2 and svc.device_decode_fallbacks == 1
    assert on.json()["results"][1] == off.json()["results"][1]  # the refused one: the CPU path's answer exactly
