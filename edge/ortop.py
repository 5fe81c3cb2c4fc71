"""The edge engine's ONNX Runtime custom op library (``csrc/ort_ops.cpp``): fetched headers, one build.

The fused graph (:mod:`edge.builder`, layout ``"fused"``) runs a whole step in one ONNX Runtime call, with
each layer's attention as a ``hybrid_gateway::PagedAttention`` node on the shared paged KV cache, and (builder
option ``matmul="hgw"``) its linear layers as ``hybrid_gateway::BlockQuantMatMul`` nodes
(``csrc/block_quant_gemm.h``). The ops are C++ compiled against ONNX Runtime's C API header,
``onnxruntime_c_api.h``, which the ``onnxruntime-gpu`` wheel does not ship. The header comes from Debian's
``libonnxruntime-dev`` package (ONNX Runtime 1.21, MIT; a C API header of an older release works with
every newer runtime), downloaded once, checked against its sha256 and unpacked into the cache;
``$HYBRID_GATEWAY_ORT_INCLUDE`` points at a directory holding ``onnxruntime_c_api.h`` instead,
for machines without network access.

The library is compiled with the system C++ compiler (``-O3 -march=native``, no torch, no ONNX Runtime
link: the API comes through the function table ONNX Runtime hands over) into
``$HYBRID_GATEWAY_CACHE/ext/<key>/``, the key covering the sources, flags, header and CPU, so later
processes only load it. When any of that fails, :func:`library_path` returns None, :func:`unavailable_reason`
says why, and the runner keeps the split graphs (attention between ONNX Runtime calls). ``HYBRID_GATEWAY_NATIVE=0``
turns it off with the rest of the native code.
"""

from __future__ import annotations

import hashlib
import io
import logging
import lzma
import os
import platform
import shutil
import subprocess
import tarfile
import tempfile
import threading
import urllib.request
from pathlib import Path

from kernels.attention import native
from kernels.checkpoints.store import cache_dir

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "ort_ops.cpp"
MATMUL_HEADER = SOURCE.with_name("block_quant_gemm.h")
CORE_HEADER = native.HEADER  # kernels/attention/csrc/paged_attention_cpu.h
NAME = "hgw_ort_ops"
DOMAIN = "hybrid_gateway"
OP = "PagedAttention"
MATMUL_OP = "BlockQuantMatMul"
FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-fopenmp-simd", "-fno-math-errno", "-fvisibility=hidden")
INCLUDE_ENV = "HYBRID_GATEWAY_ORT_INCLUDE"

# Debian trixie's libonnxruntime-dev (headers only, 85 kB): (url, sha256) pairs, tried in order.
HEADER_PACKAGES = (
    ("http://deb.debian.org/debian/pool/main/o/onnxruntime/libonnxruntime-dev_1.21.0+dfsg-1_amd64.deb",
     "14f7d959d5deacbcf1504830d4189f91fc67382b399ed9ae9d3aa9c4050ced08"),
)

_lock = threading.Lock()
_path: Path | None = None
_error: str | None = None


def _extract_deb_headers(deb: bytes, target: Path) -> None:
    """Unpack ``usr/include/onnxruntime/*.h`` of a .deb (an ar archive holding data.tar.xz) into ``target``."""
    if not deb.startswith(b"!<arch>\n"):
        raise ValueError("not a Debian package (ar archive)")
    offset = 8
    while offset + 60 <= len(deb):
        header = deb[offset:offset + 60]
        name = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58].decode().strip())
        body = deb[offset + 60: offset + 60 + size]
        offset += 60 + size + (size & 1)
        if name.startswith("data.tar"):
            raw = lzma.decompress(body) if name.endswith(".xz") else body
            with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
                for member in tar.getmembers():
                    parts = Path(member.name).parts
                    if member.isfile() and "include" in parts and member.name.endswith(".h"):
                        relative = Path(*parts[parts.index("include") + 2:])  # drop usr/include/onnxruntime
                        (target / relative).parent.mkdir(parents=True, exist_ok=True)
                        (target / relative).write_bytes(tar.extractfile(member).read())
            return
    raise ValueError("the package has no data.tar member")


