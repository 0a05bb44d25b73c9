"""JPEG draft mode (DCT-domain downscaling) must not change the model's answers.

Draft decoding of a 768 px original is several times cheaper than a full decode; this
checks, on the real originals and the bundled model, that it moves no class
probability by 0.01 or more.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from service.model.manifest import Manifest
from service.model.preprocess import load_image
from tests.conftest import BUNDLED_MODEL


def test_draft_mode_moves_probabilities_by_less_than_0_01(lc25000_768: Path) -> None:
    manifest = Manifest.read(BUNDLED_MODEL / "model.json")
    sess = ort.InferenceSession(str(BUNDLED_MODEL / manifest.file), providers=["CPUExecutionProvider"])
    paths = sorted(lc25000_768.rglob("*.jpeg"))
    assert paths
    data = [p.read_bytes() for p in paths]
    # Every dihedral orientation of each original, so the check is not four lucky images.
    batches = {}
    for draft in (True, False):
        imgs = np.stack([load_image(d, manifest.input_size, draft=draft) for d in data])
        views = [np.rot90(imgs, k, axes=(1, 2)) for k in range(4)]
        views += [v[:, :, ::-1] for v in views]
        batches[draft] = np.ascontiguousarray(np.concatenate(views))
    with_draft = sess.run([manifest.output_name], {manifest.input_name: batches[True]})[0]
    without = sess.run([manifest.output_name], {manifest.input_name: batches[False]})[0]
    # (No argmax check: at a near-tie a shift below 0.01 may legitimately flip the label.)
    assert np.abs(with_draft - without).max() < 0.01


def test_draft_mode_is_used_only_for_large_jpegs(lc25000_768: Path, lc25000: Path) -> None:
    original = next(lc25000_768.rglob("*.jpeg")).read_bytes()
    tile = next((lc25000 / "lung_n").glob("*.jpeg")).read_bytes()
    # 224 px tiles are < 2x the 128 px input: no draft, identical pixels either way.
    assert np.array_equal(load_image(tile, 128, draft=True), load_image(tile, 128, draft=False))
    # 768 px originals do take the draft path, which changes pixels slightly.
    assert not np.array_equal(load_image(original, 128, draft=True), load_image(original, 128, draft=False))
