"""Model identity: how ``families.parse_ref`` reads what a client names.

Every name a client sends goes through ``families.parse_ref`` before anything touches the
store or the disk. These tests document the canonical form per library, the display id
(``name::pretrained``), the BentoML store name, and every name that is refused with a 400.
"""

from __future__ import annotations

import re

import pytest

from ingrain_bento.errors import BadRequest
from ingrain_bento.families import api_pretrained, parse_ref
from ingrain_bento.refs import ModelRef
from ingrain_bento.store import store_name

STORE_NAME_RE = re.compile(r"^[a-z0-9._-]{1,63}$")


# ---- libraries (the registry itself: tests/families/test_registry.py) -----------------------

def test_parse_with_an_unknown_library_string_is_a_bad_request():
    with pytest.raises(BadRequest, match="Unknown library"):
        parse_ref("tensorflow", "resnet18")


# ---- open_clip ---------------------------------------------------------------------------

def test_open_clip_keeps_architecture_and_pretrained_tag():
    ref = parse_ref("open_clip", "ViT-B-32", "laion2b_s34b_b79k")
    assert ref == ModelRef("open_clip", "ViT-B-32", "laion2b_s34b_b79k")
    assert ref.display_id == "ViT-B-32::laion2b_s34b_b79k"
    assert api_pretrained(ref) == "laion2b_s34b_b79k"
    assert not ref.is_hub_name


def test_open_clip_requires_a_pretrained_tag():
    with pytest.raises(BadRequest, match="needs a pretrained tag"):
        parse_ref("open_clip", "ViT-B-32")


@pytest.mark.parametrize("flag", [True, False])
def test_open_clip_refuses_a_boolean_pretrained(flag):
    with pytest.raises(BadRequest, match="not true/false"):
        parse_ref("open_clip", "ViT-B-32", flag)


def test_open_clip_hf_hub_name_needs_no_tag():
    ref = parse_ref("open_clip", "hf-hub:timm/ViT-B-16-SigLIP")
    assert ref.name == "hf-hub:timm/ViT-B-16-SigLIP"
    assert ref.pretrained is None
    assert ref.is_hub_name
    assert ref.display_id == "hf-hub:timm/ViT-B-16-SigLIP"


def test_open_clip_hf_hub_name_refuses_a_tag_as_well():
    with pytest.raises(BadRequest, match="carries its own weights"):
        parse_ref("open_clip", "hf-hub:timm/ViT-B-16-SigLIP", "webli")


@pytest.mark.parametrize("library", ["open_clip", "timm", "sentence_transformers"])
def test_hf_hub_with_underscore_is_normalized_to_hf_hub_with_dash(library):
    ref = parse_ref(library, "hf_hub:org/repo")
    assert ref.name == "hf-hub:org/repo"
    assert ref.is_hub_name
    assert ref == parse_ref(library, "hf-hub:org/repo")


def test_hf_hub_prefix_needs_an_org_and_repo():
    with pytest.raises(BadRequest, match="needs an org/repo"):
        parse_ref("timm", "hf-hub:resnet18")


# ---- timm --------------------------------------------------------------------------------

@pytest.mark.parametrize("pretrained", [True, None, "true", "True", "TRUE"])
def test_timm_pretrained_weights_are_canonically_none(pretrained):
    ref = parse_ref("timm", "resnet50.a1_in1k", pretrained)
    assert ref.pretrained is None
    assert api_pretrained(ref) is True
    assert ref.display_id == "resnet50.a1_in1k"


@pytest.mark.parametrize("pretrained", [False, "false", "False"])
def test_timm_random_weights_are_canonically_the_string_false(pretrained):
    ref = parse_ref("timm", "resnet50.a1_in1k", pretrained)
    assert ref.pretrained == "false"
    assert api_pretrained(ref) is False
    assert ref.display_id == "resnet50.a1_in1k::false"


def test_timm_custom_checkpoint_name_is_kept():
    ref = parse_ref("timm", "resnet18", "my-finetune_v2")
    assert ref.pretrained == "my-finetune_v2"
    assert api_pretrained(ref) == "my-finetune_v2"
    assert ref.display_id == "resnet18::my-finetune_v2"


def test_timm_custom_checkpoint_name_may_not_contain_a_slash():
    with pytest.raises(BadRequest, match="not a plain identifier"):
        parse_ref("timm", "resnet18", "org/ckpt")


def test_timm_pretrained_true_and_default_are_the_same_model():
    assert parse_ref("timm", "resnet18", True) == parse_ref("timm", "resnet18")
    assert parse_ref("timm", "resnet18", False) != parse_ref("timm", "resnet18")


# ---- sentence-transformers ---------------------------------------------------------------

@pytest.mark.parametrize("pretrained", [None, True, False, "anything", "x/y"])
def test_sentence_transformers_ignores_pretrained(pretrained):
    ref = parse_ref("sentence_transformers", "intfloat/e5-small-v2", pretrained)
    assert ref == ModelRef("sentence_transformers", "intfloat/e5-small-v2", None)
    assert ref.display_id == "intfloat/e5-small-v2"
    assert api_pretrained(ref) is None


# ---- display ids -------------------------------------------------------------------------

def test_display_id_in_the_name_field_sets_pretrained():
    ref = parse_ref("open_clip", "ViT-B-32::laion2b_s34b_b79k")
    assert ref == ModelRef("open_clip", "ViT-B-32", "laion2b_s34b_b79k")


