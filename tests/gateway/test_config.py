"""GatewaySettings: validation, file/env/override precedence, the TP helper, and the generated CLI flags."""

from __future__ import annotations

import pytest
import typer
from pydantic import ValidationError
from typer.testing import CliRunner

from gateway.config import (
    GatewaySettings,
    build_serve_command,
    get_settings,
    is_loopback,
    load_settings,
    resolve_tp_degree,
    settings_options,
)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    """Settings read HYBRID_GATEWAY_* from the environment: start every test without any."""
    import os

    for name in list(os.environ):
        if name.startswith("HYBRID_GATEWAY_"):
            monkeypatch.delenv(name)


def test_defaults():
    s = GatewaySettings()
    assert (s.host, s.port, s.log_level, s.api_keys, s.require_api_key) == ("127.0.0.1", 8000, "info", [], None)
    assert s.api_key_required is False and s.rate_limit_capacity == 1
    assert (s.edge_quant, s.cloud_tp, s.cloud_url, s.router_dir) == ("int4", "auto", [], None)


@pytest.mark.parametrize("host, loopback", [
    ("127.0.0.1", True), ("127.0.0.2", True), ("::1", True), ("[::1]", True), ("localhost", True),
    ("LOCALHOST", True), ("::ffff:127.0.0.1", True), ("0.0.0.0", False), ("::", False), ("10.0.0.5", False),
    ("example.com", False), ("", False)])
def test_is_loopback(host, loopback):
    assert is_loopback(host) is loopback


def test_public_host_without_keys_fails_at_startup():
    with pytest.raises(ValidationError, match="API keys are required .*host '0.0.0.0' is not a loopback"):
        GatewaySettings(host="0.0.0.0")
    with pytest.raises(ValidationError, match="require_api_key is set"):
        GatewaySettings(require_api_key=True)
    assert GatewaySettings(host="0.0.0.0", require_api_key=False).api_key_required is False
    assert GatewaySettings(host="0.0.0.0", api_keys=["k"]).api_key_required is True


def test_keys_are_not_in_repr_or_errors():
    s = GatewaySettings(api_keys=["sk-secret-1"], cloud_api_key="sk-upstream")
    assert "sk-secret" not in repr(s) and "sk-upstream" not in repr(s)
    with pytest.raises(ValidationError) as info:
        GatewaySettings(api_keys=["sk-secret-1"], port=0)
    assert "sk-secret" not in str(info.value)


@pytest.mark.parametrize("field, value, match", [
    ("cloud_tp", "0", "positive integer"), ("cloud_tp", "two", "positive integer"),
    ("cloud_url", ["ftp://x"], "http://"), ("api_keys", [" "], "empty"), ("port", 70000, "less than"),
    ("router_threshold", 1.5, "less than"), ("edge_quant", "fp32", "int4"), ("rate_limit_rpm", -1, "greater")])
def test_invalid_values(field, value, match):
    with pytest.raises(ValidationError, match=match):
        GatewaySettings(**{field: value})


def test_normalization():
    s = GatewaySettings(cloud_tp=" 02 ", cloud_url=["http://a:8001/"], log_level="DEBUG", require_api_key="auto")
    assert (s.cloud_tp, s.cloud_url, s.log_level, s.require_api_key) == ("2", ["http://a:8001"], "debug", None)
    assert GatewaySettings(rate_limit_rpm=90.4).rate_limit_capacity == 90
    assert GatewaySettings(rate_limit_rpm=90, rate_limit_burst=5).rate_limit_capacity == 5


def test_both_tiers_disabled():
    with pytest.raises(ValidationError, match="at least one tier"):
        GatewaySettings(edge_enabled=False, cloud_enabled=False)


