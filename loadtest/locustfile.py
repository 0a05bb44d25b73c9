"""Locust load test for lungserve: `/predict` (one image) and `/predict-many` (N images).

    .venv/bin/locust -f loadtest/locustfile.py --headless -u 32 -r 8 -t 60s \
        --host http://127.0.0.1:8000 --csv out/lungserve --html out/lungserve.html

Settings are flags or LOADTEST_* environment variables (images, image limit, N, weights, think
time; docs/benchmarks/METHOD.md). Every response is checked (200 and a label per image); any
failure, or a run that sent nothing, makes Locust exit non-zero.
"""

from __future__ import annotations

import io
import json
import logging
import random
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
from locust import FastHttpUser, events, task
from locust.env import Environment
from PIL import Image

log = logging.getLogger("loadtest")

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp"})
_CONTENT_TYPES = {
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".png": "image/png",
    ".tif": "image/tiff",
    ".tiff": "image/tiff",
    ".bmp": "image/bmp",
}


@dataclass(frozen=True)
class Upload:
    """One image, ready to be put in a multipart body."""

    filename: str
    content_type: str
    data: bytes


@dataclass(frozen=True)
class Options:
    many_n: int
    predict_weight: float
    many_weight: float
    wait_min: float
    wait_max: float


# Filled once by `_load_images` at test start, shared read-only by every user (greenlets).
_UPLOADS: list[Upload] = []
_PREDICT_BODIES: list[tuple[bytes, str]] = []
_OPTIONS = Options(many_n=8, predict_weight=3.0, many_weight=1.0, wait_min=0.0, wait_max=0.0)


