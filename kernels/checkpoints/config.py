"""The model hyper-parameters every engine needs, read from a HF config.json or GGUF metadata.

:class:`ModelConfig` describes a decoder-only Llama-family transformer (Llama, Qwen2):
RMSNorm, rotary embeddings in the HF rotate-half layout, grouped-query attention and a SwiGLU MLP.
Both parsers refuse what we do not implement (another architecture, sliding windows, partial
rotary, unknown RoPE scaling) rather than load a model that would compute something else.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import gguf  # the top-level package (absolute import), not kernels.checkpoints.gguf

from kernels.errors import CheckpointError, UnsupportedArchitectureError

SUPPORTED_ARCHS = ("llama", "qwen2")
SUPPORTED_ROPE_TYPES = ("llama3",)

# HF model_type -> the one HF class whose weights we implement.
_HF_CLASSES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
_HF_DEFAULT_MAX_POSITIONS = {"llama": 2048, "qwen2": 32768}


@dataclass(frozen=True, slots=True)
class RopeScaling:
    """Llama-3 RoPE frequency scaling (HF ``rope_type: "llama3"``).

    Frequencies whose wavelength exceeds ``original_max_position_embeddings / low_freq_factor``
    are divided by ``factor``; those shorter than ``.../ high_freq_factor`` are kept; the band
    between is interpolated smoothly.
    """

    rope_type: str
    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int

    def __post_init__(self) -> None:
        if self.rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(f"RopeScaling.rope_type must be one of {SUPPORTED_ROPE_TYPES}, got {self.rope_type!r}")
        for name in ("factor", "low_freq_factor", "high_freq_factor"):
            value = getattr(self, name)
            if not _is_number(value) or not value > 0:
                raise ValueError(f"RopeScaling.{name} must be a positive number, got {value!r}")
        if not self.high_freq_factor > self.low_freq_factor:
            raise ValueError(
                f"RopeScaling.high_freq_factor ({self.high_freq_factor!r}) must exceed "
                f"low_freq_factor ({self.low_freq_factor!r})"
            )
        if not _is_positive_int(self.original_max_position_embeddings):
            raise ValueError(
                "RopeScaling.original_max_position_embeddings must be a positive int, "
                f"got {self.original_max_position_embeddings!r}"
            )


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """Shape and numerics of one checkpoint, independent of its file format.

    >>> cfg = ModelConfig(arch="llama", vocab_size=256, hidden_size=64, intermediate_size=128,
    ...                   num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16)
    >>> cfg.num_heads // cfg.num_kv_heads
    2
    """

    arch: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v projections carry a bias (always for Qwen2)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    torch_dtype: str = "float32"  # storage dtype or GGUF file type; informational only
    rope_scaling: RopeScaling | None = None

    def __post_init__(self) -> None:
        if self.arch not in SUPPORTED_ARCHS:
            raise ValueError(f"ModelConfig.arch must be one of {SUPPORTED_ARCHS}, got {self.arch!r}")
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "max_position_embeddings",
        ):
            value = getattr(self, name)
            if not _is_positive_int(value):
                raise ValueError(f"ModelConfig.{name} must be a positive int, got {value!r}")
        if self.head_dim % 2:
            raise ValueError(f"ModelConfig.head_dim must be even (RoPE rotates pairs of dims), got {self.head_dim}")
        if self.num_heads % self.num_kv_heads != 0:
            raise ValueError(
                f"ModelConfig.num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        for name in ("rope_theta", "rms_norm_eps"):
            value = getattr(self, name)
            if not _is_number(value) or not value > 0 or not math.isfinite(value):
                raise ValueError(f"ModelConfig.{name} must be a positive finite number, got {value!r}")
        for name in ("tie_word_embeddings", "attention_bias"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise ValueError(f"ModelConfig.{name} must be a bool, got {value!r}")
        if self.bos_token_id is not None and not self._is_token_id(self.bos_token_id):
            raise ValueError(
                f"ModelConfig.bos_token_id must be None or in [0, {self.vocab_size}), got {self.bos_token_id!r}"
            )
        if not isinstance(self.eos_token_ids, tuple) or not all(self._is_token_id(t) for t in self.eos_token_ids):
            raise ValueError(
                f"ModelConfig.eos_token_ids must be a tuple of ids in [0, {self.vocab_size}), "
                f"got {self.eos_token_ids!r}"
            )
        if not isinstance(self.torch_dtype, str):
            raise ValueError(f"ModelConfig.torch_dtype must be a str, got {self.torch_dtype!r}")
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, RopeScaling):
            raise ValueError(f"ModelConfig.rope_scaling must be None or a RopeScaling, got {self.rope_scaling!r}")

    def _is_token_id(self, value: object) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < self.vocab_size

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict of every field (``rope_scaling`` as a nested dict or None)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_hf_dict(cls, config: Mapping[str, Any], generation_config: Mapping[str, Any] | None = None) -> ModelConfig:
        """Parse a Hugging Face ``config.json`` (and optionally ``generation_config.json``).

        Accepts both the transformers 4 keys (``rope_theta``, ``rope_scaling``) and the
        transformers 5 ``rope_parameters`` dict. Raises :class:`UnsupportedArchitectureError`
        for a model we do not implement and :class:`CheckpointError` for a malformed config.
        """
        model_type = config.get("model_type")
        if model_type not in SUPPORTED_ARCHS:
            supported = ", ".join(f"{t} ({c})" for t, c in _HF_CLASSES.items())
            raise UnsupportedArchitectureError(f"HF model_type {model_type!r} is not supported; supported: {supported}")
        architectures = config.get("architectures")
        if architectures and _HF_CLASSES[model_type] not in architectures:
            raise UnsupportedArchitectureError(
                f"HF architectures {architectures!r} do not include {_HF_CLASSES[model_type]!r}, "
                f"the only {model_type} head we implement"
            )
        _refuse_hf_features(model_type, config)

        def require(key: str) -> Any:
            if key not in config:
                raise CheckpointError(f"config.json (model_type {model_type!r}) lacks required key {key!r}")
            return config[key]

        hidden_size = require("hidden_size")
        num_heads = require("num_attention_heads")
        head_dim = config.get("head_dim")
        if head_dim is None:
            head_dim = _divide(hidden_size, num_heads, "config.json hidden_size", "num_attention_heads")

        rope_parameters = config.get("rope_parameters") or {}
        rope_theta = config.get("rope_theta", rope_parameters.get("rope_theta", 10000.0))
        rope_scaling = _parse_hf_rope_scaling(config.get("rope_scaling") or rope_parameters)

        generation_config = generation_config or {}
        bos = config.get("bos_token_id")
        if bos is None:
            bos = generation_config.get("bos_token_id")
        eos_ids = _as_id_tuple(generation_config.get("eos_token_id")) + _as_id_tuple(config.get("eos_token_id"))

        fields = dict(
            arch=model_type,
            vocab_size=require("vocab_size"),
            hidden_size=hidden_size,
            intermediate_size=require("intermediate_size"),
            num_layers=require("num_hidden_layers"),
            num_heads=num_heads,
            num_kv_heads=config.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            rope_theta=_as_float(rope_theta),
            rms_norm_eps=_as_float(config.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=config.get("max_position_embeddings", _HF_DEFAULT_MAX_POSITIONS[model_type]),
            tie_word_embeddings=config.get("tie_word_embeddings", False),
            attention_bias=True if model_type == "qwen2" else config.get("attention_bias", False),
            bos_token_id=bos,
            eos_token_ids=tuple(dict.fromkeys(eos_ids)),
            torch_dtype=str(config.get("torch_dtype") or config.get("dtype") or "unknown"),
            rope_scaling=rope_scaling,
        )
        return _build(cls, fields, "config.json")

    @classmethod
    def from_gguf_metadata(
        cls,
        metadata: Mapping[str, Any],
        tensor_shapes: Mapping[str, Sequence[int]],
        *,
        torch_dtype: str | None = None,
    ) -> ModelConfig:
        """Parse llama.cpp GGUF metadata.

        ``tensor_shapes`` maps GGUF tensor names to their numpy-order shapes (``[out, in]``): a
        missing ``output.weight`` means tied embeddings, ``blk.0.attn_q.bias`` means q/k/v biases,
        and ``token_embd.weight``'s rows give the vocab size when ``{arch}.vocab_size`` is absent.
        ``torch_dtype`` defaults to the name of ``general.file_type``.
        """
        arch = metadata.get("general.architecture")
        if arch is None:
            raise CheckpointError("GGUF metadata lacks 'general.architecture'")
        if arch not in SUPPORTED_ARCHS:
            raise UnsupportedArchitectureError(
                f"GGUF general.architecture {arch!r} is not supported; supported: {', '.join(SUPPORTED_ARCHS)}"
            )

        def require(key: str) -> Any:
            if f"{arch}.{key}" not in metadata:
                raise CheckpointError(f"GGUF metadata lacks required key '{arch}.{key}'")
            return metadata[f"{arch}.{key}"]

        hidden_size = require("embedding_length")
        num_heads = require("attention.head_count")
        head_dim = metadata.get(f"{arch}.attention.key_length")
        if head_dim is None:
            head_dim = _divide(hidden_size, num_heads, f"GGUF {arch}.embedding_length", "attention.head_count")
        rope_dim = metadata.get(f"{arch}.rope.dimension_count", head_dim)
        if rope_dim != head_dim:
            raise UnsupportedArchitectureError(
                f"GGUF {arch}.rope.dimension_count={rope_dim} != head_dim={head_dim}: partial rotary is not supported"
            )
        scaling_type = metadata.get(f"{arch}.rope.scaling.type", "none")
        if scaling_type != "none":
            raise UnsupportedArchitectureError(
                f"GGUF {arch}.rope.scaling.type {scaling_type!r} is not supported; supported: none"
            )
        if "rope_freqs.weight" in tensor_shapes:
            raise UnsupportedArchitectureError(
                "GGUF has a rope_freqs.weight tensor (Llama-3 RoPE scaling baked into per-dimension factors); "
                "only the HF checkpoint of such a model is supported"
            )

        vocab_size = metadata.get(f"{arch}.vocab_size")
        if vocab_size is None and "token_embd.weight" in tensor_shapes:
            vocab_size = int(tensor_shapes["token_embd.weight"][0])
        if vocab_size is None:
            vocab_size = len(metadata.get("tokenizer.ggml.tokens", ()))
        eos_ids = tuple(
            metadata[key]
            for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
            if key in metadata
        )
        if torch_dtype is None:
            torch_dtype = _gguf_file_type_name(metadata.get("general.file_type"))

        fields = dict(
            arch=arch,
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            intermediate_size=require("feed_forward_length"),
            num_layers=require("block_count"),
            num_heads=num_heads,
            num_kv_heads=metadata.get(f"{arch}.attention.head_count_kv", num_heads),
            head_dim=head_dim,
            rope_theta=_as_float(metadata.get(f"{arch}.rope.freq_base", 10000.0)),
            rms_norm_eps=_as_float(require("attention.layer_norm_rms_epsilon")),
            max_position_embeddings=require("context_length"),
            tie_word_embeddings="output.weight" not in tensor_shapes,
            attention_bias="blk.0.attn_q.bias" in tensor_shapes,
            bos_token_id=metadata.get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=tuple(dict.fromkeys(eos_ids)),
            torch_dtype=torch_dtype,
            rope_scaling=None,
        )
        return _build(cls, fields, "GGUF metadata")


def _build(cls: type[ModelConfig], fields: dict[str, Any], source: str) -> ModelConfig:
    try:
        return cls(**fields)
    except ValueError as e:
        raise CheckpointError(f"invalid {source}: {e}") from e


def _refuse_hf_features(model_type: str, config: Mapping[str, Any]) -> None:
    """Raise for HF options that change the computation in ways we do not implement."""
    act = config.get("hidden_act", "silu")
    if act != "silu":
        raise UnsupportedArchitectureError(f"config.json hidden_act {act!r} is not supported; supported: silu")
    if config.get("mlp_bias", False):
        raise UnsupportedArchitectureError("config.json mlp_bias=true is not supported")
    if config.get("use_sliding_window", False) or "sliding_attention" in (config.get("layer_types") or ()):
        raise UnsupportedArchitectureError(f"{model_type} with sliding-window attention is not supported")
    partial = config.get("partial_rotary_factor", 1.0)
    if partial != 1.0:
        raise UnsupportedArchitectureError(f"config.json partial_rotary_factor={partial!r} is not supported")


def _parse_hf_rope_scaling(raw: Mapping[str, Any]) -> RopeScaling | None:
    rope_type = raw.get("rope_type", raw.get("type", "default"))
    if rope_type in (None, "default"):
        return None
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedArchitectureError(
            f"config.json rope scaling type {rope_type!r} is not supported; supported: default, "
            + ", ".join(SUPPORTED_ROPE_TYPES)
        )
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    missing = [k for k in keys if k not in raw]
    if missing:
        raise CheckpointError(f"config.json {rope_type} rope scaling lacks {missing}")
    try:
        return RopeScaling(
            rope_type=rope_type,
            factor=_as_float(raw["factor"]),
            low_freq_factor=_as_float(raw["low_freq_factor"]),
            high_freq_factor=_as_float(raw["high_freq_factor"]),
            original_max_position_embeddings=raw["original_max_position_embeddings"],
        )
    except ValueError as e:
        raise CheckpointError(f"invalid config.json rope scaling: {e}") from e


def _gguf_file_type_name(value: object) -> str:
    try:
        name = gguf.LlamaFileType(value).name
    except ValueError:
        return "unknown"
    return name.removeprefix("MOSTLY_").removeprefix("ALL_")


def _divide(numerator: object, denominator: object, what: str, by: str) -> object:
    if _is_positive_int(numerator) and _is_positive_int(denominator) and numerator % denominator == 0:
        return numerator // denominator
    raise CheckpointError(f"{what}={numerator!r} is not divisible by {by}={denominator!r}; cannot infer head_dim")


def _as_id_tuple(value: object) -> tuple[Any, ...]:
    if value is None:
        return ()
    if isinstance(value, list | tuple):
        return tuple(value)
    return (value,)


def _as_float(value: object) -> object:
    # JSON may spell 10000.0 as 10000; anything non-numeric is left for validation to report.
    return float(value) if _is_number(value) else value


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0
