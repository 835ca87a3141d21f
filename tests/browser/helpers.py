"""What the browser tests and the screenshot script share: a server with the shipped models, and a page that
records console errors and refuses (and records) every request to another origin."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from PIL import Image, ImageDraw

from tests.conftest import ROOT, SHARED_DATA

CIFAR = SHARED_DATA / "cifar10" / "train"
LFW = SHARED_DATA / "lfw" / "images"


def shipped_env(tmp: Path, **extra: str) -> dict[str, str]:
    """CNN_* settings for a server with the shipped models (weights/), a fresh data dir and an empty hub cache
    (so the ImageNet models are `unavailable` on every machine)."""
    env = {
        "CNN_WEIGHTS_DIR": str(ROOT / "weights"), "CNN_DATA_DIR": str(tmp / "data"),
        "CNN_TORCH_HOME": str(tmp / "torch_home"), "CNN_ALLOW_DOWNLOADS": "false", "CNN_STYLE_WORKERS": "1",
        "CNN_CLASSIFIERS": "resnet50,cifar10-resnet56,cifar10-resnet20", "CNN_TEXT_MODELS": "agnews-vdcnn9",
        "CNN_FACE_MODELS": "lfw-face-resnet",
    }
    env.update(extra)
    return env


@dataclass
class Watched:
    """A page with what it logged and asked for."""

    page: Any
    base: str
    console_errors: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)
    blocked: list[str] = field(default_factory=list)

    def open(self, fragment: str = "") -> None:
        """Load the playground (optionally at #fragment) and wait until it has read /models."""
        self.page.goto(f"{self.base}/{'#' + fragment if fragment else ''}")
        self.page.wait_for_selector("body[data-ready=true]")

    def foreign_requests(self) -> list[str]:
        """Requests that went (or tried to go) anywhere but this server: none are expected."""
        origin = urlsplit(self.base)
        foreign = [u for u in self.requests if urlsplit(u).scheme not in ("blob", "data")
                   and (urlsplit(u).scheme, urlsplit(u).netloc) != (origin.scheme, origin.netloc)]
        return foreign + self.blocked


def watched_page(context: Any, base: str) -> Watched:
    """A new page in `context` whose requests to other origins are aborted and recorded (an offline machine)."""
    page = context.new_page()
    w = Watched(page, base)
    origin = base.rstrip("/")

    def route(r: Any) -> None:
        url = r.request.url
        if url.startswith(origin + "/") or url == origin or url.startswith(("blob:", "data:")):
            r.continue_()
        else:
            w.blocked.append(url)
            r.abort()

    context.route("**/*", route)
    page.on("console", lambda m: w.console_errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: w.page_errors.append(str(e)))
    page.on("request", lambda r: w.requests.append(r.url))
    return w


def png_file(path: Path, kind: str, size: tuple[int, int] = (96, 72)) -> Path:
    """A small synthetic picture: a colour gradient ("content") or diagonal stripes ("style")."""
    w, h = size
    img = Image.new("RGB", size)
    if kind == "content":
        img.putdata([(int(255 * x / w), int(255 * y / h), 128) for y in range(h) for x in range(w)])
        ImageDraw.Draw(img).ellipse((w // 4, h // 4, 3 * w // 4, 3 * h // 4), fill=(240, 220, 40))
    else:
        draw = ImageDraw.Draw(img)
        for i in range(-h, w, 8):
            draw.line((i, 0, i + h, h), fill=(20, 40, 200) if i % 16 else (230, 60, 30), width=4)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    path.write_bytes(buf.getvalue())
    return path
