"""The edge engine: the shared scheduler and engine loop from ``kernels/`` over the ONNX Runtime runner.

Used in-process by the gateway::

    engine = EdgeEngine.from_model(quant="int4").start()
    rid = engine.add_request(prompt_ids, SamplingParams(max_tokens=64))   # inside a running event loop
    async for out in engine.stream(rid):
        print(out.text, end="")
    engine.abort(rid)            # frees its KV blocks at once
    engine.stats()               # running / waiting, KV blocks used / free, tokens/s
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from edge.runner import LmHead, OnnxRunner, Quant, Source
from kernels.async_engine import AsyncEngine
from kernels.checkpoints import load_checkpoint
from kernels.checkpoints.store import resolve_model
from kernels.engine import EngineConfig, EngineCore
from kernels.tokenizer import Tokenizer


def default_block_size(device: torch.device | str) -> int:
    """The edge's KV block size: 4 tokens on CPU, 16 on CUDA.

    A sequence leaves on average half a block unfilled, so small blocks waste less of the cache (bench
    edge: 10.8% of allocated slots at 16, 2.4% at 4). On CPU the attention gathers K/V token by token,
    so block size costs nothing there; the Triton kernels on a GPU want 16-token tiles.
    """
    return 16 if torch.device(device).type == "cuda" else 4


@dataclass(slots=True)
class EdgeStats:
    num_running: int
    num_waiting: int
    num_blocks_used: int
    num_blocks_free: int
    kv_usage: float
    tokens_per_second: float
    num_preemptions: int
    prefix_hit_rate: float


class EdgeEngine(AsyncEngine):
    """The compact int4 model in ONNX Runtime, with continuous batching on the shared paged KV cache."""

    def __init__(self, core: EngineCore, tokenizer: Tokenizer, model_id: str) -> None:
        super().__init__(core, name="edge")
        self.tokenizer = tokenizer
        self.model_id = model_id

    @classmethod
    def from_model(cls, model: str | os.PathLike[str] | None = None, *, quant: Quant = "int4",
                   config: EngineConfig | None = None, threads: int | None = None,
                   cache_root: Path | None = None, source: Source = "auto", lm_head: LmHead = "auto",
                   kv_dtype: str = "auto") -> EdgeEngine:
        """Build (or reuse from the on-disk cache) the ONNX model for ``model`` and wrap it in an engine.

        Without ``config`` the engine uses :func:`default_block_size` for its device. ``source`` is
        :class:`edge.builder.BuildOptions`' (``"auto"``: GGUF blocks exactly; ``"fast"``: Q4_1 re-quantized), and
        so is ``lm_head`` (``"auto"``: ``"rescore"``, the LM head read at 4 bits with each token's best logits again
        from the stored 8-bit head, where it applies; ``"int4"``: re-quantized to 4 bits, less exact).
        ``kv_dtype`` is :class:`edge.runner.OnnxRunner`'s (``"auto"``: float16 caches where the fused CPU graph runs,
        half the bytes for attention to read; else float32); it sets ``config.kv_dtype``.
        """
        path = resolve_model(model)
        checkpoint = load_checkpoint(path)
        runner = OnnxRunner(checkpoint, quant, intra_op_num_threads=threads, cache_root=cache_root, source=source,
                            lm_head=lm_head, kv_dtype=kv_dtype)
        tokenizer = Tokenizer.from_checkpoint(checkpoint)
        config = config or EngineConfig(block_size=default_block_size(runner.device))
        config.kv_dtype = runner.kv_dtype
        if runner.device.type == "cuda":
            config.device = str(runner.device)
        core = EngineCore(runner, tokenizer, config, checkpoint.fingerprint)
        return cls(core, tokenizer, model_id=f"{Path(path).stem}-{quant}")

    def edge_stats(self) -> EdgeStats:
        s = self.stats()
        total = s.num_blocks_used + s.num_blocks_free
        return EdgeStats(s.num_running, s.num_waiting, s.num_blocks_used, s.num_blocks_free,
                         s.num_blocks_used / total, self.tokens_per_second(), s.num_preemptions, s.prefix_hit_rate)
