"""BentoML peer: the bundled ONNX model behind BentoML 1.4's adaptive batching.

Started by loadtest/bench.py from the BentoML virtual environment:

    BENTOML_DO_NOT_TRACK=true PYTHONPATH=<repo> BENCH_MODEL_DIR=<repo>/service/bundled_model \
        .bench/venvs/bentoml/bin/bentoml serve bentoml_service:LungBento \
        --working-dir loadtest/peers --host 127.0.0.1 --port 8001

`POST /predict` takes the multipart field `file` (like lungserve). The API is `batchable`:
BentoML's CORK dispatcher gathers concurrent requests' files into one list, up to
BENCH_MAX_BATCH_SIZE (lungserve's max_batch_size), within a BENCH_MAX_LATENCY_MS budget
(lungserve's request deadline: BentoML sheds requests predicted to exceed it). The batch
is decoded with lungserve's own `load_image` and run as one ORT batch. One worker process
(BentoML's default), like lungserve's single process; ORT picks its thread count as in ours.
Each request's answer is a JSON list holding its one prediction.
"""
# mypy: disable-error-code="import-not-found,untyped-decorator,misc"

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import bentoml
from common import OnnxClassifier

MAX_BATCH_SIZE = int(os.environ.get("BENCH_MAX_BATCH_SIZE", "16"))
MAX_LATENCY_MS = int(os.environ.get("BENCH_MAX_LATENCY_MS", "30000"))


@bentoml.service(workers=1, traffic={"timeout": 120})
class LungBento:
    def __init__(self) -> None:
        self.model = OnnxClassifier(Path(os.environ["BENCH_MODEL_DIR"]))
        self.model.warm_up(MAX_BATCH_SIZE)

    @bentoml.api(route="/predict", batchable=True, max_batch_size=MAX_BATCH_SIZE, max_latency_ms=MAX_LATENCY_MS)
    def predict(self, file: list[Path]) -> list[dict[str, Any]]:
        return self.model.predict_bytes([p.read_bytes() for p in file])
