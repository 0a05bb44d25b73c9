"""The process boundary between a front and the model process: frames, records, shared memory.

Standard library + numpy; no ONNX Runtime, no web framework (docs/topology.md draws it):

* **Pixels** travel in a `TensorArena`: one anonymous shared-memory file per front connection
  (`os.memfd_create`), cut into fixed slots of one image each. The front writes an image into a
  free slot; the model process maps the same memory and reads it in place. Arrays are never
  pickled. A memfd has no name: nothing is left in /dev/shm when a process is SIGKILLed (the
  memory goes with the last mapping), and Docker's 64 MiB /dev/shm does not bound it.
  Its descriptor crosses once, with the connection's HELLO (`socket.send_fds`).
* **Control** is a Unix stream socket carrying length-prefixed frames. Records are fixed-size
  numpy structures, so one frame carries every image a loop tick produced: a SUBMIT of 64
  images is one `send`, and one RESULTS frame answers a whole batch.
"""

from __future__ import annotations

import asyncio
import enum
import json
import mmap
import os
import socket
import struct
from collections.abc import Callable
from functools import cache
from typing import Any, Final, cast

import numpy as np
from numpy.typing import NDArray

from service.core.batch_types import BatchInfo
from service.core.model_client import Classified
from service.errors import LungserveError
from service.model.decision import ACCEPT, LOW_CONFIDENCE, OUT_OF_DISTRIBUTION, Decision

# A frame: body length (u32, little-endian), kind (u8), body.
_HEADER: Final = struct.Struct("<IB")
# Bytes a frame body may have; beyond it the peer is broken and the connection is closed.
MAX_FRAME_BYTES: Final = 64 * 1024 * 1024


class Kind(enum.IntEnum):
    OFFER = 0  # model -> front, first: JSON {input_size, queue_limit}, to size the arena
    HELLO = 1  # front -> model, with the arena's descriptor: JSON {front, slots, slot_bytes}
    MODEL = 2  # model -> front: JSON describing the model now served (handshake and every swap)
    SUBMIT = 3  # front -> model: SUBMIT_RECORD per image
    CANCEL = 4  # front -> model: u32 tags whose answer is no longer wanted
    RESULTS = 5  # model -> front: u32 generation, u32 classes, then result records
    CALL = 6  # front -> model: u32 call id, u32 JSON length, JSON, raw bytes (rare: Grad-CAM, reload)
    REPLY = 7  # model -> front: the same layout as CALL
    BYE = 8  # model -> front: draining; it closes the connection once it has answered


class Status(enum.IntEnum):
    """How one image's submission ended, as the model process saw it."""

    OK = 0
    CANCELLED = 1  # the front cancelled it; its slot may be reused
    OVERLOADED = 2
    SHUTTING_DOWN = 3
    FAILED = 4  # its batch's model run failed
    NOT_READY = 5


# One submitted image: its tag (the front's key for the answer), the arena slot, its side.
# `low`: a slide job's image, batched only after every queued interactive one.
SUBMIT_RECORD: Final = np.dtype([("tag", "<u4"), ("slot", "<u4"), ("side", "<u4"), ("low", "u1")])


@cache
def result_record(n_classes: int) -> np.dtype[Any]:
    """One answer: status, decision code, the batch it went in, and the model's outputs."""
    return np.dtype(
        [
            ("tag", "<u4"),
            ("status", "u1"),
            ("decision", "u1"),
            ("has_ood", "u1"),
            ("pad", "u1"),
            ("batch_size", "<u4"),
            ("batch_id", "<u8"),
            ("queue_wait_s", "<f4"),
            ("compute_s", "<f4"),
            ("ood_score", "<f4"),
            ("probabilities", "<f4", (n_classes,)),
        ]
    )


# The decision travels as a code: its index here.
DECISIONS: Final[tuple[Decision, ...]] = (ACCEPT, LOW_CONFIDENCE, OUT_OF_DISTRIBUTION)
DECISION_CODE: Final = {d: i for i, d in enumerate(DECISIONS)}

_RESULTS_HEAD: Final = struct.Struct("<II")  # generation, classes
_CALL_HEAD: Final = struct.Struct("<II")  # call id, JSON length


def frame(kind: Kind, body: bytes | memoryview = b"") -> bytes:
    return _HEADER.pack(len(body), kind) + bytes(body)


def results_body(generation: int, n_classes: int, records: NDArray[Any]) -> bytes:
    return _RESULTS_HEAD.pack(generation, n_classes) + records.tobytes()


