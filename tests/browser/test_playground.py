"""The playground and the API docs in a real browser, against a real server process with the shipped models.

Every page here runs as on an offline machine: a request to any other origin is aborted and fails the test.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.browser.helpers import CIFAR, LFW, Watched, png_file, shipped_env, watched_page
from tests.server import server

pytestmark = [pytest.mark.browser, pytest.mark.slow]
TIMEOUT_MS = 30_000
KEY = "playground-test-key"  # API keys are on: every call the page makes must carry the key typed into it
AUTH = {"X-API-Key": KEY}


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The service with the shipped models and an API key."""
    tmp = tmp_path_factory.mktemp("playground")
    with server(tmp, shipped_env(tmp, CNN_API_KEYS=KEY)) as (_, url):
        yield url


@pytest.fixture
def ui(browser: Any, live: str) -> Iterator[Watched]:
    """A page of a fresh browser context whose tab already holds the key (as after typing it once)."""
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    context.set_default_timeout(TIMEOUT_MS)
    context.add_init_script(f"sessionStorage.setItem('cnn-apps.api-key', {KEY!r})")
    try:
        yield watched_page(context, live)
    finally:
        context.close()


def problem(ui: Watched, panel: str) -> tuple[str, str]:
    region = ui.page.locator(f"{panel} .problem")
    region.wait_for(state="visible")
    return region.locator(".problem-title").inner_text(), region.locator(".problem-detail").inner_text()


# -- the page itself ------------------------------------------------------------------------------------------


def test_page_loads_offline_with_status_strip_and_no_console_errors(ui: Watched) -> None:
    ui.open()
    page = ui.page
    assert ui.console_errors == [] and ui.page_errors == []
    assert ui.foreign_requests() == []
    assert any(u.endswith("/models") for u in ui.requests)
    for app in ("classification", "text", "faces", "style"):
        assert "ready" in page.locator(f'#status-apps [data-app="{app}"]').inner_text()
    assert "default cifar10-resnet56" in page.locator('#status-apps [data-app="classification"]').inner_text()
    page.locator("#status-models summary").click()
    row = page.locator('#status-models tr[data-model="resnet50"]')
    assert "unavailable" in row.inner_text()
    assert "resnet50-11ad3fa6.pth" in row.locator(".reason").inner_text()  # the reason names the missing file
    assert "trained" in page.locator('#status-models tr[data-model="agnews-vdcnn9"]').inner_text()
    # the model choice: the default first and selected, an unavailable model listed but not selectable
    select = page.locator("#classify-model")
    assert select.input_value() == "cifar10-resnet56"
    assert select.locator('option[value="resnet50"]').is_disabled()
    assert page.evaluate("localStorage.length") == 0  # the key stays in the tab's session storage
    assert page.locator("#api-key").input_value() == KEY and page.locator("#status .problem").is_hidden()


def test_keyboard_tabs_labelled_controls_and_phone_width(ui: Watched) -> None:
    ui.open()
    page = ui.page
    page.locator("#tab-classify").focus()
    page.keyboard.press("ArrowRight")
    assert page.locator("#tab-faces").get_attribute("aria-selected") == "true"
    assert page.locator("#panel-faces").is_visible() and not page.locator("#panel-classify").is_visible()
    assert page.evaluate("document.activeElement.id") == "tab-faces"
    page.keyboard.press("End")
    assert page.locator("#panel-style").is_visible()
    page.keyboard.press("Home")
    assert page.locator("#panel-classify").is_visible()
    unlabelled = page.evaluate("""() => [...document.querySelectorAll('input, select, textarea')]
        .filter(e => !(e.labels && e.labels.length) && !e.getAttribute('aria-label')).map(e => e.id || e.name)""")
    assert unlabelled == []
    page.set_viewport_size({"width": 390, "height": 844})
    for fragment in ("classify", "faces/verify", "faces/identify", "text", "style"):
        ui.open(fragment)
        width = page.evaluate("document.documentElement.scrollWidth")
        assert width <= 390, f"#{fragment} scrolls sideways at phone width ({width}px)"


