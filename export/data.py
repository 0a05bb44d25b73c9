"""Folder-per-class image sets, the by-group split, and the decoded-array cache.

Every image is decoded once through `service.model.preprocess.load_image` (the function the
service runs per request, its simplejpeg fast path for baseline JPEGs included) and cached as
uint8 arrays, so training sees exactly the pixels serving will see and epochs do not pay for
JPEG decoding again.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import random
from collections import Counter, defaultdict
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from service.model.preprocess import load_image

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp"})


class DataError(Exception):
    """The data folder cannot be used as asked (layout, groups, split)."""


@dataclass(frozen=True)
class Sample:
    path: Path  # absolute
    rel: str  # relative to the data root, as in groups.csv
    label: int
    group: str  # "<class>/<group>" so that group ids may repeat across classes


@dataclass(frozen=True)
class Dataset:
    root: Path
    classes: list[str]
    samples: list[Sample]
    grouped: bool


def scan(root: Path) -> Dataset:
    """Classes are the sub-folder names (sorted); groups come from groups.csv if present."""
    root = root.resolve()
    if not root.is_dir():
        raise DataError(f"{root} is not a folder")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) < 2:
        raise DataError(f"{root} needs at least two class folders, found {classes}")
    groups: dict[str, str] = {}
    groups_csv = root / "groups.csv"
    if groups_csv.exists():
        with groups_csv.open(newline="") as fh:
            for row in csv.DictReader(fh):
                groups[row["file"]] = f"{row['class']}/{row['group']}"
    samples: list[Sample] = []
    for label, cls in enumerate(classes):
        for path in sorted((root / cls).rglob("*")):
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            rel = path.relative_to(root).as_posix()
            if groups and rel not in groups:
                raise DataError(f"{rel} is missing from groups.csv")
            # Ungrouped sets: each image is its own group (image-level split).
            samples.append(Sample(path, rel, label, groups.get(rel, f"{cls}/{rel}")))
    if not samples:
        raise DataError(f"no images under {root}")
    return Dataset(root, classes, samples, grouped=bool(groups))


def split_by_group(
    ds: Dataset, val_fraction: float, seed: int, *, allow_image_split: bool = False
) -> tuple[list[Sample], list[Sample]]:
    """Stratified split whose unit is the group: no group lands on both sides.

    LC25000 holds ~20 rotated/flipped copies of each source tile; an image-level split
    puts near-copies on both sides and reports ~100% accuracy that means nothing.
    """
    if not ds.grouped and not allow_image_split:
        raise DataError(
            f"{ds.root} has no groups.csv: an image-level split of augmented data leaks near-copies "
            "into validation. Add groups.csv (class,group,file) or pass --allow-image-split."
        )
    rng = random.Random(seed)
    by_class: dict[int, list[str]] = defaultdict(list)
    for g in sorted({(s.label, s.group) for s in ds.samples}):
        by_class[g[0]].append(g[1])
    val_groups: set[str] = set()
    for label in sorted(by_class):
        gs = by_class[label]
        rng.shuffle(gs)
        val_groups.update(gs[: max(1, round(len(gs) * val_fraction))])
    train = [s for s in ds.samples if s.group not in val_groups]
    val = [s for s in ds.samples if s.group in val_groups]
    assert not {s.group for s in train} & {s.group for s in val}
    return train, val


@dataclass(frozen=True)
class Split:
    """Train / select / test, by group.

    *select* picks the checkpoint, the temperature and every threshold; *test* is never
    used for any choice, so its figures are the honest estimate.
    """

    train: list[Sample]
    select: list[Sample]
    test: list[Sample]

    def groups(self, part: str) -> list[str]:
        return sorted({s.group for s in getattr(self, part)})


def split_three_way(ds: Dataset, holdout_groups: Iterable[str], seed: int) -> Split:
    """Train = every group not in `holdout_groups`; the holdout is halved into select and test.

    The halving is stratified by class (each class's holdout groups, sorted then shuffled
    with `seed`; select gets the first half, rounded down), so both halves keep the class mix.
    Passing the shipped model's `validation_groups` keeps the shipped model comparable: it
    never trained on either half.
    """
    holdout = set(holdout_groups)
    known = {s.group for s in ds.samples}
    if unknown := holdout - known:
        raise DataError(f"{len(unknown)} holdout groups are not in {ds.root}, e.g. {sorted(unknown)[:3]}")
    rng = random.Random(seed)
    by_class: dict[int, list[str]] = defaultdict(list)
    for label, group in sorted({(s.label, s.group) for s in ds.samples if s.group in holdout}):
        by_class[label].append(group)
    select_groups: set[str] = set()
    for label in sorted(by_class):
        gs = by_class[label]
        rng.shuffle(gs)
        select_groups.update(gs[: len(gs) // 2])
    train = [s for s in ds.samples if s.group not in holdout]
    select = [s for s in ds.samples if s.group in select_groups]
    test = [s for s in ds.samples if s.group in holdout and s.group not in select_groups]
    return Split(train, select, test)


def holdout_split(ds: Dataset, holdout_fraction: float, seed: int, *, allow_image_split: bool = False) -> Split:
    """A fresh 3-way split: `holdout_fraction` of each class's groups, halved into select and test."""
    _, held = split_by_group(ds, holdout_fraction, seed, allow_image_split=allow_image_split)
    return split_three_way(ds, {s.group for s in held}, seed)


def _decode(args: tuple[str, int]) -> NDArray[np.uint8]:
    path, size = args
    return load_image(Path(path).read_bytes(), size)


def load_arrays(
    samples: list[Sample], size: int, cache_dir: Path | None, workers: int | None = None
) -> tuple[NDArray[np.uint8], NDArray[np.int64]]:
    """(N, size, size, 3) uint8 images and (N,) labels, cached on disk by content key."""
    labels = np.array([s.label for s in samples], dtype=np.int64)
    key = hashlib.sha256(json.dumps([size, [s.rel for s in samples]]).encode()).hexdigest()[:16]
    cache = cache_dir / f"images-{size}-{key}.npy" if cache_dir else None
    if cache is not None and cache.exists():
        return np.load(cache, mmap_mode="r"), labels
    jobs = [(str(s.path), size) for s in samples]
    with ProcessPoolExecutor(max_workers=workers or os.cpu_count()) as pool:
        images = np.stack(list(pool.map(_decode, jobs, chunksize=64)))
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp.npy")
        np.save(tmp, images)
        tmp.replace(cache)
    return images, labels


def split_summary(ds: Dataset, split: Split) -> dict[str, object]:
    """Image and group counts of each part, for the manifest and the model card."""

    def counts(ss: list[Sample]) -> dict[str, int]:
        c = Counter(ds.classes[s.label] for s in ss)
        return {k: c[k] for k in ds.classes}

    return {
        "root": ds.root.name,
        "grouped": ds.grouped,
        **{f"{part}_images": counts(getattr(split, part)) for part in ("train", "select", "test")},
        **{f"{part}_groups": len(split.groups(part)) for part in ("train", "select", "test")},
    }


def summary(ds: Dataset, train: list[Sample], val: list[Sample]) -> dict[str, object]:
    """What went into training, for the manifest and the model card."""

    def counts(ss: list[Sample]) -> dict[str, int]:
        c = Counter(ds.classes[s.label] for s in ss)
        return {k: c[k] for k in ds.classes}

    return {
        "root": ds.root.name,
        "grouped": ds.grouped,
        "train_images": counts(train),
        "val_images": counts(val),
        "train_groups": len({s.group for s in train}),
        "val_groups": len({s.group for s in val}),
    }
