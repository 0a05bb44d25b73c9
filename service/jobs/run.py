"""One run of one slide job: open the slide, skip the checkpointed tiles, classify the rest, finish.

The tile pipeline is /analyze's (`service.pathology.class_map.analyse`); what a job adds:

* **Checkpoints.** Each finished tile becomes a `TileRecord`; every `jobs_checkpoint_tiles`
  of them are written as one chunk (after the picture so far), and whatever is finished is
  written when the run ends for any reason, a SIGTERM included. A resumed run reads the chunks
  and only does the tiles they lack, so no tile is computed twice beyond the last checkpoint.
* **Low priority, bounded share.** Tiles are admitted one by one in the batcher's low lane
  (interactive requests overtake them) and never hold more than `jobs_queue_share` of the
  queue, across every running job (`JobSlots`).
* **Flat memory.** The slide is read tile by tile (OpenSlide reads one region of the best
  level); its picture is drawn from those tiles (`service.jobs.picture`), never from a whole level.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, Final

from service.core import memory
from service.core.model_client import Classified, Pixels
from service.core.pipeline import Outcome
from service.core.state import ServiceState
from service.errors import Overloaded, TooManyTiles
from service.jobs.picture import DrawingSlide, SlidePicture
from service.jobs.store import JobStore, get_json, put_json
from service.observability.job_metrics import JobMetrics
from service.pathology.class_map import TileOutcome, class_map
from service.pathology.jobs import Job, TileRecord, chunk_document, chunk_records, summary, tile_answers
from service.pathology.overlay import REFER_COLOUR, TileMark, class_colours, class_map_overlay, png_bytes
from service.pathology.slides import open_slide
from service.pathology.tiles import Tile, count_tiles, tile_grid

log = logging.getLogger(__name__)

PICTURE_MAX_SIDE: Final = 1024
# While interactive requests fill the queue, a job tile waits this long before asking again.
ADMISSION_RETRY_S: Final = 0.02


class JobSlots:
    """The share of the batcher's queue that job tiles may hold, across all jobs (one per runner)."""

    def __init__(self, service: ServiceState, slots: int) -> None:
        self._service = service
        self._slots = asyncio.Semaphore(slots)
        self.size = slots

    async def classify(self, image: Pixels) -> Classified:
        async with self._slots:
            while True:
                model = self._service.current()  # a reload may swap it between tiles
                try:
                    slots = model.reserve(1, low_priority=True)
                    break
                except Overloaded:
                    # Interactive requests hold every slot: they go first, the job waits its turn.
                    await asyncio.sleep(ADMISSION_RETRY_S)
            with slots, Outcome(self._service.observer) as outcome:  # counted like an /analyze tile
                return outcome.classified(*await model.infer(slots, image))


def _record(index: int, result: Classified | None) -> TileRecord:
    if result is None:
        return TileRecord(index)
    return TileRecord(
        index,
        result.label,
        tuple(float(p) for p in result.probabilities),
        result.decision.decision,
        result.decision.reason,
    )


