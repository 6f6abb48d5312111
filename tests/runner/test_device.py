"""Which device a runner's models live on: runner ``i`` of ``INGRAIN_RUNNERS`` takes CUDA device
``i`` (BentoML shows every assigned GPU to every runner worker), ``INGRAIN_DEVICE`` wins, and
without CUDA it is the CPU."""

from __future__ import annotations

import pytest
import torch

from ingrain_bento.runner.device import pick_device
from ingrain_bento.settings import Settings


@pytest.mark.parametrize("index, expected", [(0, "cuda:0"), (1, "cuda:1"), (2, "cuda:0")])
def test_runner_i_takes_device_i(monkeypatch, index, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert str(pick_device(Settings(), index)) == expected


def test_the_setting_wins_and_without_cuda_it_is_the_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert str(pick_device(Settings(), 1)) == "cpu"
    assert str(pick_device(Settings(device="cuda:3"), 0)) == "cuda:3"
