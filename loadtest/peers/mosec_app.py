"""mosec peer: the bundled ONNX model behind mosec's Rust front end and dynamic batching.

Started by loadtest/bench.py from the mosec virtual environment:

    PYTHONPATH=<repo> BENCH_MODEL_DIR=<repo>/service/bundled_model \
        .bench/venvs/mosec/bin/python loadtest/peers/mosec_app.py --address 127.0.0.1 --port 8003

Two stages, as mosec is meant to be used: `Decode` (2 processes) takes the raw request body,
finds the multipart part (mosec has no multipart support: the boundary is the body's first
line) and decodes it with lungserve's `load_image`; `Infer` (1 process) gets batches of up to
BENCH_MAX_BATCH_SIZE decoded images, waiting at most BENCH_MAX_BATCH_DELAY_MS, and runs them as
one ORT batch. `POST /predict` answers lungserve's JSON shape. mosec's own flags (--port,
--address, --timeout, ...) are read from the command line by mosec itself.
"""
# mypy: disable-error-code="import-not-found,misc,no-any-unimported"

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from common import OnnxClassifier
from mosec import Server, Worker
from mosec.errors import ValidationError

from service.model.preprocess import load_image

MODEL_DIR = Path(os.environ.get("BENCH_MODEL_DIR", "service/bundled_model"))
MAX_BATCH_SIZE = int(os.environ.get("BENCH_MAX_BATCH_SIZE", "16"))
MAX_BATCH_DELAY_MS = max(1, round(float(os.environ.get("BENCH_MAX_BATCH_DELAY_MS", "5"))))
INPUT_SIZE = int(json.loads((MODEL_DIR / "model.json").read_text())["input_size"])


def multipart_file(body: bytes) -> bytes:
    """The content of the first part of a multipart body: the boundary is its first line."""
    boundary, sep, rest = body.partition(b"\r\n")
    if not sep or not boundary.startswith(b"--"):
        raise ValidationError("expected a multipart/form-data body")
    _, sep, content = rest.partition(b"\r\n\r\n")  # end of the part's headers
    end = content.find(b"\r\n" + boundary)
    if not sep or end < 0:
        raise ValidationError("malformed multipart body")
    return content[:end]


class Decode(Worker):
    def deserialize(self, data: bytes) -> bytes:
        return data  # the raw body; mosec's default would parse JSON

    def forward(self, data: bytes) -> np.ndarray[Any, Any]:
        return load_image(multipart_file(data), INPUT_SIZE)


class Infer(Worker):
    def __init__(self) -> None:
        super().__init__()
        self.model = OnnxClassifier(MODEL_DIR)
        self.model.warm_up(MAX_BATCH_SIZE)

    def forward(self, data: list[np.ndarray[Any, Any]]) -> list[dict[str, Any]]:
        return [self.model.answer(row) for row in self.model.run(np.stack(data))]

    def serialize(self, data: dict[str, Any]) -> bytes:
        return json.dumps(data).encode()


if __name__ == "__main__":
    server = Server()
    server.append_worker(Decode, num=2, route="/predict")
    server.append_worker(
        Infer, num=1, max_batch_size=MAX_BATCH_SIZE, max_wait_time=MAX_BATCH_DELAY_MS, route="/predict"
    )
    server.run()
