"""The client side of the `tidewire` command: streams, channels and files from a shell.

Everything a script reads goes to stdout: one JSON event per line (so `| jq`
works), file metadata as JSON, a path, an id. Everything a person reads goes
to stderr: progress bars (only on a terminal) and one line per error. The exit
status says what went wrong (`EXIT_CODES`), so scripts can branch on it.
"""

from __future__ import annotations

import base64
import json
import mimetypes
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, TextIO

import typer

from .client._client import DEFAULT_URL
from .wire import RUN_HEADER

if TYPE_CHECKING:
    from rich.progress import Progress

    from .client import Client

__all__ = ["EXIT_CODES", "EXIT_CODES_HELP", "add_commands"]

#: What each exit status means; the help epilog and docs/cli.md show this table.
EXIT_CODES: dict[int, str] = {
    0: "ok",
    1: "the run failed, or another error",
    2: "usage error",
    3: "cannot connect, or disconnected",
    4: "HTTP 4xx (the server's message is shown)",
    5: "HTTP 5xx",
    6: "checksum mismatch",
    130: "Ctrl-C (a run started by `stream` is cancelled)",
}
EXIT_CODES_HELP = "Exit codes: " + "; ".join(f"{code} {what}" for code, what in EXIT_CODES.items())


class Transport(StrEnum):
    ndjson = "ndjson"
    sse = "sse"
    ws = "ws"


# --- options shared by the commands ---------------------------------------------------------

Url = Annotated[
    str,
    typer.Option("--url", envvar="TIDEWIRE_URL", help="The tidewire server.", show_default=True),
]
TokenOpt = Annotated[
    str | None,
    typer.Option(
        "--token",
        envvar="TIDEWIRE_TOKEN",
        help="A token for a server with access control (sent as Authorization: Bearer); "
        "`tidewire token` mints one for development.",
        show_default=False,
    ),
]
TransportOpt = Annotated[
    Transport,
    typer.Option("--transport", "-t", help="How events travel: ndjson, sse or ws."),
]
After = Annotated[
    str | None,
    typer.Option(help="Resume after this event id (0: from the oldest retained event)."),
]
SaveBlobs = Annotated[
    Path | None,
    typer.Option(
        "--save-blobs",
        file_okay=False,
        help="Write blobs (images, bytes) to files in DIR; the JSON shows their paths.",
        metavar="DIR",
    ),
]
ProgressOpt = Annotated[
    bool | None,
    typer.Option(
        "--progress/--no-progress",
        help="Show progress bars on stderr (default: when stderr is a terminal).",
        show_default=False,
    ),
]


# --- errors and exit codes ------------------------------------------------------------------


def die(message: str, code: int) -> NoReturn:
    """One line on stderr, no traceback, and the exit status."""
    typer.echo(f"tidewire: error: {message}", err=True)
    raise typer.Exit(code)


def check_url(url: str) -> str:
    if not re.match(r"https?://[^/]", url):
        raise typer.BadParameter(f"{url!r} is not an http:// or https:// URL", param_hint="--url")
    return url.rstrip("/")


@contextmanager
def exit_codes() -> Iterator[None]:
    """Turn what the client raises into one line on stderr and `EXIT_CODES`' status."""
    from .client.exceptions import (
        ChecksumMismatch,
        HTTPStatusError,
        RunFailed,
        TidewireError,
        TransportError,
        describe,
    )

    try:
        yield
    except RunFailed as exc:
        die(f"the run failed: {exc.type}: {exc.message}", 1)
    except TransportError as exc:
        die(str(exc), 3)
    except HTTPStatusError as exc:
        detail = describe(exc.detail)
        die(f"{detail} (HTTP {exc.status_code})", 4 if exc.status_code < 500 else 5)
    except ChecksumMismatch as exc:
        die(str(exc), 6)
    except TidewireError as exc:
        die(str(exc), 1)
    except BrokenPipeError:
        # The reader went away (`| head -3`): stop quietly, as it asked.
        with suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise typer.Exit(0) from None
    except KeyboardInterrupt:
        typer.echo("", err=True)
        raise typer.Exit(130) from None
    except OSError as exc:  # a local file that cannot be read or written
        where = f"{exc.filename}: " if exc.filename else ""
        die(f"{where}{exc.strerror or exc}", 1)


