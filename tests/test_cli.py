"""``ingrain-bento pull/list/rm``: the server's own store code, from the command line."""

from __future__ import annotations

from ingrain_bento.cli import main
from ingrain_bento.families import parse_ref
from ingrain_bento.store import ModelStore


def test_pull_list_rm_round_trip(capsys):
    ref = parse_ref("timm", "test_efficientnet_gn.r160_in1k", False)
    assert main(["pull", "--library", "timm", "--name", ref.name, "--pretrained", "false"]) == 0
    assert ModelStore().find(ref) is not None
    assert main(["list"]) == 0
    assert "test_efficien" in capsys.readouterr().out
    assert main(["rm", "--name", ref.name, "--pretrained", "false"]) == 0
    assert ModelStore().find(ref) is None


def test_pull_from_a_model_list(tmp_path):
    listing = tmp_path / "models.yaml"
    listing.write_text("models:\n  - {library: timm, name: test_vit2.r160_in1k, pretrained: false}\n")
    assert main(["pull", "--from", str(listing)]) == 0
    ref = parse_ref("timm", "test_vit2.r160_in1k", False)
    assert ModelStore().find(ref) is not None
    ModelStore().delete(ref)


def test_bad_input_exits_non_zero_with_a_message(capsys, tmp_path):
    assert main(["pull", "--library", "timm", "--name", "../etc"]) == 1
    assert "plain identifier" in capsys.readouterr().out
    assert main(["rm", "--name", "never-stored"]) == 1
    assert main(["pull"]) == 2
