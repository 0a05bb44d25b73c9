"""`lungserve evaluate`: metrics, JSON report and plots for an ONNX or Keras model.

ONNX models are run with ONNX Runtime on images decoded by the serving function, so
the report describes what the service answers. Keras checkpoints need TensorFlow.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from export import data as data_mod
from export.scoring import classification_report
from service.model.manifest import MANIFEST_NAME, Manifest


def predict_onnx(model: Path, images: NDArray[np.uint8], batch_size: int = 64) -> NDArray[np.float32]:
    import onnxruntime as ort

    manifest = Manifest.read(model.parent / MANIFEST_NAME)
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    out = [
        sess.run([manifest.output_name], {manifest.input_name: np.ascontiguousarray(images[i : i + batch_size])})[0]
        for i in range(0, len(images), batch_size)
    ]
    return np.concatenate(out).astype(np.float32)


def evaluate(
    model: Path,
    data: Path,
    out: Path | None = None,
    *,
    validation_groups_only: bool = False,
    cache_dir: Path | None = None,
) -> dict[str, Any]:
    ds = data_mod.scan(data)
    if model.suffix == ".onnx":
        manifest = Manifest.read(model.parent / MANIFEST_NAME)
        classes, size = manifest.classes, manifest.input_size
        groups = set(getattr(manifest, "validation_groups", None) or [])
    else:
        import keras

        keras_model = keras.models.load_model(model)
        size = int(keras_model.input_shape[1])
        training_json = model.parent / "training.json"
        training = json.loads(training_json.read_text()) if training_json.exists() else {}
        classes = training.get("classes", ds.classes)
        groups = set(training.get("validation_groups", []))
    if classes != ds.classes:
        raise data_mod.DataError(f"model classes {classes} differ from the data's folders {ds.classes}")
    samples = ds.samples
    if validation_groups_only:
        if not groups:
            raise data_mod.DataError("the model records no validation groups")
        samples = [s for s in samples if s.group in groups]
    images, labels = data_mod.load_arrays(samples, size, cache_dir)
    if model.suffix == ".onnx":
        probs = predict_onnx(model, images)
    else:
        probs = np.asarray(keras_model.predict(np.asarray(images), batch_size=64, verbose=0))
    report = classification_report(labels, probs, classes)
    report["model"] = str(model)
    report["data"] = str(data)
    report["subset"] = "validation groups" if validation_groups_only else "all images"
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "evaluation.json").write_text(json.dumps(report, indent=1))
        plot_confusion(report["confusion_matrix"], classes, out / "confusion_matrix.png")
        plot_reliability(report["reliability_bins"], report["ece"], out / "reliability.png")
        history = model.parent / "history.json"
        if history.exists():
            from export.train import _plot_history

            _plot_history(json.loads(history.read_text()), out / "training_curves.png")
    return report


def plot_confusion(cm: list[list[int]], classes: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arr = np.asarray(cm)
    fig, ax = plt.subplots(figsize=(4.5, 4))
    ax.imshow(arr, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes)
    ax.set_yticks(range(len(classes)), classes)
    ax.set(xlabel="predicted", ylabel="true", title="confusion matrix")
    for i in range(arr.shape[0]):
        for j in range(arr.shape[1]):
            ax.text(
                j, i, str(arr[i, j]), ha="center", va="center", color="white" if arr[i, j] > arr.max() / 2 else "black"
            )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_reliability(bins: list[dict[str, float]], ece: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4))
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    centers = [(b["lo"] + b["hi"]) / 2 for b in bins]
    width = bins[0]["hi"] - bins[0]["lo"] if bins else 0.1
    ax.bar(centers, [b["accuracy"] for b in bins], width=width * 0.9, alpha=0.7, label="accuracy")
    ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], "o", ms=3, color="C3")
    ax.set(xlabel="confidence", ylabel="accuracy", title=f"reliability (ECE {ece:.3f})", xlim=(0, 1), ylim=(0, 1))
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_outputs(model_dir: Path, images: NDArray[np.uint8], batch_size: int = 64) -> dict[str, NDArray[Any]]:
    """probabilities (and ood_score when the model has it) from ONNX Runtime, as the service fetches them."""
    import onnxruntime as ort

    manifest = Manifest.read(model_dir / MANIFEST_NAME)
    sess = ort.InferenceSession(str(model_dir / manifest.file), providers=["CPUExecutionProvider"])
    present = {o.name for o in sess.get_outputs()}
    names = [manifest.output_name] + (["ood_score"] if "ood_score" in present else [])
    parts = [
        sess.run(names, {manifest.input_name: np.ascontiguousarray(images[i : i + batch_size])})
        for i in range(0, len(images), batch_size)
    ]
    out = {n: np.concatenate([p[j] for p in parts]) for j, n in enumerate(names)}
    out["probabilities"] = out.pop(manifest.output_name).astype(np.float64)
    return out


def split_of(manifest: dict[str, Any], ds: data_mod.Dataset, seed: int = 1337) -> data_mod.Split:
    """The 3-way split a manifest records, or (for a model that predates it: v1) its
    `validation_groups` halved with `seed`, which is how model v2's split was made."""
    if "split" in manifest:
        sp = manifest["split"]
        select, test = set(sp["select_groups"]), set(sp["test_groups"])
        return data_mod.Split(
            [s for s in ds.samples if s.group not in select | test],
            [s for s in ds.samples if s.group in select],
            [s for s in ds.samples if s.group in test],
        )
    if not manifest.get("validation_groups"):
        raise data_mod.DataError("the manifest records neither a split nor validation groups")
    return data_mod.split_three_way(ds, manifest["validation_groups"], seed)


def evaluate_part(
    model_dir: Path,
    data: Path,
    part: str,
    *,
    split_manifest: Path | None = None,
    cache_dir: Path | None = None,
    n_resamples: int = 2000,
) -> dict[str, Any]:
    """Metrics with group-bootstrap intervals on one part ("select" or "test") of the 3-way split.

    The split comes from `split_manifest` (default: the model's own manifest), so several
    models are judged on exactly the same groups. The model's decision section, if any, is
    applied as fitted (its coverage and accepted accuracy on this part are reported).
    """
    from export.decision_fit import evaluate_decision
    from export.scoring import report_with_intervals

    ds = data_mod.scan(data)
    manifest = json.loads((model_dir / MANIFEST_NAME).read_text())
    ref = json.loads(split_manifest.read_text()) if split_manifest else manifest
    samples = getattr(split_of(ref, ds), part)
    images, labels = data_mod.load_arrays(samples, int(manifest["input_size"]), cache_dir)
    out = run_outputs(model_dir, np.asarray(images))
    report = report_with_intervals(labels, out["probabilities"], [s.group for s in samples], ds.classes, n_resamples)
    report.pop("reliability_bins")
    report["part"] = part
    report["model"] = manifest.get("version")
    if "decision" in manifest:
        report["decision"] = evaluate_decision(out["probabilities"], labels, out.get("ood_score"), manifest["decision"])
    return report
