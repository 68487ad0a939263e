"""The one settings object, read from the environment by pydantic-settings.

Names are fixed by the contract: Dify's two variables keep Dify's own names (`DIFY_API_URL`,
`DIFY_API_KEY`); everything of tokenwire's own is `TOKENWIRE_*`. Both processes read the same
class so a value means the same thing in the gateway and the worker.
"""

from __future__ import annotations

import contextlib
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from shared.apps import AppSpec, parse_apps_json
from shared.ratelimit import parse_rate, rate_count
from shared.subjects import SUBJECT_TOKEN

__all__ = ["Settings", "get_settings"]


class Settings(BaseSettings):
    """Every knob of tokenwire. See the README's configuration table."""

    model_config = SettingsConfigDict(
        env_prefix="TOKENWIRE_", extra="ignore", populate_by_name=True, frozen=True
    )

    # --- Dify (worker side only) -------------------------------------------------------
    dify_api_url: str = Field(
        default="http://127.0.0.1:5001/v1",
        validation_alias=AliasChoices("DIFY_API_URL", "dify_api_url"),
    )
    dify_api_key: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices("DIFY_API_KEY", "dify_api_key")
    )
    dify_connect_timeout_s: float = 5.0
    # Dify pings every ~10 s, so a read gap of a minute means the stream is dead.
    dify_read_timeout_s: float = 60.0
    dify_stop_timeout_s: float = 10.0

    # --- NATS --------------------------------------------------------------------------
    nats_url: str = "nats://127.0.0.1:4222"
    # Credentials (docs/operations.md, "NATS locked down"): at most one of user and password,
    # a token, an NKey seed file or a .creds file (JWT + NKey); TLS with your own CA, and a
    # client certificate when the server verifies clients. Secrets are never logged.
    nats_user: str | None = None
    nats_password: SecretStr | None = None
    nats_token: SecretStr | None = None
    nats_nkey_seed_file: Path | None = None
    nats_creds_file: Path | None = None
    nats_tls_ca_file: Path | None = None
    nats_tls_cert_file: Path | None = None
    nats_tls_key_file: Path | None = None
    # The gateway's NATS user has the restricted gateway permissions (docs/security.md, "NATS
    # permissions"): it declares no stream or bucket (the workers do), reads kept frames for
    # `resume` through a worker, and takes replies on its own inbox prefix only.
    nats_restricted: bool = False
    stream_replicas: int = Field(default=1, ge=1, le=5)
    # Retention of each request's frames for `resume` (seconds).
    frame_ttl_s: float = 15 * 60
    # The frames store is this many streams (TW_FRAMES, TW_FRAMES_1, ...), a request's frames
    # in the one its key hashes to: more streams spread the store over more JetStream
    # leaders. Change it only on a quiet cluster (docs/operations.md): a request asked before
    # keeps its frames in its old stream, where a resume under the new count does not look.
    frame_partitions: int = Field(default=1, ge=1, le=64)
    # Byte limits of the job queue and the frames store (docs/operations.md, "When storage
    # fills"): a full TW_JOBS refuses new chats (retryable) before they are accepted; a full
    # TW_FRAMES drops the oldest requests' frames first, never a running answer's newest.
    # frames_max_bytes is the whole store's, split evenly between its partitions.
    jobs_max_bytes: int = Field(default=1024**3, ge=1024)
    frames_max_bytes: int = Field(default=8 * 1024**3, ge=1024)
    # JetStream dedup window for jobs: a chat re-sent with the same id within it is one job.
    job_dedup_window_s: float = 15 * 60
    # How long a gateway keeps trying to store a chat while JetStream elects a leader,
    # before it refuses it (bus_unavailable, retryable).
    job_store_timeout_s: float = Field(default=15.0, gt=0)
    # How long a job may stay un-acked before JetStream redelivers it; workers send
    # in-progress acks well inside it while a long answer streams.
    job_ack_wait_s: float = 30.0
    # Cluster-wide cap on answers streaming at once (the job consumer's max_ack_pending).
    max_inflight_jobs: int = Field(default=1000, ge=1)

    # --- gateway -------------------------------------------------------------------------
    # This gateway process's name in its frame subjects (tw.frames.*.<gateway_id>.>, what its
    # NATS user may be limited to), e.g. the pod name; unset: a fresh one per process start.
    # One subject token: letters, digits, '_' and '-'.
    gateway_id: str | None = None
    # Drain on SIGTERM (docs/operations.md): /readyz turns 503 at once, the gateway waits this
    # long for load balancers to stop sending new connections, then closes every client with
    # 4100 DRAINING (reconnect and resume elsewhere) and exits. Keep the pod's
    # terminationGracePeriodSeconds above it (deploy/k8s: 30 s).
    drain_delay_s: float = Field(default=5.0, ge=0)
    auth: Literal["jwt", "none"] = "jwt"
    allow_insecure: bool = False
    jwt_secret: SecretStr | None = None
    jwt_public_key: str | None = None
    jwt_audience: str | None = None
    jwt_issuer: str | None = None
    # Where the web page and the browser SDK are served from (default: the repo's web/).
    web_dir: Path | None = None
    max_frame_bytes: int = Field(default=64 * 1024, ge=1024)
    max_query_chars: int = Field(default=32_000, ge=1)
    max_inputs_bytes: int = Field(default=32 * 1024, ge=2)
    max_inputs_depth: int = Field(default=8, ge=1)
    max_files: int = Field(default=10, ge=0)
    max_inflight_per_connection: int = Field(default=32, ge=1)
    send_queue_frames: int = Field(default=4096, ge=16)
    # Frames a request may hold out of order before the gateway gives up waiting for a gap.
    reorder_window: int = Field(default=1024, ge=1)

    # --- the edge (docs/security.md) ----------------------------------------------------------
    # JWT keys from a JWKS endpoint (cached; re-read on an unknown `kid`, at most every
    # jwks_min_refresh_s), tolerated clock skew, and how long a client may take to send its
    # token in a first `auth` frame when the handshake carried none.
    jwt_jwks_url: str | None = None
    jwks_cache_s: float = Field(default=600.0, gt=0)
    jwks_min_refresh_s: float = Field(default=10.0, ge=0)
    jwt_leeway_s: float = Field(default=0.0, ge=0)
    auth_timeout_s: float = Field(default=5.0, gt=0)
    # `?access_token=` leaks into proxy logs: off unless explicitly enabled.
    allow_query_token: bool = False
    # Browser origins allowed to open /v1/ws ("*" for any). Empty: same origin only (the
    # Origin's host:port equals the Host header). A request without Origin (not a browser)
    # is always allowed.
    allowed_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # Connection caps: per user across all gateways (slots in a NATS KV bucket that count
    # while their gateway's liveness entry does: it expires connection_ttl_s after the
    # gateway last refreshed it), and per gateway process.
    max_connections_per_user: int = Field(default=10, ge=1)
    max_connections: int = Field(default=10_000, ge=1)
    connection_ttl_s: float = Field(default=30.0, ge=1)
    # Admission control, per gateway: handshakes in progress (upgrade to the connection slot
    # claimed: token check and KV round-trips) and resumes in progress (look-up to replay
    # started). Over either cap the gateway refuses with too_busy and this retry hint rather
    # than queueing unbounded work (a reconnect storm after another gateway died).
    max_handshakes: int = Field(default=64, ge=1)
    max_resumes: int = Field(default=64, ge=1)
    busy_retry_s: float = Field(default=1.0, gt=0)
    # Chats per user across all gateways (token bucket in NATS KV): "20/min", "5/s", "100/h";
    # at most rate_burst at once, by default the rate's count ("5/min": 5 at once, then one
    # every 12 s).
    rate_per_user: str = "60/min"
    rate_burst: int = Field(default=60, ge=1)  # unset: see _burst_defaults_to_the_rate
    # Any client frame, per connection (local token bucket): bounds resume/stop/ping floods.
    frame_rate: str = "50/s"
    frame_burst: int = Field(default=200, ge=1)
    # Requests in flight for one user on one gateway (per connection: max_inflight_per_connection).
    max_inflight_per_user: int = Field(default=64, ge=1)
    # `call` frames per user across all gateways (the same token-bucket family as chats, its own
    # rate; at most call_rate_burst at once), and how long a gateway waits for a worker's
    # answer to one before it fails retryable (no worker at all fails at once).
    call_rate_per_user: str = "300/min"
    call_rate_burst: int = Field(default=60, ge=1)
    call_timeout_s: float = Field(default=15.0, gt=0)
    # POST /v1/files and /v1/audio-to-text: the largest upload, whatever the app allows (each
    # app's own limits from Dify's /parameters apply too); how long a staged upload may wait
    # in NATS for a worker; how long tokenwire remembers who owns a file, run, task or form
    # (Dify keeps them until deleted: keep it at least as long as users reuse their ids).
    max_upload_bytes: int = Field(default=50 * 1024 * 1024, ge=1)
    upload_stage_ttl_s: float = Field(default=600.0, gt=0)
    # The byte limit of TW_UPLOADS (uploads being staged at once, cluster-wide): full, a new
    # upload is refused (503, retryable) instead of filling the disk.
    uploads_max_bytes: int = Field(default=1024**3, ge=1024)
    ownership_ttl_s: float = Field(default=30 * 24 * 3600.0, gt=0)
    # Liveness: close a connection with no client frame and no request for this long (4103);
    # WebSocket pings every ping_interval_s (keep it under proxies' idle timeouts, 60 s in
    # nginx), closing with 1011 when no pong comes within pong_timeout_s.
    idle_timeout_s: float = Field(default=300.0, gt=0)
    # permessage-deflate: tokens are small JSON that compress poorly, and each connection's
    # zlib state costs ~40 KiB (docs/benchmarks.md). Off unless asked for.
    ws_deflate: bool = False
    ping_interval_s: float = Field(default=20.0, gt=0, le=25)
    pong_timeout_s: float = Field(default=20.0, gt=0)
    # SO_SNDBUF of client sockets (0: the kernel's autotuning, up to 4 MiB on Linux): what the
    # kernel may hold for a client that stops reading, before the send queue fills (4101).
    send_buffer_bytes: int = Field(default=0, ge=0)
    # Gateway processes of one `tokenwire gateway` (docs/operations.md, "Every core of a pod"):
    # 1 is one process and no supervisor; N > 1 shares one listening socket among N children.
    gateway_workers: int = Field(default=1, ge=1, le=256)

    # --- worker --------------------------------------------------------------------------
    worker_concurrency: int = Field(default=64, ge=1)
    # Jobs a worker holds beyond the ones it streams: they wait in line, told their position.
    worker_prefetch: int = Field(default=16, ge=0)
    # Adaptive coalescing of delta text (shared/coalesce.py): at most one delta per request
    # every this many ms once tokens come faster; the first token always goes at once. 0: off.
    coalesce_ms: float = Field(default=16.0, ge=0, le=1000)
    # Drain on SIGTERM (docs/operations.md): a worker stops pulling jobs, finishes its running
    # answers for up to this long, then hands the rest back (their clients get `reset`).
    # Keep the pod's terminationGracePeriodSeconds above it (deploy/k8s: 75 s).
    worker_drain_s: float = Field(default=60.0, ge=0)
    worker_metrics_port: int = 9100
    # Worker processes of one `tokenwire worker`: N > 1 runs N children, each its own worker,
    # behind one /metrics, /healthz and /readyz port served by their supervisor.
    worker_processes: int = Field(default=1, ge=1, le=256)
    # Dify apps by name, chosen by a frame's `app` field (shared/apps.py): {"sales": "app-..."}
    # or {"sales": {"url": ".../v1", "key": "app-...", "max_active": 4}}; or the same JSON in
    # the file TOKENWIRE_DIFY_APPS_FILE (a mounted Secret; the environment's entries win).
    dify_apps: dict[str, AppSpec | SecretStr] = Field(default_factory=dict)
    dify_apps_file: Path | None = None
    # An app's cluster-wide stream slots (max_active) expire this long after their holder
    # last refreshed them: a killed worker's slots free themselves.
    app_slot_ttl_s: float = Field(default=15.0, ge=1)
    # How often a request waiting for one of its app's slots tries again.
    app_slot_poll_s: float = Field(default=0.25, gt=0)
    # Retrying while Dify is down (refused, timeouts before the first byte, 429, 5xx).
    job_max_attempts: int = Field(default=30, ge=1)
    job_max_age_s: float = Field(default=3600.0, gt=0)
    retry_base_s: float = Field(default=1.0, gt=0)
    retry_max_s: float = Field(default=30.0, gt=0)
    breaker_threshold: int = Field(default=3, ge=1)
    breaker_cooldown_s: float = Field(default=2.0, gt=0)
    # Recovering an answer from Dify's history instead of asking twice.
    recovery_timeout_s: float = Field(default=180.0, gt=0)
    recovery_poll_s: float = Field(default=1.0, gt=0)
    # How often a running answer checks that no newer delivery took its job over; a
    # redelivered job waits 1.5x this before publishing, so the two never overlap.
    lease_check_s: float = Field(default=2.0, gt=0)
    dead_letter_ttl_s: float = Field(default=7 * 24 * 3600.0, gt=0)

    # --- tracing -------------------------------------------------------------------------
    # OTLP/HTTP traces endpoint (e.g. http://collector:4318/v1/traces); unset: tracing off.
    otel_endpoint: str | None = None

    # --- logging -------------------------------------------------------------------------
    log_level: str = "INFO"
    log_json: bool = True

    @field_validator("allowed_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: object) -> object:
        """``TOKENWIRE_ALLOWED_ORIGINS`` is comma-separated; compared lower-case, no slash."""
        if isinstance(value, str):
            value = value.split(",")
        if isinstance(value, list):
            return [str(v).strip().rstrip("/").lower() for v in value if str(v).strip()]
        return value

    @model_validator(mode="before")
    @classmethod
    def _burst_defaults_to_the_rate(cls, data: Any) -> Any:
        """Unset (or null), ``rate_burst`` is the count of ``rate_per_user``: a user who writes
        ``5/min`` means at most 5 at once."""
        if isinstance(data, dict) and data.get("rate_burst") is None:
            rate = data.get("rate_per_user", cls.model_fields["rate_per_user"].default)
            with contextlib.suppress(ValueError, TypeError, AttributeError):
                data = {**data, "rate_burst": max(1, int(rate_count(rate)))}
        return data

    @model_validator(mode="before")
    @classmethod
    def _apps_from_file(cls, data: Any) -> Any:
        """``TOKENWIRE_DIFY_APPS_FILE``: the apps table in a file; the environment's own
        ``TOKENWIRE_DIFY_APPS`` entries are laid over it."""
        if not isinstance(data, dict) or not data.get("dify_apps_file"):
            return data
        table = parse_apps_json(Path(str(data["dify_apps_file"])).read_bytes())
        inline = data.get("dify_apps")
        if isinstance(inline, str):
            inline = parse_apps_json(inline)
        return {**data, "dify_apps": {**table, **(inline or {})}}

    @field_validator("gateway_id")
    @classmethod
    def _one_subject_token(cls, value: str | None) -> str | None:
        if value is not None and not SUBJECT_TOKEN.fullmatch(value):
            raise ValueError(
                "TOKENWIRE_GATEWAY_ID must be 1 to 128 of A-Z, a-z, 0-9, '_' and '-' (one NATS "
                "subject token)"
            )
        return value

    @model_validator(mode="after")
    def _frames_split_fits(self) -> Settings:
        if self.frames_max_bytes // self.frame_partitions < 1024:
            raise ValueError(
                "TOKENWIRE_FRAMES_MAX_BYTES is split between TOKENWIRE_FRAME_PARTITIONS streams: "
                "give each at least 1024 bytes"
            )
        return self

    @field_validator("rate_per_user", "frame_rate", "call_rate_per_user")
    @classmethod
    def _check_rate(cls, value: str) -> str:
        parse_rate(value)
        return value

    @model_validator(mode="after")
    def _one_nats_credential(self) -> Settings:
        if (self.nats_user is None) != (self.nats_password is None):
            raise ValueError("TOKENWIRE_NATS_USER and TOKENWIRE_NATS_PASSWORD go together")
        given = [
            name
            for name, value in (
                ("TOKENWIRE_NATS_USER", self.nats_user),
                ("TOKENWIRE_NATS_TOKEN", self.nats_token),
                ("TOKENWIRE_NATS_NKEY_SEED_FILE", self.nats_nkey_seed_file),
                ("TOKENWIRE_NATS_CREDS_FILE", self.nats_creds_file),
            )
            if value is not None
        ]
        if len(given) > 1:
            raise ValueError(f"give one NATS credential, not {' and '.join(given)}")
        if (self.nats_tls_cert_file is None) != (self.nats_tls_key_file is None):
            raise ValueError("TOKENWIRE_NATS_TLS_CERT_FILE and _KEY_FILE go together")
        return self

    @field_validator("dify_api_url")
    @classmethod
    def _strip_slash(cls, value: str) -> str:
        return value.rstrip("/")


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once."""
    return Settings()
