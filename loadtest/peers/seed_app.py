"""The seed design: one Flask file, Pillow decode + resize, Keras `model.predict` per request, waitress.

Started by loadtest/bench.py from the seed virtual environment (tensorflow-cpu 2.21, Keras 3):

    PYTHONPATH=<repo> .bench/venvs/seed/bin/python loadtest/peers/seed_app.py --port 8003

What it keeps from the design it replaces: a Flask route reading the multipart field
`file`, a full Pillow decode (no JPEG draft mode), convert to RGB, resize, and one
`model.predict` call per request, served by waitress with its defaults (4 threads).
What it changes, to compare like for like: the network is lungserve's CNN
(`export.model.build_model`, random weights: speed does not depend on them) and the resize
goes to that model's input size (--input-size: loadtest/bench.py passes the bundled manifest's) instead of the
original 256 px.
"""
# mypy: disable-error-code="import-not-found,import-untyped,untyped-decorator,misc,no-untyped-call"

from __future__ import annotations

import argparse
import sys
from typing import Any

import numpy as np
from flask import Flask, jsonify, request
from PIL import Image
from waitress import serve

CLASSES = ["lung_aca", "lung_n", "lung_scc"]


def create_app(input_size: int) -> Flask:
    from export.model import build_model  # the repository's builder (Keras 3)

    model = build_model(num_classes=len(CLASSES), input_size=input_size)
    model.predict(np.zeros((1, input_size, input_size, 3), dtype=np.uint8), verbose=0)  # build + trace
    app = Flask(__name__)

    @app.route("/predict", methods=["POST"])
    def predict() -> Any:
        if "file" not in request.files:
            return jsonify(error="no file"), 400
        img = Image.open(request.files["file"].stream).convert("RGB").resize((input_size, input_size))
        x = np.asarray(img, dtype=np.uint8)[np.newaxis]
        probs = model.predict(x, verbose=0)[0]
        best = int(np.argmax(probs))
        return jsonify(
            label=CLASSES[best],
            confidence=float(probs[best]),
            probabilities={c: float(p) for c, p in zip(CLASSES, probs, strict=True)},
        )

    return app


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--input-size", type=int, default=128)
    args = parser.parse_args()
    serve(create_app(args.input_size), host="127.0.0.1", port=args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
