"""What ``Client`` and ``AsyncClient`` share: settings, request building and response parsing.

Only the sending (the retry loop) and closing differ between the two, and live in ``client.py``.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterable, Mapping
from typing import Any, Self, TypeVar

import httpx
from pydantic import BaseModel, ValidationError

from .errors import APIResponseValidationError
from .types import ChatCompletion, Completion, RouteInfo

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
DEFAULT_TIMEOUT = 600.0  # seconds; long generations on a busy edge device are slow
DEFAULT_MAX_RETRIES = 2
API_KEY_ENV = "HYBRID_GATEWAY_API_KEY"
USER_AGENT = "hybrid-gateway-sdk/0.1.0"

Messages = Iterable[Mapping[str, Any]]
Stop = str | list[str] | None
TimeoutTypes = float | httpx.Timeout | None  # None: the client's timeout
ModelT = TypeVar("ModelT", bound=BaseModel)


class BaseClient:
    """Settings and helpers of both clients; see :class:`gateway.sdk.Client` for the arguments."""

    _http: httpx.Client | httpx.AsyncClient
    _owns_http: bool

    def __init__(
        self,
        *,
        base_url: str | httpx.URL,
        api_key: str | None,
        timeout: float | httpx.Timeout,
        max_retries: int,
        default_headers: Mapping[str, str] | None,
    ) -> None:
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        self.base_url = httpx.URL(str(base_url).rstrip("/") + "/")
        self.api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
        self.timeout = httpx.Timeout(timeout)
        self.max_retries = max_retries
        self.default_headers = dict(default_headers or {})

    def with_options(self, *, max_retries: int | None = None, timeout: float | httpx.Timeout | None = None) -> Self:
        """A copy of this client with other retry or timeout settings, sharing its connection pool.

        Usage::

            client.with_options(max_retries=0, timeout=5).health()
        """
        if max_retries is not None and max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        clone = copy.copy(self)
        clone._owns_http = False  # closing the original closes the shared pool
        if max_retries is not None:
            clone.max_retries = max_retries
        if timeout is not None:
            clone.timeout = httpx.Timeout(timeout)
        clone._bind_resources()
        return clone

    def _bind_resources(self) -> None:
        raise NotImplementedError

    def _build_request(
        self, method: str, path: str, *, body: Mapping[str, Any] | None, timeout: TimeoutTypes, stream: bool = False
    ) -> httpx.Request:
        headers = {
            "Accept": "text/event-stream" if stream else "application/json",
            "User-Agent": USER_AGENT,
        }
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        headers.update(self.default_headers)
        return self._http.build_request(
            method,
            self.base_url.join(path.lstrip("/")),
            json=body,
            headers=headers,
            timeout=self.timeout if timeout is None else httpx.Timeout(timeout),
        )


def parse_json(response: httpx.Response) -> Any:
    """The response's JSON body; a body that is not JSON is the server's fault, not the caller's."""
    try:
        return response.json()
    except ValueError as exc:
        raise APIResponseValidationError(response, f"response is not JSON: {response.text[:200]!r}") from exc


def parse_response(response: httpx.Response, cast_to: type[ModelT]) -> ModelT:
    """The response body as ``cast_to``, with ``route`` filled from the x-hybrid headers when it has one."""
    try:
        result = cast_to.model_validate(parse_json(response))
    except ValidationError as exc:
        raise APIResponseValidationError(response, f"unexpected {cast_to.__name__} body: {exc}") from exc
    if isinstance(result, ChatCompletion | Completion):
        result.route = RouteInfo.from_headers(response.headers)
    return result


def build_body(params: Mapping[str, Any], extra_body: Mapping[str, Any] | None) -> dict[str, Any]:
    """The JSON body of a request: ``params`` without the ones left as None, then ``extra_body`` on top."""
    body = {key: value for key, value in params.items() if value is not None}
    body.update(extra_body or {})
    return body


def route_body(messages: Messages | None, prompt: str | None, model: str) -> dict[str, Any]:
    """The body of ``POST /v1/route``: exactly one of ``messages`` and ``prompt``."""
    if (messages is None) == (prompt is None):
        raise ValueError("route() takes exactly one of messages= or prompt=")
    if messages is not None:
        return {"messages": [dict(message) for message in messages], "model": model}
    return {"prompt": prompt, "model": model}
