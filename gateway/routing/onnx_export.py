"""ONNX export of the scoring function for the edge client: ``score = Sigmoid(features · W + b)``.

The graph is built directly with ``onnx.helper`` (four nodes), so no converter is involved and the
weights are bit-identical to the saved float32 ones. Its input is the raw feature vector of
:meth:`FeatureExtractor.transform_one` (layout in ``features.py``); the feature spec and the threshold
travel in the model's metadata so a client can featurise and decide identically. An accurate-mode router
exports with its sentence encoder merged in front of the head (see :func:`export_onnx`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import numpy as np

from gateway.routing.errors import MissingDependencyError, RouterError
from gateway.routing.features import NUM_STATS, split_conversation
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
    """Write ``router``'s scorer as ONNX: input ``features`` [batch, num_features], output ``score`` [batch].

    An accurate-mode router (``spec.embedding``) exports as one model with the sentence encoder inside: inputs
    ``features`` [batch, hash_dim + NUM_STATS] (the text part of the feature vector), ``input_ids`` and
    ``attention_mask`` (int64 [batch, tokens], the encoder's WordPiece tokens), output ``score``.
    """
    onnx, TensorProto, helper, numpy_helper = _onnx()
    np_dtype = np.float32 if dtype == "float32" else np.float64
    elem = TensorProto.FLOAT if dtype == "float32" else TensorProto.DOUBLE
    spec = router.spec
    num_text = spec.hash_dim + NUM_STATS
    weights = router.model.weights.astype(np_dtype)
    inits = [
        numpy_helper.from_array(weights[:num_text].reshape(num_text, 1), "W"),
        numpy_helper.from_array(np.array([router.model.bias], dtype=np_dtype), "b"),
        numpy_helper.from_array(np.array([-1], dtype=np.int64), "flat"),
    ]
    nodes = [helper.make_node("MatMul", [INPUT_NAME, "W"], ["margin_col"])]  # [batch, 1]
    margin = "margin_col"
    if spec.embedding:
        dim = spec.embedding_dim
        inits.append(numpy_helper.from_array(weights[num_text:].reshape(dim, 1), "W_embedding"))
        nodes += [
            helper.make_node("Cast", ["embedding"], ["embedding_cast"], to=elem),
            helper.make_node("MatMul", ["embedding_cast", "W_embedding"], ["embedding_margin"]),
            helper.make_node("Add", ["margin_col", "embedding_margin"], ["margin_sum"]),
        ]
        margin = "margin_sum"
    nodes += [
        helper.make_node("Add", [margin, "b"], ["logit_col"]),
        helper.make_node("Sigmoid", ["logit_col"], ["score_col"]),
        helper.make_node("Reshape", ["score_col", "flat"], [OUTPUT_NAME]),  # [batch]
    ]
    inputs = [helper.make_tensor_value_info(INPUT_NAME, elem, ["batch", num_text])]
    if spec.embedding:
        inputs.append(helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", spec.embedding_dim]))
    graph = helper.make_graph(
        nodes,
        "hybrid_gateway_router",
        inputs,
        [helper.make_tensor_value_info(OUTPUT_NAME, elem, ["batch"])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="hybrid-gateway")
    model.ir_version = 8  # readable by onnxruntime >= 1.10
    if spec.embedding:
        encoder_path = getattr(router.extractor.encoder, "onnx_path", None)
        if encoder_path is None:
            raise RouterError("this router's sentence encoder has no ONNX graph to export")
        encoder = onnx.load(str(encoder_path))
        model = onnx.compose.merge_models(encoder, model, io_map=[("embedding", "embedding")])
        # merge_models puts the encoder's inputs first; keep the documented order: features, ids, mask.
        order = {INPUT_NAME: 0, "input_ids": 1, "attention_mask": 2}
        ordered = sorted(model.graph.input, key=lambda v: order[v.name])
        del model.graph.input[:]
        model.graph.input.extend(ordered)
    for key, value in {
        "feature_spec": json.dumps(spec.to_dict()),
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


def onnx_inputs(router: Router, prompts: list) -> dict[str, np.ndarray]:
    """The exported model's inputs for ``prompts``, as the Python router computes them."""
    spec = router.spec
    features = np.stack([router.extractor.transform_one(p) for p in prompts])[:, : spec.hash_dim + NUM_STATS]
    inputs = {INPUT_NAME: features}
    if spec.embedding:
        texts = [split_conversation(p)[0][: spec.max_chars] for p in prompts]
        inputs["input_ids"], inputs["attention_mask"] = router.extractor.encoder.token_ids(texts)
    return inputs


def onnx_scores(path: str | Path, features: np.ndarray | dict[str, np.ndarray]) -> np.ndarray:
    """Run an exported model with ONNX Runtime on dense features [batch, num_features] (or on the
    :func:`onnx_inputs` of an accurate-mode router)."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise MissingDependencyError("onnxruntime", "running the exported ONNX router") from exc
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = dict(features) if isinstance(features, dict) else {INPUT_NAME: features}
    elem_type = next(i.type for i in session.get_inputs() if i.name == INPUT_NAME)
    feed[INPUT_NAME] = np.asarray(feed[INPUT_NAME], dtype=np.float64 if "double" in elem_type else np.float32)
    return session.run([OUTPUT_NAME], feed)[0].astype(np.float64)
