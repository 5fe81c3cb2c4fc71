"""Paged attention ops on the shared KV-cache format, with one dispatch point.

Every op takes ``impl``:

* ``"auto"``   Triton when the tensors are on CUDA and Triton imports, else ``"torch"``.
* ``"triton"`` the Triton kernels. On CPU tensors they run only under ``TRITON_INTERPRET=1`` set before
  this package is imported (that is how the tests run them); otherwise a ``ValueError`` says so.
* ``"torch"``  the PyTorch path in :mod:`kernels.attention.torch_ops` (the CPU path): fused SDPA over
  K/V gathered once per step; held by tests to the plain twins in :mod:`kernels.attention.reference`.
* ``"native"`` the torch path, except that float32 decode steps run the C++ op of
  :mod:`kernels.attention.native` (K/V read through the block table in place, the new rows written in the
  same call). ``"auto"`` picks it on CPU whenever it builds; a ``ValueError`` says why when it cannot.

>>> from kernels.attention import AttentionMetadata, attention
>>> meta = AttentionMetadata.build([[0]], context_lens=[0], query_lens=[3], block_size=16, device="cpu")
>>> k_cache = v_cache = torch.zeros(1, 16, 1, 64)
>>> q, k, v = torch.randn(3, 2, 64), torch.randn(3, 1, 64), torch.randn(3, 1, 64)
>>> attention(q, k, v, k_cache, v_cache, meta, scale=0.125).shape
torch.Size([3, 2, 64])
"""

from __future__ import annotations

from typing import Literal

import torch

from kernels.attention import native
from kernels.attention.metadata import AttentionMetadata, check_write_kv_inputs
from kernels.attention.reference import (
    dense_attention_ref,
    paged_decode_ref,
    paged_prefill_ref,
    write_kv_ref,
)
from kernels.attention.torch_ops import (
    paged_decode_packed_torch,
    paged_decode_torch,
    paged_prefill_torch,
    write_kv_packed_torch,
    write_kv_torch,
)

try:
    import triton.runtime.interpreter as _triton_interpreter

    from kernels.attention.cache_write import write_kv_kernel, write_kv_triton
    from kernels.attention.decode import paged_decode_triton
    from kernels.attention.prefill import paged_prefill_triton

    TRITON_AVAILABLE = True
    # Fixed when the kernels were decorated: TRITON_INTERPRET=1 must be set before this package is imported.
    TRITON_INTERPRETED = isinstance(write_kv_kernel, _triton_interpreter.InterpretedFunction)
except ModuleNotFoundError as exc:  # triton is a declared dependency, but some platforms have no wheel
    if exc.name is None or exc.name.split(".")[0] != "triton":
        raise
    TRITON_AVAILABLE = TRITON_INTERPRETED = False

Impl = Literal["auto", "triton", "torch", "native"]
IMPLS = ("auto", "triton", "torch", "native")

__all__ = [
    "AttentionMetadata",
    "IMPLS",
    "Impl",
    "TRITON_AVAILABLE",
    "attention",
    "attention_kv",
    "dense_attention_ref",
    "paged_decode",
    "paged_decode_ref",
    "paged_prefill",
    "paged_prefill_ref",
    "resolve_impl",
    "write_kv",
    "write_kv_ref",
]