def client(url: str, token: str | None = None) -> Client:
    from .client import Client

    return Client(check_url(url), token=token or None)


# --- values from the command line -----------------------------------------------------------


def loose_json(text: str) -> Any:
    """JSON if it parses (`5`, `true`, `{"a": 1}`), else the text as a string."""
    import orjson  # strict JSON: `NaN` stays the string "NaN"

    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return text


def parse_params(pairs: list[str]) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"{pair!r}: write parameters as key=value", param_hint="-p")
        params[key] = loose_json(value)
    return params


# --- events out as JSON lines ---------------------------------------------------------------


class EventWriter:
    """Writes events to stdout as `{"id", "event", "data"}` lines, flushed one by one.

    Blobs are written back as the contract's `{"$blob": ...}` objects, so every
    line is valid JSON; with a folder, each blob goes to a file there instead
    and the JSON names its path.
    """

    def __init__(self, save_blobs: Path | None, out: TextIO | None = None) -> None:
        self.folder = save_blobs
        self.out = out or sys.stdout
        if save_blobs is not None:
            save_blobs.mkdir(parents=True, exist_ok=True)

    def write(self, event: Any) -> None:
        import orjson

        count = 0

        def blob(value: Any) -> Any:
            nonlocal count
            count += 1
            return self.blob(value, event.id, count)

        line = orjson.dumps(
            {"id": event.id, "event": event.event, "data": event.data}, default=blob
        )
        self.out.write(line.decode() + "\n")
        self.out.flush()

    def blob(self, value: Any, event_id: str, n: int) -> Any:
        from .client import RemoteBlob

        raw: bytes
        if isinstance(value, RemoteBlob):
            kind, size = value.type, value.size
            if self.folder is None:
                return {"$blob": {"type": kind, "size": size, "url": value.url}}
            raw = value.read()
        elif isinstance(value, (bytes, bytearray, memoryview)):
            raw = bytes(value)
            kind = getattr(value, "type", "application/octet-stream")
            size = len(raw)
            if self.folder is None:
                data = base64.b64encode(raw).decode()
                return {"$blob": {"type": kind, "size": size, "data": data}}
        else:
            raise TypeError(f"{type(value).__name__} is not JSON serializable")
        from .client._files import safe_name  # the rules downloads follow

        # Ids are opaque: whatever they hold, the file stays in the folder.
        path = self.folder / f"{safe_name(event_id, 'event')}-{n}{extension(kind)}"
        path.write_bytes(raw)
        return {"$blob": {"type": kind, "size": len(raw), "path": str(path)}}


def extension(kind: str) -> str:
    guessed = mimetypes.guess_extension(kind.split(";")[0].strip())
    return guessed or ".bin"


def write_events(
    stream: Any, writer: EventWriter, count: int | None = None, *, cancel: bool = False
) -> None:
    """Print the events of an open stream; `count` stops after that many.

    With `cancel` (a run this command started), Ctrl-C cancels the run before exiting.
    """
    from .client.exceptions import TidewireError

    try:
        for seen, event in enumerate(stream, 1):
            writer.write(event)
            if count is not None and seen >= count:
                return
    except KeyboardInterrupt:
        if cancel:
            with suppress(TidewireError, KeyboardInterrupt):
                stream.cancel()
        raise


# --- progress bars --------------------------------------------------------------------------


def progress_wanted(flag: bool | None) -> bool:
    return sys.stderr.isatty() if flag is None else flag


@contextmanager
def bars(enabled: bool) -> Iterator[Progress | None]:
    """A rich progress display on stderr with size, speed and time left; None when off."""
    if not enabled:
        yield None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    progress = Progress(
        TextColumn("{task.description}", markup=False),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=False,
    )
    with progress:
        yield progress


