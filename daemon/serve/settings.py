"""Daemon configuration from a TOML file, EDGELLM_* environment variables (nested with __) and CLI flags.

Precedence: flags > environment > file > defaults. Secrets can come from files, including systemd
credentials in $CREDENTIALS_DIRECTORY (LoadCredential=mqtt-password:...).
"""

from __future__ import annotations

import os
import socket
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource

from edgellm.daemon.engine.drafting import MAX_DRAFT
from edgellm.daemon.engine.params import speculation_mode
from edgellm.daemon.errors import CommandError
from edgellm.daemon.formats import NAME_PATTERN, AnswerMode, StrictModel
from edgellm.daemon.update.settings import UpdateSettings  # the update room owns its section

DEFAULT_CONFIG = Path("/etc/edgellm/edgellm.toml")
ENV_PREFIX = "EDGELLM_"


class TLSSettings(StrictModel):
    enabled: bool = False
    ca_file: Path | None = Field(None, description="CA bundle that signed the broker's certificate")
    cert_file: Path | None = Field(None, description="client certificate, for mutual TLS")
    key_file: Path | None = Field(None, description="client key; or the credential 'mqtt-tls-key'")
    insecure: bool = Field(False, description="skip the broker hostname check (labs only)")


class MQTTSettings(StrictModel):
    enabled: bool = Field(True, description="false: an HTTP-only device (http.enabled), no broker at all")
    host: str = "localhost"
    port: int = Field(1883, ge=1, le=65535)
    username: str | None = None
    password: SecretStr | None = None
    password_file: Path | None = Field(None, description="file holding the password; or the credential 'mqtt-password'")
    keepalive: int = Field(30, ge=5, le=3600)
    session_expiry: int = Field(3600, ge=0, description="seconds the broker keeps queued requests while we are away")
    reconnect_min_delay: float = Field(0.5, gt=0)
    reconnect_max_delay: float = Field(30.0, gt=0)
    tls: TLSSettings = TLSSettings()


class ModelSettings(StrictModel):
    path: Path | None = Field(None, description="the model to serve: a folder, or a name in the local library "
                              "(edgellm models list)")
    threads: int = Field(0, ge=0, description="onnxruntime intra-op threads (0: all cores)")
    prefix_cache_mb: int = Field(256, ge=0, description="memory for reusing prompt prefixes (0 turns it off)")
    batch_size: int = Field(4, ge=1, le=64, description="generation requests decoded together (continuous "
                            "batching); 1 answers one request at a time")
    batch_context: int = Field(512, ge=16, description="tokens (prompt + answer) a batched request may reach; "
                               "the KV memory is batch_size x batch_context (SmolLM2: 46 KB a token, 23 with a "
                               "float16 cache), grown as rows fill; a longer request continues unbatched")
    speculative: str | int = Field("auto", description="speculative decoding for requests that do not choose: "
                                   "auto (drafts from the prompt where they pay: a request decoding alone), off, "
                                   f"or a fixed draft length 1-{MAX_DRAFT}")

    @field_validator("speculative", mode="before")
    @classmethod
    def _speculation_mode(cls, mode: str | int) -> str | int:
        # an environment variable holds a string: EDGELLM_MODEL__SPECULATIVE=4 means a draft length of 4
        return speculation_mode(int(mode) if isinstance(mode, str) and mode.isdigit() else mode)


class EmbeddingSettings(StrictModel):
    path: Path | None = Field(None, description="the embedding model, for embed, ingest and search: a folder, or "
                               "a name in the local library (edgellm pull minilm)")
    threads: int = Field(1, ge=0)


