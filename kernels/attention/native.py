"""The native CPU decode-attention op (``csrc/paged_decode_cpu.cpp``): built once per machine, then loaded.

On a CPU a decode step's attention is a few kilobytes of arithmetic per sequence wrapped in operator
overhead; the PyTorch path spends most of its time gathering K/V into a padded copy and launching SDPA.
The C++ op reads K and V through the block table where they lie, optionally writes the step's new K/V
first, and does it in one call per layer.

It is compiled with PyTorch's own extension builder (``torch.utils.cpp_extension``, which needs a C++
compiler and ninja) into ``$HYBRID_GATEWAY_CACHE/ext/<key>``, the key covering the source, the torch
version and the CPU's instruction set (the build uses ``-march=native``), so a second process or a
second run loads it in milliseconds. ``HYBRID_GATEWAY_NATIVE=0`` turns it off; when it cannot be built
the torch path is used and :func:`unavailable_reason` says why.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import platform
import shutil
import sys
import threading
from pathlib import Path
from types import ModuleType

import torch

from kernels.checkpoints.store import cache_dir

log = logging.getLogger(__name__)

DISABLE_ENV = "HYBRID_GATEWAY_NATIVE"
SOURCE = Path(__file__).with_name("csrc") / "paged_decode_cpu.cpp"
HEADER = SOURCE.with_name("paged_attention_cpu.h")  # the arithmetic, shared with edge's ONNX Runtime op
NAME = "hgw_paged_decode_cpu"
FLAGS = ("-O3", "-fopenmp-simd", "-fno-math-errno")

_lock = threading.Lock()
_module: ModuleType | None = None
_error: str | None = None


def _cpu_signature() -> str:
    """The CPU's feature flags (``-march=native`` code may not run on another CPU)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def build_dir() -> Path:
    """Where this machine's build lives: keyed by source, flags, torch version, Python and CPU."""
    digest = hashlib.sha256()
    for part in (SOURCE.read_bytes(), HEADER.read_bytes(), repr(FLAGS).encode(), torch.__version__.encode(),
                 platform.python_version().encode(), _cpu_signature().encode()):
        digest.update(part)
    return cache_dir().parent / "ext" / f"{NAME}-{digest.hexdigest()[:16]}"


def _build() -> ModuleType:
    from torch.utils import cpp_extension  # imported lazily: it pulls in setuptools

    # The ninja that the `ninja` package installs sits beside this interpreter, maybe not on PATH.
    scripts = str(Path(sys.executable).parent)
    if scripts not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = scripts + os.pathsep + os.environ.get("PATH", "")
    directory = build_dir()
    directory.mkdir(parents=True, exist_ok=True)
    flags = list(FLAGS)
    if platform.machine() in ("x86_64", "AMD64", "aarch64", "arm64"):
        flags.append("-march=native")
    already = any(directory.glob(f"{NAME}*.so"))
    if not already:
        log.info("building the native CPU attention op into %s (once per machine)", directory)
    from rich.console import Console

    console = Console(stderr=True)
    progress = console.status("[bold]building the native CPU attention op (once per machine)…", spinner="dots") \
        if not already and console.is_terminal else contextlib.nullcontext()
    with progress:
        return cpp_extension.load(name=NAME, sources=[str(SOURCE)], extra_cflags=flags,
                                  build_directory=str(directory), verbose=False)


def build_blocker() -> str | None:
    """Why no native code can be built here (turned off, or no C++ compiler), or None. Shared with
    :mod:`edge.ortop`, whose ONNX Runtime op the same switch governs."""
    if os.environ.get(DISABLE_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return f"disabled by {DISABLE_ENV}={os.environ[DISABLE_ENV]}"
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        return "no C++ compiler (c++ or $CXX) on PATH"
    return None


def load() -> ModuleType | None:
    """The compiled op, building it on first use; None when disabled or unbuildable (see :func:`unavailable_reason`)."""
    global _module, _error
    if _module is not None or _error is not None:
        return _module
    with _lock:
        if _module is not None or _error is not None:
            return _module
        _error = build_blocker()
        if _error is not None:
            if "compiler" in _error:
                log.warning("native CPU attention op unavailable: %s; using the torch path", _error)
            return None
        try:
            _module = _build()
        except Exception as exc:  # a compiler or ninja failure must not stop the engine: the torch path works
            lines = str(exc).strip().splitlines()
            _error = f"build failed: {type(exc).__name__}: {lines[-1] if lines else ''}"
            log.warning("native CPU attention op unavailable (%s); using the torch path", _error)
        return _module


def available() -> bool:
    return load() is not None


def unavailable_reason() -> str | None:
    load()
    return _error


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                 seq_lens: torch.Tensor, scale: float, out: torch.Tensor,
                 new_kv: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                 threads: int | None = None) -> torch.Tensor:
    """Decode attention into ``out``; with ``new_kv = (k_new, v_new, slot_mapping)`` the rows are cached first.

    ``threads`` (default: torch's intra-op thread count) caps the threads used; small steps use one.

    Raises ``RuntimeError`` when the op is not available (callers check :func:`available` first).
    """
    module = load()
    if module is None:
        raise RuntimeError(f"the native CPU attention op is unavailable: {_error}")
    if threads is None:
        threads = torch.get_num_threads()
    if new_kv is None:
        module.paged_decode_cpu(q, k_cache, v_cache, block_tables, seq_lens, scale, out, threads=threads)
    else:
        module.paged_decode_cpu(q, k_cache, v_cache, block_tables, seq_lens, scale, out, *new_kv, threads=threads)
    return out
