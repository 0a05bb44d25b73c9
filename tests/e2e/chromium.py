"""Headless Chromium that can reach nothing but 127.0.0.1: what the page and the docs must work with
(hospital networks often have no internet)."""

OFFLINE_FLAGS = (
    "--headless",
    "--no-sandbox",  # CI runs as root
    "--disable-gpu",
    # Every host but loopback is unresolvable.
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
)
