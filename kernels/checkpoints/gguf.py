"""GGUF checkpoints (llama.cpp): memory-mapped, dequantized one tensor at a time.

GGUF stores llama's Q and K projections with their rows permuted: llama.cpp's
``convert_hf_to_gguf.py`` turns HF's rotate-half RoPE pairing (dims ``i`` and ``i + head_dim/2``)
into GGML's interleaved one (dims ``2i`` and ``2i + 1``), per head:

    HF rows of one head     [r0 r1 ... r(d/2-1) | s0 s1 ... s(d/2-1)]
    GGUF rows of that head  [r0 s0 r1 s1 ...]

We undo it on load (as transformers' ``LlamaTensorProcessor`` does), with ``num_kv_heads`` heads
for K. Qwen2 is converted without the permutation, so its tensors load as stored.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import gguf  # the top-level package (absolute import), not this module
import numpy as np
import torch
from gguf import GGMLQuantizationType as QType

from kernels.checkpoints.checkpoint import Checkpoint
from kernels.checkpoints.config import ModelConfig
from kernels.errors import CheckpointError

# Types gguf.quants can dequantize that we accept (the first row is what our tests cover).
SUPPORTED_GGML_TYPES = frozenset(
    {
        QType.F32,
        QType.F16,
        QType.BF16,
        QType.Q8_0,
        QType.Q4_0,
        QType.Q4_1,
        QType.Q4_K,
        QType.Q6_K,
        QType.Q5_0,
        QType.Q5_1,
        QType.Q2_K,
        QType.Q3_K,
        QType.Q5_K,
    }
)

# HF name suffix -> llama.cpp name suffix (gguf-py MODEL_TENSOR names); global tensors first.
_GLOBAL_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def gguf_tensor_name(hf_name: str) -> str:
    """llama.cpp name of an HF tensor name: ``model.layers.3.mlp.up_proj.weight`` -> ``blk.3.ffn_up.weight``."""
    if hf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[hf_name]
    prefix, _, rest = hf_name.partition("model.layers.")
    layer, _, suffix = rest.partition(".")
    if prefix or not layer.isdigit() or suffix not in _LAYER_NAMES:
        raise KeyError(f"no GGUF name for tensor {hf_name!r}")
    return f"blk.{layer}.{_LAYER_NAMES[suffix]}"


def is_gguf_file(path: Path) -> bool:
    """True when ``path`` starts with the GGUF magic."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e}") from e


