"""Settings from flags or ``FLOPS_*`` environment variables, built once in ``main()`` and passed down."""

from __future__ import annotations

from pathlib import Path
from typing import Literal
from urllib.parse import unquote, urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from flops.errors import ConfigError
from flops.lifecycle_stages import Stage

DEFAULT_PORT = 1883


class StageDeadlines(BaseModel):
    """How long a project may stay in each stage before it fails with "timed out in <stage>"."""

    model_config = ConfigDict(extra="forbid")

    preparation: float = Field(600.0, gt=0)
    start: float = Field(60.0, gt=0)
    builder: float = Field(1800.0, gt=0)
    learners: float = Field(600.0, gt=0)
    aggregation: float = Field(3600.0, gt=0)
    post_training: float = Field(900.0, gt=0)

    def for_stage(self, stage: Stage, overrides: dict[Stage, float] | None = None) -> float | None:
        if stage is Stage.FINISHED:
            return None
        if overrides and stage in overrides:
            return overrides[stage]
        return float(getattr(self, stage.value))


class BrokerAddress(BaseModel):
    """A parsed broker URL: ``mqtt://host:port`` or ``mqtts://host:port`` (TLS)."""

    model_config = ConfigDict(frozen=True)

    host: str
    port: int
    tls: bool = False
    username: str | None = None
    password: str | None = None

    @classmethod
    def parse(cls, url: str) -> BrokerAddress:
        parts = urlsplit(url)
        if parts.scheme not in {"mqtt", "mqtts", "tcp", "ssl"}:
            raise ConfigError(f"broker URL {url!r}: scheme must be mqtt:// or mqtts://")
        if not parts.hostname:
            raise ConfigError(f"broker URL {url!r}: no host")
        tls = parts.scheme in {"mqtts", "ssl"}
        try:
            port = parts.port or (8883 if tls else DEFAULT_PORT)
        except ValueError as exc:
            raise ConfigError(f"broker URL {url!r}: {exc}") from exc
        return cls(
            host=parts.hostname,
            port=port,
            tls=tls,
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
        )

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


