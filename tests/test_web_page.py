"""The web page end to end in a real headless Chromium (Debian's ``chromium``, driven by Playwright) against
the service started with uvicorn on 127.0.0.1.

Needs ``apt-get install -y chromium``; skipped, saying so, when /usr/bin/chromium is absent.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from _serving import serve_settings
from leaflens.images import decode_image
from leaflens.serving.engine import InferenceEngine
from leaflens.serving.server import background_server

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not CHROMIUM.is_file(), reason="needs Chromium at /usr/bin/chromium: apt-get install -y chromium"
    ),
]


@pytest.fixture(scope="module")
def server(model_package: Path):
    # No summary store: the browser test must not write into the checkout.
    with background_server(model_package, serve_settings(summaries_path=None)) as url:
        yield url


@pytest.fixture(scope="module")
def page(server: str):
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            # A phone-sized viewport: the page must work there.
            context = browser.new_context(
                viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True
            )
            page = context.new_page()
            page.set_default_timeout(60_000)
            page.goto(server)
            yield page
        finally:
            browser.close()


def leaf_the_model_gets_right(package: Path) -> tuple[Path, str, str]:
    """A sample leaf, its true class and the model's top-1 display name; one it gets right, if any."""
    engine = InferenceEngine.from_package(package)
    # The test model is trained for a few batches only: look through the whole sample for a leaf it knows.
    candidates = sorted(p for folder in SAMPLE.iterdir() if folder.is_dir() for p in folder.iterdir())
    predictions = engine.predict_arrays([decode_image(p) for p in candidates])
    chosen = [(p, pr) for p, pr in zip(candidates, predictions, strict=True) if pr.best.name == p.parent.name]
    path, prediction = chosen[0] if chosen else (candidates[0], predictions[0])
    return path, path.parent.name, prediction.best.display_name


@pytest.mark.slow  # ~30 s: the first Grad-CAM request imports torch and builds the model in the server
def test_page_diagnoses_a_leaf(page, model_package: Path):
    path, _, expected = leaf_the_model_gets_right(model_package)
    assert page.title().startswith("leaflens")
    assert page.locator("#model-info").inner_text().startswith("Model ")  # /v1/model was fetched and shown
    page.set_input_files("#file-input", str(path))
    page.wait_for_selector("#result:not([hidden])")
    assert page.locator("#top-diagnosis").inner_text() == expected
    assert page.locator("[data-testid=diagnosis]").count() == 3
    widths = page.locator(".bar > span").evaluate_all("els => els.map(e => parseFloat(e.style.width))")
    assert widths == sorted(widths, reverse=True) and 0 < widths[0] <= 100
    assert page.locator("#summary").inner_text().strip()
    assert page.locator("#error").is_hidden()
    assert page.locator("#preview").get_attribute("src").startswith("blob:")
    assert page.locator("#top-k li").first.inner_text().startswith(expected)
    # The Grad-CAM box is ticked by default: the overlay is shown, or the page says why it is missing.
    overlay_shown = page.locator("#overlay-figure").is_visible()
    assert overlay_shown or "no overlay" in page.locator("#timing").inner_text()
    if overlay_shown:
        assert page.locator("#overlay").get_attribute("src").startswith("data:image/png;base64,")


def test_page_shows_the_error_for_a_text_file(page, tmp_path: Path):
    text = tmp_path / "notes.txt"
    text.write_text("this is not a photo of a leaf\n")
    page.set_input_files("#file-input", str(text))
    page.wait_for_selector("#error:not([hidden])")
    message = page.locator("#error").inner_text()
    assert "not a recognised image format" in message
    assert page.locator("#result").is_hidden()
