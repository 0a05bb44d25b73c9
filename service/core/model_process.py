"""The model process: one per device, the only owner of the ONNX Runtime session(s).

It serves every front over `service.core.transport`: images arrive as slots of each front's
shared-memory arena, go through the one `Batcher` of the current `ModelRuntime` (so batches span
fronts), and leave as result records carrying the refer decision made beside the model output.
It never sees HTTP. Hot reload (`ModelReloader`: CALL "reload", SIGHUP, the ETag poller) swaps
the runtime here; every front is told the new model (a MODEL frame) before any result of it.

`service.processes.model` runs it as its own process (`python -m service.processes.model`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import weakref
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from service.core import transport as wire
from service.core.batcher import BatcherStopped, BatchInfo, BatchObserver
from service.core.model_client import Classified, ModelClient
from service.core.reload import ModelReloader
from service.core.runtime import ModelRuntime, open_runtime
from service.core.state import Phase, ServiceState
from service.errors import LungserveError
from service.model.source import ModelArtifact, fetch_configured_model
from service.settings import Settings

log = logging.getLogger(__name__)

_HELLO_TIMEOUT_S = 5.0


def model_message(runtime: ModelClient, generation: int, settings: Settings) -> dict[str, Any]:
    thresholds = runtime.thresholds
    return {
        "generation": generation,
        "manifest": runtime.manifest.model_dump(mode="json"),
        "identity": runtime.identity.as_dict(),
        "provider": runtime.provider,
        "input_size": runtime.input_size,
        "output_names": runtime.output_names,
        "thresholds": {
            "refer_below": thresholds.refer_below,
            "ood_above": thresholds.ood_above,
            "tissue_check": settings.tissue_check,  # done by the fronts (ModelServer._build)
        },
        "max_batch_size": settings.max_batch_size,
        "queue_limit": settings.queue_limit,
        "retry_after_s": settings.retry_after_s,
    }


class ModelServer:
    """The model process's core: runtime + reloader + the fronts' sessions."""

    def __init__(
        self,
        settings: Settings,
        observer: Callable[[], BatchObserver] | None = None,
        on_swap: Callable[[ModelClient], None] | None = None,
    ) -> None:
        self.settings = settings
        self._swapped = on_swap
        self.state = ServiceState(settings=settings)
        self._observer = observer
        self.reloader = ModelReloader(self.state, settings, self._build, on_swap=self._on_swap)
        self.sessions: set[FrontSession] = set()
        self._generations: weakref.WeakKeyDictionary[ModelClient, int] = weakref.WeakKeyDictionary()
        self._next_generation = 1
        self._listener: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None

    async def _build(self, artifact: ModelArtifact) -> ModelRuntime:
        # The tissue check is the fronts' work (RemoteModelClient): ~0.6 ms of numpy per 128 px
        # image would cap this one process far below a GPU's pace. The model process decides on
        # the model's outputs; a front turns an implausible image's answer into
        # out_of_distribution, which `decide` would have returned first anyway.
        settings = self.settings.model_copy(update={"tissue_check": False})
        runtime = await open_runtime(artifact, settings, self._observer() if self._observer else None)
        self._generations[runtime] = self._next_generation
        self._next_generation += 1
        return runtime

    def _on_swap(self, runtime: ModelClient) -> None:
        if self._swapped is not None:
            self._swapped(runtime)
        for session in list(self.sessions):
            session.announce(runtime)

    def generation(self, runtime: ModelClient) -> int:
        return self._generations[runtime]

    async def start(self, socket_path: Path) -> None:
        """Fetch, build and warm the model, then listen: a front that connects is served at once."""
        artifact = await fetch_configured_model(self.settings)
        self.state.replace_runtime(await self._build(artifact))
        self.state.phase = Phase.READY
        # Bound under a temporary name and renamed: a front never connects to a half-ready one.
        tmp = socket_path.with_name(socket_path.name + f".{os.getpid()}")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(tmp))
        listener.listen(256)
        listener.setblocking(False)
        os.replace(tmp, socket_path)
        self._listener = listener
        self._accepting = asyncio.get_running_loop().create_task(self._accept(listener), name="model-accept")
        self.reloader.start_polling()
        runtime = self.state.current()
        log.info(
            "model process ready: %s %s on %s, batches of up to %d",
            runtime.identity.name,
            runtime.identity.version,
            runtime.provider,
            self.settings.max_batch_size,
            extra={**runtime.identity.log_fields(), "provider": runtime.provider},
        )

    async def _accept(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        opening: set[asyncio.Task[None]] = set()
        while True:
            conn, _ = await loop.sock_accept(listener)
            task = loop.create_task(self._open_session(conn))
            opening.add(task)
            task.add_done_callback(opening.discard)

    async def _open_session(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        try:
            conn.settimeout(_HELLO_TIMEOUT_S)
            runtime = self.state.current()
            offer = {"input_size": runtime.input_size, "queue_limit": self.settings.queue_limit}
            hello, fd = await asyncio.to_thread(self._handshake, conn, offer)
            conn.setblocking(False)
            arena = wire.TensorArena(fd, int(hello["slots"]), int(hello["slot_bytes"]), owner=False)
        except (OSError, ValueError, KeyError, LungserveError) as exc:
            log.warning("front connection refused: %s", exc)
            conn.close()
            return
        session = FrontSession(self, arena, int(hello.get("front", -1)))
        await loop.connect_accepted_socket(lambda: session.protocol, conn)
        if self.state.phase is not Phase.READY:
            session.protocol.close()
            return
        self.sessions.add(session)
        session.announce(self.state.current())
        log.info("front %s connected", session.front, extra={"front": session.front})

    @staticmethod
    def _handshake(conn: socket.socket, offer: dict[str, Any]) -> tuple[dict[str, Any], int]:
        wire.send_frame(conn, wire.Kind.OFFER, offer)
        return wire.receive_hello(conn)

    async def stop(self) -> None:
        """Drain: refuse new images, answer every admitted one (or 503 after the drain timeout)."""
        if self.state.phase is Phase.STOPPING:
            return
        self.state.phase = Phase.STOPPING
        if self._accepting is not None:
            self._accepting.cancel()
        if self._listener is not None:
            self._listener.close()
        await self.reloader.stop()
        runtime = self.state.runtime
        if runtime is not None:
            await runtime.stop(self.settings.drain_timeout_s)
        await asyncio.sleep(0)  # the last results' flush is scheduled for the next tick
        await asyncio.gather(*(s.close() for s in list(self.sessions)), return_exceptions=True)
        log.info("model process stopped")


class FrontSession:
    """One front's connection: its arena, the images it has in flight here, their answers."""

    def __init__(self, server: ModelServer, arena: wire.TensorArena, front: int) -> None:
        self.server = server
        self.arena = arena
        self.front = front
        self.protocol = wire.FrameProtocol(self._on_frame, self._on_lost)
        self._pending: dict[int, asyncio.Future[tuple[Classified, BatchInfo]]] = {}
        self._tag_of: dict[asyncio.Future[tuple[Classified, BatchInfo]], int] = {}  # its inverse
        self._out: dict[int, wire.ResultRows] = {}  # generation -> answers not sent yet
        self._n_classes: dict[int, int] = {}
        self._flush_scheduled = False
        self._lost = asyncio.get_running_loop().create_future()

    def announce(self, runtime: ModelClient) -> None:
        generation = self.server.generation(runtime)
        self._n_classes[generation] = len(runtime.manifest.classes)
        message = model_message(runtime, generation, self.server.settings)
        self.protocol.send(wire.Kind.MODEL, wire.json_bytes(message))

    def _on_frame(self, kind: wire.Kind, body: memoryview) -> None:
        if kind is wire.Kind.SUBMIT:
            self._submit(np.frombuffer(body, dtype=wire.SUBMIT_RECORD))
        elif kind is wire.Kind.CANCEL:
            for tag in np.frombuffer(body, dtype="<u4").tolist():
                future = self._pending.get(tag)
                if future is not None:
                    future.cancel()
        elif kind is wire.Kind.CALL:
            call_id, header, payload = wire.parse_call(body)
            asyncio.get_running_loop().create_task(self._call(call_id, header, payload))
        else:
            log.warning("front %s sent an unexpected %s frame", self.front, kind.name)

    def _submit(self, records: np.ndarray[Any, Any]) -> None:
        # A frame may mix a front's interactive images and its slide jobs' (low priority).
        low = records["low"].astype(bool)
        for lane in (records[~low], records[low]):
            if len(lane):
                self._submit_lane(lane, bool(lane["low"][0]))

    def _submit_lane(self, records: np.ndarray[Any, Any], low_priority: bool) -> None:
        state = self.server.state
        try:
            if state.phase is not Phase.READY:
                raise BatcherStopped("draining")
            runtime = state.current()
            if not isinstance(runtime, ModelRuntime):
                raise TypeError("the model process serves a ModelRuntime")
            reservation = runtime.reserve(len(records), low_priority=low_priority)
        except (LungserveError, BatcherStopped) as exc:
            # Overloaded means the fronts admitted more than the bound: never expected.
            status = wire.Status.SHUTTING_DOWN if state.phase is not Phase.READY else wire.Status.OVERLOADED
            log.warning("model process refused %d image(s): %s", len(records), exc)
            for tag in records["tag"].tolist():
                self._answer(0, tag, status)
            return
        generation = self.server.generation(runtime)
        view = self.arena.view
        with reservation:
            slots = zip(records["slot"].tolist(), records["side"].tolist(), strict=True)
            images = [view(slot, side) for slot, side in slots]
            # The whole frame in one step; each answer is written by `on_done` as its batch ends,
            # without a loop callback per image (add_done_callback would schedule one).
            futures = reservation.submit_all(images, partial(self._done, generation))
        pending, tag_of = self._pending, self._tag_of
        for tag, future in zip(records["tag"].tolist(), futures, strict=True):
            pending[tag] = future
            tag_of[future] = tag

    def _done(self, generation: int, future: asyncio.Future[tuple[Classified, BatchInfo]]) -> None:
        tag = self._tag_of.pop(future, None)
        if tag is None:  # its front is gone (_on_lost): nobody to answer
            return
        self._pending.pop(tag, None)
        if future.cancelled():
            self._answer(generation, tag, wire.Status.CANCELLED)
            return
        exc = future.exception()
        if exc is not None:
            status = wire.Status.SHUTTING_DOWN if isinstance(exc, BatcherStopped) else wire.Status.FAILED
            if status is wire.Status.FAILED:
                log.error("model run failed for a batch: %s", exc, exc_info=exc)
            self._answer(generation, tag, status)
            return
        result, info = future.result()
        self._rows(generation).add(tag, wire.Status.OK, result, info)

    def _answer(self, generation: int, tag: int, status: wire.Status) -> None:
        self._rows(generation).add(tag, status, None, None)

    def _rows(self, generation: int) -> wire.ResultRows:
        rows = self._out.get(generation)
        if rows is None:
            rows = self._out[generation] = wire.ResultRows(self._n_classes.get(generation, 0))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)
        return rows

    def _flush(self) -> None:
        self._flush_scheduled = False
        out, self._out = self._out, {}
        for generation, rows in out.items():
            self.protocol.send(wire.Kind.RESULTS, wire.results_body(generation, rows.n_classes, rows.records()))

    async def _call(self, call_id: int, header: dict[str, Any], payload: memoryview) -> None:
        reply: dict[str, Any]
        data = b""
        try:
            reply, data = await self._run_call(header, payload)
        except Exception as exc:
            reply = wire.error_header(exc)
        self.protocol.send(wire.Kind.REPLY, wire.call_body(call_id, reply, data))

    async def _run_call(self, header: dict[str, Any], payload: memoryview) -> tuple[dict[str, Any], bytes]:
        op = header.get("op")
        if op == "run_outputs":
            runtime = self.server.state.current()
            batch = np.frombuffer(payload, dtype=np.uint8).reshape(header["shape"])
            outputs = await runtime.run_outputs(batch, list(header["names"]))
            arrays = [np.ascontiguousarray(o, dtype=np.float32) for o in outputs]
            shapes = [list(a.shape) for a in arrays]
            return {"shapes": shapes}, b"".join(a.tobytes() for a in arrays)
        if op == "reload":
            result = await self.server.reloader.reload()
            return {
                "changed": result.changed,
                "previous": result.previous.as_dict(),
                "current": result.current.as_dict(),
            }, b""
        raise ValueError(f"unknown call {op!r}")

    def _on_lost(self) -> None:
        # The front is gone (or we closed it): nothing it submitted needs computing any more.
        for future in list(self._pending.values()):
            future.cancel()
        self._pending.clear()
        self._tag_of.clear()
        self.server.sessions.discard(self)
        self.arena.close()
        if not self._lost.done():
            self._lost.set_result(None)

    async def close(self) -> None:
        # BYE, then let the front hang up. Closing first races its last SUBMIT: a write into a
        # closed socket loses the BYE with it, and its images would fail as after a crash.
        # Until it hangs up, what it still submits is answered "shutting down" (_submit_lane).
        self.protocol.send(wire.Kind.BYE)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._lost), 5.0)
        self.protocol.close()
