"""Decoding and validation of uploaded images: untrusted bytes in, a fully loaded RGB PIL image out."""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import threading
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import anyio.to_thread
import numpy as np
from PIL import Image, ImageOps

from app.errors import BadRequest, InvalidParameters, PayloadTooLarge, ProblemError, UnsupportedMediaType
from app.settings import Settings

log = logging.getLogger(__name__)

# PIL format names we accept. MPO is how PIL labels multi-picture JPEGs (many phone cameras write them);
# APNG is reported as PNG. Everything else PIL can parse (ICO, PSD, PPM, EPS...) is refused: a smaller
# surface of decoders exposed to untrusted input, and formats a client would not send a classifier.
SUPPORTED_FORMATS: frozenset[str] = frozenset({"JPEG", "MPO", "PNG", "GIF", "BMP", "WEBP", "TIFF"})
_SUPPORTED_LIST = ", ".join(sorted(SUPPORTED_FORMATS))

# Limits callers do not pass come from the Settings defaults: one place, so every caller (style included)
# gets the same header checks.
_FIELDS = Settings.model_fields
DEFAULT_MAX_BYTES: int = _FIELDS["max_image_bytes"].default
DEFAULT_MAX_PIXELS: int = _FIELDS["max_image_pixels"].default
DEFAULT_MAX_SIDE: int = _FIELDS["max_image_side"].default
DEFAULT_MAX_ASPECT_RATIO: float = _FIELDS["max_aspect_ratio"].default

_WHITE = (255, 255, 255)
_CHUNK_SAMPLES = 1 << 20  # high-bit-depth conversion works on row blocks of about this many samples
_MAX_DETAIL = 200  # PIL messages go into the response; keep them short

# warnings.catch_warnings swaps the process-wide filter list; two threads entering and leaving it in an
# interleaved order can leave one's filter installed for good. Serialising our own entries keeps the swap
# atomic (among our callers) without touching anyone's global state.
_WARNINGS_LOCK = threading.Lock()


@contextlib.contextmanager
def _bomb_warnings_ignored() -> Iterator[None]:
    """Silence PIL's DecompressionBombWarning locally: our own max_pixels check replaces it."""
    with _WARNINGS_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        yield


def decode_image(
    data: bytes,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_side: int = DEFAULT_MAX_SIDE,
    max_aspect_ratio: float = DEFAULT_MAX_ASPECT_RATIO,
    name: str = "image",
) -> Image.Image:
    """Validate and decode untrusted image bytes into a fully loaded RGB image, or raise a ProblemError.

    Size, side length and aspect ratio are checked from the header, before any pixel buffer exists."""
    try:
        img = _checked_header(data, max_bytes, max_pixels, max_side, max_aspect_ratio, name)
        width, height = img.size
        img.seek(0)  # animated GIF/WEBP/APNG and multi-page TIFF/MPO: classify the first frame
        # PIL re-checks its own global limit while allocating; when the caller allowed more than that limit
        # we have already vetted the size, so silence the warning (rare and large, so the lock costs little).
        limit = Image.MAX_IMAGE_PIXELS
        quiet = limit is not None and width * height > limit
        with _bomb_warnings_ignored() if quiet else contextlib.nullcontext():
            img.load()  # decode now, inside the error mapping, rather than lazily in some later caller
        _apply_orientation(img, name)
        return _to_rgb(img)
    except ProblemError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # PIL's own hard limit (2x MAX_IMAGE_PIXELS) fires inside Image.open, before we see the size.
        raise PayloadTooLarge(
            f"{name}: image dimensions exceed the decompression bomb limit: {_short(exc)}",
            extra={"field": name, "max_pixels": max_pixels},
        ) from exc
    except MemoryError as exc:
        raise PayloadTooLarge(f"{name}: the image is too large to decode", extra={"field": name}) from exc
    except Exception as exc:
        # Truncated or corrupt data (OSError, SyntaxError, ValueError, struct.error...) and any other
        # surprise from a decoder fed untrusted bytes is the client's problem, never a 500.
        raise BadRequest(
            f"{name}: the image data is corrupt or truncated ({type(exc).__name__}: {_short(exc)})",
            extra={"field": name},
        ) from exc


