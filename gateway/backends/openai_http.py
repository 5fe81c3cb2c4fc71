"""A backend that forwards to any OpenAI-compatible HTTP server: our cloud server, vLLM, TGI, a hosted API.

One pooled ``httpx.AsyncClient`` serves every replica. Each request goes to the available replica with the fewest
requests in flight (ties go round-robin); each replica has a :class:`CircuitBreaker`. An attempt that fails before
anything reached the caller (connect error, timeout, 5xx, a 200 whose body cannot be read) is retried on another
replica, or on the same one after a backoff; a 4xx is the request's fault and is raised as :class:`UpstreamError`
at once. A background task probes ``/health`` (``/v1/models`` where there is none) so that a replica going away,
or coming back, is noticed without user traffic.

    request ─► pick replica ─► breaker.allow() ─► POST ─┬─ 2xx ──────────► dict, or ChunkStream (streams)
                    ▲                                   ├─ 4xx ──────────► UpstreamError
                    └──── retry (≤ max_retries) ◄───────┴─ 5xx / error ──► BackendUnavailable when exhausted
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import random
from dataclasses import dataclass
from typing import Any

import httpx

from .base import BackendLoad, BackendResult, BackendUnavailable, UpstreamError, error_body
from .breaker import CircuitBreaker
from .sse import ChunkStream

__all__ = ["OpenAIHTTPBackend"]

log = logging.getLogger(__name__)

# Upstream response headers an UpstreamError carries on to the client.
_PASSED_HEADERS = ("retry-after", "retry-after-ms", "x-request-id")
_MAX_BACKOFF_S = 2.0


@dataclass(slots=True, eq=False)
class _Replica:
    index: int
    url: str  # base URL, without the /v1 suffix
    breaker: CircuitBreaker
    outstanding: int = 0
    health_path: str = "/health"  # becomes /v1/models once /health answers 404
    stats_path: str | None = "/stats"  # our cloud server's scheduler stats; None once it answers 404
    stats: dict[str, Any] | None = None  # the last /stats body


class _AttemptFailed(Exception):
    """One attempt on one replica failed in a way worth retrying elsewhere."""


def _base_url(url: str) -> str:
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"backend URL must start with http:// or https://, got {url!r}")
    url = url.rstrip("/")
    return url.removesuffix("/v1")


def _upstream_error(response: httpx.Response) -> UpstreamError:
    """The 4xx as an UpstreamError whose body is OpenAI-shaped whatever the upstream sent."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if not (isinstance(body, dict) and isinstance(body.get("error"), dict)):
        # FastAPI sends {"detail": ...}, TGI {"error": "..."}, older vLLM {"message": ...}; anything else as text.
        fields = body if isinstance(body, dict) else {}
        message = fields.get("error") or fields.get("message") or fields.get("detail") or response.text[:1000]
        body = error_body(str(message) or f"upstream returned {response.status_code}", response.status_code)
    headers = {k: v for k, v in response.headers.items() if k in _PASSED_HEADERS or k.startswith("x-ratelimit-")}
    return UpstreamError(response.status_code, body, headers)


