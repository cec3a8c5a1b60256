"""Settings: the knobs a deployment may turn, with defaults that suit one process.

Where they come from, lowest first: the defaults here < a TOML file
(`--config FILE.toml`, or `$TIDEWIRE_CONFIG`) < `TIDEWIRE_<FIELD>` variables <
values given in code or as `tidewire serve` flags. pydantic-settings reads
the file and the environment, and pydantic checks each source on its own, so
that a bad value names the place to fix it (`config.toml: lease: Input
should be a valid number`). `masked` is what may be shown of them.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import json
import os
import textwrap
import tomllib
import typing
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import pydantic

from .masking import mask_setting

if TYPE_CHECKING:
    from pydantic_settings import BaseSettings

__all__ = ["ENV_PREFIX", "Settings", "SettingsError", "field_docs"]

#: Every field's variable is this and its name in capitals.
ENV_PREFIX = "TIDEWIRE_"
#: The variable naming a TOML file of settings.
CONFIG_VARIABLE = "TIDEWIRE_CONFIG"


class SettingsError(ValueError):
    """A value that does not fit its field; the message names the field and its source."""


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
    #: Where runs and channels live: `redis://[:password@]host:port/db` to
    #: share them between processes and machines (None: this process's memory).
    broker: str | None = None
    #: Where files go: `s3://bucket/prefix?endpoint=URL` (credentials from the
    #: AWS_* variables) or `file://FOLDER` (None: the folder `data_dir`).
    storage: str | None = None
    #: The local folder for files when `storage` is not set (None: ./data).
    data_dir: str | None = None

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
    #: Request bodies (uploads, publishes, parameters) must average at least
    #: this many bytes per second, counted after `body_grace` seconds of
    #: waiting for them: slower ones get 408 and their connection is closed
    #: (None or 0: no minimum). Kestrel's defaults: a slow mobile link does 10x that.
    min_body_rate: float | None = 240.0
    body_grace: float = 5.0
    #: Sockets `tidewire serve` holds open per process: from one IP address
    #: (None: no cap; addresses trusted to forward for others are not
    #: capped), and in all (None: the file descriptor limit less a reserve;
    #: never more). A socket past either is closed at once.
    max_sockets_per_address: int | None = 1_000
    max_sockets: int | None = None

    # -- operations (docs/operations.md) ----------------------------------------
    #: Bearer token that `GET /metrics` requires (constant-time compared).
    #: Unset: /metrics is open (DESIGN.md); `tidewire serve` warns when it is
    #: reachable from other machines.
    metrics_token: str | None = None
    #: `text` (uvicorn's lines) or `json` (one object per line, with request ids).
    log_format: Literal["text", "json"] = "text"
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
        """Settings from `$TIDEWIRE_CONFIG` (a TOML file), then `TIDEWIRE_<FIELD>`, then `given`.

        Lists in variables are comma-separated; `none` (or empty) is None for
        the fields that may be None. A bad value is a `SettingsError` naming
        its variable: `TIDEWIRE_HEARTBEAT: Input should be a valid number`.
        """
        environ = os.environ if environ is None else environ
        return cls.load(environ.get(CONFIG_VARIABLE) or None, environ, given)

    @classmethod
    def load(
        cls,
        config: str | os.PathLike[str] | None = None,
        environ: Mapping[str, str] | None = None,
        given: Mapping[str, Any] | None = None,
        *,
        given_as: Callable[[str], str] = str,
    ) -> Settings:
        """Settings from the defaults < the TOML file `config` < `environ` < `given`.

        `given_as(field)` is how an error names a given value (`--lease` for a
        flag). An unknown key in the file is an error: a typo must not pass.
        """
        merged: dict[str, Any] = {}
        if config is not None:
            merged |= _read_file(Path(config))
        merged |= _read_env(os.environ if environ is None else environ)
        merged |= _validated(dict(given or {}), given_as)
        return cls(**merged)

    @classmethod
    def chosen(
        cls,
        config: str | os.PathLike[str] | None = None,
        environ: Mapping[str, str] | None = None,
        given: Mapping[str, Any] | None = None,
    ) -> set[str]:
        """The fields that the sources of `load` set, whatever their values."""
        names = set(given or {})
        if config is not None:
            names |= set(_read_file(Path(config)))
        return names | set(_read_env(os.environ if environ is None else environ))

    def environ(self, chosen: Collection[str] = ()) -> dict[str, str | None]:
        """Every field as its `TIDEWIRE_<FIELD>` variable: read back, the same settings.

        How `tidewire serve` hands its settings to the worker processes,
        which build the app (and its settings) by import. None: no variable,
        for a field left at its default that nobody `chosen` set, so that an
        app's own choice (`Settings.from_env(lease=1.5)`) is not overruled by
        a default nobody chose (an operator's `--drain-timeout 30` still is),
        and code reading a variable (the broker's, in app.py) never sees "none".
        """
        return {
            ENV_PREFIX + f.name.upper(): (
                None
                if value == f.default and (f.name not in chosen or value is None)
                else _text(value)
            )
            for f in dataclasses.fields(self)
            for value in (getattr(self, f.name),)
        }

    def masked(self) -> dict[str, Any]:
        """Every field, secrets replaced by `***`: what may be printed or logged."""
        return {
            f.name: mask_setting(f.name, getattr(self, f.name)) for f in dataclasses.fields(self)
        }

    def to_toml(self) -> str:
        """The settings, masked, as a TOML file `--config` reads (None written as "none")."""
        docs = field_docs()
        lines: list[str] = []
        for name, value in self.masked().items():
            lines += [f"# {line}" for line in textwrap.wrap(docs.get(name, ""), 76)]
            lines += [f"{name} = {_toml_value(value)}", ""]
        return "\n".join(lines)

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
_LISTS = frozenset(name for name, hint in _HINTS.items() if typing.get_origin(hint) is tuple)
_NONE = "none"


def _none(value: Any) -> Any:
    # Neither TOML nor a variable nor a flag can say None: "none" (or empty) does.
    if isinstance(value, str) and value.strip().lower() in ("", _NONE):
        return None
    return value


def _split(value: Any) -> Any:
    # A list in a variable or a TOML string: comma-separated.
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return value


def _field_type(name: str) -> Any:
    # pydantic-settings is imported when settings are first loaded, not with
    # tidewire: it costs a tenth of a second that the client commands need not pay.
    from pydantic_settings import NoDecode

    hint = _HINTS[name]
    if name in _LISTS:
        # NoDecode: pydantic-settings would take the variable for JSON.
        return Annotated[hint, NoDecode, pydantic.BeforeValidator(_split)]
    if type(None) in typing.get_args(hint):
        return Annotated[hint, pydantic.BeforeValidator(_none)]
    return hint


def _model_fields() -> dict[str, Any]:
    return {
        f.name: (_field_type(f.name), pydantic.Field(default=f.default, description=doc))
        for f, doc in ((f, field_docs().get(f.name)) for f in dataclasses.fields(Settings))
    }


@functools.cache
def _fields_model() -> type[pydantic.BaseModel]:
    """Checks the values of one source: each a field, of its type."""
    return pydantic.create_model(
        "Settings", __config__=pydantic.ConfigDict(extra="forbid"), **_model_fields()
    )


@functools.cache
def _sources_model() -> type[BaseSettings]:
    """What pydantic-settings reads the environment and TOML files for."""
    from pydantic_settings import BaseSettings

    return pydantic.create_model("SettingsSources", __base__=BaseSettings, **_model_fields())


def _variables(environ: Mapping[str, str]) -> dict[str, Any]:
    """The fields' `TIDEWIRE_*` variables in `environ` (os.environ, or a test's)."""
    from pydantic_settings import EnvSettingsSource
    from pydantic_settings.sources.utils import parse_env_vars

    class Variables(EnvSettingsSource):
        def _load_env_vars(self) -> Mapping[str, str | None]:
            # pydantic-settings reads os.environ; the mapping given instead.
            return parse_env_vars(environ, False, False, None)

    return Variables(_sources_model(), case_sensitive=False, env_prefix=ENV_PREFIX)()


def _validated(values: dict[str, Any], name: Callable[[str], str]) -> dict[str, Any]:
    """The values of one source, converted; errors name each field as `name` does."""
    try:
        checked = _fields_model().model_validate(values)
    except pydantic.ValidationError as exc:
        problems = []
        for error in exc.errors():
            field = str(error["loc"][0]) if error["loc"] else "?"
            message = error["msg"]
            if error["type"] == "extra_forbidden":
                message = "no such setting (see tidewire serve --help)"
            problems.append(f"{name(field)}: {message}")
        # One line per field and message (a list's items would repeat them).
        raise SettingsError("\n".join(dict.fromkeys(problems))) from None
    return {field: getattr(checked, field) for field in checked.model_fields_set}


def _read_file(path: Path) -> dict[str, Any]:
    from pydantic_settings import TomlConfigSettingsSource

    if not path.is_file():
        raise SettingsError(f"{path}: no such file (the settings file)")
    try:
        data = TomlConfigSettingsSource(_sources_model(), toml_file=path).toml_data
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"{path}: not TOML: {exc}") from None
    return _validated(dict(data), lambda field: f"{path}: {field}")


def _read_env(environ: Mapping[str, str]) -> dict[str, Any]:
    return _validated(_variables(environ), lambda field: ENV_PREFIX + field.upper())


def _text(value: Any) -> str:
    """A value as its variable holds it (read back by `_read_env`)."""
    if value is None:
        return _NONE
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return ",".join(value)
    return str(value)


def _toml_value(value: Any) -> str:
    if value is None:
        return json.dumps(_NONE)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    # A JSON string is a TOML basic string (the same escapes).
    return json.dumps(str(value))


@functools.cache
def field_docs() -> dict[str, str]:
    """Each field's `#:` comment, as one line; a field without one shares the one above."""
    source = inspect.getsource(Settings)
    lines = source.splitlines()
    docs: dict[str, str] = {}
    previous = ""
    body = ast.parse(textwrap.dedent(source)).body[0]
    assert isinstance(body, ast.ClassDef)
    for node in body.body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        comment: list[str] = []
        row = node.lineno - 2  # the line above, 0-based
        while row >= 0 and lines[row].strip().startswith("#:"):
            comment.insert(0, lines[row].strip().removeprefix("#:").strip())
            row -= 1
        previous = " ".join(comment).replace("… ", "").replace(" …", "") if comment else previous
        docs[node.target.id] = previous
    return docs
