"""How many front workers a machine gets when ``INGRAIN_HTTP_WORKERS`` is not set (README Performance)."""

from __future__ import annotations

import pytest

from ingrain_bento.machine import default_http_workers, http_workers
from ingrain_bento.settings import Settings


@pytest.mark.parametrize("cpus, gpus, workers", [
    (1, 0, 1), (2, 0, 1), (8, 0, 2), (16, 0, 4),  # no GPU: the forwards need the cores
    (2, 1, 1), (4, 1, 2), (16, 1, 14), (64, 8, 16),  # a GPU: every core but two feeds it, at most 16
])
def test_the_rule(cpus, gpus, workers):
    assert default_http_workers(cpus, gpus) == workers


def test_the_setting_wins():
    assert http_workers(Settings(http_workers=3)) == 3