class OpenAIHTTPBackend:
    """Serve requests from one or more replicas of an OpenAI-compatible server.

    Usage::

        cloud = OpenAIHTTPBackend(["http://10.0.0.5:8001", "http://10.0.0.6:8001/v1"], api_key="sk-...")
        await cloud.start()                       # discovers the model id, starts health probes
        out = await cloud.chat_completions({"messages": [{"role": "user", "content": "Hi"}]}, stream=False)
        stream = await cloud.chat_completions({"messages": [...]}, stream=True)
        async for chunk in stream:                # stream.aclose() aborts generation upstream
            ...
        await cloud.aclose()
    """

    def __init__(self, urls: list[str], *, name: str = "cloud", api_key: str | None = None,
                 model_id: str | None = None, timeout_s: float = 600, connect_timeout_s: float = 5,
                 max_retries: int = 2, breaker_failures: int = 3, breaker_cooldown_s: float = 10,
                 health_interval_s: float = 5, transport: httpx.AsyncBaseTransport | None = None) -> None:
        if not urls:
            raise ValueError("urls must name at least one replica")
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        for field, value in (("timeout_s", timeout_s), ("connect_timeout_s", connect_timeout_s)):
            if value <= 0:
                raise ValueError(f"{field} must be > 0, got {value}")
        self.name = name
        self.max_retries = max_retries
        self.health_interval_s = health_interval_s  # <= 0 disables probing
        self._replicas = [_Replica(i, _base_url(url), CircuitBreaker(breaker_failures, breaker_cooldown_s))
                          for i, url in enumerate(urls)]
        self._model_id = model_id
        self._model_lock = asyncio.Lock()
        self._next_discovery_at = 0.0  # event-loop time
        self._round_robin = itertools.count()
        self._health_task: asyncio.Task[None] | None = None
        self._probe_timeout = httpx.Timeout(connect_timeout_s)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
        # Every open stream holds a connection; waiting for a free one longer than a connect would is an outage.
        self._client = httpx.AsyncClient(
            transport=transport, headers=headers,
            timeout=httpx.Timeout(connect=connect_timeout_s, read=timeout_s, write=timeout_s, pool=connect_timeout_s),
            limits=httpx.Limits(max_connections=1024, max_keepalive_connections=128, keepalive_expiry=30))

    # ------------------------------------------------------------------ state
    @property
    def model_id(self) -> str | None:
        return self._model_id

    def healthy(self) -> bool:
        return any(r.breaker.state != "open" for r in self._replicas)

    def load(self) -> BackendLoad:
        stats = [r.stats for r in self._replicas if r.stats]
        return BackendLoad(outstanding=sum(r.outstanding for r in self._replicas),
                           waiting=sum(int(s.get("num_waiting", 0)) for s in stats),
                           running=sum(int(s.get("num_running", 0)) for s in stats))

    def engine_stats(self) -> dict[str, int] | None:
        """KV blocks and queue of the replicas that expose ``/stats`` (our cloud server), summed; None if none do."""
        stats = [r.stats for r in self._replicas if r.stats]
        if not stats:
            return None
        keys = ("num_running", "num_waiting", "num_blocks_used", "num_blocks_free")
        return {k: sum(int(s.get(k, 0)) for s in stats) for k in keys}

    async def _fetch_stats(self, replica: _Replica) -> None:
        if replica.stats_path is None:
            return
        try:
            response = await self._client.get(replica.url + replica.stats_path, timeout=self._probe_timeout)
            if response.status_code == 404:
                replica.stats_path = None  # not our server (vLLM, a hosted API): stop asking
            replica.stats = response.json() if response.status_code == 200 else None
        except (httpx.TransportError, ValueError):
            replica.stats = None

    def replica_states(self) -> list[dict[str, Any]]:
        """One dict per replica for ``/ready`` and metrics."""
        return [{"url": r.url, "healthy": r.breaker.state != "open", "state": r.breaker.state,
                 "outstanding": r.outstanding, "consecutive_failures": r.breaker.consecutive_failures}
                for r in self._replicas]

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Discover the model id (bounded by the connect timeout; retried on first use) and start probing."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._resolve_model(), timeout=self._probe_timeout.connect)
        if self._health_task is None and self.health_interval_s > 0:
            self._health_task = asyncio.create_task(self._health_loop(), name=f"{self.name}-health")

    async def aclose(self) -> None:
        if self._health_task is not None:
            self._health_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._health_task
            self._health_task = None
        await self._client.aclose()

    # ------------------------------------------------------------------ requests
    async def chat_completions(self, body: dict[str, Any], *, stream: bool) -> BackendResult:
        return await self._post("/v1/chat/completions", body, stream)

    async def completions(self, body: dict[str, Any], *, stream: bool) -> BackendResult:
        return await self._post("/v1/completions", body, stream)

    async def _post(self, path: str, body: dict[str, Any], stream: bool) -> BackendResult:
        payload = dict(body, stream=stream)
        model = await self._resolve_model()
        if model is not None:
            payload["model"] = model
        tried: set[_Replica] = set()
        reason = ""
        for attempt in range(self.max_retries + 1):
            replica = self._pick(tried)
            if replica is None:
                if attempt == 0:
                    raise BackendUnavailable(f"{self.name}: no replica accepts requests (circuits open)")
                break
            if replica in tried:  # nowhere new to go: give the same replica a moment (0.1 s, 0.2 s, ... with jitter)
                repeat = attempt - len(tried)
                await asyncio.sleep(min(0.1 * 2 ** repeat, _MAX_BACKOFF_S) * random.uniform(0.5, 1.0))
            tried.add(replica)
            try:
                return await self._attempt(replica, path, payload, stream)
            except _AttemptFailed as exc:
                reason = f"{replica.url}: {exc}"
                log.warning("%s attempt %d/%d failed: %s", self.name, attempt + 1, self.max_retries + 1, reason)
        raise BackendUnavailable(f"{self.name}: {path} failed after {attempt + 1} attempt(s); last: {reason}")

    def _pick(self, tried: set[_Replica]) -> _Replica | None:
        """The available replica with the fewest requests in flight, preferring ones this request has not tried."""
        available = [r for r in self._replicas if r.breaker.available]
        candidates = [r for r in available if r not in tried] or available
        if not candidates:
            return None
        start, n = next(self._round_robin), len(self._replicas)
        return min(candidates, key=lambda r: (r.outstanding, (r.index - start) % n))

    async def _attempt(self, replica: _Replica, path: str, payload: dict[str, Any], stream: bool) -> BackendResult:
        breaker = replica.breaker
        is_trial = breaker.state == "half_open"
        if not breaker.allow():
            raise _AttemptFailed("circuit open")
        replica.outstanding += 1
        verdict, handed_off = False, False

        def failed(reason: str) -> _AttemptFailed:
            nonlocal verdict
            breaker.record_failure()
            verdict = True
            return _AttemptFailed(reason)

        try:
            request = self._client.build_request("POST", replica.url + path, json=payload)
            try:
                response = await self._client.send(request, stream=True)
            except httpx.TransportError as exc:
                raise failed(f"{type(exc).__name__}: {exc}") from exc
            try:
                status = response.status_code
                if 400 <= status < 500:
                    if not await self._read(response):
                        raise failed(f"HTTP {status} with an unreadable body")
                    breaker.record_success()  # the replica is fine; the request is not
                    verdict = True
                    raise _upstream_error(response)
                if status != 200 and (stream or not 200 <= status < 300):
                    text = response.text if await self._read(response) else ""
                    raise failed(f"HTTP {status}: {text[:200]}")
                if stream:
                    breaker.record_success()
                    verdict, handed_off = True, True
                    return ChunkStream(response, on_close=functools.partial(self._stream_closed, replica))
                try:
                    await response.aread()
                    data = response.json()
                except httpx.TransportError as exc:
                    raise failed(f"reading the response: {type(exc).__name__}: {exc}") from exc
                except ValueError as exc:
                    raise failed(f"response is not JSON: {response.text[:200]!r}") from exc
                if not isinstance(data, dict):
                    raise failed(f"response is not a JSON object: {response.text[:200]!r}")
                breaker.record_success()
                verdict = True
                return data
            finally:
                if not handed_off:
                    await response.aclose()
        finally:
            if is_trial and not verdict:
                breaker.release()  # cancelled before a verdict: let the next request be the trial
            if not handed_off:
                replica.outstanding -= 1

    def _stream_closed(self, replica: _Replica, ok: bool | None) -> None:
        replica.outstanding -= 1
        if ok is False:  # broke mid-way or sent an error event; None is the caller leaving early
            replica.breaker.record_failure()

    @staticmethod
    async def _read(response: httpx.Response) -> bool:
        """Read the whole body; False when the connection broke first."""
        try:
            await response.aread()
        except httpx.TransportError:
            return False
        return True

    # ------------------------------------------------------------------ model discovery and health
    async def _resolve_model(self) -> str | None:
        """The configured model id, else the first id of the first replica's ``GET /v1/models`` that answers."""
        if self._model_id is None:
            async with self._model_lock:
                # Concurrent requests wait for one discovery; after a failure, try again at most once a second.
                if self._model_id is None and asyncio.get_running_loop().time() >= self._next_discovery_at:
                    self._model_id = await self._discover_model()
                    self._next_discovery_at = asyncio.get_running_loop().time() + 1.0
        return self._model_id

    async def _discover_model(self) -> str | None:
        for replica in self._replicas:
            if not replica.breaker.available:
                continue
            try:
                response = await self._client.get(replica.url + "/v1/models", timeout=self._probe_timeout)
                response.raise_for_status()
                model = str(response.json()["data"][0]["id"])
            except (httpx.HTTPError, ValueError, LookupError, TypeError) as exc:
                log.warning("%s: model discovery on %s failed: %s", self.name, replica.url, exc)
                continue
            log.info("%s: serving model %r (from %s)", self.name, model, replica.url)
            return model
        return None

    async def _health_loop(self) -> None:
        while True:
            results = await asyncio.gather(*(self._probe(r) for r in self._replicas), return_exceptions=True)
            for replica, result in zip(self._replicas, results):
                if isinstance(result, Exception):  # a bug in a probe must not end probing for good
                    log.error("%s: probing %s failed unexpectedly: %r", self.name, replica.url, result)
            if self._model_id is None and self.healthy():
                await self._resolve_model()
            await asyncio.sleep(self.health_interval_s)

    async def _probe(self, replica: _Replica) -> None:
        was = replica.breaker.state
        try:
            response = await self._client.get(replica.url + replica.health_path, timeout=self._probe_timeout)
            if response.status_code == 404 and replica.health_path == "/health":
                replica.health_path = "/v1/models"
                response = await self._client.get(replica.url + replica.health_path, timeout=self._probe_timeout)
            alive, detail = response.status_code < 500, f"HTTP {response.status_code}"
        except httpx.TransportError as exc:
            alive, detail = False, f"{type(exc).__name__}: {exc}"
        if alive:
            replica.breaker.record_success()
            await self._fetch_stats(replica)
        else:
            replica.stats = None
            replica.breaker.record_failure()
        now = replica.breaker.state
        if now != was:
            log.warning("%s replica %s: %s -> %s (probe: %s)", self.name, replica.url, was, now, detail)
