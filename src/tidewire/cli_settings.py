"""`tidewire serve`'s flags for the `Settings` fields: one per field, made from the fields.

A field added to `Settings` gets its flag here without code: `--max-event-bytes
2097152`, `--cancel-on-disconnect/--no-cancel-on-disconnect`, help from the
field's `#:` comment. Values stay text until `Settings.load` checks them with
the file's and the environment's, so that a bad one is named as the user gave
it (`--lease: Input should be a valid number`) and `none` works for the fields
that may be None. Fields that `serve` declares by hand (`--broker`,
`--auth-secret`, `--allow-origin`, …) keep those declarations.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from collections.abc import Callable, Mapping
from typing import Annotated, Any, TypeVar

import typer

from .config import ENV_PREFIX, Settings, field_docs

__all__ = ["FLAG_NAMES", "SETTINGS_PANEL", "flag_name", "with_setting_flags"]

F = TypeVar("F", bound=Callable[..., Any])

#: The help section of the generated flags.
SETTINGS_PANEL = "Settings (also in --config FILE.toml and TIDEWIRE_* variables)"
#: Flags not named after their field: `--allow-origin` is given once per origin.
FLAG_NAMES = {"allow_origins": "--allow-origin"}
#: The parameter of `serve` a field's flag fills, where it is not the field's name.
PARAMETERS = {"allow_origins": "allow_origin"}


def flag_name(field: str) -> str:
    """The flag of a field: `--max-event-bytes` for `max_event_bytes`."""
    return FLAG_NAMES.get(field, "--" + field.replace("_", "-"))


def _metavar(hint: Any) -> str:
    kinds = {a for a in typing.get_args(hint) or (hint,) if a is not type(None)}
    word = "INTEGER" if kinds == {int} else "NUMBER" if kinds <= {int, float} else "TEXT"
    return word + ("|none" if type(None) in typing.get_args(hint) else "")


def _parameter(field: dataclasses.Field[Any], hint: Any, doc: str) -> inspect.Parameter:
    name = flag_name(field.name)
    variable = ENV_PREFIX + field.name.upper()
    default = field.default
    shown = "none" if default is None else default
    if hint is bool:
        option = typer.Option(
            f"{name}/--no-{name.removeprefix('--')}",
            help=f"{doc} (default: {'yes' if default else 'no'}; ${variable})",
            rich_help_panel=SETTINGS_PANEL,
            show_default=False,
        )
        annotation: Any = Annotated[bool | None, option]
    else:
        option = typer.Option(
            name,
            metavar=_metavar(hint),
            help=f"{doc} (default: {shown}; ${variable})",
            rich_help_panel=SETTINGS_PANEL,
            show_default=False,
        )
        annotation = Annotated[str | None, option]
    return inspect.Parameter(
        field.name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=annotation
    )


def with_setting_flags(func: F) -> F:
    """Give `func(..., **settings)` a flag for every field it does not declare itself.

    Typer reads a command's parameters from its signature; this one's
    `**settings` is replaced there by a keyword parameter per field, which
    typer then passes into `settings`.
    """
    signature = inspect.signature(func, eval_str=True)
    declared = set(signature.parameters)
    hints = typing.get_type_hints(Settings)
    docs = field_docs()
    generated = [
        _parameter(f, hints[f.name], docs.get(f.name, ""))
        for f in dataclasses.fields(Settings)
        if PARAMETERS.get(f.name, f.name) not in declared
    ]
    kept = [p for p in signature.parameters.values() if p.kind is not p.VAR_KEYWORD]

    @functools.wraps(func)
    def command(*args: Any, **kwargs: Any) -> Any:
        return func(*args, **kwargs)

    command.__signature__ = signature.replace(parameters=[*kept, *generated])  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in [*kept, *generated]}
    return typing.cast(F, command)


def flag_values(declared: Mapping[str, Any], generated: Mapping[str, Any]) -> dict[str, Any]:
    """The fields given as flags: `declared` (serve's own parameters) and `generated`, by field."""
    values: dict[str, Any] = {}
    for f in dataclasses.fields(Settings):
        parameter = PARAMETERS.get(f.name, f.name)
        value = declared.get(parameter, generated.get(parameter))
        if value is None or value == []:
            continue
        values[f.name] = tuple(value) if isinstance(value, list) else value
    return values
