"""A corpus of crafted (hostile, broken or merely odd) uploads, and of malformed multipart requests.

Every image case says which status an image endpoint must answer for it: 200 when it is a valid image the
service must serve (whatever its mode, animation or odd shape), else the 4xx problem it must get: 400 corrupt
or empty, 413 too large (bytes, pixels or side, refused from the header), 415 not an image or an unsupported
format, 422 an aspect ratio no model can use.

Also here: every endpoint that takes files (ENDPOINTS), the runner that sends the whole corpus to them and judges
each answer (run_corpus -> Outcome), and a process's resident memory from /proc (memory_kb). Used by
tests/api/test_crafted_inputs.py (in process and against a real server) and bench/abuse.py (a real server with the
shipped models).
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import random
import struct
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from PIL import Image

OK = 200  # a valid image: the endpoint must serve it (2xx)


@dataclass(frozen=True)
class ImageCase:
    """One upload: its name (also the file name sent), its bytes and the status it must get."""

    name: str
    data: bytes = field(repr=False)
    expect: int


@dataclass(frozen=True)
class RequestCase:
    """A malformed multipart request: form fields and files, with IMAGE standing for the endpoint's image field."""

    name: str
    fields: list[tuple[str, str]] = field(repr=False)
    files: list[tuple[str, tuple[str, bytes, str]]] = field(repr=False)
    expect: int


IMAGE = "<image-field>"


# ----------------------------------------------------------------------------------------------- helpers


def encode(img: Image.Image, fmt: str, **params: object) -> bytes:
    """Save an image into bytes with PIL."""
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


def png_chunk(tag: bytes, body: bytes) -> bytes:
    """One PNG chunk: length, tag, body, CRC over tag + body."""
    return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body) & 0xFFFFFFFF)


def header_only_png(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height but whose pixel data is a few bytes (a few hundred bytes in all)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(b"\x00" * 16))
            + png_chunk(b"IEND", b""))


def zero_png(width: int, height: int) -> bytes:
    """A real, complete greyscale PNG of zeros: a decompression bomb (64 MB of pixels in ~60 KB at 8000 x 8000)."""
    comp = zlib.compressobj(9)
    row = b"\x00" * (width + 1)  # filter byte + samples
    body = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", body) + png_chunk(b"IEND", b"")


def header_only_gif(width: int, height: int) -> bytes:
    """A GIF whose logical screen is width x height, with a 1x1 frame."""
    screen = b"GIF89a" + struct.pack("<HHBBB", width, height, 0, 0, 0)
    frame = b"," + struct.pack("<HHHHB", 0, 0, 1, 1, 0) + b"\x02\x02\x44\x01\x00"
    return screen + frame + b";"


def header_only_bmp(width: int, height: int) -> bytes:
    """A 24-bit BMP header claiming width x height, followed by a few bytes of pixels."""
    row = (width * 3 + 3) // 4 * 4
    size_image = min(row * height, 0xFFFFFFFF)
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, size_image, 2835, 2835, 0, 0)
    head = b"BM" + struct.pack("<IHHI", min(14 + 40 + size_image, 0xFFFFFFFF), 0, 0, 14 + 40)
    return head + info + b"\x00" * 64


def jpeg_with_size(width: int, height: int) -> bytes:
    """A small real JPEG whose SOF0 header is patched to claim width x height."""
    data = bytearray(encode(Image.new("RGB", (16, 16), (90, 120, 150)), "JPEG", quality=80))
    sof = data.index(b"\xff\xc0")
    struct.pack_into(">HH", data, sof + 5, height, width)
    return bytes(data)


def noise(size: tuple[int, int], seed: int = 0, mode: str = "RGB") -> Image.Image:
    """Deterministic noise in RGB (other modes converted from it)."""
    rnd = random.Random(seed)
    img = Image.frombytes("RGB", size, rnd.randbytes(size[0] * size[1] * 3))
    return img if mode == "RGB" else img.convert(mode)


