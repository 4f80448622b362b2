"""The one settings object of the lossd service: defaults, ``LOSSD_*`` environment variables, flags.

Settings are passed down explicitly; nothing deeper in the code reads the
environment.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from lossd.client.channel import GRPC_OPTIONS, MiB  # one definition of the HTTP/2 tuning, shared with the client

__all__ = ["Settings", "GRPC_OPTIONS", "physical_memory_bytes"]


def physical_memory_bytes() -> int:
    """The memory this process may use: physical RAM, or the cgroup (container) limit when lower."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()  # cgroup v2; "max" means none
    except OSError:
        return total
    return min(total, int(limit)) if limit.isdigit() else total


def _default_request_memory() -> int:
    return physical_memory_bytes() // 4


def _default_concurrent_memory() -> int:
    return physical_memory_bytes() // 2


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
    workers: int = Field(
        1,
        ge=1,
        le=256,
        description="gRPC worker processes sharing the port (SO_REUSEPORT); above 1, lossd serve supervises them and serves the"
        " gateway, with metrics summed over them. One process computes on about one core at a time",
    )
    worker_timeout_seconds: float = Field(
        15.0, gt=0, description="with workers > 1: a worker that answers no health check for this long is killed and restarted"
    )
    pin_event_loop: bool = Field(
        False,
        description="run the event loop and gRPC's threads on one core (worker i on the i-th core of the CPU set), compute"
        " threads on all; for cores of the server's own (Kubernetes' static CPU manager): fewer core migrations per small request",
    )
    compute_threads: int = Field(
        2, ge=1, description="threads running evaluations, per lane (small and large requests; torch releases the GIL)"
    )
    grace_seconds: float = Field(5.0, ge=0, description="after the drain, how long calls still running get before the process stops")
    drain_seconds: float = Field(
        5.0, ge=0, description="on SIGTERM: report NOT_SERVING and /readyz 503, and keep serving this long before stopping"
    )
    # -- admission control and budgets (README "Admission control") --
    max_concurrent_requests: int = Field(
        64, ge=1, description="RPCs in progress at once (a stream counts once); more get RESOURCE_EXHAUSTED"
    )
    max_queued_requests: int = Field(32, ge=0, description="requests waiting for a compute thread, per lane; more get RESOURCE_EXHAUSTED")
    max_queued_bytes: int = Field(1 << 30, gt=0, description="request bytes waiting for a compute thread, per lane")
    large_request_bytes: int = Field(1 << 20, gt=0, description="requests this large or larger run on their own compute threads")
    inline_request_bytes: int = Field(
        64 << 10,
        ge=0,
        description="Evaluate requests smaller than this, whose functions' memory estimate is at most 64 times it, run on the"
        " event loop instead of a compute thread (the hop costs more than their work); 0: never",
    )
    torch_threads: int | None = Field(
        None,
        ge=1,
        description="torch intra-op threads of lossd serve (of each worker); default: available cores // (compute_threads × workers),"
        " at least 1",
    )
    retry_after_seconds: float = Field(1.0, gt=0, description="retry-after hint of an overloaded answer (jittered ±50%)")
    max_request_memory_bytes: int = Field(
        default_factory=_default_request_memory,
        gt=0,
        description="estimated intermediates and state one request may allocate (default: 25% of RAM); more get RESOURCE_EXHAUSTED",
    )
    max_concurrent_memory_bytes: int = Field(
        default_factory=_default_concurrent_memory,
        gt=0,
        description="estimated memory of all the requests computing at once (default: 50% of RAM; per worker process); work"
        " that would pass it gets RESOURCE_EXHAUSTED with a retry-after, unless nothing else is running",
    )
    stream_idle_seconds: float = Field(
        300.0,
        gt=0,
        description="longest wait for an EvaluateStream's next message (or its end); a stream idle longer is ended with"
        " DEADLINE_EXCEEDED and its admission slot freed",
    )
    backends: list[str] = Field(
        default_factory=list, description="gateway only: gRPC addresses to forward to (default: the in-process server)"
    )
    request_timeout_seconds: float = Field(60.0, gt=0, description="gateway deadline on backend calls")
    max_series_per_family: int = Field(
        10_000, ge=1, description="series with client-chosen labels per metric family before new label sets fold into __other__"
    )
    max_series_total: int = Field(50_000, ge=1, description="series with client-chosen labels over all families before folding")
    label_max_length: int = Field(64, ge=1, description="longest monitoring label value kept")
    label_allowlist: list[str] = Field(
        default_factory=list, description="if set, only these label values are kept (others fold into __other__)"
    )
    calibration_bins: int = Field(15, ge=1, le=100, description="equal-width bins of the exported calibration counters")
    history_seconds: int = Field(3600, gt=0, description="dashboard history kept in memory")
    history_interval_seconds: float = Field(10.0, gt=0, description="dashboard history resolution")
    data_dir: Path | None = Field(
        None, description="directory of the dashboard's history (SQLite, survives restarts); default: in memory only"
    )
    prometheus_url: str | None = Field(
        None, description="Prometheus scraping every replica: the dashboard draws the whole fleet from it instead of this process"
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="debug | info | warning | error")
    log_format: Literal["text", "json"] = Field("text", description="text | json: one JSON object per line, plus one line per request")
    tracing: Literal["off", "console", "otlp"] | None = Field(
        None, description="OpenTelemetry traces: off | console | otlp; default otlp when OTEL_EXPORTER_OTLP_ENDPOINT is set, else off"
    )
    reuse_large_buffers: bool = Field(
        True, description="keep freed message buffers for the next request (glibc): fewer page faults, RSS stays at its high-water mark"
    )
    malloc_arenas: int = Field(
        2,
        ge=0,
        le=1024,
        description="glibc malloc arenas at most (0: glibc's 8 per core); fewer arenas keep idle RSS low and steady (MALLOC_ARENA_MAX wins when set)",
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
    allow_shared_memory: bool = Field(
        False, description="accept Evaluate tensors in a co-located client's POSIX shared-memory segment (same host and user)"
    )
    allow_insecure: bool = Field(False, description="allow binding a non-loopback address without TLS and tokens")
    reflection: bool | None = Field(None, description="gRPC server reflection; default: on when bound to loopback, off otherwise")
    cors_allow_origins: list[str] = Field(default_factory=list, description="origins allowed by CORS on the gateway (default: none)")
    # -- the gateway's calls to `backends` (README "Security") --
    backend_tls: bool = Field(False, description="gateway only: TLS to the backends with the system's root certificates")
    backend_tls_ca_file: Path | None = Field(None, description="gateway only: PEM roots that sign the backends' certificates (implies TLS)")
    backend_tls_cert_file: Path | None = Field(
        None, description="gateway only: PEM client certificate for backends that require mutual TLS"
    )
    backend_tls_key_file: Path | None = Field(None, description="gateway only: PEM key of backend_tls_cert_file")
    backend_token_file: Path | None = Field(
        None, description="gateway only: send this file's token to the backends instead of forwarding each caller's Authorization"
    )

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower_log_level(cls, value: object) -> object:
        return value.strip().lower() if isinstance(value, str) else value
