"""Model variants that need no retraining, built at the ONNX level from bundled models:

- dihedral test-time augmentation folded into the graph (8 flips/transposes, averaged per image);
- an ensemble of several models in one graph (mean calibrated probabilities);
- int8 static quantisation (ONNX Runtime, QDQ, calibrated on train images).
Each is a model folder with its own manifest, its decision refitted on the select groups.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from service.model.manifest import MANIFEST_NAME, MODEL_NAME, Manifest, sha256_file

INT64_MIN = -(2**63)


def _inline(model: Any, prefix: str) -> Any:
    import onnx.compose

    return onnx.compose.add_prefix(model, prefix)


def _const(name: str, values: list[int]) -> Any:
    from onnx import helper, numpy_helper

    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.array(values, np.int64), name))


def dihedral_tta(model: Any) -> Any:
    """image [N,S,S,3] -> the model on all 8 dihedral views -> mean probabilities / ood_score per image."""
    from onnx import helper

    inner = _inline(model, "m/")
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    input_name = model.graph.input[0].name
    outs = [o.name for o in model.graph.output if o.name in ("probabilities", "ood_score")]
    nodes = [
        _const("tta/m1", [-1]),
        _const("tta/min", [INT64_MIN]),
        _const("tta/ax1", [1]),
        _const("tta/ax2", [2]),
        helper.make_node("Slice", [input_name, "tta/m1", "tta/min", "tta/ax2", "tta/m1"], ["tta/lr"]),
        helper.make_node("Slice", [input_name, "tta/m1", "tta/min", "tta/ax1", "tta/m1"], ["tta/ud"]),
        helper.make_node("Slice", ["tta/lr", "tta/m1", "tta/min", "tta/ax1", "tta/m1"], ["tta/lrud"]),
    ]
    views = [input_name, "tta/lr", "tta/ud", "tta/lrud"]
    for v in list(views):
        nodes.append(helper.make_node("Transpose", [v], [f"{v}_t"], perm=[0, 2, 1, 3]))
        views.append(f"{v}_t")
    nodes.append(helper.make_node("Concat", views, [f"m/{input_name}"], axis=0))
    nodes += list(inner.graph.node)
    nodes += [_const("tta/axis0", [0])]
    graph_outputs = []
    for name in outs:
        src = next(o for o in inner.graph.output if o.name == f"m/{name}")
        if name == "probabilities":
            nodes.append(_const("tta/shape_p", [8, -1, int(src.type.tensor_type.shape.dim[1].dim_value)]))
            nodes.append(helper.make_node("Reshape", [f"m/{name}", "tta/shape_p"], [f"tta/{name}_8"]))
        else:
            nodes.append(_const("tta/shape_o", [8, -1]))
            nodes.append(helper.make_node("Reshape", [f"m/{name}", "tta/shape_o"], [f"tta/{name}_8"]))
        if opset >= 18:  # ReduceMean's axes became an input in opset 18
            nodes.append(helper.make_node("ReduceMean", [f"tta/{name}_8", "tta/axis0"], [name], keepdims=0))
        else:
            nodes.append(helper.make_node("ReduceMean", [f"tta/{name}_8"], [name], keepdims=0, axes=[0]))
        out = next(o for o in model.graph.output if o.name == name)
        graph_outputs.append(out)
    graph = helper.make_graph(
        nodes, "lungserve_tta8", [model.graph.input[0]], graph_outputs, initializer=list(inner.graph.initializer)
    )
    return _finish(helper.make_model(graph, opset_imports=list(model.opset_import)), model)


def ensemble(models: list[Any]) -> Any:
    """Mean of the members' `probabilities`; `ood_score` from the first member that has it."""
    from onnx import helper

    input_value = models[0].graph.input[0]
    nodes, inits, members = [], [], []
    ood_from = None
    for i, m in enumerate(models):
        inner = _inline(m, f"e{i}/")
        nodes.append(helper.make_node("Identity", [input_value.name], [f"e{i}/{m.graph.input[0].name}"]))
        nodes += list(inner.graph.node)
        inits += list(inner.graph.initializer)
        members.append(f"e{i}/probabilities")
        if ood_from is None and any(o.name == "ood_score" for o in m.graph.output):
            ood_from = i
    nodes.append(helper.make_node("Mean", members, ["probabilities"]))
    outputs = [next(o for o in models[0].graph.output if o.name == "probabilities")]
    if ood_from is not None:
        nodes.append(helper.make_node("Identity", [f"e{ood_from}/ood_score"], ["ood_score"]))
        outputs.append(next(o for o in models[ood_from].graph.output if o.name == "ood_score"))
    graph = helper.make_graph(nodes, "lungserve_ensemble", [input_value], outputs, initializer=inits)
    opset = max((o for m in models for o in m.opset_import if o.domain in ("", "ai.onnx")), key=lambda o: o.version)
    return _finish(helper.make_model(graph, opset_imports=[opset]), models[0])


