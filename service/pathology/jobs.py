"""Slide jobs, pure: the job record and its state machine, tile records, the result, the GeoJSON.

No I/O and no model here: the runner (`service.jobs.runner`) moves a `Job` through its states
and checkpoints `TileRecord`s; the store (`service.jobs.store`) keeps both as JSON. Everything
a client reads about a finished job (`/jobs/{id}/result`, `/result.geojson`) is rebuilt from
those records by the functions below, so a job resumed after a restart answers exactly as one
that ran in one go.
"""

from __future__ import annotations

import enum
import re
import secrets
import uuid
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

from service.pathology.tiles import Tile

# QuPath reads a derived class "A: B" (e.g. "Tumor: Positive"): a referred tile keeps its
# label and is visibly set apart by the ": refer" part and the refer colour.
REFER_SUFFIX: Final = ": refer"
_ID = re.compile(r"^[a-f0-9]{32}$")
# Probabilities are stored to 6 decimals: a 10 Gpx slide's records stay a few MB of JSON.
_DIGITS: Final = 6


class JobState(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL: Final = frozenset({JobState.DONE, JobState.FAILED, JobState.CANCELLED})
# RUNNING -> QUEUED: the server stopped under a running job; it waits to resume from its checkpoints.
_MOVES: Final[Mapping[JobState, frozenset[JobState]]] = {
    JobState.QUEUED: frozenset({JobState.RUNNING, JobState.CANCELLED, JobState.FAILED}),
    JobState.RUNNING: frozenset({JobState.DONE, JobState.FAILED, JobState.CANCELLED, JobState.QUEUED}),
    JobState.DONE: frozenset(),
    JobState.FAILED: frozenset(),
    JobState.CANCELLED: frozenset(),
}


class InvalidTransition(Exception):
    """A move the state machine does not allow (e.g. cancelling a finished job)."""


def new_job_id() -> str:
    return secrets.token_hex(16)


def is_job_id(text: str) -> bool:
    """Ids are 32 hex digits: anything else is refused before it reaches a store key."""
    return bool(_ID.match(text))


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class Job:
    """One job's record. `source` is "upload" (the file is in the store) or an s3:// URI."""

    id: str
    owner: str | None
    source: str
    state: JobState = JobState.QUEUED
    created: str = field(default_factory=now_iso)
    started: str | None = None
    finished: str | None = None
    error: str | None = None
    tiles_done: int = 0
    tiles_total: int = 0
    # Set once the slide is opened (the first run): geometry, reader facts, the model.
    width: int = 0
    height: int = 0
    tile_source_px: int = 0
    input_size: int = 0
    slide: dict[str, Any] = field(default_factory=dict)
    model: dict[str, str] = field(default_factory=dict)
    # Tiles already checkpointed when the current run began (0 for a fresh job).
    resumed_from: int = 0

    def move(self, to: JobState, *, error: str | None = None) -> None:
        if to not in _MOVES[self.state]:
            raise InvalidTransition(f"a {self.state} job cannot become {to}")
        now = now_iso()
        if to is JobState.RUNNING and self.started is None:
            self.started = now
        if to in TERMINAL:
            self.finished = now
        if error is not None:
            self.error = error
        self.state = to

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL

    def to_record(self) -> dict[str, Any]:
        record = asdict(self)
        record["state"] = self.state.value
        return record

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> Job:
        known = {k: v for k, v in record.items() if k in cls.__dataclass_fields__}
        known["state"] = JobState(known.get("state", JobState.QUEUED.value))
        return cls(**known)

    def status(self, status_url: str) -> dict[str, Any]:
        """What GET /jobs/{id} answers (no owner, no source URI: they may name people)."""
        return {
            "id": self.id,
            "status_url": status_url,
            "state": self.state.value,
            "progress": {"tiles_done": self.tiles_done, "tiles_total": self.tiles_total},
            "created": self.created,
            "started": self.started,
            "finished": self.finished,
            "error": self.error,
            "source": "upload" if self.source == "upload" else "s3",
        }


@dataclass(frozen=True, slots=True)
class TileRecord:
    """One processed tile of the grid: `label` None means background (never classified)."""

    index: int
    label: str | None = None
    probabilities: tuple[float, ...] = ()
    decision: str = "accept"
    reason: str | None = None

    def to_row(self) -> list[Any]:
        return [self.index, self.label, [round(p, _DIGITS) for p in self.probabilities], self.decision, self.reason]

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> TileRecord:
        index, label, probabilities, decision, reason = row
        return cls(int(index), label, tuple(float(p) for p in probabilities), str(decision), reason)


def chunk_document(records: Iterable[TileRecord]) -> dict[str, Any]:
    return {"tiles": [r.to_row() for r in records]}


def chunk_records(document: Mapping[str, Any]) -> list[TileRecord]:
    return [TileRecord.from_row(row) for row in document.get("tiles", [])]


def summary(classes: Sequence[str], records: Sequence[TileRecord]) -> dict[str, Any]:
    """/analyze's summary from tile records."""
    tissue = [r for r in records if r.label is not None]
    by_class = Counter(r.label for r in tissue)
    counts = {c: by_class.get(c, 0) for c in classes}
    return {
        "tiles": len(records),
        "tissue_tiles": len(tissue),
        "background_tiles": len(records) - len(tissue),
        "referred_tiles": sum(1 for r in tissue if r.decision == "refer"),
        "tissue_tiles_by_class": counts,
        "tissue_share": {c: (n / len(tissue) if tissue else 0.0) for c, n in counts.items()},
    }


def tile_answers(classes: Sequence[str], grid: Sequence[Tile], records: Sequence[TileRecord]) -> list[dict[str, Any]]:
    """Every tissue tile in grid order, as /analyze lists them (source pixels)."""
    answers = []
    for record in sorted(records, key=lambda r: r.index):
        if record.label is None:
            continue
        tile = grid[record.index]
        probabilities = dict(zip(classes, record.probabilities, strict=True))
        answers.append(
            {
                "x": tile.x,
                "y": tile.y,
                "width": tile.width,
                "height": tile.height,
                "label": record.label,
                "confidence": max(record.probabilities),
                "probabilities": probabilities,
                "decision": record.decision,
                "reason": record.reason,
            }
        )
    return answers


def _rgb(hex_colour: str) -> list[int]:
    h = hex_colour.lstrip("#")
    return [int(h[0:2], 16), int(h[2:4], 16), int(h[4:6], 16)]


def geojson(
    job_id: str, tiles: Sequence[Mapping[str, Any]], colours: Mapping[str, str], refer_colour: str
) -> dict[str, Any]:
    """A FeatureCollection that QuPath imports (File > Import objects): one tile object per tissue tile.

    `tiles` are the result's tiles (`tile_answers`). QuPath's shape: `geometry` a Polygon in
    full-resolution pixels (origin top left), `properties.objectType` ("tile"),
    `properties.classification` {name, color: [r, g, b]}, `properties.measurements`
    {name: number}. A referred tile is classified "<label>: refer" (a QuPath derived class) in
    the refer colour, with `refer` = 1 among its measurements, so it stands out in any view.
    """
    # Stable feature ids (QuPath keeps them as object ids): the same job always exports the same.
    namespace = uuid.UUID(hex=job_id) if is_job_id(job_id) else uuid.NAMESPACE_URL
    features = []
    for tile in tiles:
        x0, y0 = int(tile["x"]), int(tile["y"])
        x1, y1 = x0 + int(tile["width"]), y0 + int(tile["height"])
        refer = tile["decision"] == "refer"
        name = str(tile["label"]) + (REFER_SUFFIX if refer else "")
        colour = refer_colour if refer else colours.get(str(tile["label"]), refer_colour)
        measurements = {f"p_{c}": round(float(p), _DIGITS) for c, p in tile["probabilities"].items()}
        measurements["confidence"] = round(float(tile["confidence"]), _DIGITS)
        measurements["refer"] = 1 if refer else 0
        features.append(
            {
                "type": "Feature",
                "id": str(uuid.uuid5(namespace, f"{x0},{y0}")),
                "geometry": {"type": "Polygon", "coordinates": [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]},
                "properties": {
                    "objectType": "tile",
                    "isLocked": True,
                    "classification": {"name": name, "color": _rgb(colour)},
                    "measurements": measurements,
                    "metadata": {"decision": str(tile["decision"]), "reason": str(tile.get("reason") or "")},
                },
            }
        )
    return {"type": "FeatureCollection", "features": features}
