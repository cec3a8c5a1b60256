"""Events and their wire formats: pure encoding and decoding, no server."""

from __future__ import annotations

import base64
import datetime
import gc
import itertools
import json
import pickle
import sys
import tracemalloc
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import orjson
import pydantic
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.wire import parse_sse
from tidewire import Blob, Message
from tidewire.events import (
    MAX_DEPTH,
    NDJSON_HEARTBEAT,
    RESERVED,
    SSE_HEARTBEAT,
    Envelope,
    SSEDecoder,
    TooDeep,
    check_depth,
    decode_blobs,
    depth_checked,
    dump_data,
    iter_ndjson,
    load_json,
    parse_ndjson_line,
)

PNG_HEAD = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"


def event(id: str, data: Any, kind: str = "message") -> Envelope:
    return Envelope(id, int(id) if id.isdigit() else 0, kind, dump_data(data))


def envelope(e: Envelope) -> dict[str, Any]:
    return {"id": e.id, "event": e.event, "data": orjson.loads(e.data_json)}


# ---------------------------------------------------------------- envelopes


SAMPLES: list[Any] = [
    None,
    0,
    -3.5,
    "",
    "plain",
    "two\nlines\r\nand a\rlone CR",
    "unicode: é 漢字 \u2028 \x85 \U0001f30a",
    [1, [2, [3]], {"k": None}],
    {"text": "0", "img": Blob(PNG_HEAD, "image/png"), "nested": {"raw": b"\x00\xff"}},
    True,
]


@pytest.mark.parametrize("data", SAMPLES, ids=range(len(SAMPLES)))
def test_ndjson_sse_and_ws_carry_the_same_event(data: Any) -> None:
    e = event("42", data, "progress")
    expected = {"id": "42", "event": "progress", "data": json.loads(dump_data(data))}

    line = e.ndjson()
    assert line.endswith(b"\n") and line.count(b"\n") == 1, "one NDJSON line per event"
    assert json.loads(line) == expected

    frame = e.ws()
    assert isinstance(frame, str) and "\n" not in frame
    assert json.loads(frame) == expected

    sse = e.sse()
    assert sse.endswith(b"\n\n")
    events, comments = parse_sse(sse.decode())
    assert events == [expected]
    assert comments == []


def test_default_event_type_on_the_wire_is_message() -> None:
    e = event("1", {"a": 1})
    assert json.loads(e.ndjson())["event"] == "message"
    assert b"event: message\n" in e.sse()
    assert b"id: 1\n" in e.sse()


@pytest.mark.parametrize(
    ("id", "type", "data_json"),
    [
        ("1700000000000-7", "message", b'{"text":"7","img":{"$blob":{"data":"iVBO"}}}'),
        ("r1.1-2", "progress", '"漢字 \\n"'.encode()),
        # Lines to split, as no JSON from orjson has: fastapi's own formatting.
        ("9", "message", b'{"a":\n1,\r\n"b":\r2}'),
        ("1\n2", "message", b"1"),
    ],
)
def test_an_sse_frame_is_what_fastapi_formats(id: str, type: str, data_json: bytes) -> None:
    # Spliced when every field is one line (most of an SSE watcher's CPU per event, W1).
    from fastapi.sse import format_sse_event

    e = Envelope(id, 1, type, data_json)
    assert e.sse() == format_sse_event(data_str=data_json.decode(), event=type, id=id)


def test_encodings_are_made_once_and_reused() -> None:
    e = event("3", {"x": [1, 2, 3]})
    assert e.ndjson() is e.ndjson()
    assert e.sse() is e.sse()
    assert e.ws() is e.ws()


def test_data_json_is_spliced_verbatim_into_the_ndjson_line() -> None:
    data_json = b'{"b":1,"a":[1.5,"x"]}'
    e = Envelope("9", 9, "message", data_json)
    assert e.ndjson() == b'{"id":"9","event":"message","data":' + data_json + b"}\n"
    assert e.ws() == e.ndjson()[:-1].decode()


def test_event_ids_and_types_are_json_escaped() -> None:
    e = Envelope('a"b\\c', 0, 'we"ird', b"1")
    assert json.loads(e.ndjson()) == {"id": 'a"b\\c', "event": 'we"ird', "data": 1}


