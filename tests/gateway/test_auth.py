"""APIKeyAuth as a FastAPI dependency: identities, 401s in OpenAI's shape, and the loopback auto mode."""

from __future__ import annotations

import hashlib

import pytest
from fastapi import Depends, FastAPI
from fastapi.testclient import TestClient

from gateway.auth import APIKeyAuth, bearer_token, key_identity
from gateway.config import GatewaySettings
from kernels.serving.errors import install_error_handlers


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    import os

    for name in list(os.environ):
        if name.startswith("HYBRID_GATEWAY_"):
            monkeypatch.delenv(name)


def _client(**settings) -> TestClient:
    app = FastAPI()
    install_error_handlers(app)
    auth = APIKeyAuth(GatewaySettings(**settings))

    @app.get("/whoami")
    async def whoami(identity: str = Depends(auth)) -> dict:
        return {"identity": identity}

    return TestClient(app)


def _get(client: TestClient, authorization: str | None = None):
    return client.get("/whoami", headers={"Authorization": authorization} if authorization else {})


def test_valid_key_gives_hashed_identity():
    client = _client(host="0.0.0.0", api_keys=["sk-one", "sk-two"])
    expected = "key:" + hashlib.sha256(b"sk-two").hexdigest()[:12]
    for header in ("Bearer sk-two", "bearer sk-two", "  Bearer   sk-two  "):
        response = _get(client, header)
        assert response.status_code == 200 and response.json() == {"identity": expected}
    assert key_identity("sk-two") == expected and "sk-two" not in expected
    assert _get(client, "Bearer sk-one").json()["identity"] != expected


@pytest.mark.parametrize("header, message", [
    (None, "Missing API key"), ("Bearer", "Missing API key"), ("Basic c2stb25lOg==", "Missing API key"),
    ("Bearer sk-wrong", "Incorrect API key"), ("Bearer sk-one-but-longer", "Incorrect API key")])
def test_required_key_missing_or_wrong_is_401(header, message):
    response = _get(_client(host="0.0.0.0", api_keys=["sk-one"]), header)
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    error = response.json()["error"]
    assert error["code"] == "invalid_api_key" and error["type"] == "authentication_error"
    assert error["message"].startswith(message)


def test_loopback_without_keys_is_anonymous():
    client = _client()  # 127.0.0.1, no keys: auth is off
    assert _get(client).json() == {"identity": "anon:testclient"}
    # SDKs insist on sending some key; with none configured any key is fine.
    assert _get(client, "Bearer sk-whatever").json() == {"identity": "anon:testclient"}


def test_optional_keys_still_reject_wrong_ones():
    client = _client(host="0.0.0.0", api_keys=["sk-one"], require_api_key=False)
    assert _get(client).json() == {"identity": "anon:testclient"}
    assert _get(client, "Bearer sk-one").json() == {"identity": key_identity("sk-one")}
    assert _get(client, "Bearer sk-nope").status_code == 401


def test_required_on_loopback_when_asked():
    client = _client(api_keys=["sk-one"], require_api_key=True)
    assert _get(client).status_code == 401
    assert _get(client, "Bearer sk-one").status_code == 200


@pytest.mark.parametrize("host, required", [("127.0.0.1", False), ("localhost", False), ("::1", False),
                                            ("0.0.0.0", True), ("192.168.1.4", True)])
def test_auto_mode(host, required):
    assert APIKeyAuth(GatewaySettings(host=host, api_keys=["k"])).required is required


@pytest.mark.parametrize("header, token", [
    (None, None), ("", None), ("Bearer", None), ("Bearer ", None), ("Token abc", None), ("Bearer abc", "abc"),
    ("BEARER abc", "abc"), ("Bearer a b", "a b")])
def test_bearer_token(header, token):
    assert bearer_token(header) == token
