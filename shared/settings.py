"""Settings of every billy-tools process, in one place.

Precedence, highest first: keyword arguments, environment variables (BILLY_*, plus
NATS_URL and DOCKER_HOST as their tools name them), then the defaults below.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parent.parent


class Settings(BaseSettings):
    """Configuration shared by admission, executor, artifacts, the client and the CLI."""

    model_config = SettingsConfigDict(env_prefix="BILLY_", extra="ignore")

    nats_url: str = Field(
        "nats://127.0.0.1:4222",
        validation_alias=AliasChoices("NATS_URL", "BILLY_NATS_URL"),
        description="NATS server(s), comma separated.",
    )
    nats_user: str | None = None
    nats_password: SecretStr | None = None

    docker_host: str | None = Field(
        None,
        validation_alias=AliasChoices("DOCKER_HOST", "BILLY_DOCKER_HOST"),
        description="Docker Engine endpoint; unset means the local socket.",
    )
    work_signing_key: SecretStr | None = Field(
        None,
        min_length=32,
        description="Shared by admission and executors: admission signs work items with it "
        "and executors refuse unsigned ones. Unset, executors trust the work stream.",
    )
    registry: str | None = Field(
        None,
        description="Registry (host:port) that tool images are pushed to and pulled from.",
    )
    keeper_image: str = Field(
        "billy/busybox:local",
        description="Local image with a static `sleep` and `stat` that holds each run's "
        "workspace tmpfs mounted while the tool runs (never pulled).",
    )

    tools_dir: Path = Field(REPO_ROOT / "tool-images", description="Where ToolSpecs live.")
    policy_file: Path | None = Field(
        None,
        description="Operator policy (caps and approved relaxations); unset means "
        "<tools_dir>/policy.yaml when it exists, else the built-in strict baseline.",
    )
    state_dir: Path = Field(REPO_ROOT / ".billy", description="State of the embedded stack.")

    executor_name: str = Field(
        default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}",
        description="Labels the containers this executor creates; at start-up it removes "
        "those an earlier process of the same name left. Must be unique among live "
        "executors on one Docker host; the default (host and pid) is, but is not stable "
        "across restarts: give replicas stable names (the embedded stack does).",
    )
    executor_concurrency: int = Field(2, ge=1, le=256, description="Containers at once.")
    executor_max_deliveries: int = Field(
        5,
        ge=1,
        description="Deliveries of one work item before the run ends in infra_error.",
    )
    executor_ack_wait_s: float = Field(30.0, gt=0, description="JetStream ack wait.")
    executor_drain_s: float = Field(
        5.0,
        ge=0,
        description="On stop, how long runs in progress may finish before they are cancelled "
        "(containers removed, work items left unacked for redelivery); fits in the 10 s "
        "that `billy-tools down` waits before SIGKILL.",
    )
    executor_progress_interval_s: float = Field(
        10.0, gt=0, description="How often a running run tells JetStream it is in progress."
    )
    docker_retry_interval_s: float = Field(
        2.0,
        gt=0,
        description="Pause between checks while the Docker daemon is unavailable.",
    )

    events_max_age_s: float = Field(7 * 86400, gt=0, description="How long events are kept.")
    runs_max_age_s: float = Field(
        30 * 86400, gt=0, description="How long run records and artifacts are kept."
    )
    duplicate_window_s: float = Field(
        24 * 3600, gt=0, description="How long a request_id is remembered."
    )

    metrics_addr: str = Field(
        "127.0.0.1", description="Address the Prometheus endpoints listen on."
    )
    admission_metrics_port: int = Field(0, description="Prometheus port; 0 disables.")
    executor_metrics_port: int = Field(0, description="Prometheus port; 0 disables.")
    artifacts_metrics_port: int = Field(0, description="Prometheus port; 0 disables.")

    log_level: str = "INFO"

    def operator_policy_path(self) -> Path | None:
        """The operator policy file in force, or None for the built-in baseline."""
        if self.policy_file is not None:
            return self.policy_file
        default = self.tools_dir / "policy.yaml"
        return default if default.exists() else None

    def nats_servers(self) -> list[str]:
        return [url.strip() for url in self.nats_url.split(",") if url.strip()]
