"""Tiny random checkpoints for tests: HF directories and GGUF files, llama or qwen2, any tensor type.

    config = tiny_config("llama", tie_word_embeddings=True)
    state = random_state_dict(config, seed=0)          # HF names -> float32 tensors
    write_hf_checkpoint(tmp_path / "hf", config, state, num_shards=2)
    write_gguf_checkpoint(tmp_path / "m.gguf", config, state, tensor_type="Q4_1")

Everything is written the way the real converters do, independently of the loader under test:
GGUF names come from gguf-py's ``TensorNameMap`` (what ``convert_hf_to_gguf.py`` uses), llama's
Q/K rows are permuted with llama.cpp's ``permute``, matrices are quantized with ``gguf.quants``
and 1-D tensors stay F32. gguf-py has no quantizer for the K-quants, so :func:`quantize_q4_k` and
:func:`quantize_q6_k` build valid blocks here from the ggml block layouts (``block_q4_K``,
``block_q6_K`` in ggml-common.h); their rows must be multiples of 256 (``tiny_config(k_quant=True)``).

Both formats carry a tiny byte-level BPE tokenizer (trained with ``tokenizers`` on a few
sentences: 256 bytes + 3 ChatML specials + 61 merges = 320 tokens) and a ChatML chat template.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as QType
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from kernels.checkpoints import ModelConfig

GGUF_TENSOR_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K")
K_QUANT_TYPES = ("Q4_K", "Q6_K")
QK_K = 256  # elements per K-quant super-block

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
TINY_VOCAB_SIZE = 320
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_CORPUS = (
    "The quick brown fox jumps over the lazy dog.",
    "Hello world! How are you today?",
    "Paged attention stores keys and values in fixed-size blocks.",
    "A tiny model writes tiny tests for the gateway and the engine.",
    "The router sends hard prompts to the cloud and easy ones to the edge.",
)

_HF_CLASSES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
_GGUF_ARCHS = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2}
_FILE_TYPES = {
    "F32": gguf.LlamaFileType.ALL_F32,
    "F16": gguf.LlamaFileType.MOSTLY_F16,
    "BF16": gguf.LlamaFileType.MOSTLY_BF16,
    "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    "Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
    "Q4_1": gguf.LlamaFileType.MOSTLY_Q4_1,
    "Q4_K": gguf.LlamaFileType.MOSTLY_Q4_K_M,
    "Q6_K": gguf.LlamaFileType.MOSTLY_Q6_K,
}


def tiny_config(arch: str = "llama", *, tie_word_embeddings: bool = False, k_quant: bool = False) -> ModelConfig:
    """2 layers, 4 heads, 2 KV heads; ``k_quant`` widens rows to 256 so Q4_K / Q6_K can store them."""
    hidden_size, head_dim, intermediate_size = (256, 64, 512) if k_quant else (64, 16, 128)
    return ModelConfig(
        arch=arch,
        vocab_size=TINY_VOCAB_SIZE,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=head_dim,
        rope_theta=10000.0 if arch == "llama" else 1000000.0,
        rms_norm_eps=1e-5 if arch == "llama" else 1e-6,
        max_position_embeddings=256,
        tie_word_embeddings=tie_word_embeddings,
        attention_bias=arch == "qwen2",
        bos_token_id=SPECIAL_TOKENS.index("<|im_start|>"),
        eos_token_ids=(SPECIAL_TOKENS.index("<|im_end|>"),),
        torch_dtype="float32",
    )


def hf_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """HF tensor names and shapes, written out here independently of the loader's own table."""
    h, q, kv, i = (
        config.hidden_size,
        config.num_heads * config.head_dim,
        config.num_kv_heads * config.head_dim,
        config.intermediate_size,
    )
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (config.vocab_size, h)}
    for layer in range(config.num_layers):
        p = f"model.layers.{layer}."
        shapes[p + "input_layernorm.weight"] = (h,)
        for proj, size in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
            shapes[p + f"self_attn.{proj}.weight"] = (size, h)
            if config.attention_bias:
                shapes[p + f"self_attn.{proj}.bias"] = (size,)
        shapes[p + "self_attn.o_proj.weight"] = (h, q)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
        shapes[p + "mlp.gate_proj.weight"] = (i, h)
        shapes[p + "mlp.up_proj.weight"] = (i, h)
        shapes[p + "mlp.down_proj.weight"] = (h, i)
    shapes["model.norm.weight"] = (h,)
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, h)
    return shapes


