"""Checkpoint loading: tiny random Llama / Qwen2 checkpoints in every format and tensor type, round-tripped.

Expected values never come from the loader under test: F32/F16/BF16 from the original weights,
legacy quants from ``gguf.quants.dequantize`` of the bytes the factory wrote, K-quants from the
straightforward decoders below (written from ggml's ``dequantize_row_q4_K`` / ``_q6_K``), and the
real SmolLM2 file from transformers' GGUF loader.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

import kernels.checkpoints as checkpoints
from kernels.checkpoints import (
    GGUFCheckpoint,
    ModelConfig,
    RopeScaling,
    SafetensorsCheckpoint,
    hf_tensor_shapes,
    load_checkpoint,
)
from kernels.errors import CheckpointError, UnsupportedArchitectureError
from tests.kernels import checkpoint_factory as factory

ARCHS = ("llama", "qwen2")
LEGACY_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1")
GGUF_FILE_TYPE_NAMES = {
    "F32": "F32",
    "F16": "F16",
    "BF16": "BF16",
    "Q8_0": "Q8_0",
    "Q4_0": "Q4_0",
    "Q4_1": "Q4_1",
    "Q4_K": "Q4_K_M",
    "Q6_K": "Q6_K",
}
# Loose bound on |loaded - original| as a fraction of the tensor's max |original|, from each format's
# step size: F16 2^-11 and BF16 2^-8 relative; Q8_0 amax/254; Q4_0 up to amax/8 (the extreme of the
# other sign clips at +7); Q4_1 (max-min)/30; K-quants add their 6-bit scale rounding.
LOOSE_TOLERANCE = {
    "F32": 0.0,
    "F16": 1e-3,
    "BF16": 4e-3,
    "Q8_0": 1 / 200,
    "Q4_0": 0.13,
    "Q4_1": 0.07,
    "Q4_K": 0.1,
    "Q6_K": 0.03,
}


def gguf_layout(config: ModelConfig, name: str, values: torch.Tensor) -> np.ndarray:
    """An HF-layout tensor as llama.cpp stores it (Q/K rows permuted for llama)."""
    array = values.numpy()
    if config.arch == "llama" and ".self_attn.q_proj." in name:
        return factory.permute_for_gguf(array, config.num_heads, config.num_heads)
    if config.arch == "llama" and ".self_attn.k_proj." in name:
        return factory.permute_for_gguf(array, config.num_heads, config.num_kv_heads)
    return array


def assert_loose(loaded: torch.Tensor, original: torch.Tensor, tensor_type: str, name: str) -> None:
    error = (loaded - original).abs().max().item()
    bound = LOOSE_TOLERANCE[tensor_type] * original.abs().max().item()
    assert error <= bound, f"{name} ({tensor_type}): max error {error:.3g} > {bound:.3g}"


# --- independent K-quant decoders (ggml-quants.c, vectorized over blocks only) --------------


def fp16_column(blocks: np.ndarray, start: int) -> np.ndarray:
    return blocks[:, start : start + 2].copy().view(np.float16).astype(np.float32)[:, 0]


def decode_q4_k(raw: np.ndarray) -> np.ndarray:
    """``dequantize_row_q4_K``: block = d, dmin (fp16), scales[12], qs[128]; 256 values."""
    blocks = raw.reshape(-1, 144)
    d, dmin, scales, qs = fp16_column(blocks, 0), fp16_column(blocks, 2), blocks[:, 4:16], blocks[:, 16:]

    def get_scale_min_k4(j: int) -> tuple[np.ndarray, np.ndarray]:
        if j < 4:
            return scales[:, j] & 63, scales[:, j + 4] & 63
        return (
            (scales[:, j + 4] & 0xF) | ((scales[:, j - 4] >> 6) << 4),
            (scales[:, j + 4] >> 4) | ((scales[:, j] >> 6) << 4),
        )

    y = np.empty((len(blocks), 256), np.float32)
    for step, j in enumerate(range(0, 256, 64)):
        q = qs[:, 32 * step : 32 * step + 32]
        sc, m = get_scale_min_k4(2 * step)
        d1, m1 = d * sc.astype(np.float32), dmin * m.astype(np.float32)
        sc, m = get_scale_min_k4(2 * step + 1)
        d2, m2 = d * sc.astype(np.float32), dmin * m.astype(np.float32)
        y[:, j : j + 32] = d1[:, None] * (q & 0xF).astype(np.float32) - m1[:, None]
        y[:, j + 32 : j + 64] = d2[:, None] * (q >> 4).astype(np.float32) - m2[:, None]
    return y.reshape(raw.shape[0], -1)


def decode_q6_k(raw: np.ndarray) -> np.ndarray:
    """``dequantize_row_q6_K``: block = ql[128], qh[64], scales[16] (int8), d (fp16); 256 values."""
    blocks = raw.reshape(-1, 210)
    d = fp16_column(blocks, 208)
    y = np.empty((len(blocks), 256), np.float32)
    for n in range(2):
        ql, qh = blocks[:, 64 * n : 64 * n + 64], blocks[:, 128 + 32 * n : 128 + 32 * n + 32]
        sc = blocks[:, 192 + 8 * n : 192 + 8 * n + 8].view(np.int8).astype(np.float32)
        for l in range(32):  # noqa: E741 (the spec's name)
            i = l // 16
            q1 = ((ql[:, l] & 0xF) | (((qh[:, l] >> 0) & 3) << 4)).astype(np.int16) - 32
            q2 = ((ql[:, l + 32] & 0xF) | (((qh[:, l] >> 2) & 3) << 4)).astype(np.int16) - 32
            q3 = ((ql[:, l] >> 4) | (((qh[:, l] >> 4) & 3) << 4)).astype(np.int16) - 32
            q4 = ((ql[:, l + 32] >> 4) | (((qh[:, l] >> 6) & 3) << 4)).astype(np.int16) - 32
            y[:, 128 * n + l] = d * sc[:, i] * q1.astype(np.float32)
            y[:, 128 * n + l + 32] = d * sc[:, i + 2] * q2.astype(np.float32)
            y[:, 128 * n + l + 64] = d * sc[:, i + 4] * q3.astype(np.float32)
            y[:, 128 * n + l + 96] = d * sc[:, i + 6] * q4.astype(np.float32)
    return y.reshape(raw.shape[0], -1)


# --- names, exports ---------------------------------------------------------------------


def test_all_is_sorted_and_complete():
    assert checkpoints.__all__ == sorted(checkpoints.__all__)
    for name in checkpoints.__all__:
        assert hasattr(checkpoints, name), name
    # Submodules (checkpoint, gguf, store...) become attributes once imported; they are not API.
    public = {n for n, v in vars(checkpoints).items() if not n.startswith("_") and not inspect.ismodule(v)}
    assert public == set(checkpoints.__all__)


def test_tensor_names_follow_hf_naming():
    config = factory.tiny_config("qwen2")
    layer0 = [n for n in hf_tensor_shapes(config) if n.startswith("model.layers.0.")]
    assert layer0 == [
        "model.layers.0.input_layernorm.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.self_attn.q_proj.bias",
        "model.layers.0.self_attn.k_proj.weight",
        "model.layers.0.self_attn.k_proj.bias",
        "model.layers.0.self_attn.v_proj.weight",
        "model.layers.0.self_attn.v_proj.bias",
        "model.layers.0.self_attn.o_proj.weight",
        "model.layers.0.post_attention_layernorm.weight",
        "model.layers.0.mlp.gate_proj.weight",
        "model.layers.0.mlp.up_proj.weight",
        "model.layers.0.mlp.down_proj.weight",
    ]
    for arch in ARCHS:
        for tie in (False, True):
            config = factory.tiny_config(arch, tie_word_embeddings=tie)
            assert hf_tensor_shapes(config) == factory.hf_shapes(config)
            assert ("lm_head.weight" in hf_tensor_shapes(config)) is not tie


# --- round trips ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_shards", [1, 2])
@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("arch", ARCHS)
def test_hf_round_trip(tmp_path, arch, tie, num_shards, dtype):
    config = factory.tiny_config(arch, tie_word_embeddings=tie)
    state = factory.random_state_dict(config, seed=1)
    directory = factory.write_hf_checkpoint(tmp_path / "hf", config, state, num_shards=num_shards, dtype=dtype)
    assert (directory / "model.safetensors.index.json").exists() is (num_shards > 1)

    ckpt = load_checkpoint(directory)
    assert isinstance(ckpt, SafetensorsCheckpoint) and ckpt.format == "hf" and ckpt.path == directory
    dtype_name = str(dtype).removeprefix("torch.")
    assert ckpt.config == dataclasses.replace(config, torch_dtype=dtype_name)
    assert ckpt.metadata == json.loads((directory / "config.json").read_text())
    assert ckpt.tensor_names() == list(factory.hf_shapes(config))
    assert set(ckpt.quant_types().values()) == {{"float32": "F32", "bfloat16": "BF16", "float16": "F16"}[dtype_name]}
    for name in ckpt.tensor_names():
        expected = state[name].to(dtype)
        torch.testing.assert_close(ckpt.get_tensor(name, dtype), expected, rtol=0, atol=0, msg=name)
        torch.testing.assert_close(ckpt.get_tensor(name), expected.float(), rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("tensor_type", LEGACY_TYPES)
@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("arch", ARCHS)
def test_gguf_round_trip(tmp_path, arch, tie, tensor_type):
    config = factory.tiny_config(arch, tie_word_embeddings=tie)
    state = factory.random_state_dict(config, seed=2)
    path = factory.write_gguf_checkpoint(tmp_path / "tiny.gguf", config, state, tensor_type=tensor_type)
    stored = factory.gguf_tensors(config, state, tensor_type)  # exactly the bytes in the file

    ckpt = load_checkpoint(path)
    assert isinstance(ckpt, GGUFCheckpoint) and ckpt.format == "gguf" and ckpt.path == path
    assert ckpt.config == dataclasses.replace(config, torch_dtype=GGUF_FILE_TYPE_NAMES[tensor_type])
    assert ckpt.tensor_names() == list(factory.hf_shapes(config))
    types = ckpt.quant_types()
    for name in ckpt.tensor_names():
        loaded = ckpt.get_tensor(name)
        assert loaded.dtype == torch.float32 and loaded.shape == state[name].shape, name
        assert types[name] == (tensor_type if loaded.ndim == 2 else "F32"), name
        data, qtype = stored[checkpoints.gguf_tensor_name(name)]
        expected = gguf.quants.dequantize(data, qtype)
        np.testing.assert_array_equal(gguf_layout(config, name, loaded), expected, err_msg=name)
        if tensor_type == "F32" or loaded.ndim == 1:
            torch.testing.assert_close(loaded, state[name], rtol=0, atol=0, msg=name)
        else:
            assert_loose(loaded, state[name], tensor_type, name)


@pytest.mark.parametrize("tensor_type", factory.K_QUANT_TYPES)
@pytest.mark.parametrize("arch", ARCHS)
def test_gguf_k_quants_match_independent_decoder(tmp_path, arch, tensor_type):
    config = factory.tiny_config(arch, k_quant=True)
    state = factory.random_state_dict(config, seed=3)
    path = factory.write_gguf_checkpoint(tmp_path / "k.gguf", config, state, tensor_type=tensor_type)
    stored = factory.gguf_tensors(config, state, tensor_type)
    decode = decode_q4_k if tensor_type == "Q4_K" else decode_q6_k

    ckpt = load_checkpoint(path)
    assert ckpt.config.torch_dtype == GGUF_FILE_TYPE_NAMES[tensor_type]
    for name in ckpt.tensor_names():
        loaded = ckpt.get_tensor(name)
        if loaded.ndim == 1:
            torch.testing.assert_close(loaded, state[name], rtol=0, atol=0, msg=name)
            continue
        data, qtype = stored[checkpoints.gguf_tensor_name(name)]
        assert qtype.name == tensor_type == ckpt.quant_types()[name]
        expected = decode(data)
        np.testing.assert_array_equal(gguf.quants.dequantize(data, qtype), expected, err_msg=f"gguf-py vs spec: {name}")
        np.testing.assert_array_equal(gguf_layout(config, name, loaded), expected, err_msg=name)
        assert_loose(loaded, state[name], tensor_type, name)


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("arch", ARCHS)
def test_gguf_qk_permutation_round_trip(tmp_path, arch, tie):
    gguf_utils = pytest.importorskip("transformers.modeling_gguf_pytorch_utils", reason="dev extra")

    config = factory.tiny_config(arch, tie_word_embeddings=tie)
    state = factory.random_state_dict(config, seed=4)
    path = factory.write_gguf_checkpoint(tmp_path / "perm.gguf", config, state, tensor_type="F32")
    reader = gguf.GGUFReader(path)
    raw = {t.name: np.array(t.data) for t in reader.tensors}
    processor = gguf_utils.TENSOR_PROCESSORS.get(arch, gguf_utils.TensorProcessor)(
        config={"num_attention_heads": config.num_heads, "num_key_value_heads": config.num_kv_heads}
    )
    ckpt = load_checkpoint(path)
    for layer in range(config.num_layers):
        for proj, gguf_proj in (("q_proj", "attn_q"), ("k_proj", "attn_k")):
            name, gguf_name = f"model.layers.{layer}.self_attn.{proj}.weight", f"blk.{layer}.{gguf_proj}.weight"
            original = state[name].numpy()
            # llama is stored permuted, qwen2 as-is; either way we load the exact HF layout...
            assert np.array_equal(raw[gguf_name], original) is (arch == "qwen2")
            np.testing.assert_array_equal(ckpt.get_tensor(name).numpy(), original, err_msg=name)
            # ...which is also what transformers' GGUF loader makes of the stored tensor.
            via_transformers = processor.process(weights=raw[gguf_name], name=gguf_name).weights
            np.testing.assert_array_equal(via_transformers, original, err_msg=name)


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("arch", ARCHS)
def test_factory_checkpoints_load_in_transformers(tmp_path, arch, tie):
    """transformers reads the factory's HF dir and GGUF file into exactly our tensors."""
    transformers = pytest.importorskip("transformers", reason="dev extra")

    config = factory.tiny_config(arch, tie_word_embeddings=tie)
    state = factory.random_state_dict(config, seed=5)
    hf_dir = factory.write_hf_checkpoint(tmp_path / "hf", config, state)
    gguf_path = factory.write_gguf_checkpoint(tmp_path / "g" / "tiny.gguf", config, state)
    for ckpt, model in (
        (load_checkpoint(hf_dir), transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)),
        (
            load_checkpoint(gguf_path),
            transformers.AutoModelForCausalLM.from_pretrained(
                gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
            ),
        ),
    ):
        theirs = model.state_dict()
        assert model.config.tie_word_embeddings is tie
        for name in ckpt.tensor_names():
            torch.testing.assert_close(
                ckpt.get_tensor(name), theirs[name], rtol=0, atol=0, msg=f"{ckpt.format}: {name}"
            )


