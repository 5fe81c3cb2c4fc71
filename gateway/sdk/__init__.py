"""Python SDK of the hybrid gateway: OpenAI-style calls, plus which tier served them and why.

Usage::

    from gateway.sdk import Client

    client = Client("http://127.0.0.1:8000", api_key="sk-local")   # or $HYBRID_GATEWAY_API_KEY
    completion = client.chat.completions.create(messages=[{"role": "user", "content": "hi"}])
    print(completion.choices[0].message.content)
    print(completion.route.tier, completion.route.score, completion.route.reason)

``AsyncClient`` is the same API with ``await``; errors are in :mod:`gateway.sdk.errors`.
"""

from .client import AsyncClient, Client
from .errors import (
    APIConnectionError,
    APIResponseValidationError,
    APIStatusError,
    APITimeoutError,
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
from .streaming import AsyncStream, Stream
from .types import (
    ChatCompletion,
    ChatCompletionChunk,
    Completion,
    CompletionChunk,
    Model,
    ModelList,
    RouteDecision,
    RouteInfo,
    Usage,
)

__all__ = [
    "APIConnectionError",
    "APIResponseValidationError",
    "APIStatusError",
    "APITimeoutError",
    "AsyncClient",
    "AsyncStream",
    "AuthenticationError",
    "BadRequestError",
    "ChatCompletion",
    "ChatCompletionChunk",
    "Client",
    "Completion",
    "CompletionChunk",
    "HybridGatewayError",
    "InternalServerError",
    "Model",
    "ModelList",
    "NotFoundError",
    "PermissionDeniedError",
    "RateLimitError",
    "RequestTooLargeError",
    "RouteDecision",
    "RouteInfo",
    "ServiceUnavailableError",
    "Stream",
    "UnprocessableEntityError",
    "Usage",
]
