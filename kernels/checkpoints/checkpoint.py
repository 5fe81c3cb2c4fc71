"""One read-only view of a model checkpoint, whatever its file format.

Both engines see weights through :class:`Checkpoint`: HF tensor names, HF orientation
(``[out_features, in_features]``), dequantized to the dtype they ask for, one tensor at a time
so a tensor-parallel rank reads only its shards. :func:`load_checkpoint` picks the format:

    path                                        loader
    file starting with b"GGUF" (*.gguf)         GGUFCheckpoint
    dir with config.json + *.safetensors        SafetensorsCheckpoint (one file or an index + shards)
    dir with exactly one *.gguf                 GGUFCheckpoint
    anything else                               CheckpointError
"""

from __future__ import annotations

import hashlib
import json
import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

import torch

from kernels.checkpoints.config import ModelConfig
from kernels.errors import CheckpointError


def hf_tensor_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a checkpoint of ``config`` holds, in HF naming and load order, with its shape."""
    q_size = config.num_heads * config.head_dim
    kv_size = config.num_kv_heads * config.head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (config.vocab_size, config.hidden_size)}
    for i in range(config.num_layers):
        layer = f"model.layers.{i}"
        shapes[f"{layer}.input_layernorm.weight"] = (config.hidden_size,)
        for proj, out_size in (("q_proj", q_size), ("k_proj", kv_size), ("v_proj", kv_size)):
            shapes[f"{layer}.self_attn.{proj}.weight"] = (out_size, config.hidden_size)
            if config.attention_bias:
                shapes[f"{layer}.self_attn.{proj}.bias"] = (out_size,)
        shapes[f"{layer}.self_attn.o_proj.weight"] = (config.hidden_size, q_size)
        shapes[f"{layer}.post_attention_layernorm.weight"] = (config.hidden_size,)
        shapes[f"{layer}.mlp.gate_proj.weight"] = (config.intermediate_size, config.hidden_size)
        shapes[f"{layer}.mlp.up_proj.weight"] = (config.intermediate_size, config.hidden_size)
        shapes[f"{layer}.mlp.down_proj.weight"] = (config.hidden_size, config.intermediate_size)
    shapes["model.norm.weight"] = (config.hidden_size,)
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, config.hidden_size)
    return shapes


class Checkpoint(ABC):
    """A loaded checkpoint: config, raw metadata and lazily read tensors.

    >>> ckpt = load_checkpoint("SmolLM2-135M-Instruct.Q4_1.gguf")  # doctest: +SKIP
    >>> ckpt.config.num_layers, ckpt.get_tensor("model.norm.weight").shape  # doctest: +SKIP
    (30, torch.Size([576]))
    """

    format: ClassVar[str]  # "gguf" | "hf"

    def __init__(self, path: Path, config: ModelConfig, metadata: dict[str, Any]) -> None:
        self._path = path
        self._config = config
        self._metadata = metadata
        self._shapes = hf_tensor_shapes(config)
        self._fingerprint: str | None = None

    @property
    def path(self) -> Path:
        """The file (GGUF) or directory (HF) this checkpoint was read from."""
        return self._path

    @property
    def config(self) -> ModelConfig:
        return self._config

    @property
    def metadata(self) -> dict[str, Any]:
        """Raw GGUF key/values (``tokenizer.ggml.*``, ``tokenizer.chat_template``...) or the HF config.json."""
        return self._metadata

    def tensor_names(self) -> list[str]:
        """HF names of every tensor the model needs (``lm_head.weight`` only when untied)."""
        return list(self._shapes)

    def tensor_shape(self, name: str) -> tuple[int, ...]:
        """HF-oriented shape of ``name``, without reading it."""
        self._check_name(name)
        return self._shapes[name]

    def get_tensor(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Read (and dequantize) one tensor into a new ``dtype`` tensor in HF layout."""
        self._check_name(name)
        return self._read(name, None).to(dtype)

    def get_tensor_slice(
        self, name: str, dim: int, start: int, end: int, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """``get_tensor(name)`` narrowed to ``[start, end)`` along ``dim``, reading as little as the format allows."""
        shape = self.tensor_shape(name)
        if not 0 <= dim < len(shape):
            raise ValueError(f"dim {dim} out of range for {name} with shape {shape}")
        if not 0 <= start < end <= shape[dim]:
            raise ValueError(f"slice [{start}, {end}) out of range for dim {dim} of {name} with shape {shape}")
        return self._read(name, (dim, start, end)).to(dtype).contiguous()

    @abstractmethod
    def quant_types(self) -> dict[str, str]:
        """Storage type of each tensor: a GGML type name ("Q4_1", "F32") or a safetensors dtype ("BF16")."""

    @property
    def fingerprint(self) -> str:
        """sha256 hex of the config and of every stored tensor's name, type, shape and raw bytes.

        Identical files give identical fingerprints; any changed weight byte or config field
        changes it. Computed once, on first use (about 0.1 s per 100 MB from the page cache).
        """
        if self._fingerprint is None:
            h = hashlib.sha256()
            h.update(json.dumps(self._config.to_dict(), sort_keys=True).encode())
            for name in self._shapes:
                stored_type, stored_shape, raw = self._raw_bytes(name)
                h.update(f"\n{name}|{stored_type}|{list(stored_shape)}|{raw.nbytes}\n".encode())
                h.update(raw)
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    def __repr__(self) -> str:
        cfg = self._config
        return f"{type(self).__name__}(path={str(self._path)!r}, arch={cfg.arch!r}, num_layers={cfg.num_layers})"

    def _check_name(self, name: str) -> None:
        if name not in self._shapes:
            hint = " (embeddings are tied: use model.embed_tokens.weight)" if name == "lm_head.weight" else ""
            raise KeyError(f"{name!r} is not a tensor of {self._path}{hint}")

    @abstractmethod
    def _read(self, name: str, narrow: tuple[int, int, int] | None) -> torch.Tensor:
        """HF-layout tensor, optionally narrowed to ``(dim, start, end)``; any float dtype."""

    @abstractmethod
    def _raw_bytes(self, name: str) -> tuple[str, tuple[int, ...], memoryview]:
        """(stored type, stored shape, stored bytes) of one tensor, for the fingerprint."""


def load_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Open a GGUF file, an HF safetensors directory or a directory holding one GGUF file."""
    # Imported here: both modules subclass Checkpoint from this one.
    from kernels.checkpoints.gguf import GGUFCheckpoint, is_gguf_file
    from kernels.checkpoints.safetensors import SafetensorsCheckpoint

    path = Path(path)
    expected = "a .gguf file, or a directory with config.json and *.safetensors (or exactly one .gguf)"
    if not path.exists():
        raise CheckpointError(f"{path} does not exist; expected {expected}")
    if path.is_file():
        if path.suffix.lower() == ".gguf" or is_gguf_file(path):
            return GGUFCheckpoint(path)
        raise CheckpointError(f"{path} is neither a GGUF file nor a directory; expected {expected}")
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a regular file or directory; expected {expected}")

    entries = sorted(p.name for p in path.iterdir())
    has_safetensors = any(n.endswith((".safetensors", ".safetensors.index.json")) for n in entries)
    if (path / "config.json").is_file() and has_safetensors:
        return SafetensorsCheckpoint(path)
    ggufs = [n for n in entries if n.lower().endswith(".gguf")]
    if len(ggufs) == 1:
        return GGUFCheckpoint(path / ggufs[0])
    if len(ggufs) > 1:
        raise CheckpointError(f"{path} holds {len(ggufs)} GGUF files {ggufs}; pass the one to load")
    if has_safetensors:
        raise CheckpointError(f"{path} has *.safetensors but no config.json; expected {expected}")
    shown = entries[:10] + (["..."] if len(entries) > 10 else [])
    raise CheckpointError(f"{path} holds no model weights (found {shown}); expected {expected}")