def test_env_lists_and_auto(monkeypatch):
    monkeypatch.setenv("HYBRID_GATEWAY_API_KEYS", "k1,k2")
    monkeypatch.setenv("HYBRID_GATEWAY_CLOUD_URL", '["http://a:1", "http://b:2"]')
    monkeypatch.setenv("HYBRID_GATEWAY_REQUIRE_API_KEY", "auto")
    s = GatewaySettings()
    assert s.api_keys == ["k1", "k2"] and s.cloud_url == ["http://a:1", "http://b:2"] and s.require_api_key is None


@pytest.mark.parametrize("suffix", [".yaml", ".yml", ".toml"])
def test_config_file(tmp_path, suffix):
    path = tmp_path / f"gw{suffix}"
    if suffix == ".toml":
        path.write_text('port = 9001\ncloud_tp = 2\napi_keys = ["a", "b"]\nrouter_dir = "r"\n')
    else:
        path.write_text("port: 9001\ncloud_tp: 2\napi_keys: [a, b]\nrouter_dir: r\n")
    s = load_settings(path)
    assert (s.port, s.cloud_tp, s.api_keys, str(s.router_dir), s.config_file) == (9001, "2", ["a", "b"], "r", path)


def test_config_file_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_settings(tmp_path / "missing.yaml")
    (tmp_path / "gw.json").write_text("{}")
    with pytest.raises(ValueError, match=r"must end in \.yaml"):
        load_settings(tmp_path / "gw.json")
    (tmp_path / "typo.yaml").write_text("prot: 1\n")
    with pytest.raises(ValidationError, match="prot"):
        load_settings(tmp_path / "typo.yaml")
    (tmp_path / "bad.yaml").write_text("port: [\n")
    with pytest.raises(ValueError, match="cannot parse"):
        load_settings(tmp_path / "bad.yaml")
    (tmp_path / "empty.yaml").write_text("")
    assert load_settings(tmp_path / "empty.yaml").port == 8000


def test_precedence_file_env_override(tmp_path, monkeypatch):
    path = tmp_path / "gw.yaml"
    path.write_text("port: 1111\nhost: localhost\nlog_level: debug\nedge_threads: 3\n")
    monkeypatch.setenv("HYBRID_GATEWAY_CONFIG", str(path))  # the file may also come from the env
    monkeypatch.setenv("HYBRID_GATEWAY_PORT", "2222")
    monkeypatch.setenv("HYBRID_GATEWAY_LOG_LEVEL", "warning")
    s = load_settings(log_level="error")
    assert (s.port, s.log_level, s.host, s.edge_threads) == (2222, "error", "localhost", 3)


def test_config_file_env_spellings(tmp_path, monkeypatch):
    path = tmp_path / "gw.yaml"
    path.write_text("port: 1234\n")
    monkeypatch.setenv("HYBRID_GATEWAY_CONFIG_FILE", str(path))
    assert load_settings().port == 1234 and load_settings().config_file == path


def test_unknown_override_is_rejected():
    with pytest.raises(ValueError, match="unknown settings: prot"):
        load_settings(prot=1)


def test_get_settings_is_cached(monkeypatch):
    get_settings.cache_clear()
    monkeypatch.setenv("HYBRID_GATEWAY_PORT", "7000")
    try:
        assert get_settings() is get_settings() and get_settings().port == 7000
    finally:
        get_settings.cache_clear()


@pytest.mark.parametrize("cloud_tp, heads, kv_heads, gpus, expected", [
    ("auto", 32, 8, 0, 1), ("auto", 32, 8, 8, 8), ("auto", 32, 8, 6, 4), ("auto", 14, 2, 8, 2),
    ("auto", 15, 5, 4, 1), ("auto", 9, 3, 3, 3), ("2", 32, 8, 0, 2), ("4", 32, 8, 4, 4)])
def test_tp_degree(cloud_tp, heads, kv_heads, gpus, expected):
    assert resolve_tp_degree(cloud_tp, heads, kv_heads, gpus) == expected