def test_events_compare_by_id_type_and_data() -> None:
    assert event("1", {"a": 1}) == Envelope("1", 99, "message", b'{"a":1}')
    assert event("1", {"a": 1}) != event("2", {"a": 1})
    assert event("1", {"a": 1}) != event("1", {"a": 1}, "other")
    assert event("1", {"a": 1}) != event("1", {"a": 2})


def test_heartbeats() -> None:
    assert NDJSON_HEARTBEAT.strip() == b""
    assert parse_ndjson_line(NDJSON_HEARTBEAT) is None
    events, comments = parse_sse(SSE_HEARTBEAT.decode())
    assert events == [] and comments == [": ping"]


# ---------------------------------------------------------------- blobs


def test_bytes_become_a_tagged_blob() -> None:
    raw = bytes(range(256))
    assert orjson.loads(dump_data(raw)) == {
        "$blob": {
            "type": "application/octet-stream",
            "size": 256,
            "data": base64.b64encode(raw).decode(),
        }
    }


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_bytes_like_values_become_blobs(kind: type) -> None:
    raw = b"\x00\x01binary\xff"
    tagged = orjson.loads(dump_data({"v": kind(raw)}))["v"]["$blob"]
    assert tagged["size"] == len(raw)
    assert base64.b64decode(tagged["data"]) == raw


def test_blob_keeps_its_type_and_round_trips_exactly() -> None:
    raw = PNG_HEAD + bytes(range(256)) * 3
    blob = Blob(raw, "image/png")
    tagged = orjson.loads(dump_data(blob))
    assert tagged["$blob"]["type"] == "image/png"
    assert tagged["$blob"]["size"] == len(raw)

    back = decode_blobs(tagged)
    assert isinstance(back, Blob)
    assert back == raw and bytes(back) == raw
    assert back.type == "image/png"


def test_blobs_nested_in_dicts_and_lists_round_trip() -> None:
    value = {
        "text": "x",
        "imgs": [Blob(b"\x89PNG1", "image/png"), Blob(b"GIF89a", "image/gif")],
        "deep": {"list": [[b"\x00"], {"raw": bytearray(b"\xfe\xff")}]},
        "empty": b"",
    }
    back = decode_blobs(orjson.loads(dump_data(value)))
    assert back["text"] == "x"
    assert [(bytes(b), b.type) for b in back["imgs"]] == [
        (b"\x89PNG1", "image/png"),
        (b"GIF89a", "image/gif"),
    ]
    assert back["deep"]["list"][0][0] == b"\x00"
    assert back["deep"]["list"][0][0].type == "application/octet-stream"
    assert back["deep"]["list"][1]["raw"] == b"\xfe\xff"
    assert back["empty"] == b"" and isinstance(back["empty"], Blob)


def test_event_data_decodes_blobs() -> None:
    e = event("1", {"img": Blob(PNG_HEAD, "image/png")})
    img = e.data["img"]
    assert isinstance(img, Blob) and img == PNG_HEAD and img.type == "image/png"


def test_decode_blobs_leaves_other_shapes_alone() -> None:
    by_url = {"$blob": {"type": "image/png", "size": 9_000_000, "url": "/files/abc"}}
    assert decode_blobs(by_url) == by_url
    with_more_keys = {"$blob": {"type": "a/b", "size": 1, "data": "eA=="}, "other": 1}
    assert decode_blobs(with_more_keys) == with_more_keys
    assert decode_blobs({"$blob": "not a dict"}) == {"$blob": "not a dict"}
    assert decode_blobs([1, "two", None]) == [1, "two", None]


@given(st.binary(max_size=600), st.sampled_from(["image/png", "application/pdf", "text/x-a"]))
def test_any_bytes_round_trip_through_every_transport(raw: bytes, kind: str) -> None:
    e = event("5", {"b": Blob(raw, kind)})
    for wire in (e.ndjson(), e.ws().encode()):
        back = decode_blobs(json.loads(wire))["data"]["b"]
        assert (bytes(back), back.type) == (raw, kind)
    [decoded] = SSEDecoder().feed(e.sse())
    assert (bytes(decoded.data["b"]), decoded.data["b"].type) == (raw, kind)