class GGUFCheckpoint(Checkpoint):
    """A llama.cpp GGUF file (llama or qwen2) seen in HF naming and layout."""

    format = "gguf"

    def __init__(self, path: Path) -> None:
        reader = _open_reader(path)
        metadata = _read_metadata(reader)
        stored = {t.name: t for t in reader.tensors}
        shapes = {name: tuple(int(d) for d in reversed(t.shape.tolist())) for name, t in stored.items()}
        torch_dtype = None  # from general.file_type when present, else the most common matrix type
        if "general.file_type" not in metadata:
            counts = Counter(t.tensor_type.name for t in reader.tensors if len(t.shape) == 2)
            torch_dtype = counts.most_common(1)[0][0] if counts else "unknown"
        config = ModelConfig.from_gguf_metadata(metadata, shapes, torch_dtype=torch_dtype)
        super().__init__(path, config, metadata)
        self._tensors: dict[str, gguf.ReaderTensor] = {}
        for name, expected_shape in self._shapes.items():
            gguf_name = gguf_tensor_name(name)
            tensor = stored.get(gguf_name)
            if tensor is None:
                raise CheckpointError(f"{path}: tensor {gguf_name!r} ({name}) is missing")
            if tensor.tensor_type not in SUPPORTED_GGML_TYPES:
                supported = ", ".join(sorted(t.name for t in SUPPORTED_GGML_TYPES))
                raise CheckpointError(
                    f"{path}: tensor {gguf_name!r} has GGML type {tensor.tensor_type.name}, "
                    f"which we cannot dequantize; supported: {supported}"
                )
            if shapes[gguf_name] != expected_shape:
                raise CheckpointError(
                    f"{path}: tensor {gguf_name!r} has shape {list(shapes[gguf_name])}, "
                    f"expected {list(expected_shape)} from the metadata"
                )
            self._tensors[name] = tensor

    def quant_types(self) -> dict[str, str]:
        return {name: t.tensor_type.name for name, t in self._tensors.items()}

    def raw_blocks(self, name: str) -> tuple[str, np.ndarray]:
        """(GGML type name, stored blocks uint8 ``[rows, blocks_per_row, block_bytes]``) of a block-quantized matrix.

        Rows are in HF order (llama's Q/K rows un-permuted, a row gather that leaves each row's blocks
        intact); blocks run along the input dimension. No dequantization: this is the stored data, for
        consumers that repack GGML blocks losslessly. The array may be a read-only view of the file.
        """
        self._check_name(name)
        tensor = self._tensors[name]
        if tensor.data.dtype != np.uint8 or len(self._shapes[name]) != 2:
            raise ValueError(f"{name} is stored as {tensor.tensor_type.name} {list(self._shapes[name])}, "
                             f"not as a block-quantized matrix")
        _, block_bytes = gguf.GGML_QUANT_SIZES[tensor.tensor_type]
        rows = self._shapes[name][0]
        blocks = tensor.data.reshape(rows, -1, block_bytes)
        n_head = self._permuted_heads(name)
        return tensor.tensor_type.name, _unpermute(blocks, n_head) if n_head else blocks

    def _read(self, name: str, narrow: tuple[int, int, int] | None) -> torch.Tensor:
        tensor = self._tensors[name]
        n_head = self._permuted_heads(name)
        plan = self._stored_slice(tensor, n_head, *narrow) if narrow is not None else None
        data, heads = plan if plan is not None else (tensor.data, n_head)
        values = _dequantize(data, tensor.tensor_type)
        if heads:
            values = _unpermute(values, heads)
        out = _to_torch(values)
        if narrow is not None and plan is None:
            dim, start, end = narrow
            out = out.narrow(dim, start, end - start).clone()
        return out

    def _stored_slice(
        self, tensor: gguf.ReaderTensor, n_head: int, dim: int, start: int, end: int
    ) -> tuple[np.ndarray, int] | None:
        """The stored bytes of a slice and its head count, or None when it must be cut after dequantizing."""
        data = tensor.data  # numpy order: [out, in] elements, or [out, bytes per row] for block types
        last = data.ndim - 1
        heads = n_head
        if n_head and dim == 0:
            head_dim = self._config.head_dim
            if start % head_dim or end % head_dim:
                return None  # the permutation mixes rows within a head
            heads = (end - start) // head_dim
        if dim < last:
            return data[start:end], heads
        if data.dtype != np.uint8:  # F32 / F16: one element per item
            return data[..., start:end], heads
        block_size, type_size = gguf.GGML_QUANT_SIZES[tensor.tensor_type]
        if start % block_size or end % block_size:
            return None  # the slice cuts through a quantization block
        return data[..., start // block_size * type_size : end // block_size * type_size], heads

    def _permuted_heads(self, name: str) -> int:
        """Heads to un-permute over for llama's Q/K tensors (weights and biases), else 0."""
        if self._config.arch != "llama":
            return 0
        if ".self_attn.q_proj." in name:
            return self._config.num_heads
        if ".self_attn.k_proj." in name:
            return self._config.num_kv_heads
        return 0

    def _raw_bytes(self, name: str) -> tuple[str, tuple[int, ...], memoryview]:
        tensor = self._tensors[name]
        raw = np.ascontiguousarray(tensor.data).reshape(-1).view(np.uint8)
        return tensor.tensor_type.name, tuple(int(d) for d in tensor.shape), memoryview(raw)


def _open_reader(path: Path) -> gguf.GGUFReader:
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e}") from e
    if len(magic) < 4:
        raise CheckpointError(f"{path} is truncated or not a GGUF file: it has only {size} bytes")
    if magic != b"GGUF":
        raise CheckpointError(f"{path} is not a GGUF file: it starts with {magic!r}, expected b'GGUF'")
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, IndexError, KeyError, TypeError, OverflowError, UnicodeDecodeError) as e:
        raise CheckpointError(
            f"{path} is truncated or not a valid GGUF file ({size} bytes; reader failed with {type(e).__name__}: {e})"
        ) from e
    for tensor in reader.tensors:
        end = tensor.data_offset + tensor.n_bytes
        if end > size or tensor.data.nbytes != tensor.n_bytes:
            raise CheckpointError(
                f"{path} is truncated: tensor {tensor.name!r} needs bytes up to {end} but the file has {size}"
            )
    return reader


def _read_metadata(reader: gguf.GGUFReader) -> dict[str, Any]:
    metadata: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):  # version and counts, not key/values
            continue
        try:
            value = field.contents()
        except UnicodeDecodeError as e:
            raise CheckpointError(f"GGUF metadata {key!r} is not valid UTF-8: {e}") from e
        if field.types == [gguf.GGUFValueType.FLOAT32]:
            value = float(str(np.float32(value)))  # shortest round-trip: 1e-05, not 9.999999747378752e-06
        metadata[key] = value
    return metadata


def _dequantize(data: np.ndarray, qtype: QType) -> np.ndarray:
    """float32 values of a stored block; always a fresh, writable array."""
    values = gguf.quants.dequantize(data, qtype)
    if not values.flags.writeable or np.may_share_memory(values, data):
        values = np.array(values, dtype=np.float32)
    return values


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """GGML interleaved RoPE rows -> HF rotate-half rows (inverse of llama.cpp's ``permute``)."""
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _to_torch(values: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))