def test_tp_degree_errors():
    with pytest.raises(ValueError, match="cloud_tp=3 must divide num_heads=32 and num_kv_heads=8"):
        GatewaySettings(cloud_tp="3").cloud_tp_degree(32, 8, 8)
    with pytest.raises(ValueError, match="needs 4 GPUs but only 2"):
        resolve_tp_degree("4", 32, 8, 2)
    with pytest.raises(ValueError, match="bad head counts"):
        resolve_tp_degree("auto", 32, 5, 2)


# ---- CLI ---------------------------------------------------------------------------------------------------


def _app():
    """A typer app shaped like gateway/cli.py: several commands, one of them serve."""
    seen = []
    app = typer.Typer()
    app.command("serve")(build_serve_command(seen.append))

    @app.command()
    def other() -> None:
        """Another command."""

    return app, seen


def _invoke(*args):
    app, seen = _app()
    result = CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "300"})
    return result, seen


def test_help_lists_every_field():
    result, _ = _invoke("serve", "--help")
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.replace("│", " ").split())  # rich boxes and line wraps out of the way
    for name, field in GatewaySettings.model_fields.items():
        flag = "--config" if name == "config_file" else "--" + name.replace("_", "-")
        assert flag in text, flag
        assert " ".join(field.description.split()) in text, name
    for snippet in ("--require-api-key --no-require-api-key", "--edge-enabled --no-edge-enabled", "int4", "int8",
                    "env HYBRID_GATEWAY_FLAG_NAME", "default: 8000"):
        assert snippet in text, snippet


def test_cli_flags_become_overrides(tmp_path, monkeypatch):
    path = tmp_path / "gw.toml"
    path.write_text('port = 1111\nhost = "0.0.0.0"\napi_keys = ["file-key"]\nedge_threads = 3\nlog_level = "debug"\n')
    monkeypatch.setenv("HYBRID_GATEWAY_PORT", "2222")
    monkeypatch.setenv("HYBRID_GATEWAY_LOG_LEVEL", "warning")
    result, seen = _invoke(
        "serve", "--config", path, "--log-level", "error", "--api-keys", "k1", "--api-keys", "k2",
        "--cloud-url", "http://a:1", "--cloud-url", "https://b", "--no-sticky-sessions", "--edge-quant", "int8",
        "--router-threshold", "0.25", "--cloud-tp", "2")
    assert result.exit_code == 0, result.output
    s = seen[0]
    assert (s.port, s.host, s.log_level, s.edge_threads) == (2222, "0.0.0.0", "error", 3)  # env > file; CLI > env
    assert s.api_keys == ["k1", "k2"] and s.cloud_url == ["http://a:1", "https://b"]
    assert (s.sticky_sessions, s.edge_quant, s.router_threshold, s.cloud_tp) == (False, "int8", 0.25, "2")
    assert s.require_api_key is None and s.edge_enabled is True  # flags not given leave the lower layers alone


def test_cli_bool_flags_and_errors():
    result, seen = _invoke("serve", "--host", "0.0.0.0", "--no-require-api-key")
    assert result.exit_code == 0 and seen[0].api_key_required is False
    result, _ = _invoke("serve", "--host", "0.0.0.0")
    text = " ".join(result.output.replace("│", " ").split())
    assert result.exit_code == 2 and "--api-keys" in text and "not a loopback" in text
    result, _ = _invoke("serve", "--cloud-tp", "zero", "--port", "0")
    text = " ".join(result.output.replace("│", " ").split())
    assert result.exit_code == 2 and "--cloud-tp: cloud_tp must be 'auto'" in text and "--port:" in text
    result, _ = _invoke("serve", "--config", "/nonexistent/gw.yaml")
    assert result.exit_code == 2 and "does not exist" in result.output
    result, _ = _invoke("serve", "--edge-quant", "fp32")
    assert result.exit_code == 2


def test_settings_options_needs_var_keyword():
    with pytest.raises(TypeError, match="must take \\*\\*params"):
        settings_options(lambda ctx: None)
