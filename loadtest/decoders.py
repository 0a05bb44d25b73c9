"""Compare JPEG decoders for the serving path: time per image and parity with the training path.

    .venv/bin/python loadtest/decoders.py [--seconds 3] [--against <other checkout>]

For the 768 px originals (../shared/data/lc25000-lung-768) and 64 of the 224 px tiles
(../shared/data/lc25000-lung), each candidate decodes to RGB (DCT-domain downscaled where the
source is >= 2x the model input, as `service.model.preprocess` does) and resizes with Pillow's
bilinear filter to the model input. Reported per decoder: median and minimum wall time per
image and median CPU time per image (one thread, the decoders in alternating rounds so that a
busy machine slows them alike; CPU time moves least with the machine's load), the largest pixel
difference from Pillow's path of `service.model.preprocess.load_image` and the largest change of
any class probability of the bundled model.

Candidates: `load_image` as served and trained (its simplejpeg fast path for these files),
`load_image`'s Pillow path (`large_pixels=0`: Pillow with JPEG draft, the decode before the fast
path), simplejpeg alone and OpenCV (`IMREAD_REDUCED_COLOR_4` for the originals). `--against`
adds the `load_image` of another checkout (e.g. main), loaded from its
`service/model/preprocess.py` (the modules that file imports come from this checkout). Needs the
`dev` extra.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import onnxruntime as ort
import simplejpeg  # type: ignore[import-untyped]  # no stubs; three calls
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from service.model.preprocess import load_image  # noqa: E402

SIZE = 128
Array = np.ndarray[Any, Any]


def _resize(rgb: Array) -> Array:
    return np.asarray(Image.fromarray(rgb).resize((SIZE, SIZE), Image.Resampling.BILINEAR))


def served(data: bytes) -> Array:
    return load_image(data, SIZE)


def pillow_draft(data: bytes) -> Array:
    return load_image(data, SIZE, large_pixels=0)


def load_image_of(checkout: Path) -> Callable[[bytes], Array]:
    """`load_image` from another checkout's service/model/preprocess.py."""
    spec = importlib.util.spec_from_file_location(
        "preprocess_against", checkout / "service" / "model" / "preprocess.py"
    )
    if spec is None or spec.loader is None:
        raise SystemExit(f"no service/model/preprocess.py under {checkout}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    other: Callable[[bytes, int], Array] = module.load_image
    return lambda data: other(data, SIZE)


def simplejpeg_scaled(data: bytes) -> Array:
    height, width, _, _ = simplejpeg.decode_jpeg_header(data)
    scaled = min(height, width) >= 2 * SIZE
    kwargs: dict[str, Any] = {"min_height": SIZE, "min_width": SIZE} if scaled else {}
    return _resize(simplejpeg.decode_jpeg(data, colorspace="RGB", fastdct=False, fastupsample=False, **kwargs))


def opencv_reduced(data: bytes) -> Array:
    with Image.open(io.BytesIO(data)) as probe:  # the header only: the size decides the scale
        scale = 4 if min(probe.size) >= 4 * SIZE else 2 if min(probe.size) >= 2 * SIZE else 1
    flag = {4: cv2.IMREAD_REDUCED_COLOR_4, 2: cv2.IMREAD_REDUCED_COLOR_2, 1: cv2.IMREAD_COLOR}[scale]
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), flag)
    if bgr is None:
        raise ValueError("OpenCV could not decode the image")
    return _resize(np.asarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=3.0, help="timing per decoder and image set")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--against", type=Path, help="another checkout whose load_image is timed too")
    args = parser.parse_args(argv)
    cv2.setNumThreads(1)
    model = ROOT / "service" / "bundled_model" / "model.onnx"
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    decoders: dict[str, Callable[[bytes], Array]] = {
        "load_image": served,
        "pillow-draft": pillow_draft,
        "simplejpeg": simplejpeg_scaled,
        "opencv-reduced": opencv_reduced,
    }
    if args.against is not None:
        decoders[f"load_image of {args.against}"] = load_image_of(args.against)
    sets = {
        "768 originals": sorted((args.data / "lc25000-lung-768").rglob("*.jpeg")),
        "224 tiles": sorted((args.data / "lc25000-lung").glob("lung_*/*.jpeg")),
    }
    print(
        "| images | decoder | median ms/image | min ms/image | median CPU ms/image | max pixel diff "
        "| max probability diff |"
    )
    print("|---|---|---:|---:|---:|---:|---:|")
    for name, paths in sets.items():
        paths = paths[:: max(1, len(paths) // 64)][:64]
        data = [p.read_bytes() for p in paths]
        reference = np.stack([pillow_draft(d) for d in data])
        ref_probs = session.run(None, {"image": reference})[0]
        times, cpu = _alternating_times(decoders, data, args.seconds * len(decoders))
        for label, decode in decoders.items():
            out = np.stack([decode(d) for d in data])
            probs = session.run(None, {"image": out})[0]
            pixel = int(np.abs(out.astype(np.int16) - reference.astype(np.int16)).max())
            print(
                f"| {name} | {label} | {statistics.median(times[label]) * 1e3:.3f} | {min(times[label]) * 1e3:.3f} | "
                f"{statistics.median(cpu[label]) * 1e3:.3f} | {pixel} | {float(np.abs(probs - ref_probs).max()):.5f} |"
            )
    return 0


Times = dict[str, list[float]]


def _alternating_times(
    decoders: dict[str, Callable[[bytes], Array]], data: list[bytes], seconds: float
) -> tuple[Times, Times]:
    """Wall and CPU seconds per image of each decoder, one round over the images per decoder in turn."""
    wall: Times = {label: [] for label in decoders}
    cpu: Times = {label: [] for label in decoders}
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        for label, decode in decoders.items():
            for d in data:
                t0, c0 = time.perf_counter(), time.thread_time()
                decode(d)
                cpu[label].append(time.thread_time() - c0)
                wall[label].append(time.perf_counter() - t0)
    return wall, cpu


if __name__ == "__main__":
    sys.exit(main())
