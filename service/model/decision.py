"""The refer decision: accept the model's answer, or refer the image to a pathologist.

Made in one place, beside the engine's output (`service.core.runtime`), from four things:

* the calibrated probabilities: below `refer_below` the answer is not sure enough
  (`low_confidence`);
* the model's out-of-distribution score, when the graph has one: above `ood_above` the image
  is unlike anything the model was trained on (`out_of_distribution`);
* the tissue check of the decoded image (`service.model.tissue`): not plausibly an H&E tile at all
  (`out_of_distribution`);
* the thresholds: the manifest's `decision` section (fitted at export on the select groups),
  each overridable by the settings `LUNGSERVE_REFER_BELOW` and `LUNGSERVE_OOD_ABOVE`.

Out of distribution wins over low confidence: the confidence of a model on an input it was never
meant to see means nothing. A manifest without a `decision` section refers only what the tissue
check rejects. See docs/decision.md.
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
DECISIONS: Final[tuple[DecisionName, ...]] = ("accept", "refer")
REASONS: Final[tuple[Reason, ...]] = ("low_confidence", "out_of_distribution")


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
    return [
        decide(probabilities[i], None if ood_scores is None else float(ood_scores[i]), plausible[i], thresholds)
        for i in range(n)
    ]