# --- slices and dtypes --------------------------------------------------------------------


SLICES = [
    ("model.layers.0.self_attn.q_proj.weight", 0, 16, 48),  # whole heads: read from the stored rows
    ("model.layers.0.self_attn.q_proj.weight", 0, 5, 21),  # cuts heads: read whole, then narrow
    ("model.layers.1.self_attn.k_proj.weight", 0, 16, 32),
    ("model.layers.1.self_attn.k_proj.bias", 0, 0, 16),
    ("model.layers.0.self_attn.o_proj.weight", 1, 32, 64),  # whole quant blocks
    ("model.layers.0.self_attn.o_proj.weight", 1, 3, 40),  # cuts blocks
    ("model.layers.0.mlp.down_proj.weight", 1, 64, 128),
    ("model.embed_tokens.weight", 0, 100, 260),
    ("model.norm.weight", 0, 8, 24),
]


@pytest.mark.parametrize("kind", ["hf-bf16", "F32", "BF16", "Q4_1", "Q8_0"])
@pytest.mark.parametrize("arch", ARCHS)
def test_get_tensor_slice_equals_narrowed_tensor(tmp_path, arch, kind):
    config = factory.tiny_config(arch)
    state = factory.random_state_dict(config, seed=6)
    if kind == "hf-bf16":
        ckpt = load_checkpoint(factory.write_hf_checkpoint(tmp_path / "hf", config, state, dtype=torch.bfloat16))
    else:
        ckpt = load_checkpoint(factory.write_gguf_checkpoint(tmp_path / "s.gguf", config, state, tensor_type=kind))
    for name, dim, start, end in SLICES:
        if name not in ckpt.tensor_names():  # llama has no biases
            continue
        for dtype in (torch.float32, torch.bfloat16):
            part = ckpt.get_tensor_slice(name, dim, start, end, dtype)
            expected = ckpt.get_tensor(name, dtype).narrow(dim, start, end - start)
            assert part.is_contiguous(), name
            torch.testing.assert_close(part, expected, rtol=0, atol=0, msg=f"{name}[{dim}: {start}:{end}]")


