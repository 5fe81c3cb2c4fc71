"""Error statuses map to one class each, carrying status_code, body, request_id and message."""

from __future__ import annotations

import httpx
import pytest

from gateway.sdk import (
    APIStatusError,
    AuthenticationError,
    BadRequestError,
    HybridGatewayError,
    InternalServerError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    RequestTooLargeError,
    ServiceUnavailableError,
    UnprocessableEntityError,
)
from gateway.sdk.errors import stream_error_status
from tests.sdk.fakes import MESSAGES, error_body, resolve

STATUS_ERRORS = [
    (400, BadRequestError),
    (401, AuthenticationError),
    (403, PermissionDeniedError),
    (404, NotFoundError),
    (409, APIStatusError),
    (413, RequestTooLargeError),
    (418, APIStatusError),
    (422, UnprocessableEntityError),
    (429, RateLimitError),
    (500, InternalServerError),
    (502, InternalServerError),
    (503, ServiceUnavailableError),
]


@pytest.mark.anyio
@pytest.mark.parametrize(("status", "error_cls"), STATUS_ERRORS)
async def test_status_maps_to_error_class(make_client, status: int, error_cls: type[APIStatusError]) -> None:
    body = error_body("prompt is empty", "invalid_request_error", code="empty_prompt", param="messages")
    client = make_client(
        lambda request: httpx.Response(status, json=body, headers={"x-request-id": "req-9"}), max_retries=0
    )
    with pytest.raises(APIStatusError) as info:
        await resolve(client.chat.completions.create(messages=MESSAGES))
    error = info.value
    assert type(error) is error_cls
    assert isinstance(error, HybridGatewayError)
    assert (error.status_code, error.body, error.request_id) == (status, body, "req-9")
    assert (error.message, error.type, error.param, error.code) == (
        "prompt is empty",
        "invalid_request_error",
        "messages",
        "empty_prompt",
    )
    assert str(error) == f"Error code {status}: prompt is empty (request_id=req-9)"
    assert error.response.status_code == status


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("content", "message"),
    [(b"upstream proxy failed", "upstream proxy failed"), (b"", "Bad Gateway"), (b'{"detail": "x"}', "Bad Gateway")],
)
async def test_error_without_openai_body(make_client, content: bytes, message: str) -> None:
    client = make_client(lambda request: httpx.Response(502, content=content), max_retries=0)
    with pytest.raises(InternalServerError) as info:
        await resolve(client.models.list())
    assert info.value.message == message
    assert info.value.request_id is None
    assert (info.value.type, info.value.code) == (None, None)


@pytest.mark.parametrize(
    ("error", "status"),
    [
        ({"type": "server_error", "code": 503}, 503),
        ({"type": "server_error", "code": "429"}, 429),
        ({"type": "invalid_request_error", "code": "context_length_exceeded"}, 400),
        ({"type": "rate_limit_error", "code": None}, 429),
        ({"type": "authentication_error"}, 401),
        ({"type": "service_unavailable_error", "code": "engine_unavailable"}, 503),
        ({"type": "something_new", "code": 99}, 500),
        ({}, 500),
    ],
)
def test_stream_error_status(error: dict, status: int) -> None:
    assert stream_error_status(error) == status


def test_timeout_error_is_a_connection_error() -> None:
    from gateway.sdk import APIConnectionError, APITimeoutError

    assert issubclass(APITimeoutError, APIConnectionError)
    assert issubclass(ServiceUnavailableError, InternalServerError)
    assert issubclass(InternalServerError, APIStatusError)
