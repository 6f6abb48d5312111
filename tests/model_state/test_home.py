"""The two homes of the desired state, and compare-and-swap: the same behaviour from a file on
this machine and from an S3-compatible bucket (moto's server on loopback, see conftest.py)."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from ingrain_bento.model_state import (
    DesiredState,
    LocalStateHome,
    StateHome,
    StoreUnreachable,
    WriteConflict,
    model_key,
    open_home,
    update,
)
from ingrain_bento.refs import ModelRef


@pytest.fixture(params=["local", "s3"])
def location(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "local":
        return str(tmp_path / "ingrain-state")
    return str(request.getfixturevalue("bucket_url"))


def test_a_write_happens_only_over_the_record_it_read(location):
    home = open_home(location)
    empty, token = home.read()
    assert empty == DesiredState() and token is None
    first = empty.with_resident(ModelRef("timm", "resnet18"), None)
    first_token = home.write(first, None)
    with pytest.raises(WriteConflict):
        home.write(first.with_resident(ModelRef("timm", "resnet50"), None), None)  # read before the first write
    assert home.read() == (first, first_token)
    second = first.without_resident(ModelRef("timm", "resnet18"))
    home.write(second, first_token)
    with pytest.raises(WriteConflict):
        home.write(first, first_token)  # the record moved on since that token
    assert home.read().state == second


def test_concurrent_changes_from_many_writers_all_get_in(location):
    """Twelve writers, each with its own home (its own client, its own file handle), each adds one
    model at once: every change is in, and the generation counts them."""
    refs = [ModelRef("timm", f"resnet{i}") for i in range(12)]

    def add(ref: ModelRef) -> None:
        update(open_home(location), lambda state: state.with_resident(ref, None))

    with ThreadPoolExecutor(len(refs)) as pool:
        list(pool.map(add, refs))
    state = open_home(location).read().state
    assert set(state.models) == {model_key(ref) for ref in refs}
    assert state.generation == len(refs)


def test_a_record_that_does_not_parse_is_refused_never_taken_as_empty(tmp_path):
    home = LocalStateHome(tmp_path)
    home.path.write_text('{"generation": "many"}')
    with pytest.raises(StoreUnreachable, match=str(tmp_path)):
        home.read()


def test_an_unreachable_bucket_is_a_prompt_503_that_names_it(aws_env, monkeypatch):
    import socket

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    home: StateHome = open_home("s3://models/prod")
    started = time.monotonic()
    with pytest.raises(StoreUnreachable, match="s3://models/prod") as caught:
        home.read()
    assert caught.value.status_code == 503
    assert time.monotonic() - started < 15
    with pytest.raises(StoreUnreachable):
        update(home, lambda state: state.with_resident(ModelRef("timm", "resnet18"), None))


def test_a_missing_bucket_is_named_too(aws_env):
    with pytest.raises(StoreUnreachable, match="s3://no-such-bucket-here"):
        open_home("s3://no-such-bucket-here/x").read()


def test_a_location_picks_its_home(tmp_path, aws_env):
    from ingrain_bento.model_state.s3 import S3StateHome, split_s3_url

    assert isinstance(open_home(str(tmp_path)), LocalStateHome)
    s3 = open_home("s3://bucket/a/b/")
    assert isinstance(s3, S3StateHome) and (s3.bucket, s3.key) == ("bucket", "a/b/desired-state.json")
    with pytest.raises(ValueError):
        split_s3_url("s3:///no-bucket")
