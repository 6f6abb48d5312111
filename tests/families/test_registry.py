"""The family registry: one path from a library name to its family; every module registers itself."""

from __future__ import annotations

import pkgutil

import pytest

import ingrain_bento.families as registry
from ingrain_bento.errors import BadRequest
from ingrain_bento.families import families, family, parse_ref
from ingrain_bento.store import store_name


def test_every_family_module_is_discovered_and_registered_under_its_library_name():
    modules = {m.name for m in pkgutil.iter_modules(registry.__path__)} - {"base"}
    assert set(families()) == modules == {"open_clip", "sentence_transformers", "timm"}
    for name in modules:
        assert family(name).name == name


def test_an_unknown_library_is_a_400_listing_the_ones_there_are():
    with pytest.raises(BadRequest) as info:
        family("pytorch")
    assert info.value.status_code == 400 and "'pytorch'" in info.value.message
    for valid in ("open_clip", "sentence_transformers", "timm"):
        assert valid in info.value.message


def test_a_registered_family_is_found_with_nothing_else_changed(monkeypatch):
    """What a fourth library needs: a module that registers an object of the Family shape."""

    class Toy:
        name = "toy"
        tag_prefix = "toy"
        custom_form = "folder"
        custom_files = {"safetensors_url": "model.safetensors"}
        library_modules = ()

        def canonical_pretrained(self, name, pretrained):
            return None

        def api_pretrained(self, pretrained):
            return None

    monkeypatch.setitem(registry._REGISTRY, "toy", Toy())
    ref = parse_ref("toy", "some/model")
    assert ref.library == "toy" and store_name(ref).startswith("toy-some-model-")