def test_blob_pickles_with_its_type() -> None:
    blob = pickle.loads(pickle.dumps(Blob(b"abc", "image/png")))
    assert isinstance(blob, Blob) and blob == b"abc" and blob.type == "image/png"


def test_unserializable_values_raise_type_error() -> None:
    with pytest.raises(TypeError):
        dump_data({"x": object()})


def test_decimals_are_exact_strings_as_pydantic_sends_them() -> None:
    # As a float, 0.1 would be 0.1000000000000000055… and the big one would lose digits.
    values = [Decimal("0.1"), Decimal("12345678901234567890.000000001"), Decimal("-1E+3")]
    for limit in (None, 1 << 10):  # both encoding paths: with and without an inline limit
        assert orjson.loads(dump_data(values, inline_limit=limit)) == [str(v) for v in values]
    assert dump_data({"d": Decimal("2.50")}) == b'{"d":"2.50"}'
    assert orjson.loads(dump_data(values)) == orjson.loads(
        pydantic.TypeAdapter(list[Decimal]).dump_json(values)
    )


# ---------------------------------------------------------------- pydantic


class Point(pydantic.BaseModel):
    x: int
    label: str
    when: datetime.datetime


class Holder(pydantic.BaseModel):
    points: list[Point]


def test_pydantic_models_serialize_as_their_json() -> None:
    when = datetime.datetime(2024, 5, 6, 7, 8, 9, tzinfo=datetime.UTC)
    point = Point(x=1, label="a", when=when)
    dumped = orjson.loads(dump_data(point))
    assert set(dumped) == {"x", "label", "when"}
    assert (dumped["x"], dumped["label"]) == (1, "a")
    assert datetime.datetime.fromisoformat(dumped["when"]) == when
    nested = orjson.loads(dump_data({"h": Holder(points=[point, point])}))
    assert nested["h"]["points"][1]["x"] == 1


class Picture(pydantic.BaseModel):
    name: str
    img: bytes


def test_bytes_inside_a_pydantic_model_are_blobs_too() -> None:
    # The contract: any bytes value travels as a tagged $blob and round-trips
    # exactly, also when a producer yields it inside a model.
    raw = PNG_HEAD + b"\x00\xff\xfe"
    data = decode_blobs(orjson.loads(dump_data(Picture(name="p", img=raw))))
    assert data["name"] == "p"
    assert isinstance(data["img"], Blob) and data["img"] == raw


# ---------------------------------------------------------------- Message


def test_message_names_the_type() -> None:
    assert Message({"a": 1}).event == "message"
    assert Message({"a": 1}, event="progress").event == "progress"


@pytest.mark.parametrize("kind", sorted(RESERVED))
def test_message_refuses_reserved_types(kind: str) -> None:
    assert kind in {"end", "error", "cancelled", "gap", "unavailable"}
    with pytest.raises(ValueError, match="reserved"):
        Message(1, event=kind)


def test_reserved_set_is_exactly_the_contracts() -> None:
    # DESIGN.md: `unavailable` too ("Publishers cannot use them"): a notice
    # with that type would read, to a client, as the server going away.
    assert frozenset({"end", "error", "cancelled", "gap", "unavailable"}) == RESERVED


@pytest.mark.parametrize("kind", ["two\nlines", "cr\rhere", "crlf\r\n", "", "x" * 201])
def test_message_refuses_types_sse_cannot_carry(kind: str) -> None:
    with pytest.raises(ValueError):
        Message(1, event=kind)


def test_message_accepts_a_200_character_type() -> None:
    assert Message(1, event="x" * 200).event == "x" * 200


# ---------------------------------------------------------------- SSEDecoder


def test_sse_decoder_reads_fields_skips_comments_and_remembers_retry_and_id() -> None:
    decoder = SSEDecoder()
    stream = (
        b"retry: 2000\n\n"
        b": ping\n\n"
        b'event: progress\ndata: {"a":\ndata: 1}\nid: 7\n\n'
        b":another comment\n"
        b"data: 2\n\n"
    )
    events = decoder.feed(stream)
    assert decoder.retry == 2000
    assert [(e.id, e.event, e.data) for e in events] == [
        ("7", "progress", {"a": 1}),
        ("7", "message", 2),
    ]
    assert decoder.last_id == "7"


