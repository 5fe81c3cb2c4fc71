"""``hybrid-gateway serve`` as users run it: the real default stack in a subprocess.

Edge = SmolLM2-135M int4 in ONNX Runtime in the gateway process; cloud = the same weights at fp32 in
``cloud serve`` child processes; the official ``openai`` client in front. Then Ctrl-C (SIGINT) must
stop everything, children included.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.support.processes import alive, descendants, free_port, start_server

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def serve(smollm2_gguf, tmp_path_factory):
    port, cloud_port = free_port(), free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    env = {**os.environ, "HYBRID_GATEWAY_EDGE_KV_CACHE_MB": "128"}
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        return (httpx.get(url + "/ready", timeout=2).status_code == 200
                and httpx.get(url + "/health", timeout=2).json()["tiers"]["cloud"]["healthy"])

    proc = start_server([sys.executable, "-m", "gateway.cli", "serve", "--port", str(port), "--cloud-port",
                         str(cloud_port), "--log-level", "warning"], log, ready, timeout=600, env=env)
    yield url, proc, log
    if proc.poll() is None:
        proc.kill()


def test_default_stack_answers_the_openai_client(serve):
    url, _, log = serve
    # "Answer in one sentence." gives the int4 edge model a clear first token ("The" 29.7 vs "Paris" 28.1); the bare
    # question is a near-tie ("La" 25.3 vs "The" 24.95) that 1e-6 changes in attention numerics can flip.
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
    with openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0) as client:
        for model in ("edge", "cloud"):
            raw = client.chat.completions.with_raw_response.create(model=model, messages=messages, max_tokens=12,
                                                                    temperature=0)
            reply = raw.parse()
            assert raw.headers["x-hybrid-route"] == model
            assert "Paris" in reply.choices[0].message.content, (model, reply.choices[0].message.content)
        chunks = list(client.chat.completions.create(model="auto", messages=messages, max_tokens=8, stream=True,
                                                     stream_options={"include_usage": True}))
        assert chunks[-1].usage.completion_tokens >= 1
        ids = {m.id for m in client.models.list().data}
        assert {"auto", "edge", "cloud"} <= ids


def test_default_stack_serves_64_concurrent_streams(serve):
    url, _, _ = serve

    async def one(client: openai.AsyncOpenAI, i: int) -> int:
        stream = await client.chat.completions.create(
            model="auto", messages=[{"role": "user", "content": f"Count to {i % 7 + 3}."}], max_tokens=8,
            stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        usage = None
        async for chunk in stream:
            usage = chunk.usage or usage
        return usage.completion_tokens

    async def main():
        async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=300) as client:
            return await asyncio.gather(*(one(client, i) for i in range(64)))

    assert asyncio.run(main()) == [8] * 64


def _cloud_pid(proc) -> int:
    (pid,) = [p for p in descendants(proc.pid)
              if "cloud" in Path(f"/proc/{p}/cmdline").read_bytes().decode(errors="replace")
              and Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[1] == str(proc.pid)]
    return pid


def test_a_killed_cloud_is_restarted_and_serves_again(serve):
    url, proc, log = serve
    body = {"messages": [{"role": "user", "content": "Prove that there are infinitely many primes."}],
            "max_tokens": 4}
    old = _cloud_pid(proc)
    os.kill(old, signal.SIGKILL)
    for model in ("auto", "edge"):  # served meanwhile: auto falls back to the edge if it picked the cloud
        r = httpx.post(url + "/v1/chat/completions", json={**body, "model": model}, timeout=60)
        assert r.status_code == 200, r.text
    deadline = time.monotonic() + 180
    while "restarting it" not in log.read_text() or not httpx.get(url + "/health").json()["tiers"]["cloud"]["healthy"]:
        assert time.monotonic() < deadline, "the cloud tier was not restarted:\n" + log.read_text()[-2000:]
        time.sleep(0.5)
    deadline = time.monotonic() + 180
    while (forced := httpx.post(url + "/v1/chat/completions", json={**body, "model": "cloud"}, timeout=60)
           ).status_code != 200:
        assert time.monotonic() < deadline, forced.text
        time.sleep(0.5)
    assert forced.headers["x-hybrid-route"] == "cloud" and _cloud_pid(proc) != old


def test_ctrl_c_stops_everything(serve):
    _, proc, log = serve
    family = descendants(proc.pid)
    assert family, "the cloud tier should be running as child processes"
    proc.send_signal(signal.SIGINT)
    assert proc.wait(60) == 0, log.read_text()[-3000:]
    assert "Traceback" not in log.read_text(), log.read_text()[-3000:]
    deadline = time.monotonic() + 15
    while (left := {p for p in family if alive(p)}) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, f"orphans left behind: {left}"
