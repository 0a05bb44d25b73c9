"""Triton peer (via PyTriton 0.7): the bundled ONNX model behind Triton's dynamic batcher.

Started by loadtest/bench.py from the PyTriton virtual environment (numpy < 2), with the
interpreter's own lib directory first on LD_LIBRARY_PATH (else Triton's Python stub loads the
system libpython) and PYTRITON_HOME under the run directory:

    PYTHONPATH=<repo> PYTRITON_HOME=.bench/pytriton_home LD_LIBRARY_PATH=<python prefix>/lib \
        .bench/venvs/pytriton/bin/python loadtest/peers/pytriton_app.py --model <repo>/service/bundled_model --port 8005

Triton's own HTTP front end (C++) serves `POST /v2/models/lung/infer` (Open Inference
Protocol v2; the load test sends the binary-data extension: one BYTES element holding the
encoded image). The dynamic batcher gathers up to --max-batch-size requests, waiting at most
--max-queue-delay-us, and the bound Python function decodes them with lungserve's
`load_image` and runs one ORT batch. gRPC and metrics listen on loopback too.
"""
# mypy: disable-error-code="import-not-found,misc,no-any-unimported,untyped-decorator"

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
from pathlib import Path
from typing import Any

import numpy as np
from common import OnnxClassifier
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig

from service.model.preprocess import load_image


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--grpc-port", type=int, required=True)
    parser.add_argument("--metrics-port", type=int, required=True)
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--max-queue-delay-us", type=int, default=5000)
    args = parser.parse_args()
    model = OnnxClassifier(args.model)
    model.warm_up(args.max_batch_size)

    @batch
    def infer(image: np.ndarray[Any, Any]) -> dict[str, np.ndarray[Any, Any]]:
        arrays = [load_image(bytes(row[0]), model.size) for row in image]
        return {"probabilities": model.run(np.stack(arrays)).astype(np.float32)}

    config = TritonConfig(
        http_address="127.0.0.1",
        http_port=args.port,
        grpc_address="127.0.0.1",
        grpc_port=args.grpc_port,
        metrics_address="127.0.0.1",
        metrics_port=args.metrics_port,
        exit_timeout_secs=5,
    )
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    with Triton(config=config) as triton:
        triton.bind(
            model_name="lung",
            infer_func=infer,
            inputs=[Tensor(name="image", dtype=np.bytes_, shape=(1,))],
            outputs=[Tensor(name="probabilities", dtype=np.float32, shape=(len(model.classes),))],
            config=ModelConfig(
                max_batch_size=args.max_batch_size,
                batcher=DynamicBatcher(max_queue_delay_microseconds=args.max_queue_delay_us),
            ),
            strict=False,
        )
        print(f"pytriton peer ready on http://127.0.0.1:{args.port}/v2/models/lung/infer", flush=True)
        with contextlib.suppress(KeyboardInterrupt):  # SIGTERM: leave the `with`, which stops Triton
            triton.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