def _checked_header(data: bytes, max_bytes: int, max_pixels: int, max_side: int, max_aspect_ratio: float,
                    name: str) -> Image.Image:
    """The lazily opened image once its bytes and header pass every limit (no pixel decoded yet), or the 4xx."""
    size = len(data)
    if size == 0:
        raise BadRequest(f"{name}: the upload is empty", extra={"field": name})
    if size > max_bytes:
        raise PayloadTooLarge(
            f"{name}: {size} bytes exceeds the limit of {max_bytes} bytes",
            extra={"field": name, "max_bytes": max_bytes},
        )
    img = _open(data, name)
    width, height = img.size
    if width <= 0 or height <= 0:
        raise BadRequest(f"{name}: the image has no pixels ({width}x{height})", extra={"field": name})
    # Image.open only parsed the header, so this refuses a bomb before a single pixel buffer exists.
    if width * height > max_pixels:
        raise PayloadTooLarge(
            f"{name}: {width}x{height} = {width * height} pixels exceeds the limit of {max_pixels} "
            "pixels (possible decompression bomb)",
            extra={"field": name, "width": width, "height": height, "max_pixels": max_pixels},
        )
    _check_shape(width, height, max_side, max_aspect_ratio, name)
    return img


_EXIF_ORIENTATION = 0x0112


def plain_jpeg_size(
    data: bytes,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_side: int = DEFAULT_MAX_SIDE,
    max_aspect_ratio: float = DEFAULT_MAX_ASPECT_RATIO,
    name: str = "image",
) -> tuple[int, int] | None:
    """(width, height) of a JPEG that a GPU decoder may decode exactly as `decode_image` would (colour or grey,
    upright: no EXIF rotation to apply), after the same limits; None for anything else, which then takes the CPU
    path (and its 4xx when it is bad). Reads the header only: no pixel is decoded here."""
    if not data.startswith(b"\xff\xd8\xff"):
        return None
    if not data.rstrip(b"\x00").endswith(b"\xff\xd9"):
        return None  # no end-of-image marker (cut off, or data after it): decoders differ there; the CPU path decides
    try:
        img = _checked_header(data, max_bytes, max_pixels, max_side, max_aspect_ratio, name)
        try:
            if img.format != "JPEG" or img.mode not in ("RGB", "L"):
                return None
            if img.getexif().get(_EXIF_ORIENTATION, 1) != 1:
                return None
            return img.size
        finally:
            img.close()
    except ProblemError:
        raise
    except Exception:  # an unreadable header or EXIF block: the CPU path decides, with its own error mapping
        return None


async def decode_image_async(data: bytes, **kw: Any) -> Image.Image:
    """decode_image in a worker thread, so a large decode never blocks the event loop."""
    return await anyio.to_thread.run_sync(functools.partial(decode_image, data, **kw))


def _short(exc: BaseException) -> str:
    """An exception message trimmed for a response body."""
    text = str(exc) or type(exc).__name__
    return text if len(text) <= _MAX_DETAIL else text[: _MAX_DETAIL - 3] + "..."


def _open(data: bytes, name: str) -> Image.Image:
    """Parse the header only (Image.open is lazy) and refuse unknown or unsupported formats."""
    try:
        # Sizes between PIL's warning and error thresholds would warn here; max_pixels decides instead.
        with _bomb_warnings_ignored():
            img = Image.open(io.BytesIO(data))
    except Image.UnidentifiedImageError as exc:
        raise UnsupportedMediaType(
            f"{name}: not a recognised image; supported formats: {_SUPPORTED_LIST}",
            extra={"field": name},
        ) from exc
    fmt = img.format or "unknown"
    if fmt not in SUPPORTED_FORMATS:
        img.close()
        raise UnsupportedMediaType(
            f"{name}: image format {fmt} is not supported; supported formats: {_SUPPORTED_LIST}",
            extra={"field": name, "format": fmt},
        )
    return img


