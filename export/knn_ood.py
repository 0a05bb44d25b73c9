"""Near-OOD score: k-th nearest-neighbour distance on L2-normalised penultimate features.

Sun, Ming, Zhu, Li, ICML 2022. In the graph: normalise, one MatMul against a bank of normalised
train features, TopK. Fitted on train features only; k declared in advance (docs/model/cv.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

DEFAULT_K = 10
EPS = 1e-12


@dataclass(frozen=True)
class KnnBank:
    bank: NDArray[np.float32]  # [M, D], rows L2-normalised train features
    k: int
    n_train: int  # train images the bank was drawn from

    def to_json(self) -> dict[str, Any]:
        return {
            "method": "k-th nearest neighbour distance, L2-normalised penultimate features (Sun et al. 2022)",
            "features": "penultimate",
            "k": self.k,
            "bank": int(self.bank.shape[0]),
            "dim": int(self.bank.shape[1]),
            "train_images": self.n_train,
        }

    def save(self, path: Path) -> None:
        tmp = path.with_name(path.stem + ".tmp.npz")
        np.savez(tmp, bank=self.bank, k=np.int64(self.k), n_train=np.int64(self.n_train))
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> KnnBank:
        with np.load(path) as f:
            return cls(np.asarray(f["bank"], np.float32), int(f["k"]), int(f["n_train"]))


def normalise(features: NDArray[np.floating]) -> NDArray[np.float32]:
    f = np.asarray(features, dtype=np.float32)
    out: NDArray[np.float32] = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), EPS)
    return out


def fit_knn(
    train_features: NDArray[np.floating], k: int = DEFAULT_K, max_bank: int | None = None, seed: int = 0
) -> KnnBank:
    """The bank: normalised train features, uniformly subsampled to `max_bank` rows if asked."""
    f = normalise(train_features)
    if k < 1 or k > len(f):
        raise ValueError(f"k = {k} needs 1 <= k <= {len(f)} train features")
    if max_bank is not None and max_bank < len(f):
        if max_bank < k:
            raise ValueError(f"a bank of {max_bank} cannot give a {k}-th neighbour")
        f = f[np.sort(np.random.default_rng(seed).choice(len(f), max_bank, replace=False))]
    return KnnBank(np.ascontiguousarray(f), k, len(train_features))


def knn_distance(features: NDArray[np.floating], bank: KnnBank, chunk: int = 1024) -> NDArray[np.float64]:
    """The reference for the graph: distance from each normalised query to its k-th nearest bank row."""
    q = normalise(features)
    out = np.empty(len(q), np.float64)
    for i in range(0, len(q), chunk):
        sims = q[i : i + chunk].astype(np.float64) @ bank.bank.T.astype(np.float64)
        kth = -np.partition(-sims, bank.k - 1, axis=1)[:, bank.k - 1]  # the k-th largest similarity
        out[i : i + chunk] = np.sqrt(np.maximum(2.0 - 2.0 * kth, 0.0))
    return out


def knn_score(features: Any, bank: KnnBank) -> Any:
    """Keras ops on a [N, D] tensor -> [N] k-th neighbour distance (tf2onnx: ReduceL2/Div, MatMul, TopK)."""
    from keras import ops

    norm = ops.sqrt(ops.maximum(ops.sum(features * features, axis=1, keepdims=True), EPS))
    q = features / norm
    sims = ops.matmul(q, ops.convert_to_tensor(np.ascontiguousarray(bank.bank.T)))  # [N, M]
    top, _ = ops.top_k(sims, bank.k)  # sorted descending
    kth = top[:, bank.k - 1]
    return ops.sqrt(ops.maximum(2.0 - 2.0 * kth, 0.0))


def oof_scores(
    oof_files: NDArray[Any], fold_dirs: list[Path], k: int = DEFAULT_K, max_bank: int | None = None
) -> NDArray[np.float64]:
    """Out-of-fold kNN scores in the order of `oof_files`: each fold's images against its own train bank.

    This is what a fold model's graph would answer for images it never saw, so ood_above can be
    fitted on it (the rate of real, unseen tiles referred as out of distribution).
    """
    index = {str(f): i for i, f in enumerate(oof_files)}
    scores = np.full(len(oof_files), np.nan)
    for fold_dir in fold_dirs:
        with np.load(fold_dir / "train_features.npz") as tf_, np.load(fold_dir / "oof.npz") as of:
            bank = fit_knn(tf_["penultimate"], k, max_bank)
            d = knn_distance(of["penultimate"], bank)
            for name, value in zip(of["files"], d, strict=True):
                scores[index[str(name)]] = value
    if np.isnan(scores).any():
        raise ValueError(f"{int(np.isnan(scores).sum())} images have no out-of-fold score")
    return scores
