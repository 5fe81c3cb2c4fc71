"""The edge engine (shared scheduler + ONNX Runtime runner): continuous batching gives each request the
tokens it gets alone, through chunked prefill, prefix reuse, preemption and abort; bad input is refused
while others keep being served. A tiny random Llama in an fp32 build keeps greedy decisions exact."""

from __future__ import annotations

import asyncio

import pytest
import torch

from edge.engine import EdgeEngine
from edge.runner import OnnxRunner
from kernels.checkpoints import load_checkpoint
from kernels.engine import EngineConfig, EngineCore
from kernels.errors import InvalidRequestError
from kernels.sampling import SamplingParams
from kernels.scheduler import FinishReason
from kernels.tokenizer import Tokenizer
from tests.kernels import checkpoint_factory as factory
from tests.kernels.engine_helpers import GREEDY, make_prompts


@pytest.fixture(scope="module")
def edge(tmp_path_factory):
    config = factory.tiny_config("llama", tie_word_embeddings=True)
    path = factory.write_hf_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", config,
                                       factory.random_state_dict(config, 3))
    ckpt = load_checkpoint(path)
    runner = OnnxRunner(ckpt, "fp32", cache_root=tmp_path_factory.mktemp("onnx"), intra_op_num_threads=1)
    return runner, Tokenizer.from_checkpoint(ckpt), ckpt.fingerprint, path


def _engine(edge, **kw) -> EngineCore:
    runner, tok, fingerprint, _ = edge
    cfg = {"num_blocks": 64, "block_size": 4, "max_num_batched_tokens": 64, **kw}
    return EngineCore(runner, tok, EngineConfig(**cfg), fingerprint)


def _alone(edge, prompts, params=GREEDY, **kw):
    return [_engine(edge, **kw).generate([p], params)[0].output_ids for p in prompts]


def test_concurrent_chunked_and_preempted_runs_match_solo_runs(edge):
    prompts = make_prompts(8)
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    expected = _alone(edge, prompts, params)
    batched = _engine(edge, max_num_seqs=8).generate(prompts, params)
    assert [s.output_ids for s in batched] == expected
    chunked = _engine(edge, max_num_batched_tokens=5).generate(prompts, params)
    assert [s.output_ids for s in chunked] == expected
    tight = _engine(edge, num_blocks=20)
    seqs = tight.generate(prompts, params)
    assert tight.scheduler.num_preemptions > 0
    assert [s.output_ids for s in seqs] == expected
    assert tight.blocks.num_free_blocks == 20


def test_prefix_reuse_same_tokens_fewer_blocks(edge):
    shared = make_prompts(5, seed=3)[4]
    prompts = [shared + [7, 8], shared + [9]]
    expected = _alone(edge, prompts, enable_prefix_caching=False)
    engine = _engine(edge)
    seqs = [engine.generate([p], GREEDY)[0] for p in prompts]
    assert [s.output_ids for s in seqs] == expected
    assert seqs[1].num_cached_prompt == 28


def test_abort_mid_stream_frees_every_block_and_bad_input_is_refused(edge):
    engine = _engine(edge, max_model_len=48)
    long = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    ids = [engine.add_request(p, long) for p in make_prompts(3, seed=5)]
    for _ in range(3):
        engine.step()
    with pytest.raises(InvalidRequestError, match="empty"):
        engine.add_request([], long)
    with pytest.raises(InvalidRequestError, match="context"):
        engine.add_request([5] * 48, long)
    assert engine.abort(ids[0])
    outs = []
    while engine.has_unfinished():
        outs += engine.step()
    reasons = {o.request_id: o.finish_reason for o in outs if o.finished}
    assert reasons[ids[0]] is FinishReason.ABORT and reasons[ids[1]] is FinishReason.LENGTH
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


def test_edge_engine_async_api(edge, tmp_path):
    _, tok, _, path = edge
    engine = EdgeEngine.from_model(path, quant="fp32", cache_root=tmp_path,
                                   config=EngineConfig(num_blocks=64, block_size=4)).start()

    async def main():
        async def one(p):
            return [o async for o in engine.generate(p, GREEDY)]
        results = await asyncio.gather(*(one(p) for p in make_prompts(4, seed=9)))
        stats = engine.edge_stats()
        return results, stats

    try:
        results, stats = asyncio.run(asyncio.wait_for(main(), 120))
    finally:
        engine.shutdown()
    assert all(sum(len(o.token_ids) for o in outs) == 12 and outs[-1].finished for outs in results)
    assert stats.num_blocks_used == 0 and stats.num_running == 0 and stats.tokens_per_second > 0
    assert engine.model_id.endswith("-fp32")
    # on CPU the fused graph runs and kv_dtype "auto" stores K and V as half
    assert engine.core.kv_cache.dtype == engine.core.config.kv_dtype == torch.float16
