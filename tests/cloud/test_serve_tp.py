"""``hybrid-gateway cloud serve --tp 2`` as a real process tree: rank 0 serves HTTP, rank 1 is spawned.

The official ``openai`` client against it, a disconnect mid-stream freeing the sequence's blocks,
and a killed rank taking the whole server down with one clear error line and no orphans.
"""

from __future__ import annotations

import os
import signal
import sys
import time

import httpx
import openai
import pytest

from tests.cloud.tp_helpers import write_variant
from tests.support.processes import alive, descendants, free_port, start_server

MESSAGES = [{"role": "user", "content": "hello"}]


@pytest.fixture()
def server(tmp_path):
    path = write_variant(tmp_path, "llama-hf-tied")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "cloud.log"
    proc = start_server([sys.executable, "-m", "gateway.cli", "cloud", "serve", "--model", str(path), "--tp", "2",
                         "--port", str(port), "--kv-cache-mb", "8", "--log-level", "warning"], log,
                        lambda: httpx.get(url + "/health", timeout=2).status_code == 200, timeout=180)
    yield url, proc, log
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def test_tp2_server_answers_openai_client_and_frees_blocks_on_disconnect(server):
    url, proc, _ = server
    with openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0) as client:
        model = client.models.list().data[0].id
        reply = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=5, temperature=0,
                                               extra_body={"ignore_eos": True})
        assert reply.usage.completion_tokens == 5
        chunks = list(client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=5, temperature=0,
                                                     stream=True, stream_options={"include_usage": True},
                                                     extra_body={"ignore_eos": True}))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == reply.choices[0].message.content and chunks[-1].usage.completion_tokens == 5
    assert httpx.get(url + "/health").json()["tp"] == 2
    payload = {"messages": MESSAGES, "max_tokens": 200, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", url + "/v1/chat/completions", json=payload, timeout=30) as r:
        lines = r.iter_lines()
        for _ in range(3):
            next(lines)
    deadline = time.monotonic() + 10
    while (s := httpx.get(url + "/stats").json())["num_blocks_used"] or s["num_running"]:
        assert time.monotonic() < deadline, s
        time.sleep(0.05)
    assert s["generated_tokens"] < 5 + 5 + 200
    # SIGTERM: a clean stop, ranks joined, nothing left behind.
    family = descendants(proc.pid)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    time.sleep(0.5)
    assert not {p for p in family if alive(p)}


def test_killing_a_rank_stops_the_server_with_a_clear_error(server):
    url, proc, log = server
    (worker,) = [int(p) for p in httpx.get(url + "/stats").json()["worker_pids"].values()]
    family = descendants(proc.pid)
    os.kill(worker, signal.SIGKILL)
    start = time.monotonic()
    code = proc.wait(20)
    assert code != 0 and time.monotonic() - start < 15
    text = log.read_text()
    assert f"cloud rank 1 (pid {worker}) exited" in text, text[-3000:]
    time.sleep(0.5)
    assert not {p for p in family if alive(p)}, "orphans left behind"