def test_sse_decoder_id_without_data_sets_last_id_only() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"id: 12\n\nevent: lonely\n\ndata: 3\n\n") == [
        Envelope("12", 0, "message", b"3")
    ]
    assert decoder.last_id == "12"


def test_sse_decoder_ignores_a_bad_retry_and_an_id_with_nul() -> None:
    decoder = SSEDecoder()
    decoder.feed(b"retry: 10\n\nretry: soon\n\nid: 1\ndata: 1\n\nid: a\0b\ndata: 2\n\n")
    assert decoder.retry == 10
    assert decoder.last_id == "1"


def test_sse_decoder_waits_for_the_blank_line() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"id: 1\ndata: 1\n") == []
    assert decoder.feed(b"\n") == [Envelope("1", 0, "message", b"1")]


def test_sse_decoder_handles_multibyte_characters_split_between_chunks() -> None:
    wire = event("1", "漢字 \U0001f30a").sse()
    decoder = SSEDecoder()
    events = [e for byte in wire for e in decoder.feed(bytes([byte]))]
    assert [e.data for e in events] == ["漢字 \U0001f30a"]


SSE_SAMPLES = st.lists(
    st.tuples(
        st.integers(min_value=1, max_value=10**12).map(str),
        st.sampled_from(["message", "progress", "x.y-z"]),
        st.recursive(
            st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=20),
            lambda inner: (
                st.lists(inner, max_size=3)
                | st.dictionaries(st.text(max_size=5), inner, max_size=3)
            ),
            max_leaves=8,
        ),
        st.booleans(),  # a heartbeat before this event
    ),
    max_size=8,
)


def _sse_stream(
    samples: list[tuple[str, str, Any, bool]], eol: bytes
) -> tuple[bytes, list[Envelope]]:
    parts = [b"retry: 1500\n\n"]
    expected = []
    for id_, kind, data, ping in samples:
        e = Envelope(id_, 0, kind, orjson.dumps(data))
        expected.append(e)
        if ping:
            parts.append(SSE_HEARTBEAT)
        parts.append(e.sse())
    # More traffic follows the last event, as a heartbeat does on a live stream.
    parts.append(SSE_HEARTBEAT)
    return b"".join(parts).replace(b"\n", eol), expected


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(data)) for c in cuts})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


@settings(max_examples=200, deadline=None)
@given(
    SSE_SAMPLES,
    st.sampled_from([b"\n", b"\r\n", b"\r"]),
    st.lists(st.integers(min_value=0, max_value=4000), max_size=40),
)
def test_sse_decoder_gives_the_same_events_whatever_the_chunking(
    samples: list[tuple[str, str, Any, bool]], eol: bytes, cuts: list[int]
) -> None:
    wire, expected = _sse_stream(samples, eol)
    decoder = SSEDecoder()
    got = [e for chunk in _split(wire, cuts) for e in decoder.feed(chunk)]
    assert got == expected
    assert [e.data for e in got] == [orjson.loads(e.data_json) for e in expected]
    assert decoder.retry == 1500
    assert decoder.last_id == (expected[-1].id if expected else None)


@settings(max_examples=100, deadline=None)
@given(SSE_SAMPLES, st.lists(st.integers(min_value=0, max_value=4000), max_size=20))
def test_sse_decoder_crlf_split_between_chunks(
    samples: list[tuple[str, str, Any, bool]], cuts: list[int]
) -> None:
    # Every CRLF is cut between its CR and its LF, plus cuts anywhere else.
    wire, expected = _sse_stream(samples, b"\r\n")
    crs = [i + 1 for i, byte in enumerate(wire) if byte == 0x0D]
    pieces = _split(wire, crs + cuts)
    assert any(a.endswith(b"\r") and b.startswith(b"\n") for a, b in itertools.pairwise(pieces))
    decoder = SSEDecoder()
    got = [e for piece in pieces for e in decoder.feed(piece)]
    assert got == expected
    assert decoder.retry == 1500


