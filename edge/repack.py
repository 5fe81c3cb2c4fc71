"""Lossless repack of GGML ``Q4_0`` / ``Q4_1`` / ``Q8_0`` blocks into ``MatMulNBits`` weights.

GGML quantizes each row in blocks of 32 along K, as ``MatMulNBits`` does with ``block_size=32``, so a
block's stored codes and scale can be used as they are instead of being rounded a second time onto a
new grid (ggml-common.h ``block_q4_0`` / ``block_q4_1`` / ``block_q8_0``)::

    type   bytes  block layout                 value          MatMulNBits
    Q4_0   18     d fp16, qs[16]               d * (q - 8)    4 bits: code q, zero point 8, scale d
    Q4_1   20     d fp16, m fp16, qs[16]       d * q + m      4 bits: code q, zero point 0, scale d; + m below
    Q8_0   34     d fp16, qs int8[32]          d * q          8 bits: code q + 128, zero point 128, scale d

In the 4-bit ``qs[16]`` byte j holds element j in its low nibble and element j + 16 in its high one.

``MatMulNBits`` has no per-block offset besides its integer zero point, so Q4_1's min ``m`` becomes a
correction term. For ``y = a @ W^T`` with ``W[n, k] = d[n, b] * q[n, k] + m[n, b]`` (``b = k // 32``)::

    y[t, n] = MatMulNBits(a; codes q, scales d, zero points 0)[t, n] + sum_b (sum_{k in b} a[t, k]) * m[n, b]
            = Gemm(ReduceSum(a.reshape(T, K / 32, 32), axis=-1), mins, C=MatMulNBits(...))   mins float32 [K/32, N]

which is exact up to float summation order. The zero point 0 is given explicitly (an omitted zero point
means 8 for 4 bits). The float32 mins add 4 bytes per block, ~19% over the 4-bit codes, scales and zero points.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edge.quantize import QuantizedWeight, dequantize_blockwise, pack_codes

GGML_BLOCK_SIZE = 32  # elements per Q4_0 / Q4_1 / Q8_0 block, along K
REPACKABLE_TYPES = {"Q4_0": 4, "Q4_1": 4, "Q8_0": 8}  # GGML type -> MatMulNBits bits
_BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}


@dataclass(frozen=True, slots=True)
class RepackedWeight:
    """A weight ``[N, K]`` as ``MatMulNBits`` codes plus, for Q4_1, the per-block mins it cannot hold."""

    weight: QuantizedWeight
    mins: np.ndarray | None  # float32 [num_blocks, N] (K-major for the correction MatMul), or None when all zero


def decode_blocks(ggml_type: str, blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """Unpack GGML blocks uint8 ``[rows, num_blocks, block_bytes]`` into ``MatMulNBits`` terms:
    (codes uint8 [rows, num_blocks, 32], zero points uint8 [rows, num_blocks], scales float32 [rows, num_blocks],
    mins float32 [rows, num_blocks] or None), with ``value = (code - zero_point) * scale + min``."""
    if ggml_type not in REPACKABLE_TYPES:
        raise ValueError(f"cannot repack GGML type {ggml_type!r}; repackable: {sorted(REPACKABLE_TYPES)}")
    if blocks.dtype != np.uint8 or blocks.ndim != 3 or blocks.shape[-1] != _BLOCK_BYTES[ggml_type]:
        raise ValueError(f"{ggml_type} blocks must be uint8 [rows, num_blocks, {_BLOCK_BYTES[ggml_type]}], "
                         f"got {blocks.dtype} {list(blocks.shape)}")

    def fp16_at(offset: int) -> np.ndarray:
        return np.ascontiguousarray(blocks[..., offset:offset + 2]).view(np.float16)[..., 0].astype(np.float32)

    scales = fp16_at(0)
    zero_points = np.full(blocks.shape[:2], 8 if ggml_type == "Q4_0" else 128 if ggml_type == "Q8_0" else 0, np.uint8)
    if ggml_type == "Q8_0":
        return blocks[..., 2:] ^ np.uint8(0x80), zero_points, scales, None  # int8 q -> uint8 q + 128
    qs = blocks[..., 4:] if ggml_type == "Q4_1" else blocks[..., 2:]  # [rows, num_blocks, 16]
    codes = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)  # elements 0..15 low nibbles, 16..31 high
    return codes, zero_points, scales, fp16_at(2) if ggml_type == "Q4_1" else None


def repack_blocks(ggml_type: str, blocks: np.ndarray) -> RepackedWeight:
    """The exact ``MatMulNBits`` form (block size 32) of a GGML matrix stored as ``blocks`` (:func:`decode_blocks`)."""
    codes, zero_points, scales, mins = decode_blocks(ggml_type, blocks)
    weight = pack_codes(codes, scales, zero_points, codes.shape[1] * GGML_BLOCK_SIZE, REPACKABLE_TYPES[ggml_type])
    return RepackedWeight(weight, None if mins is None else np.ascontiguousarray(mins.T))


def concat_repacked(parts: list[RepackedWeight]) -> RepackedWeight:
    """Stack weights along N (fused q/k/v or gate/up); they must share K and bits."""
    first = parts[0].weight
    if any(p.weight.k != first.k or p.weight.bits != first.bits for p in parts):
        raise ValueError(f"cannot fuse weights of (K, bits) {[(p.weight.k, p.weight.bits) for p in parts]}")
    weight = QuantizedWeight(
        packed=np.concatenate([p.weight.packed for p in parts]),
        scales=np.concatenate([p.weight.scales for p in parts]),
        zero_points=np.concatenate([p.weight.zero_points for p in parts]),  # whole bytes per row
        n=sum(p.weight.n for p in parts), k=first.k, bits=first.bits, block_size=first.block_size,
    )
    if all(p.mins is None for p in parts):
        return RepackedWeight(weight, None)
    mins = [p.mins if p.mins is not None else np.zeros((first.num_blocks, p.weight.n), np.float32) for p in parts]
    return RepackedWeight(weight, np.concatenate(mins, axis=1))


def dequantize_repacked(rw: RepackedWeight) -> np.ndarray:
    """The float32 ``[N, K]`` weight ``rw`` stands for."""
    w = dequantize_blockwise(rw.weight)
    if rw.mins is not None:
        w = w + np.repeat(rw.mins.T, rw.weight.block_size, axis=1)[:, : rw.weight.k]
    return w
