"""An :class:`EngineCore` driven by a background thread, with asyncio streams per request.

The engine loop is CPU/GPU bound, so it runs on its own thread and never blocks the event loop;
each request gets an ``asyncio.Queue`` that the loop thread feeds with ``call_soon_threadsafe``.

The event loop never waits for a step. ``add_request`` validates at once (``check_request`` reads
only fixed configuration) and puts the request in an inbox; ``abort`` frees the request's blocks
on the spot when the engine is between steps, else puts the abort in the inbox. The loop thread
applies the inbox, under the engine lock, before every step (and ``stats()`` applies it before
counting), so an aborted request never computes another token. Leaving a stream early — the
client went away, the task was cancelled — aborts the request.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass

from kernels.engine import EngineCore, EngineStats, RequestOutput
from kernels.errors import EngineError, InvalidRequestError
from kernels.sampling import SamplingParams

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue


class AsyncEngine:
    """Thread-backed engine with async token streams.

    >>> engine = AsyncEngine(EngineCore(runner, tokenizer)).start()      # doctest: +SKIP
    >>> async for out in engine.generate(prompt_ids, SamplingParams()):  # doctest: +SKIP
    ...     print(out.text, end="")
    """

    def __init__(self, core: EngineCore, name: str = "engine") -> None:
        self.core = core
        self.name = name
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopped = threading.Event()
        self._streams: dict[str, _Stream] = {}
        # ("add", id, prompt_ids, params) | ("abort", id), applied by whoever holds the lock next
        self._inbox: deque[tuple] = deque()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._tokens_window: list[tuple[float, int]] = []

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> AsyncEngine:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"{self.name}-loop", daemon=True)
            self._thread.start()
        return self

    def shutdown(self, timeout: float = 5.0) -> None:
        self._stopped.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        with self._lock:
            self._inbox.clear()
            for rid in list(self._streams):
                self.core.abort(rid, emit_output=False)
                self._close(rid, EngineError("engine shut down"))

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ----------------------------------------------------------------- requests
    def add_request(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None) -> str:
        """Queue a request (validated at once: raises InvalidRequestError) and open its stream."""
        loop = asyncio.get_running_loop()
        rid = request_id or self.core.new_request_id()
        if rid in self._streams:
            raise InvalidRequestError(f"request id {rid!r} is already in use")
        self.core.check_request(prompt_ids, params)
        self._streams[rid] = _Stream(loop, asyncio.Queue())
        self._inbox.append(("add", rid, list(prompt_ids), params))
        self._wake.set()
        return rid

    def stream(self, request_id: str) -> AsyncIterator[RequestOutput]:
        """Outputs of one request until it finishes; leaving early aborts it.

        The request's queue is looked up now, not at the first ``anext``: a short request may finish
        (and leave ``_streams``) before its consumer starts reading, and its outputs must still arrive.
        """
        stream = self._streams.get(request_id)
        if stream is None:
            raise KeyError(f"no open stream for request {request_id!r}")
        return self._iterate(request_id, stream)

    async def _iterate(self, request_id: str, stream: _Stream) -> AsyncIterator[RequestOutput]:
        finished = False
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self.abort(request_id)

    async def generate(self, prompt_ids: list[int], params: SamplingParams,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        rid = self.add_request(prompt_ids, params, request_id)
        async for out in self.stream(rid):
            yield out

    def abort(self, request_id: str) -> bool:
        """Stop a request: it computes no further token, and its KV blocks are free now if the engine is
        between steps, else as soon as the current step ends. False if the request is unknown or done."""
        known = self._streams.pop(request_id, None) is not None
        if self._lock.acquire(blocking=False):
            try:
                self._apply_inbox()
                return self.core.abort(request_id, emit_output=False) or known
            finally:
                self._lock.release()
        self._inbox.append(("abort", request_id))
        self._wake.set()
        return known

    def stats(self) -> EngineStats:
        with self._lock:
            self._apply_inbox()
            return self.core.stats()

    def _apply_inbox(self) -> None:
        """Lock held: apply queued adds and aborts in the order they were made."""
        while self._inbox:
            op = self._inbox.popleft()
            if op[0] == "abort":
                self.core.abort(op[1], emit_output=False)
                continue
            _, rid, prompt_ids, params = op
            if rid not in self._streams:
                continue  # aborted (or shut down) before it reached the engine
            try:
                self.core.add_request(prompt_ids, params, rid)
            except EngineError as exc:
                self._close(rid, exc)

    def tokens_per_second(self, window: float = 10.0) -> float:
        """Generated tokens per second over the last ``window`` seconds."""
        now = time.monotonic()
        recent = [(t, n) for t, n in self._tokens_window if now - t <= window]
        return sum(n for _, n in recent) / window if recent else 0.0

    # -------------------------------------------------------------------- loop
    def _run(self) -> None:
        while not self._stopped.is_set():
            with self._lock:
                self._apply_inbox()
                busy = self.core.has_unfinished()
                if busy:
                    try:
                        outputs = self.core.step()
                    except Exception as exc:  # a bug in a step must not hang every client
                        log.exception("%s step failed; failing its in-flight requests", self.name)
                        self._fail_all(exc)
                        continue
                    for out in outputs:
                        self._deliver(out)
                    generated = sum(len(o.token_ids) for o in outputs)
                    if generated:
                        self._tokens_window.append((time.monotonic(), generated))
                        del self._tokens_window[:-4096]
            if not busy:
                self._wake.wait(0.05)
                self._wake.clear()

    def _deliver(self, out: RequestOutput) -> None:
        stream = self._streams.get(out.request_id)
        if stream is None:
            return
        if out.finished:
            self._streams.pop(out.request_id, None)
        stream.loop.call_soon_threadsafe(stream.queue.put_nowait, out)

    def _close(self, request_id: str, exc: BaseException) -> None:
        stream = self._streams.pop(request_id, None)
        if stream is not None and not stream.loop.is_closed():
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, exc)

    def _fail_all(self, exc: Exception) -> None:
        for rid in list(self._streams):
            self.core.abort(rid, emit_output=False)
            self._close(rid, EngineError(f"engine step failed: {exc}"))
