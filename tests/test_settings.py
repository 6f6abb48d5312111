"""Every knob lives in Settings, reads its documented environment variable, and is in the README."""

from __future__ import annotations

from pathlib import Path

import pytest

from ingrain_bento.settings import Settings

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def _env_names() -> list[str]:
    return [field.validation_alias.choices[0] for field in Settings.model_fields.values()]  # type: ignore[union-attr]


@pytest.mark.parametrize("env", _env_names())
def test_each_setting_is_documented_in_the_readme_table(env):
    assert f"| `{env}` |" in README, f"{env} is missing from README's configuration table"


def test_ingrains_own_names_are_kept():
    assert {"MAX_LOADED_MODELS", "MAX_BATCH_SIZE", "DYNAMIC_BATCHING", "FP16_ENABLED"} <= set(_env_names())
    assert all(name.startswith("INGRAIN_") for name in _env_names()
               if name not in {"MAX_LOADED_MODELS", "MAX_BATCH_SIZE", "DYNAMIC_BATCHING", "FP16_ENABLED"})


def test_settings_read_the_environment(monkeypatch):
    monkeypatch.setenv("MAX_LOADED_MODELS", "3")
    monkeypatch.setenv("INGRAIN_EVICTION", "reject")
    monkeypatch.setenv("DYNAMIC_BATCHING", "false")
    settings = Settings()
    assert (settings.max_loaded_models, settings.eviction, settings.dynamic_batching) == (3, "reject", False)
    monkeypatch.setenv("INGRAIN_EVICTION", "sometimes")
    with pytest.raises(ValueError):
        Settings()
