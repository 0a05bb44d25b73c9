"""What the BentoML and Ray Serve peers share: the same model, preprocessing and answer.

Runs inside a peer's own virtual environment (loadtest/peers/*.txt), with the repository
root on PYTHONPATH so that `service.model.preprocess.load_image`, the one decode/resize function
lungserve uses, is imported from the repository rather than rewritten.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from service.model.preprocess import load_image


class OnnxClassifier:
    """The bundled ONNX model: bytes of N images -> N lungserve-shaped predictions."""

    def __init__(self, model_dir: Path) -> None:
        self.manifest: dict[str, Any] = json.loads((model_dir / "model.json").read_text())
        self.size = int(self.manifest["input_size"])
        self.classes = [str(c) for c in self.manifest["classes"]]
        self.input_name = str(self.manifest["input_name"])
        self.output_name = str(self.manifest["output_name"])
        opts = ort.SessionOptions()
        threads = os.environ.get("BENCH_ORT_INTRA_THREADS")
        if threads:
            opts.intra_op_num_threads = int(threads)
        self.session = ort.InferenceSession(
            str(model_dir / str(self.manifest.get("file", "model.onnx"))),
            sess_options=opts,
            providers=["CPUExecutionProvider"],
        )
        self.model_ref = {"name": str(self.manifest["name"]), "version": str(self.manifest["version"])}

    def warm_up(self, max_batch: int) -> None:
        for n in range(1, max_batch + 1):
            self.run(np.zeros((n, self.size, self.size, 3), dtype=np.uint8))

    def run(self, batch: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        out = self.session.run([self.output_name], {self.input_name: batch})[0]
        return np.asarray(out)

    def predict_bytes(self, images: list[bytes]) -> list[dict[str, Any]]:
        batch = np.stack([load_image(data, self.size) for data in images])
        return [self.answer(row) for row in self.run(batch)]

    def answer(self, probs: np.ndarray[Any, Any]) -> dict[str, Any]:
        best = int(np.argmax(probs))
        return {
            "label": self.classes[best],
            "confidence": float(probs[best]),
            "probabilities": {c: float(p) for c, p in zip(self.classes, probs, strict=True)},
            "model": self.model_ref,
        }
