"""Edge graph builder: MatMulNBits packing against a numpy reference, ORT's MatMulNBits against numpy
matmul, the on-disk build cache, and option validation."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edge.builder import GRAPH_VERSION, BuildOptions, build_onnx_model, graph_names
from edge.quantize import QuantizedWeight, dequantize_blockwise, quantize_blockwise, unpack_codes
from kernels.checkpoints import load_checkpoint
from tests.kernels import checkpoint_factory as factory

SHAPES = [(48, 64), (33, 96), (40, 80), (7, 32)]  # (N, K): K = 80 leaves a ragged last block


def _codes_ref(qw: QuantizedWeight) -> tuple[np.ndarray, np.ndarray]:
    """Unpack B and zero_points element by element, straight from the MatMulNBits spec."""
    per_byte = 8 // qw.bits
    mask = (1 << qw.bits) - 1
    codes = np.zeros((qw.n, qw.num_blocks, qw.block_size), dtype=np.int64)
    zps = np.zeros((qw.n, qw.num_blocks), dtype=np.int64)
    zp_bytes_per_row = -(-qw.num_blocks * qw.bits // 8)
    for n in range(qw.n):
        for b in range(qw.num_blocks):
            for j in range(qw.block_size):
                byte = qw.packed[n, b, j // per_byte]
                codes[n, b, j] = (int(byte) >> (qw.bits * (j % per_byte))) & mask
            zbyte = qw.zero_points[n * zp_bytes_per_row + b // per_byte]
            zps[n, b] = (int(zbyte) >> (qw.bits * (b % per_byte))) & mask
    return codes, zps


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("shape", SHAPES)
def test_packing_matches_spec_and_error_is_half_a_step(bits: int, shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(0)
    w = rng.standard_normal(shape).astype(np.float32)
    w[0, :5] = 0.0  # an exact zero must stay exact (the zero point is an integer code)
    qw = quantize_blockwise(w, bits=bits, block_size=32)
    n, k = shape
    num_blocks = -(-k // 32)
    assert qw.packed.shape == (n, num_blocks, 32 * bits // 8) and qw.packed.dtype == np.uint8
    assert qw.scales.shape == (n * num_blocks,) and qw.scales.dtype == np.float32
    assert qw.zero_points.shape == (n * -(-num_blocks * bits // 8),) and qw.zero_points.dtype == np.uint8

    codes_ref, zps_ref = _codes_ref(qw)
    codes, zps = unpack_codes(qw)
    np.testing.assert_array_equal(codes, codes_ref)
    np.testing.assert_array_equal(zps, zps_ref)
    scales = qw.scales.reshape(n, num_blocks)
    deq_ref = ((codes_ref - zps_ref[..., None]) * scales[..., None]).reshape(n, -1)[:, :k]
    deq = dequantize_blockwise(qw)
    np.testing.assert_allclose(deq, deq_ref, rtol=0, atol=1e-6)
    # Round to nearest: every weight is within half a step of its block's grid.
    half_step = np.repeat(scales, 32, axis=1)[:, :k] / 2
    assert np.all(np.abs(deq - w) <= half_step * (1 + 1e-5) + 1e-7)
    assert np.all(deq[0, :5] == 0.0)


def _matmul_nbits_session(qw: QuantizedWeight, accuracy_level: int) -> ort.InferenceSession:
    inits = [numpy_helper.from_array(qw.packed, "B"), numpy_helper.from_array(qw.scales, "scales"),
             numpy_helper.from_array(qw.zero_points, "zero_points")]
    node = helper.make_node("MatMulNBits", ["A", "B", "scales", "zero_points"], ["Y"], domain="com.microsoft",
                            K=qw.k, N=qw.n, bits=qw.bits, block_size=qw.block_size, accuracy_level=accuracy_level)
    graph = helper.make_graph([node], "mm", [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", qw.k])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", qw.n])], inits)
    model = helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 21),
                                                                   helper.make_opsetid("com.microsoft", 1)])
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("shape", SHAPES)
def test_ort_matmul_nbits_matches_numpy(bits: int, shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(1)
    w = rng.standard_normal(shape).astype(np.float32)
    qw = quantize_blockwise(w, bits=bits, block_size=32)
    a = rng.standard_normal((5, shape[1])).astype(np.float32)
    expected = a @ dequantize_blockwise(qw).T
    # accuracy_level 0: float compute, equal to numpy up to summation order.
    got = _matmul_nbits_session(qw, 0).run(None, {"A": a})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)
    # accuracy_level 4: activations quantized to int8 per block; a stated, looser bound (measured ~0.5%).
    got4 = _matmul_nbits_session(qw, 4).run(None, {"A": a})[0]
    assert np.abs(got4 - expected).max() <= 0.02 * np.abs(expected).max()


@pytest.fixture()
def tiny_llama(tmp_path):
    config = factory.tiny_config("llama", tie_word_embeddings=True)
    return load_checkpoint(factory.write_hf_checkpoint(tmp_path / "llama", config,
                                                       factory.random_state_dict(config, seed=3)))


def test_build_writes_all_graphs_and_reuses_cache(tiny_llama, tmp_path) -> None:
    root = tmp_path / "onnx"
    options = BuildOptions(quant="int4")
    first = build_onnx_model(tiny_llama, options, cache_root=root)
    assert not first.reused
    assert first.directory.name == f"{tiny_llama.fingerprint[:16]}-int4-bs32-acc4-auto-g{GRAPH_VERSION}"
    assert [p.name for p in first.paths] == list(graph_names(tiny_llama.config.num_layers))
    manifest = json.loads((first.directory / "manifest.json").read_text())
    assert manifest["fingerprint"] == tiny_llama.fingerprint and manifest["options"]["quant"] == "int4"
    for path in first.paths:
        onnx.checker.check_model(str(path))
        assert path.with_name(path.name + ".data").is_file()  # weights as external data
    stamps = {p: p.stat().st_mtime_ns for p in first.directory.iterdir()}

    second = build_onnx_model(tiny_llama, options, cache_root=root)
    assert second.reused and second.directory == first.directory
    assert {p: p.stat().st_mtime_ns for p in second.directory.iterdir()} == stamps
    assert json.loads((second.directory / "manifest.json").read_text())["built_at"] == manifest["built_at"]
    assert not [p for p in root.iterdir() if p.name.startswith(".tmp")]

    other = build_onnx_model(tiny_llama, BuildOptions(quant="int8"), cache_root=root)
    assert not other.reused and other.directory != first.directory
    rebuilt = build_onnx_model(tiny_llama, options, cache_root=root, force=True)
    assert not rebuilt.reused
    assert json.loads((rebuilt.directory / "manifest.json").read_text())["built_at"] > manifest["built_at"]


def test_incomplete_cache_entry_is_rebuilt(tiny_llama, tmp_path) -> None:
    root = tmp_path / "onnx"
    built = build_onnx_model(tiny_llama, BuildOptions(quant="fp32"), cache_root=root)
    (built.directory / "final.onnx").unlink()
    again = build_onnx_model(tiny_llama, BuildOptions(quant="fp32"), cache_root=root)
    assert not again.reused and (again.directory / "final.onnx").is_file()


@pytest.mark.parametrize("kwargs, match", [
    ({"quant": "int3"}, "quant must be one of"),
    ({"quant": "int4", "block_size": 24}, "block_size must be a power of two"),
    ({"quant": "int8", "block_size": 8}, "block_size must be a power of two"),
    ({"quant": "int4", "accuracy_level": 7}, "accuracy_level"),
    ({"quant": "int4", "source": "exact"}, "source must be one of"),
    ({"kv_dtype": "float16"}, "float16 with layout='fused' only"),
    ({"layout": "fused", "kv_dtype": "int8"}, "kv_dtype must be one of"),
])
def test_bad_build_options(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        BuildOptions(**kwargs)


def test_half_cache_build_key() -> None:
    fused = BuildOptions(layout="fused")
    assert BuildOptions(layout="fused", kv_dtype="float16").key("0" * 20) == fused.key("0" * 20) + "-kv16"


def test_bad_quantize_arguments() -> None:
    with pytest.raises(ValueError, match="bits must be one of"):
        quantize_blockwise(np.zeros((4, 32), np.float32), bits=3)
    with pytest.raises(ValueError, match="2-d"):
        quantize_blockwise(np.zeros(32, np.float32))


def test_build_rejects_non_options(tiny_llama, tmp_path) -> None:
    with pytest.raises(ValueError, match="BuildOptions"):
        build_onnx_model(tiny_llama, {"quant": "int4"}, cache_root=tmp_path)
