"""`lungserve export --run RUN`: a training run -> model.onnx + model.json per the model v2 contract.

From the run's weights (best EMA checkpoint, or the latest one for an interim model):
temperature on SELECT logits, Mahalanobis statistics on TRAIN features (un-augmented), the
serving graph (probabilities, ood_score, feature_maps, cam_weights), tf2onnx, a parity check of
every output, and the refer decision fitted on the SELECT groups from ONNX Runtime's own outputs
(what the service will see). Test groups are not touched here.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from export import data as data_mod
from export.calibrate import fit_temperature
from export.convert import stamp
from export.decision_fit import fit_decision, plot_risk_coverage
from export.model import INPUT_NAME, OUTPUT_NAME, logits_model
from export.scoring import classification_report
from export.serving_graph import (
    OPSET,
    build_serving_model,
    fit_mahalanobis,
    gap_features_model,
    keras_outputs,
    onnx_outputs,
    output_names,
    parity,
    to_onnx,
)
from export.train import BEST_EMA, EMA, LAST, STATE, TrainConfig, WeightEMA, make_split
from service.model.manifest import MANIFEST_NAME, MODEL_NAME, Manifest, sha256_file
from service.model.preprocess import RESIZE

MODEL_TITLE = "lungserve-lung-cnn"
TILE_SOURCE_PX = 768  # LC25000 originals; /analyze cuts tiles of this side from large images
PARITY_ATOL = 1e-4


class BundleError(Exception):
    pass


def run_config(run: Path, data: Path | None = None) -> TrainConfig:
    """The TrainConfig a run recorded (state.json), so the split is recomputed exactly."""
    state = json.loads((run / STATE).read_text())
    c = state["config"]
    return TrainConfig(
        data=data or Path(c["data"]),
        out=run,
        input_size=int(c["input_size"]),
        seed=int(c["seed"]),
        val_fraction=float(c["val_fraction"]),
        split_from=Path(c["split_from"]) if c.get("split_from") else None,
        allow_image_split=bool(c["allow_image_split"]),
        ema_decay=float(c["ema_decay"]),
    )


def load_weights(run: Path, which: str) -> Any:
    """which: "best" (best EMA weights on select), "ema" (latest EMA weights) or "online" (latest raw)."""
    import keras

    model = keras.models.load_model(run / LAST, compile=False)
    if which == "best":
        model.set_weights(WeightEMA.load(run / BEST_EMA, 0.0).shadow)
    elif which == "ema":
        model.set_weights(WeightEMA.load(run / EMA, 0.0).shadow)
    elif which != "online":
        raise BundleError(f"unknown weights {which!r}")
    return model


def bundle(
    run: Path,
    out_dir: Path,
    *,
    data: Path | None = None,
    cache_dir: Path | None = None,
    weights: str = "best",
    version: str | None = None,
    docs: Path | None = None,
    extra: dict[str, Any] | None = None,
) -> Manifest:
    import onnx

    cfg = run_config(run, data)
    state = json.loads((run / STATE).read_text())
    ds = data_mod.scan(cfg.data)
    split = make_split(cfg, ds)
    cache = cache_dir if cache_dir is not None else run / "cache"
    x_train, y_train = data_mod.load_arrays(split.train, cfg.input_size, cache)
    x_sel, y_sel = data_mod.load_arrays(split.select, cfg.input_size, cache)
    x_sel = np.asarray(x_sel)

    model = load_weights(run, weights)
    sel_logits = np.asarray(logits_model(model).predict(x_sel, batch_size=128, verbose=0), np.float64)
    temperature = fit_temperature(sel_logits, y_sel)
    feats = gap_features_model(model).predict(np.asarray(x_train), batch_size=128, verbose=0)
    stats = fit_mahalanobis(feats, y_train, len(ds.classes))
    serving = build_serving_model(model, temperature, stats)
    names = output_names(True)
    proto = to_onnx(serving, cfg.input_size, names)

    digest = hashlib.sha256(b"".join(np.ascontiguousarray(w).tobytes() for w in model.get_weights()))
    version = version or f"{dt.date.today():%Y.%m.%d}-{digest.hexdigest()[:8]}"
    meta = {
        "classes": json.dumps(ds.classes),
        "version": version,
        "input_size": str(cfg.input_size),
        "input_name": INPUT_NAME,
        "output_name": OUTPUT_NAME,
        "outputs": json.dumps(names),
        "resize": json.dumps(RESIZE),
    }
    stamp(proto, meta)

    rng = np.random.default_rng(cfg.seed)
    parity_images = x_sel[np.sort(rng.choice(len(x_sel), size=min(64, len(x_sel)), replace=False))]
    with tempfile.TemporaryDirectory(dir=out_dir.parent if out_dir.parent.exists() else None) as tmp:
        tmp_model = Path(tmp) / MODEL_NAME
        onnx.save(proto, tmp_model)
        diffs = parity(keras_outputs(serving, parity_images, names), onnx_outputs(tmp_model, parity_images))
        if max(v for k, v in diffs.items() if k != "argmax_flips") > PARITY_ATOL or diffs["argmax_flips"]:
            raise BundleError(f"ONNX parity check failed: {diffs}; nothing was written")
        sel = onnx_outputs(tmp_model, x_sel)
        probs, ood = sel["probabilities"], sel["ood_score"]
        chosen_on = f"select groups ({len(split.groups('select'))} groups, {len(x_sel)} images)"
        decision = fit_decision(probs, y_sel, ood, chosen_on)
        select_report = classification_report(y_sel, probs, ds.classes)
        select_report["ece_before_calibration"] = classification_report(y_sel, _softmax(sel_logits), ds.classes)["ece"]
        best_epoch = state.get("best_epoch") if weights == "best" else state["epoch"]
        manifest_data: dict[str, Any] = {
            "name": MODEL_TITLE,
            "version": version,
            "classes": ds.classes,
            "input_name": INPUT_NAME,
            "output_name": OUTPUT_NAME,
            "outputs": {n: n for n in names},
            "input_size": cfg.input_size,
            "input_dtype": "uint8",
            "input_layout": "NHWC RGB, raw 0-255 (scaling is inside the graph)",
            "resize": RESIZE,
            "tile_source_px": TILE_SOURCE_PX,
            "sha256": sha256_file(tmp_model),
            "file": MODEL_NAME,
            "opset": OPSET,
            "calibration": {"method": "temperature scaling on the select groups", "temperature": temperature},
            "ood": stats.to_json(),
            "decision": decision,
            "parity": {"images": len(parity_images), "max_abs_diff": diffs},
            "exported": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "training_data": data_mod.split_summary(ds, split),
            "split": {
                "method": "3-way by group: train / select (every choice) / test (no choice)",
                "holdout_from": str(cfg.split_from) if cfg.split_from else None,
                "seed": cfg.seed,
                "train_groups": len(split.groups("train")),
                "select_groups": split.groups("select"),
                "test_groups": split.groups("test"),
            },
            # the union of select and test, for `lungserve evaluate --validation-groups` and older readers
            "validation_groups": sorted(split.groups("select") + split.groups("test")),
            "select_metrics": {
                k: select_report[k]
                for k in (
                    "n",
                    "accuracy",
                    "balanced_accuracy",
                    "per_class",
                    "confusion_matrix",
                    "ece",
                    "ece_before_calibration",
                )
            },
            "training": {
                "config": state["config"],
                "weights": f"EMA, epoch {best_epoch}" if weights != "online" else f"online, epoch {best_epoch}",
                "epochs_run": state["epoch"],
                "train_seconds": round(sum(r["epoch_seconds"] for r in state["history"]), 1),
            },
        }
        manifest_data.update(extra or {})
        manifest = Manifest.model_validate(manifest_data)
        (Path(tmp) / MANIFEST_NAME).write_text(json.dumps(manifest.dump(), indent=1) + "\n")
        out_dir.mkdir(parents=True, exist_ok=True)
        # Model first, manifest last: a reader never sees a manifest naming a missing file.
        shutil.copyfile(tmp_model, out_dir / MODEL_NAME)
        shutil.copyfile(Path(tmp) / MANIFEST_NAME, out_dir / MANIFEST_NAME)
    if docs is not None:
        docs.mkdir(parents=True, exist_ok=True)
        plot_risk_coverage(
            {"select groups": (probs.max(axis=1), probs.argmax(axis=1) == y_sel)}, decision, docs / "risk_coverage.png"
        )
    return manifest


def _softmax(z: Any) -> Any:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)