@pytest.mark.parametrize("fmt", ["hf", "gguf"])
def test_returned_tensors_are_owned(tmp_path, fmt):
    """Writing into a returned tensor must not change what the next read returns."""
    config = factory.tiny_config("llama")
    state = factory.random_state_dict(config, seed=9)
    path = (
        factory.write_hf_checkpoint(tmp_path / "hf", config, state)
        if fmt == "hf"
        else factory.write_gguf_checkpoint(tmp_path / "o.gguf", config, state)
    )
    ckpt = load_checkpoint(path)
    name = "model.layers.0.mlp.up_proj.weight"
    ckpt.get_tensor(name).add_(1.0)
    ckpt.get_tensor_slice(name, 0, 0, 32).add_(1.0)
    torch.testing.assert_close(ckpt.get_tensor(name), state[name], rtol=0, atol=0)


def test_get_tensor_slice_and_name_errors(tmp_path):
    config = factory.tiny_config("llama", tie_word_embeddings=True)
    ckpt = load_checkpoint(
        factory.write_gguf_checkpoint(tmp_path / "e.gguf", config, factory.random_state_dict(config))
    )
    with pytest.raises(ValueError, match="out of range"):
        ckpt.get_tensor_slice("model.norm.weight", 0, 10, 100)
    with pytest.raises(ValueError, match="dim 2"):
        ckpt.get_tensor_slice("model.layers.0.mlp.up_proj.weight", 2, 0, 1)
    with pytest.raises(KeyError, match="tied"):
        ckpt.get_tensor("lm_head.weight")
    with pytest.raises(KeyError, match=r"no\.such"):
        ckpt.get_tensor("no.such.weight")
    assert ckpt.tensor_shape("model.layers.1.self_attn.k_proj.weight") == (32, 64)
    assert ckpt.get_tensor("model.norm.weight", torch.float16).dtype == torch.float16


