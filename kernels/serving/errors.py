"""OpenAI-style HTTP errors, shared by the cloud server and the gateway.

    OpenAIError                 an error a server sends as ``{"error": {message, type, param, code}}``
     └── (raised with the status it means: 400, 401, 404, 413, 422, 429, 503 …)

Engine errors map too: ``InvalidRequestError`` (a prompt too long, ``max_tokens <= 0``) is 400, any
other ``EngineError`` (the engine died or shut down) is 503.

Route functions raise :class:`OpenAIError` (or let an engine's ``InvalidRequestError`` escape);
:func:`install_error_handlers` turns every error into the JSON body the ``openai`` client parses,
with the right status code. Request-validation failures are 422 (FastAPI's convention, which the
``openai`` client maps to ``UnprocessableEntityError``); a body that is not JSON at all is 400;
anything unexpected is a 500 that carries a request id and never the traceback.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from kernels.errors import EngineError, InvalidRequestError

log = logging.getLogger(__name__)

# OpenAI's error "type" for each status it uses.
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout_error",
    409: "conflict_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "internal_server_error",
    502: "bad_gateway_error",
    503: "service_unavailable_error",
    504: "timeout_error",
}


class OpenAIError(Exception):
    """An error with an HTTP status and an OpenAI-shaped body.

    >>> err = OpenAIError(404, "The model 'gpt-9' does not exist", param="model", code="model_not_found")
    >>> err.body()["error"]["type"]
    'not_found_error'
    """

    def __init__(self, status_code: int, message: str, *, type: str | None = None, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.type = type or ERROR_TYPES.get(status_code, "api_error")
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status_code, headers=self.headers)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    parts, param = [], None
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        where = ".".join(loc)
        param = param or (where or None)
        parts.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
    return "; ".join(parts) or "invalid request", param


def install_error_handlers(app: FastAPI) -> None:
    """Register handlers so every error leaves ``app`` as OpenAI-style JSON with the right status."""

    @app.exception_handler(OpenAIError)
    async def _openai_error(request: Request, exc: OpenAIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(InvalidRequestError)
    async def _invalid_request(request: Request, exc: InvalidRequestError) -> JSONResponse:
        code = "context_length_exceeded" if "context" in str(exc) or "KV cache" in str(exc) else None
        return OpenAIError(400, str(exc), code=code).response()

    @app.exception_handler(EngineError)
    async def _engine_error(request: Request, exc: EngineError) -> JSONResponse:
        # Not the caller's fault (InvalidRequestError has its own handler): the engine cannot serve now.
        return OpenAIError(503, f"engine unavailable: {exc}", code="engine_unavailable").response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        if any(err.get("type") == "json_invalid" for err in exc.errors()):
            return OpenAIError(400, "request body is not valid JSON", code="invalid_json").response()
        message, param = _validation_message(exc)
        return OpenAIError(422, message, param=param, code="invalid_value").response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        if exc.status_code == 404 and message == "Not Found":
            message = f"no route {request.method} {request.url.path}"
        return OpenAIError(exc.status_code, message, headers=dict(exc.headers or {})).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
        log.exception("unhandled error in %s %s (request id %s)", request.method, request.url.path, request_id)
        return OpenAIError(500, f"internal server error (request id {request_id})", code="internal_error",
                           headers={"x-request-id": request_id}).response()
