"""Streams: a registered generator function, its parameters, and its items encoded.

A *stream* is a generator function registered under a name; its signature is
its parameter schema. What it yields becomes `(event type, data JSON)` items
for a run's log (see `local` for runs, `sources` for how generators are run).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import orjson
import pydantic

from ..blobs import Pending
from ..config import Settings
from ..events import LargeBlob, Message, depth_checked, dump_data

if TYPE_CHECKING:
    from .sources import Source

__all__ = ["RESERVED_PARAMS", "Item", "StreamFunction", "encode_item"]

Item = tuple[str, bytes]  # (event type, data JSON), ready for a log

#: Query parameters that belong to tidewire, not to a stream's generator.
RESERVED_PARAMS = frozenset({"detach", "after"})


def encode_item(item: Any, inline_limit: int | None = None) -> Item | Pending:
    """A yielded item, encoded; or `Pending` if a blob in it must be stored first."""
    event, data = (item.event, item.data) if isinstance(item, Message) else ("message", item)
    try:
        return event, dump_data(data, inline_limit=inline_limit)
    except LargeBlob:
        return Pending(event, data)
    except orjson.JSONEncodeError:
        # Too deep to encode: the run ends with an `error` saying so. (The
        # check only when it fails: a `with` around every event costs ~1 us.)
        with depth_checked():
            raise


class StreamFunction:
    """A generator function registered as a stream; its signature is its parameter schema."""

    def __init__(self, func: Callable[..., Any], name: str, description: str) -> None:
        if not (inspect.isgeneratorfunction(func) or inspect.isasyncgenfunction(func)):
            raise TypeError(f"{func.__qualname__} must be a generator function (sync or async)")
        self.func = func
        self.name = name
        self.description = description
        self.is_async = inspect.isasyncgenfunction(func)
        self.params = _params_model(func, name)

    def schema(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "params": self.params.model_json_schema(),
        }

    def validate(self, values: dict[str, Any]) -> dict[str, Any]:
        """Check and convert parameters; raises `pydantic.ValidationError`."""
        model = self.params.model_validate(values)
        return {name: getattr(model, name) for name in type(model).model_fields}

    def open(self, params: dict[str, Any], settings: Settings) -> Source:
        """Call the generator function; its items come out of the source, encoded."""
        from .sources import AsyncSource, ThreadSource

        limit = settings.inline_blob_limit
        if self.is_async:
            return AsyncSource(self.func(**params), limit)
        return ThreadSource(self.func(**params), settings.close_timeout, limit)


def _params_model(func: Callable[..., Any], name: str) -> type[pydantic.BaseModel]:
    hints = inspect.get_annotations(func, eval_str=True)
    fields: dict[str, Any] = {}
    for param in inspect.signature(func).parameters.values():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD, param.POSITIONAL_ONLY):
            raise TypeError(f"stream {name!r}: parameter {param.name!r} must be a named parameter")
        if param.name in RESERVED_PARAMS:
            raise TypeError(f"stream {name!r}: parameter name {param.name!r} is reserved")
        default = ... if param.default is param.empty else param.default
        fields[param.name] = (hints.get(param.name, Any), default)
    config = pydantic.ConfigDict(extra="ignore")
    model: type[pydantic.BaseModel] = pydantic.create_model(
        f"{name}_params", __config__=config, **fields
    )
    return model