def bar(progress: Progress | None, label: str) -> Callable[[int, int | None], None] | None:
    """A `progress(done, total)` callback that moves one bar, or None without bars."""
    if progress is None:
        return None
    task = progress.add_task(label, total=None)

    def moved(done: int, total: int | None) -> None:
        progress.update(task, completed=done, total=total)

    return moved


# --- commands -------------------------------------------------------------------------------


def stream(
    name: Annotated[str, typer.Argument(help="The stream to run (see GET /streams).")],
    param: Annotated[
        list[str] | None,
        typer.Option(
            "--param",
            "-p",
            help="A parameter, key=value (the value as JSON if it "
            "parses, else a string); repeat for more.",
            metavar="KEY=VALUE",
        ),
    ] = None,
    transport: TransportOpt = Transport.ndjson,
    save_blobs: SaveBlobs = None,
    url: Url = DEFAULT_URL,
    token: TokenOpt = None,
) -> None:
    """Start a run of a stream and print its events, one JSON object per line.

    Example: tidewire stream demo -p n=5 -p interval=0 | jq .data.text
    """
    params = parse_params(param or [])
    writer = EventWriter(save_blobs)
    with (
        exit_codes(),
        client(url, token) as c,
        c.stream(name, params, transport=transport.value) as s,
    ):
        if sys.stderr.isatty():  # for a person who may want to `watch` it elsewhere
            typer.echo(f"tidewire: run {s.run_id}", err=True)
        write_events(s, writer, cancel=True)


def watch(
    run: Annotated[str, typer.Argument(help=f"The run's id (the {RUN_HEADER} header).")],
    after: After = None,
    transport: TransportOpt = Transport.ndjson,
    save_blobs: SaveBlobs = None,
    url: Url = DEFAULT_URL,
    token: TokenOpt = None,
) -> None:
    """Watch a run: its events so far, then live ones, until it ends.

    Example: tidewire watch 3f2a9c --after 10
    """
    writer = EventWriter(save_blobs)
    with (
        exit_codes(),
        client(url, token) as c,
        c.watch(run, after, transport=transport.value, on_gap="yield") as s,
    ):
        write_events(s, writer)


def subscribe(
    channel: Annotated[str, typer.Argument(help="The channel's name.")],
    after: After = None,
    count: Annotated[
        int | None,
        typer.Option("--count", "-n", min=1, help="Exit after this many events."),
    ] = None,
    transport: TransportOpt = Transport.ndjson,
    save_blobs: SaveBlobs = None,
    url: Url = DEFAULT_URL,
    token: TokenOpt = None,
) -> None:
    """Print a channel's events as they are published (Ctrl-C or --count to stop).

    Example: tidewire subscribe chat --after 0 --count 10
    """
    writer = EventWriter(save_blobs)
    with (
        exit_codes(),
        client(url, token) as c,
        c.subscribe(channel, after, transport=transport.value, on_gap="yield") as s,
    ):
        write_events(s, writer, count)


def publish(
    channel: Annotated[str, typer.Argument(help="The channel's name.")],
    data: Annotated[
        str | None,
        typer.Argument(
            help="The event's data: JSON if it parses, else a string; - reads stdin. "
            "With --file, a JSON object whose keys become form fields."
        ),
    ] = None,
    event: Annotated[
        str | None, typer.Option("--event", "-e", help="The event type (default: message).")
    ] = None,
    file: Annotated[
        list[str] | None,
        typer.Option(
            "--file",
            "-f",
            help="Attach a file as a blob, under its file name or [KEY=]PATH's KEY; "
            "repeat for more.",
            metavar="[KEY=]PATH",
        ),
    ] = None,
    url: Url = DEFAULT_URL,
    token: TokenOpt = None,
) -> None:
    """Publish one event to a channel and print its id.

    Example: tidewire publish chat '{"from": "ann", "text": "hi"}'
    """
    attached = attachments(file or [])
    if data is None and not attached:
        raise typer.BadParameter("give the event's DATA, or --file", param_hint="DATA")
    value: Any = None
    if data == "-":
        value = loose_json(sys.stdin.read().removesuffix("\n"))
    elif data is not None:
        value = loose_json(data)
    if attached and value is not None and not isinstance(value, dict):
        raise typer.BadParameter(
            "with --file, DATA must be a JSON object (its keys become form fields)",
            param_hint="DATA",
        )
    with exit_codes(), client(url, token) as c:
        typer.echo(c.publish(channel, value, event=event, files=attached or None))