def _check_shape(width: int, height: int, max_side: int, max_aspect_ratio: float, name: str) -> None:
    """Refuse sides and aspect ratios no model can use: a few header bytes must not buy gigabytes of resized
    intermediates (a 2,000,000 x 1 strip scaled to a 256-pixel short side is half a gigapixel)."""
    long, short = max(width, height), min(width, height)
    extra = {"field": name, "width": width, "height": height}
    if long > max_side:
        raise PayloadTooLarge(
            f"{name}: {width}x{height} has a side of {long} pixels; the limit is {max_side} pixels per side",
            extra={**extra, "max_side": max_side},
        )
    if long > max_aspect_ratio * short:
        raise InvalidParameters(
            f"{name}: {width}x{height} has an aspect ratio of {long / short:.4g}:1; at most {max_aspect_ratio:g}:1 "
            "is accepted (crop the strip, or send the region of interest)",
            extra={**extra, "aspect_ratio": round(long / short, 4), "max_aspect_ratio": max_aspect_ratio},
        )


def _apply_orientation(img: Image.Image, name: str) -> None:
    """Rotate/flip by the EXIF Orientation tag in place, so the model sees the picture upright."""
    try:
        ImageOps.exif_transpose(img, in_place=True)
    except Exception as exc:
        # Broken EXIF is common in camera files whose pixels are fine; keep the image as stored
        # rather than refusing an otherwise valid upload.
        log.debug("%s: ignoring unreadable EXIF orientation: %s", name, exc)


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB: alpha flattened onto white, high bit depths scaled, not clipped."""
    mode = img.mode
    if mode == "I" or mode.startswith("I;16"):
        return _integer_to_rgb(img)
    if mode == "F":
        return _float_to_rgb(img)
    has_alpha = (
        mode in ("RGBA", "RGBa", "LA", "La", "PA")
        or "transparency" in img.info  # P/L/RGB with a tRNS or GIF transparent index
        or (mode == "P" and img.palette is not None and img.palette.mode == "RGBA")
    )
    if has_alpha:
        return _flatten(img.convert("RGBA"))
    if mode == "RGB":
        return img
    return img.convert("RGB")  # 1, L, P, CMYK, YCbCr, LAB, HSV, RGBX


def _flatten(rgba: Image.Image) -> Image.Image:
    """Composite onto white: raw RGB under transparent pixels is arbitrary (often black) garbage."""
    out = Image.new("RGB", rgba.size, _WHITE)
    out.paste(rgba, mask=rgba.getchannel("A"))
    return out


def _by_rows(arr: np.ndarray, convert: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """uint8 result of `convert` applied to blocks of rows: wide temporaries (int64, float) stay a few MB
    instead of several times the image."""
    out = np.empty(arr.shape[:2], dtype=np.uint8)
    step = max(1, _CHUNK_SAMPLES // max(1, arr.shape[1]))
    for r in range(0, arr.shape[0], step):
        out[r : r + step] = convert(arr[r : r + step])
    return out


def _integer_to_rgb(img: Image.Image) -> Image.Image:
    """Scale 16/32-bit integer samples to 8 bits by their bit range; clipping at 255 would turn them white."""
    arr = np.asarray(img)
    if img.mode.startswith("I;16"):
        # round(x / 257) maps 0..65535 onto 0..255 exactly; uint32 holds x + 128 without overflow.
        out = _by_rows(arr, lambda a: ((a.astype(np.uint32) + 128) // 257).astype(np.uint8))
    else:
        # Mode I does not say how many bits are in use: infer the range from the values present.
        lo, hi = int(arr.min()), int(arr.max())
        if lo >= 0 and hi <= 255:
            lo, hi = 0, 255  # already 8-bit data
        elif lo >= 0 and hi <= 65535:
            lo, hi = 0, 65535  # 16-bit data in a 32-bit container (older PNG/TIFF decoders)
        span = max(hi - lo, 1)

        def scale(a: np.ndarray) -> np.ndarray:
            # int64 cannot overflow for any 32-bit sample; otherwise stretch the actual min..max to 0..255.
            scaled = ((a.astype(np.int64) - lo) * 255 + span // 2) // span
            return np.clip(scaled, 0, 255).astype(np.uint8)

        out = _by_rows(arr, scale)
    return Image.fromarray(out).convert("RGB")


def _float_to_rgb(img: Image.Image) -> Image.Image:
    """Round and clip float samples to 0..255 (NaN to 0)."""

    def scale(a: np.ndarray) -> np.ndarray:
        a = np.nan_to_num(a.astype(np.float32), nan=0.0, posinf=255.0, neginf=0.0)
        return np.clip(np.rint(a), 0, 255).astype(np.uint8)

    return Image.fromarray(_by_rows(np.asarray(img), scale)).convert("RGB")
