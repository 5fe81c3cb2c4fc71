"""The cloud engine's life with real worker processes: serving, abort, shutdown, and a worker killed mid-stream.

TP=2 over gloo on a tiny random Llama; rank 0 is this test process. No test may leave a child behind.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch.distributed as dist

from cloud import CloudEngine, WorkerFailedError
from cloud.launcher import free_port
from kernels.errors import EngineError
from kernels.sampling import SamplingParams
from tests.cloud import tp_helpers as helpers

GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
LONG = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    return helpers.write_variant(tmp_path_factory.mktemp("tp"), "llama-hf-tied")


def _tp2(path, **kw) -> CloudEngine:
    return CloudEngine.from_model(path, tp=2, config=helpers.engine_config(), threads_per_rank=1,
                                  attention_impl="torch", **kw)


async def _collect(engine: CloudEngine, prompt: list[int], params: SamplingParams) -> list[int]:
    tokens: list[int] = []
    async for out in engine.generate(prompt, params):
        tokens += out.token_ids
    return tokens


def _no_children() -> bool:
    return helpers.live_children() == []


def test_tp1_runs_in_process_without_a_process_group(path):
    engine = CloudEngine.from_model(path, tp=1, config=helpers.engine_config(), attention_impl="torch").start()
    try:
        assert not dist.is_initialized() and helpers.live_children() == []
        assert (engine.tp, engine.failure, engine.failed) == (1, None, False)
        assert engine.model_id == "llama-hf-tied" and engine.tokenizer is not None
        prompt = helpers.prompts(3)[2]
        expected = helpers.reference_engine(path).generate([prompt], GREEDY)[0].output_ids
        assert asyncio.run(_collect(engine, prompt, GREEDY)) == expected
    finally:
        engine.shutdown()


@pytest.fixture(scope="class")
def served(path):
    """One TP=2 engine per test class: shut down before the tests after the class spawn their own."""
    engine = _tp2(path).start()
    yield engine
    engine.shutdown()


class TestServing:
    def test_concurrent_streams_get_the_reference_tokens(self, served, path):
        batch = helpers.prompts(4)
        expected = [s.output_ids for s in helpers.reference_engine(path).generate(batch, GREEDY)]

        async def run():
            return await asyncio.gather(*(_collect(served, p, GREEDY) for p in batch))

        assert asyncio.run(run()) == expected
        assert served.stats().num_blocks_used == 0

    def test_abort_frees_blocks_and_the_engine_keeps_serving(self, served, path):
        prompt = helpers.prompts(5)[4]

        async def run():
            rid = served.add_request(prompt, LONG)
            stream = served.stream(rid)
            await anext(stream)
            await anext(stream)
            assert served.stats().num_blocks_used > 0
            assert served.abort(rid)
            assert served.stats().num_blocks_used == 0, "abort frees the request's blocks on rank 0 at once"
            await stream.aclose()
            return await _collect(served, prompt, GREEDY)

        expected = helpers.reference_engine(path).generate([prompt], GREEDY)[0].output_ids
        assert asyncio.run(run()) == expected
        assert not served.failed


def test_shutdown_leaves_no_child_processes(path):
    engine = _tp2(path).start()
    assert len(helpers.live_children()) == 1
    assert asyncio.run(_collect(engine, [5, 6, 7], GREEDY))
    engine.shutdown()
    assert _no_children(), helpers.live_children()
    assert not dist.is_initialized()
    assert not engine.failed, "an orderly shutdown is not a failure"
    engine.shutdown()  # idempotent


def test_killing_a_worker_fails_the_engine_and_its_streams(path, caplog):
    reasons: list[str] = []
    engine = _tp2(path, on_failure=reasons.append).start()
    (worker_pid,) = engine.worker_pids.values()

    async def run() -> tuple[BaseException, float]:
        rid = engine.add_request([5, 6, 7], LONG)
        stream = engine.stream(rid)
        await anext(stream)
        killed_at = time.monotonic()
        os.kill(worker_pid, signal.SIGKILL)
        with pytest.raises(EngineError) as err:
            async with asyncio.timeout(5.0):
                async for _ in stream:
                    pass
        return err.value, time.monotonic() - killed_at

    try:
        error, seconds = asyncio.run(run())
        assert isinstance(error, WorkerFailedError) and seconds < 5.0
        expected = rf"cloud rank 1 \(pid {worker_pid}\) exited with code -9; shutting down the cloud engine"
        assert re.fullmatch(expected, str(error)), str(error)
        assert engine.failed and re.fullmatch(expected, engine.failure)
        assert helpers.wait_until(lambda: reasons != [], 5.0) and reasons == [engine.failure], "on_failure, once"
        assert any(re.fullmatch(expected, r.getMessage()) for r in caplog.records), "one clear log line"
        assert helpers.wait_until(lambda: not engine.is_running, 5.0), "the loop stops"
        with pytest.raises(WorkerFailedError, match="has failed"):
            asyncio.run(_collect(engine, [1, 2], GREEDY))
        assert helpers.wait_until(_no_children, 5.0), helpers.live_children()
    finally:
        engine.shutdown()
    assert _no_children() and not dist.is_initialized()


TORCHRUN_SCRIPT = """
import json, sys
from cloud import run_torchrun_rank
from kernels.engine import EngineConfig
from kernels.sampling import SamplingParams

