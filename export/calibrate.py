"""Temperature scaling (Guo et al., 2017) fitted on the validation groups' logits."""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray


def nll(logits: NDArray[np.floating], labels: NDArray[np.integer], temperature: float) -> float:
    z = logits / temperature
    z = z - z.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-logp[np.arange(len(labels)), labels].mean())


def fit_temperature(logits: NDArray[np.floating], labels: NDArray[np.integer]) -> float:
    """The T > 0 minimising validation NLL; a 1-D convex problem, so a golden-section search."""
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels)
    lo, hi = np.log(0.05), np.log(20.0)
    g = (np.sqrt(5) - 1) / 2
    a, b = lo + (1 - g) * (hi - lo), lo + g * (hi - lo)
    fa, fb = nll(logits, labels, np.exp(a)), nll(logits, labels, np.exp(b))
    for _ in range(80):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = lo + (1 - g) * (hi - lo)
            fa = nll(logits, labels, np.exp(a))
        else:
            lo, a, fa = a, b, fb
            b = lo + g * (hi - lo)
            fb = nll(logits, labels, np.exp(b))
    return float(np.exp((lo + hi) / 2))
