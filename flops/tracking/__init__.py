"""MLflow tracking, the way FLOps users know it (an optional extra: the manager never imports MLflow).

:mod:`flops.tracking.project` is the manager's side (what a project's aggregator is told, and how its
``tracking.logged`` reports land in the project's state and events); :mod:`flops.tracking.server` runs
``flops tracking``, an MLflow tracking server on loopback. The aggregator's side, which talks to MLflow, is
:mod:`flops.runtime.tracking`.
"""
