"""OpenAI-compatible request schemas, shared by the cloud server and the gateway.

Only what crosses the network is pydantic. Requests are validated here for *shape* (types, required
fields); value ranges (``max_tokens <= 0``, ``top_p`` out of range) are checked by
:class:`~kernels.sampling.SamplingParams`, whose :class:`~kernels.errors.InvalidRequestError` becomes
a 400 with the offending value in its message — the status OpenAI itself uses for those.
Unknown fields are kept (``extra="allow"``) so newer clients do not break.

Responses are plain dicts built in :mod:`kernels.serving.openai_serving`: they go straight to JSON,
and a response that came back from an upstream server over HTTP has the same type.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

Role = Literal["system", "developer", "user", "assistant", "tool"]


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="allow")


class TextPart(_Lenient):
    type: Literal["text"]
    text: str


class ChatMessage(_Lenient):
    role: Role
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class StreamOptions(_Lenient):
    include_usage: bool = False


class _SamplingFields(_Lenient):
    model: str = "auto"
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # extension (vLLM, llama.cpp)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logprobs: bool | int | None = None
    ignore_eos: bool = False  # extension (vLLM)
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _at_most_four_stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > 4:
            raise ValueError(f"at most 4 stop sequences are allowed, got {len(value)}")
        return value

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_SamplingFields):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None

    def plain_messages(self) -> list[dict[str, Any]]:
        """Messages as the chat template wants them: role + plain-text content."""
        return [{"role": m.role, "content": m.text()} for m in self.messages]

    def last_user_text(self) -> str:
        return next((m.text() for m in reversed(self.messages) if m.role == "user"), "")


class CompletionRequest(_SamplingFields):
    """``POST /v1/completions``: ``prompt`` is text, a list of token ids, or a one-element list of text."""

    prompt: str | list[int] | list[str]
    echo: bool = False
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[int] | list[str]) -> str | list[int] | list[str]:
        if isinstance(value, list) and value and isinstance(value[0], str) and len(value) != 1:
            raise ValueError("only one prompt per request is supported; send several requests instead")
        return value

    def prompt_text(self) -> str | None:
        if isinstance(self.prompt, str):
            return self.prompt
        if self.prompt and isinstance(self.prompt[0], str):
            return self.prompt[0]
        return None if self.prompt else ""
