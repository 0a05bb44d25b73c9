"""The ablation table (docs/model/ablation.md): each lever on the same select and test groups.

    python -m export.ablation --data ../shared/data/lc25000-lung --split-from service/bundled_model/model.json \
        --cache-dir CACHE --out docs/model --row "v1 (shipped)=DIR" --row "v2=DIR" ... \
        [--serving-cost docs/model/serving_cost.json] [--train-seconds LABEL=SECONDS ...]

Every row's figures are measured here; a lever without a model folder is listed as not measured.
Choices (which variant ships, thresholds) are made on the select columns; test is reported only.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from export.evaluate import evaluate_part


def _ci(lo_hi: list[float]) -> str:
    return f"[{lo_hi[0]:.3f}, {lo_hi[1]:.3f}]"


def evaluate_rows(
    rows: list[tuple[str, Path]], data: Path, split_from: Path, cache_dir: Path | None, n_resamples: int = 2000
) -> list[dict[str, Any]]:
    out = []
    for label, model_dir in rows:
        sel = evaluate_part(
            model_dir, data, "select", split_manifest=split_from, cache_dir=cache_dir, n_resamples=n_resamples
        )
        test = evaluate_part(
            model_dir, data, "test", split_manifest=split_from, cache_dir=cache_dir, n_resamples=n_resamples
        )
        out.append({"label": label, "model": str(model_dir), "select": sel, "test": test})
    return out


def markdown(results: list[dict[str, Any]], serving: dict[str, Any], train_seconds: dict[str, str]) -> str:
    classes = list(results[0]["test"]["per_class"])
    head = (
        "| lever | select acc | **test acc [95% CI]** | test recall "
        + " / ".join(c.removeprefix("lung_") for c in classes)
        + " | test ECE | refer: test coverage / accepted acc | training time | serving ceiling (img/s, ratio to v1) |"
    )
    lines = [head, "|" + "---|" * 8]
    for r in results:
        t, s = r["test"], r["select"]
        recalls = " / ".join(f"{t['per_class'][c]['recall']:.3f}" for c in classes)
        dec = t.get("decision")
        dec_s = f"{dec['coverage']:.3f} / {dec['accepted_accuracy']:.3f}" if dec else "n/a"
        cost = serving.get(r["label"])
        cost_s = f"{cost['ceiling']:.0f} ({cost['ratio']:.2f}x)" if cost else "not measured"
        lines.append(
            f"| {r['label']} | {s['accuracy']:.4f} | **{t['accuracy']:.4f}** {_ci(t['ci95']['accuracy'])} | {recalls} "
            f"| {t['ece']:.4f} | {dec_s} | {train_seconds.get(r['label'], 'n/a')} | {cost_s} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--split-from", type=Path, required=True)
    p.add_argument("--cache-dir", type=Path, default=None)
    p.add_argument("--row", action="append", default=[], help="LABEL=MODEL_DIR")
    p.add_argument("--serving-cost", type=Path, default=None, help="JSON {label: {ceiling, ratio}}")
    p.add_argument("--train-seconds", action="append", default=[], help="LABEL=TEXT")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    rows = [(lbl, Path(d)) for lbl, d in (r.split("=", 1) for r in args.row)]
    results = evaluate_rows(rows, args.data, args.split_from, args.cache_dir)
    serving = json.loads(args.serving_cost.read_text()) if args.serving_cost and args.serving_cost.exists() else {}
    train_s = dict(r.split("=", 1) for r in args.train_seconds)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ablation.json").write_text(json.dumps(results, indent=1))
    (args.out / "ablation_table.md").write_text(markdown(results, serving, train_s))
    print(markdown(results, serving, train_s))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
