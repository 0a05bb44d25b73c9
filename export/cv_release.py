"""A finished cross-validation run -> a served model folder: the fold models' ensemble + model.json.

    python -m export.cv_release --run RUN --out DIR --members 0 1

model.json carries `estimate`, `calibration`, `decision` and `ood` (docs/model/cv.md says which
figure each is).
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import hashlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from export.bundle import MODEL_TITLE, TILE_SOURCE_PX
from export.cv_ensemble import export_member, mean_logit_ensemble
from export.model import INPUT_NAME, OUTPUT_NAME
from service.model.manifest import MANIFEST_NAME, MODEL_NAME, Manifest, sha256_file
from service.model.preprocess import RESIZE, load_image

PARITY_ATOL = 1e-4


class ReleaseError(Exception):
    pass


def _parity_images(plan: dict[str, Any], data: Path, size: int, n: int) -> NDArray[np.uint8]:
    """`n` images, one per group in sorted order: real tiles through the serving decode."""
    files: dict[str, str] = {}
    with (data / "groups.csv").open(newline="") as fh:
        for row in csv.DictReader(fh):
            files.setdefault(f"{row['class']}/{row['group']}", row["file"])
    picks = [files[g] for g in sorted(plan["folds"])[:n]]
    return np.stack([load_image((data / rel).read_bytes(), size) for rel in picks])


def _keras_ensemble(run: Path, members: list[int], images: NDArray[np.uint8], temperature: float) -> NDArray[Any]:
    """The reference: softmax(mean of the fold models' Keras logits / T)."""
    import keras

    from export.cv import FOLD_MODEL
    from export.cv_estimate import softmax
    from export.model import logits_model

    logits = [
        logits_model(keras.models.load_model(run / f"fold-{f}" / FOLD_MODEL, compile=False)).predict(images, verbose=0)
        for f in members
    ]
    return softmax(np.mean(np.asarray(logits, np.float64), axis=0) / temperature)


def _folds_trained(run: Path) -> dict[str, dict[str, float]]:
    """Each finished fold's epochs and training + finishing time (its done.json), as run here."""
    out: dict[str, dict[str, float]] = {}
    for done in sorted(run.glob("fold-*/done.json")):
        d = json.loads(done.read_text())
        seconds = float(d["train_seconds"]) + float(d.get("finish_seconds", 0.0))
        out[str(d["fold"])] = {"epochs": int(d["epochs"]), "seconds": round(seconds, 1)}
    return out


def release_version(member_digests: list[str], temperature: float, decision: dict[str, Any]) -> str:
    """`YYYY.MM.DD-cvM-<hash>`: the hash covers the members, the temperature in the graph and the
    shipped decision, so two releases that answer differently never share a version."""
    shipped = json.dumps({"temperature": temperature, "decision": decision}, sort_keys=True)
    digest = hashlib.sha256("".join(member_digests).encode() + shipped.encode())
    return f"{dt.date.today():%Y.%m.%d}-cv{len(member_digests)}-{digest.hexdigest()[:8]}"


def release(
    run: Path, out_dir: Path, members: list[int], *, data: Path | None = None, version: str | None = None
) -> Manifest:
    import onnx
    import onnxruntime as ort

    from export.convert import stamp

    plan = json.loads((run / "cv.json").read_text())
    est = json.loads((run / "estimate.json").read_text())
    size = int(plan["recipe"]["input_size"])
    temperature = float(est["temperature"])
    data = data or Path(plan["data"])
    work = run / "release-members"  # tf2onnx is the slow part: members are kept for a rerun
    work.mkdir(exist_ok=True)
    score = est["ood"].get("score", "knn")  # an estimate.json from before the choice had kNN only
    stats: dict[str, Any] = {}
    for f in members:
        path, about = work / f"member-{f}-{score}.onnx", work / f"member-{f}-{score}.json"
        if not about.exists():  # written after its graph: both exist, or the member is rebuilt
            info = export_member(run / f"fold-{f}", path, score, k=est["ood"].get("k"))
            about.write_text(json.dumps(info))
        stats[str(f)] = json.loads(about.read_text())
    protos = [onnx.load(work / f"member-{f}-{score}.onnx") for f in members]
    proto = mean_logit_ensemble(protos, temperature)
    names = [o.name for o in proto.graph.output]
    version = version or release_version(
        [sha256_file(work / f"member-{f}-{score}.onnx") for f in members], temperature, est["decision"]
    )
    stamp(
        proto,
        {
            "classes": json.dumps(plan["classes"]),
            "version": version,
            "input_size": str(size),
            "input_name": INPUT_NAME,
            "output_name": OUTPUT_NAME,
            "outputs": json.dumps(names),
            "resize": json.dumps(RESIZE),
        },
    )
    images = _parity_images(plan, data, size, 32)
    expected = _keras_ensemble(run, members, images, temperature)
    with tempfile.TemporaryDirectory(dir=out_dir.parent if out_dir.parent.exists() else None) as tmp:
        tmp_model = Path(tmp) / MODEL_NAME
        onnx.save(proto, tmp_model)
        sess = ort.InferenceSession(str(tmp_model), providers=["CPUExecutionProvider"])
        got = sess.run([OUTPUT_NAME], {INPUT_NAME: images})[0]
        diff = float(np.abs(got - expected).max())
        flips = int((got.argmax(1) != expected.argmax(1)).sum())
        if diff > PARITY_ATOL or flips:
            raise ReleaseError(f"ONNX parity check failed: max |diff| {diff}, {flips} argmax flips; nothing written")
        recipe = plan["recipe"]
        manifest = Manifest.model_validate(
            {
                "name": MODEL_TITLE,
                "version": version,
                "classes": plan["classes"],
                "input_name": INPUT_NAME,
                "output_name": OUTPUT_NAME,
                "outputs": {n: n for n in names},
                "input_size": size,
                "input_dtype": "uint8",
                "input_layout": "NHWC RGB, raw 0-255 (scaling is inside the graph)",
                "resize": RESIZE,
                "tile_source_px": TILE_SOURCE_PX,
                "sha256": sha256_file(tmp_model),
                "file": MODEL_NAME,
                "opset": max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")),
                "estimate": est["estimate"],
                "calibration": {
                    "method": "temperature scaling on the pooled out-of-fold logits",
                    "temperature": temperature,
                    "ece_cross_fitted": est["estimate"]["ece"],
                },
                "ood": {**est["ood"], "members": stats, "graph": "mean of the members' distances"},
                "decision": {**est["decision"], "cross_fitted": est["decision_cross_fitted"], "note": est["note"]},
                "ensemble": {"members": members, "of_folds": int(recipe["folds"]), "combine": "mean of logits"},
                "parity": {"images": len(images), "max_abs_diff": diff, "argmax_flips": flips},
                "exported": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                "split": {
                    "method": f"{recipe['folds']}-fold grouped CV, every group out-of-fold once",
                    "seed": recipe["seed"],
                },
                "training": {"recipe": recipe, "run": run.name, "folds": _folds_trained(run)},
            }
        )
        (Path(tmp) / MANIFEST_NAME).write_text(json.dumps(manifest.dump(), indent=1) + "\n")
        out_dir.mkdir(parents=True, exist_ok=True)
        # Model first, manifest last: a reader never sees a manifest naming a missing file.
        shutil.copyfile(tmp_model, out_dir / MODEL_NAME)
        shutil.copyfile(Path(tmp) / MANIFEST_NAME, out_dir / MANIFEST_NAME)
    return manifest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m export.cv_release", description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--members", type=int, nargs="+", required=True, help="fold indices of the ensemble")
    p.add_argument("--data", type=Path, default=None, help="default: the data folder cv.json records")
    p.add_argument("--version", default=None)
    a = p.parse_args(argv)
    manifest = release(a.run, a.out, a.members, data=a.data, version=a.version)
    print(f"{a.out / MODEL_NAME}: version {manifest.version}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
