"""A real S3-compatible server for tests, and one storage interface over a folder and a bucket.

The server is moto's standalone server (werkzeug, in a thread of the test process) on
127.0.0.1 at a free port: the tests talk to it over HTTP with the same clients (s3fs,
aiobotocore) a real bucket would see — nothing is mocked inside the client.

Fixtures (import ``s3_fixture``/``s3_server_fixture`` into a test module to use them):

- ``s3_server`` (session): the server; skips cleanly when s3fs or moto[server] is missing.
- ``s3`` (module): the server with the environment saecache reads (AWS_ACCESS_KEY_ID,
  AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, ...) pointing at it, and no outside configuration.
- :class:`LocalBackend` / :class:`S3Backend`: where test caches go, with the few object
  operations the tests need (copy a cache in, read, write, delete one object, list keys), so
  one test class runs unchanged against a local folder and an S3 URL.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import socket
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

REGION = "us-east-1"
KEY_ID, SECRET = "testing", "testing"  # moto accepts any credentials until auth is enforced
ALLOW_ALL = '{"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}'


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (just now)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class S3Server:
    """moto's server on 127.0.0.1; ``endpoint`` is its URL."""

    def __init__(self):
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)

    def start(self) -> S3Server:
        self._server.start()
        deadline = time.monotonic() + 10
        while True:  # the thread binds the port asynchronously
            try:
                urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=1).close()
                return self
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def stop(self) -> None:
        self._server.stop()

    def client(self, service: str = "s3", **credentials):
        """A boto3 client for the server (credentials default to the tests' own)."""
        import boto3

        credentials = {"aws_access_key_id": KEY_ID, "aws_secret_access_key": SECRET, **credentials}
        return boto3.client(service, endpoint_url=self.endpoint, region_name=REGION, **credentials)

    def make_bucket(self, prefix: str = "bucket") -> str:
        """A new, empty bucket with a unique name."""
        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def _reset_auth(self, unauthenticated: str) -> None:
        request = urllib.request.Request(f"{self.endpoint}/moto-api/reset-auth", method="POST",
                                         data=unauthenticated.encode(),
                                         headers={"Content-Type": "text/plain"})
        urllib.request.urlopen(request, timeout=5).close()

    @contextlib.contextmanager
    def enforced_auth(self) -> Iterator[tuple[str, str]]:
        """Within: every request must be signed by a known IAM key. Yields a valid
        (key id, secret) made for the purpose; afterwards the server accepts anything again."""
        self._reset_auth("3")  # the next three requests (user, key, policy) pass unchecked
        try:
            iam, user = self.client("iam"), f"saecache-{uuid.uuid4().hex[:8]}"
            iam.create_user(UserName=user)
            key = iam.create_access_key(UserName=user)["AccessKey"]
            iam.put_user_policy(UserName=user, PolicyName="everything", PolicyDocument=ALLOW_ALL)
            yield key["AccessKeyId"], key["SecretAccessKey"]
        finally:
            self._reset_auth("inf")


@pytest.fixture(scope="session", name="s3_server")
def s3_server_fixture() -> Iterator[S3Server]:
    pytest.importorskip("s3fs", reason="S3 tests need s3fs (pip install -e '.[test]')")
    pytest.importorskip("moto.server", reason="S3 tests need moto[server] (pip install -e '.[test]')")
    pytest.importorskip("flask", reason="S3 tests need moto[server] (pip install -e '.[test]')")
    server = S3Server().start()
    yield server
    server.stop()


def s3_environment(server: S3Server, tmp: Path) -> dict[str, str | None]:
    """What an S3 user sets, pointing at ``server``; None removes a variable. No profile,
    config file or instance metadata service from outside the test can take part."""
    nowhere = str(tmp / "no-aws-config")
    return {"AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET,
            "AWS_ENDPOINT_URL": server.endpoint, "AWS_DEFAULT_REGION": REGION,
            "AWS_SHARED_CREDENTIALS_FILE": nowhere, "AWS_CONFIG_FILE": nowhere,
            "AWS_EC2_METADATA_DISABLED": "true",  # never ask 169.254.169.254 for credentials
            "AWS_ENDPOINT_URL_S3": None, "AWS_PROFILE": None, "AWS_DEFAULT_PROFILE": None,
            "AWS_SESSION_TOKEN": None, "AWS_SECURITY_TOKEN": None, "AWS_REGION": None,
            "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI": None, "AWS_CONTAINER_CREDENTIALS_FULL_URI": None,
            "AWS_WEB_IDENTITY_TOKEN_FILE": None, "AWS_ROLE_ARN": None}


def apply_environment(monkeypatch: pytest.MonkeyPatch, env: dict[str, str | None]) -> None:
    for name, value in env.items():
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)


@pytest.fixture(scope="module", name="s3")
def s3_fixture(s3_server, tmp_path_factory) -> Iterator[S3Server]:
    """The server, with the environment pointing at it for the module's tests."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        apply_environment(monkeypatch, s3_environment(s3_server, tmp_path_factory.mktemp("aws")))
        yield s3_server


# ---- one interface over a folder and a bucket -------------------------------------------------


class LocalBackend:
    """Caches as folders under ``root``."""

    name = "local"
    storage_options: dict[str, str] = {}

    def __init__(self, root: Path):
        self.root = root

    def location(self, name: str) -> str:
        return str(self.root / name)

    def copy_in(self, local_cache: Path, name: str) -> str:
        """A copy of the local cache folder at a new location; returns the location."""
        shutil.copytree(local_cache, self.root / name)
        return self.location(name)

    def read(self, location: str, key: str) -> bytes:
        return (Path(location) / key).read_bytes()

    def write(self, location: str, key: str, data: bytes) -> None:
        path = Path(location) / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    def delete(self, location: str, key: str) -> None:
        (Path(location) / key).unlink()

    def keys(self, location: str) -> list[str]:
        root = Path(location)
        return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


class S3Backend:
    """Caches as ``s3://bucket/name`` on the test server, written and read with boto3."""

    name = "s3"
    storage_options: dict[str, str] = {}

    def __init__(self, server: S3Server, bucket: str):
        self.server, self.bucket = server, bucket
        self.client = server.client()

    def location(self, name: str) -> str:
        return f"s3://{self.bucket}/{name}"

    def _key(self, location: str, key: str) -> str:
        return f"{location.removeprefix(f's3://{self.bucket}/')}/{key}"

    def copy_in(self, local_cache: Path, name: str) -> str:
        for path in sorted(p for p in local_cache.rglob("*") if p.is_file()):
            self.write(self.location(name), str(path.relative_to(local_cache)), path.read_bytes())
        return self.location(name)

    def read(self, location: str, key: str) -> bytes:
        return self.client.get_object(Bucket=self.bucket, Key=self._key(location, key))["Body"].read()

    def write(self, location: str, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self._key(location, key), Body=data)

    def delete(self, location: str, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._key(location, key))

    def keys(self, location: str) -> list[str]:
        prefix = self._key(location, "")
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return sorted(obj["Key"].removeprefix(prefix) for page in pages for obj in page.get("Contents", []))

