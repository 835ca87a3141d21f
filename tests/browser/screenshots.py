"""Take the README's screenshots of the playground: `python -m tests.browser.screenshots [--out docs/playground]`.

Starts a server with the shipped models (every default classifier configured, so the ImageNet ones show as
unavailable, as on a fresh clone), drives each tab with real photos from ../shared/data and synthetic style
images, and writes one small PNG per tab (palette-quantised).
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
from pathlib import Path
from typing import Any

from PIL import Image

from tests.browser.conftest import find_chromium, why_no_browser
from tests.browser.helpers import CIFAR, LFW, png_file, shipped_env, watched_page
from tests.conftest import ROOT
from tests.server import server


def save(target: Any, path: Path, full_page: bool = True) -> None:
    """A screenshot of a page or an element, quantised to 256 colours (legible, a fraction of the size)."""
    raw = target.screenshot(full_page=full_page) if hasattr(target, "goto") else target.screenshot()
    img = Image.open(io.BytesIO(raw)).convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    img.save(path, optimize=True)
    print(f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}: {path.stat().st_size // 1024} KiB")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "playground")
    args = ap.parse_args()
    reason = why_no_browser()
    if reason:
        print(reason, file=sys.stderr)
        return 2
    if not LFW.is_dir() or not CIFAR.is_dir():
        print(f"needs {LFW} and {CIFAR}", file=sys.stderr)
        return 2
    from playwright.sync_api import sync_playwright

    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        env = shipped_env(tmp, CNN_CLASSIFIERS="resnet50,densenet121,efficientnet_b0,convnext_tiny,cifar10-resnet56,"
                          "cifar10-ensemble,cifar10-resnet32,cifar10-resnet20")
        env.pop("CNN_TORCH_HOME")  # the reasons then name the usual hub cache, as on a fresh clone
        content = LFW / "Aaron_Peirsol" / "Aaron_Peirsol_0001.jpg"
        style = png_file(tmp / "style.png", "style", (128, 128))
        with server(tmp, env) as (_, url), sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=find_chromium(), args=["--no-sandbox"])
            context = browser.new_context(viewport={"width": 1100, "height": 760}, device_scale_factor=1)
            context.set_default_timeout(60_000)
            ui = watched_page(context, url)
            page = ui.page

            ui.open("classify")
            page.locator("#status-models summary").click()
            save(page.locator("#status"), args.out / "status.png")
            page.locator("#status-models summary").click()
            photos = [CIFAR / c / n for c, n in (("ship", "0015.jpg"), ("frog", "0001.jpg"), ("horse", "0002.jpg"))]
            page.set_input_files("#classify-images", [str(p) for p in photos])
            page.locator("#classify-form button[type=submit]").click()
            page.locator("#classify-results .card").nth(2).wait_for()
            save(page, args.out / "classify.png")

            ui.open("faces/enroll")
            for who in ("Aaron_Peirsol", "Alec_Baldwin"):
                page.fill("#enroll-subject", who)
                page.set_input_files("#enroll-images", [str(LFW / who / f"{who}_000{i}.jpg") for i in (1, 2)])
                page.locator("#enroll-form button[type=submit]").click()
                page.locator("#enroll-result .enrolled", has_text=who).wait_for()
            page.locator("#tab-verify").click()
            page.set_input_files("#verify-a", str(LFW / "Aaron_Peirsol" / "Aaron_Peirsol_0003.jpg"))
            page.set_input_files("#verify-b", str(LFW / "Aaron_Peirsol" / "Aaron_Peirsol_0004.jpg"))
            page.locator("#verify-form button[type=submit]").click()
            page.locator("#verify-result .verdict").wait_for()
            save(page, args.out / "faces-verify.png")
            page.locator("#tab-identify").click()
            page.set_input_files("#identify-image", str(LFW / "Aaron_Peirsol" / "Aaron_Peirsol_0003.jpg"))
            page.locator("#identify-form button[type=submit]").click()
            page.locator("#identify-result .identified").first.wait_for()
            save(page, args.out / "faces-identify.png")
            page.locator("#tab-gallery").click()
            page.locator('#gallery-table tr[data-subject="Alec_Baldwin"]').wait_for()
            page.get_by_role("button", name="Show the faces of Aaron_Peirsol").click()
            page.locator("#gallery-table tr.sub li").nth(1).wait_for()
            save(page, args.out / "faces-gallery.png")

            ui.open("text")
            page.locator("#text-example").click()
            page.locator("#text-form button[type=submit]").click()
            page.locator("#text-results .card").nth(4).wait_for()
            save(page, args.out / "text.png")

            ui.open("style")
            page.set_input_files("#style-content", str(content))
            page.set_input_files("#style-style", str(style))
            page.fill("#style-form input[name=size]", "160")
            page.fill("#style-form input[name=steps]", "60")
            page.locator("#style-form button[type=submit]").click()
            page.locator('#style-job[data-status="succeeded"]').wait_for(timeout=300_000)
            page.locator("#style-download").wait_for()
            save(page, args.out / "style.png")

            page.set_viewport_size({"width": 390, "height": 844})
            ui.open("faces/verify")
            page.set_input_files("#verify-a", str(LFW / "Aaron_Peirsol" / "Aaron_Peirsol_0003.jpg"))
            page.set_input_files("#verify-b", str(LFW / "Alec_Baldwin" / "Alec_Baldwin_0001.jpg"))
            page.locator("#verify-form button[type=submit]").click()
            page.locator("#verify-result .verdict").wait_for()
            save(page, args.out / "phone-verify.png")

            page.set_viewport_size({"width": 1100, "height": 760})
            page.goto(f"{url}/docs")
            page.locator(".opblock-summary-path", has_text="/classify").first.wait_for()
            save(page, args.out / "docs-offline.png", full_page=False)
            browser.close()
            assert not ui.foreign_requests(), ui.foreign_requests()
            assert not ui.page_errors, ui.page_errors
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
