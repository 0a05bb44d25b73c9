"""What the refer decision adds to a batch: the tissue check beside the model run, side by side.

    python loadtest/tissue_cost.py --data ../shared/data/lc25000-lung [--model service/bundled_model]

Both run on the same decoded batches in one process, alternating, on one thread each (as the
batch handler runs them); the figure that matters is the ratio, not the absolute times.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

from service.core.engine import Engine
from service.model.decision import Thresholds, decide_batch
from service.model.manifest import MANIFEST_NAME, Manifest
from service.model.preprocess import load_image
from service.model.tissue import check_batch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--model", type=Path, default=Path("service/bundled_model"))
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=40)
    args = ap.parse_args()

    manifest = Manifest.read(args.model / MANIFEST_NAME)
    engine = Engine(args.model / manifest.file, manifest, provider="cpu", intra_op_threads=1)
    thresholds = Thresholds.resolve(manifest, refer_below=None, ood_above=None)
    paths = sorted(args.data.glob("*/*.jpeg"))[::97][: args.batch]
    batch = np.stack([load_image(p.read_bytes(), engine.input_size) for p in paths])
    engine.warm_up([len(batch)])
    model_s: list[float] = []
    check_s: list[float] = []
    decide_s: list[float] = []
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        out = engine.infer(batch)
        t1 = time.perf_counter()
        check_batch(batch)
        t2 = time.perf_counter()
        decide_batch(batch, out.probabilities, out.ood_score, thresholds)
        t3 = time.perf_counter()
        model_s.append(t1 - t0)
        check_s.append(t2 - t1)
        decide_s.append(t3 - t2)
    n = len(batch)
    m, c, d = (statistics.median(x) / n * 1e6 for x in (model_s, check_s, decide_s))
    print(f"model {manifest.name} {manifest.version}, batch {n} of {engine.input_size} px, {args.rounds} rounds")
    print(f"per image (median): model run {m:.0f} us, tissue check {c:.0f} us, whole decision {d:.0f} us")
    print(f"decision / model run: {d / m:.3f}")


if __name__ == "__main__":
    main()
