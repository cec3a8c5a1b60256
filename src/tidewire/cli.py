"""The `tidewire` command.

Only what every command needs is imported here: `serve` (`cli_serve`) is
made into a command when it is asked for, and the client commands
(`cli_client`) import the client as they run. `tidewire download` then
starts without the server side, pydantic-settings or FastAPI, which cost
every small download a few tenths of a second.
"""

from __future__ import annotations

import gc
import importlib
import ipaddress
import os
import sys
from typing import TYPE_CHECKING, Any, NoReturn

import typer
from typer.core import TyperGroup

from . import __version__
from .cli_client import EXIT_CODES_HELP, add_commands
from .client._client import DEFAULT_URL

if TYPE_CHECKING:
    from typer._click import Command, Context

    from .config import Settings

__all__ = ["cli", "is_loopback", "load_app", "main", "worker_app"]

#: Commands made on first use, by the module that has them (its Typer `app`).
LAZY_COMMANDS = {"serve": "tidewire.cli_serve"}


class Commands(TyperGroup):
    """`tidewire`'s commands, `LAZY_COMMANDS` imported only when one of them is asked
    for, by name or by `tidewire --help` (which lists them all, first)."""

    def list_commands(self, ctx: Context) -> list[str]:
        return [*(n for n in LAZY_COMMANDS if n not in self.commands), *self.commands]

    def get_command(self, ctx: Context, cmd_name: str) -> Command | None:
        if cmd_name in LAZY_COMMANDS and cmd_name not in self.commands:
            module = importlib.import_module(LAZY_COMMANDS[cmd_name])
            # A Typer of one command is that command.
            self.add_command(typer.main.get_command(module.app), cmd_name)
        return super().get_command(ctx, cmd_name)


cli = typer.Typer(
    name="tidewire",
    cls=Commands,
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


def is_loopback(host: str) -> bool:
    """Whether only this machine can reach `host`: 127.0.0.0/8, ::1 or localhost."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name other than localhost: it may resolve to anything


@cli.command()
def version() -> None:
    """Print tidewire's version."""
    typer.echo(__version__)


add_commands(cli)


def main() -> None:
    cli()