def _headers_dir(sha256: str) -> Path:
    return cache_dir().parent / "ort-headers" / sha256[:16]


def include_dir() -> Path:
    """A directory holding ``onnxruntime_c_api.h``: ``$HYBRID_GATEWAY_ORT_INCLUDE``, or the cached download."""
    if os.environ.get(INCLUDE_ENV):
        directory = Path(os.environ[INCLUDE_ENV])
        if not (directory / "onnxruntime_c_api.h").is_file():
            raise FileNotFoundError(f"${INCLUDE_ENV}={directory} has no onnxruntime_c_api.h")
        return directory
    for _, sha256 in HEADER_PACKAGES:  # any package fetched before
        if (_headers_dir(sha256) / "onnxruntime_c_api.h").is_file():
            return _headers_dir(sha256)
    errors = []
    for url, sha256 in HEADER_PACKAGES:
        try:
            with urllib.request.urlopen(url, timeout=60) as response:  # noqa: S310 - fixed https/http URL, hash-checked
                deb = response.read()
        except OSError as exc:
            errors.append(f"{url}: {exc}")
            continue
        digest = hashlib.sha256(deb).hexdigest()
        if digest != sha256:
            errors.append(f"{url}: sha256 {digest}, expected {sha256}")
            continue
        directory = _headers_dir(sha256)
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=directory.parent))
        try:
            _extract_deb_headers(deb, tmp)
            if not (tmp / "onnxruntime_c_api.h").is_file():
                raise FileNotFoundError(f"{url} has no onnxruntime_c_api.h")
            try:
                os.rename(tmp, directory)
            except OSError:
                if not (directory / "onnxruntime_c_api.h").is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return directory
    raise OSError("could not fetch ONNX Runtime's C API header (set $" + INCLUDE_ENV + "): " + "; ".join(errors))


def build_dir(includes: Path) -> Path:
    digest = hashlib.sha256()
    for part in (SOURCE.read_bytes(), MATMUL_HEADER.read_bytes(), CORE_HEADER.read_bytes(),
                 (includes / "onnxruntime_c_api.h").read_bytes(), repr(FLAGS).encode(),
                 native._cpu_signature().encode()):
        digest.update(part)
    return cache_dir().parent / "ext" / f"{NAME}-{digest.hexdigest()[:16]}"


def _build() -> Path:
    includes = include_dir()
    directory = build_dir(includes)
    library = directory / f"{NAME}.so"
    if library.is_file():
        return library
    directory.mkdir(parents=True, exist_ok=True)
    compiler = os.environ.get("CXX", "c++")
    flags = list(FLAGS)
    if platform.machine() in ("x86_64", "AMD64", "aarch64", "arm64"):
        flags.append("-march=native")
    tmp = directory / f".{NAME}.{os.getpid()}.so"
    cmd = [compiler, *flags, f"-I{includes}", f"-I{CORE_HEADER.parent}", str(SOURCE), "-o", str(tmp)]
    log.info("building the ONNX Runtime custom ops into %s (once per machine)", directory)
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stderr[-2000:]}")
    os.replace(tmp, library)
    return library


def library_path() -> Path | None:
    """The compiled custom op library (built on first use), or None when unavailable (:func:`unavailable_reason`)."""
    global _path, _error
    if _path is not None or _error is not None:
        return _path
    with _lock:
        if _path is not None or _error is not None:
            return _path
        _error = native.build_blocker()
        if _error is None:
            try:
                _path = _build()
            except Exception as exc:  # noqa: BLE001 - the split graphs work without it
                lines = str(exc).strip().splitlines()
                _error = f"{type(exc).__name__}: {lines[0] if lines else ''}"
        if _error is not None and not _error.startswith("disabled"):
            log.warning("ONNX Runtime custom ops unavailable (%s); the edge runner uses the split graphs",
                        _error)
        return _path


def available() -> bool:
    return library_path() is not None


def unavailable_reason() -> str | None:
    library_path()
    return _error
