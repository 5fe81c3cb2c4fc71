"""Chat templates: a checkpoint's jinja2 template, rendered the way Hugging Face transformers renders it.

A template is untrusted code that ships with a checkpoint, so it runs in jinja2's immutable sandbox
with only plain JSON data in reach. The environment mirrors transformers' `apply_chat_template`
(trim_blocks, lstrip_blocks, loop controls, a non-escaping `tojson`, `raise_exception`, `strftime_now`,
and a no-op `{% generation %}` block), so a template renders here exactly as it does there.

    template = ChatTemplate(source)
    prompt = template.render(normalize_messages(messages), special_tokens={"bos_token": "<s>"})
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from kernels.errors import TokenizerError

__all__ = ["CHATML_TEMPLATE", "ChatTemplate", "normalize_messages"]

# Used when a checkpoint ships no template. ChatML is what SmolLM2, Qwen and many others speak.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Text parts of one message are joined with a newline, as vLLM's OpenAI server does.
_TEXT_PART_SEPARATOR = "\n"


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; rendering ignores it."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body).set_lineno(lineno)


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # jinja2's own tojson HTML-escapes `<`, `>` and `&`; chat templates expect plain JSON.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols, _GenerationTag]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def _plain(value: Any, where: str) -> Any:
    """A deep copy made of JSON types only, so the sandboxed template never sees a live Python object."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, Mapping):
        return {_plain(key, where): _plain(item, where) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item, where) for item in value]
    raise TokenizerError(f"{where}: only JSON values can reach a chat template, got {type(value).__name__}")


def _content_text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, Sequence) or isinstance(content, (bytes, bytearray)):
        raise TokenizerError(
            f"{where}: 'content' must be a string or a list of text parts, got {type(content).__name__}"
        )
    texts = []
    for index, part in enumerate(content):
        if not isinstance(part, Mapping) or part.get("type") != "text":
            kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
            raise TokenizerError(f"{where}: content part {index} is {kind!r}; only 'text' parts are supported")
        if not isinstance(part.get("text"), str):
            raise TokenizerError(f"{where}: content part {index} has no string 'text'")
        texts.append(part["text"])
    return _TEXT_PART_SEPARATOR.join(texts)


def normalize_messages(messages: Any) -> list[dict[str, Any]]:
    """Check an OpenAI-style conversation and return plain dicts whose `content` is always a string.

    Each message needs a non-empty string `role` and a `content` that is a string or a list of
    `{"type": "text", "text": ...}` parts (joined with newlines). An assistant message that carries
    `tool_calls` may have `content=None`, which becomes "". Other keys (`name`, `tool_calls`, ...) pass
    through to the template unchanged.
    """
    if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes, bytearray)):
        raise TokenizerError(f"messages must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}")
    if not messages:
        raise TokenizerError("messages is empty; a conversation needs at least one message")
    normalized = []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, Mapping):
            raise TokenizerError(f"{where} must be a dict with 'role' and 'content', got {type(message).__name__}")
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise TokenizerError(f"{where} needs a non-empty string 'role', got {role!r}")
        if "content" not in message:
            raise TokenizerError(f"{where} ({role}) has no 'content'")
        content = message["content"]
        if content is None and message.get("tool_calls"):
            text = ""
        elif content is None:
            raise TokenizerError(f"{where} ({role}) has content None and no tool_calls")
        else:
            text = _content_text(content, f"{where} ({role})")
        plain = _plain(dict(message), where)
        plain["content"] = text
        normalized.append(plain)
    return normalized


class ChatTemplate:
    """One compiled chat template. `render` takes messages already checked by :func:`normalize_messages`."""

    def __init__(self, source: str) -> None:
        if not isinstance(source, str) or not source.strip():
            raise TokenizerError("chat template is empty")
        self.source = source
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateError as exc:
            raise TokenizerError(f"chat template does not compile: {exc}") from exc

    def render(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True,
               special_tokens: Mapping[str, str] | None = None, **extra: Any) -> str:
        # Caller's keywords win over the special-token strings, as in transformers.
        extra = _plain(extra, "chat template argument")
        variables = {"tools": None, "documents": None, **(special_tokens or {}), **extra}
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt, **variables)
        except jinja2.TemplateError as exc:
            raise TokenizerError(f"chat template refused the conversation: {exc}") from exc
        except (TypeError, ValueError, LookupError, AttributeError) as exc:
            raise TokenizerError(f"chat template failed on this conversation: {exc!r}") from exc
