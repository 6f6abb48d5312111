"""What crosses between the front and the runner: frames of JSON and raw arrays, never pickle.

- A frame carries JSON arguments and numpy arrays as raw bytes; every ``Engine`` call's arguments
  and result survive the trip with their types (pydantic models, dataclasses, errors by class).
- ``RunnerGate`` (the runner's ASGI middleware) refuses a pickle body on every route, token or
  not; refuses a call without the token before reading its body; leaves the probes open.
- The BentoML facts the gate relies on are checked here, so an upgrade that changes them fails.
"""

from __future__ import annotations

import asyncio
import json
import pickle
from typing import Any

import numpy as np
import pytest

from ingrain_bento import schemas as s
from ingrain_bento.boundary import InferReply, LoadResult, ModelHandle, ServedModel
from ingrain_bento.errors import BadRequest, ModelStillLoading, StaleModel
from ingrain_bento.refs import ModelRef
from ingrain_bento.wire import (
    CALLS,
    FRAME_MEDIA_TYPE,
    FRONT_SIDE_CALLS,
    PICKLE_MEDIA_TYPE,
    FrameError,
    RunnerGate,
    decode_frame,
    encode_frame,
    pack,
    unpack,
)

TOKEN = "a-test-token"
REF = ModelRef("timm", "test_vit.r160_in1k", "false")
HANDLE = ModelHandle(REF, "timm-test:v1", ("classify", "embed_image"), 8)


# ---- frames -----------------------------------------------------------------------------------

def test_a_frame_carries_json_and_raw_arrays_of_any_shape_and_dtype():
    arrays = {"ids": np.arange(10, dtype=np.int32).reshape(2, 5), "half": np.ones((3,), dtype=np.float16),
              "pixels": np.full((2, 4, 4, 3), 7, dtype=np.uint8), "big": np.arange(3, dtype=">f4")}
    args, back = decode_frame(encode_frame({"a": [1, "b"]}, arrays))
    assert args == {"a": [1, "b"]}
    for name, array in arrays.items():
        np.testing.assert_array_equal(back[name], array)
        assert back[name].dtype.byteorder in "<|="


def test_a_frame_that_lies_about_its_arrays_is_refused():
    body = bytearray(encode_frame({}, {"x": np.zeros(4, dtype=np.float32)}))
    with pytest.raises(FrameError):
        decode_frame(bytes(body[:-8]))  # shorter than its header says
    header = json.dumps({"args": {}, "arrays": {"x": ["|O", [1], 0]}}).encode()
    with pytest.raises(FrameError, match="dtype"):
        decode_frame(len(header).to_bytes(4, "little") + header + b"\0" * 16)
    with pytest.raises(FrameError):
        decode_frame(b"\xff\xff\xff\x7fnot json")


# ---- infer payloads -------------------------------------------------------------------------------

def test_pixels_of_several_requests_cross_as_one_stacked_array():
    requests = [[np.full((2, 2, 3), i, dtype=np.uint8) for i in range(3)], [np.full((2, 2, 3), 9, dtype=np.uint8)]]
    args, arrays = pack(requests)
    assert arrays["stacked"].shape == (4, 2, 2, 3) and args["counts"] == [3, 1]
    back = unpack(args, arrays)
    assert [[int(item[0, 0, 0]) for item in items] for items in back] == [[0, 1, 2], [9]]


def test_token_rows_of_different_lengths_cross_joined_with_their_lengths():
    rows = [np.arange(2 * n, dtype=np.int32).reshape(2, n) for n in (3, 1, 5)]
    args, arrays = pack([rows[:2], rows[2:]])
    assert arrays["joined"].shape == (2, 9) and arrays["lengths"].tolist() == [3, 1, 5]
    back = unpack(args, arrays)
    assert [len(items) for items in back] == [2, 1]
    for got, sent in zip([item for items in back for item in items], rows, strict=True):
        assert np.array_equal(got, sent)