class Settings(BaseSettings):
    """Everything configurable. ``FLOPS_BROKER_URL``, ``FLOPS_DATA_DIR``, ``FLOPS_DEADLINES__BUILDER`` …"""

    model_config = SettingsConfigDict(env_prefix="FLOPS_", env_nested_delimiter="__", extra="ignore")

    broker_url: str | None = Field(
        None, description="mqtt://host:port or mqtts://host:port; unset = embedded broker on 127.0.0.1:1883"
    )
    broker_username: str | None = None
    broker_password: SecretStr | None = None
    broker_ca_file: Path | None = None
    broker_client_cert: Path | None = None
    broker_client_key: Path | None = None
    # The node's own certificate for its servers (Flight data server, Flower SuperLink, model server) and the
    # CA its peers are checked against: TLS when configured, plaintext (development, loopback) when not.
    tls_ca_file: Path | None = None
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    # Provisioned agents and their roles ({"agents": {"node-1": {"roles": [...]}}}); unset = any agent accepted.
    agents_file: Path | None = None
    data_dir: Path = Field(default_factory=lambda: Path.home() / ".flops")
    data_max_upload_mb: int = Field(512, gt=0, description="Largest upload a node's data server accepts")
    deadlines: StageDeadlines = StageDeadlines()
    max_payload_bytes: int = Field(256 * 1024, gt=0)
    session_expiry_s: int = Field(7 * 24 * 3600, ge=0)
    sqlite_synchronous: Literal["FULL", "NORMAL"] = "FULL"
    deadline_check_interval_s: float = Field(0.5, gt=0)
    # A last will is a hint: an agent is gone for its projects only if it has not announced itself again
    # within this many seconds (a broker restart delivers every will at once; agents reconnect within ~10 s).
    agent_grace_s: float = Field(30.0, ge=0)
    # Commands stay in the outbox until their agent confirms it recorded them; re-sent this often meanwhile,
    # and given up (with a warning) after command_ttl_s.
    command_resend_s: float = Field(5.0, gt=0)
    command_ttl_s: float = Field(24 * 3600.0, gt=0)
    # A batch whose commit fails (database locked, disk full) is retried with backoff up to this long between
    # tries; its messages stay unacknowledged until it commits.
    commit_retry_max_s: float = Field(5.0, gt=0)
    retention_days: float = Field(30.0, gt=0, description="Finished projects and unused artifacts are forgotten")
    max_agents: int = Field(10_000, gt=0, description="Agents the manager keeps track of at most")
    aggregator_ports: tuple[int, int] = (19100, 19999)
    # The FLOps image registry (`flops registry`): builders push images there, agents pull from it.
    registry: str = Field("127.0.0.1:5000", description="host:port of the FLOps image registry")
    base_image: str | None = Field(
        None, description="Base image of the runtime images; unset = a Debian made with debootstrap"
    )
    registry_tls: bool = Field(False, description="The FLOps registry speaks HTTPS (checked with tls_ca_file)")
    # What builds produce: environments (development: every learner node rebuilds) or container images pushed
    # to the registry and run with podman by the agents (a manager setting: it is part of the build cache key).
    artifacts: Literal["env", "image"] = Field("env", description="Build environments or container images")
    # An agent's podman image storage; unset = podman's default (shared by the agents of one host).
    container_storage: Path | None = None
    # buildah's and podman's storage driver: overlay shares layers between images and containers (a container
    # starts in ~1 s); vfs copies every layer in full (~20 s per start, GBs per image) but runs anywhere.
    container_storage_driver: Literal["overlay", "vfs"] = Field(
        "overlay", description="Storage driver of buildah and podman (vfs where overlay is unavailable)"
    )
    # MLflow tracking (optional extra): aggregators log each project's rounds and best model there.
    tracking_uri: str | None = Field(None, description="MLflow tracking server URL; unset = tracking off")
    # flops ui: a login (MQTT username + password) is required when "required", or with "auto" when the broker
    # speaks TLS (production); each person then sees what their broker identity may read.
    ui_login: Literal["auto", "required", "off"] = "auto"
    ui_session_idle_s: float = Field(3600.0, gt=0, description="A web view session ends after this long idle")
    # flops api (the HTTP surface of `oak addon flops`): bearer tokens -> customers and their broker identities,
    # the agent directories whose data admin tokens mock data is pushed with, how long to wait for the manager.
    api_tokens_file: Path | None = Field(None, description="JSON file of customers, their tokens and env files")
    api_agent_dirs: list[Path] | None = Field(None, description="Agent directories; unset = DATA_DIR and subdirs")
    api_reply_timeout_s: float = Field(15.0, gt=0, description="How long flops api waits for the manager's reply")
    # Where the manager's actors run: on FLOps agents over MQTT, or as Oakestra services (the manager then runs
    # an Oakestra adapter that stands in for one agent per active Oakestra cluster; flops.oakestra.adapter).
    deployer: Literal["agents", "oakestra"] = Field("agents", description="agents (MQTT) or oakestra")
    oakestra_url: str | None = Field(
        None, validate_default=True, description="Oakestra System Manager, e.g. http://root:10000"
    )
    oakestra_username: str = "Admin"
    oakestra_password: SecretStr = SecretStr("Admin")
    # The broker as the actors on Oakestra reach it (unset: the manager's broker URL), and the broker identity
    # they report with (never the manager's own: it would travel in every service's environment).
    oakestra_broker_url: str | None = None
    oakestra_actor_username: str | None = None
    oakestra_actor_password: SecretStr | None = None
    # A dynamic-security admin on that broker: each project's actors then get their own identity, allowed only their
    # seats' reports and deleted with the project (flops.oakestra.identities); the shared identity is not used.
    oakestra_dynsec_username: str | None = None
    oakestra_dynsec_password: SecretStr | None = None
    oakestra_builder_image: str | None = Field(None, description="Image the builder service runs (flops installed)")
    # Oakestra knows no data: the tags (and row counts) every learner seat announces.
    oakestra_data_tags: dict[str, int] = {}
    oakestra_data_server: str = Field(
        "grpc://127.0.0.1:11027", description="The node data server learners on Oakestra read (ml-data-server)"
    )
    # Per learner seat (oak-<cluster>[-<n>]): its node's data server, where nodes do not all serve at the same
    # address (the demo's fake nodes share one host); and the read token learners present to it.
    oakestra_data_servers: dict[str, str] = {}
    oakestra_data_token: SecretStr | None = None
    oakestra_poll_s: float = Field(3.0, gt=0, description="How often Oakestra's services are looked at")
    oakestra_serve_port: int = Field(8080, ge=1, le=65535, description="The model server's port on its service IP")
    log_format: Literal["auto", "console", "json"] = "auto"
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator("oakestra_url")
    @classmethod
    def _oakestra_needs_its_url(cls, url: str | None, info: ValidationInfo) -> str | None:
        if info.data.get("deployer") == "oakestra" and not url:
            raise ValueError("required when deployer is oakestra (FLOPS_OAKESTRA_URL or --oakestra-url)")
        if url and not url.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
        return url

    def broker(self) -> BrokerAddress:
        addr = BrokerAddress.parse(self.broker_url or f"mqtt://127.0.0.1:{DEFAULT_PORT}")
        username = self.broker_username or addr.username
        password = self.broker_password.get_secret_value() if self.broker_password else addr.password
        return addr.model_copy(update={"username": username, "password": password})

    def broker_tls_files(self) -> dict[str, str | None]:
        """The broker CA and client certificate as :class:`flops.bus.BusOptions` keywords."""
        return {
            "ca_file": _str(self.broker_ca_file),
            "client_cert": _str(self.broker_client_cert),
            "client_key": _str(self.broker_client_key),
        }

    def ui_login_required(self) -> bool:
        return self.ui_login == "required" or (self.ui_login == "auto" and self.broker().tls)

    @property
    def store_path(self) -> Path:
        return self.data_dir / "manager.sqlite3"


def _str(path: Path | None) -> str | None:
    return str(path) if path else None
