"""The web page in a real browser: Debian's Chromium driven by Playwright (never `playwright install`).

The test starts the server on a free loopback port, uploads a held-out X-ray and a colour photo
through the page (file chooser, then drag and drop), checks that the shown prediction equals
``xraylib.predict.predict_files`` for the same file and that the photo gets "not a chest X-ray
this model can judge", and saves a screenshot under pytest's tmp folder (its path is printed).
Skipped with a message where Chromium or Playwright is absent (``.ci/run`` installs Chromium).
"""
from __future__ import annotations

import base64
import os
import shutil
import threading
from pathlib import Path

import pytest

from test_ood import build_trained_run, colour_photo, encode
from xraylib import models, runs, serve
from xraylib.predict import predict_files

pytestmark = [
    pytest.mark.filterwarnings("ignore:Invalid value for VR AS"),
    pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"),
]

CHROMIUM = os.environ.get("XRAYLIB_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]


@pytest.fixture(scope="module")
def browser():
    if not (Path(CHROMIUM).is_file() or shutil.which(CHROMIUM)):
        pytest.skip(f"Chromium not found at {CHROMIUM}: install Debian's (apt-get install chromium chromium-driver) "
                    "or set XRAYLIB_CHROMIUM to run the browser test")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright; "
                                                                 "it drives the system Chromium, no `playwright install`)")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A trained model served on a free loopback port: (base URL, run folder, the held-out test files)."""
    run_dir, data = build_trained_run(tmp_path_factory.mktemp("browser_run"))
    loaded = models.load_model(run_dir)
    reference, note = runs.prepare_ood(loaded, say=lambda line: None)
    settings = serve.ServeSettings(port=0)
    server = serve.Server(serve.create_app(serve.Analyser(loaded, reference, note), settings), settings)  # waitress
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.effective_port}/", run_dir, list(data["test"].manifest["path"])
    server.close()
    thread.join(timeout=10)


def card_values(card) -> dict:
    return {
        "decision": card.locator(".decision-value").inner_text(),
        "shown": {row.get_attribute("data-class"): row.locator(".prob-value").inner_text()
                  for row in card.locator("tr.prob").all()},
        "exact": {row.get_attribute("data-class"): float(row.get_attribute("data-probability"))
                  for row in card.locator("tr.prob").all()},
    }


def assert_matches_predict(values: dict, row) -> None:
    assert values["decision"] == row["decision"]
    for name, exact in values["exact"].items():
        assert abs(exact - row[f"prob_{name}"]) < 1e-5
        # the page rounds its own number; predict_files' may differ in the last float digits (other batches)
        assert values["shown"][name] == f"{100 * exact:.1f} %"


def test_upload_an_xray_and_a_photo_through_the_page(browser, site, tmp_path):
    url, run_dir, test_paths = site
    xray = Path(next(p for p in test_paths if p.endswith(".png")))
    photo = tmp_path / "holiday_photo.jpg"
    photo.write_bytes(encode(colour_photo(11), ".jpg"))
    expected = predict_files(run_dir, xray).iloc[0]

    page = browser.new_page(viewport={"width": 1100, "height": 900})
    errors = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(url)
    assert "Research software, not a diagnostic device." in page.locator(".disclaimer").inner_text()

    page.set_input_files("#files", [str(xray), str(photo)])
    page.wait_for_selector("#status.done", timeout=60_000)
    cards = page.locator("article.card")
    assert cards.count() == 2
    xray_card = page.locator(f'article.card[data-name="{xray.name}"]')
    assert xray_card.get_attribute("class") == "card ok"
    assert_matches_predict(card_values(xray_card), expected)
    assert xray_card.locator('img[alt="Grad-CAM heatmap"]').evaluate("img => img.naturalWidth") == 320

    photo_card = page.locator(f'article.card[data-name="{photo.name}"]')
    assert photo_card.locator(".ood-title").inner_text() == "Not a chest X-ray this model can judge"
    assert "colour" in photo_card.locator(".ood-warning li").first.inner_text()
    assert photo_card.locator(".decision-value").count() == 0  # no decision for it

    screenshot = tmp_path / "xraylib_serve_page.png"
    page.screenshot(path=str(screenshot), full_page=True)
    print(f"\nscreenshot of the page: {screenshot}")
    assert screenshot.stat().st_size > 10_000
    assert errors == []


def test_drag_and_drop_gives_the_same_prediction(browser, site):
    url, run_dir, test_paths = site
    dicom = Path(next(p for p in test_paths if p.endswith(".dcm")))
    expected = predict_files(run_dir, dicom).iloc[0]
    page = browser.new_page()
    page.goto(url)
    # A drop as a browser makes it: a DataTransfer holding the file, dispatched on the drop zone.
    transfer = page.evaluate_handle(
        """([name, b64]) => {
            const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], name, {type: "application/dicom"}));
            return transfer;
        }""",
        [dicom.name, base64.b64encode(dicom.read_bytes()).decode("ascii")],
    )
    page.dispatch_event("#dropzone", "drop", {"dataTransfer": transfer})
    page.wait_for_selector("#status.done", timeout=60_000)
    assert_matches_predict(card_values(page.locator(f'article.card[data-name="{dicom.name}"]')), expected)


def test_a_refused_upload_shows_the_servers_message(browser, site, tmp_path):
    url, _, _ = site
    note = tmp_path / "notes.png"
    note.write_text("not an image\n")
    page = browser.new_page()
    page.goto(url)
    page.set_input_files("#files", [str(note)])
    page.wait_for_selector("#status.error", timeout=60_000)
    assert "no file could be read" in page.locator("#status").inner_text()
    assert "a text file" in page.locator("article.card.bad .error-msg").inner_text()
