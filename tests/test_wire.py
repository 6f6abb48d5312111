"""What crosses between the front and the runner: few arrays, in the order sent."""

from __future__ import annotations

import asyncio
import json
import pickle

import numpy as np
import pytest

from ingrain_bento.errors import BadRequest, ModelNotFound
from ingrain_bento.refs import ModelRef
from ingrain_bento.wire import ModelHandle, answer, pack, split_reply, unpack


def test_pixels_of_several_requests_cross_as_one_stacked_array():
    requests = [[np.full((2, 2, 3), i, dtype=np.uint8) for i in range(3)], [np.full((2, 2, 3), 9, dtype=np.uint8)]]
    payload = pack(requests)
    assert payload["stacked"].shape == (4, 2, 2, 3) and payload["counts"] == [3, 1]
    back = unpack(payload)
    assert [[int(item[0, 0, 0]) for item in items] for items in back] == [[0, 1, 2], [9]]


def test_token_rows_of_different_lengths_cross_joined_with_their_lengths():
    rows = [np.arange(2 * n, dtype=np.int32).reshape(2, n) for n in (3, 1, 5)]
    payload = pack([rows[:2], rows[2:]])
    assert payload["joined"].shape == (2, 9) and payload["lengths"].tolist() == [3, 1, 5]
    back = unpack(payload)
    assert [len(items) for items in back] == [2, 1]
    for got, sent in zip([item for items in back for item in items], rows, strict=True):
        assert np.array_equal(got, sent)


def test_raw_texts_cross_as_they_are():
    assert unpack(pack([["a", "b"], ["c"]])) == [["a", "b"], ["c"]]


def test_a_payload_whose_counts_disagree_with_its_items_is_refused():
    payload = pack([["a", "b"]])
    payload["counts"] = [3]
    with pytest.raises(ValueError, match="counts"):
        unpack(payload)


def test_the_arrays_pickle_out_of_band_as_bentoml_sends_them():
    """Protocol 5 hands numpy buffers over without copying them into the pickle stream."""
    payload = pack([[np.zeros((224, 224, 3), dtype=np.uint8)] * 8])
    buffers: list[pickle.PickleBuffer] = []
    stream = pickle.dumps(payload, protocol=5, buffer_callback=buffers.append)
    assert len(stream) < 1000 and sum(b.raw().nbytes for b in buffers) == 8 * 224 * 224 * 3


def test_a_reply_splits_into_each_requests_rows_or_its_error():
    reply = {"rows": np.arange(6, dtype=np.float32).reshape(3, 2), "version": 1,
             "failed": {1: BadRequest("image 0 is broken").as_reply()}}
    first, second, third = split_reply(reply, [2, 4, 1])  # type: ignore[arg-type]
    assert first.tolist() == [[0, 1], [2, 3]] and third.tolist() == [[4, 5]]
    assert isinstance(second, BadRequest) and second.message == "image 0 is broken"


def test_answer_turns_an_ingrain_error_into_a_reply_with_its_status():
    async def missing() -> str:
        raise ModelNotFound("not here")

    async def found() -> str:
        return "here"

    reply = asyncio.run(answer(missing()))
    assert reply.status_code == 404  # type: ignore[attr-defined]
    assert json.loads(reply.body) == {"status": 404, "message": "not here", "type": "not_found_error"}  # type: ignore[attr-defined]
    assert asyncio.run(answer(found())) == "here"


def test_a_handle_survives_its_trip_as_a_dict():
    handle = ModelHandle(ModelRef("open_clip", "ViT-B-32", "laion2b"), "clip-x:v1", ("embed_image", "embed_text"), 512)
    assert ModelHandle.from_dict(handle.as_dict()) == handle


def test_every_runner_api_computes_its_response_media_type_once():
    """service.py presets it (``fix_media_types``): BentoML otherwise rebuilds the output's JSON
    schema on every response, ~3.5 ms of CPU per runner call."""
    import service

    assert all(method.output_spec.media_type for method in service.IngrainRunner.apis.values())