def attachments(specs: list[str]) -> dict[str, Path]:
    """`--file [KEY=]PATH`s as form fields; each must be a readable file."""
    found: dict[str, Path] = {}
    for spec in specs:
        key, sep, where = spec.partition("=")
        # KEY=PATH, unless the whole of it names a file ("a=b.png" may).
        if sep and key and not Path(spec).is_file():
            path = Path(where)
        else:
            key, path = Path(spec).name, Path(spec)
        if not path.is_file():
            raise typer.BadParameter(f"{str(path)!r} is not a file", param_hint="--file")
        if key in found:
            raise typer.BadParameter(f"two files named {key!r}: give KEY=PATH", param_hint="--file")
        found[key] = path
    return found


def upload(
    paths: Annotated[
        list[Path],
        typer.Argument(
            exists=True, dir_okay=False, readable=True, help="Files to upload.", metavar="FILE..."
        ),
    ],
    name: Annotated[
        str | None, typer.Option(help="Store the file under this name (one file only).")
    ] = None,
    type: Annotated[
        str | None, typer.Option("--type", help="Its media type (default: from the name).")
    ] = None,
    progress: ProgressOpt = None,
    url: Url = DEFAULT_URL,
    token: TokenOpt = None,
) -> None:
    """Upload files (large ones resumably) and print each one's metadata as a JSON line.

    Example: tidewire upload photo.png video.mp4 | jq -r .id
    """
    if name is not None and len(paths) > 1:
        raise typer.BadParameter("--name names one file; upload the others separately")
    with exit_codes(), client(url, token) as c, bars(progress_wanted(progress)) as shown:
        for path in paths:
            meta = c.upload(path, name=name, type=type, progress=bar(shown, path.name))
            print(json.dumps(meta, ensure_ascii=False), flush=True)


def download(
    file: Annotated[str, typer.Argument(help="The file's id, or its name (the newest of it).")],
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            help="Where to write it (a file or a folder); default: its name, in this folder.",
        ),
    ] = None,
    resume: Annotated[
        bool,
        typer.Option("--continue", "-c", help="Resume a partial download (PATH.part)."),
    ] = False,
    progress: ProgressOpt = None,
    url: Url = DEFAULT_URL,
    token: TokenOpt = None,
) -> None:
    """Download a file (checked against its sha256) and print where it went.

    Example: tidewire download 0c9f4m2k1v8r3n5p7q6s4t -o out/ --continue
    """
    with exit_codes(), client(url, token) as c, bars(progress_wanted(progress)) as shown:
        path = c.download(file, output, resume=resume, progress=bar(shown, file))
    typer.echo(str(path))


def files(
    limit: Annotated[
        int | None, typer.Option(min=1, help="At most this many, newest first.")
    ] = None,
    as_json: Annotated[
        bool | None,
        typer.Option(
            "--json/--table",
            help="JSON lines or a table (default: a table on a terminal, JSON lines otherwise).",
            show_default=False,
        ),
    ] = None,
    url: Url = DEFAULT_URL,
    token: TokenOpt = None,
) -> None:
    """List stored files, newest first.

    Example: tidewire files --json | jq -r 'select(.size > 1e6) | .id'
    """
    with exit_codes(), client(url, token) as c:
        listed = c.files(limit=limit)
        if as_json if as_json is not None else not sys.stdout.isatty():
            for meta in listed:
                print(json.dumps(meta, ensure_ascii=False), flush=True)
        else:
            print_table(listed)


