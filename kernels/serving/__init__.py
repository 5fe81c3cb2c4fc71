"""The OpenAI-compatible protocol both tiers speak: schemas, errors, and serving over an engine."""

from kernels.serving.errors import OpenAIError, error_body, install_error_handlers
from kernels.serving.openai_serving import (
    SSE_DONE,
    OpenAIServing,
    ResponseStream,
    sse_bytes,
    sse_event,
    unless_disconnected,
    usage_dict,
)
from kernels.serving.protocol import ChatCompletionRequest, ChatMessage, CompletionRequest, StreamOptions

__all__ = [
    "SSE_DONE",
    "ChatCompletionRequest",
    "ChatMessage",
    "CompletionRequest",
    "OpenAIError",
    "OpenAIServing",
    "ResponseStream",
    "StreamOptions",
    "error_body",
    "install_error_handlers",
    "sse_bytes",
    "sse_event",
    "unless_disconnected",
    "usage_dict",
]
