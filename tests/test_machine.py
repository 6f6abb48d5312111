"""How many front workers a machine gets when ``INGRAIN_HTTP_WORKERS`` is not set, how many
runners (one per GPU, ``INGRAIN_RUNNERS``), and which process holds the models (README "Two
tiers", "Several runners and replicas")."""

from __future__ import annotations

import pytest

from ingrain_bento import machine
from ingrain_bento.machine import (
    default_http_workers,
    engine_process,
    http_workers,
    runner_count,
    runner_place,
    runner_resources,
)
from ingrain_bento.settings import Settings


@pytest.mark.parametrize("cpus, gpus, workers", [
    (1, 0, 1), (2, 0, 1), (8, 0, 2), (16, 0, 4),  # no GPU: the forwards need the cores
    (2, 1, 1), (4, 1, 2), (16, 1, 14), (64, 8, 16),  # a GPU: every core but two feeds it, at most 16
])
def test_the_rule(cpus, gpus, workers):
    assert default_http_workers(cpus, gpus) == workers


def test_the_setting_wins():
    assert http_workers(Settings(http_workers=3)) == 3


@pytest.mark.parametrize("address, place", [
    (None, "none"), ("file:///tmp/bentoml-uds-x/1.sock", "local"), ("tcp://127.0.0.1:4001", "local"),
    ("http://localhost:3000", "local"), ("http://[::1]:3000", "local"),
    ("http://ingrain-runner:3000", "remote"), ("https://runner.example.com", "remote"),
    ("tcp://10.0.0.5:3000", "remote"),
])
def test_where_the_runner_is_comes_from_its_address(address, place):
    assert runner_place(address) == place


@pytest.mark.parametrize("cpus, gpus, settings, runner, expected", [
    (2, 0, {}, "local", "front"),  # a small CPU machine: the models live in the one front worker
    (2, 0, {}, "none", "front"),  # no runner process at all (Service.to_asgi())
    (2, 0, {"http_workers": 2}, "local", "runner"),  # two front workers share one model state
    (16, 0, {}, "local", "runner"),  # 16 cores: four front workers by default
    (16, 1, {}, "local", "runner"),  # a GPU
    (2, 1, {"device": "cpu"}, "local", "front"),  # a GPU the models do not use
    (2, 0, {}, "remote", "runner"),  # deployed apart
    (16, 1, {"engine_process": "front", "http_workers": 1}, "local", "front"),  # the setting wins
    (2, 0, {"engine_process": "runner"}, "local", "runner"),
    (2, 0, {"runners": 2}, "local", "runner"),  # several runners: the models live in them
])
def test_which_process_holds_the_models(monkeypatch, cpus, gpus, settings, runner, expected):
    monkeypatch.setattr(machine, "_probe", lambda: (float(cpus), gpus))
    assert engine_process(Settings(**settings), runner) == expected


def test_models_in_the_front_with_several_front_workers_is_refused(monkeypatch):
    monkeypatch.setattr(machine, "_probe", lambda: (16.0, 0))
    with pytest.raises(ValueError, match="one front worker"):
        engine_process(Settings(engine_process="front", http_workers=2), "local")


@pytest.mark.parametrize("gpus, settings, runners, resources", [
    (0, {}, 1, None),  # no GPU: one runner on the CPU
    (1, {}, 1, {"gpu": 1}),
    (4, {}, 4, {"gpu": 4}),  # one runner per GPU, each shown every GPU and taking its own
    (0, {"runners": 3}, 3, None),  # any number on a CPU machine (tests)
    (4, {"runners": 2}, 2, {"gpu": 2}),
    (4, {"device": "cuda:1"}, 1, None),  # a device picked by hand: one runner on it
])
def test_one_runner_per_device(monkeypatch, gpus, settings, runners, resources):
    monkeypatch.setattr(machine, "_probe", lambda: (16.0, gpus))
    assert runner_count(Settings(**settings)) == runners
    assert runner_resources(Settings(**settings)) == resources


def test_models_in_the_front_with_several_runners_is_refused(monkeypatch):
    monkeypatch.setattr(machine, "_probe", lambda: (2.0, 0))
    with pytest.raises(ValueError, match="INGRAIN_RUNNERS"):
        engine_process(Settings(engine_process="front", runners=2), "local")
