"""Gateway settings: one flat pydantic model, filled from CLI flags, env, a config file and defaults.

Precedence, highest first: explicit overrides (CLI flags) > ``HYBRID_GATEWAY_*`` env > config file > defaults.
The config file is YAML (``.yaml``/``.yml``) or TOML (``.toml``), named by ``config_file`` / ``--config`` /
``HYBRID_GATEWAY_CONFIG``; its keys are the field names below. List fields take a comma-separated env value
(``HYBRID_GATEWAY_API_KEYS=k1,k2``) or a JSON list.

    settings = load_settings(Path("gateway.yaml"), port=9000)    # the CLI does this with the flags it was given
    app.dependency_overrides[get_settings] = lambda: settings   # tests, or create_app(settings)

Every field is also a CLI flag (:func:`settings_options`, :func:`build_serve_command`); adding a field adds
its flag, and no flag exists without a field. Invalid settings raise ``ValueError`` (pydantic's
``ValidationError`` is one) at startup, never at the first request.
"""

from __future__ import annotations

import functools
import inspect
import ipaddress
import json
import os
import tomllib
from collections.abc import Callable
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import typer
import yaml
from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
    YamlConfigSettingsSource,
)

ENV_PREFIX = "HYBRID_GATEWAY_"
CONFIG_ENV = "HYBRID_GATEWAY_CONFIG"
_LIST_FIELDS = ("api_keys", "cloud_url")


def is_loopback(host: str) -> bool:
    """True when ``host`` only accepts connections from this machine (``127.0.0.0/8``, ``::1``, ``localhost``)."""
    host = host.strip().strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def resolve_tp_degree(cloud_tp: str, num_heads: int, num_kv_heads: int, num_gpus: int) -> int:
    """Tensor-parallel degree for the cloud model: ``"auto"`` or an explicit positive integer (as a string).

    ``"auto"`` is the largest degree that divides both head counts and is at most ``num_gpus`` (1 on CPU).
    An explicit degree must divide both head counts, and fit the GPUs when there are any.

    >>> resolve_tp_degree("auto", num_heads=32, num_kv_heads=8, num_gpus=6)
    4
    """
    if num_heads < 1 or num_kv_heads < 1 or num_heads % num_kv_heads:
        raise ValueError(f"bad head counts: num_heads={num_heads}, num_kv_heads={num_kv_heads}")
    if cloud_tp == "auto":
        return max(d for d in range(1, max(num_gpus, 1) + 1) if num_heads % d == 0 and num_kv_heads % d == 0)
    tp = int(cloud_tp)
    if num_heads % tp or num_kv_heads % tp:
        raise ValueError(f"cloud_tp={tp} must divide num_heads={num_heads} and num_kv_heads={num_kv_heads}")
    if num_gpus > 0 and tp > num_gpus:
        raise ValueError(f"cloud_tp={tp} needs {tp} GPUs but only {num_gpus} are visible")
    return tp


class _ConfigFileSource(PydanticBaseSettingsSource):
    """Reads the YAML/TOML file named by the ``config_file`` override or ``HYBRID_GATEWAY_CONFIG[_FILE]``."""

    def __init__(self, settings_cls: type[BaseSettings], init_kwargs: dict[str, Any]) -> None:
        super().__init__(settings_cls)
        self.path = (init_kwargs.get("config_file") or os.environ.get(CONFIG_ENV)
                     or os.environ.get(f"{ENV_PREFIX}CONFIG_FILE") or None)

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        raise NotImplementedError  # __call__ reads the whole file at once

    def __call__(self) -> dict[str, Any]:
        if self.path is None:
            return {}
        path = Path(self.path).expanduser()
        if not path.is_file():
            raise ValueError(f"config file {path} does not exist")
        suffix = path.suffix.lower()
        if suffix not in (".yaml", ".yml", ".toml"):
            raise ValueError(f"config file {path} must end in .yaml, .yml or .toml")
        try:  # the sources parse the file when constructed
            if suffix == ".toml":
                values = TomlConfigSettingsSource(self.settings_cls, toml_file=path)()
            else:
                values = YamlConfigSettingsSource(self.settings_cls, yaml_file=path)()
        except (yaml.YAMLError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"cannot parse config file {path}: {exc}") from exc
        return {**values, "config_file": path}


