"""Weights in 2 MiB pages: an ONNX model's external data read into one anonymous mapping with transparent huge pages.

A batch-1 decode step streams every weight once (~85 MB for SmolLM2-135M int4). In 4 KiB pages each page is a TLB
miss and a stop for the hardware prefetchers, which end their streams at page boundaries; ONNX Runtime maps an
external data file, so its initializers sit in the file's 4 KiB page-cache pages. Our 4-bit matmul loop
(``edge/csrc``) streams 21.8-24.3 GB/s from 4 KiB pages and 28-29 GB/s from 2 MiB ones with 2 threads, 15.5
against 23.5 GB/s with one (a C++ harness over 4 rotating copies of the 49152 x 576 head, 2-core AMD EPYC, THP
"madvise").

:func:`load` reads the data file into a private anonymous mapping, aligned to 2 MiB and advised ``MADV_HUGEPAGE``
before any page is touched (so the kernel's THP setting "madvise", the common default, backs it with huge pages),
and returns numpy views of every external initializer. The runner hands them to ONNX Runtime with
``SessionOptions.add_initializer``, which uses a caller's buffer instead of reading the tensor from the file: the
weights are in memory once, in huge pages. Where the kernel gives no huge pages (THP "never", not Linux) the
mapping is an ordinary one and nothing else changes.
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from kernels import hostmem


@dataclass
class ExternalWeights:
    """Views of a model's external initializers into one mapping (which must outlive every session using them)."""

    arrays: dict[str, np.ndarray]
    nbytes: int
    advised: bool  # MADV_HUGEPAGE was accepted for the mapping
    _mapping: mmap.mmap = field(repr=False)


def load(model_path: str | os.PathLike[str]) -> ExternalWeights | None:
    """``model_path``'s external initializers as arrays over one huge-page mapping; None when it has none, keeps
    them in more than one file, or the platform has no anonymous private mappings."""
    model_path = Path(model_path)
    model = onnx.load(str(model_path), load_external_data=False)
    # Tables that are only gathered from (the token embeddings: 113 MB in float32 for SmolLM2, a row per token)
    # stay with ONNX Runtime, which maps the file and so reads only the pages of the rows it gathers.
    gathered, other = set(), set()
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            (gathered if node.op_type == "Gather" and i == 0 else other).add(name)
    entries = []
    for tensor in model.graph.initializer:
        info = {e.key: e.value for e in tensor.external_data}
        if tensor.data_location != onnx.TensorProto.EXTERNAL or "location" not in info:
            continue
        if tensor.name in gathered and tensor.name not in other:
            continue
        entries.append((tensor, info["location"], int(info.get("offset", 0)), int(info["length"])))
    locations = {location for _, location, _, _ in entries}
    if len(locations) != 1 or not hostmem.available():
        return None
    data_path = model_path.parent / locations.pop()
    if any(offset + length > data_path.stat().st_size for _, _, offset, length in entries):
        raise ValueError(f"{data_path} is shorter than {model_path}'s external data references")
    first = min(offset for _, _, offset, _ in entries)  # the span of the file the arrays cover
    size = max(offset + length for _, _, offset, length in entries) - first
    mapping, start, advised = hostmem.mapping(size)
    view = memoryview(mapping)[start:start + size]
    with open(data_path, "rb") as f:
        f.seek(first)
        done = 0
        while done < size:
            n = f.readinto(view[done:])
            if not n:
                raise ValueError(f"{data_path}: unexpected end of file at byte {done} of {size}")
            done += n
    view.release()
    arrays = {}
    for tensor, _, offset, length in entries:
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type))
        count = int(np.prod(tensor.dims, dtype=np.int64))
        if count * dtype.itemsize != length:
            raise ValueError(f"{tensor.name}: {length} bytes of external data for {list(tensor.dims)} {dtype}")
        arrays[tensor.name] = np.frombuffer(mapping, dtype, count, start + offset - first).reshape(tuple(tensor.dims))
    return ExternalWeights(arrays, size, advised, mapping)
