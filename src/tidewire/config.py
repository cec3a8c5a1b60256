"""Settings: the knobs a deployment may turn, with defaults that suit one process."""

from __future__ import annotations

import dataclasses
import os
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pydantic

__all__ = ["Settings"]


@dataclass(frozen=True, slots=True)
class Settings:
    #: Seconds of silence after which every transport sends a heartbeat.
    heartbeat: float = 15.0
    #: How many events a run may get ahead of its slowest connected watcher
    #: before its generator waits (backpressure).
    run_window: int = 256
    #: How many events a run keeps for watchers that come late or resume.
    run_history: int = 10_000
    #: Runs that may be running at once; starting more is refused (503) until
    #: some end. Each sync generator holds a thread, so this bounds threads too.
    max_runs: int = 1_000
    #: Seconds a finished run stays watchable before it is forgotten.
    run_ttl: float = 600.0
    #: Cancel a run started by a watching request once no watcher is left.
    cancel_on_disconnect: bool = True
    #: Seconds a run waits for its last watcher to come back (a dropped
    #: connection that resumes) before it is cancelled. It holds its
    #: position meanwhile, so the returning watcher misses nothing.
    disconnect_grace: float = 10.0
    #: Seconds a cancelled generator gets to run its `finally` before the
    #: run reports `cancelled` without waiting for it.
    close_timeout: float = 5.0
    #: Seconds a process's hold on the runs it executes lasts without
    #: renewal. If the process dies, watchers in other processes get an
    #: `error` event about this long after (shared brokers only).
    lease: float = 10.0
    #: Retained history of each channel: at most this many events …
    channel_max_len: int = 1_000
    #: … none older than this many seconds (None: no age limit).
    channel_max_age: float | None = 3600.0
    #: `retry:` sent to SSE clients, in milliseconds: how long EventSource
    #: waits before it reconnects.
    sse_retry_ms: int = 2_000
    #: Blobs (bytes) in event data larger than this are stored as files and
    #: sent as `{"$blob": {"type", "size", "url"}}`; smaller ones inline, as
    #: base64 (None: always inline).
    inline_blob_limit: int | None = 256 << 10
    #: Largest file an upload may store, in bytes (None: no limit). Larger
    #: uploads get 413, before the body is stored when its size is declared.
    max_file_size: int | None = 16 << 30
    #: Seconds an unfinished resumable upload is kept after its last change.
    upload_expiry: float = 24 * 3600.0
    #: Behind nginx: send downloads of local files as `X-Accel-Redirect:
    #: <prefix><id>` and let nginx send the bytes (None: send them ourselves).
    accel_redirect: str | None = None

    # -- access control (docs/security.md); any of the three keys turns it on --
    #: HMAC secret for HS256/384/512 tokens (at least 32 bytes).
    auth_secret: str | None = None
    #: A PEM public key (its text, or the path of a file holding it): RS*, PS*, ES*, EdDSA.
    auth_public_key: str | None = None
    #: URL of a JWKS: keys fetched, cached and rotated by `kid`.
    auth_jwks: str | None = None
    #: When set, tokens must carry this `aud` / `iss`.
    auth_audience: str | None = None
    auth_issuer: str | None = None
    #: Origins besides the server's own that may open WebSockets, change
    #: state and start streams from a browser, and get CORS headers.
    allow_origins: tuple[str, ...] = ()
    #: Key of signed file links; by default derived from `auth_secret`. With
    #: public keys, set it (the same in every process) for links to work.
    link_secret: str | None = None

    # -- limits (docs/http.md "Limits"): what one client may take ---------------
    #: A published event (any body type, multipart included) or WebSocket
    #: frame larger than this: 413 / close 1009. A yielded event that large
    #: becomes a `$blob` file.
    max_event_bytes: int = 1 << 20
    #: Any other non-file request body (stream parameters, tus metadata): 413.
    max_body_bytes: int = 1 << 20
    #: The history of all runs and channels of one process together, in bytes
    #: as encoded on the wire: the oldest events of the biggest logs are
    #: trimmed (their readers get `gap`), never what a connected run watcher
    #: has not read.
    max_retained_bytes: int = 256 << 20
    #: Per channel and per run, beside the counts above.
    channel_max_bytes: int = 16 << 20
    run_history_bytes: int = 16 << 20
    #: Channels that may exist at once (a channel counts once published to):
    #: publishing to one more is 429 with Retry-After. Channels idle this
    #: many seconds are dropped.
    max_channels: int = 10_000
    channel_idle_ttl: float = 3600.0
    #: A channel subscriber further behind than this gets `gap` and skips
    #: ahead; also the most one write carries.
    subscriber_buffer_bytes: int = 4 << 20
    #: A run watcher that reads nothing this many seconds while the run waits
    #: on it is disconnected (it may resume).
    stall_timeout: float = 60.0
    #: Per client (the token's `sub`, else the address): runs at once
    #: (detached ones count; a slot frees when the run ends) and open
    #: connections; 429 with Retry-After past them.
    max_runs_per_client: int = 20
    max_connections_per_client: int = 200
    #: Publishes per second per client, and the burst allowed above it: 429.
    publish_rate: float = 100.0
    publish_burst: int = 200
    #: Unfinished resumable uploads per client (429), and bytes stored per
    #: client (507; None: no quota).
    max_open_uploads: int = 20
    storage_quota: int | None = None
    #: Request headers: at most this many bytes (431), sent within this many
    #: seconds (else the connection is closed).
    max_header_bytes: int = 64 << 10
    header_timeout: float = 10.0
    #: Seconds a drain (SIGTERM) gives requests in flight and running runs
    #: to finish; runs still running then are cancelled (their `finally` runs,
    #: within `close_timeout`).
    drain_timeout: float = 30.0

    @property
    def auth(self) -> bool:
        """Whether access control is on: any of the three kinds of key is set."""
        return bool(self.auth_secret or self.auth_public_key or self.auth_jwks)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **given: Any) -> Settings:
        """Settings from `TIDEWIRE_<FIELD>` variables (lists comma-separated), then `given`.

        Values are converted and checked by pydantic, so a bad one names its
        variable: `TIDEWIRE_HEARTBEAT: Input should be a valid number`.
        """
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = environ.get(f"TIDEWIRE_{f.name.upper()}")
            if raw is None or f.name in given:
                continue
            kind = _HINTS[f.name]
            text: Any = (
                [v.strip() for v in raw.split(",") if v.strip()] if f.name in _LISTS else raw
            )
            try:
                values[f.name] = pydantic.TypeAdapter(kind).validate_python(text, strict=False)
            except pydantic.ValidationError as exc:
                message = exc.errors()[0]["msg"]
                raise ValueError(f"TIDEWIRE_{f.name.upper()}: {message}") from None
        return cls(**values, **given)

    def __post_init__(self) -> None:
        if self.run_window < 1 or self.run_history < self.run_window:
            # A watcher that is still connected must never lose events to
            # trimming, so the history has to hold at least the window.
            raise ValueError("need 1 <= run_window <= run_history")
        if self.max_runs < 1:
            raise ValueError("max_runs must be at least 1")
        if self.lease <= 0:
            raise ValueError("lease must be positive")
        if self.heartbeat <= 0:
            raise ValueError("heartbeat must be positive")
        if self.max_file_size is not None and self.max_file_size < 0:
            raise ValueError("max_file_size must not be negative")
        if self.channel_max_len < 1:
            raise ValueError("channel_max_len must be at least 1")

        if self.auth_secret is not None and len(self.auth_secret.encode()) < 32:
            raise ValueError("auth_secret must be at least 32 bytes (RFC 7518 for HS256)")


_HINTS = typing.get_type_hints(Settings)
_LISTS = frozenset({"allow_origins"})
