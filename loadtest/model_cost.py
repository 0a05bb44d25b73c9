"""Serving cost of model variants, side by side in one run: the in-process ceiling
(loadtest/inprocess.py: decode + preprocess + ONNX Runtime, no HTTP) of each model folder,
interleaved over rounds so that drift in machine load hits every model alike.

    .venv/bin/python loadtest/model_cost.py --baseline "v1 (shipped)" --rounds 2 --duration 8 \
        --out docs/model/serving_cost.json "v1 (shipped)=service/bundled_model" "v2=DIR" ... \
        -- ../shared/data/lc25000-lung-768/*/*.jpeg

Writes {label: {ceiling (median img/s over rounds), ratio (to the baseline), rounds: [...]}}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def ceiling(model: Path, files: list[str], duration: float, warmup: float) -> float:
    cmd = [
        sys.executable,
        str(HERE / "inprocess.py"),
        "--model",
        str(model),
        "--duration",
        str(duration),
        "--warmup",
        str(warmup),
        *files,
    ]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600).stdout
    return float(json.loads(out.strip().splitlines()[-1])["ceiling_images_per_s"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline", required=True, help="label of the row the ratios are relative to")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--duration", type=float, default=8.0)
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("models", nargs="+", help="LABEL=DIR ... -- FILE ...")
    args = p.parse_args(argv)
    if "--" in args.models:
        split = args.models.index("--")
        specs, files = args.models[:split], args.models[split + 1 :]
    else:
        specs = [m for m in args.models if "=" in m]
        files = [m for m in args.models if "=" not in m]
    models = dict(s.split("=", 1) for s in specs)
    rounds: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(args.rounds):
        for label, folder in models.items():
            rounds[label].append(ceiling(Path(folder), files, args.duration, args.warmup))
            print(f"{label}: {rounds[label][-1]:.0f} img/s", file=sys.stderr)
    base = statistics.median(rounds[args.baseline])
    result = {
        label: {"ceiling": statistics.median(v), "ratio": statistics.median(v) / base, "rounds": v}
        for label, v in rounds.items()
    }
    result["_command"] = {"argv": sys.argv[1:]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