class StoreSettings(StrictModel):
    path: Path | None = Field(None, description="the retrieval store (SQLite file), for ingest/search/ask")
    ingest_dirs: list[Path] = Field(default_factory=list,
                                    description="folders whose files MQTT ingest may read; nothing else is readable")
    max_file_mb: float = Field(32, gt=0, le=4096, description="files larger than this are refused (too_large) "
                               "before they are read")
    min_similarity: float = Field(0.25, ge=-1, le=1, description="ask answers 'not found' below this cosine")
    answer_mode: AnswerMode = Field(
        "auto", description="how ask answers: grounded (a span copied from the best sentence of the passages, or "
        "'the documents do not say'), free (text written from the passages), auto (grounded for models under 1B "
        "parameters)")

    @property
    def max_file_bytes(self) -> int:
        return int(self.max_file_mb * 2**20)


class HomeAssistantSettings(StrictModel):
    enabled: bool = Field(False, description="publish Home Assistant MQTT discovery configs (retained)")
    discovery_prefix: str = Field("homeassistant", pattern=r"^[A-Za-z0-9_./-]{1,64}$")


class HttpSettings(StrictModel):
    enabled: bool = False
    host: str = Field("127.0.0.1", description="loopback by default; any other address needs an API key")
    port: int = Field(8080, ge=1, le=65535)
    api_key: SecretStr | None = None
    api_key_file: Path | None = Field(None, description="file holding the key; or the credential 'http-api-key'")
    send_buffer_kb: int = Field(256, ge=4, le=65536, description="kernel send buffer of each connection: what a "
                                "client that stops reading can leave waiting before its stream stalls (Linux "
                                "otherwise grows it to 4 MB, about 20,000 streamed tokens)")

    def key(self) -> str | None:
        if self.api_key is not None:
            return self.api_key.get_secret_value()
        path = self.api_key_file or credential("http-api-key")
        return path.read_text().strip() if path else None

    def is_loopback(self) -> bool:
        import ipaddress

        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


class LimitSettings(StrictModel):
    queue_size: int = Field(16, ge=1, le=10_000, description="requests waiting beyond this get 'busy'")
    max_payload_bytes: int = Field(1 << 20, ge=1024)
    max_tokens: int = Field(2048, ge=1, description="ceiling on any request's max_tokens")
    grace_seconds: float = Field(10.0, ge=0, description="on SIGTERM, time in-flight requests get to finish")
    stream_stall_seconds: float = Field(30.0, gt=0, description="an HTTP stream whose client has read nothing for "
                                        "this long while its events wait is cancelled, freeing its decode slot")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="forbid",
                                      protected_namespaces=())

    device_id: str = Field(default_factory=lambda: socket.gethostname().split(".")[0], pattern=NAME_PATTERN)
    state_dir: Path = Field(default_factory=lambda: default_state_dir(),
                            description="the request journal and, by default, update slots: $STATE_DIRECTORY "
                            "under systemd, /var/lib/edgellm for root, else ~/.local/state/edgellm")
    groups: list[str] = Field(default_factory=list, description="groups whose load-balanced requests we take")
    topic_root: str = "edgellm/v1"
    telemetry_interval: float = Field(30.0, gt=0)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["text", "json"] = Field("text", description="text (no timestamp under journald, "
                                                 "which adds its own), or one JSON object per line")
    mqtt: MQTTSettings = MQTTSettings()
    model: ModelSettings = ModelSettings()
    embedding: EmbeddingSettings = EmbeddingSettings()
    store: StoreSettings = StoreSettings()
    http: HttpSettings = HttpSettings()
    homeassistant: HomeAssistantSettings = HomeAssistantSettings()
    limits: LimitSettings = LimitSettings()
    update: UpdateSettings = UpdateSettings()

    @field_validator("groups")
    @classmethod
    def _group_names(cls, groups: list[str]) -> list[str]:
        import re

        bad = [g for g in groups if not re.match(NAME_PATTERN, g)]
        if bad:
            raise ValueError(f"group names may use letters, digits, '_', '.', '-': {bad}")
        return groups

    @field_validator("topic_root")
    @classmethod
    def _topic_root(cls, root: str) -> str:
        if not root or any(c in root for c in "+#\0") or root.startswith(("/", "$")) or root.endswith("/"):
            raise ValueError("must be a plain topic prefix like 'edgellm/v1' (no wildcards, no leading '$' or '/')")
        return root

    @model_validator(mode="after")
    def _http_key_off_loopback(self) -> Settings:
        if self.http.enabled and not self.http.is_loopback() and not self.http.key():
            raise ValueError(f"http.api_key: required when http.host ({self.http.host}) is not a loopback address; "
                             "set http.api_key or http.api_key_file")
        return self

    @model_validator(mode="after")
    def _something_to_serve(self) -> Settings:
        if not self.mqtt.enabled and not self.http.enabled:
            raise ValueError("mqtt.enabled: false leaves nothing to serve requests on; enable http (http.enabled, "
                             "or `serve --http-port PORT`) or keep MQTT on")
        if not self.mqtt.enabled and self.update.enabled:
            raise ValueError("update.enabled: fleet updates arrive over MQTT; with mqtt.enabled false, turn "
                             "updates off")
        return self

    @model_validator(mode="after")
    def _update_keys(self) -> Settings:
        if self.update.enabled:
            if not self.update.public_keys:
                raise ValueError("update.public_keys: updates are enabled but no public key is trusted; add the "
                                 "PEM file `edgellm keygen` wrote beside the signing key (KEY.pub)")
            missing = [str(p) for p in self.update.public_keys if not Path(p).is_file()]
            if missing:
                raise ValueError(f"update.public_keys: {', '.join(missing)} does not exist")
        return self

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings,
                                   file_secret_settings) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, env_settings, TomlConfigSettingsSource(settings_cls), file_secret_settings

    def mqtt_password(self) -> str | None:
        if self.mqtt.password is not None:
            return self.mqtt.password.get_secret_value()
        path = self.mqtt.password_file or credential("mqtt-password")
        return path.read_text().rstrip("\r\n") if path else None

    def tls_key_file(self) -> Path | None:
        return self.mqtt.tls.key_file or credential("mqtt-tls-key")

    def update_dir(self) -> Path:
        return self.update.state_dir or self.state_dir / "updates"


