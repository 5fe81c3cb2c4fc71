"""The exported ONNX scorer gives the Python router's scores."""

from __future__ import annotations

import numpy as np
import pytest

from gateway.routing.onnx_export import export_onnx, onnx_scores

from .conftest import synthetic_prompts


@pytest.mark.parametrize(("dtype", "atol"), [("float64", 1e-12), ("float32", 2e-6)])
def test_onnx_matches_python(trained_router, tmp_path, dtype, atol):
    prompts, _ = synthetic_prompts(64, seed=5)
    prompts.append(
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": "derive the gradient ```x```"}]
    )
    path = export_onnx(trained_router, tmp_path / "router.onnx", dtype=dtype)
    features = np.stack([trained_router.extractor.transform_one(p) for p in prompts])
    got = onnx_scores(path, features)
    want = np.array([trained_router.score(p) for p in prompts])
    np.testing.assert_allclose(got, want, rtol=0, atol=atol, err_msg=f"ONNX ({dtype}) differs from Python")
