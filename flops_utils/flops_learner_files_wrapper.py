"""Legacy import path of early FLOps ML repositories: ``load_ml_data`` = ``load_dataset``."""

from __future__ import annotations

import datasets

from flops_utils.ml_repo_building_blocks import load_dataset


def load_ml_data() -> datasets.Dataset:
    """Return this node's data for the project's tags (alias of ``load_dataset``)."""
    return load_dataset()
