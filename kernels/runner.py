"""What one engine step hands a runner, and the runner contract both engines implement.

The scheduler picks, for each running sequence, how many of its tokens to compute this step
(a whole prompt, a prefill chunk, or one decode token). The engine flattens them into one batch:

    input_ids   [num_tokens]   the new tokens of every scheduled sequence, back to back
    positions   [num_tokens]   each token's absolute position in its sequence
    attn        AttentionMetadata (slot mapping, block tables, context / query lengths)
    logits_indices [num_sampled]  rows of the flat batch whose next token is sampled: the last new
                                  token of every sequence that finishes its prompt or decodes
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from kernels.attention import AttentionMetadata
from kernels.checkpoints import ModelConfig
from kernels.model import TransformerModel


@dataclass(slots=True)
class ModelInput:
    input_ids: torch.Tensor  # [num_tokens] int64
    positions: torch.Tensor  # [num_tokens] int64
    attn: AttentionMetadata
    logits_indices: torch.Tensor  # [num_sampled] int64

    @classmethod
    def build(cls, token_chunks: list[list[int]], context_lens: list[int], block_tables: list[list[int]],
              sample: list[bool], block_size: int, device: torch.device | str = "cpu") -> ModelInput:
        """Flatten per-sequence chunks; ``sample[i]`` says whether sequence i's last token is sampled."""
        ids: list[int] = []
        positions: list[int] = []
        logits_indices: list[int] = []
        for chunk, start, wants in zip(token_chunks, context_lens, sample, strict=True):
            ids.extend(chunk)
            positions.extend(range(start, start + len(chunk)))
            if wants:
                logits_indices.append(len(ids) - 1)
        attn = AttentionMetadata.build(block_tables, context_lens, [len(c) for c in token_chunks], block_size, device)
        return cls(torch.tensor(ids, dtype=torch.long, device=device),
                   torch.tensor(positions, dtype=torch.long, device=device), attn,
                   torch.tensor(logits_indices, dtype=torch.long, device=device))


class ModelRunner(Protocol):
    """How an engine executes one batch: fill the KV cache for the new tokens, return sampled rows' logits."""

    config: ModelConfig

    def execute(self, batch: ModelInput, kv_cache: torch.Tensor) -> torch.Tensor:
        """Returns float32 logits ``[len(batch.logits_indices), vocab_size]``."""
        ...


class ReferenceRunner:
    """The plain PyTorch model as a runner: what the edge and cloud runners are held to."""

    def __init__(self, model: TransformerModel) -> None:
        self.model = model
        self.config = model.config

    @torch.no_grad()
    def execute(self, batch: ModelInput, kv_cache: torch.Tensor) -> torch.Tensor:
        hidden = self.model(batch.input_ids, batch.positions, kv_cache, batch.attn)
        return self.model.compute_logits(hidden[batch.logits_indices])
