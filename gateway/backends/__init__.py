"""Backends the gateway routes to: the contract (:class:`Backend`) and the OpenAI-compatible HTTP client tier.

See :mod:`gateway.backends.base` for the error tree.
"""

from .base import Backend, BackendError, BackendLoad, BackendResult, BackendUnavailable, UpstreamError, error_body
from .breaker import BreakerState, CircuitBreaker
from .openai_http import OpenAIHTTPBackend
from .sse import ChunkStream, ServerSentEvent, SSEDecoder

__all__ = [
    "Backend",
    "BackendError",
    "BackendLoad",
    "BackendResult",
    "BackendUnavailable",
    "BreakerState",
    "ChunkStream",
    "CircuitBreaker",
    "OpenAIHTTPBackend",
    "SSEDecoder",
    "ServerSentEvent",
    "UpstreamError",
    "error_body",
]