def frames(fmt: str, **params: object) -> bytes:
    """A two-frame animation (red then blue) in GIF, WebP or APNG."""
    red, blue = Image.new("RGB", (24, 24), (230, 20, 20)), Image.new("RGB", (24, 24), (20, 20, 230))
    return encode(red, fmt, save_all=True, append_images=[blue], duration=100, loop=0, **params)


def _mode_image(mode: str) -> Image.Image:
    """A small image in any PIL mode (made by conversion where PIL cannot create the mode directly)."""
    base = noise((20, 14), seed=3)
    if mode in ("I", "F"):
        return base.convert("L").convert(mode)
    if mode == "I;16":
        return Image.frombytes("I;16", (20, 14), bytes(range(256)) * 2 + b"\x00" * (20 * 14 * 2 - 512))
    if mode == "PA":
        return base.convert("P").convert("PA")
    return base.convert(mode)


# every PIL mode a client may send, with the formats that can carry it (unsaveable pairs are skipped)
MODES: dict[str, tuple[str, ...]] = {
    "1": ("PNG", "BMP", "TIFF"), "L": ("PNG", "JPEG", "TIFF"), "P": ("PNG", "GIF", "BMP"),
    "RGB": ("PNG", "JPEG", "WEBP", "BMP", "TIFF"), "RGBA": ("PNG", "WEBP", "TIFF"), "CMYK": ("JPEG", "TIFF"),
    "I": ("PNG", "TIFF"), "I;16": ("PNG", "TIFF"), "F": ("TIFF",), "LA": ("PNG", "TIFF"), "PA": ("PNG", "WEBP"),
    "YCbCr": ("JPEG", "TIFF"), "LAB": ("TIFF",),
}


def _mode_cases() -> list[ImageCase]:
    out = []
    for mode, formats in MODES.items():
        img = _mode_image(mode)
        for fmt in formats:
            try:
                data = encode(img, fmt)
            except (OSError, ValueError, KeyError):
                continue  # PIL cannot write this mode in this format
            out.append(ImageCase(f"mode-{mode.replace(';', '_')}.{fmt.lower()}", data, OK))
    return out


# ----------------------------------------------------------------------------------------------- corpus