def random_state_dict(config: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded float32 weights in HF naming: matrices ~ N(0, 1/in_features), norms ~ 1, biases ~ 0.1."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in hf_shapes(config).items():
        noise = torch.randn(shape, generator=generator, dtype=torch.float32)
        if name.endswith("norm.weight"):
            state[name] = 1.0 + 0.1 * noise
        elif name.endswith(".bias"):
            state[name] = 0.1 * noise
        else:
            state[name] = noise / shape[1] ** 0.5
    return state


# --- tokenizer ---------------------------------------------------------------------------


@dataclass(frozen=True)
class TinyTokenizer:
    """A byte-level BPE in both spellings: GGUF ``tokenizer.ggml.*`` lists and HF tokenizer.json."""

    tokens: tuple[str, ...]
    token_types: tuple[int, ...]  # gguf.TokenType: NORMAL or CONTROL
    merges: tuple[str, ...]  # "left right"
    bos_token_id: int
    eos_token_id: int
    chat_template: str
    tokenizer_json: str


@functools.cache
def tiny_tokenizer(vocab_size: int = TINY_VOCAB_SIZE) -> TinyTokenizer:
    """Train the tiny BPE (deterministic); pad with ``<|reserved_N|>`` specials up to ``vocab_size``."""
    if vocab_size < TINY_VOCAB_SIZE:
        raise ValueError(f"the tiny tokenizer has {TINY_VOCAB_SIZE} tokens; vocab_size {vocab_size} is too small")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=1,
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(_CORPUS) * 3, trainer=trainer)
    tokenizer.add_special_tokens([f"<|reserved_{i}|>" for i in range(vocab_size - tokenizer.get_vocab_size())])
    if tokenizer.get_vocab_size() != vocab_size:
        raise RuntimeError(f"tiny tokenizer has {tokenizer.get_vocab_size()} tokens, wanted {vocab_size}")

    by_id = sorted(tokenizer.get_vocab(with_added_tokens=True).items(), key=lambda item: item[1])
    tokens = tuple(token for token, _ in by_id)
    specials = {t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special}
    token_types = tuple(int(gguf.TokenType.CONTROL if t in specials else gguf.TokenType.NORMAL) for t in tokens)
    tokenizer_json = tokenizer.to_str()
    # tokenizers >= 0.20 writes merges as [left, right] pairs, older versions as "left right".
    raw_merges = json.loads(tokenizer_json)["model"]["merges"]
    merges = tuple(m if isinstance(m, str) else " ".join(m) for m in raw_merges)
    return TinyTokenizer(
        tokens=tokens,
        token_types=token_types,
        merges=merges,
        bos_token_id=tokens.index("<|im_start|>"),
        eos_token_id=tokens.index("<|im_end|>"),
        chat_template=CHATML_TEMPLATE,
        tokenizer_json=tokenizer_json,
    )


# --- HF directory ------------------------------------------------------------------------


