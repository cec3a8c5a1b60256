"""The `tidewire` command."""

from __future__ import annotations

import gc
import importlib
import os
import sys
from typing import Annotated, Any, NoReturn

import typer

from . import __version__
from .cli_client import EXIT_CODES_HELP, add_commands
from .client._client import DEFAULT_URL

__all__ = ["cli", "load_app", "main", "worker_app"]

cli = typer.Typer(
    name="tidewire",
    help="Stream Python generators, channels and files over NDJSON, SSE and WebSocket.",
    epilog=EXIT_CODES_HELP + f". The server is --url, or $TIDEWIRE_URL (default {DEFAULT_URL}).",
    no_args_is_help=True,
    add_completion=False,
)


class AppNotFound(Exception):
    pass


def load_app(target: str) -> tuple[Any, float | None]:
    """Import `module:attr`; a `Tidewire` gives its app. Returns (ASGI app, heartbeat)."""
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
        return obj.app, obj.settings.heartbeat
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
    """The app of one worker process: `tidewire serve --workers N` names it in the environment."""
    tune_gc()
    return load_app(os.environ["TIDEWIRE_APP"])[0]


def fail(message: str) -> NoReturn:
    typer.echo(f"Error: {message}", err=True)
    raise typer.Exit(2)


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
) -> None:
    """Run a server: your app, or the demo stream and open channels."""
    import uvicorn

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
    # The app reads these when it is built, in this process and in each worker.
    for name, value in (
        ("TIDEWIRE_BROKER", broker),
        ("TIDEWIRE_STORAGE", storage),
        ("TIDEWIRE_DATA_DIR", data_dir),
    ):
        if value:
            os.environ[name] = value
    target = app or "tidewire.demo:tw"
    try:
        asgi, heartbeat = load_app(target)
    except AppNotFound as exc:
        fail(str(exc))
    base = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
    what = app or "the demo"
    shared = f", {workers} workers on {broker}" if workers > 1 else ""
    typer.echo(f"tidewire {__version__}: serving {what} on {base}{shared}  (API docs: {base}/docs)")
    if app is None:
        typer.echo(f"  try: curl -N '{base}/streams/demo?n=5'")
    if workers > 1:
        # Worker processes import the app by name; this process only supervises.
        os.environ["TIDEWIRE_APP"] = target
        asgi = "tidewire.cli:worker_app"
    tune_gc()
    uvicorn.run(
        asgi,
        factory=workers > 1,
        workers=workers,
        host=host,
        port=port,
        log_level=log_level,
        # WebSocket heartbeats are protocol pings, sent by the server.
        ws_ping_interval=heartbeat or 15.0,
        ws_ping_timeout=heartbeat or 15.0,
        backlog=4096,
        timeout_graceful_shutdown=5,
    )


@cli.command()
def version() -> None:
    """Print tidewire's version."""
    typer.echo(__version__)


add_commands(cli)


def main() -> None:
    cli()
