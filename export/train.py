"""`lungserve train`: 3-way group split, cached decode, training with EMA weights, checkpoints
every epoch (resumable), checkpoint choice and calibration on the select groups.

The test groups are not loaded here at all: nothing in training can depend on them.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from export import data as data_mod
from export.augment import AugmentConfig
from export.calibrate import fit_temperature, nll
from export.checkpoint import BEST_EMA as BEST_EMA
from export.checkpoint import EMA as EMA
from export.checkpoint import LAST as LAST
from export.checkpoint import STATE as STATE
from export.checkpoint import WeightEMA as WeightEMA
from export.checkpoint import checkpoint, pending, recover, write_json
from export.model import build_model, logits_model, with_temperature
from export.scoring import classification_report

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
    val_fraction: float = 0.2  # share of each class's groups held out (then halved: select, test)
    split_from: Path | None = None  # a model.json whose `validation_groups` are the holdout
    ema_decay: float = 0.998
    seed: int = 1337
    cache_dir: Path | None = None
    allow_image_split: bool = False
    resume: bool = False
    max_steps: int | None = None  # smoke tests: stop after this many steps per epoch
    augment: AugmentConfig = field(default_factory=AugmentConfig)


def make_split(cfg: TrainConfig, ds: data_mod.Dataset) -> data_mod.Split:
    if cfg.split_from is not None:
        holdout = json.loads(Path(cfg.split_from).read_text()).get("validation_groups")
        if not holdout:
            raise data_mod.DataError(f"{cfg.split_from} records no validation_groups to hold out")
        return data_mod.split_three_way(ds, holdout, cfg.seed)
    return data_mod.holdout_split(ds, cfg.val_fraction, cfg.seed, allow_image_split=cfg.allow_image_split)


def _ema_callback(model: Any, ema: WeightEMA) -> Any:
    import keras

    class _Cb(keras.callbacks.Callback):  # type: ignore[misc]
        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            ema.update(model.get_weights())

    return _Cb()


def _epoch_dataset(
    x: NDArray[np.uint8], y: NDArray[np.int64], cfg: TrainConfig, epoch: int, n_classes: int, steps: int
) -> Any:
    """The epoch's batches: a permutation fixed by (seed, epoch), so a resumed run sees the same order."""
    import tensorflow as tf

    from export.augment import augment_batch

    perm = np.random.default_rng([cfg.seed, epoch]).permutation(len(x))
    bs = cfg.batch_size

    def batches() -> Any:
        for i in range(steps):
            idx = np.sort(perm[i * bs : (i + 1) * bs])
            yield x[idx], y[idx]

    size = cfg.input_size
    smoothing = cfg.label_smoothing

    def aug(images: Any, labels: Any) -> Any:
        t = tf.one_hot(labels, n_classes) * (1.0 - smoothing) + smoothing / n_classes
        return augment_batch(images, cfg.augment), t

    sig = (
        tf.TensorSpec((None, size, size, 3), tf.uint8),
        tf.TensorSpec((None,), tf.int64),
    )
    return (
        tf.data.Dataset.from_generator(batches, output_signature=sig)
        .apply(tf.data.experimental.assert_cardinality(steps))
        .map(aug, num_parallel_calls=2)
        .prefetch(2)
    )


def _score(model: Any, x: NDArray[np.uint8], y: NDArray[np.int64]) -> tuple[float, float, NDArray[Any]]:
    logits = np.asarray(logits_model(model).predict(x, batch_size=128, verbose=0), dtype=np.float64)
    return float((logits.argmax(1) == y).mean()), nll(logits, y, 1.0), logits


def train(cfg: TrainConfig) -> dict[str, Any]:

    t0 = time.monotonic()
    cfg.out.mkdir(parents=True, exist_ok=True)
    ds = data_mod.scan(cfg.data)
    split = make_split(cfg, ds)
    summary = data_mod.split_summary(ds, split)
    log.info("data: %s", json.dumps(summary))
    cache = cfg.cache_dir if cfg.cache_dir is not None else cfg.out / "cache"
    x_train, y_train = data_mod.load_arrays(split.train, cfg.input_size, cache)
    x_sel, y_sel = data_mod.load_arrays(split.select, cfg.input_size, cache)
    x_train, x_sel = np.asarray(x_train), np.asarray(x_sel)
    log.info("decoded %d train / %d select images in %.0f s", len(x_train), len(x_sel), time.monotonic() - t0)
    state = run_epochs(cfg, x_train, y_train, x_sel, y_sel, len(ds.classes))
    return finish(cfg, ds, split, summary, x_sel, y_sel, state, t0)


