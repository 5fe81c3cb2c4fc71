"""TP=3 on the real SmolLM2-135M (9 heads / 3 KV heads, Q4_1 and Q8_0 blocks sliced per rank) gives the
reference model's greedy tokens."""

from __future__ import annotations

import pytest
import torch.distributed as dist

from cloud import CloudEngine, TensorParallelError
from kernels.checkpoints import load_checkpoint
from kernels.engine import EngineConfig, EngineCore
from kernels.model import TransformerModel
from kernels.runner import ReferenceRunner
from kernels.sampling import SamplingParams
from kernels.tokenizer import Tokenizer
from tests.cloud import tp_helpers as helpers

pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time"]
GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


def _config() -> EngineConfig:
    return EngineConfig(num_blocks=32, block_size=16, max_num_batched_tokens=32)


def test_tp3_greedy_tokens_equal_the_reference(smollm2_gguf):
    ckpt = load_checkpoint(smollm2_gguf)
    tokenizer = Tokenizer.from_checkpoint(ckpt)
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    reference = EngineCore(ReferenceRunner(TransformerModel.from_checkpoint(ckpt, attention_impl="torch")),
                           tokenizer, _config(), ckpt.fingerprint)
    expected = [s.output_ids for s in reference.generate(prompts, GREEDY)]
    del reference

    engine = CloudEngine.from_model(smollm2_gguf, tp=3, config=_config(), attention_impl="torch")
    try:
        assert engine.core.kv_cache.shape[4] == 1, "each rank holds one of the 3 KV heads"
        got = [s.output_ids for s in engine.core.generate(prompts, GREEDY)]
    finally:
        engine.shutdown()
    assert got == expected
    assert helpers.live_children() == [] and not dist.is_initialized()


def test_tp2_is_refused_for_smollm2(smollm2_gguf):
    with pytest.raises(TensorParallelError, match=r"degree 2 does not divide .*9 attention heads / 3 KV heads; "
                                                  r"use 1 or 3"):
        CloudEngine.from_model(smollm2_gguf, tp=2)
