"""Weights for ``hybrid_gateway::BlockQuantMatMul`` (``edge/csrc/block_quant_gemm.h``), and its numpy reference.

The op's weights are GGML's own block formats, so a GGUF's Q4_0 / Q4_1 / Q8_0 matrices are used exactly as
stored (Q4_1's float block mins included, which ``MatMulNBits`` cannot hold). Per block of 32 along K::

    bits  value of element i of block b     GGML    scale  min
    4     scale[b] * code + min[b], 0..15   Q4_0    d      -8 d (exact in fp16)
                                            Q4_1    d      m
    8     scale[b] * code, -127..127        Q8_0    d      -

scales and mins are fp16. :class:`BlockQuantWeight` keeps codes in element order; :meth:`BlockQuantWeight.packed`
lays them out for the kernel, rows in tiles of 8 (``N`` padded with zero rows), ``KB = ceil(K / 32)``::

    codes   4-bit  uint8 [N/8, KB, 128] = [.., 4 groups g, 8 rows r, 4 c]: code(r, 8g + c) | code(r, 8g + 4 + c) << 4
            8-bit  uint8 [N/8, KB, 256] = [.., 8 groups g, 8 rows r, 4 c]: code(r, 4g + c) as an int8 bit pattern
    scales  float16 [N/8, KB, 8]     mins  float16 [N/8, KB, 8] (4-bit only)

so one 32-byte vector holds four consecutive elements of each of a tile's 8 rows (the kernel's comment says why).

Float weights (``source="requantize"``, or GGUF types other than these three) are quantized here the way
GGML's reference quantizers do: 4-bit as Q4_1 (``min`` = the block minimum, ``scale`` = range / 15, both
rounded to fp16 before the codes are chosen), 8-bit as Q8_0 (``scale`` = max |w| / 127).

The op quantizes its input x per block of 32 to int8 (``scale`` = max |x| / 127, round half to even), so the
exact result it computes is :func:`reference_matmul`; against the float weights it differs by that rounding
(~0.5% of a dot product's magnitude, the same as ``MatMulNBits``' ``accuracy_level`` 4).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BLOCK = 32
TILE = 8  # weight rows per kernel tile
BLOCK_TYPES = {"Q4_0": 4, "Q4_1": 4, "Q8_0": 8}  # GGML types the op takes as stored
_GGML_BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}


@dataclass(frozen=True, slots=True)
class BlockQuantWeight:
    """A weight ``[n, k]`` as integer codes per block of 32 (element order) with fp16 scales (and mins)."""

    codes: np.ndarray  # [n, kb, 32]: uint8 0..15 (bits 4) or int8 -127..127 (bits 8)
    scales: np.ndarray  # float16 [n, kb]
    mins: np.ndarray | None  # float16 [n, kb] (bits 4), None (bits 8)
    n: int
    k: int
    bits: int

    @property
    def kb(self) -> int:
        return self.codes.shape[1]

    @property
    def nbytes(self) -> int:
        """Bytes the kernel reads for the whole matrix."""
        tiles = -(-self.n // TILE)
        per_block = (128 if self.bits == 4 else 256) + 2 * TILE * (2 if self.bits == 4 else 1)
        return tiles * self.kb * per_block

    def packed(self) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(codes, scales, mins) in the kernel's tiled layout (module docstring)."""
        tiles, kb = -(-self.n // TILE), self.kb
        codes = _pad_rows(self.codes, tiles * TILE).reshape(tiles, TILE, kb, BLOCK)
        if self.bits == 4:
            c = codes.reshape(tiles, TILE, kb, 4, 2, 4).transpose(0, 2, 3, 1, 4, 5)  # t, b, g, r, half, c
            packed = (c[..., 0, :] | (c[..., 1, :] << 4)).astype(np.uint8)
        else:
            packed = codes.reshape(tiles, TILE, kb, 8, 4).transpose(0, 2, 3, 1, 4).view(np.uint8)
        packed = np.ascontiguousarray(packed).reshape(tiles, kb, -1)

        def tiled(a: np.ndarray) -> np.ndarray:
            return np.ascontiguousarray(_pad_rows(a, tiles * TILE).reshape(tiles, TILE, kb).transpose(0, 2, 1))

        return packed, tiled(self.scales), None if self.mins is None else tiled(self.mins)


@dataclass(frozen=True, slots=True)
class RescoredHead:
    """An LM head read at 4 bits and kept exact at 8 (``BlockQuantMatMul``'s ``rescore``): ``scan`` gives every
    logit, then each row's ``top`` largest, and the rest of their 8-row tiles, are computed again from ``exact``."""

    scan: BlockQuantWeight  # 4-bit
    exact: BlockQuantWeight  # 8-bit, the same [n, k]
    top: int

    def __post_init__(self) -> None:
        if (self.scan.bits, self.exact.bits) != (4, 8) or (self.scan.n, self.scan.k) != (self.exact.n, self.exact.k):
            raise ValueError(f"a rescored head needs a 4-bit scan and an 8-bit exact weight of one shape, got "
                             f"{self.scan.bits}-bit [{self.scan.n}, {self.scan.k}] and {self.exact.bits}-bit "
                             f"[{self.exact.n}, {self.exact.k}]")
        if self.top < 1:
            raise ValueError(f"top must be >= 1, got {self.top}")


def reference_rescored(x: np.ndarray, head: RescoredHead) -> np.ndarray:
    """What ``BlockQuantMatMul`` with ``rescore=head.top`` computes for ``x [m, k]`` (up to float summation order
    and ties at the ``top``-th value): the 4-bit logits, with the tiles holding each row's ``top`` best from the
    8-bit weights."""
    y = reference_matmul(x, head.scan)
    exact = reference_matmul(x, head.exact)
    top = min(head.top, head.scan.n)
    for m in range(y.shape[0]):
        best = np.argpartition(-y[m], top - 1)[:top]
        for t in np.unique(best // TILE):
            y[m, t * TILE:(t + 1) * TILE] = exact[m, t * TILE:(t + 1) * TILE]
    return y


def _pad_rows(a: np.ndarray, rows: int) -> np.ndarray:
    if a.shape[0] == rows:
        return a
    return np.concatenate([a, np.zeros((rows - a.shape[0], *a.shape[1:]), a.dtype)])


def from_ggml(ggml_type: str, blocks: np.ndarray) -> BlockQuantWeight:
    """The op's form of a GGML matrix stored as uint8 ``blocks [rows, num_blocks, block_bytes]`` (exact)."""
    if ggml_type not in BLOCK_TYPES:
        raise ValueError(f"cannot take GGML type {ggml_type!r} as stored; supported: {sorted(BLOCK_TYPES)}")
    if blocks.dtype != np.uint8 or blocks.ndim != 3 or blocks.shape[-1] != _GGML_BLOCK_BYTES[ggml_type]:
        raise ValueError(f"{ggml_type} blocks must be uint8 [rows, num_blocks, {_GGML_BLOCK_BYTES[ggml_type]}], "
                         f"got {blocks.dtype} {list(blocks.shape)}")
    n, num_blocks, _ = blocks.shape

    def fp16_at(offset: int) -> np.ndarray:
        return np.ascontiguousarray(np.ascontiguousarray(blocks[..., offset:offset + 2]).view(np.float16)[..., 0])

    scales = fp16_at(0)
    if ggml_type == "Q8_0":
        return BlockQuantWeight(np.ascontiguousarray(blocks[..., 2:]).view(np.int8), scales, None, n,
                                num_blocks * BLOCK, 8)
    if ggml_type == "Q4_1":
        mins, qs = fp16_at(2), blocks[..., 4:]
    else:  # Q4_0: d * (q - 8) = d * q + (-8 d); times 8 is exact in fp16
        mins, qs = (scales.astype(np.float32) * -8).astype(np.float16), blocks[..., 2:]
    codes = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)  # byte j: element j low, j + 16 high
    return BlockQuantWeight(codes, scales, mins, n, num_blocks * BLOCK, 4)


def quantize(weight: np.ndarray, bits: int = 4) -> BlockQuantWeight:
    """Quantize a float ``weight [n, k]``: 4 bits as Q4_1, 8 bits as Q8_0 (module docstring)."""
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits!r}")
    if weight.ndim != 2:
        raise ValueError(f"weight must be 2-d [N, K], got shape {weight.shape}")
    n, k = weight.shape
    kb = -(-k // BLOCK)
    w = np.zeros((n, kb * BLOCK), np.float32)
    w[:, :k] = weight
    w = w.reshape(n, kb, BLOCK)
    if bits == 8:
        scales = (np.abs(w).max(axis=-1) / 127).astype(np.float16)
        s = scales.astype(np.float32)[..., None]
        codes = np.clip(np.rint(np.divide(w, s, out=np.zeros_like(w), where=s != 0)), -127, 127).astype(np.int8)
        return BlockQuantWeight(codes, scales, None, n, k, 8)
    mins = w.min(axis=-1).astype(np.float16)
    scales = ((w.max(axis=-1) - mins.astype(np.float32)) / 15).astype(np.float16)
    s = scales.astype(np.float32)[..., None]
    shifted = w - mins.astype(np.float32)[..., None]
    codes = np.clip(np.rint(np.divide(shifted, s, out=np.zeros_like(w), where=s != 0)), 0, 15).astype(np.uint8)
    return BlockQuantWeight(codes, scales, mins, n, k, 4)


def concat(parts: list[BlockQuantWeight]) -> BlockQuantWeight:
    """Stack weights along N (fused q/k/v or gate/up); they must share K and bits."""
    first = parts[0]
    if any(p.k != first.k or p.bits != first.bits for p in parts):
        raise ValueError(f"cannot fuse weights of (K, bits) {[(p.k, p.bits) for p in parts]}")
    mins = None if first.mins is None else np.concatenate([p.mins for p in parts])
    return BlockQuantWeight(np.concatenate([p.codes for p in parts]), np.concatenate([p.scales for p in parts]),
                            mins, sum(p.n for p in parts), first.k, first.bits)


def dequantize(w: BlockQuantWeight) -> np.ndarray:
    """The float32 ``[n, k]`` weight ``w`` stands for."""
    values = w.codes.astype(np.float32) * w.scales.astype(np.float32)[..., None]
    if w.mins is not None:
        values = values + w.mins.astype(np.float32)[..., None]
    return values.reshape(w.n, -1)[:, : w.k]


def quantize_activations(x: np.ndarray, kb: int) -> tuple[np.ndarray, np.ndarray]:
    """(int8 codes [m, kb, 32], float32 scales [m, kb]) of float ``x [m, k]``, as the op computes them."""
    m, k = x.shape
    v = np.zeros((m, kb * BLOCK), np.float32)
    v[:, :k] = x
    v = v.reshape(m, kb, BLOCK)
    amax = np.abs(v).max(axis=-1)
    inv = np.divide(np.float32(127), amax, out=np.zeros_like(amax), where=amax > 0).astype(np.float32)
    codes = np.rint(v * inv[..., None]).astype(np.int8)  # numpy rounds half to even, like the op
    return codes, (amax / np.float32(127)).astype(np.float32)


def reference_matmul(x: np.ndarray, w: BlockQuantWeight) -> np.ndarray:
    """What ``BlockQuantMatMul`` computes for ``x [..., k]``: float64 sums of the exact block dot products."""
    lead = x.shape[:-1]
    xq, xs = quantize_activations(x.reshape(-1, w.k).astype(np.float32), w.kb)
    codes = w.codes  # [n, kb, 32]
    dots = np.einsum("mbi,nbi->mnb", xq.astype(np.int64), codes.astype(np.int64)).astype(np.float64)
    scale = w.scales.astype(np.float64)[None] * xs.astype(np.float64)[:, None]  # [m, n, kb]
    y = (dots * scale).sum(-1)
    if w.mins is not None:
        sums = xq.astype(np.float64).sum(-1) * xs  # [m, kb]
        y += sums @ w.mins.astype(np.float64).T
    return y.astype(np.float32).reshape(*lead, w.n)
