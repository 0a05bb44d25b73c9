"""Grouped, class-stratified k-fold cross-validation training: THE accuracy estimate.

    python -m export.cv --data ../shared/data/lc25000-lung --cache-dir CACHE --input-size 160 --epochs 12

Every group is out-of-fold exactly once; each fold keeps its last EMA epoch (nothing is chosen on
out-of-fold groups); a rerun resumes from the last whole epoch. Protocol, recipe, run folder:
docs/model/cv.md.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import random
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from export import data as data_mod
from export.augment import AugmentConfig

log = logging.getLogger("lungserve.cv")

CV_JSON = "cv.json"
DONE = "done.json"
OOF = "oof.npz"
TRAIN_FEATURES = "train_features.npz"
FOLD_MODEL = "fold.keras"


@dataclass
class CVConfig:
    data: Path
    out: Path
    folds: int = 5
    input_size: int = 160
    epochs: int = 12
    batch_size: int = 64
    learning_rate: float = 2e-3
    ema_decay: float = 0.998
    seed: int = 1337
    hed_alpha: float = 0.1
    hed_beta: float = 0.05
    zoom_min: float = 0.7
    cache_dir: Path | None = None
    max_steps: int | None = None  # smoke tests only
    only_folds: tuple[int, ...] | None = None  # train just these folds (a partial run to compare levers)

    def augment(self) -> AugmentConfig:
        return AugmentConfig(zoom_min=self.zoom_min, hed_alpha=self.hed_alpha, hed_beta=self.hed_beta)

    def recipe(self) -> dict[str, Any]:
        """What defines the models; epochs and max_steps may change on a resume (the cosine stretches)."""
        skip = {"data", "out", "cache_dir", "epochs", "max_steps", "only_folds"}
        return {k: v for k, v in asdict(self).items() if k not in skip}


def run_name(cfg: CVConfig) -> str:
    return f"cv-k{cfg.folds}-px{cfg.input_size}-e{cfg.epochs}-hed{cfg.hed_alpha:g}-seed{cfg.seed}"


def assign_folds(ds: data_mod.Dataset, k: int, seed: int) -> dict[str, int]:
    """Group -> fold in 0..k-1: whole groups only, stratified by class, deterministic for a seed.

    Each class's groups (sorted, then shuffled with `seed`) are dealt round-robin; the deal
    continues across classes, so the folds differ by at most one group in total and per class.
    """
    if k < 2:
        raise data_mod.DataError(f"k-fold needs k >= 2, got {k}")
    rng = random.Random(seed)
    by_class: dict[int, list[str]] = defaultdict(list)
    for label, group in sorted({(s.label, s.group) for s in ds.samples}):
        by_class[label].append(group)
    folds: dict[str, int] = {}
    dealt = 0
    for label in sorted(by_class):
        groups = by_class[label]
        if len(groups) < k:
            raise data_mod.DataError(f"class {ds.classes[label]} has {len(groups)} groups, fewer than k = {k}")
        rng.shuffle(groups)
        for group in groups:
            folds[group] = dealt % k
            dealt += 1
    return folds


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


def _savez(path: Path, **arrays: Any) -> None:
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)


def _prepare(cfg: CVConfig, ds: data_mod.Dataset) -> dict[str, int]:
    """cv.json on the first call; on a rerun, refuse a different recipe, data or fold assignment."""
    folds = assign_folds(ds, cfg.folds, cfg.seed)
    plan = {"recipe": cfg.recipe(), "classes": ds.classes, "images": len(ds.samples), "folds": folds}
    path = cfg.out / CV_JSON
    if path.exists():
        old = json.loads(path.read_text())
        for key in ("recipe", "classes", "images", "folds"):
            if old[key] != plan[key]:
                raise ValueError(f"{path} was made with another {key}: use another --out for another recipe")
    else:
        cfg.out.mkdir(parents=True, exist_ok=True)
        _write_json(path, {**plan, "data": str(cfg.data), "name": run_name(cfg)})
    return folds


class Progress:
    """Epoch timing and the projected remaining time of the whole run, for the log."""

    def __init__(self, cfg: CVConfig) -> None:
        self.cfg = cfg
        self.remaining = 0
        self.seconds: list[float] = []

    def plan(self, epochs_left: int) -> None:
        self.remaining = epochs_left

    def epoch_done(self, fold: int, row: dict[str, Any]) -> None:
        self.remaining -= 1
        self.seconds.append(float(row["epoch_seconds"]))
        median = float(np.median(self.seconds))
        log.info(
            "fold %d epoch %d/%d: %.0f s, loss %.4f, train acc %.4f | %d epochs left, projected %.1f h (median %.0f s)",
            fold,
            row["epoch"],
            self.cfg.epochs,
            row["epoch_seconds"],
            row["loss"],
            row["accuracy"],
            self.remaining,
            self.remaining * median / 3600,
            median,
        )


def _after_epoch(
    progress: Progress, hook: Callable[[int, dict[str, Any]], None] | None, fold: int, row: dict[str, Any]
) -> None:
    progress.epoch_done(fold, row)
    if hook is not None:
        hook(fold, row)


def _epochs_done(fold_dir: Path) -> int:
    state = fold_dir / "state.json"
    return int(json.loads(state.read_text())["epoch"]) if state.exists() else 0


def run(cfg: CVConfig, on_epoch: Callable[[int, dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Train every fold not yet done; then pool the out-of-fold predictions. Resumable at any point.

    `on_epoch(fold, row)` runs after each committed epoch (tests use it to interrupt a run).
    """
    from export.train import TrainConfig, run_epochs

    t0 = time.monotonic()
    ds = data_mod.scan(cfg.data)
    folds = _prepare(cfg, ds)
    wanted = list(range(cfg.folds)) if cfg.only_folds is None else sorted(cfg.only_folds)
    todo = [f for f in wanted if not (cfg.out / f"fold-{f}" / DONE).exists()]
    log.info(
        "run %s: %d images, %d groups, k = %d; folds to do: %s", cfg.out, len(ds.samples), len(folds), cfg.folds, todo
    )
    if todo:
        # One decode of every image (cached), indexed per fold: the folds share the cache file.
        x_all, y_all = data_mod.load_arrays(ds.samples, cfg.input_size, cfg.cache_dir)
        log.info("images %s decoded/loaded in %.0f s", x_all.shape, time.monotonic() - t0)
        fold_of = np.array([folds[s.group] for s in ds.samples])
        progress = Progress(cfg)
        progress.plan(sum(cfg.epochs - _epochs_done(cfg.out / f"fold-{f}") for f in todo))
        for f in todo:
            fold_dir = cfg.out / f"fold-{f}"
            fold_dir.mkdir(parents=True, exist_ok=True)
            train_idx, oof_idx = np.flatnonzero(fold_of != f), np.flatnonzero(fold_of == f)
            tcfg = TrainConfig(
                data=cfg.data,
                out=fold_dir,
                input_size=cfg.input_size,
                epochs=cfg.epochs,
                batch_size=cfg.batch_size,
                learning_rate=cfg.learning_rate,
                ema_decay=cfg.ema_decay,
                seed=cfg.seed + f,  # each fold its own initialisation and data order
                cache_dir=cfg.cache_dir,
                resume=(fold_dir / "state.json").exists(),
                max_steps=cfg.max_steps,
                augment=cfg.augment(),
            )
            log.info(
                "fold %d: %d train images, %d out-of-fold images; from epoch %d",
                f,
                len(train_idx),
                len(oof_idx),
                _epochs_done(fold_dir),
            )
            x_train = np.asarray(x_all[train_idx])
            empty = np.zeros((0, cfg.input_size, cfg.input_size, 3), np.uint8)
            state = run_epochs(
                tcfg,
                x_train,
                y_all[train_idx],
                empty,
                np.zeros(0, np.int64),
                len(ds.classes),
                on_epoch=functools.partial(_after_epoch, progress, on_epoch, f),
            )
            del x_train
            finish_fold(cfg, ds, f, fold_dir, x_all, y_all, train_idx, oof_idx, state)
            _clear_session()  # the next fold builds its own model: drop this one's graphs and memory
    if all((cfg.out / f"fold-{f}" / DONE).exists() for f in range(cfg.folds)):
        return pool(cfg, ds)
    return {"folds_done": sorted(f for f in range(cfg.folds) if (cfg.out / f"fold-{f}" / DONE).exists())}


