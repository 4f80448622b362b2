"""The one settings object of the lossd service: defaults, ``LOSSD_*`` environment variables, flags.

Settings are passed down explicitly; nothing deeper in the code reads the
environment.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from lossd.client.channel import GRPC_OPTIONS, MiB  # one definition of the HTTP/2 tuning, shared with the client

__all__ = ["Settings", "GRPC_OPTIONS"]


class Settings(BaseSettings):
    """Every knob of ``lossd serve`` and the gateway. Environment: ``LOSSD_<NAME>``."""

    model_config = SettingsConfigDict(env_prefix="LOSSD_", extra="forbid")

    host: str = Field("127.0.0.1", description="address to bind gRPC and HTTP on")
    grpc_port: int = Field(50051, ge=0, le=65535, description="gRPC port; 0 picks a free one")
    http_port: int = Field(8000, ge=0, le=65535, description="gateway, /metrics and dashboard port; 0 picks a free one")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    max_message_bytes: int = Field(512 * MiB, gt=0, description="largest gRPC message accepted; larger ones get RESOURCE_EXHAUSTED")
    max_body_bytes: int = Field(64 * MiB, gt=0, description="largest gateway request body; larger ones get HTTP 413")
    exact_state_limit: int = Field(10_000_000, gt=0, description="scores an exact AUROC/AP state may hold across a stream or run")
    compute_threads: int = Field(2, ge=1, description="threads running evaluations (torch releases the GIL)")
    grace_seconds: float = Field(5.0, ge=0, description="graceful-shutdown grace period")
    backends: list[str] = Field(
        default_factory=list, description="gateway only: gRPC addresses to forward to (default: the in-process server)"
    )
    request_timeout_seconds: float = Field(60.0, gt=0, description="gateway deadline on backend calls")
    label_max_values: int = Field(100, ge=1, description="distinct values per monitoring label before folding into __other__")
    label_max_length: int = Field(64, ge=1, description="longest monitoring label value kept")
    label_allowlist: list[str] = Field(
        default_factory=list, description="if set, only these label values are kept (others fold into __other__)"
    )
    calibration_bins: int = Field(15, ge=1, le=100, description="equal-width bins of the exported calibration counters")
    history_seconds: int = Field(3600, gt=0, description="dashboard history kept in memory")
    history_interval_seconds: float = Field(10.0, gt=0, description="dashboard history resolution")
    log_level: str = Field("info", description="debug | info | warning | error")
    reuse_large_buffers: bool = Field(
        True, description="keep freed message buffers for the next request (glibc): fewer page faults, RSS stays at its high-water mark"
    )
    # -- security (README "Security") --
    tls_cert_file: Path | None = Field(None, description="PEM certificate chain: serve gRPC and HTTPS over TLS (with tls_key_file)")
    tls_key_file: Path | None = Field(None, description="PEM private key of tls_cert_file")
    tls_client_ca_file: Path | None = Field(
        None, description="PEM CA bundle: require client certificates signed by it on both ports (mutual TLS)"
    )
    auth_tokens_file: Path | None = Field(
        None, description="bearer tokens, one per line as TOKEN or NAME:TOKEN; every call must carry one (reloaded when it changes)"
    )
    metrics_public: bool = Field(False, description="serve /metrics, /dashboard and /v1/history without a token")
    allow_insecure: bool = Field(False, description="allow binding a non-loopback address without TLS and tokens")
    reflection: bool | None = Field(None, description="gRPC server reflection; default: on when bound to loopback, off otherwise")
    cors_allow_origins: list[str] = Field(default_factory=list, description="origins allowed by CORS on the gateway (default: none)")