class GatewaySettings(BaseSettings):
    """Everything ``hybrid-gateway serve`` can be told. See the module docstring for where values come from.

    >>> GatewaySettings(port=9000, rate_limit_rpm=60).rate_limit_capacity
    60
    """

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", hide_input_in_errors=True,
                                      validate_default=True)

    config_file: Path | None = Field(None, description="YAML or TOML file with settings.")
    # Server
    host: str = Field("127.0.0.1", description="Address to bind; a non-loopback address requires API keys.")
    port: int = Field(8000, ge=1, le=65535, description="Port to bind.")
    log_level: Literal["critical", "error", "warning", "info", "debug", "trace"] = Field(
        "info", description="Log level of the server.")
    # Auth and limits
    api_keys: Annotated[list[str], NoDecode] = Field(
        [], repr=False, description="API keys clients send as 'Authorization: Bearer KEY' (repeatable; "
                                    "prefer env or the config file, flags show in `ps`).")
    require_api_key: bool | None = Field(
        None, description="Reject requests without a valid key (unset = auto: required unless host is loopback).")
    rate_limit_rpm: float = Field(0, ge=0, description="Requests per minute per key, or per client IP when "
                                                       "anonymous (0 = unlimited).")
    rate_limit_burst: int = Field(0, ge=0, description="Requests allowed at once before the rate applies "
                                                       "(0 = one minute's worth).")
    rate_limit_tpm: float = Field(0, ge=0, description="Prompt + completion tokens per minute per key "
                                                       "(0 = unlimited).")
    max_body_bytes: int = Field(1_048_576, ge=1, description="Largest request body accepted, in bytes.")
    max_prompt_chars: int = Field(200_000, ge=1, description="Longest prompt accepted, in characters.")
    # Edge tier
    edge_enabled: bool = Field(True, description="Serve the edge tier in-process.")
    edge_model: str | None = Field(None, description="Edge model: GGUF file, HF directory or cached name "
                                                     "(unset = the embedded default).")
    edge_quant: Literal["int4", "int8"] = Field("int4", description="Edge weight quantization.")
    edge_source: Literal["auto", "fast", "requantize"] = Field(
        "auto", description="Where int4 weights come from: auto = the GGUF's blocks exactly; fast = the same on "
                            "CPU (BlockQuantMatMul), and on MatMulNBits (a GPU) Q4_1 re-quantized without its "
                            "block mins (fewer ops, less exact).")
    edge_lm_head: Literal["auto", "stored", "int4", "rescore"] = Field(
        "auto", description="Edge LM head: rescore = read at 4 bits, each token's 64 best logits again from the "
                            "stored 8-bit head (the stored head's greedy tokens, ~12 MB less read per token); "
                            "stored = like the other weights (the GGUF's Q8_0 head exactly); int4 = re-quantized "
                            "to 4 bits (less exact); auto = rescore where it applies (BlockQuantMatMul, a head not "
                            "stored at 4 bits), else stored.")
    edge_kv_dtype: Literal["auto", "float32", "float16"] = Field(
        "auto", description="Edge KV cache element type: float16 = K and V stored as half (half the bytes attention "
                            "reads; arithmetic stays float32), fused CPU graph only; auto = float16 there, else "
                            "float32.")
    edge_threads: int | None = Field(None, ge=1, description="CPU threads for the edge engine "
                                                             "(unset = physical cores).")
    edge_max_num_seqs: int = Field(64, ge=1, description="Most sequences the edge engine runs at once.")
    edge_max_batched_tokens: int = Field(512, ge=1, description="Token budget of one edge engine step.")
    edge_kv_cache_mb: int = Field(512, ge=1, description="Edge KV cache size in MiB.")
    edge_global_thread_pool: bool = Field(True, description="One ONNX Runtime thread pool shared by all edge "
                                                            "sessions (faster; the gateway process then "
                                                            "allows no other kind of ORT session).")
    edge_block_size: int | None = Field(None, ge=1, description="Edge KV block size in tokens (unset = 4 on CPU, "
                                                                "16 on a GPU).")
    # Cloud tier
    cloud_enabled: bool = Field(True, description="Serve the cloud tier.")
    cloud_model: str | None = Field(None, description="Model for the local cloud engine (GGUF file, HF "
                                                      "directory or cached name).")
    cloud_tp: str = Field("auto", description="Tensor-parallel degree of the local cloud engine: 'auto' or a "
                                              "positive integer dividing the head counts.")
    cloud_url: Annotated[list[str], NoDecode] = Field(
        [], description="External OpenAI-compatible base URL(s) for the cloud tier (repeatable); when given, "
                        "no local cloud engine is started.")
    cloud_api_key: str | None = Field(None, repr=False, description="Bearer key sent to --cloud-url upstreams.")
    cloud_model_id: str | None = Field(None, description="Model name sent upstream (unset = discover "
                                                         "from /v1/models).")
    cloud_port: int = Field(8001, ge=1, le=65535, description="Port of the local cloud engine's server.")
    cloud_dtype: str | None = Field(None, description="Activation dtype of the local cloud engine "
                                                      "(unset = the engine's default).")
    cloud_timeout_s: float = Field(600, gt=0, description="Whole-request timeout for cloud calls, in seconds.")
    cloud_connect_timeout_s: float = Field(5, gt=0, description="Connect timeout for cloud calls, in seconds.")
    cloud_max_retries: int = Field(2, ge=0, description="Retries of a failed cloud call before giving up.")
    breaker_failures: int = Field(3, ge=1, description="Consecutive failures that take a cloud replica out.")
    breaker_cooldown_s: float = Field(10, ge=0, description="Seconds before a tripped replica is tried again.")
    health_interval_s: float = Field(5, gt=0, description="Seconds between cloud health checks.")
    # Routing
    router_dir: Path | None = Field(None, description="Trained router directory (unset = the shipped default).")
    router_mode: Literal["fast", "accurate"] = Field(
        "fast", description="Which shipped router when router_dir is unset: fast (text features, tens of µs) or "
                            "accurate (+ all-MiniLM-L6-v2 sentence embedding, a few ms; pulled from PyPI once).")
    router_threshold: float | None = Field(None, ge=0, le=1, description="Win-rate threshold above which a "
                                                                         "request goes to the cloud (unset = "
                                                                         "the router's calibrated one).")
    ttft_target_s: float = Field(2.0, gt=0, description="Time-to-first-token target, in seconds.")
    sticky_sessions: bool = Field(True, description="Keep a conversation on the tier that served its first turn.")
    sticky_ttl_s: float = Field(1800, ge=0, description="Seconds a sticky session is remembered.")

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings: Any, env_settings: Any,
                                   dotenv_settings: Any, file_secret_settings: Any) -> tuple[Any, ...]:
        return init_settings, env_settings, _ConfigFileSource(settings_cls, init_settings.init_kwargs)

    @field_validator(*_LIST_FIELDS, mode="before")
    @classmethod
    def _split_list(cls, value: Any) -> Any:
        if isinstance(value, str):  # env: comma-separated or a JSON list
            return json.loads(value) if value.strip().startswith("[") else [v for v in value.split(",") if v]
        return value

    @field_validator("api_keys")
    @classmethod
    def _check_keys(cls, keys: list[str]) -> list[str]:
        keys = [k.strip() for k in keys]
        if any(not k for k in keys):
            raise ValueError("an API key is empty")
        return keys

    @field_validator("cloud_url")
    @classmethod
    def _check_urls(cls, urls: list[str]) -> list[str]:
        for url in urls:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"cloud URL {url!r} must start with http:// or https://")
        return [u.strip().rstrip("/") for u in urls]

    @field_validator("require_api_key", mode="before")
    @classmethod
    def _auto(cls, value: Any) -> Any:
        return None if isinstance(value, str) and value.strip().lower() in ("", "auto") else value

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    @field_validator("cloud_tp", mode="before")
    @classmethod
    def _check_tp(cls, value: Any) -> str:
        text = str(value).strip().lower()
        if text != "auto" and not (text.isdigit() and int(text) >= 1):
            raise ValueError(f"cloud_tp must be 'auto' or a positive integer, got {value!r}")
        return text if text == "auto" else str(int(text))

    @model_validator(mode="after")
    def _check_together(self) -> GatewaySettings:
        if self.api_key_required and not self.api_keys:
            why = "require_api_key is set" if self.require_api_key else f"host {self.host!r} is not a loopback address"
            raise ValueError(f"API keys are required ({why}) but none are configured: set api_keys "
                             f"(--api-keys / {ENV_PREFIX}API_KEYS), or --no-require-api-key to serve without auth")
        if not (self.edge_enabled or self.cloud_enabled):
            raise ValueError("edge_enabled and cloud_enabled are both false: enable at least one tier")
        return self

    @property
    def api_key_required(self) -> bool:
        """Whether requests need a key: ``require_api_key``, or auto (any non-loopback host)."""
        return self.require_api_key if self.require_api_key is not None else not is_loopback(self.host)

    @property
    def rate_limit_capacity(self) -> int:
        """Request bucket size: ``rate_limit_burst``, or one minute's rate rounded (at least 1)."""
        return self.rate_limit_burst or max(1, round(self.rate_limit_rpm))

    def cloud_tp_degree(self, num_heads: int, num_kv_heads: int, num_gpus: int) -> int:
        """The cloud TP degree for this model and machine; see :func:`resolve_tp_degree`."""
        return resolve_tp_degree(self.cloud_tp, num_heads, num_kv_heads, num_gpus)