def test_non_image_upload_shows_the_problem_detail(ui: Watched, tmp_path: Path) -> None:
    ui.open("classify")
    notes = tmp_path / "notes.txt"
    notes.write_text("this is not an image\n")
    ui.page.set_input_files("#classify-images", str(notes))
    ui.page.locator("#classify-form button[type=submit]").click()
    title, detail = problem(ui, "#panel-classify")
    assert title == "Unsupported media type (415)"
    assert detail.startswith("notes.txt: not a recognised image")
    assert ui.page.locator("#classify-results .card").count() == 0


def test_text_topics_and_truncation(ui: Watched, live: str) -> None:
    ui.open("text")
    texts = ["Federer Wins Wimbledon Title. LONDON (Reuters) - Roger Federer beat Andy Roddick in four sets on Sunday.",
             "Oil prices climb as OPEC agrees to cut output; airline shares fall",
             ("Stocks rally as the central bank holds interest rates; investors cheer earnings. " * 8).strip()]
    ui.page.fill("#text-input", "\n".join(texts))
    ui.page.locator("#text-form button[type=submit]").click()
    cards = ui.page.locator("#text-results .card")
    cards.nth(2).wait_for()
    assert cards.count() == 3
    tops = [cards.nth(i).locator(".top-label strong").inner_text() for i in range(3)]
    assert tops[:2] == ["Sports", "Business"]
    expected = httpx.post(f"{live}/text/classify", json={"texts": texts, "top_k": 4}, headers=AUTH).json()
    assert tops == [r["top_k"][0]["label"] for r in expected["results"]]  # the page shows what the API says
    assert [cards.nth(i).locator(".truncated").count() for i in range(3)] == [0, 0, 1]
    note = cards.nth(2).locator(".truncated").inner_text()
    assert f"first {expected['window']} of {len(texts[2])} characters" in note
    assert cards.nth(0).locator(".bars li").count() == 4
    assert ui.console_errors == [] and ui.page_errors == []  # CSP included: bars are sized without inline styles


# -- images and faces (real photos from ../shared/data) -------------------------------------------------------


@pytest.mark.shared_data
def test_classify_real_photos_shows_top_labels(ui: Watched, live: str) -> None:
    ui.open("classify")
    # ship/0015.jpg is in the shipped models' hold-out (README)
    photos = [CIFAR / "ship" / "0015.jpg", CIFAR / "frog" / "0001.jpg"]
    ui.page.set_input_files("#classify-images", [str(p) for p in photos])
    ui.page.locator("#classify-topk").fill("3")
    ui.page.locator("#classify-form button[type=submit]").click()
    cards = ui.page.locator("#classify-results .card")
    cards.nth(1).wait_for()
    first = cards.nth(0)
    assert first.get_attribute("data-filename") == "0015.jpg"
    assert first.locator(".bars li").count() == 3
    assert first.locator(".bars li").first.get_attribute("aria-label").startswith("ship: ")
    with photos[1].open("rb") as fh:
        api = httpx.post(f"{live}/classify", files={"image": ("0001.jpg", fh)}, data={"top_k": "3"},
                         headers=AUTH).json()
    labels = [li.inner_text().split("\n")[0] for li in cards.nth(1).locator(".bars li").all()]
    assert labels == [p["label"] for p in api["results"][0]["top_k"]]
    assert "cifar10-resnet56" in ui.page.locator("#panel-classify .meta").inner_text()
    assert ui.console_errors == [] and ui.page_errors == [] and ui.foreign_requests() == []


@pytest.mark.shared_data
def test_detect_draws_a_box_per_face(ui: Watched) -> None:
    ui.open("faces/detect")
    ui.page.set_input_files("#detect-image", str(LFW / "Aaron_Peirsol" / "Aaron_Peirsol_0001.jpg"))
    ui.page.locator("#detect-form button[type=submit]").click()
    ui.page.locator("#detect-result .stage svg rect").first.wait_for()
    assert ui.page.locator("#detect-result .stage svg rect").count() == 1
    rect = ui.page.locator("#detect-result .stage svg rect").first
    assert int(rect.get_attribute("width")) > 60  # a face box of a 250x250 LFW photo, not a speck
    assert "1 face detected" in ui.page.locator("#panel-detect .meta").inner_text()


