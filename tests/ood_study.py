"""The out-of-distribution study behind docs/model/ood.md: fit check of the tissue limits, the
OOD image set per category, and the share of real held-out tiles referred.

    python -m tests.ood_study --data ../shared/data/lc25000-lung --model service/bundled_model \
        --out docs/model/ood.md

It runs the service's own code: `service.model.preprocess.load_image` (the decode every upload gets),
`Engine.infer` (probabilities + ood_score when the model has one) and `decide_batch` (the tissue
check and the decision, exactly as the runtime makes it). Thresholds are the manifest's, as served
with no LUNGSERVE_REFER_BELOW / LUNGSERVE_OOD_ABOVE set.

Groups: the tissue limits were fitted on the model's *train* groups (`split.train_groups` in a v2
manifest, else every group not in `validation_groups`); the held-out share is measured on groups
never used for any choice (`split.test_groups`, else `validation_groups`).
"""

from __future__ import annotations

import argparse
import csv
import math
import platform
import random
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import astuple, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from service.core.engine import Engine
from service.model.decision import Decision, Thresholds, decide_batch
from service.model.manifest import MANIFEST_NAME, Manifest
from service.model.preprocess import load_image
from service.model.tissue import LIMITS, TissueMeasures, check_batch, judge, measure_batch
from tests.ood_images import CATEGORIES, MISCOLOURED, OTHER_STAIN, OodImage, ood_images

BATCH = 32
RESTAINED_PER_CLASS = 20
QUANTILES = (0.0, 0.05, 0.5, 50.0, 99.5, 99.95, 100.0)  # percent


@dataclass(frozen=True)
class Tile:
    path: Path
    group: str  # "lung_aca/12"


def read_groups(root: Path) -> list[Tile]:
    with (root / "groups.csv").open(newline="") as fh:
        return [Tile(root / r["file"], f"{r['class']}/{r['group']}") for r in csv.DictReader(fh)]


def split_of(manifest: Manifest, tiles: Sequence[Tile]) -> tuple[set[str], set[str], str]:
    """(train groups, held-out groups, how the held-out groups were named)."""
    extra: dict[str, Any] = manifest.model_extra or {}
    split = extra.get("split")
    every = {t.group for t in tiles}
    if is_cv_release(manifest):  # the members together trained on every group: none is held out
        return every, every, CV_EVERY_GROUP
    if isinstance(split, dict) and split.get("test_groups"):
        held = set(split["test_groups"])
        listed = split.get("train_groups")  # a list of groups, or only their number
        train = set(listed) if isinstance(listed, list) else every - held - set(split.get("select_groups") or [])
        return train, held, "split.test_groups"
    held = set(extra.get("validation_groups") or [])
    return every - held, held, "validation_groups"


CV_EVERY_GROUP = "every group, each trained on by some members of the ensemble"


def is_cv_release(manifest: Manifest) -> bool:
    """A cross-validation release (export.cv_release): fold models as one ensemble."""
    return "ensemble" in (manifest.model_extra or {})


SPLIT_SEED = 1337  # export/train.py's seed: how model v2 halved the v1 validation groups


