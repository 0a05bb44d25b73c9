"""The cross-validation's fold models as ONE served model: the mean of their logits in one ONNX graph.

    python -m export.cv_ensemble --run RUN --out DIR [--members 0 1 2] [--temperature T]

Mean logits, mean ood_score, Grad-CAM over the concatenated channels (= Grad-CAM of the mean
logit); cost and derivation in docs/model/cv.md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from export.cv_ood import DEFAULT_SCORE, SCORES, Score, fit_member

PROB_FLOOR = 1e-30  # log(0) guard; reached only for logit gaps > 69, where the answer is certain anyway


def mean_logit_ensemble(members: list[Any], temperature: float = 1.0) -> Any:
    """ONNX members (contract outputs, T = 1) -> one graph with the contract outputs of their ensemble."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from export.variants import _finish, _inline

    m = len(members)
    input_value = members[0].graph.input[0]
    nodes: list[Any] = []
    inits: list[Any] = [
        numpy_helper.from_array(np.array(PROB_FLOOR, np.float32), "ens/floor"),
        numpy_helper.from_array(np.array(1.0 / temperature, np.float32), "ens/inv_t"),
        numpy_helper.from_array(np.array(1.0 / m, np.float32), "ens/inv_m"),
    ]
    names = [{o.name for o in mm.graph.output} for mm in members]
    common = set.intersection(*names)
    if "probabilities" not in common:
        raise ValueError("every member needs a probabilities output")
    for i, mm in enumerate(members):
        inner = _inline(mm, f"e{i}/")
        nodes.append(helper.make_node("Identity", [input_value.name], [f"e{i}/{mm.graph.input[0].name}"]))
        nodes += list(inner.graph.node)
        inits += list(inner.graph.initializer)
        nodes.append(helper.make_node("Max", [f"e{i}/probabilities", "ens/floor"], [f"ens/p{i}"]))
        nodes.append(helper.make_node("Log", [f"ens/p{i}"], [f"ens/logp{i}"]))
    nodes += [
        helper.make_node("Mean", [f"ens/logp{i}" for i in range(m)], ["ens/mean_logits"]),
        helper.make_node("Mul", ["ens/mean_logits", "ens/inv_t"], ["ens/scaled"]),
        helper.make_node("Softmax", ["ens/scaled"], ["probabilities"], axis=-1),
    ]
    like = {o.name: o for o in members[0].graph.output}
    outputs = [like["probabilities"]]
    if "ood_score" in common:
        nodes.append(helper.make_node("Mean", [f"e{i}/ood_score" for i in range(m)], ["ood_score"]))
        outputs.append(like["ood_score"])
    if {"feature_maps", "cam_weights"} <= common:
        nodes.append(helper.make_node("Concat", [f"e{i}/feature_maps" for i in range(m)], ["feature_maps"], axis=3))
        nodes.append(helper.make_node("Concat", [f"e{i}/cam_weights" for i in range(m)], ["ens/cam_sum"], axis=1))
        nodes.append(helper.make_node("Mul", ["ens/cam_sum", "ens/inv_m"], ["cam_weights"]))
        for name in ("feature_maps", "cam_weights"):
            shape = [d.dim_param or d.dim_value for d in like[name].type.tensor_type.shape.dim]
            shape[3 if name == "feature_maps" else 1] = "channels"  # M x the member's channels
            outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, shape))
    graph = helper.make_graph(nodes, "lungserve_cv_ensemble", [input_value], outputs, initializer=inits)
    opset = max((o for mm in members for o in mm.opset_import if o.domain in ("", "ai.onnx")), key=lambda o: o.version)
    model = helper.make_model(graph, opset_imports=[opset])
    out: Any = _finish(model, members[0])
    out.metadata_props.add(key="ensemble", value=json.dumps({"members": m, "temperature": temperature}))
    onnx.checker.check_model(out)
    return out


def export_member(fold_dir: Path, out_path: Path, score: Score = DEFAULT_SCORE, k: int | None = None) -> dict[str, Any]:
    """A fold model (fold.keras, last EMA weights) -> its contract graph, T = 1, with the ood_score
    `score` fitted on its own train features (export.cv_ood); returns the statistics' description."""
    import keras
    import onnx

    from export.cv import FOLD_MODEL
    from export.knn_ood import DEFAULT_K, KnnBank
    from export.serving_graph import build_serving_model, output_names, to_onnx

    model = keras.models.load_model(fold_dir / FOLD_MODEL, compile=False)
    fitted = fit_member(fold_dir, score, k or DEFAULT_K)
    if isinstance(fitted, KnnBank):
        serving = build_serving_model(model, 1.0, None, knn=fitted)
    else:
        serving = build_serving_model(model, 1.0, fitted)
    proto = to_onnx(serving, int(model.input.shape[1]), output_names(True))
    tmp = out_path.with_name(out_path.stem + ".tmp.onnx")
    onnx.save(proto, tmp)
    tmp.replace(out_path)
    return fitted.to_json()


def main(argv: list[str] | None = None) -> int:
    import onnx

    p = argparse.ArgumentParser(prog="python -m export.cv_ensemble", description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--members", type=int, nargs="+", default=None, help="fold indices (default: every fold)")
    p.add_argument("--temperature", type=float, default=None, help="default: RUN/estimate.json's temperature")
    p.add_argument("--ood", choices=SCORES, default=None, help="default: RUN/estimate.json's, else mahalanobis")
    a = p.parse_args(argv)
    plan = json.loads((a.run / "cv.json").read_text())
    folds = a.members if a.members is not None else list(range(int(plan["recipe"]["folds"])))
    est = json.loads((a.run / "estimate.json").read_text()) if (a.run / "estimate.json").exists() else {}
    temperature = a.temperature or float(est["temperature"])
    score = a.ood or est.get("ood", {}).get("score", DEFAULT_SCORE)
    a.out.mkdir(parents=True, exist_ok=True)
    stats = {}
    for f in folds:
        member = a.out / f"member-{f}-{score}.onnx"
        if not member.exists():  # members are the slow part (tf2onnx); a rerun reuses them
            stats[f] = export_member(a.run / f"fold-{f}", member, score)
    members = [onnx.load(a.out / f"member-{f}-{score}.onnx") for f in folds]
    onnx.save(mean_logit_ensemble(members, temperature), a.out / "model.onnx")
    info = {"members": folds, "temperature": temperature, "ood": stats, "run": str(a.run)}
    (a.out / "ensemble.json").write_text(json.dumps(info, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