def test_display_id_round_trips_through_parse():
    for ref in (
        parse_ref("open_clip", "ViT-B-32", "openai"),
        parse_ref("timm", "resnet18", False),
        parse_ref("timm", "resnet18", "custom"),
        parse_ref("timm", "resnet18"),
        parse_ref("sentence_transformers", "intfloat/e5-small-v2"),
    ):
        assert parse_ref(ref.library, ref.display_id) == ref


def test_display_id_with_the_same_pretrained_repeated_is_accepted():
    ref = parse_ref("open_clip", "ViT-B-32::openai", "openai")
    assert ref.pretrained == "openai"


def test_display_id_timm_false_matches_boolean_false():
    assert parse_ref("timm", "resnet18::false", False).pretrained == "false"


def test_display_id_with_a_conflicting_pretrained_is_rejected():
    with pytest.raises(BadRequest) as info:
        parse_ref("open_clip", "ViT-B-32::openai", "laion2b_s34b_b79k")
    assert "'openai'" in info.value.message
    assert "'laion2b_s34b_b79k'" in info.value.message


def test_display_id_with_an_empty_tag_is_rejected():
    with pytest.raises(BadRequest, match="empty"):
        parse_ref("open_clip", "ViT-B-32::")


# ---- store names -------------------------------------------------------------------------

STORE_CASES = [
    ("open_clip", "ViT-B-32", "laion2b_s34b_b79k"),
    ("open_clip", "ViT-B-32", "openai"),
    ("open_clip", "vit-b-32", "openai"),  # same slug as above, different identity
    ("open_clip", "hf-hub:timm/ViT-B-16-SigLIP", None),
    ("timm", "resnet50.a1_in1k", None),
    ("timm", "resnet50.a1_in1k", False),
    ("timm", "resnet50.a1_in1k", "ckpt"),
    ("timm", "hf-hub:timm/ViT-B-16-SigLIP", None),
    ("sentence_transformers", "intfloat/e5-small-v2", None),
    ("sentence_transformers", "a" * 100 + "/" + "b" * 99, None),
    ("open_clip", "ViT-B-32+", "x" * 200),
]


@pytest.mark.parametrize("library, name, pretrained", STORE_CASES)
def test_store_name_is_a_valid_bentoml_tag_name(library, name, pretrained):
    name = store_name(parse_ref(library, name, pretrained))
    assert STORE_NAME_RE.match(name), name


def test_store_name_is_readable_and_stable():
    ref = parse_ref("open_clip", "ViT-B-32", "openai")
    assert store_name(ref).startswith("clip-vit-b-32-openai-")
    assert store_name(ref) == store_name(parse_ref("open_clip", "ViT-B-32::openai"))


def test_store_names_differ_for_different_identities():
    names = [store_name(parse_ref(*case)) for case in STORE_CASES]
    assert len(set(names)) == len(names)


# ---- refused names -----------------------------------------------------------------------

BAD_NAMES = [
    pytest.param("../x", id="dotdot"),
    pytest.param("a/../b", id="dotdot-inside"),
    pytest.param("/abs/path", id="absolute"),
    pytest.param("a/b/c", id="two-slashes"),
    pytest.param("", id="empty"),
    pytest.param("a\x00b", id="nul"),
    pytest.param("a\nb", id="newline"),
    pytest.param("a" * 201, id="201-chars"),
    pytest.param("local-dir:/etc", id="local-dir"),
    pytest.param("C:\\models\\x", id="windows-path"),
    pytest.param("hf-hub:../x", id="hub-dotdot"),
    pytest.param("hf-hub:", id="hub-empty"),
    pytest.param("org/", id="trailing-slash"),
    pytest.param(".hidden", id="leading-dot"),
    pytest.param("name with space", id="space"),
]


@pytest.mark.parametrize("library", ["open_clip", "sentence_transformers", "timm"])
@pytest.mark.parametrize("name", BAD_NAMES)
def test_names_that_are_not_plain_identifiers_are_refused(library, name):
    with pytest.raises(BadRequest) as info:
        parse_ref(library, name, "tag")
    assert info.value.message
    assert info.value.status_code == 400


def test_refusal_messages_say_what_is_wrong():
    with pytest.raises(BadRequest, match="empty"):
        parse_ref("timm", "")
    with pytest.raises(BadRequest, match="longer than 200"):
        parse_ref("timm", "a" * 201)
    with pytest.raises(BadRequest, match="not a plain identifier"):
        parse_ref("timm", "../x")


def test_a_name_of_exactly_200_characters_is_accepted():
    assert parse_ref("timm", "a" * 200).name == "a" * 200


@pytest.mark.parametrize("tag", ["../x", "a/b", "", "a\x00b", "x" * 201])
def test_open_clip_pretrained_tags_are_checked_like_names(tag):
    with pytest.raises(BadRequest):
        parse_ref("open_clip", "ViT-B-32", tag)


@pytest.mark.parametrize("name, pretrained", [("resnet18\n", None), ("ViT-B-32", "openai\n")],
                         ids=["name", "tag"])
def test_a_trailing_newline_is_refused(name, pretrained):
    library = "timm" if pretrained is None else "open_clip"
    with pytest.raises(BadRequest):
        parse_ref(library, name, pretrained)
