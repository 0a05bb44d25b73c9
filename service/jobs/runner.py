"""The job runner: the asyncio tasks that run slide jobs, owned by the app's lifespan.

* `start()` reads every job from the store: a job that was running when the server stopped
  becomes queued again and resumes from its checkpoints; queued jobs keep their order.
* `LUNGSERVE_JOBS_CONCURRENCY` worker tasks each take the oldest queued job and run it
  (`service.jobs.run.JobRun`); the others wait, queued.
* `cancel()` marks a queued job cancelled, or cancels a running job's task (its finished
  tiles are checkpointed, the record says cancelled).
* `stop()` (at shutdown, before the batcher drains) cancels the running jobs' tasks, which
  checkpoint what they finished and go back to queued for the next start.

The routes (`service.http.jobs`) reach jobs only through this class; every lookup checks the
owner (the API key's name), so another key's job is "not found".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import tempfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Final

from service.core.state import ServiceState
from service.errors import LungserveError, ModelNotReady, NotFound, ShuttingDown
from service.jobs.run import JobRun, JobSlots
from service.jobs.store import JobStore, JobStoreError, LocalJobStore, get_json, put_json
from service.observability.job_metrics import JobMetrics
from service.pathology.jobs import Job, JobState, is_job_id, new_job_id

log = logging.getLogger(__name__)

SOURCE: Final = "source"


class JobConflict(LungserveError):
    """The job is not in a state that allows this (a result before it is done, cancelling a finished job)."""

    code = "job_conflict"
    status = 409


def _seconds_between(start: str | None, end: str | None) -> float:
    if start is None or end is None:
        return 0.0
    parse = datetime.fromisoformat
    return (parse(end.replace("Z", "+00:00")) - parse(start.replace("Z", "+00:00"))).total_seconds()


class JobRunner:
    def __init__(self, service: ServiceState, store: JobStore, metrics: JobMetrics | None = None) -> None:
        settings = service.settings
        self._service = service
        self._store = store
        self._metrics = metrics
        self._jobs: dict[str, Job] = {}
        self._queue: asyncio.Queue[str] = asyncio.Queue()
        self._running: dict[str, asyncio.Task[None]] = {}
        self._cancelling: set[str] = set()
        self._workers: list[asyncio.Task[None]] = []
        self._recovery: asyncio.Future[None] | None = None
        self._recovery_error: str | None = None
        self._stopping = False
        self._slots = JobSlots(service, max(1, int(settings.queue_limit * settings.jobs_queue_share)))
        # Job reads get threads of their own: the shared decode pool stays free for interactive requests.
        self._read_pool = ThreadPoolExecutor(2 * settings.jobs_concurrency, thread_name_prefix="job-read")
        self._work_dir: Path | None = None

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        self._work_dir = Path(tempfile.mkdtemp(prefix="lungserve-jobs-"))
        # Recovery reads the store (maybe S3) in the background: it must not delay readiness.
        self._recovery = asyncio.ensure_future(self._recover())
        self._workers = [asyncio.ensure_future(self._worker()) for _ in range(self._service.settings.jobs_concurrency)]

    async def stop(self) -> None:
        """Running jobs checkpoint and go back to queued; nothing new starts. Idempotent."""
        if self._stopping:
            return
        self._stopping = True
        tasks = [*self._workers, *([self._recovery] if self._recovery is not None else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._read_pool.shutdown(wait=False, cancel_futures=True)
        if self._work_dir is not None:
            await asyncio.to_thread(shutil.rmtree, self._work_dir, True)

    async def _recover(self) -> None:
        try:
            ids = await self._store.job_ids()
            found: list[Job] = []
            for job_id in ids:
                record = await get_json(self._store, f"{job_id}/job.json") if is_job_id(job_id) else None
                if record is None:
                    continue
                job = Job.from_record(record)
                if job.state is JobState.RUNNING:
                    job.move(JobState.QUEUED)  # stopped under it: resume from its checkpoints
                    await self._save(job)
                found.append(job)
        except (JobStoreError, ValueError, TypeError) as exc:
            self._recovery_error = str(exc)
            log.error("slide jobs not recovered: %s", exc)
            return
        for job in sorted(found, key=lambda j: j.created):
            self._jobs.setdefault(job.id, job)
            if job.state is JobState.QUEUED:
                self._queue.put_nowait(job.id)
        self._counted()
        queued = sum(1 for j in found if j.state is JobState.QUEUED)
        log.info("slide jobs recovered: %d, %d queued", len(found), queued, extra={"jobs": len(found)})

    async def ready(self) -> None:
        """Wait for recovery (routes call this first): a job from before a restart is never a 404."""
        if self._recovery is not None:
            await asyncio.shield(self._recovery)
        if self._recovery_error is not None:
            raise JobStoreError(f"the job store could not be read at start-up: {self._recovery_error}")

    # -- the routes' surface ------------------------------------------------------------------

    def spool_dir(self) -> Path:
        """Where an upload is spooled: inside a local store (so storing it is a rename)."""
        if isinstance(self._store, LocalJobStore):
            return self._store.spool_dir()
        assert self._work_dir is not None, "the runner is not started"
        return self._work_dir

    async def submit(self, owner: str | None, source: str, upload: Path | None = None) -> Job:
        """A new queued job: `source` "upload" (the file at `upload`) or an s3:// URI."""
        if self._stopping:
            raise ShuttingDown("the server is shutting down")
        await self.ready()
        job = Job(id=new_job_id(), owner=owner, source=source)
        if upload is not None:
            await self._store.put_file(f"{job.id}/{SOURCE}", upload)
        await self._save(job)  # the record last: a job listed is a job that can run
        self._jobs[job.id] = job
        self._counted()
        self._queue.put_nowait(job.id)
        return job

    def get(self, owner: str | None, job_id: str) -> Job:
        job = self._jobs.get(job_id) if is_job_id(job_id) else None
        if job is None or job.owner != owner:
            raise NotFound("no such job")  # another key's job is not found either
        return job

    def list(self, owner: str | None) -> list[Job]:
        return sorted((j for j in self._jobs.values() if j.owner == owner), key=lambda j: j.created, reverse=True)

    async def cancel(self, owner: str | None, job_id: str) -> Job:
        job = self.get(owner, job_id)
        if job.state is JobState.QUEUED:
            job.move(JobState.CANCELLED)  # at once, before any await: a worker taking it now skips it
            await self._cleanup(job)
            await self._recorded(job)
        elif job.state is JobState.RUNNING:
            task = self._running.get(job.id)
            if task is not None:
                self._cancelling.add(job.id)
                task.cancel()
                await asyncio.wait({task})  # the answer shows the job cancelled
        else:
            raise JobConflict(f"the job is already {job.state}; only a queued or running job can be cancelled")
        return job

    async def artefact(self, owner: str | None, job_id: str, name: str) -> bytes:
        job = self.get(owner, job_id)
        if job.state is not JobState.DONE:
            raise JobConflict(f"the job is {job.state}; its result exists once it is done")
        data = await self._store.get_bytes(f"{job.id}/{name}")
        if data is None:
            raise JobStoreError(f"the job's {name} is missing from the job store")
        return data

    # -- running ------------------------------------------------------------------------------

    async def _worker(self) -> None:
        while True:
            job = self._jobs.get(await self._queue.get())
            if job is None or job.state is not JobState.QUEUED:
                continue  # cancelled while it waited
            task = asyncio.ensure_future(self._run(job))
            self._running[job.id] = task
            try:
                await task
            except Exception:  # a bug in a run must not stop the worker: the next job still runs
                log.exception("job %s: unexpected error", job.id)
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    # The worker itself was cancelled (shutdown): so is its job, which checkpoints.
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
                    raise
                # Only the job was cancelled (DELETE): the worker takes the next one.
            finally:
                self._running.pop(job.id, None)
                self._cancelling.discard(job.id)

    async def _run(self, job: Job) -> None:
        if job.state is not JobState.QUEUED:
            return  # cancelled between the worker's check and this task's first step
        job.move(JobState.RUNNING)
        job.error = None
        await self._save(job)
        run = JobRun(job, self._service, self._store, self._slots, self._read_pool, self._metrics, self._save)
        try:
            await run.run(await self._source(job))
        except asyncio.CancelledError:
            if job.id in self._cancelling:
                await self._end(job, JobState.CANCELLED)
            else:
                job.move(JobState.QUEUED)  # shutdown: the next start resumes it
                await self._save(job)
            raise
        except (ShuttingDown, ModelNotReady, JobStoreError) as exc:
            # Not the slide's fault: the job waits, queued, and resumes from its checkpoints --
            # after a model swap at once, after a store failure at the next start.
            log.warning("job %s interrupted: %s", job.id, exc)
            job.move(JobState.QUEUED)
            job.error = exc.message if isinstance(exc, JobStoreError) else None
            with contextlib.suppress(JobStoreError):
                await self._save(job)
            if not self._stopping and not isinstance(exc, JobStoreError):
                self._queue.put_nowait(job.id)
        except LungserveError as exc:
            await self._end(job, JobState.FAILED, exc.message)
        except Exception as exc:
            log.exception("job %s failed", job.id)
            await self._end(job, JobState.FAILED, f"internal error: {type(exc).__name__}")
        else:
            await self._end(job, JobState.DONE)
            log.info("job %s done: %d tiles", job.id, job.tiles_total)

    async def _source(self, job: Job) -> Path:
        """A local path of the job's slide: the stored upload, or the s3:// object downloaded."""
        assert self._work_dir is not None
        dest = self._work_dir / job.id / SOURCE
        if job.source == "upload":
            return await self._store.fetch_file(f"{job.id}/{SOURCE}", dest)
        from service.jobs.s3_store import fetch_slide
        from service.model.source.uri import S3Options

        settings = self._service.settings
        return await fetch_slide(
            job.source, dest, S3Options.from_settings(settings), max_bytes=settings.max_slide_bytes
        )

    async def _end(self, job: Job, state: JobState, error: str | None = None) -> None:
        """A final state: the slide's copies removed first (a client that sees the state sees
        the store as it stays), then the state and its duration counted, then saved. Shielded: a
        DELETE arriving now cannot leave the job half-ended."""

        async def end() -> None:
            await self._cleanup(job)
            job.move(state, error=error)
            await self._recorded(job)

        await asyncio.shield(end())

    async def _cleanup(self, job: Job) -> None:
        if job.source == "upload":
            with contextlib.suppress(JobStoreError):
                await self._store.delete(f"{job.id}/{SOURCE}")
        if self._work_dir is not None:
            await asyncio.to_thread(shutil.rmtree, self._work_dir / job.id, True)

    async def _recorded(self, job: Job) -> None:
        # Counted before the save's first await: routes answer from memory, so a client that
        # sees the final state must find its duration counted too.
        if self._metrics is not None:
            self._metrics.finished(job.state.value, _seconds_between(job.started or job.created, job.finished))
        await self._save(job)

    async def _save(self, job: Job) -> None:
        self._counted()  # the state in memory is what routes answer, saved or not
        await put_json(self._store, f"{job.id}/job.json", job.to_record())

    def _counted(self) -> None:
        if self._metrics is not None:
            self._metrics.count(Counter(j.state.value for j in self._jobs.values()))
