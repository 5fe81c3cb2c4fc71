"""Single-request generation with the reference model: prefill once, then decode token by token.

This is the plain loop the engines are held to (same cache format, same block manager, same
sampler); the engines add batching and scheduling on top.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from kernels.attention import AttentionMetadata
from kernels.errors import InvalidRequestError
from kernels.kv_cache.block_manager import BlockManager
from kernels.kv_cache.layout import DEFAULT_BLOCK_SIZE, KVCacheSpec
from kernels.model import TransformerModel
from kernels.sampling import Sampler, SamplingParams


@torch.no_grad()
def generate(model: TransformerModel, prompt_ids: list[int], params: SamplingParams, *,
             eos_token_ids: tuple[int, ...] = (), block_size: int = DEFAULT_BLOCK_SIZE,
             sampler: Sampler | None = None) -> Iterator[int]:
    """Yield the generated token ids one at a time (the stop token itself is not yielded)."""
    config = model.config
    if not prompt_ids:
        raise InvalidRequestError("prompt is empty")
    total = len(prompt_ids) + params.max_tokens
    if len(prompt_ids) >= config.max_position_embeddings:
        raise InvalidRequestError(f"prompt has {len(prompt_ids)} tokens; the model's context is "
                                  f"{config.max_position_embeddings}")
    total = min(total, config.max_position_embeddings)
    device = model.model.embed_tokens.weight.device
    dtype = model.model.embed_tokens.weight.dtype
    spec = KVCacheSpec(config.num_layers, config.num_kv_heads, config.head_dim,
                       num_blocks=-(-total // block_size), block_size=block_size, dtype=dtype)
    kv_cache = spec.allocate(device)
    blocks = BlockManager(spec.num_blocks, block_size)
    sampler = sampler or Sampler()
    generator = params.make_generator()
    stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_token_ids))

    tokens = list(prompt_ids)
    blocks.allocate(0, tokens)
    context_len, new = 0, tokens
    while True:
        meta = AttentionMetadata.build([blocks.block_table(0)], [context_len], [len(new)], block_size, device)
        input_ids = torch.tensor(new, dtype=torch.long, device=device)
        positions = torch.arange(context_len, context_len + len(new), device=device)
        hidden = model(input_ids, positions, kv_cache, meta)
        logits = model.compute_logits(hidden[-1:])
        token = int(sampler(logits, [params], [generator])[0])
        if token in stop_ids:
            return
        yield token
        tokens.append(token)
        if len(tokens) - len(prompt_ids) >= params.max_tokens or len(tokens) >= total:
            return
        context_len, new = len(tokens) - 1, [token]
        blocks.reserve(0, len(tokens))
