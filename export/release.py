"""After a training run: the v2 bundle, its variants and their evaluation, in one command.

    python -m export.release --run RUN --data ../shared/data/lc25000-lung --cache-dir CACHE \
        --baseline service/bundled_model --work WORK --docs docs/model

Writes WORK/<variant>/ (model.onnx + model.json, each decision refitted on select), then
evaluates every variant on the select and the test groups (WORK/ablation.json). Which one
ships is chosen on the select columns only (`choose`).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from export import data as data_mod
from export.ablation import evaluate_rows, markdown
from export.bundle import bundle
from export.decision_fit import plot_risk_coverage
from export.evaluate import run_outputs, split_of
from export.variants import dihedral_tta, ensemble, quantize_int8, refit_decision, write_variant

log = logging.getLogger("lungserve.release")


def build_variants(run: Path, data: Path, cache: Path, baseline: Path, work: Path, docs: Path) -> dict[str, Path]:
    import onnx

    v2 = work / "v2"
    if not (v2 / "model.json").exists():
        bundle(run, v2, data=data, cache_dir=cache, weights="best")
    split_from = v2 / "model.json"
    rows = {"v1 (shipped)": work / "v1", "v1 + TTA8": work / "v1-tta8", "v2": v2}
    if not (work / "v1" / "model.json").exists():
        write_variant(
            baseline / "model.onnx",
            baseline,
            work / "v1",
            name_suffix="v1",
            describe={"lever": "shipped v1; decision fitted on select for comparison"},
        )
        refit_decision(work / "v1", data, cache, split_from)
    if not (work / "v1-tta8" / "model.json").exists():
        write_variant(
            dihedral_tta(onnx.load(baseline / "model.onnx")),
            baseline,
            work / "v1-tta8",
            name_suffix="tta8",
            describe={"lever": "v1 + dihedral TTA, 8 views averaged in the graph"},
        )
        refit_decision(work / "v1-tta8", data, cache, split_from)
    specs: dict[str, tuple[str, Any, dict[str, str]]] = {
        "v2 + TTA8": (
            "v2-tta8",
            lambda: dihedral_tta(onnx.load(v2 / "model.onnx")),
            {"lever": "v2 + dihedral TTA, 8 views averaged in the graph"},
        ),
        "v1 + v2 ensemble": (
            "v1v2",
            lambda: ensemble([onnx.load(v2 / "model.onnx"), onnx.load(baseline / "model.onnx")]),
            {"lever": "mean of v2's and v1's calibrated probabilities, one graph; ood_score from v2"},
        ),
    }
    for label, (folder, make, describe) in specs.items():
        if not (work / folder / "model.json").exists():
            write_variant(make(), v2, work / folder, name_suffix=folder, describe=describe)
            refit_decision(work / folder, data, cache, split_from)
        rows[label] = work / folder
    if not (work / "v2-int8" / "model.json").exists():
        ds = data_mod.scan(data)
        train = split_of(json.loads(split_from.read_text()), ds).train
        x, _ = data_mod.load_arrays(train, 128, cache)
        calib = np.asarray(x[:: max(1, len(x) // 256)][:256])
        (work / "v2-int8").mkdir(parents=True, exist_ok=True)
        tmp = work / "v2-int8.onnx"
        quantize_int8(v2 / "model.onnx", tmp, calib)
        write_variant(
            tmp,
            v2,
            work / "v2-int8",
            name_suffix="int8",
            describe={
                "lever": "v2, ONNX Runtime static int8 (QDQ, per-channel, Conv+MatMul), "
                f"min/max calibration on {len(calib)} train images"
            },
        )
        tmp.unlink()
        refit_decision(work / "v2-int8", data, cache, split_from)
    rows["v2 int8"] = work / "v2-int8"
    _plot_select_curves({k: rows[k] for k in ("v1 (shipped)", "v2", "v2 + TTA8")}, data, cache, split_from, docs)
    return rows


def _plot_select_curves(rows: dict[str, Path], data: Path, cache: Path, split_from: Path, docs: Path) -> None:
    ds = data_mod.scan(data)
    samples = split_of(json.loads(split_from.read_text()), ds).select
    x, y = data_mod.load_arrays(samples, 128, cache)
    curves = {}
    for label, folder in rows.items():
        p = run_outputs(folder, np.asarray(x))["probabilities"]
        curves[label] = (p.max(axis=1), p.argmax(axis=1) == y)
    chosen = json.loads((rows["v2"] / "model.json").read_text())["decision"]
    docs.mkdir(parents=True, exist_ok=True)
    plot_risk_coverage(
        curves,
        chosen,
        docs / "risk_coverage.png",
        title=f"risk-coverage, select groups ({len({s.group for s in samples})} groups)",
    )


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, required=True)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--cache-dir", type=Path, required=True)
    p.add_argument("--baseline", type=Path, required=True)
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--docs", type=Path, required=True)
    args = p.parse_args(argv)
    rows = build_variants(args.run, args.data, args.cache_dir, args.baseline, args.work, args.docs)
    log.info("variants built: %s", list(rows))
    results = evaluate_rows(list(rows.items()), args.data, args.work / "v2" / "model.json", args.cache_dir)
    (args.work / "ablation.json").write_text(json.dumps(results, indent=1))
    print(markdown(results, {}, {}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