def test_raw_texts_cross_as_they_are():
    assert unpack(*pack([["a", "b"], ["c"]])) == [["a", "b"], ["c"]]


def test_a_payload_whose_counts_disagree_with_its_items_is_refused():
    args, arrays = pack([["a", "b"]])
    with pytest.raises(FrameError, match="counts"):
        unpack({**args, "counts": [3]}, arrays)


# ---- every Engine call --------------------------------------------------------------------------

INFO = s.ModelInfo(id="m", name="m", pretrained=None, library="sentence_transformers", state="LOADING",
                   modalities=["text"], embedding_size=384)
CALL_EXAMPLES: dict[str, tuple[dict[str, Any], Any]] = {
    "load": ({"request": s.ModelRequest(name="ViT-B-32::laion2b", library="open_clip"), "library": "open_clip"},
             LoadResult("ViT-B-32::laion2b", True)),
    "unload": ({"request": s.ModelRequest(name="m", pretrained=False)}, "m"),
    "delete": ({"request": s.ModelRequest(name="m")}, "m"),
    "download_custom": ({"request": s.CustomModelRequest(library="timm", pretrained_name="mine", num_classes=3,
                                                         safetensors_url="http://x/y.safetensors")}, "mine"),
    "loaded_models": ({}, [INFO]),
    "repository_models": ({}, [INFO, INFO.model_copy(update={"state": "UNAVAILABLE"})]),
    "served_models": ({}, [ServedModel("m", "sentence_transformers")]),
    "describe": ({"name": "test_vit.r160_in1k", "pretrained": False, "library": None}, HANDLE),
    "embedding_size": ({"name": "m", "pretrained": None}, 384),
    "classification_labels": ({"name": "m", "pretrained": "mine"}, ["cat", "dog"]),
    "ingrain_metrics": ({}, {"modelStats": [{"name": "m", "inferenceCount": "3"}]}),
}


def test_every_engine_call_has_a_codec():
    from ingrain_bento.boundary import Engine

    methods = {name for name in vars(Engine) if not name.startswith("_")} - FRONT_SIDE_CALLS
    assert set(CALLS) == methods and set(CALL_EXAMPLES) | {"infer"} == methods


@pytest.mark.parametrize("method", sorted(CALL_EXAMPLES))
def test_each_calls_arguments_and_result_cross_with_their_types(method):
    codec = CALLS[method]
    arguments, result = CALL_EXAMPLES[method]
    assert codec.decode_args(codec.encode_args(arguments)) == arguments
    assert codec.decode_result(codec.encode_result(result)) == result


def test_an_infer_call_crosses_as_arrays_and_its_reply_keeps_each_requests_rows_or_error():
    codec = CALLS["infer"]
    requests = [[np.ones((2, 3), np.int32), np.zeros((2, 5), np.int32)], [np.full((2, 1), 4, np.int32)]]
    back = codec.decode_args(codec.encode_args({"ref": REF, "task": "embed_text", "tag": "t:1", "requests": requests}))
    assert (back["ref"], back["task"], back["tag"]) == (REF, "embed_text", "t:1")
    assert [[item.tolist() for item in request] for request in back["requests"]] == \
        [[item.tolist() for item in request] for request in requests]
    reply = InferReply([np.ones((2, 4), np.float16), StaleModel("stored again"), np.zeros((1, 4), np.float16)], 7)
    again = codec.decode_result(codec.encode_result(reply))
    assert again.version == 7
    assert again.results[0].tolist() == [[1.0] * 4] * 2 and again.results[2].tolist() == [[0.0] * 4]
    assert again.results[0].dtype == np.float16
    assert type(again.results[1]) is StaleModel and again.results[1].message == "stored again"


def test_rows_of_different_widths_cross_widened_with_zeros_at_the_end():
    """Multi-vector rows are packed as wide as their forward's longest text (boundary.join_rows)."""
    codec = CALLS["infer"]
    reply = InferReply([np.ones((2, 3), np.float32), np.full((1, 5), 2, np.float32)], 1)
    again = codec.decode_result(codec.encode_result(reply))
    assert again.results[0].tolist() == [[1, 1, 1, 0, 0]] * 2 and again.results[1].tolist() == [[2] * 5]


