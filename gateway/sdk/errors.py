"""Errors raised by the SDK.

    HybridGatewayError
     ├── APIConnectionError            the request never got an HTTP response (DNS, refused, reset)
     │    └── APITimeoutError          ...because a connect, read, write or pool timeout expired
     ├── APIResponseValidationError    a 2xx response whose body is not the JSON the SDK expects
     └── APIStatusError                the server answered with an error (status_code, body, request_id)
          ├── BadRequestError              400
          ├── AuthenticationError          401
          ├── PermissionDeniedError        403
          ├── NotFoundError                404
          ├── RequestTooLargeError         413
          ├── UnprocessableEntityError     422
          ├── RateLimitError               429
          └── InternalServerError          >= 500
               └── ServiceUnavailableError 503

An error event inside a stream (``data: {"error": {...}}``) raises the same ``APIStatusError`` family:
its status comes from the error's ``code`` when that is an HTTP status, else from its ``type``.

Usage::

    try:
        client.chat.completions.create(messages=[{"role": "user", "content": "hi"}])
    except RateLimitError as exc:
        print("retry later:", exc.status_code, exc.request_id, exc.response.headers.get("retry-after"))
    except APIStatusError as exc:
        print(exc.status_code, exc.message, exc.body)
    except APIConnectionError:
        print("gateway unreachable")
"""

from __future__ import annotations

from typing import Any

import httpx

# Status for an in-stream error whose ``code`` is not an HTTP status (OpenAI error ``type`` names).
_STATUS_FOR_TYPE = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "permission_error": 403,
    "not_found_error": 404,
    "conflict_error": 409,
    "rate_limit_error": 429,
    "internal_server_error": 500,
    "server_error": 500,
    "bad_gateway_error": 502,
    "service_unavailable_error": 503,
    "timeout_error": 504,
}


class HybridGatewayError(Exception):
    """Base of every error the SDK raises on purpose.

    Usage::

        try:
            client.health()
        except HybridGatewayError as exc:
            print("gateway call failed:", exc.message)
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class APIConnectionError(HybridGatewayError):
    """No HTTP response arrived; retried like a 5xx before it is raised.

    Usage::

        try:
            Client("http://127.0.0.1:9").health()
        except APIConnectionError as exc:
            print(exc.request.url)
    """

    def __init__(self, request: httpx.Request, message: str = "Connection error.") -> None:
        super().__init__(message)
        self.request = request


class APITimeoutError(APIConnectionError):
    """A timeout expired before the response (or its headers, for a stream) arrived."""

    def __init__(self, request: httpx.Request) -> None:
        super().__init__(request, "Request timed out.")


class APIResponseValidationError(HybridGatewayError):
    """A successful response whose body is not valid JSON of the expected shape."""

    def __init__(self, response: httpx.Response, message: str) -> None:
        super().__init__(message)
        self.response = response
        self.request_id = response.headers.get("x-request-id")


class APIStatusError(HybridGatewayError):
    """The gateway answered with an error status (or sent an error event inside a stream).

    ``body`` is the decoded JSON body (or the raw text when it is not JSON); ``type``, ``param`` and
    ``code`` come from its OpenAI-shaped ``{"error": {...}}`` object when present.

    Usage::

        try:
            client.models.list()
        except APIStatusError as exc:
            log.warning("status=%d request_id=%s %s", exc.status_code, exc.request_id, exc.message)
    """

    def __init__(self, message: str, *, response: httpx.Response, body: Any, status_code: int | None = None) -> None:
        self.status_code = response.status_code if status_code is None else status_code
        self.response = response
        self.body = body
        self.request_id: str | None = response.headers.get("x-request-id")
        error = _error_object(body)
        self.type: str | None = error.get("type")
        self.param: str | None = error.get("param")
        self.code: Any = error.get("code")
        super().__init__(message)

    def __str__(self) -> str:
        suffix = f" (request_id={self.request_id})" if self.request_id else ""
        return f"Error code {self.status_code}: {self.message}{suffix}"


class BadRequestError(APIStatusError):
    """400: the request is malformed or names an unknown tier."""


class AuthenticationError(APIStatusError):
    """401: the API key is missing or wrong."""


class PermissionDeniedError(APIStatusError):
    """403: the API key may not do this."""


class NotFoundError(APIStatusError):
    """404: unknown path or model."""


class RequestTooLargeError(APIStatusError):
    """413: the prompt or body exceeds the gateway's limits."""


class UnprocessableEntityError(APIStatusError):
    """422: the body is JSON but fails validation."""


class RateLimitError(APIStatusError):
    """429: too many requests; ``response.headers["retry-after"]`` says when to come back."""


class InternalServerError(APIStatusError):
    """5xx: the gateway or a backend failed."""


class ServiceUnavailableError(InternalServerError):
    """503: no tier can take the request right now (overloaded or not ready)."""


_ERROR_FOR_STATUS: dict[int, type[APIStatusError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    413: RequestTooLargeError,
    422: UnprocessableEntityError,
    429: RateLimitError,
    503: ServiceUnavailableError,
}


def _error_object(body: Any) -> dict[str, Any]:
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return body["error"]
    return {}


def make_status_error(response: httpx.Response, body: Any = None, *, status_code: int | None = None) -> APIStatusError:
    """Build the ``APIStatusError`` subclass for ``status_code`` (default: the response's status).

    ``body`` defaults to the response's JSON (or text); the response must have been read.
    """
    if body is None:
        try:
            body = response.json()
        except ValueError:
            body = response.text or None
    status = response.status_code if status_code is None else status_code
    message = _error_object(body).get("message")
    if not message:
        message = body if isinstance(body, str) and body else httpx.codes.get_reason_phrase(status) or "Error"
    cls = _ERROR_FOR_STATUS.get(status) or (InternalServerError if status >= 500 else APIStatusError)
    return cls(str(message), response=response, body=body, status_code=status)


def stream_error_status(error: dict[str, Any]) -> int:
    """HTTP status for an error event inside a stream, from its ``code`` or else its ``type``."""
    code = error.get("code")
    if isinstance(code, str) and code.isdigit():
        code = int(code)
    if isinstance(code, int) and 400 <= code <= 599:
        return code
    return _STATUS_FOR_TYPE.get(str(error.get("type")), 500)
