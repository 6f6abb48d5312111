"""Shared fixtures: an offline Hugging Face cache of tiny real models, a loopback file
server, the in-process app, and one real ``bentoml serve`` process.

The environment is set here, at import, before anything imports huggingface_hub or
bentoml: both read their settings (``HF_HUB_CACHE``, ``HF_HUB_OFFLINE``, ``BENTOML_HOME``)
once per process. Never ``import conftest`` from a test: under ``--import-mode=importlib``
that runs this module a second time, with a new session folder in the environment.
"""

from __future__ import annotations

import importlib
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

SESSION_DIR = Path(tempfile.mkdtemp(prefix="ingrain-tests-"))
REPO_ROOT = Path(__file__).resolve().parent.parent
os.environ["HF_HUB_CACHE"] = str(SESSION_DIR / "hf-cache")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["BENTOML_HOME"] = str(SESSION_DIR / "bentoml-inprocess")
os.environ["BENTOML_DO_NOT_TRACK"] = "true"
os.environ["INGRAIN_ALLOW_PRIVATE_URLS"] = "true"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import httpx  # noqa: E402
import pytest  # noqa: E402

# BentoML's start-http-server command (tests/test_deploy.py parses the Kubernetes containers' args
# with it) reads its option defaults from BentoML's configuration when its module is imported; once
# a test has imported the service, that configuration is the services' layout, without them. Built
# here, first, it holds the defaults of a fresh process, as in a container.
importlib.import_module("bentoml_cli._internal.start")


@pytest.fixture(scope="session")
def hub_models() -> dict[str, str]:
    """Ids of the tiny models in the offline HF cache (see fixtures/offline_models.py)."""
    from fixtures.offline_models import build_hf_cache

    return build_hf_cache(Path(os.environ["HF_HUB_CACHE"]))


@pytest.fixture(scope="session")
def custom_files() -> dict[str, Path]:
    from fixtures.offline_models import build_custom_files

    return build_custom_files(SESSION_DIR / "files")


@pytest.fixture(scope="session")
def file_server(custom_files: dict[str, Path]) -> Iterator[object]:
    """A loopback HTTP server over the custom-model files and test images."""
    from fixtures.offline_models import serve_directory

    with serve_directory(SESSION_DIR / "files") as server:
        yield server


@pytest.fixture(scope="session")
def client(hub_models: dict[str, str]) -> Iterator[object]:
    """The whole service in-process (``TestClient(IngrainBento.to_asgi())``)."""
    from starlette.testclient import TestClient

    import service

    with TestClient(service.IngrainBento.to_asgi()) as test_client:
        yield test_client


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RealServer:
    """One ``bentoml serve`` process from the repo root, on a free port, with its own store."""

    def __init__(self, home: Path, env: dict[str, str] | None = None, target: str = ".") -> None:
        self.home = home
        self.target = target
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "BENTOML_HOME": str(home), **(env or {})}
        self.process: subprocess.Popen[bytes] | None = None
        self.log = home.parent / f"serve-{self.port}.log"

    def start(self, timeout: float = 120.0, until: str = "/readyz") -> RealServer:
        """Start, and return once ``until`` answers 200 (``/livez``: serving, maybe still restoring)."""
        self.home.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bentoml", "serve", self.target, "--port", str(self.port), "--host", "127.0.0.1"],
            cwd=REPO_ROOT, env=self.env, stdout=open(self.log, "wb"), stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stop() ends the worker too
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"bentoml serve exited: {self.log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}{until}", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"bentoml serve did not become ready: {self.log.read_text()[-3000:]}")

    def service_pids(self, service: str, timeout: float = 30.0) -> list[int]:
        """The worker processes of one service: ``ingrain-bento`` (the front) or ``ingrain-runner``."""
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [pid for pid in _descendants(self.process.pid) if _service_of(pid) == service]
            if found:
                return sorted(found)
            time.sleep(0.2)
        raise RuntimeError(f"no worker of {service} found")

    def stop(self) -> None:
        import signal

        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                pass
        if self.process is not None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)  # a worker stuck in a slow load
            except ProcessLookupError:
                pass
        self.process = None


def _service_of(pid: int) -> str | None:
    """The ``--service-name`` of a BentoML worker process, from its command line."""
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    if b"--service-name" not in args:
        return None
    return args[args.index(b"--service-name") + 1].decode()


def _descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                kids = [int(k) for k in (task / "children").read_text().split()]
            except OSError:
                continue
            found.extend(kids)
            todo.extend(kids)
    return found


@pytest.fixture(scope="session")
def real_server_factory(hub_models: dict[str, str]) -> Iterator[type[RealServer]]:
    started: list[RealServer] = []

    class Tracked(RealServer):
        def start(self, timeout: float = 120.0, until: str = "/readyz") -> RealServer:
            started.append(self)
            return super().start(timeout, until)

    yield Tracked
    for server in started:
        server.stop()


# An S3-compatible bucket on loopback: moto's server mode (``moto[server]``, PyPI), the stand-in
# here for AWS S3, MinIO or GCS's S3 API; conditional writes included. The model state reaches it
# the way a deployment reaches its bucket: boto3 with the standard ``AWS_*`` variables.

@pytest.fixture(scope="session")
def s3_server() -> Iterator[Any]:
    """The server; ``stop()`` and ``start()`` it to cut the bucket off and bring it back (its data
    stays: moto keeps it in this process)."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # not a line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def s3_endpoint(s3_server: Any) -> str:
    return f"http://127.0.0.1:{s3_server._port}"


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch, s3_endpoint: str) -> str:
    """The standard variables pointing boto3 at the loopback bucket server; returns the endpoint."""
    for name, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
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


@pytest.fixture(scope="session")
def session_dir() -> Path:
    return SESSION_DIR


@pytest.fixture(scope="session")
def files_dir(custom_files: dict[str, Path]) -> Path:
    """The folder of test images and custom-model files (built on first use)."""
    return SESSION_DIR / "files"


def pytest_sessionfinish(session: object, exitstatus: int) -> None:
    """The session folder goes, unless ``INGRAIN_KEEP_TEST_DIR=1`` (to read the servers' logs)."""
    import shutil

    if os.environ.get("INGRAIN_KEEP_TEST_DIR") == "1":
        print(f"\nkept {SESSION_DIR}")
        return
    shutil.rmtree(SESSION_DIR, ignore_errors=True)


def pytest_terminal_summary(terminalreporter: object) -> None:
    """Print the worst server-vs-library difference per library and modality."""
    from fixtures.compare import WORST

    if WORST:
        terminalreporter.section("max abs difference, server vs library (fp32)")  # type: ignore[attr-defined]
        for key, value in sorted(WORST.items()):
            terminalreporter.write_line(f"{key:40s} {value:.3e}")  # type: ignore[attr-defined]
