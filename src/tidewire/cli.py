"""The `tidewire` command."""

from __future__ import annotations

import gc
import importlib
import ipaddress
import os
import sys
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer

from . import __version__
from .cli_client import EXIT_CODES_HELP, add_commands
from .client._client import DEFAULT_URL

if TYPE_CHECKING:
    from .config import Settings

__all__ = ["cli", "is_loopback", "load_app", "main", "worker_app"]

cli = typer.Typer(
    name="tidewire",
    help="Stream Python generators, channels and files over NDJSON, SSE and WebSocket.",
    epilog=EXIT_CODES_HELP + f". The server is --url, or $TIDEWIRE_URL (default {DEFAULT_URL}).",
    no_args_is_help=True,
    add_completion=False,
)


class AppNotFound(Exception):
    pass


def load_app(target: str) -> tuple[Any, Settings | None]:
    """Import `module:attr`; a `Tidewire` gives its app. Returns (ASGI app, its settings)."""
    from .app import Tidewire

    module_name, _, attr = target.partition(":")
    if not module_name or not attr:
        raise AppNotFound(f"{target!r}: give the app as module:attribute, e.g. myapp:tw")
    sys.path.insert(0, os.getcwd())  # as uvicorn does: modules in the current folder
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise AppNotFound(f"no module named {module_name!r} (from {os.getcwd()})") from None
        raise
    obj = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise AppNotFound(f"module {module_name!r} has no attribute {attr!r}") from None
    if isinstance(obj, Tidewire):
        return obj.app, obj.settings
    if not callable(obj):
        raise AppNotFound(f"{target!r} is neither a Tidewire nor an ASGI app")
    return obj, None


SHARED_BROKERS = ("redis://", "rediss://", "unix://")


def tune_gc() -> None:
    """Collect cyclic garbage less often than Python's default.

    A server holding thousands of open streams has many long-lived objects,
    and the default thresholds walk them over and over: at 10,000
    subscribers (bench W3) this cut the CPU per delivery from ~57 to ~44 µs.
    Reference counting still frees everything acyclic at once.
    """
    gc.set_threshold(100_000, 50, 100)


def worker_app() -> Any:
    """The app of one server process: `tidewire serve` names it in the environment."""
    from .server.logs import redact_server_logs
    from .server.serving import drain_on_signals

    tune_gc()
    redact_server_logs()  # for any ASGI app, not only a Tidewire's
    app = load_app(os.environ["TIDEWIRE_APP"])[0]
    # Called inside the server's event loop: SIGTERM drains, then exits 0.
    drain_on_signals()
    return app


def fail(message: str) -> NoReturn:
    typer.echo(f"Error: {message}", err=True)
    raise typer.Exit(2)


#: The help section of the access-control options.
_ACCESS = "Access control"


