"""Checkpoint loading: GGUF files and HF safetensors directories behind one :class:`Checkpoint` view.

>>> from kernels.checkpoints import load_checkpoint
>>> ckpt = load_checkpoint("SmolLM2-135M-Instruct.Q4_1.gguf")  # doctest: +SKIP
>>> ckpt.get_tensor("model.layers.0.self_attn.q_proj.weight").shape  # doctest: +SKIP
torch.Size([576, 576])
"""

from kernels.checkpoints.checkpoint import Checkpoint, hf_tensor_shapes, load_checkpoint
from kernels.checkpoints.config import SUPPORTED_ARCHS, ModelConfig, RopeScaling
from kernels.checkpoints.gguf import SUPPORTED_GGML_TYPES, GGUFCheckpoint, gguf_tensor_name
from kernels.checkpoints.safetensors import SafetensorsCheckpoint

__all__ = [
    "Checkpoint",
    "GGUFCheckpoint",
    "ModelConfig",
    "RopeScaling",
    "SUPPORTED_ARCHS",
    "SUPPORTED_GGML_TYPES",
    "SafetensorsCheckpoint",
    "gguf_tensor_name",
    "hf_tensor_shapes",
    "load_checkpoint",
]