# --- config -------------------------------------------------------------------------------


LLAMA3_SCALING = RopeScaling(
    "llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192
)


@pytest.mark.parametrize("arch", ARCHS)
def test_config_round_trips_through_hf_dict(arch):
    config = factory.tiny_config(arch, tie_word_embeddings=True)
    assert ModelConfig.from_hf_dict(factory.hf_config_dict(config)) == config
    scaled = dataclasses.replace(config, rope_scaling=LLAMA3_SCALING, rope_theta=500000.0)
    assert ModelConfig.from_hf_dict(factory.hf_config_dict(scaled)) == scaled
    # transformers 5 spelling: rope_theta and the scaling live in rope_parameters.
    v5 = factory.hf_config_dict(scaled)
    v5["rope_parameters"] = {**v5.pop("rope_scaling"), "rope_theta": v5.pop("rope_theta")}
    assert ModelConfig.from_hf_dict(v5) == scaled
    v5["rope_parameters"] = {"rope_type": "default", "rope_theta": 123.0}
    assert ModelConfig.from_hf_dict(v5) == dataclasses.replace(config, rope_theta=123.0)


def test_config_from_hf_dict_defaults_and_generation_config():
    raw = {
        "model_type": "llama",
        "vocab_size": 100,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 1,
        "num_attention_heads": 8,
        "eos_token_id": 3,
    }
    config = ModelConfig.from_hf_dict(raw, {"eos_token_id": [5, 3], "bos_token_id": 1})
    assert (config.num_kv_heads, config.head_dim, config.rope_theta, config.rope_scaling) == (8, 8, 10000.0, None)
    assert (config.bos_token_id, config.eos_token_ids, config.torch_dtype) == (1, (5, 3), "unknown")
    assert config.attention_bias is False and ModelConfig.from_hf_dict({**raw, "model_type": "qwen2"}).attention_bias


