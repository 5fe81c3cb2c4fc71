"""``client.models``: ``GET /v1/models``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._base import TimeoutTypes
from ..types import ModelList

if TYPE_CHECKING:
    from ..client import AsyncClient, Client

PATH = "/v1/models"


class Models:
    """The models the gateway serves, OpenAI-style.

    Usage::

        for model in client.models.list().data:
            print(model.id)
    """

    def __init__(self, client: Client) -> None:
        self._client = client

    def list(self, *, timeout: TimeoutTypes = None) -> ModelList:
        return self._client._request("GET", PATH, ModelList, timeout=timeout)


class AsyncModels:
    """Async twin of :class:`Models`: ``(await client.models.list()).data``."""

    def __init__(self, client: AsyncClient) -> None:
        self._client = client

    async def list(self, *, timeout: TimeoutTypes = None) -> ModelList:
        return await self._client._request("GET", PATH, ModelList, timeout=timeout)
