"""A real S3-compatible server for tests: moto's server mode, in a process of its own.

Test modules that need S3 import the fixtures:

    from tests.s3_server import s3_bucket_fixture, s3_server_fixture  # noqa: F401

and ask for them by their names: `s3_server` (an `S3Server`, started once
per session) and `s3_bucket` (a fresh, empty bucket's name, per test).
AWS credentials are fake ones set in the environment, so nothing can reach a
real account.
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import boto3
import pytest

__all__ = ["S3Server", "s3_bucket", "s3_bucket_fixture", "s3_server", "s3_server_fixture"]

REGION = "us-east-1"
FAKE_AWS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": REGION,
    # No profile or config file of the machine's may add real credentials.
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    "AWS_EC2_METADATA_DISABLED": "true",
}


class S3Server:
    """`python -m moto.server` on a free port; `endpoint` is its URL."""

    def __init__(self) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> S3Server:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=1):
                    return self
            except OSError:
                if self.process.poll() is not None:
                    raise RuntimeError("moto's S3 server exited at start") from None
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("moto's S3 server did not start in time") from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
            self.process = None

    def client(self) -> Any:
        """A plain (blocking) boto3 client, to look at the bucket behind the storage's back."""
        return boto3.client("s3", endpoint_url=self.endpoint, region_name=REGION)

    def url(self, bucket: str, prefix: str = "") -> str:
        """The storage URL (`TIDEWIRE_STORAGE`) of a bucket on this server."""
        path = f"{bucket}/{prefix}" if prefix else bucket
        return f"s3://{path}?endpoint={self.endpoint}&region={REGION}"


@pytest.fixture(scope="session", name="s3_server")
def s3_server_fixture() -> Iterator[S3Server]:
    with pytest.MonkeyPatch.context() as patch:
        for name, value in FAKE_AWS.items():
            patch.setenv(name, value)
        patch.delenv("AWS_PROFILE", raising=False)
        server = S3Server().start()
        try:
            yield server
        finally:
            server.stop()


@pytest.fixture(name="s3_bucket")
def s3_bucket_fixture(s3_server: S3Server) -> str:
    """A fresh, empty bucket's name."""
    bucket = f"test-{secrets.token_hex(6)}"
    s3_server.client().create_bucket(Bucket=bucket)
    return bucket


# The same fixtures under their own names, for modules that import them so
# (they only use them through `request.getfixturevalue`).
s3_server = s3_server_fixture
s3_bucket = s3_bucket_fixture