def load_settings(config_file: Path | str | None = None, **overrides: Any) -> GatewaySettings:
    """Settings from ``overrides`` > env > ``config_file`` (or ``$HYBRID_GATEWAY_CONFIG``) > defaults.

    Unknown override names raise ``ValueError`` rather than being dropped.
    """
    unknown = sorted(set(overrides) - set(GatewaySettings.model_fields))
    if unknown:
        raise ValueError(f"unknown settings: {', '.join(unknown)}")
    if config_file is not None:
        overrides["config_file"] = Path(config_file)
    return GatewaySettings(**overrides)


@functools.lru_cache(maxsize=1)
def get_settings() -> GatewaySettings:
    """FastAPI dependency: the process's settings, loaded once. Override it in tests and in ``create_app``."""
    return load_settings()


# ---- CLI: one typer option per field ----------------------------------------------------------------------


def _option(name: str, field: FieldInfo) -> inspect.Parameter:
    base = field.annotation
    if get_origin(base) in (Union, UnionType):  # X | None
        base = next(a for a in get_args(base) if a is not type(None))
    flag = "--" + name.replace("_", "-")
    decls = ("--config",) if name == "config_file" else (f"{flag}/--no-{flag[2:]}",) if base is bool else (flag,)
    default = None if field.default is None or isinstance(field.default, list) else field.default
    metavar = "<str>" if get_origin(base) is list else None  # not "<list[str]>": the flag repeats
    option = typer.Option(*decls, help=field.description, show_default=default is not None, metavar=metavar)
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default,
                             annotation=Annotated[base | None, option])


