"""Hot reload: fetch, verify and warm a new model *beside* the serving one, then swap.

`ModelReloader.reload()` (behind `POST /admin/reload` and the optional ETag poller) fetches the
model, builds and warms a new `ModelRuntime` beside the old one (a failure is `ModelRejected`;
the serving model is untouched), then swaps the pointer in one assignment. Requests holding the
old runtime finish on it. One reload at a time, shielded from cancellation (docs/deploy.md).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from service.core.model_client import ModelClient
from service.core.state import Phase, ServiceState
from service.errors import LungserveError, ModelRejected, ModelSourceError, ShuttingDown, one_line
from service.model.source import ModelArtifact, ModelIdentity, S3Options, current_etag, fetch_configured_model
from service.settings import Settings

log = logging.getLogger(__name__)

BuildRuntime = Callable[[ModelArtifact], Awaitable[ModelClient]]


@dataclass(frozen=True)
class ReloadResult:
    changed: bool
    previous: ModelIdentity
    current: ModelIdentity


class ModelReloader:
    def __init__(
        self,
        state: ServiceState,
        settings: Settings,
        build: BuildRuntime,
        *,
        on_swap: Callable[[ModelClient], None] | None = None,
    ) -> None:
        self._state = state
        self._settings = settings
        self._build = build
        self._on_swap = on_swap
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[ReloadResult]] = set()
        self._drains: set[asyncio.Task[None]] = set()
        self._poller: asyncio.Task[None] | None = None
        self._rejected_etag: str | None = None

    # -- reload ------------------------------------------------------------------------------

    async def reload(self) -> ReloadResult:
        """Fetch and verify the model at the configured URI and swap it in if it differs.

        Raises ModelRejected (old model keeps serving), or ShuttingDown / ModelNotReady.
        """
        self._state.current()  # 503 now if not serving: nothing to reload into
        task = asyncio.get_running_loop().create_task(self._reload_locked(), name="model-reload")
        self._tasks.add(task)
        task.add_done_callback(self._forget)
        # Shielded: the caller (an HTTP request) may go away; the reload still completes cleanly.
        return await asyncio.shield(task)

    def _forget(self, task: asyncio.Task[ReloadResult]) -> None:
        self._tasks.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: the caller may have gone away; the outcome is logged

    async def _reload_locked(self) -> ReloadResult:
        async with self._lock:
            return await self._reload()

    async def _reload(self) -> ReloadResult:
        old = self._state.current()
        previous = old.identity
        s = self._settings
        try:
            artifact = await fetch_configured_model(s)
        except ModelSourceError as exc:
            log.warning("reload refused, still serving %s: %s", previous.version, exc)
            raise ModelRejected(f"new model refused, still serving version {previous.version}: {exc}") from exc

        if artifact.manifest == old.manifest:
            # Same model (maybe the manifest was re-uploaded unchanged): keep the warm runtime,
            # but remember the new ETag so the poller does not try again.
            old.identity = artifact.identity
            log.info("reload: model %s %s unchanged", artifact.manifest.name, artifact.manifest.version)
            return ReloadResult(changed=False, previous=previous, current=old.identity)

        try:
            new = await self._build(artifact)
        except LungserveError:
            raise
        except Exception as exc:  # engine refused it, warm-up failed, provider policy not met...
            log.warning("reload refused, still serving %s: %s", previous.version, one_line(exc))
            raise ModelRejected(
                f"new model {artifact.manifest.version} failed to load or warm up, still serving version "
                f"{previous.version}: {one_line(exc)}"
            ) from exc

        if self._state.phase is not Phase.READY:
            await new.stop(0)
            raise ShuttingDown("the server is shutting down; reload abandoned")
        displaced = self._state.replace_runtime(new)  # the swap: atomic on the event loop
        if self._on_swap is not None:
            self._on_swap(new)
        log.info(
            "reload: now serving %s %s (was %s)", artifact.manifest.name, artifact.manifest.version, previous.version
        )
        if displaced is not None:
            # In-flight and queued requests of the old model finish on it; then it is released.
            # Its own task, so that even a shutdown that cancels this reload lets it drain.
            drain = asyncio.get_running_loop().create_task(displaced.stop(s.drain_timeout_s), name="model-drain")
            self._drains.add(drain)
            drain.add_done_callback(self._drains.discard)
            await asyncio.shield(drain)
        return ReloadResult(changed=True, previous=previous, current=new.identity)

    # -- polling -----------------------------------------------------------------------------

    def start_polling(self) -> None:
        interval = self._settings.model_poll_interval_s
        if interval is None or self._poller is not None:
            return
        self._poller = asyncio.get_running_loop().create_task(self._poll(interval), name="model-poller")
        log.info("polling %s every %g s for a new model", self._settings.model_uri, interval)

    async def _poll(self, interval: float) -> None:
        s = self._settings
        while True:
            await asyncio.sleep(interval)
            runtime = self._state.runtime
            if runtime is None or self._state.phase is not Phase.READY:
                continue
            try:
                etag = await current_etag(s.model_uri, s3=S3Options.from_settings(s))
            except ModelSourceError as exc:
                log.warning("model poll failed (still serving the current model): %s", exc)
                continue
            known = runtime.identity.etag
            if etag is None or etag in (known, self._rejected_etag):
                continue
            log.info("manifest ETag changed (%s -> %s): reloading", known, etag)
            try:
                await self.reload()
            except ModelRejected:
                self._rejected_etag = etag  # logged already; retry only when the manifest changes again
            except LungserveError as exc:  # shutting down / not ready
                log.info("poll-triggered reload skipped: %s", exc.message)

    async def stop(self) -> None:
        """At shutdown: stop polling, abandon a reload that has not swapped yet, and let every
        displaced model finish draining its requests."""
        tasks: list[asyncio.Task[object]] = list(self._tasks)
        if self._poller is not None:
            tasks.append(self._poller)
            self._poller = None
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*list(self._drains), return_exceptions=True)
