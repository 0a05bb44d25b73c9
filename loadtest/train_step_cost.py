"""Training-step and inference cost of candidate input sizes and widths (chooses the model's shape).

Run on a quiet machine (needs the `export` extra):

    .venv/bin/python loadtest/train_step_cost.py

Prints a markdown table: seconds per training step (batch 64), minutes per epoch on the ~9,900
training images of the group split, and Keras inference ms per image, each relative to the
shipped configuration measured in the same run.
"""

from __future__ import annotations

import time

import numpy as np

BATCH = 64
TRAIN_IMAGES = 9930
CANDIDATES: list[tuple[int, tuple[int, ...]]] = [
    (128, (16, 32, 64, 128, 256)),  # shipped
    (128, (32, 64, 128, 256)),
    (112, (32, 64, 128, 256)),
    (96, (16, 32, 64, 128, 256)),
    (160, (16, 32, 64, 128, 256)),
]


def measure(size: int, filters: tuple[int, ...], steps: int = 4) -> tuple[float, float]:
    import keras

    from export.model import build_model

    model = build_model(3, size, filters=filters)
    model.compile(optimizer="adam", loss="categorical_crossentropy", jit_compile=False)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (BATCH, size, size, 3), dtype=np.uint8)
    y = np.eye(3, dtype=np.float32)[rng.integers(0, 3, BATCH)]
    for _ in range(2):  # warm-up: graph tracing
        model.train_on_batch(x, y)
        model.predict_on_batch(x)
    t0 = time.perf_counter()
    for _ in range(steps):
        model.train_on_batch(x, y)
    step = (time.perf_counter() - t0) / steps
    t0 = time.perf_counter()
    for _ in range(steps):
        model.predict_on_batch(x)
    infer_ms = (time.perf_counter() - t0) / steps / BATCH * 1000
    keras.backend.clear_session()
    return step, infer_ms


def main() -> None:
    rows = [(size, filters, *measure(size, filters)) for size, filters in CANDIDATES]
    base_step, base_infer = rows[0][2], rows[0][3]
    print("| input | filters | s/step (64) | min/epoch | x shipped | infer ms/img | x shipped |")
    print("|---|---|---|---|---|---|---|")
    for size, filters, step, infer in rows:
        epoch_min = TRAIN_IMAGES / BATCH * step / 60
        print(
            f"| {size} | {'/'.join(map(str, filters))} | {step:.3f} | {epoch_min:.1f} | "
            f"{step / base_step:.2f} | {infer:.2f} | {infer / base_infer:.2f} |"
        )


if __name__ == "__main__":
    main()