def _clear_session() -> None:
    import keras

    keras.backend.clear_session()


def _head_outputs(model: Any, x: NDArray[np.uint8]) -> dict[str, NDArray[np.float32]]:
    """Logits, GAP and penultimate features in one pass (the fold model, inference mode)."""
    import keras

    from export.model import LOGITS_LAYER
    from export.serving_graph import GAP_LAYER, PENULTIMATE_LAYER

    names = {"logits": LOGITS_LAYER, "gap": GAP_LAYER, "penultimate": PENULTIMATE_LAYER}
    probe = keras.Model(model.input, [model.get_layer(n).output for n in names.values()])
    outs = probe.predict(np.asarray(x), batch_size=128, verbose=0)
    return {k: np.asarray(o, dtype=np.float32) for k, o in zip(names, outs, strict=True)}


def finish_fold(
    cfg: CVConfig,
    ds: data_mod.Dataset,
    fold: int,
    fold_dir: Path,
    x_all: NDArray[np.uint8],
    y_all: NDArray[np.int64],
    train_idx: NDArray[np.intp],
    oof_idx: NDArray[np.intp],
    state: dict[str, Any],
) -> None:
    """The fold's model (last EMA epoch), its out-of-fold outputs and train features; done.json last."""
    import keras

    from export.checkpoint import EMA, LAST, WeightEMA, atomic_save_model

    te = time.monotonic()
    model = keras.models.load_model(fold_dir / LAST, compile=False)
    model.set_weights(WeightEMA.load(fold_dir / EMA, cfg.ema_decay).shadow)
    atomic_save_model(model, fold_dir / FOLD_MODEL)
    oof = _head_outputs(model, x_all[oof_idx])
    samples = [ds.samples[i] for i in oof_idx]
    _savez(
        fold_dir / OOF,
        files=np.array([s.rel for s in samples]),
        groups=np.array([s.group for s in samples]),
        labels=y_all[oof_idx],
        fold=np.full(len(oof_idx), fold, np.int64),
        **oof,
    )
    # The kNN out-of-distribution bank: features of the fold's own train images, un-augmented.
    train_out = _head_outputs(model, x_all[train_idx])
    _savez(
        fold_dir / TRAIN_FEATURES, labels=y_all[train_idx], gap=train_out["gap"], penultimate=train_out["penultimate"]
    )
    accuracy = float((oof["logits"].argmax(1) == y_all[oof_idx]).mean())
    done = {
        "fold": fold,
        "epochs": state["epoch"],
        "train_images": len(train_idx),
        "oof_images": len(oof_idx),
        "oof_groups": len({s.group for s in samples}),
        "oof_accuracy": accuracy,  # reported, never used for a choice
        "train_seconds": round(sum(r["epoch_seconds"] for r in state["history"]), 1),
        "finish_seconds": round(time.monotonic() - te, 1),
    }
    _write_json(fold_dir / DONE, done)  # last: the fold is whole
    log.info(
        "fold %d done: out-of-fold accuracy %.4f on %d images (%d groups)",
        fold,
        accuracy,
        len(oof_idx),
        done["oof_groups"],
    )