def test_an_error_keeps_its_class_and_its_retry_after():
    from ingrain_bento.errors import from_reply

    error = from_reply(ModelStillLoading("restoring", 5).as_reply())
    assert type(error) is ModelStillLoading and error.headers() == {"Retry-After": "5"}
    assert type(from_reply(StaleModel("x").as_reply())) is StaleModel
    unknown = from_reply({"error": "SomethingNewer", "status": 418, "message": "m"})
    assert unknown.status_code == 500 and unknown.message == "m"


# ---- the gate -------------------------------------------------------------------------------------

class RecordingEngine:
    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []

    async def loaded_models(self) -> list[s.ModelInfo]:
        self.calls.append(("loaded_models", {}))
        return [INFO]

    async def unload(self, request: s.ModelRequest) -> str:
        self.calls.append(("unload", {"request": request}))
        raise BadRequest("nothing to unload")


async def asgi(app: Any, method: str, path: str, body: bytes = b"",
               headers: dict[str, str] | None = None) -> tuple[int, bytes, bool]:
    """One request through an ASGI app: status, body, and whether the app read the request body."""
    read = False
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        nonlocal read
        read = True
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": method, "path": path,
             "headers": [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]}
    await app(scope, receive, send)
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:]), read


class Downstream:
    """Stands for BentoML's own app behind the gate (its probes, /metrics)."""

    def __init__(self) -> None:
        self.paths: list[str] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self.paths.append(scope["path"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"bentoml"})


def _gate(metrics: Any = None) -> tuple[RunnerGate, RecordingEngine, Downstream]:
    engine, downstream = RecordingEngine(), Downstream()

    async def resolve() -> Any:
        return engine

    return RunnerGate(downstream, engine=resolve, token=TOKEN, metrics=metrics), engine, downstream


class Boom:
    def __reduce__(self) -> Any:
        return (print, ("unpickled!",))


@pytest.mark.parametrize("path", ["/ingrain/loaded_models", "/ingrain/unload", "/infer", "/load", "/livez", "/"])
@pytest.mark.parametrize("with_token", [False, True])
def test_a_pickle_body_is_refused_on_every_route_token_or_not(path, with_token):
    gate, engine, downstream = _gate()
    headers = {"content-type": PICKLE_MEDIA_TYPE, **({"authorization": f"Bearer {TOKEN}"} if with_token else {})}
    status, _, read = asyncio.run(asgi(gate, "POST", path, pickle.dumps(Boom()), headers))
    assert status == 415 and not read and not engine.calls and not downstream.paths


@pytest.mark.parametrize("token", [None, "wrong", TOKEN + "x"])
def test_a_call_without_the_token_is_refused_before_its_body_is_read(token):
    gate, engine, downstream = _gate()
    headers = {"content-type": FRAME_MEDIA_TYPE, **({"authorization": f"Bearer {token}"} if token else {})}
    for path in ("/ingrain/unload", "/ingrain/loaded_models", "/metrics"):
        body = CALLS["unload"].encode_args({"request": s.ModelRequest(name="m")})
        status, reply, read = asyncio.run(asgi(gate, "POST", path, body, headers))
        assert status == 401 and not read and b"INGRAIN_RUNNER_TOKEN" in reply
    assert not engine.calls and not downstream.paths


def test_the_probes_answer_without_the_token():
    gate, _, downstream = _gate()
    for path in ("/livez", "/readyz"):
        assert asyncio.run(asgi(gate, "GET", path))[0] == 200
    assert downstream.paths == ["/livez", "/readyz"]