def _finish(new: Any, like: Any) -> Any:
    import onnx

    new.ir_version = like.ir_version
    new.producer_name = "lungserve"
    del new.metadata_props[:]
    for entry in like.metadata_props:
        if entry.key != "outputs":
            new.metadata_props.add(key=entry.key, value=entry.value)
    onnx.checker.check_model(new)
    return new


def quantize_int8(src: Path, dst: Path, calibration: NDArray[np.uint8], input_name: str = "image") -> None:
    """ONNX Runtime static quantisation, QDQ format, per-channel int8 Conv/MatMul weights,
    activations calibrated (min/max) on `calibration` (train images)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self._batches = iter(calibration[i : i + 32] for i in range(0, len(calibration), 32))

        def get_next(self) -> dict[str, NDArray[np.uint8]] | None:
            batch = next(self._batches, None)
            return None if batch is None else {input_name: np.ascontiguousarray(batch)}

    pre = dst.with_suffix(".pre.onnx")
    quant_pre_process(str(src), str(pre))
    quantize_static(
        str(pre),
        str(dst),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
        op_types_to_quantize=["Conv", "MatMul"],
    )
    pre.unlink()


def write_variant(
    proto_or_path: Any,
    base_dir: Path,
    out_dir: Path,
    *,
    name_suffix: str,
    describe: dict[str, Any],
    select_probs_ood: tuple[NDArray[np.floating], NDArray[np.floating] | None, NDArray[np.integer]] | None = None,
) -> Manifest:
    """Write a variant's model.onnx and a manifest derived from the base model's, with `variant` described.

    If `select_probs_ood` is None the outputs are computed here on nothing: the caller refits the
    decision afterwards with `refit_decision`.
    """
    import onnx

    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / MODEL_NAME
    if isinstance(proto_or_path, Path):
        shutil.copyfile(proto_or_path, target)
    else:
        onnx.save(proto_or_path, target)
    base = json.loads((base_dir / MANIFEST_NAME).read_text())
    sess_outputs = _output_names(target)
    base.update(
        version=f"{base['version']}-{name_suffix}",
        sha256=sha256_file(target),
        outputs={n: n for n in sess_outputs},
        variant=describe,
    )
    base.pop("parity", None)
    base.pop("test_metrics", None)
    (out_dir / MANIFEST_NAME).write_text(json.dumps(base, indent=1) + "\n")
    return Manifest.model_validate(base)


def refit_decision(model_dir: Path, data: Path, cache_dir: Path | None, split_manifest: Path) -> dict[str, Any]:
    """Fit the variant's own decision on the select groups and store it in its manifest."""
    from export import data as data_mod
    from export.decision_fit import fit_decision
    from export.evaluate import run_outputs, split_of
    from export.scoring import classification_report

    ds = data_mod.scan(data)
    manifest: dict[str, Any] = json.loads((model_dir / MANIFEST_NAME).read_text())
    samples = split_of(json.loads(split_manifest.read_text()), ds).select
    images, labels = data_mod.load_arrays(samples, int(manifest["input_size"]), cache_dir)
    out = run_outputs(model_dir, np.asarray(images))
    groups = len({s.group for s in samples})
    decision = fit_decision(
        out["probabilities"], labels, out.get("ood_score"), f"select groups ({groups} groups, {len(samples)} images)"
    )
    manifest["decision"] = decision
    rep = classification_report(labels, out["probabilities"], ds.classes)
    manifest["select_metrics"] = {
        k: rep[k] for k in ("n", "accuracy", "balanced_accuracy", "per_class", "confusion_matrix", "ece")
    }
    (model_dir / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def _output_names(path: Path) -> list[str]:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return [o.name for o in sess.get_outputs()]