def pool(cfg: CVConfig, ds: data_mod.Dataset) -> dict[str, Any]:
    """All folds' out-of-fold predictions in one file, in the data's sample order."""
    parts = [np.load(cfg.out / f"fold-{f}" / OOF) for f in range(cfg.folds)]
    merged = {key: np.concatenate([p[key] for p in parts]) for key in parts[0].files}
    order = {s.rel: i for i, s in enumerate(ds.samples)}
    idx = np.argsort([order[str(f)] for f in merged["files"]], kind="stable")
    _savez(cfg.out / OOF, classes=np.array(ds.classes), **{k: v[idx] for k, v in merged.items()})
    accuracy = float((merged["logits"].argmax(1) == merged["labels"]).mean())
    log.info("all %d folds done: pooled out-of-fold accuracy %.4f on %d images", cfg.folds, accuracy, len(idx))
    return {"folds_done": list(range(cfg.folds)), "oof_accuracy": accuracy, "images": len(idx)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m export.cv", description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--out", type=Path, default=None, help="run folder (default: RUNS/<name from the config>)")
    p.add_argument("--runs", type=Path, default=Path("runs"), help="parent of the default run folder")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--input-size", type=int, default=160)
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--learning-rate", type=float, default=2e-3)
    p.add_argument("--ema-decay", type=float, default=0.998)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--hed-alpha", type=float, default=0.1, help="stain gain U(1-a, 1+a) per H/E/D channel")
    p.add_argument("--hed-beta", type=float, default=0.05, help="stain shift U(-b, b) in optical density")
    p.add_argument("--zoom-min", type=float, default=0.7)
    p.add_argument("--cache-dir", type=Path, default=None)
    p.add_argument("--only-folds", type=int, nargs="+", default=None, help="train only these folds")
    p.add_argument("--max-steps", type=int, default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    cfg = CVConfig(
        data=a.data,
        out=a.out or Path("."),
        folds=a.folds,
        input_size=a.input_size,
        epochs=a.epochs,
        batch_size=a.batch_size,
        learning_rate=a.learning_rate,
        ema_decay=a.ema_decay,
        seed=a.seed,
        hed_alpha=a.hed_alpha,
        hed_beta=a.hed_beta,
        zoom_min=a.zoom_min,
        cache_dir=a.cache_dir,
        max_steps=a.max_steps,
        only_folds=tuple(a.only_folds) if a.only_folds else None,
    )
    if a.out is None:
        cfg.out = a.runs / run_name(cfg)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stdout, force=True)
    result = run(cfg)
    log.info("result: %s", json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
