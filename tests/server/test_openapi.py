"""The OpenAPI document tells the truth: schemathesis, every check, against a real server.

The answers each route gives (errors with their `{"detail"}` models, NDJSON
and SSE streams, downloads in any type) are declared, and a schemathesis run
(examples, coverage, fuzzing, stateful; all checks) over `/openapi.json`
finds nothing. Streams are bounded: the one stream it is given ends after a
few events, and a channel subscription, which never ends, is read as SSE,
which schemathesis cuts after a few events or its request timeout.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import httpx
import pytest
import schemathesis
import schemathesis.engine
from pydantic import Field
from schemathesis.engine import events as engine_events

from tidewire import Tidewire
from tidewire.server.compat import add_original_file_routes
from tidewire.storage.local import LocalStorage

from ..conftest import QUICK, LiveServer

#: Requests per operation and phase: enough to reach every declared answer,
#: few enough for the whole run to take well under a minute on 2 cores.
EXAMPLES = 25
#: Longest a request may take.
REQUEST_TIMEOUT = 2.0
#: How long schemathesis listens to a live subscription (heartbeats every 0.3 s).
#: Not only there: a CI run failed on `GET /metrics` timing out at 0.5 s, this
#: value, so it bounds other operations' requests too; 1 s leaves them room on a
#: loaded machine.
SUBSCRIBE_TIMEOUT = 1.0


def make_app(data: Path) -> Tidewire:
    tw = Tidewire(storage=LocalStorage(data), settings=QUICK)

    @tw.stream
    async def count(n: Annotated[int, Field(ge=0, le=5)] = 3):  # type: ignore[no-untyped-def]
        """A short stream: at most 5 events."""
        for i in range(n):
            yield {"i": i}

    add_original_file_routes(tw.router, tw)
    return tw


def spec(client: httpx.Client) -> dict[str, Any]:
    response = client.get("/openapi.json")
    assert response.status_code == 200
    document: dict[str, Any] = response.json()
    return document


@pytest.fixture
def server(serve: Callable[..., LiveServer], tmp_path: Path) -> LiveServer:
    return serve(make_app(tmp_path))


# -- what is declared ------------------------------------------------------


def test_errors_and_content_types_are_declared(server: LiveServer) -> None:
    with httpx.Client(base_url=server.url) as client:
        paths = spec(client)["paths"]

    def statuses(path: str, method: str) -> set[str]:
        return set(paths[path][method]["responses"])

    def types(path: str, method: str, status: str) -> set[str]:
        return set(paths[path][method]["responses"][status].get("content", {}))

    assert {"404", "416", "206", "304"} <= statuses("/files/{file_id}", "get")
    assert types("/files/{file_id}", "get", "200") == {"*/*"}
    assert types("/files/{file_id}", "get", "206") == {"*/*", "multipart/byteranges"}
    assert "404" in statuses("/files/{file_id}", "delete")
    assert {"400", "413", "415", "422", "507"} <= statuses("/files", "post")
    assert {"400", "413", "422", "507"} <= statuses("/files/{file_id}", "put")
    assert {"412", "413", "415", "460"} <= statuses("/uploads/", "post")
    assert {"404", "409", "412", "415"} <= statuses("/uploads/{id}", "patch")
    assert {"400", "404", "415", "422", "503"} <= statuses("/streams/{name}", "post")
    for path in ("/streams/{name}", "/runs/{run_id}/events", "/channels/{name}/events"):
        assert types(path, "get", "200") == {"application/x-ndjson", "text/event-stream"}, path


#: Open without a token (DESIGN.md, "Access control").
OPEN = {"/healthz", "/readyz", "/metrics"}
#: Routes that answer 401 but never 403: they show only what the token may
#: start or owns (another's run is a 404, as one that does not exist).
NEVER_403 = {("get", "/streams"), ("get", "/runs/{run_id}"), ("get", "/runs/{run_id}/events")}


def test_access_control_answers_are_declared(server: LiveServer) -> None:
    with httpx.Client(base_url=server.url) as client:
        document = spec(client)
    checked = 0
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            responses = operation["responses"]
            if path in OPEN or method == "options":
                assert not {"401", "403"} & set(responses), (method, path)
                continue
            checked += 1
            assert "401" in responses, (method, path)
            assert "WWW-Authenticate" in responses["401"]["description"]
            assert ("403" in responses) != ((method, path) in NEVER_403), (method, path)
            for status in {"401", "403"} & set(responses):
                schema = responses[status]["content"]["application/json"]["schema"]
                assert schema["$ref"].endswith("/Problem"), (method, path, status)
    assert checked >= 20
    # A signed link's query stands in for a token on the download.
    for method in ("get", "head"):
        params = {p["name"]: p for p in document["paths"]["/files/{file_id}"][method]["parameters"]}
        assert {"exp", "sig"} <= set(params), method
        assert params["exp"]["in"] == params["sig"]["in"] == "query"
        assert not params["exp"]["required"] and "links" in params["exp"]["description"]


def test_a_422_may_say_it_in_a_sentence(server: LiveServer) -> None:
    with httpx.Client(base_url=server.url) as client:
        document = spec(client)
        answer = client.put("/files/a%01b", content=b"x")
    assert answer.status_code == 422 and isinstance(answer.json()["detail"], str)
    declared = document["paths"]["/files/{file_id}"]["put"]["responses"]["422"]
    ref = declared["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[-1]
    detail = document["components"]["schemas"][ref]["properties"]["detail"]
    assert {"type": "string"} in detail["anyOf"]


def test_put_shares_the_files_path(server: LiveServer) -> None:
    # One URL space, one path: `/files/{filename}` beside `/files/{file_id}`
    # is two templates for the same URLs, which OpenAPI does not allow.
    with httpx.Client(base_url=server.url) as client:
        paths = spec(client)["paths"]
    assert set(paths["/files/{file_id}"]) == {"get", "head", "put", "delete"}
    assert not [path for path in paths if path.startswith("/files/{filename")]


def test_a_malformed_after_is_400_even_when_last_event_id_wins(server: LiveServer) -> None:
    # The spec gives `after` a pattern; the header winning is no reason to let junk through.
    with httpx.Client(base_url=server.url) as client:
        run = client.post("/streams/count", params={"detach": "true"}).json()["run"]
        for path in ("/channels/news/events", f"/runs/{run}/events"):
            # Streamed: were it accepted, the subscription would never end.
            headers = {"Last-Event-ID": "0"}
            with client.stream("GET", path, params={"after": "x"}, headers=headers) as response:
                assert response.status_code == 400, path
                assert "not an event id" in response.read().decode()


# -- schemathesis ----------------------------------------------------------
#
# Run as its command line runs it (`schemathesis.engine`): every phase, the
# stateful one too, which chains uploads to downloads and deletes. (Its pytest
# plugin's lazy loader, `from_fixture`, sets a private attribute of pytest's
# nodes that pytest 9 no longer has.)

CONFIG: dict[str, Any] = {
    "seed": 20260101,
    # No cache of earlier runs in .schemathesis/: each run the same, and nothing left behind.
    "cache": {"enabled": False},
    "workers": 1,
    "request-timeout": REQUEST_TIMEOUT,
    "max-stream-events": 5,
    "generation": {"max-examples": EXAMPLES, "deterministic": True},
    "checks": {
        # tus 1.0.0 answers a missing or other Tus-Resumable with 412 (and
        # Tus-Version): schemathesis does not expect that status by default.
        "missing_required_header": {"expected-statuses": [400, 412, 415, 422]},
        "negative_data_rejection": {
            "expected-statuses": [400, 404, 405, 409, 412, 413, 415, 416, 422, 460]
        },
    },
    "operations": [
        # Before "/files", which matches this path too. `?exp=&sig=` are a
        # signed link, judged as one: a schema-valid pair that the server did
        # not sign is refused (403), as it must be.
        *(
            {
                "include-path": "/files/{file_id}",
                "include-method": method,
                "checks": {
                    "positive_data_acceptance": {
                        "expected-statuses": ["2xx", "3xx", "400", "403", "404", "409", "429"]
                    }
                },
            }
            for method in ("GET", "HEAD")
        ),
        {
            "include-path": "/files",
            "include-method": "GET",
            # `?name=` answers one file and takes no cursor (400): OpenAPI
            # parameters cannot exclude each other, so a schema-valid request
            # may carry both. Every other 400 there is a malformed cursor,
            # which the parameter's pattern makes schema-invalid.
            "checks": {
                "positive_data_acceptance": {
                    "expected-statuses": ["2xx", "3xx", "400", "404", "409", "429"]
                }
            },
        },
        # The stream of this app, so that runs really start (at most 5 events).
        {
            "include-path": "/streams/{name}",
            "include-method": "GET",
            "parameters": {"path.name": "count"},
        },
        {
            "include-path": "/streams/{name}",
            "include-method": "POST",
            "parameters": {"path.name": "count"},
            # The body holds the parameters of the stream that {name} names:
            # OpenAPI cannot tie a body's schema to a path value, so it says
            # "an object", and a schema-valid body may still be a 422 naming
            # the field (`n=abc`).
            "checks": {
                "positive_data_acceptance": {
                    "expected-statuses": ["2xx", "3xx", "404", "409", "422", "429"]
                }
            },
        },
        # A subscription is live until the client leaves. As SSE, schemathesis
        # leaves after max-stream-events or request-timeout; NDJSON it would
        # read to an end that never comes.
        {
            "include-path": "/channels/{name}/events",
            "include-method": "GET",
            "headers": {"Accept": "text/event-stream"},
            # Nothing is published while it listens: each request takes all of it.
            "request-timeout": SUBSCRIBE_TIMEOUT,
        },
    ],
}


# A tus PATCH body is raw bytes, as application/octet-stream's: schemathesis
# has no serializer for tus's own name of the type.
schemathesis.serializer.alias("application/offset+octet-stream", "application/octet-stream")


def failures(events: Iterator[Any], tested: set[str]) -> list[str]:
    """What the run found, one readable block per failed check or error.

    Adds to `tested` the operations it sent requests to.
    """
    found: list[str] = []
    for event in events:
        if isinstance(event, engine_events.ScenarioFinished):
            if event.recorder.interactions:
                tested.add(event.recorder.label)
            for checks in event.recorder.checks.values():
                for check in checks:
                    if check.failure_info is not None:
                        failure = check.failure_info.failure
                        found.append(
                            f"{failure.operation}: {failure.title}\n{failure.message}\n"
                            f"{check.failure_info.code_sample}"
                        )
        elif isinstance(event, engine_events.NonFatalError | engine_events.FatalError):
            found.append(f"error: {event!r}")
        elif isinstance(event, engine_events.EngineFinished):
            found += [f"{failure.title}: {failure.message}" for failure in event.failures]
    return found


def test_the_server_does_what_its_openapi_says(server: LiveServer) -> None:
    config = schemathesis.Config.from_dict(CONFIG)
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json", config=config)
    schema.config.checks.update(included_check_names=["all"])
    tested: set[str] = set()
    found = sorted(set(failures(schemathesis.engine.from_schema(schema).execute(), tested)))
    operations = {op.ok().label for op in schema.get_all_operations()}
    assert operations <= tested, f"not tested: {operations - tested}"
    assert not found, f"{len(found)} failures:\n\n" + "\n\n".join(found)
