"""OpenAIHTTPBackend against a real uvicorn server on 127.0.0.1: streaming pass-through, disconnect on aclose(),
and health probes noticing the server going away and coming back on the same port."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from gateway.backends import OpenAIHTTPBackend
from tests.support.live_server import ClosingServer

from .conftest import chunk, run


class Upstream:
    """A tiny OpenAI-ish server in a thread; ``disconnected`` is set when a stream is cut before its end."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.models_seen: list[str] = []
        self.disconnected = threading.Event()
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.get("/health")
        async def health() -> dict:
            return {"status": "ok"}

        @app.post("/v1/chat/completions")
        async def chat(request: Request) -> StreamingResponse:
            body = await request.json()
            self.models_seen.append(body["model"])
            num_chunks, delay_s = body["max_tokens"], body["delay_s"]

            async def events():
                finished = False
                try:
                    for i in range(num_chunks):
                        yield f"data: {json.dumps(chunk(str(i)))}\n\n"
                        await asyncio.sleep(delay_s)
                    yield "data: [DONE]\n\n"
                    finished = True
                finally:
                    if not finished:
                        self.disconnected.set()

            return StreamingResponse(events(), media_type="text/event-stream")

        return app

    def start(self) -> None:
        config = uvicorn.Config(self.app(), host="127.0.0.1", port=self.port, log_level="warning", lifespan="off",
                                ws="none", http="h11", timeout_graceful_shutdown=1)
        self._server = ClosingServer(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            assert self._thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)

    def stop(self) -> None:
        assert self._server is not None and self._thread is not None
        self._server.should_exit = True
        self._thread.join(timeout=10)
        assert not self._thread.is_alive(), "uvicorn did not stop"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def wait_until(predicate, timeout_s: float) -> float:
    """Seconds it took for ``predicate()`` to hold; fails after ``timeout_s``."""
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < timeout_s, f"condition not met within {timeout_s} s"
        await asyncio.sleep(0.01)
    return time.monotonic() - start


def test_streaming_disconnect_and_health_against_a_real_server():
    upstream = Upstream(free_port())
    upstream.start()
    timings: dict[str, float] = {}

    async def main() -> None:
        cloud = OpenAIHTTPBackend([f"http://127.0.0.1:{upstream.port}/v1"], model_id="live-model",
                                  health_interval_s=0.05, breaker_failures=2, breaker_cooldown_s=30,
                                  connect_timeout_s=1, max_retries=0)
        await cloud.start()
        try:
            # 1. Pass-through: every chunk, in order, then a clean end.
            stream = await cloud.chat_completions({"model": "auto", "max_tokens": 5, "delay_s": 0.01}, stream=True)
            assert [c["choices"][0]["delta"]["content"] async for c in stream] == list("01234")
            assert upstream.models_seen == ["live-model"] and not upstream.disconnected.is_set()

            # 2. aclose() mid-stream: the server's generator must see the client go away, promptly.
            stream = await cloud.chat_completions({"max_tokens": 10_000, "delay_s": 0.05}, stream=True)
            assert (await stream.__anext__())["choices"][0]["delta"]["content"] == "0"
            await stream.__anext__()
            closed_at = time.monotonic()
            await stream.aclose()
            await asyncio.to_thread(upstream.disconnected.wait, 5)
            timings["disconnect_seen_s"] = time.monotonic() - closed_at
            assert cloud.load().outstanding == 0

            # 2b. Same when the task reading the stream is cancelled (what the gateway does on a client disconnect).
            upstream.disconnected.clear()
            stream = await cloud.chat_completions({"max_tokens": 10_000, "delay_s": 0.05}, stream=True)
            reader = asyncio.create_task(anext(stream))
            await reader
            reader = asyncio.create_task(anext(stream))
            await asyncio.sleep(0.01)
            cancelled_at = time.monotonic()
            reader.cancel()
            await asyncio.to_thread(upstream.disconnected.wait, 5)
            timings["cancel_disconnect_seen_s"] = time.monotonic() - cancelled_at
            assert reader.cancelled() and cloud.load().outstanding == 0

            # 3. Health probes: the server goes away, then comes back on the same port.
            assert cloud.healthy()
            stopping_at = time.monotonic()
            await asyncio.to_thread(upstream.stop)
            await wait_until(lambda: not cloud.healthy(), timeout_s=5)
            timings["down_detected_s"] = time.monotonic() - stopping_at  # includes uvicorn's own shutdown
            starting_at = time.monotonic()
            await asyncio.to_thread(upstream.start)
            await wait_until(cloud.healthy, timeout_s=5)
            timings["up_detected_s"] = time.monotonic() - starting_at
            stream = await cloud.chat_completions({"max_tokens": 2, "delay_s": 0}, stream=True)
            assert len([c async for c in stream]) == 2
        finally:
            await cloud.aclose()

    try:
        run(main(), timeout=60)
    finally:
        upstream.stop()
    print(f"live timings: {timings}")
    assert timings["disconnect_seen_s"] < 1.0 and timings["cancel_disconnect_seen_s"] < 1.0, timings
