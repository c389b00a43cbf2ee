"""A real S3 endpoint for tests: moto's server (`python -m moto.server`) on 127.0.0.1, spoken to over TCP.

In-process mocking (`mock_aws`) patches botocore and so never reaches pyarrow's C++ S3 client; a server does,
and the same endpoint can be handed to Ray workers. It runs as a subprocess so its state and its settings
(auth is switched on and off over HTTP, see `S3Server.auth_enforced`) stay out of the test process.

Load it with `pytest_plugins = ["tests.s3server"]` in tests/conftest.py; tests then ask for `s3_server`.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ACCESS_KEY = SECRET_KEY = "testing"  # moto accepts any key while its auth is off
REGION = "us-east-1"
START_TIMEOUT_S = 90  # moto imports every service: ~1 s idle, 20 s seen on this 2-core box under benchmark load

# Variables that would point the AWS SDK elsewhere than the test server: removed for the session.
_CLEARED = ("AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ROLE_ARN",
            "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
            "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI")


@dataclass(frozen=True)
class S3Server:
    endpoint: str                       # http://127.0.0.1:PORT
    bucket: str                         # created at start, empty
    env: dict[str, str] = field(repr=False)  # the AWS variables set for the session; pass to Ray workers

    def uri(self, key: str = "") -> str:
        return f"s3://{self.bucket}/{key.lstrip('/')}"

    def client(self, service: str = "s3", **kwargs):
        """A boto3 client on this server, with the session's keys unless given (setup and checks in tests)."""
        import boto3

        kwargs = {"aws_access_key_id": ACCESS_KEY, "aws_secret_access_key": SECRET_KEY, **kwargs}
        return boto3.client(service, endpoint_url=self.endpoint, region_name=REGION, **kwargs)

    @contextlib.contextmanager
    def auth_enforced(self) -> Iterator[tuple[str, str]]:
        """Within the block the server checks signatures against its IAM users, as AWS does. Yields the key
        pair of a new user with no policy: valid, and allowed nothing."""
        iam = self.client("iam")
        user = f"nopolicy-{uuid.uuid4().hex[:8]}"
        iam.create_user(UserName=user)
        key = iam.create_access_key(UserName=user)["AccessKey"]
        self._reset_auth("0")  # 0 unauthenticated requests allowed from now on
        try:
            yield key["AccessKeyId"], key["SecretAccessKey"]
        finally:
            self._reset_auth("inf")

    def _reset_auth(self, allowed: str) -> None:
        # The body is a bare number; a form content type would make Flask swallow it.
        req = urllib.request.Request(f"{self.endpoint}/moto-api/reset-auth", data=allowed.encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
        urllib.request.urlopen(req, timeout=30).read()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(log: Path) -> tuple[subprocess.Popen, str]:
    """Start moto on a free port. The port can be taken between choosing and binding, hence the retries."""
    for _ in range(3):
        port = _free_port()
        with open(log, "ab") as out:
            proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                    stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        endpoint = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + START_TIMEOUT_S
        while proc.poll() is None and time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2).read()
                return proc, endpoint
            time.sleep(0.1)
        _stop(proc)
    pytest.fail(f"moto server did not start; its log:\n{log.read_text(errors='replace')[-3000:]}")


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> Iterator[S3Server]:
    """moto's S3 server for the session, with the AWS variables pointing at it (restored afterwards) and an
    empty bucket. Skips when moto[server] is not installed; its log is in the session's tmp dir."""
    if importlib.util.find_spec("moto") is None or importlib.util.find_spec("flask") is None:
        pytest.skip("moto's S3 server is not installed: pip install -e '.[test]' (moto[server])")
    proc, endpoint = _start(tmp_path_factory.mktemp("moto") / "server.log")
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
           "AWS_REGION": REGION, "AWS_DEFAULT_REGION": REGION,
           # Hermetic: no ~/.aws profile and no wait on the EC2 metadata service when a test removes the keys.
           "AWS_SHARED_CREDENTIALS_FILE": os.devnull, "AWS_CONFIG_FILE": os.devnull,
           "AWS_EC2_METADATA_DISABLED": "true"}
    saved = {k: os.environ.get(k) for k in (*env, *_CLEARED)}
    for k in _CLEARED:
        os.environ.pop(k, None)
    os.environ.update(env)
    try:
        server = S3Server(endpoint=endpoint, bucket=f"raydc-test-{uuid.uuid4().hex[:8]}", env=dict(env))
        server.client().create_bucket(Bucket=server.bucket)
        yield server
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        _stop(proc)
