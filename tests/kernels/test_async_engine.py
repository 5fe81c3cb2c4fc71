"""AsyncEngine: concurrent async streams equal solo runs; leaving a stream aborts it and frees blocks."""

from __future__ import annotations

import asyncio
import time

import pytest

from kernels.async_engine import AsyncEngine
from kernels.errors import InvalidRequestError
from kernels.sampling import SamplingParams
from kernels.scheduler import FinishReason
from tests.kernels.engine_helpers import GREEDY, make_engine, make_prompts, run_alone


def _run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=120))


def test_concurrent_streams_match_solo_runs(tiny):
    prompts = make_prompts(6, seed=11)
    expected = run_alone(tiny, prompts)
    engine = AsyncEngine(make_engine(tiny)).start()

    async def one(p):
        ids, text, last = [], "", None
        async for out in engine.generate(p, GREEDY):
            ids += out.token_ids
            text += out.text
            last = out
        return ids, last

    async def main():
        return await asyncio.gather(*(one(p) for p in prompts))

    try:
        results = _run(main())
    finally:
        engine.shutdown()
    assert [ids for ids, _ in results] == expected
    assert all(last.finished and last.finish_reason is FinishReason.LENGTH for _, last in results)
    assert engine.core.blocks.num_free_blocks == engine.core.blocks.num_blocks


def test_leaving_a_stream_early_aborts_and_frees_blocks(tiny):
    core = make_engine(tiny)
    step = core.step

    def paced_step():
        # At least 5 ms a step, so 200 tokens take a second however fast the machine: the request is
        # surely still running when the test cancels it (the tiny model alone can finish in 0.2 s).
        time.sleep(0.005)
        return step()

    core.step = paced_step
    engine = AsyncEngine(core).start()
    long = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)

    async def main():
        got = 0
        async for _ in engine.generate(make_prompts(3, seed=12)[2], long):
            got += 1
            if got == 3:
                break  # the client went away
        # A cancelled task aborts too.
        async def consume():
            async for _ in engine.generate([5, 6, 7], long):
                pass
        task = asyncio.create_task(consume())
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return got

    try:
        assert _run(main()) == 3
        stats = engine.stats()
    finally:
        engine.shutdown()
    assert stats.num_blocks_used == 0 and stats.num_running == 0 and stats.num_waiting == 0


def test_bad_request_raises_at_once_and_engine_keeps_serving(tiny):
    engine = AsyncEngine(make_engine(tiny)).start()

    async def main():
        with pytest.raises(InvalidRequestError):
            engine.add_request([], GREEDY)
        return [o async for o in engine.generate([5, 6], GREEDY)]

    try:
        outs = _run(main())
    finally:
        engine.shutdown()
    assert outs[-1].finished and sum(len(o.token_ids) for o in outs) == 12


def test_shutdown_ends_open_streams_with_an_error(tiny):
    engine = AsyncEngine(make_engine(tiny)).start()

    async def main():
        rid = engine.add_request([5, 6], SamplingParams(temperature=0.0, max_tokens=10_000, ignore_eos=True))
        agen = engine.stream(rid)
        await agen.__anext__()
        engine.shutdown()
        with pytest.raises(Exception, match="shut down"):
            async for _ in agen:
                pass

    _run(main())
    assert engine.core.blocks.num_used_blocks == 0
