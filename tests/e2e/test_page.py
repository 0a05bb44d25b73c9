"""The page at / in real headless Chromium against a real `lungserve serve`.

Real images are uploaded through the page's file input; the test waits for the results to
render (labels, probability bars, the class map of a large image), turns the Grad-CAM
overlay on, reads the CSV export, and saves a screenshot. Chromium and its driver come from
Debian (`tests/system_tools.require_tool`), so this runs in CI and never skips there.

`LUNGSERVE_PAGE_SCREENSHOT=docs/page.png` also writes the screenshot there (the README's), and
`LUNGSERVE_PAGE_TEST_MODEL=DIR` serves that model instead.
"""

from __future__ import annotations

import csv
import io
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from service.model.manifest import Manifest
from tests.conftest import BUNDLED_MODEL
from tests.e2e.chromium import page_browser
from tests.e2e.server import start_server, wait_ready

pytestmark = [pytest.mark.e2e, pytest.mark.anyio]

RENDER_TIMEOUT_S = 90.0


def _model_dir() -> Path:
    """LUNGSERVE_PAGE_TEST_MODEL if set, else the bundled model, which must have the Grad-CAM outputs:
    the page is tested with the model users get, so a model without them fails here."""
    chosen = os.environ.get("LUNGSERVE_PAGE_TEST_MODEL")
    model = Path(chosen) if chosen else BUNDLED_MODEL
    manifest = Manifest.read(model / "model.json")
    outputs = [o.name for o in onnx.load(str(model / manifest.file), load_external_data=False).graph.output]
    assert manifest.cam_outputs(outputs) is not None, f"{model} has no Grad-CAM outputs: /explain is off"
    return model


def _blank_slide(out: Path) -> Path:
    """Background glass only: the refer decision must be shown, not a confident label."""
    Image.new("RGB", (224, 224), (242, 240, 244)).save(out, quality=92)
    return out


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[WebDriver]:
    with page_browser(tmp_path / "chromium-profile") as driver:
        yield driver


def _mosaic(originals: list[Path], out: Path) -> Path:
    canvas = np.zeros((1536, 1536, 3), dtype=np.uint8)
    for (x, y), path in zip(((0, 0), (768, 0), (0, 768), (768, 768)), originals, strict=True):
        canvas[y : y + 768, x : x + 768] = np.asarray(Image.open(path).convert("RGB"))
    Image.fromarray(canvas).save(out, quality=92)
    return out


def _originals(folder: Path) -> list[Path]:
    return sorted(folder.glob("*/*.jpeg"))


def _cards_done(driver: WebDriver, n: int) -> bool:
    done: int = driver.execute_script("return document.querySelectorAll('#results .card[aria-busy=false]').length")
    return done == n


