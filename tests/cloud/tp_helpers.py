"""Helpers for the tensor-parallel tests: tiny checkpoint variants, the reference engine, child-process checks."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import torch

from kernels.checkpoints import load_checkpoint
from kernels.engine import EngineConfig, EngineCore
from kernels.model import TransformerModel
from kernels.runner import ReferenceRunner
from kernels.tokenizer import Tokenizer
from tests.kernels import checkpoint_factory as factory

# name -> (arch, tied embeddings, format): tied and untied heads, GGUF (Q8_0 blocks, permuted llama Q/K
# rows) and HF, and qwen2 for the q/k/v biases.
VARIANTS = {
    "llama-hf-tied": ("llama", True, "hf"),
    "llama-gguf-q8-untied": ("llama", False, "gguf"),
    "qwen2-hf-untied": ("qwen2", False, "hf"),
}


def write_variant(directory: Path, name: str, seed: int = 3) -> Path:
    arch, tied, fmt = VARIANTS[name]
    config = factory.tiny_config(arch, tie_word_embeddings=tied)
    state = factory.random_state_dict(config, seed)
    if fmt == "gguf":
        return factory.write_gguf_checkpoint(directory / f"{name}.gguf", config, state, tensor_type="Q8_0")
    return factory.write_hf_checkpoint(directory / name, config, state)


def engine_config(**overrides) -> EngineConfig:
    """Small cache and token budget: chunked prefill and several sequences per step."""
    return EngineConfig(**{"num_blocks": 64, "block_size": 4, "max_num_batched_tokens": 16, "max_num_seqs": 8,
                           **overrides})


def reference_engine(path: Path, config: EngineConfig | None = None) -> EngineCore:
    ckpt = load_checkpoint(path)
    model = TransformerModel.from_checkpoint(ckpt, attention_impl="torch")
    return EngineCore(ReferenceRunner(model), Tokenizer.from_checkpoint(ckpt), config or engine_config(),
                      ckpt.fingerprint)


def prompts(n: int = 6, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 300, (k,), generator=g).tolist() for k in [1, 5, 17, 9, 30, 3, 12, 23][:n]]


def live_children() -> list[tuple[int, str]]:
    """(pid, command line) of this process's descendants, zombies and multiprocessing's resource tracker aside."""
    try:
        import psutil
    except ImportError:
        found = _proc_children(os.getpid())
    else:
        found = []
        for child in psutil.Process().children(recursive=True):
            try:
                if child.status() != psutil.STATUS_ZOMBIE:
                    found.append((child.pid, " ".join(child.cmdline())))
            except psutil.NoSuchProcess:
                pass
    return [(pid, cmd) for pid, cmd in found if "resource_tracker" not in cmd]


def is_alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie, dead but not yet reaped by whoever adopted it, counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _proc_children(parent: int) -> list[tuple[int, str]]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        if int(ppid) == parent and state != "Z":
            found += [(int(entry.name), cmd), *_proc_children(int(entry.name))]
    return found


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()
