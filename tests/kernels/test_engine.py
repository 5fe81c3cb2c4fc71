"""Shared engine core: continuous batching, chunked prefill, prefix reuse, preemption, abort, stops.

Runs the reference runner on a tiny random Llama written by the test; every batched result is
compared with the same request run alone.
"""

from __future__ import annotations

import pytest

from kernels.engine import EngineConfig
from kernels.errors import InvalidRequestError
from kernels.sampling import SamplingParams
from kernels.scheduler import FinishReason
from tests.kernels.engine_helpers import GREEDY, make_engine, make_prompts, run_alone


def test_concurrent_requests_match_running_alone(tiny):
    prompts = make_prompts(8)
    expected = run_alone(tiny, prompts)
    engine = make_engine(tiny, max_num_seqs=8)
    seqs = engine.generate(prompts, GREEDY)
    assert [s.output_ids for s in seqs] == expected
    assert all(s.finish_reason is FinishReason.LENGTH for s in seqs)
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


def test_requests_arriving_mid_stream_match(tiny):
    prompts = make_prompts(6, seed=1)
    expected = run_alone(tiny, prompts)
    engine = make_engine(tiny)
    seqs = []
    for p in prompts:  # one new request per step while the earlier ones decode
        rid = engine.add_request(p, GREEDY)
        seqs.append(engine._seqs[rid])
        engine.step()
    while engine.has_unfinished():
        engine.step()
    assert [s.output_ids for s in seqs] == expected


@pytest.mark.parametrize("budget", [4, 7, 16])
def test_chunked_prefill_gives_the_same_tokens(tiny, budget):
    prompts = make_prompts(5, seed=2)
    expected = run_alone(tiny, prompts)
    engine = make_engine(tiny, max_num_batched_tokens=budget)
    assert [s.output_ids for s in engine.generate(prompts, GREEDY)] == expected


def test_prefix_reuse_gives_same_tokens_and_allocates_fewer_blocks(tiny):
    shared = make_prompts(5, seed=3)[4]  # 30 tokens
    prompts = [shared + [7, 8, 9], shared + [10], shared + [11, 12]]
    expected = run_alone(tiny, prompts, enable_prefix_caching=False)

    def run(caching: bool):
        engine = make_engine(tiny, enable_prefix_caching=caching)
        seqs = [engine.generate([p], GREEDY)[0] for p in prompts]  # one after another: later ones hit
        return [s.output_ids for s in seqs], engine, seqs

    got, engine, seqs = run(True)
    assert got == expected
    assert [s.num_cached_prompt for s in seqs] == [0, 28, 28]
    assert engine.blocks.stats().prefix_hits == 14
    _, engine_off, seqs_off = run(False)
    assert all(s.num_cached_prompt == 0 for s in seqs_off)


def test_preemption_under_a_tiny_pool_completes_everything_correctly(tiny):
    prompts = make_prompts(6, seed=4)
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    expected = run_alone(tiny, prompts, params)
    engine = make_engine(tiny, num_blocks=16, max_num_seqs=6)  # 64 slots for ~150 tokens of demand
    seqs = engine.generate(prompts, params)
    assert engine.scheduler.num_preemptions > 0
    assert [s.output_ids for s in seqs] == expected
    assert engine.blocks.num_free_blocks == 16
    engine.blocks.check_invariants()


def test_abort_mid_stream_returns_every_block(tiny):
    engine = make_engine(tiny)
    prompts = make_prompts(4, seed=5)
    ids = [engine.add_request(p, SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True)) for p in prompts]
    for _ in range(3):
        engine.step()
    assert engine.blocks.num_used_blocks > 0
    assert engine.abort(ids[1]) and engine.abort(ids[2])
    assert not engine.abort(ids[1])  # already gone
    outs = engine.step()
    aborted = [o for o in outs if o.finish_reason is FinishReason.ABORT]
    assert sorted(o.request_id for o in aborted) == sorted(ids[1:3])
    while engine.has_unfinished():
        engine.step()
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks
    engine.blocks.check_invariants()


