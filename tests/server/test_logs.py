"""Logs: secrets masked in every line, and `--log-format json` lines with request ids."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import jwt
import pytest
from websockets.sync.client import connect

from tests.conftest import wait_until_serving
from tests.redis_server import RedisServer
from tests.test_cli import free_port
from tidewire.masking import mask
from tidewire.server import logs
from tidewire.server.logs import JsonFormatter, hide, redact

SECRET = "auth-secret-" + "k" * 24  # 36 bytes, an HMAC key
METRICS_TOKEN = "metrics-token-5b1f0e"
REDIS_PASSWORD = "redis-pw-c0ffee"


def token(**claims: object) -> str:
    return jwt.encode({"sub": "root", "exp": time.time() + 60, **claims}, SECRET)


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        ("redis://:pw1234@host:6379/0", "redis://:***@host:6379/0"),
        ("rediss://user:p%40ss@h/1 and more", "rediss://user:***@h/1 and more"),
        ("http://127.0.0.1:8000/x?y=1", "http://127.0.0.1:8000/x?y=1"),
        ("Authorization: Bearer abc.def", "Authorization: Bearer ***"),
        ("(b'authorization', b'bearer tok')", "(b'authorization', b'bearer ***')"),
        ("GET /x?a=1&token=t0k&access_token=t1 ", "GET /x?a=1&token=***&access_token=*** "),
        ("bad eyJhbGciOi.eyJzdWIi.c2ln here", "bad *** here"),
    ],
)
def test_redact_masks_what_secrets_look_like(text: str, masked: str) -> None:
    assert redact(text) == masked


def test_hidden_values_are_masked_anywhere() -> None:
    hide("a-hidden-value-123", None, "")
    assert redact("key=a-hidden-value-123;") == "key=***;"
    assert mask("s3://AKIA:topsecret@bucket") == "s3://AKIA:***@bucket"


def test_json_lines_mask_tracebacks_and_carry_the_request_id() -> None:
    hide("leaky-secret-value")
    try:
        raise RuntimeError("leaky-secret-value in redis://:pw9999@h")
    except RuntimeError:
        record = logging.LogRecord("tidewire", logging.ERROR, "f", 1, "failed %s", ("x",), None)
        record.exc_info = sys.exc_info()
    token = logs.REQUEST_ID.set("rid-7")
    try:
        line = JsonFormatter().format(record)
    finally:
        logs.REQUEST_ID.reset(token)
    entry = json.loads(line)
    assert entry["message"] == "failed x" and entry["request_id"] == "rid-7"
    assert entry["level"] == "error" and entry["logger"] == "tidewire"
    assert entry["time"].endswith("Z") and "T" in entry["time"]
    assert "RuntimeError" in entry["exception"]
    assert "leaky-secret-value" not in line and "pw9999" not in line


LEAKY_APP = """
import logging, os
from tidewire import Tidewire

tw = Tidewire()

@tw.stream
async def leaky():
    # What careless code does: log the broker's URL, fail with a secret in the message.
    logging.getLogger("tidewire.app").warning("broker is %s", os.environ["TIDEWIRE_BROKER"])
    yield 1
    raise RuntimeError("could not use " + os.environ["TIDEWIRE_AUTH_SECRET"])
"""


@pytest.mark.parametrize("log_format", ["json", "text"])
def test_no_secret_in_the_log_at_any_level(tmp_path: Path, log_format: str) -> None:
    (tmp_path / "leaky.py").write_text(LEAKY_APP)
    redis = RedisServer(tmp_path / "redis").start()
    redis.client().config_set("requirepass", REDIS_PASSWORD)
    broker = f"redis://:{REDIS_PASSWORD}@127.0.0.1:{redis.port}/0"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "TIDEWIRE_AUTH_SECRET": SECRET,
        "TIDEWIRE_METRICS_TOKEN": METRICS_TOKEN,
    }
    args = ["leaky:tw", "--port", str(port), "--broker", broker, "--log-level", "trace"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "tidewire", "serve", *args, "--log-format", log_format],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    admin = token(tidewire={"admin": True})
    try:
        wait_until_serving(proc, url)
        bearer = {"authorization": f"Bearer {admin}", "x-request-id": "req-leaky"}
        streamed = httpx.get(f"{url}/streams/leaky", headers=bearer)
        assert streamed.status_code == 200 and '"error"' in streamed.text
        assert streamed.headers["x-request-id"] == "req-leaky"
        metrics = {"authorization": f"Bearer {METRICS_TOKEN}"}
        assert httpx.get(f"{url}/metrics", headers=metrics).status_code == 200
        assert httpx.get(f"{url}/channels/c/events?access_token={admin}&after=1").status_code
        with connect(f"ws://127.0.0.1:{port}/channels/c/ws?access_token={admin}"):
            pass
    finally:
        proc.terminate()
        output = proc.communicate(timeout=15)[0]
        redis.kill()
    for secret in (SECRET, admin, METRICS_TOKEN, REDIS_PASSWORD):
        assert secret not in output
    assert "could not use ***" in output  # the lines are there, masked
    assert f"redis://:***@127.0.0.1:{redis.port}/0" in output
    if log_format == "json":
        check_json_lines(output)


def check_json_lines(output: str) -> None:
    lines = [line for line in output.splitlines() if line.startswith("{")]
    entries = [json.loads(line) for line in lines]
    assert len(lines) >= 5
    access = [e for e in entries if e["logger"] == "tidewire.access"]
    [stream] = [e for e in access if e.get("request_id") == "req-leaky"]
    assert stream["method"] == "GET" and stream["route"] == "/streams/{name}"
    assert stream["status"] == 200 and stream["identity"] == "sub:root"
    assert stream["duration_ms"] > 0 and stream["level"] == "info"
    # The run's failure, logged from its own task, names the request that started it.
    [failed] = [e for e in entries if "failed" in e["message"] and "exception" in e]
    assert failed["request_id"] == "req-leaky"
    # uvicorn's own access lines give way to ours: one line per request.
    assert not [e for e in entries if e["logger"] == "uvicorn.access"]
    assert len([e for e in access if e["path"] == "/metrics"]) == 1