@cli.command()
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
            envvar="TIDEWIRE_BROKER",
            help="redis://host:port/db to share runs and channels between processes and "
            "machines; default: this process's memory.",
        ),
    ] = None,
    storage: Annotated[
        str | None,
        typer.Option(
            envvar="TIDEWIRE_STORAGE",
            help="s3://bucket/prefix?endpoint=URL for S3-compatible storage (credentials "
            "from the AWS_* variables); default: a local folder.",
        ),
    ] = None,
    data_dir: Annotated[
        str | None,
        typer.Option(
            envvar="TIDEWIRE_DATA_DIR", help="The local folder for files (default: ./data)."
        ),
    ] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
    auth_secret: Annotated[
        str | None,
        typer.Option(
            envvar="TIDEWIRE_AUTH_SECRET",
            help="HMAC key (32+ bytes) of HS256/384/512 tokens; turns access control on. "
            "Prefer the variable: a flag shows in the process list.",
            rich_help_panel=_ACCESS,
        ),
    ] = None,
    auth_public_key: Annotated[
        str | None,
        typer.Option(
            metavar="FILE",
            envvar="TIDEWIRE_AUTH_PUBLIC_KEY",
            help="PEM public key of RS*, PS*, ES* or EdDSA tokens; turns access control on.",
            rich_help_panel=_ACCESS,
        ),
    ] = None,
    auth_jwks: Annotated[
        str | None,
        typer.Option(
            metavar="URL",
            envvar="TIDEWIRE_AUTH_JWKS",
            help="JWKS URL of the token keys (rotated by kid); turns access control on.",
            rich_help_panel=_ACCESS,
        ),
    ] = None,
    auth_audience: Annotated[
        str | None,
        typer.Option(
            envvar="TIDEWIRE_AUTH_AUDIENCE",
            help="Tokens must carry this aud.",
            rich_help_panel=_ACCESS,
        ),
    ] = None,
    auth_issuer: Annotated[
        str | None,
        typer.Option(
            envvar="TIDEWIRE_AUTH_ISSUER",
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
            envvar="TIDEWIRE_LINK_SECRET",
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
) -> None:
    """Run a server: your app, or the demo stream and open channels."""
    import uvicorn

    from .config import Settings
    from .server.logs import redact_server_logs

    if storage and data_dir:
        fail("give --storage or --data-dir, not both")
    if broker and not broker.startswith(("memory://", *SHARED_BROKERS)):
        fail(f"unknown broker {broker!r}: use redis://host:port/db, or memory://")
    if storage and not storage.startswith(("s3://", "file://")):
        fail(f"unknown storage {storage!r}: use s3://bucket?endpoint=URL, or --data-dir")
    if workers > 1 and not (broker or "").startswith(SHARED_BROKERS):
        fail(
            f"--workers {workers} needs a broker that the workers share: add "
            "--broker redis://host:port/0 (with one process, memory is enough)"
        )
    if auth_public_key and not auth_public_key.lstrip().startswith("-----BEGIN"):
        # A path: absolute, so that every worker reads the same file.
        auth_public_key = os.path.abspath(auth_public_key)
    # The app reads these when it is built (Settings.from_env), in this
    # process and in each worker.
    for name, value in (
        ("TIDEWIRE_BROKER", broker),
        ("TIDEWIRE_STORAGE", storage),
        ("TIDEWIRE_DATA_DIR", data_dir),
        ("TIDEWIRE_AUTH_SECRET", auth_secret),
        ("TIDEWIRE_AUTH_PUBLIC_KEY", auth_public_key),
        ("TIDEWIRE_AUTH_JWKS", auth_jwks),
        ("TIDEWIRE_AUTH_AUDIENCE", auth_audience),
        ("TIDEWIRE_AUTH_ISSUER", auth_issuer),
        ("TIDEWIRE_ALLOW_ORIGINS", ",".join(allow_origin or ())),
        ("TIDEWIRE_LINK_SECRET", link_secret),
    ):
        if value:
            os.environ[name] = value
    wanted = access_settings(Settings)
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
        ignored = ignored_access_settings(wanted, settings)
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
    heartbeat = settings.heartbeat if settings is not None else None
    base = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
    what = app or "the demo"
    shared = f", {workers} workers on {broker}" if workers > 1 else ""
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
    tune_gc()
    uvicorn.run(
        asgi,
        factory=True,
        workers=workers,
        host=host,
        port=port,
        log_level=log_level,
        # WebSocket heartbeats are protocol pings, sent by the server.
        ws_ping_interval=heartbeat or 15.0,
        ws_ping_timeout=heartbeat or 15.0,
        ws_max_size=limits.max_event_bytes,
        http="tidewire.server.protocol:HeaderLimitedProtocol",
        backlog=4096,
        timeout_graceful_shutdown=5,
        # None: uvicorn's default ($FORWARDED_ALLOW_IPS, else 127.0.0.1).
        forwarded_allow_ips=forwarded_allow_ips,
    )


def is_loopback(host: str) -> bool:
    """Whether only this machine can reach `host`: 127.0.0.0/8, ::1 or localhost."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name other than localhost: it may resolve to anything


_ACCESS_FIELDS = {
    "auth_secret": "--auth-secret",
    "auth_public_key": "--auth-public-key",
    "auth_jwks": "--auth-jwks",
    "auth_audience": "--auth-audience",
    "auth_issuer": "--auth-issuer",
    "allow_origins": "--allow-origin",
    "link_secret": "--link-secret",
}


def access_settings(settings_type: type[Settings]) -> Settings:
    """The access-control settings the command line and environment ask for, checked.

    Checked here, so that a short secret or an unreadable key file is an
    exit with a message rather than a traceback from inside the app.
    """
    from .server.guard import Guard

    try:
        wanted = settings_type.from_env()
        Guard(wanted)  # loads the keys
    except (ValueError, OSError) as exc:
        fail(str(exc))
    return wanted


def ignored_access_settings(wanted: Settings, built: Settings) -> str:
    """The flags an app built with its own `Settings` would silently leave out ('' if none)."""
    left_out = [
        flag
        for field, flag in _ACCESS_FIELDS.items()
        if getattr(wanted, field) and getattr(wanted, field) != getattr(built, field)
    ]
    return ", ".join(left_out)


@cli.command()
def version() -> None:
    """Print tidewire's version."""
    typer.echo(__version__)


add_commands(cli)


def main() -> None:
    cli()
