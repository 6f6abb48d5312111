"""The desired state: what every runner must hold, changed one generation at a time."""

from __future__ import annotations

from ingrain_bento.model_state import DesiredState, model_key
from ingrain_bento.refs import ModelRef

MINILM = ModelRef("sentence_transformers", "sentence-transformers/all-MiniLM-L6-v2")
CLIP = ModelRef("open_clip", "ViT-B-32", "laion2b_s34b_b79k")


def test_every_change_moves_the_generation_and_the_same_change_again_does_not():
    empty = DesiredState()
    loaded = empty.with_resident(MINILM, "onnx")
    assert (empty.generation, loaded.generation) == (0, 1)
    assert loaded.models[model_key(MINILM)].backend == "onnx" and loaded.models[model_key(MINILM)].pinned
    assert loaded.with_resident(MINILM, "onnx") is loaded
    assert loaded.with_resident(MINILM, "torch").generation == 2, "another engine is a change"
    assert loaded.without_resident(CLIP) is loaded
    assert loaded.without_resident(MINILM).models == {} and loaded.without_resident(MINILM).generation == 2


def test_removals_move_when_a_model_leaves_or_an_entry_is_deleted_not_when_one_arrives():
    stored = DesiredState().with_entry("st-minilm:v1", MINILM).with_resident(MINILM, None)
    assert stored.removals == 0
    unloaded = stored.without_resident(MINILM)
    assert unloaded.removals == 1 and unloaded.without_resident(MINILM).removals == 1
    deleted = stored.without_entry("st-minilm:v1")
    assert deleted.removals == 1 and deleted.models == {} and "st-minilm:v1" in deleted.deleted


def test_an_on_demand_load_never_unpins_an_api_load():
    pinned = DesiredState().with_resident(CLIP, None, pinned=True)
    assert pinned.with_resident(CLIP, None, pinned=False) is pinned
    on_demand = DesiredState().with_resident(CLIP, None, pinned=False)
    assert not on_demand.models[model_key(CLIP)].pinned
    assert on_demand.with_resident(CLIP, None, pinned=True).models[model_key(CLIP)].pinned


def test_deleting_an_entry_unloads_its_model_everywhere_and_leaves_a_tombstone():
    state = DesiredState().with_entry("st-minilm-1", MINILM).with_resident(MINILM, None).with_resident(CLIP, None)
    deleted = state.without_entry("st-minilm-1")
    assert set(deleted.models) == {model_key(CLIP)}
    assert "st-minilm-1" not in deleted.entries and deleted.deleted == {"st-minilm-1": deleted.generation}
    assert deleted.without_entry("st-minilm-1") is deleted
    stored_again = deleted.with_entry("st-minilm-1", MINILM)
    assert "st-minilm-1" in stored_again.entries and stored_again.deleted == {}


def test_the_record_round_trips_as_json_and_refuses_unknown_fields():
    import pydantic
    import pytest

    state = DesiredState().with_entry("clip-vit-1", CLIP).with_resident(CLIP, "torch", pinned=False)
    assert DesiredState.model_validate_json(state.model_dump_json()) == state
    with pytest.raises(pydantic.ValidationError):
        DesiredState.model_validate_json('{"generation": 1, "modles": {}}')
