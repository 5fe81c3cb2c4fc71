"""kernels.hostmem: zeroed CPU tensors in private anonymous mappings advised to transparent huge pages."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest
import torch

from kernels import hostmem
from kernels.kv_cache.layout import KVCacheSpec

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _thp_mode() -> str | None:
    try:
        return THP.read_text()
    except OSError:
        return None


def _huge_kib_of(address: int) -> int | None:
    """AnonHugePages of the /proc/self/smaps mapping holding ``address`` (None where unknown)."""
    try:
        lines = Path("/proc/self/smaps").read_text().splitlines()
    except OSError:
        return None
    inside = False
    for line in lines:
        head = line.split()[0]
        if "-" in head and ":" not in head:
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= address < hi
        elif inside and line.startswith("AnonHugePages:"):
            return int(line.split()[1])
    return None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64])
def test_zeros_is_a_zeroed_writable_aligned_tensor(dtype: torch.dtype) -> None:
    t = hostmem.zeros((3, 5, 7), dtype)
    assert t.shape == (3, 5, 7) and t.dtype == dtype and t.is_contiguous() and t.device.type == "cpu"
    assert not t.any()
    if hostmem.available():
        assert t.data_ptr() % hostmem.HUGE_PAGE == 0
    t[1, 2, 3] = 4
    assert t.sum().item() == 4 and t.view(-1).nonzero().tolist() == [[1 * 35 + 2 * 7 + 3]]


def test_tensor_keeps_its_mapping_alive() -> None:
    t = hostmem.zeros((1 << 20,), torch.float32)[10:20]  # a view: the base and the mapping go out of scope
    gc.collect()
    t += 1.5
    assert t.tolist() == [1.5] * 10


def test_zero_sized_and_empty_shapes() -> None:
    assert hostmem.zeros((0, 4), torch.float32).shape == (0, 4)
    assert hostmem.zeros((), torch.float32).item() == 0.0


@pytest.mark.skipif(not hostmem.available(), reason="needs anonymous private mappings (POSIX)")
def test_large_mapping_gets_huge_pages_where_thp_allows() -> None:
    t = hostmem.zeros((16 << 20,), torch.uint8)  # 16 MiB, 2 MiB-aligned
    t.fill_(1)  # first touch: faulted as 2 MiB pages when THP is "always" or "madvise"
    huge = _huge_kib_of(t.data_ptr())
    mode = _thp_mode()
    if mode is None or huge is None:
        pytest.skip("no /sys/kernel/mm/transparent_hugepage or /proc/self/smaps here")
    if "[never]" in mode:
        assert huge == 0
    else:
        assert huge >= 8 << 10, f"THP {mode.strip()!r} but only {huge} KiB of the 16 MiB mapping in huge pages"


def test_kv_cache_allocation_on_cpu() -> None:
    spec = KVCacheSpec(2, 3, 8, num_blocks=5, block_size=4, dtype=torch.float16)
    cache = spec.allocate()
    assert cache.shape == spec.shape and cache.dtype == torch.float16 and not cache.any()
    if hostmem.available():
        assert cache.data_ptr() % hostmem.HUGE_PAGE == 0
    cache[1, 0, 4] = 2.0
    assert cache.float().sum().item() == 2.0 * 3 * 4 * 8
