"""Block-wise weight quantization into ONNX Runtime's ``MatMulNBits`` layout, and its numpy inverse.

Round-to-nearest, asymmetric, one (scale, zero point) per block of ``block_size`` weights along K
(the input dimension), as ORT's own ``MatMulNBitsQuantizer`` / ``MlasQuantizeBlockwise`` does: the
block range is widened to contain 0 so the zero point is an exact integer code. Dequantization is
``w = (code - zero_point) * scale``.

``MatMulNBits`` (com.microsoft) input layout, for a weight ``W [N, K]`` (HF ``[out, in]`` orientation):

    B            uint8 [N, num_blocks, blob_size]   blob_size = block_size * bits / 8; codes packed
                                                    low-first along K (4 bits: element 2j in the low
                                                    nibble, 2j+1 in the high nibble)
    scales       float [N * num_blocks]
    zero_points  uint8 [N * ceil(num_blocks * bits / 8)]  packed low-first per row like B

``num_blocks = ceil(K / block_size)``; a ragged last block is padded with zero weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SUPPORTED_BITS = (4, 8)


@dataclass(frozen=True, slots=True)
class QuantizedWeight:
    """One weight ``[N, K]`` in ``MatMulNBits`` layout."""

    packed: np.ndarray  # uint8 [N, num_blocks, blob_size]
    scales: np.ndarray  # float32 [N * num_blocks]
    zero_points: np.ndarray  # uint8 [N * ceil(num_blocks * bits / 8)]
    n: int
    k: int
    bits: int
    block_size: int

    @property
    def num_blocks(self) -> int:
        return -(-self.k // self.block_size)


def check_quant_params(bits: int, block_size: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")
    # MatMulNBits needs a power of two >= 16.
    if not isinstance(block_size, int) or block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two >= 16, got {block_size!r}")


def quantize_blockwise(weight: np.ndarray, bits: int = 4, block_size: int = 32) -> QuantizedWeight:
    """Quantize ``weight [N, K]`` (float) to ``bits`` per element, asymmetric, per block along K."""
    check_quant_params(bits, block_size)
    if weight.ndim != 2:
        raise ValueError(f"weight must be 2-d [N, K], got shape {weight.shape}")
    n, k = weight.shape
    num_blocks = -(-k // block_size)
    w = np.zeros((n, num_blocks * block_size), dtype=np.float32)
    w[:, :k] = weight
    w = w.reshape(n, num_blocks, block_size)
    max_code = (1 << bits) - 1
    lo = np.minimum(w.min(axis=-1), 0.0)  # [N, num_blocks]
    hi = np.maximum(w.max(axis=-1), 0.0)
    scales = ((hi - lo) / max_code).astype(np.float32)
    safe = np.where(scales == 0, 1.0, scales).astype(np.float32)
    zero_points = np.clip(np.rint(-lo / safe), 0, max_code).astype(np.uint8)  # [N, num_blocks]
    codes = np.clip(np.rint(w / safe[..., None]) + zero_points[..., None], 0, max_code).astype(np.uint8)
    return pack_codes(codes, scales, zero_points, k, bits)


def pack_codes(codes: np.ndarray, scales: np.ndarray, zero_points: np.ndarray, k: int, bits: int) -> QuantizedWeight:
    """``MatMulNBits`` layout of unpacked codes uint8 ``[N, num_blocks, block_size]`` with float32 ``scales`` and
    uint8 ``zero_points`` ``[N, num_blocks]`` (codes past ``k`` in a ragged last block should be zero points)."""
    n, num_blocks, block_size = codes.shape
    return QuantizedWeight(
        packed=_pack_rows(codes.reshape(n, -1), bits).reshape(n, num_blocks, block_size * bits // 8),
        scales=np.ascontiguousarray(scales, dtype=np.float32).reshape(-1),
        zero_points=_pack_rows(zero_points, bits).reshape(-1),
        n=n, k=k, bits=bits, block_size=block_size,
    )


def unpack_codes(qw: QuantizedWeight) -> tuple[np.ndarray, np.ndarray]:
    """(codes uint8 [N, num_blocks, block_size], zero_points uint8 [N, num_blocks]) of ``qw``."""
    codes = _unpack_rows(qw.packed.reshape(qw.n, -1), qw.bits, qw.num_blocks * qw.block_size)
    zero_points = _unpack_rows(qw.zero_points.reshape(qw.n, -1), qw.bits, qw.num_blocks)
    return codes.reshape(qw.n, qw.num_blocks, qw.block_size), zero_points


def dequantize_blockwise(qw: QuantizedWeight) -> np.ndarray:
    """The float32 ``[N, K]`` weight ``qw`` stands for: ``(code - zero_point) * scale``."""
    codes, zero_points = unpack_codes(qw)
    scales = qw.scales.reshape(qw.n, qw.num_blocks)
    w = (codes.astype(np.float32) - zero_points[..., None].astype(np.float32)) * scales[..., None]
    return w.reshape(qw.n, -1)[:, : qw.k]


def _pack_rows(codes: np.ndarray, bits: int) -> np.ndarray:
    """uint8 codes [rows, cols] -> [rows, ceil(cols * bits / 8)], low-first."""
    if bits == 8:
        return np.ascontiguousarray(codes, dtype=np.uint8)
    rows, cols = codes.shape
    if cols % 2:
        codes = np.concatenate([codes, np.zeros((rows, 1), dtype=np.uint8)], axis=1)
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8)


def _unpack_rows(packed: np.ndarray, bits: int, cols: int) -> np.ndarray:
    if bits == 8:
        return packed[:, :cols].copy()
    out = np.empty((packed.shape[0], packed.shape[1] * 2), dtype=np.uint8)
    out[:, 0::2] = packed & 0x0F
    out[:, 1::2] = packed >> 4
    return out[:, :cols]
