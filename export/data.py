"""Folder-per-class image sets, the by-group split, and the decoded-array cache.

Every image is decoded once through `service.preprocess.load_image` (the function the
service runs per request) and cached as uint8 arrays, so training sees exactly the
pixels serving will see and epochs do not pay for JPEG decoding again.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import random
from collections import Counter, defaultdict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from service.preprocess import load_image

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
