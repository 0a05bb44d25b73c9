"""LitServe peer: the bundled ONNX model behind LitServe's batching.

Started by loadtest/bench.py from the LitServe virtual environment:

    PYTHONPATH=<repo> .bench/venvs/litserve/bin/python loadtest/peers/litserve_app.py \
        --model <repo>/service/bundled_model --port 8004

`POST /predict` takes the multipart field `file` (LitServe parses the form when
`decode_request`'s parameter is a Starlette `Request`). Two inference worker processes
(--workers), each gathering up to --max-batch-size requests within --batch-timeout-s, decoding
them with lungserve's own `load_image` and running one ORT batch.

No `from __future__ import annotations` here: LitServe reads `decode_request`'s annotation at
run time, and a string annotation makes it hand the raw Request to the worker (a pickling
error, 500 on every request). SIGTERM is turned into KeyboardInterrupt, the one signal
LitServe shuts its worker processes down on.
"""
# mypy: disable-error-code="import-not-found,misc,no-any-unimported,no-untyped-def"

import argparse
import signal
import sys
from pathlib import Path
from typing import Any

import litserve as ls
import numpy as np
from common import OnnxClassifier
from starlette.requests import Request

from service.model.preprocess import load_image


class LungLit(ls.LitAPI):
    def __init__(self, model_dir: Path, **kwargs: Any) -> None:
        super().__init__(api_path="/predict", **kwargs)
        self.model_dir = model_dir

    def setup(self, device: str) -> None:
        self.model = OnnxClassifier(self.model_dir)
        self.model.warm_up(self.max_batch_size)

    def decode_request(self, request: Request) -> np.ndarray:
        upload: Any = request["file"]  # the parsed form, pickled to this worker
        return load_image(upload.file.read(), self.model.size)

    def batch(self, inputs: list[np.ndarray]) -> np.ndarray:
        return np.stack(inputs)

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.model.run(x)

    def unbatch(self, output: np.ndarray) -> list[np.ndarray]:
        return list(output)

    def encode_response(self, output: np.ndarray) -> dict[str, Any]:
        return self.model.answer(output)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--batch-timeout-s", type=float, default=0.005)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # shut down like Ctrl-C
    api = LungLit(args.model, max_batch_size=args.max_batch_size, batch_timeout=args.batch_timeout_s)
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=args.workers, timeout=60)
    server.run(host="127.0.0.1", port=args.port, generate_client_file=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
