"""A runner reconciles what it holds to the desired state: loads, unloads, drops and pins, and
keeps what it could not do, with the reason. ``Runner`` here is an in-memory runner (the real
one is the model pool); the homes are the real ones."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

from ingrain_bento.model_state import (
    DesiredModel,
    DesiredState,
    Held,
    LocalStateHome,
    Reconciler,
    StoreUnreachable,
    model_key,
    plan_changes,
    update,
)
from ingrain_bento.refs import ModelRef

MINILM = ModelRef("sentence_transformers", "all-MiniLM-L6-v2")
CLIP = ModelRef("open_clip", "ViT-B-32", "laion2b_s34b_b79k")
RESNET = ModelRef("timm", "resnet18")


class Runner:
    """What a runner holds, in memory; ``too_big`` names models whose load fails."""

    def __init__(self, tags: dict[str, str] | None = None, too_big: set[str] = frozenset()) -> None:
        self.models: dict[str, Held] = {}
        self.backends: dict[str, str | None] = {}
        self.tags = dict(tags or {})  # tag -> model key, the local store
        self.too_big = too_big
        self.calls: list[str] = []
        self.listings = 0  # how often its store was listed

    def held(self) -> Mapping[str, Held]:
        return dict(self.models)

    def stored_tags(self) -> set[str]:
        self.listings += 1
        return set(self.tags)

    async def load(self, models: Sequence[DesiredModel]) -> Mapping[str, str]:
        failed = {}
        for model in models:
            key = model_key(model.ref)
            self.calls.append(f"load {key}")
            if key in self.too_big:
                failed[key] = f"MemoryError: {key} does not fit"
                continue
            tag = next((tag for tag, held in self.tags.items() if held == key), None)
            self.models[key] = Held(model.ref, model.pinned, tag)
            self.backends[key] = model.backend
        return failed

    async def fetch_entry(self, tag: str) -> None:
        self.calls.append(f"fetch {tag}")
        self.tags[tag] = "fetched"

    async def unload(self, ref: ModelRef) -> None:
        self.calls.append(f"unload {model_key(ref)}")
        del self.models[model_key(ref)]

    async def drop_entry(self, tag: str) -> None:
        self.calls.append(f"drop {tag}")
        del self.tags[tag]

    async def pin(self, ref: ModelRef) -> None:
        key = model_key(ref)
        self.models[key] = self.models[key]._replace(pinned=True)


def step(reconciler: Reconciler):
    return asyncio.run(reconciler.step())


def test_a_runner_loads_what_the_record_holds_with_its_engine_and_unloads_what_it_dropped(tmp_path: Path):
    home = LocalStateHome(tmp_path)
    runner = Runner()
    reconciler = Reconciler(home, runner)
    update(home, lambda s: s.with_resident(MINILM, "onnx").with_resident(CLIP, None))
    step(reconciler)
    assert set(runner.models) == {model_key(MINILM), model_key(CLIP)}
    assert runner.backends[model_key(MINILM)] == "onnx" and reconciler.generation == 2
    update(home, lambda s: s.without_resident(CLIP))
    plan = step(reconciler)
    assert plan.unload == [CLIP] and set(runner.models) == {model_key(MINILM)}
    assert step(reconciler).empty, "nothing more to do once it matches"


def test_a_model_loaded_on_demand_stays_but_a_deleted_entry_goes_everywhere(tmp_path: Path):
    home = LocalStateHome(tmp_path)
    runner = Runner(tags={"timm-resnet18-1": model_key(RESNET)})
    runner.models[model_key(RESNET)] = Held(RESNET, pinned=False, tag="timm-resnet18-1")  # a request's autoload
    reconciler = Reconciler(home, runner)
    update(home, lambda s: s.with_entry("timm-resnet18-1", RESNET))
    assert step(reconciler).empty, "not in the record, but not pinned: this runner may keep it"
    update(home, lambda s: s.without_entry("timm-resnet18-1"))
    step(reconciler)
    assert runner.models == {} and runner.tags == {}
    assert runner.calls == ["unload timm/resnet18", "drop timm-resnet18-1"], "unloads first"


def test_a_model_the_record_pins_is_pinned_here_too():
    desired = DesiredState().with_resident(CLIP, None, pinned=True)
    plan = plan_changes(desired, {model_key(CLIP): Held(CLIP, pinned=False)}, set())
    assert plan.pin == [CLIP] and plan.load == [] and plan.unload == []


def test_a_model_that_cannot_be_loaded_is_kept_with_its_reason_and_tried_again(tmp_path: Path):
    home = LocalStateHome(tmp_path)
    runner = Runner(too_big={model_key(CLIP)})
    reconciler = Reconciler(home, runner)
    update(home, lambda s: s.with_resident(CLIP, None).with_resident(MINILM, None))
    step(reconciler)
    assert set(runner.models) == {model_key(MINILM)}
    assert "does not fit" in reconciler.failures[model_key(CLIP)]
    step(reconciler)
    assert runner.calls.count(f"load {model_key(CLIP)}") == 2, "tried again at the next step"
    runner.too_big = set()
    step(reconciler)
    assert reconciler.failures == {} and model_key(CLIP) in runner.models
    runner.too_big = {model_key(RESNET)}
    update(home, lambda s: s.with_resident(RESNET, None))
    step(reconciler)
    update(home, lambda s: s.without_resident(RESNET))
    step(reconciler)
    assert reconciler.failures == {}, "a failure for a model no longer wanted is forgotten"


def test_two_runners_over_one_home_end_holding_the_same_models(tmp_path: Path):
    home = LocalStateHome(tmp_path)
    first, second = Runner(), Runner()
    reconcilers = [Reconciler(LocalStateHome(tmp_path), first), Reconciler(LocalStateHome(tmp_path), second)]
    update(home, lambda s: s.with_resident(MINILM, None).with_resident(RESNET, "torch"))
    update(home, lambda s: s.without_resident(MINILM).with_resident(CLIP, None))
    for reconciler in reconcilers:
        step(reconciler)
    assert set(first.models) == set(second.models) == {model_key(RESNET), model_key(CLIP)}
    assert {r.generation for r in reconcilers} == {home.read().state.generation}


def test_an_idle_runner_reads_the_record_and_nothing_else_until_something_is_missing(tmp_path: Path):
    home = LocalStateHome(tmp_path)
    runner = Runner()
    reconciler = Reconciler(home, runner)
    update(home, lambda s: s.with_resident(MINILM, None))
    step(reconciler)
    runner.calls.clear()
    listings = runner.listings
    step(reconciler)
    assert (runner.calls, runner.listings) == ([], listings), "the record it reached, nothing missing: no plan"
    del runner.models[model_key(MINILM)]  # gone from under it (a restart of its pool, say)
    step(reconciler)
    assert (runner.calls, runner.listings) == ([f"load {model_key(MINILM)}"], listings + 1)


def test_an_unreachable_home_changes_nothing_here(tmp_path: Path):
    home = LocalStateHome(tmp_path)
    runner = Runner()
    runner.models[model_key(MINILM)] = Held(MINILM, pinned=True)
    home.path.parent.mkdir(parents=True, exist_ok=True)
    home.path.write_text("not json")
    with pytest.raises(StoreUnreachable):
        step(Reconciler(home, runner))
    assert set(runner.models) == {model_key(MINILM)} and runner.calls == []