@dataclass
class JobRun:
    """Everything one run of `job` holds; `run()` does the work, `save` persists the record."""

    job: Job
    service: ServiceState
    store: JobStore
    slots: JobSlots
    read_pool: Executor
    metrics: JobMetrics | None
    save: Callable[[Job], Any]
    records: dict[int, TileRecord] = field(default_factory=dict)
    pending: list[TileRecord] = field(default_factory=list)
    chunks: int = 0
    flushed: int = 0
    picture: SlidePicture | None = None
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _due: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self, source: Path) -> None:
        """The job from its checkpoints to DONE (the caller moves the state and handles errors)."""
        settings = self.service.settings
        loop = asyncio.get_running_loop()
        manifest = self.service.current().manifest
        size, side = manifest.input_size, manifest.tile_px
        slide = DrawingSlide(
            await loop.run_in_executor(
                self.read_pool,
                partial(
                    open_slide,
                    source,
                    max_pixels=settings.max_image_pixels,
                    tile_px=side,
                    size=size,
                    max_tile_pixels=settings.large_image_pixels,
                ),
            )
        )
        try:
            # The size the file claims is checked before anything proportional to it is built.
            count = count_tiles(slide.width, slide.height, side)
            if count > settings.jobs_max_tiles:
                raise TooManyTiles(
                    f"the slide is {slide.width}x{slide.height} px: {count} tiles of {side} px, more than "
                    f"LUNGSERVE_JOBS_MAX_TILES ({settings.jobs_max_tiles})"
                )
            grid = tile_grid(slide.width, slide.height, side)
            job = self.job
            if job.model and job.model.get("version") != manifest.version:
                log.warning("job %s resumes with model %s (started with %s)", job.id, manifest.version, job.model)
            job.width, job.height, job.tile_source_px, job.input_size = slide.width, slide.height, side, size
            job.slide = slide.describe()
            job.model = {"name": manifest.name, "version": manifest.version}
            job.tiles_total = len(grid)
            await self._resume(slide)
            slide.picture = self.picture
            await loop.run_in_executor(self.read_pool, slide.prepare)  # a plain image is decoded here
            remaining = [i for i in range(len(grid)) if i not in self.records]
            checkpointer = asyncio.ensure_future(self._checkpoints())
            try:
                await class_map(
                    slide,
                    [grid[i] for i in remaining],
                    size=size,
                    pool=self.read_pool,
                    classify=self.slots.classify,
                    window=self.slots.size,
                    on_outcome=lambda k, outcome: self._done(remaining[k], outcome),
                )
            finally:
                checkpointer.cancel()
                await asyncio.gather(checkpointer, return_exceptions=True)
                # Every finished tile is kept, whatever ended the run (cancel, SIGTERM, an error).
                await self.flush()
            await self._finish(grid, manifest.classes)
        finally:
            await asyncio.to_thread(slide.close)  # after the reads still running in their threads
            memory.trim()

    async def _resume(self, slide: DrawingSlide) -> None:
        job = self.job
        keys = await self.store.keys(f"{job.id}/tiles/")
        for key in keys:
            document = await get_json(self.store, key)
            for record in chunk_records(document or {}):
                if 0 <= record.index < job.tiles_total:
                    self.records[record.index] = record
        self.chunks = len(keys)
        self.picture = SlidePicture(slide.width, slide.height, PICTURE_MAX_SIDE)
        saved = await self.store.get_bytes(f"{job.id}/thumb.png")
        if saved is not None:
            self.picture.load(saved)
        job.tiles_done = self.flushed = job.resumed_from = len(self.records)
        await self.save(job)
        if self.records:
            log.info("job %s resumes: %d of %d tiles checkpointed", job.id, len(self.records), job.tiles_total)

    def _done(self, index: int, outcome: TileOutcome[Classified]) -> None:
        record = _record(index, outcome.result)
        self.records[index] = record
        self.pending.append(record)
        self.job.tiles_done = len(self.records)
        if self.metrics is not None:
            self.metrics.tile(outcome.result is not None)
        if len(self.pending) >= self.service.settings.jobs_checkpoint_tiles:
            self._due.set()

    async def _checkpoints(self) -> None:
        while True:
            await self._due.wait()
            self._due.clear()
            # Shielded: a run cancelled mid-write still completes that chunk before the last flush.
            await asyncio.shield(self.flush())

    async def flush(self) -> None:
        """One chunk of every pending record (after the picture that shows them), then the record."""
        async with self._lock:
            if not self.pending:
                return
            batch = self.pending[:]
            loop = asyncio.get_running_loop()
            assert self.picture is not None
            png = await loop.run_in_executor(self.read_pool, self.picture.png)
            await self.store.put_bytes(f"{self.job.id}/thumb.png", png)
            await put_json(self.store, f"{self.job.id}/tiles/{self.chunks:06d}.json", chunk_document(batch))
            self.chunks += 1
            del self.pending[: len(batch)]
            self.flushed += len(batch)
            # The record says what the checkpoints hold: progress never goes back after a crash.
            await self.save(replace(self.job, tiles_done=self.flushed))

    async def _finish(self, grid: list[Tile], classes: list[str]) -> None:
        job = self.job
        records = [self.records[i] for i in range(len(grid))]
        colours = class_colours(classes)
        tiles = tile_answers(classes, grid, records)
        result = {
            "id": job.id,
            "width": job.width,
            "height": job.height,
            "tile_source_px": job.tile_source_px,
            "input_size": job.input_size,
            "source": job.slide,
            "tiles": tiles,
            "summary": summary(classes, records),
            "colours": colours,
            "refer_colour": REFER_COLOUR,
            "model": job.model,
        }
        picture = self.picture
        assert picture is not None

        def draw() -> bytes:
            marks = [TileMark(grid[r.index], r.label, refer=r.decision == "refer") for r in records if r.label]
            return png_bytes(class_map_overlay(picture.image(), (job.width, job.height), marks, colours))

        classmap = await asyncio.get_running_loop().run_in_executor(self.read_pool, draw)
        await self.store.put_bytes(f"{job.id}/classmap.png", classmap)
        await put_json(self.store, f"{job.id}/result.json", result)