def resolve_impl(impl: str, q: torch.Tensor) -> Literal["triton", "torch", "native"]:
    """Turn ``impl`` into the implementation that will run on ``q``'s device, or raise ``ValueError``.

    On CPU, ``"auto"`` is ``"native"`` when the C++ op builds (the first call may build it: ~25 s once per
    machine; the engines resolve their impl at construction so no request waits), else ``"torch"``.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        if q.is_cuda and TRITON_AVAILABLE:
            return "triton"
        return "native" if q.device.type == "cpu" and native.available() else "torch"
    if impl == "native":
        if q.device.type != "cpu":
            raise ValueError(f"impl='native' is the CPU op; got tensors on {q.device}")
        if not native.available():
            raise ValueError(f"impl='native' but the native CPU attention op is unavailable: "
                             f"{native.unavailable_reason()}")
        return "native"
    if impl == "triton":
        if not TRITON_AVAILABLE:
            raise ValueError("impl='triton' but triton is not installed; use impl='torch' or 'auto'")
        if not q.is_cuda and not TRITON_INTERPRETED:
            raise ValueError(f"impl='triton' needs CUDA tensors (got device {q.device}); on CPU the kernels run "
                             "only under TRITON_INTERPRET=1 set before kernels.attention is imported")
    return impl


def write_kv(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor, impl: Impl = "auto") -> None:
    """Write key/value [num_tokens, num_kv_heads, head_dim] into slots ``slot_mapping`` (-1 = skip), in place."""
    if resolve_impl(impl, key) == "triton":
        write_kv_triton(key, value, k_cache, v_cache, slot_mapping)
        return
    check_write_kv_inputs(key, value, k_cache, v_cache, slot_mapping)
    write_kv_ref(key, value, k_cache, v_cache, slot_mapping)


def paged_prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                  scale: float, impl: Impl = "auto") -> torch.Tensor:
    """Causal varlen attention of the new tokens q [num_tokens, num_heads, head_dim] over their cached sequences."""
    if resolve_impl(impl, q) == "triton":
        return paged_prefill_triton(q, k_cache, v_cache, meta, scale)
    meta.check_inputs(q, k_cache, v_cache, decode=False)
    return paged_prefill_torch(q, k_cache, v_cache, meta, scale)


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                 scale: float, impl: Impl = "auto") -> torch.Tensor:
    """Attention of one query per sequence, q [num_seqs, num_heads, head_dim], over its whole cached sequence."""
    resolved = resolve_impl(impl, q)
    if resolved == "triton":
        return paged_decode_triton(q, k_cache, v_cache, meta, scale)
    meta.check_inputs(q, k_cache, v_cache, decode=True)
    if resolved == "native" and _native_ok(q, k_cache):
        return native.paged_decode(q.contiguous(), k_cache, v_cache, meta.block_tables, meta.seq_lens, scale,
                                   torch.empty_like(q, memory_format=torch.contiguous_format))
    return paged_decode_torch(q, k_cache, v_cache, meta, scale)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
              meta: AttentionMetadata, scale: float, impl: Impl = "auto") -> torch.Tensor:
    """One layer's attention in the model forward: cache the new K/V, then decode or prefill.

    q: [num_tokens, num_heads, head_dim]; k, v: [num_tokens, num_kv_heads, head_dim];
    k_cache, v_cache: this layer's [num_blocks, block_size, num_kv_heads, head_dim].
    """
    resolved = resolve_impl(impl, q)
    if resolved == "triton":
        write_kv_triton(k, v, k_cache, v_cache, meta.slot_mapping)
        if meta.is_decode:
            return paged_decode_triton(q, k_cache, v_cache, meta, scale)
        return paged_prefill_triton(q, k_cache, v_cache, meta, scale)
    # CPU: per-op overhead dominates, so check once and take the fused paths.
    check_write_kv_inputs(k, v, k_cache, v_cache, meta.slot_mapping)
    meta.check_inputs(q, k_cache, v_cache, decode=meta.is_decode)
    if resolved == "native" and meta.is_decode and _native_ok(q, k_cache):
        return native.paged_decode(q.contiguous(), k_cache, v_cache, meta.block_tables, meta.seq_lens, scale,
                                   torch.empty_like(q, memory_format=torch.contiguous_format),
                                   new_kv=(k.contiguous(), v.contiguous(), meta.slot_mapping))
    write_kv_torch(k, v, k_cache, v_cache, meta)
    if meta.is_decode:
        return paged_decode_torch(q, k_cache, v_cache, meta, scale)
    return paged_prefill_torch(q, k_cache, v_cache, meta, scale)


def attention_kv(q: torch.Tensor, kv: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
                 impl: Impl = "auto", out: torch.Tensor | None = None, threads: int | None = None) -> torch.Tensor:
    """:func:`attention` on the cache format's own per-layer slice, for runners that keep K and V together.

    q: [num_tokens, num_heads, head_dim]; kv: [2, num_tokens, num_kv_heads, head_dim] (new keys, new values);
    kv_cache: one layer of the shared cache, ``kv_cache[layer]`` = [2, num_blocks, block_size, num_kv_heads,
    head_dim]. Returns the output, written into ``out`` ([num_tokens, num_heads, head_dim]) when given.
    On CPU, keys and values move in one op each way, and the shape checks run once per step and shape:
    a batch-1 decode layer costs about half of :func:`attention`'s on the torch path; with the native op
    (``"auto"`` on CPU) a float32 decode layer is one C++ call that writes the new rows and attends, on up to
    ``threads`` cores (default ``torch.get_num_threads()``) when the step reads enough K/V to be worth it.
    """
    fast = meta.derived.get("attention_kv_native_call")
    if (fast is not None and fast[0] is q and fast[1] is kv and fast[2] is out and fast[3] == (impl, threads, scale)
            and fast[4] == (kv_cache.shape, kv_cache.dtype)):
        # Another layer of a native decode step with the same step buffers: everything is checked and bound.
        k_cache, v_cache = kv_cache.unbind(0)
        fast[5](q, k_cache, v_cache, *fast[6])
        return fast[7]
    resolved = resolve_impl(impl, q)
    if resolved == "triton":
        if kv.ndim != 4 or kv.shape[0] != 2 or kv_cache.ndim != 5 or kv_cache.shape[0] != 2:
            raise ValueError(_packed_shapes_error(kv, kv_cache))
        result = attention(q, kv[0], kv[1], kv_cache[0], kv_cache[1], meta, scale, impl="triton")
        return result if out is None else out.copy_(result)
    key = (resolved, q.shape, q.dtype, q.device, q.is_contiguous(), kv.shape, kv.dtype, kv.is_contiguous(),
           kv_cache.shape, kv_cache.dtype, None if out is None else out.shape)
    if meta.derived.get("attention_kv_checked") != key:  # the same for every layer of a step: check once
        if kv.ndim != 4 or kv.shape[0] != 2 or kv_cache.ndim != 5 or kv_cache.shape[0] != 2:
            raise ValueError(_packed_shapes_error(kv, kv_cache))
        check_write_kv_inputs(kv[0], kv[1], kv_cache[0], kv_cache[1], meta.slot_mapping)
        meta.check_inputs(q, kv_cache[0], kv_cache[1], decode=meta.is_decode)
        if out is not None and out.shape != q.shape:
            raise ValueError(f"attention_kv: out must be shaped like q {tuple(q.shape)}, got {tuple(out.shape)}")
        meta.derived["attention_kv_checked"] = key
        meta.derived["attention_kv_native"] = (resolved == "native" and meta.is_decode and _native_ok(q, kv_cache)
                                               and kv.is_contiguous() and q.is_contiguous())
    if meta.derived["attention_kv_native"]:
        target = out if out is not None and out.is_contiguous() and out.dtype == q.dtype else torch.empty_like(q)
        native.paged_decode(q, kv_cache[0], kv_cache[1], meta.block_tables, meta.seq_lens, scale, target,
                            new_kv=(kv[0], kv[1], meta.slot_mapping), threads=threads)
        if target is out:  # runners pass the same q / kv / out every layer: bind the call for the next ones
            args = (meta.block_tables, meta.seq_lens, scale, out, kv[0], kv[1], meta.slot_mapping, False,
                    torch.get_num_threads() if threads is None else threads)
            meta.derived["attention_kv_native_call"] = (q, kv, out, (impl, threads, scale),
                                                       (kv_cache.shape, kv_cache.dtype),
                                                       native.load().paged_decode_cpu, args, out)
        return target if out is None or target is out else out.copy_(target)
    write_kv_packed_torch(kv, kv_cache, meta)
    if meta.is_decode:
        result = paged_decode_packed_torch(q, kv_cache, meta, scale)
    else:
        result = paged_prefill_torch(q, kv_cache[0], kv_cache[1], meta, scale)
    return result if out is None else out.copy_(result)


def _native_ok(q: torch.Tensor, cache: torch.Tensor) -> bool:
    """Whether the native op takes these tensors (float32; other dtypes stay on the torch path)."""
    return q.dtype == torch.float32 and cache.dtype == torch.float32


def _packed_shapes_error(kv: torch.Tensor, kv_cache: torch.Tensor) -> str:
    return (f"attention_kv: kv must be [2, num_tokens, num_kv_heads, head_dim] and kv_cache "
            f"[2, num_blocks, block_size, num_kv_heads, head_dim], got {tuple(kv.shape)} and {tuple(kv_cache.shape)}")