def test_gguf_config_fields(tmp_path):
    config = dataclasses.replace(factory.tiny_config("qwen2"), rope_theta=1234.5, rms_norm_eps=3e-6)
    ckpt = load_checkpoint(
        factory.write_gguf_checkpoint(tmp_path / "c.gguf", config, factory.random_state_dict(config))
    )
    assert ckpt.config == dataclasses.replace(config, torch_dtype="F32")
    assert ckpt.metadata["qwen2.attention.layer_norm_rms_epsilon"] == 3e-6  # float32 read back as its shortest repr


GGUF_METADATA = {
    "general.architecture": "llama",
    "llama.block_count": 2,
    "llama.embedding_length": 64,
    "llama.feed_forward_length": 128,
    "llama.attention.head_count": 4,
    "llama.attention.head_count_kv": 2,
    "llama.attention.layer_norm_rms_epsilon": 1e-5,
    "llama.context_length": 256,
    "tokenizer.ggml.eos_token_id": 2,
    "tokenizer.ggml.eot_token_id": 7,
}
GGUF_SHAPES = {"token_embd.weight": (300, 64), "output.weight": (300, 64)}


def test_config_from_gguf_metadata_dict():
    config = ModelConfig.from_gguf_metadata(GGUF_METADATA, GGUF_SHAPES)
    assert (config.vocab_size, config.head_dim, config.rope_theta, config.eos_token_ids) == (300, 16, 10000.0, (2, 7))
    assert (config.tie_word_embeddings, config.attention_bias, config.bos_token_id) == (False, False, None)
    assert config.torch_dtype == "unknown"
    without_eps = {k: v for k, v in GGUF_METADATA.items() if k != "llama.attention.layer_norm_rms_epsilon"}
    with pytest.raises(CheckpointError, match=r"'llama\.attention\.layer_norm_rms_epsilon'"):
        ModelConfig.from_gguf_metadata(without_eps, GGUF_SHAPES)
    with pytest.raises(CheckpointError, match=r"general\.architecture"):
        ModelConfig.from_gguf_metadata({}, GGUF_SHAPES)
    with pytest.raises(UnsupportedArchitectureError, match="partial rotary"):
        ModelConfig.from_gguf_metadata({**GGUF_METADATA, "llama.rope.dimension_count": 8}, GGUF_SHAPES)
    with pytest.raises(UnsupportedArchitectureError, match="'linear'"):
        ModelConfig.from_gguf_metadata({**GGUF_METADATA, "llama.rope.scaling.type": "linear"}, GGUF_SHAPES)
    with pytest.raises(UnsupportedArchitectureError, match="rope_freqs"):
        ModelConfig.from_gguf_metadata(GGUF_METADATA, {**GGUF_SHAPES, "rope_freqs.weight": (8,)})
    with pytest.raises(CheckpointError, match=r"invalid GGUF metadata.*num_heads \(4\).*num_kv_heads \(3\)"):
        ModelConfig.from_gguf_metadata({**GGUF_METADATA, "llama.attention.head_count_kv": 3}, GGUF_SHAPES)


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"num_heads": 6, "num_kv_heads": 4}, r"num_heads \(6\).*num_kv_heads \(4\)"),
        ({"vocab_size": 0}, "vocab_size.*0"),
        ({"head_dim": 15}, "head_dim.*even.*15"),
        ({"head_dim": 16.0}, "head_dim.*16.0"),
        ({"num_layers": True}, "num_layers.*True"),
        ({"rms_norm_eps": -1e-6}, "rms_norm_eps.*-1e-06"),
        ({"rope_theta": float("nan")}, "rope_theta.*nan"),
        ({"eos_token_ids": [2]}, r"eos_token_ids.*\[2\]"),
        ({"eos_token_ids": (999,)}, "eos_token_ids.*999"),
        ({"bos_token_id": -1}, "bos_token_id.*-1"),
        ({"arch": "mistral"}, "arch.*mistral"),
        ({"tie_word_embeddings": 1}, "tie_word_embeddings.*1"),
        ({"rope_scaling": {"rope_type": "llama3"}}, "rope_scaling"),
    ],
)
def test_config_validation_names_the_bad_value(changes, match):
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(factory.tiny_config("llama"), **changes)


