"""API-key authentication: a FastAPI dependency that turns ``Authorization: Bearer KEY`` into a caller identity.

    auth = APIKeyAuth(settings)
    @router.post("/v1/chat/completions")
    async def chat(body: ChatRequest, identity: str = Depends(auth)) -> ...

The identity names the caller for rate limits, logs and metrics without revealing the key:
``key:<first 12 hex of sha256(key)>`` for a valid key, ``anon:<client ip>`` when no key is needed and none
(or one while no keys are configured) was sent. A wrong key is always refused (401), even when keys are
optional, so a misconfigured client finds out. Keys are compared in constant time against every configured
key, so neither which key matched nor how much of it matched leaks through timing.

Whether a key is needed is ``settings.api_key_required``: ``require_api_key``, or when unset, whenever the
server binds a non-loopback address (:func:`is_loopback`).
"""

from __future__ import annotations

import hashlib
import hmac

from fastapi import Request

from gateway.config import GatewaySettings, is_loopback
from kernels.serving.errors import OpenAIError

__all__ = ["APIKeyAuth", "bearer_token", "is_loopback", "key_identity"]

_UNAUTHORIZED_HEADERS = {"WWW-Authenticate": "Bearer"}


def key_identity(key: str) -> str:
    """The identity a key authenticates as: a short hash prefix, safe to log and to use as a metric label."""
    return "key:" + hashlib.sha256(key.encode()).hexdigest()[:12]


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer TOKEN`` header (scheme case-insensitive), else None."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


class APIKeyAuth:
    """FastAPI dependency checking the caller's API key; returns the caller identity.

    >>> auth = APIKeyAuth(GatewaySettings(api_keys=["sk-test"]))
    >>> auth.identify("Bearer sk-test", client_ip="10.0.0.7").startswith("key:")
    True
    """

    def __init__(self, settings: GatewaySettings) -> None:
        self.required = settings.api_key_required
        # Digests have one length, so compare_digest's time does not depend on the key's length either.
        self._digests = {hashlib.sha256(k.encode()).digest(): key_identity(k) for k in settings.api_keys}

    async def __call__(self, request: Request) -> str:
        client_ip = request.client.host if request.client else "unknown"
        return self.identify(request.headers.get("authorization"), client_ip=client_ip)

    def identify(self, authorization: str | None, *, client_ip: str) -> str:
        """The identity for an ``Authorization`` header value; raises a 401 ``OpenAIError`` when refused."""
        token = bearer_token(authorization)
        if token is None:
            if self.required:
                raise self._unauthorized("Missing API key: send 'Authorization: Bearer YOUR_KEY'.")
            return f"anon:{client_ip}"
        if not self._digests:  # no keys configured: SDKs insist on sending some key, accept any
            return f"anon:{client_ip}"
        identity = self._match(token)
        if identity is None:
            raise self._unauthorized("Incorrect API key provided.")
        return identity

    def _match(self, token: str) -> str | None:
        digest = hashlib.sha256(token.encode()).digest()
        found = None
        for known, identity in self._digests.items():  # no early exit: the time does not say which key matched
            if hmac.compare_digest(digest, known):
                found = identity
        return found

    @staticmethod
    def _unauthorized(message: str) -> OpenAIError:
        return OpenAIError(401, message, code="invalid_api_key", headers=dict(_UNAUTHORIZED_HEADERS))
