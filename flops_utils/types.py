"""Enumerations shared with the original FLOps (``flops_utils.types``) that repositories may import."""

from __future__ import annotations

from enum import StrEnum


class CustomEnum(StrEnum):
    """A string enum whose value is its text."""


class MLModelFlavor(CustomEnum):
    """Which ML library the repository's model is built with."""

    SKLEARN = "sklearn"
    PYTORCH = "pytorch"
    KERAS = "keras"


class AggregatorType(CustomEnum):
    """The aggregator roles of classic and hierarchical FL."""

    CLASSIC_AGGREGATOR = "CLASSIC_AGGREGATOR"
    ROOT_AGGREGATOR = "ROOT_AGGREGATOR"
    CLUSTER_AGGREGATOR = "CLUSTER_AGGREGATOR"


class FLOpsMode(CustomEnum):
    """Classic (one aggregator) or clustered-hierarchical FL."""

    CLASSIC = "classic"
    HIERARCHICAL = "hierarchical"