def test_rope_scaling_validation():
    with pytest.raises(ValueError, match=r"rope_type.*yarn"):
        RopeScaling("yarn", 4.0, 1.0, 4.0, 4096)
    with pytest.raises(ValueError, match="high_freq_factor"):
        RopeScaling("llama3", 8.0, 4.0, 4.0, 8192)
    hf = factory.hf_config_dict(factory.tiny_config("llama"))
    with pytest.raises(UnsupportedArchitectureError, match=r"'yarn'.*llama3"):
        ModelConfig.from_hf_dict({**hf, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(CheckpointError, match="low_freq_factor"):
        ModelConfig.from_hf_dict({**hf, "rope_scaling": {"type": "llama3", "factor": 8.0}})


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, r"'gpt2'.*llama.*qwen2"),
        ({"architectures": ["LlamaForSequenceClassification"]}, "LlamaForSequenceClassification"),
        ({"hidden_act": "gelu"}, "gelu"),
        ({"mlp_bias": True}, "mlp_bias"),
    ],
)
def test_hf_unsupported_architecture(tmp_path, overrides, match):
    config = factory.tiny_config("llama")
    directory = factory.write_hf_checkpoint(
        tmp_path / "hf", config, factory.random_state_dict(config), config_overrides=overrides
    )
    with pytest.raises(UnsupportedArchitectureError, match=match):
        load_checkpoint(directory)


def test_qwen2_sliding_window_is_refused():
    hf = factory.hf_config_dict(factory.tiny_config("qwen2"))
    with pytest.raises(UnsupportedArchitectureError, match="sliding-window"):
        ModelConfig.from_hf_dict({**hf, "use_sliding_window": True})


def test_gguf_unknown_architecture(tmp_path):
    config = factory.tiny_config("llama")
    path = factory.write_gguf_checkpoint(
        tmp_path / "m.gguf", config, factory.random_state_dict(config), architecture="mamba"
    )
    with pytest.raises(UnsupportedArchitectureError, match=r"'mamba'.*llama, qwen2"):
        load_checkpoint(path)


# --- fingerprint --------------------------------------------------------------------------


def flip_byte(src: Path, dst: Path, offset: int) -> Path:
    data = bytearray(src.read_bytes())
    data[offset] ^= 0x01
    dst.write_bytes(bytes(data))
    return dst


def test_gguf_fingerprint(tmp_path):
    config = factory.tiny_config("llama")
    state = factory.random_state_dict(config, seed=7)
    path = factory.write_gguf_checkpoint(tmp_path / "a.gguf", config, state, tensor_type="Q4_1")
    first = load_checkpoint(path).fingerprint
    assert len(first) == 64 and int(first, 16) >= 0
    assert load_checkpoint(path).fingerprint == first
    assert load_checkpoint(shutil.copy(path, tmp_path / "copy.gguf")).fingerprint == first
    again = factory.write_gguf_checkpoint(tmp_path / "again.gguf", config, state, tensor_type="Q4_1")
    assert load_checkpoint(again).fingerprint == first  # deterministic writer + same weights

    ffn = next(t for t in gguf.GGUFReader(path).tensors if t.name == "blk.1.ffn_down.weight")
    flipped = flip_byte(path, tmp_path / "flipped.gguf", ffn.data_offset + 7)
    assert load_checkpoint(flipped).fingerprint != first
    other_theta = dataclasses.replace(config, rope_theta=20000.0)
    assert (
        load_checkpoint(
            factory.write_gguf_checkpoint(tmp_path / "theta.gguf", other_theta, state, tensor_type="Q4_1")
        ).fingerprint
        != first
    )
    assert (
        load_checkpoint(
            factory.write_gguf_checkpoint(tmp_path / "q8.gguf", config, state, tensor_type="Q8_0")
        ).fingerprint
        != first
    )


def test_hf_fingerprint(tmp_path):
    config = factory.tiny_config("qwen2")
    state = factory.random_state_dict(config, seed=8)
    one = factory.write_hf_checkpoint(tmp_path / "one", config, state)
    first = load_checkpoint(one).fingerprint
    assert load_checkpoint(one).fingerprint == first
    # Same tensors in two shards: same stored bytes, same fingerprint.
    assert (
        load_checkpoint(factory.write_hf_checkpoint(tmp_path / "two", config, state, num_shards=2)).fingerprint == first
    )

    shard = one / "model.safetensors"
    flip_byte(shard, shard, shard.stat().st_size - 1)  # last byte of the last tensor
    assert load_checkpoint(one).fingerprint != first
    flip_byte(shard, shard, shard.stat().st_size - 1)
    assert load_checkpoint(one).fingerprint == first
    config_json = json.loads((one / "config.json").read_text())
    (one / "config.json").write_text(json.dumps({**config_json, "rms_norm_eps": 1e-5}))
    assert load_checkpoint(one).fingerprint != first


# --- bad input ----------------------------------------------------------------------------


@pytest.fixture
def tiny_gguf(tmp_path) -> Path:
    config = factory.tiny_config("llama")
    return factory.write_gguf_checkpoint(
        tmp_path / "tiny.gguf", config, factory.random_state_dict(config), tensor_type="Q8_0"
    )


