"""`lungserve train`: group split, cached decode, training, calibration, evaluation."""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from export import data as data_mod
from export.calibrate import fit_temperature
from export.metrics import classification_report
from export.model import build_model, logits_model, with_temperature

log = logging.getLogger("lungserve.train")

PARITY_IMAGES = "parity_images.npy"


@dataclass
class TrainConfig:
    data: Path
    out: Path
    input_size: int = 128
    epochs: int = 22
    batch_size: int = 64
    learning_rate: float = 2e-3
    weight_decay: float = 1e-4
    label_smoothing: float = 0.05
    val_fraction: float = 0.2
    seed: int = 1337
    cache_dir: Path | None = None
    allow_image_split: bool = False
    max_steps: int | None = None  # smoke tests: stop after this many steps per epoch


def train(cfg: TrainConfig) -> dict[str, Any]:
    import keras
    import tensorflow as tf

    t0 = time.monotonic()
    cfg.out.mkdir(parents=True, exist_ok=True)
    keras.utils.set_random_seed(cfg.seed)

    ds = data_mod.scan(cfg.data)
    train_s, val_s = data_mod.split_by_group(
        ds, cfg.val_fraction, cfg.seed, allow_image_split=cfg.allow_image_split
    )
    summary = data_mod.summary(ds, train_s, val_s)
    log.info("data: %s", json.dumps(summary))
    cache = cfg.cache_dir if cfg.cache_dir is not None else cfg.out / "cache"
    x_train, y_train = data_mod.load_arrays(train_s, cfg.input_size, cache)
    x_val, y_val = data_mod.load_arrays(val_s, cfg.input_size, cache)
    log.info("decoded %d train / %d val images in %.0f s", len(x_train), len(x_val), time.monotonic() - t0)
    n_classes = len(ds.classes)

    steps = int(np.ceil(len(x_train) / cfg.batch_size))
    if cfg.max_steps is not None:
        steps = min(steps, cfg.max_steps)
    train_ds = (
        tf.data.Dataset.from_tensor_slices((np.asarray(x_train), y_train))
        .shuffle(len(x_train), seed=cfg.seed, reshuffle_each_iteration=True)
        .batch(cfg.batch_size)
        .map(_augment_and_onehot(n_classes, cfg.label_smoothing), num_parallel_calls=tf.data.AUTOTUNE)
        .take(steps)
        .prefetch(tf.data.AUTOTUNE)
    )
    val_ds = (
        tf.data.Dataset.from_tensor_slices((np.asarray(x_val), keras.ops.one_hot(y_val, n_classes)))
        .batch(128)
        .prefetch(tf.data.AUTOTUNE)
    )

    model = build_model(n_classes, cfg.input_size)
    schedule = keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=cfg.learning_rate * 0.1,
        decay_steps=max(1, steps * cfg.epochs - steps),
        warmup_target=cfg.learning_rate,
        warmup_steps=steps,
        alpha=0.01,
    )
    model.compile(
        optimizer=keras.optimizers.AdamW(schedule, weight_decay=cfg.weight_decay),
        loss=keras.losses.CategoricalCrossentropy(),
        metrics=["accuracy"],
    )
    best = cfg.out / "best.keras"
    history = model.fit(
        train_ds,
        validation_data=val_ds,
        epochs=cfg.epochs,
        shuffle=False,  # tf.data already reshuffles each epoch
        verbose=1 if sys.stderr.isatty() else 2,  # a progress bar on a terminal, a line per epoch in a log
        callbacks=[
            keras.callbacks.ModelCheckpoint(best, monitor="val_accuracy", save_best_only=True, mode="max"),
            keras.callbacks.CSVLogger(str(cfg.out / "history.csv")),
        ],
    )
    hist = {k: [float(v) for v in vs] for k, vs in history.history.items()}
    (cfg.out / "history.json").write_text(json.dumps(hist, indent=1))

    model = keras.models.load_model(best)
    val_logits = logits_model(model).predict(x_val, batch_size=128, verbose=0)
    temperature = fit_temperature(val_logits, y_val)
    calibrated = with_temperature(model, temperature)
    calibrated.save(cfg.out / "calibrated.keras")
    raw_probs = _softmax(val_logits)
    cal_probs = _softmax(val_logits / temperature)
    report = classification_report(y_val, cal_probs, ds.classes)
    report["ece_before_calibration"] = classification_report(y_val, raw_probs, ds.classes)["ece"]
    report["temperature"] = temperature

    # A fixed sample of real validation images for the export parity check.
    rng = np.random.default_rng(cfg.seed)
    pick = rng.choice(len(x_val), size=min(64, len(x_val)), replace=False)
    np.save(cfg.out / PARITY_IMAGES, np.asarray(x_val)[np.sort(pick)])

    result = {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
        "classes": ds.classes,
        "data": summary,
        "validation_groups": sorted({s.group for s in val_s}),
        "validation": report,
        "best_epoch": int(np.argmax(hist["val_accuracy"])) + 1,
        "train_seconds": round(time.monotonic() - t0, 1),
    }
    (cfg.out / "training.json").write_text(json.dumps(result, indent=1))
    _plot_history(hist, cfg.out / "training_curves.png")
    log.info(
        "done in %.0f s: val accuracy %.4f, balanced %.4f, ECE %.4f -> %.4f (T=%.3f)",
        result["train_seconds"], report["accuracy"], report["balanced_accuracy"],
        report["ece_before_calibration"], report["ece"], temperature,
    )
    return result


def _augment_and_onehot(n_classes: int, smoothing: float) -> Any:
    import tensorflow as tf

    from export.augment import augment_batch

    def fn(images: Any, labels: Any) -> Any:
        y = tf.one_hot(labels, n_classes) * (1.0 - smoothing) + smoothing / n_classes
        return augment_batch(images), y

    return fn


def _softmax(z: NDArray[np.floating]) -> NDArray[np.float64]:
    e = np.exp(np.asarray(z, dtype=np.float64) - np.max(z, axis=1, keepdims=True))
    out: NDArray[np.float64] = e / e.sum(axis=1, keepdims=True)
    return out


def _plot_history(hist: dict[str, list[float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    epochs = range(1, len(hist["loss"]) + 1)
    ax1.plot(epochs, hist["loss"], label="train")
    ax1.plot(epochs, hist["val_loss"], label="validation")
    ax1.set(title="loss", xlabel="epoch")
    ax2.plot(epochs, hist["accuracy"], label="train")
    ax2.plot(epochs, hist["val_accuracy"], label="validation (unseen groups)")
    ax2.set(title="accuracy", xlabel="epoch")
    for ax in (ax1, ax2):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
