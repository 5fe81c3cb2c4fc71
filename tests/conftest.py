"""Shared fixtures. Triton kernels run under the interpreter when no GPU is present."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    # Must be set before any module decorates a kernel with @triton.jit.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """Path of the embedded default model (SmolLM2-135M-Instruct Q4_1 GGUF), pulled into the cache once."""
    override = os.environ.get("HYBRID_GATEWAY_TEST_GGUF")
    if override:
        return Path(override)
    from kernels.checkpoints.store import ensure_default_model

    return ensure_default_model()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random Llama behind the reference runner: (runner, tokenizer, fingerprint)."""
    from tests.kernels.engine_helpers import build_tiny

    return build_tiny(tmp_path_factory.mktemp("tiny"))
