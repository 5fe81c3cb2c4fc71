"""Hugging Face checkpoints: config.json plus one or many safetensors shards, read lazily.

    model-dir/
        config.json                       -> ModelConfig.from_hf_dict
        generation_config.json            optional: eos ids
        model.safetensors                 one shard, or
        model.safetensors.index.json      {"weight_map": {tensor name: shard file}} + the shards

Each shard's header (8-byte little-endian length, then JSON) is parsed here once to validate
names, dtypes, shapes and byte ranges against the file size; tensors are then read one at a
time with ``safetensors.safe_open``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open  # the top-level package (absolute import)

from kernels.checkpoints.checkpoint import Checkpoint
from kernels.checkpoints.config import ModelConfig
from kernels.errors import CheckpointError

INDEX_FILE = "model.safetensors.index.json"
# safetensors dtype -> (torch dtype name, bytes per element)
SUPPORTED_DTYPES = {"F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2)}


@dataclass(frozen=True, slots=True)
class _StoredTensor:
    shard: Path
    dtype: str  # safetensors spelling: "BF16"
    shape: tuple[int, ...]
    begin: int  # absolute byte offsets in the shard
    end: int


class SafetensorsCheckpoint(Checkpoint):
    """An HF model directory (llama or qwen2) with safetensors weights."""

    format = "hf"

    def __init__(self, directory: Path) -> None:
        config_dict = _read_json(directory / "config.json")
        generation_path = directory / "generation_config.json"
        generation = _read_json(generation_path) if generation_path.is_file() else None
        config = ModelConfig.from_hf_dict(config_dict, generation)
        stored = _index_tensors(directory)
        embed = stored.get("model.embed_tokens.weight")
        if embed is not None and embed.dtype in SUPPORTED_DTYPES:
            config = dataclasses.replace(config, torch_dtype=SUPPORTED_DTYPES[embed.dtype][0])
        super().__init__(directory, config, config_dict)
        self._stored: dict[str, _StoredTensor] = {}
        for name, expected_shape in self._shapes.items():
            tensor = stored.get(name)
            if tensor is None:
                shards = sorted({t.shard.name for t in stored.values()})
                raise CheckpointError(f"{directory}: tensor {name!r} is missing (looked in {shards})")
            if tensor.dtype not in SUPPORTED_DTYPES:
                supported = ", ".join(SUPPORTED_DTYPES)
                raise CheckpointError(
                    f"{tensor.shard}: tensor {name!r} has dtype {tensor.dtype}; supported: {supported}"
                )
            if tensor.shape != expected_shape:
                raise CheckpointError(
                    f"{tensor.shard}: tensor {name!r} has shape {list(tensor.shape)}, "
                    f"expected {list(expected_shape)} from config.json"
                )
            self._stored[name] = tensor
        self._handles: dict[Path, Any] = {}
        self._maps: dict[Path, np.memmap] = {}

    def quant_types(self) -> dict[str, str]:
        return {name: t.dtype for name, t in self._stored.items()}

    def _read(self, name: str, narrow: tuple[int, int, int] | None) -> torch.Tensor:
        tensor = self._stored[name]
        try:
            handle = self._handles.get(tensor.shard)
            if handle is None:
                handle = self._handles[tensor.shard] = safe_open(str(tensor.shard), framework="pt")
            if narrow is None:
                out = handle.get_tensor(name)
            else:
                dim, start, end = narrow
                out = handle.get_slice(name)[(slice(None),) * dim + (slice(start, end),)]
        except SafetensorError as e:
            raise CheckpointError(f"{tensor.shard}: cannot read tensor {name!r}: {e}") from e
        # safe_open hands out views of one shared memory map: a caller writing into its tensor
        # would change what the next get_tensor returns. Give every caller its own copy.
        return out.clone(memory_format=torch.contiguous_format)

    def _raw_bytes(self, name: str) -> tuple[str, tuple[int, ...], memoryview]:
        tensor = self._stored[name]
        mapped = self._maps.get(tensor.shard)
        if mapped is None:
            mapped = self._maps[tensor.shard] = np.memmap(tensor.shard, dtype=np.uint8, mode="r")
        return tensor.dtype, tensor.shape, memoryview(mapped[tensor.begin : tensor.end])


def _index_tensors(directory: Path) -> dict[str, _StoredTensor]:
    """Every tensor stored in the directory's shards, validated against the files."""
    index_path = directory / INDEX_FILE
    if not index_path.is_file():
        stored: dict[str, _StoredTensor] = {}
        for shard in sorted(directory.glob("*.safetensors")):
            for name, tensor in _read_header(shard).items():
                if name in stored:
                    raise CheckpointError(
                        f"{directory}: tensor {name!r} is in both {stored[name].shard.name} and {shard.name}"
                    )
                stored[name] = tensor
        return stored

    weight_map = _read_json(index_path).get("weight_map")
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index_path} has no 'weight_map' object")
    headers: dict[str, dict[str, _StoredTensor]] = {}
    for name, shard_name in weight_map.items():
        if shard_name not in headers:
            shard = directory / str(shard_name)
            if not shard.is_file():
                raise CheckpointError(f"{index_path} puts {name!r} in {shard_name!r}, which does not exist")
            headers[shard_name] = _read_header(shard)
    stored = {}
    for name, shard_name in weight_map.items():
        if name not in headers[shard_name]:
            raise CheckpointError(f"{index_path} puts {name!r} in {shard_name!r}, but that shard does not hold it")
        stored[name] = headers[shard_name][name]
    return stored


def _read_header(shard: Path) -> dict[str, _StoredTensor]:
    size = shard.stat().st_size
    with open(shard, "rb") as f:
        prefix = f.read(8)
        header_size = int.from_bytes(prefix, "little")
        if len(prefix) < 8 or header_size > size - 8:
            raise CheckpointError(f"{shard} is truncated or not a safetensors file ({size} bytes)")
        try:
            header = json.loads(f.read(header_size))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{shard} is corrupt: its header is not JSON ({e})") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{shard} is corrupt: its header is not a JSON object")
    data_start = 8 + header_size
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape = str(info["dtype"]), tuple(int(d) for d in info["shape"])
            begin, end = (int(offset) for offset in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{shard} is corrupt: bad header entry for {name!r}: {info!r}") from e
        if data_start + end > size:
            raise CheckpointError(
                f"{shard} is truncated: tensor {name!r} needs bytes up to {data_start + end}, the file has {size}"
            )
        if dtype in SUPPORTED_DTYPES and end - begin != math.prod(shape) * SUPPORTED_DTYPES[dtype][1]:
            raise CheckpointError(
                f"{shard} is corrupt: tensor {name!r} of shape {list(shape)} spans {end - begin} bytes"
            )
        tensors[name] = _StoredTensor(shard, dtype, shape, data_start + begin, data_start + end)
    return tensors


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from e
    if not isinstance(value, dict):
        raise CheckpointError(f"{path} is not a JSON object")
    return value