engine = run_torchrun_rank(sys.argv[1], config=EngineConfig(num_blocks=64, block_size=4), threads_per_rank=1,
                           attention_impl="torch")
if engine is not None:
    prompts = json.loads(sys.argv[2])
    seqs = engine.core.generate(prompts, SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True))
    print("RESULT " + json.dumps({"tp": engine.tp, "tokens": [s.output_ids for s in seqs]}), flush=True)
    engine.shutdown()
"""


def test_torchrun_launch_serves_from_rank_0(path, tmp_path):
    script = tmp_path / "serve.py"
    script.write_text(TORCHRUN_SCRIPT)
    batch = helpers.prompts(3)
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--master-port", str(free_port()), str(script), str(path), json.dumps(batch)],
                          capture_output=True, text=True, timeout=120, env=env, cwd=root)
    assert done.returncode == 0, done.stderr[-3000:]
    (line,) = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    result = json.loads(line.removeprefix("RESULT "))
    expected = [s.output_ids for s in helpers.reference_engine(path, helpers.engine_config(
        max_num_batched_tokens=512)).generate(batch, GREEDY)]
    assert result == {"tp": 2, "tokens": expected}


RANK0_SCRIPT = """
import sys, threading, time
from cloud import CloudEngine
from kernels.engine import EngineConfig

def build():
    global engine
    engine = CloudEngine.from_model(sys.argv[1], tp=2, config=EngineConfig(num_blocks=64, block_size=4),
                                    threads_per_rank=1, attention_impl="torch")

if __name__ == "__main__":
    if sys.argv[2] == "thread":  # as a server's lifespan does (asyncio.to_thread)
        builder = threading.Thread(target=build)
        builder.start()
        builder.join()
    else:
        build()
    print("WORKERS", *engine.worker_pids.values(), flush=True)
    time.sleep(120)
"""


@pytest.mark.parametrize("built_in", ["main", "thread"])
def test_workers_die_with_rank_0(path, tmp_path, built_in):
    script = tmp_path / "rank0.py"
    script.write_text(RANK0_SCRIPT)
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    rank0 = subprocess.Popen([sys.executable, str(script), str(path), built_in], stdout=subprocess.PIPE, text=True,
                             env=env, cwd=root)
    try:
        line = rank0.stdout.readline()
        assert line.startswith("WORKERS"), line
        workers = [int(pid) for pid in line.split()[1:]]
        assert workers and all(helpers.is_alive(pid) for pid in workers)
        rank0.kill()
        rank0.wait(10)
        assert helpers.wait_until(lambda: not any(helpers.is_alive(pid) for pid in workers), 5.0), workers
    finally:
        rank0.kill()
        rank0.wait(10)
        rank0.stdout.close()