@pytest.mark.parametrize(
    "cut", ["half", "last-byte", "tensor-data-start", "tensor-infos", "tokens", "kv-header", "counts", "magic"]
)
def test_truncated_gguf(tiny_gguf, tmp_path, cut):
    size = tiny_gguf.stat().st_size
    data_offset = gguf.GGUFReader(tiny_gguf).data_offset
    length = {
        "half": size // 2,
        "last-byte": size - 1,
        "tensor-data-start": data_offset,
        "tensor-infos": data_offset - 40,
        "tokens": 1500,
        "kv-header": 60,
        "counts": 12,
        "magic": 2,
    }[cut]
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(tiny_gguf.read_bytes()[:length])
    with pytest.raises(CheckpointError, match="truncated") as info:
        load_checkpoint(truncated)
    assert str(truncated) in str(info.value)


def test_not_a_gguf(tmp_path):
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        load_checkpoint(fake)


def test_truncated_safetensors(tmp_path):
    config = factory.tiny_config("llama")
    directory = factory.write_hf_checkpoint(tmp_path / "hf", config, factory.random_state_dict(config))
    shard = directory / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(directory)
    shard.write_bytes(b"\x05")
    with pytest.raises(CheckpointError, match="truncated or not a safetensors"):
        load_checkpoint(directory)


def test_missing_tensors(tmp_path):
    config = factory.tiny_config("llama")
    state = factory.random_state_dict(config)
    path = factory.write_gguf_checkpoint(
        tmp_path / "m.gguf", config, state, tensor_overrides={"blk.1.ffn_up.weight": None}
    )
    with pytest.raises(CheckpointError, match=r"'blk\.1\.ffn_up\.weight'.*missing"):
        load_checkpoint(path)

    directory = factory.write_hf_checkpoint(tmp_path / "hf", config, state, num_shards=2)
    index_path = directory / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    for name in ("model.layers.0.mlp.up_proj.weight", "model.layers.1.self_attn.o_proj.weight"):
        del index["weight_map"][name]
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"'model\.layers\.0\.mlp\.up_proj\.weight' is missing"):
        load_checkpoint(directory)
    index["weight_map"]["model.layers.0.mlp.up_proj.weight"] = "model-00009-of-00009.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"00009.*does not exist"):
        load_checkpoint(directory)
    for shard in directory.glob("*.safetensors"):
        shard.unlink()
    with pytest.raises(CheckpointError, match=r"00001-of-00002\.safetensors.*does not exist"):
        load_checkpoint(directory)

    # Untied config.json but no lm_head.weight stored.
    tied = factory.write_hf_checkpoint(
        tmp_path / "tied",
        dataclasses.replace(config, tie_word_embeddings=True),
        state,
        config_overrides={"tie_word_embeddings": False},
    )
    with pytest.raises(CheckpointError, match=r"'lm_head\.weight' is missing"):
        load_checkpoint(tied)


def test_shape_mismatch(tmp_path):
    config = factory.tiny_config("qwen2")
    directory = factory.write_hf_checkpoint(
        tmp_path / "hf", config, factory.random_state_dict(config), config_overrides={"intermediate_size": 96}
    )
    with pytest.raises(CheckpointError, match=r"gate_proj.*\[128, 64\].*\[96, 64\]"):
        load_checkpoint(directory)