def select_groups_of(manifest: Manifest, tiles: Sequence[Tile]) -> set[str]:
    """The select half of the held-out groups (limits may be checked on it; the test half is for
    reporting only): `split.select_groups`, else the v1 `validation_groups` halved per class exactly
    as the `model` branch's export/data.py split_three_way does (sorted, shuffled with seed 1337,
    the first half of each class, rounded down)."""
    extra: dict[str, Any] = manifest.model_extra or {}
    split = extra.get("split")
    if is_cv_release(manifest):
        return set()
    if isinstance(split, dict) and split.get("select_groups"):
        return set(split["select_groups"])
    rng = random.Random(SPLIT_SEED)
    held = set(extra.get("validation_groups") or [])
    chosen: set[str] = set()
    for cls in manifest.classes:
        groups = sorted(g for g in {t.group for t in tiles} if g in held and g.split("/")[0] == cls)
        rng.shuffle(groups)
        chosen.update(groups[: len(groups) // 2])
    return chosen


def decode(paths: Iterable[Path], size: int) -> NDArray[np.uint8]:
    return np.stack([load_image(p.read_bytes(), size) for p in paths])


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion k/n."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def pct(k: int, n: int) -> str:
    lo, hi = wilson(k, n)
    return f"{k}/{n} = {100 * k / n:.2f}% (95% CI {100 * lo:.2f}-{100 * hi:.2f}%)"


def real_tiles_to_recolour(tiles: Sequence[Tile]) -> list[NDArray[np.uint8]]:
    """Every n-th tile of each class (RESTAINED_PER_CLASS of each), decoded at 256 px: the real
    tissue that tests/ood_images.py re-stains and re-colours."""
    by_class: dict[str, list[Tile]] = defaultdict(list)
    for t in tiles:
        by_class[t.group.split("/")[0]].append(t)
    return [
        load_image(t.path.read_bytes(), 256)
        for _, ts in sorted(by_class.items())
        for t in sorted(ts, key=lambda t: t.path.name)[:: max(1, len(ts) // RESTAINED_PER_CLASS)][:RESTAINED_PER_CLASS]
    ]


def measures_of(tiles: Sequence[Tile], size: int) -> list[TissueMeasures]:
    out: list[TissueMeasures] = []
    for start in range(0, len(tiles), BATCH):
        out.extend(measure_batch(decode((t.path for t in tiles[start : start + BATCH]), size)))
    return out


def fit_section(
    train: list[TissueMeasures],
    select: list[TissueMeasures],
    test: list[TissueMeasures],
    train_word: str = "train-group",
) -> list[str]:
    names = [f.name for f in fields(TissueMeasures)]
    table = np.array([astuple(m) for m in train], dtype=np.float64)
    lines = [
        "## The tissue check's limits (service/model/tissue.py)",
        "",
        f"Quantiles of each feature over the {len(train)} {train_word} tiles (percent), and the limit in code:",
        "",
        "| feature | " + " | ".join(f"q{q:g}" for q in QUANTILES) + " | limit |",
        "|---|" + "---|" * (len(QUANTILES) + 1),
    ]
    limit_of = {
        "background": f"> {LIMITS.max_background:g}",
        "chroma": f"< {LIMITS.min_chroma:g}",
        "blue_over_green": f"> {LIMITS.max_blue_over_green:g}",
        "red_over_green": f"< {LIMITS.min_red_over_green:g} or > {LIMITS.max_red_over_green:g}",
        "off_palette": f"> {LIMITS.max_off_palette:g}",
        "texture": f"< {LIMITS.min_texture:g}",
        "roughness": f"> {LIMITS.max_roughness:g}",
        "mean_density": f"> {LIMITS.max_mean_density:g}",
        "likelihood": f"< {LIMITS.min_likelihood:g}",
    }
    for j, name in enumerate(names):
        qs = np.nanpercentile(table[:, j], QUANTILES)
        lines.append(f"| {name} | " + " | ".join(f"{v:.3g}" for v in qs) + f" | {limit_of[name]} |")
    lines.append("")
    lines.append(
        "Limits are fitted on the train groups and checked on the select groups; the test groups are"
        " reported, never used for a choice."
        if select
        else "The limits are constants, fitted for model v2 on its 489 train groups; here they meet every tile."
    )
    lines.append("")
    for label, ms in ((train_word, train), ("select-group", select), ("test-group", test)):
        if not ms:  # a cross-validation release has no select or test groups
            continue
        failures = [judge(m) for m in ms]
        flagged = sum(1 for f in failures if f)
        by = Counter(x.value for f in failures for x in f)
        detail = ", ".join(f"{k} {v}" for k, v in sorted(by.items())) or "none"
        lines.append(f"- {label} tiles failing the tissue check: {pct(flagged, len(ms))}; by limit: {detail}")
    return [*lines, ""]


@dataclass(frozen=True)
class Outcome:
    decision: Decision
    tissue_ok: bool  # the tissue check alone
    score_ok: bool  # the model's ood_score alone (True when it has none or no threshold)


# Ruifrok & Johnston's stain vectors (as export/augment.py, where training jitters stains the same way).
_RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
_RGB_FROM_HED[2] = np.cross(_RGB_FROM_HED[0], _RGB_FROM_HED[1])
_HED_FROM_RGB = np.linalg.inv(_RGB_FROM_HED)
JITTERS = ((0.1, 0.05), (0.2, 0.1))  # (gain, shift): training's strength, and twice it


def hed_jitter(x: NDArray[np.uint8], rng: np.random.Generator, gain: float, shift: float) -> NDArray[np.uint8]:
    """Tellez et al.'s HED stain jitter, per image: another lab's staining, roughly."""
    od = -np.log(np.maximum(x.astype(np.float64), 1.0) / 255.0)
    conc = od @ _HED_FROM_RGB
    alpha = rng.uniform(1 - gain, 1 + gain, (x.shape[0], 1, 1, 3))
    beta = rng.uniform(-shift, shift, (x.shape[0], 1, 1, 3))
    rgb = 255.0 * np.exp(-((conc * alpha + beta) @ _RGB_FROM_HED))
    return np.asarray(np.clip(rgb, 0, 255), dtype=np.uint8)


def stain_section(tiles: Sequence[Tile], size: int, word: str = "held-out") -> list[str]:
    lines = [
        f"## Stain variation ({word} tiles, HED jitter)",
        "",
        f"How often the tissue check refers real {word} tiles whose stain concentrations were jittered",
        "(per image, per stain: gain U(1-a, 1+a), shift U(-b, b) in optical density; seed 0). Training",
        "augments with a=0.1, b=0.05. Another lab's H&E may differ more: the check was fitted on",
        "LC25000 alone and would refer more of it.",
        "",
        "| jitter (a, b) | failing the tissue check | by limit |",
        "|---|---|---|",
    ]
    for gain, shift in JITTERS:
        rng = np.random.default_rng(0)
        failed = 0
        by: Counter[str] = Counter()
        for start in range(0, len(tiles), 256):
            batch = hed_jitter(decode((t.path for t in tiles[start : start + 256]), size), rng, gain, shift)
            for c in check_batch(batch):
                failed += not c.plausible
                by.update(f.value for f in c.failures)
        detail = ", ".join(f"{k} {v}" for k, v in sorted(by.items())) or "none"
        lines.append(f"| ({gain:g}, {shift:g}) | {pct(failed, len(tiles))} | {detail} |")
    return [*lines, ""]


def run_images(engine: Engine, thresholds: Thresholds, images: NDArray[np.uint8]) -> list[Outcome]:
    outcomes: list[Outcome] = []
    for start in range(0, len(images), BATCH):
        batch = np.ascontiguousarray(images[start : start + BATCH])
        out = engine.infer(batch)
        decisions = decide_batch(batch, out.probabilities, out.ood_score, thresholds)
        checks = check_batch(batch)
        for i, d in enumerate(decisions):
            score_ok = out.ood_score is None or thresholds.ood_above is None
            score_ok = score_ok or bool(out.ood_score is not None and out.ood_score[i] <= thresholds.ood_above)
            outcomes.append(Outcome(d, checks[i].plausible, score_ok))
    return outcomes


def ood_section(engine: Engine, thresholds: Thresholds, items: Sequence[OodImage]) -> tuple[list[str], int]:
    size = engine.input_size
    outcomes = run_images(engine, thresholds, np.stack([load_image(i.data, size) for i in items]))
    per: dict[str, Counter[str]] = defaultdict(Counter)
    missed: list[str] = []
    for item, o in zip(items, outcomes, strict=True):
        c = per[item.category]
        c[o.decision.reason or "accepted"] += 1
        c["tissue"] += not o.tissue_ok
        c["score"] += not o.score_ok
        if not o.decision.referred:
            missed.append(item.id)
    lines = [
        "## The out-of-distribution set (tests/ood_images.py)",
        "",
        "The last two columns say which gate alone would have caught how many (an image may fail both).",
        "",
        "| category | images | referred | out_of_distribution | low_confidence | accepted | tissue check | ood_score |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for cat in CATEGORIES:
        c = per.get(cat, Counter())
        n = sum(c[k] for k in ("accepted", "out_of_distribution", "low_confidence"))
        if n:
            score = str(c["score"]) if engine.manifest.ood_output is not None else "-"
            lines.append(
                f"| {cat} | {n} | {n - c['accepted']} | {c['out_of_distribution']} | {c['low_confidence']} "
                f"| {c['accepted']} | {c['tissue']} | {score} |"
            )
    total = len(items)
    lines += ["", f"Referred: {total - len(missed)} of {total}."]
    lines += variant_lines([(i, o) for i, o in zip(items, outcomes, strict=True) if i.category == MISCOLOURED])
    if missed:
        lines += ["", "Accepted (not referred):", *[f"- {m}" for m in missed]]
    return [*lines, ""], len(missed)


def variant_lines(pairs: Sequence[tuple[OodImage, Outcome]]) -> list[str]:
    """Per variant of the real-tile copies ("tile 7: channels BGR" -> "channels BGR")."""
    per: dict[str, Counter[str]] = defaultdict(Counter)
    for item, o in pairs:
        c = per[item.name.split(": ", 1)[-1]]
        c["images"] += 1
        c["accepted"] += not o.decision.referred
    if not per:
        return []
    lines = ["", f"{MISCOLOURED}, per variant:", "", "| variant | images | accepted |", "|---|---|---|"]
    lines += [f"| {v} | {c['images']} | {c['accepted']} |" for v, c in per.items()]
    return lines


def held_out_section(
    engine: Engine, thresholds: Thresholds, tiles: Sequence[Tile], named: str, word: str = "held-out"
) -> tuple[list[str], float]:
    counts: Counter[str] = Counter()
    for start in range(0, len(tiles), 256):
        chunk = tiles[start : start + 256]
        for o in run_images(engine, thresholds, decode((t.path for t in chunk), engine.input_size)):
            counts[o.decision.reason or "accepted"] += 1
            counts["tissue"] += not o.tissue_ok
            counts["score"] += not o.score_ok
    n = counts["accepted"] + counts["out_of_distribution"] + counts["low_confidence"]
    ood = counts["out_of_distribution"]
    lines = [
        f"## Real {word} tiles ({named}: {len({t.group for t in tiles})} groups, {n} tiles)",
        "",
        f"- referred as out_of_distribution: {pct(ood, n)}",
        f"  - failing the tissue check: {pct(counts['tissue'], n)}",
        "  - ood_score above ood_above: "
        + (pct(counts["score"], n) if engine.manifest.ood_output is not None else "no ood_score"),
        f"- referred as low_confidence: {pct(counts['low_confidence'], n)}",
        f"- accepted: {pct(counts['accepted'], n)}",
        "",
    ]
    return lines, ood / n if n else 0.0


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="lc25000-lung folder (with groups.csv)")
    ap.add_argument("--model", type=Path, default=Path("service/bundled_model"))
    ap.add_argument("--out", type=Path, help="write the markdown here (default: stdout)")
    args = ap.parse_args(argv)

    started = time.perf_counter()
    manifest = Manifest.read(args.model / MANIFEST_NAME)
    engine = Engine(args.model / manifest.file, manifest, provider="cpu")
    thresholds = Thresholds.resolve(manifest, refer_below=None, ood_above=None)
    tiles = read_groups(args.data)
    train_groups, held_groups, named = split_of(manifest, tiles)
    train = [t for t in tiles if t.group in train_groups]
    held = [t for t in tiles if t.group in held_groups]

    # v1 manifests: select is half of the held-out groups; v2 manifests name it beside test.
    select_groups = select_groups_of(manifest, tiles) - train_groups
    cv = is_cv_release(manifest)
    word = "LC25000" if cv else "held-out"  # a cross-validation ensemble holds no group out
    fit = fit_section(
        measures_of(train, engine.input_size),
        measures_of([t for t in tiles if t.group in select_groups], engine.input_size),
        [] if cv else measures_of([t for t in held if t.group not in select_groups], engine.input_size),
        word if cv else "train-group",
    )
    real = real_tiles_to_recolour(held)
    ood_lines, missed = ood_section(engine, thresholds, ood_images(real))
    held_lines, ood_rate = held_out_section(engine, thresholds, held, named, word)
    stain_lines = stain_section(held, engine.input_size, word)

    held_which = "the test half only" if named.startswith("split.") else "select and test together"
    if cv:
        ood_rate_oof = manifest.decision.model_dump().get("ood_rate") if manifest.decision else None
        held_which = (
            "no group is held out from the ensemble; out of fold (each tile against the one fold model that "
            f"never saw it) the rate is model.json's decision.ood_rate = {ood_rate_oof}"
        )
    doc = [
        "# Out-of-distribution inputs: the tissue check and the refer decision",
        "",
        "Generated by `python -m tests.ood_study --data ../shared/data/lc25000-lung --model service/bundled_model "
        "--out docs/model/ood.md` (do not edit by hand). How the decision works: docs/decision.md.",
        "",
        f"- model: {manifest.name} {manifest.version}; "
        f"ood_score output: {'yes' if manifest.ood_output is not None else 'no'}",
        f"- thresholds (manifest, no overrides): refer_below={thresholds.refer_below}, "
        f"ood_above={thresholds.ood_above}",
        f"- data: LC25000 lung tiles, {len(held_groups)} groups ({len(held)} tiles), each trained on by some "
        "members of the ensemble"
        if cv
        else f"- data: LC25000 lung tiles, {len(train_groups & {t.group for t in tiles})} train groups "
        f"({len(train)} tiles), {len(held_groups)} held-out groups ({len(held)} tiles)",
        f"- {OTHER_STAIN} and {MISCOLOURED}: re-stained and re-coloured copies of {len(real)} {word} tiles",
        (
            "- splits: the tissue check's limits (constants of service/model/tissue.py, fitted on model v2's 489 "
            "train groups) are shown on every tile; the OOD set's real-tile copies and the share below use "
            f"{named} ({held_which})"
            if cv
            else f"- splits: the tissue check's limits were fitted on the train groups only and checked on the select "
            f"groups ({len(select_groups)} groups); the OOD set's real-tile copies and the held-out share below use "
            f"the held-out groups named by {named} ({held_which}); "
            f"no figure from the test groups was used to choose anything"
        ),
        f"- run: Python {platform.python_version()}, {time.perf_counter() - started:.0f} s",
        "",
        *fit,
        *ood_lines,
        *held_lines,
        *stain_lines,
    ]
    text = "\n".join(doc)
    if args.out:
        args.out.write_text(text)
    else:
        sys.stdout.write(text)
    print(f"missed OOD images: {missed}; held-out OOD rate: {100 * ood_rate:.2f}%", file=sys.stderr)
    return 0 if missed == 0 and ood_rate <= 0.01 else 1


if __name__ == "__main__":
    raise SystemExit(main())
