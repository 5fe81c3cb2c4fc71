"""Transparent huge pages for the serving processes: glibc's malloc asked to back large blocks with 2 MB pages.

A batch-1 edge decode step streams ~85-100 MB of weights and the KV
cache through the CPU; with 4 kB pages that is ~25,000 TLB misses a token. Most Linux machines run THP in
``madvise`` mode, where only memory that asks gets huge pages, and neither ONNX Runtime nor PyTorch asks.
glibc (2.35+) asks on every large allocation's behalf when started with the tunable
``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``, which must be in the environment when the process starts:
``hybrid-gateway serve`` and ``bench`` therefore re-execute themselves once with it set. Measured on our
2-core machine, batch-1 decode +5-10%. ``HYBRID_GATEWAY_HUGEPAGES=0`` turns it off.

glibc can only ask for what malloc allocates: ONNX Runtime maps an external data file instead (file pages, 4 kB),
so the edge runner reads its custom matmul's weights into a huge-page mapping itself (``edge/hugepages.py``), and
the CPU KV cache is allocated the same way (``kernels/hostmem.py``); both work without this re-execution.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Mapping
from pathlib import Path

ENV = "HYBRID_GATEWAY_HUGEPAGES"
TUNABLE = "glibc.malloc.hugetlb"
THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def hugepage_environment(environ: Mapping[str, str], *, system: str, libc: tuple[str, str],
                         thp_mode: str | None) -> dict[str, str] | None:
    """The environment to re-execute with, or None when there is nothing to gain (or it is already set).

    >>> hugepage_environment({}, system="Linux", libc=("glibc", "2.36"), thp_mode="always [madvise] never")
    {'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=1'}
    >>> hugepage_environment({}, system="Linux", libc=("glibc", "2.31"), thp_mode="[madvise]") is None
    True
    """
    if environ.get(ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    if system != "Linux" or libc[0] != "glibc" or thp_mode is None or "[never]" in thp_mode:
        return None
    try:
        version = tuple(int(part) for part in libc[1].split(".")[:2])
    except ValueError:
        return None
    existing = environ.get("GLIBC_TUNABLES", "")
    if version < (2, 35) or TUNABLE in existing:  # too old to know the tunable, or already asked for
        return None
    return {"GLIBC_TUNABLES": ":".join(filter(None, [existing, f"{TUNABLE}=1"]))}


def reexec_with_hugepages() -> None:
    """Replace this process by itself with :func:`hugepage_environment` applied (returns only when not needed)."""
    try:
        mode = THP_MODE.read_text()
    except OSError:
        mode = None
    extra = hugepage_environment(os.environ, system=platform.system(), libc=platform.libc_ver(), thp_mode=mode)
    if extra is None or not getattr(sys, "orig_argv", None):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, {**os.environ, **extra})
