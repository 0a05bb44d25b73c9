"""ONNX Runtime inference cost only (no decode) of model folders, interleaved, min over repeats.

    .venv/bin/python loadtest/model_infer_cost.py --repeats 30 LABEL=DIR ...

The minimum of many interleaved timings is robust to other load on a shared machine; prints
ms per batch of 16 (128 px, one thread and ORT's default threads) and the ratio to the first row.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("models", nargs="+", help="LABEL=DIR")
    args = p.parse_args(argv)
    sessions = {}
    for spec in args.models:
        label, folder = spec.split("=", 1)
        m = json.loads((Path(folder) / "model.json").read_text())
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        sess = ort.InferenceSession(str(Path(folder) / m["file"]), opts, providers=["CPUExecutionProvider"])
        x = np.random.default_rng(0).integers(0, 256, (args.batch, m["input_size"], m["input_size"], 3), np.uint8)
        names = [m["output_name"]] + (["ood_score"] if "ood_score" in (m.get("outputs") or {}) else [])
        sessions[label] = (sess, names, {m["input_name"]: x})
    best = {k: float("inf") for k in sessions}
    for _ in range(args.repeats):
        for label, (sess, names, feed) in sessions.items():
            t0 = time.perf_counter()
            sess.run(names, feed)
            best[label] = min(best[label], time.perf_counter() - t0)
    first = next(iter(best.values()))
    out = {k: {"ms_per_batch": v * 1e3, "cost_ratio": v / first} for k, v in best.items()}
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