def hf_config_dict(config: ModelConfig, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """The config.json transformers writes for ``config`` (transformers 4 key names)."""
    d: dict[str, Any] = {
        "architectures": [_HF_CLASSES[config.arch]],
        "model_type": config.arch,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "hidden_act": "silu",
        "rope_theta": config.rope_theta,
        "rms_norm_eps": config.rms_norm_eps,
        "max_position_embeddings": config.max_position_embeddings,
        "tie_word_embeddings": config.tie_word_embeddings,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": list(config.eos_token_ids) if len(config.eos_token_ids) != 1 else config.eos_token_ids[0],
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    if config.arch == "llama":  # Qwen2 has no head_dim / attention_bias keys: derived and always-on
        d.update(head_dim=config.head_dim, attention_bias=config.attention_bias, mlp_bias=False)
    if config.rope_scaling is not None:
        rs = config.rope_scaling
        d["rope_scaling"] = {
            "rope_type": rs.rope_type,
            "factor": rs.factor,
            "low_freq_factor": rs.low_freq_factor,
            "high_freq_factor": rs.high_freq_factor,
            "original_max_position_embeddings": rs.original_max_position_embeddings,
        }
    return d


def write_hf_checkpoint(
    directory: Path,
    config: ModelConfig,
    state_dict: Mapping[str, torch.Tensor],
    *,
    num_shards: int = 1,
    dtype: torch.dtype = torch.float32,
    config_overrides: Mapping[str, Any] | None = None,
    tokenizer: bool = True,
) -> Path:
    """config.json, generation_config.json, safetensors (``num_shards`` > 1: with an index) and tokenizer files.

    ``config_overrides`` patches config.json (a ``None`` value deletes the key).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config_json = hf_config_dict(config, dtype)
    for key, value in (config_overrides or {}).items():
        if value is None:
            config_json.pop(key, None)
        else:
            config_json[key] = value
    (directory / "config.json").write_text(json.dumps(config_json, indent=2))
    generation = {"bos_token_id": config.bos_token_id, "eos_token_id": list(config.eos_token_ids)}
    (directory / "generation_config.json").write_text(json.dumps(generation, indent=2))

    tensors = {name: state_dict[name].to(dtype).contiguous() for name in hf_shapes(config)}
    names = list(tensors)
    if num_shards == 1:
        save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    else:
        weight_map = {}
        chunks = np.array_split(np.arange(len(names)), num_shards)
        for shard_index, chunk in enumerate(chunks, start=1):
            shard_name = f"model-{shard_index:05d}-of-{num_shards:05d}.safetensors"
            shard = {names[j]: tensors[names[j]] for j in chunk}
            save_file(shard, directory / shard_name, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, shard_name))
        total_size = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))

    if tokenizer:
        tok = tiny_tokenizer(config.vocab_size)
        (directory / "tokenizer.json").write_text(tok.tokenizer_json)
        tokenizer_config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": tok.tokens[tok.bos_token_id],
            "eos_token": tok.tokens[tok.eos_token_id],
            "chat_template": tok.chat_template,
            "model_max_length": config.max_position_embeddings,
        }
        (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    return directory


# --- GGUF file ---------------------------------------------------------------------------


def permute_for_gguf(weights: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """llama.cpp ``convert_hf_to_gguf.py`` ``LlamaModel.permute``: HF rotate-half rows -> GGML interleaved."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def gguf_tensors(
    config: ModelConfig, state_dict: Mapping[str, torch.Tensor], tensor_type: str = "F32"
) -> dict[str, tuple[np.ndarray, QType]]:
    """GGUF name -> (stored array, GGML type), as llama.cpp would convert and quantize ``state_dict``."""
    if tensor_type not in GGUF_TENSOR_TYPES:
        raise ValueError(f"tensor_type must be one of {GGUF_TENSOR_TYPES}, got {tensor_type!r}")
    name_map = gguf.get_tensor_name_map(_GGUF_ARCHS[config.arch], config.num_layers)
    out = {}
    for hf_name in hf_shapes(config):
        values = state_dict[hf_name].detach().to(torch.float32).numpy()
        if config.arch == "llama" and ".self_attn.q_proj." in hf_name:
            values = permute_for_gguf(values, config.num_heads, config.num_heads)
        elif config.arch == "llama" and ".self_attn.k_proj." in hf_name:
            values = permute_for_gguf(values, config.num_heads, config.num_kv_heads)
        gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise KeyError(f"gguf-py has no name for {hf_name}")
        if values.ndim == 1:  # llama.cpp keeps norms and biases in F32
            out[gguf_name] = (np.ascontiguousarray(values, dtype=np.float32), QType.F32)
        else:
            out[gguf_name] = (quantize(values, tensor_type), QType[tensor_type])
    return out


def quantize(values: np.ndarray, tensor_type: str) -> np.ndarray:
    """Stored form of a float32 matrix: float32/float16 arrays or uint8 blocks [rows, bytes per row]."""
    if tensor_type == "F32":
        return np.ascontiguousarray(values, dtype=np.float32)
    if tensor_type == "F16":
        return values.astype(np.float16)
    if tensor_type == "Q4_K":
        return quantize_q4_k(values)
    if tensor_type == "Q6_K":
        return quantize_q6_k(values)
    return gguf.quants.quantize(np.ascontiguousarray(values, dtype=np.float32), QType[tensor_type])


def write_gguf_checkpoint(
    path: Path,
    config: ModelConfig,
    state_dict: Mapping[str, torch.Tensor],
    *,
    tensor_type: str = "F32",
    architecture: str | None = None,
    tokenizer: bool = True,
    tensor_overrides: Mapping[str, tuple[np.ndarray, QType] | None] | None = None,
) -> Path:
    """A GGUF file with llama.cpp's metadata keys; ``architecture`` overrides ``general.architecture``
    (and the key prefix); ``tensor_overrides`` replaces (or with ``None`` drops) stored tensors by GGUF name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = gguf_tensors(config, state_dict, tensor_type)
    for name, replacement in (tensor_overrides or {}).items():
        if replacement is None:
            tensors.pop(name, None)
        else:
            tensors[name] = replacement

    writer = gguf.GGUFWriter(path, architecture or config.arch)
    writer.add_name(f"tiny-{config.arch}")
    writer.add_file_type(int(_FILE_TYPES[tensor_type]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_block_count(config.num_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_heads)
    writer.add_head_count_kv(config.num_kv_heads)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_vocab_size(config.vocab_size)
    if tokenizer:
        tok = tiny_tokenizer(config.vocab_size)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("gpt-2")
        writer.add_token_list(list(tok.tokens))
        writer.add_token_types(list(tok.token_types))
        writer.add_token_merges(list(tok.merges))
        writer.add_bos_token_id(tok.bos_token_id)
        writer.add_eos_token_id(tok.eos_token_id)
        writer.add_add_bos_token(False)
        writer.add_chat_template(tok.chat_template)
    for name, (data, qtype) in tensors.items():
        raw_dtype = None if qtype in (QType.F32, QType.F16) else qtype
        writer.add_tensor(name, data, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# --- K-quant blocks (ggml-common.h layouts) ------------------------------------------------


def _fp16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16)


def quantize_q6_k(values: np.ndarray) -> np.ndarray:
    """float32 [rows, n*256] -> block_q6_K bytes [rows, n*210]: ql[128] qh[64] scales[16] (int8) d (fp16).

    Element p of a block is ``d * scales[p // 16] * (q[p] - 32)`` with the 6-bit q split into
    a low nibble in ql and two high bits in qh, 128 elements per half as in ``dequantize_row_q6_K``.
    """
    rows, cols = values.shape
    if cols % QK_K:
        raise ValueError(f"Q6_K needs rows that are a multiple of {QK_K}, got {cols}")
    x = values.reshape(-1, QK_K // 16, 16).astype(np.float32)  # [blocks, 16 sub-blocks, 16]
    # Sub-block scale: the largest-magnitude value maps to -32 (the most negative 6-bit level).
    pick = np.take_along_axis(x, np.abs(x).argmax(axis=-1, keepdims=True), axis=-1)[..., 0]
    sub_scale = pick / -32.0
    d = _fp16(np.abs(sub_scale).max(axis=-1) / 127.0)
    d32 = d.astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        scales = np.where(d32[:, None] > 0, np.rint(sub_scale / d32[:, None]), 0).clip(-128, 127).astype(np.int8)
        step = d32[:, None] * scales.astype(np.float32)
        q = np.where(step[..., None] != 0, np.rint(x / step[..., None]), 0).clip(-32, 31).astype(np.int16) + 32
    q = q.reshape(-1, QK_K).astype(np.uint8)  # [blocks, 256] in 0..63
    ql = np.empty((q.shape[0], QK_K // 2), np.uint8)
    qh = np.empty((q.shape[0], QK_K // 4), np.uint8)
    for half in range(2):
        y = q[:, 128 * half : 128 * (half + 1)]
        ql[:, 64 * half : 64 * half + 32] = (y[:, 0:32] & 0xF) | ((y[:, 64:96] & 0xF) << 4)
        ql[:, 64 * half + 32 : 64 * half + 64] = (y[:, 32:64] & 0xF) | ((y[:, 96:128] & 0xF) << 4)
        qh[:, 32 * half : 32 * half + 32] = (
            (y[:, 0:32] >> 4) | ((y[:, 32:64] >> 4) << 2) | ((y[:, 64:96] >> 4) << 4) | ((y[:, 96:128] >> 4) << 6)
        )
    blocks = np.concatenate([ql, qh, scales.view(np.uint8), d.reshape(-1, 1).view(np.uint8)], axis=1)
    return blocks.reshape(rows, -1)


def quantize_q4_k(values: np.ndarray) -> np.ndarray:
    """float32 [rows, n*256] -> block_q4_K bytes [rows, n*144]: d dmin (fp16) scales[12] qs[128].

    Sub-block s (32 elements) decodes as ``d * sc[s] * q - dmin * m[s]`` with 6-bit sc/m packed
    as in ``get_scale_min_k4`` and 4-bit q: low nibbles for even s, high for odd, 64 per qs chunk.
    """
    rows, cols = values.shape
    if cols % QK_K:
        raise ValueError(f"Q4_K needs rows that are a multiple of {QK_K}, got {cols}")
    x = values.reshape(-1, QK_K // 32, 32).astype(np.float32)  # [blocks, 8 sub-blocks, 32]
    low = np.minimum(x.min(axis=-1), 0.0)
    sub_scale = (x.max(axis=-1) - low) / 15.0
    sub_min = -low
    d = _fp16(sub_scale.max(axis=-1) / 63.0)
    dmin = _fp16(sub_min.max(axis=-1) / 63.0)
    d32, dmin32 = d.astype(np.float32)[:, None], dmin.astype(np.float32)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(d32 > 0, np.rint(sub_scale / d32), 0).clip(0, 63).astype(np.uint8)
        m = np.where(dmin32 > 0, np.rint(sub_min / dmin32), 0).clip(0, 63).astype(np.uint8)
        step = (d32 * sc)[..., None]
        offset = (dmin32 * m)[..., None]
        q = np.where(step != 0, np.rint((x + offset) / step), 0).clip(0, 15).astype(np.uint8)
    scales = np.empty((x.shape[0], 12), np.uint8)
    for j in range(4):
        scales[:, j] = (sc[:, j] & 63) | ((sc[:, j + 4] >> 4) << 6)
        scales[:, j + 4] = (m[:, j] & 63) | ((m[:, j + 4] >> 4) << 6)
        scales[:, j + 8] = (sc[:, j + 4] & 0xF) | ((m[:, j + 4] & 0xF) << 4)
    qs = (q[:, 0::2, :] | (q[:, 1::2, :] << 4)).reshape(-1, QK_K // 2)  # sub-blocks 2j (low), 2j+1 (high)
    blocks = np.concatenate([d.reshape(-1, 1).view(np.uint8), dmin.reshape(-1, 1).view(np.uint8), scales, qs], axis=1)
    return blocks.reshape(rows, -1)