def image_corpus(*, max_image_bytes: int = 10 * 1024 * 1024) -> list[ImageCase]:
    """The crafted uploads, each with the status it must get (max_image_bytes: the server's per-image limit)."""
    png = encode(noise((64, 48)), "PNG")
    jpeg = encode(noise((64, 48)), "JPEG", quality=90)
    cases = [
        # shapes: panoramas up to 20:1 are served, strips beyond are 422, sides beyond the limit 413 from the header
        ImageCase("1x1.png", encode(Image.new("RGB", (1, 1), (10, 200, 10)), "PNG"), OK),
        ImageCase("1x1.gif", encode(Image.new("P", (1, 1)), "GIF"), OK),
        ImageCase("2x1.png", encode(Image.new("RGB", (2, 1), (10, 200, 10)), "PNG"), OK),
        ImageCase("panorama-10to1.jpg", encode(noise((640, 64)), "JPEG"), OK),
        ImageCase("tall-10to1.png", encode(noise((40, 400)), "PNG"), OK),
        ImageCase("strip-20to1.png", encode(noise((400, 20)), "PNG"), OK),
        ImageCase("strip-21to1.png", encode(noise((420, 20)), "PNG"), 422),
        ImageCase("strip-2000x1.png", encode(noise((2000, 1)), "PNG"), 422),
        ImageCase("strip-1x2000.png", encode(noise((1, 2000)), "PNG"), 422),
        ImageCase("strip-20000x1.png", encode(Image.new("L", (20000, 1), 128), "PNG"), 422),
        ImageCase("strip-3x20000.png", encode(Image.new("L", (3, 20000), 128), "PNG"), 422),
        ImageCase("header-2000000x1.png", header_only_png(2_000_000, 1), 413),
        ImageCase("header-200000x1.png", header_only_png(200_000, 1), 413),
        ImageCase("header-1x200000.png", header_only_png(1, 200_000), 413),
        ImageCase("header-30000x2000.png", header_only_png(30_000, 2_000), 413),
        # huge declared sizes with tiny payloads: refused from the header, before a pixel buffer exists
        ImageCase("header-100000x100000.png", header_only_png(100_000, 100_000), 413),
        ImageCase("header-10000x10000.png", header_only_png(10_000, 10_000), 413),
        ImageCase("bomb-8000x8000-zeros.png", zero_png(8000, 8000), 413),
        ImageCase("header-65535x65535.gif", header_only_gif(65535, 65535), 413),
        ImageCase("header-30000x1.gif", header_only_gif(30000, 1), 413),
        ImageCase("header-100000x100000.bmp", header_only_bmp(100_000, 100_000), 413),
        ImageCase("header-30000x2.bmp", header_only_bmp(30_000, 2), 413),
        ImageCase("header-65000x65000.jpg", jpeg_with_size(65000, 65000), 413),
        ImageCase("header-60000x8.jpg", jpeg_with_size(60000, 8), 413),
        # animations: the first frame is served
        ImageCase("animated.gif", frames("GIF"), OK),
        ImageCase("animated.webp", frames("WEBP", lossless=True), OK),
        ImageCase("animated.apng", frames("PNG"), OK),
        ImageCase("multipage.tiff", frames("TIFF"), OK),
        # broken files
        ImageCase("truncated.png", png[: len(png) // 2], 400),
        ImageCase("truncated.jpg", jpeg[: len(jpeg) // 2], 400),
        ImageCase("header-only-16x16.png", header_only_png(16, 16), 400),
        ImageCase("signature-only.png", b"\x89PNG\r\n\x1a\n", 415),  # too short for PIL to identify
        ImageCase("empty.png", b"", 400),
        # polyglots: the image part is what is served
        ImageCase("png-with-zip.png", png + _zip_bytes(), OK),
        ImageCase("jpeg-with-html.jpg", jpeg + b"<html><script>alert(1)</script></html>", OK),
        ImageCase("gif-with-js.gif", encode(noise((8, 8), mode="P"), "GIF") + b"/*" + b"*/=alert(1);", OK),
        # not images, or formats the service does not take
        ImageCase("zip.zip", _zip_bytes(), 415),
        ImageCase("html-named.png", b"<html><body><img src=x onerror=alert(1)></body></html>", 415),
        ImageCase("image.svg", b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10">'
                  b'<rect width="10" height="10"/></svg>', 415),
        ImageCase("zeros.bin", b"\x00" * 4096, 415),
        ImageCase("random.bin", random.Random(7).randbytes(4096), 415),
        ImageCase("text.txt", b"not an image at all\n" * 10, 415),
        ImageCase("icon.ico", encode(Image.new("RGBA", (16, 16)), "ICO"), 415),
        ImageCase("pixmap.ppm", encode(Image.new("RGB", (16, 16)), "PPM"), 415),
        ImageCase("psd-magic.psd", b"8BPS" + b"\x00" * 60, 415),
        # over the per-image byte limit: refused before decoding
        ImageCase("over-byte-limit.png", png + b"\x00" * (max_image_bytes + 1 - len(png)), 413),
    ]
    return cases + _mode_cases()


def _zip_bytes() -> bytes:
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("payload.txt", "polyglot payload")
    return buf.getvalue()


def request_corpus(valid_image: bytes, *, max_images: int) -> list[RequestCase]:
    """Malformed multipart requests (IMAGE stands for the endpoint's image field): too many fields, a huge text
    field, more files than a request may carry."""
    one = (IMAGE, ("ok.png", valid_image, "image/png"))
    return [
        # Starlette's multipart parser allows 1000 fields and 1000 files per request, and 1 MB per text field
        RequestCase("2000-fields", [(f"field{i}", "x") for i in range(2000)], [one], 400),
        RequestCase("huge-text-field", [("model", "m" * (5 * 1024 * 1024))], [one], 400),
        RequestCase("1001-files", [], [one] * 1001, 400),
        RequestCase("over-image-limit", [], [one] * (max_images + 1), 422),
    ]


def image_status_of(decode: Callable[[bytes], object], data: bytes) -> int:
    """The status `decode` (decode_image with the server's limits) gives bytes: 200 or its problem's status."""
    from app.errors import ProblemError

    try:
        decode(data)
    except ProblemError as exc:
        return exc.status
    return OK


@contextlib.contextmanager
def pixel_budget(limit: int) -> Iterator[list[tuple[int, int]]]:
    """Within the block, refuse (AssertionError, before allocating) any PIL image larger than `limit` pixels made by
    Image.new, resize, crop or convert, and record the sizes made: an unbounded intermediate fails the test instead of
    exhausting the machine."""
    sizes: list[tuple[int, int]] = []

    def check(size: tuple[int, int], what: str) -> None:
        sizes.append((int(size[0]), int(size[1])))
        assert size[0] * size[1] <= limit, f"{what} of {size[0]}x{size[1]} exceeds the budget of {limit} pixels"

    new, resize, crop = Image.new, Image.Image.resize, Image.Image.crop

    def spy_new(mode: str, size: tuple[int, int], *a: Any, **kw: Any) -> Image.Image:
        check(size, "Image.new")
        return new(mode, size, *a, **kw)

    def spy_resize(self: Image.Image, size: tuple[int, int], *a: Any, **kw: Any) -> Image.Image:
        check(size, "resize")
        return resize(self, size, *a, **kw)

    def spy_crop(self: Image.Image, box: tuple[float, float, float, float] | None = None) -> Image.Image:
        if box is not None:
            check((round(box[2] - box[0]), round(box[3] - box[1])), "crop")
        return crop(self, box)

    Image.new, Image.Image.resize, Image.Image.crop = spy_new, spy_resize, spy_crop  # type: ignore[assignment]
    try:
        yield sizes
    finally:
        Image.new, Image.Image.resize, Image.Image.crop = new, resize, crop  # type: ignore[method-assign]


# ----------------------------------------------------------------------------------------------- endpoints and runner

PROBLEM_KEYS = {"type", "title", "status", "detail"}
VALID = encode(noise((48, 40), seed=11), "PNG")  # the valid image sent alongside, and in the malformed requests


@dataclass(frozen=True)
class Endpoint:
    """One way of sending an upload: the route, the field the crafted file goes in, and what else the form needs."""

    name: str
    path: str
    upload_field: str
    data: dict[str, str] = field(default_factory=dict)
    others: tuple[tuple[str, str], ...] = ()  # (field, file name) of valid images sent alongside
    ok: int = 200

    def files(self, name: str, payload: bytes) -> list[tuple[str, tuple[str, bytes, str]]]:
        return [(self.upload_field, (name, payload, "application/octet-stream"))] + [
            (f, (n, VALID, "image/png")) for f, n in self.others]


NONE = {"detector": "none"}
STYLE = {"steps": "1", "size": "512"}  # jobs only queue (no workers): the size costs nothing
ENDPOINTS = [
    Endpoint("classify", "/classify", "image"),
    Endpoint("embed-haar", "/faces/embed", "image", {"detector": "haar"}),
    Endpoint("embed-none", "/faces/embed", "image", NONE),
    Endpoint("verify-image_a", "/faces/verify", "image_a", NONE, (("image_b", "b.png"),)),
    Endpoint("verify-image_b", "/faces/verify", "image_b", NONE, (("image_a", "a.png"),)),
    Endpoint("enroll", "/faces/enroll", "image", {"subject": "crafted", "detector": "none"}, ok=201),
    Endpoint("identify", "/faces/identify", "image", NONE),
    Endpoint("style-content", "/style-transfer", "content", STYLE, (("style", "s.png"),), ok=202),
    Endpoint("style-style", "/style-transfer", "style", STYLE, (("content", "c.png"),), ok=202),
]


@functools.cache
def corpus(max_image_bytes: int) -> tuple[ImageCase, ...]:
    """image_corpus for a server whose per-image limit is max_image_bytes (built once per limit)."""
    return tuple(image_corpus(max_image_bytes=max_image_bytes))


def requests(max_images: int) -> list[RequestCase]:
    """request_corpus for a server that takes at most max_images images per request."""
    return request_corpus(VALID, max_images=max_images)


def problem_errors(status: int, headers: Any, body: bytes, where: str) -> list[str]:
    """What is wrong with a response that must be a fitting problem-details 4xx (empty list: nothing)."""
    errors = []
    if status >= 500:
        errors.append(f"{where}: {status} {body[:300]!r}")
        return errors
    if not headers.get("content-type", "").startswith("application/problem+json"):
        errors.append(f"{where}: {status} with content-type {headers.get('content-type')!r}")
        return errors
    doc = json.loads(body)
    if not set(doc) >= PROBLEM_KEYS or doc["status"] != status:
        errors.append(f"{where}: not a problem document: {doc}")
    if "Traceback" in body.decode("utf-8", "replace"):
        errors.append(f"{where}: a traceback in the response")
    return errors


@dataclass
class Outcome:
    """What the corpus produced: failures to assert on, and 4xx answers to valid style images (reported)."""

    failures: list[str] = field(default_factory=list)
    style_refusals: list[str] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)
    requests: int = 0
    by_endpoint: dict[str, dict[int, int]] = field(default_factory=dict)  # endpoint name -> status -> count
    seconds: dict[str, float] = field(default_factory=dict)  # endpoint name -> wall time of its cases


def run_corpus(client: httpx.Client, *, max_image_bytes: int, max_images: int,
               endpoints: Sequence[Endpoint] = ENDPOINTS, clock: Callable[[], float] | None = None) -> Outcome:
    """Send every crafted image to every endpoint, then every malformed request, and judge each answer.

    max_image_bytes and max_images are the server's CNN_MAX_IMAGE_BYTES and CNN_MAX_IMAGES_PER_REQUEST: the cases
    at those limits are built from them. `clock` (e.g. time.perf_counter) times each endpoint's cases."""
    out = Outcome()
    for ep in endpoints:
        started = clock() if clock else 0.0
        for case in corpus(max_image_bytes):
            r = client.post(ep.path, data=ep.data, files=ep.files(case.name, case.data))
            _judge(out, ep, case.name, case.expect, r.status_code, r.headers, r.content)
        for rc in requests(max_images):
            files = [(ep.upload_field if f == IMAGE else f, v) for f, v in rc.files]
            files += [(f, (n, VALID, "image/png")) for f, n in ep.others]
            r = client.post(ep.path, data={**ep.data, **dict(rc.fields)}, files=files)
            _judge(out, ep, rc.name, rc.expect, r.status_code, r.headers, r.content)
        if clock:
            out.seconds[ep.name] = clock() - started
    return out


def report(out: Outcome) -> None:
    """Print what is tolerated rather than failed, so it stays visible (pytest -s, or -rA)."""
    if out.style_refusals:
        print("\nvalid images the style service refused:\n  " + "\n  ".join(out.style_refusals))


def _judge(out: Outcome, ep: Endpoint, name: str, expect: int, status: int, headers: Any, body: bytes) -> None:
    out.requests += 1
    out.statuses[status] = out.statuses.get(status, 0) + 1
    per = out.by_endpoint.setdefault(ep.name, {})
    per[status] = per.get(status, 0) + 1
    where = f"{ep.name} <- {name}"
    if expect == OK:
        if status == ep.ok:
            return
        if ep.name.startswith("style") and status == 422:
            # the style service may refuse an image too small or thin for its algorithm: reported, not failed
            out.style_refusals.append(f"{where}: {body[:200]!r}")
            out.failures += problem_errors(status, headers, body, where)
            return
        out.failures.append(f"{where}: expected {ep.ok}, got {status} {body[:300]!r}")
        return
    out.failures += problem_errors(status, headers, body, where)
    if status != expect:
        out.failures.append(f"{where}: expected {expect}, got {status} {body[:300]!r}")


def memory_kb(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of a process, in kB (Linux /proc)."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out
