"""`tidewire serve`: its flags, the checks of what they say, and starting uvicorn.

Its own module, made into a command only when `serve` is asked for (or the
command list is shown: see `cli.Commands`): its flags are made from the
`Settings` fields, which loads pydantic-settings, and the client commands
(`tidewire download`, ...) do not need any of that to start.
"""

from __future__ import annotations

import atexit
import dataclasses
import os
import shutil
import tempfile
from typing import TYPE_CHECKING, Annotated, Any

import typer

from . import __version__
from .cli import SHARED_BROKERS, AppNotFound, fail, is_loopback, load_app, tune_gc
from .cli_settings import flag_name, flag_values, with_setting_flags

if TYPE_CHECKING:
    from .config import Settings

__all__ = ["app", "check_access", "ignored_settings", "serve"]

#: A Typer of this one command; `cli.Commands` adds it to `tidewire`'s.
app = typer.Typer(add_completion=False)

SETTINGS_EPILOG = (
    "Every setting is also TIDEWIRE_<NAME> in the environment and <name> in the --config "
    "file; the fields that may be None take none."
)

#: The help section of the access-control options.
_ACCESS = "Access control"


@app.command(epilog=SETTINGS_EPILOG)
@with_setting_flags
def serve(
    app: Annotated[
        str | None,
        typer.Argument(help="module:attr of a Tidewire or ASGI app; default: the built-in demo"),
    ] = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    workers: Annotated[
        int, typer.Option(min=1, help="Worker processes; more than 1 needs --broker redis://…")
    ] = 1,
    broker: Annotated[
        str | None,
        typer.Option(
            help="redis://host:port/db to share runs and channels between processes and "
            "machines; default: this process's memory.",
        ),
    ] = None,
    storage: Annotated[
        str | None,
        typer.Option(
            help="s3://bucket/prefix?endpoint=URL for S3-compatible storage (credentials "
            "from the AWS_* variables); default: a local folder.",
        ),
    ] = None,
    data_dir: Annotated[
        str | None,
        typer.Option(help="The local folder for files (default: ./data)."),
    ] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
    auth_secret: Annotated[
        str | None,
        typer.Option(
            help="HMAC key (32+ bytes) of HS256/384/512 tokens; turns access control on. "
            "Prefer the variable: a flag shows in the process list.",
            rich_help_panel=_ACCESS,
        ),
    ] = None,
    auth_public_key: Annotated[
        str | None,
        typer.Option(
            metavar="FILE",
            help="PEM public key of RS*, PS*, ES* or EdDSA tokens; turns access control on.",
            rich_help_panel=_ACCESS,
        ),
    ] = None,
    auth_jwks: Annotated[
        str | None,
        typer.Option(
            metavar="URL",
            help="JWKS URL of the token keys (rotated by kid); turns access control on.",
            rich_help_panel=_ACCESS,
        ),
    ] = None,
    auth_audience: Annotated[
        str | None,
        typer.Option(
            help="Tokens must carry this aud.",
            rich_help_panel=_ACCESS,
        ),
    ] = None,
    auth_issuer: Annotated[
        str | None,
        typer.Option(
            help="Tokens must carry this iss.",
            rich_help_panel=_ACCESS,
        ),
    ] = None,
    allow_origin: Annotated[
        list[str] | None,
        typer.Option(
            metavar="ORIGIN",
            help="A web origin (https://app.example.com) besides the server's own whose pages "
            "may use this server; repeatable. Default: $TIDEWIRE_ALLOW_ORIGINS, comma-separated.",
            rich_help_panel=_ACCESS,
        ),
    ] = None,
    link_secret: Annotated[
        str | None,
        typer.Option(
            help="Key of signed file links (default: derived from --auth-secret); the same in "
            "every process.",
            rich_help_panel=_ACCESS,
        ),
    ] = None,
    no_auth: Annotated[
        bool,
        typer.Option(
            "--no-auth",
            help="Serve a non-loopback --host without access control: anyone who reaches it "
            "may do everything.",
            rich_help_panel=_ACCESS,
        ),
    ] = False,
    forwarded_allow_ips: Annotated[
        str | None,
        typer.Option(
            help="Proxies (comma-separated addresses, or *) whose X-Forwarded-For/Proto are "
            "believed; default: $FORWARDED_ALLOW_IPS, else 127.0.0.1.",
        ),
    ] = None,
    config: Annotated[
        str | None,
        typer.Option(
            metavar="FILE.toml",
            envvar="TIDEWIRE_CONFIG",
            help="A TOML file of settings (field = value, as --print-config shows them); "
            "TIDEWIRE_* variables and flags win over it.",
        ),
    ] = None,
    print_config: Annotated[
        bool,
        typer.Option(
            "--print-config",
            help="Print the settings the server would run with (secrets masked), as TOML, "
            "and exit.",
        ),
    ] = False,
    ssl_keyfile: Annotated[
        str | None,
        typer.Option(
            metavar="FILE", help="Serve HTTPS: the private key (PEM).", rich_help_panel="TLS"
        ),
    ] = None,
    ssl_certfile: Annotated[
        str | None,
        typer.Option(
            metavar="FILE",
            help="Serve HTTPS: the certificate chain (PEM).",
            rich_help_panel="TLS",
        ),
    ] = None,
    ssl_keyfile_password: Annotated[
        str | None,
        typer.Option(
            envvar="TIDEWIRE_SSL_KEYFILE_PASSWORD",
            help="The password of an encrypted --ssl-keyfile.",
            rich_help_panel="TLS",
        ),
    ] = None,
    **settings_flags: Any,
) -> None:
    """Run a server: your app, or the demo stream and open channels.

    Every setting (see --print-config) is a flag, a TIDEWIRE_<NAME> variable
    and a key of the --config file; flags win over variables, variables over
    the file.
    """
    # The fields given as flags: those declared above by hand (serve's own
    # parameters, by name) and the generated ones.
    given = flag_values(locals(), settings_flags)
    import uvicorn

    from .config import CONFIG_VARIABLE, Settings
    from .masking import mask
    from .metrics import MULTIPROC_ENV
    from .server.logs import log_config, redact_server_logs
    from .server.protocol import socket_env

    try:
        wanted = Settings.load(config, os.environ, given, given_as=flag_name)
    except ValueError as exc:
        fail(str(exc))
    if print_config:
        typer.echo(wanted.to_toml(), nl=False)
        raise typer.Exit(0)
    broker, storage = wanted.broker, wanted.storage
    if storage and wanted.data_dir:
        fail("give --storage or --data-dir, not both")
    if broker and not broker.startswith(("memory://", *SHARED_BROKERS)):
        fail(f"unknown broker {mask(broker)!r}: use redis://host:port/db, or memory://")
    if storage and not storage.startswith(("s3://", "file://")):
        fail(f"unknown storage {mask(storage)!r}: use s3://bucket?endpoint=URL, or --data-dir")
    if workers > 1 and not (broker or "").startswith(SHARED_BROKERS):
        fail(
            f"--workers {workers} needs a broker that the workers share: add "
            "--broker redis://host:port/0 (with one process, memory is enough)"
        )
    if (ssl_keyfile is None) != (ssl_certfile is None):
        fail("give --ssl-keyfile and --ssl-certfile together")
    key = wanted.auth_public_key
    if key and not key.lstrip().startswith("-----BEGIN"):
        # A path: absolute, so that every worker reads the same file.
        wanted = dataclasses.replace(wanted, auth_public_key=os.path.abspath(key))
    check_access(wanted)
    # The app builds its settings (Settings.from_env) from these variables,
    # in this process and in each worker: every field not at its default, so
    # that every process runs with the same settings whatever the file said
    # (and none at its default, whatever variable said otherwise before a flag).
    for name, value in wanted.environ(Settings.chosen(config, os.environ, given)).items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    os.environ.pop(CONFIG_VARIABLE, None)
    if no_auth and wanted.auth:
        fail(
            "--no-auth and an auth key (--auth-secret, --auth-public-key, --auth-jwks or "
            "their TIDEWIRE_AUTH_* variables) contradict each other: give one"
        )
    target = app or "tidewire.demo:tw"
    redact_server_logs()  # before the app logs anything
    try:
        asgi, settings = load_app(target)
    except AppNotFound as exc:
        fail(str(exc))
    if settings is not None:
        ignored = ignored_settings(wanted, settings)
        if ignored:
            fail(
                f"{target} was built with Settings of its own, which leave out {ignored}: "
                "build them with Settings.from_env(...) so that the command line reaches them"
            )
    secured = wanted.auth or (settings is not None and settings.auth)
    if not (secured or no_auth or is_loopback(host)):
        fail(
            f"--host {host} is reachable from other machines, and access control is off: "
            "give --auth-secret (or --auth-public-key, --auth-jwks), or --no-auth to serve "
            "it open to anyone who reaches it"
        )
    if secured and not is_loopback(host) and not wanted.metrics_token:
        typer.echo(
            "  note: /metrics is open to anyone who reaches this server; "
            "set --metrics-token (or $TIDEWIRE_METRICS_TOKEN) to close it",
            err=True,
        )
    heartbeat = settings.heartbeat if settings is not None else None
    scheme = "https" if ssl_certfile else "http"
    base = f"{scheme}://{'[' + host + ']' if ':' in host else host}:{port}"
    what = app or "the demo"
    shared = f", {workers} workers on {mask(broker or '')}" if workers > 1 else ""
    typer.echo(f"tidewire {__version__}: serving {what} on {base}{shared}  (API docs: {base}/docs)")
    if app is None:
        typer.echo(f"  try: curl -N '{base}/streams/demo?n=5'")
    # Each server process loads the app by name, inside its event loop, where
    # SIGTERM is made to drain (worker_app); with workers, this one only supervises.
    os.environ["TIDEWIRE_APP"] = target
    asgi = "tidewire.cli:worker_app"
    # The limits the server enforces before the app sees a request: headers
    # (server/protocol.py reads them from the environment, in every worker)
    # and WebSocket frames, refused (1009) before they are buffered.
    limits = settings if settings is not None else Settings.from_env()
    os.environ["TIDEWIRE_MAX_HEADER_BYTES"] = str(limits.max_header_bytes)
    os.environ["TIDEWIRE_HEADER_TIMEOUT"] = str(limits.header_timeout)
    os.environ.update(socket_env(limits))  # and sockets (server/protocol.py)
    tune_gc()
    if workers > 1 and not os.environ.get(MULTIPROC_ENV):
        # Each worker counts into files here and /metrics sums them (metrics.py);
        # private to this server, and gone with it.
        metrics_dir = tempfile.mkdtemp(prefix="tidewire-metrics-")
        os.environ[MULTIPROC_ENV] = metrics_dir
        atexit.register(shutil.rmtree, metrics_dir, ignore_errors=True)
    uvicorn.run(
        asgi,
        factory=True,
        workers=workers,
        host=host,
        port=port,
        log_level=log_level,
        log_config=log_config(wanted.log_format, log_level),
        # In json, tidewire.access writes the access lines (server/observe.py).
        access_log=wanted.log_format != "json",
        # WebSocket heartbeats are protocol pings, sent by the server.
        ws_ping_interval=heartbeat or 15.0,
        ws_ping_timeout=heartbeat or 15.0,
        ws_max_size=limits.max_event_bytes,
        http="tidewire.server.protocol:HeaderLimitedProtocol",
        backlog=4096,
        timeout_graceful_shutdown=5,
        # None: uvicorn's default ($FORWARDED_ALLOW_IPS, else 127.0.0.1).
        forwarded_allow_ips=forwarded_allow_ips,
        ssl_keyfile=ssl_keyfile,
        ssl_certfile=ssl_certfile,
        ssl_keyfile_password=ssl_keyfile_password,
    )


#: Fields an app built with `Settings(...)` of its own still takes from the
#: environment (app.py): where its runs and files live.
_FROM_ENVIRONMENT = ("broker", "storage", "data_dir")


def check_access(wanted: Settings) -> None:
    """Load the access-control keys `wanted` names, or exit saying why not.

    Checked here, so that a short secret or an unreadable key file is an
    exit with a message rather than a traceback from inside the app.
    """
    from .server.guard import Guard

    try:
        Guard(wanted)  # loads the keys
    except (ValueError, OSError) as exc:
        fail(str(exc))


def ignored_settings(wanted: Settings, built: Settings) -> str:
    """The flags an app built with its own `Settings` would silently leave out ('' if none).

    Those the command line, the environment or the file set (other than the
    default) that the app's settings do not have.
    """
    from .config import Settings

    defaults = Settings()
    left_out = []
    for f in dataclasses.fields(Settings):
        value = getattr(wanted, f.name)
        if value == getattr(defaults, f.name) or value == getattr(built, f.name):
            continue
        if f.name in _FROM_ENVIRONMENT and getattr(built, f.name) is None:
            continue
        left_out.append(flag_name(f.name))
    return ", ".join(left_out)