def test_a_call_with_the_token_reaches_the_engine_and_its_error_keeps_its_status_and_class():
    from ingrain_bento.errors import from_reply

    gate, engine, _ = _gate()
    headers = {"content-type": FRAME_MEDIA_TYPE, "authorization": f"Bearer {TOKEN}"}
    status, body, _ = asyncio.run(asgi(gate, "POST", "/ingrain/loaded_models", CALLS["loaded_models"].encode_args({}),
                                       headers))
    assert status == 200 and CALLS["loaded_models"].decode_result(body) == [INFO]
    status, body, _ = asyncio.run(asgi(gate, "POST", "/ingrain/unload",
                                       CALLS["unload"].encode_args({"request": s.ModelRequest(name="m")}), headers))
    assert status == 400 and type(from_reply(json.loads(body))) is BadRequest
    assert [name for name, _ in engine.calls] == ["loaded_models", "unload"]
    assert asyncio.run(asgi(gate, "POST", "/ingrain/exec", b"", headers))[0] == 404
    status, body, _ = asyncio.run(asgi(gate, "POST", "/ingrain/unload", b"garbage", headers))
    assert status == 500 and b"malformed" in body


# ---- what BentoML does, that the gate relies on ----------------------------------------------------

def test_bentoml_still_gives_the_runner_address_in_the_runner_map():
    """If an upgrade changes how a front finds its runner (``BENTOML_RUNNER_MAP``: ``file://`` or
    ``tcp://``), ``service.runner_address`` must follow. (That its worker serves ``to_asgi()``, which
    the gate wraps: ``tests/test_bentoml_seam.py``.)"""
    import inspect

    from _bentoml_impl.server import serving

    assert '"BENTOML_RUNNER_MAP"' in inspect.getsource(serving) and "tcp://" in inspect.getsource(serving)


def test_bentoml_still_unpickles_bodies_sent_to_a_dependency_service():
    """Why the gate refuses pickle itself: BentoML 1.4 refuses it on the entry service only. When
    an upgrade refuses it everywhere (bentoml PR #5610), this test fails: the gate's check is then
    belt and braces, and this test should change to say so."""
    import inspect

    from _bentoml_impl.server import app

    source = inspect.getsource(app)
    assert 'if self.is_main and media_type == "application/vnd.bentoml+pickle"' in source


def test_the_runner_service_has_no_bentoml_api_and_the_gate_in_front():
    import service

    assert not service.IngrainRunner.apis, "a BentoML API on the runner would read BentoML's serde (pickle)"
    assert isinstance(service.IngrainRunner.to_asgi(), RunnerGate), "the gate is in front of BentoML's own layers"


def test_the_gate_counts_each_call_by_status_as_bentomls_layers_did():
    """``ingrain_http_*{service}`` for the calls the gate answers before BentoML's layers; a refusal
    before the call (no token) is not a call."""
    from prometheus_client import REGISTRY

    from ingrain_bento.metrics import HttpMetrics

    metrics = HttpMetrics("runner-gate-test")
    gate, _, _ = _gate(metrics)
    headers = {"content-type": FRAME_MEDIA_TYPE, "authorization": f"Bearer {TOKEN}"}
    unload = CALLS["unload"].encode_args({"request": s.ModelRequest(name="m")})
    asyncio.run(asgi(gate, "POST", "/ingrain/loaded_models", CALLS["loaded_models"].encode_args({}), headers))
    asyncio.run(asgi(gate, "POST", "/ingrain/unload", unload, headers))
    asyncio.run(asgi(gate, "POST", "/ingrain/unload", unload, {"content-type": FRAME_MEDIA_TYPE}))
    metrics.flush()

    def answered(route: str, code: str) -> float:
        labels = {"service": "runner-gate-test", "route": route, "code": code}
        return REGISTRY.get_sample_value("ingrain_http_requests_total", labels) or 0.0

    assert (answered("/ingrain/loaded_models", "200"), answered("/ingrain/unload", "400")) == (1, 1)
    assert answered("/ingrain/unload", "401") == 0 and metrics.in_progress == 0
