"""ONNX-level variants: in-graph dihedral TTA, an ensemble in one graph, int8 quantisation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from export.variants import dihedral_tta, ensemble, quantize_int8  # noqa: E402

S, C = 6, 3


def toy_model(seed: int, with_ood: bool = True) -> Any:
    """uint8 [N,S,S,3] -> softmax(flatten(x) @ W) and a per-image score: orientation-sensitive."""
    w = np.random.default_rng(seed).normal(0, 0.01, (S * S * 3, C)).astype(np.float32)
    nodes = [
        helper.make_node("Cast", ["image"], ["x"], to=TensorProto.FLOAT),
        helper.make_node("Flatten", ["x"], ["flat"], axis=1),
        helper.make_node("MatMul", ["flat", "w"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
    ]
    outputs = [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", C])]
    if with_ood:
        nodes.append(helper.make_node("ReduceMax", ["logits"], ["ood_score"], keepdims=0, axes=[1]))
        outputs.append(helper.make_tensor_value_info("ood_score", TensorProto.FLOAT, ["batch"]))
    graph = helper.make_graph(
        nodes,
        "toy",
        [helper.make_tensor_value_info("image", TensorProto.UINT8, ["batch", S, S, 3])],
        outputs,
        initializer=[numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def run(model: Any, images: np.ndarray) -> dict[str, np.ndarray]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, {"image": images}), strict=True))


def views(x: np.ndarray) -> list[np.ndarray]:
    flips = [x, x[:, :, ::-1], x[:, ::-1], x[:, ::-1, ::-1]]
    return flips + [np.transpose(v, (0, 2, 1, 3)) for v in flips]


IMAGES = np.random.default_rng(9).integers(0, 256, (5, S, S, 3), dtype=np.uint8)


def test_tta_is_the_mean_over_the_eight_dihedral_views() -> None:
    base = toy_model(0)
    got = run(dihedral_tta(base), IMAGES)
    per_view = [run(base, np.ascontiguousarray(v)) for v in views(IMAGES)]
    np.testing.assert_allclose(got["probabilities"], np.mean([p["probabilities"] for p in per_view], 0), atol=1e-6)
    np.testing.assert_allclose(got["ood_score"], np.mean([p["ood_score"] for p in per_view], 0), rtol=1e-5)
    assert len({v.tobytes() for v in views(IMAGES[:1])}) == 8  # eight distinct views
    # invariant by construction: a transposed input gives the same answer
    again = run(dihedral_tta(base), np.ascontiguousarray(np.transpose(IMAGES, (0, 2, 1, 3))))
    np.testing.assert_allclose(again["probabilities"], got["probabilities"], atol=1e-6)


def test_ensemble_averages_probabilities_and_keeps_the_ood_score_of_the_member_that_has_one() -> None:
    a, b = toy_model(1, with_ood=False), toy_model(2)
    got = run(ensemble([a, b]), IMAGES)
    np.testing.assert_allclose(
        got["probabilities"], (run(a, IMAGES)["probabilities"] + run(b, IMAGES)["probabilities"]) / 2, atol=1e-6
    )
    np.testing.assert_allclose(got["ood_score"], run(b, IMAGES)["ood_score"], rtol=1e-6)


def test_int8_model_runs_and_stays_close(tmp_path: Path) -> None:
    src, dst = tmp_path / "m.onnx", tmp_path / "q.onnx"
    onnx.save(toy_model(3), src)
    quantize_int8(src, dst, np.random.default_rng(0).integers(0, 256, (64, S, S, 3), dtype=np.uint8))
    q = onnx.load(dst)
    assert any(n.op_type == "QuantizeLinear" for n in q.graph.node)
    np.testing.assert_allclose(run(q, IMAGES)["probabilities"], run(toy_model(3), IMAGES)["probabilities"], atol=0.05)