def run_epochs(
    cfg: TrainConfig,
    x_train: NDArray[np.uint8],
    y_train: NDArray[np.int64],
    x_sel: NDArray[np.uint8],
    y_sel: NDArray[np.int64],
    n_classes: int,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """The epochs of a run in `cfg.out`: fresh or resumed, a whole checkpoint after each one.

    With no select images (cross-validation takes the last EMA epoch, no choice at all) the
    per-epoch scoring is skipped and `best_epoch` stays None.
    """
    import keras

    steps = int(np.ceil(len(x_train) / cfg.batch_size))
    if cfg.max_steps is not None:
        steps = min(steps, cfg.max_steps)

    state_path = cfg.out / STATE
    state: dict[str, Any]
    if cfg.resume and state_path.exists():
        state = json.loads(state_path.read_text())
        recover(cfg.out, state)
        model = keras.models.load_model(cfg.out / LAST)
        ema = WeightEMA.load(cfg.out / EMA, cfg.ema_decay)
        if int(state["config"]["epochs"]) != cfg.epochs:
            # A new length (e.g. the machine is slower than planned): the cosine continues from
            # the optimizer's step counter over the new total, so the LR ends at its floor on time.
            log.info("schedule: %s -> %d epochs", state["config"]["epochs"], cfg.epochs)
            model.optimizer.learning_rate = _schedule(cfg, steps)
        log.info(
            "resuming after epoch %d of %d (best so far: epoch %s)", state["epoch"], cfg.epochs, state.get("best_epoch")
        )
    else:
        if state_path.exists():
            raise FileExistsError(f"{cfg.out} holds a run (state.json): pass --resume or choose another --out")
        keras.utils.set_random_seed(cfg.seed)
        model = build_model(n_classes, cfg.input_size)
        model.compile(
            optimizer=keras.optimizers.AdamW(_schedule(cfg, steps), weight_decay=cfg.weight_decay),
            loss=keras.losses.CategoricalCrossentropy(),
            metrics=["accuracy"],
        )
        ema = WeightEMA(model.get_weights(), cfg.ema_decay)
        state = {"epoch": 0, "history": [], "best_epoch": None, "best": None}

    callback = _ema_callback(model, ema)
    for epoch in range(int(state["epoch"]), cfg.epochs):
        te = time.monotonic()
        keras.utils.set_random_seed(cfg.seed * 1000 + epoch)  # the epoch's augmentation/dropout RNG
        hist = model.fit(
            _epoch_dataset(x_train, y_train, cfg, epoch, n_classes, steps),
            epochs=epoch + 1,
            initial_epoch=epoch,
            verbose=0,
            callbacks=[callback],
            shuffle=False,
        )
        train_s = time.monotonic() - te
        row: dict[str, Any] = {
            "epoch": epoch + 1,
            "loss": float(hist.history["loss"][-1]),
            "accuracy": float(hist.history["accuracy"][-1]),
        }
        if len(x_sel):
            online = model.get_weights()
            raw_acc, raw_nll, _ = _score(model, x_sel, y_sel)
            model.set_weights(ema.shadow)
            ema_acc, ema_nll, _ = _score(model, x_sel, y_sel)
            model.set_weights(online)
            row.update(select_accuracy=raw_acc, select_nll=raw_nll, select_accuracy_ema=ema_acc, select_nll_ema=ema_nll)
            # Checkpoint choice on SELECT: EMA accuracy, ties broken by lower NLL.
            key = (ema_acc, -ema_nll)
            if state["best"] is None or key > tuple(state["best"]):
                state["best"], state["best_epoch"] = list(key), epoch + 1
                ema.save(pending(cfg.out / BEST_EMA))
        row.update(train_seconds=round(train_s, 1), epoch_seconds=round(time.monotonic() - te, 1))
        state["history"].append(row)
        state["epoch"] = epoch + 1
        state["config"] = _config_json(cfg)
        checkpoint(cfg.out, model, ema, state)
        log.info(
            "epoch %d/%d %.0f s: loss %.4f acc %.4f | select acc %s (EMA %s) | best %s",
            epoch + 1,
            cfg.epochs,
            row["epoch_seconds"],
            row["loss"],
            row["accuracy"],
            _fmt(row.get("select_accuracy")),
            _fmt(row.get("select_accuracy_ema")),
            state["best_epoch"],
        )
        (cfg.out / "progress.txt").write_text(f"{epoch + 1}/{cfg.epochs}\n")
        if on_epoch is not None:
            on_epoch(row)
    return state


def finish(
    cfg: TrainConfig,
    ds: data_mod.Dataset,
    split: data_mod.Split,
    summary: dict[str, Any],
    x_sel: NDArray[np.uint8],
    y_sel: NDArray[np.int64],
    state: dict[str, Any],
    t0: float,
    *,
    best_path: Path | None = None,
) -> dict[str, Any]:
    """Best EMA weights -> best.keras, temperature on select -> calibrated.keras, training.json."""
    import keras

    model = keras.models.load_model(cfg.out / LAST, compile=False)
    model.set_weights(WeightEMA.load(best_path or cfg.out / BEST_EMA, cfg.ema_decay).shadow)
    model.save(cfg.out / "best.keras")
    _, _, sel_logits = _score(model, x_sel, y_sel)
    temperature = fit_temperature(sel_logits, y_sel)
    calibrated = with_temperature(model, temperature)
    calibrated.save(cfg.out / "calibrated.keras")
    report = classification_report(y_sel, _softmax(sel_logits / temperature), ds.classes)
    report["ece_before_calibration"] = classification_report(y_sel, _softmax(sel_logits), ds.classes)["ece"]
    report["temperature"] = temperature

    rng = np.random.default_rng(cfg.seed)
    pick = rng.choice(len(x_sel), size=min(64, len(x_sel)), replace=False)
    np.save(cfg.out / PARITY_IMAGES, np.asarray(x_sel)[np.sort(pick)])

    history = state["history"]
    result = {
        "config": _config_json(cfg),
        "classes": ds.classes,
        "data": summary,
        "split": {
            "holdout_from": str(cfg.split_from) if cfg.split_from else None,
            "seed": cfg.seed,
            "train_groups": len(split.groups("train")),
            "select_groups": split.groups("select"),
            "test_groups": split.groups("test"),
        },
        # kept for `lungserve evaluate --validation-groups` and older readers: the union of select and test
        "validation_groups": sorted(split.groups("select") + split.groups("test")),
        "select": report,
        "best_epoch": state["best_epoch"],
        "epochs_run": state["epoch"],
        "history": history,
        "train_seconds": round(sum(r["epoch_seconds"] for r in history), 1),
        "wall_seconds_this_process": round(time.monotonic() - t0, 1),
    }
    write_json(cfg.out / "training.json", result)
    _plot_history(history, cfg.out / "training_curves.png")
    log.info(
        "done: best epoch %s, select accuracy %.4f, ECE %.4f -> %.4f (T=%.3f), %.0f s of epochs",
        state["best_epoch"],
        report["accuracy"],
        report["ece_before_calibration"],
        report["ece"],
        temperature,
        result["train_seconds"],
    )
    return result


def _schedule(cfg: TrainConfig, steps: int) -> Any:
    """Linear warm-up over the first epoch to the peak, then cosine to 1% of it at the last step."""
    import keras

    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=cfg.learning_rate * 0.1,
        decay_steps=max(1, steps * cfg.epochs - steps),
        warmup_target=cfg.learning_rate,
        warmup_steps=steps,
        alpha=0.01,
    )


def _config_json(cfg: TrainConfig) -> dict[str, Any]:
    return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()}


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _softmax(z: NDArray[np.floating]) -> NDArray[np.float64]:
    e = np.exp(np.asarray(z, dtype=np.float64) - np.max(z, axis=1, keepdims=True))
    out: NDArray[np.float64] = e / e.sum(axis=1, keepdims=True)
    return out


def _plot_history(history: list[dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    epochs = [r["epoch"] for r in history]
    ax1.plot(epochs, [r["loss"] for r in history], label="train (augmented, smoothed)")
    ax1.plot(epochs, [r["select_nll"] for r in history], label="select")
    ax1.plot(epochs, [r["select_nll_ema"] for r in history], label="select, EMA weights")
    ax1.set(title="loss", xlabel="epoch")
    ax2.plot(epochs, [r["accuracy"] for r in history], label="train (augmented)")
    ax2.plot(epochs, [r["select_accuracy"] for r in history], label="select")
    ax2.plot(epochs, [r["select_accuracy_ema"] for r in history], label="select, EMA weights")
    ax2.set(title="accuracy", xlabel="epoch")
    for ax in (ax1, ax2):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