def test_sse_decoder_lone_cr_then_more_is_a_line_end() -> None:
    decoder = SSEDecoder()
    got = decoder.feed(b"data: 1\r") + decoder.feed(b"\r")
    # A CR at a chunk's end may be held (half a CRLF?) until the next byte comes.
    assert got in ([], [Envelope("", 0, "message", b"1")])
    got += decoder.feed(b"data: 2\r\r:")
    assert got == [Envelope("", 0, "message", b"1"), Envelope("", 0, "message", b"2")]
    assert decoder.feed(b"\n") == []  # ":" + LF: a comment, not a blank line


# ---------------------------------------------------------------- NDJSON


def test_parse_ndjson_line() -> None:
    e = parse_ndjson_line(b'{"id":"4","event":"progress","data":{"p":0.5}}')
    assert e is not None and (e.id, e.event, e.data) == ("4", "progress", {"p": 0.5})
    assert parse_ndjson_line("   ") is None
    assert parse_ndjson_line(b"\r") is None


def test_iter_ndjson_lines_spanning_chunks_and_blank_heartbeats() -> None:
    chunks = [
        b"\n",
        b'{"id":"1","event":"mes',
        b'sage","data":1}\n\n\n{"id":"2",',
        b'"event":"message","data":{"b":',
        b'"x"}}\n',
        b"\n",
        b'{"id":"3","event":"end","data":null}',  # no final newline
    ]
    got = list(iter_ndjson(iter(chunks)))
    assert [(e.id, e.event, e.data) for e in got] == [
        ("1", "message", 1),
        ("2", "message", {"b": "x"}),
        ("3", "end", None),
    ]


def test_iter_ndjson_accepts_crlf_lines() -> None:
    got = list(iter_ndjson(iter([b'{"id":"1","event":"message","data":1}\r\n\r\n'])))
    assert [(e.id, e.data) for e in got] == [("1", 1)]


@settings(max_examples=150, deadline=None)
@given(
    SSE_SAMPLES,
    st.lists(st.integers(min_value=0, max_value=4000), max_size=40),
)
def test_iter_ndjson_gives_the_same_events_whatever_the_chunking(
    samples: list[tuple[str, str, Any, bool]], cuts: list[int]
) -> None:
    expected = [Envelope(id_, 0, kind, orjson.dumps(data)) for id_, kind, data, _ in samples]
    wire = b"".join(
        (NDJSON_HEARTBEAT if ping else b"") + e.ndjson()
        for e, (_, _, _, ping) in zip(expected, samples, strict=True)
    )
    got = list(iter_ndjson(iter(_split(wire, cuts))))
    assert got == expected


# ---------------------------------------------------------------- nesting depth


def nested(depth: int, leaf: Any = 1, kind: str = "list") -> Any:
    """`leaf` inside `depth` arrays (or objects)."""
    value = leaf
    for _ in range(depth):
        value = [value] if kind == "list" else {"k": value}
    return value


@pytest.mark.parametrize("kind", ["list", "dict"])
def test_data_as_deep_as_orjson_writes_passes_and_one_level_more_is_too_deep(kind: str) -> None:
    check_depth(nested(MAX_DEPTH, kind=kind))
    assert orjson.loads(dump_data(nested(MAX_DEPTH, kind=kind))) == nested(MAX_DEPTH, kind=kind)
    with pytest.raises(TooDeep, match=f"nested deeper than {MAX_DEPTH} levels is not accepted"):
        check_depth(nested(MAX_DEPTH + 1, kind=kind))


def test_depth_checked_turns_orjsons_encode_error_into_too_deep() -> None:
    # This pins the words orjson uses: if an upgrade changes them, this fails.
    with pytest.raises(TooDeep), depth_checked():
        dump_data(nested(MAX_DEPTH + 1))
    # A blob is written as {"$blob": {...}}: two levels more.
    with pytest.raises(TooDeep), depth_checked():
        dump_data(nested(MAX_DEPTH - 1, b"raw"))
    # Other encoding errors are not about depth and pass as they are.
    with pytest.raises(TypeError, match="not JSON serializable") as caught, depth_checked():
        dump_data(object())
    assert not isinstance(caught.value, TooDeep)


def test_too_deep_is_a_value_error_that_pickles() -> None:
    # A ValueError, as other data a client may not send is (routes answer 422).
    assert isinstance(TooDeep(), ValueError)
    copy = pickle.loads(pickle.dumps(TooDeep()))
    assert str(copy) == str(TooDeep())


