"""The model manifest (`model.json`): the contract between export, storage and serving.

It also holds the rules every copy of a model obeys, wherever it is stored: the manifest names
a plain file beside it, and that file's content has the manifest's sha256.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Final

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from service.errors import ModelSourceError, one_line

MANIFEST_NAME = "model.json"
MODEL_NAME = "model.onnx"


class DecisionSection(BaseModel):
    """`decision` in model.json: the refer thresholds fitted at export (see service.model.decision)."""

    model_config = ConfigDict(extra="allow", frozen=True)

    refer_below: float | None = Field(default=None, ge=0.0, le=1.0, description="refer below this max probability")
    ood_above: float | None = Field(default=None, description="refer as out of distribution above this ood_score")


class EstimateSection(BaseModel):
    """`estimate` in model.json: THE accuracy figure, out-of-fold over grouped cross-validation
    (docs/model/cv.md), with its interval; other keys (recall intervals, ECE, ...) kept verbatim."""

    model_config = ConfigDict(extra="allow", frozen=True)

    accuracy: float = Field(ge=0.0, le=1.0)
    interval: tuple[float, float]
    recall: dict[str, float] = Field(default_factory=dict)
    method: str
    groups: int = Field(gt=0)


# Graph output roles of the model contract (docs/model_contract.md); `outputs` maps a role to
# the graph's name for it, and a role it does not map keeps the role's own name.
PROBABILITIES: Final = "probabilities"
OOD_SCORE: Final = "ood_score"
FEATURE_MAPS: Final = "feature_maps"
CAM_WEIGHTS: Final = "cam_weights"
# LC25000's tiles are 768 px crops: a model without `tile_source_px` was trained at that scale.
DEFAULT_TILE_SOURCE_PX: Final = 768


class Manifest(BaseModel):
    """What the service needs to run a model correctly; extra keys are kept verbatim."""

    model_config = ConfigDict(extra="allow", frozen=True)

    name: str
    version: str
    classes: list[str] = Field(min_length=2)
    input_name: str
    output_name: str
    input_size: int = Field(gt=0, le=4096)
    input_dtype: str = "uint8"
    resize: dict[str, str]
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    file: str = MODEL_NAME
    # Graph output names by role ("probabilities", "ood_score", "feature_maps", "cam_weights"),
    # the ones this model has; None: only `output_name`.
    outputs: dict[str, str] | None = None
    decision: DecisionSection | None = None
    estimate: EstimateSection | None = None
    # Side, in source pixels, of the training tiles (/analyze tiles large images at this scale).
    tile_source_px: int | None = Field(default=None, gt=0)

    @field_validator("file")
    @classmethod
    def _plain_file_name(cls, name: str) -> str:
        # The manifest names a file beside it; anything else could escape the folder (or the cache).
        if not name or name in (".", "..") or "/" in name or "\\" in name:
            raise ValueError(f"file {name!r} must be a plain file name")
        return name

    @classmethod
    def read(cls, path: Path) -> Manifest:
        return cls.model_validate_json(path.read_bytes())

    def dump(self) -> dict[str, Any]:
        # Optional sections a model lacks are left out, not written as null.
        absent = {name for name in ("outputs", "decision", "estimate", "tile_source_px") if getattr(self, name) is None}
        return self.model_dump(mode="json", exclude=absent)

    def output_for(self, role: str) -> str | None:
        """The graph output that plays `role`, or None when the manifest maps none to it."""
        return (self.outputs or {}).get(role)

    @property
    def tile_px(self) -> int:
        """Tile side in source pixels: the manifest's, else LC25000's."""
        return self.tile_source_px if self.tile_source_px is not None else DEFAULT_TILE_SOURCE_PX

    @property
    def ood_output(self) -> str | None:
        return self.output_for(OOD_SCORE)

    def cam_outputs(self, graph_outputs: list[str]) -> tuple[str, str] | None:
        """The graph's (feature_maps, cam_weights) outputs, or None when the model lacks them."""
        names = (self.output_for(FEATURE_MAPS) or FEATURE_MAPS, self.output_for(CAM_WEIGHTS) or CAM_WEIGHTS)
        return names if all(n in graph_outputs for n in names) else None

    def check_sha256(self, digest: str, where: str, hint: str = "") -> None:
        check_sha256(digest, self.sha256, where, hint)


def parse_manifest(data: bytes, where: str) -> Manifest:
    """`model.json` bytes -> Manifest, or a one-line ModelSourceError naming the first problem."""
    try:
        return Manifest.model_validate_json(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"]) or "(document)"
        raise ModelSourceError(
            f"invalid manifest {where}: {loc}: {one_line(first['msg'], 160)} ({exc.error_count()} error(s))"
        ) from exc


def check_sha256(digest: str, expected: str, where: str, hint: str = "") -> None:
    """The one checksum rule: raise ModelSourceError unless `digest` (of `where`) is `expected`."""
    if digest != expected:
        raise ModelSourceError(f"checksum mismatch: {where} has sha256 {digest}, its manifest says {expected}{hint}")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()
