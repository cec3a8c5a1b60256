"""The JSON refusals of server/routing.py: what a 503 says, and what it keeps to the log."""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable

import httpx
import pytest

from tests.conftest import LiveServer
from tidewire import Tidewire
from tidewire.broker.redis import RedisBroker
from tidewire.server.logs import RedactSecrets


def dead_port() -> int:
    """A port nothing listens on (bound, then closed)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_a_503_names_nothing_internal_and_the_log_has_the_detail_masked(
    serve: Callable[..., LiveServer], caplog: pytest.LogCaptureFixture
) -> None:
    port = dead_port()
    tw = Tidewire(broker=RedisBroker(f"redis://:hunter2@127.0.0.1:{port}/0"))
    caplog.set_level(logging.WARNING, logger="tidewire")
    with httpx.Client(base_url=serve(tw).url, timeout=10) as http:
        for method, path in (("POST", "/channels/x/events"), ("GET", "/channels/x/events")):
            response = http.request(method, path, json={"a": 1})
            assert response.status_code == 503, response.text
            detail = response.json()["detail"]
            assert "broker is unreachable" in detail and "try again" in detail
            # Neither the host, nor its port, nor the driver's words reach the client.
            assert "127.0.0.1" not in response.text and str(port) not in response.text
            assert "Error" not in response.text and "redis" not in response.text.lower()
    # The operator gets the detail: which host, why.
    logged = [r for r in caplog.records if r.name == "tidewire" and str(port) in r.getMessage()]
    assert logged, caplog.text


def test_the_log_filter_masks_broker_passwords_and_secret_parameters() -> None:
    record = logging.LogRecord(
        "tidewire",
        logging.WARNING,
        __file__,
        1,
        "broker %s failed; GET %s",
        ("redis://:hunter2@redis.internal:6379/0", "/files/x?sig=abc&secret_key=k&n=1"),
        None,
    )
    RedactSecrets().filter(record)
    message = record.getMessage()
    assert "hunter2" not in message and "redis://:***@redis.internal:6379/0" in message
    assert "sig=***" in message and "secret_key=***" in message and "n=1" in message