@pytest.mark.parametrize(
    "depth",
    # Readable and writable; readable by orjson but not writable; past what orjson reads.
    [MAX_DEPTH + 1, 300, 1024, 1025, 5000],
)
def test_load_json_refuses_what_could_not_be_sent_on(depth: int) -> None:
    for text in ("[" * depth + "]" * depth, '{"a":' * depth + "1" + "}" * depth):
        with pytest.raises(TooDeep):
            load_json(text)
        with pytest.raises(TooDeep):
            load_json(text.encode())


def test_load_json_decodes_what_may_be_sent_on() -> None:
    text = "[" * MAX_DEPTH + "]" * MAX_DEPTH
    assert load_json(text) == nested(MAX_DEPTH - 1, [])
    assert load_json(b'{"a": [1, "x"]}') == {"a": [1, "x"]}
    with pytest.raises(orjson.JSONDecodeError) as caught:
        load_json(b'{"a": ')
    assert not isinstance(caught.value, TooDeep)


# -- memory: what a retained event keeps ---------------------------------------


def _kept_bytes_each(make: Callable[[int], object], n: int = 2_000) -> float:
    """Bytes still allocated per object after making `n` of them and keeping them all."""
    gc.collect()
    tracemalloc.start()
    try:
        kept = [make(i) for i in range(n)]
        allocated = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert len(kept) == n
    return allocated / n


@pytest.mark.parametrize("size", [10, 100, 1_000, 20_000])
def test_encoded_data_is_right_sized(size: int) -> None:
    # orjson's result sits in a buffer of 4 KB or more whatever its length;
    # sys.getsizeof cannot see it (it reports the length), tracemalloc can.
    value = {"text": "x" * size}
    encoded = dump_data(value)
    assert sys.getsizeof(encoded) - len(encoded) < 40
    each = _kept_bytes_each(lambda i: dump_data({"text": "x" * size, "i": i}))
    assert each < sys.getsizeof(encoded) + 80  # a list slot, allocator rounding
    stored = _kept_bytes_each(
        lambda i: dump_data({"text": "x" * size, "i": i}, inline_limit=10, urls={})
    )
    assert stored < sys.getsizeof(encoded) + 80


def test_a_retained_event_keeps_right_sized_encodings() -> None:
    data = {"seq": 1, "text": "hello " * 12}
    wire = len(Envelope("12345", 12345, "message", dump_data(data)).ndjson())

    def event(i: int) -> Envelope:
        return Envelope(str(i + 10_000), i + 10_000, "message", dump_data(data))

    bare = _kept_bytes_each(event)
    assert bare < wire + 250  # the object, its id and its data: no 4 KB buffer

    def watched(i: int) -> Envelope:
        e = event(i)
        e.ndjson(), e.sse(), e.ws()
        return e

    # Each encoding costs about its length, once.
    assert _kept_bytes_each(watched) < bare + 3 * (wire + 60)


def test_an_event_watched_over_websockets_only_keeps_no_ndjson_line() -> None:
    event = Envelope("1", 1, "message", dump_data({"a": 1}))
    assert event.ws() == event.ndjson()[:-1].decode()
    fresh = Envelope("1", 1, "message", dump_data({"a": 1}))
    fresh.ws()
    assert fresh._ndjson is None
    assert fresh.ws() is fresh.ws()


def test_decoded_events_are_right_sized() -> None:
    line = b'{"id":"7","event":"message","data":{"text":"' + b"y" * 200 + b'"}}'
    parsed = parse_ndjson_line(line)
    assert parsed is not None
    each = _kept_bytes_each(lambda i: parse_ndjson_line(line))
    assert each < len(line) + 300


def test_a_named_event_is_made_once_and_shares_its_encodings() -> None:
    # Every watcher of a run reads its events as `<run id>.<log id>`: the named
    # twin is kept with the event, so its encodings are made once, not per watcher.
    event = Envelope("7", 7, "message", b'{"a":1}')
    first = event.named("r1.")
    assert first.id == "r1.7" and first.data_json is event.data_json
    assert event.named("r1.") is first
    assert first.sse() is event.named("r1.").sse()
    assert b"id: r1.7" in first.sse()
