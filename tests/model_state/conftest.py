"""An S3-compatible bucket on loopback: moto's server mode (``moto[server]``, PyPI), the stand-in
here for AWS S3, MinIO or GCS's S3 API; conditional writes included. The homes reach it the way
a deployment reaches its bucket: boto3 with the standard ``AWS_*`` variables."""

from __future__ import annotations

import socket
import uuid
from collections.abc import Iterator

import pytest


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch, s3_endpoint: str) -> str:
    """The standard variables pointing boto3 at the loopback bucket server; returns the endpoint."""
    for name, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_REGION": "us-east-1",
                        "AWS_ENDPOINT_URL": s3_endpoint}.items():
        monkeypatch.setenv(name, value)
    return s3_endpoint


@pytest.fixture
def bucket_url(aws_env: str) -> str:
    """A new, empty bucket, as ``s3://bucket/prefix``."""
    from ingrain_bento.model_state.s3 import s3_client

    name = f"ingrain-{uuid.uuid4().hex[:12]}"
    s3_client().create_bucket(Bucket=name)
    return f"s3://{name}/replicas/prod"
