"""The refer decision: accept the model's answer, or refer the image to a pathologist.

`decide` is pure: from the calibrated probabilities (`refer_below`), the model's ood_score
(`ood_above`) and the tissue check it returns accept, or refer with a reason; out of
distribution wins over low confidence. The thresholds are the manifest's, each overridable by
settings. `decide_batch` runs once per batch, beside the model's output (docs/decision.md).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Literal

import numpy as np
from numpy.typing import NDArray

from service.model.manifest import Manifest
from service.model.tissue import LIMITS, TissueLimits, check_batch

DecisionName = Literal["accept", "refer"]
Reason = Literal["low_confidence", "out_of_distribution"]


@dataclass(frozen=True)
class Decision:
    decision: DecisionName
    reason: Reason | None

    @property
    def referred(self) -> bool:
        return self.decision == "refer"


ACCEPT: Final = Decision("accept", None)
LOW_CONFIDENCE: Final = Decision("refer", "low_confidence")
OUT_OF_DISTRIBUTION: Final = Decision("refer", "out_of_distribution")


@dataclass(frozen=True)
class Thresholds:
    """What the decision tests. None: that test is off (no threshold in the manifest, none set)."""

    refer_below: float | None = None  # refer when the calibrated max probability is below this
    ood_above: float | None = None  # refer when the model's ood_score is above this
    tissue_check: bool = True  # refer images that fail service.model.tissue (LUNGSERVE_TISSUE_CHECK)

    @classmethod
    def resolve(
        cls, manifest: Manifest, *, refer_below: float | None, ood_above: float | None, tissue_check: bool = True
    ) -> Thresholds:
        """The manifest's thresholds, each replaced by its setting when that is set."""
        section = manifest.decision
        return cls(
            refer_below=refer_below if refer_below is not None else (section.refer_below if section else None),
            ood_above=ood_above if ood_above is not None else (section.ood_above if section else None),
            tissue_check=tissue_check,
        )


def decide(
    probabilities: NDArray[np.floating] | Sequence[float],
    ood_score: float | None,
    plausible_tissue: bool,
    thresholds: Thresholds,
) -> Decision:
    """Accept, or refer with a reason. Pure: same inputs, same answer."""
    if not plausible_tissue:
        return OUT_OF_DISTRIBUTION
    # A NaN score is "unknown", and unknown is not "in distribution".
    if (
        ood_score is not None
        and thresholds.ood_above is not None
        and (not math.isfinite(ood_score) or ood_score > thresholds.ood_above)
    ):
        return OUT_OF_DISTRIBUTION
    if thresholds.refer_below is not None:
        confidence = float(np.max(probabilities))
        if not math.isfinite(confidence) or confidence < thresholds.refer_below:
            return LOW_CONFIDENCE
    return ACCEPT


def decide_batch(
    images: NDArray[np.uint8],
    probabilities: NDArray[np.float32],
    ood_scores: NDArray[np.float32] | None,
    thresholds: Thresholds,
    limits: TissueLimits = LIMITS,
) -> list[Decision]:
    """`decide` for each image of a batch: the tissue check on the (N, S, S, 3) input the model
    saw, beside the model's outputs for it. The serving runtime and the OOD study both call this."""
    n = len(probabilities)
    plausible = [c.plausible for c in check_batch(images, limits)] if thresholds.tissue_check else [True] * n
    # `decide`'s tests as whole-batch array operations (per image they cost microseconds of
    # numpy each), in float64 so every comparison is the one `decide` makes on Python floats.
    out_of_distribution = [False] * n
    if ood_scores is not None and thresholds.ood_above is not None:
        scores = np.asarray(ood_scores, dtype=np.float64)
        out_of_distribution = (~np.isfinite(scores) | (scores > thresholds.ood_above)).tolist()
    low_confidence = [False] * n
    if thresholds.refer_below is not None and n:
        confidence = np.max(np.asarray(probabilities), axis=1).astype(np.float64)
        low_confidence = (~np.isfinite(confidence) | (confidence < thresholds.refer_below)).tolist()
    return [
        OUT_OF_DISTRIBUTION if not ok or ood else LOW_CONFIDENCE if low else ACCEPT
        for ok, ood, low in zip(plausible, out_of_distribution, low_confidence, strict=True)
    ]