async def test_the_page_classifies_explains_and_maps_real_images(
    tmp_path: Path, lc25000_768: Path, browser: WebDriver
) -> None:
    originals = _originals(lc25000_768)
    tiles = originals[:2]
    large = _mosaic(originals, tmp_path / "mosaic.jpeg")
    blank = _blank_slide(tmp_path / "blank.jpeg")
    model = _model_dir()
    with start_server(tmp_path, LUNGSERVE_MODEL_URI=str(model), LUNGSERVE_PROVIDER="cpu") as server:
        await wait_ready(server)
        browser.get(server.url + "/")
        WebDriverWait(browser, RENDER_TIMEOUT_S).until(lambda d: "classes" in d.find_element(By.ID, "model-line").text)

        # The model's published accuracy on unseen tissue groups, or that it has none.
        estimate = Manifest.read(model / "model.json").estimate
        estimate_line = browser.find_element(By.ID, "model-estimate").text
        if estimate is None:
            assert "publishes no accuracy estimate" in estimate_line
        else:
            assert f"{100 * estimate.accuracy:.1f}%" in estimate_line
            assert f"{estimate.groups} groups" in estimate_line

        # Keyboard: the first Tab reaches the image picker.
        browser.find_element(By.TAG_NAME, "body").send_keys(Keys.TAB)
        assert browser.switch_to.active_element.get_attribute("id") == "file-input"

        browser.find_element(By.ID, "file-input").send_keys("\n".join(str(p) for p in [*tiles, blank, large]))
        WebDriverWait(browser, RENDER_TIMEOUT_S).until(lambda d: _cards_done(d, 4))

        cards = browser.find_elements(By.CSS_SELECTOR, "#results .card")
        classes = {"lung_aca", "lung_n", "lung_scc"}
        for card in cards[:2]:
            assert not card.find_elements(By.CSS_SELECTOR, ".error"), card.text
            assert card.find_element(By.CSS_SELECTOR, ".label-line strong").text in classes
            meters = card.find_elements(By.CSS_SELECTOR, "[role=meter]")
            assert len(meters) == 3
            total = sum(float(m.get_attribute("aria-valuenow") or "nan") for m in meters)
            assert total == pytest.approx(100.0, abs=0.5)

        # The blank slide is referred, and the page highlights it instead of showing a confident label.
        blank_card = cards[2]
        assert not blank_card.find_elements(By.CSS_SELECTOR, ".error"), blank_card.text
        assert "refer" in (blank_card.get_attribute("class") or "").split()
        assert blank_card.find_element(By.CSS_SELECTOR, ".decision.refer").is_displayed()
        assert "Refer" in blank_card.find_element(By.CSS_SELECTOR, ".decision.refer").text

        # The large image went to /analyze: its class map rendered, with 4 tiles in the summary.
        mosaic_card = cards[3]
        assert "large" in (mosaic_card.get_attribute("class") or "")
        class_map = mosaic_card.find_element(By.CSS_SELECTOR, "img.class-map")
        assert browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", class_map) > 0
        assert "4 tiles of" in mosaic_card.text
        assert len(mosaic_card.find_elements(By.CSS_SELECTOR, "table.summary tbody tr")) == 3

        # Grad-CAM overlay: toggle on, wait for the PNG from /explain to be shown.
        button = cards[0].find_element(By.CSS_SELECTOR, "button.gradcam")
        button.send_keys(Keys.ENTER)  # keyboard, as a user without a mouse would
        WebDriverWait(browser, RENDER_TIMEOUT_S).until(lambda d: button.get_attribute("aria-pressed") == "true")
        overlay = cards[0].find_element(By.CSS_SELECTOR, ".figure img")
        assert (overlay.get_attribute("src") or "").startswith("data:image/png;base64,")
        WebDriverWait(browser, RENDER_TIMEOUT_S).until(
            lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", overlay)
        )
        assert "Grad-CAM" in (overlay.get_attribute("alt") or "")

        # CSV export: one row per file, probabilities and the class shares of the large image.
        rows = list(csv.DictReader(io.StringIO(browser.execute_script("return window.lungserve.toCsv()"))))
        assert [r["file"] for r in rows] == [p.name for p in [*tiles, blank, large]]
        assert [r["kind"] for r in rows] == ["tile", "tile", "tile", "large image"]
        for row in rows[:3]:
            assert sum(float(row[f"p_{c}"]) for c in classes) == pytest.approx(1.0, abs=1e-3)
        assert rows[2]["decision"] == "refer"
        assert rows[3]["tiles"] == "4"
        assert sum(float(rows[3][f"tissue_share_{c}"]) for c in classes) == pytest.approx(1.0, abs=1e-3)

        # Offline: every resource the page loaded came from lungserve itself.
        resources = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
        assert resources
        assert all(r.startswith((server.url, "data:", "blob:")) for r in resources), resources

        shot = tmp_path / "page.png"
        height = browser.execute_script("return document.documentElement.scrollHeight")
        browser.set_window_size(1280, min(int(height) + 40, 4000))
        assert browser.save_screenshot(str(shot))
        target = os.environ.get("LUNGSERVE_PAGE_SCREENSHOT")
        if target:
            shutil.copyfile(shot, target)


async def test_the_page_asks_for_an_api_key_and_sends_it(tmp_path: Path, lc25000_768: Path, browser: WebDriver) -> None:
    keys = tmp_path / "keys"
    keys.write_text("lab:page-test-key-0123456789\n")
    tile = _originals(lc25000_768)[0]
    with start_server(tmp_path, LUNGSERVE_API_KEYS_FILE=str(keys), LUNGSERVE_PROVIDER="cpu") as server:
        await wait_ready(server)
        browser.get(server.url + "/")  # the page is open; the API behind it is not
        form = browser.find_element(By.ID, "key-form")
        WebDriverWait(browser, RENDER_TIMEOUT_S).until(lambda d: form.is_displayed())
        assert browser.switch_to.active_element.get_attribute("id") == "api-key"
        browser.switch_to.active_element.send_keys("page-test-key-0123456789", Keys.ENTER)
        WebDriverWait(browser, RENDER_TIMEOUT_S).until(lambda d: "classes" in d.find_element(By.ID, "model-line").text)
        assert not form.is_displayed()
        browser.find_element(By.ID, "file-input").send_keys(str(tile))
        WebDriverWait(browser, RENDER_TIMEOUT_S).until(lambda d: _cards_done(d, 1))
        card = browser.find_element(By.CSS_SELECTOR, "#results .card")
        assert not card.find_elements(By.CSS_SELECTOR, ".error"), card.text
        assert card.find_element(By.CSS_SELECTOR, ".label-line strong").text in {"lung_aca", "lung_n", "lung_scc"}
