"""The reference Llama / Qwen2 transformer, tensor parallel: every rank holds one shard and runs the same forward.

Same math as :class:`kernels.model.TransformerModel` (its RMSNorm and RoPE helpers are imported, not
copied); only the projections, the embedding and the LM head are the tensor-parallel layers of
:mod:`cloud.parallel`. Rank r of tp holds num_heads/tp query heads and num_kv_heads/tp KV heads, and
its KV-cache shard holds exactly those KV heads (:meth:`KVCacheSpec.shard`)::

    input_ids [T] ──VocabParallelEmbedding──► x [T, hidden]              (replicated after all_reduce)
    per layer:  x ─norm─► QKV (local heads) ─rope─► attention on this rank's KV shard ─► o_proj ─all_reduce─► +x
                x ─norm─► gate/up (local columns) ─SwiGLU─► down_proj ─all_reduce─► +x
    norm ─► ParallelLMHead ─gather─► logits [n, vocab] on rank 0 (None elsewhere)
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from cloud.errors import TensorParallelError
from cloud.parallel import (
    ColumnParallelLinear,
    ParallelLMHead,
    QKVParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    get_tp_rank,
    get_tp_size,
)
from kernels.attention import AttentionMetadata, attention, resolve_impl
from kernels.checkpoints import Checkpoint, ModelConfig
from kernels.model import RMSNorm, rope_cos_sin, rope_inv_freq, rotate_half


def valid_tp_degrees(config: ModelConfig) -> list[int]:
    """Degrees that split the attention heads, the KV heads and the MLP width evenly."""
    g = math.gcd(config.num_heads, config.num_kv_heads, config.intermediate_size)
    return [d for d in range(1, g + 1) if g % d == 0]


def check_tp_degree(config: ModelConfig, tp: int, model_name: str = "the model") -> None:
    """Raise :class:`TensorParallelError` unless ``tp`` divides the heads, KV heads and MLP width."""
    valid = valid_tp_degrees(config)
    if isinstance(tp, int) and tp in valid:
        return
    use = ", ".join(map(str, valid[:-1])) + f" or {valid[-1]}" if len(valid) > 1 else "1"
    if isinstance(tp, int) and tp >= 1 and config.num_heads % tp == 0 and config.num_kv_heads % tp == 0:
        what = f"{model_name}'s MLP width {config.intermediate_size}"
    else:
        what = f"{model_name}'s {config.num_heads} attention heads / {config.num_kv_heads} KV heads"
    raise TensorParallelError(f"tensor-parallel degree {tp} does not divide {what}; use {use}")


def model_name(checkpoint: Checkpoint) -> str:
    """A short human name for messages: the GGUF file's stem or the HF directory's name."""
    path = Path(checkpoint.path)
    return path.stem if path.is_file() else path.name


class TPAttention(nn.Module):
    def __init__(self, config: ModelConfig, tp_rank: int, tp_size: int) -> None:
        super().__init__()
        self.qkv_proj = QKVParallelLinear(config.hidden_size, config.head_dim, config.num_heads, config.num_kv_heads,
                                          config.attention_bias, tp_rank=tp_rank, tp_size=tp_size)
        self.o_proj = RowParallelLinear(config.num_heads * config.head_dim, config.hidden_size,
                                        tp_rank=tp_rank, tp_size=tp_size)
        self.scale = config.head_dim ** -0.5

    def load(self, checkpoint: Checkpoint, prefix: str) -> None:
        self.qkv_proj.load(checkpoint, [f"{prefix}.q_proj", f"{prefix}.k_proj", f"{prefix}.v_proj"])
        self.o_proj.load(checkpoint, f"{prefix}.o_proj")

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata, impl: str) -> torch.Tensor:
        # x: [num_tokens, hidden]; cos/sin: [num_tokens, 1, head_dim]
        # kv_cache: this layer's shard [2, num_blocks, block_size, num_kv_heads / tp, head_dim]
        n = x.shape[0]
        q, k, v = self.qkv_proj.split(self.qkv_proj(x))  # q [n, heads/tp, d]; k, v [n, kv_heads/tp, d]
        q = (q * cos + rotate_half(q) * sin).to(x.dtype)
        k = (k * cos + rotate_half(k) * sin).to(x.dtype)
        out = attention(q, k, v.contiguous(), kv_cache[0], kv_cache[1], meta, self.scale, impl=impl)
        return self.o_proj(out.reshape(n, -1))


class TPMLP(nn.Module):
    def __init__(self, config: ModelConfig, tp_rank: int, tp_size: int) -> None:
        super().__init__()
        inter = config.intermediate_size
        self.gate_up_proj = ColumnParallelLinear(config.hidden_size, [inter, inter], tp_rank=tp_rank, tp_size=tp_size)
        self.down_proj = RowParallelLinear(inter, config.hidden_size, tp_rank=tp_rank, tp_size=tp_size)

    def load(self, checkpoint: Checkpoint, prefix: str) -> None:
        self.gate_up_proj.load(checkpoint, [f"{prefix}.gate_proj", f"{prefix}.up_proj"])
        self.down_proj.load(checkpoint, f"{prefix}.down_proj")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # each [num_tokens, intermediate / tp]
        return self.down_proj(F.silu(gate) * up)


class TPDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, tp_rank: int, tp_size: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = TPAttention(config, tp_rank, tp_size)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = TPMLP(config, tp_rank, tp_size)

    def load(self, checkpoint: Checkpoint, prefix: str) -> None:
        _load_norm(self.input_layernorm, checkpoint, f"{prefix}.input_layernorm")
        self.self_attn.load(checkpoint, f"{prefix}.self_attn")
        _load_norm(self.post_attention_layernorm, checkpoint, f"{prefix}.post_attention_layernorm")
        self.mlp.load(checkpoint, f"{prefix}.mlp")

    def forward(self, x, cos, sin, kv_cache, meta, impl):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, kv_cache, meta, impl)
        return x + self.mlp(self.post_attention_layernorm(x))


@torch.no_grad()
def _load_norm(norm: RMSNorm, checkpoint: Checkpoint, name: str) -> None:
    norm.weight.copy_(checkpoint.get_tensor(f"{name}.weight"))  # replicated: small


class TPTransformerModel(nn.Module):
    """One rank's shard of a Llama / Qwen2 model on the paged KV cache.

    >>> model = TPTransformerModel.from_checkpoint(load_checkpoint(path), tp_rank=0, tp_size=1)  # doctest: +SKIP
    >>> hidden = model(input_ids, positions, kv_cache_shard, meta)                             # doctest: +SKIP
    >>> logits = model.compute_logits(hidden[logits_indices])  # rank 0: [n, vocab]; others: None  # doctest: +SKIP
    """

    def __init__(self, config: ModelConfig, attention_impl: str = "auto", *, tp_rank: int | None = None,
                 tp_size: int | None = None, model_name: str = "the model") -> None:
        super().__init__()
        tp_rank = get_tp_rank() if tp_rank is None else tp_rank
        tp_size = get_tp_size() if tp_size is None else tp_size
        check_tp_degree(config, tp_size, model_name)
        self.config = config
        self.attention_impl = attention_impl
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.num_heads_per_rank = config.num_heads // tp_size
        self.num_kv_heads_per_rank = config.num_kv_heads // tp_size
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, tp_rank=tp_rank,
                                                   tp_size=tp_size)
        self.layers = nn.ModuleList(TPDecoderLayer(config, tp_rank, tp_size) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, tp_rank=tp_rank, tp_size=tp_size)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight  # the same vocabulary shard
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)

    @classmethod
    @torch.no_grad()
    def from_checkpoint(cls, checkpoint: Checkpoint, dtype: torch.dtype = torch.float32,
                        device: torch.device | str = "cpu", attention_impl: str = "auto", *,
                        tp_rank: int | None = None, tp_size: int | None = None) -> TPTransformerModel:
        """Build this rank's shard, reading only its slices of the checkpoint (rank/size default to the group)."""
        with torch.device("meta"):
            model = cls(checkpoint.config, attention_impl, tp_rank=tp_rank, tp_size=tp_size,
                        model_name=model_name(checkpoint))
        model.to_empty(device=device)
        model.to(dtype)
        model.inv_freq = rope_inv_freq(checkpoint.config).to(device)  # float32, like the reference
        model.embed_tokens.load(checkpoint, "model.embed_tokens")
        for i, layer in enumerate(model.layers):
            layer.load(checkpoint, f"model.layers.{i}")
        _load_norm(model.norm, checkpoint, "model.norm")
        if checkpoint.config.tie_word_embeddings:
            model.lm_head.weight = model.embed_tokens.weight
        else:
            model.lm_head.load(checkpoint, "lm_head")
        if torch.device(device).type == "cpu" and attention_impl in ("auto", "native"):
            resolve_impl(attention_impl, torch.empty(0))  # build or load the native CPU op now, not mid-request
        return model.eval()

    def rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return rope_cos_sin(positions, self.inv_freq, dtype)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        # input_ids, positions: [num_tokens]; kv_cache: [num_layers, 2, num_blocks, block_size, kv_heads/tp, head_dim]
        x = self.embed_tokens(input_ids)
        cos, sin = self.rope(positions, x.dtype)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, kv_cache[i], meta, self.attention_impl)
        return self.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        # hidden: [n, hidden_size] -> rank 0: [n, vocab_size] float32; other ranks: None (after the gather)
        return self.lm_head(hidden)
