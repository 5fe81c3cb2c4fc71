"""Typed responses of the gateway's API (OpenAI-compatible, plus routing).

Every model keeps fields it does not know (``extra="allow"``), so a newer server never breaks an
older SDK: ``completion.model_extra`` holds them.

Usage::

    completion = client.chat.completions.create(messages=[{"role": "user", "content": "hi"}])
    completion.choices[0].message.content   # "Hello!"
    completion.model                        # the real model id, e.g. "smollm2-135m-instruct"
    completion.route.tier                   # "edge" (from the x-hybrid-route header)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class _Model(BaseModel):
    model_config = ConfigDict(extra="allow")


class RouteInfo(_Model):
    """Where the gateway sent a completion, read from the response headers (``None`` fields when absent).

    Usage::

        completion.route   # RouteInfo(tier='cloud', score=0.71, reason='code', request_id='req-1')
    """

    tier: str | None = None  # x-hybrid-route: "edge" | "cloud"
    score: float | None = None  # x-hybrid-score: the router's win rate for the cloud tier
    reason: str | None = None  # x-hybrid-reason
    request_id: str | None = None  # x-request-id

    @classmethod
    def from_headers(cls, headers: Mapping[str, str]) -> RouteInfo | None:
        """The route of a response, or None when it carries none of the headers."""
        tier, score = headers.get("x-hybrid-route"), headers.get("x-hybrid-score")
        reason, request_id = headers.get("x-hybrid-reason"), headers.get("x-request-id")
        if tier is None and score is None and reason is None and request_id is None:
            return None
        try:
            score_value = None if score is None else float(score)
        except ValueError:
            score_value = None
        return cls(tier=tier, score=score_value, reason=reason, request_id=request_id)


class RouteDecision(_Model):
    """The answer of ``client.route(...)``: which tier a request would go to, and why.

    Usage::

        decision = client.route(prompt="Prove that sqrt(2) is irrational.")
        decision.tier, decision.score, decision.threshold   # ("cloud", 0.83, 0.5)
    """

    tier: str  # "edge" | "cloud"
    model: str
    score: float
    threshold: float
    reason: str = ""
    reasons: list[str] = Field(default_factory=list)


class Usage(_Model):
    """Token counts of a completion (in a stream: only on the last chunk, with ``include_usage``)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class ChatCompletionMessage(_Model):
    role: str = "assistant"
    content: str | None = None


class ChatCompletionChoice(_Model):
    index: int = 0
    message: ChatCompletionMessage
    finish_reason: str | None = None
    logprobs: Any = None


class ChatCompletion(_Model):
    """A whole chat reply (``POST /v1/chat/completions`` without ``stream``).

    Usage::

        completion = client.chat.completions.create(messages=[{"role": "user", "content": "hi"}])
        print(completion.choices[0].message.content, completion.usage.total_tokens, completion.route.tier)
    """

    id: str
    object: str = "chat.completion"
    created: int = 0
    model: str
    choices: list[ChatCompletionChoice] = Field(default_factory=list)
    usage: Usage | None = None
    system_fingerprint: str | None = None
    route: RouteInfo | None = Field(default=None, exclude=True)  # from headers, not the body


class ChoiceDelta(_Model):
    role: str | None = None
    content: str | None = None


class ChatCompletionChunkChoice(_Model):
    index: int = 0
    delta: ChoiceDelta = Field(default_factory=ChoiceDelta)
    finish_reason: str | None = None
    logprobs: Any = None


class ChatCompletionChunk(_Model):
    """One server-sent event of a streamed chat reply; the usage chunk has empty ``choices``.

    Usage::

        for chunk in client.chat.completions.create(messages=msgs, stream=True):
            if chunk.choices:
                print(chunk.choices[0].delta.content or "", end="")
    """

    id: str
    object: str = "chat.completion.chunk"
    created: int = 0
    model: str
    choices: list[ChatCompletionChunkChoice] = Field(default_factory=list)
    usage: Usage | None = None
    system_fingerprint: str | None = None


class CompletionChoice(_Model):
    index: int = 0
    text: str = ""
    finish_reason: str | None = None
    logprobs: Any = None


class Completion(_Model):
    """A whole text completion (``POST /v1/completions`` without ``stream``).

    Usage::

        completion = client.completions.create(prompt="Once upon a time", max_tokens=16)
        print(completion.choices[0].text)
    """

    id: str
    object: str = "text_completion"
    created: int = 0
    model: str
    choices: list[CompletionChoice] = Field(default_factory=list)
    usage: Usage | None = None
    system_fingerprint: str | None = None
    route: RouteInfo | None = Field(default=None, exclude=True)  # from headers, not the body


class CompletionChunk(_Model):
    """One server-sent event of a streamed text completion; the usage chunk has empty ``choices``."""

    id: str
    object: str = "text_completion"
    created: int = 0
    model: str
    choices: list[CompletionChoice] = Field(default_factory=list)
    usage: Usage | None = None
    system_fingerprint: str | None = None


class Model(_Model):
    """One entry of ``GET /v1/models``.

    Usage::

        for model in client.models.list().data:
            print(model.id, model.owned_by)
    """

    id: str
    object: str = "model"
    created: int | None = None
    owned_by: str | None = None


class ModelList(_Model):
    """The answer of ``client.models.list()``."""

    object: str = "list"
    data: list[Model] = Field(default_factory=list)