def print_table(listed: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.filesize import decimal
    from rich.table import Table

    table = Table("id", "name", "size", "type", "created", box=None)
    for meta in listed:
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(meta.get("created", 0)))
        table.add_row(
            meta["id"], meta["name"], decimal(meta["size"]), meta.get("type", ""), created
        )
    Console().print(table)


def rm(
    ids: Annotated[list[str], typer.Argument(help="Ids of the files to delete.", metavar="ID...")],
    url: Url = DEFAULT_URL,
    token: TokenOpt = None,
) -> None:
    """Delete files.

    Example: tidewire rm 0c9f4m2k1v8r3n5p7q6s4t
    """
    with exit_codes(), client(url, token) as c:
        for file_id in ids:
            c.delete(file_id)


#: `--allow KEY=…`: the lists of the token's `tidewire` claim.
GRANTS = ("streams", "subscribe", "publish", "files")


def token(
    sub: Annotated[str, typer.Option("--sub", help="Who the token is for (its identity).")],
    secret: Annotated[
        str,
        typer.Option(
            "--secret",
            envvar="TIDEWIRE_AUTH_SECRET",
            help="The server's --auth-secret (at least 32 bytes).",
            show_default=False,
        ),
    ],
    allow: Annotated[
        list[str] | None,
        typer.Option(
            "--allow",
            help="A permission, KEY=PATTERN[,PATTERN…] with KEY one of streams, subscribe, "
            "publish, files (files: read, read:own, write, delete); * matches any run of "
            "characters; repeat for more.",
            metavar="KEY=PATTERNS",
        ),
    ] = None,
    admin: Annotated[bool, typer.Option("--admin", help="May do everything.")] = False,
    ttl: Annotated[int, typer.Option("--ttl", min=1, help="Seconds until it expires.")] = 3600,
    audience: Annotated[
        str | None, typer.Option(help="Its `aud`, if the server checks one.")
    ] = None,
    issuer: Annotated[str | None, typer.Option(help="Its `iss`, if the server checks one.")] = None,
) -> None:
    """Mint a token (an HS256 JWT) for a server started with --auth-secret, and print it.

    For development and tests: in production, tokens come from your identity provider.

    Example: tidewire token --sub alice --allow streams=demo --allow 'publish=room.*'
    --allow files=read,write
    """
    import jwt

    from .auth import Identity

    if len(secret.encode()) < 32:
        raise typer.BadParameter(
            "must be at least 32 bytes, as the server's", param_hint="--secret"
        )
    grant: dict[str, Any] = {}
    for spec in allow or []:
        key, sep, patterns = spec.partition("=")
        key = key.strip()
        if not sep or key not in GRANTS:
            raise typer.BadParameter(
                f"{spec!r}: give KEY=PATTERN[,PATTERN…], KEY one of {', '.join(GRANTS)}",
                param_hint="--allow",
            )
        values = [p.strip() for p in patterns.split(",") if p.strip()]
        if not values:
            raise typer.BadParameter(f"{spec!r} names nothing after =", param_hint="--allow")
        grant.setdefault(key, []).extend(v for v in values if v not in grant.get(key, []))
    if admin:
        grant["admin"] = True
    now = int(time.time())
    claims: dict[str, Any] = {"sub": sub, "iat": now, "exp": now + ttl, "tidewire": grant}
    if audience:
        claims["aud"] = audience
    if issuer:
        claims["iss"] = issuer
    try:
        Identity.from_claims(claims)  # what the server will read: refuse what it would not
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    typer.echo(jwt.encode(claims, secret, algorithm="HS256"))


def add_commands(app: typer.Typer) -> None:
    """Add the client commands to the `tidewire` app."""
    for command in (stream, watch, publish, subscribe, upload, download, files, rm):
        app.command(epilog=EXIT_CODES_HELP)(command)
    app.command()(token)
