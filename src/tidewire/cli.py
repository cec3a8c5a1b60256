"""The `tidewire` command."""

from __future__ import annotations

import importlib
import os
import sys
from typing import Annotated, Any

import typer

from . import __version__

__all__ = ["cli", "load_app", "main"]

cli = typer.Typer(
    name="tidewire",
    help="Stream Python generators, channels and files over NDJSON, SSE and WebSocket.",
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


@cli.command()
def serve(
    app: Annotated[
        str | None,
        typer.Argument(help="module:attr of a Tidewire or ASGI app; default: the built-in demo"),
    ] = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
) -> None:
    """Run a server: your app, or the demo stream and open channels."""
    import uvicorn

    try:
        asgi, heartbeat = load_app(app or "tidewire.demo:tw")
    except AppNotFound as exc:
        typer.echo(f"Error: {exc}", err=True)
        raise typer.Exit(2) from None
    base = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
    what = app or "the demo"
    typer.echo(f"tidewire {__version__}: serving {what} on {base}  (API docs: {base}/docs)")
    if app is None:
        typer.echo(f"  try: curl -N '{base}/streams/demo?n=5'")
    uvicorn.run(
        asgi,
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


def main() -> None:
    cli()
