"""`RemoteModelClient`: the `ModelClient` of a front whose model lives in the model process.

* Admission (`has_room`, `reserve`) is synchronous and global: `QueueBound`, shared by every
  front, so a full queue still answers 503 before a body is read, whichever front takes it.
* `infer` copies the image into this front's shared-memory arena and queues a SUBMIT record;
  every record of one loop tick leaves in one frame. The answer record carries the decision.
* The model process dying fails every image waiting on it with a JSON 503 at once
  (`ModelNotReady`), readiness turns 503, and the client reconnects when the supervisor has
  started (and warmed) a new one.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import socket
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from service.core import transport as wire
from service.core.batcher import BatchInfo
from service.core.model_client import Classified, Slots
from service.core.queue_bound import QueueBound
from service.core.remote_model import ModelInfo, RemoteReservation, call_error, status_error
from service.core.transport import DECISIONS
from service.errors import LungserveError, ModelNotReady, Overloaded, ShuttingDown
from service.model.decision import OUT_OF_DISTRIBUTION, Thresholds
from service.model.manifest import Manifest
from service.model.source import ModelIdentity
from service.model.tissue import check

log = logging.getLogger(__name__)

_RECONNECT_S = (0.02, 0.05, 0.1, 0.2, 0.5)  # back-off while the supervisor restarts the model
_TAGS = 1 << 32


class RemoteModelClient:
    def __init__(
        self,
        socket_path: Path,
        bound: QueueBound,
        *,
        front: int = 0,
        retry_after_s: int = 1,
        on_model: Callable[[ModelInfo], None] | None = None,
    ) -> None:
        self._on_model = on_model  # each model the model process serves (start-up, every swap)
        self._socket_path = socket_path
        self._bound = bound
        self.front = front
        self.queue_limit = bound.limit
        self.retry_after_s = retry_after_s
        self._models: dict[int, ModelInfo] = {}
        self._current: ModelInfo | None = None
        self._tissue_check = False  # the current model's thresholds.tissue_check (read per image)
        self._protocol: wire.FrameProtocol | None = None
        self._arena: wire.TensorArena | None = None
        self._tags = itertools.count(1)
        self._pending: dict[int, tuple[asyncio.Future[tuple[int, Any]], int]] = {}  # tag -> (future, slot)
        self._calls: dict[int, asyncio.Future[tuple[dict[str, Any], memoryview]]] = {}
        # The next SUBMIT frame, column by column (one list per record field).
        self._submits: tuple[list[int], list[int], list[int], list[bool]] = ([], [], [], [])
        self._cancels: list[int] = []
        self._flush_scheduled = False
        self._connected = asyncio.Event()
        self._connector: asyncio.Task[None] | None = None
        self._stopping = False
        self._model_stopping = False  # it said BYE: an orderly drain, not a crash

    # -- what the model is -----------------------------------------------------------------

    def _model(self) -> ModelInfo:
        if self._current is None or not self._connected.is_set():
            raise ModelNotReady("the model process is starting or restarting; retry shortly")
        return self._current

    @property
    def ready(self) -> bool:
        return self._connected.is_set() and not self._stopping

    @property
    def identity(self) -> ModelIdentity:
        return self._model().identity

    @identity.setter
    def identity(self, value: ModelIdentity) -> None:
        self._model().identity = value

    @property
    def manifest(self) -> Manifest:
        return self._model().manifest

    @property
    def provider(self) -> str:
        return self._model().provider

    @property
    def input_size(self) -> int:
        return self._model().input_size

    @property
    def output_names(self) -> list[str]:
        return self._model().output_names

    @property
    def thresholds(self) -> Thresholds:
        return self._model().thresholds

    @property
    def free_slots(self) -> int:
        return max(0, self.queue_limit - self._bound.used)

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect (retrying while the model process starts) and learn the model it serves."""
        self._connector = asyncio.get_running_loop().create_task(self._keep_connected(), name="model-connector")
        await self._connected.wait()

    async def until_ready(self) -> None:
        """Wait until connected to a (warm) model process."""
        await self._connected.wait()

    async def warm_up(self) -> None:
        """The model process warmed its engine before it listened: nothing to do here."""

    async def _keep_connected(self) -> None:
        while not self._stopping:
            lost = asyncio.get_running_loop().create_future()
            for delay in itertools.chain(_RECONNECT_S, itertools.repeat(_RECONNECT_S[-1])):
                try:
                    await self._connect(lost)
                    break
                except (OSError, ConnectionError) as exc:
                    log.debug("model process not reachable yet: %s", exc)
                    await asyncio.sleep(delay)
            await lost

    async def _connect(self, lost: asyncio.Future[None]) -> None:
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            await loop.sock_connect(sock, str(self._socket_path))
            sock.setblocking(True)
            sock.settimeout(30.0)
            arena = await asyncio.to_thread(self._handshake, sock)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise

        def on_lost() -> None:
            self._on_lost()
            if not lost.done():
                lost.set_result(None)

        protocol = wire.FrameProtocol(self._on_frame, on_lost)
        self._arena = arena
        self._protocol = protocol
        await loop.create_unix_connection(lambda: protocol, sock=sock)

    def _handshake(self, sock: socket.socket) -> wire.TensorArena:
        offer = wire.receive_frame(sock, wire.Kind.OFFER)
        side = int(offer["input_size"])
        # A front never holds more images than the whole bound: one slot per admitted image.
        arena = wire.TensorArena.create(f"lungserve-front-{self.front}", self.queue_limit, side * side * 3)
        try:
            wire.send_hello(sock, {"front": self.front, "slots": arena.slots, "slot_bytes": arena.slot_bytes}, arena.fd)
        finally:
            arena.close()  # the mapping stays; the model process holds its own descriptor
        return arena

    async def stop(self, drain_timeout_s: float) -> None:
        """Refuse new work, wait for what is in flight (up to the timeout), then disconnect."""
        self._stopping = True
        if self._bound.mine > 0 and self._connected.is_set():
            # Admitted images (reserved, decoding, queued or computing) still finish.
            self._drained = asyncio.get_running_loop().create_future()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._drained, drain_timeout_s)
        if self._connector is not None:
            self._connector.cancel()
            await asyncio.gather(self._connector, return_exceptions=True)
        if self._protocol is not None:
            self._protocol.close()
        self._fail_all(ShuttingDown("the server shut down before this image was classified"))

    _drained: asyncio.Future[None] | None = None

    def _give(self, n: int) -> None:
        """`n` admitted images are answered (or were never sent): their slots of the bound go back."""
        self._bound.give(n)
        drained = self._drained
        if drained is not None and self._bound.mine <= 0 and not drained.done():
            drained.set_result(None)

    # -- admission and inference -------------------------------------------------------------

    def has_room(self) -> bool:
        return self._bound.has_room()

    def reserve(self, n: int, *, low_priority: bool = False) -> RemoteReservation:
        if self._stopping:
            raise ShuttingDown("the server is shutting down")
        self._model()
        available = self._bound.try_take(n)
        if n > available:
            raise Overloaded(
                f"the server is at capacity ({self.queue_limit} images admitted); retry shortly",
                retry_after_s=self.retry_after_s,
            )
        return RemoteReservation(self._give, n, low_priority=low_priority)

    async def infer(self, slots: Slots, image: NDArray[np.uint8]) -> tuple[Classified, BatchInfo]:
        if not isinstance(slots, RemoteReservation):
            raise TypeError("slots must come from this client's reserve()")
        slots.take_one()
        arena = self._arena
        if arena is None or not self._connected.is_set():
            self._give(1)
            if self._stopping:
                raise ShuttingDown("the server shut down before this image was classified")
            raise ModelNotReady("the model process is restarting; retry shortly")
        try:
            slot = arena.put(image)
        except BaseException:
            self._give(1)
            raise
        tag = next(self._tags) % _TAGS
        loop = asyncio.get_running_loop()
        future: asyncio.Future[tuple[int, Any]] = loop.create_future()
        self._pending[tag] = (future, slot)
        tags, slots_, sides, lows = self._submits
        tags.append(tag)
        slots_.append(slot)
        sides.append(image.shape[0])
        lows.append(slots.low_priority)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        # The tissue check runs here, in a thread, while the model process classifies the image
        # (the model process leaves it to the fronts: see ModelServer._build).
        tissue = loop.run_in_executor(None, check, image) if self._tissue_check else None
        try:
            generation, record = await future
            plausible = True if tissue is None else (await tissue).plausible
        except asyncio.CancelledError:
            if tag in self._pending:  # still at the model: its answer frees the slot
                self._cancels.append(tag)
                self._schedule_flush()
            raise
        result, info = self._classified(generation, record)
        if not plausible:
            # `decide` tests the tissue first: an implausible image is out of distribution,
            # whatever the model said.
            result = dataclasses.replace(result, decision=OUT_OF_DISTRIBUTION)
        return result, info

    def _classified(self, generation: int, row: tuple[Any, ...]) -> tuple[Classified, BatchInfo]:
        status, decision, has_ood, batch_size, batch_id, wait, compute, ood, probabilities = row
        if status:  # not Status.OK
            raise status_error(wire.Status(status), self.retry_after_s)
        manifest = self._models[generation].manifest
        result = Classified(probabilities, manifest, DECISIONS[decision], ood if has_ood else None)
        return result, BatchInfo(batch_id, batch_size, wait, compute)

    async def run_outputs(self, batch: NDArray[np.uint8], names: Sequence[str]) -> list[NDArray[np.float32]]:
        """Grad-CAM's outputs: a rare, larger call; its bytes ride in the control frame."""
        batch = np.ascontiguousarray(batch, dtype=np.uint8)
        call = {"op": "run_outputs", "names": list(names), "shape": list(batch.shape)}
        header, payload = await self._call(call, batch)
        arrays: list[NDArray[np.float32]] = []
        offset = 0
        for shape in header["shapes"]:
            n = int(np.prod(shape)) * 4
            arrays.append(np.frombuffer(payload[offset : offset + n], dtype=np.float32).reshape(shape).copy())
            offset += n
        return arrays

    async def reload(self) -> dict[str, Any]:
        """Hot reload inside the model process; the answer of `ModelReloader.reload`."""
        header, _ = await self._call({"op": "reload"})
        return header

    async def _call(
        self, header: dict[str, Any], payload: NDArray[np.uint8] | None = None
    ) -> tuple[dict[str, Any], memoryview]:
        self._model()
        protocol = self._protocol
        assert protocol is not None
        call_id = next(self._tags) % _TAGS
        future: asyncio.Future[tuple[dict[str, Any], memoryview]] = asyncio.get_running_loop().create_future()
        self._calls[call_id] = future
        protocol.send(wire.Kind.CALL, wire.call_body(call_id, header, b"" if payload is None else payload.tobytes()))
        try:
            reply, data = await future
        finally:
            self._calls.pop(call_id, None)
        if "error" in reply:
            raise call_error(reply)
        return reply, data

    # -- the wire ----------------------------------------------------------------------------

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        protocol = self._protocol
        if protocol is None:
            return
        tags, slots, sides, lows = self._submits
        if tags:
            records = np.empty(len(tags), dtype=wire.SUBMIT_RECORD)
            records["tag"], records["slot"], records["side"], records["low"] = tags, slots, sides, lows
            self._submits = ([], [], [], [])
            protocol.send(wire.Kind.SUBMIT, records.tobytes())
        if self._cancels:
            cancelled = np.array(self._cancels, dtype="<u4")
            self._cancels = []
            protocol.send(wire.Kind.CANCEL, cancelled.tobytes())

    def _on_frame(self, kind: wire.Kind, body: memoryview) -> None:
        if kind is wire.Kind.RESULTS:
            self._on_results(*wire.parse_results(body))
        elif kind is wire.Kind.MODEL:
            model = ModelInfo(wire.json_doc(body))
            self._models[model.generation] = model
            self._current = model
            self._tissue_check = model.thresholds.tissue_check
            if self._on_model is not None:
                self._on_model(model)
            arena = self._arena
            if arena is not None and model.input_size**2 * 3 > arena.slot_bytes and self._protocol is not None:
                log.warning("the new model's images are larger than this front's slots: reconnecting")
                self._protocol.close()
                return
            if not self._connected.is_set():
                self._connected.set()
                log.info("connected to the model process: %s %s", model.identity.name, model.identity.version)
        elif kind is wire.Kind.BYE:
            # It answered everything it read before BYE: what still waits never reached it, and
            # fails as "shutting down" when we hang up (_on_lost), which lets it exit.
            self._model_stopping = True
            if self._protocol is not None:
                self._protocol.close()
        elif kind is wire.Kind.REPLY:
            call_id, header, payload = wire.parse_call(body)
            future = self._calls.get(call_id)
            if future is not None and not future.done():
                future.set_result((header, payload))

    def _on_results(self, generation: int, records: NDArray[Any]) -> None:
        # Column by column: one conversion per field for the whole frame, not per image.
        rows = zip(
            records["status"].tolist(),
            records["decision"].tolist(),
            records["has_ood"].tolist(),
            records["batch_size"].tolist(),
            records["batch_id"].tolist(),
            records["queue_wait_s"].tolist(),
            records["compute_s"].tolist(),
            records["ood_score"].tolist(),
            np.array(records["probabilities"], dtype=np.float32),  # a copy: the rows outlive the frame
            strict=True,
        )
        arena = self._arena
        pending = self._pending
        answered = 0
        for tag, row in zip(records["tag"].tolist(), rows, strict=True):
            entry = pending.pop(tag, None)
            if entry is None:
                continue
            future, slot = entry
            if arena is not None:
                arena.free(slot)
            answered += 1
            if not future.done():
                future.set_result((generation, row))
        self._give(answered)

    def _on_lost(self) -> None:
        if self._connected.is_set() and self._model_stopping:
            log.info("the model process stopped (BYE): %d waiting image(s) fail with 503", len(self._pending))
        elif self._connected.is_set():
            log.warning("lost the model process: failing %d waiting image(s) with 503", len(self._pending))
        self._connected.clear()
        self._protocol = None
        self._arena = None
        self._submits = ([], [], [], [])
        self._cancels.clear()
        if self._model_stopping:
            self._fail_all(ShuttingDown("the model process shut down before this image was classified"))
        else:
            self._fail_all(ModelNotReady("the model process stopped; retry shortly"))
        self._model_stopping = False

    def _fail_all(self, error: LungserveError) -> None:
        pending, self._pending = self._pending, {}
        for future, _slot in pending.values():
            if not future.done():
                future.set_exception(error)
        self._give(len(pending))
        for call in list(self._calls.values()):
            if not call.done():
                call.set_exception(error)
