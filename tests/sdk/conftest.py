"""Every SDK test runs once with ``Client`` and once with ``AsyncClient`` (the ``make_client`` fixture)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import httpx
import pytest

from gateway.sdk import AsyncClient, Client, _retry

Handler = Callable[[httpx.Request], httpx.Response]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(params=["sync", "async"])
def mode(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
async def make_client(mode: str, anyio_backend: str) -> AsyncIterator[Callable[..., Client | AsyncClient]]:
    """``make_client(handler, **client_kwargs)``: a client of ``mode`` whose requests go to ``handler``."""
    clients: list[Client | AsyncClient] = []

    def factory(handler: Handler, **kwargs: object) -> Client | AsyncClient:
        cls = Client if mode == "sync" else AsyncClient
        client = cls(transport=httpx.MockTransport(handler), **kwargs)  # type: ignore[arg-type]
        clients.append(client)
        return client

    yield factory
    for client in clients:
        if isinstance(client, AsyncClient):
            await client.aclose()
        else:
            client.close()


@pytest.fixture(autouse=True)
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Retry delays (seconds) the clients asked for; nothing really sleeps."""
    delays: list[float] = []

    async def record(seconds: float) -> None:
        delays.append(seconds)

    monkeypatch.setattr(_retry, "sleep", delays.append)
    monkeypatch.setattr(_retry, "async_sleep", record)
    return delays
