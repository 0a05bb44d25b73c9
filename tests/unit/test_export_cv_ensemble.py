"""The fold models' ensemble in one ONNX graph: mean of logits, mean ood_score, Grad-CAM of the mean."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from export.cv_ensemble import mean_logit_ensemble  # noqa: E402

S, C, K = 4, 3, 2  # image side, classes, feature channels per member


def member(seed: int) -> tuple[Any, np.ndarray, np.ndarray]:
    """A contract graph: probabilities = softmax(flat(x) @ W), ood_score, feature_maps, cam_weights."""
    rng = np.random.default_rng(seed)
    w = rng.normal(0, 0.02, (S * S * 3, C)).astype(np.float32)
    fm_scale = rng.uniform(0.5, 1.5, (1, 1, 1, K)).astype(np.float32)
    cam = rng.normal(0, 1, (1, K, C)).astype(np.float32)
    nodes = [
        helper.make_node("Cast", ["image"], ["x"], to=TensorProto.FLOAT),
        helper.make_node("Flatten", ["x"], ["flat"], axis=1),
        helper.make_node("MatMul", ["flat", "w"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
        helper.make_node("ReduceMax", ["logits"], ["ood_score"], keepdims=0, axes=[1]),
        helper.make_node("Slice", ["x", "s0", "sk", "s3"], ["x2"]),  # first K colour channels as "maps"
        helper.make_node("Mul", ["x2", "fm_scale"], ["feature_maps"]),
        helper.make_node("ReduceMean", ["x"], ["mean"], axes=[1, 2, 3], keepdims=1),  # [N,1,1,1]
        helper.make_node("Squeeze", ["mean", "ax3"], ["mean3"]),  # [N,1,1]
        helper.make_node("Mul", ["mean3", "cam"], ["cam_weights"]),  # [N,K,C], input-dependent
    ]
    inits = [
        numpy_helper.from_array(w, "w"),
        numpy_helper.from_array(fm_scale, "fm_scale"),
        numpy_helper.from_array(cam, "cam"),
        numpy_helper.from_array(np.array([0], np.int64), "s0"),
        numpy_helper.from_array(np.array([K], np.int64), "sk"),
        numpy_helper.from_array(np.array([3], np.int64), "s3"),
        numpy_helper.from_array(np.array([3], np.int64), "ax3"),
    ]
    f = TensorProto.FLOAT
    outputs = [
        helper.make_tensor_value_info("probabilities", f, ["batch", C]),
        helper.make_tensor_value_info("ood_score", f, ["batch"]),
        helper.make_tensor_value_info("feature_maps", f, ["batch", S, S, K]),
        helper.make_tensor_value_info("cam_weights", f, ["batch", K, C]),
    ]
    image = helper.make_tensor_value_info("image", TensorProto.UINT8, ["batch", S, S, 3])
    model = helper.make_model(
        helper.make_graph(nodes, f"m{seed}", [image], outputs, initializer=inits),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    model.ir_version = 8
    return model, w, fm_scale


def run(model: Any, images: np.ndarray) -> dict[str, np.ndarray]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, {"image": images}), strict=True))


def test_ensemble_is_the_tempered_softmax_of_the_mean_logit() -> None:
    members = [member(s) for s in (1, 2, 3)]
    images = np.random.default_rng(0).integers(0, 256, (5, S, S, 3), dtype=np.uint8)
    out = run(mean_logit_ensemble([m for m, _, _ in members], temperature=0.7), images)
    flat = images.reshape(5, -1).astype(np.float64)
    mean_logits = np.mean([flat @ w for _, w, _ in members], axis=0)
    z = mean_logits / 0.7
    expected = np.exp(z - z.max(1, keepdims=True))
    expected /= expected.sum(1, keepdims=True)
    np.testing.assert_allclose(out["probabilities"], expected, atol=1e-5)
    each = [run(m, images) for m, _, _ in members]
    np.testing.assert_allclose(out["ood_score"], np.mean([e["ood_score"] for e in each], axis=0), rtol=1e-5)


def test_grad_cam_over_the_concatenated_channels_is_the_mean_of_the_members_maps() -> None:
    members = [member(s) for s in (4, 5)]
    images = np.random.default_rng(1).integers(0, 256, (3, S, S, 3), dtype=np.uint8)
    out = run(mean_logit_ensemble([m for m, _, _ in members]), images)
    assert out["feature_maps"].shape == (3, S, S, 2 * K)
    assert out["cam_weights"].shape == (3, 2 * K, C)

    def cam(fm: np.ndarray, w: np.ndarray) -> np.ndarray:  # pre-ReLU Grad-CAM, [N, S, S, C]
        return np.asarray(np.einsum("nhwk,nkc->nhwc", fm, w))

    each = [run(m, images) for m, _, _ in members]
    mean_cam = np.mean([cam(e["feature_maps"], e["cam_weights"]) for e in each], axis=0)
    np.testing.assert_allclose(cam(out["feature_maps"], out["cam_weights"]), mean_cam, rtol=1e-4, atol=1e-3)


def test_members_without_the_optional_outputs_give_probabilities_only() -> None:
    bare, _, _ = member(6)
    keep = [o for o in bare.graph.output if o.name == "probabilities"]
    del bare.graph.output[:]
    bare.graph.output.extend(keep)
    out = run(mean_logit_ensemble([bare, member(7)[0]]), np.zeros((2, S, S, 3), np.uint8))
    assert list(out) == ["probabilities"]
    np.testing.assert_allclose(out["probabilities"].sum(1), 1.0, atol=1e-6)
