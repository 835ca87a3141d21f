"""JPEG decode and the classifiers' preprocessing on the model's device (CNN_GPU_DECODE).

On a GPU machine the CPU's JPEG decode and resize cap `/classify` long before the GPU does (a few hundred 224-px
images per second per core). For classifiers on CUDA, JPEGs that `images.plain_jpeg_size` accepts (colour or grey,
upright, within every limit, checked from the header on the CPU) are decoded by nvJPEG in batched
`torchvision.io.decode_jpeg` calls (the classification service's decode batcher gathers the JPEGs of concurrent
requests into one call) and resized, cropped and normalised there, as `models.preprocess`
does on the CPU: the short side resized with the truncation rule of `resize_crop` (antialiased like PIL), rounded
to 8 bits as PIL stores them, then the centred crop. Everything else (PNG, CMYK, EXIF-rotated, the thin strips that
`resize_crop` treats specially) and any JPEG nvJPEG refuses takes the CPU path, so answers and errors stay those of
the CPU path; the two agree within a few grey levels of resampling (tests/runtime/test_gpu_decode.py; on CUDA,
tests/test_cuda.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from models.preprocess import ImageSpec, is_strip, resize_plan

_MODES = {"bilinear": "bilinear", "bicubic": "bicubic", "nearest": "nearest"}
# Larger images take the CPU path: decoded and converted to float on the device, an image costs 15 bytes a pixel
# (uint8 + float32 RGB), 250 MB at this size, and one request may hold several
DEVICE_MAX_PIXELS = 4096 * 4096


def takes_device_path(width: int, height: int, spec: ImageSpec) -> bool:
    """Whether an image of this size is preprocessed on the device: at most DEVICE_MAX_PIXELS, and not a thin strip
    (`models.preprocess.is_strip`: resize_crop samples only its crop; the CPU path keeps those)."""
    return width * height <= DEVICE_MAX_PIXELS and not is_strip(width, height, spec)


def preprocess_decoded(img: torch.Tensor, spec: ImageSpec) -> torch.Tensor:
    """A decoded CHW uint8 RGB image (on any device) -> the normalised CHW float crop the model expects."""
    _, h, w = img.shape
    nw, nh, left, top = resize_plan(w, h, spec)
    x = img.unsqueeze(0).float()
    if (nw, nh) != (w, h):
        mode = _MODES[spec.interpolation]
        x = F.interpolate(x, size=(nh, nw), mode=mode, antialias=mode != "nearest",
                          align_corners=False if mode != "nearest" else None)
        x = x.round_().clamp_(0, 255)  # PIL keeps 8 bits per channel after resampling
    x = x[:, :, top:top + spec.crop, left:left + spec.crop]
    mean = torch.tensor(spec.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return ((x / 255.0 - mean) / std)[0]


def decode_and_preprocess(datas: Sequence[bytes], spec: ImageSpec, device: torch.device) -> list[torch.Tensor]:
    """JPEG bytes -> normalised CHW crops on `device`: one batched decode (nvJPEG on CUDA), then the
    preprocessing per image. Raises whatever the decoder raises (the caller falls back to the CPU path)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    raw = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
    decoded = decode_jpeg(raw, mode=ImageReadMode.RGB, device=device)
    images = decoded if isinstance(decoded, list) else [decoded]
    return [preprocess_decoded(img, spec) for img in images]