def parse_results(body: memoryview) -> tuple[int, NDArray[Any]]:
    generation, n_classes = _RESULTS_HEAD.unpack_from(body)
    return generation, np.frombuffer(body[_RESULTS_HEAD.size :], dtype=result_record(n_classes))


def json_bytes(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc).encode()


def json_doc(body: bytes | memoryview) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(bytes(body))
    return doc


def call_body(call_id: int, header: dict[str, Any], payload: bytes | memoryview = b"") -> bytes:
    text = json.dumps(header).encode()
    return _CALL_HEAD.pack(call_id, len(text)) + text + bytes(payload)


def parse_call(body: memoryview) -> tuple[int, dict[str, Any], memoryview]:
    call_id, length = _CALL_HEAD.unpack_from(body)
    start = _CALL_HEAD.size
    header: dict[str, Any] = json.loads(bytes(body[start : start + length]))
    return call_id, header, body[start + length :]


class ResultRows:
    """Answers of one generation gathered column by column, sent as one RESULTS frame."""

    def __init__(self, n_classes: int) -> None:
        self.n_classes = n_classes
        self.columns: tuple[list[Any], ...] = tuple([] for _ in range(9))
        self.probabilities: list[Any] = []

    def add(self, tag: int, status: Status, result: Classified | None, info: BatchInfo | None) -> None:
        tags, statuses, decisions, has_ood, sizes, ids, waits, computes, oods = self.columns
        tags.append(tag)
        statuses.append(status)
        if result is None or info is None:
            decisions.append(0)
            has_ood.append(0)
            sizes.append(0)
            ids.append(0)
            waits.append(0.0)
            computes.append(0.0)
            oods.append(0.0)
            self.probabilities.append(np.zeros(self.n_classes, np.float32))
            return
        decisions.append(DECISION_CODE[result.decision])
        has_ood.append(result.ood_score is not None)
        sizes.append(info.size)
        ids.append(info.batch_id)
        waits.append(info.queue_wait_s)
        computes.append(info.compute_s)
        oods.append(result.ood_score if result.ood_score is not None else 0.0)
        self.probabilities.append(result.probabilities)

    def records(self) -> np.ndarray[Any, Any]:
        names = ["tag", "status", "decision", "has_ood", "batch_size", "batch_id", "queue_wait_s", "compute_s"]
        names.append("ood_score")
        records = np.zeros(len(self.columns[0]), dtype=result_record(self.n_classes))
        for name, column in zip(names, self.columns, strict=True):
            records[name] = column
        if self.probabilities:
            records["probabilities"] = np.stack(self.probabilities)
        return records


def error_header(exc: BaseException) -> dict[str, Any]:
    """A domain error as a CALL reply; the front raises the same class (`service.errors`)."""
    if isinstance(exc, LungserveError):
        return {"error": type(exc).__name__, "message": exc.message, "retry_after_s": getattr(exc, "retry_after_s", 1)}
    return {"error": "InferenceFailed", "message": f"the model process failed: {type(exc).__name__}"}


