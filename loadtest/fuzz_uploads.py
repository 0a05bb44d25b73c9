"""Mutated images against a running lungserve: every answer must be a 2xx or a JSON 4xx (or a
503 under load), and the server must stay up.

    python loadtest/fuzz_uploads.py --url http://127.0.0.1:8000 --seed 1 --uploads 250

Seeds are real files of the kinds the server reads: tiled zlib and uncompressed TIFFs (OpenSlide's
generic-tiff), a two-level pyramid, a PNG and a large JPEG. Each upload is one of them with random
bytes changed, a random cut, a zeroed run or a damaged header, sent to /analyze, /predict or
/explain. Prints the status counts, then one line per 5xx, and saves each 5xx's file next to
--out-dir. Exit status 1 on any 5xx other than 503 or when the server stops answering.
Everything is loopback and bounded by --uploads.
"""

from __future__ import annotations

import argparse
import collections
import io
import random
import sys
from pathlib import Path

import httpx
import numpy as np
import tifffile
from PIL import Image

PATHS = ("/analyze", "/analyze", "/predict", "/explain")  # slides are where the readers differ


def seeds() -> dict[str, bytes]:
    rng = np.random.default_rng(0)

    def tiff(side: int, compression: str | None) -> bytes:
        buffer = io.BytesIO()
        pixels = rng.integers(0, 255, (side, side, 3), np.uint8)
        tifffile.imwrite(buffer, pixels, tile=(256, 256), compression=compression, photometric="rgb")
        return buffer.getvalue()

    def pyramid() -> bytes:
        buffer = io.BytesIO()
        pixels = rng.integers(0, 255, (1024, 1024, 3), np.uint8)
        with tifffile.TiffWriter(buffer) as tif:
            tif.write(pixels, tile=(256, 256), compression="zlib", photometric="rgb", subifds=1)
            tif.write(pixels[::2, ::2], tile=(256, 256), compression="zlib", photometric="rgb", subfiletype=1)
        return buffer.getvalue()

    def pillow(side: int, fmt: str) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (side, side, 3), np.uint8)).save(buffer, fmt)
        return buffer.getvalue()

    return {
        "tiff-zlib": tiff(1024, "zlib"),
        "tiff-raw": tiff(800, None),
        "pyramid": pyramid(),
        "png": pillow(900, "PNG"),
        "jpeg": pillow(1600, "JPEG"),
    }


def mutate(data: bytes, rng: random.Random) -> bytes:
    out = bytearray(data)
    kind = rng.choice(["flip", "cut", "zero", "header"])
    if kind == "flip":
        for _ in range(rng.randint(1, 20)):
            out[rng.randrange(len(out))] = rng.randrange(256)
    elif kind == "cut":
        del out[rng.randrange(16, len(out)) :]
    elif kind == "zero":
        start = rng.randrange(len(out))
        end = min(len(out), start + rng.randint(1, 4096))
        out[start:end] = bytes(end - start)
    else:
        for _ in range(rng.randint(1, 6)):
            out[rng.randrange(min(400, len(out)))] = rng.randrange(256)
    return bytes(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--uploads", type=int, default=250)
    parser.add_argument("--out-dir", type=Path, default=Path("."), help="where a 5xx's upload is saved")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    files = seeds()
    counts: collections.Counter[tuple[str, int]] = collections.Counter()
    failures = 0
    with httpx.Client(base_url=args.url, timeout=120.0) as client:
        for i in range(args.uploads):
            name = rng.choice(sorted(files))
            data = mutate(files[name], rng)
            path = rng.choice(PATHS)
            try:
                response = client.post(path, files={"file": ("x.img", data, "application/octet-stream")})
            except httpx.TransportError as exc:
                saved = args.out_dir / f"fuzz-{args.seed}-{i}-{name}.bin"
                saved.write_bytes(data)
                print(f"upload {i} ({name} to {path}): no answer ({exc!r}); the server may be down: {saved}")
                return 1
            counts[(path, response.status_code)] += 1
            json_error = response.headers.get("content-type", "").startswith("application/json")
            if (response.status_code >= 500 and response.status_code != 503) or (
                response.status_code >= 400 and not json_error
            ):
                failures += 1
                saved = args.out_dir / f"fuzz-{args.seed}-{i}-{name}.bin"
                saved.write_bytes(data)
                print(f"upload {i} ({name} to {path}): {response.status_code} {response.text[:200]} -> {saved}")
    for (path, status), n in sorted(counts.items()):
        print(f"{path} {status}: {n}")
    print(f"{args.uploads} uploads, {failures} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
