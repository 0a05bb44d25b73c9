"""kNN out-of-distribution score (Sun et al. 2022): NumPy reference on synthetic features, and the
same score inside the served ONNX graph."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from export.knn_ood import KnnBank, fit_knn, knn_distance, normalise, oof_scores


def clusters(rng: np.random.Generator, n: int, centres: np.ndarray, spread: float = 0.3) -> np.ndarray:
    picks = rng.integers(0, len(centres), n)
    return np.maximum(centres[picks] + rng.normal(0, spread, (n, centres.shape[1])), 0.0)  # ReLU-like features


def test_distance_is_the_kth_nearest_on_the_unit_sphere() -> None:
    rng = np.random.default_rng(0)
    train, query = rng.normal(size=(50, 6)), rng.normal(size=(7, 6))
    bank = fit_knn(train, k=3)
    brute = np.sort(np.linalg.norm(normalise(query)[:, None, :] - normalise(train)[None, :, :], axis=2), axis=1)[:, 2]
    np.testing.assert_allclose(knn_distance(query, bank, chunk=3), brute, atol=1e-6)
    # scale-free: a feature vector and its multiple get the same score
    np.testing.assert_allclose(knn_distance(5.0 * query, bank), knn_distance(query, bank), atol=1e-6)


def test_an_unseen_cluster_between_the_class_means_scores_higher_than_held_out_training_like_data() -> None:
    """Near-OOD between two class clusters: close to both class means, far from every train point."""
    rng = np.random.default_rng(1)
    dim = 16
    a, b = np.zeros(dim), np.zeros(dim)
    a[:8], b[8:] = 2.0, 2.0
    train = clusters(rng, 600, np.stack([a, b]))
    held_out = clusters(rng, 200, np.stack([a, b]))
    near_ood = clusters(rng, 200, np.stack([(a + b) / 2]), spread=0.3)
    bank = fit_knn(train, k=10)
    threshold = np.quantile(knn_distance(held_out, bank), 0.99)
    assert (knn_distance(near_ood, bank) > threshold).mean() > 0.9


def test_subsampled_bank_and_its_file_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    bank = fit_knn(rng.normal(size=(100, 4)), k=5, max_bank=40, seed=3)
    assert bank.bank.shape == (40, 4)
    assert bank.n_train == 100
    np.testing.assert_allclose(np.linalg.norm(bank.bank, axis=1), 1.0, atol=1e-6)
    bank.save(tmp_path / "bank.npz")
    again = KnnBank.load(tmp_path / "bank.npz")
    np.testing.assert_array_equal(again.bank, bank.bank)
    assert (again.k, again.to_json()["bank"]) == (5, 40)
    with pytest.raises(ValueError, match="cannot give"):
        fit_knn(rng.normal(size=(100, 4)), k=5, max_bank=3)


def test_out_of_fold_scores_use_each_fold_s_own_train_bank(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    files = np.array([f"x{i}.jpeg" for i in range(20)])
    for fold, part in enumerate((files[:10], files[10:])):
        d = tmp_path / f"fold-{fold}"
        d.mkdir()
        # every out-of-fold feature points along e0; only fold 0's train bank does too, so only
        # fold 1's images (scored against fold 1's bank, along e1) are far from their bank
        e0, e_train = np.eye(4)[0], np.eye(4)[fold]
        np.savez(d / "train_features.npz", penultimate=e_train + rng.normal(0, 0.05, (30, 4)))
        np.savez(d / "oof.npz", files=part[::-1], penultimate=e0 + rng.normal(0, 0.05, (10, 4)))
    scores = oof_scores(files, [tmp_path / "fold-0", tmp_path / "fold-1"], k=3)
    assert scores.shape == (20,)
    assert scores[10:].min() > scores[:10].max()


def test_knn_ood_score_inside_the_onnx_serving_graph_matches_numpy(tmp_path: Path) -> None:
    pytest.importorskip("tf2onnx")
    keras = pytest.importorskip("keras")
    ort = pytest.importorskip("onnxruntime")
    import onnx

    from export.model import build_model
    from export.serving_graph import PENULTIMATE_LAYER, build_serving_model, output_names, to_onnx

    keras.utils.set_random_seed(0)
    model = build_model(3, input_size=32, filters=(8, 16, 32))
    images = np.random.default_rng(5).integers(0, 256, (12, 32, 32, 3), dtype=np.uint8)
    feats = keras.Model(model.input, model.get_layer(PENULTIMATE_LAYER).output).predict(images, verbose=0)
    bank = fit_knn(feats[:8], k=2)
    proto = to_onnx(build_serving_model(model, 1.0, None, knn=bank), 32, output_names(True))
    onnx.save(proto, tmp_path / "m.onnx")
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    assert [o.name for o in sess.get_outputs()] == ["probabilities", "ood_score", "feature_maps", "cam_weights"]
    (ood,) = sess.run(["ood_score"], {"image": images})
    np.testing.assert_allclose(ood, knn_distance(feats, bank), atol=2e-3)