def default_state_dir() -> Path:
    if os.environ.get("STATE_DIRECTORY"):  # systemd's StateDirectory=; several are separated by ':'
        return Path(os.environ["STATE_DIRECTORY"].split(":")[0])
    if os.geteuid() == 0:
        return Path("/var/lib/edgellm")
    return Path.home() / ".local" / "state" / "edgellm"


def credential(name: str) -> Path | None:
    folder = os.environ.get("CREDENTIALS_DIRECTORY")
    path = Path(folder) / name if folder else None
    return path if path and path.is_file() else None


def _flag_hint(loc: tuple) -> str:
    dotted = ".".join(str(p) for p in loc)
    env = ENV_PREFIX + "__".join(str(p).upper() for p in loc)
    return f"{dotted} (config key {dotted}, or {env})"


def load_settings(config_file: Path | None = None, overrides: dict[str, Any] | None = None) -> Settings:
    """Settings from the file (default /etc/edgellm/edgellm.toml if it exists), env and `overrides`."""
    path = Path(config_file) if config_file else DEFAULT_CONFIG
    if config_file and not path.is_file():
        raise CommandError(f"--config: {path} does not exist")
    if path.is_file():
        try:
            tomllib.loads(path.read_text())
        except (tomllib.TOMLDecodeError, OSError) as e:
            raise CommandError(f"--config: {path} is not valid TOML: {e}") from None

    class FromFile(Settings):
        model_config = SettingsConfigDict(toml_file=path if path.is_file() else None)

    try:
        return FromFile(**(overrides or {}))
    except ValidationError as e:
        problems = "; ".join(f"{_flag_hint(err['loc'])}: {err['msg']}" if err["loc"]
                             else err["msg"].removeprefix("Value error, ") for err in e.errors())
        raise CommandError(f"invalid configuration: {problems}") from None
