"""Headless Chromium that can reach nothing but 127.0.0.1: what the page and the docs must work with
(hospital networks often have no internet)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.remote.webdriver import WebDriver

from tests.system_tools import require_tool

OFFLINE_FLAGS = (
    "--headless",
    "--no-sandbox",  # CI runs as root
    "--disable-gpu",
    # Every host but loopback is unresolvable.
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
)

# The page tests' browser: offline, plus a window tall enough for the whole page.
PAGE_FLAGS = (
    *OFFLINE_FLAGS,
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,1800",
)


@contextmanager
def page_browser(profile: Path, prefs: dict[str, object] | None = None) -> Iterator[WebDriver]:
    """Selenium on the system's Chromium and ChromeDriver (installed by require_tool, never skipped)."""
    chromium = require_tool("chromium", "chromium")
    driver_path = require_tool("chromedriver", "chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in PAGE_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    if prefs is not None:
        options.add_experimental_option("prefs", prefs)
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()