def test_unsupported_ggml_type(tmp_path):
    config = factory.tiny_config("llama")
    rows, cols = config.intermediate_size, config.hidden_size
    block_size, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_1]
    q8_1 = (np.zeros((rows, cols // block_size * type_size), np.uint8), gguf.GGMLQuantizationType.Q8_1)
    path = factory.write_gguf_checkpoint(
        tmp_path / "q81.gguf",
        config,
        factory.random_state_dict(config),
        tensor_overrides={"blk.0.ffn_gate.weight": q8_1},
    )
    with pytest.raises(CheckpointError, match=r"'blk\.0\.ffn_gate\.weight'.*Q8_1"):
        load_checkpoint(path)


def test_bad_paths_and_directories(tmp_path):
    expected = "expected a .gguf file, or a directory with config.json"
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match=f"holds no model weights.*{expected}"):
        load_checkpoint(empty)
    config = factory.tiny_config("llama")
    directory = factory.write_hf_checkpoint(tmp_path / "hf", config, factory.random_state_dict(config))
    (directory / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"holds no model weights \(found \['config.json'"):
        load_checkpoint(directory)
    (directory / "config.json").unlink()
    (directory / "weights.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"no config\.json"):
        load_checkpoint(directory)
    with pytest.raises(CheckpointError, match="neither a GGUF file nor a directory"):
        load_checkpoint(directory / "tokenizer.json")


def test_gguf_dispatch(tmp_path):
    config = factory.tiny_config("qwen2")
    state = factory.random_state_dict(config)
    in_dir = factory.write_gguf_checkpoint(tmp_path / "d" / "model.gguf", config, state)
    assert load_checkpoint(in_dir.parent).path == in_dir
    renamed = shutil.copy(in_dir, tmp_path / "model.bin")  # sniffed by its magic, not its name
    assert isinstance(load_checkpoint(renamed), GGUFCheckpoint)
    shutil.copy(in_dir, in_dir.parent / "other.gguf")
    with pytest.raises(CheckpointError, match="2 GGUF files"):
        load_checkpoint(in_dir.parent)


# --- tokenizer metadata in the factory's files ------------------------------------------------


def test_factory_tokenizer_metadata(tmp_path):
    from tokenizers import Tokenizer

    config = factory.tiny_config("llama")
    state = factory.random_state_dict(config)
    tok = factory.tiny_tokenizer()
    metadata = load_checkpoint(factory.write_gguf_checkpoint(tmp_path / "t.gguf", config, state)).metadata
    assert metadata["tokenizer.ggml.model"] == "gpt2"
    assert metadata["tokenizer.ggml.tokens"] == list(tok.tokens) and len(tok.tokens) == config.vocab_size
    assert metadata["tokenizer.ggml.merges"] == list(tok.merges)
    assert metadata["tokenizer.ggml.token_type"][:4] == [3, 3, 3, 1]  # three ChatML specials, then bytes
    assert metadata["tokenizer.ggml.eos_token_id"] == config.eos_token_ids[0] == tok.tokens.index("<|im_end|>")
    assert "<|im_start|>" in metadata["tokenizer.chat_template"]

    directory = factory.write_hf_checkpoint(tmp_path / "hf", config, state)
    hf_tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
    ids = hf_tokenizer.encode("<|im_start|>user\nHello world, the fox!<|im_end|>").ids
    assert ids[0] == config.bos_token_id and ids[-1] == config.eos_token_ids[0]
    assert hf_tokenizer.decode(ids, skip_special_tokens=False) == "<|im_start|>user\nHello world, the fox!<|im_end|>"
    assert [hf_tokenizer.id_to_token(i) for i in range(config.vocab_size)] == list(tok.tokens)
    assert json.loads((directory / "tokenizer_config.json").read_text())["chat_template"] == tok.chat_template


# --- the real default model -------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_gguf(smollm2_gguf) -> Path:
    return smollm2_gguf


@pytest.fixture(scope="module")
def real_checkpoint(real_gguf):
    return load_checkpoint(real_gguf)


def test_real_model_config_and_metadata(real_checkpoint):
    config = real_checkpoint.config
    assert (config.arch, config.num_layers, config.hidden_size, config.num_heads, config.num_kv_heads) == (
        "llama",
        30,
        576,
        9,
        3,
    )
    assert (config.head_dim, config.vocab_size, config.rope_theta, config.tie_word_embeddings) == (
        64,
        49152,
        100000.0,
        True,
    )
    assert (config.intermediate_size, config.rms_norm_eps, config.bos_token_id, config.eos_token_ids) == (
        1536,
        1e-5,
        1,
        (2,),
    )
    assert config.torch_dtype == "Q4_1" and config.attention_bias is False and config.rope_scaling is None
    assert len(real_checkpoint.metadata["tokenizer.ggml.tokens"]) == 49152
    assert "<|im_start|>" in real_checkpoint.metadata["tokenizer.chat_template"]
    types = list(real_checkpoint.quant_types().values())
    assert (types.count("Q4_1"), types.count("F32"), types.count("Q8_0")) == (210, 61, 1)


def test_real_model_fingerprint(real_gguf, real_checkpoint):
    fingerprint = real_checkpoint.fingerprint
    assert len(fingerprint) == 64 and real_checkpoint.fingerprint == fingerprint
    assert load_checkpoint(real_gguf).fingerprint == fingerprint


def test_real_model_qk_match_transformers(real_gguf, real_checkpoint):
    gguf_utils = pytest.importorskip("transformers.modeling_gguf_pytorch_utils", reason="dev extra")
    processor = gguf_utils.LlamaTensorProcessor(config={"num_attention_heads": 9, "num_key_value_heads": 3})
    stored = {t.name: t for t in gguf.GGUFReader(real_gguf).tensors}
    for layer in (0, 29):
        for proj, gguf_proj in (("q_proj", "attn_q"), ("k_proj", "attn_k"), ("v_proj", "attn_v")):
            tensor = stored[f"blk.{layer}.{gguf_proj}.weight"]
            theirs = processor.process(
                weights=gguf.quants.dequantize(tensor.data, tensor.tensor_type), name=tensor.name
            ).weights
            name = f"model.layers.{layer}.self_attn.{proj}.weight"
            np.testing.assert_array_equal(real_checkpoint.get_tensor(name).numpy(), theirs, err_msg=name)
            head_slice = real_checkpoint.get_tensor_slice(name, 0, 64, 192)  # heads 1-2, read from stored rows
            np.testing.assert_array_equal(head_slice.numpy(), theirs[64:192], err_msg=name)


@pytest.mark.slow
def test_real_model_every_tensor_matches_transformers(real_gguf, real_checkpoint):
    transformers = pytest.importorskip("transformers", reason="dev extra")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        real_gguf.parent, gguf_file=real_gguf.name, dtype=torch.float32
    )
    theirs = model.state_dict()
    for name in real_checkpoint.tensor_names():
        torch.testing.assert_close(real_checkpoint.get_tensor(name), theirs[name], rtol=0, atol=0, msg=name)