@pytest.mark.shared_data
def test_verify_two_photos_of_one_person_match_and_of_two_do_not(ui: Watched) -> None:
    ui.open("faces/verify")
    page = ui.page
    page.set_input_files("#verify-a", str(LFW / "Aaron_Peirsol" / "Aaron_Peirsol_0003.jpg"))
    page.set_input_files("#verify-b", str(LFW / "Aaron_Peirsol" / "Aaron_Peirsol_0004.jpg"))
    page.locator("#verify-form button[type=submit]").click()
    verdict = page.locator("#verify-result .verdict")
    verdict.wait_for()
    assert verdict.get_attribute("data-match") == "true"
    assert "Match: same person" in verdict.inner_text()
    numbers = re.search(r"distance ([\d.]+) ≤ threshold ([\d.]+)", verdict.inner_text())
    assert numbers is not None
    d, t = map(float, numbers.groups())
    assert d <= t
    assert verdict.locator(".crops canvas").count() == 2  # both face crops
    page.set_input_files("#verify-b", str(LFW / "Alec_Baldwin" / "Alec_Baldwin_0001.jpg"))
    page.locator("#verify-form button[type=submit]").click()
    page.locator('#verify-result .verdict[data-match="false"]').wait_for()
    assert "No match" in page.locator("#verify-result").inner_text()
    assert ui.console_errors == [] and ui.page_errors == []


@pytest.mark.shared_data
def test_enrol_identify_browse_and_delete(ui: Watched, live: str) -> None:
    ui.open("faces/enroll")
    page = ui.page
    page.fill("#enroll-subject", "Aaron_Peirsol")
    page.set_input_files("#enroll-images", [str(LFW / "Aaron_Peirsol" / f"Aaron_Peirsol_000{i}.jpg") for i in (1, 2)])
    page.locator("#enroll-form button[type=submit]").click()
    page.locator("#enroll-result .enrolled").wait_for()
    assert "Enrolled 2 faces of Aaron_Peirsol" in page.locator("#enroll-result").inner_text()

    page.locator("#tab-identify").click()
    page.set_input_files("#identify-image", str(LFW / "Aaron_Peirsol" / "Aaron_Peirsol_0003.jpg"))
    page.locator("#identify-form button[type=submit]").click()
    page.locator("#identify-result .identified").first.wait_for()
    assert page.locator("#identify-result .identified").first.inner_text() == "#1: Aaron_Peirsol"
    assert page.locator("#identify-result table.candidates tbody tr").first.locator("td").first.inner_text() \
        == "Aaron_Peirsol"
    assert "gallery of 2 faces" in page.locator("#panel-identify .meta").inner_text()
    page.set_input_files("#identify-image", str(LFW / "Alec_Baldwin" / "Alec_Baldwin_0001.jpg"))  # a stranger
    page.locator("#identify-form button[type=submit]").click()
    page.locator("#identify-result .identified", has_text="unknown").wait_for()

    page.locator("#tab-gallery").click()
    row = page.locator('#gallery-table tr[data-subject="Aaron_Peirsol"]')
    row.wait_for()
    assert row.locator(".count").inner_text() == "2"
    assert "1 subject, 2 faces" in page.locator("#gallery-stats").inner_text()
    row.get_by_role("button", name="Show the faces of Aaron_Peirsol").click()
    page.locator("#gallery-table tr.sub li").nth(1).wait_for()  # both faces listed
    row.get_by_role("button", name="Delete Aaron_Peirsol").click()
    row.get_by_role("button", name="Yes, delete Aaron_Peirsol").click()
    row.wait_for(state="detached")
    assert "0 subjects, 0 faces" in page.locator("#gallery-stats").inner_text()
    assert httpx.get(f"{live}/faces/subjects/Aaron_Peirsol", headers=AUTH).status_code == 404
    assert ui.console_errors == [] and ui.page_errors == []


# -- style transfer -------------------------------------------------------------------------------------------


