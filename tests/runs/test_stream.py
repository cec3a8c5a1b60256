"""Streams: registration, parameters from the signature, event types."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

import pydantic
import pytest

from tidewire import Message, Tidewire
from tidewire.runs import StreamFunction


def test_parameters_are_validated_from_the_signature() -> None:
    def gen(
        n: int, name: str = "x", scale: Annotated[float, pydantic.Field(gt=0)] = 1.0
    ) -> Iterator[int]:
        yield n

    stream = StreamFunction(gen, "gen", "")
    assert stream.validate({"n": "3", "scale": "2.5"}) == {"n": 3, "name": "x", "scale": 2.5}
    assert stream.validate({"n": 1, "unknown": 2}) == {"n": 1, "name": "x", "scale": 1.0}
    with pytest.raises(pydantic.ValidationError) as missing:
        stream.validate({})
    assert missing.value.errors()[0]["loc"] == ("n",)
    with pytest.raises(pydantic.ValidationError):
        stream.validate({"n": 1, "scale": 0})
    schema = stream.schema()["params"]
    assert schema["required"] == ["n"]
    assert schema["properties"]["scale"]["exclusiveMinimum"] == 0


def test_registration_refuses_what_cannot_be_a_stream() -> None:
    tw = Tidewire()

    def not_a_generator() -> int:
        return 1

    def star_args(*items: int) -> Iterator[int]:
        yield from items

    def reserved(detach: bool) -> Iterator[bool]:
        yield detach

    for func in (not_a_generator, star_args, reserved):
        with pytest.raises(TypeError):
            tw.stream(func)

    @tw.stream(name="twice", description="first")
    def first() -> Iterator[int]:
        yield 1

    with pytest.raises(ValueError, match="already registered"):
        tw.stream(name="twice")(first)
    assert tw.streams["twice"].description == "first"


def test_message_names_the_event_type() -> None:
    with pytest.raises(ValueError, match="reserved"):
        Message(1, event="end")
    assert Message(1, event="progress").event == "progress"
