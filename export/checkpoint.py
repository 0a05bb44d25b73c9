"""Run checkpoints: the weight EMA and a commit protocol that survives a kill at any moment.

A checkpoint is several files (model + optimizer, EMA weights, best EMA, state.json). Each is written
whole under a temporary name and renamed, and state.json is the commit point of the set (`checkpoint`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

STATE = "state.json"  # written last in each checkpoint: its presence means the checkpoint is whole
LAST = "last.keras"  # model + optimizer (with its step counter, so the LR schedule resumes)
EMA = "ema.npz"
BEST_EMA = "best_ema.npz"


class WeightEMA:
    """Exponential moving average of every float weight, BatchNorm statistics included.

    Averaging the running mean/variance too (as timm's ModelEmaV2 does) keeps them consistent
    with the averaged kernels. The decay warms up as min(decay, (1 + n) / (10 + n)).
    """

    def __init__(self, weights: list[NDArray[Any]], decay: float, updates: int = 0) -> None:
        self.shadow = [np.array(w, copy=True) for w in weights]
        self.decay = decay
        self.updates = updates

    def update(self, weights: list[NDArray[Any]]) -> None:
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for s, w in zip(self.shadow, weights, strict=True):
            if np.issubdtype(s.dtype, np.floating):
                s *= d
                s += (1.0 - d) * w
            else:
                s[...] = w
        self.updates += 1

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp.npz")
        arrays: dict[str, Any] = {f"arr_{i}": w for i, w in enumerate(self.shadow)}
        np.savez(tmp, updates=np.int64(self.updates), **arrays)
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path, decay: float) -> WeightEMA:
        with np.load(path) as f:
            n = len([k for k in f.files if k.startswith("arr_")])
            return cls([f[f"arr_{i}"] for i in range(n)], decay, int(f["updates"]))


def atomic_save_model(model: Any, path: Path) -> None:
    tmp = path.with_name(path.stem + ".tmp.keras")
    model.save(tmp)
    tmp.replace(path)


def write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


def pending(path: Path) -> Path:
    """Where a checkpoint file waits until state.json (the commit point) names its epoch."""
    return path.with_name("next-" + path.name)


def checkpoint(out: Path, model: Any, ema: WeightEMA, state: dict[str, Any]) -> None:
    """Redo-log commit, so that a kill at ANY moment leaves a consistent checkpoint.

    Model, EMA (and best EMA) are written whole to next-* files, then state.json (naming the
    EMA update count) is replaced atomically: that is the commit. Only then do the next-* files
    replace the live ones; a kill in between is rolled forward by `recover` on resume.
    """
    atomic_save_model(model, pending(out / LAST))
    ema.save(pending(out / EMA))
    state["ema_updates"] = ema.updates
    write_json(out / STATE, state)
    recover(out, state)


def recover(out: Path, state: dict[str, Any]) -> None:
    """Finish an interrupted commit: roll next-* files forward if state.json committed them, else drop them."""
    ema_next = pending(out / EMA)
    committed = False
    if ema_next.exists() and "ema_updates" in state:
        with np.load(ema_next) as f:
            committed = int(f["updates"]) == int(state["ema_updates"])
    for name in (LAST, BEST_EMA, EMA):  # EMA last: its next- file is the marker checked above
        waiting = pending(out / name)
        if waiting.exists():
            if committed:
                waiting.replace(out / name)
            else:
                waiting.unlink()
