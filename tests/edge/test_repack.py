"""Lossless GGUF repack (edge.repack): block decoding against gguf-py's dequantizer, ORT's MatMulNBits plus the
Q4_1 min correction against numpy, and whole tiny GGUF models whose int4 graphs equal the reference model."""

from __future__ import annotations

import json

import gguf
import numpy as np
import onnxruntime as ort
import pytest
import torch
from gguf import GGMLQuantizationType as QType
from onnx import TensorProto

from edge.builder import BuildOptions, _Graph, build_onnx_model
from edge.repack import REPACKABLE_TYPES, concat_repacked, decode_blocks, dequantize_repacked, repack_blocks
from edge.runner import OnnxRunner
from kernels.checkpoints import load_checkpoint
from kernels.model import TransformerModel
from kernels.runner import ReferenceRunner
from tests.edge.test_runner import _cache, _greedy, _varlen_steps
from tests.kernels import checkpoint_factory as factory
from tests.kernels.tolerances import tolerance

TYPES = sorted(REPACKABLE_TYPES)


def _stored(rng: np.random.Generator, ggml_type: str, n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(blocks uint8 [n, k / 32, block_bytes], gguf-py's dequantized float32 [n, k]) of a random matrix."""
    w = rng.standard_normal((n, k)).astype(np.float32) + rng.standard_normal((n, 1)).astype(np.float32)
    raw = gguf.quants.quantize(w, QType[ggml_type])  # uint8 [n, bytes per row]
    return raw.reshape(n, k // 32, -1), gguf.quants.dequantize(raw, QType[ggml_type])


@pytest.mark.parametrize("ggml_type", TYPES)
@pytest.mark.parametrize("shape", [(7, 32), (48, 96), (33, 160)])
def test_repack_is_exact(ggml_type: str, shape: tuple[int, int]) -> None:
    blocks, expected = _stored(np.random.default_rng(0), ggml_type, *shape)
    rw = repack_blocks(ggml_type, blocks)
    assert (rw.weight.n, rw.weight.k, rw.weight.bits, rw.weight.block_size) == (*shape, REPACKABLE_TYPES[ggml_type], 32)
    assert (rw.mins is not None) == (ggml_type == "Q4_1")
    np.testing.assert_array_equal(dequantize_repacked(rw), expected)  # same fp32 ops as ggml: bit-exact


def test_decode_blocks_layout_by_hand() -> None:
    """One Q4_1 block written byte by byte from the ggml-common.h layout."""
    q = np.arange(32) % 16
    block = np.concatenate([np.array([0.5, -2.0], np.float16).view(np.uint8),  # d, m
                            (q[:16] | (q[16:] << 4)).astype(np.uint8)])  # byte j: element j low, j + 16 high
    codes, zero_points, scales, mins = decode_blocks("Q4_1", block.reshape(1, 1, 20))
    np.testing.assert_array_equal(codes[0, 0], q)
    assert zero_points[0, 0] == 0 and scales[0, 0] == 0.5 and mins[0, 0] == -2.0
    with pytest.raises(ValueError, match="cannot repack"):
        decode_blocks("Q4_K", block.reshape(1, 1, 20))
    with pytest.raises(ValueError, match="must be uint8"):
        decode_blocks("Q4_0", block.reshape(1, 1, 20))


def _linear_session(weight, k: int, accuracy_level: int, tmp_path) -> ort.InferenceSession:
    """The builder's own linear layer (MatMulNBits + min correction) alone in a graph."""
    g = _Graph("linear", factory.tiny_config(), BuildOptions(quant="int4", accuracy_level=accuracy_level))
    y = g.linear(g.input("x", TensorProto.FLOAT, ["T", k]), weight, "w")
    g.node("Identity", [y], ["y"])
    g.output("y", TensorProto.FLOAT, ["T", "N"])
    g.save(tmp_path / "linear.onnx")
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(str(tmp_path / "linear.onnx"), so, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("parts", [("Q4_1",), ("Q4_0",), ("Q8_0",), ("Q4_1", "Q4_0", "Q4_1")])
def test_ort_linear_equals_matmul_on_dequantized_weights(parts: tuple[str, ...], tmp_path) -> None:
    """accuracy_level 0: ORT equals ``x @ dequant(W)^T`` up to summation order, fused parts included."""
    rng = np.random.default_rng(1)
    k = 96
    stored = [_stored(rng, t, 24 + 8 * i, k) for i, t in enumerate(parts)]
    rw = concat_repacked([repack_blocks(t, blocks) for t, (blocks, _) in zip(parts, stored)])
    expected_w = np.concatenate([w for _, w in stored])
    np.testing.assert_array_equal(dequantize_repacked(rw), expected_w)
    x = rng.standard_normal((5, k)).astype(np.float32)
    got = _linear_session(rw, k, 0, tmp_path).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, x @ expected_w.T, rtol=1e-5, atol=1e-4)
    # accuracy_level 4 quantizes x to int8 per block for the MatMulNBits part only; a stated, looser bound.
    got4 = _linear_session(rw, k, 4, tmp_path).run(None, {"x": x})[0]
    assert np.abs(got4 - x @ expected_w.T).max() <= 0.02 * np.abs(x @ expected_w.T).max()


def test_concat_rejects_mixed_bits() -> None:
    rng = np.random.default_rng(2)
    parts = [repack_blocks(t, _stored(rng, t, 8, 64)[0]) for t in ("Q4_1", "Q8_0")]
    with pytest.raises(ValueError, match="cannot fuse"):
        concat_repacked(parts)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("ggml_type", TYPES)
def test_raw_blocks_are_hf_rows(arch: str, ggml_type: str, tmp_path) -> None:
    """raw_blocks undoes llama's Q/K row permutation like get_tensor does: decoded, they are equal."""
    config = factory.tiny_config(arch)
    ckpt = load_checkpoint(factory.write_gguf_checkpoint(tmp_path / "m.gguf", config,
                                                         factory.random_state_dict(config, seed=4),
                                                         tensor_type=ggml_type))
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight",
                 "model.layers.0.mlp.down_proj.weight"):
        stored_type, blocks = ckpt.raw_blocks(name)
        assert stored_type == ggml_type and blocks.shape[:2] == (ckpt.tensor_shape(name)[0],
                                                                 ckpt.tensor_shape(name)[1] // 32)
        np.testing.assert_array_equal(dequantize_repacked(repack_blocks(stored_type, blocks)),
                                      ckpt.get_tensor(name).numpy(), err_msg=name)
    with pytest.raises(ValueError, match="not as a block-quantized matrix"):
        ckpt.raw_blocks("model.norm.weight")


@pytest.fixture(scope="module", params=[(a, t) for a in ("llama", "qwen2") for t in TYPES],
                ids=[f"{a}-{t}" for a in ("llama", "qwen2") for t in TYPES])
def tiny_gguf(request, tmp_path_factory):
    arch, ggml_type = request.param
    config = factory.tiny_config(arch, tie_word_embeddings=arch == "llama")
    path = factory.write_gguf_checkpoint(tmp_path_factory.mktemp(arch) / "m.gguf", config,
                                         factory.random_state_dict(config, seed=7), tensor_type=ggml_type)
    ckpt = load_checkpoint(path)
    reference = ReferenceRunner(TransformerModel.from_checkpoint(ckpt, attention_impl="torch"))
    return ckpt, reference, ggml_type, tmp_path_factory.mktemp("onnx")


@pytest.mark.parametrize("layout", ["split", "fused"])
def test_repacked_int4_equals_reference(tiny_gguf, layout) -> None:
    """The reference model runs on the GGUF's dequantized weights; with float compute (accuracy_level 0) the
    repacked graphs compute the same function, so logits agree to fp32 tolerance and greedy tokens are equal."""
    ckpt, reference, ggml_type, root = tiny_gguf
    impl = "torch" if layout == "split" else "auto"
    runner = OnnxRunner(ckpt, "int4", accuracy_level=0, cache_root=root, attention_impl=impl, layout=layout)
    manifest = json.loads((runner.model.directory / "manifest.json").read_text())
    num_linears = 4 * ckpt.config.num_layers + 1
    assert manifest["linear_sources"] == {f"repacked {ggml_type}": num_linears}
    ref_cache, cache = _cache(ckpt.config), _cache(ckpt.config)
    for step, batch in enumerate(_varlen_steps(ckpt.config.vocab_size)):
        torch.testing.assert_close(runner.execute(batch, cache), reference.execute(batch, ref_cache),
                                   **tolerance(torch.float32), msg=f"{ggml_type} logits, step {step}")
    prompt = [5, 17, 99, 3, 250, 42]
    assert _greedy(runner, prompt, 16) == _greedy(reference, prompt, 16)


def test_requantize_source_and_fallbacks(tiny_gguf, tmp_path) -> None:
    ckpt, _, ggml_type, _ = tiny_gguf
    num_linears = 4 * ckpt.config.num_layers + 1
    cases = [(BuildOptions(quant="int4", source="requantize"), {"requantized": num_linears}),
             (BuildOptions(quant="int4", block_size=64), {"requantized": num_linears}),  # blocks do not line up
             (BuildOptions(quant="fp32"), {"float": num_linears})]
    dirs = set()
    for options, sources in cases:
        model = build_onnx_model(ckpt, options, cache_root=tmp_path)
        assert json.loads((model.directory / "manifest.json").read_text())["linear_sources"] == sources, options
        dirs.add(model.directory)
    assert len(dirs) == len(cases)
