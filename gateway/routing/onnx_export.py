"""ONNX export of the scoring function for the edge client: ``score = Sigmoid(features · W + b)``.

The graph is built directly with ``onnx.helper`` (four nodes), so no converter is involved and the
weights are bit-identical to the saved float32 ones. Its input is the raw feature vector of
:meth:`FeatureExtractor.transform_one` (layout in ``features.py``); the feature spec and the threshold
travel in the model's metadata so a client can featurise and decide identically.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import numpy as np

from gateway.routing.errors import MissingDependencyError
from gateway.routing.router import Router

INPUT_NAME = "features"
OUTPUT_NAME = "score"


def _onnx():
    try:
        import onnx
        from onnx import TensorProto, helper, numpy_helper
    except ImportError as exc:
        raise MissingDependencyError("onnx", "ONNX export") from exc
    return onnx, TensorProto, helper, numpy_helper


def export_onnx(router: Router, path: str | Path, *, dtype: Literal["float32", "float64"] = "float32") -> Path:
    """Write ``router``'s scorer as ONNX: input ``features`` [batch, num_features], output ``score`` [batch]."""
    onnx, TensorProto, helper, numpy_helper = _onnx()
    np_dtype = np.float32 if dtype == "float32" else np.float64
    elem = TensorProto.FLOAT if dtype == "float32" else TensorProto.DOUBLE
    num_features = router.spec.num_features
    weights = numpy_helper.from_array(router.model.weights.astype(np_dtype).reshape(num_features, 1), "W")
    bias = numpy_helper.from_array(np.array([router.model.bias], dtype=np_dtype), "b")
    shape = numpy_helper.from_array(np.array([-1], dtype=np.int64), "flat")
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", [INPUT_NAME, "W"], ["margin_col"]),  # [batch, 1]
            helper.make_node("Add", ["margin_col", "b"], ["logit_col"]),
            helper.make_node("Sigmoid", ["logit_col"], ["score_col"]),
            helper.make_node("Reshape", ["score_col", "flat"], [OUTPUT_NAME]),  # [batch]
        ],
        "hybrid_gateway_router",
        [helper.make_tensor_value_info(INPUT_NAME, elem, ["batch", num_features])],
        [helper.make_tensor_value_info(OUTPUT_NAME, elem, ["batch"])],
        initializer=[weights, bias, shape],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="hybrid-gateway")
    model.ir_version = 8  # readable by onnxruntime >= 1.10
    for key, value in {
        "feature_spec": json.dumps(router.spec.to_dict()),
        "threshold": repr(router.threshold),
        "threshold_semantics": json.dumps(router.manifest.get("threshold_semantics", {})),
        "score_semantics": str(router.manifest.get("score_semantics", "")),
    }.items():
        model.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def onnx_scores(path: str | Path, features: np.ndarray) -> np.ndarray:
    """Run an exported model with ONNX Runtime on dense features [batch, num_features]."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise MissingDependencyError("onnxruntime", "running the exported ONNX router") from exc
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    elem_type = session.get_inputs()[0].type
    dtype = np.float64 if "double" in elem_type else np.float32
    return session.run([OUTPUT_NAME], {INPUT_NAME: np.asarray(features, dtype=dtype)})[0].astype(np.float64)
