"""The in-process backend: an engine in this process (the edge tier) behind the :class:`Backend` contract.

Requests go straight to :class:`~kernels.serving.OpenAIServing` — no HTTP, no JSON round trip; a
request the gateway already validated is passed as its pydantic object. The engine's own refusals
(``InvalidRequestError``: prompt too long, ``max_tokens <= 0``) and ``OpenAIError`` pass through
unchanged and become 4xx; an engine that died raises :class:`BackendUnavailable` so the policy can
fall back to the cloud.

The TTFT estimate the policy compares with its target: one engine step takes ``step_s`` (mean of
the last steps); a new request waits for the prefill of everything queued before it, at most
``max_num_batched_tokens`` prompt tokens per step, then its own::

    est_ttft_s = step_s * (1 + ceil((queued prompt tokens + its own) / max_num_batched_tokens))
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

from gateway.backends.base import BackendLoad, BackendResult, BackendUnavailable
from kernels.async_engine import AsyncEngine
from kernels.errors import EngineError, InvalidRequestError
from kernels.serving import OpenAIServing

# A fresh engine has no step times yet: assume this per step (the edge decodes a step in ~20 ms on 2 cores).
DEFAULT_STEP_S = 0.02


class InProcessBackend:
    """An :class:`~kernels.async_engine.AsyncEngine` with ``tokenizer`` (and ``model_id``) as a gateway backend.

    >>> edge = InProcessBackend(EdgeEngine.from_model().start(), name="edge")      # doctest: +SKIP
    >>> await edge.chat_completions({"messages": [{"role": "user", "content": "Hi"}]}, stream=False)  # doctest: +SKIP
    """

    def __init__(self, engine: AsyncEngine, *, name: str = "edge", model_id: str | None = None) -> None:
        self.name = name
        self.engine = engine
        self.serving = OpenAIServing(engine, engine.tokenizer, model_id or getattr(engine, "model_id", name))
        self._outstanding = 0

    @property
    def model_id(self) -> str:
        return self.serving.model_id

    def healthy(self) -> bool:
        return self.engine.is_running and not getattr(self.engine, "failure", None)

    def load(self, prompt_tokens: int = 0) -> BackendLoad:
        core = self.engine.core
        waiting = list(core.scheduler.waiting)  # a snapshot; the engine thread may change it meanwhile
        queued = sum(max(s.num_prompt - s.num_computed, 0) for s in waiting) + max(prompt_tokens, 1)
        times = core._counters.step_times[-32:]
        step_s = sum(times) / len(times) if times else DEFAULT_STEP_S
        est = step_s * (1 + math.ceil(queued / core.config.max_num_batched_tokens))
        return BackendLoad(self._outstanding, len(waiting), len(core.scheduler.running), est)

    async def chat_completions(self, body: Any, *, stream: bool) -> BackendResult:
        return await self._call(self.serving.chat_completions, body, stream)

    async def completions(self, body: Any, *, stream: bool) -> BackendResult:
        return await self._call(self.serving.completions, body, stream)

    async def _call(self, method, body: Any, stream: bool) -> BackendResult:
        if not self.healthy():
            raise BackendUnavailable(f"the {self.name} engine is not running")
        self._outstanding += 1
        try:
            result = await method(body, stream=stream)
        except InvalidRequestError:
            self._outstanding -= 1
            raise
        except EngineError as exc:
            self._outstanding -= 1
            raise BackendUnavailable(f"{self.name} engine: {exc}") from exc
        except BaseException:
            self._outstanding -= 1
            raise
        if not stream:
            self._outstanding -= 1
            return result
        return self._counted(result)

    def _counted(self, chunks: Any) -> _CountedStream:
        return _CountedStream(self, chunks)

    async def start(self) -> None:
        self.engine.start()

    async def aclose(self) -> None:
        await asyncio.to_thread(self.engine.shutdown)


class _CountedStream:
    """A stream that counts as outstanding until it ends or is closed (even if never iterated)."""

    def __init__(self, backend: InProcessBackend, chunks: Any) -> None:
        self._backend = backend
        self._chunks = chunks
        self._open = True

    def __aiter__(self) -> _CountedStream:
        return self

    async def __anext__(self) -> dict[str, Any]:
        try:
            return await self._chunks.__anext__()
        except StopAsyncIteration:
            await self.aclose()
            raise
        except EngineError as exc:
            await self.aclose()
            raise BackendUnavailable(f"{self._backend.name} engine failed mid-stream: {exc}") from exc
        except BaseException:
            await self.aclose()
            raise

    async def aclose(self) -> None:
        if self._open:
            self._open = False
            self._backend._outstanding -= 1
            await self._chunks.aclose()  # aborts the request in the engine