class FrameProtocol(asyncio.Protocol):
    """Splits a byte stream into frames and hands each to `on_frame`; writes are coalesced.

    `send` appends to a buffer flushed once per loop iteration: every image submitted (or
    answered) in one tick leaves in one write, whatever number of tasks produced them.
    """

    def __init__(self, on_frame: Callable[[Kind, memoryview], None], on_lost: Callable[[], None]) -> None:
        self._on_frame = on_frame
        self._on_lost = on_lost
        self._buffer = bytearray()
        self._out: list[bytes] = []
        self._flush_scheduled = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports (the fronts run uvicorn's loop) are not asyncio.Transport subclasses.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        buf = self._buffer
        buf += data
        offset = 0
        view = memoryview(buf)
        try:
            while len(buf) - offset >= _HEADER.size:
                length, kind = _HEADER.unpack_from(buf, offset)
                if length > MAX_FRAME_BYTES:
                    raise ConnectionError(f"frame of {length} bytes exceeds {MAX_FRAME_BYTES}")
                end = offset + _HEADER.size + length
                if len(buf) < end:
                    break
                # A copy: the handler may keep the records beyond this call (the buffer moves).
                self._on_frame(Kind(kind), memoryview(bytes(view[offset + _HEADER.size : end])))
                offset = end
        finally:
            view.release()
        if offset:
            del buf[:offset]

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._out.clear()
        self._on_lost()

    def send(self, kind: Kind, body: bytes | memoryview = b"") -> None:
        self._out.append(frame(kind, body))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        out, self._out = self._out, []
        if self.transport is not None and not self.transport.is_closing() and out:
            self.transport.write(b"".join(out))

    def close(self) -> None:
        if self.transport is not None:
            self._flush()
            self.transport.close()


class TensorArena:
    """`slots` fixed-size image slots in one shared-memory file (created by a front)."""

    def __init__(self, fd: int, slots: int, slot_bytes: int, *, owner: bool) -> None:
        self.fd = fd
        self.slots = slots
        self.slot_bytes = slot_bytes
        self._map = mmap.mmap(fd, slots * slot_bytes)
        self._buffer = np.frombuffer(self._map, dtype=np.uint8)
        # Only the front hands slots out; the model process only reads them.
        self._free = list(range(slots - 1, -1, -1)) if owner else []
        self._by_side: dict[int, NDArray[np.uint8]] = {}  # side -> every slot as an (S, S, 3) image

    @classmethod
    def create(cls, name: str, slots: int, slot_bytes: int) -> TensorArena:
        fd = os.memfd_create(name, os.MFD_CLOEXEC)
        os.ftruncate(fd, slots * slot_bytes)
        return cls(fd, slots, slot_bytes, owner=True)

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def put(self, image: NDArray[np.uint8]) -> int:
        """Copy one (S, S, 3) image into a free slot; its index. IndexError when none is free."""
        slot = self._free.pop()
        n = image.size
        if n > self.slot_bytes:
            self._free.append(slot)
            raise ValueError(f"image of {n} bytes does not fit a {self.slot_bytes}-byte slot")
        start = slot * self.slot_bytes
        self._buffer[start : start + n] = image.reshape(-1)
        return slot

    def free(self, slot: int) -> None:
        self._free.append(slot)

    def view(self, slot: int, side: int) -> NDArray[np.uint8]:
        """The image in `slot`, in place (no copy): valid until the front frees the slot."""
        images = self._by_side.get(side)
        if images is None:
            images = self._by_side[side] = self._images(side)
        image: NDArray[np.uint8] = images[slot]  # one index into a view made once, no reshaping
        return image

    def _images(self, side: int) -> NDArray[np.uint8]:
        """All slots as (slots, S, S, 3) images over the shared memory (strides, never a copy)."""
        if side * side * 3 > self.slot_bytes:
            raise ValueError(f"a {side} px image does not fit a {self.slot_bytes}-byte slot")
        shape = (self.slots, side, side, 3)
        return np.ndarray(shape, np.uint8, buffer=self._map, strides=(self.slot_bytes, side * 3, 3, 1))

    def close(self) -> None:
        """Close the descriptor; the mapping goes when the last view of it is gone (a batch
        still computing may hold views of a front that has just died)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def send_frame(sock: socket.socket, kind: Kind, doc: dict[str, Any]) -> None:
    """One JSON frame on a blocking socket (the handshake, before asyncio takes the socket)."""
    sock.sendall(frame(kind, json_bytes(doc)))


def receive_frame(sock: socket.socket, kind: Kind) -> dict[str, Any]:
    """The JSON frame `kind`, read whole from a blocking socket (the handshake)."""
    head = _receive_exactly(sock, _HEADER.size)
    length, got = _HEADER.unpack(head)
    if got != kind or length > MAX_FRAME_BYTES:
        raise ConnectionError(f"expected a {kind.name} frame, got kind {got} of {length} bytes")
    doc: dict[str, Any] = json.loads(_receive_exactly(sock, length))
    return doc


def _receive_exactly(sock: socket.socket, n: int) -> bytes:
    chunks = bytearray()
    while len(chunks) < n:
        chunk = sock.recv(n - len(chunks))
        if not chunk:
            raise ConnectionError("connection closed during the handshake")
        chunks += chunk
    return bytes(chunks)


def send_hello(sock: socket.socket, hello: dict[str, Any], fd: int) -> None:
    """The first frame of a connection, with the arena's descriptor beside it (blocking)."""
    socket.send_fds(sock, [frame(Kind.HELLO, json.dumps(hello).encode())], [fd])


def receive_hello(sock: socket.socket) -> tuple[dict[str, Any], int]:
    """Read HELLO and its descriptor (blocking, on a fresh connection, with the socket's timeout)."""
    data, fds, _flags, _addr = socket.recv_fds(sock, 65536, 1)
    if len(data) < _HEADER.size:
        raise ConnectionError("connection closed before HELLO")
    length, kind = _HEADER.unpack_from(data)
    if kind != Kind.HELLO or len(fds) != 1 or len(data) != _HEADER.size + length:
        for fd in fds:
            os.close(fd)
        raise ConnectionError("the first frame must be one whole HELLO with one descriptor")
    return json.loads(data[_HEADER.size :]), fds[0]