def test_abort_of_a_waiting_request(tiny):
    engine = make_engine(tiny, max_num_seqs=1)
    a = engine.add_request([5, 6, 7], GREEDY)
    b = engine.add_request([8, 9], GREEDY)
    engine.step()
    assert engine.abort(b)
    while engine.has_unfinished():
        engine.step()
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks and a


def test_eos_and_stop_token_ids_end_the_reply(tiny):
    runner, tok, _ = tiny
    prompt = make_prompts(3, seed=6)[2]
    free = run_alone(tiny, [prompt])[0]
    stop_id = free[5]
    cut = free.index(stop_id)
    engine = make_engine(tiny)
    (seq,) = engine.generate([prompt], SamplingParams(temperature=0.0, max_tokens=12, stop_token_ids=(stop_id,),
                                                      ignore_eos=True))
    assert seq.output_ids == free[:cut] and seq.finish_reason is FinishReason.STOP


def test_stop_strings_truncate_text_and_never_leak(tiny):
    runner, tok, _ = tiny
    prompt = make_prompts(5, seed=7)[4]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    engine = make_engine(tiny)
    rid = engine.add_request(prompt, params)
    full = ""
    while engine.has_unfinished():
        full += "".join(o.text for o in engine.step() if o.request_id == rid)
    assert len(full) > 6, full
    stop = full[len(full) // 2: len(full) // 2 + 3]
    expected = full[: full.index(stop)]
    engine = make_engine(tiny)
    rid = engine.add_request(prompt, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, stop=(stop,)))
    streamed, last = "", None
    while engine.has_unfinished():
        for o in engine.step():
            streamed += o.text
            last = o
    assert streamed == expected
    assert last.finished and last.finish_reason is FinishReason.STOP


def test_streamed_text_equals_decoded_tokens(tiny):
    runner, tok, _ = tiny
    engine = make_engine(tiny)
    rid = engine.add_request(make_prompts(2, seed=8)[1], GREEDY)
    text, ids = "", []
    while engine.has_unfinished():
        for o in engine.step():
            text += o.text
            ids += o.token_ids
    assert ids and text == tok.decode(ids) and rid


def test_bad_requests_are_refused_and_others_keep_running(tiny):
    engine = make_engine(tiny, max_model_len=40)
    good = engine.add_request([5, 6, 7], GREEDY)
    with pytest.raises(InvalidRequestError, match="empty"):
        engine.add_request([], GREEDY)
    with pytest.raises(InvalidRequestError, match="context"):
        engine.add_request([5] * 40, GREEDY)
    with pytest.raises(InvalidRequestError, match="token ids"):
        engine.add_request([5, 10**6], GREEDY)
    with pytest.raises(InvalidRequestError, match="max_tokens"):
        engine.add_request([5], SamplingParams(max_tokens=0))
    with pytest.raises(InvalidRequestError, match="already in use"):
        engine.add_request([5], GREEDY, request_id=good)
    small = make_engine(tiny, num_blocks=2)
    with pytest.raises(InvalidRequestError, match="does not fit the KV cache"):
        small.add_request(list(range(3, 12)), GREEDY)
    (seq,) = [engine._seqs[good]]
    while engine.has_unfinished():
        engine.step()
    assert len(seq.output_ids) == 12


def test_length_is_capped_by_the_context(tiny):
    engine = make_engine(tiny, max_model_len=20)
    (seq,) = engine.generate([[5] * 15], SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True))
    assert seq.num_tokens == 20 and seq.finish_reason is FinishReason.LENGTH


def test_stats_report_blocks_and_tokens(tiny):
    engine = make_engine(tiny)
    engine.generate(make_prompts(3), GREEDY)
    stats = engine.stats()
    assert stats.generated_tokens == 36 and stats.prompt_tokens == 1 + 5 + 17
    assert stats.num_blocks_used == 0 and stats.num_running == stats.num_waiting == 0


def test_engine_config_rejects_bad_values():
    with pytest.raises(ValueError, match="max_num_seqs"):
        EngineConfig(max_num_seqs=0)
    with pytest.raises(ValueError, match="kv_cache_bytes"):
        EngineConfig(kv_cache_bytes=0)