def settings_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Give a typer command one option per :class:`GatewaySettings` field, plus ``--config PATH``.

    ``func`` takes ``ctx: typer.Context`` and ``**params``; pass both to :func:`settings_from_cli`::

        @app.command("serve")
        @settings_options
        def serve(ctx: typer.Context, **params: Any) -> None:
            settings = settings_from_cli(ctx, params)
    """
    signature = inspect.signature(func, eval_str=True)
    own = [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    if len(own) == len(signature.parameters):
        raise TypeError(f"{func.__name__} must take **params to receive the settings options")
    func.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=[*own, *(_option(n, f) for n, f in GatewaySettings.model_fields.items())])
    return func


def cli_overrides(ctx: typer.Context, params: dict[str, Any]) -> dict[str, Any]:
    """The settings overrides among parsed ``params``: only the flags the user actually gave."""
    given = {}
    for name, value in params.items():
        source = ctx.get_parameter_source(name)
        if name in GatewaySettings.model_fields and source is not None and source.name != "DEFAULT":
            given[name] = list(value) if isinstance(value, tuple) else value
    return given


def settings_from_cli(ctx: typer.Context, params: dict[str, Any]) -> GatewaySettings:
    """Settings with the given flags on top; a bad value is a usage error (exit 2) that names the flag."""
    try:
        return load_settings(**cli_overrides(ctx, params))
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            where = "--" + str(err["loc"][0]).replace("_", "-") + ": " if err["loc"] else ""
            problems.append(where + err["msg"].removeprefix("Value error, "))
        raise typer.BadParameter("; ".join(problems), ctx=ctx) from None
    except ValueError as exc:
        raise typer.BadParameter(str(exc), ctx=ctx) from None


SERVE_HELP = "Serve the OpenAI-compatible API on the edge and cloud tiers."
ENV_HELP = (f"Every --flag-name is also read from env {ENV_PREFIX}FLAG_NAME and from key flag_name in the --config "
            "file; a flag wins over env, env over the file.")


def build_serve_command(callback: Callable[[GatewaySettings], Any], *, help: str = SERVE_HELP) -> Callable[..., Any]:
    """A typer command function with every settings flag that calls ``callback(settings)``.

    >>> app = typer.Typer()
    >>> _ = app.command("serve")(build_serve_command(print))
    """

    @settings_options
    def serve(ctx: typer.Context, **params: Any) -> Any:
        return callback(settings_from_cli(ctx, params))

    serve.__doc__ = f"{help}\n\n{ENV_HELP}"
    return serve