def synthetic_uploads(seed: int = 0) -> list[Upload]:
    """A small default set: H&E-coloured noise as 768 px and 224 px JPEGs plus one PNG.

    Not tissue, so the labels are meaningless; it exercises decode (incl. JPEG draft mode on
    the large ones), resize and inference without needing the real data set.
    """
    rng = np.random.default_rng(seed)
    uploads: list[Upload] = []
    for i, (size, fmt) in enumerate([(768, "JPEG"), (768, "JPEG"), (224, "JPEG"), (224, "JPEG"), (300, "PNG")]):
        base = np.array([200, 120, 180], dtype=np.float64)  # pink/purple, like eosin/haematoxylin
        noise = rng.normal(0.0, 40.0, size=(size // 8, size // 8, 3))
        small = np.clip(base + noise, 0, 255).astype(np.uint8)
        img = Image.fromarray(small, mode="RGB").resize((size, size), Image.Resampling.BILINEAR)
        buf = io.BytesIO()
        img.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
        suffix = ".jpeg" if fmt == "JPEG" else ".png"
        uploads.append(Upload(f"synthetic-{i}{suffix}", _CONTENT_TYPES[suffix], buf.getvalue()))
    return uploads


def read_uploads(folder: Path, limit: int) -> list[Upload]:
    """Up to `limit` image files under `folder`, in a fixed (sorted) order."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {folder}")
    # Spread the picks over the whole (class-ordered) listing, not just the first class.
    step = max(1, len(files) // limit)
    picked = files[::step][:limit]
    return [Upload(p.name, _CONTENT_TYPES[p.suffix.lower()], p.read_bytes()) for p in picked]


def multipart(field: str, uploads: list[Upload]) -> tuple[bytes, str]:
    """(body, content-type) of a multipart/form-data request with one part per upload."""
    boundary = uuid.uuid4().hex
    parts: list[bytes] = []
    for up in uploads:
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{up.filename}"\r\n'
            f"Content-Type: {up.content_type}\r\n\r\n".encode()
        )
        parts.append(up.data)
        parts.append(b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def _add_arguments(parser: Any) -> None:
    group = parser.add_argument_group("lungserve load test")
    group.add_argument(
        "--images",
        type=str,
        env_var="LOADTEST_IMAGES",
        default="",
        help="folder of images (empty: a synthetic set made in memory)",
    )
    group.add_argument(
        "--image-limit",
        type=int,
        env_var="LOADTEST_IMAGE_LIMIT",
        default=256,
        help="read at most this many files from --images",
    )
    group.add_argument(
        "--many-n", type=int, env_var="LOADTEST_MANY_N", default=8, help="images per /predict-many request"
    )
    group.add_argument(
        "--predict-weight",
        type=float,
        env_var="LOADTEST_PREDICT_WEIGHT",
        default=3.0,
        help="relative share of /predict requests",
    )
    group.add_argument(
        "--many-weight",
        type=float,
        env_var="LOADTEST_MANY_WEIGHT",
        default=1.0,
        help="relative share of /predict-many requests",
    )
    group.add_argument(
        "--wait-min",
        type=float,
        env_var="LOADTEST_WAIT_MIN",
        default=0.0,
        help="shortest think time between a user's requests (s)",
    )
    group.add_argument(
        "--wait-max",
        type=float,
        env_var="LOADTEST_WAIT_MAX",
        default=0.0,
        help="longest think time between a user's requests (s)",
    )


def _load_images(environment: Environment, **_kwargs: Any) -> None:
    """Read (or make) the images once, before any user starts, and pre-build /predict bodies."""
    global _OPTIONS
    opts = environment.parsed_options
    if opts is None:  # used as a library without the CLI: keep the defaults
        folder, limit = "", 256
    else:
        folder, limit = str(opts.images), int(opts.image_limit)
        _OPTIONS = Options(
            many_n=int(opts.many_n),
            predict_weight=float(opts.predict_weight),
            many_weight=float(opts.many_weight),
            wait_min=float(opts.wait_min),
            wait_max=max(float(opts.wait_min), float(opts.wait_max)),
        )
    if (
        _OPTIONS.many_n < 1
        or _OPTIONS.predict_weight < 0
        or _OPTIONS.many_weight < 0
        or (_OPTIONS.predict_weight + _OPTIONS.many_weight <= 0)
    ):
        raise ValueError(f"invalid load-test options: {_OPTIONS}")
    uploads = read_uploads(Path(folder), limit) if folder else synthetic_uploads()
    _UPLOADS[:] = uploads
    _PREDICT_BODIES[:] = [multipart("file", [up]) for up in uploads]
    log.info("loadtest: %d images (%s), options %s", len(uploads), folder or "synthetic", _OPTIONS)


def _fail_on_error(environment: Environment, **_kwargs: Any) -> None:
    """Any failed request fails the run; so does a run that sent nothing (server never reached)."""
    total = environment.stats.total
    if total.num_failures > 0:
        log.error("loadtest: %d of %d requests failed", total.num_failures, total.num_requests)
        environment.process_exit_code = 1
    elif total.num_requests == 0:
        log.error("loadtest: no request was sent")
        environment.process_exit_code = 1


# Registered by call, not as decorators: Locust's add_listener is untyped (mypy --strict).
events.init_command_line_parser.add_listener(_add_arguments)  # type: ignore[no-untyped-call]
events.test_start.add_listener(_load_images)  # type: ignore[no-untyped-call]
events.quitting.add_listener(_fail_on_error)  # type: ignore[no-untyped-call]


def _check_prediction(item: Any) -> str | None:
    """None when `item` is a prediction, else what is wrong with it."""
    if not isinstance(item, dict):
        return f"expected a JSON object, got {type(item).__name__}"
    if not isinstance(item.get("label"), str) or not item["label"]:
        return f"no label in {str(item)[:200]}"
    return None


class LungserveUser(FastHttpUser):
    """One client: picks /predict or /predict-many by the configured weights, then waits."""

    # Connections are kept alive; a slow server must not turn into client-side timeouts.
    network_timeout = 120.0
    connection_timeout = 10.0

    def wait_time(self) -> float:
        return random.uniform(_OPTIONS.wait_min, _OPTIONS.wait_max)

    @task
    def predict_or_many(self) -> None:
        total = _OPTIONS.predict_weight + _OPTIONS.many_weight
        if random.random() * total < _OPTIONS.predict_weight:
            self.predict()
        else:
            self.predict_many()

    def predict(self) -> None:
        body, content_type = random.choice(_PREDICT_BODIES)
        with self.client.post(
            "/predict",
            data=cast(Any, body),  # geventhttpclient sends bytes as they are
            headers={"Content-Type": content_type},
            name="/predict",
            catch_response=True,
        ) as resp:
            problem = self._problem(resp.status_code, resp.text)
            if problem is None:
                try:
                    problem = _check_prediction(json.loads(resp.text or ""))
                except ValueError as exc:
                    problem = f"invalid JSON: {exc}"
            if problem is None:
                resp.success()
            else:
                resp.failure(problem)

    def predict_many(self) -> None:
        n = _OPTIONS.many_n
        picked = random.choices(_UPLOADS, k=n)
        body, content_type = multipart("files", picked)
        with self.client.post(
            "/predict-many",
            data=cast(Any, body),
            headers={"Content-Type": content_type},
            name=f"/predict-many (n={n})",
            catch_response=True,
        ) as resp:
            problem = self._problem(resp.status_code, resp.text)
            if problem is None:
                try:
                    results = json.loads(resp.text or "").get("results")
                except (ValueError, AttributeError) as exc:
                    results, problem = None, f"invalid JSON: {exc}"
                if problem is None:
                    if not isinstance(results, list) or len(results) != n:
                        problem = f"expected {n} results, got {str(results)[:200]}"
                    else:
                        problem = next((p for p in map(_check_prediction, results) if p), None)
            if problem is None:
                resp.success()
            else:
                resp.failure(problem)

    @staticmethod
    def _problem(status: int | None, text: str | None) -> str | None:
        if status != 200:
            return f"HTTP {status}: {(text or '')[:200]}"
        return None
