"""Management actions as one ``key=value`` line each, through BentoML's log handlers."""

from __future__ import annotations

import logging

__all__ = ["configure_logging"]


def configure_logging() -> None:
    """Send ``ingrain_bento.*`` key=value lines (management actions) through BentoML's handlers."""
    ours = logging.getLogger("ingrain_bento")
    ours.setLevel(logging.INFO)
    if not ours.handlers:
        for handler in logging.getLogger("bentoml").handlers or logging.getLogger().handlers:
            ours.addHandler(handler)
        ours.propagate = not ours.handlers
