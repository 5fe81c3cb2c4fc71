"""Reference decoder-only transformer (Llama / Qwen2) on the paged KV cache.

Single device, plain PyTorch, one readable file in the manner of gpt-fast's ``model.py``:
RMSNorm, rotary position embeddings (RoFormer, with the checkpoint's theta and optional
Llama-3 frequency scaling), grouped-query attention through ``kernels.attention`` on the
shared paged cache, and a SwiGLU MLP. Parameter names equal Hugging Face's, so a checkpoint
loads by name. Qwen2 differs only by biases on q/k/v.

Tokens are a flat batch: ``input_ids`` ``[num_tokens]`` holds every scheduled sequence's new
tokens back to back (``meta.cu_seqlens_q`` says where each starts).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kernels.attention import AttentionMetadata, attention
from kernels.checkpoints import Checkpoint, ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """Inverse frequencies ``[head_dim // 2]``; Llama-3 scaling bends the low frequencies."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    # Llama-3: long wavelengths are slowed by `factor`, short ones kept, the band between blended.
    low, high = scaling.low_freq_factor, scaling.high_freq_factor
    old_ctx = scaling.original_max_position_embeddings
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_ctx / low, inv_freq / scaling.factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    mid = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_mid = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
    return torch.where(is_mid, mid, scaled)


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """positions ``[num_tokens]`` -> cos, sin ``[num_tokens, 1, head_dim]``, computed in float32."""
    freqs = positions.float().unsqueeze(-1) * inv_freq.unsqueeze(0)
    emb = torch.cat((freqs, freqs), dim=-1).unsqueeze(1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.scale = self.head_dim ** -0.5
        hidden, bias = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata, impl: str) -> torch.Tensor:
        # x: [num_tokens, hidden]; cos/sin: [num_tokens, 1, head_dim]
        # kv_cache: this layer's [2, num_blocks, block_size, num_kv_heads, head_dim]
        n = x.shape[0]
        q = self.q_proj(x).view(n, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(n, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(n, self.num_kv_heads, self.head_dim)
        q = (q * cos + rotate_half(q) * sin).to(x.dtype)
        k = (k * cos + rotate_half(k) * sin).to(x.dtype)
        out = attention(q, k, v, kv_cache[0], kv_cache[1], meta, self.scale, impl=impl)
        return self.o_proj(out.reshape(n, self.num_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, kv_cache, meta, impl):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, kv_cache, meta, impl)
        return x + self.mlp(self.post_attention_layernorm(x))


class _Backbone(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class TransformerModel(nn.Module):
    """Llama / Qwen2 forward on the paged KV cache.

    >>> model = TransformerModel.from_checkpoint(load_checkpoint(path))  # doctest: +SKIP
    >>> hidden = model(input_ids, positions, kv_cache, meta)              # doctest: +SKIP
    >>> logits = model.compute_logits(hidden[last_token_rows])            # doctest: +SKIP
    """

    def __init__(self, config: ModelConfig, attention_impl: str = "auto") -> None:
        super().__init__()
        self.config = config
        self.attention_impl = attention_impl
        self.model = _Backbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)

    @classmethod
    @torch.no_grad()
    def from_checkpoint(cls, checkpoint: Checkpoint, dtype: torch.dtype = torch.float32,
                        device: torch.device | str = "cpu", attention_impl: str = "auto") -> TransformerModel:
        with torch.device("meta"):
            model = cls(checkpoint.config, attention_impl)
        model.to_empty(device=device)
        model.inv_freq = rope_inv_freq(checkpoint.config).to(device)
        available = set(checkpoint.tensor_names())
        tied = checkpoint.config.tie_word_embeddings
        for name, param in model.named_parameters():
            if tied and name == "lm_head.weight":
                continue  # shares embed_tokens' storage, re-tied below
            if name not in available:
                raise KeyError(f"checkpoint {checkpoint.path} has no tensor {name!r}")
            tensor = checkpoint.get_tensor(name, dtype=torch.float32)
            if tensor.shape != param.shape:
                raise ValueError(f"{name}: checkpoint shape {tuple(tensor.shape)} != model {tuple(param.shape)}")
            param.data = tensor.to(device=device, dtype=dtype)
        if tied:
            model.lm_head.weight = model.model.embed_tokens.weight
        return model.eval()

    def rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return rope_cos_sin(positions, self.inv_freq, dtype)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        # input_ids, positions: [num_tokens]; kv_cache: [num_layers, 2, num_blocks, block_size, kv_heads, head_dim]
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.rope(positions, x.dtype)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, kv_cache[i], meta, self.attention_impl)
        return self.model.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # hidden: [n, hidden_size] -> [n, vocab_size] in float32
        return self.lm_head(hidden).float()
