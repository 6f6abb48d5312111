"""One model state for every runner and every replica (README "Several replicas").

- ``desired.py``: the record of what must be resident and stored, with its generation;
- ``home.py``: where it lives and how it changes (compare-and-swap): ``LocalStateHome``, one
  file beside the store, for the runners of one machine; ``s3.py``: ``S3StateHome``, one object
  in an S3-compatible bucket, for replicas on many machines;
- ``reconcile.py``: how one runner drives what it holds toward the record;
- ``reports.py``: what each live runner holds, as it reports it (the listings' source);
- ``entries.py``: the store entries in the bucket (BentoML's own export and import).

``runner/sync.py`` connects a runner's pool and store to all of it.
"""

from ingrain_bento.model_state.desired import DesiredModel, DesiredState, model_key
from ingrain_bento.model_state.home import (
    LocalStateHome,
    StateHome,
    StoreUnreachable,
    Versioned,
    WriteConflict,
    open_home,
    update,
)
from ingrain_bento.model_state.reconcile import Held, Plan, Reconciler, RunnerModels, plan_changes

__all__ = ["DesiredModel", "DesiredState", "Held", "LocalStateHome", "Plan", "Reconciler", "RunnerModels",
           "StateHome", "StoreUnreachable", "Versioned", "WriteConflict", "model_key", "open_home", "plan_changes",
           "update"]
