"""The page's whole-slide section in real headless Chromium against a real `lungserve serve`.

A tiled BigTIFF made here (real LC25000 originals as tissue cells) is submitted through the
slide picker; the test waits for the job card to say done (the page polls GET /jobs/{id}),
checks the progress bar, the class map and the summary, and clicks the GeoJSON download.
Chromium and its driver come from Debian (`tests/system_tools.require_tool`), as in test_page.py.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from tests.e2e.chromium import page_browser
from tests.e2e.server import start_server, wait_ready
from tests.e2e.test_page import RENDER_TIMEOUT_S
from tests.slides import CELL, cell_image, write_slide

pytestmark = [pytest.mark.e2e, pytest.mark.anyio]


@pytest.fixture
def downloads(tmp_path: Path) -> Path:
    folder = tmp_path / "downloads"
    folder.mkdir()
    return folder


@pytest.fixture
def browser(tmp_path: Path, downloads: Path) -> Iterator[WebDriver]:
    prefs = {"download.default_directory": str(downloads), "download.prompt_for_download": False}
    with page_browser(tmp_path / "chromium-profile", prefs) as driver:
        yield driver


def _slide(originals: Path, path: Path) -> Path:
    """A 10 x 4 tile slide, the four real originals as its tissue."""
    cells = {(1 + 2 * i, 1 + i % 2): cell_image(p) for i, p in enumerate(sorted(originals.glob("*/*.jpeg")))}
    return write_slide(path, 10 * CELL, 4 * CELL, cells)


async def test_the_page_runs_a_slide_job_shows_its_class_map_and_downloads_geojson(
    tmp_path: Path, lc25000_768: Path, browser: WebDriver, downloads: Path
) -> None:
    slide = _slide(lc25000_768, tmp_path / "case-7.tif")
    with start_server(tmp_path, LUNGSERVE_PROVIDER="cpu") as server:
        await wait_ready(server)
        browser.get(server.url + "/")
        WebDriverWait(browser, RENDER_TIMEOUT_S).until(lambda d: "classes" in d.find_element(By.ID, "model-line").text)
        browser.find_element(By.ID, "slide-input").send_keys(str(slide))
        WebDriverWait(browser, RENDER_TIMEOUT_S).until(
            lambda d: d.find_elements(By.CSS_SELECTOR, "#jobs .card[aria-busy=false]")
        )
        card = browser.find_element(By.CSS_SELECTOR, "#jobs .card")
        assert card.get_attribute("data-state") == "done", card.text
        bar = card.find_element(By.TAG_NAME, "progress")
        assert bar.get_attribute("value") == bar.get_attribute("max") == "40"
        assert "Done: 40 tiles" in card.text
        class_map = card.find_element(By.CSS_SELECTOR, "img.class-map")
        assert browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", class_map) > 0
        assert "4 tissue tiles" in card.find_element(By.CSS_SELECTOR, ".job-summary").text

        card.find_element(By.CSS_SELECTOR, "button.job-geojson").click()
        target = downloads / "case-7.geojson"
        WebDriverWait(browser, RENDER_TIMEOUT_S).until(lambda d: target.exists() and target.stat().st_size > 0)
        collection = json.loads(target.read_text())
        assert collection["type"] == "FeatureCollection"
        assert len(collection["features"]) == 4

        # Offline: every resource the page loaded came from lungserve itself.
        resources = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
        assert all(r.startswith((server.url, "data:", "blob:")) for r in resources), resources