def test_style_job_progress_preview_result_and_cancel(ui: Watched, tmp_path: Path) -> None:
    ui.open("style")
    page = ui.page
    content, style = png_file(tmp_path / "content.png", "content"), png_file(tmp_path / "style.png", "style")
    # record every status the page shows, so a job that runs quickly still proves the bar moved while it ran
    page.evaluate("""() => { window.seen = []; const q = (s) => document.querySelector(s);
        new MutationObserver(() => window.seen.push([q('#style-job').dataset.status, q('#style-progress').value,
                                                     q('#style-job figcaption').textContent]))
        .observe(document.getElementById('style-job'), {subtree: true, childList: true, characterData: true,
                                                          attributes: true}); }""")
    page.set_input_files("#style-content", str(content))
    page.set_input_files("#style-style", str(style))
    page.fill("#style-form input[name=size]", "64")
    page.fill("#style-form input[name=steps]", "30")
    page.locator("#style-form details summary").click()
    page.select_option("#style-form select[name=optimizer]", "adam")  # cheaper steps than L-BFGS: a quick job
    page.locator("#style-form button[type=submit]").click()
    page.locator('#style-job[data-status="succeeded"]').wait_for(timeout=90_000)
    page.locator("#style-download").wait_for()
    seen = page.evaluate("window.seen")
    running = [v for s, v, _ in seen if s == "running"]
    assert any(0 < v < 1 for v in running), f"no progress seen while running: {seen}"
    assert any(c.startswith("preview at step") for _, _, c in seen), "no preview shown while running"
    assert page.locator("#style-progress").evaluate("e => e.value") == 1
    size = page.locator("#style-image").evaluate("e => [e.naturalWidth, e.naturalHeight]")
    assert max(size) == 64  # the result at the requested size (longest side)
    link = page.locator("#style-download")
    assert link.get_attribute("download", timeout=1000).endswith(".png")
    assert link.get_attribute("href").startswith("blob:")
    job_id = page.locator("#style-job .job-id").inner_text()
    page.locator(f'#style-jobs tr[data-job="{job_id}"]', has_text="succeeded").wait_for()

    # a long job, cancelled while it runs
    page.fill("#style-form input[name=size]", "128")
    page.fill("#style-form input[name=steps]", "1000")
    page.locator("#style-form button[type=submit]").click()
    page.locator('#style-job[data-status="running"]').wait_for(timeout=60_000)
    assert page.locator("#style-job .job-id").inner_text() != job_id
    page.locator("#style-cancel").click()
    page.locator('#style-job[data-status="canceled"]').wait_for()
    assert not page.locator("#style-cancel").is_visible()
    assert ui.page_errors == [] and ui.foreign_requests() == []
    # the only error a browser may log here: a preview asked for before the worker wrote one (409)
    assert [e for e in ui.console_errors if "409" not in e] == []


# -- API docs offline -----------------------------------------------------------------------------------------


def test_docs_and_redoc_render_offline(ui: Watched) -> None:
    page = ui.page
    page.goto(f"{ui.base}/docs")
    page.locator(".opblock-summary-path", has_text="/classify").first.wait_for()
    paths = set(page.locator(".opblock-summary-path").all_inner_texts())
    assert {"/classify", "/faces/verify", "/style-transfer", "/text/classify"} <= {p.strip() for p in paths}
    page.goto(f"{ui.base}/redoc")
    page.locator("h2", has_text="Classify images").first.wait_for()
    assert ui.foreign_requests() == []
    assert ui.page_errors == []


# -- API keys ---------------------------------------------------------------------------------------------------


def test_api_key_field_appears_when_keys_are_on_and_is_used(browser: Any, live: str, tmp_path: Path) -> None:
    context = browser.new_context()  # a new tab: no key yet
    context.set_default_timeout(TIMEOUT_MS)
    try:
        ui = watched_page(context, live)
        page = ui.page
        page.goto(live + "/")
        form = page.locator("#key-form")
        form.wait_for(state="visible")
        title, _ = problem(ui, "#status")
        assert title == "Unauthorized (401)"
        page.fill("#api-key", "wrong-key")
        form.get_by_role("button", name="Use key").click()
        page.locator("#status .problem", has_text="Unauthorized (401)").wait_for()
        page.fill("#api-key", KEY)
        form.get_by_role("button", name="Use key").click()
        page.locator('#status-apps [data-app="classification"]').wait_for()
        assert page.locator("#status .problem").is_hidden()
        assert page.evaluate("sessionStorage.getItem('cnn-apps.api-key')") == KEY
        assert page.evaluate("localStorage.length") == 0  # the key stays in the tab
        page.set_input_files("#classify-images", str(png_file(tmp_path / "c.png", "content")))
        page.locator("#classify-form button[type=submit]").click()
        page.locator("#classify-results .card").wait_for()  # sent with X-API-Key
        page.locator("#api-key-forget").click()
        assert page.evaluate("sessionStorage.length") == 0
        assert ui.foreign_requests() == []
    finally:
        context.close()
