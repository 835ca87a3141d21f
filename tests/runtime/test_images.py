"""Unit tests for app.runtime.images with real image files crafted in memory."""

from __future__ import annotations

import asyncio
import io
import random
import struct
import warnings
import zlib
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageFile

from app.errors import BadRequest, InvalidParameters, PayloadTooLarge, ProblemError, UnsupportedMediaType
from app.runtime.images import (
    DEFAULT_MAX_ASPECT_RATIO,
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_PIXELS,
    DEFAULT_MAX_SIDE,
    SUPPORTED_FORMATS,
    decode_image,
    decode_image_async,
)
from app.settings import Settings
from models.preprocess import ImageSpec, resize_crop
from tests.crafted import encode, pixel_budget, png_chunk

NAME = "upload_file"


def header_only_png(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height but whose pixel data is a few bytes and never ends."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    idat = zlib.compress(b"\x00" * 16)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat)


def header_only_gif(width: int, height: int) -> bytes:
    """A GIF with a huge logical screen and a 1x1 frame."""
    screen = b"GIF89a" + struct.pack("<HHBBB", width, height, 0, 0, 0)
    frame = b"," + struct.pack("<HHHHB", 0, 0, 1, 1, 0) + b"\x02\x02\x44\x01\x00"
    return screen + frame + b";"


def decode_error(data: bytes, **kw: Any) -> ProblemError:
    """Decode, expecting a ProblemError that names the upload field."""
    with pytest.raises(ProblemError) as info:
        decode_image(data, name=NAME, **kw)
    err = info.value
    assert NAME in err.detail
    return err


def px(img: Image.Image, xy: tuple[int, int] = (0, 0)) -> tuple[int, int, int]:
    """An RGB pixel as a plain tuple."""
    value = img.getpixel(xy)
    assert isinstance(value, tuple)
    return (int(value[0]), int(value[1]), int(value[2]))


def close_to(got: tuple[int, int, int], want: tuple[int, int, int], tol: int = 8) -> bool:
    return all(abs(a - b) <= tol for a, b in zip(got, want, strict=True))


@pytest.mark.parametrize(
    ("fmt", "params"),
    [("JPEG", {"quality": 95}), ("PNG", {}), ("WEBP", {"lossless": True}), ("BMP", {}), ("TIFF", {}), ("GIF", {})],
)
def test_valid_formats_decode_to_rgb(fmt: str, params: dict[str, Any]) -> None:
    src = Image.new("RGB", (33, 17), (200, 40, 40))
    img = decode_image(encode(src, fmt, **params), name=NAME)
    assert img.mode == "RGB"
    assert img.size == (33, 17)
    assert close_to(px(img, (16, 8)), (200, 40, 40), tol=12)
    img.load()  # fully decoded and still usable


def test_supported_formats() -> None:
    assert {"JPEG", "PNG", "GIF", "BMP", "WEBP", "TIFF", "MPO"} <= SUPPORTED_FORMATS
    assert "ICO" not in SUPPORTED_FORMATS


def test_one_pixel_png() -> None:
    img = decode_image(encode(Image.new("RGB", (1, 1), (1, 2, 3)), "PNG"))
    assert img.size == (1, 1) and px(img) == (1, 2, 3)


def test_truncated_jpeg_is_400() -> None:
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    data = encode(Image.fromarray(noise), "JPEG")
    err = decode_error(data[: len(data) // 2])
    assert isinstance(err, BadRequest) and err.status == 400
    assert not ImageFile.LOAD_TRUNCATED_IMAGES  # the module never relaxes PIL globally


def test_truncated_png_is_400() -> None:
    err = decode_error(header_only_png(16, 16))
    assert isinstance(err, BadRequest)


@pytest.mark.parametrize(
    "data",
    [
        random.Random(1234).randbytes(512),
        b"hello world, this is a plain text file\n",
        b"%PDF-1.4\n1 0 obj\n<< /Type /Catalog >>\nendobj\ntrailer\n<< /Root 1 0 R >>\n%%EOF\n",
    ],
    ids=["random", "text", "pdf"],
)
def test_not_an_image_is_415(data: bytes) -> None:
    err = decode_error(data)
    assert isinstance(err, UnsupportedMediaType) and err.status == 415


@pytest.mark.parametrize(("fmt", "mode"), [("ICO", "RGBA"), ("PPM", "RGB")])
def test_identifiable_but_unsupported_format_is_415(fmt: str, mode: str) -> None:
    err = decode_error(encode(Image.new(mode, (16, 16)), fmt))
    assert isinstance(err, UnsupportedMediaType)
    assert fmt in err.detail


@pytest.fixture
def no_pixel_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any attempt to decode pixels fail loudly: bombs must be refused from the header."""

    def refuse(self: ImageFile.ImageFile) -> None:
        raise AssertionError("pixel data was decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)


@pytest.mark.usefixtures("no_pixel_decoding")
@pytest.mark.parametrize(
    ("data", "kw"),
    [
        (header_only_png(20000, 20000), {}),  # above PIL's own hard limit: refused inside Image.open
        (header_only_png(10000, 10000), {}),  # between PIL's warning and error limits: our check
        (header_only_png(2000, 1000), {"max_pixels": 1_000_000}),  # under PIL's limits: only our check
        (header_only_gif(65535, 65535), {}),
        (header_only_gif(10000, 5000), {}),
    ],
    ids=["png-20000", "png-10000", "png-custom-limit", "gif-65535", "gif-10000"],
)
def test_decompression_bomb_is_413(data: bytes, kw: dict[str, Any]) -> None:
    filters = list(warnings.filters)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DecompressionBombWarning escapes either
        err = decode_error(data, **kw)
    assert isinstance(err, PayloadTooLarge) and err.status == 413
    assert "decompression bomb" in err.detail
    assert warnings.filters == filters
    assert Image.MAX_IMAGE_PIXELS == 89_478_485  # PIL's global is never touched


def test_bomb_detail_gives_dimensions() -> None:
    err = decode_error(header_only_png(10000, 10000))
    assert "10000x10000" in err.detail
    assert err.extra["max_pixels"] == 40_000_000


def test_size_limit_is_413() -> None:
    data = encode(Image.new("RGB", (64, 64)), "PNG")
    err = decode_error(data, max_bytes=len(data) - 1)
    assert isinstance(err, PayloadTooLarge) and str(len(data) - 1) in err.detail
    assert decode_image(data, max_bytes=len(data)).size == (64, 64)


def test_empty_is_400() -> None:
    err = decode_error(b"")
    assert isinstance(err, BadRequest) and "empty" in err.detail


def test_cmyk_jpeg_decodes_to_red() -> None:
    data = encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=95)
    img = decode_image(data)
    r, g, b = px(img, (8, 8))
    assert img.mode == "RGB" and r > 200 and g < 60 and b < 60


def test_16_bit_png_is_scaled_not_clipped() -> None:
    arr = np.array([[65535, 32896, 0, 257]], dtype=np.uint16)
    src = Image.fromarray(arr)
    assert src.mode == "I;16"
    img = decode_image(encode(src, "PNG"))
    assert [px(img, (x, 0))[0] for x in range(4)] == [255, 128, 0, 1]


def test_16_bit_big_endian_and_32_bit_modes() -> None:
    # Not every mode round-trips through a file; feed the converter through a TIFF where possible.
    big = Image.frombytes("I;16B", (2, 1), np.array([65535, 32896], dtype=">u2").tobytes())
    img = decode_image(encode(big, "TIFF"))
    assert [px(img, (x, 0))[0] for x in range(2)] == [255, 128]
    wide = Image.fromarray(np.array([[0, 1000, 65535]], dtype=np.int32))
    img = decode_image(encode(wide, "TIFF"))
    assert [px(img, (x, 0))[0] for x in range(3)] == [0, 4, 255]


def test_float_tiff_is_clipped() -> None:
    src = Image.fromarray(np.array([[-5.0, 127.6, 300.0]], dtype=np.float32))
    assert src.mode == "F"
    img = decode_image(encode(src, "TIFF"))
    assert [px(img, (x, 0))[0] for x in range(3)] == [0, 128, 255]


def test_rgba_transparent_pixel_becomes_white() -> None:
    src = Image.new("RGBA", (2, 1), (0, 0, 0, 0))
    src.putpixel((1, 0), (10, 20, 30, 255))
    img = decode_image(encode(src, "PNG"))
    assert px(img, (0, 0)) == (255, 255, 255)
    assert px(img, (1, 0)) == (10, 20, 30)


def test_la_half_transparent_is_blended_with_white() -> None:
    src = Image.new("LA", (1, 1), (0, 128))
    img = decode_image(encode(src, "PNG"))
    assert close_to(px(img), (127, 127, 127), tol=2)


@pytest.mark.parametrize("transparent", [True, False])
def test_palette_png(transparent: bool) -> None:
    src = Image.new("P", (2, 1), 0)
    src.putpalette([0, 0, 0, 0, 200, 0] + [0] * 762)
    src.putpixel((1, 0), 1)
    params = {"transparency": 0} if transparent else {}
    img = decode_image(encode(src, "PNG", **params))
    assert img.mode == "RGB"
    assert px(img, (0, 0)) == ((255, 255, 255) if transparent else (0, 0, 0))
    assert px(img, (1, 0)) == (0, 200, 0)


def test_grey_and_bilevel() -> None:
    assert px(decode_image(encode(Image.new("L", (3, 3), 77), "PNG"))) == (77, 77, 77)
    img = decode_image(encode(Image.new("1", (3, 3), 1), "BMP"))
    assert img.mode == "RGB" and px(img) == (255, 255, 255)


def test_animated_gif_gives_first_frame() -> None:
    red = Image.new("RGB", (8, 8), (255, 0, 0))
    blue = Image.new("RGB", (8, 8), (0, 0, 255))
    data = encode(red, "GIF", save_all=True, append_images=[blue], duration=100, loop=0)
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 2
    img = decode_image(data)
    assert img.mode == "RGB" and px(img, (4, 4)) == (255, 0, 0)


def test_animated_webp_gives_first_frame() -> None:
    green = Image.new("RGB", (8, 8), (0, 255, 0))
    blue = Image.new("RGB", (8, 8), (0, 0, 255))
    data = encode(green, "WEBP", save_all=True, append_images=[blue], lossless=True, duration=100)
    assert close_to(px(decode_image(data), (4, 4)), (0, 255, 0))


def test_exif_orientation_is_applied() -> None:
    src = Image.new("RGB", (40, 20), (0, 0, 255))
    src.paste((255, 0, 0), (0, 0, 10, 10))  # marker in the top-left corner as stored
    exif = src.getexif()
    exif[0x0112] = 6  # stored image must be rotated 90 degrees clockwise for display
    img = decode_image(encode(src, "JPEG", exif=exif, quality=95))
    assert img.size == (20, 40)
    assert close_to(px(img, (15, 5)), (255, 0, 0), tol=40)  # top-left went to the top-right corner


def test_corrupt_exif_does_not_reject_the_image(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(self: Image.Image) -> Image.Exif:
        raise SyntaxError("bad EXIF")

    monkeypatch.setattr(Image.Image, "getexif", broken)
    assert decode_image(encode(Image.new("RGB", (4, 2)), "JPEG")).size == (4, 2)


def test_unexpected_pil_error_becomes_400(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: Any, **kwargs: Any) -> None:
        raise KeyError("internal PIL failure")

    monkeypatch.setattr(Image, "open", boom)
    err = decode_error(encode(Image.new("RGB", (4, 4)), "PNG"))
    assert isinstance(err, BadRequest) and err.__cause__ is not None


def test_decode_image_async() -> None:
    data = encode(Image.new("RGB", (5, 7), (9, 9, 9)), "PNG")
    img = asyncio.run(decode_image_async(data, name=NAME, max_pixels=100))
    assert img.mode == "RGB" and img.size == (5, 7)
    with pytest.raises(PayloadTooLarge):
        asyncio.run(decode_image_async(data, name=NAME, max_pixels=10))


# ----------------------------------------------------------------------------------- sides and aspect ratios


@pytest.mark.usefixtures("no_pixel_decoding")
@pytest.mark.parametrize(
    ("width", "height"), [(2_000_000, 1), (1, 2_000_000), (200_000, 1), (20_001, 1000), (1000, 20_001)],
    ids=["2000000x1", "1x2000000", "200000x1", "wide-20001", "tall-20001"],
)
def test_a_side_over_the_limit_is_413_from_the_header(width: int, height: int) -> None:
    # a few hundred bytes whose pixel count passes the pixel cap: only the side check stands in the way
    err = decode_error(header_only_png(width, height))
    assert isinstance(err, PayloadTooLarge) and err.status == 413
    assert f"{width}x{height}" in err.detail and "20000 pixels per side" in err.detail
    assert err.extra["max_side"] == 20_000 and (err.extra["width"], err.extra["height"]) == (width, height)


@pytest.mark.usefixtures("no_pixel_decoding")
@pytest.mark.parametrize(("width", "height"), [(2000, 1), (1, 2000), (421, 20), (20, 421), (20000, 999)])
def test_an_aspect_ratio_over_the_limit_is_422_from_the_header(width: int, height: int) -> None:
    err = decode_error(header_only_png(width, height))
    assert isinstance(err, InvalidParameters) and err.status == 422
    assert "aspect ratio" in err.detail and "at most 20:1" in err.detail
    assert err.extra["aspect_ratio"] == pytest.approx(max(width, height) / min(width, height), rel=1e-3)
    assert err.extra["max_aspect_ratio"] == 20.0


@pytest.mark.parametrize(("width", "height"), [(400, 20), (20, 400), (640, 64), (64, 640), (1, 1), (20, 1)])
def test_panoramas_up_to_the_limit_decode(width: int, height: int) -> None:
    img = decode_image(encode(Image.new("RGB", (width, height), (5, 6, 7)), "PNG"), name=NAME)
    assert img.size == (width, height) and px(img) == (5, 6, 7)


def test_side_and_aspect_limits_are_the_callers() -> None:
    data = encode(Image.new("RGB", (300, 30)), "PNG")
    assert isinstance(decode_error(data, max_side=299), PayloadTooLarge)
    assert decode_image(data, max_side=300).size == (300, 30)
    assert isinstance(decode_error(data, max_aspect_ratio=9.99), InvalidParameters)
    assert decode_image(data, max_aspect_ratio=10).size == (300, 30)
    # huge limits turn the checks off; the pixel cap still holds
    strip = encode(Image.new("L", (5000, 1)), "PNG")
    assert decode_image(strip, max_side=10**9, max_aspect_ratio=1e9).size == (5000, 1)


def test_default_limits_are_the_settings_defaults() -> None:
    s = Settings()
    assert (s.max_image_bytes, s.max_image_pixels) == (DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS)
    assert (s.max_image_side, s.max_aspect_ratio) == (DEFAULT_MAX_SIDE, DEFAULT_MAX_ASPECT_RATIO)
    assert (s.max_image_side, s.max_aspect_ratio) == (20_000, 20.0)


def test_exif_rotated_strip_is_judged_by_its_size() -> None:
    # the header's size is what is checked; a rotation only swaps the sides
    src = Image.new("RGB", (25, 600))  # 24:1, stored tall, displayed wide
    exif = src.getexif()
    exif[0x0112] = 6
    err = decode_error(encode(src, "JPEG", exif=exif))
    assert isinstance(err, InvalidParameters) and "25x600" in err.detail


def test_high_bit_depth_conversion_in_row_blocks_matches_the_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    import app.runtime.images as images

    arr = np.random.default_rng(5).integers(-70000, 70000, (37, 29), dtype=np.int32)
    whole = np.asarray(decode_image(encode(Image.fromarray(arr), "TIFF")))
    monkeypatch.setattr(images, "_CHUNK_SAMPLES", 64)  # blocks of 2 rows
    assert (np.asarray(decode_image(encode(Image.fromarray(arr), "TIFF"))) == whole).all()
    f = np.random.default_rng(6).normal(128, 90, (13, 11)).astype(np.float32)
    f[0, 0] = np.nan
    blocks = np.asarray(decode_image(encode(Image.fromarray(f), "TIFF")))[:, :, 0]
    assert (blocks == np.clip(np.rint(np.nan_to_num(f, nan=0.0)), 0, 255).astype(np.uint8)).all()


# ----------------------------------------------------------------------------- preprocessing of odd shapes


def reference_resize_crop(img: Image.Image, spec: ImageSpec) -> Image.Image:
    """resize_crop as the shipped models were trained with it: the full resize, then the centre crop."""
    img = img.convert("RGB")
    w, h = img.size
    if min(w, h) != spec.resize:
        nw, nh = (spec.resize, int(spec.resize * h / w)) if w <= h else (int(spec.resize * w / h), spec.resize)
        img = img.resize((nw, nh), {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
                                    "bicubic": Image.Resampling.BICUBIC}[spec.interpolation])
        w, h = nw, nh
    left, top = round((w - spec.crop) / 2.0), round((h - spec.crop) / 2.0)
    return img.crop((left, top, left + spec.crop, top + spec.crop)) if (w, h) != (spec.crop, spec.crop) else img


def spec_of(resize: int, crop: int, interpolation: str = "bilinear") -> ImageSpec:
    return ImageSpec(resize=resize, crop=crop, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation=interpolation)


def noise_rgb(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic", "nearest"])
@pytest.mark.parametrize(("resize", "crop"), [(256, 224), (232, 224), (32, 32), (36, 32), (64, 64), (16, 16)])
@pytest.mark.parametrize("size", [(640, 480), (480, 640), (300, 300), (20, 15), (33, 97), (1000, 100), (100, 1000),
                                  (300, 30), (32, 32), (1, 1), (5, 1)])
def test_resize_crop_of_normal_shapes_is_the_training_transform(
        size: tuple[int, int], resize: int, crop: int, interpolation: str) -> None:
    img, spec = noise_rgb(*size, seed=size[0] * 7 + size[1]), spec_of(resize, crop, interpolation)
    got = np.asarray(resize_crop(img, spec), dtype=np.int16)
    want = np.asarray(reference_resize_crop(img, spec), dtype=np.int16)
    assert got.shape == want.shape == (crop, crop, 3)
    assert (got == want).all()  # bit for bit: the shipped models see what they were trained on


@pytest.mark.parametrize("size", [(5000, 2), (2, 5000), (2_000_000, 1), (1, 2_000_000), (20000, 3)])
@pytest.mark.parametrize(("resize", "crop"), [(32, 32), (256, 224)])
def test_resize_crop_of_a_strip_allocates_nothing_large(size: tuple[int, int], resize: int, crop: int) -> None:
    img = Image.new("RGB", size, (250, 20, 20))
    with pixel_budget(max(crop * crop, size[0] * size[1])) as made:
        out = resize_crop(img, spec_of(resize, crop))
    assert out.size == (crop, crop)
    assert max(w * h for w, h in made) <= crop * crop  # the crop only, never the 80000 x 32 detour
    assert (np.asarray(out) == (250, 20, 20)).all()


def test_resize_crop_of_a_strip_samples_where_the_full_resize_would() -> None:
    # smooth content, so the order of PIL's two passes (the only difference) moves values by a level or two
    y, x = np.mgrid[0:4, 0:3000].astype(np.float64)
    arr = np.stack([x / 3000 * 255, 127 + 100 * np.sin(x / 40.0), 60 + y * 30], axis=-1).round().astype(np.uint8)
    img, spec = Image.fromarray(arr), spec_of(32, 32)
    got = np.asarray(resize_crop(img, spec), dtype=np.int16)
    want = np.asarray(reference_resize_crop(img, spec), dtype=np.int16)
    assert np.abs(got - want).max() <= 2
